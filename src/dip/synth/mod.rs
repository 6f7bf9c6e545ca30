//! Synthetic DIP generator: procedural subjects with known identities, placed in varied scenes, with localized
//! negatives (paper §4.1).
//!
//! - An **identity** is `(shape, palette, pattern)` ([`Identity`]); shapes fall into the paper's three categories
//!   (objects, animals, humans). There are [`Identity::COUNT`] identities.
//! - The **reference** `x_r` of a subject is the subject alone, centred, on a neutral grey background
//!   ([`render_reference`]).
//! - The **winner** `x_0^w` shows the item's subjects (one to three distinct identities) in a new scene: random
//!   background, position, scale, mirroring and lighting ([`Scene`], rendered by [`render_scene`]).
//! - The **loser** `x_0^l` depends on [`NegativeSource`]; for `Perturbed` and `OtherSubject` it differs from the
//!   winner only inside the subject masks.
//! - Each mask is the exact, occlusion-aware set of pixels drawn by its subject, strictly binary (0/255).
//!
//! Generation is deterministic: item `k` depends only on `(seed, k, subjects, size_px, negatives)`, not on the number
//! of items. The full scene is stored under `meta.scene`, so evaluation code can re-render the ideal target of any
//! item ([`Scene::from_meta`]).

mod generate;
mod identity;
mod scene;

use std::fs;
use std::path::{Path, PathBuf};

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, GrayImage, ImageEncoder, RgbImage};
use rayon::prelude::*;

use super::dataset::is_inside_relative;
use super::manifest::{manifest_text, resolve};
use super::{DipError, ItemRecord, MANIFEST_FILE};

pub use generate::scale_range;
pub use identity::{Identity, Palette, Pattern, Shape};
pub use scene::{
    Background, Lighting, PlacedSubject, REFERENCE_BACKGROUND, REFERENCE_SCALE, Scene, colour_name, reference_scene,
    render_reference, render_scene,
};

/// Name of the generator, stored in each item's `meta.generator`.
pub const GENERATOR: &str = "focusdpo-synth";

/// Version of the generator, stored in each item's `meta.version`; bumped whenever the same config would produce
/// different bytes.
pub const GENERATOR_VERSION: u32 = 1;

/// Largest accepted number of items.
pub const MAX_ITEMS: usize = 100_000;

/// Accepted image sides: `MIN_SIZE_PX..=MAX_SIZE_PX`, a multiple of [`SIZE_MULTIPLE_PX`].
pub const MIN_SIZE_PX: u32 = 32;
/// See [`MIN_SIZE_PX`].
pub const MAX_SIZE_PX: u32 = 1024;
/// Image sides must be a multiple of this: the token grids of the models trained on these datasets use patch
/// strides of up to 16 px, so every mask pools to a whole number of tokens.
pub const SIZE_MULTIPLE_PX: u32 = 16;

/// How many subjects each generated item has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubjectCount {
    /// One subject per item.
    One,
    /// Two subjects per item.
    Two,
    /// Three subjects per item.
    Three,
    /// A per-item mix of one (40 %), two (35 %) and three (25 %).
    Mixed,
}

/// Where the loser image comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NegativeSource {
    /// A localized perturbation strictly inside the subject mask (paper §4.1): for one or more subjects, a disc
    /// covering 30–70 % of the subject's mask is re-rendered with the subject's palette or pattern changed.
    Perturbed,
    /// The subject replaced by a different identity (inside the mask): the scene is re-rendered with another
    /// identity of the same category (different shape and palette) at the same pose, and composited inside the
    /// original mask only.
    OtherSubject,
    /// An augmented copy of the positive: a global shift, colour jitter and blur or noise (not localized).
    Augmented,
}

impl NegativeSource {
    /// Stable snake_case name (as in `meta.negative.source`).
    pub fn key(self) -> &'static str {
        match self {
            NegativeSource::Perturbed => "perturbed",
            NegativeSource::OtherSubject => "other_subject",
            NegativeSource::Augmented => "augmented",
        }
    }
}

/// Generator settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthConfig {
    /// Number of items.
    pub items: usize,
    /// Subjects per item.
    pub subjects: SubjectCount,
    /// Image side in pixels (square images).
    pub size_px: u32,
    /// Seed: the same seed gives the same dataset.
    pub seed: u64,
    /// Source of the negatives.
    pub negatives: NegativeSource,
}

impl Default for SynthConfig {
    /// 48 items, mixed subject counts, 64 px, seed 0, perturbed negatives.
    fn default() -> Self {
        SynthConfig {
            items: 48,
            subjects: SubjectCount::Mixed,
            size_px: 64,
            seed: 0,
            negatives: NegativeSource::Perturbed,
        }
    }
}

