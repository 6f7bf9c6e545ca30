//! The Studio's Experiments tab under egui_kittest (random tiny base, bundled data, wgpu on lavapipe like
//! tests/gui.rs): loading plans, a malformed plan, running a tiny grid to the end (and resuming it), stopping.

mod studio;

use std::path::Path;
use std::time::Duration;

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use focusdpo::app::experiments::{CellState, PlanSource};
use focusdpo::app::{Level, StudioApp};
use focusdpo::train::run_store::read_metrics;

/// Long enough for a loaded 2-core machine training in a debug-profile test build.
const TIMEOUT: Duration = Duration::from_secs(240);

/// A one-study plan: baseline + one τ value = two cells per seed.
const TINY_PLAN: &str = "# Tiny\n\n### Focus threshold\n- **Ablated Part**: focus coverage threshold τ\n\
                         - **Action**: REPLACE\n- **Replacement**: 0.3\n- **Metrics**: implicit accuracy, loss\n";

fn studio(runs_dir: &Path) -> Harness<'static, StudioApp> {
    studio::studio(runs_dir, false)
}

fn step_until(h: &mut Harness<'_, StudioApp>, what: &str, done: impl Fn(&StudioApp) -> bool) {
    studio::step_until(h, what, TIMEOUT, |h| done(h.state()));
}

fn grid_ready(app: &StudioApp) -> bool {
    app.experiments().can_run(&app.settings().experiments)
}

fn open_tab(h: &mut Harness<'_, StudioApp>) {
    h.get_by_label("Experiments").click();
    h.step();
}

/// Writes the tiny plan, loads it through the panel (what the file dialog does) and waits for its grid.
fn load_tiny_plan(h: &mut Harness<'_, StudioApp>, dir: &Path, steps: u64) {
    let path = dir.join("tiny.md");
    std::fs::write(&path, TINY_PLAN).unwrap();
    h.state_mut().settings_mut().experiments.steps = steps;
    h.state_mut().settings_mut().experiments.seeds = 1;
    // Training only: the per-cell benchmark is the CLI tests' business (tests/ablation_plans.rs).
    h.state_mut().settings_mut().experiments.evaluate = false;
    h.state_mut().experiments_mut().load(PlanSource::File(path));
    step_until(h, "the tiny plan's grid", |a| {
        a.experiments().plan().is_some() && grid_ready(a)
    });
}

#[test]
fn loading_a_plan_shows_its_studies_and_resolved_keys() {
    let runs = tempfile::tempdir().unwrap();
    let mut h = studio(runs.path());
    open_tab(&mut h);
    h.get_by_label("focusdpo_a3_tau_gamma.md").click();
    step_until(&mut h, "the bundled plan and its grid", |a| {
        a.experiments().plan().is_some() && grid_ready(a)
    });
    for text in [
        "Focus coverage threshold",
        "Fusion coefficient",
        "masks.fusion.tau",
        "masks.fusion.gamma",
    ] {
        assert!(
            h.query_all_by_label_contains(text).next().is_some(),
            "`{text}` is shown"
        );
    }
    assert!(h.query_by_label_contains("masks.fusion.tau=0.05").is_some());
    let grid = h.state().experiments().grid().unwrap();
    // Baseline + 4 τ + 4 γ values, one seed; results under runs/<plan stem>.
    assert_eq!(grid.cells.len(), 9);
    assert_eq!(grid.request.out, runs.path().join("focusdpo_a3_tau_gamma"));
    assert!(
        h.query_by_label_contains("9 cells (1 baseline + 8 values × 1 seed(s))")
            .is_some()
    );
    assert_eq!(
        h.state().settings().experiments.plan,
        Some(PlanSource::Bundled("focusdpo_a3_tau_gamma.md".into()))
    );

    // Two seeds double the grid.
    h.state_mut().settings_mut().experiments.seeds = 2;
    step_until(&mut h, "the two-seed grid", |a| {
        grid_ready(a) && a.experiments().grid().is_some_and(|g| g.cells.len() == 18)
    });
}

