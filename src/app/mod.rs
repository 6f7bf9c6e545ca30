//! FocusDPO Studio, the desktop window (eframe/egui, wgpu).
//!
//! The app layer only draws and sends commands: the mask math, the model and the training run live on worker
//! threads ([`worker`], [`crate::train::session`]) and talk to the UI over channels that the UI drains with
//! `try_recv` at the start of each frame. One file per panel (`*_ui` functions); [`overlay`] draws masks with
//! our WGSL shader.

pub mod controls;
pub mod experiment_worker;
pub mod experiments;
pub mod frame_time;
pub mod inspector;
pub mod knob_ui;
pub mod overlay;
pub mod state;
pub mod timeline;
pub mod training;
pub mod worker;

use eframe::egui;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use crate::model::BaseSource;
use crate::train::backbone::read_profile;
use crate::train::config::{AttentionConfig, ModelSettings};
use state::{MaskKind, PanZoom, Settings, SubjectChoice, Tab};
use worker::{AttentionAt, Command, DatasetSummary, FuseRequest, FusedView, ItemView, Reply, Worker};

/// How the Studio starts.
#[derive(Clone, Debug)]
pub struct StudioOptions {
    /// Dataset to open (None: the last one opened, else the bundled `assets/dip-default`).
    pub dataset: Option<PathBuf>,
    /// The backbone (None: the profile opened last, else the bundled base; the bundled base falls back to
    /// `random:0` with a notice when its file is missing).
    pub backbone: Option<ModelSettings>,
    /// Folder of training runs (`runs/` like the CLI).
    pub runs_dir: PathBuf,
    /// Read and write settings through eframe's storage.
    pub persist: bool,
    /// Print the frame-time statistics to stderr once a second (`FOCUSDPO_FRAME_STATS=1`), for measuring the UI
    /// under load without a screen.
    pub frame_stats_to_stderr: bool,
}

impl Default for StudioOptions {
    fn default() -> Self {
        Self {
            dataset: None,
            backbone: None,
            runs_dir: PathBuf::from("runs"),
            persist: true,
            frame_stats_to_stderr: false,
        }
    }
}

/// What the Studio needs from the machine, said whenever the window cannot open.
const WINDOW_NEEDS: &str = "The Studio needs a display and a wgpu adapter: a GPU driver, or software Vulkan \
     (Debian/Ubuntu: apt-get install mesa-vulkan-drivers libvulkan1). Without a display, run it under Xvfb \
     (apt-get install xvfb; xvfb-run -a focusdpo). Every command of the CLI (focusdpo --help) works without a \
     display.";

/// Why the window cannot open on this machine, found before eframe tries (None: it may try).
fn missing_display() -> Option<String> {
    if !cfg!(all(unix, not(target_os = "macos"))) {
        return None;
    }
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    (!set("DISPLAY") && !set("WAYLAND_DISPLAY"))
        .then(|| "no display (neither DISPLAY nor WAYLAND_DISPLAY is set)".to_string())
}

/// Opens the Studio window and runs it until it is closed. Without a display or a wgpu adapter it returns an error
/// that says what to install, instead of panicking.
pub fn run(options: StudioOptions) -> anyhow::Result<()> {
    if let Some(problem) = missing_display() {
        anyhow::bail!("cannot open the Studio window: {problem}. {WINDOW_NEEDS}");
    }
    // eframe reports a missing adapter as an error; a panic deeper in winit or a driver is caught as a last
    // guard, so that the user gets the same advice.
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| open_window(options)));
    match opened {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(anyhow::anyhow!("cannot open the Studio window: {e}. {WINDOW_NEEDS}")),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "a panic".to_string());
            Err(anyhow::anyhow!(
                "the Studio window failed to start ({why}). {WINDOW_NEEDS}"
            ))
        }
    }
}

fn open_window(options: StudioOptions) -> Result<(), eframe::Error> {
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("FocusDPO Studio")
            .with_inner_size([1400.0, 900.0])
            .with_drag_and_drop(true),
        renderer: eframe::Renderer::Wgpu,
        ..Default::default()
    };
    eframe::run_native(
        "FocusDPO Studio",
        native,
        Box::new(move |cc| Ok(Box::new(StudioApp::new(cc, options)))),
    )
}

