//! `focusdpo ablate PLAN.md --out runs/PLAN`: parse and resolve an ablation plan, print the grid and what was left
//! out, and (without `--dry-run`) train every cell, resumably, evaluate each on a small synthetic benchmark (unless
//! `--no-eval`), then write results.csv, results.md and a plot per study.
//!
//! Any number of workers may share one `--out` (claims with leases, `experiment::claim`): `--cell` and
//! `--shard I/N` run part of the grid, `--slurm` writes an `sbatch` job array (one task per cell) instead of
//! running, and `focusdpo report OUT` assembles the results of whatever has finished.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use super::backbone::BackboneArgs;
use anyhow::Context;
use clap::Args;
use focusdpo::eval::benchmark::BenchmarkConfig;
use focusdpo::eval::sampler::SamplerChoices;
use focusdpo::experiment::grid::{BASELINE, Cell, build_grid, unique_ids};
use focusdpo::experiment::resolve::{Override, Resolution, model_overrides, resolve_plan};
use focusdpo::experiment::runner::{CELL_EVAL_STEPS, Progress, Sharing, cell_benchmark, run_grid};
use focusdpo::experiment::slurm::{SlurmJob, SlurmResources, sbatch_script};
use focusdpo::experiment::store::{CellActivity, GRID_FILE, PLAN_COPY, ResultStore};
use focusdpo::experiment::{read_plan_file, read_plan_file_bytes};
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
    #[arg(long, default_value_t = CELL_EVAL_STEPS)]
    eval_steps: usize,
    /// Train only: no benchmark (results hold the training metrics only).
    #[arg(long)]
    no_eval: bool,
    /// Write no plots.
    #[arg(long)]
    no_plots: bool,
    /// Run only this cell (its id; repeatable).
    #[arg(long = "cell", value_name = "ID")]
    cells: Vec<String>,
    /// Run only shard I of N: the distinct cells whose position modulo N is I (0-based).
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    /// Seconds a worker's claim on a cell holds without renewal (it renews every third); a dead worker's cells are
    /// taken over after this.
    #[arg(long, default_value_t = focusdpo::experiment::claim::DEFAULT_LEASE.as_secs())]
    lease_seconds: u64,
    /// Write OUT/ablate.sbatch, a Slurm job array with one task per cell, instead of running.
    #[arg(long)]
    slurm: bool,
    /// Slurm partition (`--partition`).
    #[arg(long, value_name = "NAME")]
    slurm_partition: Option<String>,
    /// GPUs per task (`--gres=gpu:N`; 0: none).
    #[arg(long, default_value_t = 1, value_name = "N")]
    slurm_gpus: u32,
    /// CPU cores per task.
    #[arg(long, default_value_t = 8, value_name = "N")]
    slurm_cpus: u32,
    /// Memory per task (`--mem`).
    #[arg(long, default_value = "64G", value_name = "SIZE")]
    slurm_mem: String,
    /// Time limit per task (`--time`); a task that hits it leaves a checkpoint the next worker resumes.
    #[arg(long, default_value = "04:00:00", value_name = "HH:MM:SS")]
    slurm_time: String,
    /// Tasks running at once (`--array=…%N`; 0: no limit).
    #[arg(long, default_value_t = 0, value_name = "N")]
    slurm_max_parallel: u32,
}

/// `--shard I/N` as (I, N).
fn parse_shard(text: &str) -> anyhow::Result<(usize, usize)> {
    let parsed = text
        .split_once('/')
        .and_then(|(i, n)| Some((i.trim().parse::<usize>().ok()?, n.trim().parse::<usize>().ok()?)));
    match parsed {
        Some((i, n)) if n > 0 && i < n => Ok((i, n)),
        _ => anyhow::bail!("--shard {text}: expected I/N with 0 ≤ I < N, e.g. --shard 0/4"),
    }
}

/// The distinct cells this worker takes: all, the `--cell` ones, or shard I of N.
fn select_cells(args: &AblateArgs, cells: &[Cell]) -> anyhow::Result<Vec<Cell>> {
    let distinct = unique_ids(cells);
    for id in &args.cells {
        if !distinct.contains(&id.as_str()) {
            anyhow::bail!(
                "--cell {id}: not a cell of this grid (--dry-run lists them; the ids change with --steps, --seeds \
                 and --set)"
            );
        }
    }
    let shard = args.shard.as_deref().map(parse_shard).transpose()?;
    let keep = |id: &String| -> bool {
        let position = distinct.iter().position(|d| *d == id.as_str()).unwrap_or(0);
        (args.cells.is_empty() || args.cells.contains(id)) && shard.is_none_or(|(i, n)| position % n == i)
    };
    Ok(cells.iter().filter(|c| keep(&c.id)).cloned().collect())
}

/// This command's own arguments without the `--slurm*` ones (and their values) and without `--cell`/`--shard`.
fn task_arguments() -> Vec<String> {
    super::own_args_without(
        &["--slurm"],
        &[
            "--slurm-partition",
            "--slurm-gpus",
            "--slurm-cpus",
            "--slurm-mem",
            "--slurm-time",
            "--slurm-max-parallel",
            "--cell",
            "--shard",
        ],
    )
}

