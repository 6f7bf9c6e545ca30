//! `focusdpo ablate PLAN.md --out runs/PLAN`: parse and resolve an ablation plan, print the grid and what was left
//! out, and (without `--dry-run`) train every cell, resumably, then write results.csv.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::Args;
use focusdpo::experiment::grid::{BASELINE, Cell, build_grid, unique_ids};
use focusdpo::experiment::read_plan_file;
use focusdpo::experiment::resolve::{MetricMatch, Override, Resolution, resolve_plan};
use focusdpo::experiment::runner::{Progress, run_grid};
use focusdpo::experiment::store::ResultStore;
use focusdpo::model::BaseSource;
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
    /// Base model of every cell: `bundled`, `random:SEED` or a safetensors file.
    #[arg(long)]
    base: Option<BaseSource>,
    /// A plan-wide override of every cell, before the study's own (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the resolved grid and the unresolved items; train nothing.
    #[arg(long)]
    dry_run: bool,
}

fn plan_wide_overrides(args: &AblateArgs) -> anyhow::Result<Vec<Override>> {
    let mut out = Vec::new();
    if let Some(b) = &args.base {
        out.push(Override {
            key: "model.base".into(),
            value: format!("\"{b}\""),
        });
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
    let store = ResultStore::open(&args.out)?;
    store.write_root_json("resolution.json", &resolution)?;
    let base = RunConfig::default();
    let stop = AtomicBool::new(false);
    let mut on_progress = |p: Progress<'_>| match p {
        Progress::Skipped { cell } => eprintln!("cell {} ({} / {}): finished earlier", cell.id, cell.study, cell.value),
        Progress::Started { index, total, cell } => {
            eprintln!(
                "cell {index}/{total} {} ({} / {}, seed {})",
                cell.id, cell.study, cell.value, cell.seed
            )
        }
        Progress::Step { step, loss, .. } => {
            if step % 10 == 0 {
                eprintln!("  step {step}: loss {loss:.5}");
            }
        }
        Progress::Finished { cell, summary } => eprintln!(
            "  {} done: {} steps, loss {:.5}, implicit accuracy {:.3}",
            cell.id, summary.steps, summary.loss, summary.implicit_accuracy
        ),
        Progress::Failed { cell, error } => eprintln!("  {} failed: {error}", cell.id),
    };
    let report = run_grid(&cells, &base, None, &store, &stop, &mut on_progress)?;
    let failed: std::collections::HashMap<&str, &str> =
        report.failed.iter().map(|(id, e)| (id.as_str(), e.as_str())).collect();
    let status = |c: &Cell| -> String {
        if failed.contains_key(c.id.as_str()) {
            "failed".into()
        } else {
            match store.finished(&c.id) {
                Ok(Some(_)) => "finished".into(),
                _ => "pending".into(),
            }
        }
    };
    let csv = store.write_results_csv(&cells, &status)?;
    println!(
        "{} run, {} finished earlier, {} failed; {}",
        report.finished,
        report.skipped,
        report.failed.len(),
        csv.display()
    );
    for (id, error) in &report.failed {
        println!("  {id}: {error}");
    }
    Ok(())
}
