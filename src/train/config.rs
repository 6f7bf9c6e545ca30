//! The configuration of a training run: one TOML file (`runs/<name>/config.toml`), every field with a default,
//! unknown keys rejected, and `--set key=value` overrides addressed by dotted paths (`dpo.beta=5000`,
//! `masks.fusion.tau=0.2`, `lora.rank=4`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config_enum::ConfigEnum;

use crate::masks::{FusionParams, ReferencePool, Similarity};
use crate::model::lora::LoraConfig;
use crate::model::schedule::Parameterisation;
use crate::model::{BaseError, BaseLora, BaseModel, BaseSource};
use crate::pipeline::MaskSettings;

use super::negatives::{AugmentConfig, BaseNegativesConfig, LoserSource};
use super::objective::{ObjectiveConfig, ObjectiveKind};
use super::optim::AdamWParams;
use super::pairs::{PairsConfig, PairsError};

/// Upper bound of `steps` (TOML integers are i64; a billion steps is far beyond any run of this tool).
pub const MAX_STEPS: u64 = 1_000_000_000;

/// Whose hidden states feed Eq. 3 (`M_s`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HiddenSource {
    /// The frozen reference model (default): `M` is then a fixed function of (item, t, noise), so the weighted
    /// objective does not move with the policy, and the states come free with the reference pass that DPO runs
    /// anyway.
    #[default]
    Reference,
    /// The policy being trained (base + LoRA): follows what the fine-tuned model attends to.
    Policy,
}

/// How `M_s` is computed from the backbone (Eq. 3–6).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttentionConfig {
    /// Reference or policy hidden states.
    pub source: HiddenSource,
    /// Double-stream blocks averaged in Eq. 3 (0-based); empty = all of them.
    pub layers: Vec<usize>,
    /// Cosine (default) or Eq. 3's squared-norm form.
    pub similarity: Similarity,
    /// Eq. 3's `pool`: the mean of the reference's foreground tokens (default) or of all its tokens.
    pub pool: ReferencePool,
}

/// Everything about the weight map `M`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaskConfig {
    /// `M_prior` pooling and the `M_d` entropy window. The token stride is always the model's (pixels per
    /// token): training replaces the configured `prior.stride` with it.
    pub settings: MaskSettings,
    /// Variant, τ, γ.
    pub fusion: FusionParams,
    /// `M_s` source, layers and similarity.
    pub attention: AttentionConfig,
}

/// Which data a run reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// DIP dataset folder; absent = the bundled synthetic dataset.
    pub dir: Option<PathBuf>,
    /// Item ids to train on; empty = every valid item.
    pub items: Vec<String>,
    /// Pair quality and selection ([`super::pairs`]).
    pub pairs: PairsConfig,
    /// Loser source: the dataset's, another item's winner, a base sample, or an augmentation of the winner
    /// ([`super::negatives`]).
    pub negatives: LoserSource,
    /// Sampler settings of `negatives = "base"`.
    pub base_negatives: BaseNegativesConfig,
    /// Augmentation ranges of `negatives = "augmented"`.
    pub augment: AugmentConfig,
}

/// How the objective changes over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// The configured objective from the first step (with `dpo.sft_lambda` as the joint SFT term).
    #[default]
    Joint,
    /// SFT (winner regression) for `sft_steps` steps, then the configured objective.
    Sequential,
}

/// `[schedule]`: joint or sequential SFT → preference training.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Joint or sequential.
    pub kind: ScheduleKind,
    /// `sequential`: steps `1..=sft_steps` train SFT.
    pub sft_steps: u64,
}

impl ScheduleConfig {
    /// The objective of step `step` (1-based) for a run configured with `objective`.
    pub fn objective_at(&self, step: u64, objective: ObjectiveKind) -> ObjectiveKind {
        match self.kind {
            ScheduleKind::Sequential if step <= self.sft_steps => ObjectiveKind::Sft,
            _ => objective,
        }
    }
}

