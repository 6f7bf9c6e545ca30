//! The paper's claim checked on a study's runs (issue 19, item 3): **FocusDPO > DPO ≥ SFT ≥ base**, per metric, and
//! **a larger gain multi-subject than single-subject**, each link marked reproduced or not from the runs' spread.
//!
//! How a link is judged (documented in `docs/results.md`, "How the claim is judged"):
//!
//! * Every difference is oriented so that **positive means the first group is better** (lower-is-better metrics are
//!   negated) and comes with a 95 % Welch interval: `d̄ ± t(0.975, ν)·√(s₁²/n₁ + s₂²/n₂)` with the
//!   Welch–Satterthwaite `ν`. A group of one run (the base: its evaluation is deterministic) contributes no
//!   variance, which makes the test a one-sample t against its value.
//! * A strict link (`>`) holds when the interval lies above 0 ([`Verdict::Better`]).
//! * A weak link (`≥`) holds when it is better, or when its mean is ≥ 0 and the interval reaches 0
//!   ([`Verdict::NotWorse`]: no evidence of the reverse order; equivalence is not tested).
//! * The metric's claim is **reproduced** when all three links hold, **contradicted** when any interval lies below 0
//!   ([`Verdict::Worse`]), and **not shown** otherwise.
//! * The multi-subject gain: per run `δ = multi − single` of the metric (both splits are scored on every run), and
//!   the strict link FocusDPO's `δ` > DPO's `δ`, i.e. FocusDPO's advantage over DPO is larger on the multi-subject
//!   split, in the metric's own units.
//!
//! Pure functions over [`RunMetrics`]; `focusdpo report` prints the tables.

use serde::{Deserialize, Serialize};

use super::metrics::t975;
use super::study::{BENCHMARK_METRICS, Better, RunMetrics, SPLITS};

/// The group labels of the four arms (`scripts/reproduce.sh` names its folders so).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimGroups {
    /// The base without training.
    pub base: String,
    /// Supervised fine-tuning on the winners.
    pub sft: String,
    /// Diffusion-DPO.
    pub dpo: String,
    /// FocusDPO.
    pub focus: String,
}

impl Default for ClaimGroups {
    fn default() -> Self {
        Self {
            base: "base".into(),
            sft: "sft".into(),
            dpo: "dpo".into(),
            focus: "focus-dpo".into(),
        }
    }
}

/// What a difference's interval says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The 95 % interval lies above 0.
    Better,
    /// The mean is ≥ 0 and the interval reaches 0 (or every value is equal).
    NotWorse,
    /// The mean is < 0 and the interval reaches 0.
    NotShown,
    /// The 95 % interval lies below 0.
    Worse,
    /// Too few runs for an interval (both sides a single run), or a side has no value.
    TooFewRuns,
}

impl Verdict {
    /// Whether a strict (`>`) or weak (`≥`) link with this verdict holds.
    pub fn holds(self, strict: bool) -> bool {
        match self {
            Self::Better => true,
            Self::NotWorse => !strict,
            Self::NotShown | Self::Worse | Self::TooFewRuns => false,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Self::Better => "better",
            Self::NotWorse => "not worse",
            Self::NotShown => "not shown",
            Self::Worse => "worse",
            Self::TooFewRuns => "too few runs",
        }
    }
}

/// A difference of group means with its 95 % Welch interval, oriented so that positive is better.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Difference {
    /// Mean of the first group minus mean of the second (negated for lower-is-better metrics).
    pub mean: f64,
    /// Half-width of the 95 % interval (NaN with too few runs).
    pub half_width: f64,
    /// Welch–Satterthwaite degrees of freedom (NaN with too few runs).
    pub df: f64,
    /// Runs on each side.
    pub n: (usize, usize),
    /// What the interval says.
    pub verdict: Verdict,
}

fn mean_var(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var)
}

