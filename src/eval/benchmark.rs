//! The synthetic fidelity benchmark: generate for a held-out split of synthetic DIP items and score the images
//! against the references (identity similarity and verification), against the exact ground truth (the generator
//! renders the ideal target of every eval prompt: the item's winner), and as sets (Fréchet distance, CMMD).
//! Single- and multi-subject items are reported separately.
//!
//! Per generated image and subject `j`, the **subject crop** is the generated image inside the bounding box of the
//! ideal target's mask `j` (where the subject must be). Then:
//! - `identity_sim`: cosine(embed(reference_j), embed(crop_j)) with the built-in identity embedder, averaged over
//!   subjects and images (the built-in analogue of DINO / CLIP-I);
//! - `top1_identification`: each generated subject crop is identified among the references of all distinct
//!   subject identities of the split (rank-1 by cosine, built-in embedder); the fraction identified correctly;
//! - verification: genuine scores are those similarities; impostor scores compare crop_j with the references of
//!   the other eval items whose subject has a different identity → AUC, EER, FMR100, FMR1000, FDR;
//! - `psnr` / `subject_psnr`: against the ideal target, over the whole image / inside the subject masks;
//! - `fd_identity`, `cmmd_identity`: between the set of generated crops and the set of ideal crops (embedder named);
//! - `denoise`: the denoising scores of `eval::denoise` on the same items (one-step `x̂₀` fidelity at t = 0.25 /
//!   0.5 / 0.75 and the held-out preference accuracy of the winner over the loser), which need no sampling from
//!   pure noise;
//! - with user-given weights: `dino` (DINOv2 cosine, whole generated image vs each reference), `clip_i`, `clip_t`.

use std::collections::BTreeMap;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::denoise::{DenoiseScores, denoise_split};
use super::identity::{IDENTITY_EMBEDDER, IdentityEmbedder, subject_crop};
use super::metrics::{
    IDENTITY_CLASSIFIER_TEMPERATURE, Verification, cmmd, frechet_distance, identity_inception_score, psnr,
    top1_identification, verification,
};
use super::sampler::{SampleRequest, SampleSettings, sample};
use super::{EvalError, ImageEmbedder, TextEmbedder};
use crate::dip::synth::{NegativeSource, SubjectCount, SynthConfig, SynthItem, synthesize_item};
use crate::model::{Adapters, BaseModel};

/// Generator seed of the held-out eval split (pretraining uses 1, the bundled dataset 0).
pub const EVAL_SPLIT_SEED: u64 = 9_001;

/// Which items and how many images.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BenchmarkConfig {
    /// Single-subject items.
    pub single_items: usize,
    /// Multi-subject items (two or three subjects, alternating).
    pub multi_items: usize,
    /// Images per item (seeds `1000·k + s`).
    pub samples_per_item: usize,
    /// Generator seed of the split.
    pub split_seed: u64,
    /// Image side.
    pub size_px: u32,
    /// Sampler.
    pub sampler: SampleSettings,
}

impl Default for BenchmarkConfig {
    fn default() -> Self {
        Self {
            single_items: 16,
            multi_items: 16,
            samples_per_item: 2,
            split_seed: EVAL_SPLIT_SEED,
            size_px: 64,
            sampler: SampleSettings::default(),
        }
    }
}

/// Optional embedders from user-given weights.
#[derive(Default)]
pub struct ExtraEmbedders<'a> {
    /// DINOv2 (the paper's DINO score).
    pub dino: Option<&'a dyn ImageEmbedder>,
    /// CLIP image tower (CLIP-I) and text tower (CLIP-T).
    pub clip: Option<(&'a dyn ImageEmbedder, &'a dyn TextEmbedder)>,
}

