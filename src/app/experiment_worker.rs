//! The Experiments tab's threads: the UI sends [`ExperimentCommand`]s and drains [`ExperimentEvent`]s with
//! `try_recv`; it never waits.
//!
//! * The **plan thread** reads and parses a plan ([`crate::experiment::read_plan_file`]), resolves it, builds the
//!   grid for the chosen seeds, steps and base, and reads which cells the results store already holds.
//! * A **grid thread** per run drives [`run_grid`] (the runner the CLI uses) and forwards its progress; a stop
//!   flag ends it after the training step in flight. Each trained cell is evaluated on the small synthetic
//!   benchmark when asked; at the end it writes `results.csv`, `results.md` and the plots with the store's
//!   `write_results`, exactly as `focusdpo ablate` does.
//!
//! * While a grid is on screen the plan thread **watches its store** every [`WATCH_PERIOD`]: cells other workers
//!   (`focusdpo ablate --cell/--shard`, Slurm array tasks, another Studio) claim, finish or fail show up as they
//!   do, and their results join the tables.
//! * It also writes a grid's **Slurm job array** ([`crate::experiment::slurm`]), the same script
//!   `focusdpo ablate --slurm` writes.
//!
//! A cell's results are a `metric id → value` map with the study value ids of `eval::study` (`train.*` from
//! `finished.json`, `single.*` / `multi.*` from `eval.json`), so the tab and results.md show the same numbers.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use crate::eval::benchmark::BenchmarkConfig;
use crate::experiment::claim::Claim;
use crate::experiment::grid::unique_ids;
use crate::experiment::grid::{Cell, build_grid};
use crate::experiment::plan::PlanWarning;
use crate::experiment::resolve::{Override, Resolution, model_overrides, resolve_plan};
use crate::experiment::runner::{Progress, RunReport, Sharing, run_grid};
use crate::experiment::slurm::{SlurmJob, SlurmResources, check_resources, sbatch_script};
use crate::experiment::store::{CellActivity, PLAN_COPY, ResultStore};
use crate::experiment::{parse_plan, read_plan_file_bytes};
use crate::train::RunConfig;
use crate::train::config::ModelSettings;

/// A cell's results: metric id → value.
pub type Metrics = BTreeMap<String, f64>;

/// How often the plan thread reads the store of the grid on screen.
pub const WATCH_PERIOD: Duration = Duration::from_secs(2);

/// Where a plan comes from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PlanSource {
    /// A file on disk.
    File(PathBuf),
    /// One of the plans bundled with the Studio ([`BUNDLED_PLANS`]), by file name.
    Bundled(String),
}

impl PlanSource {
    /// The file name without its extension: the default results folder name.
    pub fn stem(&self) -> String {
        let name = match self {
            PlanSource::File(p) => p.file_stem().map(|s| s.to_string_lossy().into_owned()),
            PlanSource::Bundled(name) => Path::new(name).file_stem().map(|s| s.to_string_lossy().into_owned()),
        };
        name.filter(|n| !n.is_empty()).unwrap_or_else(|| "plan".into())
    }

    /// How the source is named in the window.
    pub fn label(&self) -> String {
        match self {
            PlanSource::File(p) => p.display().to_string(),
            PlanSource::Bundled(name) => format!("{name} (bundled)"),
        }
    }
}

/// The example plans bundled with the Studio: the paper's own ablations (`docs/plans`) and the two seed plans
/// (`tests/data/plans`). Each is a few kilobytes.
pub const BUNDLED_PLANS: [(&str, &str); 4] = [
    (
        "focusdpo_a3_tau_gamma.md",
        include_str!("../../docs/plans/focusdpo_a3_tau_gamma.md"),
    ),
    ("focusdpo_masks.md", include_str!("../../docs/plans/focusdpo_masks.md")),
    (
        "001_quality_pair_ranking.md",
        include_str!("../../tests/data/plans/001_quality_pair_ranking.md"),
    ),
    (
        "003_intra_class_contrastive.md",
        include_str!("../../tests/data/plans/003_intra_class_contrastive.md"),
    ),
];

