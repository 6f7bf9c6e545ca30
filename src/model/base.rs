//! The base model of a run: MMDiT + prompt tables + token packing, loaded from one safetensors file.
//!
//! File layout: FLUX tensor names for the MMDiT (so a FLUX/UNO checkpoint is the same format), plus the tiny
//! model's prompt tables (`prompt_embed.*`, see [`super::text`]). The safetensors metadata carries
//! `focusdpo.config` (the [`Config`] as JSON) and `focusdpo.patch` (pixel-unshuffle factor). A file without
//! them is a FLUX checkpoint in BFL naming whose sizes are read from its tensor shapes
//! ([`super::flux_shapes`]: FLUX.1-dev, schnell or smaller; patch 2 on VAE latents), which needs the FLUX
//! autoencoder ([`BaseModel::with_autoencoder`]) and text encoders ([`BaseModel::with_text_encoders`]), given by
//! path, and may carry UNO's LoRA ([`BaseModel::with_base_lora`]); see `docs/backbone.md`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::codec::{CodecError, FluxAutoencoder, ImageCodec};
use super::flux_shapes::flux_layout_from_shapes;
use super::flux_text::{ClipTextEncoder, FluxTextEncoders, T5TextEncoder, TextConditioner};
use super::hf::LoadError;
use super::mmdit::{Mmdit, ModelError};
use super::schedule::Parameterisation;
use super::text::{PromptEncoder, random_prompt_tables};
use super::weights::{WeightDtype, WeightsError, read_header, tensor_shapes, var_builder};
use super::xflux_lora::{BaseLoraPiece, is_xflux_lora, read_xflux_lora};
use super::{Config, Prediction, testing};

/// Metadata key of the JSON config.
pub const META_CONFIG: &str = "focusdpo.config";
/// Metadata key of the patch size.
pub const META_PATCH: &str = "focusdpo.patch";

/// Metadata key of the sampler settings the base recommends ([`SamplerChoices`] as JSON).
pub const META_SAMPLING: &str = "focusdpo.sampling";

/// Sampler settings as a base file recommends them (found by evaluating it: a diffusers pipeline ships its
/// scheduler config beside the weights the same way), a config or a command line chooses them: each one left
/// out (`None`) is decided further down — a choice wins over the base's recommendation, which wins over the
/// sampler's defaults (`eval::sampler::SampleSettings`; the rule is `SamplerChoices::resolve` there). So a config
/// that names nothing samples every base the way its evaluation found best (the bundled base wants reference
/// guidance), and a value it names always wins. A config written with every value (as older runs' `config.toml`
/// files are) samples exactly as before. Each field is the `SampleSettings` field of the same name.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplerChoices {
    /// Denoising steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale on the prompt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cfg_scale: Option<f32>,
    /// Rectified-flow time shift of the sampler's grid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shift: Option<f32>,
    /// Euler (rectified flow) or DDIM (ε-prediction).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameterisation: Option<Parameterisation>,
    /// Side the references are resized to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_px: Option<u32>,
    /// Guidance strength fed to a guidance-distilled base.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distilled_guidance: Option<f32>,
    /// Guidance scale on the references (only meaningful for a base pretrained with reference dropout).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_cfg_scale: Option<f32>,
    /// Fresh noise put back at each step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stochasticity: Option<f32>,
    /// Autoguidance scale.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autoguidance_scale: Option<f32>,
}

impl SamplerChoices {
    /// True when it recommends nothing (and is then left out of a file's metadata).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Reads the recommendation from a file's metadata (nothing when the key is absent).
    pub fn from_metadata(meta: &HashMap<String, String>) -> Result<Self, String> {
        match meta.get(META_SAMPLING) {
            Some(json) => serde_json::from_str(json).map_err(|e| format!("metadata `{META_SAMPLING}`: {e}")),
            None => Ok(Self::default()),
        }
    }

    /// Adds the recommendation to a file's metadata (nothing when it is empty, so such files keep their bytes).
    pub fn write_metadata(&self, meta: &mut HashMap<String, String>) -> Result<(), String> {
        if !self.is_empty() {
            let json = serde_json::to_string(self).map_err(|e| e.to_string())?;
            meta.insert(META_SAMPLING.to_string(), json);
        }
        Ok(())
    }
}