/// The base model and its inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    /// The transformer: `bundled`, `random:SEED` or a safetensors path (`transformer` in a backbone profile).
    #[serde(alias = "transformer")]
    pub base: BaseSource,
    /// LoRAs merged into the base when it loads, in order (UNO's `dit_lora.safetensors`: x-flux naming), each
    /// `{ path = "…", scale = 1.0 }`. FocusDPO's own LoRA trains on top of the merged base.
    pub base_loras: Vec<BaseLora>,
    /// Side of the reference images fed to the model, in pixels (UNO also feeds references smaller than the
    /// target); a multiple of the patch size.
    pub reference_px: u32,
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a build with the `cuda` feature).
    pub device: String,
    /// The dtype the transformer's frozen weights are held in: `f32` (default), `bf16` or `f16` (half the
    /// memory; LoRA, optimiser state, masks and the loss stay f32).
    pub dtype: crate::model::weights::WeightDtype,
    /// The dtype of the transformer's activations, as autocast / accelerate's `mixed_precision`: `f32`
    /// (default), `bf16` or `f16` (half the activation memory of a training step; norms and softmax in f32; LoRA
    /// weights, optimiser state, masks and the loss stay f32). [`crate::model::Mmdit::set_activation_dtype`].
    pub activations: crate::model::weights::WeightDtype,
    /// FLUX autoencoder `ae.safetensors` (BFL naming): images are encoded with it instead of pixel-unshuffled.
    pub autoencoder: Option<PathBuf>,
    /// T5 encoder for FLUX's `txt`: a safetensors file (T5 v1.1 XXL sizes) or a folder with `config.json` and
    /// shards (FLUX.1's `text_encoder_2/`).
    pub t5: Option<PathBuf>,
    /// `tokenizer.json` of the T5 encoder.
    pub t5_tokenizer: Option<PathBuf>,
    /// T5 tokens per prompt (512 for FLUX.1-dev, 256 for schnell).
    pub t5_max_tokens: usize,
    /// CLIP text encoder for FLUX's `y`: a safetensors file (CLIP-L sizes) or a folder with `config.json`
    /// (FLUX.1's `text_encoder/`).
    pub clip: Option<PathBuf>,
    /// `tokenizer.json` of the CLIP text encoder.
    pub clip_tokenizer: Option<PathBuf>,
    /// Guidance strength fed to a guidance-distilled base (FLUX.1-dev's `guidance_in`) in training forwards;
    /// unused by models without it. UNO and x-flux train with 1.0.
    pub guidance: f32,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            base: BaseSource::Bundled,
            base_loras: Vec::new(),
            reference_px: 32,
            device: "cpu".into(),
            dtype: crate::model::weights::WeightDtype::F32,
            activations: crate::model::weights::WeightDtype::F32,
            autoencoder: None,
            t5: None,
            t5_tokenizer: None,
            t5_max_tokens: crate::model::flux_text::FLUX_T5_TOKENS,
            clip: None,
            clip_tokenizer: None,
            guidance: 1.0,
        }
    }
}

impl ModelSettings {
    /// The compute device named by `device`.
    pub fn device(&self) -> Result<candle_core::Device, ConfigError> {
        device_from_name(&self.device).map_err(|message| ConfigError::Invalid {
            field: "model.device",
            message,
        })
    }

