//! Comparing groups of runs: per-run metrics (from the benchmark report and the training log) aggregated over seeds
//! into mean ± 95 % confidence interval per group, as a markdown table with the best group marked.
//!
//! Pure functions over already-parsed inputs (`metrics.jsonl` step records as JSON values, a
//! [`BenchmarkReport`]); reading files is the caller's business. Used by `focusdpo report` (the base vs SFT vs DPO
//! vs FocusDPO reproduction) and by ablation plans.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::benchmark::BenchmarkReport;
use super::metrics::{mean_ci95, stability, steps_to_fraction};

/// Fraction of the final implicit accuracy that defines convergence speed.
pub const CONVERGENCE_FRACTION: f64 = 0.9;
/// A gradient-norm spike: above this many times the median of the preceding window.
pub const SPIKE_FACTOR: f64 = 3.0;

/// Direction of a metric: which way is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// Larger is better.
    Higher,
    /// Smaller is better.
    Lower,
}

/// A metric column: id (key in [`RunMetrics::values`]), label and direction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MetricSpec {
    /// Key, e.g. `single.identity_sim`.
    pub id: &'static str,
    /// Table label.
    pub label: &'static str,
    /// Which way is better.
    pub better: Better,
}

/// The benchmark metrics per split, in table order: name (the part after `single.` / `multi.`), label, direction.
pub const BENCHMARK_METRICS: [(&str, &str, Better); 23] = [
    ("identity_sim", "identity sim", Better::Higher),
    ("top1_identification", "top-1 id", Better::Higher),
    ("identity_is", "identity IS", Better::Higher),
    ("auc", "verif. AUC", Better::Higher),
    ("silhouette_sim", "silhouette sim", Better::Higher),
    ("shape_top1", "shape top-1", Better::Higher),
    ("eer", "EER", Better::Lower),
    ("fmr100", "FMR100", Better::Lower),
    ("fmr1000", "FMR1000", Better::Lower),
    ("fdr", "FDR", Better::Higher),
    ("psnr", "PSNR", Better::Higher),
    ("subject_psnr", "subject PSNR", Better::Higher),
    ("fd_identity", "FD (identity)", Better::Lower),
    ("cmmd_identity", "CMMD (identity)", Better::Lower),
    ("dino", "DINO", Better::Higher),
    ("clip_i", "CLIP-I", Better::Higher),
    ("clip_t", "CLIP-T", Better::Higher),
    ("denoise_psnr", "x̂₀ PSNR", Better::Higher),
    ("denoise_subject_psnr", "x̂₀ subject PSNR", Better::Higher),
    ("heldout_accuracy", "held-out pref. acc.", Better::Higher),
    ("heldout_reward", "held-out reward", Better::Higher),
    (
        "heldout_subject_accuracy",
        "held-out subject pref. acc.",
        Better::Higher,
    ),
    ("heldout_subject_reward", "held-out subject reward", Better::Higher),
];

/// The benchmark splits, in table order.
pub const SPLITS: [&str; 2] = ["single", "multi"];

/// The training metrics, in table order.
pub const TRAINING_METRICS: [MetricSpec; 6] = [
    MetricSpec {
        id: "train.implicit_accuracy",
        label: "implicit acc. (last 20 %)",
        better: Better::Higher,
    },
    MetricSpec {
        id: "train.reward_margin",
        label: "reward margin (last 20 %)",
        better: Better::Higher,
    },
    MetricSpec {
        id: "train.loss",
        label: "loss (last 20 %)",
        better: Better::Lower,
    },
    MetricSpec {
        id: "train.loss_std",
        label: "loss std (last 20 %)",
        better: Better::Lower,
    },
    MetricSpec {
        id: "train.grad_spikes",
        label: "grad-norm spikes",
        better: Better::Lower,
    },
    MetricSpec {
        id: "train.convergence_steps",
        label: "steps to 90 % of final acc.",
        better: Better::Lower,
    },
];

/// Metrics of one run (or one base evaluation): flat `id → value`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunMetrics {
    /// Group label (e.g. `focus-dpo`, `base`).
    pub group: String,
    /// Where it came from.
    pub source: String,
    /// Values by metric id (`single.identity_sim`, `train.implicit_accuracy`, …).
    pub values: BTreeMap<String, f64>,
}

