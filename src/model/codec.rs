//! Images ↔ MMDiT tokens: the one seam that differs between the tiny default and FLUX.
//!
//! * [`ImageCodec::PixelUnshuffle`] (tiny default, no VAE): RGB in `[-1, 1]` packed into `p × p` patches
//!   (`3·p²` channels, `p` pixels per token).
//! * [`ImageCodec::FluxAutoencoder`]: the FLUX autoencoder (`ae.safetensors`, candle-transformers'
//!   `flux::autoencoder` layers with BFL's tensor names) encodes RGB in `[-1, 1]` to 16 latent channels at 1/8
//!   resolution, shifted and scaled as FLUX does (`(z − shift)·scale`), then packed 2×2 exactly like the tiny
//!   path (`64` channels, 16 pixels per token). The latent is the posterior *mean*, not a sample: a prepared
//!   item is encoded once and reused every step, so it must not depend on a draw (the posterior std of the FLUX
//!   autoencoder is tiny anyway).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::flux::autoencoder::{Config as AeConfig, Decoder, Encoder};
use image::RgbImage;

use super::encoder::{image_to_tensor, patchify, tensor_to_image, unpatchify};
use super::weights::{WeightsError, tensor_shapes, var_builder};

/// FLUX packs 2×2 latent pixels into one token.
pub const FLUX_PATCH: usize = 2;

/// Errors loading or running a codec; each names the file or the sizes at fault.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The checkpoint cannot be opened.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The checkpoint does not fit the autoencoder (the message names the tensor).
    #[error("{path}: {source}")]
    Model {
        /// File.
        path: PathBuf,
        /// Cause (names the missing or mis-shaped tensor).
        source: candle_core::Error,
    },
    /// An image whose sides are not multiples of the pixels per token.
    #[error("image {width}×{height} is not a multiple of {pixels_per_token} pixels per token")]
    Size {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// The codec's token stride.
        pixels_per_token: usize,
    },
    /// Tensor error while encoding or decoding.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// The FLUX autoencoder (encoder + decoder of `ae.safetensors`) and its latent normalisation.
#[derive(Debug, Clone)]
pub struct FluxAutoencoder {
    encoder: Encoder,
    decoder: Decoder,
    z_channels: usize,
    downsample: usize,
    scale_factor: f64,
    shift_factor: f64,
    path: PathBuf,
}

/// The FLUX autoencoder config with the smallest sizes the same code accepts (GroupNorm needs 32-channel groups):
/// width 32, four levels (8× down like FLUX), one res-block per level, 16 latent channels. For tests.
pub fn tiny_autoencoder_config() -> AeConfig {
    AeConfig {
        resolution: 64,
        in_channels: 3,
        ch: 32,
        out_ch: 3,
        ch_mult: vec![1, 1, 1, 1],
        num_res_blocks: 1,
        z_channels: 16,
        ..AeConfig::dev()
    }
}

