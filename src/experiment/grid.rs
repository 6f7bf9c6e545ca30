//! The grid of a resolved plan: a baseline plus one cell per resolved replacement, each repeated per seed, and the
//! per-cell summary of a finished run. Pure: the run folders live in [`super::store`].
//!
//! **Cell ids** are stable: the FNV-1a hash of the cell's overrides (in order, the plan-wide ones first) and its
//! seed, so re-running a plan finds its finished cells, a cell shared by two studies (or equal to the baseline) is
//! run once, and changing `--steps` or a `--set` makes new cells.

use serde::{Deserialize, Serialize};

use super::resolve::{Override, Resolution};
use crate::eval::metrics::{stability, steps_to_fraction};

/// Study name of the baseline cells.
pub const BASELINE: &str = "baseline";

/// One training run of the grid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    /// Stable id (module docs), 16 hex digits.
    pub id: String,
    /// Study title, or [`BASELINE`].
    pub study: String,
    /// The replacement as written (`REMOVE` for removals, [`BASELINE`] for the baseline).
    pub value: String,
    /// Every override of the run, plan-wide ones first (later ones win).
    pub overrides: Vec<String>,
    /// Run seed (`seed=` override).
    pub seed: u64,
}

/// FNV-1a, 64 bit: a hash that does not change between Rust versions (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The id of a cell with these overrides and seed.
pub fn cell_id(overrides: &[String], seed: u64) -> String {
    let mut text = String::new();
    for o in overrides {
        text.push_str(o);
        text.push('\n');
    }
    text.push_str(&format!("seed={seed}\n"));
    format!("{:016x}", fnv1a(text.as_bytes()))
}

fn cell(study: &str, value: &str, base: &[Override], extra: &[Override], seed: u64) -> Cell {
    let mut overrides: Vec<String> = base.iter().chain(extra).map(Override::arg).collect();
    overrides.push(format!("seed={seed}"));
    Cell {
        id: cell_id(&overrides, seed),
        study: study.to_string(),
        value: value.to_string(),
        overrides,
        seed,
    }
}

/// The cells of a plan: the baseline (`base` overrides only) and every resolved value of every study, each for
/// every seed, in plan order. Cells with equal ids appear once per study (the runner runs them once).
pub fn build_grid(resolution: &Resolution, base: &[Override], seeds: &[u64]) -> Vec<Cell> {
    let mut cells: Vec<Cell> = seeds.iter().map(|&s| cell(BASELINE, BASELINE, base, &[], s)).collect();
    for study in &resolution.studies {
        for value in &study.values {
            for &seed in seeds {
                cells.push(cell(&study.title, &value.text, base, &value.overrides, seed));
            }
        }
    }
    cells
}

/// Distinct cell ids, in first-seen order.
pub fn unique_ids(cells: &[Cell]) -> Vec<&str> {
    let mut seen = std::collections::HashSet::new();
    cells
        .iter()
        .map(|c| c.id.as_str())
        .filter(|id| seen.insert(*id))
        .collect()
}

/// Steps averaged for the "final" value of a logged quantity, and the stability window.
pub const SUMMARY_WINDOW_STEPS: usize = 10;
/// A gradient-norm spike is this many times the median of the preceding window.
pub const SPIKE_FACTOR: f64 = 3.0;
/// Convergence speed: steps until the moving average of implicit accuracy reaches this fraction of its final value.
pub const CONVERGENCE_FRACTION: f64 = 0.9;

/// What a finished cell's training log says (the training-side metrics of [`super::resolve::METRICS`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CellSummary {
    /// Steps logged.
    pub steps: usize,
    /// Mean loss over the last [`SUMMARY_WINDOW_STEPS`].
    pub loss: f64,
    /// Mean implicit accuracy over the last window (NaN for SFT).
    pub implicit_accuracy: f64,
    /// Mean reward margin over the last window.
    pub reward_margin: f64,
    /// Loss standard deviation over the last window.
    pub loss_std: f64,
    /// Gradient-norm spikes over the run.
    pub grad_spikes: usize,
    /// Steps until implicit accuracy reaches [`CONVERGENCE_FRACTION`] of its final value (None: never / SFT).
    pub convergence_steps: Option<usize>,
}

/// One logged step, as far as the summary needs it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepValues {
    /// Loss.
    pub loss: f64,
    /// Implicit accuracy.
    pub implicit_accuracy: f64,
    /// Reward margin.
    pub reward_margin: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

fn tail_mean(values: &[f64]) -> f64 {
    let tail = &values[values.len().saturating_sub(SUMMARY_WINDOW_STEPS)..];
    if tail.is_empty() {
        f64::NAN
    } else {
        tail.iter().sum::<f64>() / tail.len() as f64
    }
}

