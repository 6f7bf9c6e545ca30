//! Ablation plans in the seeds' Markdown format, parsed into [`Study`]s.
//!
//! ```text
//! ### Ablation of Margin Threshold
//! - **Ablated Part**: margin threshold (δ) in intra-class contrastive learning
//! - **Action**: REPLACE
//! - **Replacement**:
//!   - 0.1
//!   - 0.2
//! - **Metrics**: top-1 accuracy, training stability, convergence speed
//! ```
//!
//! The parser is lenient, because plans are written by people and language models: HTML wrappers, mojibake
//! ([`super::text`]), prose between studies, fields in any order, `-`/`*`/`+`/`1.` bullets, bold or plain field
//! names, list values inline (`0.1, 0.2`) or as sub-bullets, `\r\n` line endings. A study is a heading
//! (`##`…`######`, or a line that is only bold text) followed by at least one field; headings without fields
//! (like "Reasoning Trace") are prose. A second `Ablated Part` under the same heading starts a new study.
//! Anything odd becomes a [`PlanWarning`] with its line; only a text without any study is an error.
//! The parser takes `&str`: reading files is the caller's job ([`super::read_plan_file`]).

use super::text;

/// What a study does to the ablated part.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Action {
    /// Swap the part for each replacement value (`REPLACE`, vary, sweep, …).
    Replace,
    /// Take the part out (`REMOVE`, drop, disable, w/o, …).
    Remove,
    /// Add something (`ADD`, insert, introduce, …).
    Add,
    /// Any other verb, as written.
    Other(String),
}

impl Action {
    /// Reads an action from its first word (case-insensitive).
    pub fn parse(text: &str) -> Action {
        let word: String = text
            .trim()
            .chars()
            .take_while(|c| c.is_alphabetic() || *c == '/')
            .collect::<String>()
            .to_lowercase();
        match word.as_str() {
            "replace" | "replacement" | "swap" | "substitute" | "vary" | "varying" | "change" | "modify" | "sweep"
            | "tune" | "adjust" | "alter" => Action::Replace,
            "remove" | "removal" | "delete" | "drop" | "disable" | "exclude" | "eliminate" | "without" | "w/o"
            | "ablate" => Action::Remove,
            "add" | "addition" | "insert" | "include" | "introduce" | "append" | "enable" => Action::Add,
            _ => Action::Other(text.trim().to_string()),
        }
    }
}

/// One ablation study of a plan.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Study {
    /// The heading (empty when the study had none).
    pub title: String,
    /// The "Ablated Part" text (empty when missing).
    pub ablated_part: String,
    /// What is done to it.
    pub action: Action,
    /// Replacement values, as written (numbers stay text; resolution parses them).
    pub replacements: Vec<String>,
    /// Metric names, as written.
    pub metrics: Vec<String>,
    /// 1-based line of the study's heading (or of its first field when it has no heading).
    pub line: usize,
}

/// A non-fatal problem, with the 1-based line it is about.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PlanWarning {
    /// 1-based line.
    pub line: usize,
    /// What is odd and what the parser did about it.
    pub message: String,
}

impl std::fmt::Display for PlanWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// A parsed plan.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Plan {
    /// The first level-1 heading (`# title`), if any.
    pub title: Option<String>,
    /// Studies in file order.
    pub studies: Vec<Study>,
    /// Non-fatal problems, in line order.
    pub warnings: Vec<PlanWarning>,
}

/// A text that holds no plan.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Nothing that looks like a study.
    #[error(
        "no ablation study found in {lines} lines: expected a heading (`### Title`) followed by bullets such as \
         `- **Ablated Part**: …`, `- **Action**: REPLACE`, `- **Replacement**: …`, `- **Metrics**: …`"
    )]
    NoStudies {
        /// Lines read.
        lines: usize,
    },
}

/// The fields a study can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    AblatedPart,
    Action,
    Replacement,
    Metrics,
}

