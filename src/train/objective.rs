//! Training objectives: SFT, Diffusion-DPO (Eq. 1) and FocusDPO (Eq. 10).
//!
//! All functions take the regression target (see [`crate::model::schedule`]: `ε` or the velocity `v`) and the
//! policy / reference predictions for the winner and the loser, as `[B, …]` tensors (token layout `[B, N, C]` for
//! our MMDiT), with the **same noise and the same t** for winner and loser.
//!
//! **Per-sample error.** `e(pred) = reduce((target − pred)² ⊙ M²)`: Eq. 10 writes `‖(ε − ε_θ) ⊙ M‖²`, so the
//! weight of each element is `M²`. `M` is `[B, N]` (one weight per token, the fused map of
//! [`crate::masks::fuse`]) and broadcasts over channels. The reduction is a config choice ([`MaskNorm`]):
//! * [`MaskNorm::Mean`] (default): mean over all elements of the sample, as the Diffusion-DPO code reduces its
//!   MSE. With `M = 1` this is exactly Diffusion-DPO. Smaller masks give smaller errors, i.e. a weaker effective β.
//! * [`MaskNorm::WeightedMean`]: divide by `Σ M²` instead, so the error is a weighted average whose scale does not
//!   depend on the mask's area (0 when `M = 0`).
//!
//! **Eq. 1 / Eq. 10.** With `Δ_w = e_θ(w) − e_ref(w)` and `Δ_l = e_θ(l) − e_ref(l)`, the implicit reward margin is
//! `z = −β·(Δ_w − Δ_l)` and the loss `−log σ(z − m)`. The paper's `T·ω(λ_t)` is folded into `β` (ω constant, as
//! in Diffusion-DPO's released code; their `beta_dpo` includes an extra factor ½, so their 5000 is our 2500).
//! `m` is an optional margin (0 in the paper). `−log σ(x)` is evaluated stably and without a kink at 0
//! ([`neg_log_sigmoid`]).
//!
//! **Ablation knobs.** `λ·SFT` adds `λ·mean_b e_θ(w)` (same weights) to the loss. The pair filter `δ` drops pairs
//! whose reference already prefers the winner by more than `δ` in error units (`e_ref(l) − e_ref(w) > δ`); the
//! loss averages over kept pairs (0 with zero gradient when none is kept).

use candle_core::{D, DType, Result, Tensor};

/// Which objective a run optimises.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObjectiveKind {
    /// Supervised fine-tuning on the winners (regression loss).
    Sft,
    /// Diffusion-DPO (Eq. 1): uniform spatial weights.
    Dpo,
    /// FocusDPO (Eq. 10): Diffusion-DPO with the fused weight map `M`.
    #[default]
    FocusDpo,
}

impl ObjectiveKind {
    /// Name used on the command line (`sft`, `dpo`, `focus-dpo`).
    pub fn name(self) -> &'static str {
        match self {
            ObjectiveKind::Sft => "sft",
            ObjectiveKind::Dpo => "dpo",
            ObjectiveKind::FocusDpo => "focus-dpo",
        }
    }

    /// Every objective.
    pub const ALL: [ObjectiveKind; 3] = [ObjectiveKind::Sft, ObjectiveKind::Dpo, ObjectiveKind::FocusDpo];
}

impl std::str::FromStr for ObjectiveKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let key = s.trim().to_ascii_lowercase().replace('_', "-");
        let key = if key == "focusdpo" {
            "focus-dpo".to_string()
        } else {
            key
        };
        Self::ALL
            .into_iter()
            .find(|k| k.name() == key)
            .ok_or_else(|| format!("unknown objective `{s}` (expected sft, dpo or focus-dpo)"))
    }
}

/// How masked squared errors are reduced per sample (module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaskNorm {
    /// Mean over all elements (Diffusion-DPO's reduction).
    #[default]
    Mean,
    /// Divide by `Σ M²` (area-independent).
    WeightedMean,
}