/// Benchmark values as `split.metric` ids (missing or non-finite values are left out).
pub fn benchmark_values(report: &BenchmarkReport) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (split, s) in &report.splits {
        let v = s.verification;
        let d = s.denoise;
        let pairs: [(&str, Option<f64>); 23] = [
            ("identity_sim", Some(s.identity_sim)),
            ("top1_identification", s.top1_identification),
            ("identity_is", s.identity_is),
            ("auc", v.map(|v| v.auc)),
            ("silhouette_sim", s.silhouette_sim),
            ("shape_top1", s.shape_top1),
            ("eer", v.map(|v| v.eer)),
            ("fmr100", v.map(|v| v.fmr100)),
            ("fmr1000", v.map(|v| v.fmr1000)),
            ("fdr", v.map(|v| v.fdr)),
            ("psnr", Some(s.psnr)),
            ("subject_psnr", Some(s.subject_psnr)),
            ("fd_identity", s.fd_identity),
            ("cmmd_identity", s.cmmd_identity),
            ("dino", s.dino),
            ("clip_i", s.clip_i),
            ("clip_t", s.clip_t),
            ("denoise_psnr", d.map(|d| d.psnr)),
            ("denoise_subject_psnr", d.map(|d| d.subject_psnr)),
            ("heldout_accuracy", d.map(|d| d.preference_accuracy)),
            ("heldout_reward", d.map(|d| d.preference_margin)),
            ("heldout_subject_accuracy", d.map(|d| d.subject_preference_accuracy)),
            ("heldout_subject_reward", d.map(|d| d.subject_preference_margin)),
        ];
        for (name, value) in pairs {
            if let Some(x) = value.filter(|x| x.is_finite()) {
                out.insert(format!("{split}.{name}"), x);
            }
        }
    }
    out
}

fn field(records: &[Value], name: &str) -> Vec<f64> {
    records
        .iter()
        .filter_map(|r| r.get(name).and_then(Value::as_f64))
        .filter(|x| x.is_finite())
        .collect()
}

fn tail_mean(v: &[f64], window: usize) -> Option<f64> {
    let tail = &v[v.len().saturating_sub(window)..];
    (!tail.is_empty()).then(|| tail.iter().sum::<f64>() / tail.len() as f64)
}

/// Training values from a run's step records (`metrics.jsonl`): means over the last 20 % of the steps (at least
/// one) of implicit accuracy, reward margin and loss; loss std over that window and gradient-norm spikes
/// ([`stability`], factor [`SPIKE_FACTOR`]); convergence speed = steps until the moving average of implicit
/// accuracy reaches [`CONVERGENCE_FRACTION`] of its final value ([`steps_to_fraction`]). SFT records have no
/// implicit accuracy (NaN, written as `null`): those values are left out.
pub fn training_values(records: &[Value]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let n = records.len();
    if n == 0 {
        return out;
    }
    let window = (n / 5).max(1);
    let acc = field(records, "implicit_accuracy");
    let margin = field(records, "reward_margin");
    let loss = field(records, "loss");
    let grads = field(records, "grad_norm");
    for (id, v) in [
        ("train.implicit_accuracy", &acc),
        ("train.reward_margin", &margin),
        ("train.loss", &loss),
    ] {
        if let Some(m) = tail_mean(v, window) {
            out.insert(id.to_string(), m);
        }
    }
    if !loss.is_empty() {
        let s = stability(&loss, &grads, window, SPIKE_FACTOR);
        out.insert("train.loss_std".into(), s.loss_std);
        out.insert("train.grad_spikes".into(), s.grad_spikes as f64);
    }
    if acc.len() == n
        && let Some(k) = steps_to_fraction(&acc, window, CONVERGENCE_FRACTION)
    {
        out.insert("train.convergence_steps".into(), k as f64);
    }
    out
}

/// One group's aggregate: per metric, mean and CI half-width over its runs, and the number of runs with a value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupSummary {
    /// Group label.
    pub group: String,
    /// Runs in the group.
    pub runs: usize,
    /// `id → (mean, ci95 half-width, n)`.
    pub metrics: BTreeMap<String, (f64, f64, usize)>,
}

/// Groups runs by label (first-appearance order) and aggregates each metric with [`mean_ci95`].
pub fn aggregate(runs: &[RunMetrics]) -> Vec<GroupSummary> {
    let mut order: Vec<&str> = Vec::new();
    for r in runs {
        if !order.contains(&r.group.as_str()) {
            order.push(&r.group);
        }
    }
    order
        .into_iter()
        .map(|g| {
            let members: Vec<&RunMetrics> = runs.iter().filter(|r| r.group == g).collect();
            let mut ids: Vec<&String> = members.iter().flat_map(|r| r.values.keys()).collect();
            ids.sort();
            ids.dedup();
            let metrics = ids
                .into_iter()
                .map(|id| {
                    let v: Vec<f64> = members.iter().filter_map(|r| r.values.get(id).copied()).collect();
                    let (m, ci) = mean_ci95(&v);
                    (id.clone(), (m, ci, v.len()))
                })
                .collect();
            GroupSummary {
                group: g.to_string(),
                runs: members.len(),
                metrics,
            }
        })
        .collect()
}

