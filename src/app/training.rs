//! The training panel: configure and start a short run through [`Session`] (the same worker the CLI uses,
//! writing `runs/<name>`), live curves from its events, stop after the current step, and past runs
//! (folders with `metrics.jsonl`) reopened and overlaid.

use eframe::egui;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};

use egui_plot::{Legend, Line, Plot, PlotPoints};
use serde_json::Value;

use super::StudioApp;
use super::state::{PlotSettings, TrainingForm};
use super::worker::Command;
use crate::eval::metrics::debiased_ema;
use crate::train::config::ModelSettings;
use crate::train::config::RunConfig;
use crate::train::run_store::{METRICS_FILE, read_metrics};
use crate::train::session::{Event, Launch, Session, SessionOptions, StepRecord};

/// The curves of one run, `[step, value]` per metric.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Curves {
    /// Loss.
    pub loss: Vec<[f64; 2]>,
    /// Implicit accuracy.
    pub accuracy: Vec<[f64; 2]>,
    /// Mean reward margin.
    pub margin: Vec<[f64; 2]>,
    /// `A_focus` of the step's `M_s`.
    pub a_focus: Vec<[f64; 2]>,
    /// Gradient norm before clipping.
    pub grad_norm: Vec<[f64; 2]>,
}

impl Curves {
    /// Appends a live step (non-finite values, e.g. SFT's accuracy, are left out).
    pub fn push_record(&mut self, r: &StepRecord) {
        let x = r.step as f64;
        let push = |curve: &mut Vec<[f64; 2]>, v: f64| {
            if v.is_finite() {
                curve.push([x, v]);
            }
        };
        push(&mut self.loss, f64::from(r.stats.loss));
        push(&mut self.accuracy, f64::from(r.stats.implicit_accuracy));
        push(&mut self.margin, f64::from(r.stats.reward_margin));
        if let Some(a) = r.a_focus {
            push(&mut self.a_focus, f64::from(a));
        }
        push(&mut self.grad_norm, r.grad_norm);
    }

    /// Curves from the step records of `metrics.jsonl` ([`read_metrics`]).
    pub fn from_records(records: &[Value]) -> Self {
        let mut c = Self::default();
        for r in records {
            let Some(x) = r.get("step").and_then(Value::as_f64) else {
                continue;
            };
            let push = |curve: &mut Vec<[f64; 2]>, key: &str| {
                if let Some(v) = r.get(key).and_then(Value::as_f64).filter(|v| v.is_finite()) {
                    curve.push([x, v]);
                }
            };
            push(&mut c.loss, "loss");
            push(&mut c.accuracy, "implicit_accuracy");
            push(&mut c.margin, "reward_margin");
            push(&mut c.a_focus, "a_focus");
            push(&mut c.grad_norm, "grad_norm");
        }
        c
    }

    /// Number of steps with a loss.
    pub fn len(&self) -> usize {
        self.loss.len()
    }

    /// Whether no step was recorded.
    pub fn is_empty(&self) -> bool {
        self.loss.is_empty()
    }
}

/// Where the live run is.
#[derive(Clone, Debug, PartialEq)]
pub enum RunStatus {
    /// Loading data and model.
    Starting,
    /// Steps are running.
    Running {
        /// Last completed step.
        step: u64,
        /// Total steps.
        total: u64,
    },
    /// Stop requested; the worker finishes the current step and checkpoints.
    Stopping,
    /// The run ended.
    Finished {
        /// Last completed step.
        step: u64,
        /// Whether a stop request ended it.
        stopped: bool,
    },
    /// The run failed.
    Failed {
        /// Last completed step.
        step: u64,
        /// Why.
        error: String,
    },
}

/// A run's sample sheets: (step, PNG), oldest first.
pub type Sheets = Vec<(u64, PathBuf)>;

