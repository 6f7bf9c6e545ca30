//! Denoising scores of a held-out split: what a model does with a *noised* ideal target, which needs no sampling
//! from pure noise and so still measures a weak base and small fine-tuning effects.
//!
//! For every item `k` and every `t` of [`DENOISE_TIMES`], one noise `ε` (seeded by `k` and `t`'s index) noises the
//! winner and the loser alike (as in a Diffusion-DPO step), and one forward with the adapters on (the policy) and
//! one with them off (the base, the DPO reference) predict, conditioned on the item's prompt and references:
//! - `psnr` / `subject_psnr`: the one-step estimate `x̂₀` of the policy (`model::schedule::predicted_x0`) against
//!   the winner, decoded to pixels, over the whole image / inside the union of the subject masks (dB, mean over
//!   items × times);
//! - `preference_accuracy`: on these pairs the model never trained on, the fraction of (item, t) where the policy
//!   improved on the reference more for the winner than for the loser, i.e. the implicit reward
//!   `z = −[(e_θ(w) − e_ref(w)) − (e_θ(l) − e_ref(l))]` of Eq. 1 (without β, which does not change its sign) is
//!   positive; `z = 0` counts ½, so a base without adapters scores exactly 0.5;
//! - `preference_margin`: the mean of that `z` (per-element mean squared errors, so ×β gives Eq. 1's logit);
//! - `subject_preference_accuracy` / `subject_preference_margin`: the same with the errors measured only on the
//!   tokens of the subjects (the union of the item's masks on the token grid, `M_prior`'s pooling rule): the
//!   region FocusDPO's mask concentrates the loss on, where the paper claims its gain.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::EvalError;
use super::benchmark::{mean, union_mask};
use super::metrics::psnr;
use super::sampler::{SampleRequest, SampleSettings, predict_conditioned};
use crate::dip::synth::SynthItem;
use crate::masks::{PriorConfig, prior_token_mask};
use crate::model::schedule::{add_noise, model_time, predicted_x0, schedule_time};
use crate::model::{Adapters, BaseModel};
use crate::rng::{normal_vec, stream_rng};

/// Fractions of the schedule at which items are noised (`t` for rectified flow, `T = round(t·999)` for DDPM).
pub const DENOISE_TIMES: [f32; 3] = [0.25, 0.5, 0.75];

/// Random stream of the denoising noise.
const STREAM_DENOISE: u64 = 0x444E_4F49_0001;

/// Denoising scores of one split.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenoiseScores {
    /// PSNR of the policy's `x̂₀` to the winner (dB).
    pub psnr: f64,
    /// The same inside the subject masks (dB).
    pub subject_psnr: f64,
    /// Held-out preference accuracy (ties ½).
    pub preference_accuracy: f64,
    /// Mean held-out implicit reward `z` (without β).
    pub preference_margin: f64,
    /// Held-out preference accuracy with the errors measured on the subject tokens only (NaN in reports written
    /// before it existed).
    #[serde(default = "not_measured")]
    pub subject_preference_accuracy: f64,
    /// Mean held-out implicit reward on the subject tokens only.
    #[serde(default = "not_measured")]
    pub subject_preference_margin: f64,
}

fn not_measured() -> f64 {
    f64::NAN
}

/// The implicit reward of one pair from the four per-sample errors (policy / reference × winner / loser), Eq. 1's
/// `−[(e_θ(w) − e_ref(w)) − (e_θ(l) − e_ref(l))]` without β.
pub fn implicit_reward(policy_w: f64, ref_w: f64, policy_l: f64, ref_l: f64) -> f64 {
    // `0 − x`, not `−x`: a tie is +0.0, not −0.0 (which prints as "-0.00000").
    0.0 - ((policy_w - ref_w) - (policy_l - ref_l))
}

/// The accuracy of a set of implicit rewards: `z > 0` counts 1, `z = 0` ½. `None` when empty.
pub fn preference_accuracy(rewards: &[f64]) -> Option<f64> {
    if rewards.is_empty() {
        return None;
    }
    let hits: f64 = rewards
        .iter()
        .map(|&z| {
            if z > 0.0 {
                1.0
            } else if z == 0.0 {
                0.5
            } else {
                0.0
            }
        })
        .sum();
    Some(hits / rewards.len() as f64)
}

