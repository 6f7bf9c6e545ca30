//! FLUX's N-axis rotary position embedding (`EmbedND` in `flux/modules/layers.py`).
//!
//! Each token has a position id per axis (index, row, col). Axis `a` owns `axes_dim[a]` consecutive channels of
//! every head; channel pair `(2i, 2i+1)` of that axis is rotated by the angle `p_a · θ^(-2i/d_a)`:
//! `(x0, x1) ↦ (cos·x0 − sin·x1, sin·x0 + cos·x1)`, the 2×2 rotation form FLUX applies in `apply_rope`.

use candle_core::{D, DType, Result, Tensor};

/// Per-token rotation angles, computed once per forward and shared by every block.
#[derive(Debug, Clone)]
pub struct Rope {
    /// cos of the angles, [B, 1, N, head_dim / 2, 1] (broadcasts over heads and the pair axis).
    cos: Tensor,
    /// sin of the angles, same shape as `cos`.
    sin: Tensor,
    /// The same angles for the fused CPU op.
    fused: super::ops::RopeAngles,
}

/// The inverse frequencies `θ^(-2i/d)` for `i in 0..d/2` of one axis of width `dim`.
pub fn axis_frequencies(dim: usize, theta: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| theta.powf(-2.0 * i as f64 / dim as f64) as f32)
        .collect()
}

impl Rope {
    /// Builds the angles for position ids `ids` [B, N, axes] (f32, any float dtype is converted).
    pub fn new(ids: &Tensor, axes_dim: &[usize], theta: f64) -> Result<Self> {
        let (_b, _n, n_axes) = ids.dims3()?;
        if n_axes != axes_dim.len() {
            candle_core::bail!("position ids have {n_axes} axes but the config has {}", axes_dim.len());
        }
        let ids = ids.to_dtype(DType::F32)?;
        let mut angles = Vec::with_capacity(n_axes);
        for (axis, &dim) in axes_dim.iter().enumerate() {
            let freqs = axis_frequencies(dim, theta);
            let freqs = Tensor::from_vec(freqs, (1, 1, dim / 2), ids.device())?;
            let pos = ids.narrow(D::Minus1, axis, 1)?; // [B, N, 1]
            angles.push(pos.broadcast_mul(&freqs)?);
        }
        let angles = Tensor::cat(&angles, D::Minus1)?; // [B, N, head_dim / 2]
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        Ok(Self {
            fused: super::ops::RopeAngles::new(&cos, &sin)?,
            cos: cos.unsqueeze(1)?.unsqueeze(D::Minus1)?,
            sin: sin.unsqueeze(1)?.unsqueeze(D::Minus1)?,
        })
    }

    /// The same angles for rotating activations of `dtype` (`model.activations`): the elementary path's cos/sin
    /// cast once, here, rather than at every rotation; the fused CPU f32 path keeps its f32 angles.
    pub fn in_dtype(mut self, dtype: DType) -> Result<Self> {
        self.cos = self.cos.to_dtype(dtype)?;
        self.sin = self.sin.to_dtype(dtype)?;
        Ok(self)
    }

    /// Rotates `x` [B, H, N, head_dim] (queries or keys) by the angles of its N tokens.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(rotated) = self.fused.apply(x) {
            return rotated;
        }
        let (b, h, n, d) = x.dims4()?;
        let pairs = x.reshape((b, h, n, d / 2, 2))?;
        let x0 = pairs.narrow(D::Minus1, 0, 1)?;
        let x1 = pairs.narrow(D::Minus1, 1, 1)?;
        let out0 = (x0.broadcast_mul(&self.cos)? - x1.broadcast_mul(&self.sin)?)?;
        let out1 = (x0.broadcast_mul(&self.sin)? + x1.broadcast_mul(&self.cos)?)?;
        Tensor::cat(&[out0, out1], D::Minus1)?.reshape((b, h, n, d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn frequencies_follow_theta_power() {
        let f = axis_frequencies(4, 10_000.0);
        assert_eq!(f.len(), 2);
        assert!((f[0] - 1.0).abs() < 1e-7);
        assert!((f[1] - 0.01).abs() < 1e-7);
    }

    /// One axis, head_dim 4, positions 0 and 1: position 0 is the identity; at position 1 the first pair turns by
    /// 1 rad and the second by θ^(-1/2) = 0.01 rad.
    #[test]
    fn rotation_matches_hand_computation() -> Result<()> {
        let dev = Device::Cpu;
        let ids = Tensor::new(&[[[0f32], [1.]]], &dev)?; // [1, 2, 1]
        let rope = Rope::new(&ids, &[4], 10_000.0)?;
        let x = Tensor::new(&[1f32, 2., 3., 4., 1., 2., 3., 4.], &dev)?.reshape((1, 1, 2, 4))?;
        let y = rope.apply(&x)?.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?;
        let (c1, s1) = (1f32.cos(), 1f32.sin());
        let (c2, s2) = (0.01f32.cos(), 0.01f32.sin());
        let expected = [
            [1., 2., 3., 4.],
            [c1 - 2. * s1, s1 + 2. * c1, 3. * c2 - 4. * s2, 3. * s2 + 4. * c2],
        ];
        for (row, exp) in y.iter().zip(expected.iter()) {
            for (a, e) in row.iter().zip(exp.iter()) {
                assert!((a - e).abs() < 1e-6, "{row:?} vs {exp:?}");
            }
        }
        Ok(())
    }

    /// Axes occupy consecutive channel blocks: an id on axis 1 only rotates that axis's channels.
    #[test]
    fn each_axis_rotates_only_its_channels() -> Result<()> {
        let dev = Device::Cpu;
        let ids = Tensor::new(&[[[0f32, 3., 0.]]], &dev)?; // [1, 1, 3]
        let rope = Rope::new(&ids, &[2, 2, 2], 10_000.0)?;
        let x = Tensor::new(&[1f32, 0., 1., 0., 1., 0.], &dev)?.reshape((1, 1, 1, 6))?;
        let y = rope.apply(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let expected = [1., 0., 3f32.cos(), 3f32.sin(), 1., 0.];
        for (a, e) in y.iter().zip(expected.iter()) {
            assert!((a - e).abs() < 1e-6, "{y:?}");
        }
        Ok(())
    }
}