/// Severity of a message shown in the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Something to know (e.g. a fallback was taken).
    Info,
    /// Something failed; the app keeps running.
    Error,
}

/// A message shown in the notice bar until dismissed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// Severity.
    pub level: Level,
    /// Text.
    pub text: String,
}

/// Validation state of an item in the list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ItemStatus {
    /// Not checked yet (the model thread checks every item in the background).
    #[default]
    Unchecked,
    /// Every file decoded and every check passed.
    Valid,
    /// The problems found.
    Invalid(Vec<String>),
}

/// The opened dataset as the UI knows it.
pub struct DatasetView {
    /// Items and manifest problems.
    pub summary: DatasetSummary,
    /// Per-item validation.
    pub status: Vec<ItemStatus>,
    /// Per-item winner thumbnails.
    pub thumbnails: Vec<Option<egui::TextureHandle>>,
}

/// Measured latencies of mask updates (from the change in the UI to the new map arriving from the workers).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Latency {
    /// Last τ/γ/variant change.
    pub fusion: Option<Duration>,
    /// Last timestep change (includes the `M_s` forward pass when the timestep was not cached).
    pub timestep: Option<Duration>,
    /// Model-thread time of the last `M_s(t)` computed (forward pass + Eq. 3–6).
    pub attention_compute: Option<Duration>,
}

struct PendingFuse {
    generation: u64,
    sent: Instant,
}

/// The Studio.
pub struct StudioApp {
    settings: Settings,
    options: StudioOptions,
    worker: Worker,
    gpu: bool,
    base: Option<(ModelSettings, usize)>,
    dataset: Option<DatasetView>,
    item: Option<ItemView>,
    attention: BTreeMap<usize, AttentionAt>,
    fused: Option<FusedView>,
    fuse_problem: Option<String>,
    generation: u64,
    pending_fuse: Option<PendingFuse>,
    t_changed: Option<(usize, Instant)>,
    latency: Latency,
    notices: Vec<Notice>,
    tab: Tab,
    pan_zoom: PanZoom,
    playing: Option<Instant>,
    path_input: String,
    dialog: Option<(Pick, Receiver<Option<PathBuf>>)>,
    policy: Option<(PathBuf, u64)>,
    training: training::TrainingPanel,
    experiments: experiments::ExperimentsPanel,
    frame_times: frame_time::FrameTimes,
    frame_stats_printed: Option<Instant>,
    loading: Option<worker::BackboneLoading>,
}

impl StudioApp {
    /// Creates the app: restores settings, registers the overlay pipeline, starts the workers and opens the
    /// dataset.
    pub fn new(cc: &eframe::CreationContext<'_>, options: StudioOptions) -> Self {
        let settings: Settings = match (options.persist, cc.storage) {
            (true, Some(storage)) => eframe::get_value(storage, eframe::APP_KEY).unwrap_or_default(),
            _ => Settings::default(),
        };
        let gpu = match &cc.wgpu_render_state {
            Some(rs) => {
                overlay::register(rs);
                overlay::is_registered(rs)
            }
            None => false,
        };
        let mut notices = Vec::new();
        let backbone = match (&options.backbone, &settings.backbone_path) {
            (Some(b), _) => b.clone(),
            (None, Some(path)) => read_profile(path).unwrap_or_else(|e| {
                notices.push(Notice {
                    level: Level::Error,
                    text: format!("the backbone opened last cannot be read ({e}); using the bundled base"),
                });
                ModelSettings::default()
            }),
            (None, None) => ModelSettings::default(),
        };
        let ctx = cc.egui_ctx.clone();
        let worker = Worker::start(backbone, move || ctx.request_repaint());
        if !gpu {
            notices.push(Notice {
                level: Level::Error,
                text: "no wgpu renderer: the mask overlays cannot be drawn (run with the wgpu backend)".into(),
            });
        }
        let dataset_dir = options
            .dataset
            .clone()
            .or_else(|| settings.dataset_dir.clone())
            .unwrap_or_else(crate::dip::bundled_dataset_dir);
        let training = training::TrainingPanel::new(&options.runs_dir);
        let ctx = cc.egui_ctx.clone();
        let mut experiments = experiments::ExperimentsPanel::new(&options.runs_dir, move || ctx.request_repaint());
        if let Some(plan) = settings.experiments.plan.clone() {
            experiments.load(plan);
        }
        let mut app = Self {
            path_input: dataset_dir.display().to_string(),
            settings,
            options,
            worker,
            gpu,
            base: None,
            dataset: None,
            item: None,
            attention: BTreeMap::new(),
            fused: None,
            fuse_problem: None,
            generation: 0,
            pending_fuse: None,
            t_changed: None,
            latency: Latency::default(),
            notices,
            tab: Tab::Inspector,
            pan_zoom: PanZoom::default(),
            playing: None,
            dialog: None,
            policy: None,
            training,
            experiments,
            frame_times: frame_time::FrameTimes::default(),
            loading: None,
            frame_stats_printed: None,
        };
        app.open_dataset(dataset_dir);
        app
    }

