//! The one affine layer of the backbone, loaded under FLUX tensor names (`<path>.weight` [out, in],
//! `<path>.bias` [out]).
//!
//! Every projection of the MMDiT goes through [`Linear`], so this is where LoRA adapters attach: the base stays a
//! plain frozen weight (a mmapped tensor, not a `Var`), the adapter sits beside it, and each forward says whether
//! the adapter is applied ([`Adapters`]). The reference model of DPO is the same layers with adapters off.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::lora::LoraAdapter;

/// Whether a forward pass applies the attached LoRA adapters (the policy) or not (the frozen reference model).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Adapters {
    /// Base + adapters: the policy πθ.
    #[default]
    On,
    /// Base only: the reference model π_ref.
    Off,
}

/// A frozen `y = x Wᵀ + b` with PyTorch's weight layout, plus an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    path: String,
    adapter: Option<LoraAdapter>,
}

impl Linear {
    /// Wraps existing tensors: `weight` [out, in], `bias` [out]; the layer has no checkpoint path.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            path: String::new(),
            adapter: None,
        }
    }

    /// The FLUX checkpoint path of the layer (`double_blocks.0.img_attn.qkv`), empty when built by [`Self::new`].
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Attaches (or with `None` removes) a LoRA adapter; its shapes must match the weight.
    pub fn set_adapter(&mut self, adapter: Option<LoraAdapter>) -> Result<()> {
        if let Some(ad) = &adapter {
            let (out_dim, in_dim) = self.weight.dims2()?;
            let (_, a_in) = ad.a.dims2()?;
            let (b_out, _) = ad.b.dims2()?;
            // An adapter may cover the leading rows only (the q/k/v rows of a single block's `linear1`).
            if a_in != in_dim || b_out == 0 || b_out > out_dim || ad.layer_rows != out_dim {
                candle_core::bail!(
                    "LoRA adapter for `{}` has A {:?} / B {:?}, the layer is [{out_dim}, {in_dim}]",
                    self.path,
                    ad.a.dims(),
                    ad.b.dims()
                );
            }
        }
        self.adapter = adapter;
        Ok(())
    }

    /// The attached adapter, if any.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.adapter.as_ref()
    }

    /// Loads `weight` [out_dim, in_dim] and, if `with_bias`, `bias` [out_dim] from `vb`; a missing or mis-shaped
    /// tensor is an error that names it.
    pub fn load(in_dim: usize, out_dim: usize, with_bias: bool, vb: VarBuilder) -> Result<Self> {
        // The weight stays in the builder's dtype (bf16/f16 halve a frozen base); the bias is small and is kept
        // in f32 with the activations.
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if with_bias {
            Some(vb.get(out_dim, "bias")?.to_dtype(DType::F32)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            path: vb.prefix(),
            adapter: None,
        })
    }

    /// Adds `delta` [rows, in] to the weight rows `row_start..row_start + rows` (merging a frozen low-rank update
    /// into the base, e.g. UNO's LoRA); computed in f32 and stored in the weight's dtype.
    pub fn merge_into_weight(&mut self, delta: &Tensor, row_start: usize) -> Result<()> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let (rows, delta_in) = delta.dims2()?;
        if delta_in != in_dim || row_start + rows > out_dim {
            candle_core::bail!(
                "update for `{}` is [{rows}, {delta_in}] at row {row_start}, the layer is [{out_dim}, {in_dim}]",
                self.path
            );
        }
        let dtype = self.weight.dtype();
        let part = self
            .weight
            .narrow(0, row_start, rows)?
            .to_dtype(candle_core::DType::F32)?;
        let merged = (part + delta.to_dtype(candle_core::DType::F32)?)?.to_dtype(dtype)?;
        self.weight = self
            .weight
            .slice_assign(&[row_start..row_start + rows, 0..in_dim], &merged)?;
        Ok(())
    }

    /// Converts the (frozen) weight to `dtype`.
    pub fn set_weight_dtype(&mut self, dtype: DType) -> Result<()> {
        self.weight = self.weight.to_dtype(dtype)?;
        Ok(())
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
    /// matrix product (one GEMM instead of a batched one). With [`Adapters::On`] an attached adapter adds
    /// `(α/r)·x·Aᵀ·Bᵀ`.
    pub fn forward(&self, x: &Tensor, adapters: Adapters) -> Result<Tensor> {
        let dims = x.dims();
        let Some((&in_dim, lead)) = dims.split_last() else {
            candle_core::bail!("Linear::forward needs at least one dimension, got a scalar");
        };
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        // `B` of an adapter covering the leading rows only, padded with zero rows (their gradient is dropped).
        // Under `checkpoint::without_graph` the adapter is read detached, so the forward builds no graph.
        let ab = match (&self.adapter, adapters) {
            (Some(ad), Adapters::On) => {
                let (a, b) = (ad.a.as_tensor().clone(), ad.full_rows_b()?);
                Some(if super::checkpoint::graph_disabled() {
                    (a.detach(), b.detach(), ad.scale)
                } else {
                    (a, b, ad.scale)
                })
            }
            _ => None,
        };
        // Under narrow activations (`model.activations`) the adapter is cast to them, as autocast casts a
        // parameter for its product; its weights and gradients stay f32 (the cast passes the gradient back).
        let ab = match ab {
            Some((a, b, scale)) if a.dtype() != x2.dtype() => {
                Some((a.to_dtype(x2.dtype())?, b.to_dtype(x2.dtype())?, scale))
            }
            other => other,
        };
        let lora = ab.as_ref().map(|(a, b, scale)| (a, b, *scale));
        // A narrow frozen weight (bf16/f16): on the CPU, whose GEMMs are f32, it is widened for this product only
        // (one layer at a time, so the stored base stays narrow); elsewhere the product runs in the weight's dtype,
        // as autocast does, and comes back in the activations' dtype.
        let narrow = self.weight.dtype() != x2.dtype();
        let widened;
        let weight = if narrow && x2.device().is_cpu() {
            widened = self.weight.to_dtype(x2.dtype())?;
            &widened
        } else {
            &self.weight
        };
        if lora.is_none()
            && let Some(y) = super::ops::trainable_linear(&x2, weight, self.bias.as_ref())
        {
            let mut out_shape = lead.to_vec();
            out_shape.push(self.weight.dim(0)?);
            return y?.reshape(out_shape);
        }
        if let Some(y) = super::ops::fused_linear(&x2, weight, self.bias.as_ref(), lora) {
            let mut out_shape = lead.to_vec();
            out_shape.push(self.weight.dim(0)?);
            return y?.reshape(out_shape);
        }
        let y = if weight.dtype() != x2.dtype() {
            super::ops::frozen_matmul_t(&x2.to_dtype(weight.dtype())?, weight)?.to_dtype(x2.dtype())?
        } else {
            super::ops::frozen_matmul_t(&x2, weight)?
        };
        let y = match &self.bias {
            Some(b) if b.dtype() != y.dtype() => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let y = match lora {
            Some((a, b, scale)) => (y + x2.matmul(&a.t()?)?.matmul(&b.t()?)?.affine(scale, 0.0)?)?,
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
        let y = lin.forward(&x, Adapters::On)?;
        assert_eq!(y.dims(), &[1, 2, 3]);
        assert_eq!(y.to_vec3::<f32>()?, vec![vec![vec![3.5, 6., 11.], vec![4.5, 7., 12.]]]);
        let no_bias = Linear::new(lin.weight().clone(), None);
        assert_eq!(
            no_bias.forward(&x, Adapters::Off)?.to_vec3::<f32>()?,
            vec![vec![vec![3., 7., 11.], vec![4., 8., 12.]]]
        );
        Ok(())
    }
}
