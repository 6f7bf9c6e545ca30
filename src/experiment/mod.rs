//! Ablation experiments: plans in the seeds' Markdown format ([`plan`]), their mapping onto Studio knobs
//! ([`resolve`]), the grid of runs ([`grid`]), its results store ([`store`]) and the runner ([`runner`]).
//! Parsing, resolution and the grid are pure; [`read_plan_file`], [`store`] and [`runner`] do the I/O.

pub mod claim;
pub mod grid;
pub mod plan;
pub mod plot;
pub mod resolve;
pub mod results;
pub mod runner;
pub mod slurm;
pub mod store;
pub mod text;

use std::path::{Path, PathBuf};

pub use plan::{Action, Plan, PlanError, PlanWarning, Study, parse_plan};

/// A plan file that cannot be read or holds no plan; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum PlanFileError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The text holds no plan.
    #[error("{path}: {source}")]
    Parse {
        /// File.
        path: PathBuf,
        /// What is wrong.
        source: PlanError,
    },
}

/// Reads and parses a plan file. Bytes that are not UTF-8 are read as Windows-1252 (with a warning on line 1).
pub fn read_plan_file(path: &Path) -> Result<Plan, PlanFileError> {
    read_plan_file_bytes(path).map(|(plan, _)| plan)
}

/// [`read_plan_file`], also returning the file's bytes as read (for the copy in a results folder), so the file
/// is read once.
pub fn read_plan_file_bytes(path: &Path) -> Result<(Plan, Vec<u8>), PlanFileError> {
    let bytes = std::fs::read(path).map_err(|source| PlanFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (text, fallback) = text::decode_bytes(&bytes);
    let mut plan = parse_plan(&text).map_err(|source| PlanFileError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    if fallback {
        plan.warnings.insert(
            0,
            PlanWarning {
                line: 1,
                message: "the file is not valid UTF-8; read it as Windows-1252".into(),
            },
        );
    }
    Ok((plan, bytes))
}
