//! LoRA adapters on the backbone's linear layers (paper §5.0.1: rank-32 LoRA; our tiny default uses rank 8).
//!
//! An adapter adds `ΔW·x = (α / r)·B·A·x` to a frozen [`super::Linear`], with `A ∈ ℝ^{r×in}` initialised like
//! PEFT (Kaiming-uniform, bound `1/√in`) and `B ∈ ℝ^{out×r}` zero, so a fresh policy equals the reference model.
//! Only `A` and `B` are [`Var`]s; the base stays frozen, and the reference model is the same base with adapters
//! disabled (no second copy of the weights).
//!
//! **Targets** are chosen by the FLUX path of each linear layer: attention (`*_attn.qkv`, `*_attn.proj`), MLP
//! (`*_mlp.0`, `*_mlp.2`), the single blocks' fused `linear1`/`linear2` (attention and MLP at once: included when
//! either is), and optionally the adaLN modulations. With attention but not the MLPs, a single block's `linear1`
//! adapter covers its q/k/v rows only ([`LoraTargets::rows`]): exactly the layers x-flux's processors (and so UNO's
//! LoRA) adapt, so such a LoRA exports to x-flux naming without loss.
//!
//! **Export** in two namings, both loadable back ([`LoraSet::load_tensors`]):
//! * kohya / ComfyUI: `lora_unet_<path with '.'→'_'>.lora_down.weight` (A), `.lora_up.weight` (B), `.alpha`.
//! * PEFT: `base_model.model.<path>.lora_A.weight` (A), `.lora_B.weight` (B), with `adapter_config.json`
//!   ([`LoraSet::peft_adapter_config`]).

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Which layers get adapters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraTargets {
    /// Attention projections (qkv, proj) and the single blocks' fused layers.
    pub attention: bool,
    /// MLPs and the single blocks' fused layers.
    pub mlp: bool,
    /// adaLN modulation layers.
    pub modulation: bool,
}

impl Default for LoraTargets {
    fn default() -> Self {
        Self {
            attention: true,
            mlp: true,
            modulation: false,
        }
    }
}

/// LoRA hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    /// Rank `r`.
    pub rank: usize,
    /// Scale numerator `α` (the update is scaled by `α / r`).
    pub alpha: f32,
    /// Targeted layers.
    pub targets: LoraTargets,
    /// Seed of the `A` initialisation.
    pub seed: u64,
}

impl LoraConfig {
    /// Trainable parameters of this config's adapters on a model of config `model` (without building them).
    pub fn parameter_count(&self, model: &super::Config) -> u64 {
        super::config::expected_tensor_shapes(model)
            .iter()
            .filter_map(|(name, shape)| match (name.strip_suffix(".weight"), &shape[..]) {
                (Some(path), &[out, inp]) if self.targets.selects(path) => {
                    Some((self.rank * (inp + self.targets.rows(path, inp, out))) as u64)
                }
                _ => None,
            })
            .sum()
    }
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 8.0,
            targets: LoraTargets::default(),
            seed: 0,
        }
    }
}

/// Kind of a linear layer, from its FLUX path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LayerKind {
    Attention,
    Mlp,
    Fused,
    Modulation,
}

fn layer_kind(path: &str) -> Option<LayerKind> {
    let last = path.rsplit('.').next().unwrap_or(path);
    if path.ends_with("_attn.qkv") || path.ends_with("_attn.proj") {
        Some(LayerKind::Attention)
    } else if path.ends_with("_mlp.0") || path.ends_with("_mlp.2") {
        Some(LayerKind::Mlp)
    } else if path.starts_with("single_blocks.") && (last == "linear1" || last == "linear2") {
        Some(LayerKind::Fused)
    } else if path.ends_with("_mod.lin") || path.ends_with(".modulation.lin") {
        Some(LayerKind::Modulation)
    } else {
        None
    }
}