/// A run started from this window.
pub struct LiveRun {
    session: Session,
    /// Run name.
    pub name: String,
    /// Run folder.
    pub dir: PathBuf,
    /// Curves so far.
    pub curves: Curves,
    /// State.
    pub status: RunStatus,
    /// Bytes of the base read so far, while it loads.
    pub loading: Option<std::sync::Arc<crate::model::weights::LoadProgress>>,
    /// Its sample sheets so far, by step.
    pub sheets: Sheets,
}

/// A run read back from disk.
#[derive(Clone, Debug)]
pub struct PastRun {
    /// Folder name.
    pub name: String,
    /// Folder.
    pub dir: PathBuf,
    /// Its curves.
    pub curves: Curves,
    /// Overlaid on the plots.
    pub shown: bool,
    /// Its sample sheets (`samples/step-N.png`), by step.
    pub sheets: Sheets,
}

/// Something the panel wants shown in the notice bar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A failure.
    Error(String),
    /// A note.
    Info(String),
}

type Scan = Result<Vec<Result<PastRun, String>>, String>;

/// State of the training tab.
pub struct TrainingPanel {
    runs_dir: PathBuf,
    base: Option<ModelSettings>,
    dataset: Option<PathBuf>,
    live: Option<LiveRun>,
    past: Vec<PastRun>,
    scan: Option<Receiver<Scan>>,
    outcomes: Vec<Outcome>,
    /// The sample sheet on screen.
    pub sheet: SheetView,
}

/// The sample sheet shown: which run and step, and its texture (decoded on a thread of its own).
#[derive(Default)]
pub struct SheetView {
    /// Run folder whose sheets are shown (None = the live run's, else the newest past run with sheets).
    pub run: Option<PathBuf>,
    /// Step shown (None = the newest).
    pub step: Option<u64>,
    texture: Option<(PathBuf, egui::TextureHandle)>,
    decoding: Option<(PathBuf, Receiver<Result<egui::ColorImage, String>>)>,
    failed: Option<(PathBuf, String)>,
}

impl SheetView {
    /// The PNG on screen, once decoded.
    pub fn shown_path(&self) -> Option<&Path> {
        self.texture.as_ref().map(|(p, _)| p.as_path())
    }

    /// Shows `path`: starts decoding it on a thread when it is not the texture already (never blocks).
    fn request(&mut self, path: &Path, ctx: &egui::Context) -> Option<&egui::TextureHandle> {
        if let Some((p, rx)) = &self.decoding {
            if let Ok(decoded) = rx.try_recv() {
                let p = p.clone();
                self.decoding = None;
                match decoded {
                    Ok(img) => {
                        let tex = ctx.load_texture(p.display().to_string(), img, egui::TextureOptions::NEAREST);
                        self.texture = Some((p, tex));
                    }
                    Err(e) => self.failed = Some((p, e)),
                }
            } else {
                ctx.request_repaint_after(std::time::Duration::from_millis(50));
            }
        }
        let current = self.texture.as_ref().is_some_and(|(p, _)| p == path);
        let pending = self.decoding.as_ref().is_some_and(|(p, _)| p == path);
        let failed = self.failed.as_ref().is_some_and(|(p, _)| p == path);
        if !current && !pending && !failed {
            let (tx, rx) = mpsc::channel();
            let file = path.to_path_buf();
            let ctx = ctx.clone();
            let spawned = std::thread::Builder::new().name("studio-sheet".into()).spawn(move || {
                let decoded = image::open(&file)
                    .map(|img| {
                        let rgba = img.to_rgba8();
                        egui::ColorImage::from_rgba_unmultiplied(
                            [rgba.width() as usize, rgba.height() as usize],
                            rgba.as_raw(),
                        )
                    })
                    .map_err(|e| format!("{}: {e}", file.display()));
                let _ = tx.send(decoded);
                ctx.request_repaint();
            });
            if spawned.is_ok() {
                self.decoding = Some((path.to_path_buf(), rx));
            }
        }
        self.texture.as_ref().filter(|(p, _)| p == path).map(|(_, t)| t)
    }
}

