//! The paper's benchmark (Tables 1–2): DreamBench prompts in UNO's JSON format, images generated with fixed seeds
//! on any backbone, scored with DINO, CLIP-I and CLIP-T per prompt set.
//!
//! UNO's files (`datasets/dreambench_singleip.json`, `datasets/dreambench_multiip.json`) are JSON lists of
//! `{"prompt": "...", "image_paths": ["./dreambooth/dataset/backpack/02.jpg", ...]}`, the paths relative to the
//! JSON's folder (UNO's `inference.py`). For every entry, `samples` images are generated with seeds
//! `seed, seed + 1, …` (the same for every entry) and saved as `<entry>_<sample>.png`, as UNO's inference does.
//! Per image: DINO = mean over the entry's references of the cosine between the DINOv2 embeddings of the image and
//! the reference; CLIP-I the same with CLIP's image features; CLIP-T = the cosine between the image's and the
//! prompt's CLIP features. A set's score is the mean over its images.

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::EvalError;
use super::benchmark::ExtraEmbedders;
use super::metrics::cosine;
use super::sampler::{SampleRequest, SampleSettings, sample};
use crate::model::{Adapters, BaseModel};

/// One entry of a DreamBench file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DreamBenchEntry {
    /// The prompt.
    pub prompt: String,
    /// The reference images, relative to the JSON's folder (one per subject).
    pub image_paths: Vec<String>,
}

/// A DreamBench file with its references loaded.
#[derive(Clone, Debug)]
pub struct DreamBenchSet {
    /// The set's name (the file stem: `dreambench_singleip`).
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// Entries with their reference images.
    pub entries: Vec<(DreamBenchEntry, Vec<RgbImage>)>,
}

