//! Everything the Studio computes, on threads of its own: the UI sends [`Command`]s and [`FuseRequest`]s and
//! drains [`Reply`]s with `try_recv`; it never waits on either.
//!
//! * The **model thread** owns the dataset, the base model (and a run's LoRA for the policy source) and the
//!   prepared item. It opens datasets, loads and prepares items (`M_prior`, `M_d`), computes `M_s(t)` from the
//!   backbone per (item, t, attention source/layers) with a cache, and validates every item in the background for
//!   the item list. A requested timestep jumps the queue; the rest of the timeline is then filled so that the
//!   `A_focus(t)` curve and later scrubbing come from the cache.
//! * The **fusion thread** applies Eq. 9 / 11 / the ablation variants to cached maps. Requests carry shared
//!   handles, and only the newest pending request is computed, so slider drags never queue up.

use eframe::egui;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

use candle_core::Device;

use super::overlay::{MaskValues, RgbaPixels};
use super::state::{TIMESTEPS, t_of_index};
use crate::dip::DipDataset;
use crate::masks::{Branch, FusionParams, Grid, MaskInputs, attention_field, fuse};
use crate::model::schedule::Parameterisation;
use crate::model::{Adapters, BaseModel, BaseSource, Mmdit};
use crate::pipeline::MaskSettings;
use crate::train::config::{AttentionConfig, HiddenSource, ModelSettings, RunConfig};
use crate::train::data::{PreparedItem, prepare_item};
use crate::train::focus::{Probe, masks_at};

/// Seed of the noise `ε` the inspector adds to the winner (the same for every t, so the timeline is smooth).
pub const INSPECTOR_NOISE_SEED: u64 = 0;

/// A request to the model thread.
#[derive(Debug, Clone)]
pub enum Command {
    /// Open a dataset folder (replaces the current one).
    OpenDataset(PathBuf),
    /// Load, validate and prepare an item of the open dataset; then compute `M_s` at `t_index` first.
    SelectItem {
        /// Index into the dataset's items.
        index: usize,
        /// Timeline index to compute first.
        t_index: usize,
    },
    /// `M_s` of the selected item at this timeline index, before the rest of the timeline.
    Probe {
        /// Index into [`TIMESTEPS`].
        t_index: usize,
    },
    /// Change whose states and which layers feed `M_s`.
    SetAttention(AttentionConfig),
    /// Use the latest checkpoint of a run as the policy (`HiddenSource::Policy`).
    LoadPolicy(PathBuf),
    /// Load another backbone (a profile, [`crate::train::backbone`]); the selected item is prepared again on it.
    LoadBackbone(Box<ModelSettings>),
}

/// A backbone being loaded on the model thread.
#[derive(Debug, Clone)]
pub struct BackboneLoading {
    /// Which one (`backbone_label`).
    pub label: String,
    /// Bytes read so far, of how many, and the part being read.
    pub progress: Arc<crate::model::weights::LoadProgress>,
}

/// A summary of one item for the list.
#[derive(Debug, Clone)]
pub struct ItemSummary {
    /// Item id.
    pub id: String,
    /// Number of subjects.
    pub subjects: usize,
    /// Manifest category.
    pub category: String,
}

/// An opened dataset.
#[derive(Debug, Clone)]
pub struct DatasetSummary {
    /// Folder.
    pub root: PathBuf,
    /// Usable items, in file order.
    pub items: Vec<ItemSummary>,
    /// Manifest lines that could not be used.
    pub problems: Vec<String>,
}

/// A token-grid map ready to draw, with its coverage numbers.
#[derive(Debug, Clone)]
pub struct MapView {
    /// The values, shared with the overlay (uploaded once).
    pub values: Arc<MaskValues>,
    /// The grid itself (fusion input).
    pub grid: Arc<Grid>,
    /// Mean value: the covered fraction of tokens for a binary map.
    pub mean: f32,
    /// `‖·‖₁`.
    pub l1: f32,
}

