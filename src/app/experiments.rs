//! The Experiments tab: load an ablation plan (file dialog, drag-and-drop, or one of the bundled examples), see
//! how it resolved and the grid it makes, run and stop the grid (resumable: the runner skips finished cells),
//! watch the cells fill in, and read the per-study tables and plots. Parsing, resolution, the grid and the runs
//! happen on the threads of [`super::experiment_worker`]; this file only keeps state and draws.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver};

use eframe::egui;
use egui_plot::{Legend, Line, MarkerShape, Plot, PlotPoints, Points};

use super::StudioApp;
pub use super::experiment_worker::PlanSource;
use super::experiment_worker::{
    BUNDLED_PLANS, ExperimentCommand, ExperimentEvent, ExperimentWorker, GridRequest, GridView, LoadedPlan, Metrics,
    RunEvent, SlurmRequest, StoreView, Watch,
};
use super::training::Outcome;
use crate::experiment::grid::{BASELINE, Cell, unique_ids};
use crate::experiment::resolve::{MetricMatch, Override};
use crate::experiment::results::{CellResult, CellStatus, Stat, StudyTable, study_tables};
use crate::experiment::slurm::SlurmResources;
use crate::train::config::ModelSettings;

/// The persisted part of the tab.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ExperimentSettings {
    /// The last plan loaded (reloaded at start).
    pub plan: Option<PlanSource>,
    /// Seeds per cell: `0..seeds`.
    pub seeds: u64,
    /// Optimiser steps of every cell.
    pub steps: u64,
    /// Evaluate every trained cell on the small synthetic benchmark ([`crate::experiment::runner::cell_benchmark`]).
    pub evaluate: bool,
    /// Resources per task of the Slurm job array the tab writes.
    pub slurm: SlurmResources,
}

impl Default for ExperimentSettings {
    fn default() -> Self {
        Self {
            plan: None,
            seeds: 1,
            steps: 20,
            evaluate: true,
            slurm: SlurmResources::default(),
        }
    }
}

/// Where a cell is.
#[derive(Clone, Debug, PartialEq)]
pub enum CellState {
    /// Not run (or an unfinished earlier attempt, which reruns).
    Pending,
    /// Training.
    Running {
        /// Last completed step (0 while loading).
        step: u64,
        /// Steps of the cell.
        total: u64,
        /// Loss of the last step.
        loss: Option<f32>,
    },
    /// Finished (now or earlier); its results are in [`ExperimentsPanel::results`].
    Finished,
    /// Another worker holds the cell (a CLI worker, a Slurm array task, another Studio).
    Elsewhere {
        /// The worker (`host:pid`, or the Slurm job and task).
        worker: String,
        /// Its lease ran out: it is taken for dead and the next worker takes the cell over.
        expired: bool,
    },
    /// The cell could not run.
    Failed(String),
}

impl CellState {
    /// Text of the status column.
    pub fn label(&self) -> String {
        match self {
            CellState::Pending => "pending".into(),
            CellState::Running { step, total, loss } => match loss {
                Some(l) => format!("running step {step}/{total} (loss {l:.4})"),
                None => format!("running step {step}/{total}"),
            },
            CellState::Finished => "finished".into(),
            CellState::Elsewhere { worker, expired: false } => format!("running on {worker}"),
            CellState::Elsewhere { worker, expired: true } => {
                format!("stalled on {worker} (lease expired)")
            }
            CellState::Failed(e) => format!("failed: {e}"),
        }
    }
}

