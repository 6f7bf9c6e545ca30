//! From decoded DIP items to model inputs: token tensors, position ids, prompt embeddings and token-grid masks,
//! prepared once per item and reused every step.

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::dip::LoadedItem;
use crate::masks::MaskError;
use crate::model::ImageCodec;
use crate::model::encoder::reference_at;
use crate::model::{
    BaseModel, ForwardOptions, ForwardOutput, Mmdit, MmditInput, Reference, ids_tensor, reference_ids, target_ids,
    uno_reference_offsets,
};
use crate::pipeline::{ItemMasks, MaskSettings, item_masks};

/// Errors preparing an item; each names the item.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// An image does not fit the model's token grid.
    #[error("item `{item}`: {message}")]
    Geometry {
        /// Item id.
        item: String,
        /// What is wrong.
        message: String,
    },
    /// The base cannot encode this input (no prompt tables, no autoencoder).
    #[error("item `{item}`: {message}")]
    Unsupported {
        /// Item id.
        item: String,
        /// What is missing.
        message: String,
    },
    /// The prompt cannot be encoded (tokenizer or text encoder failure).
    #[error("item `{item}`: prompt: {message}")]
    Text {
        /// Item id.
        item: String,
        /// Cause.
        message: String,
    },
    /// Mask computation failed.
    #[error("item `{item}`: masks: {source}")]
    Masks {
        /// Item id.
        item: String,
        /// Cause.
        source: MaskError,
    },
    /// Tensor error.
    #[error("item `{item}`: {source}")]
    Tensor {
        /// Item id.
        item: String,
        /// Cause.
        source: candle_core::Error,
    },
}

/// One reference image as model input.
#[derive(Debug, Clone)]
pub struct PreparedReference {
    /// Packed tokens [1, N_k, C].
    pub tokens: Tensor,
    /// UnoPE position ids [1, N_k, 3].
    pub ids: Tensor,
    /// Foreground tokens of the reference ([`crate::masks::reference_foreground`]), on its token grid: what
    /// `masks.attention.pool = "foreground"` pools.
    pub foreground: crate::masks::Grid,
}

/// An item ready for training or inspection.
#[derive(Debug, Clone)]
pub struct PreparedItem {
    /// Item id.
    pub id: String,
    /// Prompt.
    pub prompt: String,
    /// Token grid (rows, cols) of the target.
    pub grid: (usize, usize),
    /// Clean winner tokens `x_0^w` [1, N, C].
    pub x0_w: Tensor,
    /// Clean loser tokens `x_0^l` [1, N, C].
    pub x0_l: Tensor,
    /// Target position ids [1, N, 3].
    pub img_ids: Tensor,
    /// References, one per subject, in order.
    pub references: Vec<PreparedReference>,
    /// Text tokens [1, L, ctx].
    pub txt: Tensor,
    /// Text position ids [1, L, 3].
    pub txt_ids: Tensor,
    /// Pooled prompt vector [1, vec].
    pub y: Tensor,
    /// `M_prior` (per subject and union), `M_d`, raw entropy, on the token grid.
    pub masks: ItemMasks,
    /// Guidance strength [1] for a guidance-distilled base (`model.guidance`), `None` otherwise.
    pub guidance: Option<Tensor>,
}

impl PreparedItem {
    /// What a forward on this item runs, for the memory plan: `with_grad` sequences with a graph, `without_grad`
    /// without.
    pub fn workload(
        &self,
        with_grad: usize,
        without_grad: usize,
        checkpoint_blocks: bool,
    ) -> crate::model::memory::Workload {
        crate::model::memory::Workload {
            with_grad,
            without_grad,
            target_tokens: self.x0_w.dims().get(1).copied().unwrap_or(0),
            reference_tokens: self
                .references
                .iter()
                .map(|r| r.tokens.dims().get(1).copied().unwrap_or(0))
                .sum(),
            text_tokens: self.txt.dims().get(1).copied().unwrap_or(0),
            checkpoint_blocks,
            on_cpu: true,
            activations: crate::model::weights::WeightDtype::F32,
        }
    }

    /// Number of subjects.
    pub fn subjects(&self) -> usize {
        self.references.len()
    }

