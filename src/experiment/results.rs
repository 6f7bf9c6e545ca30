//! The results of a plan, pure: each cell's metric values under the ids of [`crate::eval::study`]
//! (`single.X` / `multi.X` from the benchmark's eval.json, `train.X` from the training log), the mapping of the
//! plan's metric ids onto those values ([`METRIC_VALUES`]), one table per study (mean ± 95 % CI over seeds, the
//! best value per column marked) rendered as results.md, and results.csv. The store ([`super::store`]) reads the
//! files; the plots are drawn by [`super::plot`].

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::grid::{BASELINE, Cell, unique_ids};
use super::resolve::{Derivation, METRICS, MetricMatch, Override, Resolution, ResolvedStudy, UnresolvedKind};
use crate::eval::metrics::mean_ci95;
use crate::eval::study::{Better, SPLITS, all_metrics, column_markdown, metric_spec};

/// Plan metric id (the resolver's [`METRICS`]) → the value ids that measure it. `*.name` stands for the
/// benchmark value of both splits (`single.name`, `multi.name`); `train.*` ids come from the training log.
///
/// | plan metric | values |
/// |---|---|
/// | `identity_sim`, `top1_identification`, `identity_is`, `eer`, `fmr100`, `fmr1000`, `fdr`, `fd_identity`, `cmmd_identity`, `psnr`, `subject_psnr`, `dino`, `clip_i`, `clip_t` | the benchmark value of the same name, per split |
/// | `gt_fidelity` | PSNR and subject PSNR to the exact ground truth (the ideal target) of the samples and of the one-step denoised `x̂₀`, per split |
/// | `implicit_accuracy`, `reward_margin` | `train.` + the same name (mean over the last 20 % of the steps), and the held-out preference accuracy / implicit reward per split (`eval::denoise`) |
/// | `loss` | `train.loss` (mean over the last 20 % of the steps) |
/// | `stability` | `train.loss_std`, `train.grad_spikes` |
/// | `convergence_speed` | `train.convergence_steps` |
pub const METRIC_VALUES: &[(&str, &[&str])] = &[
    ("identity_sim", &["*.identity_sim"]),
    ("dino", &["*.dino"]),
    ("clip_i", &["*.clip_i"]),
    ("clip_t", &["*.clip_t"]),
    ("eer", &["*.eer"]),
    ("fmr100", &["*.fmr100"]),
    ("fmr1000", &["*.fmr1000"]),
    ("fdr", &["*.fdr"]),
    ("fd_identity", &["*.fd_identity"]),
    ("cmmd_identity", &["*.cmmd_identity"]),
    ("psnr", &["*.psnr"]),
    ("subject_psnr", &["*.subject_psnr"]),
    (
        "gt_fidelity",
        &["*.psnr", "*.subject_psnr", "*.denoise_psnr", "*.denoise_subject_psnr"],
    ),
    ("top1_identification", &["*.top1_identification"]),
    ("identity_is", &["*.identity_is"]),
    (
        "implicit_accuracy",
        &[
            "*.heldout_accuracy",
            "*.heldout_subject_accuracy",
            "train.implicit_accuracy",
        ],
    ),
    (
        "reward_margin",
        &["*.heldout_reward", "*.heldout_subject_reward", "train.reward_margin"],
    ),
    ("loss", &["train.loss"]),
    ("stability", &["train.loss_std", "train.grad_spikes"]),
    ("convergence_speed", &["train.convergence_steps"]),
];

/// Columns every study table shows, whatever it asked for (when some cell has them).
/// The held-out preference accuracy comes first: it is the one preference measure of every evaluated cell, so a
/// plan whose own metrics are all unavailable (001's aesthetic scorers) still gets a held-out comparison.
pub const ALWAYS_SHOWN: [&str; 6] = [
    "single.heldout_accuracy",
    "multi.heldout_accuracy",
    "single.heldout_subject_accuracy",
    "multi.heldout_subject_accuracy",
    "train.implicit_accuracy",
    "train.loss",
];