impl MapView {
    /// Wraps a grid.
    pub fn new(grid: Grid) -> Self {
        let l1 = grid.l1_norm() as f32;
        let mean = if grid.is_empty() { 0.0 } else { l1 / grid.len() as f32 };
        Self {
            values: Arc::new(MaskValues::from_grid(&grid)),
            grid: Arc::new(grid),
            mean,
            l1,
        }
    }
}

/// A loaded item: pictures and the image-derived maps.
#[derive(Debug, Clone)]
pub struct ItemView {
    /// Index in the dataset.
    pub index: usize,
    /// Item id.
    pub id: String,
    /// Prompt.
    pub prompt: String,
    /// Reference images, one per subject.
    pub references: Vec<Arc<RgbaPixels>>,
    /// Winner `x_0^w`.
    pub winner: Arc<RgbaPixels>,
    /// Loser `x_0^l`.
    pub loser: Arc<RgbaPixels>,
    /// `M_prior^j` per subject.
    pub subject_priors: Vec<MapView>,
    /// `M_prior` (union).
    pub m_prior: MapView,
    /// `M_d`.
    pub m_d: MapView,
    /// Token grid (rows, cols).
    pub grid: (usize, usize),
}

/// `M_s` of one item at one timestep.
#[derive(Debug, Clone)]
pub struct AttentionAt {
    /// Item index.
    pub item: usize,
    /// Timeline index.
    pub t_index: usize,
    /// Source and layers it was computed with.
    pub choice: AttentionConfig,
    /// `M_s^j` per subject.
    pub per_subject: Vec<MapView>,
    /// `M_s` (union).
    pub union: MapView,
    /// `A_focus = ‖M_s‖₁ / ‖M_prior‖₁`.
    pub a_focus: f32,
    /// Time the model thread spent on it (forward pass + Eq. 3–6).
    pub compute: Duration,
}

/// A fusion request: the maps (shared) and the parameters.
#[derive(Debug, Clone)]
pub struct FuseRequest {
    /// Increasing id; the UI shows the newest result only.
    pub generation: u64,
    /// `M_prior`.
    pub m_prior: Arc<Grid>,
    /// `M_d`.
    pub m_d: Arc<Grid>,
    /// `M_s` when available.
    pub m_s: Option<Arc<Grid>>,
    /// Variant, τ, γ.
    pub params: FusionParams,
}

/// A fused map.
#[derive(Debug, Clone)]
pub struct Fused {
    /// The request's generation.
    pub generation: u64,
    /// `M`, its coverage numbers, or why it could not be built (e.g. a variant that needs `M_s` before it exists).
    pub result: Result<FusedView, String>,
}

/// `M` and what the paper logs about it.
#[derive(Debug, Clone)]
pub struct FusedView {
    /// The map.
    pub map: MapView,
    /// Which case of Eq. 9 / 11 fired.
    pub branch: Branch,
    /// `A_focus` when `M_s` was given.
    pub a_focus: Option<f32>,
    /// Time spent in [`fuse`].
    pub compute: Duration,
}

/// What the threads send back.
#[derive(Debug)]
pub enum Reply {
    /// The base model is loaded.
    BaseReady {
        /// Which backbone (after the bundled-base fallback).
        backbone: Box<ModelSettings>,
        /// Double-stream blocks (the layers Eq. 3 can average).
        double_blocks: usize,
        /// Shown in the window (e.g. the bundled base is missing and a random one is used).
        notice: Option<String>,
    },
    /// A backbone started loading (with its progress, read from the UI while it loads), or finished (`None`,
    /// loaded or not).
    Loading(Option<BackboneLoading>),
    /// A dataset was opened.
    DatasetOpened(DatasetSummary),
    /// Background validation of one item: its problems (empty = valid) and winner thumbnail.
    ItemChecked {
        /// Dataset root (replies for a dataset that was replaced are dropped).
        root: PathBuf,
        /// Item index.
        index: usize,
        /// Every problem found.
        problems: Vec<String>,
        /// The winner, when it decoded.
        thumbnail: Option<egui::ColorImage>,
    },
    /// An item is ready.
    ItemLoaded(Box<ItemView>),
    /// `M_s` at one timestep.
    Attention(Box<AttentionAt>),
    /// A run's LoRA is loaded as the policy.
    PolicyLoaded {
        /// Run folder.
        run: PathBuf,
        /// Checkpoint step.
        step: u64,
    },
    /// A fused map.
    Fused(Box<Fused>),
    /// Something failed; the message names what.
    Error(String),
}

