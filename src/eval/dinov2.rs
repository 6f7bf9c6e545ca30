//! DINOv2 (Oquab et al.), the backbone of the DINO score: a ViT with layer scale, read from Meta's checkpoint
//! naming (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
//! mlp.fc1, mlp.fc2, ls2.gamma}`, `norm`), returning the final-normed CLS token.
//!
//! Written here rather than taken from candle-transformers, whose `dinov2` differs from DINOv2 and from
//! transformers' `Dinov2Model` in three ways that change every embedding: it resizes the position embeddings
//! nearest-neighbour (DINOv2: bicubic), its LayerNorms use ε = 1e-5 (DINOv2: 1e-6), and its MLP uses the tanh
//! approximation of GELU (DINOv2: the exact, erf GELU). Checked against `Dinov2Model` in `tests/parity.rs`.

use candle_core::{D, IndexOp, Module, Result, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder, layer_norm, linear};

/// Patch side in pixels.
pub const PATCH: usize = 14;
/// LayerNorm ε of DINOv2.
const EPS: f64 = 1e-6;

struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ls1: Tensor,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    ls2: Tensor,
    heads: usize,
}

impl Block {
    fn new(vb: VarBuilder, dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            norm1: layer_norm(dim, EPS, vb.pp("norm1"))?,
            qkv: linear(dim, 3 * dim, vb.pp("attn.qkv"))?,
            proj: linear(dim, dim, vb.pp("attn.proj"))?,
            ls1: vb.get(dim, "ls1.gamma")?,
            norm2: layer_norm(dim, EPS, vb.pp("norm2"))?,
            fc1: linear(dim, 4 * dim, vb.pp("mlp.fc1"))?,
            fc2: linear(4 * dim, dim, vb.pp("mlp.fc2"))?,
            ls2: vb.get(dim, "ls2.gamma")?,
            heads,
        })
    }

    fn attention(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let hd = c / self.heads;
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, n, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (qkv.i(0)?, qkv.i(1)?.contiguous()?, qkv.i(2)?.contiguous()?);
        let scores = (q.contiguous()?.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let attn = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.proj.forward(&out)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attention(&self.norm1.forward(x)?)?.broadcast_mul(&self.ls1)?)?;
        let h = self.fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?;
        &x + self.fc2.forward(&h)?.broadcast_mul(&self.ls2)?
    }
}

/// A DINOv2 ViT.
pub struct DinoV2 {
    patch_embed: candle_nn::Conv2d,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
}

impl DinoV2 {
    /// Reads the model (`depth` blocks of width `dim`, `heads` heads) from `vb` in Meta's naming. The position grid
    /// is whatever the checkpoint holds (37 × 37 for the released models, trained at 518 px).
    pub fn new(vb: VarBuilder, depth: usize, dim: usize, heads: usize) -> Result<Self> {
        let conv = candle_nn::Conv2dConfig {
            stride: PATCH,
            ..Default::default()
        };
        let pos_embed = vb.get_unchecked("pos_embed")?;
        let (_, len, width) = pos_embed.dims3()?;
        let side = ((len.saturating_sub(1)) as f64).sqrt() as usize;
        if width != dim || side * side + 1 != len {
            candle_core::bail!("pos_embed is {:?}, expected [1, 1 + n², {dim}]", pos_embed.dims());
        }
        Ok(Self {
            patch_embed: candle_nn::conv2d(3, dim, PATCH, conv, vb.pp("patch_embed.proj"))?,
            cls_token: vb.get((1, 1, dim), "cls_token")?,
            pos_embed,
            blocks: (0..depth)
                .map(|i| Block::new(vb.pp(format!("blocks.{i}")), dim, heads))
                .collect::<Result<_>>()?,
            norm: layer_norm(dim, EPS, vb.pp("norm"))?,
        })
    }