/// The value ids of a plan metric id, splits expanded (single first); empty for an unknown id.
pub fn value_ids(metric_id: &str) -> Vec<String> {
    let Some((_, patterns)) = METRIC_VALUES.iter().find(|(id, _)| *id == metric_id) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for split in SPLITS {
        for p in patterns.iter().filter_map(|p| p.strip_prefix("*.")) {
            out.push(format!("{split}.{p}"));
        }
    }
    out.extend(patterns.iter().filter(|p| !p.starts_with("*.")).map(|p| p.to_string()));
    out
}

/// What `finished.json` holds: the training values of a finished cell ([`crate::eval::study::training_values`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FinishedCell {
    /// Steps logged.
    pub steps: usize,
    /// `train.*` values.
    pub values: BTreeMap<String, f64>,
}

/// State of a cell in the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CellStatus {
    /// Trained (and evaluated, when its values hold benchmark ids).
    Finished,
    /// Its overrides did not apply or its training failed.
    Failed,
    /// Not run yet (or interrupted).
    Pending,
}

impl CellStatus {
    /// The word in results.csv.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Finished => "finished",
            Self::Failed => "failed",
            Self::Pending => "pending",
        }
    }
}

/// One cell with its status and metric values (empty unless finished).
#[derive(Clone, Debug, PartialEq)]
pub struct CellResult {
    /// The cell.
    pub cell: Cell,
    /// Its state.
    pub status: CellStatus,
    /// Steps logged (finished cells).
    pub steps: Option<usize>,
    /// Training values plus, when evaluated, benchmark values.
    pub values: BTreeMap<String, f64>,
}

/// A table column: value id, label and direction.
#[derive(Clone, Debug, PartialEq)]
pub struct Column {
    /// Value id (`single.eer`).
    pub id: String,
    /// Label (`single: EER`).
    pub label: String,
    /// Which way is better.
    pub better: Better,
}

/// Mean and 95 % CI half-width (NaN for one seed) of a value over a row's seeds, and how many seeds had it.
#[derive(Clone, Debug, PartialEq)]
pub struct Stat {
    /// Mean.
    pub mean: f64,
    /// CI half-width ([`mean_ci95`]).
    pub ci95: f64,
    /// Seeds with a value.
    pub n: usize,
    /// The value of each of those seeds (plots draw them).
    pub per_seed: Vec<(u64, f64)>,
}

/// One value of a study (the baseline or a replacement) aggregated over its finished seeds.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The replacement as written ([`BASELINE`] for the baseline).
    pub value: String,
    /// The study's overrides of this value (none for the baseline).
    pub overrides: Vec<String>,
    /// Finished seeds.
    pub n: usize,
    /// Cells of the row in the grid.
    pub cells: usize,
    /// The knob's value as a number, when the row sets exactly one numeric override (for a numeric x axis).
    pub x: Option<f64>,
    /// Per column id.
    pub stats: BTreeMap<String, Stat>,
}

impl Row {
    /// The row label: the value as written, plus its overrides in back quotes.
    pub fn label(&self) -> String {
        if self.overrides.is_empty() {
            self.value.clone()
        } else {
            format!("{} (`{}`)", self.value, self.overrides.join("`, `"))
        }
    }
}

/// The results of one study.
#[derive(Clone, Debug, PartialEq)]
pub struct StudyTable {
    /// Study title.
    pub title: String,
    /// File-name slug, unique in the plan (`plots/<slug>.png`).
    pub slug: String,
    /// Line of the study in the plan.
    pub line: usize,
    /// Knob key (None: the part is unresolved and nothing ran).
    pub knob: Option<String>,
    /// Why that knob ([`super::resolve::KnobReason::text`]).
    pub reason: Option<String>,
    /// Columns with a value in some row.
    pub columns: Vec<Column>,
    /// Baseline first, then each resolved replacement.
    pub rows: Vec<Row>,
    /// Whether every replacement row has an [`Row::x`] (plots use a numeric axis).
    pub numeric_x: bool,
    /// Unresolved items of the study and requested metrics without values, each with its reason.
    pub left_out: Vec<String>,
}