/// The grid's cells as the results tables of [`crate::experiment::results`] read them: finished with their
/// values, failed, or pending. The Studio, `focusdpo ablate` and `focusdpo report` aggregate with the same code.
pub fn cell_results(
    cells: &[Cell],
    results: &HashMap<String, Metrics>,
    states: &HashMap<String, CellState>,
) -> Vec<CellResult> {
    cells
        .iter()
        .map(|c| {
            let metrics = results.get(&c.id);
            let status = match (metrics, states.get(&c.id)) {
                (Some(_), _) => CellStatus::Finished,
                (None, Some(CellState::Failed(_))) => CellStatus::Failed,
                _ => CellStatus::Pending,
            };
            CellResult {
                cell: c.clone(),
                status,
                steps: metrics.and_then(|m| m.get("steps")).map(|s| *s as usize),
                values: metrics
                    .map(|m| {
                        m.iter()
                            .filter(|(k, _)| k.as_str() != "steps")
                            .map(|(k, v)| (k.clone(), *v))
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect()
}

struct RunState {
    stopping: bool,
}

/// State of the Experiments tab.
pub struct ExperimentsPanel {
    worker: ExperimentWorker,
    runs_dir: PathBuf,
    base: Option<ModelSettings>,
    dataset: Option<PathBuf>,
    load_generation: u64,
    loading: Option<PlanSource>,
    plan: Option<LoadedPlan>,
    plan_error: Option<String>,
    out_input: String,
    grid_generation: u64,
    requested: Option<GridRequest>,
    grid: Option<GridView>,
    grid_error: Option<String>,
    states: HashMap<String, CellState>,
    results: HashMap<String, Metrics>,
    tables: Vec<StudyTable>,
    run: Option<RunState>,
    last_run: Option<String>,
    metric: Option<String>,
    dialog: Option<Receiver<Option<PathBuf>>>,
    outcomes: Vec<Outcome>,
    /// This process's worker name in claims (its own cells are not "elsewhere").
    me: String,
    /// A Slurm script is being written.
    writing_slurm: bool,
    /// The last Slurm script written (path, array tasks), or why not.
    slurm_written: Option<Result<(PathBuf, usize), String>>,
}

impl ExperimentsPanel {
    /// A panel whose results folders default to `runs_dir/<plan stem>`; `repaint` wakes the UI after each event.
    pub fn new(runs_dir: &Path, repaint: impl Fn() + Send + Sync + 'static) -> Self {
        Self {
            worker: ExperimentWorker::start(repaint),
            runs_dir: runs_dir.to_path_buf(),
            base: None,
            dataset: None,
            load_generation: 0,
            loading: None,
            plan: None,
            plan_error: None,
            out_input: String::new(),
            grid_generation: 0,
            requested: None,
            grid: None,
            grid_error: None,
            states: HashMap::new(),
            results: HashMap::new(),
            tables: Vec::new(),
            run: None,
            last_run: None,
            metric: None,
            dialog: None,
            outcomes: Vec::new(),
            me: crate::experiment::claim::worker_name(),
            writing_slurm: false,
            slurm_written: None,
        }
    }

    /// The base every cell trains from (the inspector's, once resolved): part of every cell's overrides.
    pub fn set_base(&mut self, base: ModelSettings) {
        self.base = Some(base);
    }

    /// The dataset every cell trains on (the inspector's); the bundled one adds no override, so its cells are the
    /// ones `focusdpo ablate` makes without `--set data.dir`.
    pub fn set_dataset(&mut self, dir: Option<PathBuf>) {
        self.dataset = dir.filter(|d| !crate::dip::is_bundled_dataset_dir(d));
    }

    /// Reads, parses and resolves a plan on the plan thread.
    pub fn load(&mut self, source: PlanSource) {
        if self.is_running() {
            self.outcomes.push(Outcome::Error(
                "stop the running grid before loading another plan".into(),
            ));
            return;
        }
        self.load_generation += 1;
        self.loading = Some(source.clone());
        self.worker.send(ExperimentCommand::Load {
            generation: self.load_generation,
            source,
        });
    }

    /// The loaded plan.
    pub fn plan(&self) -> Option<&LoadedPlan> {
        self.plan.as_ref()
    }

    /// Why the last plan could not be loaded.
    pub fn plan_error(&self) -> Option<&str> {
        self.plan_error.as_deref()
    }

    /// Whether a plan is being read.
    pub fn is_loading(&self) -> bool {
        self.loading.is_some()
    }

    /// The grid of the loaded plan, once built.
    pub fn grid(&self) -> Option<&GridView> {
        self.grid.as_ref()
    }

    /// State of a cell.
    pub fn cell_state(&self, id: &str) -> Option<&CellState> {
        self.states.get(id)
    }

    /// Results of the finished cells, by id.
    pub fn results(&self) -> &HashMap<String, Metrics> {
        &self.results
    }

    /// The per-study tables (those of results.md).
    pub fn tables(&self) -> &[StudyTable] {
        &self.tables
    }

    /// Whether a grid is running.
    pub fn is_running(&self) -> bool {
        self.run.is_some()
    }

    /// Whether the grid on screen is the one the current settings describe (so Run would run it).
    pub fn grid_is_current(&self, settings: &ExperimentSettings) -> bool {
        match (&self.grid, self.wanted(settings)) {
            (Some(g), Some(w)) => g.request == w,
            _ => false,
        }
    }

    /// Whether Run can start now.
    pub fn can_run(&self, settings: &ExperimentSettings) -> bool {
        !self.is_running() && self.grid_is_current(settings)
    }

    /// The results folder in the form.
    pub fn out_dir(&self) -> PathBuf {
        PathBuf::from(self.out_input.trim())
    }

    /// Sets the results folder (the grid is rebuilt and the store read again).
    pub fn set_out_dir(&mut self, dir: &Path) {
        self.out_input = dir.display().to_string();
    }

    fn wanted(&self, settings: &ExperimentSettings) -> Option<GridRequest> {
        let out = self.out_dir();
        if self.plan.is_none() || out.as_os_str().is_empty() {
            return None;
        }
        Some(GridRequest {
            seeds: settings.seeds.max(1),
            steps: settings.steps.max(1),
            base: self.base.clone()?,
            dataset: self.dataset.clone(),
            out,
        })
    }

    /// Starts the grid on screen (cells finished earlier are skipped by the runner).
    pub fn start(&mut self, settings: &ExperimentSettings) {
        if self.is_running() {
            return;
        }
        let Some(grid) = self.grid.as_ref().filter(|_| self.grid_is_current(settings)) else {
            self.outcomes.push(Outcome::Error(
                "the grid is still being built: run it in a moment".into(),
            ));
            return;
        };
        let cells = grid.cells.clone();
        let out = grid.request.out.clone();
        let Some(plan) = self.plan.as_ref() else {
            return;
        };
        let job = crate::app::experiment_worker::GridJob {
            cells,
            out,
            title: plan.title.clone(),
            resolution: Arc::clone(&plan.resolution),
            eval: settings.evaluate.then(crate::experiment::runner::cell_benchmark),
            plan_text: Arc::clone(&plan.text),
        };
        match self.worker.run(job) {
            Ok(()) => {
                self.run = Some(RunState { stopping: false });
                self.last_run = None;
                for state in self.states.values_mut() {
                    if matches!(state, CellState::Failed(_)) {
                        *state = CellState::Pending;
                    }
                }
            }
            Err(e) => self.outcomes.push(Outcome::Error(e)),
        }
    }

    /// Writes the grid's Slurm job array (one task per distinct cell, the same script as `focusdpo ablate --slurm`)
    /// into its results folder, on the plan thread.
    pub fn write_slurm(&mut self, settings: &ExperimentSettings) {
        let (Some(grid), Some(plan)) = (
            self.grid.as_ref().filter(|_| self.grid_is_current(settings)),
            &self.plan,
        ) else {
            self.outcomes.push(Outcome::Error(
                "the grid is still being built: write the script in a moment".into(),
            ));
            return;
        };
        self.writing_slurm = true;
        self.worker.send(ExperimentCommand::WriteSlurm(Box::new(SlurmRequest {
            grid: Box::new(grid.clone()),
            plan: Box::new(plan.clone()),
            evaluate: settings.evaluate,
            resources: settings.slurm.clone(),
        })));
    }

    /// The last Slurm script written (its path and array tasks), or why not.
    pub fn slurm_written(&self) -> Option<&Result<(PathBuf, usize), String>> {
        self.slurm_written.as_ref()
    }

    /// Asks the running grid to stop after the training step in flight.
    pub fn stop(&mut self) {
        if let Some(run) = &mut self.run {
            self.worker.stop();
            run.stopping = true;
        }
    }

    /// Applies the threads' events and the dialog's answer, and asks for a new grid when the settings changed
    /// (never blocks); returns what to show in the notice bar.
    pub fn drain(&mut self, settings: &mut ExperimentSettings) -> Vec<Outcome> {
        let mut changed = false;
        // Bounded, so a burst of step events cannot stall a frame; the rest waits for the next one.
        let budget = std::time::Instant::now() + std::time::Duration::from_millis(4);
        while std::time::Instant::now() < budget {
            let Some(event) = self.worker.try_recv() else {
                break;
            };
            changed |= self.apply(event, settings);
        }
        if let Some(rx) = &self.dialog
            && let Ok(choice) = rx.try_recv()
        {
            self.dialog = None;
            if let Some(path) = choice {
                self.load(PlanSource::File(path));
            }
        }
        self.request_grid(settings);
        if changed {
            self.refresh_tables();
        }
        std::mem::take(&mut self.outcomes)
    }

    fn request_grid(&mut self, settings: &ExperimentSettings) {
        if self.is_running() {
            return;
        }
        let (Some(wanted), Some(plan)) = (self.wanted(settings), &self.plan) else {
            return;
        };
        if self.requested.as_ref() == Some(&wanted) {
            return;
        }
        self.grid_generation += 1;
        self.requested = Some(wanted.clone());
        self.worker.send(ExperimentCommand::Grid {
            generation: self.grid_generation,
            resolution: plan.resolution.clone(),
            request: Box::new(wanted),
        });
    }

    /// Returns whether results changed.
    fn apply(&mut self, event: ExperimentEvent, settings: &mut ExperimentSettings) -> bool {
        match event {
            ExperimentEvent::Loaded { generation, result } => {
                if generation != self.load_generation {
                    return false;
                }
                self.loading = None;
                match result {
                    Ok(plan) => {
                        self.out_input = self.runs_dir.join(plan.source.stem()).display().to_string();
                        settings.plan = Some(plan.source.clone());
                        self.plan = Some(*plan);
                        self.plan_error = None;
                        self.grid = None;
                        self.grid_error = None;
                        self.requested = None;
                        self.states.clear();
                        self.results.clear();
                        self.last_run = None;
                        self.slurm_written = None;
                        self.worker.send(ExperimentCommand::Watch(None));
                        true
                    }
                    Err(e) => {
                        self.plan_error = Some(e.clone());
                        self.outcomes.push(Outcome::Error(format!("plan: {e}")));
                        false
                    }
                }
            }
            ExperimentEvent::Grid { generation, result } => {
                if generation != self.grid_generation {
                    return false;
                }
                match result {
                    Ok(view) => {
                        self.states.clear();
                        self.results.clear();
                        self.worker.send(ExperimentCommand::Watch(Some(Watch {
                            generation,
                            out: view.request.out.clone(),
                            cells: Arc::clone(&view.cells),
                        })));
                        let store = view.store.clone();
                        self.grid = Some(*view);
                        self.grid_error = None;
                        self.slurm_written = None;
                        self.apply_store(&store);
                    }
                    Err(e) => {
                        self.grid = None;
                        self.grid_error = Some(e);
                    }
                }
                true
            }
            ExperimentEvent::Run(event) => self.apply_run(event),
            ExperimentEvent::Store { generation, view } => {
                generation == self.grid_generation && self.apply_store(&view)
            }
            ExperimentEvent::SlurmWritten(result) => {
                self.writing_slurm = false;
                match &result {
                    Ok((path, tasks)) => self.outcomes.push(Outcome::Info(format!(
                        "wrote {} ({tasks} array tasks); submit it with: sbatch {}",
                        path.display(),
                        path.display()
                    ))),
                    Err(e) => self.outcomes.push(Outcome::Error(format!("Slurm script: {e}"))),
                }
                self.slurm_written = Some(result);
                false
            }
        }
    }

    /// Shows what the store holds: cells finished (their results join the tables), failed, or held by another
    /// worker. A cell this Studio is training keeps its progress until it finishes. Returns whether results
    /// changed.
    fn apply_store(&mut self, view: &StoreView) -> bool {
        for (id, e) in &view.unreadable {
            self.outcomes
                .push(Outcome::Error(format!("cell {id}: results cannot be read: {e}")));
        }
        let Some(grid) = &self.grid else {
            return false;
        };
        let mut changed = false;
        for id in unique_ids(&grid.cells) {
            let state = if let Some(metrics) = view.finished.get(id) {
                if self.results.get(id) != Some(metrics) {
                    self.results.insert(id.to_string(), metrics.clone());
                    changed = true;
                }
                CellState::Finished
            } else if matches!(self.states.get(id), Some(CellState::Running { .. })) {
                continue;
            } else if let Some((error, worker)) = view.failed.get(id) {
                CellState::Failed(if worker.is_empty() || *worker == self.me {
                    error.clone()
                } else {
                    format!("{error} (on {worker})")
                })
            } else if let Some(claim) = view.claimed.get(id).filter(|c| c.worker != self.me) {
                CellState::Elsewhere {
                    worker: claim.worker.clone(),
                    expired: claim.expired(),
                }
            } else {
                CellState::Pending
            };
            if state != CellState::Finished && self.results.remove(id).is_some() {
                changed = true;
            }
            self.states.insert(id.to_string(), state);
        }
        changed
    }

    fn apply_run(&mut self, event: RunEvent) -> bool {
        let total = self.grid.as_ref().map_or(0, |g| g.request.steps);
        match event {
            RunEvent::Skipped { id, metrics } | RunEvent::Finished { id, metrics } => {
                self.states.insert(id.clone(), CellState::Finished);
                self.results.insert(id, metrics);
                true
            }
            RunEvent::Started { id } => {
                self.states.insert(
                    id,
                    CellState::Running {
                        step: 0,
                        total,
                        loss: None,
                    },
                );
                false
            }
            RunEvent::Step { id, step, loss } => {
                self.states.insert(
                    id,
                    CellState::Running {
                        step,
                        total,
                        loss: Some(loss),
                    },
                );
                false
            }
            RunEvent::Elsewhere { id, worker } => {
                let expired = matches!(self.states.get(&id), Some(CellState::Elsewhere { expired: true, .. }));
                self.states.insert(id, CellState::Elsewhere { worker, expired });
                false
            }
            RunEvent::Failed { id, error } => {
                self.outcomes.push(Outcome::Error(format!("cell {id} failed: {error}")));
                self.states.insert(id, CellState::Failed(error));
                false
            }
            RunEvent::Ended(result) => {
                self.run = None;
                // A cell interrupted by Stop is unfinished: it reruns from the start next time.
                for state in self.states.values_mut() {
                    if matches!(state, CellState::Running { .. }) {
                        *state = CellState::Pending;
                    }
                }
                let text = match result {
                    Ok((report, csv)) => {
                        let text = format!(
                            "grid {}: {} run, {} finished earlier, {} failed; {}",
                            if report.stopped { "stopped" } else { "done" },
                            report.finished,
                            report.skipped,
                            report.failed.len(),
                            csv.display()
                        );
                        self.outcomes.push(Outcome::Info(text.clone()));
                        text
                    }
                    Err(e) => {
                        self.outcomes.push(Outcome::Error(format!("grid: {e}")));
                        format!("grid failed: {e}")
                    }
                };
                self.last_run = Some(text);
                false
            }
        }
    }

    fn refresh_tables(&mut self) {
        self.tables = match (&self.plan, &self.grid) {
            (Some(plan), Some(grid)) => {
                let results = cell_results(&grid.cells, &self.results, &self.states);
                study_tables(&plan.resolution, &results)
                    .into_iter()
                    .filter(|t| !t.rows.is_empty())
                    .collect()
            }
            _ => Vec::new(),
        };
    }

    fn pick_plan_file(&mut self) {
        if self.dialog.is_some() {
            return;
        }
        let (tx, rx) = mpsc::channel();
        // The native dialog blocks its thread; it gets one of its own.
        let spawned = std::thread::Builder::new()
            .name("studio-plan-dialog".into())
            .spawn(move || {
                let _ = tx.send(
                    rfd::FileDialog::new()
                        .set_title("Open an ablation plan")
                        .add_filter("plan", &["md", "markdown", "txt", "html", "htm"])
                        .pick_file(),
                );
            });
        match spawned {
            Ok(_) => self.dialog = Some(rx),
            Err(e) => self
                .outcomes
                .push(Outcome::Error(format!("cannot open the file dialog: {e}"))),
        }
    }

    /// The metric plotted: the picked one, else the first column of the first table (the plan's first metric
    /// that has results: tables list the requested metrics first).
    fn plotted_metric(&self) -> Option<String> {
        let has = |m: &String| self.tables.iter().any(|t| t.columns.iter().any(|c| &c.id == m));
        if let Some(m) = self.metric.as_ref().filter(|m| has(m)) {
            return Some(m.clone());
        }
        self.tables.iter().flat_map(|t| &t.columns).map(|c| c.id.clone()).next()
    }
}

/// Whether a dropped file is a plan (rather than a dataset's `metadata.jsonl`).
pub fn is_plan_file(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| ["md", "markdown", "txt", "html", "htm"].contains(&e.to_ascii_lowercase().as_str()))
}

/// The Experiments tab.
pub fn experiments_ui(app: &mut StudioApp, ui: &mut egui::Ui) {
    egui::Panel::left("experiments-plan")
        .resizable(true)
        .default_size(380.0)
        .show(ui, |ui| {
            egui::ScrollArea::vertical().show(ui, |ui| {
                plan_ui(app, ui);
                ui.separator();
                grid_form_ui(app, ui);
            });
        });
    egui::CentralPanel::default().show(ui, |ui| {
        egui::ScrollArea::vertical().show(ui, |ui| {
            egui::CollapsingHeader::new("Resolved studies")
                .default_open(true)
                .show(ui, |ui| resolution_ui(&app.experiments, ui));
            egui::CollapsingHeader::new("Cells")
                .default_open(true)
                .show(ui, |ui| cells_ui(&app.experiments, ui));
            egui::CollapsingHeader::new("Results")
                .default_open(true)
                .show(ui, |ui| results_ui(&mut app.experiments, ui));
        });
    });
}

fn plan_ui(app: &mut StudioApp, ui: &mut egui::Ui) {
    let panel = &mut app.experiments;
    ui.heading("Plan");
    let idle = !panel.is_running();
    ui.add_enabled_ui(idle, |ui| {
        if ui
            .button("Open plan…")
            .on_hover_text("a plan in the seeds' Markdown format (.md, .txt, .html); or drop the file on the window")
            .clicked()
        {
            panel.pick_plan_file();
        }
        ui.label("examples:");
        for (name, _) in BUNDLED_PLANS {
            if ui.small_button(name).clicked() {
                panel.load(PlanSource::Bundled(name.into()));
            }
        }
    });
    if let Some(source) = &panel.loading {
        ui.horizontal(|ui| {
            ui.spinner();
            ui.label(format!("reading {}…", source.label()));
        });
    }
    if let Some(e) = &panel.plan_error {
        ui.colored_label(ui.visuals().error_fg_color, format!("cannot load the plan: {e}"));
    }
    match &panel.plan {
        Some(plan) => {
            ui.label(egui::RichText::new(plan.source.label()).small());
            if let Some(t) = &plan.title {
                ui.strong(t);
            }
            for w in &plan.warnings {
                ui.colored_label(ui.visuals().warn_fg_color, format!("line {}: {}", w.line, w.message));
            }
        }
        None => {
            ui.label("no plan loaded");
        }
    }
}

fn grid_form_ui(app: &mut StudioApp, ui: &mut egui::Ui) {
    let settings = &mut app.settings.experiments;
    let panel = &mut app.experiments;
    ui.heading("Grid");
    let idle = !panel.is_running();
    ui.add_enabled_ui(idle, |ui| {
        egui::Grid::new("experiments-form").num_columns(2).show(ui, |ui| {
            ui.label("seeds");
            ui.add(egui::DragValue::new(&mut settings.seeds).range(1..=32))
                .on_hover_text("every cell runs with seeds 0..K");
            ui.end_row();
            ui.label("steps");
            ui.add(egui::DragValue::new(&mut settings.steps).range(1..=100_000));
            ui.end_row();
            ui.label("evaluate");
            ui.checkbox(&mut settings.evaluate, "synthetic benchmark per cell")
                .on_hover_text("4 single + 4 multi-subject held-out items, 1 image each, 12 sampler steps");
            ui.end_row();
            ui.label("results folder");
            ui.add(egui::TextEdit::singleline(&mut panel.out_input).desired_width(220.0));
            ui.end_row();
        });
    });
    let base = panel
        .base
        .as_ref()
        .map_or("loading…".to_string(), super::backbone_label);
    ui.label(egui::RichText::new(format!("backbone: {base} (the inspector's)")).small());
    let data = panel
        .dataset
        .as_ref()
        .map_or("the bundled DIP".to_string(), |d| d.display().to_string());
    ui.label(egui::RichText::new(format!("dataset: {data} (the inspector's)")).small());
    if let Some(e) = &panel.grid_error {
        ui.colored_label(ui.visuals().error_fg_color, e);
    }
    if let Some(grid) = &panel.grid {
        let baseline = grid.cells.iter().filter(|c| c.study == BASELINE).count();
        let distinct = unique_ids(&grid.cells);
        let done = distinct.iter().filter(|id| panel.results.contains_key(**id)).count();
        ui.label(format!(
            "{} cells ({baseline} baseline + {} values × {} seed(s)); {} distinct runs, {done} finished",
            grid.cells.len(),
            (grid.cells.len() - baseline) / grid.request.seeds.max(1) as usize,
            grid.request.seeds,
            distinct.len(),
        ));
        ui.label(
            egui::RichText::new(format!(
                "same cells as: focusdpo ablate PLAN --out {} {} --steps {} --seeds {}",
                grid.request.out.display(),
                backbone_option(&grid.request.base),
                grid.request.steps,
                grid.request.seeds
            ))
            .small(),
        );
    } else if panel.plan.is_some() {
        ui.label("building the grid…");
    }
    ui.horizontal(|ui| {
        let can_run = panel.can_run(settings);
        if ui
            .add_enabled(can_run, egui::Button::new("Run grid"))
            .on_hover_text("trains every unfinished cell; finished cells are skipped")
            .clicked()
        {
            panel.start(settings);
        }
        let stoppable = panel.run.as_ref().is_some_and(|r| !r.stopping);
        if ui
            .add_enabled(stoppable, egui::Button::new("Stop grid"))
            .on_hover_text("ends after the training step in flight; that cell reruns next time")
            .clicked()
        {
            panel.stop();
        }
    });
    slurm_ui(settings, panel, ui);
    if let Some(run) = &panel.run {
        ui.horizontal(|ui| {
            ui.spinner();
            ui.label(if run.stopping {
                "stopping after the current step…"
            } else {
                "running…"
            });
        });
    } else if let Some(text) = &panel.last_run {
        ui.label(text);
    }
}

/// The Slurm job array form: resources per task and the button that writes `OUT/ablate.sbatch`.
fn slurm_ui(settings: &mut ExperimentSettings, panel: &mut ExperimentsPanel, ui: &mut egui::Ui) {
    egui::CollapsingHeader::new("Slurm job array")
        .id_salt("experiments-slurm")
        .show(ui, |ui| {
            ui.label(
                egui::RichText::new(
                    "one array task per distinct cell, each running focusdpo ablate --cell on this results folder \
                     (on a filesystem the cluster's nodes share); workers claim cells, so finished cells are never \
                     rerun and a dead task's cell is taken over",
                )
                .small(),
            );
            let r = &mut settings.slurm;
            egui::Grid::new("experiments-slurm-form").num_columns(2).show(ui, |ui| {
                ui.label("partition");
                let mut partition = r.partition.clone().unwrap_or_default();
                if ui
                    .add(
                        egui::TextEdit::singleline(&mut partition)
                            .hint_text("cluster default")
                            .desired_width(120.0),
                    )
                    .changed()
                {
                    r.partition = Some(partition.trim().to_string()).filter(|p| !p.is_empty());
                }
                ui.end_row();
                ui.label("GPUs per task");
                ui.add(egui::DragValue::new(&mut r.gpus).range(0..=16));
                ui.end_row();
                ui.label("CPU cores per task");
                ui.add(egui::DragValue::new(&mut r.cpus).range(1..=256));
                ui.end_row();
                ui.label("memory per task");
                ui.add(egui::TextEdit::singleline(&mut r.mem).desired_width(120.0))
                    .on_hover_text("Slurm's --mem: a number with K, M, G or T");
                ui.end_row();
                ui.label("time limit");
                ui.add(egui::TextEdit::singleline(&mut r.time).desired_width(120.0))
                    .on_hover_text(
                        "Slurm's --time: [D-]HH:MM:SS; a task that hits it leaves a checkpoint the next resumes",
                    );
                ui.end_row();
                ui.label("tasks at once");
                ui.add(egui::DragValue::new(&mut r.max_parallel).range(0..=10_000))
                    .on_hover_text("--array=…%N; 0: no limit");
                ui.end_row();
            });
            let problem = crate::experiment::slurm::check_resources(r).err();
            if let Some(p) = &problem {
                ui.colored_label(ui.visuals().error_fg_color, p);
            }
            ui.horizontal(|ui| {
                let ready = panel.grid_is_current(settings) && problem.is_none() && !panel.writing_slurm;
                if ui
                    .add_enabled(ready, egui::Button::new("Write Slurm script"))
                    .on_hover_text("writes ablate.sbatch, grid.json and plan.md into the results folder; runs nothing")
                    .clicked()
                {
                    panel.write_slurm(settings);
                }
                if panel.writing_slurm {
                    ui.spinner();
                }
            });
            match &panel.slurm_written {
                Some(Ok((path, tasks))) => {
                    ui.label(format!("{tasks} array tasks; submit with:"));
                    let command = format!(
                        "sbatch {}",
                        crate::experiment::slurm::shell_quote(&path.to_string_lossy())
                    );
                    ui.horizontal(|ui| {
                        ui.monospace(&command);
                        if ui.small_button("copy").clicked() {
                            ui.ctx().copy_text(command.clone());
                        }
                    });
                    ui.label(
                        egui::RichText::new("the Cells table shows the tasks' cells as they run and finish").small(),
                    );
                }
                Some(Err(e)) => {
                    ui.colored_label(ui.visuals().error_fg_color, format!("cannot write the script: {e}"));
                }
                None => {}
            }
        });
}

fn resolution_ui(panel: &ExperimentsPanel, ui: &mut egui::Ui) {
    let Some(plan) = &panel.plan else {
        ui.label("load a plan to see how its studies map onto Studio knobs");
        return;
    };
    let res = &plan.resolution;
    for study in &res.studies {
        ui.group(|ui| {
            ui.horizontal(|ui| {
                ui.strong(&study.title);
                ui.label(format!("(line {})", study.line));
                match &study.knob {
                    Some(k) => {
                        ui.label("knob");
                        ui.monospace(k)
                    }
                    None => ui.colored_label(ui.visuals().error_fg_color, "unresolved part"),
                };
            });
            if let Some(why) = &study.reason {
                ui.label(egui::RichText::new(format!("chosen: {}", why.text())).small().weak());
            }
            egui::Grid::new(("experiments-values", study.line))
                .num_columns(2)
                .striped(true)
                .show(ui, |ui| {
                    for v in &study.values {
                        ui.label(&v.text);
                        let sets: Vec<String> = v.overrides.iter().map(Override::arg).collect();
                        ui.monospace(sets.join(" "));
                        ui.end_row();
                    }
                });
            ui.horizontal_wrapped(|ui| {
                ui.label("metrics:");
                for m in &study.metrics {
                    if let (MetricMatch::Available { note, .. }, Some(id)) = (&m.matched, m.matched.shown_id()) {
                        let r = ui.label(format!("{} = {id}", m.text));
                        if let Some(n) = note {
                            r.on_hover_text(*n);
                        }
                    }
                }
            });
            for m in &study.metrics {
                if let MetricMatch::Unavailable { reason } = &m.matched {
                    ui.colored_label(
                        ui.visuals().weak_text_color(),
                        format!("{}: unavailable ({reason})", m.text),
                    );
                }
            }
        });
    }
    if !res.unresolved.is_empty() {
        ui.label(format!("left out ({}):", res.unresolved.len()));
        for u in &res.unresolved {
            ui.colored_label(ui.visuals().warn_fg_color, u.to_string());
        }
    }
}

fn cells_ui(panel: &ExperimentsPanel, ui: &mut egui::Ui) {
    let Some(grid) = &panel.grid else {
        ui.label("no grid yet");
        return;
    };
    let ids = unique_ids(&grid.cells);
    let count = |f: &dyn Fn(&CellState) -> bool| ids.iter().filter(|id| panel.states.get(**id).is_some_and(f)).count();
    let elsewhere = count(&|s| matches!(s, CellState::Elsewhere { .. }));
    ui.label(format!(
        "{} distinct: {} finished, {} running here, {elsewhere} on other workers, {} failed, {} pending",
        ids.len(),
        count(&|s| *s == CellState::Finished),
        count(&|s| matches!(s, CellState::Running { .. })),
        count(&|s| matches!(s, CellState::Failed(_))),
        count(&|s| *s == CellState::Pending),
    ))
    .on_hover_text(format!(
        "the results folder is read every {} s: cells other workers (focusdpo ablate --cell/--shard, Slurm array \
         tasks, another Studio) run show up here and join the results as they finish",
        super::experiment_worker::WATCH_PERIOD.as_secs()
    ));
    egui::Grid::new("experiments-cells")
        .num_columns(5)
        .striped(true)
        .show(ui, |ui| {
            for h in ["cell", "study", "value", "seed", "status"] {
                ui.strong(h);
            }
            ui.end_row();
            for c in grid.cells.iter() {
                ui.monospace(&c.id).on_hover_text(c.overrides.join(" "));
                ui.label(&c.study);
                ui.label(&c.value);
                ui.label(c.seed.to_string());
                let state = panel.states.get(&c.id).cloned().unwrap_or(CellState::Pending);
                match &state {
                    CellState::Failed(_) => ui.colored_label(ui.visuals().error_fg_color, state.label()),
                    CellState::Elsewhere { expired: true, .. } => ui
                        .colored_label(ui.visuals().warn_fg_color, state.label())
                        .on_hover_text("its worker stopped renewing its claim: the next worker takes the cell over"),
                    CellState::Elsewhere { .. } => ui.colored_label(ui.visuals().hyperlink_color, state.label()),
                    _ => ui.label(state.label()),
                };
                ui.end_row();
            }
        });
}

/// A number for the tables: whole numbers without decimals, very large or small ones in exponent form.
fn format_number(v: f64) -> String {
    let a = v.abs();
    if v.fract() == 0.0 && a < 1e9 {
        format!("{v:.0}")
    } else if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

fn format_stats(s: &Stat) -> String {
    if s.ci95.is_finite() {
        format!("{} ± {}", format_number(s.mean), format_number(s.ci95))
    } else {
        format_number(s.mean)
    }
}

fn results_ui(panel: &mut ExperimentsPanel, ui: &mut egui::Ui) {
    if panel.tables.iter().all(|t| t.columns.is_empty()) {
        ui.label("no finished cell yet");
        return;
    }
    let plotted = panel.plotted_metric();
    let mut all: Vec<(String, String)> = Vec::new();
    for c in panel.tables.iter().flat_map(|t| &t.columns) {
        if !all.iter().any(|(id, _)| *id == c.id) {
            all.push((c.id.clone(), c.label.clone()));
        }
    }
    let label_of = |id: &str| {
        all.iter()
            .find(|(i, _)| i == id)
            .map_or(id.to_string(), |(_, l)| l.clone())
    };
    ui.horizontal(|ui| {
        ui.label("plotted metric");
        egui::ComboBox::from_id_salt("experiments-metric")
            .selected_text(plotted.as_deref().map(label_of).unwrap_or_default())
            .show_ui(ui, |ui| {
                for (id, label) in &all {
                    if ui.selectable_label(plotted.as_ref() == Some(id), label).clicked() {
                        panel.metric = Some(id.clone());
                    }
                }
            });
        ui.label(
            "(mean ± 95 % CI over seeds when two or more finished; Δ: against the baseline cell of the same seed)",
        );
    });
    for (i, table) in panel.tables.iter().enumerate() {
        ui.separator();
        ui.strong(&table.title);
        egui::ScrollArea::horizontal()
            .id_salt(("experiments-table-scroll", i))
            .show(ui, |ui| {
                egui::Grid::new(("experiments-table", i))
                    .num_columns(table.columns.len() + 2)
                    .striped(true)
                    .show(ui, |ui| {
                        ui.strong("value");
                        ui.strong("seeds");
                        for c in &table.columns {
                            let better = match c.better {
                                crate::eval::study::Better::Higher => "higher is better",
                                crate::eval::study::Better::Lower => "lower is better",
                            };
                            ui.strong(&c.label).on_hover_text(format!("{}: {better}", c.id));
                        }
                        ui.end_row();
                        for row in &table.rows {
                            ui.label(&row.value).on_hover_text(row.overrides.join(" "));
                            ui.label(format!("{}/{}", row.n, row.cells));
                            for c in &table.columns {
                                ui.label(row.stats.get(&c.id).map_or_else(|| "–".into(), format_stats));
                            }
                            ui.end_row();
                        }
                    });
            });
        for note in &table.left_out {
            ui.colored_label(ui.visuals().weak_text_color(), note);
        }
        if let Some(metric) = &plotted {
            study_plot_ui(table, metric, &label_of(metric), i, ui);
        }
    }
}

fn study_plot_ui(table: &StudyTable, metric: &str, label: &str, i: usize, ui: &mut egui::Ui) {
    let labels: Vec<String> = table.rows.iter().map(|r| r.value.clone()).collect();
    let mut seeds = Vec::new();
    let mut means = Vec::new();
    let mut bars = Vec::new();
    for (x, row) in table.rows.iter().enumerate() {
        let Some(s) = row.stats.get(metric) else {
            continue;
        };
        let x = x as f64;
        seeds.extend(s.per_seed.iter().map(|(_, v)| [x, *v]));
        means.push([x, s.mean]);
        if s.ci95.is_finite() {
            bars.push([[x, s.mean - s.ci95], [x, s.mean + s.ci95]]);
        }
    }
    Plot::new(("experiments-plot", i))
        .height(180.0)
        .legend(Legend::default())
        .y_axis_label(label.to_string())
        .x_axis_formatter(move |mark, _| {
            let x = mark.value;
            if x.fract().abs() > 1e-9 || x < 0.0 {
                return String::new();
            }
            labels.get(x as usize).map_or_else(String::new, |l| {
                if l.chars().count() > 18 {
                    format!("{}…", l.chars().take(17).collect::<String>())
                } else {
                    l.clone()
                }
            })
        })
        .show(ui, |plot| {
            plot.points(Points::new("seeds", PlotPoints::from(seeds)).radius(2.5));
            plot.points(
                Points::new("mean", PlotPoints::from(means))
                    .radius(4.5)
                    .shape(MarkerShape::Diamond),
            );
            for bar in bars {
                plot.line(Line::new("95 % CI", PlotPoints::from(bar.to_vec())));
            }
        });
}

/// The `focusdpo ablate` option that puts cells on `backbone`: `--base B` for a transformer alone, else the profile.
fn backbone_option(backbone: &ModelSettings) -> String {
    if crate::experiment::resolve::model_overrides(backbone).len() == 1 {
        format!("--base {}", backbone.base)
    } else {
        "--backbone PROFILE (the Studio's backbone)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::grid::build_grid;
    use crate::experiment::parse_plan;
    use crate::experiment::resolve::resolve_plan;

    #[test]
    fn the_tab_tables_are_the_results_md_tables() {
        let text = "### tau\n- Ablated Part: τ\n- Replacement: 0.1, 0.2\n- Metrics: loss, loss reduction\n";
        let r = resolve_plan(&parse_plan(text).expect("parses"));
        let cells = build_grid(&r, &[], &[0, 1, 2]);
        let mut results = HashMap::new();
        let mut states = HashMap::new();
        for c in &cells {
            // Value 0.2 has only seed 0 finished, seed 1 failed.
            if c.value == "0.2" && c.seed > 0 {
                if c.seed == 1 {
                    states.insert(c.id.clone(), CellState::Failed("boom".into()));
                }
                continue;
            }
            let loss = 1.0 + c.seed as f64 - if c.value == "0.1" { 0.5 } else { 0.0 };
            results.insert(
                c.id.clone(),
                Metrics::from([("train.loss".to_string(), loss), ("steps".to_string(), 5.0)]),
            );
        }
        let cr = cell_results(&cells, &results, &states);
        assert_eq!(cr.iter().filter(|c| c.status == CellStatus::Finished).count(), 7);
        assert_eq!(cr.iter().filter(|c| c.status == CellStatus::Failed).count(), 1);
        assert!(cr.iter().all(|c| !c.values.contains_key("steps")));
        assert_eq!(cr[0].steps, Some(5));
        let tables = study_tables(&r, &cr);
        assert_eq!(tables.len(), 1);
        let t = &tables[0];
        let ids: Vec<&str> = t.columns.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["train.loss", "change:train.loss"]);
        let names: Vec<&str> = t.rows.iter().map(|r| r.value.as_str()).collect();
        assert_eq!(names, vec![BASELINE, "0.1", "0.2"]);
        let base = &t.rows[0].stats["train.loss"];
        assert_eq!((t.rows[0].n, t.rows[0].cells), (3, 3));
        assert!((base.mean - 2.0).abs() < 1e-12);
        let (_, h) = crate::eval::metrics::mean_ci95(&[1.0, 2.0, 3.0]);
        assert!((base.ci95 - h).abs() < 1e-12);
        assert_eq!(base.per_seed, [(0, 1.0), (1, 2.0), (2, 3.0)]);
        assert!((t.rows[1].stats["change:train.loss"].mean + 0.5).abs() < 1e-12);
        let single = &t.rows[2].stats["train.loss"];
        assert_eq!(t.rows[2].n, 1);
        assert!(single.ci95.is_nan() && format_stats(single) == "1");
        assert_eq!(format_number(0.25), "0.2500");
        assert_eq!(format_number(2e-5), "2.000e-5");
    }

    #[test]
    fn settings_persist_the_plan_seeds_and_steps() {
        let settings = crate::app::state::Settings {
            experiments: ExperimentSettings {
                plan: Some(PlanSource::File("plans/a.md".into())),
                seeds: 3,
                steps: 7,
                evaluate: false,
                slurm: SlurmResources {
                    partition: Some("gpu".into()),
                    gpus: 8,
                    ..SlurmResources::default()
                },
            },
            ..Default::default()
        };
        let text = serde_json::to_string(&settings).expect("serialises");
        let back: crate::app::state::Settings = serde_json::from_str(&text).expect("reads");
        assert_eq!(back.experiments, settings.experiments);
        // Settings saved before the tab existed still load.
        let old: crate::app::state::Settings = serde_json::from_str("{}").expect("reads");
        assert_eq!(old.experiments, ExperimentSettings::default());
    }

    #[test]
    fn plan_files_are_recognised_by_extension() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let plan = tmp.path().join("p.MD");
        std::fs::write(&plan, "x").expect("writes");
        let manifest = tmp.path().join("metadata.jsonl");
        std::fs::write(&manifest, "x").expect("writes");
        assert!(is_plan_file(&plan));
        assert!(!is_plan_file(&manifest));
        assert!(!is_plan_file(tmp.path()));
    }
}
