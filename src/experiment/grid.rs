//! The grid of a resolved plan: a baseline plus one cell per resolved replacement, each repeated per seed. Pure: the
//! run folders live in [`super::store`], the per-cell values and tables in [`super::results`].
//!
//! **Cell ids** are stable: the FNV-1a hash of the cell's overrides (in order, the plan-wide ones first) and its
//! seed, so re-running a plan finds its finished cells, a cell shared by two studies (or equal to the baseline) is
//! run once, and changing `--steps` or a `--set` makes new cells.

use serde::{Deserialize, Serialize};

use super::resolve::{Override, Resolution};

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
}