impl TrainingPanel {
    /// A panel writing runs under `runs_dir`; starts reading the past runs there.
    pub fn new(runs_dir: &Path) -> Self {
        let mut panel = Self {
            runs_dir: runs_dir.to_path_buf(),
            base: None,
            dataset: None,
            live: None,
            past: Vec::new(),
            scan: None,
            outcomes: Vec::new(),
            sheet: SheetView::default(),
        };
        panel.rescan();
        panel
    }

    /// The base runs are trained on (the inspector's, once its model thread has resolved it).
    pub fn set_base(&mut self, base: ModelSettings) {
        self.base = Some(base);
    }

    /// Whether a run can be started (the base is known and no run is in progress).
    pub fn can_start(&self) -> bool {
        self.base.is_some() && !self.is_running()
    }

    /// The live run, if any.
    pub fn live(&self) -> Option<&LiveRun> {
        self.live.as_ref()
    }

    /// Past runs read from the runs folder.
    pub fn past(&self) -> &[PastRun] {
        &self.past
    }

    /// Whether a run is in progress.
    pub fn is_running(&self) -> bool {
        self.live.as_ref().is_some_and(|l| {
            matches!(
                l.status,
                RunStatus::Starting | RunStatus::Running { .. } | RunStatus::Stopping
            )
        })
    }

    /// Reads the runs folder again (on a thread of its own).
    pub fn rescan(&mut self) {
        let (tx, rx) = mpsc::channel();
        let dir = self.runs_dir.clone();
        match std::thread::Builder::new().name("studio-runs".into()).spawn(move || {
            let _ = tx.send(scan_runs(&dir));
        }) {
            Ok(_) => self.scan = Some(rx),
            Err(e) => self
                .outcomes
                .push(Outcome::Error(format!("cannot read the runs folder: {e}"))),
        }
    }

    /// Applies the session's events and the scan's result (never blocks); returns what to show.
    pub fn drain(&mut self) -> Vec<Outcome> {
        if let Some(rx) = &self.scan
            && let Ok(scan) = rx.try_recv()
        {
            self.scan = None;
            match scan {
                Ok(runs) => {
                    let shown: Vec<PathBuf> = self.past.iter().filter(|r| r.shown).map(|r| r.dir.clone()).collect();
                    self.past.clear();
                    for run in runs {
                        match run {
                            Ok(mut r) => {
                                r.shown = shown.contains(&r.dir);
                                self.past.push(r);
                            }
                            Err(e) => self.outcomes.push(Outcome::Error(e)),
                        }
                    }
                }
                Err(e) => self.outcomes.push(Outcome::Error(e)),
            }
        }
        let mut ended = false;
        if let Some(live) = &mut self.live {
            while let Ok(event) = live.session.events().try_recv() {
                match event {
                    Event::Loading(progress) => live.loading = Some(progress),
                    Event::Started {
                        start_step,
                        total_steps,
                        ..
                    } => {
                        live.loading = None;
                        live.status = RunStatus::Running {
                            step: start_step,
                            total: total_steps,
                        }
                    }
                    Event::Step(record) => {
                        live.curves.push_record(&record);
                        if let RunStatus::Running { step, .. } = &mut live.status {
                            *step = record.step;
                        }
                    }
                    Event::Finished { step, stopped } => {
                        live.status = RunStatus::Finished { step, stopped };
                        self.outcomes.push(Outcome::Info(format!(
                            "run `{}` {} at step {step}",
                            live.name,
                            if stopped { "stopped" } else { "finished" }
                        )));
                        ended = true;
                    }
                    Event::Failed { step, error } => {
                        self.outcomes.push(Outcome::Error(format!(
                            "run `{}` failed at step {step}: {error}",
                            live.name
                        )));
                        live.status = RunStatus::Failed { step, error };
                        ended = true;
                    }
                    Event::Warning(text) => self
                        .outcomes
                        .push(Outcome::Info(format!("run `{}`: {text}", live.name))),
                    Event::Samples { step, path } => live.sheets.push((step, path)),
                    Event::Masks(_) | Event::Checkpoint(_) | Event::Dumped { .. } | Event::Pairs(_) => {}
                }
            }
        }
        if ended {
            self.rescan();
        }
        std::mem::take(&mut self.outcomes)
    }

