//! `focusdpo dip check | synth`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use focusdpo::dip::synth::{self, NegativeSource, SubjectCount, SynthConfig};
use focusdpo::dip::{CheckReport, Severity, bundled_dataset_dir, check_dataset};

#[derive(Debug, Subcommand)]
pub enum DipCommand {
    /// Validate a dataset: every line, file, size and mask. Exits 1 when any item is invalid.
    Check(CheckArgs),
    /// Generate a synthetic DIP dataset with known subject identities.
    Synth(SynthArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Dataset folder (with metadata.jsonl). Default: the bundled dataset.
    dir: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Subjects {
    #[value(name = "1")]
    One,
    #[value(name = "2")]
    Two,
    #[value(name = "3")]
    Three,
    Mixed,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Negatives {
    /// Localized perturbation strictly inside the subject mask (paper §4.1).
    Perturbed,
    /// The subject replaced by a different identity, inside its mask.
    OtherSubject,
    /// A globally augmented copy of the positive.
    Augmented,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Number of items.
    #[arg(long, default_value_t = 48)]
    items: usize,
    /// Subjects per item.
    #[arg(long, value_enum, default_value_t = Subjects::Mixed)]
    subjects: Subjects,
    /// Image side in pixels (multiple of 16, 32..=1024).
    #[arg(long, default_value_t = 64)]
    size: u32,
    /// Random seed: the same seed gives the same dataset.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Source of the negative (loser) images.
    #[arg(long, value_enum, default_value_t = Negatives::Perturbed)]
    negatives: Negatives,
}

pub fn run(cmd: DipCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DipCommand::Check(args) => check(&args),
        DipCommand::Synth(args) => synthesise(&args).map(|()| ExitCode::SUCCESS),
    }
}

fn check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let dir = args.dir.clone().unwrap_or_else(bundled_dataset_dir);
    let report = check_dataset(&dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_report(report: &CheckReport) {
    for p in &report.problems {
        let tag = match p.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        println!("{tag}[{}]: {}", p.code, p.message);
    }
    println!(
        "{}: {} line(s), {} valid item(s) ({} single-subject, {} multi-subject), {} invalid, {} error(s), {} warning(s)",
        report.root.display(),
        report.lines,
        report.valid_items,
        report.single_subject,
        report.multi_subject,
        report.invalid_items,
        report.error_count(),
        report.warning_count()
    );
}

fn synthesise(args: &SynthArgs) -> anyhow::Result<()> {
    let cfg = SynthConfig {
        items: args.items,
        subjects: match args.subjects {
            Subjects::One => SubjectCount::One,
            Subjects::Two => SubjectCount::Two,
            Subjects::Three => SubjectCount::Three,
            Subjects::Mixed => SubjectCount::Mixed,
        },
        size_px: args.size,
        seed: args.seed,
        negatives: match args.negatives {
            Negatives::Perturbed => NegativeSource::Perturbed,
            Negatives::OtherSubject => NegativeSource::OtherSubject,
            Negatives::Augmented => NegativeSource::Augmented,
        },
    };
    let start = Instant::now();
    let items = synth::synthesize(&cfg)?;
    synth::write_dataset(&args.out, &items).with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "wrote {} item(s) to {} in {:.2} s",
        items.len(),
        args.out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