/// Handles to the two threads.
pub struct Worker {
    commands: Sender<Command>,
    fuse: Sender<FuseRequest>,
    replies: Receiver<Reply>,
}

impl Worker {
    /// Starts both threads. The model thread loads `base` first; `repaint` is called after every reply so the UI
    /// wakes up.
    pub fn start(base: ModelSettings, repaint: impl Fn() + Send + Sync + 'static) -> Self {
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (fuse_tx, fuse_rx) = mpsc::channel();
        let (reply_tx, reply_rx) = mpsc::channel();
        let repaint: Arc<dyn Fn() + Send + Sync> = Arc::new(repaint);
        let notify = Notifier {
            tx: reply_tx.clone(),
            repaint: Arc::clone(&repaint),
        };
        let failures = reply_tx.clone();
        let fuse_notify = Notifier { tx: reply_tx, repaint };
        let spawned = std::thread::Builder::new()
            .name("studio-model".into())
            .spawn(move || ModelThread::new(base, notify).run(cmd_rx));
        let fuse_spawned = std::thread::Builder::new()
            .name("studio-fusion".into())
            .spawn(move || fusion_thread(fuse_rx, &fuse_notify));
        for (what, result) in [("model", spawned.err()), ("fusion", fuse_spawned.err())] {
            if let Some(e) = result {
                // Nothing will answer that thread's requests; say so in the window.
                let _ = failures.send(Reply::Error(format!("cannot start the {what} thread: {e}")));
            }
        }
        Self {
            commands: cmd_tx,
            fuse: fuse_tx,
            replies: reply_rx,
        }
    }

    /// Sends a command to the model thread.
    pub fn send(&self, command: Command) {
        let _ = self.commands.send(command);
    }

    /// Sends a fusion request.
    pub fn fuse(&self, request: FuseRequest) {
        let _ = self.fuse.send(request);
    }

    /// The next reply, if any (never blocks).
    pub fn try_recv(&self) -> Option<Reply> {
        self.replies.try_recv().ok()
    }
}

#[derive(Clone)]
struct Notifier {
    tx: Sender<Reply>,
    repaint: Arc<dyn Fn() + Send + Sync>,
}

impl Notifier {
    fn send(&self, reply: Reply) {
        let _ = self.tx.send(reply);
        (self.repaint)();
    }
}

fn fusion_thread(rx: Receiver<FuseRequest>, notify: &Notifier) {
    while let Ok(mut request) = rx.recv() {
        // Only the newest request matters.
        while let Ok(newer) = rx.try_recv() {
            request = newer;
        }
        let started = Instant::now();
        let out = fuse(
            &request.params,
            &MaskInputs {
                m_prior: &request.m_prior,
                m_d: &request.m_d,
                m_s: request.m_s.as_deref(),
            },
        );
        let compute = started.elapsed();
        let result = out.map_err(|e| e.to_string()).map(|o| FusedView {
            map: MapView::new(o.mask),
            branch: o.branch,
            a_focus: o.a_focus,
            compute,
        });
        notify.send(Reply::Fused(Box::new(Fused {
            generation: request.generation,
            result,
        })));
    }
}

struct Loaded {
    dataset: DipDataset,
    /// Items not yet validated for the list.
    unchecked: VecDeque<usize>,
}

struct Current {
    index: usize,
    item: PreparedItem,
    /// Timesteps still to compute for the current attention choice, the requested one first.
    pending: VecDeque<usize>,
}