/// A file-name slug: lower-case ASCII letters and digits, other runs of characters as one `-`, at most 60.
pub fn slug(title: &str) -> String {
    let mut out = String::new();
    for c in title.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    let mut s: String = out.chars().take(60).collect();
    while s.ends_with('-') {
        s.pop();
    }
    if s.is_empty() { "study".into() } else { s }
}

/// A finished cell's value of `id`: stored, or for a derived id ([`Derivation`]) its change against the finished
/// baseline cell of the same seed (`None` without one, or for a relative change against a zero baseline).
fn cell_value(r: &CellResult, id: &str, baseline: &[&CellResult]) -> Option<f64> {
    let Some((derivation, of)) = Derivation::split(id) else {
        return r.values.get(id).copied().filter(|x| x.is_finite());
    };
    let v = r.values.get(of).copied().filter(|x| x.is_finite())?;
    let b = baseline
        .iter()
        .find(|b| b.status == CellStatus::Finished && b.cell.seed == r.cell.seed)
        .and_then(|b| b.values.get(of).copied())
        .filter(|x| x.is_finite())?;
    match derivation {
        Derivation::Change => Some(v - b),
        Derivation::RelativeChange => (b != 0.0).then(|| 100.0 * (v - b) / b.abs()),
    }
}

fn aggregate_row(
    value: &str,
    overrides: &[Override],
    members: &[&CellResult],
    baseline: &[&CellResult],
    ids: &[String],
) -> Row {
    let finished: Vec<&CellResult> = members
        .iter()
        .copied()
        .filter(|r| r.status == CellStatus::Finished)
        .collect();
    let stats = ids
        .iter()
        .filter_map(|id| {
            let per_seed: Vec<(u64, f64)> = finished
                .iter()
                .filter_map(|r| cell_value(r, id, baseline).map(|v| (r.cell.seed, v)))
                .collect();
            if per_seed.is_empty() {
                return None;
            }
            let v: Vec<f64> = per_seed.iter().map(|(_, v)| *v).collect();
            let (mean, ci95) = mean_ci95(&v);
            Some((
                id.clone(),
                Stat {
                    mean,
                    ci95,
                    n: v.len(),
                    per_seed,
                },
            ))
        })
        .collect();
    let x = match overrides {
        [only] => only.value.trim().parse::<f64>().ok().filter(|x| x.is_finite()),
        _ => None,
    };
    Row {
        value: value.to_string(),
        overrides: overrides.iter().map(Override::arg).collect(),
        n: finished.len(),
        cells: members.len(),
        x,
        stats,
    }
}

/// A study's available plan metrics: (name as written, metric id, taken against the baseline or not).
type ResolvedMetricRef<'a> = (&'a str, &'static str, Option<Derivation>);

fn available_metrics(study: &ResolvedStudy) -> Vec<ResolvedMetricRef<'_>> {
    study
        .metrics
        .iter()
        .filter_map(|m| match &m.matched {
            MetricMatch::Available { id, derived, .. } => Some((m.text.as_str(), *id, *derived)),
            MetricMatch::Unavailable { .. } => None,
        })
        .collect()
}

/// The value ids of a plan metric, prefixed for a derived one.
fn study_value_ids(metric_id: &str, derived: Option<Derivation>) -> Vec<String> {
    let ids = value_ids(metric_id);
    match derived {
        None => ids,
        Some(d) => ids.into_iter().map(|i| format!("{}{i}", d.prefix())).collect(),
    }
}

/// Label and direction of a value id, derived ones included (`Δ single: identity sim`).
fn column_spec(id: &str) -> Option<(String, Better)> {
    match Derivation::split(id) {
        Some((d, of)) => metric_spec(of).map(|(label, better)| (format!("{} {label}", d.label()), better)),
        None => metric_spec(id),
    }
}

fn is_benchmark_id(id: &str) -> bool {
    SPLITS.iter().any(|s| id.starts_with(&format!("{s}.")))
}