/// Hyper-parameters of the preference objectives.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectiveConfig {
    /// β (with `T·ω(λ_t)` folded in).
    pub beta: f32,
    /// Margin `m` inside the sigmoid.
    pub margin: f32,
    /// λ of the SFT regulariser (0 = off).
    pub sft_lambda: f32,
    /// Pair filter δ (None = keep every pair).
    pub pair_filter_delta: Option<f32>,
    /// Reduction of masked errors.
    pub mask_norm: MaskNorm,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        Self {
            beta: 2500.0,
            margin: 0.0,
            sft_lambda: 0.0,
            pair_filter_delta: None,
            mask_norm: MaskNorm::Mean,
        }
    }
}

/// The differentiable loss and what is logged about the step.
#[derive(Clone, Debug)]
pub struct ObjectiveOutput {
    /// Scalar loss (differentiable w.r.t. the policy predictions).
    pub loss: Tensor,
    /// Logged statistics.
    pub stats: StepStats,
}

/// Per-step statistics (batch means).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct StepStats {
    /// Loss value.
    pub loss: f32,
    /// Fraction of pairs with `z > 0`, ties counted ½ (1 for SFT is meaningless: NaN there).
    pub implicit_accuracy: f32,
    /// Mean implicit reward margin `z`.
    pub reward_margin: f32,
    /// Mean `e_θ(w)`.
    pub err_policy_w: f32,
    /// Mean `e_ref(w)`.
    pub err_ref_w: f32,
    /// Mean `e_θ(l)`.
    pub err_policy_l: f32,
    /// Mean `e_ref(l)`.
    pub err_ref_l: f32,
    /// Pairs that passed the δ filter.
    pub kept_pairs: usize,
}

impl StepStats {
    /// The statistics of a step that accumulated several pairs: means, and the kept pairs summed.
    pub fn mean(all: &[StepStats]) -> StepStats {
        let n = all.len().max(1) as f32;
        let avg = |f: fn(&StepStats) -> f32| all.iter().map(f).sum::<f32>() / n;
        StepStats {
            loss: avg(|s| s.loss),
            implicit_accuracy: avg(|s| s.implicit_accuracy),
            reward_margin: avg(|s| s.reward_margin),
            err_policy_w: avg(|s| s.err_policy_w),
            err_ref_w: avg(|s| s.err_ref_w),
            err_policy_l: avg(|s| s.err_policy_l),
            err_ref_l: avg(|s| s.err_ref_l),
            kept_pairs: all.iter().map(|s| s.kept_pairs).sum(),
        }
    }
}

/// Per-sample error `reduce((target − pred)² ⊙ M²)`, shape `[B]` (module docs).
///
/// `weights` (`M`) has the leading dims of `pred` (e.g. `[B, N]` for `[B, N, C]`) and broadcasts over the rest.
pub fn per_sample_error(target: &Tensor, pred: &Tensor, weights: Option<&Tensor>, norm: MaskNorm) -> Result<Tensor> {
    let sq = (target - pred)?.sqr()?;
    let batch = sq.dim(0)?;
    let per_sample_elems = (sq.elem_count() / batch.max(1)) as f64;
    let Some(m) = weights else {
        return sq.flatten_from(1)?.mean(D::Minus1);
    };
    let m2 = m.sqr()?;
    let mut w2 = m2.clone();
    while w2.rank() < sq.rank() {
        w2 = w2.unsqueeze(D::Minus1)?;
    }
    let weighted_sum = sq.broadcast_mul(&w2)?.flatten_from(1)?.sum(D::Minus1)?;
    match norm {
        MaskNorm::Mean => weighted_sum.affine(1.0 / per_sample_elems, 0.0),
        MaskNorm::WeightedMean => {
            // Σ M² over the broadcast elements = Σ_tokens M² × channels-per-token.
            let per_weight = per_sample_elems / (m.elem_count() / batch.max(1)).max(1) as f64;
            let denom = m2
                .flatten_from(1)?
                .sum(D::Minus1)?
                .affine(per_weight, 0.0)?
                .clamp(1e-12, f64::MAX)?;
            weighted_sum.div(&denom)
        }
    }
}