/// (dataset root, item index, timeline index, attention key): what an `M_s(t)` depends on.
type CacheKey = (PathBuf, usize, usize, AttentionConfig);

struct ModelThread {
    notify: Notifier,
    backbone: ModelSettings,
    base: Option<BaseModel>,
    policy: Option<Mmdit>,
    device: Device,
    dataset: Option<Loaded>,
    current: Option<Current>,
    attention: AttentionConfig,
    cache: HashMap<CacheKey, Arc<AttentionAt>>,
}

impl ModelThread {
    fn new(backbone: ModelSettings, notify: Notifier) -> Self {
        Self {
            notify,
            backbone,
            base: None,
            policy: None,
            device: Device::Cpu,
            dataset: None,
            current: None,
            attention: AttentionConfig::default(),
            cache: HashMap::new(),
        }
    }

    fn run(mut self, rx: Receiver<Command>) {
        self.load_base();
        loop {
            let command = if self.has_background_work() {
                match rx.try_recv() {
                    Ok(c) => Some(c),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => return,
                }
            } else {
                match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            };
            match command {
                Some(c) => self.handle(c),
                None => self.background_step(),
            }
        }
    }

    fn load_base(&mut self) {
        match self.try_load(self.backbone.clone()) {
            Ok(()) => {}
            Err(e) => self.notify.send(Reply::Error(format!("backbone: {e}"))),
        }
    }

    /// Loads `backbone` (the bundled base falls back to `random:0` when its file is missing) and makes it the
    /// current one; on failure the current one stays.
    fn try_load(&mut self, mut backbone: ModelSettings) -> Result<(), String> {
        let mut notice = None;
        if backbone.base == BaseSource::Bundled && !crate::model::base::bundled_base_path().is_file() {
            backbone.base = BaseSource::Random(0);
            notice = Some("bundled base missing: masks M_s use a random base (random:0)".to_string());
        }
        let device = backbone.device().map_err(|e| e.to_string())?;
        let progress = Arc::new(crate::model::weights::LoadProgress::default());
        self.notify.send(Reply::Loading(Some(BackboneLoading {
            label: super::backbone_label(&backbone),
            progress: progress.clone(),
        })));
        let loaded = crate::model::weights::track(&progress, || backbone.load_base(&device));
        self.notify.send(Reply::Loading(None));
        let base = loaded.map_err(|e| e.to_string())?;
        self.notify.send(Reply::BaseReady {
            backbone: Box::new(backbone.clone()),
            double_blocks: base.config().depth,
            notice,
        });
        self.backbone = backbone;
        self.device = device;
        self.base = Some(base);
        Ok(())
    }

    /// Replaces the backbone once the new one loads: everything computed on the old one is dropped and the
    /// selected item is prepared again. When it does not load, the old one stays and the error is shown.
    fn load_backbone(&mut self, backbone: ModelSettings) {
        if let Err(e) = self.try_load(backbone) {
            self.notify.send(Reply::Error(format!("backbone not changed: {e}")));
            return;
        }
        self.policy = None;
        self.cache.clear();
        if let Some(cur) = self.current.take() {
            let first = cur.pending.front().copied().unwrap_or(0);
            self.select_item(cur.index, first);
        }
    }

