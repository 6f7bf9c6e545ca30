//! Opening a DIP dataset folder and loading its items, with every problem turned into a typed [`DipError`].

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use image::{GrayImage, RgbImage};

use super::manifest::{ItemRecord, MANIFEST_FILE, ManifestEntry, parse_manifest, resolve};
use super::{DipError, Location};

/// A DIP dataset: its folder and the manifest items that are structurally valid.
///
/// Opening reads only `metadata.jsonl`; images are decoded and checked when an item is loaded
/// ([`DipDataset::load_item`]) or by [`super::check_dataset`]. Lines that cannot be used (malformed JSON, unknown or
/// mistyped fields, duplicate ids, wrong subject count, paths leaving the folder) are kept in
/// [`DipDataset::problems`] and left out of the items.
#[derive(Debug)]
pub struct DipDataset {
    root: PathBuf,
    manifest: PathBuf,
    entries: Vec<ManifestEntry>,
    problems: Vec<DipError>,
    non_blank_lines: usize,
}

/// A decoded item.
#[derive(Clone, Debug)]
pub struct LoadedItem {
    /// The manifest record.
    pub record: ItemRecord,
    /// 1-based manifest line.
    pub line: usize,
    /// Reference images, one per subject.
    pub references: Vec<RgbImage>,
    /// The winner `x_0^w`.
    pub winner: RgbImage,
    /// The loser `x_0^l` (same size as the winner).
    pub loser: RgbImage,
    /// Subject masks normalised to 0/255, one per subject, at the winner's size.
    pub masks: Vec<GrayImage>,
}

impl LoadedItem {
    /// Number of subjects.
    pub fn subject_count(&self) -> usize {
        self.references.len()
    }
}

impl DipDataset {
    /// Reads `root/metadata.jsonl`. Errors only when the folder or manifest cannot be read; bad lines become
    /// [`DipDataset::problems`].
    pub fn open(root: impl AsRef<Path>) -> Result<Self, DipError> {
        let root = root.as_ref().to_path_buf();
        let manifest = root.join(MANIFEST_FILE);
        if !manifest.is_file() {
            return Err(DipError::NotADataset { dir: root });
        }
        let bytes = std::fs::read(&manifest).map_err(|e| DipError::io(&manifest, e))?;
        let text = String::from_utf8_lossy(&bytes);
        let non_blank_lines = text.lines().filter(|l| !l.trim().is_empty()).count();
        let parsed = parse_manifest(&manifest, &text);
        let mut problems = parsed.line_errors;
        let mut entries = Vec::with_capacity(parsed.entries.len());
        let mut first_line_of: HashMap<String, usize> = HashMap::new();
        for entry in parsed.entries {
            let errors = structural_problems(&manifest, &entry, &first_line_of);
            if errors.is_empty() {
                first_line_of.insert(entry.record.id.clone(), entry.line);
                entries.push(entry);
            } else {
                problems.extend(errors);
            }
        }
        problems.sort_by_key(|p| p.line());
        Ok(Self {
            root,
            manifest,
            entries,
            problems,
            non_blank_lines,
        })
    }

    /// The dataset folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of `metadata.jsonl`.
    pub fn manifest_path(&self) -> &Path {
        &self.manifest
    }

    /// Structurally valid items, in file order.
    pub fn entries(&self) -> &[ManifestEntry] {
        &self.entries
    }

    /// Number of structurally valid items.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no item is usable.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of non-blank manifest lines (valid or not).
    pub fn line_count(&self) -> usize {
        self.non_blank_lines
    }

    /// Manifest-level problems found on opening, sorted by line.
    pub fn problems(&self) -> &[DipError] {
        &self.problems
    }

    /// Index of the item with this id.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.record.id == id)
    }

    /// Loads and validates the item at `index`; the first problem found is the error.
    pub fn load_item(&self, index: usize) -> Result<LoadedItem, DipError> {
        let entry = self.entries.get(index).ok_or_else(|| DipError::NoSuchItem {
            dir: self.root.clone(),
            what: format!("at index {index} (dataset has {})", self.entries.len()),
        })?;
        let (item, mut errors) = load_entry(&self.root, &self.manifest, entry);
        match item {
            Some(item) if errors.is_empty() => Ok(item),
            _ => Err(errors.swap_remove(0)),
        }
    }

    /// Loads the item with id `id`. An id that exists only on an invalid line names that line's problem.
    pub fn load_by_id(&self, id: &str) -> Result<LoadedItem, DipError> {
        match self.index_of(id) {
            Some(index) => self.load_item(index),
            None => Err(self.explain_missing(id)),
        }
    }

    fn explain_missing(&self, id: &str) -> DipError {
        let on_bad_line = self
            .problems
            .iter()
            .find(|p| p.location().is_some_and(|at| at.id == id));
        match on_bad_line {
            Some(problem) => DipError::InvalidItem {
                dir: self.root.clone(),
                what: format!("\"{id}\""),
                reason: problem.to_string(),
            },
            None => DipError::NoSuchItem {
                dir: self.root.clone(),
                what: format!("with id \"{id}\""),
            },
        }
    }

    /// Decodes one item and checks it fully, returning every problem rather than the first, and the item when all
    /// its images decoded.
    pub fn inspect_item(&self, index: usize) -> (Option<LoadedItem>, Vec<DipError>) {
        match self.entries.get(index) {
            Some(entry) => load_entry(&self.root, &self.manifest, entry),
            None => (None, Vec::new()),
        }
    }
}

