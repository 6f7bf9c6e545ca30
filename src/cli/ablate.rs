//! `focusdpo ablate PLAN.md --out runs/PLAN`: parse and resolve an ablation plan, print the grid and what was left
//! out, and (without `--dry-run`) train every cell, resumably, evaluate each on a small synthetic benchmark (unless
//! `--no-eval`), then write results.csv, results.md and a plot per study.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use super::backbone::BackboneArgs;
use anyhow::Context;
use clap::Args;
use focusdpo::eval::benchmark::BenchmarkConfig;
use focusdpo::eval::sampler::SampleSettings;
use focusdpo::experiment::grid::{BASELINE, Cell, build_grid, unique_ids};
use focusdpo::experiment::read_plan_file;
use focusdpo::experiment::resolve::{MetricMatch, Override, Resolution, model_overrides, resolve_plan};
use focusdpo::experiment::runner::{Progress, cell_benchmark, run_grid};
use focusdpo::experiment::store::ResultStore;
use focusdpo::train::RunConfig;

#[derive(Debug, Args)]
pub struct AblateArgs {
    /// The plan (Markdown, the seeds' format).
    plan: PathBuf,
    /// Results folder: cells/<id>/ run folders, resolution.json, results.csv.
    #[arg(long)]
    out: PathBuf,
    /// Optimiser steps of every cell (default: the run config's).
    #[arg(long)]
    steps: Option<u64>,
    /// Seeds per cell: 0..K.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// The backbone of every cell (default: the bundled tiny base).
    #[command(flatten)]
    backbone: BackboneArgs,
    /// A plan-wide override of every cell, before the study's own (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the resolved grid and the unresolved items; train nothing.
    #[arg(long)]
    dry_run: bool,
    /// Single-subject held-out benchmark items per cell.
    #[arg(long, default_value_t = cell_benchmark().single_items)]
    eval_single: usize,
    /// Multi-subject held-out benchmark items per cell.
    #[arg(long, default_value_t = cell_benchmark().multi_items)]
    eval_multi: usize,
    /// Images per benchmark item.
    #[arg(long, default_value_t = cell_benchmark().samples_per_item)]
    eval_samples: usize,
    /// Sampler steps of the benchmark.
    #[arg(long, default_value_t = cell_benchmark().sampler.steps)]
    eval_steps: usize,
    /// Train only: no benchmark (results hold the training metrics only).
    #[arg(long)]
    no_eval: bool,
    /// Write no plots.
    #[arg(long)]
    no_plots: bool,
}

/// The per-cell benchmark of the arguments (`None` with `--no-eval`).
fn eval_config(args: &AblateArgs) -> anyhow::Result<Option<BenchmarkConfig>> {
    if args.no_eval {
        return Ok(None);
    }
    if args.eval_samples == 0 || args.eval_steps == 0 || args.eval_single + args.eval_multi == 0 {
        anyhow::bail!(
            "--eval-samples and --eval-steps must be at least 1 and --eval-single/--eval-multi not both 0 (or use \
             --no-eval)"
        );
    }
    let default = cell_benchmark();
    Ok(Some(BenchmarkConfig {
        single_items: args.eval_single,
        multi_items: args.eval_multi,
        samples_per_item: args.eval_samples,
        sampler: SampleSettings {
            steps: args.eval_steps,
            ..default.sampler
        },
        ..default
    }))
}

fn plan_wide_overrides(args: &AblateArgs) -> anyhow::Result<Vec<Override>> {
    let mut out = Vec::new();
    if args.backbone.given() {
        out.extend(model_overrides(&args.backbone.settings()?));
    }
    if let Some(s) = args.steps {
        out.push(Override {
            key: "steps".into(),
            value: s.to_string(),
        });
    }
    for s in &args.set {
        let (key, value) = s
            .split_once('=')
            .with_context(|| format!("--set {s}: expected key=value"))?;
        out.push(Override {
            key: key.trim().into(),
            value: value.trim().into(),
        });
    }
    Ok(out)
}

