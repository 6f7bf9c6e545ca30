//! `focusdpo pretrain`: trains the tiny base from scratch on the synthetic DIP stream (resumable run directory), and
//! exports a checkpoint's EMA weights as a base file.

use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use clap::Args;
use focusdpo::model::base::META_SAMPLING;
use focusdpo::train::pretrain::{BASE_FILE, PretrainConfig, PretrainRecord, Pretrainer};
use focusdpo::train::run_store::{Resumed, RunStore, checkpoints, latest_checkpoint, restore_newest_intact};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args)]
pub struct PretrainArgs {
    /// Run directory (created; must not hold a run unless --resume).
    #[arg(long)]
    out: PathBuf,
    /// Optimiser steps (with --resume: the new total).
    #[arg(long)]
    steps: Option<u64>,
    /// Seed of the init, the noise and the condition dropout.
    #[arg(long)]
    seed: Option<u64>,
    /// A pretraining config (TOML); command-line options override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override any config field: --set batch=4 --set optim.adamw.lr=3e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue the run in --out from its latest checkpoint. With --set, change settings from here on (not the
    /// model's shape): config.toml is rewritten and metrics.jsonl records the change.
    #[arg(long)]
    resume: bool,
    /// Start --out as a branch of another run: its config (with --set applied) and a copy of its checkpoint
    /// (--fork-step, or its latest), continued from there; metrics.jsonl records where it came from.
    #[arg(long, value_name = "RUN", conflicts_with_all = ["resume", "config", "seed"])]
    fork: Option<PathBuf>,
    /// The parent's checkpoint step to fork from (default: its latest).
    #[arg(long, value_name = "STEP", requires = "fork")]
    fork_step: Option<u64>,
    /// Instead of training: write the latest checkpoint's EMA weights of --out to this base file (f16).
    #[arg(long, value_name = "FILE")]
    export: Option<PathBuf>,
    /// No progress bar; print one line per step instead.
    #[arg(long)]
    plain: bool,
    /// Stop after this many seconds of training (at the end of the step that crosses it), with a checkpoint:
    /// the run continues later with --resume. For time-boxed machines (a session, a lent GPU).
    #[arg(long, value_name = "SECONDS")]
    stop_after: Option<f64>,
    /// Where to train: `cpu`, `cuda` or `cuda:N` (a build with the `cuda` feature). Not part of the run's config:
    /// a run may continue on another device (its rounding then differs).
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn build_config(args: &PretrainArgs) -> anyhow::Result<PretrainConfig> {
    let mut cfg = match &args.config {
        Some(path) => PretrainConfig::from_file(path)?,
        None => PretrainConfig::default(),
    };
    if let Some(s) = args.steps {
        cfg.steps = s;
    }
    if let Some(s) = args.seed {
        cfg.seed = s;
    }
    let cfg = cfg.with_overrides(&args.set)?;
    cfg.validate()?;
    Ok(cfg)
}

/// The config a resumed or forked run continues with: `old` with `--set` and `--steps` applied, validated, and
/// with the model's shape unchanged.
fn continued_config(old: &PretrainConfig, args: &PretrainArgs) -> anyhow::Result<PretrainConfig> {
    let mut cfg = old.with_overrides(&args.set)?;
    if let Some(s) = args.steps {
        cfg.steps = s;
    }
    cfg.validate()?;
    old.check_continuable(&cfg)?;
    Ok(cfg)
}

/// A trainer for `cfg` restored from the newest intact checkpoint of `store`'s run (a warning names any newer one
/// that failed), with the resume marker logged.
fn restored(store: &mut RunStore, cfg: PretrainConfig, device: &Device) -> anyhow::Result<(Pretrainer, Resumed)> {
    let mut trainer = Pretrainer::for_resume(cfg, device)?;
    let resumed = restore_newest_intact(store.dir(), |c| trainer.restore(c).map_err(|e| e.to_string()))?;
    if let Some(note) = resumed.fallback_note() {
        eprintln!("warning: {note}");
    }
    store.mark_resume(&resumed)?;
    Ok((trainer, resumed))
}

fn export(args: &PretrainArgs, to: &std::path::Path) -> anyhow::Result<()> {
    let ckpt = latest_checkpoint(&args.out)?
        .with_context(|| format!("{}: the run has no checkpoint to export", args.out.display()))?;
    let from = ckpt.dir.join(BASE_FILE);
    let mut metadata = focusdpo::model::base::read_safetensors_metadata(&from)?;
    // The recommended sampler settings are the run's as they are now (set after the last checkpoint, or here).
    if let Some(bad) = args.set.iter().find(|s| !s.trim_start().starts_with("sampling.")) {
        bail!("--set {bad}: with --export only the exported base's sampler settings (sampling.*) can be set");
    }
    let run_cfg: PretrainConfig = RunStore::run_config(&args.out)?;
    let sampling = run_cfg.with_overrides(&args.set)?.sampling;
    metadata.remove(META_SAMPLING);
    sampling.write_metadata(&mut metadata).map_err(anyhow::Error::msg)?;
    let tensors = candle_core::safetensors::load(&from, &Device::Cpu)
        .with_context(|| format!("{}: cannot read the checkpoint weights", from.display()))?;
    let mut named = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(DType::F16)?)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes = safetensors::serialize(named, Some(metadata)).with_context(|| format!("{}", from.display()))?;
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create the folder", parent.display()))?;
    }
    focusdpo::store::write_atomic(to, &bytes).with_context(|| format!("{}: cannot write", to.display()))?;
    focusdpo::model::BaseModel::load_file(to, &Device::Cpu)
        .with_context(|| format!("{}: the exported file does not load as a base", to.display()))?;
    println!(
        "exported step {} of {} → {} ({:.1} MB, f16){}",
        ckpt.step,
        args.out.display(),
        to.display(),
        bytes.len() as f64 / 1e6,
        if sampling.is_empty() {
            String::new()
        } else {
            format!(", recommends sampling {}", serde_json::to_string(&sampling)?)
        }
    );
    Ok(())
}