    fn has_background_work(&self) -> bool {
        self.base.is_some()
            && (self.current.as_ref().is_some_and(|c| !c.pending.is_empty())
                || self.dataset.as_ref().is_some_and(|d| !d.unchecked.is_empty()))
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::OpenDataset(dir) => self.open_dataset(&dir),
            Command::SelectItem { index, t_index } => self.select_item(index, t_index),
            Command::Probe { t_index } => {
                if let Some(cur) = &mut self.current {
                    cur.pending.retain(|&t| t != t_index);
                    cur.pending.push_front(t_index);
                }
            }
            Command::SetAttention(choice) => {
                self.attention = choice;
                if let Some(cur) = &mut self.current {
                    let first = cur.pending.front().copied().unwrap_or(0);
                    cur.pending = timeline_order(first);
                }
            }
            Command::LoadPolicy(dir) => self.load_policy(&dir),
            Command::LoadBackbone(backbone) => self.load_backbone(*backbone),
        }
    }

    fn open_dataset(&mut self, dir: &Path) {
        match DipDataset::open(dir) {
            Ok(dataset) => {
                let summary = DatasetSummary {
                    root: dataset.root().to_path_buf(),
                    items: dataset
                        .entries()
                        .iter()
                        .map(|e| ItemSummary {
                            id: e.record.id.clone(),
                            subjects: e.record.references.len(),
                            category: e.record.category.map_or("", |c| c.as_str()).to_string(),
                        })
                        .collect(),
                    problems: dataset.problems().iter().map(ToString::to_string).collect(),
                };
                let unchecked = (0..dataset.len()).collect();
                self.dataset = Some(Loaded { dataset, unchecked });
                self.current = None;
                self.notify.send(Reply::DatasetOpened(summary));
            }
            Err(e) => self.notify.send(Reply::Error(format!("cannot open dataset: {e}"))),
        }
    }

    fn select_item(&mut self, index: usize, t_index: usize) {
        let (Some(loaded), Some(base)) = (&self.dataset, &self.base) else {
            return;
        };
        let (item, problems) = loaded.dataset.inspect_item(index);
        let Some(item) = item.filter(|_| problems.is_empty()) else {
            let why: Vec<String> = problems.iter().map(ToString::to_string).collect();
            self.notify.send(Reply::Error(format!(
                "item {index} cannot be inspected: {}",
                why.join("; ")
            )));
            return;
        };
        let mut settings = MaskSettings::default();
        settings.prior.stride = base.pixels_per_token();
        let prepared = match prepare_item(base, &item, &settings, self.backbone.reference_px, &self.device) {
            Ok(p) => p,
            Err(e) => {
                self.notify.send(Reply::Error(e.to_string()));
                return;
            }
        };
        let view = ItemView {
            index,
            id: prepared.id.clone(),
            prompt: prepared.prompt.clone(),
            references: item
                .references
                .iter()
                .map(|r| Arc::new(RgbaPixels::from_rgb(r)))
                .collect(),
            winner: Arc::new(RgbaPixels::from_rgb(&item.winner)),
            loser: Arc::new(RgbaPixels::from_rgb(&item.loser)),
            subject_priors: prepared
                .masks
                .subject_priors
                .iter()
                .cloned()
                .map(MapView::new)
                .collect(),
            m_prior: MapView::new(prepared.masks.m_prior.clone()),
            m_d: MapView::new(prepared.masks.m_d.clone()),
            grid: prepared.grid,
        };
        self.notify.send(Reply::ItemLoaded(Box::new(view)));
        self.current = Some(Current {
            index,
            item: prepared,
            pending: timeline_order(t_index),
        });
    }

    fn load_policy(&mut self, dir: &Path) {
        let result = (|| -> Result<(Mmdit, u64), String> {
            let base = self.base.as_ref().ok_or("the base model is not loaded")?;
            let cfg: RunConfig = crate::train::run_store::read_config(dir).map_err(|e| e.to_string())?;
            let same_base = cfg.model.base == self.backbone.base
                || (cfg.model.base == BaseSource::Bundled && self.backbone.base == base.source);
            if !same_base || cfg.model.base_loras != self.backbone.base_loras {
                return Err(format!(
                    "the run was trained on base `{}`, the inspector uses `{}`",
                    cfg.model.base, self.backbone.base
                ));
            }
            let ckpt = crate::train::run_store::latest_checkpoint(dir)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("{}: no checkpoint yet", dir.display()))?;
            let path = ckpt.dir.join(crate::train::session::LORA_FILE);
            let tensors =
                candle_core::safetensors::load(&path, &self.device).map_err(|e| format!("{}: {e}", path.display()))?;
            let lora = crate::model::lora::LoraSet::for_model(cfg.lora, base.config(), &self.device)
                .map_err(|e| e.to_string())?;
            lora.load_tensors(&tensors)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let mut model = base.mmdit.clone();
            model.attach_lora(&lora).map_err(|e| e.to_string())?;
            Ok((model, ckpt.step))
        })();
        match result {
            Ok((model, step)) => {
                self.policy = Some(model);
                self.cache.retain(|k, _| k.3.source != HiddenSource::Policy);
                if let Some(cur) = &mut self.current {
                    let first = cur.pending.front().copied().unwrap_or(0);
                    cur.pending = timeline_order(first);
                }
                self.notify.send(Reply::PolicyLoaded {
                    run: dir.to_path_buf(),
                    step,
                });
            }
            Err(e) => self
                .notify
                .send(Reply::Error(format!("policy from {}: {e}", dir.display()))),
        }
    }

    fn background_step(&mut self) {
        if self.current.as_ref().is_some_and(|c| !c.pending.is_empty()) {
            self.attention_step();
        } else {
            self.check_step();
        }
    }

    fn attention_step(&mut self) {
        let (Some(cur), Some(base), Some(loaded)) = (&mut self.current, &self.base, &self.dataset) else {
            return;
        };
        let Some(t_index) = cur.pending.pop_front() else {
            return;
        };
        let key = (
            loaded.dataset.root().to_path_buf(),
            cur.index,
            t_index,
            self.attention.clone(),
        );
        if let Some(hit) = self.cache.get(&key) {
            self.notify.send(Reply::Attention(Box::new(AttentionAt::clone(hit))));
            return;
        }
        let (model, adapters) = match (self.attention.source, &self.policy) {
            (HiddenSource::Policy, Some(policy)) => (policy, Adapters::On),
            _ => (&base.mmdit, Adapters::Off),
        };
        let started = Instant::now();
        let attention = self.attention.clone();
        let probe = Probe {
            t: t_of_index(t_index),
            parameterisation: Parameterisation::default(),
            noise_seed: INSPECTOR_NOISE_SEED,
            adapters,
        };
        // The fusion here is unused (the fusion thread applies the UI's parameters); `NoMs` keeps it trivial.
        let no_fusion = FusionParams {
            variant: crate::masks::MaskVariant::NoMs,
            ..FusionParams::default()
        };
        let result = masks_at(model, &cur.item, probe, &attention, &no_fusion)
            .map_err(|e| e.to_string())
            .and_then(|m| {
                let union = m.m_s.ok_or("no hidden states were captured")?;
                let priors = &cur.item.masks.subject_priors;
                let per_subject = m
                    .scores
                    .iter()
                    .zip(priors)
                    .map(|(s, p)| attention_field(std::slice::from_ref(s), std::slice::from_ref(p)))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                let a_focus =
                    crate::masks::fusion::focus_coverage(&union, &cur.item.masks.m_prior).map_err(|e| e.to_string())?;
                Ok((union, per_subject, a_focus))
            });
        match result {
            Ok((union, per_subject, a_focus)) => {
                let at = Arc::new(AttentionAt {
                    item: cur.index,
                    t_index,
                    choice: self.attention.clone(),
                    per_subject: per_subject.into_iter().map(MapView::new).collect(),
                    union: MapView::new(union),
                    a_focus,
                    compute: started.elapsed(),
                });
                self.cache.insert(key, Arc::clone(&at));
                self.notify.send(Reply::Attention(Box::new(AttentionAt::clone(&at))));
            }
            Err(e) => {
                cur.pending.clear();
                self.notify.send(Reply::Error(format!(
                    "M_s of `{}` at T={}: {e}",
                    cur.item.id, TIMESTEPS[t_index]
                )));
            }
        }
    }

    fn check_step(&mut self) {
        let Some(loaded) = &mut self.dataset else {
            return;
        };
        let Some(index) = loaded.unchecked.pop_front() else {
            return;
        };
        let (item, problems) = loaded.dataset.inspect_item(index);
        let thumbnail = item.map(|i| {
            let px = RgbaPixels::from_rgb(&i.winner);
            egui::ColorImage::from_rgba_unmultiplied([px.width as usize, px.height as usize], &px.rgba)
        });
        self.notify.send(Reply::ItemChecked {
            root: loaded.dataset.root().to_path_buf(),
            index,
            problems: problems.iter().map(ToString::to_string).collect(),
            thumbnail,
        });
    }
}