/// Every value id [`benchmark_values`] and [`training_values`] can produce, in table order: the benchmark
/// metrics of each split (single first), then the training metrics, each with its label and direction.
pub fn all_metrics() -> Vec<(String, String, Better)> {
    let mut out = Vec::new();
    for split in SPLITS {
        for (name, label, better) in BENCHMARK_METRICS {
            out.push((format!("{split}.{name}"), format!("{split}: {label}"), better));
        }
    }
    for m in TRAINING_METRICS {
        out.push((m.id.to_string(), m.label.to_string(), m.better));
    }
    out
}

/// Label and direction of a value id (`single.eer`, `train.loss`); `None` for an unknown id.
pub fn metric_spec(id: &str) -> Option<(String, Better)> {
    all_metrics()
        .into_iter()
        .find(|(m, _, _)| m == id)
        .map(|(_, label, better)| (label, better))
}

/// The metric columns present in `groups`, in [`all_metrics`] order.
pub fn present_metrics(groups: &[GroupSummary]) -> Vec<(String, String, Better)> {
    let has = |id: &str| groups.iter().any(|g| g.metrics.contains_key(id));
    all_metrics().into_iter().filter(|(id, _, _)| has(id)).collect()
}

/// `mean ± ci` with `digits` decimals; the mean alone when the interval is not finite (one run); `–` for no mean.
pub fn format_mean_ci(mean: f64, ci: f64, digits: usize) -> String {
    if !mean.is_finite() {
        return "–".into();
    }
    if ci.is_finite() {
        format!("{mean:.digits$} ± {ci:.digits$}")
    } else {
        format!("{mean:.digits$}")
    }
}

/// The best of `values` in direction `better` (−∞ / +∞ for none).
pub fn best_value(values: &[f64], better: Better) -> f64 {
    match better {
        Better::Higher => values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        Better::Lower => values.iter().copied().fold(f64::INFINITY, f64::min),
    }
}

/// Decimals for a column holding `values`: fewer for larger magnitudes.
pub fn digits_for(values: &[f64]) -> usize {
    let m = values.iter().map(|v| v.abs()).fold(0.0f64, f64::max);
    if m >= 100.0 {
        1
    } else if m >= 10.0 {
        2
    } else if m >= 0.01 || m == 0.0 {
        4
    } else {
        // Small magnitudes (held-out implicit rewards are ~1e-5) keep two significant digits, up to 10 decimals.
        ((-m.log10()).ceil() as usize + 2).min(10)
    }
}

/// Markdown cells of one column of `(mean, CI half-width)` values: `mean ± CI` with decimals shared by the column
/// ([`digits_for`]), `–` without a finite mean, the best ([`best_value`]) in bold unless fewer than two values are
/// finite or all are equal (ties for best all bold).
pub fn column_markdown(values: &[Option<(f64, f64)>], better: Better) -> Vec<String> {
    let finite: Vec<f64> = values
        .iter()
        .flatten()
        .map(|(m, _)| *m)
        .filter(|m| m.is_finite())
        .collect();
    let best = best_value(&finite, better);
    let mark = finite.len() > 1 && finite.iter().any(|m| *m != best);
    let digits = digits_for(&finite);
    values
        .iter()
        .map(|v| match v {
            Some((mean, ci)) if mean.is_finite() => {
                let text = format_mean_ci(*mean, *ci, digits);
                if mark && *mean == best {
                    format!("**{text}**")
                } else {
                    text
                }
            }
            _ => "–".into(),
        })
        .collect()
}

/// A markdown table, one row per metric and one column per group: `mean ± CI` (CI omitted for a single run), the
/// best group's mean in bold (ties all bold; nothing bold when every group has the same mean). Only groups with a
/// value take part in "best".
pub fn comparison_markdown(groups: &[GroupSummary]) -> String {
    let mut out = String::from("| metric |");
    for g in groups {
        out.push_str(&format!(" {} (n={}) |", g.group, g.runs));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(groups.len()));
    out.push('\n');
    for (id, label, better) in present_metrics(groups) {
        let means: Vec<Option<(f64, f64)>> = groups
            .iter()
            .map(|g| g.metrics.get(&id).map(|&(m, ci, _)| (m, ci)))
            .collect();
        let arrow = match better {
            Better::Higher => "↑",
            Better::Lower => "↓",
        };
        out.push_str(&format!("| {label} {arrow} |"));
        for text in column_markdown(&means, better) {
            out.push_str(&format!(" {text} |"));
        }
        out.push('\n');
    }
    out
}