impl LoraTargets {
    /// Whether the linear layer at FLUX path `path` gets an adapter.
    pub fn selects(&self, path: &str) -> bool {
        match layer_kind(path) {
            Some(LayerKind::Attention) => self.attention,
            Some(LayerKind::Mlp) => self.mlp,
            Some(LayerKind::Fused) => self.attention || self.mlp,
            Some(LayerKind::Modulation) => self.modulation,
            None => false,
        }
    }

    /// How many leading output rows of the layer at `path` ([out, in]) the adapter covers: all of them, except a
    /// single block's `linear1` when attention is targeted without the MLPs, whose adapter covers its q/k/v rows
    /// (`3·in`) only, as x-flux's `qkv_lora` (and so UNO's LoRA) does.
    pub fn rows(&self, path: &str, in_dim: usize, out_dim: usize) -> usize {
        let linear1 = layer_kind(path) == Some(LayerKind::Fused) && path.ends_with(".linear1");
        if linear1 && self.attention && !self.mlp {
            (3 * in_dim).min(out_dim)
        } else {
            out_dim
        }
    }
}

/// Errors when building or loading adapters; each names the tensor concerned.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// Rank 0 or a non-finite α.
    #[error("invalid LoRA config: {0}")]
    Config(String),
    /// A tensor the adapter set needs is absent from the file.
    #[error("LoRA tensor `{0}` is missing")]
    Missing(String),
    /// A tensor has the wrong shape.
    #[error("LoRA tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// Tensor name.
        name: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// The file's tensors match neither naming.
    #[error(
        "no LoRA tensor in kohya (lora_unet_…), PEFT (base_model.model.…) or x-flux (…processor.qkv_lora1…) naming was \
         found"
    )]
    UnknownFormat,
    /// A candle error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// One adapter: `Δy = (α/r)·(x·Aᵀ)·Bᵀ`.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// `A` [r, in].
    pub a: Var,
    /// `B` [out, r].
    pub b: Var,
    /// `α / r`.
    pub scale: f64,
    /// Output rows of the adapted layer; `B` covers the leading [`Self::rows`] of them.
    pub layer_rows: usize,
}

impl LoraAdapter {
    /// Number of output rows the adapter changes (the leading rows of its layer).
    pub fn rows(&self) -> usize {
        self.b.dims().first().copied().unwrap_or(0)
    }

    /// `B` extended with zero rows to all [`Self::layer_rows`] (itself when it already covers them all).
    pub fn full_rows_b(&self) -> candle_core::Result<Tensor> {
        let b = self.b.as_tensor();
        let rows = self.rows();
        if rows >= self.layer_rows {
            return Ok(b.clone());
        }
        let zeros = Tensor::zeros((self.layer_rows - rows, b.dim(1)?), b.dtype(), b.device())?;
        Tensor::cat(&[b, &zeros], 0)
    }
}

/// The naming of an exported adapter file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    /// kohya-ss / ComfyUI (`lora_unet_…lora_down/up`, `.alpha`).
    Kohya,
    /// Hugging Face PEFT (`base_model.model.….lora_A/B.weight`).
    Peft,
}

/// All adapters of a model, keyed by FLUX path of the adapted linear layer.
#[derive(Clone, Debug)]
pub struct LoraSet {
    cfg: LoraConfig,
    adapters: BTreeMap<String, LoraAdapter>,
}