/// Scores of one split (single or multi).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SplitScores {
    /// Items.
    pub items: usize,
    /// Generated images.
    pub images: usize,
    /// Mean identity similarity (built-in embedder).
    pub identity_sim: f64,
    /// Rank-1 identification of generated subjects among the split's distinct subject identities.
    #[serde(default)]
    pub top1_identification: Option<f64>,
    /// Inception-style score over the split's identity classes with the built-in identity classifier
    /// ([`identity_inception_score`]); absent in reports written before it existed.
    #[serde(default)]
    pub identity_is: Option<f64>,
    /// Identity verification of generated subjects against references.
    pub verification: Option<Verification>,
    /// Mean PSNR to the ideal target (dB).
    pub psnr: f64,
    /// Mean PSNR inside the subject masks (dB).
    pub subject_psnr: f64,
    /// Fréchet distance between generated and ideal subject crops (built-in embedder).
    pub fd_identity: Option<f64>,
    /// CMMD between generated and ideal subject crops (built-in embedder).
    pub cmmd_identity: Option<f64>,
    /// DINOv2 similarity (when weights were given).
    pub dino: Option<f64>,
    /// CLIP-I (when weights were given).
    pub clip_i: Option<f64>,
    /// CLIP-T (when weights were given).
    pub clip_t: Option<f64>,
    /// Denoising scores of the same items (`eval::denoise`); absent in reports written before they existed.
    #[serde(default)]
    pub denoise: Option<DenoiseScores>,
}

/// A whole benchmark result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchmarkReport {
    /// What was evaluated (base path, run dir).
    pub model: String,
    /// Embedder behind `identity_sim`, `fd_identity`, `cmmd_identity`.
    pub identity_embedder: String,
    /// Settings.
    pub config: BenchmarkConfig,
    /// `single` and `multi`.
    pub splits: BTreeMap<String, SplitScores>,
}

/// The held-out items of one split.
pub fn eval_items(cfg: &BenchmarkConfig, multi: bool) -> Result<Vec<SynthItem>, EvalError> {
    let n = if multi { cfg.multi_items } else { cfg.single_items };
    (0..n)
        .map(|k| {
            let subjects = match (multi, k % 2) {
                (false, _) => SubjectCount::One,
                (true, 0) => SubjectCount::Two,
                (true, _) => SubjectCount::Three,
            };
            let synth = SynthConfig {
                items: 1,
                subjects,
                size_px: cfg.size_px,
                seed: cfg.split_seed ^ u64::from(multi),
                negatives: NegativeSource::Perturbed,
            };
            synthesize_item(&synth, k).map_err(|e| EvalError::Invalid(e.to_string()))
        })
        .collect()
}

/// The union of an item's subject masks at the winner's size (255 inside any subject).
pub fn union_mask(item: &SynthItem) -> image::GrayImage {
    image::GrayImage::from_fn(item.winner.width(), item.winner.height(), |x, y| {
        let on = item
            .masks
            .iter()
            .any(|m| m.get_pixel_checked(x, y).is_some_and(|p| p.0[0] >= 128));
        image::Luma([if on { 255 } else { 0 }])
    })
}

fn subject_key(item: &SynthItem, j: usize) -> String {
    item.record.meta["subjects"][j]["key"]
        .as_str()
        .map_or_else(|| format!("{}#{j}", item.record.id), str::to_string)
}

/// Mean of `v`; NaN when empty.
pub(super) fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn mean_cos(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    mean(
        &a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(super::metrics::cosine(x, y)))
            .collect::<Vec<_>>(),
    )
}

