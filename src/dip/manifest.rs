//! The DIP manifest: `metadata.jsonl`, one JSON object per line (HF-imagefolder style). See `docs/dataset.md`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::DipError;

/// File name of the manifest inside a dataset folder.
pub const MANIFEST_FILE: &str = "metadata.jsonl";

/// Fields a manifest line may carry; anything else is reported as an unknown field.
pub const KNOWN_FIELDS: [&str; 8] = [
    "id",
    "prompt",
    "references",
    "winner",
    "loser",
    "masks",
    "category",
    "meta",
];

/// Semantic category of an item (paper B.1: objects, animals, humans).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    /// Man-made things.
    Object,
    /// Animals.
    Animal,
    /// People (real or stylised).
    Human,
}

impl Category {
    /// All categories, in display order.
    pub const ALL: [Category; 3] = [Category::Object, Category::Animal, Category::Human];

    /// The lowercase name used in the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Object => "object",
            Category::Animal => "animal",
            Category::Human => "human",
        }
    }
}

/// One line of `metadata.jsonl`: a DIP quadruplet `(c, x_r, x_0^w, x_0^l)` plus per-subject masks.
///
/// Paths are relative to the dataset folder, with `/` separators.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemRecord {
    /// Unique item id.
    pub id: String,
    /// The conditioning prompt `c`.
    pub prompt: String,
    /// Reference images `x_r`, one per subject.
    pub references: Vec<String>,
    /// The preferred image `x_0^w`.
    pub winner: String,
    /// The dispreferred image `x_0^l`.
    pub loser: String,
    /// Binary subject masks (`M_prior^j`), one per subject, aligned with `references`, at the winner's size.
    pub masks: Vec<String>,
    /// Optional semantic category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<Category>,
    /// Free-form metadata (the synthetic generator stores ground-truth identities here).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub meta: Value,
}

impl ItemRecord {
    /// Number of subjects (= number of references).
    pub fn subject_count(&self) -> usize {
        self.references.len()
    }
}

/// A manifest line that parsed, with its 1-based line number.
#[derive(Clone, Debug, PartialEq)]
pub struct ManifestEntry {
    /// 1-based line number in `metadata.jsonl`.
    pub line: usize,
    /// The parsed record.
    pub record: ItemRecord,
}

/// The result of reading a manifest: the lines that parsed and a typed error for each line that did not.
#[derive(Debug, Default)]
pub struct ParsedManifest {
    /// Lines that parsed into records, in file order.
    pub entries: Vec<ManifestEntry>,
    /// One error per malformed line (with its line number and, where known, the field).
    pub line_errors: Vec<DipError>,
}

/// Parses the manifest text. Blank lines are skipped. Never panics: every malformed line becomes an error.
///
/// `file` is only used to name the file in errors.
pub fn parse_manifest(file: &Path, text: &str) -> ParsedManifest {
    let mut parsed = ParsedManifest::default();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        match parse_line(file, line, raw) {
            Ok(record) => parsed.entries.push(ManifestEntry { line, record }),
            Err(errors) => parsed.line_errors.extend(errors),
        }
    }
    parsed
}

