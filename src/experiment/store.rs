//! The results store of a plan: `OUT/cells/<id>/` is the run folder of one cell (the training session's
//! `config.toml`, `metrics.jsonl`, checkpoints) plus `cell.json` (what the cell is) and, once the run finished,
//! `finished.json` (its [`CellSummary`]) — the marker that makes a re-run skip it. `OUT/resolution.json` and
//! `OUT/results.csv` describe the whole grid.

use std::path::{Path, PathBuf};

use super::grid::{CSV_HEADER, Cell, CellSummary, StepValues, csv_row};
use crate::store::write_atomic;
use crate::train::run_store::{RunStoreError, read_metrics};

/// Folder of the cells under the store root.
pub const CELLS_DIR: &str = "cells";
/// A cell's description.
pub const CELL_FILE: &str = "cell.json";
/// A finished cell's summary (its presence marks the cell finished).
pub const FINISHED_FILE: &str = "finished.json";
/// The grid's table.
pub const RESULTS_CSV: &str = "results.csv";

/// A store that cannot be read or written; messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File-system error.
    #[error("{path}: {source}")]
    Io {
        /// File or folder.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A JSON file of the store is malformed.
    #[error("{path}: {message}")]
    Json {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A cell's metrics log cannot be read.
    #[error(transparent)]
    Metrics(#[from] RunStoreError),
}

/// The store rooted at `OUT`.
#[derive(Clone, Debug)]
pub struct ResultStore {
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| StoreError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write_atomic(path, text.as_bytes()).map_err(io(path))
}

impl ResultStore {
    /// Opens (creating) the store folder.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let cells = root.join(CELLS_DIR);
        std::fs::create_dir_all(&cells).map_err(io(&cells))?;
        Ok(Self { root })
    }

    /// The store folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Run folder of a cell.
    pub fn cell_dir(&self, id: &str) -> PathBuf {
        self.root.join(CELLS_DIR).join(id)
    }

    /// The summary of a finished cell, `None` when it has not finished.
    pub fn finished(&self, id: &str) -> Result<Option<CellSummary>, StoreError> {
        let path = self.cell_dir(id).join(FINISHED_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        serde_json::from_str(&text).map(Some).map_err(|e| StoreError::Json {
            path,
            message: e.to_string(),
        })
    }

    /// Readies a cell's folder for a fresh run: an unfinished earlier attempt (only this cell's own folder) is
    /// removed, then `cell.json` is written. Returns the run folder (the session creates its files).
    pub fn prepare_cell(&self, cell: &Cell) -> Result<PathBuf, StoreError> {
        let dir = self.cell_dir(&cell.id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        write_json(&dir.join(CELL_FILE), cell)?;
        Ok(dir)
    }

    /// Summarises a cell's metrics log and writes its finished marker.
    pub fn finish_cell(&self, cell: &Cell) -> Result<CellSummary, StoreError> {
        let dir = self.cell_dir(&cell.id);
        let summary = super::grid::summarize(&read_steps(&dir)?);
        write_json(&dir.join(FINISHED_FILE), &summary)?;
        Ok(summary)
    }

    /// Writes any JSON document at the store root (`resolution.json`).
    pub fn write_root_json<T: serde::Serialize>(&self, name: &str, value: &T) -> Result<(), StoreError> {
        write_json(&self.root.join(name), value)
    }

    /// Writes `results.csv`: one row per cell of the grid (finished cells with their summary).
    pub fn write_results_csv(&self, cells: &[Cell], status: &dyn Fn(&Cell) -> String) -> Result<PathBuf, StoreError> {
        let mut text = String::from(CSV_HEADER);
        text.push('\n');
        for cell in cells {
            let summary = self.finished(&cell.id)?;
            text.push_str(&csv_row(cell, &status(cell), summary.as_ref()));
            text.push('\n');
        }
        let path = self.root.join(RESULTS_CSV);
        write_atomic(&path, text.as_bytes()).map_err(io(&path))?;
        Ok(path)
    }
}

/// The logged steps of a run folder, in step order (missing fields read as NaN).
pub fn read_steps(dir: &Path) -> Result<Vec<StepValues>, StoreError> {
    let (records, _events) = read_metrics(dir)?;
    let num = |v: &serde_json::Value, k: &str| v.get(k).and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN);
    Ok(records
        .iter()
        .map(|r| StepValues {
            loss: num(r, "loss"),
            implicit_accuracy: num(r, "implicit_accuracy"),
            reward_margin: num(r, "reward_margin"),
            grad_norm: num(r, "grad_norm"),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell() -> Cell {
        Cell {
            id: "00000000000000ab".into(),
            study: "s".into(),
            value: "v".into(),
            overrides: vec!["seed=0".into()],
            seed: 0,
        }
    }

    #[test]
    fn a_cell_is_finished_only_after_its_marker() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = ResultStore::open(tmp.path().join("plan")).expect("opens");
        let c = cell();
        assert_eq!(store.finished(&c.id).expect("reads"), None);
        let dir = store.prepare_cell(&c).expect("prepares");
        std::fs::write(
            dir.join("metrics.jsonl"),
            "{\"step\":1,\"loss\":0.5,\"implicit_accuracy\":1.0,\"reward_margin\":0.1,\"grad_norm\":1.0}\n",
        )
        .expect("writes");
        let summary = store.finish_cell(&c).expect("finishes");
        assert_eq!(summary.steps, 1);
        assert_eq!(store.finished(&c.id).expect("reads"), Some(summary));
        let csv = store
            .write_results_csv(std::slice::from_ref(&c), &|_| "finished".into())
            .expect("csv");
        let text = std::fs::read_to_string(csv).expect("reads");
        assert_eq!(text.lines().count(), 2);
        assert!(
            text.lines().nth(1).is_some_and(|l| l.contains(",finished,1,0.500000,")),
            "{text}"
        );
        // Preparing again starts the cell over.
        store.prepare_cell(&c).expect("prepares");
        assert_eq!(store.finished(&c.id).expect("reads"), None);
    }

    #[test]
    fn corrupt_marker_names_the_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = ResultStore::open(tmp.path()).expect("opens");
        let c = cell();
        let dir = store.prepare_cell(&c).expect("prepares");
        std::fs::write(dir.join(FINISHED_FILE), "{").expect("writes");
        let err = store.finished(&c.id).expect_err("corrupt");
        assert!(err.to_string().contains(FINISHED_FILE), "{err}");
    }
}