#[test]
fn a_malformed_plan_shows_an_error_and_the_app_keeps_working() {
    let runs = tempfile::tempdir().unwrap();
    let mut h = studio(runs.path());
    let bad = runs.path().join("bad.md");
    std::fs::write(&bad, "just prose,\nno study at all\n").unwrap();
    // Dropped on the window: a plan file switches to the Experiments tab.
    h.input_mut()
        .dropped_files
        .push(std::sync::Arc::new(studio::DroppedPath(bad.clone())));
    step_until(&mut h, "the plan error", |a| a.experiments().plan_error().is_some());
    let error = h.state().experiments().plan_error().unwrap().to_string();
    assert!(
        error.contains("bad.md") && error.contains("no ablation study"),
        "{error}"
    );
    assert!(h.query_by_label_contains("cannot load the plan").is_some());
    assert!(
        h.state()
            .notices()
            .iter()
            .any(|n| n.level == Level::Error && n.text.contains("no ablation study"))
    );
    // A missing file is an error too.
    h.state_mut()
        .experiments_mut()
        .load(PlanSource::File(runs.path().join("missing.md")));
    step_until(&mut h, "the missing-file error", |a| {
        a.experiments().plan_error().is_some_and(|e| e.contains("missing.md"))
    });
    // The app keeps working: a good plan loads next, with its warning line shown.
    let warned = runs.path().join("warned.md");
    std::fs::write(
        &warned,
        "### Beta\n- **Ablated Part**: β\n- **Replacement**: 100, 1000\n",
    )
    .unwrap();
    h.state_mut().experiments_mut().load(PlanSource::File(warned));
    step_until(&mut h, "the good plan", |a| a.experiments().plan().is_some());
    assert!(h.state().experiments().plan_error().is_none());
    let warnings = &h.state().experiments().plan().unwrap().warnings;
    assert!(!warnings.is_empty(), "no Metrics field is a warning");
    let shown = format!("line {}: {}", warnings[0].line, warnings[0].message);
    assert!(h.query_by_label(&shown).is_some(), "{shown}");
}

#[test]
fn a_tiny_grid_runs_to_finished_and_a_rerun_skips_it() {
    let runs = tempfile::tempdir().unwrap();
    let mut h = studio(runs.path());
    open_tab(&mut h);
    load_tiny_plan(&mut h, runs.path(), 1);
    assert_eq!(h.state().experiments().grid().unwrap().cells.len(), 2);
    h.get_by_label("Run grid").click();
    step_until(&mut h, "the grid to finish", |a| {
        !a.experiments().is_running() && !a.experiments().results().is_empty()
    });
    let grid = h.state().experiments().grid().unwrap().clone();
    for c in grid.cells.iter() {
        assert_eq!(
            h.state().experiments().cell_state(&c.id),
            Some(&CellState::Finished),
            "{c:?}; notices {:?}",
            h.state().notices()
        );
        let metrics = &h.state().experiments().results()[&c.id];
        assert!(metrics.contains_key("train.loss"), "{metrics:?}");
    }
    assert!(runs.path().join("tiny").join("results.csv").is_file());
    assert!(runs.path().join("tiny").join("results.md").is_file());
    // The table and the plot of the study.
    let tables = h.state().experiments().tables();
    assert_eq!(tables.len(), 1);
    assert!(tables[0].rows.iter().all(|r| r.n == 1));
    assert!(h.query_by_label_contains("plotted metric").is_some());

    // Rerun: every cell was finished earlier.
    h.get_by_label("Run grid").click();
    step_until(&mut h, "the rerun", |a| {
        !a.experiments().is_running() && a.notices().iter().any(|n| n.text.contains("2 finished earlier"))
    });
}

#[test]
fn stop_ends_the_grid_within_one_step() {
    let runs = tempfile::tempdir().unwrap();
    let mut h = studio(runs.path());
    open_tab(&mut h);
    load_tiny_plan(&mut h, runs.path(), 1000);
    h.get_by_label("Run grid").click();
    let running_step = |a: &StudioApp| -> Option<(String, u64)> {
        let grid = a.experiments().grid()?;
        grid.cells.iter().find_map(|c| match a.experiments().cell_state(&c.id) {
            Some(CellState::Running { step, .. }) if *step >= 1 => Some((c.id.clone(), *step)),
            _ => None,
        })
    };
    step_until(&mut h, "a logged step", |a| running_step(a).is_some());
    let (id, step_at_click) = running_step(h.state()).unwrap();
    h.get_by_label("Stop grid").click();
    step_until(&mut h, "the grid to stop", |a| !a.experiments().is_running());
    assert_eq!(h.state().experiments().cell_state(&id), Some(&CellState::Pending));
    assert!(
        h.state().notices().iter().any(|n| n.text.starts_with("grid stopped")),
        "{:?}",
        h.state().notices()
    );
    let cell_dir = runs.path().join("tiny").join("cells").join(&id);
    let logged = read_metrics(&cell_dir).map_or(0, |(steps, _)| steps.len() as u64);
    // The step in flight when Stop was clicked may complete; no other.
    assert!(
        logged <= step_at_click + 1,
        "logged {logged} steps, clicked at {step_at_click}"
    );
}

