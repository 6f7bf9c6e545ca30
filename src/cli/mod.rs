//! Command-line front end. Each subcommand parses its arguments, calls the library, and prints; errors are
//! `anyhow` with context, reported once in `main`.

mod dip;
mod masks;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// FocusDPO Studio: spatially-weighted Diffusion-DPO for multi-subject personalized generation.
#[derive(Debug, Parser)]
#[command(name = "focusdpo", version, about, long_about = None, arg_required_else_help = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
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
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Dip(cmd) => dip::run(cmd),
        Command::Masks(args) => masks::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Train(args) => train::run(&args).map(|()| ExitCode::SUCCESS),
    }
}