    /// The persisted settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The persisted settings, for changes made outside the widgets (tests, scripted setups).
    pub fn settings_mut(&mut self) -> &mut Settings {
        &mut self.settings
    }

    /// Messages shown in the window.
    pub fn notices(&self) -> &[Notice] {
        &self.notices
    }

    /// The selected item's id, once loaded.
    pub fn item_id(&self) -> Option<&str> {
        self.item.as_ref().map(|i| i.id.as_str())
    }

    /// The fused map on screen.
    pub fn fused(&self) -> Option<&FusedView> {
        self.fused.as_ref()
    }

    /// `M_s` computed so far for the selected item, by timeline index.
    pub fn attention(&self) -> &BTreeMap<usize, AttentionAt> {
        &self.attention
    }

    /// Measured update latencies.
    pub fn latency(&self) -> Latency {
        self.latency
    }

    /// Mean and worst frame time over the last second (as the status bar shows them).
    pub fn frame_stats(&self) -> Option<frame_time::FrameStats> {
        self.frame_times.stats()
    }

    /// Pan and zoom of the interactive overlay views.
    pub fn pan_zoom(&self) -> PanZoom {
        self.pan_zoom
    }

    /// Whether a fusion request is still in flight.
    pub fn fusion_pending(&self) -> bool {
        self.pending_fuse.is_some()
    }

    /// The training panel.
    pub fn training(&self) -> &training::TrainingPanel {
        &self.training
    }

    /// The Training tab's state, to change (tests drive the sheet view with it).
    pub fn training_mut(&mut self) -> &mut training::TrainingPanel {
        &mut self.training
    }

    /// The experiments panel.
    pub fn experiments(&self) -> &experiments::ExperimentsPanel {
        &self.experiments
    }

    /// The experiments panel, for scripted setups (tests).
    pub fn experiments_mut(&mut self) -> &mut experiments::ExperimentsPanel {
        &mut self.experiments
    }

    /// Shows the inspector, training or experiments tab.
    pub fn set_tab(&mut self, tab: Tab) {
        self.tab = tab;
    }

    fn error(&mut self, text: impl Into<String>) {
        self.notices.push(Notice {
            level: Level::Error,
            text: text.into(),
        });
    }

    fn info(&mut self, text: impl Into<String>) {
        self.notices.push(Notice {
            level: Level::Info,
            text: text.into(),
        });
    }

    fn open_dataset(&mut self, dir: PathBuf) {
        self.path_input = dir.display().to_string();
        self.worker.send(Command::OpenDataset(dir));
    }

    fn select_item(&mut self, index: usize) {
        self.attention.clear();
        self.fused = None;
        self.worker.send(Command::SelectItem {
            index,
            t_index: self.settings.t_index,
        });
    }

    fn set_t_index(&mut self, t_index: usize) {
        let t_index = t_index.min(state::TIMESTEPS.len() - 1);
        if t_index == self.settings.t_index {
            return;
        }
        self.settings.t_index = t_index;
        self.t_changed = Some((t_index, Instant::now()));
        if self.attention.contains_key(&t_index) {
            self.request_fuse();
        } else {
            self.worker.send(Command::Probe { t_index });
        }
    }