/// The group label of a run directory name: the name without a trailing seed suffix (`-s3`, `_seed12`, `-seed-4`).
pub fn group_of(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    for marker in ["-seed-", "_seed_", "-seed", "_seed", "-s", "_s"] {
        if let Some(pos) = lower.rfind(marker) {
            let digits = &name[pos + marker.len()..];
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && pos > 0 {
                return name[..pos].to_string();
            }
        }
    }
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn seed_suffixes_are_stripped_from_group_labels() {
        assert_eq!(group_of("focus-dpo-s3"), "focus-dpo");
        assert_eq!(group_of("dpo_seed12"), "dpo");
        assert_eq!(group_of("sft-seed-4"), "sft");
        assert_eq!(group_of("base"), "base");
        assert_eq!(group_of("runs-sx"), "runs-sx");
        assert_eq!(group_of("-s1"), "-s1");
    }

    /// Ten steps: the last-20 % window is steps 9–10; the accuracy ramps 0.1 … 1.0.
    #[test]
    fn training_values_hand_case() {
        let records: Vec<Value> = (1..=10)
            .map(|k| {
                json!({
                    "step": k,
                    "loss": if k % 2 == 0 { 0.4 } else { 0.6 },
                    "implicit_accuracy": k as f64 / 10.0,
                    "reward_margin": k as f64,
                    "grad_norm": if k == 8 { 10.0 } else { 1.0 },
                })
            })
            .collect();
        let v = training_values(&records);
        assert!((v["train.implicit_accuracy"] - 0.95).abs() < 1e-12);
        assert!((v["train.reward_margin"] - 9.5).abs() < 1e-12);
        assert!((v["train.loss"] - 0.5).abs() < 1e-12);
        // std of {0.6, 0.4} (n − 1) = √0.02.
        assert!((v["train.loss_std"] - 0.02f64.sqrt()).abs() < 1e-12);
        // Step 8's norm 10 > 3 × median(1, 1) of the two steps before it; nothing else spikes.
        assert_eq!(v["train.grad_spikes"], 1.0);
        // Final = 0.95, target 0.855; the 2-step moving average is (0.8 + 0.9)/2 = 0.85 at step 9, just below,
        // and 0.95 at step 10.
        assert_eq!(v["train.convergence_steps"], 10.0);
    }

    #[test]
    fn sft_records_without_accuracy_give_no_accuracy_metrics() {
        let records = vec![
            json!({"step": 1, "loss": 1.0, "implicit_accuracy": null, "reward_margin": null, "grad_norm": 1.0}),
            json!({"step": 2, "loss": 0.5, "implicit_accuracy": null, "reward_margin": null, "grad_norm": 1.0}),
        ];
        let v = training_values(&records);
        assert!(!v.contains_key("train.implicit_accuracy"));
        assert!(!v.contains_key("train.convergence_steps"));
        assert_eq!(v["train.loss"], 0.5);
        assert!(training_values(&[]).is_empty());
    }

    #[test]
    fn aggregate_and_table_mark_the_best_group() {
        let run = |g: &str, sim: f64| RunMetrics {
            group: g.into(),
            source: String::new(),
            values: BTreeMap::from([
                ("single.identity_sim".to_string(), sim),
                ("single.eer".to_string(), 1.0 - sim),
            ]),
        };
        let runs = vec![
            run("dpo", 0.5),
            run("focus-dpo", 0.7),
            run("dpo", 0.7),
            run("focus-dpo", 0.9),
        ];
        let groups = aggregate(&runs);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].group, "dpo");
        let (m, ci, n) = groups[1].metrics["single.identity_sim"];
        assert!((m - 0.8).abs() < 1e-12);
        // sd = √0.02, t(1) = 12.7062: half-width 12.7062 · √0.02 / √2 = 1.27062.
        assert!((ci - 1.27062).abs() < 1e-5, "{ci}");
        assert_eq!(n, 2);
        let md = comparison_markdown(&groups);
        assert!(
            md.contains("| single: identity sim ↑ | 0.6000 ± 1.2706 | **0.8000 ± 1.2706** |"),
            "{md}"
        );
        assert!(
            md.contains("| single: EER ↓ | 0.4000 ± 1.2706 | **0.2000 ± 1.2706** |"),
            "{md}"
        );
    }

    #[test]
    fn decimals_follow_the_column_magnitude() {
        assert_eq!(digits_for(&[123.0, 5.0]), 1);
        assert_eq!(digits_for(&[12.5]), 2);
        assert_eq!(digits_for(&[0.5, 0.0]), 4);
        assert_eq!(digits_for(&[0.0]), 4);
        // 1.2e-5: five leading decimals, two significant digits.
        assert_eq!(digits_for(&[1.2e-5, -3e-6]), 7);
        assert_eq!(format_mean_ci(1.2e-5, 4.5e-6, 7), "0.0000120 ± 0.0000045");
        assert_eq!(digits_for(&[1e-30]), 10);
    }
}
