//! The results store of a plan: `OUT/cells/<id>/` is the run folder of one cell (the training session's
//! `config.toml`, `metrics.jsonl`, checkpoints) plus `cell.json` (what the cell is), once the run finished
//! `finished.json` (its training values, [`FinishedCell`]) — the marker that makes a re-run skip the training — and
//! once evaluated `eval.json` (its [`BenchmarkReport`]). `OUT/resolution.json`, `OUT/results.csv`,
//! `OUT/results.md` and `OUT/plots/<study>.png` describe the whole grid.

use std::path::{Path, PathBuf};

use super::grid::Cell;
use super::plot::{PlotError, study_plot_png};
use super::resolve::Resolution;
use super::results::{CellResult, CellStatus, FinishedCell, plot_path, results_csv, results_markdown, study_tables};
use crate::eval::benchmark::{BenchmarkConfig, BenchmarkReport};
use crate::eval::study::{benchmark_values, training_values};
use crate::store::write_atomic;
use crate::train::run_store::{CONFIG_FILE, RunStoreError, read_metrics};

/// Folder of the cells under the store root.
pub const CELLS_DIR: &str = "cells";
/// A cell's description.
pub const CELL_FILE: &str = "cell.json";
/// A finished cell's training values (its presence marks the cell finished).
pub const FINISHED_FILE: &str = "finished.json";
/// A failed cell's marker: the error and the worker it failed on (`focusdpo report` counts it failed until the
/// cell finishes).
pub const FAILED_FILE: &str = "failed.json";
/// A cell's benchmark report (its presence marks the cell evaluated).
pub const EVAL_FILE: &str = "eval.json";
/// The grid's table.
pub const RESULTS_CSV: &str = "results.csv";
/// The per-study tables.
pub const RESULTS_MD: &str = "results.md";
/// Folder of the per-study plots.
pub const PLOTS_DIR: &str = "plots";
/// The grid of a results folder, written by every worker, read by `focusdpo report`.
pub const GRID_FILE: &str = "grid.json";
/// The plan's text, copied into the results folder (the report resolves it again; array tasks read it).
pub const PLAN_COPY: &str = "plan.md";
/// The plan's resolution, as JSON.
pub const RESOLUTION_FILE: &str = "resolution.json";

/// [`GRID_FILE`]: the plan's title and every cell of the grid.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GridFile {
    /// The plan's `# title`.
    pub title: Option<String>,
    /// Every cell, in plan order.
    pub cells: Vec<Cell>,
}

/// Where a cell of a shared store stands, as any worker (or the Studio) sees it on disk.
#[derive(Clone, Debug, PartialEq)]
pub enum CellActivity {
    /// Its finished marker exists (the values, with the benchmark's when evaluated).
    Finished(FinishedCell),
    /// A worker marked it failed.
    Failed {
        /// The error it recorded.
        error: String,
        /// The worker.
        worker: String,
    },
    /// A worker holds its claim.
    Claimed(super::claim::Claim),
    /// Nobody has it.
    Waiting,
}

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
    /// A study plot cannot be drawn.
    #[error(transparent)]
    Plot(#[from] PlotError),
}

/// The files [`ResultStore::write_results`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultFiles {
    /// results.csv.
    pub csv: PathBuf,
    /// results.md.
    pub markdown: PathBuf,
    /// One PNG per study that has values.
    pub plots: Vec<PathBuf>,
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

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| StoreError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| StoreError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write_atomic(path, text.as_bytes()).map_err(io(path))
}

/// The values of a finished cell read from its run folder: the training values of `finished.json` plus, when it
/// was evaluated, the benchmark values of `eval.json` ([`benchmark_values`]); `None` when it has not finished.
/// Reads only (the Studio previews a store that may not exist yet).
pub fn finished_cell_values(cell_dir: &Path) -> Result<Option<FinishedCell>, StoreError> {
    let Some(mut finished) = read_json::<FinishedCell>(&cell_dir.join(FINISHED_FILE))? else {
        return Ok(None);
    };
    if let Some(report) = read_json::<BenchmarkReport>(&cell_dir.join(EVAL_FILE))? {
        finished.values.extend(benchmark_values(&report));
    }
    Ok(Some(finished))
}

