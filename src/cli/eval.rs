//! `focusdpo eval` (the synthetic benchmark on a base or a run), `focusdpo sample` (images for one prompt) and
//! `focusdpo report` (groups of runs compared, mean ± CI).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::Device;
use clap::Args;
use focusdpo::eval::benchmark::{BenchmarkConfig, ExtraEmbedders, SubjectCrop, report_markdown, run_benchmark};
use focusdpo::eval::claim::{ClaimGroups, check_claim, claim_markdown};
use focusdpo::eval::dreambench::{DreamBenchConfig, dreambench_markdown, read_dreambench, run_dreambench};
use focusdpo::eval::pretrained::{ClipEmbedder, ClipModelConfig, DinoV2Config, DinoV2Embedder};
use focusdpo::eval::sampler::{
    InitImage, SampleRequest, SampleSettings, SamplerChoices, TrajectoryStep, sample_from, sample_observed,
};
use focusdpo::eval::study::{RunMetrics, aggregate, benchmark_values, comparison_markdown, group_of, training_values};
use focusdpo::eval::{ImageEmbedder, TextEmbedder};
use focusdpo::model::{Adapters, BaseModel};
use image::RgbImage;

use super::backbone::BackboneArgs;

/// Which model: a run (its base + latest LoRA) or a base alone.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A run directory: its base (with its base LoRAs and encoders) and the LoRA of its latest checkpoint.
    #[arg(long, conflicts_with_all = ["base", "backbone", "base_loras"])]
    run: Option<PathBuf>,
    /// A base alone (default: the bundled tiny base).
    #[command(flatten)]
    backbone: BackboneArgs,
    /// Autoguidance's guide model: a weaker base of the same kind (an earlier checkpoint's export, a smaller
    /// model), loaded beside the model; used when --guide-scale ≠ 1 (docs/eval.md).
    #[arg(long, value_name = "FILE")]
    guide: Option<PathBuf>,
}

/// Sampler options shared by eval and sample. Each one not given is what the base file recommends
/// (`focusdpo.sampling` in its metadata, `docs/eval.md`), else the sampler's default.
#[derive(Debug, Args)]
pub struct SamplerArgs {
    /// Denoising steps [default: the base's, else 24].
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale on the prompt, 1 = off [default: the base's, else 3].
    #[arg(long)]
    cfg: Option<f32>,
    /// Rectified-flow time shift, 1 = uniform grid [default: the base's, else 1].
    #[arg(long)]
    shift: Option<f32>,
    /// Guidance strength for a guidance-distilled base (FLUX.1-dev); ignored by other bases.
    #[arg(long, default_value_t = SampleSettings::default().distilled_guidance)]
    guidance: f32,
    /// Guidance scale on the references, 1 = off (one more forward a step when on). Needs a base pretrained with
    /// reference dropout [default: the base's, else 1].
    #[arg(long)]
    ref_cfg: Option<f32>,
    /// Fresh noise put back at each step, 0–1 (0 = the Euler ODE; 1 = diffusers' stochastic_sampling).
    #[arg(long, default_value_t = SampleSettings::default().stochasticity)]
    stochastic: f32,
    /// Autoguidance scale, 1 = off: the prediction pushed away from the --guide model's by this factor (one more
    /// forward a step) [default: 1].
    #[arg(long)]
    guide_scale: Option<f32>,
}

impl SamplerArgs {
    /// The flags given (each one left out is the base's recommendation, then the sampler's default).
    fn choices(&self) -> SamplerChoices {
        SamplerChoices {
            steps: self.steps,
            cfg_scale: self.cfg,
            shift: self.shift,
            distilled_guidance: Some(self.guidance),
            reference_cfg_scale: self.ref_cfg,
            stochasticity: Some(self.stochastic),
            autoguidance_scale: self.guide_scale,
            ..SamplerChoices::default()
        }
    }