/// Every timeline index, `first` first, then outward from it (neighbours are what scrubbing asks for next).
fn timeline_order(first: usize) -> VecDeque<usize> {
    let n = TIMESTEPS.len();
    let first = first.min(n - 1);
    let mut out = VecDeque::with_capacity(n);
    out.push_back(first);
    for d in 1..n {
        if first + d < n {
            out.push_back(first + d);
        }
        if d <= first {
            out.push_back(first - d);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_order_starts_at_the_request_and_covers_everything() {
        let order: Vec<usize> = timeline_order(3).into_iter().collect();
        assert_eq!(&order[..5], &[3, 4, 2, 5, 1]);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..TIMESTEPS.len()).collect::<Vec<_>>());
    }

    /// The UI-independent part of a τ change: request → fused map back on the UI's channel. Fusion itself must be
    /// sub-millisecond on a 16×16 grid; the round trip adds only a thread hand-off.
    #[test]
    fn fusion_round_trip_is_fast() {
        let worker = Worker::start(
            ModelSettings {
                base: BaseSource::Random(0),
                ..ModelSettings::default()
            },
            || {},
        );
        let prior = Arc::new(Grid::from_fn(16, 16, |y, x| {
            f32::from(u8::from((4..10).contains(&y) && x < 8))
        }));
        let m_d = Arc::new(Grid::from_fn(16, 16, |y, x| ((x + y) % 7) as f32 / 6.0));
        let m_s = Arc::new(Grid::from_fn(16, 16, |y, x| f32::from(u8::from(y == 5 && x < 4))));
        let mut round_trips = Vec::new();
        let mut computes = Vec::new();
        for generation in 0..50u64 {
            let sent = Instant::now();
            worker.fuse(FuseRequest {
                generation,
                m_prior: Arc::clone(&prior),
                m_d: Arc::clone(&m_d),
                m_s: Some(Arc::clone(&m_s)),
                params: FusionParams {
                    tau: generation as f32 / 50.0,
                    ..FusionParams::default()
                },
            });
            let fused = loop {
                match worker.replies.recv_timeout(Duration::from_secs(10)) {
                    Ok(Reply::Fused(f)) => break f,
                    Ok(_) => continue,
                    Err(e) => panic!("no fused map: {e}"),
                }
            };
            round_trips.push(sent.elapsed());
            let view = fused.result.unwrap();
            computes.push(view.compute);
            // A_focus = 4 / 48; τ sweeps across it, so both branches of Eq. 9 occur.
            let expected = if 4.0 / 48.0 > generation as f32 / 50.0 {
                Branch::AttentionOnly
            } else {
                Branch::Blend
            };
            assert_eq!(view.branch, expected);
        }
        round_trips.sort_unstable();
        computes.sort_unstable();
        let (rt, compute) = (round_trips[round_trips.len() / 2], computes[computes.len() / 2]);
        eprintln!("fusion: median round trip {rt:?}, median compute {compute:?}");
        assert!(
            compute < Duration::from_millis(1),
            "fusion of 16×16 grids took {compute:?}"
        );
    }

    #[test]
    fn map_view_coverage() {
        let g = Grid::new(2, 2, vec![1.0, 0.0, 1.0, 0.0]).unwrap();
        let v = MapView::new(g);
        assert_eq!(v.l1, 2.0);
        assert_eq!(v.mean, 0.5);
    }
}