pub fn run(args: &PretrainArgs) -> anyhow::Result<()> {
    if let Some(s) = args.stop_after
        && !(s.is_finite() && s >= 0.0)
    {
        bail!("--stop-after {s}: must be a number of seconds ≥ 0");
    }
    if let Some(to) = &args.export {
        return export(args, to);
    }
    let device =
        focusdpo::train::config::device_from_name(&args.device).map_err(|e| anyhow::anyhow!("--device {e}"))?;
    let (mut store, mut trainer) = if let Some(parent) = &args.fork {
        let parent_cfg: PretrainConfig = RunStore::run_config(parent)?;
        let cfg = continued_config(&parent_cfg, args)?;
        let all = checkpoints(parent)?;
        let from = match args.fork_step {
            Some(step) => all.into_iter().find(|c| c.step == step).with_context(|| {
                format!(
                    "{}: no checkpoint of step {step} (see its checkpoints/ folder)",
                    parent.display()
                )
            })?,
            None => all
                .into_iter()
                .next()
                .with_context(|| format!("{}: the run has no checkpoint to fork from", parent.display()))?,
        };
        let mut store = RunStore::create(&args.out, &cfg)?;
        store.copy_checkpoint(&from)?;
        store.append(&serde_json::json!({
            "event": "fork", "from": parent.display().to_string(), "from_step": from.step, "set": args.set,
        }))?;
        let (trainer, _) = restored(&mut store, cfg, &device)?;
        (store, trainer)
    } else if args.resume {
        if args.config.is_some() || args.seed.is_some() {
            bail!("--resume continues a run with its own config.toml; change settings with --set (or --steps)");
        }
        let (mut store, old) = RunStore::resume::<PretrainConfig>(&args.out)?;
        let cfg = continued_config(&old, args)?;
        let (trainer, resumed) = restored(&mut store, cfg.clone(), &device)?;
        if !args.set.is_empty() {
            store.update_config(&cfg)?;
            store.append(&serde_json::json!({
                "event": "config",
                "from_step": resumed.checkpoint.as_ref().map_or(0, |c| c.step),
                "set": args.set,
            }))?;
        }
        (store, trainer)
    } else {
        let cfg = build_config(args)?;
        let store = RunStore::create(&args.out, &cfg)?;
        (store, Pretrainer::new(cfg, &device)?)
    };
    let total = trainer.config().steps;
    let every = trainer.config().checkpoint_every;
    eprintln!(
        "pretrain {}: {} parameters, batch {}, steps {}..{total}",
        args.out.display(),
        trainer.parameter_count(),
        trainer.config().batch,
        trainer.completed_steps() + 1
    );
    let bar = if args.plain {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(total);
        bar.set_position(trainer.completed_steps());
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    };
    let started = std::time::Instant::now();
    let mut recent: Vec<f32> = Vec::new();
    while trainer.completed_steps() < total {
        let r: PretrainRecord = trainer.step()?;
        store.append(&r)?;
        recent.push(r.loss);
        if recent.len() > 50 {
            recent.remove(0);
        }
        let mean = recent.iter().sum::<f32>() / recent.len() as f32;
        let msg = format!(
            "loss {:.4} (mean of 50: {mean:.4}) |g| {:.3} {:.0} ms, {:.0} MiB",
            r.loss,
            r.grad_norm,
            r.seconds * 1e3,
            r.rss_mib.unwrap_or(f64::NAN)
        );
        if args.plain {
            println!("step {}: {msg}", r.step);
        } else {
            bar.set_position(r.step);
            bar.set_message(msg);
        }
        let out_of_time = args.stop_after.is_some_and(|s| started.elapsed().as_secs_f64() >= s);
        if (every > 0 && r.step.is_multiple_of(every)) || r.step == total || out_of_time {
            let files = trainer.checkpoint_files()?;
            let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
            let ckpt = store.write_checkpoint(r.step, &refs)?;
            bar.println(format!("checkpoint {}", ckpt.dir.display()));
            let cfg = trainer.config();
            for gone in store.prune_checkpoints(cfg.keep_last, cfg.keep_every)? {
                bar.println(format!(
                    "removed {} (keep_last {}, keep_every {})",
                    gone.dir.display(),
                    cfg.keep_last,
                    cfg.keep_every
                ));
            }
        }
        if out_of_time && r.step < total {
            bar.finish_and_clear();
            println!(
                "stopped at step {} after {:.0} s (--stop-after); continue with: focusdpo pretrain --out {} --resume",
                r.step,
                started.elapsed().as_secs_f64(),
                args.out.display()
            );
            return Ok(());
        }
    }
    bar.finish_and_clear();
    println!(
        "finished at step {total}; export with: focusdpo pretrain --out {} --export FILE",
        args.out.display()
    );
    Ok(())
}
