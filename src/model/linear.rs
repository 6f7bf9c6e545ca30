//! The one affine layer of the backbone, loaded under FLUX tensor names (`<path>.weight` [out, in],
//! `<path>.bias` [out]).
//!
//! Every projection of the MMDiT goes through [`Linear`], so this is the seam where LoRA adapters attach later:
//! keep it a plain frozen weight (a mmapped tensor, not a `Var`) plus a forward, and add adapters around it rather
//! than inside the base weights.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// A frozen `y = x Wᵀ + b` with PyTorch's weight layout.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Wraps existing tensors: `weight` [out, in], `bias` [out].
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Loads `weight` [out_dim, in_dim] and, if `with_bias`, `bias` [out_dim] from `vb`; a missing or mis-shaped
    /// tensor is an error that names it.
    pub fn load(in_dim: usize, out_dim: usize, with_bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if with_bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// The weight, [out, in].
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, [out], if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Applies the layer to `x` [..., in] and returns [..., out]; leading dimensions are flattened into one
    /// matrix product (one GEMM instead of a batched one).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let Some((&in_dim, lead)) = dims.split_last() else {
            candle_core::bail!("Linear::forward needs at least one dimension, got a scalar");
        };
        let rows: usize = lead.iter().product();
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_shape = lead.to_vec();
        out_shape.push(self.weight.dim(0)?);
        y.reshape(out_shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn forward_matches_hand_computation_on_batched_tokens() -> Result<()> {
        let dev = Device::Cpu;
        // W = [[1, 2], [3, 4], [5, 6]] (out 3, in 2), b = [0.5, -1, 0].
        let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev)?;
        let b = Tensor::new(&[0.5f32, -1., 0.], &dev)?;
        let lin = Linear::new(w, Some(b));
        let x = Tensor::new(&[[[1f32, 1.], [0., 2.]]], &dev)?; // [1, 2, 2]
        let y = lin.forward(&x)?;
        assert_eq!(y.dims(), &[1, 2, 3]);
        assert_eq!(y.to_vec3::<f32>()?, vec![vec![vec![3.5, 6., 11.], vec![4.5, 7., 12.]]]);
        let no_bias = Linear::new(lin.weight().clone(), None);
        assert_eq!(
            no_bias.forward(&x)?.to_vec3::<f32>()?,
            vec![vec![vec![3., 7., 11.], vec![4., 8., 12.]]]
        );
        Ok(())
    }
}