/// Why a requested metric has no value in any row.
fn no_value_reason(metric_id: &str, ids: &[String], results: &[&CellResult]) -> String {
    let evaluated = results.iter().any(|r| r.values.keys().any(|k| is_benchmark_id(k)));
    if ids.iter().any(|i| is_benchmark_id(i)) && !evaluated {
        return "no value: no cell of the study was evaluated on the benchmark (`--no-eval`, not finished, or the \
                evaluation failed)"
            .into();
    }
    let note = METRICS.iter().find(|m| m.id == metric_id).and_then(|m| m.note);
    match (metric_id, note) {
        ("convergence_speed", _) => {
            "no value: no run reached 90 % of its final implicit accuracy in the logged steps (or it is SFT, which \
             has none)"
                .into()
        }
        (_, Some(n)) => format!("no value: {n}"),
        (_, None) => "no value in any finished cell".into(),
    }
}

/// One table per study of `resolution`: the baseline row (cells of [`BASELINE`]) and a row per resolved value
/// (cells of that study and value), the study's requested metrics that have values as columns (plus
/// [`ALWAYS_SHOWN`]), and what was left out.
pub fn study_tables(resolution: &Resolution, results: &[CellResult]) -> Vec<StudyTable> {
    let baseline: Vec<&CellResult> = results.iter().filter(|r| r.cell.study == BASELINE).collect();
    let mut slugs = HashSet::new();
    resolution
        .studies
        .iter()
        .map(|study| {
            let available = available_metrics(study);
            let mut ids: Vec<String> = Vec::new();
            for (_, metric_id, derived) in &available {
                for id in study_value_ids(metric_id, *derived) {
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
            }
            for id in ALWAYS_SHOWN {
                if !ids.iter().any(|i| i == id) {
                    ids.push(id.to_string());
                }
            }
            let mut rows = Vec::new();
            let mut members_all: Vec<&CellResult> = baseline.clone();
            if study.knob.is_some() {
                rows.push(aggregate_row(BASELINE, &[], &baseline, &baseline, &ids));
            }
            let mut seen_values = HashSet::new();
            for v in study.values.iter().filter(|v| seen_values.insert(v.text.as_str())) {
                let members: Vec<&CellResult> = results
                    .iter()
                    .filter(|r| r.cell.study == study.title && r.cell.value == v.text)
                    .collect();
                members_all.extend(&members);
                rows.push(aggregate_row(&v.text, &v.overrides, &members, &baseline, &ids));
            }
            let columns: Vec<Column> = ids
                .iter()
                .filter(|id| rows.iter().any(|r| r.stats.contains_key(*id)))
                .filter_map(|id| {
                    column_spec(id).map(|(label, better)| Column {
                        id: id.clone(),
                        label,
                        better,
                    })
                })
                .collect();
            let mut left_out: Vec<String> = resolution
                .unresolved
                .iter()
                .filter(|u| u.study == study.title && u.line == study.line)
                .map(|u| {
                    let what = match u.kind {
                        UnresolvedKind::Part => "ablated part",
                        UnresolvedKind::Value => "replacement",
                        UnresolvedKind::Metric => "metric",
                    };
                    format!("{what} `{}`: {}", u.text, u.reason)
                })
                .collect();
            if study.knob.is_some() {
                for (text, metric_id, derived) in &available {
                    let mids = study_value_ids(metric_id, *derived);
                    if !mids.iter().any(|i| columns.iter().any(|c| &c.id == i)) {
                        let reason = no_value_reason(metric_id, &mids, &members_all);
                        left_out.push(format!("metric `{text}` (`{metric_id}`): {reason}"));
                    }
                }
            }
            let replacements = rows.get(1..).unwrap_or_default();
            let numeric_x = !replacements.is_empty() && replacements.iter().all(|r| r.x.is_some());
            let mut s = slug(&study.title);
            let stem = s.clone();
            let mut k = 2;
            while !slugs.insert(s.clone()) {
                s = format!("{stem}-{k}");
                k += 1;
            }
            StudyTable {
                title: study.title.clone(),
                slug: s,
                line: study.line,
                knob: study.knob.clone(),
                reason: study.reason.as_ref().map(|r| r.text()),
                columns,
                rows,
                numeric_x,
                left_out,
            }
        })
        .collect()
}

fn arrow(better: Better) -> &'static str {
    match better {
        Better::Higher => "↑",
        Better::Lower => "↓",
    }
}

