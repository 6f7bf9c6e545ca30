//! Embedders from pretrained weights given by path: DINOv2 (DINO score) and CLIP (CLIP-I, CLIP-T), with
//! candle-transformers' `dinov2` and `clip` models.
//!
//! * [`DinoV2Embedder`]: Meta's DINOv2 ViT/14 (`dinov2_vits14` naming: `cls_token`, `pos_embed`,
//!   `patch_embed.proj.*`, `blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*`,
//!   `norm.*`). The embedding is the final-layer-normed CLS token, L2-normalised. Images are resized (shorter
//!   side, bicubic) and centre-cropped to 224 px, scaled to `[0, 1]` and normalised with the ImageNet mean/std.
//! * [`ClipEmbedder`]: OpenAI CLIP in the `transformers` naming (`text_model.*`, `vision_model.*`,
//!   `text_projection.weight`, `visual_projection.weight`): image and text features after their projections,
//!   L2-normalised, in one space. Images: shorter side to the model's size (224), centre crop, CLIP mean/std.
//!   Texts: the model's `tokenizer.json`, padded/truncated to 77 tokens, pooled at the first end-of-text token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::clip::text_model::{ClipTextConfig, ClipTextTransformer};
use candle_transformers::models::clip::vision_model::{ClipVisionConfig, ClipVisionTransformer};
use image::RgbImage;
use image::imageops::FilterType;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::dinov2::DinoV2;
use super::{EvalError, ImageEmbedder, TextEmbedder};
use crate::model::flux_text::CLIP_EOT;
use crate::model::hf::{self, Checkpoint, LoadError};
use crate::model::weights::WeightsError;

/// ImageNet mean (RGB), the DINOv2 preprocessing.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet std (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// CLIP's pixel mean (RGB).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's pixel std (RGB).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// DINOv2's patch side.
const DINO_PATCH: usize = super::dinov2::PATCH;

fn weights_err(e: LoadError) -> EvalError {
    let path = e.path();
    let message = match e {
        LoadError::Weights(WeightsError::Io { source, .. }) => source.to_string(),
        LoadError::Weights(WeightsError::Format { source, .. }) | LoadError::Model { source, .. } => source.to_string(),
        LoadError::Weights(w @ WeightsError::NoShards(_)) => w.to_string(),
        LoadError::Config { message, .. } | LoadError::Tokenizer { message, .. } => message,
    };
    EvalError::Weights { path, message }
}

/// An image as `[1, 3, size, size]`: shorter side resized to `size` (bicubic), centre-cropped, scaled to
/// `[0, 1]` and normalised per channel.
pub fn preprocess(
    img: &RgbImage,
    size: usize,
    mean: [f32; 3],
    std: [f32; 3],
    device: &Device,
) -> Result<Tensor, EvalError> {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 || size == 0 {
        return Err(EvalError::Invalid(format!("cannot embed a {w}×{h} image at {size} px")));
    }
    let s = size as u32;
    let scale = s as f64 / f64::from(w.min(h));
    let (rw, rh) = (
        ((f64::from(w) * scale).round() as u32).max(s),
        ((f64::from(h) * scale).round() as u32).max(s),
    );
    let resized = if (rw, rh) == (w, h) {
        img.clone()
    } else {
        image::imageops::resize(img, rw, rh, FilterType::CatmullRom)
    };
    let cropped = image::imageops::crop_imm(&resized, (rw - s) / 2, (rh - s) / 2, s, s).to_image();
    let mut data = vec![0f32; 3 * size * size];
    for (i, p) in cropped.pixels().enumerate() {
        for c in 0..3 {
            data[c * size * size + i] = (f32::from(p[c]) / 255.0 - mean[c]) / std[c];
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, size, size), device)?)
}

fn unit_rows(x: &Tensor) -> Result<Vec<Vec<f32>>, EvalError> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?.to_vec2::<f32>()?)
}

