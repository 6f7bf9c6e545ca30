//! Sample sheets at checkpoints (what kohya's `--sample_every_n_steps` and TensorBoard's image tab give): at every
//! checkpoint a run can write `samples/step-N.png`, a few held-out items of the synthetic benchmark generated from
//! fixed seeds by the frozen base and by the base with the run's LoRA, so what the run changed is seen beside what
//! it started from.
//!
//! One row per item: the ideal target, the base's images, the run's images (the same seeds), then the item's
//! references. Items alternate single- and multi-subject, from the benchmark's held-out split
//! ([`crate::eval::benchmark::eval_items`]): never trained on.

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::dip::synth::SynthItem;
use crate::eval::EvalError;
use crate::eval::benchmark::{BenchmarkConfig, eval_items};
use crate::eval::sampler::{SampleRequest, SamplerChoices, sample};
use crate::model::{Adapters, BaseModel};

/// Folder of the sheets inside a run folder.
pub const SAMPLES_DIR: &str = "samples";

/// The sheets a run writes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleSheetConfig {
    /// Held-out items per sheet (single- and multi-subject alternating); 0 = no sheets.
    pub items: usize,
    /// Images per item and model (seeds `0..images`).
    pub images: usize,
    /// Image side of the synthetic items.
    pub size_px: u32,
    /// Sampler: what is chosen here, then what the base recommends, then the sampler's defaults.
    pub sampler: SamplerChoices,
}

impl Default for SampleSheetConfig {
    fn default() -> Self {
        Self {
            items: 0,
            images: 1,
            size_px: 64,
            sampler: SamplerChoices::steps(16),
        }
    }
}

impl SampleSheetConfig {
    /// Checks ranges (the error says which field).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.items > 32 {
            return Err(("samples.items", format!("must be at most 32, got {}", self.items)));
        }
        if self.items > 0 && !(1..=8).contains(&self.images) {
            return Err(("samples.images", format!("must be in 1..=8, got {}", self.images)));
        }
        if !(16..=1024).contains(&self.size_px) {
            return Err(("samples.size_px", format!("must be in 16..=1024, got {}", self.size_px)));
        }
        self.sampler.validate().map_err(|e| ("samples.sampler", e.to_string()))
    }

    /// The held-out items of a sheet.
    pub fn items(&self) -> Result<Vec<SynthItem>, EvalError> {
        let bench = BenchmarkConfig {
            single_items: self.items.div_ceil(2),
            multi_items: self.items / 2,
            size_px: self.size_px,
            ..BenchmarkConfig::default()
        };
        let single = eval_items(&bench, false)?;
        let multi = eval_items(&bench, true)?;
        let mut out = Vec::with_capacity(self.items);
        for k in 0..single.len().max(multi.len()) {
            out.extend(single.get(k).cloned());
            out.extend(multi.get(k).cloned());
        }
        Ok(out)
    }
}

/// The path of step `step`'s sheet in `run_dir`.
pub fn sheet_path(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(SAMPLES_DIR).join(format!("step-{step}.png"))
}

/// The sheets of a run folder, by step (oldest first).
pub fn sheets(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(run_dir.join(SAMPLES_DIR)) else {
        return Vec::new();
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("step-")?.strip_suffix(".png")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Generates a sheet: per item, the ideal target, `images` samples of the frozen base (adapters off) and of the
/// policy (adapters on: `base` carries the run's LoRA), from the same seeds, and the references.
pub fn sheet(base: &BaseModel, cfg: &SampleSheetConfig, items: &[SynthItem]) -> Result<RgbImage, EvalError> {
    let seeds: Vec<u64> = (0..cfg.images as u64).collect();
    let settings = cfg.sampler.resolve(base);
    let mut rows = Vec::with_capacity(items.len());
    for item in items {
        let req = SampleRequest {
            prompt: &item.record.prompt,
            references: &item.references,
            size_px: item.winner.dimensions(),
        };
        let mut row = vec![item.winner.clone()];
        row.extend(sample(base, &req, &settings, &seeds, Adapters::Off)?);
        row.extend(sample(base, &req, &settings, &seeds, Adapters::On)?);
        row.extend(item.references.iter().cloned());
        rows.push(row);
    }
    Ok(compose(&rows))
}

/// Images in rows on a white sheet: every image scaled (nearest) to the largest side among them, 2 px gaps.
pub fn compose(rows: &[Vec<RgbImage>]) -> RgbImage {
    let cell = rows
        .iter()
        .flatten()
        .map(|i| i.width().max(i.height()))
        .max()
        .unwrap_or(1);
    let cols = rows.iter().map(Vec::len).max().unwrap_or(1) as u32;
    let gap = 2;
    let mut out = RgbImage::from_pixel(
        cols * (cell + gap) + gap,
        rows.len() as u32 * (cell + gap) + gap,
        image::Rgb([255, 255, 255]),
    );
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            let img = image::imageops::resize(img, cell, cell, image::imageops::FilterType::Nearest);
            let x = gap + c as u32 * (cell + gap);
            let y = gap + r as u32 * (cell + gap);
            image::imageops::overlay(&mut out, &img, i64::from(x), i64::from(y));
        }
    }
    out
}