/// Markdown cells of one column: `mean ± CI` per row (`–` without a value), the best in bold unless fewer than two
/// rows have a value or all values are equal.
fn column_cells(rows: &[Row], column: &Column) -> Vec<String> {
    let values: Vec<Option<(f64, f64)>> = rows
        .iter()
        .map(|r| r.stats.get(&column.id).map(|s| (s.mean, s.ci95)))
        .collect();
    column_markdown(&values, column.better)
}

fn escape_cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// One study's section of results.md: heading, table (or why nothing ran), the plot link, what was left out.
pub fn study_markdown(table: &StudyTable, plot: Option<&str>) -> String {
    let mut out = format!("## {}\n\n", table.title);
    match &table.knob {
        Some(k) => {
            let why = table.reason.as_deref().map_or(String::new(), |r| format!("; {r}"));
            out.push_str(&format!("Knob `{k}` (plan line {}{why}).\n\n", table.line));
        }
        None => out.push_str(&format!(
            "Not run: the ablated part maps to no knob (plan line {}).\n\n",
            table.line
        )),
    }
    if table.knob.is_some() {
        out.push_str("| value | n |");
        for c in &table.columns {
            out.push_str(&format!(" {} {} |", c.label, arrow(c.better)));
        }
        out.push_str("\n|---|---|");
        out.push_str(&"---|".repeat(table.columns.len()));
        out.push('\n');
        let cells: Vec<Vec<String>> = table.columns.iter().map(|c| column_cells(&table.rows, c)).collect();
        for (i, row) in table.rows.iter().enumerate() {
            let n = if row.n == row.cells {
                row.n.to_string()
            } else {
                format!("{} of {}", row.n, row.cells)
            };
            out.push_str(&format!("| {} | {n} |", escape_cell(&row.label())));
            for col in &cells {
                out.push_str(&format!(" {} |", col[i]));
            }
            out.push('\n');
        }
        out.push('\n');
        if let Some(p) = plot {
            out.push_str(&format!("![{}]({p})\n\n", escape_cell(&table.title)));
        }
    }
    if !table.left_out.is_empty() {
        out.push_str("Left out:\n\n");
        for l in &table.left_out {
            out.push_str(&format!("- {l}\n"));
        }
        out.push('\n');
    }
    out
}

/// The plot file of a study, relative to the store root.
pub fn plot_path(table: &StudyTable) -> String {
    format!("plots/{}.png", table.slug)
}

/// The whole results.md: title, how many cells finished, one section per study (its plot linked when `has_plot`),
/// and the unresolved items that belong to no study.
pub fn results_markdown(
    title: Option<&str>,
    resolution: &Resolution,
    results: &[CellResult],
    tables: &[StudyTable],
    has_plot: &dyn Fn(&StudyTable) -> bool,
) -> String {
    let mut out = format!("# Results: {}\n\n", title.unwrap_or("ablation plan"));
    let cells: Vec<Cell> = results.iter().map(|r| r.cell.clone()).collect();
    let distinct = unique_ids(&cells);
    let count = |s: CellStatus| {
        distinct
            .iter()
            .filter(|id| results.iter().any(|r| r.cell.id == **id && r.status == s))
            .count()
    };
    out.push_str(&format!(
        "{} of {} distinct runs finished, {} failed. Each cell: mean ± 95 % confidence half-width over its finished \
         seeds (Student t, n − 1 degrees of freedom; the mean alone for n = 1); the best value of each column in \
         bold (↑ higher is better, ↓ lower). Benchmark values are per split (`single`, `multi`); training values \
         are over the last 20 % of the steps.\n\n",
        count(CellStatus::Finished),
        distinct.len(),
        count(CellStatus::Failed),
    ));
    for t in tables {
        let p = plot_path(t);
        out.push_str(&study_markdown(t, has_plot(t).then_some(p.as_str())));
    }
    let orphans: Vec<String> = resolution
        .unresolved
        .iter()
        .filter(|u| !tables.iter().any(|t| t.title == u.study && t.line == u.line))
        .map(ToString::to_string)
        .collect();
    if !orphans.is_empty() {
        out.push_str("## Left out\n\n");
        for o in orphans {
            out.push_str(&format!("- {o}\n"));
        }
    }
    out
}