/// Summarises a run's steps (in step order).
pub fn summarize(steps: &[StepValues]) -> CellSummary {
    let col = |f: fn(&StepValues) -> f64| steps.iter().map(f).collect::<Vec<f64>>();
    let losses = col(|s| s.loss);
    let accuracy = col(|s| s.implicit_accuracy);
    let s = stability(&losses, &col(|s| s.grad_norm), SUMMARY_WINDOW_STEPS, SPIKE_FACTOR);
    let convergence_steps = if accuracy.iter().all(|a| a.is_finite()) {
        steps_to_fraction(&accuracy, SUMMARY_WINDOW_STEPS, CONVERGENCE_FRACTION)
    } else {
        None
    };
    CellSummary {
        steps: steps.len(),
        loss: tail_mean(&losses),
        implicit_accuracy: tail_mean(&accuracy),
        reward_margin: tail_mean(&col(|s| s.reward_margin)),
        loss_std: s.loss_std,
        grad_spikes: s.grad_spikes,
        convergence_steps,
    }
}

/// Header of results.csv.
pub const CSV_HEADER: &str = "cell,study,value,seed,status,steps,loss,implicit_accuracy,reward_margin,loss_std,\
                              grad_spikes,convergence_steps,overrides";

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One row of results.csv (`summary` None: not run or not finished).
pub fn csv_row(cell: &Cell, status: &str, summary: Option<&CellSummary>) -> String {
    let num = |v: f64| {
        if v.is_finite() {
            format!("{v:.6}")
        } else {
            String::new()
        }
    };
    let (steps, loss, acc, margin, std, spikes, conv) = match summary {
        Some(s) => (
            s.steps.to_string(),
            num(s.loss),
            num(s.implicit_accuracy),
            num(s.reward_margin),
            num(s.loss_std),
            s.grad_spikes.to_string(),
            s.convergence_steps.map(|c| c.to_string()).unwrap_or_default(),
        ),
        None => Default::default(),
    };
    [
        cell.id.clone(),
        csv_field(&cell.study),
        csv_field(&cell.value),
        cell.seed.to_string(),
        status.to_string(),
        steps,
        loss,
        acc,
        margin,
        std,
        spikes,
        conv,
        csv_field(&cell.overrides.join(" ")),
    ]
    .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::parse_plan;
    use crate::experiment::resolve::resolve_plan;

    fn plan_grid(seeds: &[u64]) -> Vec<Cell> {
        let text = "### tau\n- Ablated Part: τ\n- Replacement: 0.1, 0.2\n- Metrics: loss\n\
                    ### again\n- Ablated Part: (masks.fusion.tau)\n- Replacement: 0.2\n- Metrics: loss\n";
        let r = resolve_plan(&parse_plan(text).expect("parses"));
        build_grid(
            &r,
            &[Override {
                key: "steps".into(),
                value: "5".into(),
            }],
            seeds,
        )
    }

    #[test]
    fn grid_is_baseline_plus_values_times_seeds() {
        let cells = plan_grid(&[0, 1]);
        assert_eq!(cells.len(), 2 + 3 * 2);
        assert_eq!(cells[0].study, BASELINE);
        assert_eq!(cells[0].overrides, ["steps=5", "seed=0"]);
        assert_eq!(cells[2].overrides, ["steps=5", "masks.fusion.tau=0.1", "seed=0"]);
        // "0.2" of both studies is one run per seed.
        assert_eq!(unique_ids(&cells).len(), 6);
    }

    #[test]
    fn ids_are_stable_and_depend_on_overrides_and_seed() {
        let a = plan_grid(&[0]);
        let b = plan_grid(&[0]);
        assert_eq!(a, b);
        assert_eq!(a[0].id, cell_id(&["steps=5".into(), "seed=0".into()], 0));
        assert_ne!(cell_id(&["x=1".into()], 0), cell_id(&["x=1".into()], 1));
        assert_ne!(cell_id(&["x=1".into()], 0), cell_id(&["x=2".into()], 0));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn summary_of_hand_made_steps() {
        let steps: Vec<StepValues> = (0..20)
            .map(|i| StepValues {
                loss: if i < 10 { 1.0 } else { 0.5 },
                implicit_accuracy: if i < 5 { 0.0 } else { 1.0 },
                reward_margin: 0.25,
                grad_norm: 1.0,
            })
            .collect();
        let s = summarize(&steps);
        assert_eq!(s.steps, 20);
        assert_eq!(s.loss, 0.5);
        assert_eq!(s.implicit_accuracy, 1.0);
        assert_eq!(s.reward_margin, 0.25);
        assert_eq!(s.loss_std, 0.0);
        assert_eq!(s.grad_spikes, 0);
        // The 10-step moving average of accuracy first reaches 0.9 at step 14 (9 of 10 ones).
        assert_eq!(s.convergence_steps, Some(14));
        assert_eq!(summarize(&[]).steps, 0);
    }

    #[test]
    fn csv_quotes_text_fields() {
        let c = &plan_grid(&[0])[1];
        let row = csv_row(c, "finished", Some(&CellSummary::default()));
        assert!(row.starts_with(&format!("{},tau,0.1,0,finished,0,", c.id)), "{row}");
        let mut odd = c.clone();
        odd.value = "a, \"b\"".into();
        assert!(csv_row(&odd, "pending", None).contains("\"a, \"\"b\"\"\""));
        assert_eq!(
            CSV_HEADER.split(',').count(),
            csv_row(c, "pending", None).split(',').count()
        );
    }
}