/// Scores already generated images of a split: `images[k]` are the images of `items[k]`.
pub fn score_split(
    items: &[SynthItem],
    images: &[Vec<RgbImage>],
    extra: &ExtraEmbedders<'_>,
) -> Result<SplitScores, EvalError> {
    if items.len() != images.len() {
        return Err(EvalError::Invalid(format!(
            "{} items but {} image lists",
            items.len(),
            images.len()
        )));
    }
    let embedder = IdentityEmbedder;
    let ref_emb: Vec<Vec<Vec<f32>>> = items
        .iter()
        .map(|i| embedder.embed_images(&i.references))
        .collect::<Result<_, _>>()?;
    // The identification gallery: one reference embedding per distinct subject identity (first occurrence).
    let mut gallery_keys: Vec<String> = Vec::new();
    let mut gallery = Vec::new();
    for (item, refs) in items.iter().zip(&ref_emb) {
        for (j, r) in refs.iter().enumerate() {
            let key = subject_key(item, j);
            if !gallery_keys.contains(&key) {
                gallery_keys.push(key);
                gallery.push(r.clone());
            }
        }
    }
    let mut probes = Vec::new();
    let (mut sims, mut genuine, mut impostor) = (Vec::new(), Vec::new(), Vec::new());
    let (mut gen_crops, mut ideal_crops) = (Vec::new(), Vec::new());
    let (mut psnrs, mut subject_psnrs) = (Vec::new(), Vec::new());
    let (mut dino, mut clip_i, mut clip_t) = (Vec::new(), Vec::new(), Vec::new());
    for (k, (item, imgs)) in items.iter().zip(images).enumerate() {
        let union = union_mask(item);
        let ideal: Vec<RgbImage> = item.masks.iter().map(|m| subject_crop(&item.winner, m, 1)).collect();
        ideal_crops.extend(embedder.embed_images(&ideal)?);
        for img in imgs {
            let crops: Vec<RgbImage> = item.masks.iter().map(|m| subject_crop(img, m, 1)).collect();
            let emb = embedder.embed_images(&crops)?;
            for (j, e) in emb.iter().enumerate() {
                let s = super::metrics::cosine(&ref_emb[k][j], e);
                sims.push(f64::from(s));
                genuine.push(s);
                let key = subject_key(item, j);
                if let Some(g) = gallery_keys.iter().position(|k| *k == key) {
                    probes.push((e.clone(), g));
                }
                for (other, refs) in items.iter().zip(&ref_emb) {
                    for (jj, r) in refs.iter().enumerate() {
                        if subject_key(other, jj) != key {
                            impostor.push(super::metrics::cosine(r, e));
                        }
                    }
                }
            }
            gen_crops.extend(emb);
            if let Some(p) = psnr(img, &item.winner, None) {
                psnrs.push(p.min(100.0));
            }
            if let Some(p) = psnr(img, &item.winner, Some(&union)) {
                subject_psnrs.push(p.min(100.0));
            }
            if let Some(d) = extra.dino {
                let g = d.embed_images(std::slice::from_ref(img))?;
                let r = d.embed_images(&item.references)?;
                dino.push(mean_cos(&vec![g[0].clone(); r.len()], &r));
            }
            if let Some((ci, ct)) = extra.clip {
                let g = ci.embed_images(std::slice::from_ref(img))?;
                let r = ci.embed_images(&item.references)?;
                clip_i.push(mean_cos(&vec![g[0].clone(); r.len()], &r));
                let t = ct.embed_texts(&[item.record.prompt.as_str()])?;
                clip_t.push(mean_cos(&g, &t));
            }
        }
    }
    let opt = |v: &[f64]| if v.is_empty() { None } else { Some(mean(v)) };
    Ok(SplitScores {
        items: items.len(),
        images: images.iter().map(Vec::len).sum(),
        identity_sim: mean(&sims),
        top1_identification: top1_identification(&probes, &gallery),
        identity_is: identity_inception_score(&probes, &gallery, IDENTITY_CLASSIFIER_TEMPERATURE),
        verification: verification(&genuine, &impostor).ok(),
        psnr: mean(&psnrs),
        subject_psnr: mean(&subject_psnrs),
        fd_identity: frechet_distance(&gen_crops, &ideal_crops).ok(),
        cmmd_identity: cmmd(&gen_crops, &ideal_crops).ok(),
        dino: opt(&dino),
        clip_i: opt(&clip_i),
        clip_t: opt(&clip_t),
        denoise: None,
    })
}