/// `a − b` (oriented by `better`) with its 95 % Welch interval; `None` when a side is empty. A side of one value
/// contributes no variance (a deterministic evaluation); both sides of one value give [`Verdict::TooFewRuns`].
pub fn welch(a: &[f64], b: &[f64], better: Better) -> Option<Difference> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let sign = match better {
        Better::Higher => 1.0,
        Better::Lower => -1.0,
    };
    let ((ma, va), (mb, vb)) = (mean_var(a), mean_var(b));
    let (na, nb) = (a.len() as f64, b.len() as f64);
    // `+ 0.0` makes a zero difference of a lower-is-better metric +0, not −0.
    let mean = sign * (ma - mb) + 0.0;
    let n = (a.len(), b.len());
    if a.len() < 2 && b.len() < 2 {
        return Some(Difference {
            mean,
            half_width: f64::NAN,
            df: f64::NAN,
            n,
            verdict: Verdict::TooFewRuns,
        });
    }
    let (qa, qb) = (va / na, vb / nb);
    let se2 = qa + qb;
    // Welch–Satterthwaite; a side of one run has no variance term and no degrees of freedom of its own.
    let term = |q: f64, n: usize| if n > 1 { q * q / (n as f64 - 1.0) } else { 0.0 };
    let df = if se2 > 0.0 {
        se2 * se2 / (term(qa, a.len()) + term(qb, b.len()))
    } else {
        (na - 1.0).max(0.0) + (nb - 1.0).max(0.0)
    };
    let half_width = t975(df) * se2.sqrt();
    let verdict = if mean - half_width > 0.0 {
        Verdict::Better
    } else if mean + half_width < 0.0 {
        Verdict::Worse
    } else if mean >= 0.0 {
        Verdict::NotWorse
    } else {
        Verdict::NotShown
    };
    Some(Difference {
        mean,
        half_width,
        df,
        n,
        verdict,
    })
}

/// The claim for one metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Every link holds.
    Reproduced,
    /// No link is contradicted, but not every link holds.
    NotShown,
    /// Some link's interval lies on the wrong side of 0.
    Contradicted,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Self::Reproduced => "**reproduced**",
            Self::NotShown => "not shown",
            Self::Contradicted => "contradicted",
        }
    }
}

/// One metric's links: FocusDPO − DPO (strict), DPO − SFT, SFT − base (weak); a link is `None` when a group lacks
/// the metric.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClaimRow {
    /// Metric id (`multi.identity_sim`).
    pub id: String,
    /// Label with its split.
    pub label: String,
    /// Which way is better.
    pub better: Better,
    /// FocusDPO − DPO (the claim: `>`).
    pub focus_vs_dpo: Option<Difference>,
    /// DPO − SFT (`≥`).
    pub dpo_vs_sft: Option<Difference>,
    /// SFT − base (`≥`).
    pub sft_vs_base: Option<Difference>,
    /// All links together.
    pub outcome: Outcome,
}

/// One metric's multi-subject gain: FocusDPO's `multi − single` against DPO's (strict).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GainRow {
    /// Metric name without split (`identity_sim`).
    pub name: String,
    /// Label.
    pub label: String,
    /// FocusDPO − DPO on the single-subject split.
    pub single: Option<Difference>,
    /// FocusDPO − DPO on the multi-subject split.
    pub multi: Option<Difference>,
    /// (FocusDPO's `multi − single`) − (DPO's): positive when FocusDPO gains more multi-subject.
    pub larger_multi: Option<Difference>,
}

/// The claim checked on `runs`: a row per benchmark metric that FocusDPO and DPO both have, and a gain row per
/// metric scored on both splits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClaimReport {
    /// The groups compared.
    pub groups: ClaimGroups,
    /// Per metric and split.
    pub rows: Vec<ClaimRow>,
    /// Per metric, the multi-subject gain.
    pub gains: Vec<GainRow>,
}

fn values<'a>(runs: &'a [RunMetrics], group: &'a str, id: &'a str) -> impl Iterator<Item = (&'a RunMetrics, f64)> {
    runs.iter()
        .filter(move |r| r.group == group)
        .filter_map(move |r| r.values.get(id).map(|&v| (r, v)))
}

fn column(runs: &[RunMetrics], group: &str, id: &str) -> Vec<f64> {
    values(runs, group, id).map(|(_, v)| v).collect()
}