fn location(manifest: &Path, entry: &ManifestEntry, field: String) -> Box<Location> {
    Box::new(Location {
        file: manifest.to_path_buf(),
        line: entry.line,
        id: entry.record.id.clone(),
        field,
    })
}

/// Every `(field, path)` of a record, list fields indexed.
fn path_fields(record: &ItemRecord) -> Vec<(String, &str)> {
    let mut out: Vec<(String, &str)> = record
        .references
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("references[{i}]"), p.as_str()))
        .collect();
    out.push(("winner".into(), record.winner.as_str()));
    out.push(("loser".into(), record.loser.as_str()));
    out.extend(
        record
            .masks
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("masks[{i}]"), p.as_str())),
    );
    out
}

/// Problems visible without reading images: duplicate id, subject count, paths leaving the folder.
fn structural_problems(
    manifest: &Path,
    entry: &ManifestEntry,
    first_line_of: &HashMap<String, usize>,
) -> Vec<DipError> {
    let record = &entry.record;
    let mut errors = Vec::new();
    if let Some(&first_line) = first_line_of.get(&record.id) {
        errors.push(DipError::DuplicateId {
            at: location(manifest, entry, "id".into()),
            first_line,
        });
    }
    if record.references.is_empty() || record.references.len() != record.masks.len() {
        errors.push(DipError::SubjectCount {
            at: location(manifest, entry, "masks".into()),
            references: record.references.len(),
            masks: record.masks.len(),
        });
    }
    for (field, path) in path_fields(record) {
        if !is_inside_relative(path) {
            errors.push(DipError::PathOutsideDataset {
                at: location(manifest, entry, field),
                path: path.to_string(),
            });
        }
    }
    errors
}