/// Above this, `softplus(y) = log(1 + exp(y))` is evaluated as `y` (the difference is below `exp(−30)`).
const SOFTPLUS_LINEAR_ABOVE: f64 = 30.0;

/// Numerically stable `−log σ(x) = softplus(−x)`, elementwise.
///
/// Evaluated as `log(1 + exp(min(−x, 30)))`, switched to `−x` where `−x > 30`. Unlike the textbook
/// `relu(−x) + log(1 + exp(−|x|))`, this has no kink at `x = 0`: candle's subgradients of `relu` and `abs` at 0
/// do not match, which gives a wrong gradient (−1.5 instead of −0.5) exactly at `z = 0`, i.e. at the first step of
/// every LoRA run where the policy equals the reference.
pub fn neg_log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let y = x.neg()?;
    let soft = y.minimum(SOFTPLUS_LINEAR_ABOVE)?.exp()?.affine(1.0, 1.0)?.log()?;
    y.gt(SOFTPLUS_LINEAR_ABOVE)?.where_cond(&y, &soft)
}

/// The winner/loser predictions of one step.
#[derive(Clone, Copy, Debug)]
pub struct PairPredictions<'a> {
    /// Target for the winner (`ε^w` or `v^w`).
    pub target_w: &'a Tensor,
    /// Target for the loser.
    pub target_l: &'a Tensor,
    /// Policy prediction on `x_t^w`.
    pub policy_w: &'a Tensor,
    /// Policy prediction on `x_t^l`.
    pub policy_l: &'a Tensor,
    /// Reference prediction on `x_t^w` (treated as a constant).
    pub reference_w: &'a Tensor,
    /// Reference prediction on `x_t^l` (treated as a constant).
    pub reference_l: &'a Tensor,
}

fn mean_scalar(t: &Tensor) -> Result<f32> {
    t.mean_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()
}

/// Eq. 1 (`weights = None`) and Eq. 10 (`weights = Some(M)`), with the knobs of [`ObjectiveConfig`].
pub fn diffusion_dpo(
    p: &PairPredictions<'_>,
    weights: Option<&Tensor>,
    cfg: &ObjectiveConfig,
) -> Result<ObjectiveOutput> {
    let err = |target: &Tensor, pred: &Tensor| per_sample_error(target, pred, weights, cfg.mask_norm);
    let e_pw = err(p.target_w, p.policy_w)?;
    let e_pl = err(p.target_l, p.policy_l)?;
    let e_rw = err(p.target_w, &p.reference_w.detach())?;
    let e_rl = err(p.target_l, &p.reference_l.detach())?;
    let delta_w = (&e_pw - &e_rw)?;
    let delta_l = (&e_pl - &e_rl)?;
    let z = (delta_w - delta_l)?.affine(-f64::from(cfg.beta), 0.0)?;
    let per_pair = neg_log_sigmoid(&z.affine(1.0, -f64::from(cfg.margin))?)?;

    let batch = z.dim(0)?;
    let keep: Vec<f32> = match cfg.pair_filter_delta {
        None => vec![1.0; batch],
        Some(delta) => {
            let ref_margin = (&e_rl - &e_rw)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            ref_margin.iter().map(|&m| if m > delta { 0.0 } else { 1.0 }).collect()
        }
    };
    let kept_pairs = keep.iter().filter(|&&k| k > 0.0).count();
    let keep_t = Tensor::from_vec(keep, batch, z.device())?.to_dtype(z.dtype())?;
    let mut loss = (per_pair * keep_t)?
        .sum_all()?
        .affine(1.0 / kept_pairs.max(1) as f64, 0.0)?;
    if cfg.sft_lambda != 0.0 {
        loss = (loss + e_pw.mean_all()?.affine(f64::from(cfg.sft_lambda), 0.0)?)?;
    }

    let z_vals = z.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let accuracy = z_vals
        .iter()
        .map(|&v| match v.partial_cmp(&0.0) {
            Some(std::cmp::Ordering::Greater) => 1.0,
            Some(std::cmp::Ordering::Equal) => 0.5,
            _ => 0.0,
        })
        .sum::<f32>()
        / batch.max(1) as f32;
    let stats = StepStats {
        loss: mean_scalar(&loss)?,
        implicit_accuracy: accuracy,
        reward_margin: z_vals.iter().sum::<f32>() / batch.max(1) as f32,
        err_policy_w: mean_scalar(&e_pw)?,
        err_ref_w: mean_scalar(&e_rw)?,
        err_policy_l: mean_scalar(&e_pl)?,
        err_ref_l: mean_scalar(&e_rl)?,
        kept_pairs,
    };
    Ok(ObjectiveOutput { loss, stats })
}