/// The job array of this command: one task per distinct cell, each running this command on its cell.
fn slurm_job(args: &AblateArgs, ids: &[String]) -> anyhow::Result<SlurmJob> {
    Ok(SlurmJob {
        name: args
            .plan
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default(),
        plan: args.plan.clone(),
        exe: std::env::current_exe().context("the path of this focusdpo binary")?,
        workdir: std::env::current_dir().context("the current folder")?,
        task_args: task_arguments(),
        out: args.out.clone(),
        cells: ids.to_vec(),
        resources: SlurmResources {
            partition: args.slurm_partition.clone(),
            gpus: args.slurm_gpus,
            cpus: args.slurm_cpus,
            mem: args.slurm_mem.clone(),
            time: args.slurm_time.clone(),
            max_parallel: args.slurm_max_parallel,
        },
    })
}

/// Writes the assembled results of a shared results folder (`focusdpo report OUT`, and every worker at its end):
/// whatever has finished, failed markers, cells still claimed.
pub fn report_grid(out: &Path, plots: bool) -> anyhow::Result<()> {
    let store = ResultStore::open(out)?;
    let grid = store.read_grid()?.with_context(|| {
        format!(
            "{}: no {GRID_FILE}: not a results folder written by focusdpo ablate",
            out.display()
        )
    })?;
    let plan = read_plan_file(&out.join(PLAN_COPY))?;
    let resolution = resolve_plan(&plan);
    let ids = unique_ids(&grid.cells);
    let (mut finished, mut failed, mut running) = (0, Vec::new(), 0);
    for id in &ids {
        match store.activity(id)? {
            CellActivity::Finished(_) => finished += 1,
            CellActivity::Failed { .. } => failed.push(id.to_string()),
            CellActivity::Claimed(_) => running += 1,
            CellActivity::Waiting => {}
        }
    }
    let files = store.write_results(grid.title.as_deref(), &resolution, &grid.cells, &failed, plots)?;
    println!(
        "{} cells: {finished} finished, {} failed, {running} claimed by a worker, {} waiting",
        ids.len(),
        failed.len(),
        ids.len() - finished - failed.len() - running
    );
    println!("{}", files.markdown.display());
    println!("{}", files.csv.display());
    for p in &files.plots {
        println!("{}", p.display());
    }
    Ok(())
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
        sampler: SamplerChoices {
            steps: Some(args.eval_steps),
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
        if let Some(why) = &study.reason {
            println!("  chosen: {}", why.text());
        }
        for v in &study.values {
            let sets: Vec<String> = v.overrides.iter().map(Override::arg).collect();
            println!("  {:<50} → {}", v.text, sets.join(" "));
        }
        let metrics: Vec<String> = study
            .metrics
            .iter()
            .map(|m| match m.matched.shown_id() {
                Some(id) => format!("{} → {id}", m.text),
                None => format!("{} → unavailable", m.text),
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
    let (plan, plan_text) = read_plan_file_bytes(&args.plan)?;
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
    let mine = select_cells(args, &cells)?;
    let store = ResultStore::open(&args.out)?;
    store.write_grid(plan.title.as_deref(), &resolution, &cells, &plan_text)?;
    if args.slurm {
        let ids: Vec<String> = unique_ids(&mine).into_iter().map(String::from).collect();
        let path = store.write_sbatch(&sbatch_script(&slurm_job(args, &ids)?))?;
        println!(
            "wrote {} ({} array tasks); submit it with: sbatch {}",
            path.display(),
            ids.len(),
            path.display()
        );
        return Ok(());
    }
    let sharing = Sharing {
        lease: Duration::from_secs(args.lease_seconds.max(1)),
        ..Sharing::default()
    };
    let base = RunConfig::default();
    let stop = AtomicBool::new(false);
    let mut on_progress = |p: Progress<'_>| match p {
        Progress::Skipped { cell } => eprintln!("cell {} ({} / {}): trained earlier", cell.id, cell.study, cell.value),
        Progress::Busy { cell, worker } => eprintln!(
            "cell {} ({} / {}): running on {worker}",
            cell.id, cell.study, cell.value
        ),
        Progress::Lost { cell } => eprintln!(
            "  {}: this worker's claim expired and another worker took the cell over; it goes on there",
            cell.id
        ),
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
    let report = run_grid(
        &mine,
        &base,
        None,
        &store,
        eval.as_ref(),
        &stop,
        &sharing,
        &mut on_progress,
    )?;
    println!(
        "{} run ({} resumed), {} finished earlier, {} running on other workers, {} failed; {} evaluated, {} \
         evaluated earlier, {} evaluations failed",
        report.finished,
        report.resumed,
        report.skipped,
        report.busy,
        report.failed.len(),
        report.evaluated,
        report.eval_skipped,
        report.eval_failed.len(),
    );
    // The whole grid's results from whatever has finished, this worker's cells and others'.
    report_grid(&args.out, !args.no_plots)?;
    for (id, error) in report.failed.iter().chain(&report.eval_failed) {
        println!("  {id}: {error}");
    }
    Ok(())
}