/// A parsed and resolved plan.
#[derive(Clone, Debug)]
pub struct LoadedPlan {
    /// Where it came from.
    pub source: PlanSource,
    /// Its `# title`.
    pub title: Option<String>,
    /// Parser warnings, with their lines.
    pub warnings: Vec<PlanWarning>,
    /// Studies mapped onto knobs, and what was left out.
    pub resolution: Arc<Resolution>,
    /// The plan's bytes as read (copied into the results folder for `focusdpo report` and array tasks).
    pub text: Arc<[u8]>,
}

/// What the grid is built from.
#[derive(Clone, Debug, PartialEq)]
pub struct GridRequest {
    /// Seeds `0..seeds` (at least one).
    pub seeds: u64,
    /// Optimiser steps of every cell.
    pub steps: u64,
    /// The backbone of every cell.
    pub base: ModelSettings,
    /// The DIP dataset every cell trains on (the one open in the inspector); `None` = the bundled dataset.
    pub dataset: Option<PathBuf>,
    /// Results folder.
    pub out: PathBuf,
}

impl GridRequest {
    /// The plan-wide overrides: the same as `focusdpo ablate --base B --steps N [--set data.dir=D]`, so the CLI
    /// and the Studio share cells (and resume each other's grids). The bundled dataset adds no override.
    pub fn overrides(&self) -> Vec<Override> {
        let mut out = model_overrides(&self.base);
        out.push(Override {
            key: "steps".into(),
            value: self.steps.to_string(),
        });
        if let Some(dir) = &self.dataset {
            out.push(Override::string("data.dir", &dir.display().to_string()));
        }
        out
    }

    /// The seeds of every cell.
    pub fn seed_list(&self) -> Vec<u64> {
        (0..self.seeds.max(1)).collect()
    }
}

/// What a results folder holds for the cells of a grid, as any worker sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoreView {
    /// Results of the finished cells, by cell id.
    pub finished: HashMap<String, Metrics>,
    /// Cells a worker marked failed: the error and the worker.
    pub failed: HashMap<String, (String, String)>,
    /// Cells a worker holds (this Studio's own included), with the claim.
    pub claimed: HashMap<String, Claim>,
    /// Cells whose stored files could not be read, with why.
    pub unreadable: Vec<(String, String)>,
}

impl StoreView {
    /// Whether the two views differ in anything but the claims' renewal times.
    pub fn differs_from(&self, other: &StoreView) -> bool {
        let holders = |v: &StoreView| -> BTreeMap<String, (String, bool)> {
            v.claimed
                .iter()
                .map(|(id, c)| (id.clone(), (c.worker.clone(), c.expired())))
                .collect()
        };
        self.finished != other.finished
            || self.failed != other.failed
            || self.unreadable != other.unreadable
            || holders(self) != holders(other)
    }
}

/// Reads where every distinct cell of `cells` stands in the store at `out` (creating nothing).
pub fn survey_store(out: &Path, cells: &[Cell]) -> StoreView {
    let store = ResultStore::at(out);
    let mut view = StoreView::default();
    for id in unique_ids(cells) {
        match store.activity(id) {
            Ok(CellActivity::Finished(f)) => {
                view.finished.insert(id.to_string(), cell_metrics(f));
            }
            Ok(CellActivity::Failed { error, worker }) => {
                view.failed.insert(id.to_string(), (error, worker));
            }
            Ok(CellActivity::Claimed(claim)) => {
                view.claimed.insert(id.to_string(), claim);
            }
            Ok(CellActivity::Waiting) => {}
            Err(e) => view.unreadable.push((id.to_string(), e.to_string())),
        }
    }
    view
}

/// The grid of a loaded plan and what the store already holds.
#[derive(Clone, Debug)]
pub struct GridView {
    /// What it was built from.
    pub request: GridRequest,
    /// Every cell, in plan order (a cell shared by two studies appears in both).
    pub cells: Arc<Vec<Cell>>,
    /// What the store held when the grid was built.
    pub store: StoreView,
}