/// Sizes of a DINOv2 ViT/14 (MLP ratio 4 and patch 14 are fixed by candle-transformers).
#[derive(Debug, Clone, PartialEq)]
pub struct DinoV2Config {
    /// Reported embedder name (`dinov2-vits14`).
    pub name: String,
    /// Transformer blocks.
    pub depth: usize,
    /// Width (the embedding dimension).
    pub embed_dim: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Input side in pixels (a multiple of 14).
    pub image_px: usize,
}

impl DinoV2Config {
    /// ViT-S/14 (`dinov2_vits14`): 12 blocks, width 384, 6 heads; 224 px.
    pub fn vit_small_14() -> Self {
        Self {
            name: "dinov2-vits14".into(),
            depth: 12,
            embed_dim: 384,
            num_heads: 6,
            image_px: 224,
        }
    }

    /// ViT-B/14 (`dinov2_vitb14`): 12 blocks, width 768, 12 heads; 224 px.
    pub fn vit_base_14() -> Self {
        Self {
            name: "dinov2-vitb14".into(),
            depth: 12,
            embed_dim: 768,
            num_heads: 12,
            image_px: 224,
        }
    }
}

/// DINOv2 CLS-token embedder (DINO score).
pub struct DinoV2Embedder {
    model: DinoV2,
    cfg: DinoV2Config,
    device: Device,
}

impl DinoV2Embedder {
    /// Loads a DINOv2 backbone checkpoint (Meta naming; an ImageNet `head.*` in the file is ignored) with our
    /// DINOv2 ([`super::dinov2`], checked against transformers' `Dinov2Model`).
    pub fn load(path: &Path, cfg: &DinoV2Config, device: &Device) -> Result<Self, EvalError> {
        let err = |message: String| EvalError::Weights {
            path: path.to_path_buf(),
            message,
        };
        if cfg.embed_dim == 0 || cfg.num_heads == 0 || !cfg.embed_dim.is_multiple_of(cfg.num_heads) {
            return Err(err(format!(
                "DINOv2 width {} with {} heads is not supported (the width must split into the heads)",
                cfg.embed_dim, cfg.num_heads
            )));
        }
        if cfg.image_px == 0 || !cfg.image_px.is_multiple_of(DINO_PATCH) {
            return Err(err(format!(
                "image size {} px is not a multiple of {DINO_PATCH}",
                cfg.image_px
            )));
        }
        let tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load(path, device).map_err(|e| err(e.to_string()))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = DinoV2::new(vb, cfg.depth, cfg.embed_dim, cfg.num_heads).map_err(|e| err(e.to_string()))?;
        Ok(Self {
            model,
            cfg: cfg.clone(),
            device: device.clone(),
        })
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.cfg.embed_dim
    }

    /// The final-normed CLS tokens `[B, embed_dim]` of preprocessed images `[B, 3, H, W]` (not unit-normed): what
    /// `Dinov2Model`'s `pooler_output` is.
    pub fn cls_embedding(&self, pixels: &Tensor) -> Result<Tensor, EvalError> {
        Ok(self.model.cls(pixels)?)
    }
}

impl ImageEmbedder for DinoV2Embedder {
    fn name(&self) -> String {
        self.cfg.name.clone()
    }

    fn embed_images(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>, EvalError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let xs = images
            .iter()
            .map(|img| preprocess(img, self.cfg.image_px, IMAGENET_MEAN, IMAGENET_STD, &self.device))
            .collect::<Result<Vec<_>, _>>()?;
        unit_rows(&self.cls_embedding(&Tensor::cat(&xs, 0)?)?)
    }
}

/// Sizes of a CLIP model (both towers).
#[derive(Debug, Clone)]
pub struct ClipModelConfig {
    /// Reported embedder name (`clip-vit-b32`).
    pub name: String,
    /// Text tower.
    pub text: ClipTextConfig,
    /// Vision tower.
    pub vision: ClipVisionConfig,
}

