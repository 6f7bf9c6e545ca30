//! Pretraining the embedded base from scratch: reference-conditioned rectified-flow generation on an endless stream
//! of synthetic DIP items (winners as targets, the subjects' references as UNO reference tokens, the prompt through
//! the learned prompt tables).
//!
//! Every weight of the tiny MMDiT and the prompt tables is a trainable `Var`; the optimiser is our checkpointable
//! AdamW and an exponential moving average (EMA) of the weights is kept, because the EMA is what diffusion models
//! ship. A checkpoint holds `base.safetensors` (the EMA weights as a base file, loadable with `--base PATH`),
//! `raw.safetensors` (the current weights) and `optimizer.safetensors` (AdamW moments, step); resume restores all
//! three, so a resumed run is bit-identical to an uninterrupted one on the same machine.
//!
//! Choices (documented in `docs/pretraining.md`):
//! - **Init**: normal(0, 0.02²) everywhere, with the adaLN modulation and the final projection zeroed ("adaLN-Zero",
//!   DiT), so each block starts as the identity and the first prediction is 0.
//! - **Timesteps**: uniform, logit-normal (SD3/FLUX training: `t = σ(n)`, `n ~ N(mean, std²)`), or uniform shifted
//!   as the sampler shifts its grid.
//! - **Condition dropout**: the prompt is replaced by the empty prompt with probability `prompt_dropout`, so the
//!   sampler can use classifier-free guidance on the text; a whole step trains without references with probability
//!   `reference_dropout`, so the sampler can also guide on the references (`SampleSettings::reference_cfg_scale`).
//! - **Batches**: all items of a step have the same number of subjects (drawn per step from the 40/35/25 mix of the
//!   generator), so their token sequences have the same length.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::dip::synth::{NegativeSource, SubjectCount, SynthConfig, SynthItem, synthesize_item};
use crate::model::base::{META_CONFIG, META_PATCH, SamplerChoices};
use crate::model::config::SELF_COND_IN;
use crate::model::encoder::{image_to_tensor, patchify, reference_at};
use crate::model::schedule::{Parameterisation, add_noise, model_time, shift_time};
use crate::model::testing::random_weights;
use crate::model::text::random_prompt_tables;
use crate::model::{
    Adapters, BaseModel, BaseSource, Config, ForwardOptions, MmditInput, Reference, ids_tensor, reference_ids,
    target_ids, text_ids, uno_reference_offsets,
};
use crate::rng::{standard_normal, stream_rng};
use crate::train::config::{ConfigError, MAX_STEPS, OptimConfig, apply_overrides, read_toml_file};
use crate::train::optim::{AdamW, AdamWParams, clip_scale, fused, grad_norm, lr_at};
use crate::train::run_store::Checkpoint;
use crate::train::session::TrainError;

/// EMA base weights in a checkpoint (a base file: `--base runs/NAME/checkpoints/step-N/base.safetensors`).
pub const BASE_FILE: &str = "base.safetensors";
/// Current (raw) weights in a checkpoint.
pub const RAW_FILE: &str = "raw.safetensors";
/// AdamW state in a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

const STREAM_DATA: u64 = 0x5052_4554_0001;
const STREAM_NOISE: u64 = 0x5052_4554_0002;
const STREAM_REFERENCE_DROPOUT: u64 = 0x5052_4554_0003;
const STREAM_TIMESTEP_TAIL: u64 = 0x5052_4554_0004;
const STREAM_SELF_CONDITION: u64 = 0x5052_4554_0005;

/// How many subjects the pretraining items have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SubjectMix {
    /// One subject.
    One,
    /// Two subjects.
    Two,
    /// Three subjects.
    Three,
    /// One (40 %), two (35 %) or three (25 %), drawn per step.
    Mixed,
}

/// The synthetic data stream.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainData {
    /// Generator seed of the training split (the bundled dataset uses 0 and the held-out eval split its own seed,
    /// so pretraining never sees their scenes).
    pub seed: u64,
    /// Image side in pixels.
    pub size_px: u32,
    /// Subjects per item.
    pub subjects: SubjectMix,
}

impl Default for PretrainData {
    fn default() -> Self {
        Self {
            seed: 1,
            size_px: 64,
            subjects: SubjectMix::Mixed,
        }
    }
}

/// How training timesteps are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TimestepSampling {
    /// `t` uniform in `[0, 1]`.
    Uniform,
    /// `t = σ(n)`, `n ~ N(mean, std²)` (SD3 / FLUX training).
    LogitNormal {
        /// Mean of `n`.
        mean: f32,
        /// Standard deviation of `n`.
        std: f32,
    },
    /// `u` uniform in `[0, 1]`, shifted as the sampler's grid is: `t = s·u / (1 + (s − 1)·u)` (FLUX's timestep
    /// shift applied to training times); `shift` > 1 trains more at high noise (3: a quarter of the draws above
    /// t = 0.9, against a tenth uniformly).
    Shifted {
        /// The shift `s` (1 = uniform).
        shift: f32,
    },
}

impl TimestepSampling {
    /// One training time in `[0, 1]`.
    pub fn draw(self, rng: &mut rand_chacha::ChaCha8Rng) -> f32 {
        match self {
            Self::Uniform => rand::RngExt::random::<f32>(rng),
            Self::LogitNormal { mean, std } => {
                let n = mean + std * standard_normal(rng);
                1.0 / (1.0 + (-n).exp())
            }
            Self::Shifted { shift } => shift_time(rand::RngExt::random::<f32>(rng), shift),
        }
    }
}

/// A share of the training times drawn uniformly from `(from, 1]`, next to pure noise, in place of
/// [`TimestepSampling`]'s draw: what a sampler starting at `t = 1` needs and logit-normal or uniform times barely
/// train. There `x_t` carries almost nothing and `x̂₀` must come from the prompt and references alone (at `t = 1`
/// it is `E[x₀ | prompt, references]`); logit-normal(0.8, 0.8) draws `t > 0.97` 0.04 % of the time, and on the tiny
/// base the prompt then barely moved `x̂₀` at `t = 1` (`docs/pretraining.md`). Like SD3's heavy-tailed
/// "mode sampling" it keeps density at the ends; unlike it, the share and the range are explicit.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimestepTail {
    /// Probability that a sample's time comes from the tail (0 = off, the default).
    pub fraction: f32,
    /// Lower end of the tail's range `(from, 1]`.
    pub from: f32,
}

impl Default for TimestepTail {
    fn default() -> Self {
        Self {
            fraction: 0.0,
            from: 0.95,
        }
    }
}

impl TimestepTail {
    /// `t` itself, or with probability `fraction` a time uniform in `(from, 1]`; `rng` is the tail's own stream, read
    /// only when the tail is on, so a run without it draws exactly what it drew before the tail existed.
    pub fn apply(self, t: f32, rng: &mut rand_chacha::ChaCha8Rng) -> f32 {
        if self.fraction <= 0.0 {
            return t;
        }
        let pick: f32 = rand::RngExt::random(rng);
        let u: f32 = rand::RngExt::random(rng);
        if pick < self.fraction {
            1.0 - (1.0 - self.from) * u
        } else {
            t
        }
    }
}