/// Reads an autoencoder config from the tensor shapes of a BFL-naming checkpoint (width, levels, res-blocks and
/// latent channels); the latent scale and shift are FLUX.1's (`Config::dev()`, identical for schnell).
pub fn autoencoder_config_from_file(path: &Path) -> Result<AeConfig, CodecError> {
    let shapes = tensor_shapes(path)?;
    let missing = |name: &str| CodecError::Model {
        path: path.to_path_buf(),
        source: candle_core::Error::Msg(format!(
            "not a FLUX autoencoder checkpoint: tensor `{name}` not found or not 4-D"
        )),
    };
    let out_channels = |name: &str| -> Result<(usize, usize), CodecError> {
        match shapes.get(name).map(Vec::as_slice) {
            Some([o, i, _, _]) => Ok((*o, *i)),
            _ => Err(missing(name)),
        }
    };
    let (ch, in_channels) = out_channels("encoder.conv_in.weight")?;
    let (_, z_channels) = out_channels("decoder.conv_in.weight")?;
    let (out_ch, _) = out_channels("decoder.conv_out.weight")?;
    let levels = (0..)
        .take_while(|i| shapes.contains_key(&format!("encoder.down.{i}.block.0.conv1.weight")))
        .count();
    let num_res_blocks = (0..)
        .take_while(|i| shapes.contains_key(&format!("encoder.down.0.block.{i}.conv1.weight")))
        .count();
    if levels == 0 || num_res_blocks == 0 || ch == 0 {
        return Err(missing("encoder.down.0.block.0.conv1.weight"));
    }
    let ch_mult = (0..levels)
        .map(|i| Ok(out_channels(&format!("encoder.down.{i}.block.0.conv1.weight"))?.0 / ch))
        .collect::<Result<Vec<_>, CodecError>>()?;
    Ok(AeConfig {
        in_channels,
        ch,
        out_ch,
        ch_mult,
        num_res_blocks,
        z_channels,
        ..AeConfig::dev()
    })
}

impl FluxAutoencoder {
    /// Builds the autoencoder from `vb` (BFL names: `encoder.*`, `decoder.*`); `path` is reported in errors.
    pub fn new(cfg: &AeConfig, vb: VarBuilder, path: &Path) -> Result<Self, CodecError> {
        let model_err = |source| CodecError::Model {
            path: path.to_path_buf(),
            source,
        };
        let encoder = Encoder::new(cfg, vb.pp("encoder")).map_err(model_err)?;
        let decoder = Decoder::new(cfg, vb.pp("decoder")).map_err(model_err)?;
        Ok(Self {
            encoder,
            decoder,
            z_channels: cfg.z_channels,
            downsample: 1 << cfg.ch_mult.len().saturating_sub(1),
            scale_factor: cfg.scale_factor,
            shift_factor: cfg.shift_factor,
            path: path.to_path_buf(),
        })
    }

    /// Loads `ae.safetensors` (FLUX naming) with the config read from its tensor shapes
    /// ([`autoencoder_config_from_file`]: `Config::dev()` sizes for the real file).
    pub fn load(path: &Path, device: &Device) -> Result<Self, CodecError> {
        let cfg = autoencoder_config_from_file(path)?;
        Self::load_with_config(path, &cfg, device)
    }

    /// Loads `path` with an explicit config.
    pub fn load_with_config(path: &Path, cfg: &AeConfig, device: &Device) -> Result<Self, CodecError> {
        let vb = var_builder(&[path.to_path_buf()], DType::F32, device)?;
        Self::new(cfg, vb, path)
    }

    /// Latent channels (16 for FLUX).
    pub fn z_channels(&self) -> usize {
        self.z_channels
    }

    /// Pixels per latent pixel (8 for FLUX).
    pub fn downsample(&self) -> usize {
        self.downsample
    }

    /// The checkpoint it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `[B, 3, H, W]` in `[-1, 1]` → normalised latents `[B, z, H/8, W/8]` (posterior mean, then FLUX's
    /// `(z − shift)·scale`).
    pub fn encode(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let moments = self.encoder.forward(x)?;
        let mean = moments.narrow(1, 0, self.z_channels)?;
        (mean - self.shift_factor)? * self.scale_factor
    }

    /// Normalised latents → `[B, 3, H, W]` in (about) `[-1, 1]`.
    pub fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let z = ((z / self.scale_factor)? + self.shift_factor)?;
        self.decoder.forward(&z)
    }
}

/// How images become MMDiT tokens and back.
#[derive(Debug, Clone)]
pub enum ImageCodec {
    /// The tiny default: pixel-unshuffle by `patch` (no autoencoder).
    PixelUnshuffle {
        /// Pixels per token side.
        patch: usize,
    },
    /// FLUX: autoencoder latents packed `patch × patch` (2).
    FluxAutoencoder {
        /// The autoencoder.
        ae: Arc<FluxAutoencoder>,
        /// Latent pixels per token side.
        patch: usize,
    },
}

