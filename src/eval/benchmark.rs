//! The synthetic fidelity benchmark: generate for a held-out split of synthetic DIP items and score the images
//! against the references (identity similarity and verification), against the exact ground truth (the generator
//! renders the ideal target of every eval prompt: the item's winner), and as sets (Fréchet distance, CMMD).
//! Single- and multi-subject items are reported separately.
//!
//! Prompts name no positions, so an image sampled from noise may put a subject anywhere. Each generated image's
//! subjects are therefore **located** ([`SubjectCrop::Located`], the default): as many detections as the prompt
//! names subjects, found identity-agnostically (the windows of [`WindowSearch`] most like any identity of the split,
//! with non-maximum suppression), then every reference is scored against those detections only (its best one) —
//! the detect-then-score of multi-subject papers (Grounding-DINO crops, then DINO). [`SubjectCrop::IdealBox`] is
//! the older crop at the ideal target's box of subject `j`, for images that were told where their subjects go. Then:
//! - `identity_sim`: cosine(embed(reference_j), embed(subject j's detection)) with the built-in identity embedder,
//!   averaged over subjects and images (the built-in analogue of DINO / CLIP-I);
//! - `top1_identification`: each subject is identified among the references of all distinct subject identities of
//!   the split, less the item's other subjects when located (rank-1 by cosine); the fraction identified correctly;
//! - verification: genuine scores are those similarities; impostor scores are the same image scored against the
//!   references of identities that are not in the item (located) or not subject `j` (ideal box) → AUC, EER,
//!   FMR100, FMR1000, FDR;
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
use super::identity::{
    IDENTITY_EMBEDDER, IdentityEmbedder, WindowSearch, identity_descriptor, shape_mask, shape_similarity, subject_crop,
};
use super::metrics::{
    IDENTITY_CLASSIFIER_TEMPERATURE, Verification, cmmd, cosine, frechet_distance, identity_inception_score, psnr,
    top1_identification, verification,
};
use super::sampler::{InitImage, SampleRequest, SampleSettings, SamplerChoices, sample_from};
use super::{EvalError, ImageEmbedder, TextEmbedder};
use crate::dip::synth::{NegativeSource, SubjectCount, SynthConfig, SynthItem, scale_range, synthesize_item};
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
    /// Sampler: what is chosen here, then what the base recommends, then the sampler's defaults (the settings
    /// used are [`BenchmarkReport::sampler`]).
    pub sampler: SamplerChoices,
    /// Where a subject is looked for in a generated image. Reports written before this existed used the ideal box.
    #[serde(default = "SubjectCrop::ideal_box")]
    pub crop: SubjectCrop,
    /// Start each item's images from its ideal target noised to this img2img strength ([`InitImage`]) instead of
    /// pure noise: how much of a subject the base keeps from that noise level on (`None`, the default: generation
    /// from noise, the benchmark proper).
    #[serde(default)]
    pub from_ideal: Option<f32>,
}

/// Where a subject's crop is taken in a generated image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SubjectCrop {
    /// Searched for ([`WindowSearch`]): as many detections as the prompt names subjects, identity-agnostically,
    /// and every reference, genuine or impostor, scored against them. Prompts name no positions, so an image
    /// sampled from noise puts its subjects anywhere.
    #[default]
    Located,
    /// The ideal target's bounding box of the subject (grown by 1 px): only meaningful when the generator was told
    /// where the subjects go, e.g. a denoised ideal target.
    IdealBox,
}

crate::config_enum!(SubjectCrop, [SubjectCrop::Located, SubjectCrop::IdealBox]);

impl SubjectCrop {
    fn ideal_box() -> Self {
        Self::IdealBox
    }
}

