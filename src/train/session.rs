//! A training run: [`Trainer`] does one optimiser step at a time (Alg. 1), [`Session`] runs a trainer on a
//! worker thread and reports [`Event`]s over a channel, so the CLI's progress bar and the Studio's plots read the
//! same stream and neither thread that draws ever computes.
//!
//! One step (batch = one DIP pair):
//! 1. pick the item (a seeded permutation per epoch), draw `t` and one noise `ε` shared by winner and loser;
//! 2. noise both (`x_t = (1−t)x_0 + tε`, target `v = ε − x_0` for rectified flow);
//! 3. policy pass (base + LoRA) on `[x_t^w; x_t^l]` as one batch of 2; reference pass (same base, adapters off,
//!    no graph) on the same batch, capturing the double-block hidden states;
//! 4. `M` from those states (`M_s`, Eq. 3–6) and the item's `M_prior`, `M_d` (Eq. 9), the loss (Eq. 1 / 10 /
//!    SFT), backward, grad-norm clip, AdamW with warm-up.
//!
//! Before the first step the training set is built once ([`load_training_data`]): losers replaced as
//! `data.negatives` says, every pair scored (ψ of winner and loser, `data.pairs.quality`), the bottom filter and
//! the selection applied, and the scores written to `pairs.json`; only kept pairs are trained on. With
//! `schedule.kind = "sequential"` the first `schedule.sft_steps` steps use the SFT objective (logged as
//! `phase = "sft"`), the rest the configured one; the optimiser state carries over the switch.
//!
//! Every random choice derives from `seed` and the step index ([`crate::rng::stream_rng`]), and the optimiser
//! state is checkpointed, so a resumed run continues exactly like an uninterrupted one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::model::checkpoint::{CheckpointGrads, add_grads};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::dip::{DipDataset, LoadedItem, bundled_dataset_dir};
use crate::masks::{Grid, MaskVariant};
use crate::model::lora::{LoraFormat, LoraSet};
use crate::model::schedule::{add_noise, model_time, schedule_time};
use crate::model::{Adapters, BaseModel, ForwardOptions, ForwardOutput, Mmdit};
use crate::rng::{normal_vec, permutation, stream_rng};

use super::config::{ConfigError, HiddenSource, RunConfig};
use super::data::{PrepareError, PreparedItem, prepare_item};
use super::focus::{FocusError, StepMasks, step_masks};
use super::negatives::{
    BaseNegativesOutcome, LoserSource, NegativesError, augment_losers, base_losers, base_negative_seed, shuffle_losers,
};
use super::objective::{ObjectiveKind, PairPredictions, StepStats, eq1_diffusion_dpo, eq10_focus_dpo, sft};
use super::optim::{AdamW, clip_scale, grad_norm, lr_at};
use super::pairs::{PairInput, PairsError, PairsReport, PairsSummary, psi, reference_descriptors, score_and_select};
use super::run_store::{Checkpoint, RunStore, RunStoreError, restore_newest_intact};

/// File names inside a checkpoint folder.
pub const LORA_FILE: &str = "lora.safetensors";
/// Optimiser state file.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// PEFT adapter config.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// Pair scores and the selection of a run (in the run folder).
pub const PAIRS_FILE: &str = "pairs.json";

const STREAM_ORDER: u64 = 1;
const STREAM_STEP: u64 = 2;