/// Reads a DreamBench JSON and its reference images (at most `limit` entries, from the start). Errors name the
/// file, the entry and the field or image.
pub fn read_dreambench(path: &Path, limit: Option<usize>) -> Result<DreamBenchSet, EvalError> {
    let err = |message: String| EvalError::Weights {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let entries: Vec<DreamBenchEntry> = serde_json::from_str(&text).map_err(|e| {
        err(format!(
            "not a DreamBench file (a JSON list of {{\"prompt\", \"image_paths\"}}): {e}"
        ))
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut loaded = Vec::new();
    for (i, entry) in entries.into_iter().take(limit.unwrap_or(usize::MAX)).enumerate() {
        if entry.image_paths.is_empty() {
            return Err(err(format!("entry {i} (\"{}\"): image_paths is empty", entry.prompt)));
        }
        let refs = entry
            .image_paths
            .iter()
            .map(|p| {
                let file = dir.join(p);
                image::open(&file)
                    .map(|img| img.to_rgb8())
                    .map_err(|e| err(format!("entry {i}: image_paths `{p}` ({}): {e}", file.display())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        loaded.push((entry, refs));
    }
    if loaded.is_empty() {
        return Err(err("no entry".into()));
    }
    Ok(DreamBenchSet {
        name: path
            .file_stem()
            .map_or_else(|| "dreambench".into(), |s| s.to_string_lossy().into_owned()),
        path: path.to_path_buf(),
        entries: loaded,
    })
}

/// How a set is generated.
#[derive(Clone, Debug)]
pub struct DreamBenchConfig {
    /// Images per entry.
    pub samples: usize,
    /// Seed of the first image of every entry (the others: `seed + 1`, …). UNO's inference uses 3407.
    pub seed: u64,
    /// Side of the generated square images in pixels (UNO: 512).
    pub size_px: u32,
    /// The sampler.
    pub sampler: SampleSettings,
}

/// The scores of one set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DreamBenchScores {
    /// The set's name.
    pub set: String,
    /// Entries generated.
    pub prompts: usize,
    /// Images generated.
    pub images: usize,
    /// Mean DINO (when DINOv2 weights were given).
    pub dino: Option<f64>,
    /// Mean CLIP-I (when CLIP weights were given).
    pub clip_i: Option<f64>,
    /// Mean CLIP-T (when CLIP weights were given).
    pub clip_t: Option<f64>,
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Mean cosine of `image` with each of `refs`.
fn mean_cos_to(image: &[f32], refs: &[Vec<f32>]) -> f64 {
    refs.iter().map(|r| f64::from(cosine(image, r))).sum::<f64>() / refs.len().max(1) as f64
}

/// Generates and scores `set` on `base` (adapters as given). Images are saved under `images_dir` when given
/// (`<entry>_<sample>.png`); `progress(done, total)` is called after each entry.
pub fn run_dreambench(
    base: &BaseModel,
    set: &DreamBenchSet,
    cfg: &DreamBenchConfig,
    extra: &ExtraEmbedders<'_>,
    adapters: Adapters,
    images_dir: Option<&Path>,
    mut progress: impl FnMut(usize, usize),
) -> Result<DreamBenchScores, EvalError> {
    if cfg.samples == 0 {
        return Err(EvalError::Invalid(
            "DreamBench needs at least one sample per prompt".into(),
        ));
    }
    if let Some(dir) = images_dir {
        std::fs::create_dir_all(dir).map_err(|e| EvalError::Weights {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    let seeds: Vec<u64> = (0..cfg.samples as u64).map(|k| cfg.seed + k).collect();
    let (mut dino, mut clip_i, mut clip_t) = (Vec::new(), Vec::new(), Vec::new());
    let mut images = 0;
    for (i, (entry, refs)) in set.entries.iter().enumerate() {
        let request = SampleRequest {
            prompt: &entry.prompt,
            references: refs,
            size_px: (cfg.size_px, cfg.size_px),
        };
        let generated = sample(base, &request, &cfg.sampler, &seeds, adapters)?;
        images += generated.len();
        if let Some(dir) = images_dir {
            for (j, img) in generated.iter().enumerate() {
                let path = dir.join(format!("{i}_{j}.png"));
                img.save(&path).map_err(|e| EvalError::Weights {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            }
        }
        if let Some(d) = extra.dino {
            let r = d.embed_images(refs)?;
            dino.extend(d.embed_images(&generated)?.iter().map(|g| mean_cos_to(g, &r)));
        }
        if let Some((ci, ct)) = extra.clip {
            let r = ci.embed_images(refs)?;
            let g = ci.embed_images(&generated)?;
            clip_i.extend(g.iter().map(|e| mean_cos_to(e, &r)));
            let t = ct.embed_texts(&[entry.prompt.as_str()])?;
            clip_t.extend(g.iter().map(|e| mean_cos_to(e, &t)));
        }
        progress(i + 1, set.entries.len());
    }
    Ok(DreamBenchScores {
        set: set.name.clone(),
        prompts: set.entries.len(),
        images,
        dino: mean(&dino),
        clip_i: mean(&clip_i),
        clip_t: mean(&clip_t),
    })
}

/// The sets as one Markdown table, like the paper's Tables 1–2 (one row per set; `–` where no weights were given).
pub fn dreambench_markdown(model: &str, scores: &[DreamBenchScores]) -> String {
    let cell = |v: Option<f64>| v.map_or_else(|| "–".to_string(), |v| format!("{v:.4}"));
    let mut out = format!("# DreamBench: {model}\n\n| set | prompts | images | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for s in scores {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            s.set,
            s.prompts,
            s.images,
            cell(s.dino),
            cell(s.clip_i),
            cell(s.clip_t)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{ImageEmbedder, TextEmbedder};

    /// Embeds an image as its mean colour and a text as a fixed vector: hand-computable cosines.
    struct MeanColour;
    impl ImageEmbedder for MeanColour {
        fn name(&self) -> String {
            "mean-colour".into()
        }
        fn embed_images(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>, EvalError> {
            Ok(images
                .iter()
                .map(|img| {
                    let n = (img.width() * img.height()) as f32;
                    (0..3)
                        .map(|c| img.pixels().map(|p| f32::from(p.0[c])).sum::<f32>() / n + 1.0)
                        .collect()
                })
                .collect())
        }
    }
    impl TextEmbedder for MeanColour {
        fn name(&self) -> String {
            "fixed".into()
        }
        fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EvalError> {
            Ok(texts.iter().map(|_| vec![1.0, 0.0, 0.0]).collect())
        }
    }

    fn write_set(dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir.join("refs")).expect("mkdir");
        RgbImage::from_pixel(20, 20, image::Rgb([255, 0, 0]))
            .save(dir.join("refs/red.png"))
            .expect("png");
        RgbImage::from_pixel(24, 16, image::Rgb([0, 0, 255]))
            .save(dir.join("refs/blue.png"))
            .expect("png");
        let path = dir.join("dreambench_multiip.json");
        std::fs::write(
            &path,
            r#"[{"prompt": "a red cat", "image_paths": ["./refs/red.png"]},
                {"prompt": "a red cat and a blue dog", "image_paths": ["refs/red.png", "refs/blue.png"]}]"#,
        )
        .expect("json");
        path
    }

    #[test]
    fn unos_json_reads_relative_to_its_folder_and_bad_entries_are_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = write_set(dir.path());
        let set = read_dreambench(&path, None).expect("reads");
        assert_eq!(set.name, "dreambench_multiip");
        assert_eq!(set.entries.len(), 2);
        assert_eq!(set.entries[1].1.len(), 2);
        assert_eq!(read_dreambench(&path, Some(1)).expect("limit").entries.len(), 1);
        std::fs::write(&path, r#"[{"prompt": "x", "image_paths": ["refs/none.png"]}]"#).expect("json");
        let e = read_dreambench(&path, None).expect_err("missing image").to_string();
        assert!(e.contains("entry 0") && e.contains("refs/none.png"), "{e}");
        std::fs::write(&path, r#"[{"prompt": "x", "images": []}]"#).expect("json");
        let e = read_dreambench(&path, None).expect_err("field").to_string();
        assert!(e.contains("dreambench_multiip.json") && e.contains("images"), "{e}");
    }

    #[test]
    fn scores_are_the_mean_cosines_to_the_references_and_the_prompt() {
        let dir = tempfile::tempdir().expect("tmp");
        let set = read_dreambench(&write_set(dir.path()), None).expect("reads");
        let base = BaseModel::load(&crate::model::BaseSource::Random(0), &candle_core::Device::Cpu).expect("base");
        let cfg = DreamBenchConfig {
            samples: 2,
            seed: 3407,
            size_px: 32,
            sampler: SampleSettings {
                steps: 2,
                ..SampleSettings::default()
            },
        };
        let emb = MeanColour;
        let extra = ExtraEmbedders {
            dino: Some(&emb),
            clip: Some((&emb, &emb)),
        };
        let out = dir.path().join("images");
        let mut calls = 0;
        let scores =
            run_dreambench(&base, &set, &cfg, &extra, Adapters::On, Some(&out), |_, _| calls += 1).expect("runs");
        assert_eq!((scores.prompts, scores.images, calls), (2, 4, 2));
        assert!(out.join("1_1.png").is_file());
        // Recompute by hand from the saved images.
        let refs = |i: usize| emb.embed_images(&set.entries[i].1).expect("refs");
        let mut want_i = Vec::new();
        let mut want_t = Vec::new();
        for i in 0..2 {
            for j in 0..2 {
                let img = image::open(out.join(format!("{i}_{j}.png"))).expect("png").to_rgb8();
                let g = &emb.embed_images(&[img]).expect("emb")[0];
                want_i.push(mean_cos_to(g, &refs(i)));
                want_t.push(f64::from(cosine(g, &[1.0, 0.0, 0.0])));
            }
        }
        let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        assert!((scores.clip_i.expect("clip-i") - avg(&want_i)).abs() < 1e-6);
        assert_eq!(scores.dino, scores.clip_i);
        assert!((scores.clip_t.expect("clip-t") - avg(&want_t)).abs() < 1e-6);
        let md = dreambench_markdown("base random:0", &[scores]);
        assert!(md.contains("| dreambench_multiip | 2 | 4 |"), "{md}");
    }
}
