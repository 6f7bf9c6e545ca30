//! Optimisation helpers around candle's AdamW: global gradient-norm clipping and the learning-rate schedule.

use candle_core::{Result, Tensor, Var, backprop::GradStore};

/// Linear warm-up from 0 to `peak` over `warmup_steps`, then constant. `step` counts from 1.
pub fn lr_at(step: u64, peak: f64, warmup_steps: u64) -> f64 {
    if warmup_steps == 0 || step >= warmup_steps {
        peak
    } else {
        peak * step as f64 / warmup_steps as f64
    }
}

/// The global L2 norm of the gradients of `vars` (vars without a gradient count as zero).
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut sum_sq = 0.0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sum_sq += f64::from(
                g.sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_scalar::<f32>()?,
            );
        }
    }
    Ok(sum_sq.sqrt())
}

/// Scales every gradient so that the global norm is at most `max_norm` (PyTorch's `clip_grad_norm_`), returning
/// the norm **before** clipping. A non-finite norm is returned unchanged and the gradients are left as they are,
/// so the caller can stop the run (NaN/Inf guard) instead of stepping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads, vars)?;
    if !norm.is_finite() || norm <= max_norm || max_norm <= 0.0 {
        return Ok(norm);
    }
    let scale = max_norm / (norm + 1e-6);
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            let scaled: Tensor = g.affine(scale, 0.0)?;
            grads.insert(v.as_tensor(), scaled);
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn warmup_is_linear_then_flat() {
        assert_eq!(lr_at(1, 1e-4, 4), 2.5e-5);
        assert_eq!(lr_at(4, 1e-4, 4), 1e-4);
        assert_eq!(lr_at(100, 1e-4, 4), 1e-4);
        assert_eq!(lr_at(1, 1e-4, 0), 1e-4);
    }

    #[test]
    fn clipping_hand_computed() -> Result<()> {
        let d = Device::Cpu;
        // loss = 3a + 4b → grads (3, 4), norm 5.
        let a = Var::new(&[1.0f32], &d)?;
        let b = Var::new(&[1.0f32], &d)?;
        let loss = (a.as_tensor().affine(3.0, 0.0)? + b.as_tensor().affine(4.0, 0.0)?)?.sum_all()?;
        let mut grads = loss.backward()?;
        let vars = [a.clone(), b.clone()];
        let before = clip_grad_norm(&mut grads, &vars, 1.0)?;
        assert!((before - 5.0).abs() < 1e-6);
        let ga = grads.get(a.as_tensor()).unwrap().to_vec1::<f32>()?[0];
        let gb = grads.get(b.as_tensor()).unwrap().to_vec1::<f32>()?[0];
        assert!((ga - 0.6).abs() < 1e-5 && (gb - 0.8).abs() < 1e-5, "{ga} {gb}");
        assert!((grad_norm(&grads, &vars)? - 1.0).abs() < 1e-5);
        // Below the limit: untouched.
        let norm = clip_grad_norm(&mut grads, &vars, 10.0)?;
        assert!((norm - 1.0).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn non_finite_norm_is_reported_not_scaled() -> Result<()> {
        let d = Device::Cpu;
        let a = Var::new(&[f32::INFINITY], &d)?;
        let loss = a.as_tensor().sqr()?.sum_all()?;
        let mut grads = loss.backward()?;
        let norm = clip_grad_norm(&mut grads, &[a], 1.0)?;
        assert!(!norm.is_finite());
        Ok(())
    }
}
