//! Hyper-parameters of the FLUX-format MMDiT: the FLUX.1-dev preset (loads real checkpoints) and the tiny
//! default that trains on two CPU cores with the same code.

use thiserror::Error;

/// Width of the sinusoidal timestep / guidance embedding fed to `time_in` and `guidance_in` (fixed in FLUX).
pub const TIMESTEP_EMBED_DIM: usize = 256;

/// Architecture of one MMDiT: field names and meanings follow FLUX's `FluxParams`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Channels of one image token (packed latent patch); also the output width.
    pub in_channels: usize,
    /// Width of the pooled text vector `y` (CLIP pooled output in FLUX).
    pub vec_in_dim: usize,
    /// Width of one text-context token (T5 hidden size in FLUX).
    pub context_in_dim: usize,
    /// Transformer width.
    pub hidden_size: usize,
    /// MLP width as a multiple of `hidden_size`.
    pub mlp_ratio: f64,
    /// Attention heads.
    pub num_heads: usize,
    /// Number of double-stream blocks.
    pub depth: usize,
    /// Number of single-stream blocks.
    pub depth_single_blocks: usize,
    /// Rotary dimensions per position axis (index, row, col); must sum to `head_dim()`.
    pub axes_dim: Vec<usize>,
    /// RoPE base frequency.
    pub theta: f64,
    /// Whether the double-stream `qkv` projections carry a bias.
    pub qkv_bias: bool,
    /// Whether the model has a `guidance_in` embedder (guidance-distilled FLUX.1-dev).
    pub guidance_embed: bool,
    /// What the last layer outputs ([`Prediction`]); the forward pass returns the velocity either way. Absent
    /// from FLUX's parameters and from files written before it existed: velocity.
    #[serde(default, skip_serializing_if = "Prediction::is_velocity")]
    pub prediction: Prediction,
    /// Self-conditioning (Chen, Zhang & Hinton, "Analog Bits", 2022): the target tokens also receive the model's
    /// previous estimate of the clean image through `self_cond_in` (`[H, C]`, no bias, zero-initialised so that
    /// adding it to a trained base changes nothing). Not part of FLUX or UNO; absent from files written before it
    /// existed: off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub self_condition: bool,
}

/// Smallest `t` that [`Prediction::Sample`] divides by: `v̂ = (x_t − x̂₀) / max(t, SAMPLE_PREDICTION_T_MIN)`
/// (JiT clips its `1 − t` at 0.05 the same way).
pub const SAMPLE_PREDICTION_T_MIN: f32 = 0.05;

/// What the network's last layer predicts under rectified flow (`x_t = (1 − t)·x₀ + t·ε`, `v = ε − x₀`).
///
/// [`crate::model::Mmdit::forward`] returns the velocity in both cases, so the sampler, the objectives and the
/// attention field never see the difference; the loss stays the velocity MSE.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Prediction {
    /// The velocity itself (FLUX, UNO).
    #[default]
    Velocity,
    /// The clean sample `x̂₀`, turned into `v̂ = (x_t − x̂₀) / max(t, SAMPLE_PREDICTION_T_MIN)`: Li & He,
    /// "Back to Basics: Let Denoising Generative Models Denoise" (JiT, 2025), x-prediction with the v-loss,
    /// for pixel-space transformers that otherwise spend their width carrying the noise to the output.
    Sample,
}

impl Prediction {
    /// True for [`Prediction::Velocity`] (the default, left out when a config is written).
    pub fn is_velocity(&self) -> bool {
        *self == Prediction::Velocity
    }
}

/// A `Config` that cannot describe a working model.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ConfigError {
    /// A size that must be positive is zero.
    #[error("config field `{field}` must be positive")]
    Zero {
        /// The offending field.
        field: &'static str,
    },
    /// `hidden_size` does not split into `num_heads` equal heads.
    #[error("hidden_size {hidden_size} is not divisible by num_heads {num_heads}")]
    HeadsDoNotDivide {
        /// Transformer width.
        hidden_size: usize,
        /// Attention heads.
        num_heads: usize,
    },
    /// The rotary axes do not cover the head exactly.
    #[error("axes_dim {axes_dim:?} sums to {sum}, but head_dim is {head_dim}")]
    AxesDoNotMatchHead {
        /// The configured axes.
        axes_dim: Vec<usize>,
        /// Their sum.
        sum: usize,
        /// `hidden_size / num_heads`.
        head_dim: usize,
    },
    /// RoPE rotates pairs of channels, so each axis needs an even width.
    #[error("axes_dim {axes_dim:?} must have 3 even entries (index, row, col)")]
    BadAxes {
        /// The configured axes.
        axes_dim: Vec<usize>,
    },
    /// The MLP ratio must give a positive integer width.
    #[error("mlp_ratio {mlp_ratio} must be positive and finite")]
    BadMlpRatio {
        /// The configured ratio.
        mlp_ratio: f64,
    },
    /// The RoPE base must be a finite number above 1.
    #[error("theta {theta} must be finite and > 1")]
    BadTheta {
        /// The configured base.
        theta: f64,
    },
}

