//! Custom candle ops for the backbone's hot paths, each with its own backward.
//!
//! candle's `matmul` backward computes the gradient of *both* operands, also for a frozen base weight that no
//! optimiser will ever read (+11–14 % step time on the tiny model, see `../shared/notes/candle-on-cpu.md`).
//! [`frozen_matmul_t`] is `x·Wᵀ` whose backward returns only `∂L/∂x = g·W`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `x·Wᵀ` for `x` [m, k] and a frozen `W` [n, k]: no gradient is ever computed for `W`.
struct FrozenMatmulT;

fn matmul_dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize)> {
    let (m, k) = l1.shape().dims2()?;
    let (n, k2) = l2.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("frozen_matmul_t: x is [{m}, {k}] but W is [{n}, {k2}]");
    }
    Ok((m, n, k))
}

impl CustomOp2 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "frozen-matmul-t"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, n, k) = matmul_dims(l1, l2)?;
        let out = s1.matmul(s2, (1, m, n, k), l1, &l2.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k) = matmul_dims(l1, l2)?;
        let out = s1.matmul(s2, (1, m, n, k), l1, &l2.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), None))
    }
}

/// `x·Wᵀ` for `x` [m, k] and a frozen weight `W` [n, k] (PyTorch layout); the backward pass yields the gradient of
/// `x` only. Both must have the same dtype and device.
pub fn frozen_matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.apply_op2(w, FrozenMatmulT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_matmul_matches_matmul_and_its_input_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::new(&[[1f32, 2., 3.], [-1., 0., 4.]], &dev)?)?;
        let w = Tensor::new(&[[0.5f32, -1., 2.], [1., 1., 1.], [0., 3., -2.], [2., 0., 1.]], &dev)?;
        let y = frozen_matmul_t(x.as_tensor(), &w)?;
        let reference = x.as_tensor().matmul(&w.t()?)?;
        assert_eq!(y.to_vec2::<f32>()?, reference.to_vec2::<f32>()?);
        // L = Σ y ⊙ c with c = [[1,2,3,4],[5,6,7,8]] → ∂L/∂x = c·W.
        let c = Tensor::new(&[[1f32, 2., 3., 4.], [5., 6., 7., 8.]], &dev)?;
        let grads = (y * &c)?.sum_all()?.backward()?;
        let gx = grads.get(x.as_tensor()).map(|g| g.to_vec2::<f32>());
        assert_eq!(gx.transpose()?, Some(c.matmul(&w)?.to_vec2::<f32>()?));
        assert!(grads.get(&w).is_none(), "the frozen weight must get no gradient");
        Ok(())
    }

    #[test]
    fn mismatched_inner_dimensions_are_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), candle_core::DType::F32, &dev)?;
        let w = Tensor::zeros((4, 2), candle_core::DType::F32, &dev)?;
        assert!(frozen_matmul_t(&x, &w).is_err());
        Ok(())
    }
}