    fn set_attention_choice(&mut self, choice: AttentionConfig) {
        if choice == self.settings.attention {
            return;
        }
        self.settings.attention = choice.clone();
        self.attention.clear();
        self.worker.send(Command::SetAttention(choice));
        self.request_fuse();
    }

    /// Sends the current maps and parameters to the fusion thread (nothing when the variant needs an `M_s(t)`
    /// that is still being computed).
    fn request_fuse(&mut self) {
        let Some(item) = &self.item else {
            return;
        };
        let m_s = self.attention.get(&self.settings.t_index).map(|a| a.union.grid.clone());
        let params = self.settings.fusion;
        if m_s.is_none() && params.variant.needs_attention_field() {
            self.fuse_problem = Some(format!(
                "computing M_s at T={}…",
                state::TIMESTEPS[self.settings.t_index]
            ));
            return;
        }
        self.fuse_problem = None;
        self.generation += 1;
        self.pending_fuse = Some(PendingFuse {
            generation: self.generation,
            sent: Instant::now(),
        });
        self.worker.fuse(FuseRequest {
            generation: self.generation,
            m_prior: item.m_prior.grid.clone(),
            m_d: item.m_d.grid.clone(),
            m_s,
            params,
        });
    }

    /// Applies everything the workers sent since the last frame (bounded, so a burst cannot stall a frame).
    fn drain_replies(&mut self, ctx: &egui::Context) {
        let budget = Instant::now() + Duration::from_millis(4);
        while Instant::now() < budget {
            let Some(reply) = self.worker.try_recv() else {
                break;
            };
            self.apply(reply, ctx);
        }
        for event in self.training.drain() {
            match event {
                training::Outcome::Error(e) => self.error(e),
                training::Outcome::Info(i) => self.info(i),
            }
        }
        for event in self.experiments.drain(&mut self.settings.experiments) {
            match event {
                training::Outcome::Error(e) => self.error(e),
                training::Outcome::Info(i) => self.info(i),
            }
        }
        if let Some((pick, rx)) = &self.dialog
            && let Ok(choice) = rx.try_recv()
        {
            let pick = *pick;
            self.dialog = None;
            match (pick, choice) {
                (Pick::Dataset, Some(dir)) => self.open_dataset(dir),
                (Pick::BackboneFolder | Pick::BackboneProfile, Some(path)) => self.open_backbone(path),
                (_, None) => {}
            }
        }
    }

    fn apply(&mut self, reply: Reply, ctx: &egui::Context) {
        match reply {
            Reply::BaseReady {
                backbone,
                double_blocks,
                notice,
            } => {
                if let Some(n) = notice {
                    self.info(n);
                }
                self.training.set_base((*backbone).clone());
                self.experiments.set_base((*backbone).clone());
                if self.base.as_ref().is_some_and(|(old, _)| *old != *backbone) {
                    // Maps of the old backbone are stale; the model thread computes them again.
                    self.attention.clear();
                    self.policy = None;
                }
                self.base = Some((*backbone, double_blocks));
                let choice = self.settings.attention.clone();
                if choice != AttentionConfig::default() {
                    self.worker.send(Command::SetAttention(choice));
                }
            }
            Reply::Loading(loading) => self.loading = loading,
            Reply::DatasetOpened(summary) => self.dataset_opened(summary),
            Reply::ItemChecked {
                root,
                index,
                problems,
                thumbnail,
            } => {
                if let Some(ds) = self.dataset.as_mut().filter(|d| d.summary.root == root)
                    && index < ds.status.len()
                {
                    ds.status[index] = if problems.is_empty() {
                        ItemStatus::Valid
                    } else {
                        ItemStatus::Invalid(problems)
                    };
                    ds.thumbnails[index] = thumbnail
                        .map(|img| ctx.load_texture(format!("thumb-{index}"), img, egui::TextureOptions::NEAREST));
                }
            }
            Reply::ItemLoaded(view) => {
                self.settings.item = Some(view.id.clone());
                if let SubjectChoice::Subject(j) = self.settings.subject
                    && j >= view.subject_priors.len()
                {
                    self.settings.subject = SubjectChoice::Union;
                }
                self.item = Some(*view);
                self.attention.clear();
                self.request_fuse();
            }
            Reply::Attention(at) => {
                let current = self.item.as_ref().map(|i| i.index);
                if Some(at.item) == current && at.choice == self.settings.attention {
                    self.latency.attention_compute = Some(at.compute);
                    let t = at.t_index;
                    self.attention.insert(t, *at);
                    if t == self.settings.t_index {
                        self.request_fuse();
                    }
                }
            }
            Reply::PolicyLoaded { run, step } => {
                self.info(format!("policy: LoRA of {} at step {step}", run.display()));
                self.policy = Some((run, step));
                self.attention.clear();
                self.request_fuse();
            }
            Reply::Fused(fused) => self.fused_arrived(*fused),
            Reply::Error(e) => self.error(e),
        }
    }