    /// The position embeddings for a `gh × gw` patch grid: the stored grid resized bicubically as DINOv2 and
    /// transformers do (`interpolate(mode="bicubic", align_corners=False, size=(gh, gw))`), unchanged when it fits.
    fn positions(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let (_, len, d) = self.pos_embed.dims3()?;
        let n = ((len - 1) as f64).sqrt() as usize;
        if gh == n && gw == n {
            return Ok(self.pos_embed.clone());
        }
        let all = self.pos_embed.flatten_all()?.to_vec1::<f32>()?;
        let (cls, grid) = all.split_at(d);
        let mut out = cls.to_vec();
        out.extend(bicubic_resize(grid, (n, n), d, (gh, gw)));
        Tensor::from_vec(out, (1, 1 + gh * gw, d), self.pos_embed.device())
    }

    /// The final-normed CLS token `[B, dim]` of images `[B, 3, H, W]` (sides multiples of [`PATCH`]): what
    /// `Dinov2Model`'s `pooler_output` is.
    pub fn cls(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = pixels.dims4()?;
        if !h.is_multiple_of(PATCH) || !w.is_multiple_of(PATCH) {
            candle_core::bail!("image {h}×{w} px is not a multiple of the {PATCH} px patch");
        }
        let patches = self.patch_embed.forward(pixels)?.flatten_from(2)?.transpose(1, 2)?;
        let dim = patches.dim(2)?;
        let cls = self.cls_token.broadcast_as((b, 1, dim))?;
        let mut x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.positions(h / PATCH, w / PATCH)?)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        self.norm.forward(&x.i((.., 0))?)
    }
}

/// torch's cubic convolution weights (`A = −0.75`) of the four taps around a sample at fraction `t`.
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Resizes a row-major `[h, w, d]` grid to `[gh, gw, d]` as `torch.nn.functional.interpolate(mode="bicubic",
/// align_corners=False, size=(gh, gw))` does: source coordinate `(dst + ½)·in/out − ½`, four taps per axis clamped
/// to the border.
pub fn bicubic_resize(grid: &[f32], (h, w): (usize, usize), d: usize, (gh, gw): (usize, usize)) -> Vec<f32> {
    let taps = |dst: usize, inp: usize, out: usize| -> ([usize; 4], [f64; 4]) {
        let real = inp as f64 / out as f64 * (dst as f64 + 0.5) - 0.5;
        let base = real.floor();
        let idx = [-1i64, 0, 1, 2].map(|o| (base as i64 + o).clamp(0, inp as i64 - 1) as usize);
        (idx, cubic_weights(real - base))
    };
    let mut out = vec![0f32; gh * gw * d];
    for y in 0..gh {
        let (ys, wy) = taps(y, h, gh);
        for x in 0..gw {
            let (xs, wx) = taps(x, w, gw);
            for c in 0..d {
                let mut v = 0f64;
                for (yi, wyi) in ys.iter().zip(wy) {
                    for (xi, wxi) in xs.iter().zip(wx) {
                        v += wyi * wxi * f64::from(grid[(yi * w + xi) * d + c]);
                    }
                }
                out[(y * gw + x) * d + c] = v as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_resize_keeps_constants_and_is_the_identity_at_the_same_size() {
        let (n, d) = (5, 2);
        let grid: Vec<f32> = (0..n * n * d).map(|i| (i as f32 * 0.37).sin()).collect();
        assert_eq!(bicubic_resize(&grid, (n, n), d, (n, n)), grid);
        let flat = vec![0.25f32; n * n * d];
        assert!(
            bicubic_resize(&flat, (n, n), d, (3, 3))
                .iter()
                .all(|v| (v - 0.25).abs() < 1e-6)
        );
        // Hand-computed: 2 → 1 samples at 0.5 between entries, weights [far(1.5), near(.5), near(.5), far(1.5)] =
        // [−0.09375, 0.59375, 0.59375, −0.09375] on the clamped taps [0, 0, 1, 1]: the mean of the 2 × 2 grid.
        let w = cubic_weights(0.5);
        assert!((w[0] + 0.09375).abs() < 1e-12 && (w[1] - 0.59375).abs() < 1e-12);
        assert!((bicubic_resize(&[0.0, 1.0, 2.0, 3.0], (2, 2), 1, (1, 1))[0] - 1.5).abs() < 1e-6);
    }
}