#[test]
fn the_slurm_script_runs_the_studios_cells_and_other_workers_cells_show_up_as_they_finish() {
    use focusdpo::experiment::claim::{ClaimOutcome, try_claim};
    use focusdpo::experiment::grid::unique_ids;

    let runs = tempfile::tempdir().unwrap();
    let mut h = studio(runs.path());
    open_tab(&mut h);
    load_tiny_plan(&mut h, runs.path(), 1);
    h.get_by_label("Slurm job array").click();
    h.step();
    h.state_mut().settings_mut().experiments.slurm.partition = Some("gpu".into());
    h.get_by_label("Write Slurm script").click();
    step_until(&mut h, "the script", |a| a.experiments().slurm_written().is_some());
    let out = runs.path().join("tiny");
    let written = h.state().experiments().slurm_written().unwrap().clone();
    let (path, tasks) = written.unwrap_or_else(|e| panic!("not written: {e}"));
    assert_eq!((path.clone(), tasks), (out.join("ablate.sbatch"), 2));
    let submit = format!(
        "sbatch {}",
        focusdpo::experiment::slurm::shell_quote(&path.to_string_lossy())
    );
    assert!(h.query_by_label(&submit).is_some(), "`{submit}` is shown");
    for f in ["grid.json", "plan.md", "resolution.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let script = std::fs::read_to_string(&path).unwrap();
    assert!(script.contains("#SBATCH --partition=gpu\n"), "{script}");
    let grid = h.state().experiments().grid().unwrap().clone();
    let ids: Vec<String> = unique_ids(&grid.cells).into_iter().map(String::from).collect();
    assert!(script.contains(&format!("CELLS=({})\n", ids.join(" "))), "{script}");

    // An array task's command, run here with this build's binary on the first cell: another worker.
    let task = script.lines().find(|l| l.contains("--cell")).unwrap();
    let mut words = shlex::split(task).unwrap();
    assert_eq!(words.split_off(words.len() - 2)[0], "--cell");
    words[0] = env!("CARGO_BIN_EXE_focusdpo").into();
    assert!(words.contains(&"--no-eval".to_string()), "{words:?}");
    // The other cell is held by a worker on another node.
    let lease = Duration::from_secs(600);
    assert!(matches!(
        try_claim(&out, &ids[1], "node7:42", lease).unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    let status = std::process::Command::new(&words[0])
        .args(&words[1..])
        .args(["--cell", &ids[0]])
        .current_dir(runs.path())
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    // The Studio, running nothing itself, shows both as its watch reads the store.
    step_until(&mut h, "the other workers' cells", |a| {
        a.experiments().cell_state(&ids[0]) == Some(&CellState::Finished)
            && matches!(a.experiments().cell_state(&ids[1]), Some(CellState::Elsewhere { .. }))
    });
    assert!(!h.state().experiments().is_running());
    assert!(h.state().experiments().results()[&ids[0]].contains_key("train.loss"));
    assert!(h.query_by_label_contains("running on node7:42").is_some());
    assert!(
        h.query_by_label_contains("2 distinct: 1 finished, 0 running here, 1 on other workers")
            .is_some()
    );
    let tables = h.state().experiments().tables();
    assert_eq!(tables[0].rows.iter().map(|r| r.n).sum::<usize>(), 1);
}

/// Every results-table column label (plain and against the baseline) has its glyphs in the Studio's fonts: egui
/// panics on a missing glyph, and a plan asking for that metric would take the window down.
#[test]
fn every_results_column_label_renders() {
    use focusdpo::experiment::resolve::Derivation;
    let mut labels: Vec<String> = Vec::new();
    for (_, label, _) in focusdpo::eval::study::all_metrics() {
        for d in [Derivation::Change, Derivation::RelativeChange] {
            labels.push(format!("{} {label}", d.label()));
        }
        labels.push(label);
    }
    let mut h = egui_kittest::Harness::new_ui(|ui| {
        for l in &labels {
            ui.label(l);
        }
    });
    h.run();
}