    fn dataset_opened(&mut self, summary: DatasetSummary) {
        let n = summary.items.len();
        if summary.items.is_empty() {
            self.error(format!("{}: no usable item", summary.root.display()));
        }
        if !summary.problems.is_empty() {
            self.error(format!(
                "{}: {} manifest line(s) cannot be used; first: {}",
                summary.root.display(),
                summary.problems.len(),
                summary.problems[0]
            ));
        }
        let bundled = summary.root == crate::dip::bundled_dataset_dir();
        self.settings.dataset_dir = (!bundled).then(|| summary.root.clone());
        let wanted = self
            .settings
            .item
            .as_ref()
            .and_then(|id| summary.items.iter().position(|i| &i.id == id))
            .or(if n > 0 { Some(0) } else { None });
        self.item = None;
        self.attention.clear();
        self.fused = None;
        self.experiments.set_dataset(Some(summary.root.clone()));
        self.dataset = Some(DatasetView {
            summary,
            status: vec![ItemStatus::Unchecked; n],
            thumbnails: vec![None; n],
        });
        if let Some(i) = wanted {
            self.select_item(i);
        }
    }

    fn fused_arrived(&mut self, fused: worker::Fused) {
        if self.pending_fuse.as_ref().map(|p| p.generation) != Some(fused.generation) {
            return;
        }
        if let Some(p) = self.pending_fuse.take() {
            self.latency.fusion = Some(p.sent.elapsed());
        }
        if let Some((t, at)) = self.t_changed
            && t == self.settings.t_index
        {
            self.latency.timestep = Some(at.elapsed());
            self.t_changed = None;
        }
        match fused.result {
            Ok(view) => {
                self.fused = Some(view);
                self.fuse_problem = None;
            }
            Err(e) => {
                self.fused = None;
                self.fuse_problem = Some(e);
            }
        }
    }

    fn pick(&mut self, pick: Pick) {
        if self.dialog.is_some() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        // The native dialog blocks its thread; it gets one of its own.
        let spawned = std::thread::Builder::new().name("studio-dialog".into()).spawn(move || {
            let _ = tx.send(match pick {
                Pick::Dataset => rfd::FileDialog::new()
                    .set_title("Open a DIP dataset folder")
                    .pick_folder(),
                Pick::BackboneFolder => rfd::FileDialog::new()
                    .set_title("Open a FLUX.1 folder (flux1-dev.safetensors, ae.safetensors, text_encoder/, …)")
                    .pick_folder(),
                Pick::BackboneProfile => rfd::FileDialog::new()
                    .set_title("Open a backbone profile")
                    .add_filter("backbone profile", &["toml"])
                    .pick_file(),
            });
        });
        match spawned {
            Ok(_) => self.dialog = Some((pick, rx)),
            Err(e) => self.error(format!("cannot open the dialog: {e}")),
        }
    }

    /// Opens a backbone profile (a TOML file or a FLUX.1 folder): checked here, loaded on the model thread;
    /// remembered for the next launch once it reads.
    pub fn open_backbone(&mut self, path: PathBuf) {
        let read = read_profile(&path).map_err(|e| e.to_string()).and_then(|backbone| {
            let missing = crate::train::backbone::missing_files(&backbone);
            if missing.is_empty() {
                Ok(backbone)
            } else {
                Err(format!("files missing: {}", missing.join("; ")))
            }
        });
        match read {
            Ok(backbone) => {
                // The current backbone stays until the new one has loaded on the model thread.
                self.settings.backbone_path = Some(path);
                self.worker.send(Command::LoadBackbone(Box::new(backbone)));
            }
            Err(e) => self.error(format!("backbone {}: {e}", path.display())),
        }
    }

