//! Where a pair's loser comes from (`data.negatives`): the dataset's own loser, another item's winner (a seeded
//! derangement), or a sample of the base model for the item's prompt and references.
//!
//! **Masks.** Every FocusDPO map of an item (`M_prior` from the item's subject masks, `M_d` from the winner's
//! entropy, `M_s` from the winner-and-loser hidden states) is built as before from the item itself; only the loser
//! pixels change. With `shuffled` the loser's subjects are not where the item's masks are (the masks describe the
//! winner), and with `base` the sample's subjects are wherever the base put them: the weight map then marks the
//! winner's subject regions in both images, which is what Eq. 10 weights anyway (same token positions for `x_w`
//! and `x_l`).
//!
//! **Base negatives** are generated once per item ([`base_loser`]): the sampler of [`crate::eval::sampler`] with
//! the run's base, adapters off, `data.base_negatives.{steps, cfg_scale, shift}`, the run's parameterisation and
//! reference size, and a seed derived from the run seed and the item's position in the dataset manifest. They are
//! cached as PNG (lossless for 8-bit images) under `runs/NAME/negatives/`, so a resumed run reads exactly the
//! images the first run trained on instead of sampling again.

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::dip::LoadedItem;
use crate::eval::EvalError;
use crate::eval::sampler::{SampleRequest, SampleSettings, sample};
use crate::model::schedule::Parameterisation;
use crate::model::{Adapters, BaseModel};
use crate::rng::stream_rng;

/// Folder of cached base negatives inside a run directory.
pub const NEGATIVES_DIR: &str = "negatives";

const STREAM_SHUFFLE: u64 = 0x4E45_4700_0001;
const STREAM_BASE_SEED: u64 = 0x4E45_4700_0002;

/// The loser source of every pair (`data.negatives`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoserSource {
    /// The item's own loser (default).
    #[default]
    Dataset,
    /// Another item's winner: item `i` takes the winner of item `π(i)` for a seeded derangement `π`.
    Shuffled,
    /// A sample of the base model (adapters off) for the item's prompt and references.
    Base,
}

impl LoserSource {
    /// Config name.
    pub fn name(self) -> &'static str {
        match self {
            LoserSource::Dataset => "dataset",
            LoserSource::Shuffled => "shuffled",
            LoserSource::Base => "base",
        }
    }
}

/// `[data.base_negatives]`: the sampler settings of `negatives = "base"`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BaseNegativesConfig {
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale (1 = none).
    pub cfg_scale: f32,
    /// Rectified-flow time shift.
    pub shift: f32,
}

impl Default for BaseNegativesConfig {
    fn default() -> Self {
        Self {
            steps: 12,
            cfg_scale: 3.0,
            shift: 1.0,
        }
    }
}

