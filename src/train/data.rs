//! From decoded DIP items to model inputs: token tensors, position ids, prompt embeddings and token-grid masks,
//! prepared once per item and reused every step.

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::dip::LoadedItem;
use crate::masks::MaskError;
use crate::model::encoder::{image_to_tensor, patchify};
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
}

impl PreparedItem {
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
        let input = MmditInput {
            img: x_t,
            img_ids: &img_ids,
            txt: &txt,
            txt_ids: &txt_ids,
            timesteps,
            y: &y,
            guidance: None,
            references: &references,
        };
        model.forward_with(&input, opts)
    }
}

fn tokens_of(img: &RgbImage, patch: usize, device: &Device) -> candle_core::Result<Tensor> {
    patchify(&image_to_tensor(img, device)?, patch)
}

/// Prepares `item` for `base`: images → tokens (pixel-unshuffle by the base's patch), references resized to
/// `reference_px` with UnoPE offsets, prompt → embeddings, masks on the token grid (stride = patch).
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
    let p = base.patch;
    if base.config().in_channels != 3 * p * p {
        return Err(PrepareError::Unsupported {
            item: id,
            message: format!(
                "the base has {} input channels, not 3·{p}² pixel-unshuffled RGB: it needs the FLUX autoencoder, \
                 which is not wired (docs/backbone.md)",
                base.config().in_channels
            ),
        });
    }
    let Some(prompt_encoder) = &base.prompt else {
        return Err(PrepareError::Unsupported {
            item: id,
            message: "the base has no prompt tables (FLUX text encoders are not wired, docs/backbone.md)".into(),
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
            "winner {w}×{h} / loser {:?} must be equal and multiples of the patch size {p}",
            item.loser.dimensions()
        )));
    }
    if !(reference_px as usize).is_multiple_of(p) {
        return Err(geometry(format!(
            "reference size {reference_px} px is not a multiple of the patch size {p}"
        )));
    }
    let grid = (h / p, w / p);
    let x0_w = tokens_of(&item.winner, p, device).map_err(tensor_err)?;
    let x0_l = tokens_of(&item.loser, p, device).map_err(tensor_err)?;
    let img_ids = ids_tensor(&target_ids(grid.0, grid.1), 1, device).map_err(tensor_err)?;
    let rg = reference_px as usize / p;
    let offsets = uno_reference_offsets(grid, &vec![(rg, rg); item.references.len()]);
    let references = item
        .references
        .iter()
        .zip(offsets)
        .map(|(r, off)| {
            let resized = if r.dimensions() == (reference_px, reference_px) {
                r.clone()
            } else {
                image::imageops::resize(r, reference_px, reference_px, image::imageops::FilterType::Triangle)
            };
            Ok(PreparedReference {
                tokens: tokens_of(&resized, p, device)?,
                ids: ids_tensor(&reference_ids(rg, rg, off), 1, device)?,
            })
        })
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(tensor_err)?;
    let enc = prompt_encoder.encode(&[&item.record.prompt]).map_err(tensor_err)?;
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
    })
}