    /// Checks that the FLUX encoder paths come in complete sets (T5 and CLIP, each with its tokenizer).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let inv = |field, message: &str| {
            Err(ConfigError::Invalid {
                field,
                message: message.to_string(),
            })
        };
        if self.t5.is_some() != self.clip.is_some() {
            return inv(
                "model.t5",
                "FLUX needs both text encoders: set model.t5 and model.clip together",
            );
        }
        if self.t5.is_some() && self.t5_tokenizer.is_none() {
            return inv("model.t5_tokenizer", "model.t5 needs its tokenizer.json");
        }
        if self.clip.is_some() && self.clip_tokenizer.is_none() {
            return inv("model.clip_tokenizer", "model.clip needs its tokenizer.json");
        }
        if self.t5_max_tokens == 0 {
            return inv("model.t5_max_tokens", "must be at least 1");
        }
        Ok(())
    }

    /// Makes every relative path of these settings relative to `dir` (a backbone profile's folder).
    pub fn resolve_paths(&mut self, dir: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        if let BaseSource::File(p) = &mut self.base {
            resolve(p);
        }
        for lora in &mut self.base_loras {
            resolve(&mut lora.path);
        }
        for p in [
            &mut self.autoencoder,
            &mut self.t5,
            &mut self.t5_tokenizer,
            &mut self.clip,
            &mut self.clip_tokenizer,
        ]
        .into_iter()
        .flatten()
        {
            resolve(p);
        }
    }

    /// Loads the base on `device` with the base LoRAs, autoencoder and text encoders these settings name. Every
    /// named file is checked first: missing ones are reported together, before any weight is read.
    pub fn load_base(&self, device: &candle_core::Device) -> Result<BaseModel, BaseError> {
        let missing = super::backbone::missing_files(self);
        if !missing.is_empty() {
            return Err(BaseError::MissingFiles(missing));
        }
        use crate::model::weights::{count_read, loading_part, tracked, weight_bytes};
        if let Some(progress) = tracked() {
            progress.set_total(self.weight_files().iter().map(|p| weight_bytes(p)).sum());
        }
        loading_part("transformer");
        let mut base = BaseModel::load_as(&self.base, device, self.dtype)?;
        base.mmdit.set_activation_dtype(self.activations.dtype());
        for lora in &self.base_loras {
            loading_part(&format!("base LoRA {}", lora.path.display()));
            base = base.with_base_lora(&lora.path, lora.scale)?;
            count_read(weight_bytes(&lora.path));
        }
        base.train_guidance = self.guidance;
        if let Some(ae) = &self.autoencoder {
            loading_part("autoencoder");
            base = base.with_autoencoder(ae)?;
        }
        if let (Some(t5), Some(t5_tok), Some(clip), Some(clip_tok)) =
            (&self.t5, &self.t5_tokenizer, &self.clip, &self.clip_tokenizer)
        {
            loading_part("T5 and CLIP text encoders");
            base = base.with_text_encoders((t5, t5_tok), self.t5_max_tokens, (clip, clip_tok))?;
        }
        Ok(base)
    }

    /// The weight files (or folders of shards) [`Self::load_base`] reads.
    pub fn weight_files(&self) -> Vec<std::path::PathBuf> {
        let mut files = match &self.base {
            BaseSource::Bundled => vec![crate::model::base::bundled_base_path()],
            BaseSource::File(p) => vec![p.clone()],
            BaseSource::Random(_) | BaseSource::RandomFluxDev(_) => Vec::new(),
        };
        files.extend(self.base_loras.iter().map(|l| l.path.clone()));
        files.extend(self.autoencoder.iter().cloned());
        if self.t5_tokenizer.is_some() && self.clip_tokenizer.is_some() {
            files.extend(self.t5.iter().cloned());
            files.extend(self.clip.iter().cloned());
        }
        files
    }
}

/// Timestep sampling.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NoiseConfig {
    /// Rectified flow (FLUX/UNO) or ε-prediction (DDPM).
    pub parameterisation: Parameterisation,
    /// Lower bound of `t` (fraction of the schedule, in `[0, 1]`).
    pub t_min: f32,
    /// Upper bound of `t`.
    pub t_max: f32,
}

impl Default for NoiseConfig {
    fn default() -> Self {
        Self {
            parameterisation: Parameterisation::RectifiedFlow,
            t_min: 0.0,
            t_max: 1.0,
        }
    }
}

/// Optimisation schedule.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// AdamW.
    pub adamw: AdamWParams,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Global grad-norm clip (0 = off).
    pub grad_clip: f64,
    /// How the learning rate falls after the warm-up ([`crate::train::optim::lr_at`]): held (`constant`), or a
    /// `linear` or `cosine` decay to 0 at the run's last step, as diffusers' `lr_scheduler`.
    pub decay: LrDecay,
    /// The step the decay starts after (0: the end of the warm-up). A warmup-stable-decay cooldown continues a
    /// run from its step-N checkpoint with `decay_from = N`.
    pub decay_from: u64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            adamw: AdamWParams::default(),
            warmup_steps: 10,
            grad_clip: 1.0,
            decay: LrDecay::Constant,
            decay_from: 0,
        }
    }
}

impl OptimConfig {
    /// Checks the schedule against the run's `steps`: a decay must start before the last step.
    pub fn check_schedule(&self, steps: u64) -> Result<(), ConfigError> {
        if self.decay != LrDecay::Constant && self.decay_from >= steps {
            return Err(ConfigError::Invalid {
                field: "optim.decay_from",
                message: format!(
                    "{} is not before the run's last step {steps}: the {} decay would never start; set it below \
                     `steps` (or optim.decay = \"constant\")",
                    self.decay_from,
                    self.decay.config_name()
                ),
            });
        }
        Ok(())
    }
}

/// The learning rate's course after the warm-up ([`OptimConfig::decay`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrDecay {
    /// Held at the peak.
    #[default]
    Constant,
    /// Falls linearly to 0 at the last step (diffusers' `linear`).
    Linear,
    /// Falls along a half cosine to 0 at the last step (diffusers' `cosine`).
    Cosine,
}

crate::config_enum!(LrDecay, [LrDecay::Constant, LrDecay::Linear, LrDecay::Cosine]);