/// Per-row mean squared error `[rows]` of `a` against `b` (`[rows, …]`).
fn row_mse(a: &Tensor, b: &Tensor) -> Result<Vec<f64>, EvalError> {
    let rows = a.dim(0)?;
    let d = (a - b)?.sqr()?.reshape((rows, ()))?.mean(1)?;
    Ok(d.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
}

/// Per-row mean squared error `[rows]` of `a` against `b` (`[rows, tokens, channels]`) over the tokens where
/// `tokens` (`[tokens]`, 0/1) is 1.
fn row_mse_on(a: &Tensor, b: &Tensor, tokens: &Tensor) -> Result<Vec<f64>, EvalError> {
    let count = f64::from(tokens.sum_all()?.to_scalar::<f32>()?);
    let per_token = (a - b)?.sqr()?.mean(2)?;
    let d = per_token.broadcast_mul(&tokens.unsqueeze(0)?)?.sum(1)?;
    Ok(d.to_vec1::<f32>()?.into_iter().map(|x| f64::from(x) / count).collect())
}

/// The denoising scores of `items` with `base` (an attached LoRA is the policy; without one the policy is the
/// base). `settings` supplies the parameterisation, the reference size and the distilled guidance.
pub fn denoise_split(
    base: &BaseModel,
    items: &[SynthItem],
    settings: &SampleSettings,
) -> Result<DenoiseScores, EvalError> {
    settings.validate()?;
    let device = base.mmdit.device().clone();
    let param = settings.parameterisation;
    let times: Vec<f32> = DENOISE_TIMES.iter().map(|&f| schedule_time(param, f)).collect();
    let nt = times.len();
    let (mut psnrs, mut subject_psnrs, mut rewards) = (Vec::new(), Vec::new(), Vec::new());
    let mut subject_rewards = Vec::new();
    let token_rule = PriorConfig {
        stride: base.codec.pixels_per_token(),
        ..PriorConfig::default()
    };
    for (k, item) in items.iter().enumerate() {
        let grid = base
            .codec
            .grid_for(item.winner.width(), item.winner.height())
            .map_err(|e| EvalError::Invalid(e.to_string()))?;
        let encode = |img| {
            base.codec
                .encode(img, &device)
                .map_err(|e| EvalError::Invalid(e.to_string()))
        };
        let (x0_w, x0_l) = (encode(&item.winner)?, encode(&item.loser)?);
        let noises = (0..nt)
            .map(|i| {
                let mut rng = stream_rng(k as u64, STREAM_DENOISE, i as u64);
                Tensor::from_vec(normal_vec(&mut rng, x0_w.elem_count()), x0_w.dims(), &device)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        // Rows: winner at each t, then the loser at each t, with the same noises.
        let x0 = Tensor::cat(&[vec![x0_w.clone(); nt], vec![x0_l.clone(); nt]].concat(), 0)?;
        let eps = Tensor::cat(&[noises.clone(), noises].concat(), 0)?;
        let ts = [times.clone(), times.clone()].concat();
        let noised = add_noise(param, &x0, &eps, &ts)?;
        let model_t = model_time(param, &ts, &device)?;
        let request = SampleRequest {
            prompt: &item.record.prompt,
            references: &item.references,
            size_px: item.winner.dimensions(),
        };
        let policy = predict_conditioned(base, &request, settings, &noised.x_t, &model_t, Adapters::On)?;
        let reference = predict_conditioned(base, &request, settings, &noised.x_t, &model_t, Adapters::Off)?;
        let e_policy = row_mse(&policy, &noised.target)?;
        let e_ref = row_mse(&reference, &noised.target)?;
        for i in 0..nt {
            rewards.push(implicit_reward(e_policy[i], e_ref[i], e_policy[nt + i], e_ref[nt + i]));
        }
        let mask = union_mask(item);
        let tokens = prior_token_mask(
            mask.as_raw(),
            mask.width() as usize,
            mask.height() as usize,
            &token_rule,
        )
        .map_err(|e| EvalError::Invalid(format!("{}: subject tokens: {e}", item.record.id)))?;
        if tokens.l1_norm() > 0.0 {
            let tokens = Tensor::from_slice(tokens.as_slice(), tokens.len(), &device)?;
            let s_policy = row_mse_on(&policy, &noised.target, &tokens)?;
            let s_ref = row_mse_on(&reference, &noised.target, &tokens)?;
            for i in 0..nt {
                subject_rewards.push(implicit_reward(s_policy[i], s_ref[i], s_policy[nt + i], s_ref[nt + i]));
            }
        }
        let x0_hat = predicted_x0(param, &noised.x_t, &policy, &ts)?;
        for i in 0..nt {
            let img = base
                .codec
                .decode(&x0_hat.narrow(0, i, 1)?, grid)
                .map_err(|e| EvalError::Invalid(e.to_string()))?;
            if let Some(p) = psnr(&img, &item.winner, None) {
                psnrs.push(p.min(100.0));
            }
            if let Some(p) = psnr(&img, &item.winner, Some(&mask)) {
                subject_psnrs.push(p.min(100.0));
            }
        }
    }
    Ok(DenoiseScores {
        psnr: mean(&psnrs),
        subject_psnr: mean(&subject_psnrs),
        preference_accuracy: preference_accuracy(&rewards).unwrap_or(f64::NAN),
        preference_margin: mean(&rewards),
        subject_preference_accuracy: preference_accuracy(&subject_rewards).unwrap_or(f64::NAN),
        subject_preference_margin: mean(&subject_rewards),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::benchmark::{BenchmarkConfig, eval_items};

    #[test]
    fn implicit_reward_and_accuracy_hand_cases() {
        // The policy lowered the winner's error by 0.2 and raised the loser's by 0.1: z = −(−0.2 − 0.1) = 0.3.
        assert!((implicit_reward(0.8, 1.0, 1.1, 1.0) - 0.3).abs() < 1e-12);
        // The other way round: z < 0.
        assert!(implicit_reward(1.1, 1.0, 0.8, 1.0) < 0.0);
        assert!(
            implicit_reward(0.5, 0.5, 0.7, 0.7).to_bits() == 0.0f64.to_bits(),
            "a tie is +0"
        );
        assert_eq!(preference_accuracy(&[0.3, -0.1, 0.0, 2.0]), Some(2.5 / 4.0));
        assert_eq!(preference_accuracy(&[]), None);
    }

    /// The masked error by hand: two rows, three tokens of two channels, tokens 0 and 2 counted.
    #[test]
    fn masked_row_mse_hand_case() -> Result<(), EvalError> {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::new(
            &[[[1f32, 1.], [5., 5.], [3., 1.]], [[0., 0.], [0., 0.], [0., 0.]]],
            &dev,
        )?;
        let b = Tensor::zeros((2, 3, 2), candle_core::DType::F32, &dev)?;
        let tokens = Tensor::new(&[1f32, 0., 1.], &dev)?;
        // Row 0: token 0 → (1 + 1)/2 = 1, token 2 → (9 + 1)/2 = 5; mean over the 2 tokens = 3. Row 1: 0.
        assert_eq!(row_mse_on(&a, &b, &tokens)?, [3.0, 0.0]);
        Ok(())
    }

    /// A base without adapters is its own reference: every reward is exactly 0, the accuracy ½; the estimates are
    /// deterministic and finite.
    #[test]
    fn a_base_alone_ties_and_is_deterministic() -> Result<(), EvalError> {
        let base = BaseModel::random(&crate::model::Config::micro(), 4, 3, &candle_core::Device::Cpu)
            .map_err(|e| EvalError::Invalid(e.to_string()))?;
        let cfg = BenchmarkConfig {
            single_items: 2,
            ..BenchmarkConfig::default()
        };
        let items = eval_items(&cfg, false)?;
        let a = denoise_split(&base, &items, &cfg.sampler.resolve(&base))?;
        assert_eq!(a.preference_accuracy, 0.5);
        assert_eq!(a.preference_margin, 0.0);
        assert_eq!(a.subject_preference_accuracy, 0.5);
        assert_eq!(a.subject_preference_margin, 0.0);
        assert!(a.psnr.is_finite() && a.subject_psnr.is_finite(), "{a:?}");
        assert_eq!(a, denoise_split(&base, &items, &cfg.sampler.resolve(&base))?);
        Ok(())
    }
}