/// Where the base weights come from.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum BaseSource {
    /// `assets/base/tiny-base.safetensors`, the embedded pretrained default.
    #[default]
    Bundled,
    /// Random tiny weights from a seed (`random:SEED`): for tests and for pretraining from scratch.
    Random(u64),
    /// Random weights of FLUX.1-dev's transformer sizes (`random-flux-dev:SEED`; 12 B parameters, drawn on the
    /// model's device in `model.dtype`), fed by pixel-unshuffle by 16 (FLUX's 16 px a token, so FLUX's token
    /// count: 768 input channels instead of the autoencoder's 64) and learned-size prompt tables (40 tokens of
    /// width 4096): for measuring time and memory at FLUX size without the checkpoint (`scripts/gpu-check.sh`).
    RandomFluxDev(u64),
    /// A safetensors file.
    File(PathBuf),
}

impl fmt::Display for BaseSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bundled => f.write_str("bundled"),
            Self::Random(seed) => write!(f, "random:{seed}"),
            Self::RandomFluxDev(seed) => write!(f, "random-flux-dev:{seed}"),
            Self::File(p) => write!(f, "{}", p.display()),
        }
    }
}

impl FromStr for BaseSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" => Err("empty base source (use `bundled`, `random:SEED` or a file path)".into()),
            "bundled" => Ok(Self::Bundled),
            r if r.starts_with("random:") => r["random:".len()..]
                .parse()
                .map(Self::Random)
                .map_err(|_| format!("`{r}`: the seed after `random:` must be a non-negative integer")),
            "random" => Ok(Self::Random(0)),
            r if r.starts_with("random-flux-dev:") => r["random-flux-dev:".len()..]
                .parse()
                .map(Self::RandomFluxDev)
                .map_err(|_| format!("`{r}`: the seed after `random-flux-dev:` must be a non-negative integer")),
            p => Ok(Self::File(PathBuf::from(p))),
        }
    }
}

impl TryFrom<String> for BaseSource {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<BaseSource> for String {
    fn from(b: BaseSource) -> String {
        b.to_string()
    }
}

/// A LoRA merged into the base when it loads (UNO's `dit_lora.safetensors`), with its scale (UNO's
/// `lora_weight`). Written `FILE` or `FILE:SCALE` on the command line.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseLora {
    /// The LoRA file (x-flux naming).
    pub path: PathBuf,
    /// Its scale (1 = as trained).
    #[serde(default = "unit_scale")]
    pub scale: f64,
}

fn unit_scale() -> f64 {
    1.0
}

impl FromStr for BaseLora {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty base LoRA (use FILE or FILE:SCALE)".into());
        }
        let (path, scale) = s
            .rsplit_once(':')
            .filter(|(p, _)| !p.is_empty())
            .and_then(|(p, sc)| sc.parse::<f64>().ok().map(|v| (p, v)))
            .unwrap_or((s, 1.0));
        if !scale.is_finite() {
            return Err(format!("`{s}`: the scale after `:` must be a finite number"));
        }
        Ok(Self {
            path: PathBuf::from(path),
            scale,
        })
    }
}

impl fmt::Display for BaseLora {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.scale == 1.0 {
            write!(f, "{}", self.path.display())
        } else {
            write!(f, "{}:{}", self.path.display(), self.scale)
        }
    }
}

/// The path of the embedded pretrained base.
pub fn bundled_base_path() -> PathBuf {
    crate::dip::assets_dir().join("base").join("tiny-base.safetensors")
}

/// Errors loading a base; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The safetensors header or metadata is malformed.
    #[error("{path}: {reason}")]
    Format {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The weights do not fit the config (the message names the tensor).
    #[error("{path}: {source}")]
    Model {
        /// File (or `random:SEED`).
        path: PathBuf,
        /// Cause.
        source: ModelError,
    },
    /// Files a backbone names do not exist (`key = path (not found…)` each); nothing was loaded.
    #[error("backbone files missing (nothing was loaded): {}", .0.join("; "))]
    MissingFiles(Vec<String>),
    /// The bundled base is missing.
    #[error("the bundled base {0} is missing (set FOCUSDPO_ASSETS, or choose another base: `random:SEED` or a file)")]
    NoBundled(PathBuf),
    /// The autoencoder cannot be loaded or does not fit the MMDiT (boxed: candle errors are large).
    #[error("autoencoder: {0}")]
    Autoencoder(Box<CodecError>),
    /// A FLUX text encoder cannot be loaded or does not fit the MMDiT.
    #[error("text encoder: {0}")]
    TextEncoder(Box<LoadError>),
    /// An autoguidance guide that does not fit the main model (what differs is named).
    #[error("guide model: {0}")]
    Guide(String),
}

