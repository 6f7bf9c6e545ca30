//! Where a pair's loser comes from (`data.negatives`): the dataset's own loser, another item's winner (a seeded
//! derangement), a sample of the base model for the item's prompt and references, or an augmentation of the
//! item's own winner.
//!
//! **Masks.** Every FocusDPO map of an item (`M_prior` from the item's subject masks, `M_d` from the winner's
//! entropy, `M_s` from the winner-and-loser hidden states) is built as before from the item itself; only the loser
//! pixels change. With `shuffled` the loser's subjects are not where the item's masks are (the masks describe the
//! winner), and with `base` the sample's subjects are wherever the base put them: the weight map then marks the
//! winner's subject regions in both images, which is what Eq. 10 weights anyway (same token positions for `x_w`
//! and `x_l`).
//!
//! **Augmented negatives** ([`augmented_loser`]): one seeded augmentation of the winner per item (the seed derived
//! from the run seed and the item's manifest position, like base negatives), `[data.augment]` setting each range:
//! geometric — a horizontal flip with probability `flip`, a rotation of up to ±`rotate_deg` and a scale in
//! [`scale_min`, `scale_max`] about the centre, a shift of up to ±`translate` of the side (edges replicated;
//! bilinear) — then photometric — brightness, contrast and saturation factors in 1 ± their setting, a Gaussian
//! blur of σ up to `blur_sigma` px and Gaussian noise of σ up to `noise_std` (0–255 scale). Warps, blur and noise
//! are `imageproc`'s. The masks still describe the winner, as with the other sources.
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
const STREAM_AUGMENT: u64 = 0x4E45_4700_0003;

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
    /// A seeded photometric and geometric augmentation of the item's own winner (`[data.augment]`).
    Augmented,
}

impl LoserSource {
    /// Config name.
    pub fn name(self) -> &'static str {
        match self {
            LoserSource::Dataset => "dataset",
            LoserSource::Shuffled => "shuffled",
            LoserSource::Base => "base",
            LoserSource::Augmented => "augmented",
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

/// `[data.augment]`: the ranges of `negatives = "augmented"` (each drawn uniformly per item).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Probability of a horizontal flip.
    pub flip: f32,
    /// Largest rotation, degrees either way.
    pub rotate_deg: f32,
    /// Smallest scale about the centre.
    pub scale_min: f32,
    /// Largest scale about the centre.
    pub scale_max: f32,
    /// Largest shift, as a fraction of the side, either way.
    pub translate: f32,
    /// Brightness factor in 1 ± this.
    pub brightness: f32,
    /// Contrast factor (about mid-grey) in 1 ± this.
    pub contrast: f32,
    /// Saturation factor in 1 ± this.
    pub saturation: f32,
    /// Largest Gaussian blur σ in pixels (0: none).
    pub blur_sigma: f32,
    /// Largest Gaussian noise σ on the 0–255 scale (0: none).
    pub noise_std: f32,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            flip: 0.0,
            rotate_deg: 8.0,
            scale_min: 0.9,
            scale_max: 1.1,
            translate: 0.05,
            brightness: 0.15,
            contrast: 0.15,
            saturation: 0.3,
            blur_sigma: 1.0,
            noise_std: 8.0,
        }
    }
}

impl AugmentConfig {
    /// The first setting out of range, as (field, message).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let within = |field: &'static str, v: f32, lo: f32, hi: f32| {
            if v.is_finite() && (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err((field, format!("must be in [{lo}, {hi}], got {v}")))
            }
        };
        within("data.augment.flip", self.flip, 0.0, 1.0)?;
        within("data.augment.rotate_deg", self.rotate_deg, 0.0, 180.0)?;
        within("data.augment.scale_min", self.scale_min, 0.1, 10.0)?;
        within("data.augment.scale_max", self.scale_max, self.scale_min.max(0.1), 10.0)?;
        within("data.augment.translate", self.translate, 0.0, 0.5)?;
        within("data.augment.brightness", self.brightness, 0.0, 1.0)?;
        within("data.augment.contrast", self.contrast, 0.0, 1.0)?;
        within("data.augment.saturation", self.saturation, 0.0, 1.0)?;
        within("data.augment.blur_sigma", self.blur_sigma, 0.0, 50.0)?;
        within("data.augment.noise_std", self.noise_std, 0.0, 255.0)
    }
}

/// The parameters one augmentation drew (recorded in pairs.json as the loser's description).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Augmentation {
    /// Flipped horizontally.
    pub flip: bool,
    /// Rotation, degrees.
    pub rotate_deg: f32,
    /// Scale about the centre.
    pub scale: f32,
    /// Shift in pixels.
    pub shift_px: (f32, f32),
    /// Brightness factor.
    pub brightness: f32,
    /// Contrast factor.
    pub contrast: f32,
    /// Saturation factor.
    pub saturation: f32,
    /// Blur σ, pixels.
    pub blur_sigma: f32,
    /// Noise σ, 0–255 scale.
    pub noise_std: f32,
    /// Seed of the noise.
    pub noise_seed: u64,
}