/// A grid's Slurm job array to write.
#[derive(Clone, Debug)]
pub struct SlurmRequest {
    /// The grid on screen.
    pub grid: Box<GridView>,
    /// Its plan.
    pub plan: Box<LoadedPlan>,
    /// Whether each task evaluates its cell (the benchmark of [`crate::experiment::runner::cell_benchmark`]).
    pub evaluate: bool,
    /// Resources per task.
    pub resources: SlurmResources,
}

/// A request to the plan thread.
#[derive(Clone, Debug)]
pub enum ExperimentCommand {
    /// Read, parse and resolve a plan.
    Load {
        /// Answer tag: only the newest load is shown.
        generation: u64,
        /// The plan.
        source: PlanSource,
    },
    /// Build the grid of a resolved plan and read the store.
    Grid {
        /// Answer tag.
        generation: u64,
        /// The resolved plan.
        resolution: Arc<Resolution>,
        /// Seeds, steps, backbone, folder (boxed: a backbone's settings are large).
        request: Box<GridRequest>,
    },
    /// Read the store of these cells every [`WATCH_PERIOD`] and report changes ([`ExperimentEvent::Store`]);
    /// `None` stops watching.
    Watch(Option<Watch>),
    /// Write the grid's Slurm job array (and grid.json, plan.md) into its results folder.
    WriteSlurm(Box<SlurmRequest>),
}

/// A store to watch.
#[derive(Clone, Debug)]
pub struct Watch {
    /// Answer tag (the grid's).
    pub generation: u64,
    /// Results folder.
    pub out: PathBuf,
    /// The grid's cells.
    pub cells: Arc<Vec<Cell>>,
}

/// Progress of a grid run, per cell id.
#[derive(Clone, Debug, PartialEq)]
pub enum RunEvent {
    /// The cell was finished earlier (its stored results).
    Skipped {
        /// Cell id.
        id: String,
        /// Its results (empty when they cannot be read).
        metrics: Metrics,
    },
    /// The cell's training starts.
    Started {
        /// Cell id.
        id: String,
    },
    /// A step of the running cell.
    Step {
        /// Cell id.
        id: String,
        /// Step (from 1).
        step: u64,
        /// Its loss.
        loss: f32,
    },
    /// The cell finished.
    Finished {
        /// Cell id.
        id: String,
        /// Its results.
        metrics: Metrics,
    },
    /// Another worker holds the cell: this run passes it over.
    Elsewhere {
        /// Cell id.
        id: String,
        /// The worker.
        worker: String,
    },
    /// The cell could not run; the grid goes on.
    Failed {
        /// Cell id.
        id: String,
        /// Why.
        error: String,
    },
    /// The run ended (all cells done, stopped, or the store failed).
    Ended(Result<(RunReport, PathBuf), String>),
}

/// What the threads send back.
#[derive(Clone, Debug)]
pub enum ExperimentEvent {
    /// A plan was read (or why not).
    Loaded {
        /// Tag of the request.
        generation: u64,
        /// The plan, or the error with the file named.
        result: Result<Box<LoadedPlan>, String>,
    },
    /// A grid was built (or why not).
    Grid {
        /// Tag of the request.
        generation: u64,
        /// The grid, or the error.
        result: Result<Box<GridView>, String>,
    },
    /// Progress of the grid run.
    Run(RunEvent),
    /// The watched store changed.
    Store {
        /// Tag of the watch.
        generation: u64,
        /// What it holds now.
        view: Box<StoreView>,
    },
    /// The Slurm script was written: its path and its number of array tasks (or why not).
    SlurmWritten(Result<(PathBuf, usize), String>),
}

#[derive(Clone)]
struct Notifier {
    tx: Sender<ExperimentEvent>,
    repaint: Arc<dyn Fn() + Send + Sync>,
}

impl Notifier {
    fn send(&self, event: ExperimentEvent) {
        let _ = self.tx.send(event);
        (self.repaint)();
    }
}