impl From<CodecError> for BaseError {
    fn from(e: CodecError) -> Self {
        Self::Autoencoder(Box::new(e))
    }
}

impl From<LoadError> for BaseError {
    fn from(e: LoadError) -> Self {
        Self::TextEncoder(Box::new(e))
    }
}

/// A loaded base model.
#[derive(Debug, Clone)]
pub struct BaseModel {
    /// The MMDiT.
    pub mmdit: Mmdit,
    /// Prompt tables (tiny models); `None` for a FLUX checkpoint.
    pub prompt: Option<PromptEncoder>,
    /// Packing factor: pixels (tiny) or latent pixels (FLUX) per token side. The mask stride is
    /// [`Self::pixels_per_token`], which differs from it with an autoencoder.
    pub patch: usize,
    /// Images ↔ tokens: pixel-unshuffle by `patch`, or the FLUX autoencoder once one is attached.
    pub codec: ImageCodec,
    /// FLUX's T5 + CLIP text encoders, once attached (a FLUX checkpoint has no prompt tables).
    pub flux_text: Option<FluxTextEncoders>,
    /// Where it came from.
    pub source: BaseSource,
    /// Guidance strength fed to `guidance_in` in training forwards when the model is guidance-distilled
    /// (FLUX.1-dev; ignored otherwise). 1.0 by default, as UNO's and x-flux's training scripts use; the sampler
    /// takes its own value ([`crate::eval::sampler::SampleSettings::distilled_guidance`]).
    pub train_guidance: f32,
    /// The sampler settings the file recommends (`focusdpo.sampling` in its metadata; empty without).
    pub sampling: SamplerChoices,
    /// Autoguidance's guide (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"): a weaker
    /// model of the same kind (fewer steps, smaller), used by the sampler when
    /// [`crate::eval::sampler::SampleSettings::autoguidance_scale`] ≠ 1. Attached with [`Self::with_guide`].
    pub guide: Option<std::sync::Arc<BaseModel>>,
}

/// Reads a base LoRA file (x-flux naming, UNO's `dit_lora.safetensors`) for a model of config `cfg`: its updates,
/// unscaled. Errors name the file and the tensor at fault.
pub fn read_base_lora(path: &Path, cfg: &Config, device: &Device) -> Result<Vec<BaseLoraPiece>, BaseError> {
    let fmt_err = |reason: String| BaseError::Format {
        path: path.to_path_buf(),
        reason,
    };
    if !path.is_file() {
        return Err(BaseError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such base LoRA file"),
        });
    }
    let tensors = candle_core::safetensors::load(path, device).map_err(|e| fmt_err(e.to_string()))?;
    if !is_xflux_lora(tensors.keys()) {
        return Err(fmt_err(
            "not a LoRA in x-flux processor naming (`double_blocks.N.processor.qkv_lora1.down.weight`, …), the \
             naming of UNO's dit_lora.safetensors"
                .into(),
        ));
    }
    read_xflux_lora(&tensors, cfg).map_err(|e| fmt_err(e.to_string()))
}

/// What a transformer file's header says, without reading its tensors.
#[derive(Clone, Debug)]
pub struct FileLayout {
    /// The model config: from our metadata, else from the tensor shapes.
    pub config: Config,
    /// The prefix of every tensor name (`model.diffusion_model.` in some FLUX files), empty without.
    pub prefix: &'static str,
    /// Pixels per side of a token on the codec's input (2 on VAE latents without our metadata).
    pub patch: usize,
    /// The sampler settings the file recommends.
    pub sampling: SamplerChoices,
}

/// Reads a transformer file's [`FileLayout`] from its header.
pub fn read_file_layout(path: &Path) -> Result<FileLayout, BaseError> {
    let meta = read_safetensors_metadata(path)?;
    let fmt_err = |reason: String| BaseError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let (config, prefix): (Config, &str) = match meta.get(META_CONFIG) {
        Some(json) => (
            serde_json::from_str(json).map_err(|e| fmt_err(format!("metadata `{META_CONFIG}`: {e}")))?,
            "",
        ),
        None => {
            let shapes = tensor_shapes(path).map_err(|e| fmt_err(e.to_string()))?;
            let layout = flux_layout_from_shapes(&shapes).map_err(|e| fmt_err(e.to_string()))?;
            (layout.config, layout.prefix)
        }
    };
    let patch = match meta.get(META_PATCH) {
        Some(p) => p
            .parse()
            .map_err(|_| fmt_err(format!("metadata `{META_PATCH}` = `{p}` is not a positive integer")))?,
        None => 2,
    };
    let sampling = SamplerChoices::from_metadata(&meta).map_err(fmt_err)?;
    Ok(FileLayout {
        config,
        prefix,
        patch,
        sampling,
    })
}