/// Logging and checkpoint cadence.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Checkpoint every N steps (and always at the end or on stop); 0 = only at the end.
    pub checkpoint_every: u64,
    /// Send a mask snapshot event every N steps (0 = never).
    pub snapshot_every: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            checkpoint_every: 50,
            snapshot_every: 5,
        }
    }
}

/// A whole run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// SFT, DPO or FocusDPO.
    pub objective: ObjectiveKind,
    /// Optimiser steps (one DIP pair each).
    pub steps: u64,
    /// Seed of every random choice (item order, t, noise, LoRA init).
    pub seed: u64,
    /// Data.
    pub data: DataConfig,
    /// Base model.
    pub model: ModelSettings,
    /// LoRA.
    pub lora: LoraConfig,
    /// Optimiser.
    pub optim: OptimConfig,
    /// β, margin, λ, δ, mask normalisation.
    pub dpo: ObjectiveConfig,
    /// Timestep sampling.
    pub noise: NoiseConfig,
    /// The weight map.
    pub masks: MaskConfig,
    /// Cadence.
    pub log: LogConfig,
    /// Sample sheets at each checkpoint (`samples/step-N.png`; off unless `samples.items` > 0).
    pub samples: crate::train::samples::SampleSheetConfig,
    /// Joint or sequential SFT → objective.
    pub schedule: ScheduleConfig,
    /// How each step is computed (memory against time).
    pub train: TrainSettings,
}

/// How a step is computed: choices that trade memory for time without changing the result, and the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSettings {
    /// Pairs (items) whose LoRA gradients are averaged before each optimiser step: the effective batch. Steps,
    /// logs, checkpoints and the learning-rate schedule count optimiser steps.
    pub grad_accum: u32,
    /// Block checkpointing: each block of the policy's forward keeps only its inputs and is recomputed in
    /// backward (one more forward of the policy per step; activation memory of one block instead of all).
    pub checkpoint_blocks: bool,
    /// A DPO pair's winner and loser run their policy forward and backward one after the other instead of as
    /// one batch of two, so only one sequence's activations are held (about half the activation memory at the
    /// cost of one more policy forward without gradients per step). The gradients are the same: the loser's
    /// prediction enters the loss as a leaf, and its gradient is pushed through a second forward.
    pub split_pair: bool,
}

/// Most pairs a step may accumulate.
pub const MAX_GRAD_ACCUM: u32 = 4096;

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            grad_accum: 1,
            checkpoint_blocks: false,
            split_pair: false,
        }
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            objective: ObjectiveKind::FocusDpo,
            steps: 100,
            seed: 0,
            data: DataConfig::default(),
            model: ModelSettings::default(),
            lora: LoraConfig::default(),
            optim: OptimConfig::default(),
            dpo: ObjectiveConfig::default(),
            noise: NoiseConfig::default(),
            masks: MaskConfig::default(),
            log: LogConfig::default(),
            samples: crate::train::samples::SampleSheetConfig::default(),
            schedule: ScheduleConfig::default(),
            train: TrainSettings::default(),
        }
    }
}

