//! Runs the cells of a grid one after another through the training [`Session`], skipping finished cells, and
//! reports progress through a callback (the CLI prints it; the Studio will forward it over a channel).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::grid::{Cell, CellSummary};
use super::store::{ResultStore, StoreError};
use crate::model::BaseModel;
use crate::train::{Event, Launch, RunConfig, Session, SessionOptions};

/// What happens while a grid runs.
#[derive(Debug)]
pub enum Progress<'a> {
    /// A cell was already finished in the store.
    Skipped {
        /// The cell.
        cell: &'a Cell,
    },
    /// A cell's run starts.
    Started {
        /// Position among the distinct cells (from 1).
        index: usize,
        /// Distinct cells of the grid.
        total: usize,
        /// The cell.
        cell: &'a Cell,
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
    /// A cell finished and was summarised.
    Finished {
        /// The cell.
        cell: &'a Cell,
        /// Its summary.
        summary: CellSummary,
    },
    /// A cell could not run (bad override, training error); the grid goes on.
    Failed {
        /// The cell.
        cell: &'a Cell,
        /// Why.
        error: String,
    },
}

/// How a grid run ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Cells run to the end now.
    pub finished: usize,
    /// Cells found finished.
    pub skipped: usize,
    /// Cells that failed, with the error.
    pub failed: Vec<(String, String)>,
    /// Whether a stop request ended the run early.
    pub stopped: bool,
}

/// Runs every distinct unfinished cell of `cells` with `base` config plus the cell's overrides. `base_model` (if
/// given) is shared by the cells whose model settings equal `base`'s. A failed cell is reported and the next one
/// runs; `stop` ends the grid after the current step (that cell stays unfinished and reruns next time).
pub fn run_grid(
    cells: &[Cell],
    base: &RunConfig,
    base_model: Option<&BaseModel>,
    store: &ResultStore,
    stop: &AtomicBool,
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
        if store.finished(&cell.id)?.is_some() {
            report.skipped += 1;
            on_progress(Progress::Skipped { cell });
            continue;
        }
        let config = match base
            .with_overrides(&cell.overrides)
            .and_then(|c| c.validate().map(|()| c))
        {
            Ok(c) => c,
            Err(e) => {
                let error = e.to_string();
                report.failed.push((cell.id.clone(), error.clone()));
                on_progress(Progress::Failed { cell, error });
                continue;
            }
        };
        on_progress(Progress::Started {
            index: i + 1,
            total: distinct.len(),
            cell,
        });
        let dir = store.prepare_cell(cell)?;
        let shared = base_model.filter(|_| config.model == base.model).cloned();
        let launch = Launch::New {
            config: Box::new(config),
            dir,
        };
        match run_cell(cell, launch, shared, stop, on_progress) {
            CellEnd::Finished => {
                let summary = store.finish_cell(cell)?;
                report.finished += 1;
                on_progress(Progress::Finished { cell, summary });
            }
            CellEnd::Stopped => {
                report.stopped = true;
                break;
            }
            CellEnd::Failed(error) => {
                report.failed.push((cell.id.clone(), error.clone()));
                on_progress(Progress::Failed { cell, error });
            }
        }
    }
    Ok(report)
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