impl ResultStore {
    /// Opens (creating) the store folder.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let cells = root.join(CELLS_DIR);
        std::fs::create_dir_all(&cells).map_err(io(&cells))?;
        Ok(Self { root })
    }

    /// The store at `root` for reading, creating nothing (the Studio watches folders that may not exist yet).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The store folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Run folder of a cell.
    pub fn cell_dir(&self, id: &str) -> PathBuf {
        self.root.join(CELLS_DIR).join(id)
    }

    /// The training values of a finished cell, `None` when it has not finished.
    pub fn finished(&self, id: &str) -> Result<Option<FinishedCell>, StoreError> {
        read_json(&self.cell_dir(id).join(FINISHED_FILE))
    }

    /// Whether a cell's finished marker exists (without reading it).
    pub fn is_finished(&self, id: &str) -> bool {
        self.cell_dir(id).join(FINISHED_FILE).is_file()
    }

    /// Marks a cell failed ([`FAILED_FILE`]) with `error`, on `worker`.
    pub fn mark_failed(&self, id: &str, error: &str, worker: &str) -> Result<(), StoreError> {
        write_json(
            &self.cell_dir(id).join(FAILED_FILE),
            &serde_json::json!({ "error": error, "worker": worker }),
        )
    }

    /// Whether a cell carries a failed marker.
    pub fn has_failed(&self, id: &str) -> bool {
        self.cell_dir(id).join(FAILED_FILE).is_file()
    }

    /// Whether a cell's eval.json holds the benchmark `cfg` (a missing or unreadable one does not).
    pub fn evaluated_with(&self, id: &str, cfg: &BenchmarkConfig) -> bool {
        matches!(self.eval_report(id), Ok(Some(r)) if r.config == *cfg)
    }

    /// Whether an unfinished cell has a run to resume (an interrupted attempt that wrote its `config.toml`).
    pub fn resumable(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.finished(id)?.is_none() && self.cell_dir(id).join(CONFIG_FILE).is_file())
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

    /// Computes a cell's training values from its metrics log ([`training_values`]) and writes its finished marker.
    pub fn finish_cell(&self, cell: &Cell) -> Result<FinishedCell, StoreError> {
        let dir = self.cell_dir(&cell.id);
        let (records, _events) = read_metrics(&dir)?;
        let finished = FinishedCell {
            steps: records.len(),
            values: training_values(&records),
        };
        write_json(&dir.join(FINISHED_FILE), &finished)?;
        Ok(finished)
    }

    /// A cell's benchmark report, `None` when it has not been evaluated.
    pub fn eval_report(&self, id: &str) -> Result<Option<BenchmarkReport>, StoreError> {
        read_json(&self.cell_dir(id).join(EVAL_FILE))
    }

    /// Writes a cell's benchmark report (atomically).
    pub fn write_eval(&self, id: &str, report: &BenchmarkReport) -> Result<PathBuf, StoreError> {
        let path = self.cell_dir(id).join(EVAL_FILE);
        write_json(&path, report)?;
        Ok(path)
    }

    /// Removes a cell's eval.json (if any).
    pub fn remove_eval(&self, id: &str) -> Result<(), StoreError> {
        let path = self.cell_dir(id).join(EVAL_FILE);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&path)(e)),
            _ => Ok(()),
        }
    }

    /// A cell's status and values: training values from `finished.json` plus benchmark values from `eval.json`.
    /// `failed` cells are failed (this run); others are finished when their marker exists, else pending.
    pub fn cell_result(&self, cell: &Cell, failed: bool) -> Result<CellResult, StoreError> {
        let finished = finished_cell_values(&self.cell_dir(&cell.id))?;
        let status = match (&finished, failed) {
            (_, true) => CellStatus::Failed,
            (Some(_), false) => CellStatus::Finished,
            (None, false) => CellStatus::Pending,
        };
        Ok(CellResult {
            cell: cell.clone(),
            status,
            steps: finished.as_ref().map(|f| f.steps),
            values: finished.map(|f| f.values).unwrap_or_default(),
        })
    }

    /// Where a cell stands: finished, failed, claimed by a worker, or waiting. A finished marker or claim that
    /// cannot be read is an error naming the file.
    pub fn activity(&self, id: &str) -> Result<CellActivity, StoreError> {
        if let Some(finished) = finished_cell_values(&self.cell_dir(id))? {
            return Ok(CellActivity::Finished(finished));
        }
        #[derive(serde::Deserialize, Default)]
        #[serde(default)]
        struct Failed {
            error: String,
            worker: String,
        }
        if let Some(f) = read_json::<Failed>(&self.cell_dir(id).join(FAILED_FILE))? {
            return Ok(CellActivity::Failed {
                error: f.error,
                worker: f.worker,
            });
        }
        Ok(match super::claim::holder(&self.root, id)? {
            Some(claim) => CellActivity::Claimed(claim),
            None => CellActivity::Waiting,
        })
    }

    /// Writes what every worker of a grid and `focusdpo report` read: resolution.json, grid.json and the plan's
    /// text as plan.md.
    pub fn write_grid(
        &self,
        title: Option<&str>,
        resolution: &Resolution,
        cells: &[Cell],
        plan_text: &[u8],
    ) -> Result<(), StoreError> {
        write_json(&self.root.join(RESOLUTION_FILE), resolution)?;
        write_json(
            &self.root.join(GRID_FILE),
            &GridFile {
                title: title.map(str::to_string),
                cells: cells.to_vec(),
            },
        )?;
        let copy = self.root.join(PLAN_COPY);
        write_atomic(&copy, plan_text).map_err(io(&copy))
    }

    /// The grid written by [`Self::write_grid`], `None` when there is none.
    pub fn read_grid(&self) -> Result<Option<GridFile>, StoreError> {
        read_json(&self.root.join(GRID_FILE))
    }

    /// Writes a job array's script as [`super::slurm::SBATCH_FILE`] (and the folder of its logs); returns its path.
    pub fn write_sbatch(&self, script: &str) -> Result<PathBuf, StoreError> {
        let logs = self.root.join(super::slurm::SLURM_LOG_DIR);
        std::fs::create_dir_all(&logs).map_err(io(&logs))?;
        let path = self.root.join(super::slurm::SBATCH_FILE);
        write_atomic(&path, script.as_bytes()).map_err(io(&path))?;
        Ok(path)
    }

    /// Writes any JSON document at the store root.
    pub fn write_root_json<T: serde::Serialize>(&self, name: &str, value: &T) -> Result<(), StoreError> {
        write_json(&self.root.join(name), value)
    }

    /// Writes results.csv (one row per cell), results.md (a table per study) and, when `plots`, a PNG per study
    /// with values under `plots/`. `failed` lists the ids of the cells that failed in this run.
    pub fn write_results(
        &self,
        title: Option<&str>,
        resolution: &Resolution,
        cells: &[Cell],
        failed: &[String],
        plots: bool,
    ) -> Result<ResultFiles, StoreError> {
        let results = cells
            .iter()
            .map(|c| self.cell_result(c, failed.contains(&c.id)))
            .collect::<Result<Vec<_>, _>>()?;
        let csv = self.root.join(RESULTS_CSV);
        write_atomic(&csv, results_csv(&results).as_bytes()).map_err(io(&csv))?;
        let tables = study_tables(resolution, &results);
        let mut plot_files = Vec::new();
        let mut drawn = Vec::new();
        if plots {
            let dir = self.root.join(PLOTS_DIR);
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            for t in &tables {
                if let Some(png) = study_plot_png(t)? {
                    let path = self.root.join(plot_path(t));
                    write_atomic(&path, &png).map_err(io(&path))?;
                    plot_files.push(path);
                    drawn.push(t.slug.clone());
                }
            }
        }
        let markdown = self.root.join(RESULTS_MD);
        let text = results_markdown(title, resolution, &results, &tables, &|t| drawn.contains(&t.slug));
        write_atomic(&markdown, text.as_bytes()).map_err(io(&markdown))?;
        Ok(ResultFiles {
            csv,
            markdown,
            plots: plot_files,
        })
    }
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
        assert!(
            store.resumable(&c.id).is_ok_and(|r| !r),
            "a finished cell is not resumed"
        );
        let empty = Resolution {
            studies: Vec::new(),
            unresolved: Vec::new(),
        };
        let files = store
            .write_results(None, &empty, std::slice::from_ref(&c), &[], true)
            .expect("results");
        let text = std::fs::read_to_string(&files.csv).expect("reads");
        assert_eq!(text.lines().count(), 2);
        let row = text.lines().nth(1).unwrap_or_default();
        assert!(row.contains(",finished,1,") && row.contains(",0.500000,"), "{text}");
        assert!(files.markdown.is_file() && files.plots.is_empty());
        // An evaluated cell adds its benchmark values.
        let report = BenchmarkReport {
            model: "m".into(),
            identity_embedder: "e".into(),
            config: crate::eval::benchmark::BenchmarkConfig::default(),
            sampler: None,
            splits: std::collections::BTreeMap::new(),
        };
        store.write_eval(&c.id, &report).expect("writes eval");
        assert_eq!(store.eval_report(&c.id).expect("reads"), Some(report));
        store.remove_eval(&c.id).expect("removes");
        store.remove_eval(&c.id).expect("a missing eval.json is no error");
        assert_eq!(store.eval_report(&c.id).expect("reads"), None);
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