    /// The backbone in use, once loaded.
    pub fn backbone(&self) -> Option<&ModelSettings> {
        self.base.as_ref().map(|(b, _)| b)
    }

    fn handle_dropped_files(&mut self, ctx: &egui::Context) {
        let dropped: Vec<PathBuf> = ctx.input(|i| i.raw.dropped_files.iter().map(|f| f.path().to_path_buf()).collect());
        if let Some(path) = dropped.into_iter().next() {
            if experiments::is_plan_file(&path) {
                self.tab = Tab::Experiments;
                self.experiments.load(experiments::PlanSource::File(path));
                return;
            }
            if is_backbone(&path) {
                self.open_backbone(path);
                return;
            }
            // A dropped manifest opens its folder.
            let dir = if path.is_file() {
                path.parent().map(PathBuf::from).unwrap_or(path)
            } else {
                path
            };
            self.open_dataset(dir);
        }
    }

    fn keyboard(&mut self, ctx: &egui::Context) {
        if ctx.egui_wants_keyboard_input() {
            return;
        }
        let (left, right, space) = ctx.input(|i| {
            (
                i.key_pressed(egui::Key::ArrowLeft),
                i.key_pressed(egui::Key::ArrowRight),
                i.key_pressed(egui::Key::Space),
            )
        });
        if left {
            self.set_t_index(self.settings.t_index.saturating_sub(1));
        }
        if right {
            self.set_t_index(self.settings.t_index + 1);
        }
        if space {
            self.toggle_play();
        }
    }

    fn toggle_play(&mut self) {
        self.playing = match self.playing {
            Some(_) => None,
            None => Some(Instant::now()),
        };
    }

    /// Advances the timeline while playing (one step per [`PLAY_STEP`], waiting for `M_s` of the next step).
    fn advance_playback(&mut self, ctx: &egui::Context) {
        let Some(last) = self.playing else {
            return;
        };
        if last.elapsed() >= PLAY_STEP && self.attention.contains_key(&self.settings.t_index) {
            let next = (self.settings.t_index + 1) % state::TIMESTEPS.len();
            self.set_t_index(next);
            self.playing = Some(Instant::now());
        }
        ctx.request_repaint_after(PLAY_STEP);
    }