impl Field {
    /// Recognises a field name written in any case, with any punctuation (`Ablated Part`, `ablated-part`).
    fn from_name(name: &str) -> Option<Field> {
        let key: String = name
            .chars()
            .filter(|c| c.is_alphanumeric())
            .collect::<String>()
            .to_lowercase();
        match key.as_str() {
            "ablatedpart" | "ablatedparts" | "ablatedcomponent" | "ablatedparameter" | "ablatedmodule"
            | "ablatedfactor" | "ablatedelement" | "ablationtarget" | "part" | "component" | "target" => {
                Some(Field::AblatedPart)
            }
            "action" | "operation" | "ablationtype" | "ablationaction" => Some(Field::Action),
            "replacement" | "replacements" | "replacementvalues" | "replacementvalue" | "replacedwith" | "values"
            | "variants" | "alternatives" | "settings" | "options" | "levels" | "candidates" | "newvalues" => {
                Some(Field::Replacement)
            }
            "metrics" | "metric" | "evaluationmetrics" | "evaluationmetric" | "evaluation" | "measures"
            | "reportedmetrics" | "measuredby" => Some(Field::Metrics),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Field::AblatedPart => "Ablated Part",
            Field::Action => "Action",
            Field::Replacement => "Replacement",
            Field::Metrics => "Metrics",
        }
    }
}

/// A `Name: value` line.
struct FieldLine<'a> {
    /// Recognised field, or `None` for an unknown name.
    field: Option<Field>,
    /// The name as written (emphasis removed).
    name: &'a str,
    /// Whether the name was bold/italic/code (then an unknown name is worth a warning).
    emphasized: bool,
    /// Text after the colon.
    value: &'a str,
}

/// Longest field name we consider (longer "names" are sentences with a colon).
const MAX_FIELD_NAME_CHARS: usize = 40;

fn parse_field_line(content: &str) -> Option<FieldLine<'_>> {
    let colon = content.find(':')?;
    let raw_name = &content[..colon];
    let trimmed = raw_name.trim();
    let emphasized = trimmed.starts_with(['*', '_', '`']);
    let name = trimmed.trim_matches(|c: char| c == '*' || c == '_' || c == '`' || c.is_whitespace());
    if name.is_empty() || name.chars().count() > MAX_FIELD_NAME_CHARS || name.contains(['*', '`']) {
        return None;
    }
    // `**Name:** value` puts the closing marker after the colon.
    let value = content[colon + 1..].trim_start_matches(['*', '_']).trim();
    Some(FieldLine {
        field: Field::from_name(name),
        name,
        emphasized,
        value,
    })
}

/// A line after the prefix is taken off.
enum LineKind<'a> {
    Blank,
    Heading { level: usize, text: &'a str },
    Bullet { indent: usize, content: &'a str },
    Text { content: &'a str },
}

fn classify(line: &str) -> LineKind<'_> {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return LineKind::Blank;
    }
    let indent = indent_width(line);
    if indent < 4 && trimmed.starts_with('#') {
        let level = trimmed.chars().take_while(|&c| c == '#').count();
        let rest = &trimmed[level..];
        if level <= 6 && (rest.is_empty() || rest.starts_with(char::is_whitespace)) {
            let text = rest.trim().trim_end_matches('#').trim();
            return LineKind::Heading { level, text };
        }
    }
    if let Some(content) = bullet_content(trimmed) {
        return LineKind::Bullet { indent, content };
    }
    LineKind::Text { content: trimmed }
}

/// Leading whitespace in columns (a tab is 4).
fn indent_width(line: &str) -> usize {
    line.chars()
        .take_while(|c| c.is_whitespace())
        .map(|c| if c == '\t' { 4 } else { 1 })
        .sum()
}

/// The text after a `-`, `*`, `+`, `•`, `1.` or `1)` bullet marker.
fn bullet_content(trimmed: &str) -> Option<&str> {
    let mut chars = trimmed.char_indices();
    let (_, first) = chars.next()?;
    let after_marker = if matches!(first, '-' | '*' | '+' | '•') {
        &trimmed[first.len_utf8()..]
    } else {
        let digits = trimmed.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 || digits > 3 {
            return None;
        }
        let rest = &trimmed[digits..];
        rest.strip_prefix(['.', ')'])?
    };
    // `**bold**` at the start of a line is not a bullet; a marker needs a space after it.
    if after_marker.is_empty() {
        return Some("");
    }
    after_marker
        .starts_with(char::is_whitespace)
        .then(|| after_marker.trim())
}

/// A line that is only bold text (`**Study 2: rank**`), used as a heading by some plans.
fn bold_heading(content: &str) -> Option<&str> {
    let inner = content
        .strip_prefix("**")
        .and_then(|s| s.strip_suffix("**"))
        .or_else(|| content.strip_prefix("__").and_then(|s| s.strip_suffix("__")))?;
    let inner = inner.trim();
    (!inner.is_empty() && !inner.contains("**")).then_some(inner)
}

