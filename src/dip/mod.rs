//! Disrupted-Instance Pair (DIP) datasets (paper §4.1, appendix B): manifest, loading, validation, and the
//! synthetic generator. The on-disk format is documented in `docs/dataset.md`.

pub mod check;
pub mod dataset;
pub mod manifest;
pub mod synth;

use std::fmt;
use std::path::{Path, PathBuf};

pub use check::{CheckReport, Problem, Severity, check_dataset};
pub use dataset::{DipDataset, LoadedItem};
pub use manifest::{Category, ItemRecord, MANIFEST_FILE};

/// Where in a dataset a problem sits: the manifest file, the line, the item and the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// The manifest file.
    pub file: PathBuf,
    /// 1-based line number in the manifest.
    pub line: usize,
    /// Item id.
    pub id: String,
    /// Field name, with an index for list fields (`masks[1]`).
    pub field: String,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} (item \"{}\", field `{}`)",
            self.file.display(),
            self.line,
            self.id,
            self.field
        )
    }
}

/// Every way a DIP dataset can be wrong. Each variant names the file and, where there is one, the manifest line,
/// item and field.
#[derive(Debug, thiserror::Error)]
pub enum DipError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The folder has no `metadata.jsonl`.
    #[error("{}: not a DIP dataset (no {MANIFEST_FILE} in it)", dir.display())]
    NotADataset {
        /// The folder.
        dir: PathBuf,
    },
    /// A manifest line is not a JSON object of the right shape.
    #[error("{}:{line}: malformed line: {message}", file.display())]
    MalformedLine {
        /// The manifest.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// What the JSON parser said.
        message: String,
    },
    /// A manifest line has a field the format does not define.
    #[error("{}:{line}: unknown field `{field}` (known: id, prompt, references, winner, loser, masks, category, meta)", file.display())]
    UnknownField {
        /// The manifest.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// The unknown key.
        field: String,
    },
    /// A known field is missing or has the wrong JSON type.
    #[error("{}:{line}: field `{field}`: {message}", file.display())]
    BadField {
        /// The manifest.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// The field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// Two lines share an id.
    #[error("{at}: duplicate id (first used on line {first_line})")]
    DuplicateId {
        /// The second occurrence.
        at: Box<Location>,
        /// Line of the first occurrence.
        first_line: usize,
    },
    /// `references` and `masks` must have one entry per subject, and at least one subject.
    #[error("{at}: {references} reference(s) but {masks} mask(s): need one mask per reference, at least one")]
    SubjectCount {
        /// The item (field `masks`).
        at: Box<Location>,
        /// Number of references.
        references: usize,
        /// Number of masks.
        masks: usize,
    },
    /// A path is absolute or leaves the dataset folder.
    #[error("{at}: path \"{path}\" must be relative and stay inside the dataset folder")]
    PathOutsideDataset {
        /// The item and field.
        at: Box<Location>,
        /// The path as written.
        path: String,
    },
    /// A referenced file does not exist.
    #[error("{at}: missing file {}", path.display())]
    MissingFile {
        /// The item and field.
        at: Box<Location>,
        /// The resolved path.
        path: PathBuf,
    },
    /// A referenced image cannot be decoded.
    #[error("{at}: cannot decode image {}: {message}", path.display())]
    ImageDecode {
        /// The item and field.
        at: Box<Location>,
        /// The resolved path.
        path: PathBuf,
        /// What the decoder said.
        message: String,
    },
    /// Winner, loser and masks must share one size.
    #[error("{at}: {} is {}×{} but the winner is {}×{} (width×height)", path.display(), found.0, found.1, expected.0, expected.1)]
    SizeMismatch {
        /// The item and field.
        at: Box<Location>,
        /// The resolved path.
        path: PathBuf,
        /// Winner size (width, height).
        expected: (u32, u32),
        /// This image's size (width, height).
        found: (u32, u32),
    },
    /// A mask has values other than background 0 and one foreground level (1 or 255).
    #[error("{at}: mask {} is not binary: {count} pixel(s) are neither 0 nor {foreground} (e.g. value {example})", path.display())]
    NonBinaryMask {
        /// The item and field.
        at: Box<Location>,
        /// The resolved path.
        path: PathBuf,
        /// The foreground level expected (255, or 1 for 0/1 masks).
        foreground: u8,
        /// Offending pixel count.
        count: usize,
        /// One offending value.
        example: u8,
    },
    /// A mask has no foreground pixel.
    #[error("{at}: mask {} is empty (no foreground pixel)", path.display())]
    EmptyMask {
        /// The item and field.
        at: Box<Location>,
        /// The resolved path.
        path: PathBuf,
    },
    /// No item with this id or index.
    #[error("{}: no item {what}", dir.display())]
    NoSuchItem {
        /// The dataset folder.
        dir: PathBuf,
        /// The id or index asked for.
        what: String,
    },
    /// The item was excluded when the dataset was opened because its manifest line is invalid.
    #[error("{}: item {what} is invalid: {reason}", dir.display())]
    InvalidItem {
        /// The dataset folder.
        dir: PathBuf,
        /// The id asked for.
        what: String,
        /// The first problem found.
        reason: String,
    },
    /// An image could not be encoded or written.
    #[error("{}: cannot write image: {message}", path.display())]
    ImageEncode {
        /// The file.
        path: PathBuf,
        /// What the encoder said.
        message: String,
    },
    /// A standalone mask file (not from a manifest) is unusable.
    #[error("{}: {message}", path.display())]
    BadMaskFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Generator settings out of range.
    #[error("invalid synthesis setting `{field}`: {message}")]
    BadSynthConfig {
        /// The setting.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl DipError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        DipError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A short stable code for reports (`missing-file`, `non-binary-mask`, …).
    pub fn code(&self) -> &'static str {
        match self {
            DipError::Io { .. } => "io",
            DipError::NotADataset { .. } => "not-a-dataset",
            DipError::MalformedLine { .. } => "malformed-line",
            DipError::UnknownField { .. } => "unknown-field",
            DipError::BadField { .. } => "bad-field",
            DipError::DuplicateId { .. } => "duplicate-id",
            DipError::SubjectCount { .. } => "subject-count",
            DipError::PathOutsideDataset { .. } => "path-outside-dataset",
            DipError::MissingFile { .. } => "missing-file",
            DipError::ImageDecode { .. } => "undecodable-image",
            DipError::SizeMismatch { .. } => "size-mismatch",
            DipError::NonBinaryMask { .. } => "non-binary-mask",
            DipError::EmptyMask { .. } => "empty-mask",
            DipError::NoSuchItem { .. } => "no-such-item",
            DipError::InvalidItem { .. } => "invalid-item",
            DipError::ImageEncode { .. } => "image-encode",
            DipError::BadSynthConfig { .. } => "bad-synth-config",
            DipError::BadMaskFile { .. } => "bad-mask-file",
        }
    }

    /// The manifest line this error is about, if any.
    pub fn line(&self) -> Option<usize> {
        match self {
            DipError::MalformedLine { line, .. }
            | DipError::UnknownField { line, .. }
            | DipError::BadField { line, .. } => Some(*line),
            _ => self.location().map(|at| at.line),
        }
    }

    /// The field this error is about, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            DipError::UnknownField { field, .. } | DipError::BadField { field, .. } => Some(field),
            _ => self.location().map(|at| at.field.as_str()),
        }
    }

    /// The item-level location, for errors about a parsed item.
    pub fn location(&self) -> Option<&Location> {
        match self {
            DipError::DuplicateId { at, .. }
            | DipError::SubjectCount { at, .. }
            | DipError::PathOutsideDataset { at, .. }
            | DipError::MissingFile { at, .. }
            | DipError::ImageDecode { at, .. }
            | DipError::SizeMismatch { at, .. }
            | DipError::NonBinaryMask { at, .. }
            | DipError::EmptyMask { at, .. } => Some(at.as_ref()),
            _ => None,
        }
    }
}

/// Folder of the bundled default dataset (`assets/dip-default`): `$FOCUSDPO_ASSETS/dip-default` when that
/// variable is set, else the copy in the source tree this binary was built from.
pub fn bundled_dataset_dir() -> PathBuf {
    assets_dir().join("dip-default")
}

/// Whether `dir` is the bundled dataset folder (compared after resolving links and `..`; a folder that cannot be
/// resolved is not it).
pub fn is_bundled_dataset_dir(dir: &Path) -> bool {
    match (dir.canonicalize(), bundled_dataset_dir().canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The assets folder: `$FOCUSDPO_ASSETS`, or `assets/` of the source tree.
pub fn assets_dir() -> PathBuf {
    std::env::var_os("FOCUSDPO_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("assets"))
}