/// Per-path seed so that each adapter's initialisation does not depend on which other layers are targeted.
fn path_seed(seed: u64, path: &str) -> u64 {
    path.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn kohya_key(path: &str) -> String {
    format!("lora_unet_{}", path.replace('.', "_"))
}

fn peft_key(path: &str) -> String {
    format!("base_model.model.{path}")
}

impl LoraSet {
    /// Adapters for every selected linear layer among `linears` (`(FLUX path, in, out)`).
    pub fn new<'a>(
        cfg: LoraConfig,
        linears: impl IntoIterator<Item = (&'a str, usize, usize)>,
        device: &Device,
    ) -> Result<Self, LoraError> {
        if cfg.rank == 0 || !cfg.alpha.is_finite() {
            return Err(LoraError::Config(format!("rank {} / alpha {}", cfg.rank, cfg.alpha)));
        }
        let scale = f64::from(cfg.alpha) / cfg.rank as f64;
        let mut adapters = BTreeMap::new();
        for (path, in_dim, out_dim) in linears {
            if !cfg.targets.selects(path) {
                continue;
            }
            let mut rng = ChaCha8Rng::seed_from_u64(path_seed(cfg.seed, path));
            let bound = 1.0 / (in_dim.max(1) as f32).sqrt();
            let a: Vec<f32> = (0..cfg.rank * in_dim)
                .map(|_| rng.random_range(-bound..=bound))
                .collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.rank, in_dim), device)?)?;
            let b = Var::zeros((cfg.targets.rows(path, in_dim, out_dim), cfg.rank), DType::F32, device)?;
            adapters.insert(
                path.to_string(),
                LoraAdapter {
                    a,
                    b,
                    scale,
                    layer_rows: out_dim,
                },
            );
        }
        Ok(Self { cfg, adapters })
    }

    /// A set of given adapters, keyed by the FLUX path of the layer each adapts (a LoRA read from a file rather
    /// than initialised).
    pub fn from_adapters(cfg: LoraConfig, adapters: BTreeMap<String, LoraAdapter>) -> Self {
        Self { cfg, adapters }
    }

    /// Adapters for a FLUX-format model config (every `weight` [out, in] of its checkpoint naming).
    pub fn for_model(cfg: LoraConfig, model: &super::Config, device: &Device) -> Result<Self, LoraError> {
        let shapes = super::config::expected_tensor_shapes(model);
        let linears = shapes
            .iter()
            .filter_map(|(name, shape)| match (name.strip_suffix(".weight"), &shape[..]) {
                (Some(path), &[out, inp]) => Some((path, inp, out)),
                _ => None,
            });
        Self::new(cfg, linears, device)
    }

    /// The config the set was built with.
    pub fn config(&self) -> &LoraConfig {
        &self.cfg
    }

    /// The adapter of the linear layer at `path`, if targeted.
    pub fn get(&self, path: &str) -> Option<&LoraAdapter> {
        self.adapters.get(path)
    }

    /// `(path, adapter)` pairs in path order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &LoraAdapter)> {
        self.adapters.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of adapters.
    pub fn len(&self) -> usize {
        self.adapters.len()
    }

    /// True when no layer is targeted.
    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// All trainable variables (A then B of each adapter, in path order).
    pub fn vars(&self) -> Vec<Var> {
        self.adapters
            .values()
            .flat_map(|a| [a.a.clone(), a.b.clone()])
            .collect()
    }

    /// All trainable variables with stable names (`<path>.lora_A` / `<path>.lora_B`), in path order.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.adapters
            .iter()
            .flat_map(|(p, a)| {
                [
                    (format!("{p}.lora_A"), a.a.clone()),
                    (format!("{p}.lora_B"), a.b.clone()),
                ]
            })
            .collect()
    }

    /// Number of trainable parameters.
    pub fn parameter_count(&self) -> usize {
        self.adapters
            .values()
            .map(|a| a.a.elem_count() + a.b.elem_count())
            .sum()
    }

    /// The adapters as named tensors in the given naming.
    pub fn to_tensors(&self, format: LoraFormat) -> Result<HashMap<String, Tensor>, LoraError> {
        let mut out = HashMap::new();
        for (path, ad) in &self.adapters {
            match format {
                LoraFormat::Kohya => {
                    let k = kohya_key(path);
                    out.insert(format!("{k}.lora_down.weight"), ad.a.as_tensor().clone());
                    out.insert(format!("{k}.lora_up.weight"), ad.full_rows_b()?);
                    out.insert(format!("{k}.alpha"), Tensor::new(self.cfg.alpha, ad.a.device())?);
                }
                LoraFormat::Peft => {
                    let k = peft_key(path);
                    out.insert(format!("{k}.lora_A.weight"), ad.a.as_tensor().clone());
                    out.insert(format!("{k}.lora_B.weight"), ad.full_rows_b()?);
                }
            }
        }
        Ok(out)
    }

    /// A safetensors file of the adapters (with rank/alpha/format in its metadata).
    pub fn to_safetensors_bytes(&self, format: LoraFormat) -> Result<Vec<u8>, LoraError> {
        let tensors = self.to_tensors(format)?;
        let mut named: Vec<(String, Tensor)> = tensors.into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let metadata = HashMap::from([
            ("format".to_string(), format!("{format:?}").to_lowercase()),
            ("rank".to_string(), self.cfg.rank.to_string()),
            ("alpha".to_string(), self.cfg.alpha.to_string()),
            ("generator".to_string(), "focusdpo".to_string()),
        ]);
        safetensors::serialize(named, Some(metadata)).map_err(|e| LoraError::Config(e.to_string()))
    }

    /// PEFT's `adapter_config.json` for this set.
    pub fn peft_adapter_config(&self) -> serde_json::Value {
        let modules: Vec<&str> = self.adapters.keys().map(String::as_str).collect();
        serde_json::json!({
            "peft_type": "LORA",
            "r": self.cfg.rank,
            "lora_alpha": self.cfg.alpha,
            "target_modules": modules,
            "bias": "none",
            "init_lora_weights": true,
        })
    }

    /// Sets every adapter's `A` and `B` from tensors in either naming (detected from the keys). Every adapter of
    /// this set must be present with the right shapes; extra tensors are ignored.
    pub fn load_tensors(&self, tensors: &HashMap<String, Tensor>) -> Result<(), LoraError> {
        let format = if tensors.keys().any(|k| k.starts_with("lora_unet_")) {
            LoraFormat::Kohya
        } else if tensors.keys().any(|k| k.starts_with("base_model.model.")) {
            LoraFormat::Peft
        } else {
            return Err(LoraError::UnknownFormat);
        };
        // Validate everything first so that a bad file leaves the adapters untouched.
        let mut updates = Vec::with_capacity(2 * self.adapters.len());
        for (path, ad) in &self.adapters {
            let (a_name, b_name) = match format {
                LoraFormat::Kohya => {
                    let k = kohya_key(path);
                    (format!("{k}.lora_down.weight"), format!("{k}.lora_up.weight"))
                }
                LoraFormat::Peft => {
                    let k = peft_key(path);
                    (format!("{k}.lora_A.weight"), format!("{k}.lora_B.weight"))
                }
            };
            for (name, var) in [(a_name, &ad.a), (b_name, &ad.b)] {
                let t = tensors.get(&name).ok_or_else(|| LoraError::Missing(name.clone()))?;
                // `B` of a leading-rows adapter is written padded to the whole layer (what other tools expect).
                let t = if std::ptr::eq(var, &ad.b) && t.dims() == [ad.layer_rows, ad.a.dims()[0]] {
                    let rows = ad.rows();
                    if rows < ad.layer_rows {
                        let beyond = t.narrow(0, rows, ad.layer_rows - rows)?;
                        if beyond
                            .abs()?
                            .flatten_all()?
                            .max(0)?
                            .to_dtype(DType::F32)?
                            .to_scalar::<f32>()?
                            > 0.0
                        {
                            return Err(LoraError::Config(format!(
                                "`{name}` changes rows {rows}..{} of `{path}`, which this run's adapter does not \
                                 cover (lora.targets.mlp = false adapts a single block's q/k/v rows only): load it \
                                 with lora.targets.mlp = true",
                                ad.layer_rows
                            )));
                        }
                    }
                    t.narrow(0, 0, rows)?
                } else {
                    t.clone()
                };
                if t.dims() != var.dims() {
                    return Err(LoraError::Shape {
                        name,
                        expected: var.dims().to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                updates.push((var, t));
            }
        }
        for (var, t) in updates {
            // A copy, so that loading a set's own exported tensors (which share its storage) also works.
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?.copy()?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Config;

    fn tiny_set(seed: u64) -> LoraSet {
        LoraSet::for_model(
            LoraConfig {
                seed,
                ..Default::default()
            },
            &Config::tiny(),
            &Device::Cpu,
        )
        .unwrap()
    }

    #[test]
    fn targets_follow_flux_paths() {
        let t = LoraTargets::default();
        for p in [
            "double_blocks.0.img_attn.qkv",
            "double_blocks.3.txt_attn.proj",
            "double_blocks.0.img_mlp.0",
            "double_blocks.0.txt_mlp.2",
            "single_blocks.5.linear1",
            "single_blocks.5.linear2",
        ] {
            assert!(t.selects(p), "{p}");
        }
        for p in [
            "img_in",
            "txt_in",
            "time_in.in_layer",
            "final_layer.linear",
            "double_blocks.0.img_mod.lin",
        ] {
            assert!(!t.selects(p), "{p}");
        }
        let attn_only = LoraTargets { mlp: false, ..t };
        assert!(!attn_only.selects("double_blocks.0.img_mlp.0"));
        assert!(attn_only.selects("single_blocks.0.linear2"));
        assert!(LoraTargets { modulation: true, ..t }.selects("single_blocks.0.modulation.lin"));
    }

    #[test]
    fn the_parameter_count_without_building_equals_the_built_sets() {
        for targets in [
            LoraTargets::default(),
            LoraTargets {
                mlp: false,
                modulation: true,
                ..Default::default()
            },
        ] {
            let cfg = LoraConfig {
                targets,
                ..Default::default()
            };
            let set = LoraSet::for_model(cfg, &Config::tiny(), &Device::Cpu).unwrap();
            assert_eq!(cfg.parameter_count(&Config::tiny()), set.parameter_count() as u64);
        }
    }

    #[test]
    fn tiny_set_shapes_and_zero_b() {
        let cfg = Config::tiny();
        let set = tiny_set(0);
        // Per double block: 2 streams × (qkv, proj, mlp.0, mlp.2); per single block: linear1, linear2.
        assert_eq!(set.len(), cfg.depth * 8 + cfg.depth_single_blocks * 2);
        let qkv = set.get("double_blocks.0.img_attn.qkv").unwrap();
        assert_eq!(qkv.a.dims(), &[8, cfg.hidden_size]);
        assert_eq!(qkv.b.dims(), &[3 * cfg.hidden_size, 8]);
        assert_eq!(
            qkv.b
                .as_tensor()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        assert!((qkv.scale - 1.0).abs() < 1e-12);
        assert_eq!(set.vars().len(), 2 * set.len());
    }

    #[test]
    fn init_is_deterministic_per_seed_and_path() {
        let a = tiny_set(1);
        let b = tiny_set(1);
        let c = tiny_set(2);
        let get = |s: &LoraSet| {
            s.get("single_blocks.0.linear1")
                .unwrap()
                .a
                .as_tensor()
                .to_vec2::<f32>()
                .unwrap()
        };
        assert_eq!(get(&a), get(&b));
        assert_ne!(get(&a), get(&c));
    }

    #[test]
    fn export_import_round_trip_in_both_namings() {
        let src = tiny_set(3);
        for ad in src.adapters.values() {
            let b = Tensor::randn(0f32, 1.0, ad.b.dims(), &Device::Cpu).unwrap();
            ad.b.set(&b).unwrap();
        }
        for format in [LoraFormat::Kohya, LoraFormat::Peft] {
            let bytes = src.to_safetensors_bytes(format).unwrap();
            let loaded = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
            let dst = tiny_set(99);
            dst.load_tensors(&loaded).unwrap();
            for (path, ad) in src.iter() {
                let other = dst.get(path).unwrap();
                for (x, y) in [(&ad.a, &other.a), (&ad.b, &other.b)] {
                    let diff = (x.as_tensor() - y.as_tensor())
                        .unwrap()
                        .abs()
                        .unwrap()
                        .sum_all()
                        .unwrap();
                    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{format:?} {path}");
                }
            }
        }
        let kohya = src.to_tensors(LoraFormat::Kohya).unwrap();
        assert!(kohya.contains_key("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"));
        assert!(kohya.contains_key("lora_unet_single_blocks_0_linear1.alpha"));
        let peft = src.to_tensors(LoraFormat::Peft).unwrap();
        assert!(peft.contains_key("base_model.model.double_blocks.0.img_attn.qkv.lora_B.weight"));
        assert_eq!(src.peft_adapter_config()["r"], 8);
    }

    #[test]
    fn load_errors_name_the_tensor() {
        let set = tiny_set(0);
        let mut t = set.to_tensors(LoraFormat::Peft).unwrap();
        let key = "base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight";
        t.insert(
            key.to_string(),
            Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
        );
        let e = set.load_tensors(&t).unwrap_err();
        assert!(e.to_string().contains(key), "{e}");
        t.remove(key);
        assert!(matches!(set.load_tensors(&t), Err(LoraError::Missing(k)) if k == key));
        assert!(matches!(
            set.load_tensors(&HashMap::new()),
            Err(LoraError::UnknownFormat)
        ));
        assert!(matches!(
            LoraSet::new(
                LoraConfig {
                    rank: 0,
                    ..Default::default()
                },
                [],
                &Device::Cpu
            ),
            Err(LoraError::Config(_))
        ));
    }

    #[test]
    fn attention_only_adapts_the_qkv_rows_of_linear1_and_exports_them_padded() {
        let cfg = Config::tiny();
        let (h, m) = (cfg.hidden_size, cfg.mlp_hidden_dim());
        let lora_cfg = LoraConfig {
            targets: LoraTargets {
                mlp: false,
                ..Default::default()
            },
            ..Default::default()
        };
        let set = LoraSet::for_model(lora_cfg, &cfg, &Device::Cpu).unwrap();
        let l1 = set.get("single_blocks.0.linear1").unwrap();
        assert_eq!((l1.rows(), l1.layer_rows), (3 * h, 3 * h + m));
        assert_eq!(set.get("single_blocks.0.linear2").unwrap().rows(), h);
        l1.b.set(&Tensor::ones((3 * h, 8), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        // Exported padded to the whole layer (what other tools expect), read back to the q/k/v rows.
        let mut kohya = set.to_tensors(LoraFormat::Kohya).unwrap();
        let up = "lora_unet_single_blocks_0_linear1.lora_up.weight";
        assert_eq!(kohya[up].dims(), [3 * h + m, 8]);
        let b = kohya[up].narrow(0, 3 * h, m).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(b.to_scalar::<f32>().unwrap(), 0.0);
        let other = LoraSet::for_model(lora_cfg, &cfg, &Device::Cpu).unwrap();
        other.load_tensors(&kohya).unwrap();
        assert_eq!(other.get("single_blocks.0.linear1").unwrap().b.dims(), [3 * h, 8]);
        // A file that changes the MLP rows does not fit, and says how to load it.
        kohya.insert(
            up.into(),
            Tensor::ones((3 * h + m, 8), DType::F32, &Device::Cpu).unwrap(),
        );
        let e = other.load_tensors(&kohya).unwrap_err().to_string();
        assert!(e.contains(up) && e.contains("lora.targets.mlp = true"), "{e}");
    }
}