/// Removes Markdown emphasis markers and surrounding punctuation from a value.
fn clean_value(s: &str) -> String {
    let s = s.replace("**", "").replace("__", "");
    let s = s.trim().trim_end_matches([',', ';']).trim();
    // One sentence-final period ("0.5." → "0.5"); an ellipsis or "etc." keeps its dots.
    let s = match s.strip_suffix('.') {
        Some(r) if !r.ends_with('.') && !r.ends_with("etc") => r,
        _ => s,
    };
    s.trim().to_string()
}

/// Splits an inline list (`0.1, 0.2 and 0.3`, `[1e-4; 3e-4]`) at commas/semicolons outside brackets.
fn split_inline_list(value: &str) -> Vec<String> {
    let value = value.trim();
    let value = match (value.chars().next(), value.chars().last()) {
        (Some('[' | '{'), Some(']' | '}')) if value.len() >= 2 => &value[1..value.len() - 1],
        _ => value,
    };
    let separator = if value.contains(';') { ';' } else { ',' };
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in value.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            c if c == separator && depth <= 0 => {
                parts.push(&value[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    parts
        .into_iter()
        .map(|p| {
            let p = p.trim();
            let p = p.strip_prefix("and ").or_else(|| p.strip_prefix("or ")).unwrap_or(p);
            clean_value(p)
        })
        .filter(|p| !p.is_empty())
        .collect()
}

/// A study being read.
#[derive(Default)]
struct Draft {
    title: String,
    line: usize,
    ablated_part: Option<String>,
    action: Option<Action>,
    replacements: Vec<String>,
    metrics: Vec<String>,
    has_fields: bool,
}

/// Where the next line may continue.
#[derive(Clone, Copy)]
enum Continuation {
    Scalar(Field),
    ListItem(Field),
}

#[derive(Default)]
struct Parser {
    title: Option<String>,
    studies: Vec<Study>,
    warnings: Vec<PlanWarning>,
    draft: Option<Draft>,
    /// Open list field and the indentation of its line.
    open_list: Option<(Field, usize)>,
    continuation: Option<Continuation>,
}

impl Parser {
    fn warn(&mut self, line: usize, message: String) {
        self.warnings.push(PlanWarning { line, message });
    }

    fn finish_draft(&mut self) {
        self.open_list = None;
        self.continuation = None;
        let Some(d) = self.draft.take() else { return };
        if !d.has_fields {
            return;
        }
        let label = if d.title.is_empty() {
            "untitled study".to_string()
        } else {
            format!("study \"{}\"", d.title)
        };
        let ablated_part = d.ablated_part.unwrap_or_default();
        if ablated_part.is_empty() {
            self.warn(d.line, format!("{label} has no Ablated Part"));
        }
        let action = match d.action {
            Some(a) => a,
            None => {
                self.warn(d.line, format!("{label} has no Action; assuming REPLACE"));
                Action::Replace
            }
        };
        if let Action::Other(verb) = &action {
            self.warn(
                d.line,
                format!("{label}: unknown Action `{verb}`; its replacements are run as REPLACE"),
            );
        }
        if matches!(action, Action::Replace | Action::Add) && d.replacements.is_empty() {
            self.warn(d.line, format!("{label}: {action:?} without any Replacement value"));
        }
        if d.metrics.is_empty() {
            self.warn(d.line, format!("{label} lists no Metrics"));
        }
        self.studies.push(Study {
            title: d.title,
            ablated_part,
            action,
            replacements: d.replacements,
            metrics: d.metrics,
            line: d.line,
        });
    }

    fn start_draft(&mut self, title: &str, line: usize) {
        self.finish_draft();
        self.draft = Some(Draft {
            title: clean_value(title),
            line,
            ..Draft::default()
        });
    }

    fn heading(&mut self, level: usize, text: &str, line: usize) {
        if level == 1 && self.title.is_none() && self.studies.is_empty() {
            self.finish_draft();
            self.title = Some(clean_value(text)).filter(|t| !t.is_empty());
            return;
        }
        self.start_draft(text, line);
    }

    fn field(&mut self, field: Field, value: &str, indent: usize, line: usize) {
        let needs_new = match &self.draft {
            None => {
                self.warn(
                    line,
                    format!(
                        "`{}` before any study heading; starting an untitled study",
                        field.name()
                    ),
                );
                true
            }
            Some(d) => field == Field::AblatedPart && d.ablated_part.is_some(),
        };
        if needs_new {
            if self.draft.is_some() {
                self.warn(
                    line,
                    "a second Ablated Part under one heading starts a new, untitled study".into(),
                );
            }
            self.start_draft("", line);
        }
        let mut warnings = Vec::new();
        let Some(d) = self.draft.as_mut() else { return };
        d.has_fields = true;
        self.open_list = None;
        self.continuation = Some(Continuation::Scalar(field));
        match field {
            Field::AblatedPart => d.ablated_part = Some(clean_value(value)),
            Field::Action => {
                if d.action.is_some() {
                    warnings.push("a second Action replaces the first".to_string());
                }
                d.action = Some(Action::parse(&clean_value(value)));
            }
            Field::Replacement | Field::Metrics => {
                let list = if field == Field::Replacement {
                    &mut d.replacements
                } else {
                    &mut d.metrics
                };
                if !list.is_empty() {
                    warnings.push(format!("a second `{}` adds to the first", field.name()));
                }
                // "the following values:" introduces sub-bullets; it is not a value.
                if !value.trim_end().ends_with(':') {
                    list.extend(split_inline_list(value));
                }
                self.open_list = Some((field, indent));
                self.continuation = Some(Continuation::ListItem(field));
            }
        }
        for w in warnings {
            self.warn(line, w);
        }
    }

    fn list_item(&mut self, field: Field, content: &str) {
        let Some(d) = self.draft.as_mut() else { return };
        let value = clean_value(content);
        if value.is_empty() {
            return;
        }
        match field {
            Field::Replacement => d.replacements.push(value),
            _ => d.metrics.extend(split_inline_list(&value)),
        }
        self.continuation = Some(Continuation::ListItem(field));
    }

    /// A plain line right after a field or item continues it (Markdown's lazy continuation).
    fn continue_value(&mut self, content: &str) -> bool {
        let Some(d) = self.draft.as_mut() else { return false };
        let extra = clean_value(content);
        let target = match self.continuation {
            Some(Continuation::Scalar(Field::AblatedPart)) => d.ablated_part.as_mut(),
            Some(Continuation::ListItem(Field::Replacement)) => d.replacements.last_mut(),
            Some(Continuation::ListItem(Field::Metrics)) => d.metrics.last_mut(),
            _ => None,
        };
        match target {
            Some(t) => {
                if !t.is_empty() {
                    t.push(' ');
                }
                t.push_str(&extra);
                true
            }
            None => false,
        }
    }

    fn line(&mut self, raw: &str, line: usize) {
        match classify(raw) {
            LineKind::Blank => self.continuation = None,
            LineKind::Heading { level, text } => self.heading(level, text, line),
            LineKind::Bullet { indent, content } => self.bullet(indent, content, line),
            LineKind::Text { content } => self.text(content, line),
        }
    }

    fn bullet(&mut self, indent: usize, content: &str, line: usize) {
        let parsed = parse_field_line(content);
        if let Some((field, list_indent)) = self.open_list {
            let nested = indent > list_indent;
            // A bold `**Name**:` bullet at the field's depth is a (maybe unknown) field, not a value.
            let is_field = parsed.as_ref().is_some_and(|f| f.field.is_some() || f.emphasized);
            if nested || !is_field {
                self.list_item(field, content);
                return;
            }
        }
        match parsed {
            Some(FieldLine {
                field: Some(field),
                value,
                ..
            }) => self.field(field, value, indent, line),
            Some(FieldLine {
                field: None,
                name,
                emphasized: true,
                ..
            }) if self.draft.as_ref().is_some_and(|d| d.has_fields) => {
                let name = name.to_string();
                self.warn(
                    line,
                    format!("unknown field `{name}` ignored (known: Ablated Part, Action, Replacement, Metrics)"),
                );
                self.continuation = None;
            }
            _ => self.continuation = None,
        }
    }

    fn text(&mut self, content: &str, line: usize) {
        if let Some(FieldLine {
            field: Some(field),
            value,
            ..
        }) = parse_field_line(content)
        {
            self.field(field, value, 0, line);
            return;
        }
        if let Some(title) = bold_heading(content) {
            self.start_draft(title, line);
            return;
        }
        if !self.continue_value(content) {
            self.continuation = None;
        }
    }
}

/// Parses a plan (module docs). Errors only when no study is found; everything else is a warning.
pub fn parse_plan(input: &str) -> Result<Plan, PlanError> {
    let repaired = text::repair_mojibake(input);
    let unified = text::normalize_newlines(&repaired);
    let stripped = text::strip_html(&unified);
    let mut parser = Parser::default();
    let mut lines = 0;
    for (i, raw) in stripped.split('\n').enumerate() {
        lines = i + 1;
        parser.line(raw, i + 1);
    }
    parser.finish_draft();
    if parser.studies.is_empty() {
        return Err(PlanError::NoStudies { lines });
    }
    parser.warnings.sort_by_key(|w| w.line);
    Ok(Plan {
        title: parser.title,
        studies: parser.studies,
        warnings: parser.warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn studies(text: &str) -> Vec<Study> {
        parse_plan(text).expect("parses").studies
    }

    #[test]
    fn inline_lists_split_outside_brackets() {
        assert_eq!(split_inline_list("1e-4, 3e-4"), ["1e-4", "3e-4"]);
        assert_eq!(split_inline_list("[0.1, 0.2, 0.3]"), ["0.1", "0.2", "0.3"]);
        assert_eq!(split_inline_list("f(a, b); g"), ["f(a, b)", "g"]);
        assert_eq!(
            split_inline_list("top-1 accuracy, stability, and speed."),
            ["top-1 accuracy", "stability", "speed"]
        );
    }

    #[test]
    fn field_names_in_any_dress() {
        for line in [
            "**Ablated Part**: x",
            "**Ablated Part:** x",
            "Ablated part: x",
            "__ablated-part__: x",
            "`Ablated Part`: x",
        ] {
            let f = parse_field_line(line).expect(line);
            assert_eq!(f.field, Some(Field::AblatedPart), "{line}");
            assert_eq!(f.value, "x", "{line}");
        }
        assert!(parse_field_line("Difference-based metric: ψ(w) - ψ(l)").is_some_and(|f| f.field.is_none()));
    }

    #[test]
    fn actions() {
        assert_eq!(Action::parse("REPLACE"), Action::Replace);
        assert_eq!(Action::parse("remove"), Action::Remove);
        assert_eq!(Action::parse("Add a term"), Action::Add);
        assert_eq!(Action::parse("Rescale"), Action::Other("Rescale".into()));
    }

    #[test]
    fn same_indent_items_and_continuations() {
        let s = studies(
            "## A\n* Ablated Part: lr\n  of AdamW\n* Replacement:\n* 1e-4\n* 3e-4\n* Action: vary\n* Metrics: loss\n",
        );
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].ablated_part, "lr of AdamW");
        assert_eq!(s[0].replacements, ["1e-4", "3e-4"]);
        assert_eq!(s[0].action, Action::Replace);
        assert_eq!(s[0].metrics, ["loss"]);
    }

    #[test]
    fn second_ablated_part_starts_a_study_and_fields_without_heading_warn() {
        let plan =
            parse_plan("- Ablated Part: a\n- Action: remove\n- Ablated Part: b\n- Action: remove\n").expect("parses");
        assert_eq!(plan.studies.len(), 2);
        assert_eq!(plan.studies[1].line, 3);
        assert!(
            plan.warnings
                .iter()
                .any(|w| w.line == 1 && w.message.contains("before any study heading"))
        );
        assert!(
            plan.warnings
                .iter()
                .any(|w| w.line == 3 && w.message.contains("second Ablated Part"))
        );
    }

    #[test]
    fn bold_unknown_field_closes_a_list_and_unknown_actions_warn() {
        let plan = parse_plan(
            "### S\n- **Ablated Part**: β\n- **Action**: Rescale\n- **Metrics**: loss\n- **Expected Outcome**: better\n",
        )
        .expect("parses");
        assert_eq!(plan.studies[0].metrics, ["loss"]);
        assert_eq!(plan.studies[0].action, Action::Other("Rescale".into()));
        let messages: Vec<&str> = plan.warnings.iter().map(|w| w.message.as_str()).collect();
        assert!(messages.iter().any(|m| m.contains("Expected Outcome")), "{messages:?}");
        assert!(
            messages.iter().any(|m| m.contains("unknown Action `Rescale`")),
            "{messages:?}"
        );
    }

    #[test]
    fn no_study_is_an_error() {
        assert_eq!(parse_plan(""), Err(PlanError::NoStudies { lines: 1 }));
        assert_eq!(
            parse_plan("# Title\n\nJust prose.\n### Heading\nmore prose"),
            Err(PlanError::NoStudies { lines: 5 })
        );
    }
}