    /// Starts a run from the form (errors become notices).
    pub fn start(&mut self, form: &TrainingForm) {
        if self.is_running() {
            self.outcomes
                .push(Outcome::Error("a run is already in progress".into()));
            return;
        }
        let name = form.name.trim();
        if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
            self.outcomes.push(Outcome::Error(format!(
                "run name `{name}`: use a plain folder name (it becomes {}/NAME)",
                self.runs_dir.display()
            )));
            return;
        }
        let dir = self.runs_dir.join(name);
        if dir.exists() {
            self.outcomes.push(Outcome::Error(format!(
                "{} already exists: choose another run name",
                dir.display()
            )));
            return;
        }
        let Some(base) = &self.base else {
            self.outcomes.push(Outcome::Error(
                "the base model is still loading: start the run in a moment".into(),
            ));
            return;
        };
        let config = run_config(form, base, self.dataset.clone());
        if let Err(e) = config.validate() {
            self.outcomes.push(Outcome::Error(format!("run config: {e}")));
            return;
        }
        let session = Session::start(
            Launch::New {
                config: Box::new(config),
                dir: dir.clone(),
            },
            SessionOptions::default(),
        );
        self.live = Some(LiveRun {
            session,
            name: name.to_string(),
            dir,
            curves: Curves::default(),
            status: RunStatus::Starting,
            loading: None,
            sheets: Vec::new(),
        });
    }

    /// Asks the live run to stop after its current step.
    pub fn stop(&mut self) {
        if let Some(live) = &mut self.live
            && matches!(live.status, RunStatus::Starting | RunStatus::Running { .. })
        {
            live.session.stop();
            live.status = RunStatus::Stopping;
        }
    }
}

/// The run config of a form, with the inspector's dataset and backbone.
pub fn run_config(form: &TrainingForm, base: &ModelSettings, dataset: Option<PathBuf>) -> RunConfig {
    let mut cfg = form.config.clone();
    cfg.data.dir = dataset;
    cfg.model = base.clone();
    cfg
}

fn scan_runs(dir: &Path) -> Scan {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join(METRICS_FILE).is_file())
        .collect();
    dirs.sort();
    Ok(dirs
        .into_iter()
        .map(|d| {
            let (records, _) = read_metrics(&d).map_err(|e| e.to_string())?;
            Ok(PastRun {
                name: d
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                curves: Curves::from_records(&records),
                sheets: crate::train::samples::sheets(&d),
                dir: d,
                shown: false,
            })
        })
        .collect())
}

/// The training tab.
pub fn training_ui(app: &mut StudioApp, ui: &mut egui::Ui) {
    app.training.dataset = app.dataset.as_ref().map(|d| d.summary.root.clone());
    egui::Panel::left("training-form")
        .resizable(true)
        .default_size(320.0)
        .show(ui, |ui| {
            egui::ScrollArea::vertical().show(ui, |ui| {
                form_ui(app, ui);
                ui.separator();
                past_runs_ui(app, ui);
            });
        });
    egui::CentralPanel::default().show(ui, |ui| {
        egui::ScrollArea::vertical().show(ui, |ui| {
            samples_ui(&mut app.training, ui);
            plots_ui(&app.training, &mut app.settings.plots, ui);
        });
    });
}

/// The runs that have sample sheets: (name, folder, sheets), the live run first.
fn runs_with_sheets(panel: &TrainingPanel) -> Vec<(String, PathBuf, Sheets)> {
    let mut out = Vec::new();
    if let Some(live) = &panel.live
        && !live.sheets.is_empty()
    {
        out.push((live.name.clone(), live.dir.clone(), live.sheets.clone()));
    }
    for r in &panel.past {
        if !r.sheets.is_empty() && !out.iter().any(|(_, d, _)| d == &r.dir) {
            out.push((r.name.clone(), r.dir.clone(), r.sheets.clone()));
        }
    }
    out
}