impl ClipModelConfig {
    /// `openai/clip-vit-base-patch32` (224 px, projection 512).
    pub fn vit_base_patch32() -> Self {
        Self {
            name: "clip-vit-b32".into(),
            text: ClipTextConfig::vit_base_patch32(),
            vision: ClipVisionConfig::vit_base_patch32(),
        }
    }

    /// `openai/clip-vit-large-patch14` (224 px, projection 768).
    pub fn vit_large_patch14() -> Self {
        Self {
            name: "clip-vit-l14".into(),
            text: hf::clip_l_text(),
            vision: hf::clip_l_vision(),
        }
    }
}

/// CLIP image and text embedder (CLIP-I, CLIP-T).
pub struct ClipEmbedder {
    text: ClipTextTransformer,
    vision: ClipVisionTransformer,
    text_projection: Linear,
    visual_projection: Linear,
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    eot_id: u32,
    image_px: usize,
    name: String,
    device: Device,
}

impl ClipEmbedder {
    /// Loads CLIP from `weights` — a `model.safetensors` with `preset`'s sizes, or a folder with `config.json`
    /// (whose sizes win) — and its `tokenizer.json`.
    pub fn load(
        weights: &Path,
        tokenizer: &Path,
        preset: &ClipModelConfig,
        device: &Device,
    ) -> Result<Self, EvalError> {
        let ckpt = Checkpoint::open(weights, device).map_err(weights_err)?;
        let cfg = match &ckpt.config {
            Some((path, value)) => ClipModelConfig {
                name: format!(
                    "clip:{}",
                    weights
                        .file_name()
                        .map_or_else(String::new, |n| n.to_string_lossy().into())
                ),
                text: hf::clip_text_config_from_json(value, path).map_err(weights_err)?,
                vision: hf::clip_vision_config_from_json(value, path).map_err(weights_err)?,
            },
            None => preset.clone(),
        };
        Self::from_checkpoint(&ckpt, &cfg, tokenizer, device).map_err(weights_err)
    }

    fn from_checkpoint(
        ckpt: &Checkpoint,
        cfg: &ClipModelConfig,
        tokenizer: &Path,
        device: &Device,
    ) -> Result<Self, LoadError> {
        // candle-transformers would draw a random class embedding if the file had none.
        ckpt.require("vision_model.embeddings.class_embedding")?;
        let vb = &ckpt.vb;
        let text = ClipTextTransformer::new(vb.pp("text_model"), &cfg.text).map_err(|e| ckpt.model_err(e))?;
        let vision = ClipVisionTransformer::new(vb.pp("vision_model"), &cfg.vision).map_err(|e| ckpt.model_err(e))?;
        let text_projection =
            candle_nn::linear_no_bias(cfg.text.embed_dim, cfg.text.projection_dim, vb.pp("text_projection"))
                .map_err(|e| ckpt.model_err(e))?;
        let visual_projection = candle_nn::linear_no_bias(
            cfg.vision.embed_dim,
            cfg.vision.projection_dim,
            vb.pp("visual_projection"),
        )
        .map_err(|e| ckpt.model_err(e))?;
        if cfg.text.projection_dim != cfg.vision.projection_dim {
            return Err(ckpt.model_err(candle_core::Error::Msg(format!(
                "text projection {} and visual projection {} differ",
                cfg.text.projection_dim, cfg.vision.projection_dim
            ))));
        }
        let mut tok = hf::load_clip_tokenizer(tokenizer)?;
        let eot_id = hf::token_id(&tok, CLIP_EOT, tokenizer)?;
        let tok_err = |e: tokenizers::Error| LoadError::Tokenizer {
            path: tokenizer.to_path_buf(),
            message: e.to_string(),
        };
        let max = cfg.text.max_position_embeddings;
        tok.with_truncation(Some(TruncationParams {
            max_length: max,
            ..Default::default()
        }))
        .map_err(tok_err)?;
        tok.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max),
            pad_id: eot_id,
            pad_token: CLIP_EOT.into(),
            ..Default::default()
        }));
        Ok(Self {
            text,
            vision,
            text_projection,
            visual_projection,
            tokenizer: tok,
            tokenizer_path: tokenizer.to_path_buf(),
            eot_id,
            image_px: cfg.vision.image_size,
            name: cfg.name.clone(),
            device: device.clone(),
        })
    }

    /// Embedding width (the projection dimension).
    pub fn dim(&self) -> usize {
        self.visual_projection.weight().dim(0).unwrap_or(0)
    }

    /// Projected image features `[B, dim]` of preprocessed images `[B, 3, H, W]` (not unit-normed): what
    /// `CLIPModel.get_image_features` computes.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor, EvalError> {
        Ok(self.vision.forward(pixels)?.apply(&self.visual_projection)?)
    }
}

