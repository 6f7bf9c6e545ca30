//! Forward noising processes and regression targets (paper §3: `x_t = α_t·x_0 + σ_t·ε`).
//!
//! * **Rectified flow** (FLUX / UNO default): `t ∈ [0, 1]`, `x_t = (1 − t)·x_0 + t·ε`, and the network predicts
//!   the velocity `v = ε − x_0`.
//! * **ε-prediction** (DDPM): integer `T ∈ {0, …, 999}`, `x_t = √ᾱ_T·x_0 + √(1 − ᾱ_T)·ε` with the linear β schedule
//!   of Ho et al. (β from 1e-4 to 0.02 over 1000 steps), and the network predicts `ε`.
//!
//! Either way the objectives compare the network's output with [`Noised::target`]; the paper's
//! `‖ε − ε_θ(x_t, t)‖²` becomes `‖v − v_θ‖²` under rectified flow.

use candle_core::{DType, Device, Result, Tensor};

/// Number of discrete DDPM steps.
pub const DDPM_STEPS: usize = 1000;

/// How the model is parameterised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Parameterisation {
    /// Rectified flow with velocity target (FLUX, UNO).
    #[default]
    RectifiedFlow,
    /// DDPM with ε target and the linear β schedule.
    Epsilon,
}

impl Parameterisation {
    /// Name used in configs (`rectified-flow`, `epsilon`).
    pub fn name(self) -> &'static str {
        match self {
            Parameterisation::RectifiedFlow => "rectified-flow",
            Parameterisation::Epsilon => "epsilon",
        }
    }
}

/// A noised batch and what the network should predict for it.
#[derive(Clone, Debug)]
pub struct Noised {
    /// `x_t`, same shape as `x_0`.
    pub x_t: Tensor,
    /// Regression target: `v = ε − x_0` (rectified flow) or `ε` (ε-prediction).
    pub target: Tensor,
}

/// `ᾱ_T` of the linear β schedule for every `T` in `0..DDPM_STEPS`.
pub fn ddpm_alphas_cumprod() -> Vec<f64> {
    let (b0, b1) = (1e-4f64, 0.02f64);
    let n = DDPM_STEPS as f64;
    let mut acc = 1.0;
    (0..DDPM_STEPS)
        .map(|i| {
            let beta = b0 + (b1 - b0) * i as f64 / (n - 1.0);
            acc *= 1.0 - beta;
            acc
        })
        .collect()
}

/// Broadcasts a per-sample coefficient `[B]` over a batch tensor `[B, …]`.
fn per_sample(coef: &[f32], like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![coef.len()];
    shape.extend(std::iter::repeat_n(1, like.rank().saturating_sub(1)));
    Tensor::from_slice(coef, shape, like.device())?.to_dtype(like.dtype())
}

/// `(√ᾱ_T, √(1−ᾱ_T))` per sample for DDPM steps `t` (rounded, clamped to `0..=999`): the coefficients of
/// `x_t = √ᾱ·x₀ + √(1−ᾱ)·ε`, shared by [`add_noise`] and [`predicted_x0`].
fn ddpm_coefficients(t: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let abar = ddpm_alphas_cumprod();
    let step = |v: f32| (v.round().max(0.0) as usize).min(DDPM_STEPS - 1);
    t.iter()
        .map(|&v| {
            let ab = abar[step(v)];
            (ab.sqrt() as f32, (1.0 - ab).sqrt() as f32)
        })
        .unzip()
}

/// Noises `x0` with `eps` at per-sample times.
///
/// `t` holds one value per batch element: `t ∈ [0, 1]` for rectified flow; for ε-prediction `t` is the integer
/// step `T` (values are clamped to `0..=999`).
pub fn add_noise(param: Parameterisation, x0: &Tensor, eps: &Tensor, t: &[f32]) -> Result<Noised> {
    match param {
        Parameterisation::RectifiedFlow => {
            let t_b = per_sample(t, x0)?;
            let one_minus = per_sample(&t.iter().map(|v| 1.0 - v).collect::<Vec<_>>(), x0)?;
            let x_t = (x0.broadcast_mul(&one_minus)? + eps.broadcast_mul(&t_b)?)?;
            Ok(Noised {
                x_t,
                target: (eps - x0)?,
            })
        }
        Parameterisation::Epsilon => {
            let (a, s) = ddpm_coefficients(t);
            let x_t = (x0.broadcast_mul(&per_sample(&a, x0)?)? + eps.broadcast_mul(&per_sample(&s, x0)?)?)?;
            Ok(Noised {
                x_t,
                target: eps.clone(),
            })
        }
    }
}

/// The clean sample implied by a prediction: `x̂₀ = x_t − t·v̂` (rectified flow, from `x_t = (1 − t)·x₀ + t·ε` and
/// `v = ε − x₀`) or `x̂₀ = (x_t − √(1−ᾱ_T)·ε̂) / √ᾱ_T` (ε-prediction), per sample, with `t` as [`add_noise`] takes it.
pub fn predicted_x0(param: Parameterisation, x_t: &Tensor, prediction: &Tensor, t: &[f32]) -> Result<Tensor> {
    match param {
        Parameterisation::RectifiedFlow => x_t - prediction.broadcast_mul(&per_sample(t, x_t)?)?,
        Parameterisation::Epsilon => {
            let (a, s) = ddpm_coefficients(t);
            (x_t - prediction.broadcast_mul(&per_sample(&s, x_t)?)?)?.broadcast_div(&per_sample(&a, x_t)?)
        }
    }
}

