//! Command-line front end. Each subcommand parses its arguments, calls the library, and prints; errors are
//! `anyhow` with context, reported once in `main`.

mod ablate;
mod backbone;
mod dip;
mod eval;
mod export;
mod masks;
mod plan;
mod pretrain;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// FocusDPO Studio: spatially-weighted Diffusion-DPO for multi-subject personalized generation.
#[derive(Debug, Parser)]
#[command(name = "focusdpo", version, about, long_about = None)]
pub struct Cli {
    /// Without a subcommand the Studio window opens.
    #[command(subcommand)]
    command: Option<Command>,
    /// The Studio: open this backbone profile (a TOML file or a FLUX.1 folder) instead of the one opened last.
    #[arg(long, value_name = "PROFILE")]
    backbone: Option<std::path::PathBuf>,
    /// The Studio: open this DIP dataset folder instead of the one opened last.
    #[arg(long, value_name = "DIR")]
    data: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// DIP datasets: validate or synthesise.
    #[command(subcommand)]
    Dip(dip::DipCommand),
    /// Compute M_prior, M_d, M_s and the fused M for one dataset item and write them as safetensors (+ PNGs).
    Masks(masks::MasksArgs),
    /// Train LoRA adapters with SFT, Diffusion-DPO or FocusDPO; writes runs/NAME (config, metrics, checkpoints).
    Train(train::TrainArgs),
    /// Pretrain the tiny base from scratch on the synthetic DIP stream (resumable), or export its weights.
    Pretrain(pretrain::PretrainArgs),
    /// Generate images for one prompt and its references (Euler / DDIM with classifier-free guidance).
    Sample(eval::SampleArgs),
    /// The synthetic fidelity benchmark on a held-out split: eval.json, eval.md and sample sheets.
    Eval(eval::EvalArgs),
    /// Compare groups of runs / evals (seeds grouped by folder name): mean ± 95 % CI per metric, best marked.
    Report(eval::ReportArgs),
    /// Run an ablation plan (the seeds' Markdown format): resolve it onto run-config knobs and train the grid
    /// (baseline + each replacement × seeds), resumably; --dry-run prints the grid and what was left out.
    Ablate(ablate::AblateArgs),
    /// Export a run's trained LoRA: x-flux for UNO's own pipeline (with UNO's LoRA folded in), kohya or PEFT.
    ExportLora(export::ExportArgs),
    /// The memory plan of a training step (or a forward) on a backbone, before anything loads: weights, encoders,
    /// LoRA + optimiser, activations, attention, and which cards it fits.
    Plan(plan::PlanArgs),
}

/// Opens the Studio window.
#[cfg(feature = "gui")]
fn studio(cli: &Cli) -> anyhow::Result<ExitCode> {
    let backbone = match &cli.backbone {
        Some(p) => Some(
            focusdpo::train::backbone::read_profile(p)
                .map_err(|e| anyhow::anyhow!("--backbone {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let options = focusdpo::app::StudioOptions {
        backbone,
        dataset: cli.data.clone(),
        frame_stats_to_stderr: std::env::var_os("FOCUSDPO_FRAME_STATS").is_some_and(|v| v != "0" && !v.is_empty()),
        ..focusdpo::app::StudioOptions::default()
    };
    focusdpo::app::run(options).map(|()| ExitCode::SUCCESS)
}

/// A headless build has no window: say so and how to proceed.
#[cfg(not(feature = "gui"))]
fn studio(_cli: &Cli) -> anyhow::Result<ExitCode> {
    anyhow::bail!(
        "this focusdpo was built without the Studio (cargo's `gui` feature is off): run a command (focusdpo --help \
         lists them), or rebuild with default features for the window"
    )
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let Some(command) = cli.command else {
        return studio(&cli);
    };
    match command {
        Command::Dip(cmd) => dip::run(cmd),
        Command::Masks(args) => masks::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Train(args) => train::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Pretrain(args) => pretrain::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Sample(args) => eval::run_sample(&args).map(|()| ExitCode::SUCCESS),
        Command::Eval(args) => eval::run_eval(&args).map(|()| ExitCode::SUCCESS),
        Command::Report(args) => eval::run_report(&args).map(|()| ExitCode::SUCCESS),
        Command::Ablate(args) => ablate::run(&args).map(|()| ExitCode::SUCCESS),
        Command::ExportLora(args) => export::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Plan(args) => plan::run(&args).map(|()| ExitCode::SUCCESS),
    }
}

/// This command's own arguments (without the program name) less the `switches` and the `options` with their
/// values (`--option VALUE` or `--option=VALUE`): what it passes on to the processes it starts (`ablate --slurm`'s
/// array tasks, `train --ranks`'s ranks).
fn own_args_without(switches: &[&str], options: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if options.contains(&a.as_str()) {
            args.next();
        } else if !switches.contains(&a.as_str())
            && !options
                .iter()
                .any(|o| a.strip_prefix(o).is_some_and(|rest| rest.starts_with('=')))
        {
            out.push(a);
        }
    }
    out
}