impl ImageEmbedder for ClipEmbedder {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn embed_images(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>, EvalError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let xs = images
            .iter()
            .map(|img| preprocess(img, self.image_px, CLIP_MEAN, CLIP_STD, &self.device))
            .collect::<Result<Vec<_>, _>>()?;
        let x = Tensor::cat(&xs, 0)?;
        unit_rows(&self.image_features(&x)?)
    }
}

impl TextEmbedder for ClipEmbedder {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EvalError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EvalError::Weights {
                path: self.tokenizer_path.clone(),
                message: format!("tokenizing: {e}"),
            })?;
        let len = encodings.first().map_or(0, |e| e.get_ids().len());
        let ids: Vec<u32> = encodings.iter().flat_map(|e| e.get_ids().iter().copied()).collect();
        let ids = Tensor::from_vec(ids, (texts.len(), len), &self.device)?;
        let states = self.text.forward_with_mask(&ids, usize::MAX)?;
        let pooled = encodings
            .iter()
            .enumerate()
            .map(|(b, e)| {
                let at = e
                    .get_ids()
                    .iter()
                    .position(|&id| id == self.eot_id)
                    .unwrap_or(len.saturating_sub(1));
                states.i((b, at))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let features = Tensor::stack(&pooled, 0)?.apply(&self.text_projection)?;
        unit_rows(&features)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::flux_text::testing::{random_named, write_tiny_clip};

    fn tiny_dino() -> DinoV2Config {
        DinoV2Config {
            name: "dinov2-tiny".into(),
            depth: 1,
            embed_dim: 16,
            num_heads: 2,
            image_px: 56,
        }
    }

    fn write_tiny_dino(path: &Path, seed: u64) -> anyhow::Result<()> {
        let cfg = tiny_dino();
        // candle-transformers' DINOv2 asks for exactly the tensors of Meta's naming (pos_embed for 37 × 37 patches).
        let mut w = random_named(seed, |vb| {
            candle_transformers::models::dinov2::DinoVisionTransformer::new(vb, cfg.depth, cfg.embed_dim, cfg.num_heads)
                .map(|_| ())
        })?;
        // The backbone checkpoint has no ImageNet head; the loader brings its own.
        w.retain(|name, _| !name.starts_with("head."));
        candle_core::safetensors::save(&w, path)?;
        Ok(())
    }

    fn images() -> Vec<RgbImage> {
        let a = RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 3) as u8, (y * 5) as u8, 90]));
        let b = RgbImage::from_fn(40, 40, |x, y| image::Rgb([200, ((x * y) % 255) as u8, (x * 6) as u8]));
        vec![a.clone(), b, a]
    }

    fn assert_unit(v: &[f32], dim: usize) {
        assert_eq!(v.len(), dim);
        let n: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-4, "norm {n}");
    }

    #[test]
    fn dinov2_embeds_unit_cls_vectors_from_a_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("dinov2_tiny.safetensors");
        write_tiny_dino(&path, 1)?;
        let emb = DinoV2Embedder::load(&path, &tiny_dino(), &Device::Cpu)?;
        assert_eq!((emb.name(), emb.dim()), ("dinov2-tiny".to_string(), 16));
        let e = emb.embed_images(&images())?;
        assert_eq!(e.len(), 3);
        e.iter().for_each(|v| assert_unit(v, 16));
        assert_eq!(e[0], e[2], "identical images, identical embeddings");
        assert_ne!(e[0], e[1]);
        Ok(())
    }

    #[test]
    fn dinov2_errors_name_the_file_and_the_tensor() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("dino.safetensors");
        write_tiny_dino(&path, 2)?;
        let mut w = candle_core::safetensors::load(&path, &Device::Cpu)?;
        w.remove("blocks.0.ls2.gamma");
        let broken = dir.path().join("broken-dino.safetensors");
        candle_core::safetensors::save(&w, &broken)?;
        let err = DinoV2Embedder::load(&broken, &tiny_dino(), &Device::Cpu)
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(
            err.contains("broken-dino.safetensors") && err.contains("blocks.0.ls2.gamma"),
            "{err}"
        );
        // The ViT-S preset on tiny weights: a shape mismatch naming the tensor.
        let err = DinoV2Embedder::load(&path, &DinoV2Config::vit_small_14(), &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("dino.safetensors") && err.contains("pos_embed is [1, 1370, 16]"),
            "{err}"
        );
        let missing = DinoV2Embedder::load(&dir.path().join("none.safetensors"), &tiny_dino(), &Device::Cpu);
        assert!(matches!(missing, Err(EvalError::Weights { .. })));
        Ok(())
    }

    #[test]
    fn clip_embeds_images_and_texts_in_one_unit_space() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let clip_dir = dir.path().join("clip");
        write_tiny_clip(&clip_dir, 5)?;
        let emb = ClipEmbedder::load(
            &clip_dir,
            &clip_dir.join("tokenizer.json"),
            &ClipModelConfig::vit_base_patch32(),
            &Device::Cpu,
        )?;
        assert_eq!(emb.dim(), 12);
        let img = emb.embed_images(&images())?;
        assert_eq!(img.len(), 3);
        img.iter().for_each(|v| assert_unit(v, 12));
        assert_eq!(img[0], img[2]);
        assert_ne!(img[0], img[1]);
        let txt = emb.embed_texts(&["a red cat", "a blue dog on grass", "a red cat"])?;
        txt.iter().for_each(|v| assert_unit(v, 12));
        assert_eq!(txt[0], txt[2]);
        assert_ne!(txt[0], txt[1]);
        assert!(ImageEmbedder::name(&emb).starts_with("clip:"));
        Ok(())
    }

    #[test]
    fn clip_errors_name_the_file_and_the_tensor() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let clip_dir = dir.path().join("clip");
        write_tiny_clip(&clip_dir, 6)?;
        let tok = clip_dir.join("tokenizer.json");
        let weights = clip_dir.join("model.safetensors");
        for name in ["vision_model.embeddings.class_embedding", "text_projection.weight"] {
            let mut w = candle_core::safetensors::load(&weights, &Device::Cpu)?;
            w.remove(name);
            let broken = dir.path().join("broken");
            std::fs::create_dir_all(&broken)?;
            std::fs::copy(clip_dir.join("config.json"), broken.join("config.json"))?;
            candle_core::safetensors::save(&w, broken.join("model.safetensors"))?;
            let err = ClipEmbedder::load(&broken, &tok, &ClipModelConfig::vit_base_patch32(), &Device::Cpu)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("broken") && err.contains(name), "{err}");
        }
        // A single file is read with the preset's sizes.
        let err = ClipEmbedder::load(&weights, &tok, &ClipModelConfig::vit_base_patch32(), &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("model.safetensors") && err.contains("shape mismatch"),
            "{err}"
        );
        Ok(())
    }
}
