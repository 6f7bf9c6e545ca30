//! The image ↔ token seam of the backbone.
//!
//! * **Tiny default (no VAE)**: an RGB image in `[0, 1]` is mapped to `[-1, 1]` and *pixel-unshuffled* into
//!   `p × p` patches, packed exactly like FLUX packs its latents,
//!   `b c (h ph) (w pw) → b (h w) (c ph pw)`. A 64 px image with `p = 4` gives 16×16 = 256 tokens of 48 channels,
//!   and the token grid matches the masks' `stride = p`.
//! * **FLUX**: the FLUX autoencoder (16 latent channels, 8× down) followed by the same packing with `p = 2`
//!   (64 channels per token, 16 px per token); wired when FLUX weights are given.

use candle_core::{DType, Device, Result, Tensor};
use image::RgbImage;

/// A reference image at the side the model is fed (UNO feeds references smaller than the target): resized with a
/// triangle filter unless it already is `side × side`. The one rule of training, pretraining and sampling.
pub fn reference_at(image: &RgbImage, side: u32) -> std::borrow::Cow<'_, RgbImage> {
    if image.dimensions() == (side, side) {
        std::borrow::Cow::Borrowed(image)
    } else {
        std::borrow::Cow::Owned(image::imageops::resize(
            image,
            side,
            side,
            image::imageops::FilterType::Triangle,
        ))
    }
}

/// Packs `[B, C, H, W]` into tokens `[B, (H/p)(W/p), C·p·p]` (FLUX order). `H` and `W` must be multiples of `p`.
pub fn patchify(x: &Tensor, p: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if p == 0 || h % p != 0 || w % p != 0 {
        candle_core::bail!("patchify: image {h}×{w} is not a multiple of the patch size {p}");
    }
    let (gh, gw) = (h / p, w / p);
    x.reshape((b, c, gh, p, gw, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, gh * gw, c * p * p))
}

/// Inverse of [`patchify`]: tokens `[B, gh·gw, C·p·p]` back to `[B, C, gh·p, gw·p]`.
pub fn unpatchify(tokens: &Tensor, p: usize, grid: (usize, usize), channels: usize) -> Result<Tensor> {
    let (b, n, d) = tokens.dims3()?;
    let (gh, gw) = grid;
    if n != gh * gw || d != channels * p * p {
        candle_core::bail!("unpatchify: tokens [{b}, {n}, {d}] do not fit a {gh}×{gw} grid of {channels}×{p}×{p}");
    }
    tokens
        .reshape((b, gh, gw, channels, p, p))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, channels, gh * p, gw * p))
}

/// An RGB image as a `[1, 3, H, W]` tensor in `[-1, 1]`.
pub fn image_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let data: Vec<f32> = img.as_raw().iter().map(|&v| f32::from(v) / 127.5 - 1.0).collect();
    Tensor::from_vec(data, (h, w, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()
}

/// A `[3, H, W]` (or `[1, 3, H, W]`) tensor in `[-1, 1]` back to an RGB image (clamped).
pub fn tensor_to_image(x: &Tensor) -> Result<RgbImage> {
    let x = if x.rank() == 4 { x.squeeze(0)? } else { x.clone() };
    let (c, h, w) = x.dims3()?;
    if c != 3 {
        candle_core::bail!("tensor_to_image: expected 3 channels, got {c}");
    }
    let hwc = x
        .permute((1, 2, 0))?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bytes = hwc
        .iter()
        .map(|&v| ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, bytes).ok_or_else(|| candle_core::Error::Msg("image buffer size".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patchify_order_hand_computed() -> Result<()> {
        // One channel, 2×4 image with values 0..8, p = 2 → 2 tokens of 4 values: the left and right 2×2 blocks.
        let x = Tensor::arange(0f32, 8.0, &Device::Cpu)?.reshape((1, 1, 2, 4))?;
        let t = patchify(&x, 2)?;
        assert_eq!(t.dims(), &[1, 2, 4]);
        assert_eq!(
            t.to_vec3::<f32>()?,
            vec![vec![vec![0., 1., 4., 5.], vec![2., 3., 6., 7.]]]
        );
        Ok(())
    }

    #[test]
    fn channels_come_before_patch_offsets() -> Result<()> {
        // Two channels, 2×2 image, p = 2 → one token [c0 block, c1 block].
        let x = Tensor::arange(0f32, 8.0, &Device::Cpu)?.reshape((1, 2, 2, 2))?;
        assert_eq!(
            patchify(&x, 2)?.to_vec3::<f32>()?,
            vec![vec![(0..8).map(|v| v as f32).collect::<Vec<_>>()]]
        );
        Ok(())
    }

    #[test]
    fn round_trip_and_errors() -> Result<()> {
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 8.0 * 12.0, &Device::Cpu)?.reshape((2, 3, 8, 12))?;
        let t = patchify(&x, 4)?;
        assert_eq!(t.dims(), &[2, 6, 48]);
        let back = unpatchify(&t, 4, (2, 3), 3)?;
        let diff = (back - &x)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        assert!(patchify(&x, 5).is_err());
        assert!(unpatchify(&t, 4, (3, 3), 3).is_err());
        Ok(())
    }

    #[test]
    fn image_round_trip() -> Result<()> {
        let img = RgbImage::from_fn(8, 4, |x, y| image::Rgb([(x * 30) as u8, (y * 60) as u8, 255]));
        let t = image_to_tensor(&img, &Device::Cpu)?;
        assert_eq!(t.dims(), &[1, 3, 4, 8]);
        let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
        assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
        assert_eq!(tensor_to_image(&t)?, img);
        Ok(())
    }
}
