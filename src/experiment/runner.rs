//! Runs the cells of a grid one after another through the training [`Session`], skipping finished cells and
//! resuming interrupted ones from their latest checkpoint, then evaluates each finished cell on the synthetic
//! benchmark (its base + LoRA, as `focusdpo eval --run` does) unless its eval.json already holds that benchmark.
//! Progress goes through a callback (the CLI prints it; the Studio forwards it over a channel).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::claim::{ClaimHandle, ClaimOutcome, Lease, log_attempt, try_claim};
use super::grid::Cell;
use super::results::FinishedCell;
use super::store::{ResultStore, StoreError};
use crate::eval::benchmark::{BenchmarkConfig, BenchmarkReport, ExtraEmbedders, run_benchmark};
use crate::model::BaseModel;
use crate::train::{Event, Launch, RunConfig, Session, SessionOptions};

/// What happens while a grid runs.
#[derive(Debug)]
pub enum Progress<'a> {
    /// A cell was already trained in the store.
    Skipped {
        /// The cell.
        cell: &'a Cell,
    },
    /// Another worker holds the cell's claim (it is running there).
    Busy {
        /// The cell.
        cell: &'a Cell,
        /// The worker holding it.
        worker: String,
    },
    /// This worker's claim on the running cell expired and another worker took the cell over: it stopped here.
    Lost {
        /// The cell.
        cell: &'a Cell,
    },
    /// A cell's run starts (or resumes an interrupted attempt from its latest checkpoint).
    Started {
        /// Position among the distinct cells (from 1).
        index: usize,
        /// Distinct cells of the grid.
        total: usize,
        /// The cell.
        cell: &'a Cell,
        /// Whether an interrupted attempt is resumed.
        resume: bool,
    },
    /// A step of the running cell.
    Step {
        /// The cell.
        cell: &'a Cell,
        /// Step (from 1).
        step: u64,
        /// Its loss.
        loss: f32,
    },
    /// A cell finished training; its training values were written.
    Finished {
        /// The cell.
        cell: &'a Cell,
        /// Its training values.
        finished: FinishedCell,
    },
    /// A cell could not run (bad override, training error); the grid goes on.
    Failed {
        /// The cell.
        cell: &'a Cell,
        /// Why.
        error: String,
    },
    /// A finished cell's benchmark starts.
    Evaluating {
        /// The cell.
        cell: &'a Cell,
    },
    /// An item of the benchmark was generated.
    EvalItem {
        /// The cell.
        cell: &'a Cell,
        /// `single` or `multi`.
        split: String,
        /// Items done in the split.
        done: usize,
        /// Items of the split.
        items: usize,
    },
    /// A cell's eval.json was written.
    Evaluated {
        /// The cell.
        cell: &'a Cell,
        /// The report.
        report: Box<BenchmarkReport>,
    },
    /// A cell's evaluation failed (it stays finished; the next run tries again).
    EvalFailed {
        /// The cell.
        cell: &'a Cell,
        /// Why.
        error: String,
    },
}

/// Sampler steps of a cell's benchmark by default.
pub const CELL_EVAL_STEPS: usize = 12;

/// The benchmark each cell gets by default: 4 single- and 4 multi-subject held-out items, one image each, 12
/// sampler steps (about a minute per cell on 2 cores with the tiny base); `focusdpo ablate --eval-*` and the
/// Studio's Experiments tab start from it.
pub fn cell_benchmark() -> BenchmarkConfig {
    let default = BenchmarkConfig::default();
    BenchmarkConfig {
        single_items: 4,
        multi_items: 4,
        samples_per_item: 1,
        sampler: crate::eval::sampler::SamplerChoices {
            steps: Some(CELL_EVAL_STEPS),
            ..default.sampler
        },
        ..default
    }
}

/// How a grid run ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Cells trained to the end now.
    pub finished: usize,
    /// Of those, cells resumed from an interrupted attempt.
    pub resumed: usize,
    /// Cells found trained.
    pub skipped: usize,
    /// Cells that failed, with the error.
    pub failed: Vec<(String, String)>,
    /// Cells evaluated now.
    pub evaluated: usize,
    /// Cells whose eval.json already held this benchmark.
    pub eval_skipped: usize,
    /// Cells whose evaluation failed, with the error.
    pub eval_failed: Vec<(String, String)>,
    /// Whether a stop request ended the run early.
    pub stopped: bool,
    /// Cells other workers were running.
    pub busy: usize,
}

/// Who this worker is among those sharing a store ([`super::claim`]).
#[derive(Clone, Debug)]
pub struct Sharing {
    /// The worker's name in claims and `attempts.jsonl`.
    pub worker: String,
    /// How long a claim holds without renewal.
    pub lease: Duration,
}

impl Default for Sharing {
    fn default() -> Self {
        Self {
            worker: super::claim::worker_name(),
            lease: super::claim::DEFAULT_LEASE,
        }
    }
}

