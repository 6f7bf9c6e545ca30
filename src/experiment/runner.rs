//! Runs the cells of a grid one after another through the training [`Session`], skipping finished cells and
//! resuming interrupted ones from their latest checkpoint, then evaluates each finished cell on the synthetic
//! benchmark (its base + LoRA, as `focusdpo eval --run` does) unless its eval.json already holds that benchmark.
//! Progress goes through a callback (the CLI prints it; the Studio forwards it over a channel).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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

/// The benchmark each cell gets by default: 4 single- and 4 multi-subject held-out items, one image each, 12
/// sampler steps (about a minute per cell on 2 cores with the tiny base); `focusdpo ablate --eval-*` and the
/// Studio's Experiments tab start from it.
pub fn cell_benchmark() -> BenchmarkConfig {
    let default = BenchmarkConfig::default();
    BenchmarkConfig {
        single_items: 4,
        multi_items: 4,
        samples_per_item: 1,
        sampler: crate::eval::sampler::SampleSettings {
            steps: 12,
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
}

/// Runs every distinct unfinished cell of `cells` with `base` config plus the cell's overrides, then (with `eval`)
/// evaluates every finished cell whose eval.json is missing or was made with other benchmark settings.
/// `base_model` (if given) is shared by new cells whose model settings equal `base`'s. A cell whose folder holds
/// an interrupted run resumes it from its latest checkpoint. A failed cell is reported and the next one runs;
/// `stop` ends the grid after the current training step (that cell resumes next time) or after the current
/// evaluation (which cannot be interrupted); a trained cell whose evaluation was not started is evaluated next
/// time.
pub fn run_grid(
    cells: &[Cell],
    base: &RunConfig,
    base_model: Option<&BaseModel>,
    store: &ResultStore,
    eval: Option<&BenchmarkConfig>,
    stop: &AtomicBool,
    on_progress: &mut dyn FnMut(Progress<'_>),
) -> Result<RunReport, StoreError> {
    let grid = Grid {
        base,
        base_model,
        store,
        stop,
    };
    let mut report = RunReport::default();
    let mut seen = HashSet::new();
    let distinct: Vec<&Cell> = cells.iter().filter(|c| seen.insert(c.id.clone())).collect();
    for (i, cell) in distinct.iter().enumerate() {
        if stop.load(Ordering::SeqCst) {
            report.stopped = true;
            break;
        }
        if store.finished(&cell.id)?.is_some() {
            report.skipped += 1;
            on_progress(Progress::Skipped { cell });
        } else if !train_cell(&grid, cell, (i + 1, distinct.len()), &mut report, on_progress)? {
            continue;
        }
        if report.stopped || stop.load(Ordering::SeqCst) {
            report.stopped = true;
            break;
        }
        if let Some(cfg) = eval {
            evaluate_cell(cell, cfg, store, &mut report, on_progress)?;
        }
    }
    if stop.load(Ordering::SeqCst) {
        report.stopped = true;
    }
    Ok(report)
}

/// What every cell of a grid run shares.
struct Grid<'a> {
    base: &'a RunConfig,
    base_model: Option<&'a BaseModel>,
    store: &'a ResultStore,
    stop: &'a AtomicBool,
}

/// Trains one unfinished cell (new or resumed). Returns whether it is finished now.
fn train_cell(
    grid: &Grid<'_>,
    cell: &Cell,
    (index, total): (usize, usize),
    report: &mut RunReport,
    on_progress: &mut dyn FnMut(Progress<'_>),
) -> Result<bool, StoreError> {
    let Grid {
        base,
        base_model,
        store,
        stop,
    } = *grid;
    let config = match base
        .with_overrides(&cell.overrides)
        .and_then(|c| c.validate().map(|()| c))
    {
        Ok(c) => c,
        Err(e) => {
            let error = e.to_string();
            report.failed.push((cell.id.clone(), error.clone()));
            on_progress(Progress::Failed { cell, error });
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
    match run_cell(cell, launch, shared, stop, on_progress) {
        CellEnd::Finished => {
            let finished = store.finish_cell(cell)?;
            report.finished += 1;
            report.resumed += usize::from(resume);
            on_progress(Progress::Finished { cell, finished });
            Ok(true)
        }
        CellEnd::Stopped => {
            report.stopped = true;
            Ok(false)
        }
        CellEnd::Failed(error) => {
            report.failed.push((cell.id.clone(), error.clone()));
            on_progress(Progress::Failed { cell, error });
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

fn run_cell(
    cell: &Cell,
    launch: Launch,
    base: Option<BaseModel>,
    stop: &AtomicBool,
    on_progress: &mut dyn FnMut(Progress<'_>),
) -> CellEnd {
    let session = Session::start(launch, SessionOptions { dump: None, base });
    let end = loop {
        if stop.load(Ordering::SeqCst) {
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