/// A config that cannot be read or does not make sense; the message names the file and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// TOML syntax or a field of the wrong type / unknown field (toml's message has line and column).
    #[error("{path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// What is wrong, where.
        message: String,
    },
    /// A `--set` override is malformed or names no field.
    #[error("--set {arg}: {message}")]
    Override {
        /// The override as given.
        arg: String,
        /// What is wrong.
        message: String,
    },
    /// A value out of range.
    #[error("config field `{field}`: {message}")]
    Invalid {
        /// Dotted field path.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl RunConfig {
    /// The objective of step `step` (1-based) under the schedule.
    pub fn objective_at(&self, step: u64) -> ObjectiveKind {
        self.schedule.objective_at(step, self.objective)
    }

    /// Reads a TOML file (missing fields take their defaults).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let cfg: Self = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
        Ok(cfg)
    }

    /// The config as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot serialise config: {e}\n"))
    }

    /// Applies `key=value` overrides ([`apply_overrides`]).
    pub fn with_overrides(&self, overrides: &[String]) -> Result<Self, ConfigError> {
        apply_overrides(self, overrides)
    }

    /// This config with the keys that the TOML file at `path` sets replaced by the file's values (keys the file
    /// does not mention keep this config's values).
    pub fn overlaid_with_file(&self, path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        self.overlaid_with_toml(&text, path)
    }

    /// This config with the keys that `text` (TOML) sets replaced; errors name `origin`.
    fn overlaid_with_toml(&self, text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let parse = |message: String| ConfigError::Parse {
            path: origin.to_path_buf(),
            message,
        };
        // Parsed on its own first (every field has a default): type errors and unknown keys come with the text's
        // line and column, which the merged table below no longer knows.
        Self::from_toml(text).map_err(parse)?;
        let overlay: toml::Table = toml::from_str(text).map_err(|e| parse(e.to_string().trim_end().to_string()))?;
        let mut root = toml::Table::try_from(self).map_err(|e| parse(e.to_string()))?;
        merge_tables(&mut root, overlay);
        root.try_into()
            .map_err(|e: toml::de::Error| parse(e.message().to_string()))
    }

    /// This config with a preset's keys applied ([`Preset`]).
    pub fn with_preset(&self, preset: Preset) -> Result<Self, ConfigError> {
        self.overlaid_with_toml(preset.toml(), &PathBuf::from(preset.file()))
    }

    /// The settings in which `other` differs from this config, key by key (dotted paths in file order).
    pub fn changes_to(&self, other: &Self) -> Vec<ConfigChange> {
        let (mine, theirs) = (flatten(self), flatten(other));
        let mut keys: Vec<&String> = mine.keys().chain(theirs.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter(|k| mine.get(*k) != theirs.get(*k))
            .map(|k| ConfigChange {
                key: k.clone(),
                from: mine.get(k).cloned().unwrap_or_else(|| UNSET.to_string()),
                to: theirs.get(k).cloned().unwrap_or_else(|| UNSET.to_string()),
            })
            .collect()
    }

    /// Checks ranges that the types do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let inv = |field, message: String| Err(ConfigError::Invalid { field, message });
        // Each knob's type and range, as declared in the registry.
        crate::knobs::check(self)?;
        let n = &self.noise;
        if !(0.0..=1.0).contains(&n.t_min) || !(0.0..=1.0).contains(&n.t_max) || n.t_min > n.t_max {
            return inv(
                "noise",
                format!("need 0 ≤ t_min ≤ t_max ≤ 1, got {} and {}", n.t_min, n.t_max),
            );
        }
        if self.train.grad_accum == 0 || self.train.grad_accum > MAX_GRAD_ACCUM {
            return inv(
                "train.grad_accum",
                format!(
                    "must be in 1..={MAX_GRAD_ACCUM} (pairs a step), got {}",
                    self.train.grad_accum
                ),
            );
        }
        if self.model.reference_px == 0 {
            return inv("model.reference_px", "must be positive".into());
        }
        self.data.pairs.validate().map_err(|e| match e {
            PairsError::Config { field, message } => ConfigError::Invalid { field, message },
            other => ConfigError::Invalid {
                field: "data.pairs",
                message: other.to_string(),
            },
        })?;
        let b = &self.data.base_negatives;
        if b.steps == 0 || b.steps > 1000 {
            return inv(
                "data.base_negatives.steps",
                format!("must be in 1..=1000, got {}", b.steps),
            );
        }
        if !(b.cfg_scale.is_finite() && b.cfg_scale >= 0.0) {
            return inv(
                "data.base_negatives.cfg_scale",
                format!("must be ≥ 0, got {}", b.cfg_scale),
            );
        }
        if !(b.shift.is_finite() && b.shift > 0.0) {
            return inv("data.base_negatives.shift", format!("must be > 0, got {}", b.shift));
        }
        if let Err((field, message)) = self.data.augment.check() {
            return inv(field, message);
        }
        if let Err((field, message)) = self.samples.check() {
            return inv(field, message);
        }
        self.optim.check_schedule(self.steps)?;
        self.model.validate()
    }
}

/// Named sets of settings a run can start from (`focusdpo train --preset NAME`); each is a TOML file under
/// `assets/presets/`, embedded in the binary, that overlays the defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// The paper's training settings (§5.0.1): rank-32 LoRA, AdamW lr 1e-8, 2000 steps, τ = 0.1, γ = 0.3.
    Paper,
}

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 1] = [Preset::Paper];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Paper => "paper",
        }
    }

    /// The preset's file in the repository (also named in errors).
    pub fn file(self) -> &'static str {
        match self {
            Preset::Paper => "assets/presets/paper.toml",
        }
    }

    /// The preset's TOML.
    pub fn toml(self) -> &'static str {
        match self {
            Preset::Paper => include_str!("../../assets/presets/paper.toml"),
        }
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Preset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|p| p.name()).collect();
            format!("unknown preset `{s}` (presets: {})", names.join(", "))
        })
    }
}