    fn top_bar_ui(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            ui.heading("FocusDPO Studio");
            ui.separator();
            ui.selectable_value(&mut self.tab, Tab::Inspector, "Inspector");
            ui.selectable_value(&mut self.tab, Tab::Training, "Training");
            ui.selectable_value(&mut self.tab, Tab::Experiments, "Experiments");
            ui.separator();
            if ui.button("Open dataset…").clicked() {
                self.pick(Pick::Dataset);
            }
            let edit = ui.add(
                egui::TextEdit::singleline(&mut self.path_input)
                    .desired_width(280.0)
                    .hint_text("dataset folder"),
            );
            let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            if ui.button("Open").clicked() || enter {
                let dir = PathBuf::from(self.path_input.trim());
                self.open_dataset(dir);
            }
            ui.separator();
            ui.menu_button("Open backbone…", |ui| {
                if ui.button("FLUX.1 folder…").clicked() {
                    self.pick(Pick::BackboneFolder);
                    ui.close();
                }
                if ui.button("Profile (.toml)…").clicked() {
                    self.pick(Pick::BackboneProfile);
                    ui.close();
                }
            });
            match &self.base {
                Some((backbone, _)) => ui.label(format!("backbone: {}", backbone_label(backbone))),
                None if self.loading.is_none() => ui.label("backbone: loading…"),
                None => ui.label("backbone:"),
            };
            if let Some(loading) = &self.loading {
                loading_bar(ui, &loading.label, &loading.progress);
            }
        });
    }

    fn notices_ui(&mut self, ui: &mut egui::Ui) {
        let mut dismiss = None;
        for (i, notice) in self.notices.iter().enumerate().rev().take(4) {
            ui.horizontal(|ui| {
                let (color, tag) = match notice.level {
                    Level::Error => (ui.visuals().error_fg_color, "error"),
                    Level::Info => (ui.visuals().warn_fg_color, "note"),
                };
                if ui.small_button("x").on_hover_text("dismiss").clicked() {
                    dismiss = Some(i);
                }
                ui.colored_label(color, format!("{tag}: {}", notice.text));
            });
        }
        if let Some(i) = dismiss {
            self.notices.remove(i);
        }
    }

    fn status_ui(&self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            let ms = |d: Option<Duration>| d.map_or("–".to_string(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3));
            ui.label(format!("fusion update {}", ms(self.latency.fusion)));
            if let Some(f) = &self.fused {
                ui.label(format!("(fuse {:.0} µs)", f.compute.as_secs_f64() * 1e6));
            }
            ui.separator();
            ui.label(format!("timestep update {}", ms(self.latency.timestep)));
            ui.separator();
            ui.label(format!("M_s forward {}", ms(self.latency.attention_compute)));
            ui.separator();
            ui.label(format!(
                "M_s cached at {}/{} timesteps",
                self.attention.len(),
                state::TIMESTEPS.len()
            ));
            if let Some((run, step)) = &self.policy {
                ui.separator();
                ui.label(format!("policy: {} @ step {step}", run.display()));
            }
            if let Some(stats) = self.frame_times.stats() {
                ui.separator();
                ui.label(stats.to_string())
                    .on_hover_text("CPU time per frame (update, tessellation, painting) over the last second");
            }
        });
    }

    /// Records the frame time: eframe's CPU time of the previous frame when it reports one (a real window),
    /// else this frame's update time (`update_started` = when `ui` began).
    fn record_frame(&mut self, cpu_of_previous: Option<f32>, update_started: Instant) {
        let now = Instant::now();
        let took = cpu_of_previous.map_or_else(|| now.duration_since(update_started), Duration::from_secs_f32);
        self.frame_times.push(now, took);
        if self.options.frame_stats_to_stderr
            && self
                .frame_stats_printed
                .is_none_or(|at| now.duration_since(at) >= frame_time::FRAME_WINDOW)
            && let Some(stats) = self.frame_times.stats()
        {
            eprintln!("{stats}");
            self.frame_stats_printed = Some(now);
        }
    }
}

/// The progress bar of a backbone being loaded: bytes read of the total, and the part being read. Repaints
/// while shown (the model thread only moves the counters).
fn loading_bar(ui: &mut egui::Ui, label: &str, progress: &crate::model::weights::LoadProgress) {
    use crate::model::memory::gb;
    let snap = progress.snapshot();
    let (fraction, numbers) = if snap.total > 0 {
        let f = (snap.read as f64 / snap.total as f64).min(1.0);
        (
            f as f32,
            format!("{:.0} % · {:.2} / {:.2} GB", f * 100.0, gb(snap.read), gb(snap.total)),
        )
    } else {
        (0.0, format!("{:.2} GB", gb(snap.read)))
    };
    let part = if snap.part.is_empty() {
        String::new()
    } else {
        format!(" ({})", snap.part)
    };
    ui.add(
        egui::ProgressBar::new(fraction)
            .desired_width(260.0)
            .text(format!("{numbers}{part}")),
    )
    .on_hover_text(format!("loading {label}"));
    ui.ctx().request_repaint_after(Duration::from_millis(100));
}

/// What a file dialog is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pick {
    Dataset,
    BackboneFolder,
    BackboneProfile,
}

/// Whether a dropped path is a backbone: a `.toml` profile, or a folder with a FLUX.1 transformer.
fn is_backbone(path: &std::path::Path) -> bool {
    if path.is_file() {
        return path.extension().is_some_and(|e| e == "toml");
    }
    ["flux1-dev.safetensors", "flux1-schnell.safetensors", "ae.safetensors"]
        .iter()
        .any(|f| path.join(f).is_file())
}