/// The plan thread, and the grid thread while a grid runs.
pub struct ExperimentWorker {
    commands: Sender<ExperimentCommand>,
    events: Receiver<ExperimentEvent>,
    notify: Notifier,
    stop: Option<Arc<AtomicBool>>,
}

impl ExperimentWorker {
    /// Starts the plan thread; `repaint` is called after every event.
    pub fn start(repaint: impl Fn() + Send + Sync + 'static) -> Self {
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (tx, rx) = mpsc::channel();
        let notify = Notifier {
            tx,
            repaint: Arc::new(repaint),
        };
        let thread_notify = notify.clone();
        let spawned = std::thread::Builder::new()
            .name("studio-plans".into())
            .spawn(move || plan_thread(&cmd_rx, &thread_notify));
        if let Err(e) = spawned {
            notify.send(ExperimentEvent::Loaded {
                generation: 0,
                result: Err(format!("cannot start the plan thread: {e}")),
            });
        }
        Self {
            commands: cmd_tx,
            events: rx,
            notify,
            stop: None,
        }
    }

    /// Sends a request to the plan thread.
    pub fn send(&self, command: ExperimentCommand) {
        let _ = self.commands.send(command);
    }

    /// The next event, if any (never blocks).
    pub fn try_recv(&self) -> Option<ExperimentEvent> {
        self.events.try_recv().ok()
    }

    /// Runs the unfinished cells of the job on a thread of its own (events arrive as [`ExperimentEvent::Run`]),
    /// then writes results.csv, results.md and the plots as `focusdpo ablate` does.
    pub fn run(&mut self, job: GridJob) -> Result<(), String> {
        let stop = Arc::new(AtomicBool::new(false));
        let notify = self.notify.clone();
        let flag = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("studio-grid".into())
            .spawn(move || {
                let ended = run_cells(&job, &flag, &notify);
                notify.send(ExperimentEvent::Run(RunEvent::Ended(ended)));
            })
            .map_err(|e| format!("cannot start the grid thread: {e}"))?;
        self.stop = Some(stop);
        Ok(())
    }

    /// Asks the running grid to end after the training step in flight (that cell reruns next time).
    pub fn stop(&self) {
        if let Some(stop) = &self.stop {
            stop.store(true, Ordering::SeqCst);
        }
    }
}

/// What the plan thread watches, and what it saw last.
#[derive(Default)]
struct Watching {
    target: Option<Watch>,
    last: Option<StoreView>,
}

impl Watching {
    fn poll(&mut self, notify: &Notifier) {
        let Some(target) = &self.target else {
            return;
        };
        let view = survey_store(&target.out, &target.cells);
        if self.last.as_ref().is_none_or(|last| view.differs_from(last)) {
            notify.send(ExperimentEvent::Store {
                generation: target.generation,
                view: Box::new(view.clone()),
            });
        }
        self.last = Some(view);
    }
}