/// How a key without a value (an unset option) shows in a [`ConfigChange`].
const UNSET: &str = "(unset)";

/// One setting that differs between two configs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigChange {
    /// Dotted key (`dpo.beta`).
    pub key: String,
    /// The value in the first config, as TOML.
    pub from: String,
    /// The value in the second config, as TOML.
    pub to: String,
}

impl std::fmt::Display for ConfigChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} → {}", self.key, self.from, self.to)
    }
}

/// Every leaf of a config as `dotted.key → TOML value` (arrays are leaves).
fn flatten<T: Serialize>(config: &T) -> std::collections::BTreeMap<String, String> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut std::collections::BTreeMap<String, String>) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match value {
                toml::Value::Table(t) => walk(&path, t, out),
                v => {
                    out.insert(path, v.to_string());
                }
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    if let Ok(table) = toml::Table::try_from(config) {
        walk("", &table, &mut out);
    }
    out
}

/// Deep-merges `overlay` into `root`: tables merge key by key, any other value replaces.
fn merge_tables(root: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (root.get_mut(&key), value) {
            (Some(toml::Value::Table(mine)), toml::Value::Table(theirs)) => merge_tables(mine, theirs),
            (_, value) => {
                root.insert(key, value);
            }
        }
    }
}

/// The compute device named `cpu`, `cuda` (GPU 0) or `cuda:N`; the error says what was wrong with the name (or
/// why CUDA could not start, e.g. a build without the `cuda` feature).
pub fn device_from_name(name: &str) -> Result<candle_core::Device, String> {
    match name.trim() {
        "cpu" => Ok(candle_core::Device::Cpu),
        d if d == "cuda" || d.starts_with("cuda:") => {
            let ordinal = match d.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map_err(|_| format!("`{d}`: the GPU index must be a number"))?,
                None => 0,
            };
            candle_core::Device::new_cuda(ordinal).map_err(|e| format!("`{d}`: {e}"))
        }
        other => Err(format!("`{other}` is not cpu, cuda or cuda:N")),
    }
}

/// Applies `key=value` overrides to any serde config (run and pretraining configs). `value` is read as a TOML value (`0.2`, `true`, `"text"`, `[0, 2]`); a bare
/// word that is not valid TOML is taken as a string (`objective=dpo`).
pub fn apply_overrides<T: Serialize + serde::de::DeserializeOwned>(
    config: &T,
    overrides: &[String],
) -> Result<T, ConfigError> {
    let mut root = toml::Table::try_from(config).map_err(|e| ConfigError::Override {
        arg: String::new(),
        message: e.to_string(),
    })?;
    for arg in overrides {
        let err = |message: String| ConfigError::Override {
            arg: arg.clone(),
            message,
        };
        let (key, raw) = arg.split_once('=').ok_or_else(|| err("expected key=value".into()))?;
        let key = key.trim();
        let value = parse_value(raw.trim());
        let parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(err(format!("`{key}` is not a dotted field path")));
        }
        let (last, parents) = parts.split_last().ok_or_else(|| err("empty key".into()))?;
        let mut table = &mut root;
        for (depth, p) in parents.iter().enumerate() {
            table = match table.get_mut(*p) {
                Some(toml::Value::Table(t)) => t,
                Some(_) => {
                    return Err(err(format!(
                        "`{}` is a value, not a section",
                        parts[..=depth].join(".")
                    )));
                }
                None => return Err(err(format!("no section `{}`", parts[..=depth].join(".")))),
            };
        }
        table.insert((*last).to_string(), value);
    }
    let text = toml::to_string(&root).map_err(|e| ConfigError::Override {
        arg: overrides.join(" "),
        message: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e: toml::de::Error| {
        let mut message = e.message().to_string();
        // A tagged section (`timesteps.kind`) switched to another kind keeps the old kind's fields, which the new
        // one refuses: say how to replace the section whole.
        let switched = overrides
            .iter()
            .filter_map(|o| o.split_once('=').map(|(k, _)| k.trim()))
            .find_map(|k| k.strip_suffix(".kind"));
        if let Some(section) = switched.filter(|_| message.contains("unknown field")) {
            message.push_str(&format!(
                "; `{section}.kind` switched to another kind keeps the old kind's fields: set the section whole, \
                 e.g. --set '{section}={{kind=\"…\", …}}'"
            ));
        }
        ConfigError::Override {
            arg: overrides.join(" "),
            message,
        }
    })
}