impl ImageCodec {
    /// The FLUX codec: `ae` with FLUX's 2×2 packing.
    pub fn flux(ae: FluxAutoencoder) -> Self {
        Self::FluxAutoencoder {
            ae: Arc::new(ae),
            patch: FLUX_PATCH,
        }
    }

    /// Image pixels per token side: the token stride of every mask (4 for the tiny base, 16 for FLUX).
    pub fn pixels_per_token(&self) -> usize {
        match self {
            Self::PixelUnshuffle { patch } => *patch,
            Self::FluxAutoencoder { ae, patch } => ae.downsample() * patch,
        }
    }

    /// Channels of one token (the MMDiT's `in_channels`): `3·p²`, or `z·p²` = 64 for FLUX.
    pub fn channels(&self) -> usize {
        match self {
            Self::PixelUnshuffle { patch } => 3 * patch * patch,
            Self::FluxAutoencoder { ae, patch } => ae.z_channels() * patch * patch,
        }
    }

    /// A short description for messages (`pixel-unshuffle 4`, `FLUX autoencoder ae.safetensors`).
    pub fn describe(&self) -> String {
        match self {
            Self::PixelUnshuffle { patch } => format!("pixel-unshuffle by {patch}"),
            Self::FluxAutoencoder { ae, .. } => format!("FLUX autoencoder {}", ae.path().display()),
        }
    }

    /// Token grid (rows, cols) of an image of `width × height` pixels.
    pub fn grid_for(&self, width: u32, height: u32) -> Result<(usize, usize), CodecError> {
        let s = self.pixels_per_token();
        let (w, h) = (width as usize, height as usize);
        if w == 0 || h == 0 || !w.is_multiple_of(s) || !h.is_multiple_of(s) {
            return Err(CodecError::Size {
                width,
                height,
                pixels_per_token: s,
            });
        }
        Ok((h / s, w / s))
    }

    /// An RGB image → tokens `[1, N, channels()]` in FLUX packing order (row-major token grid).
    pub fn encode(&self, img: &RgbImage, device: &Device) -> Result<Tensor, CodecError> {
        self.grid_for(img.width(), img.height())?;
        let x = image_to_tensor(img, device)?;
        Ok(match self {
            Self::PixelUnshuffle { patch } => patchify(&x, *patch)?,
            Self::FluxAutoencoder { ae, patch } => patchify(&ae.encode(&x)?, *patch)?,
        })
    }

    /// Tokens `[1, N, channels()]` on a `grid` → an RGB image of `grid · pixels_per_token()` pixels.
    pub fn decode(&self, tokens: &Tensor, grid: (usize, usize)) -> Result<RgbImage, CodecError> {
        let x = match self {
            Self::PixelUnshuffle { patch } => unpatchify(tokens, *patch, grid, 3)?,
            Self::FluxAutoencoder { ae, patch } => {
                let z = unpatchify(tokens, *patch, grid, ae.z_channels())?;
                ae.decode(&z)?
            }
        };
        Ok(tensor_to_image(&x.clamp(-1f32, 1f32)?)?)
    }
}