/// A pretraining run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// Optimiser steps.
    pub steps: u64,
    /// Seed of the init, the noise and the condition dropout.
    pub seed: u64,
    /// Items per step.
    pub batch: usize,
    /// Model sizes (the tiny config by default).
    pub model: Config,
    /// Pixels per token side (pixel-unshuffle factor).
    pub patch: usize,
    /// Side the references are resized to.
    pub reference_px: u32,
    /// The synthetic data stream.
    pub data: PretrainData,
    /// AdamW, warm-up, clipping.
    pub optim: OptimConfig,
    /// EMA decay of the shipped weights (0 = no EMA: ship the raw weights).
    pub ema_decay: f64,
    /// Probability of training a sample with the empty prompt.
    pub prompt_dropout: f32,
    /// Probability of training a whole step without references (a batch's token sequences must stay one length),
    /// for guidance on the references. Configs written before it existed read as 0.
    #[serde(default)]
    pub reference_dropout: f32,
    /// Extra weight of the subjects' pixels in the loss: each element of the velocity error is weighted
    /// `w = 1 + subject_weight · m` (`m` = 1 inside any subject's mask, 0 elsewhere; the synthetic masks are exact)
    /// and the loss is the weighted mean `Σ w·e² / Σ w`. 0 (the default, and what configs written before it read
    /// as) is the plain MSE. Subjects cover ~10–20 % of a scene, so plain MSE spends most of its gradient on
    /// backgrounds; kohya's `masked_loss` is the same idea with `w = m`.
    #[serde(default)]
    pub subject_weight: f32,
    /// `subject_weight` applies only to the samples drawn at `t ≤ subject_weight_max_t`; the others get the plain
    /// MSE. 1 (the default, and what configs written before it read as) weights every sample. Why: the weight
    /// depends on the target, so its optimum is the velocity under a posterior tilted toward images with subject at
    /// that pixel. At low noise `x_t` fixes where the subjects are and the tilt is small; at high noise it makes the
    /// model paint subject wherever one might be (oversized, textured blobs: `docs/pretraining.md`).
    #[serde(default = "one")]
    pub subject_weight_max_t: f32,
    /// Timestep distribution.
    pub timesteps: TimestepSampling,
    /// A share of the times drawn next to pure noise instead (`timestep_tail = { fraction = 0.2, from = 0.9 }`);
    /// off by default, and in configs written before it existed.
    #[serde(default)]
    pub timestep_tail: TimestepTail,
    /// With `model.self_condition`: the share of steps that first run the model without an estimate (no
    /// gradient) and train it given that step's own `x̂₀ = x_t − t·v̂`; the other steps train with the estimate 0,
    /// as the first sampling step sees it. 0.5 as in Chen et al. (Analog Bits, 2022); a seeded coin per step.
    #[serde(default = "half")]
    pub self_condition_rate: f32,
    /// Checkpoint every N steps (and at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept: the newest `keep_last` (0 = all), plus every one whose step is a multiple of `keep_every`
    /// (0 = none beyond those), like `save_total_limit` of Hugging Face's Trainer. A checkpoint is ~170 MB.
    pub keep_last: usize,
    /// See `keep_last`.
    pub keep_every: u64,
    /// Warm start: the weights of this base file (of the same model config) instead of the random init. Only read
    /// at step 0; a resumed run reads its checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// The sampler settings the exported base recommends (`focusdpo.sampling` in its metadata, read by `focusdpo
    /// sample`/`eval` and the Studio when no flag overrides them): what evaluating the run found best, e.g.
    /// `--resume --set sampling.reference_cfg_scale=3` before `--export`. Empty by default.
    #[serde(default)]
    pub sampling: SamplerChoices,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            steps: 4000,
            seed: 0,
            batch: 8,
            model: Config::tiny(),
            patch: 4,
            reference_px: 32,
            data: PretrainData::default(),
            optim: OptimConfig {
                adamw: AdamWParams {
                    lr: 5e-4,
                    weight_decay: 0.01,
                    ..AdamWParams::default()
                },
                warmup_steps: 200,
                ..OptimConfig::default()
            },
            ema_decay: 0.999,
            prompt_dropout: 0.1,
            reference_dropout: 0.1,
            subject_weight: 0.0,
            subject_weight_max_t: 1.0,
            // Uniform, not SD3's logit-normal: the sampler's uniform time grid spends as many steps at t > 0.9 as
            // anywhere else, and logit-normal(0, 1) trains there 1.4 % of the time. On the tiny base the first 500
            // logit-normal steps left x̂₀ at t ≥ 0.9 pure noise (docs/pretraining.md).
            timesteps: TimestepSampling::Uniform,
            timestep_tail: TimestepTail::default(),
            self_condition_rate: 0.5,
            checkpoint_every: 100,
            keep_last: 0,
            keep_every: 0,
            init: None,
            sampling: SamplerChoices::default(),
        }
    }
}

impl PretrainConfig {
    /// Reads a TOML file (missing fields take their defaults; errors name the file, line and column).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        read_toml_file(path)
    }

    /// Applies `key=value` overrides (values read as TOML), like `focusdpo train --set`.
    pub fn with_overrides(&self, overrides: &[String]) -> Result<Self, ConfigError> {
        apply_overrides(self, overrides)
    }

    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, message: &str| ConfigError::Invalid {
            field,
            message: message.to_string(),
        };
        self.model.validate().map_err(|e| invalid("model", &e.to_string()))?;
        let problems = [
            (self.batch == 0, "batch", "must be at least 1"),
            (self.patch == 0, "patch", "must be at least 1"),
            (
                self.model.in_channels != 3 * self.patch * self.patch,
                "model.in_channels",
                "must be 3·patch² (pixel-unshuffled RGB)",
            ),
            (
                !(self.data.size_px as usize).is_multiple_of(self.patch),
                "data.size_px",
                "must be a multiple of patch",
            ),
            (
                self.reference_px == 0 || !(self.reference_px as usize).is_multiple_of(self.patch),
                "reference_px",
                "must be a positive multiple of patch",
            ),
            (!(0.0..1.0).contains(&self.ema_decay), "ema_decay", "must be in [0, 1)"),
            (
                !(0.0..=1.0).contains(&self.prompt_dropout),
                "prompt_dropout",
                "must be in [0, 1]",
            ),
            (
                !(0.0..=1.0).contains(&self.reference_dropout),
                "reference_dropout",
                "must be in [0, 1]",
            ),
            (
                !(self.subject_weight.is_finite() && (0.0..=1000.0).contains(&self.subject_weight)),
                "subject_weight",
                "must be in [0, 1000] (0 = plain MSE)",
            ),
            (
                !(0.0..=1.0).contains(&self.subject_weight_max_t),
                "subject_weight_max_t",
                "must be in [0, 1] (1 = every sample weighted)",
            ),
            (
                !(0.0..=1.0).contains(&self.self_condition_rate),
                "self_condition_rate",
                "must be in [0, 1] (the share of steps trained on the model's own estimate)",
            ),
            (
                !(self.optim.adamw.lr.is_finite() && self.optim.adamw.lr > 0.0),
                "optim.adamw.lr",
                "must be positive",
            ),
            (self.steps > MAX_STEPS, "steps", "is too large"),
        ];
        if let Some((_, field, why)) = problems.iter().find(|(bad, _, _)| *bad) {
            return Err(invalid(field, why));
        }
        self.optim.check_schedule(self.steps)?;
        if let TimestepSampling::LogitNormal { mean, std } = self.timesteps
            && !(mean.is_finite() && std.is_finite() && std > 0.0)
        {
            return Err(invalid(
                "timesteps",
                "logit-normal needs a finite mean and a positive std",
            ));
        }
        if let TimestepSampling::Shifted { shift } = self.timesteps
            && !(shift.is_finite() && shift > 0.0)
        {
            return Err(invalid("timesteps", "shifted needs a positive, finite shift"));
        }
        let tail = self.timestep_tail;
        if !(0.0..=1.0).contains(&tail.fraction) {
            return Err(invalid("timestep_tail.fraction", "must be in [0, 1] (0 = no tail)"));
        }
        if !(0.0..1.0).contains(&tail.from) {
            return Err(invalid(
                "timestep_tail.from",
                "must be in [0, 1): the tail draws t uniformly from (from, 1]",
            ));
        }
        SynthConfig {
            items: 1,
            subjects: SubjectCount::One,
            size_px: self.data.size_px,
            seed: self.data.seed,
            negatives: NegativeSource::Perturbed,
        }
        .validate()
        .map_err(|e| invalid("data", &e.to_string()))
    }

    /// Checks that `next` can continue from a checkpoint of a run with this config (`--resume --set`, `--fork`):
    /// the fields the checkpoint's tensors and token layout depend on must stay; everything else (learning rate,
    /// timesteps, data mix, dropouts, loss weights, EMA, checkpointing) may change.
    pub fn check_continuable(&self, next: &PretrainConfig) -> Result<(), ConfigError> {
        let fixed = [
            (self.model != next.model, "model"),
            (self.patch != next.patch, "patch"),
            (self.reference_px != next.reference_px, "reference_px"),
            (self.data.size_px != next.data.size_px, "data.size_px"),
        ];
        match fixed.into_iter().find(|(changed, _)| *changed) {
            Some((_, field)) => Err(ConfigError::Invalid {
                field,
                message: "cannot change when a run continues from a checkpoint (its weights and token layout depend \
                          on it); start a new run instead"
                    .into(),
            }),
            None => Ok(()),
        }
    }
}