impl std::fmt::Display for Augmentation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "augmented winner: {}rotate {:.1}°, scale {:.3}, shift ({:.1}, {:.1}) px, brightness {:.3}, contrast \
             {:.3}, saturation {:.3}, blur σ {:.2} px, noise σ {:.2}",
            if self.flip { "flip, " } else { "" },
            self.rotate_deg,
            self.scale,
            self.shift_px.0,
            self.shift_px.1,
            self.brightness,
            self.contrast,
            self.saturation,
            self.blur_sigma,
            self.noise_std
        )
    }
}

/// Draws one augmentation of an image of `size` from `cfg`'s ranges with `seed`.
pub fn draw_augmentation(cfg: &AugmentConfig, size: (u32, u32), seed: u64) -> Augmentation {
    use rand::RngExt;
    let mut rng = stream_rng(seed, STREAM_AUGMENT, 0);
    let mut sym = |range: f32| {
        if range > 0.0 {
            rng.random_range(-range..=range)
        } else {
            0.0
        }
    };
    let rotate_deg = sym(cfg.rotate_deg);
    let (tx, ty) = (sym(cfg.translate), sym(cfg.translate));
    let brightness = 1.0 + sym(cfg.brightness);
    let contrast = 1.0 + sym(cfg.contrast);
    let saturation = 1.0 + sym(cfg.saturation);
    let flip = cfg.flip > 0.0 && rng.random_range(0.0..1.0) < cfg.flip;
    let scale = if cfg.scale_max > cfg.scale_min {
        rng.random_range(cfg.scale_min..=cfg.scale_max)
    } else {
        cfg.scale_min
    };
    let blur_sigma = if cfg.blur_sigma > 0.0 {
        rng.random_range(0.0..=cfg.blur_sigma)
    } else {
        0.0
    };
    let noise_std = if cfg.noise_std > 0.0 {
        rng.random_range(0.0..=cfg.noise_std)
    } else {
        0.0
    };
    Augmentation {
        flip,
        rotate_deg,
        scale,
        shift_px: (tx * size.0 as f32, ty * size.1 as f32),
        brightness,
        contrast,
        saturation,
        blur_sigma,
        noise_std,
        noise_seed: rng.random(),
    }
}

/// Applies `a` to `winner`: the geometric warp, then brightness, contrast and saturation, blur and noise.
pub fn augmented_loser(winner: &RgbImage, a: &Augmentation) -> RgbImage {
    use imageproc::geometric_transformations::{Border, Interpolation, Projection, warp};
    let (w, h) = winner.dimensions();
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    let flip = if a.flip {
        Projection::translate(w as f32, 0.0) * Projection::scale(-1.0, 1.0)
    } else {
        Projection::scale(1.0, 1.0)
    };
    let about_centre = Projection::translate(cx + a.shift_px.0, cy + a.shift_px.1)
        * Projection::rotate(a.rotate_deg.to_radians())
        * Projection::scale(a.scale, a.scale)
        * Projection::translate(-cx, -cy);
    let mut out = warp(winner, about_centre * flip, Interpolation::Bilinear, Border::Replicate);
    for p in out.pixels_mut() {
        let c = p.0.map(f32::from);
        let grey = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2];
        p.0 = c.map(|v| {
            let v = grey + (v - grey) * a.saturation;
            let v = 127.5 + (v - 127.5) * a.contrast;
            (v * a.brightness).round().clamp(0.0, 255.0) as u8
        });
    }
    if a.blur_sigma > 0.05 {
        out = imageproc::filter::gaussian_blur_f32(&out, a.blur_sigma);
    }
    if a.noise_std > 0.0 {
        imageproc::noise::gaussian_noise_mut(&mut out, 0.0, f64::from(a.noise_std), a.noise_seed);
    }
    out
}

/// The seed of the augmentation of the item at `dataset_index` (its manifest position) in a run seeded `run_seed`.
pub fn augment_seed(run_seed: u64, dataset_index: usize) -> u64 {
    rand::RngExt::random(&mut stream_rng(run_seed, STREAM_AUGMENT, 1 + dataset_index as u64))
}