impl BaseSource {
    /// The model config of this source, read from the file's header (no weights are read).
    pub fn config(&self) -> Result<Config, BaseError> {
        match self {
            BaseSource::Bundled => Ok(read_file_layout(&bundled_base_path())?.config),
            BaseSource::Random(_) => Ok(Config::tiny()),
            BaseSource::RandomFluxDev(_) => Ok(random_flux_dev_config()),
            BaseSource::File(path) => Ok(read_file_layout(path)?.config),
        }
    }
}

/// Reads the `__metadata__` of a safetensors file without reading the tensors.
pub fn read_safetensors_metadata(path: &Path) -> Result<HashMap<String, String>, BaseError> {
    let header = read_header(path).map_err(|e| match e {
        WeightsError::Io { path, source } => BaseError::Io { path, source },
        other => BaseError::Format {
            path: path.to_path_buf(),
            reason: match other {
                WeightsError::Format { source, .. } => source.to_string(),
                w => w.to_string(),
            },
        },
    })?;
    let Some(meta) = header.get("__metadata__") else {
        return Ok(HashMap::new());
    };
    serde_json::from_value(meta.clone()).map_err(|e| BaseError::Format {
        path: path.to_path_buf(),
        reason: format!("__metadata__: {e}"),
    })
}

impl BaseModel {
    /// A guidance tensor `[batch]` of `strength` for a guidance-distilled model, `None` for one without
    /// `guidance_in` (training passes [`Self::train_guidance`], the sampler its own strength).
    pub fn guidance_tensor(&self, strength: f32, batch: usize) -> candle_core::Result<Option<Tensor>> {
        self.mmdit
            .config()
            .guidance_embed
            .then(|| Tensor::full(strength, batch, self.mmdit.device()))
            .transpose()
    }

    /// Loads a base from `source` on `device` (random bases use the tiny config and patch 4), in f32.
    pub fn load(source: &BaseSource, device: &Device) -> Result<Self, BaseError> {
        Self::load_as(source, device, WeightDtype::F32)
    }

    /// Loads a base from `source` on `device` with its frozen weights held in `dtype`.
    pub fn load_as(source: &BaseSource, device: &Device, dtype: WeightDtype) -> Result<Self, BaseError> {
        match source {
            BaseSource::Bundled => {
                let path = bundled_base_path();
                if !path.is_file() {
                    return Err(BaseError::NoBundled(path));
                }
                let mut base = Self::load_file_as(&path, device, dtype)?;
                base.source = BaseSource::Bundled;
                Ok(base)
            }
            BaseSource::Random(seed) => {
                let model_err = |source| BaseError::Model {
                    path: PathBuf::from(source_name(*seed)),
                    source,
                };
                let mut base = Self::random(&Config::tiny(), 4, *seed, device).map_err(model_err)?;
                base.mmdit
                    .narrow_weights(dtype.dtype())
                    .map_err(|e| model_err(ModelError::Weights(e)))?;
                Ok(base)
            }
            BaseSource::File(path) => Self::load_file_as(path, device, dtype),
            BaseSource::RandomFluxDev(seed) => {
                let cfg = random_flux_dev_config();
                let model_err = |source| BaseError::Model {
                    path: PathBuf::from(format!("random-flux-dev:{seed}")),
                    source,
                };
                let mut base = Self::random_on_device(&cfg, 16, *seed, device, dtype.dtype()).map_err(model_err)?;
                base.source = source.clone();
                Ok(base)
            }
        }
    }

    /// Random weights for `cfg` drawn on `device` itself (N(0, 0.02²), norm scales 1) and held in `dtype`, with
    /// random prompt tables: fast at any size on a GPU (the tiny bases use [`Self::random`], whose draws are the
    /// same on every device).
    pub fn random_on_device(
        cfg: &Config,
        patch: usize,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        // A GPU draws with its own seeded generator; the CPU (which candle cannot seed) with ours.
        if !device.is_cpu() {
            device.set_seed(seed)?;
        }
        let mut tensors = HashMap::new();
        for (i, (name, shape)) in super::config::expected_tensor_shapes(cfg).into_iter().enumerate() {
            let t = if name.ends_with(".scale") {
                Tensor::ones(shape.as_slice(), DType::F32, device)?
            } else if device.is_cpu() {
                testing::random_tensor(&shape, 0.02, seed.wrapping_add(i as u64), device)?.to_dtype(dtype)?
            } else {
                Tensor::randn(0f32, 0.02, shape.as_slice(), device)?.to_dtype(dtype)?
            };
            tensors.insert(name, t);
        }
        tensors.extend(random_prompt_tables(cfg.context_in_dim, cfg.vec_in_dim, seed, device)?);
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        Self::from_var_builder(cfg, patch, vb, BaseSource::Random(seed))
    }