/// Generates the images of a split with `base` (adapters on: an attached LoRA is used).
pub fn generate_split(
    base: &BaseModel,
    items: &[SynthItem],
    cfg: &BenchmarkConfig,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Vec<RgbImage>>, EvalError> {
    items
        .iter()
        .enumerate()
        .map(|(k, item)| {
            let seeds: Vec<u64> = (0..cfg.samples_per_item as u64).map(|s| 1000 * k as u64 + s).collect();
            let req = SampleRequest {
                prompt: &item.record.prompt,
                references: &item.references,
                size_px: item.winner.dimensions(),
            };
            let out = sample(base, &req, &cfg.sampler, &seeds, Adapters::On);
            progress(k + 1);
            out
        })
        .collect()
}

/// Generated images per split name (`single`, `multi`), per item.
pub type SplitImages = BTreeMap<String, Vec<Vec<RgbImage>>>;

/// Runs the whole benchmark on `base`: both splits, generated and scored.
pub fn run_benchmark(
    base: &BaseModel,
    model_name: &str,
    cfg: &BenchmarkConfig,
    extra: &ExtraEmbedders<'_>,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<(BenchmarkReport, SplitImages), EvalError> {
    let mut splits = BTreeMap::new();
    let mut all_images = BTreeMap::new();
    for (name, multi) in [("single", false), ("multi", true)] {
        let items = eval_items(cfg, multi)?;
        if items.is_empty() {
            continue;
        }
        let n = items.len();
        let images = generate_split(base, &items, cfg, |k| progress(name, k, n))?;
        let mut scores = score_split(&items, &images, extra)?;
        scores.denoise = Some(denoise_split(base, &items, &cfg.sampler)?);
        splits.insert(name.to_string(), scores);
        all_images.insert(name.to_string(), images);
    }
    Ok((
        BenchmarkReport {
            model: model_name.to_string(),
            identity_embedder: IDENTITY_EMBEDDER.to_string(),
            config: *cfg,
            splits,
        },
        all_images,
    ))
}

fn fmt(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "–".to_string()
    }
}