/// Everything that can end a run early.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The dataset cannot be used.
    #[error("dataset: {0}")]
    Data(String),
    /// An item cannot be prepared.
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    /// The base cannot be loaded.
    #[error(transparent)]
    Base(#[from] crate::model::BaseError),
    /// LoRA build or checkpoint mismatch.
    #[error(transparent)]
    Lora(#[from] crate::model::lora::LoraError),
    /// Mask computation.
    #[error(transparent)]
    Focus(#[from] FocusError),
    /// Pair scoring or selection (`data.pairs`).
    #[error("pair selection: {0}")]
    Pairs(#[from] PairsError),
    /// Building losers (`data.negatives`).
    #[error(transparent)]
    Negatives(#[from] NegativesError),
    /// Run directory.
    #[error(transparent)]
    Store(#[from] RunStoreError),
    /// A checkpoint that cannot be restored.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The loss or gradient became NaN/Inf: the step was not applied.
    #[error(
        "step {step}: {what} is not finite ({value}); the run stopped without applying the step, the last checkpoint \
         is intact"
    )]
    NonFinite {
        /// Step index (1-based).
        step: u64,
        /// `loss` or `gradient norm`.
        what: &'static str,
        /// The value.
        value: f64,
    },
    /// A run file (other than a checkpoint) cannot be written.
    #[error("{}: {message}", path.display())]
    RunFile {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A step would not fit in memory.
    #[error(transparent)]
    Memory(#[from] crate::model::memory::DoesNotFit),
    /// Tensor error.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// What is logged for one step (one line of `metrics.jsonl`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StepRecord {
    /// Step index, from 1.
    pub step: u64,
    /// Item id; with `train.grad_accum` > 1 the ids of the step's pairs joined by `+`.
    pub item: String,
    /// The objective of this step (`sft` during the SFT phase of a sequential schedule, else the run's).
    pub phase: String,
    /// Sampled `t` (fraction of the schedule).
    pub t: f32,
    /// Loss, implicit accuracy (NaN for SFT), reward margin, the four errors, kept pairs (flattened into the
    /// JSON line).
    #[serde(flatten)]
    pub stats: StepStats,
    /// `A_focus` of this step's `M_s` (None without hidden states, e.g. SFT).
    pub a_focus: Option<f32>,
    /// Eq. 9 branch that fired (`attention-only`, `blend`, `static`).
    pub branch: Option<String>,
    /// Mean of the weight map `M` used in the loss (1 for DPO/SFT).
    pub m_mean: f32,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate of this step.
    pub lr: f64,
    /// Wall time of the step.
    pub seconds: f64,
}

/// The gradients of `vars` taken out of `grads`, in order (zeros where a variable got none).
fn take_var_grads(
    grads: &mut candle_core::backprop::GradStore,
    vars: &[candle_core::Var],
) -> candle_core::Result<Vec<Tensor>> {
    vars.iter()
        .map(|v| match grads.remove(v.as_tensor()) {
            Some(g) => Ok(g),
            None => v.as_tensor().zeros_like(),
        })
        .collect()
}

/// One pair's part of a step ([`Trainer::step`] averages over `train.grad_accum` of them).
struct Pass {
    item: String,
    t: f32,
    stats: StepStats,
    masks: Option<StepMasks>,
    m_mean: f32,
    dump: Option<Vec<(String, Tensor)>>,
}

/// The maps of a step, for live display.
#[derive(Clone, Debug)]
pub struct MaskSnapshot {
    /// Step index.
    pub step: u64,
    /// Item id.
    pub item: String,
    /// `t`.
    pub t: f32,
    /// `M_prior`.
    pub m_prior: Grid,
    /// `M_d`.
    pub m_d: Grid,
    /// `M_s`, if computed.
    pub m_s: Option<Grid>,
    /// The fused `M`.
    pub m: Grid,
    /// `A_focus`.
    pub a_focus: Option<f32>,
}

/// The result of [`Trainer::step`].
#[derive(Debug)]
pub struct StepOutcome {
    /// The logged record.
    pub record: StepRecord,
    /// The maps (for snapshots).
    pub masks: Option<StepMasks>,
    /// The step's tensors when requested (`--dump-step`).
    pub dump: Option<Vec<(String, Tensor)>>,
}

/// A trainer: base with LoRA attached, optimiser, prepared data.
pub struct Trainer {
    cfg: RunConfig,
    /// The base with the run's LoRA attached to its MMDiT (the codec and text encoder are the sampler's).
    base: BaseModel,
    patch: usize,
    lora: LoraSet,
    opt: AdamW,
    items: Vec<PreparedItem>,
    order: (u64, Vec<usize>),
    step: u64,
    device: Device,
}

/// The training set of a run: the kept pairs, prepared, and how they were chosen.
#[derive(Debug)]
pub struct TrainingData {
    /// The kept pairs, prepared for the base, in dataset order.
    pub items: Vec<PreparedItem>,
    /// Every candidate pair's ψ_w, ψ_l, quality and kept flag (`pairs.json`).
    pub pairs: PairsReport,
    /// With `data.negatives = "base"`: how many losers were sampled and how many came from the cache.
    pub base_negatives: Option<BaseNegativesOutcome>,
}

/// The items a config names (all valid items when `data.items` is empty), decoded, with their manifest positions.
fn load_candidates(cfg: &RunConfig) -> Result<Vec<(usize, LoadedItem)>, TrainError> {
    let dir = cfg.data.dir.clone().unwrap_or_else(bundled_dataset_dir);
    let ds = DipDataset::open(&dir).map_err(|e| TrainError::Data(e.to_string()))?;
    let indices: Vec<usize> = if cfg.data.items.is_empty() {
        (0..ds.len()).collect()
    } else {
        cfg.data
            .items
            .iter()
            .map(|id| {
                ds.entries()
                    .iter()
                    .position(|e| &e.record.id == id)
                    .ok_or_else(|| TrainError::Data(format!("{}: no item `{id}` (data.items)", dir.display())))
            })
            .collect::<Result<_, _>>()?
    };
    let mut items = Vec::with_capacity(indices.len());
    let mut skipped = Vec::new();
    for i in indices {
        match ds.load_item(i) {
            Ok(item) => items.push((i, item)),
            Err(err) if cfg.data.items.is_empty() => skipped.push(err.to_string()),
            Err(err) => return Err(TrainError::Data(err.to_string())),
        }
    }
    if items.is_empty() {
        let why = skipped
            .first()
            .map_or_else(String::new, |s| format!(" (first problem: {s})"));
        return Err(TrainError::Data(format!("{}: no usable item{why}", dir.display())));
    }
    Ok(items)
}

/// Builds a run's training set: loads the items the config names, replaces the losers as `data.negatives` says
/// (base negatives cached under `run_dir` when given), scores every pair (ψ of winner and loser, quality
/// formula), applies the bottom filter and the selection of `data.pairs`, and prepares the kept pairs for `base`.
pub fn load_training_data(
    cfg: &RunConfig,
    base: &BaseModel,
    device: &Device,
    run_dir: Option<&Path>,
) -> Result<TrainingData, TrainError> {
    cfg.validate()?;
    let candidates = load_candidates(cfg)?;
    let (indices, mut loaded): (Vec<usize>, Vec<LoadedItem>) = candidates.into_iter().unzip();
    let mut base_negatives = None;
    let losers: Vec<String> = match cfg.data.negatives {
        LoserSource::Dataset => vec!["dataset".to_string(); loaded.len()],
        LoserSource::Shuffled => {
            let ids: Vec<String> = loaded.iter().map(|i| i.record.id.clone()).collect();
            let from = shuffle_losers(&mut loaded, cfg.seed)?;
            from.iter().map(|&j| format!("winner of {}", ids[j])).collect()
        }
        LoserSource::Base => {
            base_negatives = Some(base_losers(
                &mut loaded,
                &indices,
                base,
                &cfg.data.base_negatives,
                cfg.noise.parameterisation,
                cfg.model.reference_px,
                cfg.seed,
                run_dir,
            )?);
            indices
                .iter()
                .map(|&i| format!("base sample, seed {}", base_negative_seed(cfg.seed, i)))
                .collect()
        }
        LoserSource::Augmented => augment_losers(&mut loaded, &indices, &cfg.data.augment, cfg.seed),
    };
    let inputs = loaded
        .iter()
        .zip(losers)
        .map(|(item, loser)| {
            let id = &item.record.id;
            let refs = reference_descriptors(id, &item.references)?;
            Ok(PairInput {
                id: id.clone(),
                psi_w: psi(id, &item.winner, &item.masks, &refs)?,
                psi_l: psi(id, &item.loser, &item.masks, &refs)?,
                loser,
            })
        })
        .collect::<Result<Vec<_>, PairsError>>()?;
    let pairs = score_and_select(inputs, &cfg.data.pairs)?;
    let mut settings = cfg.masks.settings;
    settings.prior.stride = base.pixels_per_token();
    let items = loaded
        .iter()
        .zip(&pairs.pairs)
        .filter(|(_, p)| p.kept)
        .map(|(item, _)| prepare_item(base, item, &settings, cfg.model.reference_px, device))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TrainingData {
        items,
        pairs,
        base_negatives,
    })
}

/// Loads the dataset items a config names and prepares the kept pairs for `base` ([`load_training_data`] without
/// a run folder: base negatives are sampled, not cached).
pub fn load_items(cfg: &RunConfig, base: &BaseModel, device: &Device) -> Result<Vec<PreparedItem>, TrainError> {
    Ok(load_training_data(cfg, base, device, None)?.items)
}

fn non_finite(step: u64, what: &'static str, value: f64) -> TrainError {
    TrainError::NonFinite { step, what, value }
}

impl Trainer {
    /// A fresh trainer (step 0) on `base` with the config's LoRA and optimiser.
    pub fn new(cfg: RunConfig, base: BaseModel, items: Vec<PreparedItem>) -> Result<Self, TrainError> {
        cfg.validate()?;
        if items.is_empty() {
            return Err(TrainError::Data("no items to train on".into()));
        }
        base.check_parameterisation(cfg.noise.parameterisation)
            .map_err(|message| ConfigError::Invalid {
                field: "noise.parameterisation",
                message,
            })?;
        let device = base.mmdit.device().clone();
        let pixels_per_token = base.pixels_per_token();
        let mut lora_cfg = cfg.lora;
        lora_cfg.seed = lora_cfg.seed.wrapping_add(cfg.seed);
        // The memory plan of a step on the largest item, before anything is allocated for training: a pair's
        // policy forward (two sequences with a graph; one for SFT or a split pair) and its reference forward.
        let with_grad = if cfg.objective == ObjectiveKind::Sft || cfg.train.split_pair {
            1
        } else {
            2
        };
        if let Some(largest) = items.iter().max_by_key(|i| i.workload(0, 0, false).tokens()) {
            let what = format!("a {} step", cfg.objective.name());
            base.mmdit.check_memory(
                &what,
                lora_cfg.parameter_count(base.config()),
                largest.workload(with_grad, 2, cfg.train.checkpoint_blocks),
            )?;
        }
        let lora = LoraSet::for_model(lora_cfg, base.config(), &device)?;
        let mut base = base;
        base.mmdit.attach_lora(&lora)?;
        let opt = AdamW::new(lora.named_vars(), cfg.optim.adamw)?;
        Ok(Self {
            cfg,
            base,
            patch: pixels_per_token,
            lora,
            opt,
            items,
            order: (u64::MAX, Vec::new()),
            step: 0,
            device,
        })
    }

    /// Steps completed.
    pub fn completed_steps(&self) -> u64 {
        self.step
    }

    /// The run config.
    pub fn config(&self) -> &RunConfig {
        &self.cfg
    }

    /// The adapters being trained.
    pub fn lora(&self) -> &LoraSet {
        &self.lora
    }

    /// The model (base + attached adapters).
    pub fn model(&self) -> &Mmdit {
        &self.base.mmdit
    }

    /// The base with the run's LoRA attached (adapters on: the policy; off: the frozen base), for sampling.
    pub fn base(&self) -> &BaseModel {
        &self.base
    }

    /// Pixels per token.
    pub fn patch(&self) -> usize {
        self.patch
    }

    /// The prepared items.
    pub fn items(&self) -> &[PreparedItem] {
        &self.items
    }

    /// Index of the item used at step `step` (1-based): a fresh seeded permutation every epoch.
    fn item_index(&mut self, step: u64) -> usize {
        let n = self.items.len() as u64;
        let epoch = (step - 1) / n;
        if self.order.0 != epoch {
            let mut rng = stream_rng(self.cfg.seed, STREAM_ORDER, epoch);
            self.order = (epoch, permutation(&mut rng, self.items.len()));
        }
        self.order.1[((step - 1) % n) as usize]
    }

    /// Checkpoint files for the current state.
    pub fn checkpoint_files(&self) -> Result<Vec<(&'static str, Vec<u8>)>, TrainError> {
        let lora = self.lora.to_safetensors_bytes(LoraFormat::Kohya)?;
        let opt = safetensors::serialize(self.opt.state_tensors()?, None).map_err(|e| TrainError::Checkpoint {
            path: PathBuf::from(OPTIMIZER_FILE),
            message: e.to_string(),
        })?;
        let adapter_cfg =
            serde_json::to_vec_pretty(&self.lora.peft_adapter_config()).map_err(|e| TrainError::Checkpoint {
                path: PathBuf::from(ADAPTER_CONFIG_FILE),
                message: e.to_string(),
            })?;
        Ok(vec![
            (LORA_FILE, lora),
            (OPTIMIZER_FILE, opt),
            (ADAPTER_CONFIG_FILE, adapter_cfg),
        ])
    }

    /// Restores adapters and optimiser from a checkpoint folder and continues after its step.
    pub fn restore(&mut self, ckpt: &Checkpoint) -> Result<(), TrainError> {
        let load = |name: &str| -> Result<HashMap<String, Tensor>, TrainError> {
            let path = ckpt.dir.join(name);
            candle_core::safetensors::load(&path, &self.device).map_err(|e| TrainError::Checkpoint {
                path: path.clone(),
                message: e.to_string(),
            })
        };
        let lora = load(LORA_FILE)?;
        let opt = load(OPTIMIZER_FILE)?;
        self.lora.load_tensors(&lora).map_err(|e| TrainError::Checkpoint {
            path: ckpt.dir.join(LORA_FILE),
            message: e.to_string(),
        })?;
        self.opt.load_state(&opt).map_err(|e| TrainError::Checkpoint {
            path: ckpt.dir.join(OPTIMIZER_FILE),
            message: e.to_string(),
        })?;
        self.step = ckpt.step;
        Ok(())
    }

    fn forward(
        &self,
        item: &PreparedItem,
        x_t: &Tensor,
        timesteps: &Tensor,
        adapters: Adapters,
        capture_hidden: bool,
        checkpoint: Option<&Arc<CheckpointGrads>>,
    ) -> candle_core::Result<ForwardOutput> {
        item.forward(
            &self.base.mmdit,
            x_t,
            timesteps,
            ForwardOptions {
                capture_hidden,
                adapters,
                checkpoint: checkpoint.cloned(),
            },
        )
    }

    /// One optimiser step: the LoRA gradients of `train.grad_accum` pairs, averaged, clipped and applied. With
    /// `dump`, the outcome carries the tensors of the step's last pair.
    pub fn step(&mut self, dump: bool) -> Result<StepOutcome, TrainError> {
        self.step_in(dump, &super::parallel::Solo)
    }

    /// [`Trainer::step`] as rank `world.rank()` of a data-parallel world ([`super::parallel`]): this rank's share
    /// of the step's pairs, gradients averaged over the world before clipping and AdamW, so every rank applies
    /// the same update. The record's statistics are the world's means; its `item` lists this rank's pairs.
    pub fn step_in(&mut self, dump: bool, world: &dyn super::parallel::Collective) -> Result<StepOutcome, TrainError> {
        let started = Instant::now();
        let step = self.step + 1;
        let objective = self.cfg.objective_at(step);
        let accum = u64::from(self.cfg.train.grad_accum.max(1));
        let (rank, ranks) = (world.rank() as u64, world.world_size().max(1) as u64);
        let vars = self.lora.vars();
        // Pairs are numbered across steps, so that the item order and the noise of pair `n` are the same whatever
        // the accumulation (with one pair a step, pair `n` is step `n`).
        let pair_index = |k: u64| (step - 1) * accum * ranks + rank * accum + k + 1;
        let (mut grads, first) = self.pass(step, pair_index(0), objective, dump && accum == 1)?;
        let mut passes = vec![first];
        for k in 1..accum {
            let (mut more, pass) = self.pass(step, pair_index(k), objective, dump && k + 1 == accum)?;
            add_grads(&mut grads, &mut more, &vars)?;
            passes.push(pass);
        }
        if accum > 1 {
            for var in &vars {
                if let Some(g) = grads.remove(var.as_tensor()) {
                    grads.insert(var.as_tensor(), g.affine(1.0 / accum as f64, 0.0)?);
                }
            }
        }
        let stats: Vec<StepStats> = passes.iter().map(|p| p.stats).collect();
        let mut stats = StepStats::mean(&stats);
        let mut m_mean = passes.iter().map(|p| p.m_mean).sum::<f32>() / passes.len().max(1) as f32;
        if world.reduces() {
            let mut all = take_var_grads(&mut grads, &vars)?;
            let logged = [
                stats.loss,
                stats.implicit_accuracy,
                stats.reward_margin,
                stats.err_policy_w,
                stats.err_ref_w,
                stats.err_policy_l,
                stats.err_ref_l,
                stats.kept_pairs as f32,
                m_mean,
            ];
            all.push(Tensor::new(&logged, &self.device)?);
            world
                .all_reduce_mean(&mut all)
                .map_err(|e| TrainError::Data(e.to_string()))?;
            let means = all.pop().map(|t| t.to_vec1::<f32>()).transpose()?.unwrap_or_default();
            if let [loss, acc, margin, pw, rw, pl, rl, kept, m] = means[..] {
                stats = StepStats {
                    loss,
                    implicit_accuracy: acc,
                    reward_margin: margin,
                    err_policy_w: pw,
                    err_ref_w: rw,
                    err_policy_l: pl,
                    err_ref_l: rl,
                    kept_pairs: (kept * ranks as f32).round() as usize,
                };
                m_mean = m;
            }
            for (var, g) in vars.iter().zip(all) {
                grads.insert(var.as_tensor(), g);
            }
        }
        let grad_norm = grad_norm(&grads, &vars)?;
        if !grad_norm.is_finite() {
            return Err(non_finite(step, "gradient norm", grad_norm));
        }
        let lr = lr_at(step, self.cfg.steps, &self.cfg.optim);
        self.opt.set_lr(lr);
        self.opt
            .step_scaled(&grads, clip_scale(grad_norm, self.cfg.optim.grad_clip))?;
        crate::model::memory::trace(&self.device, &format!("step {step}, after the optimiser step"));
        self.step = step;

        let items: Vec<&str> = passes.iter().map(|p| p.item.as_str()).collect();
        let item = items.join("+");
        let Some(last) = passes.pop() else {
            return Err(TrainError::Data("train.grad_accum is 0".into()));
        };
        let record = StepRecord {
            step,
            item,
            phase: objective.name().to_string(),
            t: last.t,
            stats,
            a_focus: last.masks.as_ref().and_then(|m| m.fused.a_focus),
            branch: last.masks.as_ref().map(|m| m.fused.branch.name().to_string()),
            m_mean,
            grad_norm,
            lr,
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok(StepOutcome {
            record,
            masks: last.masks,
            dump: last.dump,
        })
    }

    /// The LoRA gradients of pair `pair_index` (from 1) as the next step would compute them, one per
    /// [`LoraSet::vars`] (zeros where a variable gets none), without applying them: what a data-parallel rank
    /// contributes to the all-reduce, and how tests check the accumulation.
    pub fn pair_gradients(&mut self, pair_index: u64) -> Result<Vec<Tensor>, TrainError> {
        let step = self.step + 1;
        let objective = self.cfg.objective_at(step);
        let (mut grads, _) = self.pass(step, pair_index, objective, false)?;
        Ok(take_var_grads(&mut grads, &self.lora.vars())?)
    }

    /// The forward and backward passes of one pair (`pair_index`, from 1) of step `step`: its LoRA gradients
    /// (not yet averaged or applied) and what the step's record needs of it.
    fn pass(
        &mut self,
        step: u64,
        pair_index: u64,
        objective: ObjectiveKind,
        dump: bool,
    ) -> Result<(candle_core::backprop::GradStore, Pass), TrainError> {
        let index = self.item_index(pair_index);
        let item = &self.items[index];
        let mut rng = stream_rng(self.cfg.seed, STREAM_STEP, pair_index);
        let noise_cfg = self.cfg.noise;
        let u: f32 = rand::RngExt::random(&mut rng);
        let frac = noise_cfg.t_min + (noise_cfg.t_max - noise_cfg.t_min) * u;
        let t_sched = schedule_time(noise_cfg.parameterisation, frac);
        let shape = item.x0_w.dims().to_vec();
        let eps = Tensor::from_vec(normal_vec(&mut rng, item.x0_w.elem_count()), shape, &self.device)?;
        let pair = objective != ObjectiveKind::Sft;
        let (x0, eps_b, ts) = if pair {
            (
                Tensor::cat(&[&item.x0_w, &item.x0_l], 0)?,
                Tensor::cat(&[&eps, &eps], 0)?,
                vec![t_sched; 2],
            )
        } else {
            (item.x0_w.clone(), eps.clone(), vec![t_sched])
        };
        let noised = add_noise(noise_cfg.parameterisation, &x0, &eps_b, &ts)?;
        let timesteps = model_time(noise_cfg.parameterisation, &ts, &self.device)?;

        let source = self.cfg.masks.attention.source;
        // Block checkpointing: the policy's blocks keep only their inputs; the LoRA gradients they compute again
        // in backward are collected here and merged below.
        let new_sink = || {
            self.cfg
                .train
                .checkpoint_blocks
                .then(|| Arc::new(CheckpointGrads::default()))
        };
        let checkpoint = new_sink();
        // `train.split_pair`: the winner's policy forward keeps its graph; the loser's runs without one here
        // (its prediction enters the loss as a leaf) and again with one after the winner's backward.
        let split = pair && self.cfg.train.split_pair;
        let one = |t: &Tensor, i: usize| t.narrow(0, i, 1);
        let trace = |label: &str| crate::model::memory::trace(&self.device, &format!("step {step}, {label}"));
        trace("start");
        let (policy, loser_leaf) = if split {
            let w = self.forward(
                item,
                &one(&noised.x_t, 0)?,
                &one(&timesteps, 0)?,
                Adapters::On,
                source == HiddenSource::Policy,
                checkpoint.as_ref(),
            )?;
            let l = crate::model::checkpoint::without_graph(|| {
                self.forward(
                    item,
                    &one(&noised.x_t, 1)?,
                    &one(&timesteps, 1)?,
                    Adapters::On,
                    false,
                    None,
                )
            })?;
            let leaf = candle_core::Var::from_tensor(&l.prediction.detach())?;
            let joined = ForwardOutput {
                prediction: Tensor::cat(&[&w.prediction, leaf.as_tensor()], 0)?,
                hidden: w.hidden,
            };
            (joined, Some(leaf))
        } else {
            let joint = self.forward(
                item,
                &noised.x_t,
                &timesteps,
                Adapters::On,
                pair && source == HiddenSource::Policy,
                checkpoint.as_ref(),
            )?;
            (joint, None)
        };
        trace("after the policy forward");
        let (output, masks, m_tensor, reference) = if pair {
            let reference = self.forward(
                item,
                &noised.x_t,
                &timesteps,
                Adapters::Off,
                source == HiddenSource::Reference,
                None,
            )?;
            let hidden = match source {
                HiddenSource::Reference => &reference.hidden,
                HiddenSource::Policy => &policy.hidden,
            };
            let fusion = match objective {
                ObjectiveKind::FocusDpo => self.cfg.masks.fusion,
                // DPO trains with M = 1 but still logs A_focus and the branch Eq. 9 would take.
                _ => crate::masks::FusionParams {
                    variant: MaskVariant::Focus,
                    ..self.cfg.masks.fusion
                },
            };
            let masks = step_masks(item, Some((hidden, 0)), &self.cfg.masks.attention, &fusion)?;
            let target_w = noised.target.narrow(0, 0, 1)?;
            let target_l = noised.target.narrow(0, 1, 1)?;
            let pw = policy.prediction.narrow(0, 0, 1)?;
            let pl = policy.prediction.narrow(0, 1, 1)?;
            let rw = reference.prediction.narrow(0, 0, 1)?.detach();
            let rl = reference.prediction.narrow(0, 1, 1)?.detach();
            let preds = PairPredictions {
                target_w: &target_w,
                target_l: &target_l,
                policy_w: &pw,
                policy_l: &pl,
                reference_w: &rw,
                reference_l: &rl,
            };
            let (out, m) = if objective == ObjectiveKind::FocusDpo {
                let m = Tensor::from_slice(masks.fused.mask.as_slice(), (1, masks.fused.mask.len()), &self.device)?;
                (eq10_focus_dpo(&preds, &m, &self.cfg.dpo)?, Some(m))
            } else {
                (eq1_diffusion_dpo(&preds, &self.cfg.dpo)?, None)
            };
            (out, Some(masks), m, Some(reference.prediction))
        } else {
            let out = sft(&noised.target, &policy.prediction, None, self.cfg.dpo.mask_norm)?;
            (out, None, None, None)
        };
        let stats: StepStats = output.stats;
        if !stats.loss.is_finite() {
            return Err(non_finite(step, "loss", f64::from(stats.loss)));
        }
        trace("after the reference forward and the loss");
        let vars = self.lora.vars();
        let mut grads = output.loss.backward()?;
        if let Some(c) = &checkpoint {
            c.merge_into(&mut grads, &vars)?;
        }
        trace("after backward");
        crate::model::memory::trace_grads(&format!("step {step}, after backward"), &grads, &vars);
        // The policy's graph is no longer needed: only the values are kept (the dump), so that the split
        // pair's second forward does not hold the first one's activations.
        let output = super::objective::ObjectiveOutput {
            loss: output.loss.detach(),
            stats: output.stats,
        };
        let policy_prediction = policy.prediction.detach();
        drop(policy);
        if let Some(leaf) = &loser_leaf
            && let Some(g_l) = grads.remove(leaf.as_tensor())
        {
            // d loss/dθ through the loser = Σ g_l · d prediction_l/dθ: back-propagate `g_l` through its forward.
            let sink = new_sink();
            let l = self.forward(
                item,
                &one(&noised.x_t, 1)?,
                &one(&timesteps, 1)?,
                Adapters::On,
                false,
                sink.as_ref(),
            )?;
            let mut loser = (l.prediction * g_l)?.sum_all()?.backward()?;
            if let Some(c) = &sink {
                c.merge_into(&mut loser, &vars)?;
            }
            trace("after the loser's forward and backward");
            add_grads(&mut grads, &mut loser, &vars)?;
        }
        let m_mean = match &m_tensor {
            Some(m) => m.mean_all()?.to_scalar::<f32>()?,
            None => 1.0,
        };
        let dump = if dump {
            let mut named = vec![
                ("x0_w".to_string(), item.x0_w.clone()),
                ("x0_l".to_string(), item.x0_l.clone()),
                ("noise".to_string(), eps.clone()),
                ("t".to_string(), Tensor::new(&[t_sched], &self.device)?),
                ("x_t".to_string(), noised.x_t.clone()),
                ("target".to_string(), noised.target.clone()),
                ("policy".to_string(), policy_prediction),
                ("loss".to_string(), output.loss.detach().reshape(1)?),
            ];
            if let Some(r) = &reference {
                named.push(("reference".to_string(), r.clone()));
            }
            if let Some(m) = &m_tensor {
                named.push(("m".to_string(), m.clone()));
            }
            if let Some(ms) = &masks {
                let g = |grid: &Grid| Tensor::from_slice(grid.as_slice(), grid.shape(), &self.device);
                named.push(("m_prior".to_string(), g(&item.masks.m_prior)?));
                named.push(("m_d".to_string(), g(&item.masks.m_d)?));
                if let Some(m_s) = &ms.m_s {
                    named.push(("m_s".to_string(), g(m_s)?));
                }
            }
            Some(named)
        } else {
            None
        };
        let pass = Pass {
            item: item.id.clone(),
            t: frac,
            stats,
            masks,
            m_mean,
            dump,
        };
        Ok((grads, pass))
    }

    /// A snapshot of the maps of the last step (for the UI): those of its last pair.
    pub fn snapshot(&self, record: &StepRecord, masks: &StepMasks) -> Option<MaskSnapshot> {
        let last = record.item.rsplit('+').next()?;
        let item = self.items.iter().find(|i| i.id == last)?;
        Some(MaskSnapshot {
            step: record.step,
            item: record.item.clone(),
            t: record.t,
            m_prior: item.masks.m_prior.clone(),
            m_d: item.masks.m_d.clone(),
            m_s: masks.m_s.clone(),
            m: masks.fused.mask.clone(),
            a_focus: masks.fused.a_focus,
        })
    }
}

/// The model of a finished (or stopped) run: its base with the LoRA of its latest checkpoint attached (no
/// checkpoint: the base alone). Returns the step of the checkpoint used (0 without one).
pub fn load_run_model(dir: &Path, device: &Device) -> Result<(BaseModel, u64), TrainError> {
    let cfg: RunConfig = crate::train::run_store::read_config(dir)?;
    let mut base = cfg.model.load_base(device)?;
    let Some((lora, step)) = load_run_lora(dir, &cfg, base.config(), device)? else {
        return Ok((base, 0));
    };
    base.mmdit.attach_lora(&lora)?;
    Ok((base, step))
}

/// The LoRA of a run's latest checkpoint (run config `cfg`, model config `model`) and its step; `None` before the
/// first checkpoint.
pub fn load_run_lora(
    dir: &Path,
    cfg: &RunConfig,
    model: &crate::model::Config,
    device: &Device,
) -> Result<Option<(LoraSet, u64)>, TrainError> {
    let Some(ckpt) = crate::train::run_store::latest_checkpoint(dir)? else {
        return Ok(None);
    };
    let mut lora_cfg = cfg.lora;
    lora_cfg.seed = lora_cfg.seed.wrapping_add(cfg.seed);
    let lora = LoraSet::for_model(lora_cfg, model, device)?;
    let path = ckpt.dir.join(LORA_FILE);
    let tensors = candle_core::safetensors::load(&path, device).map_err(|e| TrainError::Checkpoint {
        path: path.clone(),
        message: e.to_string(),
    })?;
    lora.load_tensors(&tensors).map_err(|e| TrainError::Checkpoint {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(Some((lora, ckpt.step)))
}

/// Progress of a run, sent from the worker.
#[derive(Debug, Clone)]
pub enum Event {
    /// The base model is being loaded: bytes read so far (moves until [`Event::Started`]).
    Loading(Arc<crate::model::weights::LoadProgress>),
    /// Data and model are ready.
    Started {
        /// The run folder.
        run_dir: PathBuf,
        /// Steps already done (resume), 0 for a new run.
        start_step: u64,
        /// Steps in total.
        total_steps: u64,
        /// Trainable parameters.
        trainable: usize,
        /// Items in the training set.
        items: usize,
    },
    /// The pairs were scored and selected (`pairs.json` written); sent right after [`Event::Started`].
    Pairs(PairsSummary),
    /// A step finished.
    Step(StepRecord),
    /// The maps of a step.
    Masks(Box<MaskSnapshot>),
    /// A checkpoint was written.
    Checkpoint(Checkpoint),
    /// A sample sheet was written (`samples/step-N.png`, [`crate::train::samples`]).
    Samples {
        /// Step.
        step: u64,
        /// The PNG.
        path: PathBuf,
    },
    /// Something the user should know that did not stop the run (e.g. resume fell back to an older checkpoint
    /// because the newest one is damaged).
    Warning(String),
    /// A step's tensors were written (`--dump-step`).
    Dumped {
        /// Step.
        step: u64,
        /// File.
        path: PathBuf,
    },
    /// The run ended normally (`stopped` = on request, before `steps`).
    Finished {
        /// Last completed step.
        step: u64,
        /// Whether a stop request ended it.
        stopped: bool,
    },
    /// The run ended with an error; everything up to the last logged step is kept.
    Failed {
        /// Last completed step.
        step: u64,
        /// The error.
        error: String,
    },
}

/// How to start a session.
#[derive(Debug, Clone)]
pub enum Launch {
    /// A new run in `dir` (must not hold a run).
    New {
        /// Config.
        config: Box<RunConfig>,
        /// Run folder.
        dir: PathBuf,
    },
    /// Continue the run in `dir` from its latest checkpoint, up to `steps` (None = the config's).
    Resume {
        /// Run folder.
        dir: PathBuf,
        /// New total step count.
        steps: Option<u64>,
    },
}

/// Extra session options.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Write step K's tensors to a safetensors file.
    pub dump: Option<(u64, PathBuf)>,
    /// Use this base instead of loading the config's (tests, the Studio's cache).
    pub base: Option<BaseModel>,
    /// Train as one rank of a data-parallel world ([`super::parallel`]): rank 0 writes the run folder (config,
    /// log, checkpoints), every rank resumes from it.
    pub world: Option<WorldSpec>,
}

/// Which data-parallel world a session joins.
#[derive(Clone, Debug)]
pub enum WorldSpec {
    /// This one.
    Given(World),
    /// The launcher's (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`; [`super::parallel::world_for`]),
    /// joined on the run's device once it is known: NCCL between GPUs (the `nccl` feature), TCP otherwise. With
    /// `model.device = "cuda"` a rank uses GPU `LOCAL_RANK`.
    FromEnv,
}

/// A data-parallel world shared with the training thread.
#[derive(Clone)]
pub struct World(pub Arc<dyn super::parallel::Collective + Sync>);

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} of {}", self.0.rank(), self.0.world_size())
    }
}

/// A run on a worker thread.
pub struct Session {
    events: Receiver<Event>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Session {
    /// Starts the worker; setup errors arrive as [`Event::Failed`].
    pub fn start(launch: Launch, options: SessionOptions) -> Self {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_worker = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("focusdpo-train".into())
            .spawn(move || {
                let mut last = 0;
                if let Err(e) = run_worker(launch, options, &tx, &stop_worker, &mut last) {
                    let _ = tx.send(Event::Failed {
                        step: last,
                        error: e.to_string(),
                    });
                }
            });
        match thread {
            Ok(handle) => Self {
                events: rx,
                stop,
                thread: Some(handle),
            },
            Err(e) => {
                let (tx, rx) = mpsc::channel();
                let _ = tx.send(Event::Failed {
                    step: 0,
                    error: format!("cannot start the training thread: {e}"),
                });
                Self {
                    events: rx,
                    stop,
                    thread: None,
                }
            }
        }
    }

    /// Asks the worker to stop after the current step (it checkpoints first).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// The event stream.
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// Waits for the worker to end.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn write_dump(path: &Path, tensors: Vec<(String, Tensor)>) -> Result<(), TrainError> {
    let bytes = safetensors::serialize(tensors, None).map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| TrainError::Checkpoint {
            path: parent.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    crate::store::write_atomic(path, &bytes).map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn write_pairs(run_dir: &Path, report: &PairsReport) -> Result<(), TrainError> {
    let path = run_dir.join(PAIRS_FILE);
    let fail = |message: String| TrainError::RunFile {
        path: path.clone(),
        message,
    };
    let bytes = serde_json::to_vec_pretty(report).map_err(|e| fail(e.to_string()))?;
    crate::store::write_atomic(&path, &bytes).map_err(|e| fail(e.to_string()))
}

fn checkpoint(trainer: &Trainer, store: &RunStore, tx: &Sender<Event>) -> Result<(), TrainError> {
    let files = trainer.checkpoint_files()?;
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    let ckpt = store.write_checkpoint(trainer.completed_steps(), &refs)?;
    let _ = tx.send(Event::Checkpoint(ckpt));
    let samples = &trainer.config().samples;
    if samples.items > 0 {
        // A sheet that cannot be made is a warning: the run goes on.
        let step = trainer.completed_steps();
        let path = crate::train::samples::sheet_path(store.dir(), step);
        let made = samples
            .items()
            .and_then(|items| crate::train::samples::sheet(trainer.base(), samples, &items))
            .map_err(|e| e.to_string())
            .and_then(|img| crate::train::samples::write_png(&path, &img));
        let _ = tx.send(match made {
            Ok(()) => Event::Samples { step, path },
            Err(e) => Event::Warning(format!("sample sheet of step {step}: {e}")),
        });
    }
    Ok(())
}

fn run_worker(
    launch: Launch,
    options: SessionOptions,
    tx: &Sender<Event>,
    stop: &AtomicBool,
    last: &mut u64,
) -> Result<(), TrainError> {
    let (dir, cfg, resuming) = match launch {
        Launch::New { config, dir } => {
            config.validate()?;
            (dir, *config, false)
        }
        Launch::Resume { dir, steps } => {
            let mut cfg: RunConfig = RunStore::run_config(&dir)?;
            if let Some(s) = steps {
                cfg.steps = s;
            }
            (dir, cfg, true)
        }
    };
    // A launcher's rank takes GPU LOCAL_RANK when the run says plain `cuda` (the run's config keeps `cuda`).
    let device = match std::env::var("LOCAL_RANK") {
        Ok(local) if matches!(options.world, Some(WorldSpec::FromEnv)) && cfg.model.device.trim() == "cuda" => {
            super::config::ModelSettings {
                device: format!("cuda:{}", local.trim()),
                ..cfg.model.clone()
            }
            .device()?
        }
        _ => cfg.model.device()?,
    };
    let world: Arc<dyn super::parallel::Collective + Sync> = match &options.world {
        Some(WorldSpec::Given(w)) => w.0.clone(),
        Some(WorldSpec::FromEnv) => match super::parallel::world_for(&device) {
            Ok(Some(w)) => Arc::from(w),
            Ok(None) => Arc::new(super::parallel::Solo),
            Err(e) => return Err(TrainError::Data(e.to_string())),
        },
        None => Arc::new(super::parallel::Solo),
    };
    // Rank 0 writes the run folder; other ranks only read it (to resume).
    let writer = world.rank() == 0;
    let mut store = match (writer, resuming) {
        (false, _) => None,
        (true, false) => Some(RunStore::create(&dir, &cfg)?),
        (true, true) => Some(RunStore::reopen(&dir)?),
    };
    let base = match options.base {
        Some(b) => b,
        None => {
            let progress = Arc::new(crate::model::weights::LoadProgress::default());
            let _ = tx.send(Event::Loading(progress.clone()));
            crate::model::weights::track(&progress, || cfg.model.load_base(&device))?
        }
    };
    // Ranks other than 0 compute what rank 0 caches in the run folder (the same, from the same seeds).
    let cache = if writer { Some(dir.as_path()) } else { None };
    let data = match load_training_data(&cfg, &base, &device, cache) {
        Ok(d) => d,
        Err(e) => {
            if let Some(store) = &mut store {
                store.append(&serde_json::json!({"event": "error", "step": 0, "error": e.to_string()}))?;
            }
            return Err(e);
        }
    };
    if let Some(store) = &mut store {
        write_pairs(store.dir(), &data.pairs)?;
        store.append(&serde_json::json!({"event": "pairs", "summary": data.pairs.summary}))?;
    }
    let n_items = data.items.len();
    let mut trainer = Trainer::new(cfg.clone(), base, data.items)?;
    let mut fallback_note = None;
    if resuming {
        let resumed = restore_newest_intact(&dir, |c| trainer.restore(c))?;
        if let Some(store) = &mut store {
            store.mark_resume(&resumed)?;
        }
        fallback_note = resumed.fallback_note();
    }
    if world.reduces() {
        // Every rank must start from the same step (the same checkpoint).
        let mine = trainer.completed_steps() as f32;
        let mut at = vec![Tensor::new(&[mine], &Device::Cpu)?];
        world
            .all_reduce_mean(&mut at)
            .map_err(|e| TrainError::Data(e.to_string()))?;
        if at[0].to_vec1::<f32>()?.first() != Some(&mine) {
            return Err(TrainError::Data(format!(
                "data-parallel rank {} resumed at step {mine}, other ranks elsewhere: they must share the run \
                 folder {}",
                world.rank(),
                dir.display()
            )));
        }
    }
    *last = trainer.completed_steps();
    let _ = tx.send(Event::Started {
        run_dir: dir.clone(),
        start_step: trainer.completed_steps(),
        total_steps: cfg.steps,
        trainable: trainer.lora().parameter_count(),
        items: n_items,
    });
    if let Some(note) = fallback_note {
        let _ = tx.send(Event::Warning(note));
    }
    let _ = tx.send(Event::Pairs(data.pairs.summary));
    let mut last_ckpt = trainer.completed_steps();
    while trainer.completed_steps() < cfg.steps {
        let mut stopping = stop.load(Ordering::SeqCst);
        if world.reduces() {
            // A stop asked of any rank stops every rank after the same step (one waiting in the next step's
            // all-reduce for a rank that left would hang).
            stopping = world.any(stopping).map_err(|e| TrainError::Data(e.to_string()))?;
        }
        if stopping {
            if let Some(store) = &store
                && trainer.completed_steps() > last_ckpt
            {
                checkpoint(&trainer, store, tx)?;
            }
            let _ = tx.send(Event::Finished {
                step: trainer.completed_steps(),
                stopped: true,
            });
            return Ok(());
        }
        let next = trainer.completed_steps() + 1;
        let want_dump = writer && options.dump.as_ref().is_some_and(|(k, _)| *k == next);
        let outcome = match trainer.step_in(want_dump, &*world) {
            Ok(o) => o,
            Err(e) => {
                if let Some(store) = &mut store {
                    store.append(&serde_json::json!({"event": "error", "step": next, "error": e.to_string()}))?;
                }
                return Err(e);
            }
        };
        if let Some(store) = &mut store {
            store.append(&outcome.record)?;
        }
        *last = outcome.record.step;
        if let (Some(tensors), Some((_, path))) = (outcome.dump, &options.dump) {
            write_dump(path, tensors)?;
            let _ = tx.send(Event::Dumped {
                step: outcome.record.step,
                path: path.clone(),
            });
        }
        let every = cfg.log.snapshot_every;
        if every > 0
            && outcome.record.step % every == 0
            && let Some(snap) = outcome
                .masks
                .as_ref()
                .and_then(|m| trainer.snapshot(&outcome.record, m))
        {
            let _ = tx.send(Event::Masks(Box::new(snap)));
        }
        let _ = tx.send(Event::Step(outcome.record));
        let every = cfg.log.checkpoint_every;
        if every > 0 && trainer.completed_steps() % every == 0 {
            if let Some(store) = &store {
                checkpoint(&trainer, store, tx)?;
            }
            last_ckpt = trainer.completed_steps();
        }
    }
    if let Some(store) = &store
        && trainer.completed_steps() > last_ckpt
    {
        checkpoint(&trainer, store, tx)?;
    }
    let _ = tx.send(Event::Finished {
        step: trainer.completed_steps(),
        stopped: false,
    });
    Ok(())
}