impl Config {
    /// FLUX.1-dev (black-forest-labs `flux/util.py`, `configs["flux-dev"]`), the base model of UNO.
    pub fn flux_dev() -> Self {
        Self {
            in_channels: 64,
            vec_in_dim: 768,
            context_in_dim: 4096,
            hidden_size: 3072,
            mlp_ratio: 4.0,
            num_heads: 24,
            depth: 19,
            depth_single_blocks: 38,
            axes_dim: vec![16, 56, 56],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: true,
            prediction: Prediction::Velocity,
            self_condition: false,
        }
    }

    /// The embedded default: 64×64 RGB images pixel-unshuffled by 4 (48 channels, 16×16 = 256 tokens),
    /// width 256, 4 heads of 64, 3 double + 3 single blocks.
    pub fn tiny() -> Self {
        Self {
            in_channels: 48,
            vec_in_dim: 64,
            context_in_dim: 64,
            hidden_size: 256,
            mlp_ratio: 4.0,
            num_heads: 4,
            depth: 3,
            depth_single_blocks: 3,
            axes_dim: vec![8, 28, 28],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: false,
            prediction: Prediction::Velocity,
            self_condition: false,
        }
    }

    /// The tiny default shrunk for tests: width 64, 2 heads, 1 double + 1 single block (same channels, text
    /// widths and RoPE layout rules, so every code path of [`Self::tiny`] runs, fast).
    pub fn micro() -> Self {
        Self {
            hidden_size: 64,
            num_heads: 2,
            axes_dim: vec![8, 12, 12],
            depth: 1,
            depth_single_blocks: 1,
            ..Self::tiny()
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// Width of the MLP hidden layer (FLUX truncates `hidden_size * mlp_ratio` to an integer).
    pub fn mlp_hidden_dim(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    /// Checks that the sizes describe a buildable model.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("in_channels", self.in_channels),
            ("vec_in_dim", self.vec_in_dim),
            ("context_in_dim", self.context_in_dim),
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0) || self.mlp_hidden_dim() == 0 {
            return Err(ConfigError::BadMlpRatio {
                mlp_ratio: self.mlp_ratio,
            });
        }
        if !(self.theta.is_finite() && self.theta > 1.0) {
            return Err(ConfigError::BadTheta { theta: self.theta });
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(ConfigError::HeadsDoNotDivide {
                hidden_size: self.hidden_size,
                num_heads: self.num_heads,
            });
        }
        if self.axes_dim.len() != 3 || self.axes_dim.iter().any(|d| *d == 0 || d % 2 == 1) {
            return Err(ConfigError::BadAxes {
                axes_dim: self.axes_dim.clone(),
            });
        }
        let sum: usize = self.axes_dim.iter().sum();
        if sum != self.head_dim() {
            return Err(ConfigError::AxesDoNotMatchHead {
                axes_dim: self.axes_dim.clone(),
                sum,
                head_dim: self.head_dim(),
            });
        }
        Ok(())
    }
}

/// Every tensor of a FLUX checkpoint for `cfg`, with its shape, in a fixed order (embedders, double blocks,
/// single blocks, final layer).
pub fn expected_tensor_shapes(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let (h, m, dh) = (cfg.hidden_size, cfg.mlp_hidden_dim(), cfg.head_dim());
    let mut out = Vec::new();
    let mut linear = |name: &str, in_dim: usize, out_dim: usize, bias: bool| {
        out.push((format!("{name}.weight"), vec![out_dim, in_dim]));
        if bias {
            out.push((format!("{name}.bias"), vec![out_dim]));
        }
    };
    linear("img_in", cfg.in_channels, h, true);
    linear("txt_in", cfg.context_in_dim, h, true);
    linear("time_in.in_layer", TIMESTEP_EMBED_DIM, h, true);
    linear("time_in.out_layer", h, h, true);
    linear("vector_in.in_layer", cfg.vec_in_dim, h, true);
    linear("vector_in.out_layer", h, h, true);
    if cfg.guidance_embed {
        linear("guidance_in.in_layer", TIMESTEP_EMBED_DIM, h, true);
        linear("guidance_in.out_layer", h, h, true);
    }
    let mut norms = Vec::new();
    for i in 0..cfg.depth {
        for stream in ["img", "txt"] {
            let p = format!("double_blocks.{i}.{stream}");
            linear(&format!("{p}_mod.lin"), h, 6 * h, true);
            linear(&format!("{p}_attn.qkv"), h, 3 * h, cfg.qkv_bias);
            norms.push(format!("{p}_attn.norm.query_norm.scale"));
            norms.push(format!("{p}_attn.norm.key_norm.scale"));
            linear(&format!("{p}_attn.proj"), h, h, true);
            linear(&format!("{p}_mlp.0"), h, m, true);
            linear(&format!("{p}_mlp.2"), m, h, true);
        }
    }
    for i in 0..cfg.depth_single_blocks {
        let p = format!("single_blocks.{i}");
        linear(&format!("{p}.linear1"), h, 3 * h + m, true);
        linear(&format!("{p}.linear2"), h + m, h, true);
        norms.push(format!("{p}.norm.query_norm.scale"));
        norms.push(format!("{p}.norm.key_norm.scale"));
        linear(&format!("{p}.modulation.lin"), h, 3 * h, true);
    }
    linear("final_layer.linear", h, cfg.in_channels, true);
    linear("final_layer.adaLN_modulation.1", h, 2 * h, true);
    out.extend(norms.into_iter().map(|name| (name, vec![dh])));
    // Last, so that the other tensors of a random init are drawn as they are without it.
    if cfg.self_condition {
        out.push((format!("{SELF_COND_IN}.weight"), vec![h, cfg.in_channels]));
    }
    out
}

/// The projection of the self-conditioning estimate ([`Config::self_condition`]).
pub const SELF_COND_IN: &str = "self_cond_in";

/// Total number of parameters of a model with config `cfg`.
pub fn parameter_count(cfg: &Config) -> usize {
    expected_tensor_shapes(cfg)
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        assert_eq!(Config::flux_dev().validate(), Ok(()));
        assert_eq!(Config::tiny().validate(), Ok(()));
        assert_eq!(Config::flux_dev().head_dim(), 128);
        assert_eq!(Config::tiny().head_dim(), 64);
        assert_eq!(Config::flux_dev().mlp_hidden_dim(), 12288);
    }