/// Errors building losers; each names the item or file.
#[derive(Debug, thiserror::Error)]
pub enum NegativesError {
    /// A derangement needs two items.
    #[error("data.negatives = \"shuffled\" needs at least 2 items (another item's winner is the loser), got {0}")]
    TooFewToShuffle(usize),
    /// Sampling failed.
    #[error("item `{item}`: base negative: {source}")]
    Sample {
        /// Item id.
        item: String,
        /// Cause.
        source: EvalError,
    },
    /// The cache cannot be written.
    #[error("{}: {message}", path.display())]
    Cache {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// A seeded derangement of `0..n` (no `i` maps to itself), by Sattolo's algorithm: a uniformly random `n`-cycle.
/// None for `n < 2`.
pub fn derangement(seed: u64, n: usize) -> Option<Vec<usize>> {
    if n < 2 {
        return None;
    }
    let mut rng = stream_rng(seed, STREAM_SHUFFLE, 0);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rand::RngExt::random_range(&mut rng, 0..i);
        v.swap(i, j);
    }
    Some(v)
}

fn fit(image: &RgbImage, size: (u32, u32)) -> RgbImage {
    if image.dimensions() == size {
        image.clone()
    } else {
        image::imageops::resize(image, size.0, size.1, image::imageops::FilterType::Triangle)
    }
}

/// Replaces each item's loser by the winner of another item (a derangement seeded by `seed`), resized to the
/// item's size when sizes differ. Returns, per item, the position of the item whose winner it now has.
pub fn shuffle_losers(items: &mut [LoadedItem], seed: u64) -> Result<Vec<usize>, NegativesError> {
    let perm = derangement(seed, items.len()).ok_or(NegativesError::TooFewToShuffle(items.len()))?;
    let winners: Vec<RgbImage> = items.iter().map(|i| i.winner.clone()).collect();
    for (item, &src) in items.iter_mut().zip(&perm) {
        item.loser = fit(&winners[src], item.winner.dimensions());
    }
    Ok(perm)
}

/// The sampling seed of the base negative of the item at `dataset_index` (its manifest position) in a run seeded
/// `run_seed`.
pub fn base_negative_seed(run_seed: u64, dataset_index: usize) -> u64 {
    rand::RngExt::random(&mut stream_rng(run_seed, STREAM_BASE_SEED, dataset_index as u64))
}

/// Samples the base (adapters off) for `item`'s prompt and references at the winner's size.
pub fn base_loser(
    base: &BaseModel,
    item: &LoadedItem,
    cfg: &BaseNegativesConfig,
    parameterisation: Parameterisation,
    reference_px: u32,
    seed: u64,
) -> Result<RgbImage, NegativesError> {
    let settings = SampleSettings {
        steps: cfg.steps,
        cfg_scale: cfg.cfg_scale,
        shift: cfg.shift,
        parameterisation,
        reference_px,
        ..SampleSettings::default()
    };
    let request = SampleRequest {
        prompt: &item.record.prompt,
        references: &item.references,
        size_px: item.winner.dimensions(),
    };
    let err = |source| NegativesError::Sample {
        item: item.record.id.clone(),
        source,
    };
    let mut images = sample(base, &request, &settings, &[seed], Adapters::Off).map_err(err)?;
    images
        .pop()
        .ok_or_else(|| err(EvalError::Invalid("the sampler returned no image".into())))
}

/// The cache file of an item's base negative: `negatives/<index>-<id>.png` (id characters other than
/// `[A-Za-z0-9_-]` become `_`).
pub fn cache_path(run_dir: &Path, dataset_index: usize, id: &str) -> PathBuf {
    let safe: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    run_dir
        .join(NEGATIVES_DIR)
        .join(format!("{dataset_index:05}-{safe}.png"))
}

/// A cached image of the expected size, or None (missing, unreadable or wrong size: it is generated again).
fn read_cached(path: &Path, size: (u32, u32)) -> Option<RgbImage> {
    let img = image::open(path).ok()?.to_rgb8();
    (img.dimensions() == size).then_some(img)
}

fn write_cached(path: &Path, img: &RgbImage) -> Result<(), NegativesError> {
    let cache_err = |message: String| NegativesError::Cache {
        path: path.to_path_buf(),
        message,
    };
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| cache_err(e.to_string()))?;
    crate::store::write_atomic(path, &bytes).map_err(|e| cache_err(e.to_string()))
}

/// What a base-negatives pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BaseNegativesOutcome {
    /// Losers sampled now.
    pub generated: usize,
    /// Losers read from the cache.
    pub cached: usize,
}

/// Replaces each item's loser by its base negative: read from the cache under `run_dir` when present, otherwise
/// sampled ([`base_loser`]) and, with a `run_dir`, cached. `dataset_indices[i]` is item `i`'s manifest position.
#[allow(clippy::too_many_arguments)]
pub fn base_losers(
    items: &mut [LoadedItem],
    dataset_indices: &[usize],
    base: &BaseModel,
    cfg: &BaseNegativesConfig,
    parameterisation: Parameterisation,
    reference_px: u32,
    run_seed: u64,
    run_dir: Option<&Path>,
) -> Result<BaseNegativesOutcome, NegativesError> {
    let mut outcome = BaseNegativesOutcome::default();
    for (item, &index) in items.iter_mut().zip(dataset_indices) {
        let size = item.winner.dimensions();
        let path = run_dir.map(|d| cache_path(d, index, &item.record.id));
        if let Some(img) = path.as_deref().and_then(|p| read_cached(p, size)) {
            item.loser = img;
            outcome.cached += 1;
            continue;
        }
        let seed = base_negative_seed(run_seed, index);
        let img = fit(
            &base_loser(base, item, cfg, parameterisation, reference_px, seed)?,
            size,
        );
        if let Some(p) = &path {
            write_cached(p, &img)?;
        }
        item.loser = img;
        outcome.generated += 1;
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derangements_have_no_fixed_point_and_are_seeded() {
        for n in 2..12 {
            for seed in 0..20 {
                let p = derangement(seed, n).expect("n ≥ 2");
                assert!(p.iter().enumerate().all(|(i, &j)| i != j), "{p:?}");
                let mut s = p.clone();
                s.sort_unstable();
                assert_eq!(s, (0..n).collect::<Vec<_>>());
                assert_eq!(derangement(seed, n), Some(p));
            }
        }
        assert_ne!(derangement(1, 10), derangement(2, 10));
        assert_eq!(derangement(0, 2), Some(vec![1, 0]));
        assert_eq!(derangement(0, 1), None);
        assert_eq!(derangement(0, 0), None);
    }

    #[test]
    fn cache_paths_are_plain_file_names() {
        let p = cache_path(Path::new("/r"), 7, "a/b c");
        assert_eq!(p, Path::new("/r/negatives/00007-a_b_c.png"));
        assert_ne!(base_negative_seed(0, 1), base_negative_seed(0, 2));
        assert_ne!(base_negative_seed(0, 1), base_negative_seed(1, 1));
    }
}