/// Parses one line; returns every problem found on it (all unknown fields, then the first type error).
fn parse_line(file: &Path, line: usize, raw: &str) -> Result<ItemRecord, Vec<DipError>> {
    let value: Value = serde_json::from_str(raw).map_err(|e| {
        vec![DipError::MalformedLine {
            file: file.to_path_buf(),
            line,
            message: e.to_string(),
        }]
    })?;
    let Value::Object(mut object) = value else {
        return Err(vec![DipError::MalformedLine {
            file: file.to_path_buf(),
            line,
            message: format!("expected a JSON object, found {}", json_kind(&value)),
        }]);
    };
    let mut errors: Vec<DipError> = object
        .keys()
        .filter(|k| !KNOWN_FIELDS.contains(&k.as_str()))
        .map(|k| DipError::UnknownField {
            file: file.to_path_buf(),
            line,
            field: k.clone(),
        })
        .collect();
    object.retain(|k, _| KNOWN_FIELDS.contains(&k.as_str()));
    if let Some(e) = check_field_types(file, line, &object) {
        errors.push(e);
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    serde_json::from_value(Value::Object(object)).map_err(|e| {
        vec![DipError::MalformedLine {
            file: file.to_path_buf(),
            line,
            message: e.to_string(),
        }]
    })
}

/// Checks presence and JSON type of each known field so the error can name the field.
fn check_field_types(file: &Path, line: usize, object: &Map<String, Value>) -> Option<DipError> {
    let bad = |field: &str, message: String| DipError::BadField {
        file: file.to_path_buf(),
        line,
        field: field.to_string(),
        message,
    };
    for field in ["id", "prompt", "winner", "loser"] {
        match object.get(field) {
            None => return Some(bad(field, "missing (required string)".into())),
            Some(Value::String(_)) => {}
            Some(v) => return Some(bad(field, format!("expected a string, found {}", json_kind(v)))),
        }
    }
    for field in ["references", "masks"] {
        match object.get(field) {
            None => return Some(bad(field, "missing (required list of paths)".into())),
            Some(Value::Array(items)) => {
                if let Some((i, v)) = items.iter().enumerate().find(|(_, v)| !v.is_string()) {
                    return Some(bad(
                        field,
                        format!("element {i} should be a path string, found {}", json_kind(v)),
                    ));
                }
            }
            Some(v) => return Some(bad(field, format!("expected a list of paths, found {}", json_kind(v)))),
        }
    }
    match object.get("category") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if Category::ALL.iter().any(|c| c.as_str() == s) => {}
        Some(v) => {
            return Some(bad(
                "category",
                format!("expected one of \"object\", \"animal\", \"human\", found {v}"),
            ));
        }
    }
    None
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Serialises records as `metadata.jsonl` text (one compact JSON object per line).
pub fn manifest_text(records: &[ItemRecord]) -> Result<String, serde_json::Error> {
    let mut out = String::new();
    for r in records {
        out.push_str(&serde_json::to_string(r)?);
        out.push('\n');
    }
    Ok(out)
}

/// Resolves a manifest path (relative, `/`-separated) against the dataset folder.
///
/// Absolute paths and `..` components are kept as written; the validator reports them (a dataset must be
/// relocatable).
pub fn resolve(root: &Path, relative: &str) -> PathBuf {
    root.join(relative)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> &'static Path {
        Path::new("d/metadata.jsonl")
    }

    const GOOD: &str = r#"{"id":"a","prompt":"p","references":["r.png"],"winner":"w.png","loser":"l.png","masks":["m.png"],"category":"animal","meta":{"k":1}}"#;

    #[test]
    fn parses_a_good_line_and_skips_blank_lines() {
        let text = format!("\n{GOOD}\n\n");
        let p = parse_manifest(file(), &text);
        assert!(p.line_errors.is_empty(), "{:?}", p.line_errors);
        assert_eq!(p.entries.len(), 1);
        assert_eq!(p.entries[0].line, 2);
        assert_eq!(p.entries[0].record.category, Some(Category::Animal));
        assert_eq!(p.entries[0].record.subject_count(), 1);
    }

    #[test]
    fn malformed_json_names_the_line() {
        let p = parse_manifest(file(), &format!("{GOOD}\n{{\"id\": \n"));
        assert_eq!(p.entries.len(), 1);
        assert!(matches!(&p.line_errors[..], [DipError::MalformedLine { line: 2, .. }]));
    }

    #[test]
    fn every_unknown_field_is_reported() {
        let line = GOOD.replace("\"meta\"", "\"refrences\":[],\"extra\":1,\"meta\"");
        let p = parse_manifest(file(), &line);
        let fields: Vec<_> = p
            .line_errors
            .iter()
            .filter_map(|e| match e {
                DipError::UnknownField { field, line: 1, .. } => Some(field.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(fields, ["extra", "refrences"]);
    }

    #[test]
    fn wrong_types_and_missing_fields_name_the_field() {
        for (text, field) in [
            (GOOD.replace("\"id\":\"a\"", "\"id\":3"), "id"),
            (GOOD.replace("\"winner\":\"w.png\",", ""), "winner"),
            (GOOD.replace("[\"m.png\"]", "\"m.png\""), "masks"),
            (GOOD.replace("[\"r.png\"]", "[7]"), "references"),
            (GOOD.replace("animal", "plant"), "category"),
        ] {
            let p = parse_manifest(file(), &text);
            assert!(
                matches!(&p.line_errors[..], [DipError::BadField { field: f, .. }] if f == field),
                "{field}: {:?}",
                p.line_errors
            );
        }
    }

    #[test]
    fn a_non_object_line_is_malformed() {
        let p = parse_manifest(file(), "[1,2]\n");
        assert!(
            matches!(&p.line_errors[..], [DipError::MalformedLine { line: 1, message, .. }] if message.contains("list"))
        );
    }

    #[test]
    fn round_trips_through_text() {
        let p = parse_manifest(file(), GOOD);
        let records: Vec<_> = p.entries.into_iter().map(|e| e.record).collect();
        let text = manifest_text(&records).unwrap();
        let again = parse_manifest(file(), &text);
        assert_eq!(again.entries[0].record, records[0]);
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Arbitrary text never panics the parser, and every non-blank line is accounted for exactly once
        /// (as an entry or as at least one error).
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC*(\n\\PC*){0,4}") {
            let parsed = parse_manifest(Path::new("m.jsonl"), &text);
            let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
            let mut bad: Vec<usize> = parsed.line_errors.iter().filter_map(DipError::line).collect();
            bad.dedup();
            prop_assert_eq!(parsed.entries.len() + bad.len(), lines);
        }

        /// JSON objects with arbitrary keys and values of arbitrary types never panic.
        #[test]
        fn arbitrary_objects_never_panic(
            fields in proptest::collection::vec(("[a-z]{1,10}", prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                "\\PC{0,8}".prop_map(Value::from),
                proptest::collection::vec("\\PC{0,5}".prop_map(Value::from), 0..3).prop_map(Value::from),
            ]), 0..10)
        ) {
            let object: Map<String, Value> = fields.into_iter().collect();
            let text = serde_json::to_string(&Value::Object(object)).unwrap_or_default();
            let _ = parse_manifest(Path::new("m.jsonl"), &text);
        }
    }
}