/// What one pretraining step did (one line of `metrics.jsonl`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PretrainRecord {
    /// Step (1-based).
    pub step: u64,
    /// Mean squared error of the velocity prediction over the batch (weighted by `subject_weight` when it is set).
    pub loss: f32,
    /// Subjects of this step's items.
    pub subjects: usize,
    /// The step trained without references (`reference_dropout`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub references_dropped: bool,
    /// The step trained on the model's own estimate (`self_condition_rate`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub self_conditioned: bool,
    /// Mean `t` of the batch.
    pub t_mean: f32,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Wall time of the step.
    pub seconds: f64,
    /// Resident memory after the step (MiB), where the OS tells.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_mib: Option<f64>,
}

fn one() -> f32 {
    1.0
}

fn half() -> f32 {
    0.5
}

/// One step's batch as model inputs.
struct Batch {
    x0: Tensor,
    img_ids: Tensor,
    refs: Vec<(Tensor, Tensor)>,
    prompts: Vec<String>,
    subjects: usize,
    /// Per-element loss weights, shaped as `x0` (`subject_weight` > 0 only).
    weights: Option<Tensor>,
}

/// The pretraining state: trainable base, EMA, optimiser.
pub struct Pretrainer {
    cfg: PretrainConfig,
    base: BaseModel,
    vars: Vec<(String, Var)>,
    ema: Vec<Tensor>,
    opt: AdamW,
    step: u64,
    device: Device,
}

fn is_zero_init(name: &str) -> bool {
    name.starts_with(SELF_COND_IN)
        || name.contains("_mod.lin.")
        || name.contains("modulation.lin.")
        || name.starts_with("final_layer.adaLN_modulation.")
        || name.starts_with("final_layer.linear.")
}

/// The initial weights of a pretraining run: normal(0, 0.02²), QK-norm scales 1, adaLN modulation and final
/// projection 0, plus random prompt tables. Deterministic per seed.
pub fn initial_weights(cfg: &Config, seed: u64, device: &Device) -> candle_core::Result<HashMap<String, Tensor>> {
    let mut w = random_weights(cfg, seed, device)?;
    for (name, t) in w.iter_mut() {
        if is_zero_init(name) {
            *t = t.zeros_like()?;
        }
    }
    w.extend(random_prompt_tables(cfg.context_in_dim, cfg.vec_in_dim, seed, device)?);
    Ok(w)
}

fn tokens(img: &image::RgbImage, patch: usize, device: &Device) -> candle_core::Result<Tensor> {
    patchify(&image_to_tensor(img, device)?, patch)
}

/// The loss weights of one item as tokens `[1, N, 3·p²]`: `1 + extra` inside any of `masks` (binary 0/255, all of
/// one size), 1 elsewhere, repeated over the colour channels as [`tokens`] lays out the image.
fn subject_weight_tokens(
    masks: &[image::GrayImage],
    extra: f32,
    patch: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let Some(first) = masks.first() else {
        candle_core::bail!("subject_weight: an item has no subject masks");
    };
    let (w, h) = first.dimensions();
    if masks.iter().any(|m| m.dimensions() != (w, h)) {
        candle_core::bail!("subject_weight: an item's masks differ in size");
    }
    let plane: Vec<f32> = (0..(w * h) as usize)
        .map(|i| {
            let inside = masks.iter().any(|m| m.as_raw()[i] > 127);
            if inside { 1.0 + extra } else { 1.0 }
        })
        .collect();
    let plane = Tensor::from_vec(plane, (1, 1, h as usize, w as usize), device)?;
    patchify(&plane.repeat((1, 3, 1, 1))?, patch)
}

/// The pretraining loss: the MSE of the velocity prediction, or with `weights` (shaped as `error`) the weighted
/// mean `Σ w·e² / Σ w`.
fn velocity_loss(error: &Tensor, weights: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let sq = error.sqr()?;
    match weights {
        None => sq.mean_all(),
        Some(w) => {
            let total = w.sum_all()?.to_scalar::<f32>()?;
            (sq * w)?.sum_all()? / f64::from(total)
        }
    }
}

/// The rectified-flow estimate of the clean image from a velocity prediction, `x̂₀ = x_t − t·v̂` with per-row `t`
/// (what a self-conditioned model is given; the sampler reports the same).
fn clean_estimate(x_t: &Tensor, v: &Tensor, ts: &[f32]) -> candle_core::Result<Tensor> {
    let t = Tensor::from_vec(ts.to_vec(), (ts.len(), 1, 1), x_t.device())?;
    x_t - v.broadcast_mul(&t)?
}

/// The weights of the base file `path` in place of `init`'s, every tensor of the same name and shape (F32).
fn warm_start(
    path: &Path,
    init: HashMap<String, Tensor>,
    device: &Device,
) -> Result<HashMap<String, Tensor>, TrainError> {
    let bad = |message: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: format!("{message} (`init` must be a base file of the run's model config)"),
    };
    let mut file = candle_core::safetensors::load(path, device).map_err(|e| bad(e.to_string()))?;
    let mut weights = HashMap::with_capacity(init.len());
    for (name, fresh) in init {
        // A base without self-conditioning starts one with it: the projection keeps its zero init, so the warm
        // start predicts exactly what the base did.
        if name.starts_with(SELF_COND_IN) && !file.contains_key(&name) {
            weights.insert(name, fresh);
            continue;
        }
        let t = file.remove(&name).ok_or_else(|| bad(format!("no tensor `{name}`")))?;
        if t.dims() != fresh.dims() {
            return Err(bad(format!(
                "`{name}` has shape {:?}, expected {:?}",
                t.dims(),
                fresh.dims()
            )));
        }
        weights.insert(name, t.to_dtype(DType::F32)?);
    }
    if let Some(extra) = file.keys().min() {
        return Err(bad(format!("tensor `{extra}` is not part of the model")));
    }
    Ok(weights)
}