    /// Runs `model` on noisy target tokens `x_t` [B, N, C] of this item (references, prompt and ids repeated to
    /// the batch) at model times `timesteps` [B].
    pub fn forward(
        &self,
        model: &Mmdit,
        x_t: &Tensor,
        timesteps: &Tensor,
        opts: ForwardOptions,
    ) -> candle_core::Result<ForwardOutput> {
        let b = x_t.dim(0)?;
        let rep = |t: &Tensor| if b == 1 { Ok(t.clone()) } else { t.repeat((b, 1, 1)) };
        let refs = self
            .references
            .iter()
            .map(|r| Ok((rep(&r.tokens)?, rep(&r.ids)?)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let references: Vec<Reference<'_>> = refs.iter().map(|(tokens, ids)| Reference { tokens, ids }).collect();
        let (img_ids, txt, txt_ids) = (rep(&self.img_ids)?, rep(&self.txt)?, rep(&self.txt_ids)?);
        let y = if b == 1 { self.y.clone() } else { self.y.repeat((b, 1))? };
        let guidance = self.guidance.as_ref().map(|g| g.repeat(b)).transpose()?;
        let input = MmditInput {
            img: x_t,
            img_ids: &img_ids,
            txt: &txt,
            txt_ids: &txt_ids,
            timesteps,
            y: &y,
            guidance: guidance.as_ref(),
            references: &references,
            self_condition: None,
        };
        model.forward_with(&input, opts)
    }
}

fn tokens_of(codec: &ImageCodec, img: &RgbImage, device: &Device) -> candle_core::Result<Tensor> {
    codec
        .encode(img, device)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", codec.describe())))
}

/// Prepares `item` for `base`: images → tokens with the base's codec (pixel-unshuffle, or the FLUX autoencoder
/// and 2×2 packing), references resized to `reference_px` with UnoPE offsets, prompt → embeddings (learned
/// tables, or T5 and CLIP), masks on the token grid (stride = [`BaseModel::pixels_per_token`]).
pub fn prepare_item(
    base: &BaseModel,
    item: &LoadedItem,
    settings: &MaskSettings,
    reference_px: u32,
    device: &Device,
) -> Result<PreparedItem, PrepareError> {
    let id = item.record.id.clone();
    let geometry = |message: String| PrepareError::Geometry {
        item: id.clone(),
        message,
    };
    let tensor_err = |source: candle_core::Error| PrepareError::Tensor {
        item: id.clone(),
        source,
    };
    let codec = &base.codec;
    let p = codec.pixels_per_token();
    if base.config().in_channels != codec.channels() {
        return Err(PrepareError::Unsupported {
            item: id,
            message: match codec {
                ImageCodec::PixelUnshuffle { patch } => format!(
                    "the base has {} input channels, not 3·{patch}² pixel-unshuffled RGB: it needs the FLUX \
                     autoencoder (model.autoencoder = \"ae.safetensors\", docs/backbone.md)",
                    base.config().in_channels
                ),
                ImageCodec::FluxAutoencoder { .. } => format!(
                    "the base has {} input channels, but {} gives {}",
                    base.config().in_channels,
                    codec.describe(),
                    codec.channels()
                ),
            },
        });
    }
    let Some(text) = base.text_conditioner() else {
        return Err(PrepareError::Unsupported {
            item: id,
            message: "the base has no prompt tables: a FLUX base needs its T5 and CLIP text encoders \
                      (model.t5, model.clip and their tokenizers, docs/backbone.md)"
                .into(),
        });
    };
    if settings.prior.stride != p {
        return Err(geometry(format!(
            "mask stride {} differs from the model's {p} pixels per token (masks.settings.prior.stride)",
            settings.prior.stride
        )));
    }
    let (w, h) = item.winner.dimensions();
    let (w, h) = (w as usize, h as usize);
    if w % p != 0 || h % p != 0 || item.loser.dimensions() != item.winner.dimensions() {
        return Err(geometry(format!(
            "winner {w}×{h} / loser {:?} must be equal and multiples of the {p} pixels per token",
            item.loser.dimensions()
        )));
    }
    if !(reference_px as usize).is_multiple_of(p) {
        return Err(geometry(format!(
            "reference size {reference_px} px is not a multiple of the {p} pixels per token (model.reference_px)"
        )));
    }
    let grid = (h / p, w / p);
    let x0_w = tokens_of(codec, &item.winner, device).map_err(tensor_err)?;
    let x0_l = tokens_of(codec, &item.loser, device).map_err(tensor_err)?;
    let img_ids = ids_tensor(&target_ids(grid.0, grid.1), 1, device).map_err(tensor_err)?;
    let rg = reference_px as usize / p;
    let offsets = uno_reference_offsets(grid, &vec![(rg, rg); item.references.len()]);
    let references = item
        .references
        .iter()
        .zip(offsets)
        .map(|(r, off)| {
            let image = reference_at(r, reference_px);
            let side = reference_px as usize;
            let foreground = crate::masks::reference_foreground(image.as_raw(), side, side, p).map_err(|e| {
                PrepareError::Geometry {
                    item: id.clone(),
                    message: format!("reference foreground: {e}"),
                }
            })?;
            Ok(PreparedReference {
                tokens: tokens_of(codec, &image, device).map_err(tensor_err)?,
                ids: ids_tensor(&reference_ids(rg, rg, off), 1, device).map_err(tensor_err)?,
                foreground,
            })
        })
        .collect::<Result<Vec<_>, PrepareError>>()?;
    let enc = text.encode(&[&item.record.prompt]).map_err(|e| PrepareError::Text {
        item: id.clone(),
        message: e.to_string(),
    })?;
    let txt_ids = crate::model::text_ids(enc.txt.dim(1).map_err(tensor_err)?, 1, device).map_err(tensor_err)?;
    let masks = item_masks(item, settings).map_err(|source| PrepareError::Masks {
        item: id.clone(),
        source,
    })?;
    if masks.m_prior.shape() != grid {
        return Err(geometry(format!(
            "mask grid {:?} differs from the token grid {grid:?}",
            masks.m_prior.shape()
        )));
    }
    let guidance = base.guidance_tensor(base.train_guidance, 1).map_err(tensor_err)?;
    Ok(PreparedItem {
        id,
        prompt: item.record.prompt.clone(),
        grid,
        x0_w,
        x0_l,
        img_ids,
        references,
        txt: enc.txt,
        txt_ids,
        y: enc.y,
        masks,
        guidance,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use image::{GrayImage, Luma, Rgb};

    use super::*;
    use crate::dip::ItemRecord;
    use crate::model::codec::{random_autoencoder_weights, tiny_autoencoder_config};
    use crate::model::flux_text::testing::{write_tiny_clip, write_tiny_t5};
    use crate::model::{BaseSource, Config};
    use crate::train::config::ModelSettings;

    /// A FLUX-shaped MMDiT (64 channels per token = 16 latent channels packed 2×2) at tiny widths matching the
    /// tiny T5 (24) and CLIP (16) test encoders, saved like a FLUX checkpoint (no prompt tables).
    fn write_flux_shaped_base(path: &Path) -> anyhow::Result<()> {
        // Guidance-distilled like FLUX.1-dev: training forwards must feed `guidance_in`.
        let cfg = crate::model::testing::tiny_flux_config();
        let mut base = BaseModel::random(&cfg, 2, 5, &Device::Cpu)?;
        base.prompt = None;
        std::fs::write(path, base.to_safetensors_bytes()?)?;
        Ok(())
    }

    fn item(side: u32) -> LoadedItem {
        let winner = RgbImage::from_fn(side, side, |x, y| Rgb([(x * 7) as u8, (y * 7) as u8, 128]));
        let loser = RgbImage::from_fn(side, side, |x, y| Rgb([(y * 7) as u8, 60, (x * 7) as u8]));
        let mask = GrayImage::from_fn(side, side, |x, _| Luma([if x < side / 2 { 255 } else { 0 }]));
        LoadedItem {
            record: ItemRecord {
                id: "flux-item".into(),
                prompt: "a red cat on grass".into(),
                references: vec!["r.png".into()],
                winner: "w.png".into(),
                loser: "l.png".into(),
                masks: vec!["m.png".into()],
                category: None,
                meta: serde_json::Value::Null,
            },
            line: 1,
            references: vec![RgbImage::from_pixel(20, 20, Rgb([200, 10, 10]))],
            winner,
            loser,
            masks: vec![mask],
        }
    }

    struct FluxFiles {
        _dir: tempfile::TempDir,
        settings: ModelSettings,
    }

    fn flux_files() -> anyhow::Result<FluxFiles> {
        let dir = tempfile::tempdir()?;
        let base = dir.path().join("flux1-tiny.safetensors");
        write_flux_shaped_base(&base)?;
        let ae = dir.path().join("ae.safetensors");
        candle_core::safetensors::save(
            &random_autoencoder_weights(&tiny_autoencoder_config(), 9, &Device::Cpu)?,
            &ae,
        )?;
        let (t5, clip) = (dir.path().join("text_encoder_2"), dir.path().join("text_encoder"));
        write_tiny_t5(&t5, 1)?;
        write_tiny_clip(&clip, 2)?;
        let settings = ModelSettings {
            base: BaseSource::File(base),
            reference_px: 16,
            autoencoder: Some(ae),
            t5_tokenizer: Some(t5.join("tokenizer.json")),
            t5: Some(t5),
            t5_max_tokens: 8,
            clip_tokenizer: Some(clip.join("tokenizer.json")),
            clip: Some(clip),
            ..ModelSettings::default()
        };
        Ok(FluxFiles { _dir: dir, settings })
    }

    fn settings_for(base: &BaseModel) -> MaskSettings {
        let mut s = MaskSettings::default();
        s.prior.stride = base.pixels_per_token();
        s
    }

    #[test]
    fn a_flux_shaped_base_with_autoencoder_and_text_encoders_prepares_an_item() -> anyhow::Result<()> {
        let files = flux_files()?;
        files.settings.validate()?;
        let base = files.settings.load_base(&Device::Cpu)?;
        assert_eq!((base.patch, base.pixels_per_token()), (2, 16));
        let prepared = prepare_item(&base, &item(32), &settings_for(&base), 16, &Device::Cpu)?;
        assert_eq!(prepared.grid, (2, 2));
        assert_eq!(prepared.x0_w.dims(), &[1, 4, 64]);
        assert_eq!(prepared.references[0].tokens.dims(), &[1, 1, 64]);
        assert_eq!(prepared.txt.dims(), &[1, 8, 24]);
        assert_eq!(prepared.y.dims(), &[1, 16]);
        assert_eq!(prepared.masks.m_prior.shape(), (2, 2));
        // The MMDiT runs on the prepared inputs.
        let t = Tensor::new(&[0.5f32], &Device::Cpu)?;
        let out = prepared.forward(&base.mmdit, &prepared.x0_l, &t, ForwardOptions::default())?;
        assert_eq!(out.prediction.dims(), &[1, 4, 64]);
        // `model.guidance` reaches `guidance_in`.
        assert!(base.config().guidance_embed);
        let mut strong = base;
        strong.train_guidance = 4.0;
        let again = prepare_item(&strong, &item(32), &settings_for(&strong), 16, &Device::Cpu)?;
        let out4 = again.forward(&strong.mmdit, &again.x0_l, &t, ForwardOptions::default())?;
        let diff = (out.prediction - out4.prediction)?
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert!(diff > 0.0, "guidance 1 and 4 give the same prediction");
        Ok(())
    }

    #[test]
    fn a_flux_base_without_autoencoder_or_text_encoders_is_refused_clearly() -> anyhow::Result<()> {
        let files = flux_files()?;
        let bare = ModelSettings {
            autoencoder: None,
            t5: None,
            clip: None,
            ..files.settings.clone()
        };
        let base = bare.load_base(&Device::Cpu)?;
        let err = prepare_item(&base, &item(32), &settings_for(&base), 16, &Device::Cpu).expect_err("no AE");
        assert!(err.to_string().contains("model.autoencoder"), "{err}");
        let no_text = ModelSettings {
            t5: None,
            clip: None,
            ..files.settings.clone()
        };
        let base = no_text.load_base(&Device::Cpu)?;
        let err = prepare_item(&base, &item(32), &settings_for(&base), 16, &Device::Cpu).expect_err("no text");
        assert!(err.to_string().contains("model.t5"), "{err}");
        // Image sides must be multiples of 16 pixels per token.
        let base = files.settings.load_base(&Device::Cpu)?;
        let err = prepare_item(&base, &item(24), &settings_for(&base), 16, &Device::Cpu).expect_err("24 px");
        assert!(err.to_string().contains("16 pixels per token"), "{err}");
        // The tiny base cannot take FLUX latents.
        let tiny = BaseModel::random(&Config::tiny(), 4, 1, &Device::Cpu)?;
        let ae = files.settings.autoencoder.clone().unwrap_or_default();
        let err = tiny.with_autoencoder(&ae).expect_err("48 ≠ 64").to_string();
        assert!(err.contains("ae.safetensors") && err.contains("48"), "{err}");
        Ok(())
    }

    #[test]
    fn incomplete_encoder_settings_are_rejected() {
        let m = ModelSettings {
            t5: Some("t5".into()),
            ..ModelSettings::default()
        };
        assert!(m.validate().expect_err("no clip").to_string().contains("model.clip"));
        let m = ModelSettings {
            t5: Some("t5".into()),
            clip: Some("clip".into()),
            clip_tokenizer: Some("c.json".into()),
            ..ModelSettings::default()
        };
        assert!(
            m.validate()
                .expect_err("no tokenizer")
                .to_string()
                .contains("model.t5_tokenizer")
        );
    }
}