/// Header of results.csv: the cell, its status and steps, every value id of [`all_metrics`], the overrides.
pub fn csv_header() -> String {
    let mut cols: Vec<String> = ["cell", "study", "value", "seed", "status", "steps"]
        .iter()
        .map(ToString::to_string)
        .collect();
    cols.extend(all_metrics().into_iter().map(|(id, _, _)| id));
    cols.push("overrides".into());
    cols.join(",")
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One row of results.csv (empty fields for values a cell does not have).
pub fn csv_row(result: &CellResult) -> String {
    let c = &result.cell;
    let mut fields = vec![
        c.id.clone(),
        csv_field(&c.study),
        csv_field(&c.value),
        c.seed.to_string(),
        result.status.as_str().to_string(),
        result.steps.map(|s| s.to_string()).unwrap_or_default(),
    ];
    for (id, _, _) in all_metrics() {
        fields.push(
            result
                .values
                .get(&id)
                .filter(|v| v.is_finite())
                .map(|v| format!("{v:.6}"))
                .unwrap_or_default(),
        );
    }
    fields.push(csv_field(&c.overrides.join(" ")));
    fields.join(",")
}

/// The whole results.csv: one row per cell of the grid.
pub fn results_csv(results: &[CellResult]) -> String {
    let mut text = csv_header();
    text.push('\n');
    for r in results {
        text.push_str(&csv_row(r));
        text.push('\n');
    }
    text
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::experiment::grid::build_grid;
    use crate::experiment::parse_plan;
    use crate::experiment::resolve::resolve_plan;

    pub(crate) fn hand_plan() -> Resolution {
        let text = "### Coverage\n- Ablated Part: τ\n- Replacement: 0.1, 0.2\n\
                    - Metrics: identity similarity, loss, aesthetic score, DINO\n";
        resolve_plan(&parse_plan(text).expect("parses"))
    }

    /// Baseline and τ = 0.1 have two finished seeds; τ = 0.2 one finished and one pending.
    pub(crate) fn hand_results(resolution: &Resolution) -> Vec<CellResult> {
        let cells = build_grid(resolution, &[], &[0, 1]);
        let values = |cell: &Cell| -> Option<[f64; 3]> {
            // (identity sim, loss, implicit accuracy)
            match (cell.value.as_str(), cell.seed) {
                (BASELINE, 0) => Some([0.5, 1.0, 0.5]),
                (BASELINE, _) => Some([0.7, 1.2, 0.5]),
                ("0.1", 0) => Some([0.7, 0.8, 0.5]),
                ("0.1", _) => Some([0.9, 0.8, 0.5]),
                ("0.2", 0) => Some([0.6, 0.9, 0.5]),
                _ => None,
            }
        };
        cells
            .iter()
            .map(|c| match values(c) {
                Some([sim, loss, acc]) => CellResult {
                    cell: c.clone(),
                    status: CellStatus::Finished,
                    steps: Some(10),
                    values: BTreeMap::from([
                        ("single.identity_sim".to_string(), sim),
                        ("train.loss".to_string(), loss),
                        ("train.implicit_accuracy".to_string(), acc),
                        ("train.grad_spikes".to_string(), 0.0),
                    ]),
                },
                None => CellResult {
                    cell: c.clone(),
                    status: CellStatus::Pending,
                    steps: None,
                    values: BTreeMap::new(),
                },
            })
            .collect()
    }

    #[test]
    fn every_plan_metric_maps_to_known_values() {
        for m in METRICS {
            let ids = value_ids(m.id);
            assert!(!ids.is_empty(), "{} has no values", m.id);
            for id in ids {
                assert!(metric_spec(&id).is_some(), "{} → {id} is not a study value id", m.id);
            }
        }
        assert_eq!(
            value_ids("gt_fidelity"),
            [
                "single.psnr",
                "single.subject_psnr",
                "single.denoise_psnr",
                "single.denoise_subject_psnr",
                "multi.psnr",
                "multi.subject_psnr",
                "multi.denoise_psnr",
                "multi.denoise_subject_psnr"
            ]
        );
        assert_eq!(
            value_ids("implicit_accuracy"),
            [
                "single.heldout_accuracy",
                "single.heldout_subject_accuracy",
                "multi.heldout_accuracy",
                "multi.heldout_subject_accuracy",
                "train.implicit_accuracy"
            ]
        );
        assert_eq!(value_ids("stability"), ["train.loss_std", "train.grad_spikes"]);
        assert!(value_ids("nope").is_empty());
    }

    #[test]
    fn table_values_ci_and_bold_by_hand() {
        let resolution = hand_plan();
        let results = hand_results(&resolution);
        let tables = study_tables(&resolution, &results);
        assert_eq!(tables.len(), 1);
        let t = &tables[0];
        assert_eq!(t.slug, "coverage");
        assert!(t.numeric_x);
        let ids: Vec<&str> = t.columns.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["single.identity_sim", "train.loss", "train.implicit_accuracy"]);
        // Baseline identity sim: mean 0.6, sd √0.02, t(1) = 12.7062 → half-width 12.7062 · √0.02 / √2 = 1.27062.
        let s = &t.rows[0].stats["single.identity_sim"];
        assert!(
            (s.mean - 0.6).abs() < 1e-12 && (s.ci95 - 1.27062).abs() < 1e-5 && s.n == 2,
            "{s:?}"
        );
        assert_eq!((t.rows[2].n, t.rows[2].cells), (1, 2));
        assert_eq!(t.rows[2].x, Some(0.2));
        let md = results_markdown(Some("hand"), &resolution, &results, &tables, &|_| true);
        let expected = [
            "| value | n | single: identity sim ↑ | loss (last 20 %) ↓ | implicit acc. (last 20 %) ↑ |",
            "| baseline | 2 | 0.6000 ± 1.2706 | 1.1000 ± 1.2706 | 0.5000 ± 0.0000 |",
            "| 0.1 (`masks.fusion.tau=0.1`) | 2 | **0.8000 ± 1.2706** | **0.8000 ± 0.0000** | 0.5000 ± 0.0000 |",
            "| 0.2 (`masks.fusion.tau=0.2`) | 1 of 2 | 0.6000 | 0.9000 | 0.5000 |",
            "![Coverage](plots/coverage.png)",
        ];
        for line in expected {
            assert!(md.lines().any(|l| l == line), "missing {line:?} in\n{md}");
        }
        assert!(md.contains("5 of 6 distinct runs finished, 0 failed"), "{md}");
        assert!(md.contains("- metric `aesthetic score`: needs a learned"), "{md}");
        assert!(
            md.contains("- metric `DINO` (`dino`): no value: needs pretrained weights"),
            "{md}"
        );
    }

    #[test]
    fn unevaluated_image_metrics_say_so_and_categories_are_not_numeric() {
        let text = "### Objective\n- Ablated Part: objective\n- Replacement: SFT, DPO\n- Metrics: EER, loss\n\
                    ### Nothing\n- Ablated Part: the moon phase\n- Replacement: full\n- Metrics: loss\n";
        let resolution = resolve_plan(&parse_plan(text).expect("parses"));
        let results: Vec<CellResult> = build_grid(&resolution, &[], &[0])
            .into_iter()
            .map(|cell| CellResult {
                cell,
                status: CellStatus::Finished,
                steps: Some(2),
                values: BTreeMap::from([("train.loss".to_string(), 1.0)]),
            })
            .collect();
        let tables = study_tables(&resolution, &results);
        assert!(!tables[0].numeric_x);
        assert_eq!(tables[0].columns.len(), 1, "{:?}", tables[0].columns);
        let md = results_markdown(None, &resolution, &results, &tables, &|_| false);
        assert!(md.contains("no cell of the study was evaluated"), "{md}");
        // All equal: nothing bold.
        assert!(!md.contains("**"), "{md}");
        assert!(md.contains("Not run: the ablated part maps to no knob"), "{md}");
        assert!(!md.contains("!["), "{md}");
    }

    #[test]
    fn changes_against_the_baseline_pair_cells_by_seed() {
        let text = "### Coverage\n- Ablated Part: τ\n- Replacement: 0.1, 0.2\n\
                    - Metrics: identity similarity improvement over baseline, relative loss reduction (%)\n";
        let resolution = resolve_plan(&parse_plan(text).expect("parses"));
        let results = hand_results(&resolution);
        let table = &study_tables(&resolution, &results)[0];
        let ids: Vec<&str> = table.columns.iter().map(|c| c.id.as_str()).collect();
        assert!(ids.contains(&"change:single.identity_sim"), "{ids:?}");
        assert!(ids.contains(&"relchange:train.loss"), "{ids:?}");
        let column = table
            .columns
            .iter()
            .find(|c| c.id == "change:single.identity_sim")
            .expect("column");
        assert_eq!(column.label, "Δ single: identity sim");
        assert_eq!(column.better, Better::Higher);
        let stat = |row: usize, id: &str| table.rows[row].stats.get(id).cloned();
        // τ = 0.1: seed 0 0.7 − 0.5, seed 1 0.9 − 0.7: both +0.2, so the interval is 0.
        let s = stat(1, "change:single.identity_sim").expect("τ = 0.1");
        assert!(
            (s.mean - 0.2).abs() < 1e-12 && s.ci95.abs() < 1e-12 && s.n == 2,
            "{s:?}"
        );
        // Loss 0.8 vs 1.0 and 0.8 vs 1.2: −20 % and −33.3 %, mean −26.67 %, t(1) interval.
        let s = stat(1, "relchange:train.loss").expect("τ = 0.1");
        let (want, ci) = mean_ci95(&[-20.0, -100.0 * 0.4 / 1.2]);
        assert!((s.mean - want).abs() < 1e-9 && (s.ci95 - ci).abs() < 1e-9, "{s:?}");
        // τ = 0.2 finished seed 0 only: paired with baseline seed 0.
        let s = stat(2, "change:single.identity_sim").expect("τ = 0.2");
        assert!((s.mean - 0.1).abs() < 1e-12 && s.n == 1, "{s:?}");
        // The baseline against itself.
        assert_eq!(stat(0, "change:single.identity_sim").map(|s| s.mean), Some(0.0));
        let md = results_markdown(None, &resolution, &results, std::slice::from_ref(table), &|_| false);
        assert!(md.contains("Δ% train: loss") || md.contains("Δ% loss"), "{md}");
    }

    #[test]
    fn csv_has_a_column_per_value_id_and_quotes_text() {
        let resolution = hand_plan();
        let results = hand_results(&resolution);
        let csv = results_csv(&results);
        let header = csv.lines().next().unwrap_or_default();
        assert!(header.starts_with("cell,study,value,seed,status,steps,single.identity_sim,"));
        assert!(header.ends_with(",train.convergence_steps,overrides"), "{header}");
        let n = header.split(',').count();
        let row = csv_row(&results[2]);
        assert!(row.contains(",Coverage,0.1,0,finished,10,0.700000,"), "{row}");
        assert_eq!(row.split(',').count(), n);
        let mut odd = results[0].clone();
        odd.cell.value = "a, \"b\"".into();
        assert!(csv_row(&odd).contains("\"a, \"\"b\"\"\""));
        assert_eq!(slug("Ablation of τ / γ (A.3)"), "ablation-of-a-3");
        assert_eq!(slug("ψ"), "study");
    }
}