/// Random autoencoder weights with FLUX names for `cfg` (normal, std 0.05), for tests: the same tensor names and
/// shapes as `ae.safetensors`.
pub fn random_autoencoder_weights(
    cfg: &AeConfig,
    seed: u64,
    device: &Device,
) -> candle_core::Result<std::collections::HashMap<String, Tensor>> {
    super::testing::random_named_weights(seed, 0.05, device, |vb| {
        Encoder::new(cfg, vb.pp("encoder"))?;
        Decoder::new(cfg, vb.pp("decoder"))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_ae(seed: u64) -> anyhow::Result<(AeConfig, std::collections::HashMap<String, Tensor>)> {
        let cfg = tiny_autoencoder_config();
        let w = random_autoencoder_weights(&cfg, seed, &Device::Cpu)?;
        Ok((cfg, w))
    }

    fn test_image(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, ((x + y) * 2) as u8])
        })
    }

    #[test]
    fn pixel_unshuffle_round_trips_and_reports_its_stride() -> anyhow::Result<()> {
        let codec = ImageCodec::PixelUnshuffle { patch: 4 };
        assert_eq!((codec.pixels_per_token(), codec.channels()), (4, 48));
        let img = test_image(32, 16);
        let tokens = codec.encode(&img, &Device::Cpu)?;
        assert_eq!(tokens.dims(), &[1, 32, 48]);
        assert_eq!(codec.decode(&tokens, (4, 8))?, img);
        assert!(matches!(
            codec.encode(&test_image(30, 16), &Device::Cpu),
            Err(CodecError::Size { width: 30, .. })
        ));
        Ok(())
    }

    #[test]
    fn flux_autoencoder_from_memory_encodes_to_packed_latents() -> anyhow::Result<()> {
        let (cfg, weights) = tiny_ae(1)?;
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        let codec = ImageCodec::flux(FluxAutoencoder::new(&cfg, vb, Path::new("memory"))?);
        assert_eq!((codec.pixels_per_token(), codec.channels()), (16, 64));
        let img = test_image(64, 32);
        let tokens = codec.encode(&img, &Device::Cpu)?;
        assert_eq!(tokens.dims(), &[1, 2 * 4, 64]);
        let back = codec.decode(&tokens, (2, 4))?;
        assert_eq!(back.dimensions(), (64, 32));
        // Deterministic: the posterior mean, not a sample.
        let again = codec.encode(&img, &Device::Cpu)?;
        assert_eq!((tokens - again)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn flux_autoencoder_loads_by_path_with_the_config_read_from_the_file() -> anyhow::Result<()> {
        let (cfg, weights) = tiny_ae(2)?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("ae.safetensors");
        candle_core::safetensors::save(&weights, &path)?;
        let read = autoencoder_config_from_file(&path)?;
        assert_eq!(
            (read.ch, read.ch_mult.clone(), read.num_res_blocks, read.z_channels),
            (cfg.ch, cfg.ch_mult.clone(), cfg.num_res_blocks, cfg.z_channels)
        );
        let ae = FluxAutoencoder::load(&path, &Device::Cpu)?;
        assert_eq!((ae.downsample(), ae.z_channels()), (8, 16));
        let from_memory = FluxAutoencoder::new(
            &cfg,
            VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu),
            &path,
        )?;
        let x = image_to_tensor(&test_image(16, 16), &Device::Cpu)?;
        let d = (ae.encode(&x)? - from_memory.encode(&x)?)?
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        Ok(())
    }

    #[test]
    fn a_missing_autoencoder_tensor_is_named_with_the_file() -> anyhow::Result<()> {
        let (_, mut weights) = tiny_ae(3)?;
        weights.remove("decoder.mid.attn_1.q.weight");
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("broken-ae.safetensors");
        candle_core::safetensors::save(&weights, &path)?;
        let err = FluxAutoencoder::load(&path, &Device::Cpu)
            .expect_err("missing tensor")
            .to_string();
        assert!(err.contains("broken-ae.safetensors"), "{err}");
        assert!(err.contains("decoder.mid.attn_1.q.weight"), "{err}");
        let not_ae = dir.path().join("not-ae.safetensors");
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("x".to_string(), Tensor::zeros(2, DType::F32, &Device::Cpu)?)]),
            &not_ae,
        )?;
        let err = FluxAutoencoder::load(&not_ae, &Device::Cpu)
            .expect_err("not an AE")
            .to_string();
        assert!(
            err.contains("not-ae.safetensors") && err.contains("encoder.conv_in.weight"),
            "{err}"
        );
        Ok(())
    }
}