/// SD3/FLUX's time shift of a rectified-flow time: `s·t / (1 + (s − 1)·t)`; `s` = 1 leaves `t` as it is, `s` > 1
/// moves times towards 1 (high noise). The sampler shifts its grid with it, pretraining its draws.
pub fn shift_time(t: f32, shift: f32) -> f32 {
    shift * t / (1.0 + (shift - 1.0) * t)
}

/// The schedule time for a fraction `frac ∈ [0, 1]` of the schedule: `frac` itself for rectified flow, the
/// nearest integer step `T = round(frac · 999)` for DDPM (the `t` that [`add_noise`] takes).
pub fn schedule_time(param: Parameterisation, frac: f32) -> f32 {
    match param {
        Parameterisation::RectifiedFlow => frac,
        Parameterisation::Epsilon => (frac * (DDPM_STEPS - 1) as f32).round(),
    }
}

/// The timestep the network is conditioned on, in `[0, 1]`: `t` itself for rectified flow, `T / 1000` for DDPM.
pub fn model_time(param: Parameterisation, t: &[f32], device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = match param {
        Parameterisation::RectifiedFlow => t.to_vec(),
        Parameterisation::Epsilon => t.iter().map(|v| v / DDPM_STEPS as f32).collect(),
    };
    Tensor::from_vec(v, t.len(), device)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn rectified_flow_hand_computed() {
        let d = Device::Cpu;
        // Two samples with one element each: x0 = [2, 4], ε = [1, −1], t = [0.25, 1.0].
        let x0 = Tensor::new(&[[2.0f32], [4.0]], &d).unwrap();
        let eps = Tensor::new(&[[1.0f32], [-1.0]], &d).unwrap();
        let n = add_noise(Parameterisation::RectifiedFlow, &x0, &eps, &[0.25, 1.0]).unwrap();
        // x_t = 0.75·2 + 0.25·1 = 1.75; 0·4 + 1·(−1) = −1. v = ε − x0 = [−1, −5].
        assert_eq!(vals(&n.x_t), [1.75, -1.0]);
        assert_eq!(vals(&n.target), [-1.0, -5.0]);
    }

    #[test]
    fn ddpm_hand_computed() {
        let abar = ddpm_alphas_cumprod();
        assert!((abar[0] - (1.0 - 1e-4)).abs() < 1e-12);
        assert!((abar[1] - (1.0 - 1e-4) * (1.0 - (1e-4 + 0.0199 / 999.0))).abs() < 1e-12);
        assert!(abar[999] < 1e-4, "fully noised at the end: {}", abar[999]);
        let d = Device::Cpu;
        let x0 = Tensor::new(&[[[1.0f32, 2.0]]], &d).unwrap();
        let eps = Tensor::new(&[[[0.5f32, -0.5]]], &d).unwrap();
        let n = add_noise(Parameterisation::Epsilon, &x0, &eps, &[0.0]).unwrap();
        let (a, s) = (abar[0].sqrt() as f32, (1.0 - abar[0]).sqrt() as f32);
        let want = [a + 0.5 * s, 2.0 * a - 0.5 * s];
        for (g, w) in vals(&n.x_t).iter().zip(want) {
            assert!((g - w).abs() < 1e-6);
        }
        assert_eq!(vals(&n.target), [0.5, -0.5]);
    }

    #[test]
    fn predicted_x0_inverts_noising_with_the_exact_target() {
        let d = Device::Cpu;
        // Rectified flow by hand: x_t = 1.75 at t = 0.25 with v = −1 gives x̂₀ = 1.75 + 0.25 = 2.
        let x_t = Tensor::new(&[[1.75f32], [-1.0]], &d).unwrap();
        let v = Tensor::new(&[[-1.0f32], [-5.0]], &d).unwrap();
        let x0 = predicted_x0(Parameterisation::RectifiedFlow, &x_t, &v, &[0.25, 1.0]).unwrap();
        assert_eq!(vals(&x0), [2.0, 4.0]);
        let x0 = Tensor::new(&[[[1.0f32, 2.0]], [[-3.0, 0.5]]], &d).unwrap();
        let eps = Tensor::new(&[[[0.5f32, -0.5]], [[2.0, 1.0]]], &d).unwrap();
        for (param, t) in [
            (Parameterisation::RectifiedFlow, [0.3f32, 0.9]),
            (Parameterisation::Epsilon, [10.0, 700.0]),
        ] {
            let n = add_noise(param, &x0, &eps, &t).unwrap();
            let back = predicted_x0(param, &n.x_t, &n.target, &t).unwrap();
            for (g, w) in vals(&back).iter().zip(vals(&x0)) {
                assert!((g - w).abs() < 1e-4, "{param:?}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn model_time_scales_ddpm_steps() {
        let d = Device::Cpu;
        assert_eq!(
            vals(&model_time(Parameterisation::Epsilon, &[500.0], &d).unwrap()),
            [0.5]
        );
        assert_eq!(
            vals(&model_time(Parameterisation::RectifiedFlow, &[0.3], &d).unwrap()),
            [0.3]
        );
    }
}