fn plan_thread(commands: &Receiver<ExperimentCommand>, notify: &Notifier) {
    let mut watching = Watching::default();
    loop {
        let received = if watching.target.is_some() {
            commands.recv_timeout(WATCH_PERIOD)
        } else {
            commands.recv().map_err(|_| RecvTimeoutError::Disconnected)
        };
        let mut command = match received {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) => {
                watching.poll(notify);
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        // Only the newest request of each kind matters (a spinner dragged over many values).
        while let Ok(next) = commands.try_recv() {
            let same_kind = matches!(
                (&command, &next),
                (ExperimentCommand::Grid { .. }, ExperimentCommand::Grid { .. })
                    | (ExperimentCommand::Load { .. }, ExperimentCommand::Load { .. })
                    | (ExperimentCommand::Watch(_), ExperimentCommand::Watch(_))
            );
            if !same_kind {
                handle(command, notify, &mut watching);
            }
            command = next;
        }
        handle(command, notify, &mut watching);
    }
}

fn handle(command: ExperimentCommand, notify: &Notifier, watching: &mut Watching) {
    match command {
        ExperimentCommand::Watch(target) => {
            // The grid event carried the store as it was: report only changes from there on.
            *watching = Watching {
                last: target.as_ref().map(|t| survey_store(&t.out, &t.cells)),
                target,
            };
        }
        ExperimentCommand::WriteSlurm(request) => {
            notify.send(ExperimentEvent::SlurmWritten(write_slurm(&request)));
        }
        ExperimentCommand::Load { generation, source } => notify.send(ExperimentEvent::Loaded {
            generation,
            result: load_plan(source).map(Box::new),
        }),
        ExperimentCommand::Grid {
            generation,
            resolution,
            request,
        } => notify.send(ExperimentEvent::Grid {
            generation,
            result: grid_view(&resolution, *request).map(Box::new),
        }),
    }
}

/// Reads, parses and resolves a plan.
pub fn load_plan(source: PlanSource) -> Result<LoadedPlan, String> {
    let (plan, text): (_, Arc<[u8]>) = match &source {
        PlanSource::File(path) => {
            let (plan, bytes) = read_plan_file_bytes(path).map_err(|e| e.to_string())?;
            (plan, bytes.into())
        }
        PlanSource::Bundled(name) => {
            let text = BUNDLED_PLANS
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, text)| *text)
                .ok_or_else(|| format!("no bundled plan named {name}"))?;
            (
                parse_plan(text).map_err(|e| format!("{name}: {e}"))?,
                text.as_bytes().into(),
            )
        }
    };
    Ok(LoadedPlan {
        source,
        title: plan.title.clone(),
        warnings: plan.warnings.clone(),
        resolution: Arc::new(resolve_plan(&plan)),
        text,
    })
}

/// Builds the grid and reads what the store already holds (a folder that does not exist yet holds nothing).
pub fn grid_view(resolution: &Resolution, request: GridRequest) -> Result<GridView, String> {
    let cells = build_grid(resolution, &request.overrides(), &request.seed_list());
    let store = survey_store(&request.out, &cells);
    Ok(GridView {
        request,
        cells: Arc::new(cells),
        store,
    })
}

/// A finished cell's values keyed by the study value ids the CLI's results.md uses (`train.*` from
/// `finished.json`, `single.*` / `multi.*` from `eval.json` when the cell was evaluated), plus `steps`.
fn cell_metrics(finished: crate::experiment::results::FinishedCell) -> Metrics {
    let mut metrics: Metrics = finished.values.into_iter().filter(|(_, v)| v.is_finite()).collect();
    metrics.insert("steps".into(), finished.steps as f64);
    metrics
}

/// A finished cell's results from its run folder ([`cell_metrics`]); `None` when it has not finished.
pub fn read_cell_metrics(cell_dir: &Path) -> Result<Option<Metrics>, String> {
    crate::experiment::store::finished_cell_values(cell_dir)
        .map(|f| f.map(cell_metrics))
        .map_err(|e| e.to_string())
}

/// The arguments after the binary of a task of `request`'s job array: the `focusdpo ablate` command that makes
/// the same cells as the Studio (the plan copy in the results folder, the grid's overrides as `--set`s, in the
/// order [`GridRequest::overrides`] gives them).
pub fn task_arguments(request: &GridRequest, evaluate: bool, cwd: &Path) -> Vec<String> {
    let out = crate::experiment::slurm::absolute(&request.out, cwd);
    let mut args = vec![
        "ablate".to_string(),
        out.join(PLAN_COPY).to_string_lossy().into_owned(),
        "--out".into(),
        out.to_string_lossy().into_owned(),
        "--seeds".into(),
        request.seeds.max(1).to_string(),
    ];
    if !evaluate {
        args.push("--no-eval".into());
    }
    for o in request.overrides() {
        args.push("--set".into());
        args.push(o.arg());
    }
    args
}