/// Per run of `group` with both splits of `name`: `multi − single`.
fn split_deltas(runs: &[RunMetrics], group: &str, name: &str) -> Vec<f64> {
    runs.iter()
        .filter(|r| r.group == group)
        .filter_map(|r| Some(r.values.get(&format!("multi.{name}"))? - r.values.get(&format!("single.{name}"))?))
        .collect()
}

/// Checks the claim on `runs`; `None` when FocusDPO's or DPO's group has no run.
pub fn check_claim(runs: &[RunMetrics], groups: &ClaimGroups) -> Option<ClaimReport> {
    let has = |g: &str| runs.iter().any(|r| r.group == g);
    if !has(&groups.focus) || !has(&groups.dpo) {
        return None;
    }
    let mut rows = Vec::new();
    let mut gains = Vec::new();
    for (name, label, better) in BENCHMARK_METRICS {
        for split in SPLITS {
            let id = format!("{split}.{name}");
            let col = |g: &str| column(runs, g, &id);
            let (focus, dpo, sft, base) = (
                col(&groups.focus),
                col(&groups.dpo),
                col(&groups.sft),
                col(&groups.base),
            );
            let Some(focus_vs_dpo) = welch(&focus, &dpo, better) else {
                continue;
            };
            let dpo_vs_sft = welch(&dpo, &sft, better);
            let sft_vs_base = welch(&sft, &base, better);
            let links = [(Some(focus_vs_dpo), true), (dpo_vs_sft, false), (sft_vs_base, false)];
            let outcome = if links
                .iter()
                .any(|(d, _)| d.is_some_and(|d| d.verdict == Verdict::Worse))
            {
                Outcome::Contradicted
            } else if links
                .iter()
                .all(|(d, strict)| d.is_some_and(|d| d.verdict.holds(*strict)))
            {
                Outcome::Reproduced
            } else {
                Outcome::NotShown
            };
            rows.push(ClaimRow {
                id,
                label: format!("{split}: {label}"),
                better,
                focus_vs_dpo: Some(focus_vs_dpo),
                dpo_vs_sft,
                sft_vs_base,
                outcome,
            });
        }
        let split_diff = |split: &str| {
            let id = format!("{split}.{name}");
            welch(
                &column(runs, &groups.focus, &id),
                &column(runs, &groups.dpo, &id),
                better,
            )
        };
        let larger_multi = welch(
            &split_deltas(runs, &groups.focus, name),
            &split_deltas(runs, &groups.dpo, name),
            better,
        );
        if larger_multi.is_some() {
            gains.push(GainRow {
                name: name.to_string(),
                label: label.to_string(),
                single: split_diff("single"),
                multi: split_diff("multi"),
                larger_multi,
            });
        }
    }
    Some(ClaimReport {
        groups: groups.clone(),
        rows,
        gains,
    })
}

/// Digits that show a difference of this size with two significant figures (at most 8).
fn digits_of(d: &Difference) -> usize {
    let m = d
        .mean
        .abs()
        .max(if d.half_width.is_finite() { d.half_width } else { 0.0 });
    if m == 0.0 || !m.is_finite() {
        return 3;
    }
    ((-m.log10()).floor() as i64 + 2).clamp(1, 8) as usize
}

fn cell(d: &Option<Difference>) -> String {
    match d {
        None => "–".into(),
        Some(d) => {
            let k = digits_of(d);
            if d.half_width.is_finite() {
                format!("{:+.k$} ± {:.k$} ({})", d.mean, d.half_width, d.verdict.word())
            } else {
                format!("{:+.k$} ({})", d.mean, d.verdict.word())
            }
        }
    }
}