impl SynthConfig {
    /// Checks the ranges: `1..=MAX_ITEMS` items, and a side in `MIN_SIZE_PX..=MAX_SIZE_PX` that is a multiple of
    /// [`SIZE_MULTIPLE_PX`].
    pub fn validate(&self) -> Result<(), DipError> {
        if !(1..=MAX_ITEMS).contains(&self.items) {
            return Err(DipError::BadSynthConfig {
                field: "items",
                message: format!("{} is out of range 1..={MAX_ITEMS}", self.items),
            });
        }
        if !(MIN_SIZE_PX..=MAX_SIZE_PX).contains(&self.size_px) || !self.size_px.is_multiple_of(SIZE_MULTIPLE_PX) {
            return Err(DipError::BadSynthConfig {
                field: "size_px",
                message: format!(
                    "{} must be in {MIN_SIZE_PX}..={MAX_SIZE_PX} and a multiple of {SIZE_MULTIPLE_PX} (token grids \
                     use patch strides of up to {SIZE_MULTIPLE_PX} px)",
                    self.size_px
                ),
            });
        }
        Ok(())
    }
}

/// One generated item in memory.
#[derive(Clone, Debug)]
pub struct SynthItem {
    /// The manifest record (paths relative to the dataset folder).
    pub record: ItemRecord,
    /// One reference per subject.
    pub references: Vec<RgbImage>,
    /// The winner.
    pub winner: RgbImage,
    /// The loser.
    pub loser: RgbImage,
    /// One binary (0/255) mask per subject, at the winner's size.
    pub masks: Vec<GrayImage>,
}

/// Generates the items in memory, in order (items are generated in parallel; the result does not depend on the
/// thread count).
pub fn synthesize(cfg: &SynthConfig) -> Result<Vec<SynthItem>, DipError> {
    cfg.validate()?;
    Ok((0..cfg.items).into_par_iter().map(|k| generate::item(cfg, k)).collect())
}

/// Generates item `index` alone, exactly as [`synthesize`] would at that position (`cfg.items` is ignored, so an
/// endless stream of items can be drawn, e.g. for pretraining).
pub fn synthesize_item(cfg: &SynthConfig, index: usize) -> Result<SynthItem, DipError> {
    SynthConfig {
        items: 1,
        ..cfg.clone()
    }
    .validate()?;
    Ok(generate::item(cfg, index))
}

/// Writes items as a DIP dataset folder (images + `metadata.jsonl`).
///
/// Creates `dir` and the sub-folders the records name, writes every PNG, then writes the manifest atomically (a
/// temporary file in `dir`, synced, then renamed), so a manifest only appears once all its images exist. Existing
/// files with the same names are overwritten; other files are left alone.
pub fn write_dataset(dir: &Path, items: &[SynthItem]) -> Result<(), DipError> {
    fs::create_dir_all(dir).map_err(|e| DipError::io(dir, e))?;
    for sub in ["refs", "winner", "loser", "masks"] {
        let path = dir.join(sub);
        fs::create_dir_all(&path).map_err(|e| DipError::io(&path, e))?;
    }
    let results: Vec<Result<(), DipError>> = items.par_iter().map(|item| write_item(dir, item)).collect();
    results.into_iter().collect::<Result<Vec<()>, DipError>>()?;
    let records: Vec<ItemRecord> = items.iter().map(|i| i.record.clone()).collect();
    let manifest = dir.join(MANIFEST_FILE);
    let text = manifest_text(&records).map_err(|e| DipError::io(&manifest, std::io::Error::other(e)))?;
    crate::store::write_atomic(&manifest, text.as_bytes()).map_err(|e| DipError::io(&manifest, e))
}

fn invalid_input(path: PathBuf, message: String) -> DipError {
    DipError::Io {
        path,
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, message),
    }
}

fn write_item(dir: &Path, item: &SynthItem) -> Result<(), DipError> {
    let r = &item.record;
    if r.references.len() != item.references.len() || r.masks.len() != item.masks.len() {
        return Err(invalid_input(
            dir.join(&r.id),
            format!(
                "item {}: the record names {} reference(s) and {} mask(s) but the item holds {} and {}",
                r.id,
                r.references.len(),
                r.masks.len(),
                item.references.len(),
                item.masks.len()
            ),
        ));
    }
    let rgb = ExtendedColorType::Rgb8;
    for (rel, image) in r.references.iter().zip(&item.references) {
        write_png(dir, rel, image.as_raw(), image.dimensions(), rgb)?;
    }
    write_png(dir, &r.winner, item.winner.as_raw(), item.winner.dimensions(), rgb)?;
    write_png(dir, &r.loser, item.loser.as_raw(), item.loser.dimensions(), rgb)?;
    for (rel, mask) in r.masks.iter().zip(&item.masks) {
        write_png(dir, rel, mask.as_raw(), mask.dimensions(), ExtendedColorType::L8)?;
    }
    Ok(())
}

fn write_png(
    dir: &Path,
    rel: &str,
    bytes: &[u8],
    (w, h): (u32, u32),
    colour: ExtendedColorType,
) -> Result<(), DipError> {
    let path = resolve(dir, rel);
    if !is_inside_relative(rel) {
        return Err(invalid_input(
            path,
            format!("\"{rel}\" must be a relative path inside the dataset folder"),
        ));
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| DipError::io(parent, e))?;
    }
    let mut encoded = Vec::new();
    PngEncoder::new(&mut encoded)
        .write_image(bytes, w, h, colour)
        .map_err(|e| DipError::ImageEncode {
            path: path.clone(),
            message: e.to_string(),
        })?;
    fs::write(&path, encoded).map_err(|e| DipError::io(&path, e))
}

/// SplitMix64 finalizer: a cheap, well-mixed 64-bit hash.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