impl Pretrainer {
    /// A fresh run at step 0: the random init, or the weights of `cfg.init`.
    pub fn new(cfg: PretrainConfig, device: &Device) -> Result<Self, TrainError> {
        let init = cfg.init.clone();
        Self::build(cfg, init.as_deref(), device)
    }

    /// A run to be [`restore`](Self::restore)d from its checkpoint: `cfg.init` is not read (it may be gone).
    pub fn for_resume(cfg: PretrainConfig, device: &Device) -> Result<Self, TrainError> {
        Self::build(cfg, None, device)
    }

    fn build(cfg: PretrainConfig, init: Option<&Path>, device: &Device) -> Result<Self, TrainError> {
        cfg.validate()?;
        let mut weights = initial_weights(&cfg.model, cfg.seed, device)?;
        if let Some(path) = init {
            weights = warm_start(path, weights, device)?;
        }
        let varmap = VarMap::new();
        let mut vars = Vec::with_capacity(weights.len());
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| TrainError::Data("variable map poisoned".into()))?;
            for (name, t) in weights {
                let var = Var::from_tensor(&t)?;
                data.insert(name.clone(), var.clone());
                vars.push((name, var));
            }
        }
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let base =
            BaseModel::from_var_builder(&cfg.model, cfg.patch, vb, BaseSource::Random(cfg.seed)).map_err(|source| {
                crate::model::BaseError::Model {
                    path: PathBuf::from(format!("pretrain init (seed {})", cfg.seed)),
                    source,
                }
            })?;
        let ema = vars
            .iter()
            .map(|(_, v)| v.as_tensor().detach().copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let opt = AdamW::new(vars.clone(), cfg.optim.adamw)?;
        Ok(Self {
            cfg,
            base,
            vars,
            ema,
            opt,
            step: 0,
            device: device.clone(),
        })
    }

    /// The run config.
    pub fn config(&self) -> &PretrainConfig {
        &self.cfg
    }

    /// Steps completed.
    pub fn completed_steps(&self) -> u64 {
        self.step
    }

    /// Number of trainable parameters.
    pub fn parameter_count(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The items of step `step` (1-based), generated from `(data.seed, index)`.
    fn items(&self, step: u64) -> Result<Vec<SynthItem>, TrainError> {
        let mut rng = stream_rng(self.cfg.seed, STREAM_DATA, step);
        let u: f64 = rand::RngExt::random(&mut rng);
        let subjects = match self.cfg.data.subjects {
            SubjectMix::One => SubjectCount::One,
            SubjectMix::Two => SubjectCount::Two,
            SubjectMix::Three => SubjectCount::Three,
            SubjectMix::Mixed if u < 0.4 => SubjectCount::One,
            SubjectMix::Mixed if u < 0.75 => SubjectCount::Two,
            SubjectMix::Mixed => SubjectCount::Three,
        };
        let synth = SynthConfig {
            items: 1,
            subjects,
            size_px: self.cfg.data.size_px,
            seed: self.cfg.data.seed,
            negatives: NegativeSource::Perturbed,
        };
        let b = self.cfg.batch;
        (0..b)
            .map(|k| {
                let index = (step - 1) as usize * b + k;
                synthesize_item(&synth, index).map_err(|e| TrainError::Data(e.to_string()))
            })
            .collect()
    }

    fn batch(&self, items: &[SynthItem]) -> candle_core::Result<Batch> {
        let p = self.cfg.patch;
        let dev = &self.device;
        let subjects = items.first().map_or(0, |i| i.references.len());
        let x0 = Tensor::cat(
            &items
                .iter()
                .map(|i| tokens(&i.winner, p, dev))
                .collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?;
        let side = self.cfg.data.size_px as usize / p;
        let img_ids = ids_tensor(&target_ids(side, side), items.len(), dev)?;
        let rp = self.cfg.reference_px;
        let rg = rp as usize / p;
        let offsets = uno_reference_offsets((side, side), &vec![(rg, rg); subjects]);
        let refs = offsets
            .into_iter()
            .enumerate()
            .map(|(k, off)| {
                let toks = items
                    .iter()
                    .map(|i| tokens(&reference_at(&i.references[k], rp), p, dev))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Ok((
                    Tensor::cat(&toks, 0)?,
                    ids_tensor(&reference_ids(rg, rg, off), items.len(), dev)?,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let weights = if self.cfg.subject_weight > 0.0 {
            let per_item = items
                .iter()
                .map(|i| subject_weight_tokens(&i.masks, self.cfg.subject_weight, p, dev))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&per_item, 0)?)
        } else {
            None
        };
        Ok(Batch {
            x0,
            img_ids,
            refs,
            prompts: items.iter().map(|i| i.record.prompt.clone()).collect(),
            subjects,
            weights,
        })
    }

    /// One optimiser step.
    pub fn step(&mut self) -> Result<PretrainRecord, TrainError> {
        let started = Instant::now();
        let step = self.step + 1;
        let items = self.items(step)?;
        let mut batch = self.batch(&items)?;
        // A stream of its own, so that runs without reference dropout draw exactly what they drew before it existed.
        let dropped = self.cfg.reference_dropout > 0.0
            && rand::RngExt::random::<f32>(&mut stream_rng(self.cfg.seed, STREAM_REFERENCE_DROPOUT, step))
                < self.cfg.reference_dropout;
        if dropped {
            batch.refs.clear();
        }
        let mut rng = stream_rng(self.cfg.seed, STREAM_NOISE, step);
        let b = items.len();
        let mut tail_rng = stream_rng(self.cfg.seed, STREAM_TIMESTEP_TAIL, step);
        let ts: Vec<f32> = (0..b)
            .map(|_| {
                let t = self.cfg.timesteps.draw(&mut rng);
                self.cfg.timestep_tail.apply(t, &mut tail_rng)
            })
            .collect();
        if let Some(w) = batch.weights.take() {
            let max_t = self.cfg.subject_weight_max_t;
            batch.weights = Some(if ts.iter().all(|&t| t <= max_t) {
                w
            } else {
                let rows = (0..b)
                    .map(|k| {
                        let row = w.narrow(0, k, 1)?;
                        if ts[k] <= max_t { Ok(row) } else { row.ones_like() }
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)?
            });
        }
        for prompt in &mut batch.prompts {
            let u: f32 = rand::RngExt::random(&mut rng);
            if u < self.cfg.prompt_dropout {
                prompt.clear();
            }
        }
        let eps = Tensor::from_vec(
            crate::rng::normal_vec(&mut rng, batch.x0.elem_count()),
            batch.x0.dims(),
            &self.device,
        )?;
        let param = Parameterisation::RectifiedFlow;
        let noised = add_noise(param, &batch.x0, &eps, &ts)?;
        let timesteps = model_time(param, &ts, &self.device)?;
        let encoder = self
            .base
            .prompt
            .as_ref()
            .ok_or_else(|| TrainError::Data("the pretraining base has no prompt tables".into()))?;
        let prompts: Vec<&str> = batch.prompts.iter().map(String::as_str).collect();
        let enc = encoder.encode(&prompts)?;
        let txt_ids = text_ids(enc.txt.dim(1)?, b, &self.device)?;
        let references: Vec<Reference<'_>> = batch
            .refs
            .iter()
            .map(|(tokens, ids)| Reference { tokens, ids })
            .collect();
        // A guidance-distilled config is pretrained at guidance 1.0, the value fine-tuning feeds it.
        let guidance = self.base.guidance_tensor(self.base.train_guidance, b)?;
        let mut input = MmditInput {
            img: &noised.x_t,
            img_ids: &batch.img_ids,
            txt: &enc.txt,
            txt_ids: &txt_ids,
            timesteps: &timesteps,
            y: &enc.y,
            guidance: guidance.as_ref(),
            references: &references,
            self_condition: None,
        };
        let options = || ForwardOptions {
            capture_hidden: false,
            adapters: Adapters::Off,
            ..Default::default()
        };
        // Its own stream, so that runs without self-conditioning draw exactly what they drew before it existed.
        let self_conditioned = self.cfg.model.self_condition
            && rand::RngExt::random::<f32>(&mut stream_rng(self.cfg.seed, STREAM_SELF_CONDITION, step))
                < self.cfg.self_condition_rate;
        let estimate = if self_conditioned {
            // The first pass's graph goes with `first`; only the detached estimate is kept.
            let first = self.base.mmdit.forward_with(&input, options())?.prediction;
            Some(clean_estimate(&noised.x_t, &first, &ts)?.detach())
        } else {
            None
        };
        input.self_condition = estimate.as_ref();
        let out = self.base.mmdit.forward_with(&input, options())?;
        let loss = velocity_loss(&(out.prediction - &noised.target)?, batch.weights.as_ref())?;
        let loss_value = loss.to_scalar::<f32>()?;
        if !loss_value.is_finite() {
            return Err(TrainError::NonFinite {
                step,
                what: "loss",
                value: f64::from(loss_value),
            });
        }
        let vars: Vec<Var> = self.vars.iter().map(|(_, v)| v.clone()).collect();
        let grads = loss.backward()?;
        let grad_norm = grad_norm(&grads, &vars)?;
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite {
                step,
                what: "gradient norm",
                value: grad_norm,
            });
        }
        let lr = lr_at(step, self.cfg.steps, &self.cfg.optim);
        self.opt.set_lr(lr);
        self.opt
            .step_scaled(&grads, clip_scale(grad_norm, self.cfg.optim.grad_clip))?;
        drop(grads);
        self.update_ema(step)?;
        self.step = step;
        Ok(PretrainRecord {
            step,
            loss: loss_value,
            subjects: batch.subjects,
            references_dropped: dropped,
            self_conditioned,
            t_mean: ts.iter().sum::<f32>() / b as f32,
            grad_norm,
            lr,
            seconds: started.elapsed().as_secs_f64(),
            rss_mib: crate::alloc::resident_mib(),
        })
    }

    /// `ema ← d·ema + (1−d)·w` with the usual warm-up `d = min(decay, (1+s)/(10+s))`, so early weights do not
    /// linger in short runs.
    fn update_ema(&mut self, step: u64) -> candle_core::Result<()> {
        let d = self.cfg.ema_decay.min((1 + step) as f64 / (10 + step) as f64);
        for (e, (_, v)) in self.ema.iter_mut().zip(&self.vars) {
            let w = v.as_tensor().detach();
            if fused::applies(&[e, &w]) {
                // In place, one pass; the EMA tensors have storage of their own (copies at creation and load).
                e.inplace_op2(&w.contiguous()?, &fused::Blend::new(d, 1.0 - d, 1.0, false))?;
            } else {
                *e = ((&*e * d)? + (w * (1.0 - d))?)?.detach();
            }
        }
        Ok(())
    }

    fn base_file_bytes(&self, tensors: Vec<(String, Tensor)>, dtype: DType) -> Result<Vec<u8>, TrainError> {
        let cfg_json = serde_json::to_string(&self.cfg.model).map_err(|e| TrainError::Checkpoint {
            path: PathBuf::from(BASE_FILE),
            message: e.to_string(),
        })?;
        let mut metadata = HashMap::from([
            (META_CONFIG.to_string(), cfg_json),
            (META_PATCH.to_string(), self.cfg.patch.to_string()),
            ("generator".to_string(), "focusdpo pretrain".to_string()),
            ("focusdpo.pretrain_step".to_string(), self.step.to_string()),
        ]);
        self.cfg
            .sampling
            .write_metadata(&mut metadata)
            .map_err(|message| TrainError::Checkpoint {
                path: PathBuf::from(BASE_FILE),
                message,
            })?;
        let tensors = tensors
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(dtype)?)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        safetensors::serialize(tensors, Some(metadata)).map_err(|e| TrainError::Checkpoint {
            path: PathBuf::from(BASE_FILE),
            message: e.to_string(),
        })
    }

    /// The shipped weights (EMA, or raw when `ema_decay` is 0) as a base file in `dtype` (F16 halves the size).
    pub fn export_bytes(&self, dtype: DType) -> Result<Vec<u8>, TrainError> {
        let named = if self.cfg.ema_decay > 0.0 {
            self.vars
                .iter()
                .map(|(n, _)| n.clone())
                .zip(self.ema.iter().cloned())
                .collect()
        } else {
            self.raw_tensors()
        };
        self.base_file_bytes(named, dtype)
    }

    fn raw_tensors(&self) -> Vec<(String, Tensor)> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect()
    }

    /// The current state as the files of a checkpoint.
    pub fn checkpoint_files(&self) -> Result<Vec<(&'static str, Vec<u8>)>, TrainError> {
        let opt = safetensors::serialize(self.opt.state_tensors()?, None).map_err(|e| TrainError::Checkpoint {
            path: PathBuf::from(OPTIMIZER_FILE),
            message: e.to_string(),
        })?;
        Ok(vec![
            (BASE_FILE, self.export_bytes(DType::F32)?),
            (RAW_FILE, self.base_file_bytes(self.raw_tensors(), DType::F32)?),
            (OPTIMIZER_FILE, opt),
        ])
    }

    /// Restores weights, EMA and optimiser from a checkpoint and continues after its step.
    pub fn restore(&mut self, ckpt: &Checkpoint) -> Result<(), TrainError> {
        let load = |name: &str| -> Result<(PathBuf, HashMap<String, Tensor>), TrainError> {
            let path = ckpt.dir.join(name);
            let t = candle_core::safetensors::load(&path, &self.device).map_err(|e| TrainError::Checkpoint {
                path: path.clone(),
                message: e.to_string(),
            })?;
            Ok((path, t))
        };
        let (raw_path, raw) = load(RAW_FILE)?;
        let (ema_path, ema) = load(BASE_FILE)?;
        let (opt_path, opt) = load(OPTIMIZER_FILE)?;
        let missing = |path: &Path, name: &str| TrainError::Checkpoint {
            path: path.to_path_buf(),
            message: format!("no tensor `{name}`"),
        };
        let shape_err = |path: &Path, e: candle_core::Error| TrainError::Checkpoint {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        for ((name, var), e) in self.vars.iter().zip(self.ema.iter_mut()) {
            let w = raw.get(name).ok_or_else(|| missing(&raw_path, name))?;
            var.set(w).map_err(|err| shape_err(&raw_path, err))?;
            let m = ema.get(name).ok_or_else(|| missing(&ema_path, name))?;
            if m.dims() != var.dims() {
                return Err(TrainError::Checkpoint {
                    path: ema_path,
                    message: format!("`{name}` has shape {:?}, expected {:?}", m.dims(), var.dims()),
                });
            }
            // A copy of its own: the EMA is updated in place.
            *e = m.to_dtype(DType::F32)?.copy()?;
        }
        self.opt.load_state(&opt).map_err(|err| shape_err(&opt_path, err))?;
        self.step = ckpt.step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::run_store::RunStore;

    fn micro() -> PretrainConfig {
        PretrainConfig {
            steps: 4,
            batch: 2,
            model: Config::micro(),
            data: PretrainData {
                size_px: 32,
                ..PretrainData::default()
            },
            reference_px: 16,
            optim: OptimConfig {
                warmup_steps: 1,
                ..PretrainConfig::default().optim
            },
            checkpoint_every: 2,
            ..PretrainConfig::default()
        }
    }

    /// The micro config as a file written before `field` existed (its line left out), read back.
    fn micro_without(field: &str) -> PretrainConfig {
        let text = toml::to_string(&micro()).expect("toml");
        let old: String = text
            .lines()
            .filter(|l| !l.starts_with(field))
            .collect::<Vec<_>>()
            .join("\n");
        toml::from_str(&old).expect("old config")
    }

    #[test]
    fn init_zeroes_the_modulations_and_the_final_projection() -> candle_core::Result<()> {
        let w = initial_weights(&micro().model, 0, &Device::Cpu)?;
        for name in [
            "double_blocks.0.img_mod.lin.weight",
            "final_layer.linear.bias",
            "single_blocks.0.modulation.lin.bias",
        ] {
            assert_eq!(w[name].abs()?.sum_all()?.to_scalar::<f32>()?, 0.0, "{name}");
        }
        assert!(
            w["double_blocks.0.img_attn.qkv.weight"]
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?
                > 0.0
        );
        assert!(w.contains_key("prompt_embed.token.weight"));
        Ok(())
    }

    /// Four steps straight equal two steps, a checkpoint, a restore into a fresh trainer and two more steps: same
    /// losses, same exported bytes. The loss moves, and the exported file loads as a base.
    #[test]
    fn resume_is_bit_identical_and_the_export_loads() -> Result<(), TrainError> {
        let dev = Device::Cpu;
        let mut straight = Pretrainer::new(micro(), &dev)?;
        let losses: Vec<f32> = (0..4)
            .map(|_| straight.step().map(|r| r.loss))
            .collect::<Result<_, _>>()?;
        assert!(losses.iter().all(|l| l.is_finite()));
        // The EMA must carry no graph (else every step keeps the previous EMA alive).
        assert!(straight.ema.iter().all(|t| !t.track_op()));

        let dir = tempfile::tempdir().map_err(|e| TrainError::Data(e.to_string()))?;
        let mut store = RunStore::create(dir.path().join("run"), &micro())?;
        let mut first = Pretrainer::new(micro(), &dev)?;
        for _ in 0..2 {
            let r = first.step()?;
            store.append(&r)?;
        }
        let files = first.checkpoint_files()?;
        let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        let ckpt = store.write_checkpoint(2, &refs)?;
        let mut resumed = Pretrainer::new(micro(), &dev)?;
        resumed.restore(&ckpt)?;
        assert_eq!(resumed.completed_steps(), 2);
        let again: Vec<f32> = (0..2)
            .map(|_| resumed.step().map(|r| r.loss))
            .collect::<Result<_, _>>()?;
        assert_eq!(again, losses[2..].to_vec());
        for (a, b) in resumed
            .ema
            .iter()
            .chain(resumed.raw_tensors().iter().map(|(_, t)| t))
            .zip(straight.ema.iter().chain(straight.raw_tensors().iter().map(|(_, t)| t)))
        {
            assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
        }

        let path = dir.path().join("base.safetensors");
        std::fs::write(&path, straight.export_bytes(DType::F16)?).map_err(|e| TrainError::Data(e.to_string()))?;
        let base = BaseModel::load_file(&path, &dev)?;
        assert_eq!(base.patch, 4);
        assert_eq!(base.config().hidden_size, 64);
        assert!(base.prompt.is_some());
        Ok(())
    }

    /// A micro run after one step and its EMA exported (f16) to `donor.safetensors` in a fresh folder.
    fn donor_file(dev: &Device) -> Result<(tempfile::TempDir, Pretrainer, PathBuf), TrainError> {
        let mut donor = Pretrainer::new(micro(), dev)?;
        donor.step()?;
        let dir = tempfile::tempdir().map_err(|e| TrainError::Data(e.to_string()))?;
        let path = dir.path().join("donor.safetensors");
        std::fs::write(&path, donor.export_bytes(DType::F16)?).map_err(|e| TrainError::Data(e.to_string()))?;
        Ok((dir, donor, path))
    }

    /// A warm start takes the base file's weights (F16 rounding aside) and continues from them; a file of another
    /// model config is refused, naming the file and the tensor.
    #[test]
    fn init_from_a_base_file() -> Result<(), TrainError> {
        let dev = Device::Cpu;
        let (dir, donor, path) = donor_file(&dev)?;
        let warm = Pretrainer::new(
            PretrainConfig {
                init: Some(path.clone()),
                seed: 7,
                ..micro()
            },
            &dev,
        )?;
        let cold = Pretrainer::new(PretrainConfig { seed: 7, ..micro() }, &dev)?;
        let name = "final_layer.linear.weight";
        let weight = |t: &Pretrainer| -> Result<Vec<f32>, TrainError> {
            let (_, v) = t
                .vars
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| TrainError::Data(name.into()))?;
            Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?)
        };
        let donor_ema = donor.ema[donor.vars.iter().position(|(n, _)| n == name).unwrap_or(0)]
            .to_dtype(DType::F16)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(weight(&warm)?, donor_ema);
        assert!(weight(&cold)?.iter().all(|&w| w == 0.0), "adaLN-Zero init");
        assert!(
            donor_ema.iter().any(|&w| w != 0.0),
            "one step moved the final projection"
        );

        let other = PretrainConfig {
            init: Some(path.clone()),
            model: Config {
                hidden_size: 128,
                num_heads: 4,
                ..Config::micro()
            },
            ..micro()
        };
        let err = Pretrainer::new(other, &dev)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("donor.safetensors") && err.contains("shape"), "{err}");
        // A resumed run does not read `init`.
        let gone = PretrainConfig {
            init: Some(dir.path().join("gone.safetensors")),
            ..micro()
        };
        assert!(Pretrainer::new(gone.clone(), &dev).is_err());
        assert!(Pretrainer::for_resume(gone, &dev).is_ok());
        Ok(())
    }

    /// Self-conditioning starts from a base without it: the projection is zero, so the first step's loss is the
    /// plain warm start's to the bit (the estimate goes in and changes nothing), and that step then trains the
    /// projection. At rate 0 no step runs the first pass; the rate is validated and read as 0.5 when absent.
    #[test]
    fn self_conditioning_warm_starts_from_a_base_without_it() -> Result<(), TrainError> {
        let dev = Device::Cpu;
        let (dir, _, path) = donor_file(&dev)?;
        let warm = |self_condition: bool, rate: f32| {
            Pretrainer::new(
                PretrainConfig {
                    init: Some(path.clone()),
                    model: Config {
                        self_condition,
                        ..Config::micro()
                    },
                    self_condition_rate: rate,
                    ..micro()
                },
                &dev,
            )
        };
        let name = format!("{SELF_COND_IN}.weight");
        let projection = |t: &Pretrainer| -> Result<Vec<f32>, TrainError> {
            let (_, v) = t
                .vars
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| TrainError::Data(name.clone()))?;
            Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?)
        };
        let mut plain = warm(false, 0.5)?;
        let mut always = warm(true, 1.0)?;
        let mut never = warm(true, 0.0)?;
        assert!(projection(&always)?.iter().all(|&w| w == 0.0));
        let (p, a, n) = (plain.step()?, always.step()?, never.step()?);
        assert!(a.self_conditioned && !n.self_conditioned && !p.self_conditioned);
        assert_eq!(a.loss, p.loss, "a zero projection changes nothing");
        assert_eq!(n.loss, p.loss);
        assert!(
            projection(&always)?.iter().any(|&w| w != 0.0),
            "the step trained the projection"
        );
        assert!(
            projection(&never)?.iter().all(|&w| w == 0.0),
            "no estimate, no gradient"
        );
        // The export carries the projection and loads as a self-conditioned base.
        let out = dir.path().join("sc.safetensors");
        std::fs::write(&out, always.export_bytes(DType::F16)?).map_err(|e| TrainError::Data(e.to_string()))?;
        let base = crate::model::BaseModel::load(&crate::model::BaseSource::File(out.clone()), &dev)
            .map_err(|e| TrainError::Data(e.to_string()))?;
        assert!(base.config().self_condition);

        let bad = PretrainConfig {
            self_condition_rate: 1.5,
            ..micro()
        };
        assert!(
            bad.validate()
                .is_err_and(|e| e.to_string().contains("self_condition_rate"))
        );
        assert_eq!(micro_without("self_condition_rate").self_condition_rate, 0.5);
        Ok(())
    }

    #[test]
    fn bad_configs_name_the_field() {
        let bad = PretrainConfig { batch: 0, ..micro() };
        assert!(bad.validate().is_err_and(|e| e.to_string().contains("batch")));
        let bad = PretrainConfig { patch: 2, ..micro() };
        assert!(bad.validate().is_err_and(|e| e.to_string().contains("in_channels")));
        assert!(micro().with_overrides(&["nope=1".into()]).is_err());
        assert_eq!(
            micro().with_overrides(&["batch=3".into()]).map(|c| c.batch).ok(),
            Some(3)
        );
        for shift in [0.0, -1.0, f32::NAN] {
            let bad = PretrainConfig {
                timesteps: TimestepSampling::Shifted { shift },
                ..micro()
            };
            assert!(bad.validate().is_err_and(|e| e.to_string().contains("timesteps")));
        }
        let shifted = micro()
            .with_overrides(&["timesteps.kind=shifted".into(), "timesteps.shift=3".into()])
            .map(|c| c.timesteps)
            .ok();
        assert_eq!(shifted, Some(TimestepSampling::Shifted { shift: 3.0 }));
        // Switching a run's logit-normal timesteps to another kind: field by field the old kind's fields remain,
        // and the error says how to set the section whole; whole, it works.
        let logit = micro()
            .with_overrides(&["timesteps={kind=\"logit-normal\",mean=0.8,std=0.8}".into()])
            .expect("logit-normal");
        let e = logit
            .with_overrides(&["timesteps.kind=shifted".into(), "timesteps.shift=3".into()])
            .expect_err("the old fields remain")
            .to_string();
        assert!(
            e.contains("unknown field") && e.contains("--set 'timesteps={kind="),
            "{e}"
        );
        let whole = logit
            .with_overrides(&["timesteps={kind=\"shifted\",shift=3.0}".into()])
            .map(|c| c.timesteps)
            .ok();
        assert_eq!(whole, Some(TimestepSampling::Shifted { shift: 3.0 }));
    }

    /// A learning-rate decay set by `--set` reaches the optimiser: the records' rates follow `lr_at` (peak until
    /// `decay_from`, then linearly down), and a decay that would start at the last step is refused by name.
    #[test]
    fn learning_rate_decay_is_applied_and_validated() -> Result<(), TrainError> {
        let cfg = micro()
            .with_overrides(&[
                "steps=4".into(),
                "optim.decay=linear".into(),
                "optim.decay_from=2".into(),
                "optim.adamw.lr=0.001".into(),
            ])
            .expect("valid overrides");
        cfg.validate().expect("valid");
        let mut p = Pretrainer::new(cfg, &Device::Cpu)?;
        let lrs = (0..4).map(|_| p.step().map(|r| r.lr)).collect::<Result<Vec<_>, _>>()?;
        // 0-based steps 2 and 3 of 4 with the decay starting after step 2: factors 1 and 1/2.
        assert_eq!(lrs, [0.001, 0.001, 0.001, 0.0005]);
        let never = micro()
            .with_overrides(&[
                "steps=4".into(),
                "optim.decay=cosine".into(),
                "optim.decay_from=4".into(),
            ])
            .expect("parses");
        assert!(
            never
                .validate()
                .is_err_and(|e| e.to_string().contains("optim.decay_from"))
        );
        Ok(())
    }

    /// `reference_dropout` trains whole steps without references (and says so in the record); the references
    /// matter to the run; a config written before the field existed reads as 0 (no dropout, the old draws).
    #[test]
    fn reference_dropout_trains_whole_steps_without_references() -> Result<(), TrainError> {
        let dev = Device::Cpu;
        let losses = |p: &mut Pretrainer| -> Result<(Vec<f32>, Vec<bool>), TrainError> {
            let records = (0..3).map(|_| p.step()).collect::<Result<Vec<_>, _>>()?;
            Ok((
                records.iter().map(|r| r.loss).collect(),
                records.iter().map(|r| r.references_dropped).collect(),
            ))
        };
        let (always, dropped) = losses(&mut Pretrainer::new(
            PretrainConfig {
                reference_dropout: 1.0,
                ..micro()
            },
            &dev,
        )?)?;
        let (never, kept) = losses(&mut Pretrainer::new(
            PretrainConfig {
                reference_dropout: 0.0,
                ..micro()
            },
            &dev,
        )?)?;
        assert_eq!((dropped, kept), (vec![true; 3], vec![false; 3]));
        assert!(always.iter().all(|l| l.is_finite()));
        // adaLN-Zero: step 1 predicts 0 and step 2 learns only the final projection, so the blocks (and the
        // references, through attention) reach the prediction from step 3.
        assert_eq!(always[..2], never[..2]);
        assert_ne!(always[2], never[2]);
        assert_eq!(micro_without("reference_dropout").reference_dropout, 0.0);
        let bad = PretrainConfig {
            reference_dropout: 1.5,
            ..micro()
        };
        assert!(
            bad.validate()
                .is_err_and(|e| e.to_string().contains("reference_dropout"))
        );
        Ok(())
    }

    /// The shifted draw is the sampler's shift of a uniform draw: shift 1 is uniform draw for draw, and shift 3
    /// puts 1 − 0.7 / 2.8 = 25 % of the draws above t = 0.9 (uniform: 10 %).
    #[test]
    fn shifted_timesteps_train_more_at_high_noise() {
        let draws = |kind: TimestepSampling| {
            let mut rng = stream_rng(5, STREAM_NOISE, 1);
            (0..20_000).map(|_| kind.draw(&mut rng)).collect::<Vec<f32>>()
        };
        let uniform = draws(TimestepSampling::Uniform);
        assert_eq!(draws(TimestepSampling::Shifted { shift: 1.0 }), uniform);
        let above = |v: &[f32]| v.iter().filter(|&&t| t > 0.9).count() as f64 / v.len() as f64;
        let shifted = draws(TimestepSampling::Shifted { shift: 3.0 });
        assert!(shifted.iter().all(|t| (0.0..=1.0).contains(t)));
        assert!((above(&uniform) - 0.1).abs() < 0.01, "{}", above(&uniform));
        assert!((above(&shifted) - 0.25).abs() < 0.01, "{}", above(&shifted));
    }

    /// The tail: off, it returns the draw untouched (so runs without it draw what they drew); at fraction 0.2 from
    /// 0.9, logit-normal(0.8, 0.8)'s share above t = 0.97 (P(z > (logit 0.97 − 0.8) / 0.8) = 0.041 %) becomes
    /// 0.8 · 0.041 % + 0.2 · 0.3 = 6.03 %, every tail draw lies in (0.9, 1], and bad fields are named.
    #[test]
    fn timestep_tail_trains_next_to_pure_noise() {
        let kind = TimestepSampling::LogitNormal { mean: 0.8, std: 0.8 };
        let draws = |tail: TimestepTail| {
            let mut rng = stream_rng(5, STREAM_NOISE, 1);
            let mut tail_rng = stream_rng(5, STREAM_TIMESTEP_TAIL, 1);
            (0..40_000)
                .map(|_| tail.apply(kind.draw(&mut rng), &mut tail_rng))
                .collect::<Vec<f32>>()
        };
        let plain = {
            let mut rng = stream_rng(5, STREAM_NOISE, 1);
            (0..40_000).map(|_| kind.draw(&mut rng)).collect::<Vec<f32>>()
        };
        assert_eq!(draws(TimestepTail::default()), plain);
        let tailed = draws(TimestepTail {
            fraction: 0.2,
            from: 0.9,
        });
        let above = |v: &[f32], x: f32| v.iter().filter(|&&t| t > x).count() as f64 / v.len() as f64;
        assert!(
            (above(&plain, 0.97) - 0.00041).abs() < 0.0003,
            "{}",
            above(&plain, 0.97)
        );
        assert!(
            (above(&tailed, 0.97) - 0.0603).abs() < 0.004,
            "{}",
            above(&tailed, 0.97)
        );
        assert!(tailed.iter().all(|t| (0.0..=1.0).contains(t)));
        // Each draw is its own or lies in the tail's range.
        let moved: Vec<f32> = tailed
            .iter()
            .zip(&plain)
            .filter(|(a, b)| a != b)
            .map(|(a, _)| *a)
            .collect();
        assert!(moved.iter().all(|&t| t > 0.9 && t <= 1.0));
        assert!((moved.len() as f64 / 40_000.0 - 0.2).abs() < 0.01, "{}", moved.len());
        for (tail, field) in [
            (
                TimestepTail {
                    fraction: 1.5,
                    from: 0.9,
                },
                "timestep_tail.fraction",
            ),
            (
                TimestepTail {
                    fraction: 0.2,
                    from: 1.0,
                },
                "timestep_tail.from",
            ),
        ] {
            let bad = PretrainConfig {
                timestep_tail: tail,
                ..PretrainConfig::default()
            };
            assert!(bad.validate().is_err_and(|e| e.to_string().contains(field)), "{field}");
        }
        let set = PretrainConfig::default()
            .with_overrides(&["timestep_tail.fraction=0.2".into(), "timestep_tail.from=0.9".into()])
            .map(|c| c.timestep_tail);
        assert_eq!(
            set.ok(),
            Some(TimestepTail {
                fraction: 0.2,
                from: 0.9
            })
        );
    }

    /// The weighted loss on hand-computed numbers: errors 1, 2, 3, 4 with weights 1, 1, 3, 3 give
    /// (1 + 4 + 27 + 48) / 8 = 10; unweighted, the MSE 30 / 4 = 7.5.
    #[test]
    fn subject_weighted_loss_is_the_weighted_mean() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let e = Tensor::new(&[[[1f32, 2.], [3., 4.]]], &dev)?;
        let w = Tensor::new(&[[[1f32, 1.], [3., 3.]]], &dev)?;
        assert_eq!(velocity_loss(&e, None)?.to_scalar::<f32>()?, 7.5);
        assert_eq!(velocity_loss(&e, Some(&w))?.to_scalar::<f32>()?, 10.0);
        Ok(())
    }

    /// The weights follow the union of the masks token by token, in the layout of the image tokens: an 8×8 item
    /// with one subject on the top-left 4×4 square and one on the bottom-right pixel, patch 4: token 0 all 1 + λ,
    /// tokens 1 and 2 all 1, token 3 1 + λ on the last pixel of each channel only.
    #[test]
    fn subject_weights_follow_the_masks_in_token_layout() -> candle_core::Result<()> {
        let mut a = image::GrayImage::new(8, 8);
        for y in 0..4 {
            for x in 0..4 {
                a.put_pixel(x, y, image::Luma([255]));
            }
        }
        let mut b = image::GrayImage::new(8, 8);
        b.put_pixel(7, 7, image::Luma([255]));
        let w = subject_weight_tokens(&[a, b], 4.0, 4, &Device::Cpu)?;
        assert_eq!(w.dims(), &[1, 4, 48]);
        let w = w.squeeze(0)?.to_vec2::<f32>()?;
        assert!(w[0].iter().all(|&v| v == 5.0));
        assert!(w[1].iter().chain(&w[2]).all(|&v| v == 1.0));
        // Channel-major within a token (c, py, px): the last pixel of each channel is at 15, 31, 47.
        for (k, &v) in w[3].iter().enumerate() {
            assert_eq!(v, if k % 16 == 15 { 5.0 } else { 1.0 }, "element {k}");
        }
        // The same layout as the image's own tokens: a white pixel at (7, 7) lands where the weight does.
        let mut img = image::RgbImage::new(8, 8);
        img.put_pixel(7, 7, image::Rgb([255, 255, 255]));
        let t = tokens(&img, 4, &Device::Cpu)?.squeeze(0)?.to_vec2::<f32>()?;
        for (k, &v) in t[3].iter().enumerate() {
            assert_eq!(v, if k % 16 == 15 { 1.0 } else { -1.0 }, "element {k}");
        }
        Ok(())
    }

    /// `subject_weight` changes what a step optimises (step 1 predicts 0, so its loss is the weighted mean of the
    /// target's squares, not the plain one), configs written before it read as 0, and a bad value names the field.
    #[test]
    fn subject_weight_weights_the_loss_and_is_validated() -> Result<(), TrainError> {
        let dev = Device::Cpu;
        let first = |cfg: PretrainConfig| -> Result<f32, TrainError> { Ok(Pretrainer::new(cfg, &dev)?.step()?.loss) };
        let plain = first(micro())?;
        let weighted = first(PretrainConfig {
            subject_weight: 4.0,
            ..micro()
        })?;
        assert!(plain.is_finite() && weighted.is_finite());
        assert_ne!(plain, weighted);
        // Limited to t ≤ 0 (no sample) it is the plain MSE; to t ≤ 1 (every sample) the weighted one.
        let limited = |max_t| {
            first(PretrainConfig {
                subject_weight: 4.0,
                subject_weight_max_t: max_t,
                ..micro()
            })
        };
        assert_eq!(limited(0.0)?, plain);
        assert_eq!(limited(1.0)?, weighted);
        let old = micro_without("subject_weight");
        assert_eq!((old.subject_weight, old.subject_weight_max_t), (0.0, 1.0));
        for bad in [-1.0, f32::NAN, 2000.0] {
            let cfg = PretrainConfig {
                subject_weight: bad,
                ..micro()
            };
            assert!(
                cfg.validate().is_err_and(|e| e.to_string().contains("subject_weight")),
                "{bad}"
            );
        }
        for bad in [-0.1, f32::NAN, 1.5] {
            let cfg = PretrainConfig {
                subject_weight_max_t: bad,
                ..micro()
            };
            assert!(
                cfg.validate()
                    .is_err_and(|e| e.to_string().contains("subject_weight_max_t")),
                "{bad}"
            );
        }
        Ok(())
    }
}