/// Writes grid.json, plan.md and the job array's script into the grid's results folder.
pub fn write_slurm(request: &SlurmRequest) -> Result<(PathBuf, usize), String> {
    check_resources(&request.resources)?;
    let grid = &request.grid;
    let plan = &request.plan;
    let cwd = std::env::current_dir().map_err(|e| format!("the current folder: {e}"))?;
    let out = crate::experiment::slurm::absolute(&grid.request.out, &cwd);
    let store = ResultStore::open(&out).map_err(|e| e.to_string())?;
    store
        .write_grid(plan.title.as_deref(), &plan.resolution, &grid.cells, &plan.text)
        .map_err(|e| e.to_string())?;
    let cells: Vec<String> = unique_ids(&grid.cells).into_iter().map(String::from).collect();
    let job = SlurmJob {
        name: plan.source.stem(),
        plan: match &plan.source {
            PlanSource::File(p) => p.clone(),
            PlanSource::Bundled(name) => PathBuf::from(name),
        },
        exe: std::env::current_exe().map_err(|e| format!("the path of this focusdpo binary: {e}"))?,
        workdir: cwd.clone(),
        task_args: task_arguments(&grid.request, request.evaluate, &cwd),
        out,
        resources: request.resources.clone(),
        cells,
    };
    let path = store.write_sbatch(&sbatch_script(&job)).map_err(|e| e.to_string())?;
    Ok((path, job.cells.len()))
}