/// A dataset must be relocatable: paths are relative, non-empty and never climb out with `..`.
pub(crate) fn is_inside_relative(path: &str) -> bool {
    let p = Path::new(path);
    !path.trim().is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Decodes and checks every image of an entry. Returns the item when everything decoded (possibly with
/// problems such as size mismatches) and all problems found.
fn load_entry(root: &Path, manifest: &Path, entry: &ManifestEntry) -> (Option<LoadedItem>, Vec<DipError>) {
    let record = &entry.record;
    let mut errors = Vec::new();
    let at = |field: String| location(manifest, entry, field);
    let mut decode = |field: String, rel: &str| -> Option<image::DynamicImage> {
        let path = resolve(root, rel);
        match read_image(&path) {
            Ok(img) => Some(img),
            Err(ReadError::Missing) => {
                errors.push(DipError::MissingFile { at: at(field), path });
                None
            }
            Err(ReadError::Decode(message)) => {
                errors.push(DipError::ImageDecode {
                    at: at(field),
                    path,
                    message,
                });
                None
            }
        }
    };
    let references: Vec<_> = record
        .references
        .iter()
        .enumerate()
        .map(|(i, p)| decode(format!("references[{i}]"), p).map(|d| d.to_rgb8()))
        .collect();
    let winner = decode("winner".into(), &record.winner).map(|d| d.to_rgb8());
    let loser = decode("loser".into(), &record.loser).map(|d| d.to_rgb8());
    let raw_masks: Vec<_> = record
        .masks
        .iter()
        .enumerate()
        .map(|(i, p)| decode(format!("masks[{i}]"), p).map(|d| d.to_luma8()))
        .collect();

    let size = winner.as_ref().map(|w| w.dimensions());
    let size_problem = |field: String, rel: &str, found: (u32, u32)| {
        size.filter(|&s| s != found).map(|expected| DipError::SizeMismatch {
            at: at(field),
            path: resolve(root, rel),
            expected,
            found,
        })
    };
    if let Some(l) = &loser {
        errors.extend(size_problem("loser".into(), &record.loser, l.dimensions()));
    }
    let mut masks = Vec::with_capacity(raw_masks.len());
    for (i, mask) in raw_masks.into_iter().enumerate() {
        let Some(mask) = mask else { continue };
        let field = format!("masks[{i}]");
        errors.extend(size_problem(field.clone(), &record.masks[i], mask.dimensions()));
        match binarise_mask(mask) {
            Ok(m) => masks.push(m),
            Err(MaskProblem::Empty) => errors.push(DipError::EmptyMask {
                at: at(field),
                path: resolve(root, &record.masks[i]),
            }),
            Err(MaskProblem::NonBinary {
                foreground,
                count,
                example,
            }) => errors.push(DipError::NonBinaryMask {
                at: at(field),
                path: resolve(root, &record.masks[i]),
                foreground,
                count,
                example,
            }),
        }
    }

    let references: Option<Vec<_>> = references.into_iter().collect();
    let item = match (references, winner, loser) {
        (Some(references), Some(winner), Some(loser)) if masks.len() == record.masks.len() => Some(LoadedItem {
            record: record.clone(),
            line: entry.line,
            references,
            winner,
            loser,
            masks,
        }),
        _ => None,
    };
    (item, errors)
}

/// Reads a standalone binary mask file (not part of a manifest), e.g. an externally supplied `M_s`, as 0/255.
pub fn read_binary_mask(path: &Path) -> Result<GrayImage, DipError> {
    let bad = |message: String| DipError::BadMaskFile {
        path: path.to_path_buf(),
        message,
    };
    let image = read_image(path).map_err(|e| match e {
        ReadError::Missing => bad("file not found".into()),
        ReadError::Decode(m) => bad(format!("cannot decode: {m}")),
    })?;
    binarise_mask(image.to_luma8()).map_err(|e| match e {
        MaskProblem::Empty => bad("mask is empty (no foreground pixel)".into()),
        MaskProblem::NonBinary {
            foreground,
            count,
            example,
        } => bad(format!(
            "not binary: {count} pixel(s) are neither 0 nor {foreground} (e.g. {example})"
        )),
    })
}

enum ReadError {
    Missing,
    Decode(String),
}

fn read_image(path: &Path) -> Result<image::DynamicImage, ReadError> {
    if !path.is_file() {
        return Err(ReadError::Missing);
    }
    let reader = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| ReadError::Decode(e.to_string()))?;
    reader.decode().map_err(|e| ReadError::Decode(e.to_string()))
}

enum MaskProblem {
    Empty,
    NonBinary { foreground: u8, count: usize, example: u8 },
}

/// Accepts masks whose pixels are all 0 or one foreground level (255, or 1 for 0/1 masks) and returns them as
/// 0/255.
fn binarise_mask(mut mask: GrayImage) -> Result<GrayImage, MaskProblem> {
    let max = mask.pixels().map(|p| p.0[0]).max().unwrap_or(0);
    if max == 0 {
        return Err(MaskProblem::Empty);
    }
    let foreground = if max == 1 { 1 } else { 255 };
    let mut count = 0;
    let mut example = 0;
    for p in mask.pixels() {
        let v = p.0[0];
        if v != 0 && v != foreground {
            count += 1;
            example = v;
        }
    }
    if count > 0 {
        return Err(MaskProblem::NonBinary {
            foreground,
            count,
            example,
        });
    }
    for p in mask.pixels_mut() {
        p.0[0] = if p.0[0] > 0 { 255 } else { 0 };
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_only() {
        assert!(is_inside_relative("a/b.png"));
        assert!(is_inside_relative("./a.png"));
        assert!(!is_inside_relative("../a.png"));
        assert!(!is_inside_relative("a/../../b.png"));
        assert!(!is_inside_relative("/etc/passwd"));
        assert!(!is_inside_relative(""));
    }

    #[test]
    fn binarise_accepts_0_1_and_0_255() {
        let m = GrayImage::from_raw(2, 1, vec![0, 1]).unwrap();
        assert_eq!(binarise_mask(m).ok().unwrap().into_raw(), vec![0, 255]);
        let m = GrayImage::from_raw(2, 1, vec![255, 0]).unwrap();
        assert_eq!(binarise_mask(m).ok().unwrap().into_raw(), vec![255, 0]);
    }

    #[test]
    fn binarise_rejects_grey_and_empty() {
        let m = GrayImage::from_raw(3, 1, vec![0, 128, 255]).unwrap();
        assert!(matches!(
            binarise_mask(m),
            Err(MaskProblem::NonBinary {
                foreground: 255,
                count: 1,
                example: 128
            })
        ));
        let m = GrayImage::from_raw(2, 1, vec![0, 0]).unwrap();
        assert!(matches!(binarise_mask(m), Err(MaskProblem::Empty)));
    }
}