/// Eq. 1: Diffusion-DPO with uniform spatial weights.
pub fn eq1_diffusion_dpo(p: &PairPredictions<'_>, cfg: &ObjectiveConfig) -> Result<ObjectiveOutput> {
    diffusion_dpo(p, None, cfg)
}

/// Eq. 10: FocusDPO, Diffusion-DPO on errors weighted by the fused map `M` (`[B, N]`).
pub fn eq10_focus_dpo(p: &PairPredictions<'_>, m: &Tensor, cfg: &ObjectiveConfig) -> Result<ObjectiveOutput> {
    diffusion_dpo(p, Some(m), cfg)
}

/// SFT: the regression loss on the winners, `mean_b e_θ(w)` (optionally weighted).
pub fn sft(target_w: &Tensor, policy_w: &Tensor, weights: Option<&Tensor>, norm: MaskNorm) -> Result<ObjectiveOutput> {
    let e = per_sample_error(target_w, policy_w, weights, norm)?;
    let loss = e.mean_all()?;
    let value = mean_scalar(&loss)?;
    Ok(ObjectiveOutput {
        loss,
        stats: StepStats {
            loss: value,
            implicit_accuracy: f32::NAN,
            reward_margin: f32::NAN,
            err_policy_w: value,
            err_ref_w: f32::NAN,
            err_policy_l: f32::NAN,
            err_ref_l: f32::NAN,
            kept_pairs: e.dim(0)?,
        },
    })
}