/// The report as a markdown table: one row per metric, one column per split.
pub fn report_markdown(r: &BenchmarkReport) -> String {
    let names: Vec<&String> = r.splits.keys().rev().collect();
    let mut out = format!(
        "# Synthetic benchmark: {}\n\nIdentity embedder: `{}`; {} images per item, sampler {} steps, CFG {}.\n\n| metric |",
        r.model, r.identity_embedder, r.config.samples_per_item, r.config.sampler.steps, r.config.sampler.cfg_scale
    );
    for n in &names {
        out.push_str(&format!(" {n} |"));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(names.len()));
    out.push('\n');
    type Getter = fn(&SplitScores) -> Option<f64>;
    let rows: [(&str, Getter, usize); 22] = [
        ("items / images", |s| Some(s.items as f64 * 1000.0 + s.images as f64), 0),
        ("identity similarity ↑", |s| Some(s.identity_sim), 4),
        ("top-1 identification ↑", |s| s.top1_identification, 3),
        ("identity IS ↑", |s| s.identity_is, 3),
        ("verification AUC ↑", |s| s.verification.map(|v| v.auc), 4),
        ("EER ↓", |s| s.verification.map(|v| v.eer), 4),
        ("FMR100 ↓", |s| s.verification.map(|v| v.fmr100), 4),
        ("FMR1000 ↓", |s| s.verification.map(|v| v.fmr1000), 4),
        ("FDR ↑", |s| s.verification.map(|v| v.fdr), 3),
        ("PSNR to ideal (dB) ↑", |s| Some(s.psnr), 2),
        ("subject PSNR (dB) ↑", |s| Some(s.subject_psnr), 2),
        ("FD (identity) ↓", |s| s.fd_identity, 4),
        ("CMMD (identity) ↓", |s| s.cmmd_identity, 4),
        ("DINO ↑", |s| s.dino, 4),
        ("CLIP-I ↑", |s| s.clip_i, 4),
        ("CLIP-T ↑", |s| s.clip_t, 4),
        ("denoised x̂₀ PSNR (dB) ↑", |s| s.denoise.map(|d| d.psnr), 2),
        (
            "denoised x̂₀ subject PSNR (dB) ↑",
            |s| s.denoise.map(|d| d.subject_psnr),
            2,
        ),
        (
            "held-out preference acc. ↑",
            |s| s.denoise.map(|d| d.preference_accuracy),
            3,
        ),
        (
            "held-out implicit reward ↑",
            |s| s.denoise.map(|d| d.preference_margin),
            // Rewards are ~1e-5 per element: 7 decimals keep two significant digits (5 printed "0.00000").
            7,
        ),
        (
            "held-out subject pref. acc. ↑",
            |s| {
                s.denoise
                    .map(|d| d.subject_preference_accuracy)
                    .filter(|x| x.is_finite())
            },
            3,
        ),
        (
            "held-out subject reward ↑",
            |s| s.denoise.map(|d| d.subject_preference_margin).filter(|x| x.is_finite()),
            7,
        ),
    ];
    for (label, get, digits) in rows {
        if names.iter().all(|n| r.splits.get(*n).and_then(get).is_none()) {
            continue;
        }
        out.push_str(&format!("| {label} |"));
        for n in &names {
            let cell = match (label, r.splits.get(*n)) {
                ("items / images", Some(s)) => format!("{} / {}", s.items, s.images),
                (_, Some(s)) => get(s).map_or_else(|| "–".to_string(), |v| fmt(v, digits)),
                _ => "–".to_string(),
            };
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scoring the ideal targets themselves gives perfect pixel fidelity and a clean identity separation; scoring
    /// another item's images gives clearly worse numbers (the metric can fail).
    #[test]
    fn ideal_images_score_best() -> Result<(), EvalError> {
        let cfg = BenchmarkConfig {
            single_items: 12,
            multi_items: 0,
            ..BenchmarkConfig::default()
        };
        let items = eval_items(&cfg, false)?;
        let ideal: Vec<Vec<RgbImage>> = items.iter().map(|i| vec![i.winner.clone()]).collect();
        let good = score_split(&items, &ideal, &ExtraEmbedders::default())?;
        assert_eq!(good.psnr, 100.0);
        assert_eq!(good.subject_psnr, 100.0);
        assert!(
            good.fd_identity.is_some_and(|d| d.abs() < 1e-6),
            "{:?}",
            good.fd_identity
        );
        let shifted: Vec<Vec<RgbImage>> = ideal.iter().cycle().skip(1).take(ideal.len()).cloned().collect();
        let bad = score_split(&items, &shifted, &ExtraEmbedders::default())?;
        assert!(
            good.identity_sim > bad.identity_sim + 0.1,
            "{} vs {}",
            good.identity_sim,
            bad.identity_sim
        );
        assert!(bad.psnr < 30.0);
        let g = good.verification.expect("verification");
        let b = bad.verification.expect("verification");
        assert!(g.auc > b.auc && g.eer < b.eer, "{g:?} vs {b:?}");
        let (g1, b1) = (
            good.top1_identification.expect("top-1"),
            bad.top1_identification.expect("top-1"),
        );
        assert!(g1 > 0.9 && b1 < 0.5, "top-1 {g1} vs {b1}");
        let report = BenchmarkReport {
            model: "ideal".into(),
            identity_embedder: IDENTITY_EMBEDDER.into(),
            config: cfg,
            splits: BTreeMap::from([("single".to_string(), good)]),
        };
        let md = report_markdown(&report);
        assert!(
            md.contains("| identity similarity ↑ |") && md.contains("| 12 / 12 |"),
            "{md}"
        );
        Ok(())
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        assert!(score_split(&[], &[vec![]], &ExtraEmbedders::default()).is_err());
    }
}