/// Every finite number of a JSON document, by its dotted path (`{"a": {"b": 1}}` → `a.b = 1`); arrays and text
/// are left out.
pub fn metrics_from_json(value: &serde_json::Value) -> Metrics {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut Metrics) {
        match value {
            serde_json::Value::Number(n) => {
                if let Some(v) = n.as_f64().filter(|v| v.is_finite()) {
                    out.insert(prefix.to_string(), v);
                }
            }
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Metrics::new();
    walk("", value, &mut out);
    out
}

/// A grid to run: its cells, where, and what the reports need.
#[derive(Clone, Debug)]
pub struct GridJob {
    /// The cells.
    pub cells: Arc<Vec<Cell>>,
    /// Results folder.
    pub out: PathBuf,
    /// The plan's title (for results.md).
    pub title: Option<String>,
    /// The plan's resolution (for results.md: knobs, metrics, what was left out).
    pub resolution: Arc<Resolution>,
    /// The benchmark of each trained cell, if any.
    pub eval: Option<BenchmarkConfig>,
    /// The plan's text (copied into the folder, so `focusdpo report` and other workers can read the grid).
    pub plan_text: Arc<[u8]>,
}

fn run_cells(job: &GridJob, stop: &AtomicBool, notify: &Notifier) -> Result<(RunReport, PathBuf), String> {
    let cells: &[Cell] = &job.cells;
    let store = ResultStore::open(&job.out).map_err(|e| e.to_string())?;
    store
        .write_grid(job.title.as_deref(), &job.resolution, cells, &job.plan_text)
        .map_err(|e| e.to_string())?;
    let metrics_of = |id: &str| {
        read_cell_metrics(&store.cell_dir(id))
            .ok()
            .flatten()
            .unwrap_or_default()
    };
    let send = |e: RunEvent| notify.send(ExperimentEvent::Run(e));
    let mut on_progress = |p: Progress<'_>| match p {
        Progress::Skipped { cell } => send(RunEvent::Skipped {
            id: cell.id.clone(),
            metrics: metrics_of(&cell.id),
        }),
        Progress::Started { cell, .. } => send(RunEvent::Started { id: cell.id.clone() }),
        Progress::Step { cell, step, loss } => send(RunEvent::Step {
            id: cell.id.clone(),
            step,
            loss,
        }),
        Progress::Finished { cell, .. } => send(RunEvent::Finished {
            id: cell.id.clone(),
            metrics: metrics_of(&cell.id),
        }),
        Progress::Failed { cell, error } => send(RunEvent::Failed {
            id: cell.id.clone(),
            error,
        }),
        // The cell's row refreshes with its image metrics once evaluated.
        Progress::Evaluated { cell, .. } => send(RunEvent::Finished {
            id: cell.id.clone(),
            metrics: metrics_of(&cell.id),
        }),
        Progress::EvalFailed { cell, error } => send(RunEvent::Failed {
            id: cell.id.clone(),
            error: format!("evaluation: {error}"),
        }),
        // Cells other workers hold stay pending here until their results land in the store.
        Progress::Busy { cell, worker } => send(RunEvent::Elsewhere {
            id: cell.id.clone(),
            worker,
        }),
        Progress::Lost { cell } => send(RunEvent::Elsewhere {
            id: cell.id.clone(),
            worker: "another worker (this Studio's lease expired)".into(),
        }),
        Progress::Evaluating { .. } | Progress::EvalItem { .. } => {}
    };
    let report = run_grid(
        cells,
        &RunConfig::default(),
        None,
        &store,
        job.eval.as_ref(),
        stop,
        &Sharing::default(),
        &mut on_progress,
    )
    .map_err(|e| e.to_string())?;
    let failed: Vec<String> = report.failed.iter().map(|(id, _)| id.clone()).collect();
    let files = store
        .write_results(job.title.as_deref(), &job.resolution, cells, &failed, true)
        .map_err(|e| e.to_string())?;
    Ok((report, files.markdown))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::store::FINISHED_FILE;
    use crate::model::BaseSource;

    /// The grid request of the tests: seeds, steps, a random base, the dataset, the results folder.
    fn request(seeds: u64, steps: u64, base: u64, dataset: Option<PathBuf>, out: PathBuf) -> GridRequest {
        GridRequest {
            seeds,
            steps,
            base: ModelSettings {
                base: BaseSource::Random(base),
                ..ModelSettings::default()
            },
            dataset,
            out,
        }
    }

    #[test]
    fn metrics_are_every_finite_number_by_path() {
        let v = serde_json::json!({
            "steps": 3, "loss": 0.5, "accuracy": null, "note": "x",
            "eval": {"fidelity": 0.25, "per_seed": [1, 2]}
        });
        let m = metrics_from_json(&v);
        assert_eq!(m.len(), 3);
        assert_eq!(m["steps"], 3.0);
        assert_eq!(m["loss"], 0.5);
        assert_eq!(m["eval.fidelity"], 0.25);
    }

    #[test]
    fn every_bundled_plan_loads_and_resolves() {
        for (name, _) in BUNDLED_PLANS {
            let plan = load_plan(PlanSource::Bundled(name.into())).expect(name);
            assert!(!plan.resolution.studies.is_empty(), "{name}");
        }
        assert!(load_plan(PlanSource::Bundled("nope.md".into())).is_err());
    }

    #[test]
    fn grid_matches_the_cli_overrides_and_reads_the_store() {
        let plan = load_plan(PlanSource::Bundled("focusdpo_a3_tau_gamma.md".into())).expect("loads");
        let tmp = tempfile::tempdir().expect("tempdir");
        let request = request(2, 5, 0, None, tmp.path().to_path_buf());
        let view = grid_view(&plan.resolution, request.clone()).expect("grid");
        // Baseline + 8 values, 2 seeds each.
        assert_eq!(view.cells.len(), 18);
        assert!(view.store.finished.is_empty());
        assert_eq!(
            view.cells[0].overrides,
            vec!["model.base=\"random:0\"", "steps=5", "seed=0"]
        );
        let first = &view.cells[0].id;
        let dir = tmp.path().join("cells").join(first);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join(FINISHED_FILE),
            r#"{"steps": 5, "values": {"train.loss": 0.5}}"#,
        )
        .expect("write");
        let view = grid_view(&plan.resolution, request).expect("grid");
        let m = view.store.finished.get(first).expect("finished");
        assert_eq!((m.get("train.loss"), m.get("steps")), (Some(&0.5), Some(&5.0)));
    }

    #[test]
    fn a_dataset_other_than_the_bundled_one_is_an_override_the_run_config_reads() {
        let request = request(
            1,
            5,
            0,
            Some(PathBuf::from(r#"C:\data\my "dip""#)),
            PathBuf::from("unused"),
        );
        let args: Vec<String> = request.overrides().iter().map(Override::arg).collect();
        assert!(args[2].starts_with("data.dir="), "{args:?}");
        let cfg = crate::train::config::apply_overrides(&RunConfig::default(), &args).expect("applies");
        assert_eq!(cfg.data.dir, request.dataset);
        assert_eq!(cfg.model.base, BaseSource::Random(0));
    }

    #[test]
    fn the_store_survey_sees_other_workers_claims_failures_and_results() {
        let plan = load_plan(PlanSource::Bundled("focusdpo_a3_tau_gamma.md".into())).expect("loads");
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = tmp.path().join("not yet");
        let request = request(1, 5, 0, None, out.clone());
        let view = grid_view(&plan.resolution, request).expect("grid");
        assert_eq!(view.store, StoreView::default());
        assert!(!out.exists(), "a survey creates nothing");
        let ids: Vec<&str> = unique_ids(&view.cells);
        let store = ResultStore::open(&out).expect("store");
        let lease = std::time::Duration::from_secs(60);
        assert!(matches!(
            crate::experiment::claim::try_claim(&out, ids[0], "node7:42", lease).expect("claims"),
            crate::experiment::claim::ClaimOutcome::Claimed(_)
        ));
        store.mark_failed(ids[1], "out of memory", "node8:7").expect("marks");
        std::fs::create_dir_all(store.cell_dir(ids[2])).expect("mkdir");
        std::fs::write(
            store.cell_dir(ids[2]).join(FINISHED_FILE),
            r#"{"steps": 5, "values": {"train.loss": 0.25}}"#,
        )
        .expect("write");
        std::fs::create_dir_all(store.cell_dir(ids[3])).expect("mkdir");
        std::fs::write(store.cell_dir(ids[3]).join(FINISHED_FILE), "{garbled").expect("write");
        let seen = survey_store(&out, &view.cells);
        let claim = &seen.claimed[ids[0]];
        assert_eq!(claim.worker, "node7:42");
        assert!(!claim.expired());
        assert_eq!(
            seen.failed[ids[1]],
            ("out of memory".to_string(), "node8:7".to_string())
        );
        assert_eq!(seen.finished[ids[2]]["train.loss"], 0.25);
        assert_eq!(seen.finished[ids[2]]["steps"], 5.0);
        assert_eq!(seen.unreadable.len(), 1);
        assert!(seen.unreadable[0].1.contains(FINISHED_FILE), "{:?}", seen.unreadable);
        assert_eq!(seen.finished.len() + seen.failed.len() + seen.claimed.len(), 3);
        // A renewal (a later expiry) is no change; another holder is.
        let mut renewed = seen.clone();
        renewed.claimed.get_mut(ids[0]).expect("held").expires_ms += 1000;
        assert!(!renewed.differs_from(&seen));
        renewed.claimed.get_mut(ids[0]).expect("held").worker = "node9:1".into();
        assert!(renewed.differs_from(&seen));
    }

    #[test]
    fn task_arguments_name_the_plan_copy_and_the_grid_overrides_in_order() {
        let request = request(2, 5, 3, Some(PathBuf::from("data/my dip")), PathBuf::from("runs/x"));
        let args = task_arguments(&request, false, Path::new("/work"));
        assert_eq!(
            args,
            [
                "ablate",
                "/work/runs/x/plan.md",
                "--out",
                "/work/runs/x",
                "--seeds",
                "2",
                "--no-eval",
                "--set",
                "model.base=\"random:3\"",
                "--set",
                "steps=5",
                "--set",
                "data.dir=\"data/my dip\"",
            ]
        );
        assert!(!task_arguments(&request, true, Path::new("/w")).contains(&"--no-eval".to_string()));
    }

    #[test]
    fn plan_stems() {
        assert_eq!(PlanSource::File("a/b/my plan.md".into()).stem(), "my plan");
        assert_eq!(PlanSource::Bundled("x.md".into()).stem(), "x");
    }
}