    /// Files written before `prediction` existed read as velocity; a velocity config is written without the field
    /// (so such files stay byte-identical), a sample-predicting one with it.
    #[test]
    fn prediction_defaults_to_velocity_and_is_written_only_when_it_is_not() {
        let json = serde_json::to_string(&Config::tiny()).expect("serialises");
        assert!(!json.contains("prediction"), "{json}");
        let back: Config = serde_json::from_str(&json).expect("parses");
        assert_eq!(back.prediction, Prediction::Velocity);
        let sample = Config {
            prediction: Prediction::Sample,
            ..Config::tiny()
        };
        let json = serde_json::to_string(&sample).expect("serialises");
        assert!(json.contains("\"prediction\":\"sample\""), "{json}");
        assert_eq!(serde_json::from_str::<Config>(&json).expect("parses"), sample);
        let bad = json.replace("\"sample\"", "\"x0\"");
        let err = serde_json::from_str::<Config>(&bad).expect_err("unknown prediction");
        assert!(err.to_string().contains("x0"), "{err}");
    }

    #[test]
    fn invalid_configs_are_rejected_with_the_reason() {
        let cfg = Config {
            axes_dim: vec![8, 28, 26],
            ..Config::tiny()
        };
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::AxesDoNotMatchHead {
                sum: 62,
                head_dim: 64,
                ..
            })
        ));
        let cfg = Config {
            num_heads: 3,
            ..Config::tiny()
        };
        assert!(matches!(cfg.validate(), Err(ConfigError::HeadsDoNotDivide { .. })));
        let cfg = Config {
            axes_dim: vec![9, 27, 28],
            ..Config::tiny()
        };
        assert!(matches!(cfg.validate(), Err(ConfigError::BadAxes { .. })));
        let cfg = Config {
            hidden_size: 0,
            ..Config::tiny()
        };
        assert_eq!(cfg.validate(), Err(ConfigError::Zero { field: "hidden_size" }));
    }
}