/// The sample sheet of a run at a checkpoint: held-out items, the frozen base beside the run's LoRA.
fn samples_ui(panel: &mut TrainingPanel, ui: &mut egui::Ui) {
    let runs = runs_with_sheets(panel);
    egui::CollapsingHeader::new(format!("samples ({} runs with sheets)", runs.len()))
        .id_salt("training-samples")
        .default_open(true)
        .show(ui, |ui| {
            if runs.is_empty() {
                ui.label(
                    "no sample sheets yet: a run writes one at each checkpoint when samples.items > 0 \
                     (the Studio's form sets 3)",
                );
                return;
            }
            let view = &mut panel.sheet;
            let chosen = view
                .run
                .as_ref()
                .and_then(|d| runs.iter().find(|(_, dir, _)| dir == d))
                .unwrap_or(&runs[0]);
            let (name, dir, sheets) = chosen;
            let newest = sheets.len() - 1;
            let mut index = view
                .step
                .and_then(|s| sheets.iter().position(|(x, _)| *x == s))
                .unwrap_or(newest);
            ui.horizontal(|ui| {
                egui::ComboBox::from_id_salt("sheet-run")
                    .selected_text(name.as_str())
                    .show_ui(ui, |ui| {
                        for (n, d, _) in &runs {
                            if ui.selectable_label(d == dir, n).clicked() {
                                view.run = Some(d.clone());
                                view.step = None;
                            }
                        }
                    });
                if newest > 0 {
                    ui.add(
                        egui::Slider::new(&mut index, 0..=newest)
                            .show_value(false)
                            .text("checkpoint"),
                    );
                }
                ui.label(format!("step {}", sheets[index].0));
            });
            view.step = (index != newest).then_some(sheets[index].0);
            let path = sheets[index].1.clone();
            ui.label(
                egui::RichText::new(
                    "each row a held-out item: ideal target · frozen base · this run's LoRA (same seeds) · references",
                )
                .small(),
            );
            if let Some((_, e)) = view.failed.as_ref().filter(|(p, _)| *p == path) {
                ui.colored_label(ui.visuals().error_fg_color, e);
                return;
            }
            match view.request(&path, ui.ctx()) {
                Some(tex) => {
                    let size = tex.size_vec2();
                    // As wide as the panel, but at most 320 px high so the curves stay in view.
                    let scale = (ui.available_width() / size.x).min(320.0 / size.y).clamp(1.0, 4.0);
                    ui.image((tex.id(), size * scale));
                }
                None => {
                    ui.spinner();
                }
            }
        });
}

/// The knobs the form shows first (every other knob is under "more knobs").
const MAIN_KNOBS: &[&str] = &[
    "objective",
    "steps",
    "dpo.beta",
    "optim.adamw.lr",
    "lora.rank",
    "masks.fusion.variant",
    "masks.fusion.tau",
    "masks.fusion.gamma",
];