crate::config_enum!(no_from_str ObjectiveKind, ObjectiveKind::ALL);
crate::config_enum!(MaskNorm, [MaskNorm::Mean, MaskNorm::WeightedMean]);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t3(v: &[f32], b: usize, n: usize) -> Tensor {
        Tensor::from_slice(v, (b, n, 1), &Device::Cpu).unwrap()
    }

    fn close(a: f32, b: f32) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }

    /// One pair, two tokens, one channel; zero targets so errors are mean squares of the predictions:
    /// e_θ(w) = (0.5² + 0)/2 = 0.125, e_ref(w) = (0.5² + 0.5²)/2 = 0.25,
    /// e_θ(l) = (1² + 0)/2 = 0.5,     e_ref(l) = 0.25.
    fn pair() -> [Tensor; 6] {
        [
            t3(&[0.0, 0.0], 1, 2),
            t3(&[0.0, 0.0], 1, 2),
            t3(&[0.5, 0.0], 1, 2),
            t3(&[1.0, 0.0], 1, 2),
            t3(&[0.5, 0.5], 1, 2),
            t3(&[0.5, 0.5], 1, 2),
        ]
    }

    fn preds(t: &[Tensor; 6]) -> PairPredictions<'_> {
        PairPredictions {
            target_w: &t[0],
            target_l: &t[1],
            policy_w: &t[2],
            policy_l: &t[3],
            reference_w: &t[4],
            reference_l: &t[5],
        }
    }

    #[test]
    fn eq1_hand_computed() {
        // Δ_w = −0.125, Δ_l = 0.25 → z = −β(−0.375) = 0.75 at β = 2; loss = ln(1 + e^−0.75) = 0.386871.
        let t = pair();
        let cfg = ObjectiveConfig {
            beta: 2.0,
            ..Default::default()
        };
        let out = eq1_diffusion_dpo(&preds(&t), &cfg).unwrap();
        close(out.stats.loss, 0.386_871);
        close(out.stats.reward_margin, 0.75);
        close(out.stats.implicit_accuracy, 1.0);
        close(out.stats.err_policy_w, 0.125);
        close(out.stats.err_ref_w, 0.25);
        close(out.stats.err_policy_l, 0.5);
        close(out.stats.err_ref_l, 0.25);
        // With margin m = 1: −log σ(−0.25) = ln(1 + e^0.25) = 0.825939.
        let m = ObjectiveConfig { margin: 1.0, ..cfg };
        close(eq1_diffusion_dpo(&preds(&t), &m).unwrap().stats.loss, 0.825_939);
        // With λ = 0.5: + 0.5 · 0.125.
        let l = ObjectiveConfig { sft_lambda: 0.5, ..cfg };
        close(
            eq1_diffusion_dpo(&preds(&t), &l).unwrap().stats.loss,
            0.386_871 + 0.0625,
        );
    }

    #[test]
    fn eq10_weights_are_squared_and_mask_tokens() {
        // M = [1, 0]: only token 0 counts. e_θ(w) = 0.25/2, e_ref(w) = 0.25/2, e_θ(l) = 1/2, e_ref(l) = 0.25/2.
        // Δ_w = 0, Δ_l = 0.375 → z = 0.75 at β = 2 (same as above by construction).
        let t = pair();
        let cfg = ObjectiveConfig {
            beta: 2.0,
            ..Default::default()
        };
        let m = Tensor::new(&[[1.0f32, 0.0]], &Device::Cpu).unwrap();
        let out = eq10_focus_dpo(&preds(&t), &m, &cfg).unwrap();
        close(out.stats.reward_margin, 0.75);
        close(out.stats.err_ref_w, 0.125);
        // M = [0.5, 0.5] weighs by M² = 0.25: every error is a quarter of the unweighted one → z = 0.1875.
        let half = Tensor::new(&[[0.5f32, 0.5]], &Device::Cpu).unwrap();
        close(
            eq10_focus_dpo(&preds(&t), &half, &cfg).unwrap().stats.reward_margin,
            0.1875,
        );
        // WeightedMean undoes the area: Σ M² = 0.5 → errors equal the unweighted ones → z = 0.75.
        let wm = ObjectiveConfig {
            mask_norm: MaskNorm::WeightedMean,
            ..cfg
        };
        close(
            eq10_focus_dpo(&preds(&t), &half, &wm).unwrap().stats.reward_margin,
            0.75,
        );
        // M = 1 is exactly Eq. 1.
        let ones = Tensor::ones((1, 2), DType::F32, &Device::Cpu).unwrap();
        close(eq10_focus_dpo(&preds(&t), &ones, &cfg).unwrap().stats.loss, 0.386_871);
    }

    #[test]
    fn zero_mask_is_a_constant_loss_without_nan() {
        let t = pair();
        let zero = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
        for norm in [MaskNorm::Mean, MaskNorm::WeightedMean] {
            let cfg = ObjectiveConfig {
                mask_norm: norm,
                ..Default::default()
            };
            let out = eq10_focus_dpo(&preds(&t), &zero, &cfg).unwrap();
            close(out.stats.loss, std::f32::consts::LN_2);
            close(out.stats.implicit_accuracy, 0.5);
        }
    }

    #[test]
    fn policy_equal_to_reference_gives_ln2_and_a_gradient() {
        // At initialisation (LoRA B = 0) the policy equals the reference: z = 0 exactly, loss = ln 2, and the
        // gradient still pushes the winner's prediction towards its target.
        let target = t3(&[1.0, -1.0], 1, 2);
        let start = t3(&[0.2, 0.3], 1, 2);
        let policy_w = Var::from_tensor(&start).unwrap();
        let policy_l = Var::from_tensor(&start).unwrap();
        let p = PairPredictions {
            target_w: &target,
            target_l: &target,
            policy_w: policy_w.as_tensor(),
            policy_l: policy_l.as_tensor(),
            reference_w: &start,
            reference_l: &start,
        };
        let out = eq1_diffusion_dpo(
            &p,
            &ObjectiveConfig {
                beta: 1.0,
                ..Default::default()
            },
        )
        .unwrap();
        close(out.stats.loss, std::f32::consts::LN_2);
        let grads = out.loss.backward().unwrap();
        // ∂loss/∂policy_w = σ'(…) = ½·β·∂e_θ(w)/∂pred = ½ · (pred − target) (mean over 2 elements: 2/2).
        let g: Vec<f32> = grads
            .get(policy_w.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        close(g[0], 0.5 * (0.2 - 1.0));
        close(g[1], 0.5 * (0.3 + 1.0));
        let gl: Vec<f32> = grads
            .get(policy_l.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        close(gl[0], -0.5 * (0.2 - 1.0));
    }

    #[test]
    fn reference_predictions_get_no_gradient() {
        let t = pair();
        let r = Var::from_tensor(&t[4]).unwrap();
        let p = PairPredictions {
            reference_w: r.as_tensor(),
            ..preds(&t)
        };
        let out = eq1_diffusion_dpo(&p, &ObjectiveConfig::default()).unwrap();
        let grads = out.loss.backward().unwrap();
        assert!(grads.get(r.as_tensor()).is_none());
    }

    #[test]
    fn pair_filter_drops_easy_pairs() {
        // Two pairs: pair 0 has e_ref(l) − e_ref(w) = 0 (kept at δ = 0.1), pair 1 has 0.5 (dropped).
        let target = t3(&[0.0, 0.0, 0.0, 0.0], 2, 2);
        let pw = t3(&[0.5, 0.0, 0.0, 0.0], 2, 2);
        let pl = t3(&[1.0, 0.0, 1.0, 0.0], 2, 2);
        let rw = t3(&[0.5, 0.5, 0.0, 0.0], 2, 2);
        let rl = t3(&[0.5, 0.5, 1.0, 0.0], 2, 2);
        let p = PairPredictions {
            target_w: &target,
            target_l: &target,
            policy_w: &pw,
            policy_l: &pl,
            reference_w: &rw,
            reference_l: &rl,
        };
        let cfg = ObjectiveConfig {
            beta: 2.0,
            pair_filter_delta: Some(0.1),
            ..Default::default()
        };
        let out = eq1_diffusion_dpo(&p, &cfg).unwrap();
        assert_eq!(out.stats.kept_pairs, 1);
        close(out.stats.loss, 0.386_871);
    }

    #[test]
    fn stable_neg_log_sigmoid_values_and_gradients() {
        let x = Var::new(&[-100.0f32, -1.0, 0.0, 1.0, 100.0], &Device::Cpu).unwrap();
        let y = neg_log_sigmoid(x.as_tensor()).unwrap();
        let v: Vec<f32> = y.to_vec1().unwrap();
        close(v[0], 100.0);
        close(v[1], 1.313_262);
        close(v[2], std::f32::consts::LN_2);
        close(v[3], 0.313_262);
        assert!(v[4] >= 0.0 && v[4] < 1e-6);
        // d/dx −log σ(x) = −σ(−x): −1, −0.731059, −0.5, −0.268941, ~0.
        let g: Vec<f32> = y
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(x.as_tensor())
            .unwrap()
            .to_vec1()
            .unwrap();
        for (got, want) in g.iter().zip([-1.0, -0.731_059, -0.5, -0.268_941, 0.0]) {
            close(*got, want);
        }
    }

    #[test]
    fn sft_is_the_winner_regression() {
        let t = pair();
        let out = sft(&t[0], &t[2], None, MaskNorm::Mean).unwrap();
        close(out.stats.loss, 0.125);
    }
}
