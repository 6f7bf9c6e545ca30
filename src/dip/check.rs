//! `focusdpo dip check`: validate a whole DIP dataset and report every problem.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use super::{DipDataset, DipError, LoadedItem};

/// How bad a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The item cannot be used.
    Error,
    /// The item can be used but is probably not what was meant.
    Warning,
}

/// One finding of the checker, flat and serialisable.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Problem {
    /// Error or warning.
    pub severity: Severity,
    /// Stable code (`missing-file`, `non-binary-mask`, `duplicate-id`, …).
    pub code: String,
    /// 1-based manifest line, when the problem is about one line.
    pub line: Option<usize>,
    /// Item id, when known.
    pub id: Option<String>,
    /// Field, when known (`masks[1]`).
    pub field: Option<String>,
    /// Human-readable message naming the file.
    pub message: String,
}

impl Problem {
    fn from_error(e: &DipError) -> Self {
        Self {
            severity: Severity::Error,
            code: e.code().to_string(),
            line: e.line(),
            id: e.location().map(|at| at.id.clone()),
            field: e.field().map(str::to_string),
            message: e.to_string(),
        }
    }
}

/// The result of checking a dataset.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    /// The dataset folder.
    pub root: PathBuf,
    /// Non-blank manifest lines.
    pub lines: usize,
    /// Items with no error.
    pub valid_items: usize,
    /// Lines with at least one error.
    pub invalid_items: usize,
    /// Valid single-subject items.
    pub single_subject: usize,
    /// Valid multi-subject items.
    pub multi_subject: usize,
    /// Every problem, sorted by line.
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// True when no problem is an error (warnings allowed).
    pub fn is_ok(&self) -> bool {
        self.problems.iter().all(|p| p.severity != Severity::Error)
    }

    /// Number of errors.
    pub fn error_count(&self) -> usize {
        self.problems.iter().filter(|p| p.severity == Severity::Error).count()
    }

    /// Number of warnings.
    pub fn warning_count(&self) -> usize {
        self.problems.len() - self.error_count()
    }
}

/// Checks every line and every image of the dataset at `root`, in parallel over items.
///
/// Errors only when the manifest itself cannot be read; everything else is a [`Problem`] in the report.
pub fn check_dataset(root: impl AsRef<Path>) -> Result<CheckReport, DipError> {
    let dataset = DipDataset::open(root)?;
    let mut problems: Vec<Problem> = dataset.problems().iter().map(Problem::from_error).collect();
    let mut bad_lines: Vec<usize> = dataset.problems().iter().filter_map(DipError::line).collect();
    let per_item: Vec<(usize, Option<usize>, Vec<Problem>)> = (0..dataset.len())
        .into_par_iter()
        .map(|index| {
            let line = dataset.entries()[index].line;
            let (item, errors) = dataset.inspect_item(index);
            let mut found: Vec<Problem> = errors.iter().map(Problem::from_error).collect();
            let subjects = item.as_ref().map(LoadedItem::subject_count);
            if let Some(item) = &item {
                found.extend(warnings(&dataset, item));
            }
            (line, if errors.is_empty() { subjects } else { None }, found)
        })
        .collect();
    let (mut single, mut multi) = (0, 0);
    for (line, subjects, found) in per_item {
        match subjects {
            Some(1) => single += 1,
            Some(_) => multi += 1,
            None => bad_lines.push(line),
        }
        problems.extend(found);
    }
    bad_lines.sort_unstable();
    bad_lines.dedup();
    problems.sort_by_key(|p| p.line);
    Ok(CheckReport {
        root: dataset.root().to_path_buf(),
        lines: dataset.line_count(),
        valid_items: single + multi,
        invalid_items: bad_lines.len(),
        single_subject: single,
        multi_subject: multi,
        problems,
    })
}

/// Usable-but-suspicious items.
fn warnings(dataset: &DipDataset, item: &LoadedItem) -> Vec<Problem> {
    let warn = |field: &str, code: &str, message: String| Problem {
        severity: Severity::Warning,
        code: code.to_string(),
        line: Some(item.line),
        id: Some(item.record.id.clone()),
        field: Some(field.to_string()),
        message: format!(
            "{}:{} (item \"{}\", field `{field}`): {message}",
            dataset.manifest_path().display(),
            item.line,
            item.record.id
        ),
    };
    let mut out = Vec::new();
    if item.record.winner == item.record.loser {
        out.push(warn("loser", "same-file", "winner and loser are the same file".into()));
    } else if item.winner == item.loser {
        out.push(warn(
            "loser",
            "identical-pair",
            "loser is pixel-identical to the winner: the pair carries no preference".into(),
        ));
    }
    if item.record.prompt.trim().is_empty() {
        out.push(warn("prompt", "empty-prompt", "prompt is empty".into()));
    }
    out
}
