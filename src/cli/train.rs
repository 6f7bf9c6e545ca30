//! `focusdpo train`: a LoRA run (SFT, Diffusion-DPO or FocusDPO) written to a run directory, with a progress bar.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use focusdpo::train::RunConfig;
use focusdpo::train::config::Preset;
use focusdpo::train::objective::ObjectiveKind;
use focusdpo::train::run_store::{CONFIG_FILE, read_config};
use focusdpo::train::session::{Event, Launch, Session, SessionOptions};
use indicatif::{ProgressBar, ProgressStyle};

use super::backbone::BackboneArgs;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// DIP dataset folder. Default: the bundled synthetic dataset.
    #[arg(long)]
    data: Option<PathBuf>,
    /// sft, dpo or focus-dpo.
    #[arg(long)]
    objective: Option<ObjectiveKind>,
    /// Optimiser steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Run directory (created; must not hold a run unless --resume).
    #[arg(long)]
    out: PathBuf,
    /// Start from a named set of settings: `paper` (the FocusDPO paper's rank-32 LoRA, AdamW lr 1e-8, 2000
    /// steps; docs/training.md). --config, the options and --set apply on top.
    #[arg(long)]
    preset: Option<Preset>,
    /// A run config (TOML); command-line options override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override any config field: --set dpo.beta=5000 --set masks.fusion.tau=0.2 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    #[command(flatten)]
    backbone: BackboneArgs,
    /// Seed of every random choice.
    #[arg(long)]
    seed: Option<u64>,
    /// Write step K's tensors (x0_w, x0_l, noise, t, x_t, target, policy/reference predictions, M, loss).
    #[arg(long, num_args = 2, value_names = ["K", "FILE"])]
    dump_step: Option<Vec<String>>,
    /// Continue the run in --out from its latest checkpoint (up to --steps if given).
    #[arg(long)]
    resume: bool,
    /// No progress bar; print one line per step instead.
    #[arg(long)]
    plain: bool,
    /// Data-parallel training over N processes on this machine (each takes a shard of every step's pairs;
    /// gradients are averaged): this command starts them with `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT`, as
    /// an external launcher (`srun`, `torchrun`-style scripts) would. With `model.device = "cuda"` rank r uses
    /// GPU `LOCAL_RANK`. Rank 0 writes the run folder and prints; the others log to rank-R.log beside it.
    #[arg(long, value_name = "N")]
    ranks: Option<usize>,
}

/// Starts `ranks` processes of this command (without `--ranks`), one per rank, and waits for them all.
fn launch_ranks(args: &TrainArgs, ranks: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("the path of this focusdpo binary")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .context("a free local port for rank 0")?;
    let forwarded = super::own_args_without(&[], &["--ranks"]);
    let log_dir = args
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf();
    let name = args
        .out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "run".into());
    let mut children = Vec::new();
    for rank in 0..ranks {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(&forwarded)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", ranks.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
        let log = log_dir.join(format!("{name}.rank-{rank}.log"));
        if rank > 0 {
            let file = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
            let err = file.try_clone().with_context(|| format!("{}", log.display()))?;
            cmd.stdout(file).stderr(err);
        }
        children.push((rank, log, cmd.spawn().context("starting a rank")?));
    }
    let mut failed = Vec::new();
    for (rank, log, mut child) in children {
        let status = child.wait().with_context(|| format!("waiting for rank {rank}"))?;
        if !status.success() {
            failed.push(if rank == 0 {
                "rank 0 (its output is above)".to_string()
            } else {
                format!("rank {rank} (its output: {})", log.display())
            });
        }
    }
    if !failed.is_empty() {
        bail!("data-parallel training failed on {}", failed.join(", "));
    }
    Ok(())
}

/// The run config the command line asks for: `start` (the defaults for a new run, the run's own config on resume)
/// with the preset's keys, then the config file's, then the options, then `--set` applied on top.
fn build_config(args: &TrainArgs, start: Option<RunConfig>) -> anyhow::Result<RunConfig> {
    let mut cfg = start.unwrap_or_default();
    if let Some(preset) = args.preset {
        cfg = cfg.with_preset(preset)?;
    }
    if let Some(path) = &args.config {
        cfg = cfg.overlaid_with_file(path)?;
    }
    if let Some(o) = args.objective {
        cfg.objective = o;
    }
    if let Some(s) = args.steps {
        cfg.steps = s;
    }
    if let Some(s) = args.seed {
        cfg.seed = s;
    }
    if let Some(d) = &args.data {
        cfg.data.dir = Some(d.clone());
    }
    if args.backbone.given() {
        cfg.model = args.backbone.apply(cfg.model)?;
    }
    let cfg = cfg.with_overrides(&args.set)?;
    cfg.validate()?;
    Ok(cfg)
}

pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    if let Some(n) = args.ranks
        && std::env::var_os("WORLD_SIZE").is_none()
    {
        if n == 0 {
            bail!("--ranks must be at least 1");
        }
        if n > 1 {
            return launch_ranks(args, n);
        }
    }
    // One rank of a world an external launcher (or --ranks) started: joined on the run's device.
    let in_world = std::env::var_os("WORLD_SIZE").is_some();
    let dump = match &args.dump_step {
        Some(v) => match v.as_slice() {
            [k, file] => {
                let k: u64 = k
                    .parse()
                    .with_context(|| format!("--dump-step: `{k}` is not a step number"))?;
                if k == 0 {
                    bail!("--dump-step: steps count from 1");
                }
                Some((k, PathBuf::from(file)))
            }
            _ => bail!("--dump-step takes a step and a file"),
        },
        None => None,
    };
    let launch = if args.resume {
        check_resume_keeps_settings(args)?;
        Launch::Resume {
            dir: args.out.clone(),
            steps: args.steps,
        }
    } else {
        Launch::New {
            config: Box::new(build_config(args, None)?),
            dir: args.out.clone(),
        }
    };
    let session = Session::start(
        launch,
        SessionOptions {
            dump,
            world: in_world.then_some(focusdpo::train::session::WorldSpec::FromEnv),
            ..SessionOptions::default()
        },
    );
    let bar = ProgressBar::hidden();
    let mut times = Vec::new();
    let mut last_loss = f32::NAN;
    // Bytes of the base read while it loads (a real-size backbone takes minutes).
    let mut loading: Option<(std::sync::Arc<focusdpo::model::weights::LoadProgress>, ProgressBar)> = None;
    loop {
        let event = match session.events().recv_timeout(Duration::from_millis(200)) {
            Ok(e) => e,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Some((progress, bar)) = &loading {
                    let snap = progress.snapshot();
                    bar.set_length(snap.total.max(snap.read));
                    bar.set_position(snap.read);
                    bar.set_message(format!("loading the base: {}", snap.part));
                }
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => bail!("the training thread ended unexpectedly"),
        };
        match event {
            Event::Loading(progress) => {
                if !args.plain {
                    let bar = ProgressBar::new(0).with_style(
                        ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} [{elapsed_precise}]")
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    loading = Some((progress, bar));
                }
            }
            Event::Started {
                run_dir,
                start_step,
                total_steps,
                trainable,
                items,
            } => {
                if let Some((_, bar)) = loading.take() {
                    bar.finish_and_clear();
                }
                eprintln!(
                    "run {}: {} items, {trainable} trainable LoRA parameters, steps {}..{total_steps}",
                    run_dir.display(),
                    items,
                    start_step + 1
                );
                if !args.plain {
                    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                    bar.set_length(total_steps);
                    bar.set_position(start_step);
                    bar.set_style(
                        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                }
            }
            Event::Step(r) => {
                times.push(r.seconds);
                last_loss = r.stats.loss;
                let a = r.a_focus.map_or("-".to_string(), |a| format!("{a:.2}"));
                let msg = format!(
                    "loss {:.4} acc {:.2} margin {:+.3} A_focus {a} |g| {:.3} {:.0} ms",
                    r.stats.loss,
                    r.stats.implicit_accuracy,
                    r.stats.reward_margin,
                    r.grad_norm,
                    r.seconds * 1e3
                );
                if args.plain {
                    println!("step {} {}: {msg}", r.step, r.item);
                } else {
                    bar.set_position(r.step);
                    bar.set_message(msg);
                }
            }
            Event::Masks(_) => {}
            Event::Pairs(p) => {
                let threshold = p.threshold.map_or_else(|| "none".to_string(), |t| format!("{t:.4}"));
                let line = format!(
                    "pairs: kept {} of {} ({} after the bottom filter), threshold {threshold}; mean ψ_w {:.3}, ψ_l \
                     {:.3}, ψ_w > ψ_l in {:.0} % (pairs.json)",
                    p.kept,
                    p.total,
                    p.after_bottom,
                    p.mean_psi_w,
                    p.mean_psi_l,
                    p.winner_preferred * 100.0
                );
                note(&bar, args.plain, line);
            }
            Event::Checkpoint(c) => note(&bar, args.plain, format!("checkpoint {}", c.dir.display())),
            Event::Samples { path, .. } => note(&bar, args.plain, format!("sample sheet {}", path.display())),
            Event::Warning(text) => note(&bar, args.plain, format!("warning: {text}")),
            Event::Dumped { step, path } => note(&bar, args.plain, format!("step {step} tensors → {}", path.display())),
            Event::Finished { step, stopped } => {
                bar.finish_and_clear();
                let mean = if times.is_empty() {
                    0.0
                } else {
                    times.iter().sum::<f64>() / times.len() as f64
                };
                println!(
                    "{} at step {step}: last loss {last_loss:.5}, {:.0} ms/step over {} steps; run in {}",
                    if stopped { "stopped" } else { "finished" },
                    mean * 1e3,
                    times.len(),
                    args.out.display()
                );
                break;
            }
            Event::Failed { step, error } => {
                if let Some((_, loading_bar)) = loading.take() {
                    loading_bar.finish_and_clear();
                }
                bar.abandon();
                session.join();
                bail!(
                    "{error} (the run keeps everything up to step {step} in {})",
                    args.out.display()
                );
            }
        }
    }
    session.join();
    Ok(())
}

/// `--resume` with the original command line: every setting the command states must equal the run's own
/// (`config.toml`); only `--steps` may change. A setting that differs is named with both values.
fn check_resume_keeps_settings(args: &TrainArgs) -> anyhow::Result<()> {
    if !args.out.join(CONFIG_FILE).is_file() {
        bail!(
            "{}: no run to resume (no {CONFIG_FILE}); drop --resume to start one",
            args.out.display()
        );
    }
    let run: RunConfig = read_config(&args.out)?;
    let mut wanted = build_config(args, Some(run.clone()))?;
    wanted.steps = run.steps;
    let changes = run.changes_to(&wanted);
    if changes.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = changes.iter().map(|c| format!("  {c}")).collect();
    bail!(
        "--resume: this command changes settings of the run in {} (run's value → this command's):\n{}\nresume \
         with the run's settings (drop or correct these options; only --steps may change), or start a new run \
         with another --out",
        args.out.display(),
        lines.join("\n")
    )
}

/// A line above the progress bar (or plain output).
fn note(bar: &ProgressBar, plain: bool, line: String) {
    if plain {
        println!("{line}");
    } else {
        bar.println(line);
    }
}