/// Replaces each item's loser by an augmentation of its winner; returns each loser's description.
/// `dataset_indices[i]` is item `i`'s manifest position.
pub fn augment_losers(
    items: &mut [LoadedItem],
    dataset_indices: &[usize],
    cfg: &AugmentConfig,
    run_seed: u64,
) -> Vec<String> {
    items
        .iter_mut()
        .zip(dataset_indices)
        .map(|(item, &index)| {
            let a = draw_augmentation(cfg, item.winner.dimensions(), augment_seed(run_seed, index));
            item.loser = augmented_loser(&item.winner, &a);
            a.to_string()
        })
        .collect()
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

/// Samples the base (adapters off) for `item`'s prompt and references at the winner's size, with `cfg`'s steps,
/// CFG and shift and, for the rest, what the base recommends (its reference guidance).
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
        // What the config does not set (reference guidance) as the base recommends it.
        ..SampleSettings::default().recommended_by(base)
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

crate::config_enum!(
    LoserSource,
    [
        LoserSource::Dataset,
        LoserSource::Shuffled,
        LoserSource::Base,
        LoserSource::Augmented
    ]
);

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
    fn augmentations_are_seeded_within_their_ranges_and_change_the_image() {
        let cfg = AugmentConfig {
            flip: 0.5,
            ..AugmentConfig::default()
        };
        let mut flips = 0;
        for seed in 0..200 {
            let a = draw_augmentation(&cfg, (64, 48), seed);
            assert_eq!(a, draw_augmentation(&cfg, (64, 48), seed), "seeded");
            assert!(a.rotate_deg.abs() <= 8.0 && (0.9..=1.1).contains(&a.scale));
            assert!(a.shift_px.0.abs() <= 0.05 * 64.0 + 1e-4 && a.shift_px.1.abs() <= 0.05 * 48.0 + 1e-4);
            assert!((0.85..=1.15).contains(&a.brightness) && (0.7..=1.3).contains(&a.saturation));
            assert!((0.0..=1.0).contains(&a.blur_sigma) && (0.0..=8.0).contains(&a.noise_std));
            flips += usize::from(a.flip);
        }
        assert!((60..140).contains(&flips), "a flip about half the time: {flips}/200");
        assert_ne!(
            draw_augmentation(&cfg, (64, 48), 1),
            draw_augmentation(&cfg, (64, 48), 2)
        );

        // A left-to-right ramp: the identity leaves it as it is, a flip mirrors it, the default changes it.
        let ramp = RgbImage::from_fn(64, 48, |x, _| image::Rgb([(x * 4) as u8, 100, 50]));
        let identity = Augmentation {
            flip: false,
            rotate_deg: 0.0,
            scale: 1.0,
            shift_px: (0.0, 0.0),
            brightness: 1.0,
            contrast: 1.0,
            saturation: 1.0,
            blur_sigma: 0.0,
            noise_std: 0.0,
            noise_seed: 0,
        };
        assert_eq!(augmented_loser(&ramp, &identity), ramp);
        let mirrored = augmented_loser(&ramp, &Augmentation { flip: true, ..identity });
        for x in [0u32, 10, 40, 63] {
            let got = i32::from(mirrored.get_pixel(x, 20).0[0]);
            let want = i32::from(ramp.get_pixel(63 - x, 20).0[0]);
            assert!((got - want).abs() <= 4, "x {x}: {got} vs {want}");
        }
        let brighter = augmented_loser(
            &ramp,
            &Augmentation {
                brightness: 1.2,
                ..identity
            },
        );
        assert_eq!(brighter.get_pixel(10, 5).0, [48, 120, 60]);
        let a = draw_augmentation(&AugmentConfig::default(), (64, 48), 7);
        let out = augmented_loser(&ramp, &a);
        assert_eq!(out.dimensions(), ramp.dimensions());
        assert_ne!(out, ramp);
        assert_eq!(out, augmented_loser(&ramp, &a), "deterministic");
        assert!(a.to_string().starts_with("augmented winner: rotate"), "{a}");
    }

    #[test]
    fn augment_settings_are_checked() {
        assert!(AugmentConfig::default().check().is_ok());
        let bad = AugmentConfig {
            scale_min: 1.2,
            scale_max: 1.1,
            ..AugmentConfig::default()
        };
        assert_eq!(bad.check().unwrap_err().0, "data.augment.scale_max");
        let bad = AugmentConfig {
            flip: f32::NAN,
            ..AugmentConfig::default()
        };
        assert_eq!(bad.check().unwrap_err().0, "data.augment.flip");
    }

    #[test]
    fn cache_paths_are_plain_file_names() {
        let p = cache_path(Path::new("/r"), 7, "a/b c");
        assert_eq!(p, Path::new("/r/negatives/00007-a_b_c.png"));
        assert_ne!(base_negative_seed(0, 1), base_negative_seed(0, 2));
        assert_ne!(base_negative_seed(0, 1), base_negative_seed(1, 1));
    }
}
