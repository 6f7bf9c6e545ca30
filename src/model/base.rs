//! The base model of a run: MMDiT + prompt tables + token packing, loaded from one safetensors file.
//!
//! File layout: FLUX tensor names for the MMDiT (so a FLUX/UNO checkpoint is the same format), plus the tiny
//! model's prompt tables (`prompt_embed.*`, see [`super::text`]). The safetensors metadata carries
//! `focusdpo.config` (the [`Config`] as JSON) and `focusdpo.patch` (pixel-unshuffle factor). A file without
//! them is read as FLUX.1-dev, which needs the FLUX autoencoder and text encoders (not wired: see
//! `docs/backbone.md`).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::mmdit::{Mmdit, ModelError};
use super::text::{PromptEncoder, random_prompt_tables};
use super::{Config, testing};

/// Metadata key of the JSON config.
pub const META_CONFIG: &str = "focusdpo.config";
/// Metadata key of the patch size.
pub const META_PATCH: &str = "focusdpo.patch";
/// Files up to this size are read into memory; larger ones are memory-mapped.
const BUFFERED_MAX_BYTES: u64 = 1 << 30;

/// Where the base weights come from.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum BaseSource {
    /// `assets/base/tiny-base.safetensors`, the embedded pretrained default.
    #[default]
    Bundled,
    /// Random tiny weights from a seed (`random:SEED`): for tests and for pretraining from scratch.
    Random(u64),
    /// A safetensors file.
    File(PathBuf),
}

impl fmt::Display for BaseSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bundled => f.write_str("bundled"),
            Self::Random(seed) => write!(f, "random:{seed}"),
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
    /// The bundled base is missing.
    #[error("the bundled base {0} is missing (set FOCUSDPO_ASSETS, or choose another base: `random:SEED` or a file)")]
    NoBundled(PathBuf),
}

/// A loaded base model.
#[derive(Debug, Clone)]
pub struct BaseModel {
    /// The MMDiT.
    pub mmdit: Mmdit,
    /// Prompt tables (tiny models); `None` for a FLUX checkpoint.
    pub prompt: Option<PromptEncoder>,
    /// Pixel-unshuffle factor: pixels per token side.
    pub patch: usize,
    /// Where it came from.
    pub source: BaseSource,
}

/// Reads the `__metadata__` of a safetensors file without reading the tensors.
pub fn read_safetensors_metadata(path: &Path) -> Result<HashMap<String, String>, BaseError> {
    use std::io::Read;
    let fmt_err = |reason: String| BaseError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(|source| BaseError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| fmt_err("not a safetensors file (shorter than its 8-byte header length)".into()))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(fmt_err(format!("not a safetensors file (header length {len} bytes)")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .map_err(|_| fmt_err(format!("truncated safetensors header ({len} bytes announced)")))?;
    let value: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| fmt_err(format!("safetensors header is not JSON: {e}")))?;
    let Some(meta) = value.get("__metadata__") else {
        return Ok(HashMap::new());
    };
    serde_json::from_value(meta.clone()).map_err(|e| fmt_err(format!("__metadata__: {e}")))
}

impl BaseModel {
    /// Loads a base from `source` on `device` (random bases use the tiny config and patch 4).
    pub fn load(source: &BaseSource, device: &Device) -> Result<Self, BaseError> {
        match source {
            BaseSource::Bundled => {
                let path = bundled_base_path();
                if !path.is_file() {
                    return Err(BaseError::NoBundled(path));
                }
                let mut base = Self::load_file(&path, device)?;
                base.source = BaseSource::Bundled;
                Ok(base)
            }
            BaseSource::Random(seed) => {
                Self::random(&Config::tiny(), 4, *seed, device).map_err(|source| BaseError::Model {
                    path: PathBuf::from(source_name(*seed)),
                    source,
                })
            }
            BaseSource::File(path) => Self::load_file(path, device),
        }
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

    /// The MMDiT from `vb`, plus the prompt tables when `vb` has them.
    fn from_var_builder(cfg: &Config, patch: usize, vb: VarBuilder, source: BaseSource) -> Result<Self, ModelError> {
        let mmdit = Mmdit::new(cfg, vb.clone())?;
        let prompt = if vb.contains_tensor("prompt_embed.token.weight") {
            Some(PromptEncoder::load(cfg.context_in_dim, cfg.vec_in_dim, vb)?)
        } else {
            None
        };
        Ok(Self {
            mmdit,
            prompt,
            patch,
            source,
        })
    }

    /// Loads a safetensors file: config and patch from its metadata, FLUX.1-dev (patch 2 on VAE latents) without.
    pub fn load_file(path: &Path, device: &Device) -> Result<Self, BaseError> {
        let meta = read_safetensors_metadata(path)?;
        let fmt_err = |reason: String| BaseError::Format {
            path: path.to_path_buf(),
            reason,
        };
        let cfg: Config = match meta.get(META_CONFIG) {
            Some(json) => serde_json::from_str(json).map_err(|e| fmt_err(format!("metadata `{META_CONFIG}`: {e}")))?,
            None => Config::flux_dev(),
        };
        let patch = match meta.get(META_PATCH) {
            Some(p) => p
                .parse()
                .map_err(|_| fmt_err(format!("metadata `{META_PATCH}` = `{p}` is not a positive integer")))?,
            None => 2,
        };
        let model_err = |source: ModelError| BaseError::Model {
            path: path.to_path_buf(),
            source,
        };
        let size = std::fs::metadata(path)
            .map_err(|source| BaseError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let vb = if size <= BUFFERED_MAX_BYTES {
            let bytes = std::fs::read(path).map_err(|source| BaseError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            VarBuilder::from_buffered_safetensors(bytes, DType::F32, device)
                .map_err(|e| model_err(ModelError::Weights(e)))?
        } else {
            // SAFETY: candle maps the file read-only; like every mmap-based loader we rely on the checkpoint not
            // being modified while the run uses it (the same contract as safetensors/PyTorch).
            unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, device) }
                .map_err(|e| model_err(ModelError::Weights(e)))?
        };
        Self::from_var_builder(&cfg, patch, vb, BaseSource::File(path.to_path_buf())).map_err(model_err)
    }

    /// The model config.
    pub fn config(&self) -> &Config {
        self.mmdit.config()
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
        let metadata = HashMap::from([
            (META_CONFIG.to_string(), cfg_json),
            (META_PATCH.to_string(), self.patch.to_string()),
            ("generator".to_string(), "focusdpo".to_string()),
        ]);
        safetensors::serialize(named, Some(metadata)).map_err(|e| fmt_err(e.to_string()))
    }
}

fn source_name(seed: u64) -> String {
    format!("random:{seed}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_source_parses_and_round_trips() {
        for s in ["bundled", "random:7", "some/dir/base.safetensors"] {
            let b: BaseSource = s.parse().expect("parses");
            assert_eq!(b.to_string(), s);
        }
        assert_eq!("random".parse::<BaseSource>(), Ok(BaseSource::Random(0)));
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
}