fn print_resolution(resolution: &Resolution, cells: &[Cell]) {
    for study in &resolution.studies {
        let knob = study.knob.as_deref().unwrap_or("(unresolved)");
        println!("study \"{}\" (line {}): {knob}", study.title, study.line);
        for v in &study.values {
            let sets: Vec<String> = v.overrides.iter().map(Override::arg).collect();
            println!("  {:<50} → {}", v.text, sets.join(" "));
        }
        let metrics: Vec<String> = study
            .metrics
            .iter()
            .map(|m| match &m.matched {
                MetricMatch::Available { id, .. } => format!("{} → {id}", m.text),
                MetricMatch::Unavailable { .. } => format!("{} → unavailable", m.text),
            })
            .collect();
        println!("  metrics: {}", metrics.join(", "));
    }
    if !resolution.unresolved.is_empty() {
        println!("\nleft out ({}):", resolution.unresolved.len());
        for u in &resolution.unresolved {
            println!("  {u}");
        }
    }
    let baselines = cells.iter().filter(|c| c.study == BASELINE).count();
    println!(
        "\ngrid: {} cells ({} baseline), {} distinct runs",
        cells.len(),
        baselines,
        unique_ids(cells).len()
    );
    for c in cells {
        println!("  {} {:<30} {:<40} {}", c.id, c.study, c.value, c.overrides.join(" "));
    }
}

pub fn run(args: &AblateArgs) -> anyhow::Result<()> {
    let plan = read_plan_file(&args.plan)?;
    if let Some(t) = &plan.title {
        println!("plan: {t}");
    }
    for w in &plan.warnings {
        eprintln!("warning: {}: {w}", args.plan.display());
    }
    let resolution = resolve_plan(&plan);
    let seeds: Vec<u64> = (0..args.seeds.max(1)).collect();
    let cells = build_grid(&resolution, &plan_wide_overrides(args)?, &seeds);
    print_resolution(&resolution, &cells);
    if args.dry_run {
        return Ok(());
    }
    let eval = eval_config(args)?;
    let store = ResultStore::open(&args.out)?;
    store.write_root_json("resolution.json", &resolution)?;
    let base = RunConfig::default();
    let stop = AtomicBool::new(false);
    let mut on_progress = |p: Progress<'_>| match p {
        Progress::Skipped { cell } => eprintln!("cell {} ({} / {}): trained earlier", cell.id, cell.study, cell.value),
        Progress::Started {
            index,
            total,
            cell,
            resume,
        } => eprintln!(
            "cell {index}/{total} {} ({} / {}, seed {}){}",
            cell.id,
            cell.study,
            cell.value,
            cell.seed,
            if resume { ": resuming an interrupted run" } else { "" }
        ),
        Progress::Step { step, loss, .. } => {
            if step % 10 == 0 {
                eprintln!("  step {step}: loss {loss:.5}");
            }
        }
        Progress::Finished { cell, finished } => eprintln!(
            "  {} trained: {} steps, loss {:.5}, implicit accuracy {:.3}",
            cell.id,
            finished.steps,
            finished.values.get("train.loss").copied().unwrap_or(f64::NAN),
            finished
                .values
                .get("train.implicit_accuracy")
                .copied()
                .unwrap_or(f64::NAN),
        ),
        Progress::Failed { cell, error } => eprintln!("  {} failed: {error}", cell.id),
        Progress::Evaluating { cell } => eprintln!("  {} evaluating on the synthetic benchmark", cell.id),
        Progress::EvalItem { .. } => {}
        Progress::Evaluated { cell, report } => {
            let sims: Vec<String> = report
                .splits
                .iter()
                .map(|(split, s)| format!("{split} identity sim {:.4}", s.identity_sim))
                .collect();
            eprintln!("  {} evaluated: {}", cell.id, sims.join(", "));
        }
        Progress::EvalFailed { cell, error } => eprintln!("  {} evaluation failed: {error}", cell.id),
    };
    let report = run_grid(&cells, &base, None, &store, eval.as_ref(), &stop, &mut on_progress)?;
    let failed: Vec<String> = report.failed.iter().map(|(id, _)| id.clone()).collect();
    let files = store.write_results(plan.title.as_deref(), &resolution, &cells, &failed, !args.no_plots)?;
    println!(
        "{} run ({} resumed), {} finished earlier, {} failed; {} evaluated, {} evaluated earlier, {} evaluations failed",
        report.finished,
        report.resumed,
        report.skipped,
        report.failed.len(),
        report.evaluated,
        report.eval_skipped,
        report.eval_failed.len(),
    );
    println!("{}", files.markdown.display());
    println!("{}", files.csv.display());
    for p in &files.plots {
        println!("{}", p.display());
    }
    for (id, error) in report.failed.iter().chain(&report.eval_failed) {
        println!("  {id}: {error}");
    }
    Ok(())
}