/// A short name of a backbone for the top bar: the transformer's file name and the base LoRAs.
pub fn backbone_label(backbone: &ModelSettings) -> String {
    let name = |p: &std::path::Path| {
        p.file_name()
            .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into())
    };
    let mut label = match &backbone.base {
        BaseSource::File(p) => name(p),
        other => other.to_string(),
    };
    for lora in &backbone.base_loras {
        label.push_str(&format!(" + {}", name(&lora.path)));
    }
    label
}

/// Time per timeline step while playing.
pub const PLAY_STEP: Duration = Duration::from_millis(250);

impl eframe::App for StudioApp {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        let update_started = Instant::now();
        let cpu_of_previous = frame.info().cpu_usage;
        if let Some(cpu) = cpu_of_previous {
            self.record_frame(Some(cpu), update_started);
        }
        let ctx = ui.ctx().clone();
        self.drain_replies(&ctx);
        self.handle_dropped_files(&ctx);
        self.keyboard(&ctx);
        self.advance_playback(&ctx);
        if self.training.is_running() || self.experiments.is_running() {
            // Live curves: the session's events arrive between frames.
            ctx.request_repaint_after(Duration::from_millis(100));
        }

        egui::Panel::top("studio-top").show(ui, |ui| self.top_bar_ui(ui));
        egui::Panel::bottom("studio-status").show(ui, |ui| {
            self.notices_ui(ui);
            self.status_ui(ui);
        });
        match self.tab {
            Tab::Inspector => {
                egui::Panel::left("studio-items")
                    .resizable(true)
                    .default_size(230.0)
                    .show(ui, |ui| inspector::item_list_ui(self, ui));
                egui::Panel::right("studio-controls")
                    .resizable(true)
                    .default_size(300.0)
                    .show(ui, |ui| controls::controls_ui(self, ui));
                egui::CentralPanel::default().show(ui, |ui| {
                    egui::ScrollArea::vertical().show(ui, |ui| {
                        inspector::item_ui(self, ui);
                        ui.separator();
                        timeline::timeline_ui(self, ui);
                    });
                });
            }
            Tab::Training => {
                egui::CentralPanel::default().show(ui, |ui| training::training_ui(self, ui));
            }
            Tab::Experiments => {
                egui::CentralPanel::default().show(ui, |ui| experiments::experiments_ui(self, ui));
            }
        }
        if cpu_of_previous.is_none() {
            self.record_frame(None, update_started);
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        if self.options.persist {
            eframe::set_value(storage, eframe::APP_KEY, &self.settings);
        }
    }
}

/// The map the inspector draws for the current choice of kind and subject, with its label.
fn chosen_map(app: &StudioApp) -> Option<(&worker::MapView, String)> {
    let item = app.item.as_ref()?;
    let subject = app.settings.subject;
    let at = app.attention.get(&app.settings.t_index);
    match (app.settings.mask, subject) {
        (MaskKind::Prior, SubjectChoice::Union) => Some((&item.m_prior, "M_prior (union)".into())),
        (MaskKind::Prior, SubjectChoice::Subject(j)) => {
            item.subject_priors.get(j).map(|m| (m, format!("M_prior^{}", j + 1)))
        }
        (MaskKind::Complexity, _) => Some((&item.m_d, "M_d".into())),
        (MaskKind::Attention, SubjectChoice::Union) => at.map(|a| (&a.union, "M_s(t) (union)".into())),
        (MaskKind::Attention, SubjectChoice::Subject(j)) => at
            .and_then(|a| a.per_subject.get(j))
            .map(|m| (m, format!("M_s^{}(t)", j + 1))),
        (MaskKind::Fused, _) => app
            .fused
            .as_ref()
            .map(|f| (&f.map, format!("M(t), {}", app.settings.fusion.variant))),
    }
}

/// The `M_prior` whose contour is drawn: the chosen subject's, or the union.
fn contour_prior(app: &StudioApp) -> Option<&worker::MapView> {
    let item = app.item.as_ref()?;
    match app.settings.subject {
        SubjectChoice::Union => Some(&item.m_prior),
        SubjectChoice::Subject(j) => item.subject_priors.get(j),
    }
}