fn form_ui(app: &mut StudioApp, ui: &mut egui::Ui) {
    ui.heading("New run");
    let running = app.training.is_running();
    let form = &mut app.settings.training;
    ui.add_enabled_ui(!running, |ui| {
        egui::Grid::new("training-form-grid").num_columns(2).show(ui, |ui| {
            ui.label("name");
            ui.text_edit_singleline(&mut form.name);
            ui.end_row();
            ui.label("seed");
            ui.add(egui::DragValue::new(&mut form.config.seed))
                .on_hover_text("seed of every random choice of the run");
            ui.end_row();
            ui.label("checkpoint every");
            ui.add(egui::DragValue::new(&mut form.config.log.checkpoint_every).range(0..=100_000))
                .on_hover_text("steps between checkpoints (log.checkpoint_every; 0 = only at the end)");
            ui.end_row();
            ui.label("sample items");
            ui.add(egui::DragValue::new(&mut form.config.samples.items).range(0..=32))
                .on_hover_text(
                    "held-out items on the sample sheet written at each checkpoint (samples.items; 0 = no sheets)",
                );
            ui.end_row();
        });
        super::knob_ui::knob_grid(ui, "training-main-knobs", &mut form.config, Some(MAIN_KNOBS));
        let more: Vec<&str> = crate::knobs::KNOBS
            .iter()
            .map(|k| k.key)
            .filter(|k| !MAIN_KNOBS.contains(k))
            .collect();
        egui::CollapsingHeader::new(format!("more knobs ({})", more.len()))
            .id_salt("training-more-knobs")
            .show(ui, |ui| {
                egui::ScrollArea::vertical().max_height(420.0).show(ui, |ui| {
                    super::knob_ui::knob_grid(ui, "training-more-knobs-grid", &mut form.config, Some(&more));
                });
            });
        if ui.small_button("reset to defaults").clicked() {
            form.config = TrainingForm::default().config;
        }
    });
    if let Err(e) = form.config.validate() {
        ui.colored_label(ui.visuals().error_fg_color, e.to_string());
    }
    let base = app
        .training
        .base
        .as_ref()
        .map_or("loading…".to_string(), super::backbone_label);
    ui.label(
        egui::RichText::new(format!(
            "backbone: {base} · writes {}/NAME",
            app.training.runs_dir.display()
        ))
        .small(),
    );
    ui.horizontal(|ui| {
        if ui
            .add_enabled(app.training.can_start(), egui::Button::new("Start run"))
            .clicked()
        {
            let form = app.settings.training.clone();
            app.training.start(&form);
        }
        if ui.add_enabled(running, egui::Button::new("Stop")).clicked() {
            app.training.stop();
        }
    });
    if let Some(live) = app.training.live() {
        let text = match &live.status {
            RunStatus::Starting => "loading data and model…".to_string(),
            RunStatus::Running { step, total } => format!("step {step}/{total}"),
            RunStatus::Stopping => "stopping after the current step…".to_string(),
            RunStatus::Finished { step, stopped } => {
                format!("{} at step {step}", if *stopped { "stopped" } else { "finished" })
            }
            RunStatus::Failed { step, error } => format!("failed at step {step}: {error}"),
        };
        ui.horizontal(|ui| {
            ui.label(format!("{}: {text}", live.name));
            if let (RunStatus::Starting, Some(progress)) = (&live.status, &live.loading) {
                super::loading_bar(ui, "the run's base model", progress);
            }
        });
    }
}

fn past_runs_ui(app: &mut StudioApp, ui: &mut egui::Ui) {
    ui.horizontal(|ui| {
        ui.heading("Past runs");
        if ui.button("refresh").clicked() {
            app.training.rescan();
        }
    });
    if app.training.past.is_empty() {
        ui.label(format!(
            "no run with {METRICS_FILE} in {}",
            app.training.runs_dir.display()
        ));
    }
    let mut policy = None;
    for run in &mut app.training.past {
        ui.horizontal(|ui| {
            ui.checkbox(&mut run.shown, &run.name)
                .on_hover_text(format!("overlay on the plots ({} steps)", run.curves.len()));
            if ui
                .small_button("use as policy")
                .on_hover_text("M_s with source = policy uses this run's latest LoRA checkpoint")
                .clicked()
            {
                policy = Some(run.dir.clone());
            }
        });
    }
    if let Some(dir) = policy {
        app.worker.send(Command::LoadPolicy(dir));
    }
}

/// The colour of the `i`-th curve of a plot (the live run first, then the shown past runs).
fn curve_color(i: usize) -> egui::Color32 {
    const PALETTE: [egui::Color32; 6] = [
        egui::Color32::from_rgb(86, 156, 214),
        egui::Color32::from_rgb(230, 145, 56),
        egui::Color32::from_rgb(106, 190, 106),
        egui::Color32::from_rgb(214, 86, 120),
        egui::Color32::from_rgb(170, 130, 220),
        egui::Color32::from_rgb(200, 190, 90),
    ];
    PALETTE[i % PALETTE.len()]
}