/// Reads a TOML config file of any serde config type (errors name the file, line and column).
pub fn read_toml_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e: toml::de::Error| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })
}

fn parse_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

crate::config_enum!(HiddenSource, [HiddenSource::Reference, HiddenSource::Policy]);
crate::config_enum!(ScheduleKind, [ScheduleKind::Joint, ScheduleKind::Sequential]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_round_trips_through_toml() {
        let cfg = RunConfig::default();
        let back = RunConfig::from_toml(&cfg.to_toml()).expect("parses");
        assert_eq!(back, cfg);
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn overrides_set_nested_fields_with_typed_values() {
        let cfg = RunConfig::default()
            .with_overrides(&[
                "objective=dpo".into(),
                "dpo.beta=5000".into(),
                "masks.fusion.tau=0.25".into(),
                "masks.fusion.variant=no-ms".into(),
                "masks.attention.layers=[0, 2]".into(),
                "dpo.pair_filter_delta=0.01".into(),
                "model.base=random:3".into(),
                "data.dir=some/dir".into(),
                "data.pairs.quality=ratio".into(),
                "data.pairs.select=top-percent".into(),
                "data.pairs.top_percent=5.33".into(),
                "data.pairs.dynamic=otsu".into(),
                "data.pairs.bottom_percent=10".into(),
                "data.negatives=shuffled".into(),
                "schedule.kind=sequential".into(),
                "schedule.sft_steps=3".into(),
            ])
            .expect("valid overrides");
        assert_eq!(cfg.objective, ObjectiveKind::Dpo);
        assert_eq!(cfg.dpo.beta, 5000.0);
        assert_eq!(cfg.masks.fusion.tau, 0.25);
        assert_eq!(cfg.masks.fusion.variant, crate::masks::MaskVariant::NoMs);
        assert_eq!(cfg.masks.attention.layers, vec![0, 2]);
        assert_eq!(cfg.dpo.pair_filter_delta, Some(0.01));
        assert_eq!(cfg.model.base, BaseSource::Random(3));
        assert_eq!(cfg.data.dir, Some(PathBuf::from("some/dir")));
        use crate::train::pairs::{DynamicThreshold, PairQuality, PairSelect};
        assert_eq!(cfg.data.pairs.quality, PairQuality::Ratio);
        assert_eq!(cfg.data.pairs.select, PairSelect::TopPercent);
        assert_eq!(cfg.data.pairs.top_percent, 5.33);
        assert_eq!(cfg.data.pairs.dynamic, DynamicThreshold::Otsu);
        assert_eq!(cfg.data.pairs.bottom_percent, 10.0);
        assert_eq!(cfg.data.negatives, LoserSource::Shuffled);
        assert_eq!(cfg.schedule.kind, ScheduleKind::Sequential);
        assert!(cfg.validate().is_ok());
        assert_eq!(
            (1..=5).map(|s| cfg.objective_at(s)).collect::<Vec<_>>(),
            [
                ObjectiveKind::Sft,
                ObjectiveKind::Sft,
                ObjectiveKind::Sft,
                ObjectiveKind::Dpo,
                ObjectiveKind::Dpo
            ]
        );
    }

    #[test]
    fn a_config_written_before_the_data_knobs_reads_with_todays_behaviour() {
        let cfg = RunConfig::from_toml("steps = 4\n[data]\nitems = [\"a\"]\n").expect("old config");
        assert_eq!(cfg.data.pairs, PairsConfig::default());
        assert!(cfg.data.pairs.keeps_everything());
        assert_eq!(cfg.data.negatives, LoserSource::Dataset);
        assert_eq!(cfg.schedule, ScheduleConfig::default());
        assert_eq!(cfg.objective_at(1), cfg.objective);
        let bad = RunConfig::default()
            .with_overrides(&["data.pairs.top_percent=0".into()])
            .expect("parses");
        assert!(
            bad.validate()
                .expect_err("range")
                .to_string()
                .contains("data.pairs.top_percent")
        );
        let bad = RunConfig::default()
            .with_overrides(&["data.negatives=elsewhere".into()])
            .expect_err("unknown variant");
        assert!(bad.to_string().contains("elsewhere"), "{bad}");
    }

    #[test]
    fn changes_are_named_key_by_key_and_equal_values_are_no_change() {
        let run = RunConfig::default()
            .with_overrides(&["dpo.beta=5000".into(), "data.dir=d".into()])
            .expect("run");
        assert!(run.changes_to(&run.clone()).is_empty());
        let same_by_another_path = run.with_overrides(&["dpo.beta=5000.0".into()]).expect("same");
        assert!(
            run.changes_to(&same_by_another_path).is_empty(),
            "5000 and 5000.0 are one value"
        );
        let other = run
            .with_overrides(&["dpo.beta=2500".into(), "objective=dpo".into()])
            .expect("other");
        let mut other = other;
        other.data.dir = None;
        let changes: Vec<String> = run.changes_to(&other).iter().map(ToString::to_string).collect();
        assert_eq!(
            changes,
            [
                "data.dir: \"d\" → (unset)",
                "dpo.beta: 5000.0 → 2500.0",
                "objective: \"focus-dpo\" → \"dpo\""
            ]
        );
    }

    #[test]
    fn a_file_overlay_changes_only_the_keys_it_names() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("c.toml");
        std::fs::write(&path, "steps = 7\n[dpo]\nbeta = 10.0\n").expect("write");
        let start = RunConfig::default()
            .with_overrides(&["masks.fusion.tau=0.2".into()])
            .expect("start");
        let cfg = start.overlaid_with_file(&path).expect("overlay");
        assert_eq!((cfg.steps, cfg.dpo.beta, cfg.masks.fusion.tau), (7, 10.0, 0.2));
        std::fs::write(&path, "[dpo]\nbeta = \"x\"\n").expect("write");
        let e = start.overlaid_with_file(&path).expect_err("type").to_string();
        assert!(e.contains("c.toml") && e.contains("beta"), "{e}");
    }

    #[test]
    fn the_paper_preset_holds_the_papers_settings_and_nothing_else_changes() {
        let paper = RunConfig::default()
            .with_preset(Preset::Paper)
            .expect("the preset parses");
        assert!(paper.validate().is_ok());
        assert_eq!(paper.steps, 2000);
        assert_eq!((paper.lora.rank, paper.lora.alpha), (32, 32.0));
        assert_eq!(paper.optim.adamw.lr, 1e-8);
        assert_eq!((paper.masks.fusion.tau, paper.masks.fusion.gamma), (0.1, 0.3));
        let changed: Vec<String> = RunConfig::default()
            .changes_to(&paper)
            .into_iter()
            .map(|c| c.key)
            .collect();
        assert_eq!(changed, ["lora.alpha", "lora.rank", "optim.adamw.lr", "steps"]);
        assert_eq!("paper".parse::<Preset>(), Ok(Preset::Paper));
        assert!(
            "papr"
                .parse::<Preset>()
                .expect_err("unknown")
                .contains("presets: paper")
        );
    }

    #[test]
    fn devices_parse_and_cuda_without_the_feature_is_a_clear_error() {
        let mut m = ModelSettings::default();
        assert!(m.device().expect("cpu").is_cpu());
        m.device = "tpu".into();
        assert!(m.device().expect_err("tpu").to_string().contains("model.device"));
        m.device = "cuda:x".into();
        assert!(m.device().is_err());
        if !cfg!(feature = "cuda") {
            m.device = "cuda:0".into();
            assert!(m.device().expect_err("no cuda").to_string().contains("cuda:0"));
        }
    }

    #[test]
    fn bad_overrides_and_files_name_the_problem() {
        let base = RunConfig::default();
        let msg = |o: &str| base.with_overrides(&[o.to_string()]).expect_err(o).to_string();
        assert!(msg("dpo.bta=1").contains("bta"), "{}", msg("dpo.bta=1"));
        assert!(msg("nosuch.x=1").contains("no section `nosuch`"));
        assert!(msg("steps").contains("key=value"));
        assert!(msg("dpo.beta=abc").contains("beta"), "{}", msg("dpo.beta=abc"));
        assert!(msg("masks.fusion.variant=bogus").contains("bogus"));
        assert!(msg("steps.x=1").contains("not a section"));
        let err = RunConfig::from_toml("steps = 10\n[dpo]\nbeta = \"high\"\n").expect_err("type error");
        assert!(err.contains("line 3"), "{err}");
        let err = RunConfig::from_toml("stepz = 10\n").expect_err("unknown");
        assert!(err.contains("stepz"), "{err}");
        let invalid = base.with_overrides(&["masks.fusion.tau=1.5".into()]).expect("parses");
        assert!(invalid.validate().expect_err("range").to_string().contains("tau"));
    }
}