/// Runs every distinct unfinished cell of `cells` with `base` config plus the cell's overrides, then (with `eval`)
/// evaluates every finished cell whose eval.json is missing or was made with other benchmark settings.
/// `base_model` (if given) is shared by new cells whose model settings equal `base`'s. A cell whose folder holds
/// an interrupted run resumes it from its latest checkpoint. A failed cell is reported and the next one runs;
/// `stop` ends the grid after the current training step (that cell resumes next time) or after the current
/// evaluation (which cannot be interrupted); a trained cell whose evaluation was not started is evaluated next
/// time.
///
/// Several workers (processes, Slurm array tasks) may run the same grid over one store: each cell is worked on
/// only under its claim ([`super::claim`]), so a cell another worker holds is passed over ([`Progress::Busy`]), a
/// dead worker's cell is taken over once its lease expires, and a finished cell is never trained again.
#[allow(clippy::too_many_arguments)]
pub fn run_grid(
    cells: &[Cell],
    base: &RunConfig,
    base_model: Option<&BaseModel>,
    store: &ResultStore,
    eval: Option<&BenchmarkConfig>,
    stop: &AtomicBool,
    sharing: &Sharing,
    on_progress: &mut dyn FnMut(Progress<'_>),
) -> Result<RunReport, StoreError> {
    let mut report = RunReport::default();
    let mut seen = HashSet::new();
    let distinct: Vec<&Cell> = cells.iter().filter(|c| seen.insert(c.id.clone())).collect();
    for (i, cell) in distinct.iter().enumerate() {
        if stop.load(Ordering::SeqCst) {
            report.stopped = true;
            break;
        }
        let evaluated = eval.is_none_or(|cfg| store.evaluated_with(&cell.id, cfg));
        if store.finished(&cell.id)?.is_some() && evaluated {
            report.skipped += 1;
            report.eval_skipped += usize::from(eval.is_some());
            on_progress(Progress::Skipped { cell });
            continue;
        }
        let handle = match try_claim(store.root(), &cell.id, &sharing.worker, sharing.lease)? {
            ClaimOutcome::Claimed(h) => h,
            ClaimOutcome::Held(other) => {
                report.busy += 1;
                on_progress(Progress::Busy {
                    cell,
                    worker: other.worker,
                });
                continue;
            }
        };
        let lost = Arc::new(AtomicBool::new(false));
        let lease = Lease::start(handle.clone(), lost.clone());
        let grid = Grid {
            base,
            base_model,
            store,
            stop,
            lost: &lost,
        };
        let outcome = work_on_cell(
            &grid,
            cell,
            &handle,
            (i + 1, distinct.len()),
            eval,
            &mut report,
            on_progress,
        );
        drop(lease);
        if lost.load(Ordering::SeqCst) {
            on_progress(Progress::Lost { cell });
        } else {
            handle.release()?;
        }
        outcome?;
        if report.stopped || stop.load(Ordering::SeqCst) {
            report.stopped = true;
            break;
        }
    }
    if stop.load(Ordering::SeqCst) {
        report.stopped = true;
    }
    Ok(report)
}

/// Trains (unless finished: another worker may have finished it since it was looked at) and evaluates one
/// claimed cell.
fn work_on_cell(
    grid: &Grid<'_>,
    cell: &Cell,
    handle: &ClaimHandle,
    position: (usize, usize),
    eval: Option<&BenchmarkConfig>,
    report: &mut RunReport,
    on_progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(), StoreError> {
    let store = grid.store;
    if store.finished(&cell.id)?.is_some() {
        report.skipped += 1;
        on_progress(Progress::Skipped { cell });
    } else if !train_cell(grid, cell, handle, position, report, on_progress)? {
        return Ok(());
    }
    if report.stopped || grid.stop.load(Ordering::SeqCst) || grid.lost.load(Ordering::SeqCst) {
        return Ok(());
    }
    if let Some(cfg) = eval {
        evaluate_cell(cell, cfg, store, report, on_progress)?;
    }
    Ok(())
}

/// What every cell of a grid run shares.
struct Grid<'a> {
    base: &'a RunConfig,
    base_model: Option<&'a BaseModel>,
    store: &'a ResultStore,
    stop: &'a AtomicBool,
    /// Set when this worker's claim on the cell was lost.
    lost: &'a AtomicBool,
}

/// Trains one unfinished cell (new or resumed). Returns whether it is finished now.
fn train_cell(
    grid: &Grid<'_>,
    cell: &Cell,
    handle: &ClaimHandle,
    (index, total): (usize, usize),
    report: &mut RunReport,
    on_progress: &mut dyn FnMut(Progress<'_>),
) -> Result<bool, StoreError> {
    let Grid {
        base,
        base_model,
        store,
        stop,
        lost,
    } = *grid;
    let fail = |report: &mut RunReport, error: String, on_progress: &mut dyn FnMut(Progress<'_>)| {
        let written = store.mark_failed(&cell.id, &error, handle.worker());
        report.failed.push((cell.id.clone(), error.clone()));
        on_progress(Progress::Failed { cell, error });
        written
    };
    let config = match base
        .with_overrides(&cell.overrides)
        .and_then(|c| c.validate().map(|()| c))
    {
        Ok(c) => c,
        Err(e) => {
            fail(report, e.to_string(), on_progress)?;
            return Ok(false);
        }
    };
    let resume = store.resumable(&cell.id)?;
    on_progress(Progress::Started {
        index,
        total,
        cell,
        resume,
    });
    let shared = base_model.filter(|_| config.model == base.model).cloned();
    let launch = if resume {
        Launch::Resume {
            dir: store.cell_dir(&cell.id),
            steps: None,
        }
    } else {
        Launch::New {
            config: Box::new(config),
            dir: store.prepare_cell(cell)?,
        }
    };
    log_attempt(&store.cell_dir(&cell.id), handle, resume)?;
    match run_cell(cell, launch, shared, &[stop, lost], on_progress) {
        CellEnd::Finished => {
            let finished = store.finish_cell(cell)?;
            report.finished += 1;
            report.resumed += usize::from(resume);
            on_progress(Progress::Finished { cell, finished });
            Ok(true)
        }
        CellEnd::Stopped => {
            // A lost claim stops this cell only; the grid goes on with the next.
            if !lost.load(Ordering::SeqCst) {
                report.stopped = true;
            }
            Ok(false)
        }
        CellEnd::Failed(error) => {
            fail(report, error, on_progress)?;
            Ok(false)
        }
    }
}

/// Evaluates a finished cell unless its eval.json was made with `cfg`; writes eval.json.
fn evaluate_cell(
    cell: &Cell,
    cfg: &BenchmarkConfig,
    store: &ResultStore,
    report: &mut RunReport,
    on_progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(), StoreError> {
    // A corrupt eval.json is evaluated again rather than stopping the grid; one made with other settings is
    // removed first, so a failed re-evaluation cannot leave old-settings values in the tables.
    match store.eval_report(&cell.id) {
        Ok(Some(existing)) if existing.config == *cfg => {
            report.eval_skipped += 1;
            return Ok(());
        }
        Ok(None) => {}
        Ok(Some(_)) | Err(_) => store.remove_eval(&cell.id)?,
    }
    on_progress(Progress::Evaluating { cell });
    let dir = store.cell_dir(&cell.id);
    let result = (|| -> Result<BenchmarkReport, String> {
        let run: RunConfig = crate::train::run_store::read_config(&dir).map_err(|e| e.to_string())?;
        let device = run.model.device().map_err(|e| e.to_string())?;
        let (model, step) = crate::train::session::load_run_model(&dir, &device).map_err(|e| e.to_string())?;
        let name = format!(
            "cell {} ({} / {}, seed {}) @ step {step}",
            cell.id, cell.study, cell.value, cell.seed
        );
        let (r, _images) = run_benchmark(&model, &name, cfg, &ExtraEmbedders::default(), |split, done, items| {
            on_progress(Progress::EvalItem {
                cell,
                split: split.to_string(),
                done,
                items,
            })
        })
        .map_err(|e| e.to_string())?;
        Ok(r)
    })();
    match result {
        Ok(r) => {
            store.write_eval(&cell.id, &r)?;
            report.evaluated += 1;
            on_progress(Progress::Evaluated {
                cell,
                report: Box::new(r),
            });
        }
        Err(error) => {
            report.eval_failed.push((cell.id.clone(), error.clone()));
            on_progress(Progress::EvalFailed { cell, error });
        }
    }
    Ok(())
}

enum CellEnd {
    Finished,
    Stopped,
    Failed(String),
}

/// Runs a cell's session to its end; any of `stops` set stops it after the current step (with a checkpoint).
fn run_cell(
    cell: &Cell,
    launch: Launch,
    base: Option<BaseModel>,
    stops: &[&AtomicBool],
    on_progress: &mut dyn FnMut(Progress<'_>),
) -> CellEnd {
    let session = Session::start(
        launch,
        SessionOptions {
            dump: None,
            base,
            ..SessionOptions::default()
        },
    );
    let end = loop {
        if stops.iter().any(|s| s.load(Ordering::SeqCst)) {
            session.stop();
        }
        let event = match session.events().recv_timeout(Duration::from_millis(200)) {
            Ok(e) => e,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break CellEnd::Failed("the training thread ended unexpectedly".into());
            }
        };
        match event {
            Event::Step(r) => on_progress(Progress::Step {
                cell,
                step: r.step,
                loss: r.stats.loss,
            }),
            Event::Finished { stopped: false, .. } => break CellEnd::Finished,
            Event::Finished { stopped: true, .. } => break CellEnd::Stopped,
            Event::Failed { error, .. } => break CellEnd::Failed(error),
            _ => {}
        }
    };
    session.join();
    end
}