    /// Random tiny weights (and prompt tables) for `cfg`.
    pub fn random(cfg: &Config, patch: usize, seed: u64, device: &Device) -> Result<Self, ModelError> {
        let mut tensors = testing::random_weights(cfg, seed, device)?;
        tensors.extend(random_prompt_tables(cfg.context_in_dim, cfg.vec_in_dim, seed, device)?);
        let mut base = Self::from_tensors(cfg, patch, tensors, device)?;
        base.source = BaseSource::Random(seed);
        Ok(base)
    }

    /// Builds a base from named tensors (FLUX names + optional `prompt_embed.*`).
    pub fn from_tensors(
        cfg: &Config,
        patch: usize,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Self::from_var_builder(cfg, patch, vb, BaseSource::Random(0))
    }

    /// The MMDiT from `vb`, plus the prompt tables when `vb` has them (a `VarMap`-backed `vb` gives a trainable
    /// base: see `train::pretrain`).
    pub fn from_var_builder(
        cfg: &Config,
        patch: usize,
        vb: VarBuilder,
        source: BaseSource,
    ) -> Result<Self, ModelError> {
        let mmdit = Mmdit::new(cfg, vb.clone())?;
        let prompt = if vb.contains_tensor("prompt_embed.token.weight") {
            // The learned prompt tables are small and feed the f32 activations: always f32.
            Some(PromptEncoder::load(
                cfg.context_in_dim,
                cfg.vec_in_dim,
                vb.set_dtype(DType::F32),
            )?)
        } else {
            None
        };
        Ok(Self {
            mmdit,
            prompt,
            patch,
            codec: ImageCodec::PixelUnshuffle { patch },
            flux_text: None,
            source,
            train_guidance: 1.0,
            sampling: SamplerChoices::default(),
            guide: None,
        })
    }

    /// Loads a safetensors file: config and patch from its metadata, FLUX.1-dev (patch 2 on VAE latents) without.
    pub fn load_file(path: &Path, device: &Device) -> Result<Self, BaseError> {
        Self::load_file_as(path, device, WeightDtype::F32)
    }

    /// [`Self::load_file`] with the frozen weights held in `dtype` (converted as they are read).
    pub fn load_file_as(path: &Path, device: &Device, dtype: WeightDtype) -> Result<Self, BaseError> {
        let FileLayout {
            config: cfg,
            prefix,
            patch,
            sampling,
        } = read_file_layout(path)?;
        let model_err = |source: ModelError| BaseError::Model {
            path: path.to_path_buf(),
            source,
        };
        let vb = var_builder(&[path.to_path_buf()], dtype.dtype(), device).map_err(|e| match e {
            WeightsError::Io { path, source } => BaseError::Io { path, source },
            WeightsError::Format { source, .. } => model_err(ModelError::Weights(source)),
            other => BaseError::Format {
                path: path.to_path_buf(),
                reason: other.to_string(),
            },
        })?;
        let vb = match prefix.strip_suffix('.') {
            Some(p) => vb.pp(p),
            None => vb,
        };
        let mut base =
            Self::from_var_builder(&cfg, patch, vb, BaseSource::File(path.to_path_buf())).map_err(model_err)?;
        base.sampling = sampling;
        Ok(base)
    }