    /// The settings for `base`: the flags given, then the base's recommendation, then the sampler's defaults.
    fn settings(&self, base: &BaseModel) -> SampleSettings {
        self.choices().resolve(base)
    }
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampler: SamplerArgs,
    /// Output folder: eval.json, eval.md and a PNG sheet per split.
    #[arg(long)]
    out: PathBuf,
    /// Single-subject held-out items.
    #[arg(long, default_value_t = BenchmarkConfig::default().single_items)]
    single: usize,
    /// Multi-subject held-out items.
    #[arg(long, default_value_t = BenchmarkConfig::default().multi_items)]
    multi: usize,
    /// Images per item.
    #[arg(long, default_value_t = BenchmarkConfig::default().samples_per_item)]
    samples: usize,
    /// Where each subject is looked for in a generated image: `located` (searched for: prompts name no positions)
    /// or `ideal-box` (the ideal target's box: the reports of earlier versions).
    #[arg(long, default_value = "located")]
    crop: SubjectCrop,
    /// Diagnosis: start each item's images from its ideal target noised to this img2img strength (0–1; 1 = pure
    /// noise) instead of from noise: how much of each subject the base keeps from that noise level on.
    #[arg(long, value_name = "STRENGTH")]
    from_ideal: Option<f32>,
    /// DINOv2 weights (model.safetensors or a HF folder) for the DINO score.
    #[arg(long)]
    dino: Option<PathBuf>,
    /// CLIP weights (model.safetensors or a HF folder) for CLIP-I / CLIP-T; needs --clip-tokenizer.
    #[arg(long, requires = "clip_tokenizer")]
    clip: Option<PathBuf>,
    /// CLIP tokenizer.json.
    #[arg(long)]
    clip_tokenizer: Option<PathBuf>,
    /// The paper's benchmark instead of the synthetic one: a DreamBench file in UNO's format (a JSON list of
    /// `{"prompt", "image_paths"}`, paths relative to the file; repeatable: one row per file, e.g. UNO's
    /// dreambench_singleip.json and dreambench_multiip.json). Uses --samples images per prompt.
    #[arg(long, value_name = "FILE.json")]
    dreambench: Vec<PathBuf>,
    /// DreamBench: only the first N prompts of each file.
    #[arg(long)]
    limit: Option<usize>,
    /// DreamBench: seed of each prompt's first image (the others follow); UNO's inference uses 3407.
    #[arg(long, default_value_t = 3407)]
    seed: u64,
    /// DreamBench: side of the generated images in pixels (default: 512 on a FLUX backbone, 64 on the tiny base).
    #[arg(long)]
    size: Option<u32>,
    /// DreamBench: side of the references fed to the model (default: 512 on a FLUX backbone, the sampler's on the
    /// tiny base).
    #[arg(long)]
    reference_px: Option<u32>,
}

/// Loads the model named by `args` on the device its settings name, and a name for reports.
pub fn load_model(args: &ModelArgs) -> anyhow::Result<(BaseModel, String)> {
    let (base, name) = load_main_model(args)?;
    let Some(path) = &args.guide else {
        return Ok((base, name));
    };
    let guide = BaseModel::load_file(path, base.mmdit.device())
        .with_context(|| format!("--guide {}: cannot load the guide model", path.display()))?;
    let base = base
        .with_guide(guide)
        .with_context(|| format!("--guide {}", path.display()))?;
    Ok((base, format!("{name}, guided by {}", path.display())))
}

fn load_main_model(args: &ModelArgs) -> anyhow::Result<(BaseModel, String)> {
    if let Some(run) = &args.run {
        let cfg: focusdpo::train::RunConfig = focusdpo::train::run_store::read_config(run)?;
        let device = cfg.model.device()?;
        let (base, step) = focusdpo::train::session::load_run_model(run, &device)
            .with_context(|| format!("{}: cannot load the run's model", run.display()))?;
        let name = if step == 0 {
            format!("{} (no checkpoint: base only)", run.display())
        } else {
            format!("{} @ step {step}", run.display())
        };
        return Ok((base, name));
    }
    let settings = args.backbone.settings()?;
    let base = settings.load_base(&settings.device()?)?;
    Ok((base, args.backbone.describe(&settings)))
}

/// A sheet: one row per item (references, ideal target, generated images), 2 px gaps on white.
fn sheet(rows: &[(Vec<RgbImage>, Vec<RgbImage>)]) -> RgbImage {
    let rows: Vec<Vec<RgbImage>> = rows.iter().map(|(a, b)| a.iter().chain(b).cloned().collect()).collect();
    focusdpo::train::samples::compose(&rows)
}

/// The trajectory sheet: per seed, a row of the steps' inputs `x_t` and a row of their predictions `x̂₀`, each row
/// ending with the sampled image.
fn trajectory_sheet(steps: &[TrajectoryStep], images: &[RgbImage]) -> RgbImage {
    let mut rows = Vec::new();
    for (k, image) in images.iter().enumerate() {
        for predicted in [false, true] {
            let mut row: Vec<RgbImage> = steps
                .iter()
                .filter_map(|s| if predicted { &s.x0 } else { &s.x_t }.get(k).cloned())
                .collect();
            row.push(image.clone());
            rows.push(row);
        }
    }
    focusdpo::train::samples::compose(&rows)
}

fn write_png(path: &Path, img: &RgbImage) -> anyhow::Result<()> {
    focusdpo::train::samples::write_png(path, img).map_err(anyhow::Error::msg)
}

/// The DINOv2 and CLIP embedders the arguments name.
fn extra_embedders(args: &EvalArgs, device: &Device) -> anyhow::Result<(Option<DinoV2Embedder>, Option<ClipEmbedder>)> {
    let dino = match &args.dino {
        Some(p) => Some(DinoV2Embedder::load(p, &DinoV2Config::vit_small_14(), device)?),
        None => None,
    };
    let clip = match (&args.clip, &args.clip_tokenizer) {
        (Some(w), Some(t)) => Some(ClipEmbedder::load(w, t, &ClipModelConfig::vit_base_patch32(), device)?),
        _ => None,
    };
    Ok((dino, clip))
}

/// `focusdpo eval --dreambench FILE…`: UNO's DreamBench prompts, images saved per set, DINO / CLIP-I / CLIP-T.
fn run_dreambench_eval(args: &EvalArgs, base: &BaseModel, name: &str) -> anyhow::Result<()> {
    let device = base.mmdit.device().clone();
    let flux = base.pixels_per_token() >= 16;
    let cfg = DreamBenchConfig {
        samples: args.samples,
        seed: args.seed,
        size_px: args.size.unwrap_or(if flux { 512 } else { 64 }),
        sampler: SampleSettings {
            reference_px: args.reference_px.unwrap_or(if flux {
                512
            } else {
                SampleSettings::default().reference_px
            }),
            ..args.sampler.settings(base)
        },
    };
    let sets = args
        .dreambench
        .iter()
        .map(|p| read_dreambench(p, args.limit))
        .collect::<Result<Vec<_>, _>>()?;
    let (dino, clip) = extra_embedders(args, &device)?;
    if dino.is_none() && clip.is_none() {
        eprintln!("note: without --dino or --clip only the images are written (the scores need their weights)");
    }
    let extra = ExtraEmbedders {
        dino: dino.as_ref().map(|d| d as &dyn ImageEmbedder),
        clip: clip.as_ref().map(|c| (c as &dyn ImageEmbedder, c as &dyn TextEmbedder)),
    };
    let started = std::time::Instant::now();
    let mut scores = Vec::new();
    for set in &sets {
        let dir = args.out.join(&set.name);
        let s = run_dreambench(base, set, &cfg, &extra, Adapters::On, Some(&dir), |k, n| {
            eprint!("\r{}: {k}/{n} prompts   ", set.name);
        })?;
        eprintln!();
        scores.push(s);
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("{}: cannot create", args.out.display()))?;
    let json = serde_json::json!({ "model": name, "seed": cfg.seed, "samples": cfg.samples, "size_px": cfg.size_px,
        "sets": scores });
    let md = dreambench_markdown(name, &scores);
    write_report(&args.out, "dreambench", &serde_json::to_vec_pretty(&json)?, &md)?;
    println!("{md}");
    println!(
        "DreamBench of {name} in {:.0} s → {}",
        started.elapsed().as_secs_f64(),
        args.out.join("dreambench.json").display()
    );
    Ok(())
}

/// Writes `<stem>.json` and `<stem>.md` into `out` (atomically).
fn write_report(out: &Path, stem: &str, json: &[u8], md: &str) -> anyhow::Result<()> {
    for (file, bytes) in [(format!("{stem}.json"), json), (format!("{stem}.md"), md.as_bytes())] {
        focusdpo::store::write_atomic(&out.join(&file), bytes)
            .with_context(|| format!("{}: cannot write {file}", out.display()))?;
    }
    Ok(())
}

pub fn run_eval(args: &EvalArgs) -> anyhow::Result<()> {
    let (base, name) = load_model(&args.model)?;
    if !args.dreambench.is_empty() {
        return run_dreambench_eval(args, &base, &name);
    }
    let device = base.mmdit.device().clone();
    let cfg = BenchmarkConfig {
        single_items: args.single,
        multi_items: args.multi,
        samples_per_item: args.samples,
        crop: args.crop,
        from_ideal: args.from_ideal,
        sampler: args.sampler.choices(),
        ..BenchmarkConfig::default()
    };
    if cfg.samples_per_item == 0 || cfg.single_items + cfg.multi_items == 0 {
        bail!("nothing to evaluate: --samples and --single/--multi must not all be 0");
    }
    let (dino, clip) = extra_embedders(args, &device)?;
    let extra = ExtraEmbedders {
        dino: dino.as_ref().map(|d| d as &dyn ImageEmbedder),
        clip: clip.as_ref().map(|c| (c as &dyn ImageEmbedder, c as &dyn TextEmbedder)),
    };
    let started = std::time::Instant::now();
    let result = run_benchmark(&base, &name, &cfg, &extra, |split, k, n| {
        eprint!("\r{split}: {k}/{n} items generated   ");
    });
    eprintln!();
    let (report, images) = result?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("{}: cannot create", args.out.display()))?;
    let md = report_markdown(&report);
    write_report(&args.out, "eval", &serde_json::to_vec_pretty(&report)?, &md)?;
    for (split, imgs) in &images {
        let items = focusdpo::eval::benchmark::eval_items(&cfg, split == "multi")?;
        let rows: Vec<(Vec<RgbImage>, Vec<RgbImage>)> = items
            .iter()
            .zip(imgs)
            .take(8)
            .map(|(item, gen_imgs)| {
                let mut left = item.references.clone();
                left.push(item.winner.clone());
                (left, gen_imgs.clone())
            })
            .collect();
        write_png(&args.out.join(format!("samples-{split}.png")), &sheet(&rows))?;
    }
    println!("{md}");
    println!(
        "eval of {name} in {:.0} s → {}",
        started.elapsed().as_secs_f64(),
        args.out.join("eval.json").display()
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampler: SamplerArgs,
    /// Take prompt and references from this dataset item (id) of --data (default: the bundled dataset).
    #[arg(long, conflicts_with_all = ["prompt", "reference"])]
    item: Option<String>,
    /// DIP dataset folder for --item.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Prompt (with --reference).
    #[arg(long)]
    prompt: Option<String>,
    /// Reference image, one per subject (repeatable).
    #[arg(long)]
    reference: Vec<PathBuf>,
    /// Seeds, one image each.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,3")]
    seeds: Vec<u64>,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
    size: u32,
    /// Output PNG: a row of the references followed by the images.
    #[arg(long)]
    out: PathBuf,
    /// Start from this image instead of pure noise (img2img / SDEdit), resized to --size.
    #[arg(long, requires = "strength")]
    init: Option<PathBuf>,
    /// With --init: how much of the sampler's grid is run (diffusers' strength, 0–1): 1 = from pure noise, small
    /// values keep the image.
    #[arg(long, requires = "init")]
    strength: Option<f32>,
    /// Also write each step to this PNG: for every seed a row of the model's inputs `x_t` and below it a row of its
    /// predictions `x̂₀`, one column per step from the first (noise) to the last (the times are printed).
    #[arg(long)]
    trajectory: Option<PathBuf>,
}

/// An image file as RGB; the error names the file and what it was for (`what`: "reference", "init").
fn read_rgb(path: &Path, what: &str) -> anyhow::Result<RgbImage> {
    Ok(image::open(path)
        .with_context(|| format!("{}: cannot read the {what} image", path.display()))?
        .to_rgb8())
}

pub fn run_sample(args: &SampleArgs) -> anyhow::Result<()> {
    let (base, name) = load_model(&args.model)?;
    let (prompt, references) = match (&args.item, &args.prompt) {
        (Some(id), _) => {
            let dir = args.data.clone().unwrap_or_else(focusdpo::dip::bundled_dataset_dir);
            let ds = focusdpo::dip::DipDataset::open(&dir)?;
            let item = ds.load_by_id(id)?;
            (item.record.prompt.clone(), item.references)
        }
        (None, Some(p)) => {
            let refs = args
                .reference
                .iter()
                .map(|path| read_rgb(path, "reference"))
                .collect::<anyhow::Result<Vec<_>>>()?;
            (p.clone(), refs)
        }
        (None, None) => bail!("give --item ID (from --data) or --prompt TEXT with --reference PNG…"),
    };
    let req = SampleRequest {
        prompt: &prompt,
        references: &references,
        size_px: (args.size, args.size),
    };
    let init_image = args.init.as_deref().map(|path| read_rgb(path, "init")).transpose()?;
    let init = init_image
        .as_ref()
        .zip(args.strength)
        .map(|(image, strength)| InitImage { image, strength });
    let started = std::time::Instant::now();
    let settings = args.sampler.settings(&base);
    let mut steps: Vec<TrajectoryStep> = Vec::new();
    let images = match &args.trajectory {
        None => sample_from(&base, &req, &settings, &args.seeds, Adapters::On, init)?,
        Some(_) => {
            let mut keep = |step: TrajectoryStep| steps.push(step);
            sample_observed(&base, &req, &settings, &args.seeds, Adapters::On, init, Some(&mut keep))?
        }
    };
    if let Some(path) = &args.trajectory {
        write_png(path, &trajectory_sheet(&steps, &images))?;
        let times: Vec<String> = steps.iter().map(|s| format!("{:.3}", s.t)).collect();
        println!(
            "trajectory: {} step(s), t = {} → {} (rows per seed: x_t, x̂₀; the last column is the image)",
            steps.len(),
            times.join(", "),
            path.display()
        );
    }
    write_png(&args.out, &sheet(&[(references, images)]))?;
    println!(
        "{} image(s) from {name} for \"{prompt}\" in {:.1} s → {}",
        args.seeds.len(),
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Run directories (training metrics from metrics.jsonl, benchmark from DIR/eval/eval.json) or eval folders
    /// (DIR/eval.json). Runs are grouped by folder name without a seed suffix (`dpo-s1`, `dpo-s2` → `dpo`).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Write the markdown table here (it is printed too).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write every run's metrics and the group summaries as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The groups the paper's claim (FocusDPO > DPO ≥ SFT ≥ base, larger gain multi-subject) is checked on, in
    /// that order: BASE,SFT,DPO,FOCUS. The check is added when the DPO and FocusDPO groups are present.
    #[arg(long, value_name = "BASE,SFT,DPO,FOCUS", default_value = "base,sft,dpo,focus-dpo", value_parser = parse_claim_groups)]
    claim: ClaimGroups,
}

fn parse_claim_groups(text: &str) -> Result<ClaimGroups, String> {
    match text.split(',').map(str::trim).collect::<Vec<_>>()[..] {
        [base, sft, dpo, focus] if [base, sft, dpo, focus].iter().all(|g| !g.is_empty()) => Ok(ClaimGroups {
            base: base.into(),
            sft: sft.into(),
            dpo: dpo.into(),
            focus: focus.into(),
        }),
        _ => Err(format!(
            "`{text}`: give four group names, BASE,SFT,DPO,FOCUS (e.g. base,sft,dpo,focus-dpo)"
        )),
    }
}

/// One path's metrics: benchmark values if an eval.json is there (or in eval/), training values if a
/// metrics.jsonl is there.
fn run_metrics(path: &Path) -> anyhow::Result<RunMetrics> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .with_context(|| format!("{}: not a folder name", path.display()))?;
    let mut values = std::collections::BTreeMap::new();
    let eval_json = [path.join("eval.json"), path.join("eval").join("eval.json")]
        .into_iter()
        .find(|p| p.is_file());
    if let Some(p) = &eval_json {
        let bytes = std::fs::read(p).with_context(|| format!("{}: cannot read", p.display()))?;
        let report: focusdpo::eval::benchmark::BenchmarkReport =
            serde_json::from_slice(&bytes).with_context(|| format!("{}: not a benchmark report", p.display()))?;
        values.extend(benchmark_values(&report));
    }
    let has_metrics = path.join(focusdpo::train::run_store::METRICS_FILE).is_file();
    if has_metrics {
        let (records, _) = focusdpo::train::run_store::read_metrics(path)?;
        values.extend(training_values(&records));
    }
    if eval_json.is_none() && !has_metrics {
        bail!(
            "{}: neither eval.json, eval/eval.json nor {} found",
            path.display(),
            focusdpo::train::run_store::METRICS_FILE
        );
    }
    Ok(RunMetrics {
        group: group_of(&name),
        source: path.display().to_string(),
        values,
    })
}

/// `focusdpo report`: mean ± 95 % CI per group of runs, best marked.
pub fn run_report(args: &ReportArgs) -> anyhow::Result<()> {
    // An ablation results folder (`focusdpo ablate --out DIR`): assemble its tables from whatever has finished.
    if let [dir] = &args.paths[..]
        && dir.join(focusdpo::experiment::store::GRID_FILE).is_file()
    {
        return super::ablate::report_grid(dir, true);
    }
    let runs = args
        .paths
        .iter()
        .map(|p| run_metrics(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let groups = aggregate(&runs);
    let claim = check_claim(&runs, &args.claim);
    let mut md = format!(
        "{}\nmean ± 95 % CI half-width over the runs of each group (Student t); **bold** = best mean. Training \
         columns: the last 20 % of steps.\n",
        comparison_markdown(&groups)
    );
    if let Some(claim) = &claim {
        md.push('\n');
        md.push_str(&claim_markdown(claim));
    }
    println!("{md}");
    if let Some(out) = &args.out {
        focusdpo::store::write_atomic(out, md.as_bytes())
            .with_context(|| format!("{}: cannot write", out.display()))?;
    }
    if let Some(out) = &args.json {
        let json = serde_json::to_vec_pretty(&serde_json::json!({ "runs": runs, "groups": groups, "claim": claim }))?;
        focusdpo::store::write_atomic(out, &json).with_context(|| format!("{}: cannot write", out.display()))?;
    }
    Ok(())
}