impl Default for BenchmarkConfig {
    fn default() -> Self {
        Self {
            single_items: 16,
            multi_items: 16,
            samples_per_item: 2,
            split_seed: EVAL_SPLIT_SEED,
            size_px: 64,
            sampler: SamplerChoices::default(),
            crop: SubjectCrop::default(),
            from_ideal: None,
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
    /// Mean silhouette similarity ([`shape_similarity`]) of each subject's reference and what was found of it
    /// (where `identity_sim` looked): whether a subject has its shape, not only its colours and pattern; absent in
    /// reports written before it existed.
    #[serde(default)]
    pub silhouette_sim: Option<f64>,
    /// Rank-1 identification of each generated subject's *shape* (one of the generator's 15) by its silhouette
    /// alone, among one reference per shape of the split: chance is one over the split's shapes. A blob in the
    /// right colours scores well on `identity_sim`, `verification` and `top1_identification` (the descriptor
    /// weighs the palette most) and only by luck here.
    #[serde(default)]
    pub shape_top1: Option<f64>,
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
    /// Settings, as asked.
    pub config: BenchmarkConfig,
    /// The sampler settings used: `config.sampler` resolved against the model (`None` in reports written before
    /// the two were apart, whose `config.sampler` names every setting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler: Option<SampleSettings>,
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

/// Subject `j`'s shape key (`"fish"`), or its identity key where the item does not say.
fn shape_key(item: &SynthItem, j: usize) -> String {
    item.record.meta["subjects"][j]["shape"]
        .as_str()
        .map_or_else(|| subject_key(item, j), str::to_string)
}

fn subject_key(item: &SynthItem, j: usize) -> String {
    item.record.meta["subjects"][j]["key"]
        .as_str()
        .map_or_else(|| format!("{}#{j}", item.record.id), str::to_string)
}

/// The window sides searched for `n` subjects in an image of side `size`: the generator's subject scales for `n`,
/// from 0.9 × the smallest to the largest plus 2 px of background on each side.
fn window_sides(n: usize, size: u32) -> (f64, f64) {
    let (lo, hi) = scale_range(n, size);
    (0.9 * lo, hi + 4.0 / f64::from(size.max(1)))
}

/// Detections may overlap up to this intersection-over-union (the generator keeps subjects' centres apart, but
/// their squares may overlap).
const DETECTION_MAX_IOU: f64 = 0.3;

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

/// Scores already generated images of a split: `images[k]` are the images of `items[k]`; `crop` says where each
/// subject is looked for.
pub fn score_split(
    items: &[SynthItem],
    images: &[Vec<RgbImage>],
    crop: SubjectCrop,
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
    // Every reference of the split with its identity, and the identification gallery: one reference per distinct
    // subject identity (first occurrence), as indices into that list.
    let all_refs: Vec<(String, &[f32])> = items
        .iter()
        .zip(&ref_emb)
        .flat_map(|(item, refs)| {
            refs.iter()
                .enumerate()
                .map(move |(j, r)| (subject_key(item, j), r.as_slice()))
        })
        .collect();
    let offsets: Vec<usize> = ref_emb
        .iter()
        .scan(0, |next, refs| {
            let first = *next;
            *next += refs.len();
            Some(first)
        })
        .collect();
    let mut gallery: Vec<usize> = Vec::new();
    for (i, (key, _)) in all_refs.iter().enumerate() {
        if !gallery.iter().any(|&g| all_refs[g].0 == *key) {
            gallery.push(i);
        }
    }
    // Each reference's silhouette, and the shape gallery: one reference per distinct shape, as (shape, silhouette).
    let ref_shapes: Vec<Vec<Vec<f32>>> = items
        .iter()
        .map(|i| i.references.iter().map(shape_mask).collect())
        .collect();
    let mut shape_gallery: Vec<(String, &[f32])> = Vec::new();
    for (item, shapes) in items.iter().zip(&ref_shapes) {
        for (j, m) in shapes.iter().enumerate() {
            let shape = shape_key(item, j);
            if !shape_gallery.iter().any(|(s, _)| *s == shape) {
                shape_gallery.push((shape, m));
            }
        }
    }
    // The located detector's queries: the whole gallery (identity-agnostic).
    let queries: Vec<&[f32]> = gallery.iter().map(|&g| all_refs[g].1).collect();
    let (mut rows, mut sims, mut genuine, mut impostor) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut shape_sims, mut shape_hits) = (Vec::new(), Vec::new());
    let (mut gen_crops, mut ideal_crops) = (Vec::new(), Vec::new());
    let (mut psnrs, mut subject_psnrs) = (Vec::new(), Vec::new());
    let (mut dino, mut clip_i, mut clip_t) = (Vec::new(), Vec::new(), Vec::new());
    for (k, (item, imgs)) in items.iter().zip(images).enumerate() {
        let union = union_mask(item);
        let ideal: Vec<RgbImage> = item.masks.iter().map(|m| subject_crop(&item.winner, m, 1)).collect();
        ideal_crops.extend(embedder.embed_images(&ideal)?);
        let keys: Vec<String> = (0..item.references.len()).map(|j| subject_key(item, j)).collect();
        for img in imgs {
            // Per subject: its descriptor in the image, the image's score against every reference, and the silhouette
            // of what was found.
            let subjects: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = match crop {
                SubjectCrop::IdealBox => {
                    let crops: Vec<RgbImage> = item.masks.iter().map(|m| subject_crop(img, m, 1)).collect();
                    embedder
                        .embed_images(&crops)?
                        .into_iter()
                        .zip(&crops)
                        .map(|(e, c)| {
                            let scores = all_refs.iter().map(|(_, r)| cosine(r, &e)).collect();
                            (e, scores, shape_mask(c))
                        })
                        .collect()
                }
                SubjectCrop::Located => {
                    // Detect as many subjects as the prompt names, identity-agnostically (the windows most like
                    // any identity of the split), then score every reference against those detections only.
                    let search = WindowSearch::new(img, window_sides(keys.len(), img.width().min(img.height())));
                    let found: Vec<(usize, &[f32])> = search
                        .detect(&queries, keys.len(), DETECTION_MAX_IOU)
                        .into_iter()
                        .filter_map(|w| Some((w, search.descriptor(w)?)))
                        .collect();
                    let best = |r: &[f32]| {
                        found
                            .iter()
                            .map(|&(w, d)| (cosine(r, d), d, w))
                            .max_by(|a, b| a.0.total_cmp(&b.0))
                    };
                    let scores: Vec<f32> = all_refs
                        .iter()
                        .map(|(_, r)| best(r).map_or(f32::NEG_INFINITY, |b| b.0))
                        .collect();
                    (0..keys.len())
                        .map(|j| match best(&ref_emb[k][j]) {
                            Some((_, d, w)) => {
                                let [x, y, side] = search.windows[w];
                                let window = image::imageops::crop_imm(img, x, y, side, side).to_image();
                                (d.to_vec(), scores.clone(), shape_mask(&window))
                            }
                            None => (identity_descriptor(img), scores.clone(), shape_mask(img)),
                        })
                        .collect()
                }
            };
            for (j, (found, scores, silhouette)) in subjects.into_iter().enumerate() {
                let s = scores[offsets[k] + j];
                sims.push(f64::from(s));
                genuine.push(s);
                // The silhouette of what was found (where the identity detector put subject j) against the
                // subject's own reference, and which shape of the split it is most like.
                shape_sims.push(f64::from(shape_similarity(&ref_shapes[k][j], &silhouette)));
                let nearest = shape_gallery
                    .iter()
                    .map(|(shape, r)| (shape_similarity(r, &silhouette), shape))
                    .max_by(|a, b| a.0.total_cmp(&b.0));
                shape_hits.push(nearest.is_some_and(|(_, shape)| *shape == shape_key(item, j)));
                // Impostors: references of identities other than this subject's (ideal box) or than any subject of
                // the item (located: a co-present subject is rightly found anywhere in the image).
                for ((key, _), &score) in all_refs.iter().zip(&scores) {
                    let other = match crop {
                        SubjectCrop::IdealBox => *key != keys[j],
                        SubjectCrop::Located => !keys.contains(key),
                    };
                    if other {
                        impostor.push(score);
                    }
                }
                if let Some(truth) = gallery.iter().position(|&g| all_refs[g].0 == keys[j]) {
                    let row = gallery
                        .iter()
                        .map(|&g| {
                            let key = &all_refs[g].0;
                            let excluded = crop == SubjectCrop::Located && *key != keys[j] && keys.contains(key);
                            if excluded { f32::NEG_INFINITY } else { scores[g] }
                        })
                        .collect();
                    rows.push((row, truth));
                }
                gen_crops.push(found);
            }
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
        top1_identification: top1_identification(&rows),
        identity_is: identity_inception_score(&rows, IDENTITY_CLASSIFIER_TEMPERATURE),
        verification: verification(&genuine, &impostor).ok(),
        silhouette_sim: opt(&shape_sims),
        shape_top1: opt(&shape_hits.iter().map(|&h| f64::from(u8::from(h))).collect::<Vec<_>>()),
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
    let settings = cfg.sampler.resolve(base);
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
            let init = cfg.from_ideal.map(|strength| InitImage {
                image: &item.winner,
                strength,
            });
            // Progress counts items done: a failed item ends the split with its error, not another tick.
            let out = sample_from(base, &req, &settings, &seeds, Adapters::On, init)?;
            progress(k + 1);
            Ok(out)
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
    let sampler = cfg.sampler.resolve(base);
    sampler.validate()?;
    let mut splits = BTreeMap::new();
    let mut all_images = BTreeMap::new();
    for (name, multi) in [("single", false), ("multi", true)] {
        let items = eval_items(cfg, multi)?;
        if items.is_empty() {
            continue;
        }
        let n = items.len();
        let images = generate_split(base, &items, cfg, |k| progress(name, k, n))?;
        let mut scores = score_split(&items, &images, cfg.crop, extra)?;
        scores.denoise = Some(denoise_split(base, &items, &sampler)?);
        splits.insert(name.to_string(), scores);
        all_images.insert(name.to_string(), images);
    }
    Ok((
        BenchmarkReport {
            model: model_name.to_string(),
            identity_embedder: IDENTITY_EMBEDDER.to_string(),
            config: *cfg,
            sampler: Some(sampler),
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

/// `", {name} {value}"` for a sampler setting away from its off value, else nothing (the report's header names
/// only what was turned on).
fn unless_default(name: &str, value: f32, off: f32) -> String {
    if value == off {
        String::new()
    } else {
        format!(", {name} {value}")
    }
}

/// The report as a markdown table: one row per metric, one column per split.
pub fn report_markdown(r: &BenchmarkReport) -> String {
    let sampler = r
        .sampler
        .unwrap_or_else(|| r.config.sampler.over(SampleSettings::default()));
    let names: Vec<&String> = r.splits.keys().rev().collect();
    let mut out = format!(
        "# Synthetic benchmark: {}\n\nIdentity embedder: `{}`, subjects {}; {} images per item{}, sampler {} steps, CFG {}{}{}{}.\n\n| metric |",
        r.model,
        r.identity_embedder,
        match r.config.crop {
            SubjectCrop::Located => "located in each image (window search)",
            SubjectCrop::IdealBox => "cropped at the ideal target's boxes",
        },
        r.config.samples_per_item,
        r.config.from_ideal.map_or_else(String::new, |s| format!(
            " **from the ideal target at img2img strength {s}**"
        )),
        sampler.steps,
        sampler.cfg_scale,
        unless_default("reference CFG", sampler.reference_cfg_scale, 1.0),
        unless_default("shift", sampler.shift, 1.0),
        unless_default("stochasticity", sampler.stochasticity, 0.0),
    );
    for n in &names {
        out.push_str(&format!(" {n} |"));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(names.len()));
    out.push('\n');
    type Getter = fn(&SplitScores) -> Option<f64>;
    let rows: [(&str, Getter, usize); 24] = [
        ("items / images", |s| Some(s.items as f64 * 1000.0 + s.images as f64), 0),
        ("identity similarity ↑", |s| Some(s.identity_sim), 4),
        ("top-1 identification ↑", |s| s.top1_identification, 3),
        ("identity IS ↑", |s| s.identity_is, 3),
        ("verification AUC ↑", |s| s.verification.map(|v| v.auc), 4),
        ("silhouette similarity ↑", |s| s.silhouette_sim, 4),
        ("shape top-1 ↑", |s| s.shape_top1, 3),
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
    use crate::config_enum::ConfigEnum;
    use crate::dip::synth::{PlacedSubject, Scene, render_scene};

    fn score(items: &[SynthItem], images: &[Vec<RgbImage>], crop: SubjectCrop) -> SplitScores {
        score_split(items, images, crop, &ExtraEmbedders::default()).expect("score")
    }

    /// A split's config, its items and one image list per item.
    type Split = (BenchmarkConfig, Vec<SynthItem>, Vec<Vec<RgbImage>>);

    /// The first `n` single-subject items of the held-out split, with their ideal targets as each one's image.
    fn single_split(n: usize) -> Result<Split, EvalError> {
        let cfg = BenchmarkConfig {
            single_items: n,
            multi_items: 0,
            ..BenchmarkConfig::default()
        };
        let items = eval_items(&cfg, false)?;
        let ideal = items.iter().map(|i| vec![i.winner.clone()]).collect();
        Ok((cfg, items, ideal))
    }

    /// Scoring the ideal targets themselves gives perfect pixel fidelity and a clean identity separation; scoring
    /// another item's images gives clearly worse numbers (the metric can fail). Both crop modes.
    #[test]
    fn ideal_images_score_best() -> Result<(), EvalError> {
        let (cfg, items, ideal) = single_split(12)?;
        let shifted: Vec<Vec<RgbImage>> = ideal.iter().cycle().skip(1).take(ideal.len()).cloned().collect();
        for crop in SubjectCrop::ALL.iter().copied() {
            let good = score(&items, &ideal, crop);
            assert_eq!(good.psnr, 100.0);
            assert_eq!(good.subject_psnr, 100.0);
            let bad = score(&items, &shifted, crop);
            assert!(
                good.identity_sim > bad.identity_sim + 0.1,
                "{crop:?}: {} vs {}",
                good.identity_sim,
                bad.identity_sim
            );
            assert!(bad.psnr < 30.0);
            let g = good.verification.expect("verification");
            let b = bad.verification.expect("verification");
            assert!(
                g.auc > 0.9 && g.auc > b.auc && g.eer < b.eer,
                "{crop:?}: {g:?} vs {b:?}"
            );
            let (g1, b1) = (
                good.top1_identification.expect("top-1"),
                bad.top1_identification.expect("top-1"),
            );
            // Located subjects are found by a window search whose squares only approximate the silhouette's box.
            assert!(g1 > 0.75 && b1 < 0.3, "{crop:?}: top-1 {g1} vs {b1}");
        }
        // At the ideal box, the ideal crops are the ideal crops: FD 0.
        let good = score(&items, &ideal, SubjectCrop::IdealBox);
        assert!(
            good.fd_identity.is_some_and(|d| d.abs() < 1e-6),
            "{:?}",
            good.fd_identity
        );
        let report = BenchmarkReport {
            model: "ideal".into(),
            identity_embedder: IDENTITY_EMBEDDER.into(),
            config: cfg,
            sampler: None,
            splits: BTreeMap::from([("single".to_string(), good)]),
        };
        let md = report_markdown(&report);
        assert!(
            md.contains("| identity similarity ↑ |") && md.contains("| 12 / 12 |") && md.contains("located"),
            "{md}"
        );
        Ok(())
    }

    /// The ideal target with each subject replaced by a disc inside its box painted with the subject's own pixels
    /// (cyclically, row by row) over the scene's background: its palette and much of its pattern, none of its
    /// silhouette.
    fn blobs(item: &SynthItem) -> RgbImage {
        let mut img = redraw(item, None);
        for mask in &item.masks {
            let Some((x0, y0, x1, y1)) = crate::eval::identity::mask_bbox(mask, 0) else {
                continue;
            };
            let pixels: Vec<image::Rgb<u8>> = mask
                .enumerate_pixels()
                .filter(|(_, _, m)| m.0[0] > 0)
                .map(|(x, y, _)| *item.winner.get_pixel(x, y))
                .collect();
            let (cx, cy) = (f64::from(x0 + x1) / 2.0, f64::from(y0 + y1) / 2.0);
            let r = f64::from((x1 - x0).max(y1 - y0)) / 2.0 + 0.5;
            let inside = (y0..=y1)
                .flat_map(|y| (x0..=x1).map(move |x| (x, y)))
                .filter(|&(x, y)| (f64::from(x) - cx).powi(2) + (f64::from(y) - cy).powi(2) <= r * r);
            for ((x, y), p) in inside.zip(pixels.iter().cycle()) {
                img.put_pixel(x, y, *p);
            }
        }
        img
    }

    /// The silhouette scores separate a subject from a blob in its colours, which the whole descriptor rates close
    /// to the subject: with every subject of the ideal targets replaced by such a blob the identity scores stay
    /// high while the shape identification falls to chance.
    #[test]
    fn silhouette_scores_tell_subjects_from_blobs_in_their_colours() -> Result<(), EvalError> {
        let (_, items, ideal) = single_split(16)?;
        let blobbed: Vec<Vec<RgbImage>> = items.iter().map(|i| vec![blobs(i)]).collect();
        let good = score(&items, &ideal, SubjectCrop::Located);
        let blob = score(&items, &blobbed, SubjectCrop::Located);
        let auc = |s: &SplitScores| s.verification.expect("verification").auc;
        let top1 = |s: &SplitScores| s.top1_identification.expect("top-1");
        let (gs, bs) = (good.shape_top1.expect("shape"), blob.shape_top1.expect("shape"));
        eprintln!(
            "ideal: AUC {:.3} top-1 {:.3} shape top-1 {gs:.3} silhouette {:?}; blobs: AUC {:.3} top-1 {:.3} \
             shape top-1 {bs:.3} silhouette {:?}",
            auc(&good),
            top1(&good),
            good.silhouette_sim,
            auc(&blob),
            top1(&blob),
            blob.silhouette_sim
        );
        // Measured: ideal AUC 0.960, top-1 0.688, shape top-1 0.438 (its ceiling: located windows and patterned
        // subjects blur the silhouette); blobs AUC 0.912, top-1 0.625 — the identity bar of a "generating" base
        // passed by discs — and shape top-1 0.125, chance for the split's ~12 shapes.
        assert!(auc(&good) > 0.9 && gs > 0.35, "{good:?}");
        assert!(
            auc(&blob) > 0.8,
            "the blobs are a hard case for the identity scores: {blob:?}"
        );
        assert!(bs < 0.25 && bs < gs - 0.2, "{blob:?}");
        assert!(good.silhouette_sim > blob.silhouette_sim);
        Ok(())
    }

    /// The scene of `item` redrawn with its subjects moved by `f` (`None` removes them all).
    fn redraw(item: &SynthItem, f: Option<fn(&mut PlacedSubject)>) -> RgbImage {
        let mut scene = Scene::from_meta(&item.record.meta).expect("synthetic items carry their scene");
        match f {
            Some(f) => scene.subjects.iter_mut().for_each(f),
            None => scene.subjects.clear(),
        }
        render_scene(&scene, item.winner.width()).0
    }

    /// Located subjects are found wherever the image puts them: the ideal scenes with every subject moved keep
    /// their identity scores when located and lose them at the ideal boxes; the same backgrounds without subjects
    /// are at chance either way. Single- and multi-subject.
    #[test]
    fn located_subjects_are_found_anywhere_and_empty_scenes_are_chance() -> Result<(), EvalError> {
        let cfg = BenchmarkConfig {
            single_items: 10,
            multi_items: 10,
            ..BenchmarkConfig::default()
        };
        for multi in [false, true] {
            let items = eval_items(&cfg, multi)?;
            // Mirror each subject's position through the image centre (the descriptor is mirror-invariant anyway).
            let moved: Vec<Vec<RgbImage>> = items
                .iter()
                .map(|i| {
                    vec![redraw(
                        i,
                        Some(|s: &mut PlacedSubject| s.centre = [1.0 - s.centre[1], 1.0 - s.centre[0]]),
                    )]
                })
                .collect();
            let empty: Vec<Vec<RgbImage>> = items.iter().map(|i| vec![redraw(i, None)]).collect();
            let located = score(&items, &moved, SubjectCrop::Located);
            let boxed = score(&items, &moved, SubjectCrop::IdealBox);
            let nothing = score(&items, &empty, SubjectCrop::Located);
            let auc = |s: &SplitScores| s.verification.expect("verification").auc;
            let top1 = |s: &SplitScores| s.top1_identification.expect("top-1");
            eprintln!(
                "multi {multi}: moved located AUC {:.3} top-1 {:.3}; at ideal boxes AUC {:.3} top-1 {:.3}; \
                 no subjects AUC {:.3} top-1 {:.3}",
                auc(&located),
                top1(&located),
                auc(&boxed),
                top1(&boxed),
                auc(&nothing),
                top1(&nothing)
            );
            // Chance top-1 is about one in the number of identities of the split (10 single, ~25 multi).
            let (min_auc, min_top1) = if multi { (0.8, 0.3) } else { (0.95, 0.8) };
            assert!(auc(&located) > min_auc && top1(&located) > min_top1, "{located:?}");
            assert!(auc(&located) > auc(&boxed) + 0.1 && top1(&located) > top1(&boxed) + 0.15);
            assert!(
                (auc(&nothing) - 0.5).abs() < 0.1 && top1(&nothing) < 0.15,
                "{nothing:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        assert!(score_split(&[], &[vec![]], SubjectCrop::Located, &ExtraEmbedders::default()).is_err());
    }
}