    /// Merges a base LoRA (UNO's `dit_lora.safetensors`, x-flux naming: [`super::xflux_lora`]) into the weights,
    /// scaled by `scale` (UNO's `lora_weight`, 1 by default). The merged model is the base that FocusDPO's own
    /// LoRA trains on and the reference model of DPO.
    pub fn with_base_lora(mut self, path: &Path, scale: f64) -> Result<Self, BaseError> {
        let pieces = read_base_lora(path, self.config(), self.mmdit.device())?;
        self.mmdit
            .merge_base_lora(&pieces, scale)
            .map_err(|e| BaseError::Format {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(self)
    }

    /// The model config.
    pub fn config(&self) -> &Config {
        self.mmdit.config()
    }

    /// Whether `param` can drive this base: a network that predicts the clean sample ([`Prediction::Sample`]) is
    /// defined under rectified flow only. The error says what to use instead (the caller names the setting).
    pub fn check_parameterisation(&self, param: Parameterisation) -> Result<(), String> {
        if self.config().prediction == Prediction::Sample && param != Parameterisation::RectifiedFlow {
            return Err(
                "this base predicts the clean sample (model.prediction = \"sample\"), which is defined under \
                        rectified flow: use \"rectified-flow\", not ε-prediction (DDPM / DDIM)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Attaches `guide` as autoguidance's guide model ([`Self::guide`]). It must read and write the same tokens:
    /// the same pixels per token and channels, and a device of the same kind. Its width, depth, training and
    /// `model.prediction` may differ (both return a velocity).
    pub fn with_guide(mut self, guide: BaseModel) -> Result<Self, BaseError> {
        let (main, g) = (self.config(), guide.config());
        if guide.pixels_per_token() != self.pixels_per_token() {
            return Err(BaseError::Guide(format!(
                "{} px per token, the model {}: both must tokenise images alike",
                guide.pixels_per_token(),
                self.pixels_per_token()
            )));
        }
        if g.in_channels != main.in_channels {
            return Err(BaseError::Guide(format!(
                "{} channels per token, the model {}",
                g.in_channels, main.in_channels
            )));
        }
        if guide.text_conditioner().is_none() {
            return Err(BaseError::Guide(
                "it has no text encoder (prompt tables or T5/CLIP)".into(),
            ));
        }
        if !guide.mmdit.device().same_device(self.mmdit.device()) {
            return Err(BaseError::Guide(
                "it was loaded on another device than the model".into(),
            ));
        }
        self.guide = Some(std::sync::Arc::new(guide));
        Ok(self)
    }

    /// Image pixels per token side: the token stride of every mask (4 for the tiny base, 16 for FLUX).
    pub fn pixels_per_token(&self) -> usize {
        self.codec.pixels_per_token()
    }

    /// Attaches the FLUX autoencoder `ae.safetensors` (BFL naming) as the image codec, packed by this base's
    /// patch. Fails, naming the file, when its latents packed by `patch` do not give `in_channels`.
    pub fn with_autoencoder(self, path: &Path) -> Result<Self, BaseError> {
        let ae = FluxAutoencoder::load(path, self.mmdit.device())?;
        self.with_codec_autoencoder(ae)
    }

    /// Attaches an already loaded autoencoder (see [`Self::with_autoencoder`]).
    pub fn with_codec_autoencoder(mut self, ae: FluxAutoencoder) -> Result<Self, BaseError> {
        let codec = ImageCodec::FluxAutoencoder {
            ae: std::sync::Arc::new(ae),
            patch: self.patch,
        };
        if codec.channels() != self.config().in_channels {
            let (path, channels) = match &codec {
                ImageCodec::FluxAutoencoder { ae, .. } => (ae.path().to_path_buf(), ae.z_channels()),
                ImageCodec::PixelUnshuffle { .. } => (PathBuf::new(), 0),
            };
            return Err(BaseError::Format {
                path,
                reason: format!(
                    "{channels} latent channels packed {p}×{p} give {} channels per token, but the base {} takes {}",
                    codec.channels(),
                    self.source,
                    self.config().in_channels,
                    p = self.patch,
                ),
            });
        }
        self.codec = codec;
        Ok(self)
    }

    /// Attaches FLUX's text encoders: T5 from `t5` (+ `t5_tokenizer`, `t5_tokens` tokens per prompt) for `txt`,
    /// CLIP from `clip` (+ `clip_tokenizer`) for `y`. Fails, naming the file, when their widths do not match
    /// `context_in_dim` / `vec_in_dim`.
    pub fn with_text_encoders(
        self,
        t5: (&Path, &Path),
        t5_tokens: usize,
        clip: (&Path, &Path),
    ) -> Result<Self, BaseError> {
        let device = self.mmdit.device().clone();
        let encoders = FluxTextEncoders {
            t5: T5TextEncoder::load(t5.0, t5.1, t5_tokens, &device)?,
            clip: ClipTextEncoder::load(clip.0, clip.1, &device)?,
        };
        self.with_flux_text(encoders, (t5.0, clip.0))
    }

    /// Attaches already loaded text encoders; `paths` (T5, CLIP weights) are named in errors.
    pub fn with_flux_text(mut self, encoders: FluxTextEncoders, paths: (&Path, &Path)) -> Result<Self, BaseError> {
        let cfg = self.config();
        let mismatch = |path: PathBuf, what: &str, got: usize, want: usize| BaseError::Format {
            path,
            reason: format!("{what} is {got} wide, but the base takes {want}"),
        };
        if encoders.t5.hidden_size() != cfg.context_in_dim {
            return Err(mismatch(
                paths.0.to_path_buf(),
                "T5's hidden state",
                encoders.t5.hidden_size(),
                cfg.context_in_dim,
            ));
        }
        if encoders.clip.hidden_size() != cfg.vec_in_dim {
            return Err(mismatch(
                paths.1.to_path_buf(),
                "CLIP's pooled output",
                encoders.clip.hidden_size(),
                cfg.vec_in_dim,
            ));
        }
        self.flux_text = Some(encoders);
        Ok(self)
    }

    /// Where prompt embeddings come from: the learned tables of a tiny base, else FLUX's T5 + CLIP when
    /// attached; `None` when the base has neither.
    pub fn text_conditioner(&self) -> Option<TextConditioner<'_>> {
        match (&self.prompt, &self.flux_text) {
            (Some(p), _) => Some(TextConditioner::Learned(p)),
            (None, Some(f)) => Some(f.conditioner()),
            (None, None) => None,
        }
    }

    /// The base as safetensors bytes (FLUX names + prompt tables + metadata), loadable by [`Self::load_file`].
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>, BaseError> {
        let fmt_err = |reason: String| BaseError::Format {
            path: PathBuf::from(self.source.to_string()),
            reason,
        };
        let mut named: Vec<(String, Tensor)> = self
            .mmdit
            .named_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.clone()))
            .collect();
        if let Some(p) = &self.prompt {
            let shapes = super::text::prompt_tensor_shapes(self.config().context_in_dim, self.config().vec_in_dim);
            for ((name, _), t) in shapes.into_iter().zip(p.tensors()) {
                named.push((name, t.clone()));
            }
        }
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let cfg_json = serde_json::to_string(self.config()).map_err(|e| fmt_err(e.to_string()))?;
        let mut metadata = HashMap::from([
            (META_CONFIG.to_string(), cfg_json),
            (META_PATCH.to_string(), self.patch.to_string()),
            ("generator".to_string(), "focusdpo".to_string()),
        ]);
        self.sampling.write_metadata(&mut metadata).map_err(fmt_err)?;
        safetensors::serialize(named, Some(metadata)).map_err(|e| fmt_err(e.to_string()))
    }
}

/// FLUX.1-dev's transformer with 768 input channels (pixel-unshuffle by 16: 16 px a token, as FLUX's autoencoder
/// + 2×2 packing) for [`BaseSource::RandomFluxDev`].
pub fn random_flux_dev_config() -> Config {
    Config {
        in_channels: 3 * 16 * 16,
        ..Config::flux_dev()
    }
}

fn source_name(seed: u64) -> String {
    format!("random:{seed}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_lora_parses_with_and_without_a_scale() {
        let l: BaseLora = "dit_lora.safetensors".parse().expect("plain");
        assert_eq!((l.path, l.scale), (PathBuf::from("dit_lora.safetensors"), 1.0));
        let l: BaseLora = "c:/w/dit_lora.safetensors:0.8".parse().expect("scaled");
        assert_eq!(
            (l.path.clone(), l.scale),
            (PathBuf::from("c:/w/dit_lora.safetensors"), 0.8)
        );
        assert_eq!(l.to_string(), "c:/w/dit_lora.safetensors:0.8");
        assert!("".parse::<BaseLora>().is_err());
        assert!("x.safetensors:inf".parse::<BaseLora>().is_err());
    }

    #[test]
    fn base_source_parses_and_round_trips() {
        for s in ["bundled", "random:7", "some/dir/base.safetensors"] {
            let b: BaseSource = s.parse().expect("parses");
            assert_eq!(b.to_string(), s);
        }
        assert_eq!("random".parse::<BaseSource>(), Ok(BaseSource::Random(0)));
        assert_eq!(
            "random-flux-dev:3".parse::<BaseSource>(),
            Ok(BaseSource::RandomFluxDev(3))
        );
        assert_eq!(BaseSource::RandomFluxDev(3).to_string(), "random-flux-dev:3");
        assert!("random:x".parse::<BaseSource>().is_err());
        assert!("".parse::<BaseSource>().is_err());
    }

    #[test]
    fn a_saved_base_loads_back_identically() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let base = BaseModel::random(&Config::tiny(), 4, 3, &dev)?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("b.safetensors");
        std::fs::write(&path, base.to_safetensors_bytes()?)?;
        let back = BaseModel::load_file(&path, &dev)?;
        assert_eq!(back.config(), base.config());
        assert_eq!(back.patch, 4);
        let (a, b) = (base.mmdit.named_tensors(), back.mmdit.named_tensors());
        assert_eq!(a.len(), b.len());
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            let d = (*ta - *tb)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{na}");
        }
        assert!(back.prompt.is_some());
        assert!(back.sampling.is_empty());
        assert!(!read_safetensors_metadata(&path)?.contains_key(META_SAMPLING));
        Ok(())
    }

