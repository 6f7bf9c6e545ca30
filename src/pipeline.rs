//! From a decoded DIP item to its token-grid masks: the glue between [`crate::dip`] and the math core in
//! [`crate::masks`]. No file I/O here either.
//!
//! Choices (see `docs/masks.md`):
//! * `M_d` is computed on the **winner** `x_0^w` (Alg. 1 `COMPUTEMASKS(x_0^w, x_t^w, x_r)`), on its grey levels
//!   (Rec. 709 luma, `image::imageops::grayscale`), and the same `M` weights the winner and loser terms of
//!   Eq. 10.
//! * `M_prior` is the union over subjects of each subject's pooled mask.

use image::{GrayImage, RgbImage};

use crate::dip::LoadedItem;
use crate::masks::{ComplexityConfig, Grid, MaskError, PriorConfig, complexity, prior};

/// How masks are computed from pixels.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaskSettings {
    /// Token grid and subject pooling (the stride is shared by every mask).
    pub prior: PriorConfig,
    /// Entropy window and flat-image policy of `M_d`.
    pub complexity: ComplexityConfig,
}

/// The image-derived masks of one item (everything except the model-derived `M_s`).
#[derive(Clone, Debug, PartialEq)]
pub struct ItemMasks {
    /// `M_prior^j` per subject on the token grid.
    pub subject_priors: Vec<Grid>,
    /// `M_prior`, union over subjects.
    pub m_prior: Grid,
    /// `M_d` on the token grid (Eq. 8).
    pub m_d: Grid,
    /// `C_p` per pixel of the winner, in bits (Eq. 7, before pooling and normalisation).
    pub c_raw: Grid,
}

/// Grey levels of an RGB image, row-major.
pub fn grey_pixels(image: &RgbImage) -> Vec<u8> {
    image::imageops::grayscale(image).into_raw()
}

/// A subject mask (0/255) pooled to the token grid.
pub fn subject_prior(mask: &GrayImage, cfg: &PriorConfig) -> Result<Grid, MaskError> {
    let (w, h) = mask.dimensions();
    prior::prior_token_mask(mask.as_raw(), w as usize, h as usize, cfg)
}

/// Computes `M_prior` (per subject and union), `M_d` and the raw entropy map of an item.
pub fn item_masks(item: &LoadedItem, settings: &MaskSettings) -> Result<ItemMasks, MaskError> {
    let subject_priors = item
        .masks
        .iter()
        .map(|m| subject_prior(m, &settings.prior))
        .collect::<Result<Vec<_>, _>>()?;
    let m_prior = prior::union(&subject_priors)?;
    let (w, h) = item.winner.dimensions();
    let c_raw = complexity::local_entropy_bits(
        &grey_pixels(&item.winner),
        w as usize,
        h as usize,
        settings.complexity.window_px,
    )?;
    let m_d = complexity::complexity_from_entropy(&c_raw, settings.prior.stride, &settings.complexity)?;
    Ok(ItemMasks {
        subject_priors,
        m_prior,
        m_d,
        c_raw,
    })
}