fn plots_ui(panel: &TrainingPanel, settings: &mut PlotSettings, ui: &mut egui::Ui) {
    type Pick = fn(&Curves) -> &Vec<[f64; 2]>;
    let metrics: [(&str, Pick); 5] = [
        ("loss", |c| &c.loss),
        ("implicit accuracy", |c| &c.accuracy),
        ("reward margin", |c| &c.margin),
        ("A_focus", |c| &c.a_focus),
        ("grad norm", |c| &c.grad_norm),
    ];
    ui.horizontal(|ui| {
        ui.label("smoothing");
        ui.add(egui::Slider::new(&mut settings.smoothing, 0.0..=0.99).fixed_decimals(2))
            .on_hover_text(
                "debiased exponential moving average, as TensorBoard draws it (0 = raw values); the raw values stay \
                 behind it, faint",
            );
    });
    let height = ((ui.available_height() - 5.0 * 24.0 - 24.0) / 5.0).max(90.0);
    let curves: Vec<(String, &Curves)> = panel
        .live
        .iter()
        .map(|l| (format!("{} (live)", l.name), &l.curves))
        .chain(
            panel
                .past
                .iter()
                .filter(|r| r.shown)
                .map(|r| (r.name.clone(), &r.curves)),
        )
        .collect();
    let smoothing = settings.smoothing;
    egui::ScrollArea::vertical().show(ui, |ui| {
        for (name, pick) in metrics {
            ui.label(name);
            Plot::new(("training-plot", name))
                .height(height)
                .legend(Legend::default())
                .x_axis_label("step")
                .y_axis_label(name)
                .x_axis_formatter(|mark, _| {
                    // Steps are whole numbers: no tick between two.
                    if mark.value.fract().abs() < 1e-9 && mark.value >= 0.0 {
                        format!("{}", mark.value as i64)
                    } else {
                        String::new()
                    }
                })
                .show(ui, |plot| {
                    for (i, (run, c)) in curves.iter().enumerate() {
                        let raw = pick(c);
                        let color = curve_color(i);
                        if smoothing > 0.0 {
                            plot.line(
                                Line::new(run.clone(), PlotPoints::from(raw.clone())).color(color.gamma_multiply(0.3)),
                            );
                            plot.line(
                                Line::new(run.clone(), PlotPoints::from(debiased_ema(raw, smoothing))).color(color),
                            );
                        } else {
                            plot.line(Line::new(run.clone(), PlotPoints::from(raw.clone())).color(color));
                        }
                    }
                });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::masks::MaskVariant;
    use crate::model::BaseSource;

    #[test]
    fn curves_from_metrics_lines_skip_missing_values() {
        let lines = [
            serde_json::json!({"step": 1, "loss": 0.7, "implicit_accuracy": 0.5, "reward_margin": 0.1, "a_focus": 0.2, "grad_norm": 1.5}),
            serde_json::json!({"step": 2, "loss": 0.6, "implicit_accuracy": null, "reward_margin": 0.2, "a_focus": null, "grad_norm": 1.2}),
        ];
        let c = Curves::from_records(&lines);
        assert_eq!(c.loss, vec![[1.0, 0.7], [2.0, 0.6]]);
        assert_eq!(c.accuracy, vec![[1.0, 0.5]]);
        assert_eq!(c.a_focus, vec![[1.0, 0.2]]);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn form_becomes_a_valid_config() {
        let mut form = TrainingForm::default();
        form.config.masks.fusion.variant = MaskVariant::NoMs;
        form.config.masks.fusion.tau = 0.2;
        let backbone = ModelSettings {
            base: BaseSource::Random(3),
            ..ModelSettings::default()
        };
        let cfg = run_config(&form, &backbone, None);
        assert!(cfg.validate().is_ok());
        assert_eq!(cfg.masks.fusion.variant, MaskVariant::NoMs);
        assert_eq!(cfg.masks.fusion.tau, 0.2);
        assert_eq!(cfg.model.base, BaseSource::Random(3));
        assert_eq!(cfg.steps, form.config.steps);
        for key in MAIN_KNOBS {
            assert!(crate::knobs::knob(key).is_some(), "{key} is not a registry knob");
        }
    }
}