    /// The sampler settings a base recommends survive saving; a malformed recommendation is an error naming the
    /// file and the metadata key.
    #[test]
    fn a_base_keeps_its_recommended_sampler_settings() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let mut base = BaseModel::random(&Config::micro(), 4, 3, &dev)?;
        base.sampling = SamplerChoices {
            reference_cfg_scale: Some(3.0),
            shift: Some(2.0),
            ..SamplerChoices::default()
        };
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("b.safetensors");
        std::fs::write(&path, base.to_safetensors_bytes()?)?;
        let meta = read_safetensors_metadata(&path)?;
        assert_eq!(meta[META_SAMPLING], r#"{"shift":2.0,"reference_cfg_scale":3.0}"#);
        assert_eq!(BaseModel::load_file(&path, &dev)?.sampling, base.sampling);
        let mut bad = meta.clone();
        bad.insert(META_SAMPLING.to_string(), r#"{"ref_cfg":3}"#.to_string());
        let tensors: Vec<(String, Tensor)> = candle_core::safetensors::load(&path, &dev)?.into_iter().collect();
        let bad_path = dir.path().join("bad.safetensors");
        std::fs::write(&bad_path, safetensors::serialize(tensors, Some(bad))?)?;
        let err = BaseModel::load_file(&bad_path, &dev)
            .expect_err("unknown field")
            .to_string();
        assert!(
            err.contains("bad.safetensors") && err.contains(META_SAMPLING) && err.contains("ref_cfg"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn bad_files_are_errors_that_name_the_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let garbage = dir.path().join("garbage.safetensors");
        std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff\xff\x7fxx")?;
        let err = BaseModel::load_file(&garbage, &Device::Cpu).expect_err("garbage");
        assert!(err.to_string().contains("garbage.safetensors"), "{err}");
        let short = dir.path().join("short.safetensors");
        std::fs::write(&short, b"abc")?;
        assert!(BaseModel::load_file(&short, &Device::Cpu).is_err());
        // Valid header, config in metadata, but no tensors: the error names the first missing tensor.
        let empty = dir.path().join("empty.safetensors");
        let cfg = serde_json::to_string(&Config::tiny())?;
        let bytes = safetensors::serialize(
            Vec::<(String, Tensor)>::new(),
            Some(HashMap::from([(META_CONFIG.to_string(), cfg)])),
        )?;
        std::fs::write(&empty, bytes)?;
        let err = BaseModel::load_file(&empty, &Device::Cpu).expect_err("no tensors");
        assert!(err.to_string().contains("empty.safetensors"), "{err}");
        assert!(
            err.to_string()
                .contains("`double_blocks.0.img_mod.lin.weight` not found"),
            "{err}"
        );
        Ok(())
    }

    /// `random-flux-dev:SEED` draws its weights on the device in the requested dtype; checked at the micro size
    /// (FLUX.1-dev's 12 B parameters are for GPUs): narrow weights, f32 norm scales, prompt tables, a forward.
    #[test]
    fn random_weights_drawn_on_the_device_build_a_working_base() {
        let cfg = Config {
            in_channels: 48,
            ..Config::micro()
        };
        let base = BaseModel::random_on_device(&cfg, 4, 2, &Device::Cpu, DType::BF16).expect("base");
        assert_eq!(base.mmdit.weight_dtype(), DType::BF16);
        assert!(base.prompt.is_some());
        assert_eq!(random_flux_dev_config().hidden_size, 3072);
        assert_eq!(
            BaseSource::RandomFluxDev(0).config().expect("config"),
            random_flux_dev_config()
        );
        let enc = base
            .text_conditioner()
            .expect("prompt tables")
            .encode(&["a red cat"])
            .expect("encodes");
        assert_eq!(enc.txt.dims()[2], cfg.context_in_dim);
    }
}