/// Encodes `img` as PNG and writes it atomically to `path` (its folder created).
pub fn write_png(path: &Path, img: &RgbImage) -> Result<(), String> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| format!("{}: cannot encode PNG: {e}", path.display()))?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    crate::store::write_atomic(path, &bytes).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_alternate_single_and_multi_and_compose_lays_rows_out() {
        let cfg = SampleSheetConfig {
            items: 3,
            ..SampleSheetConfig::default()
        };
        let items = cfg.items().expect("items");
        let subjects: Vec<usize> = items.iter().map(|i| i.references.len()).collect();
        assert_eq!(subjects[0], 1);
        assert!(subjects[1] >= 2);
        assert_eq!(subjects[2], 1);
        let a = RgbImage::from_pixel(4, 4, image::Rgb([0, 0, 0]));
        let b = RgbImage::from_pixel(8, 8, image::Rgb([255, 0, 0]));
        let sheet = compose(&[vec![a.clone(), b], vec![a]]);
        assert_eq!(sheet.dimensions(), (2 * 10 + 2, 2 * 10 + 2));
        assert_eq!(sheet.get_pixel(2, 2), &image::Rgb([0, 0, 0]));
        assert_eq!(sheet.get_pixel(12, 2), &image::Rgb([255, 0, 0]));
        assert_eq!(
            sheet.get_pixel(12, 12),
            &image::Rgb([255, 255, 255]),
            "the short row is padded white"
        );
        assert!(
            SampleSheetConfig {
                items: 2,
                images: 0,
                ..cfg
            }
            .check()
            .is_err()
        );
    }

    /// A sheet samples the base as it recommends (the bundled one wants reference guidance) unless the config
    /// chooses otherwise: a base recommending reference CFG 3 draws the sheet a base without a recommendation
    /// draws when the config asks for it.
    #[test]
    fn a_sheet_samples_the_base_as_it_recommends() {
        let cfg = SampleSheetConfig {
            items: 1,
            sampler: SamplerChoices::steps(2),
            size_px: 32,
            ..SampleSheetConfig::default()
        };
        let items = cfg.items().expect("items");
        let random = || BaseModel::random(&crate::model::Config::micro(), 4, 3, &candle_core::Device::Cpu);
        let plain = random().expect("base");
        let mut guided = random().expect("base");
        guided.sampling.reference_cfg_scale = Some(3.0);
        let asked = SampleSheetConfig {
            sampler: SamplerChoices {
                reference_cfg_scale: Some(3.0),
                ..cfg.sampler
            },
            ..cfg
        };
        let recommended = sheet(&guided, &cfg, &items).expect("sheet");
        assert_eq!(recommended, sheet(&plain, &asked, &items).expect("sheet"));
        assert_ne!(
            recommended,
            sheet(&plain, &cfg, &items).expect("sheet"),
            "guidance changes the samples"
        );
        let overruled = SampleSheetConfig {
            sampler: SamplerChoices {
                reference_cfg_scale: Some(1.0),
                ..cfg.sampler
            },
            ..cfg
        };
        assert_eq!(
            sheet(&guided, &overruled, &items).expect("sheet"),
            sheet(&plain, &cfg, &items).expect("sheet")
        );
    }

    #[test]
    fn sheets_are_listed_by_step() {
        let dir = tempfile::tempdir().expect("dir");
        for step in [10, 2, 5] {
            write_png(&sheet_path(dir.path(), step), &RgbImage::new(2, 2)).expect("write");
        }
        std::fs::write(dir.path().join(SAMPLES_DIR).join("notes.txt"), "x").expect("write");
        let steps: Vec<u64> = sheets(dir.path()).iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, [2, 5, 10]);
    }
}