/// The two markdown tables of `report`, with how to read them.
pub fn claim_markdown(report: &ClaimReport) -> String {
    let g = &report.groups;
    let mut out = format!(
        "### The paper's claim: {f} > {d} ≥ {s} ≥ {b}\n\nEach cell: the difference of means, oriented so that + is \
         better, ± its 95 % Welch interval, and what the interval says. `>` needs *better*; `≥` needs *better* or \
         *not worse*; a metric's claim is reproduced when all three hold and contradicted when any interval lies \
         below 0.\n\n| metric | {f} − {d} (>) | {d} − {s} (≥) | {s} − {b} (≥) | claim |\n|---|---|---|---|---|\n",
        f = g.focus,
        d = g.dpo,
        s = g.sft,
        b = g.base
    );
    for r in &report.rows {
        let arrow = match r.better {
            Better::Higher => "↑",
            Better::Lower => "↓",
        };
        out.push_str(&format!(
            "| {} {arrow} | {} | {} | {} | {} |\n",
            r.label,
            cell(&r.focus_vs_dpo),
            cell(&r.dpo_vs_sft),
            cell(&r.sft_vs_base),
            r.outcome.word()
        ));
    }
    let reproduced = report.rows.iter().filter(|r| r.outcome == Outcome::Reproduced).count();
    let contradicted = report
        .rows
        .iter()
        .filter(|r| r.outcome == Outcome::Contradicted)
        .count();
    out.push_str(&format!(
        "\nReproduced on {reproduced} of {} metric rows, contradicted on {contradicted}.\n",
        report.rows.len()
    ));
    if !report.gains.is_empty() {
        out.push_str(&format!(
            "\n### A larger gain multi-subject: ({f} − {d}) on multi-subject items against single-subject\n\n\
             Per run `δ = multi − single`; the last column is {f}'s δ minus {d}'s (+: {f}'s advantage is larger \
             multi-subject), in the metric's units.\n\n| metric | single: {f} − {d} | multi: {f} − {d} | larger \
             multi-subject (>) |\n|---|---|---|---|\n",
            f = g.focus,
            d = g.dpo
        ));
        for r in &report.gains {
            out.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                r.label,
                cell(&r.single),
                cell(&r.multi),
                cell(&r.larger_multi)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn t_quantiles_match_the_tables() {
        // Two-sided 95 %: t(1) = 12.706, t(2) = 4.303, t(10) = 2.228, t(∞) → 1.960.
        for (df, want) in [(1.0, 12.706), (2.0, 4.303), (10.0, 2.228), (1e6, 1.960)] {
            assert!((t975(df) - want).abs() < 1e-3, "t({df}) = {}", t975(df));
        }
        // Between integers it lies between their quantiles.
        assert!(t975(2.5) < 4.303 && t975(2.5) > 3.182);
    }

    /// Hand case: a = {1, 2, 3} (mean 2, s² 1), b = {0, 0, 3} (mean 1, s² 3).
    /// se² = 1/3 + 1 = 4/3; ν = (4/3)² / ((1/3)²/2 + 1²/2) = (16/9) / (5/9) = 3.2; half = t(3.2)·√(4/3).
    #[test]
    fn welch_hand_case() {
        let d = welch(&[1.0, 2.0, 3.0], &[0.0, 0.0, 3.0], Better::Higher).expect("both sides");
        assert!((d.mean - 1.0).abs() < 1e-12);
        assert!((d.df - 3.2).abs() < 1e-12, "{}", d.df);
        assert!((d.half_width - t975(3.2) * (4.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!(t975(3.2) > 3.0 && t975(3.2) < 3.2);
        assert_eq!(d.verdict, Verdict::NotWorse);
        // Lower-is-better flips the sign: the same numbers are a non-significant loss.
        let d = welch(&[1.0, 2.0, 3.0], &[0.0, 0.0, 3.0], Better::Lower).expect("both sides");
        assert!((d.mean + 1.0).abs() < 1e-12);
        assert_eq!(d.verdict, Verdict::NotShown);
        // Against a single deterministic value: a one-sample t with ν = n − 1 = 2 and half-width 4.303·1/√3 = 2.48:
        // 2 − 0.5 = 1.5 is inside it, 2 − (−1) = 3 above it, 2 − 5 = −3 below it.
        let one = |b: f64| welch(&[1.0, 2.0, 3.0], &[b], Better::Higher).expect("both sides");
        assert_eq!(one(0.5).df, 2.0);
        assert_eq!(one(0.5).verdict, Verdict::NotWorse);
        assert_eq!(one(-1.0).verdict, Verdict::Better);
        assert_eq!(one(5.0).verdict, Verdict::Worse);
        assert_eq!(
            welch(&[1.0], &[2.0], Better::Higher).map(|d| d.verdict),
            Some(Verdict::TooFewRuns)
        );
        assert!(welch(&[], &[2.0], Better::Higher).is_none());
        // Constant sides: the sign decides.
        assert_eq!(
            welch(&[1.0, 1.0], &[1.0, 1.0], Better::Higher).map(|d| d.verdict),
            Some(Verdict::NotWorse)
        );
        assert_eq!(
            welch(&[2.0, 2.0], &[1.0, 1.0], Better::Higher).map(|d| d.verdict),
            Some(Verdict::Better)
        );
    }

    fn run(group: &str, pairs: &[(&str, f64)]) -> RunMetrics {
        RunMetrics {
            group: group.into(),
            source: group.into(),
            values: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    /// FocusDPO clearly above DPO, DPO level with SFT, SFT above the base on identity similarity: reproduced; EER
    /// (lower is better) where FocusDPO is clearly worse: contradicted; and FocusDPO's gain over DPO is larger
    /// multi-subject.
    #[test]
    fn the_claim_is_judged_per_metric_and_split() {
        let mut runs = vec![run(
            "base",
            &[("single.identity_sim", 0.30), ("multi.identity_sim", 0.20)],
        )];
        for (k, noise) in [-0.01, 0.0, 0.01].into_iter().enumerate() {
            let k = k as f64;
            runs.push(run(
                "sft",
                &[
                    ("single.identity_sim", 0.40 + noise),
                    ("multi.identity_sim", 0.30 + noise),
                ],
            ));
            runs.push(run(
                "dpo",
                &[
                    ("single.identity_sim", 0.40 + noise),
                    ("multi.identity_sim", 0.30 + noise),
                    ("single.eer", 0.30 + noise),
                ],
            ));
            runs.push(run(
                "focus-dpo",
                &[
                    ("single.identity_sim", 0.50 + noise),
                    ("multi.identity_sim", 0.50 + 0.001 * k),
                    ("single.eer", 0.40 + noise),
                ],
            ));
        }
        let report = check_claim(&runs, &ClaimGroups::default()).expect("focus and dpo present");
        let row = |id: &str| report.rows.iter().find(|r| r.id == id).expect(id);
        let sim = row("single.identity_sim");
        assert_eq!(sim.focus_vs_dpo.map(|d| d.verdict), Some(Verdict::Better));
        assert_eq!(sim.dpo_vs_sft.map(|d| d.verdict), Some(Verdict::NotWorse));
        assert_eq!(sim.sft_vs_base.map(|d| d.verdict), Some(Verdict::Better));
        assert_eq!(sim.outcome, Outcome::Reproduced);
        assert_eq!(row("multi.identity_sim").outcome, Outcome::Reproduced);
        let eer = row("single.eer");
        assert_eq!(eer.focus_vs_dpo.map(|d| d.verdict), Some(Verdict::Worse));
        assert!(eer.sft_vs_base.is_none() && eer.dpo_vs_sft.is_none());
        assert_eq!(eer.outcome, Outcome::Contradicted);
        // FocusDPO's δ per run is 0.001·k − noise (mean 0.001), DPO's −0.10: larger by 0.101.
        let gain = report
            .gains
            .iter()
            .find(|g| g.name == "identity_sim")
            .expect("both splits");
        let larger = gain.larger_multi.expect("deltas");
        assert!((larger.mean - 0.101).abs() < 1e-9, "{}", larger.mean);
        assert_eq!(larger.verdict, Verdict::Better);
        assert!(report.gains.iter().all(|g| g.name != "eer"), "EER has one split only");
        let md = claim_markdown(&report);
        assert!(md.contains("| single: identity sim ↑ | +0.1"), "{md}");
        assert!(md.contains("(better) | +0.000 ± 0.0"), "{md}");
        assert!(md.contains("(not worse) | +0.1"), "{md}");
        assert!(
            md.contains("Reproduced on 2 of 3 metric rows, contradicted on 1."),
            "{md}"
        );
        assert!(check_claim(&runs[..1], &ClaimGroups::default()).is_none());
    }
}
