//! The FLUX-format MMDiT backbone (FLUX.1 `flux/model.py` + `flux/modules/layers.py`), with UNO's in-context
//! reference tokens (`uno/flux/model.py`) and UnoPE position ids (`uno/flux/sampling.py`, `prepare_multi_ip`).
//!
//! One implementation serves [`Config::tiny`] and [`Config::flux_dev`]: every `vb.pp(..)` path mirrors the FLUX
//! checkpoint's tensor names (`double_blocks.0.img_attn.qkv.weight`, ...), so real safetensors load as they are.
//!
//! Every op here keeps autograd intact: candle's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `sdpa`
//! silently stop gradients, so softmax goes through `candle_nn::ops::softmax`, the norms are written from
//! elementary ops and attention is computed explicitly.

use candle_core::{D, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use thiserror::Error;

use super::checkpoint;
use super::config::{Config, ConfigError, Prediction, SAMPLE_PREDICTION_T_MIN, SELF_COND_IN, TIMESTEP_EMBED_DIM};
use super::linear::{Adapters, Linear};
use super::rope::Rope;

/// Epsilon of every LayerNorm and QK-RMSNorm in FLUX.
const NORM_EPS: f64 = 1e-6;
/// FLUX scales t ∈ [0, 1] by 1000 before the sinusoidal embedding.
const TIME_FACTOR: f64 = 1000.0;
/// Longest period of the sinusoidal embedding.
const MAX_PERIOD: f64 = 10_000.0;

/// Why a model could not be built.
#[derive(Debug, Error)]
pub enum ModelError {
    /// The config is inconsistent.
    #[error("invalid model config: {0}")]
    Config(#[from] ConfigError),
    /// A tensor is missing, mis-shaped or could not be read (the message names it).
    #[error("loading model weights: {0}")]
    Weights(#[from] candle_core::Error),
}

/// FLUX's sinusoidal embedding of `t` [B] (t ∈ [0, 1], scaled by 1000): [B, dim] = [cos(t·f), sin(t·f)] with
/// `f_i = exp(−ln(10000)·i/(dim/2))`.
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    if dim % 2 == 1 {
        candle_core::bail!("timestep embedding width {dim} is odd");
    }
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-MAX_PERIOD.ln() * i as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = (t.to_dtype(candle_core::DType::F32)? * TIME_FACTOR)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)
}

/// LayerNorm over the last axis without affine parameters (FLUX's `elementwise_affine=False`); fused op with its
/// own backward (gradients flow, unlike candle's `ops::layer_norm`).
fn layer_norm(x: &Tensor) -> Result<Tensor> {
    super::ops::layer_norm(x, NORM_EPS)
}

/// FLUX's RMSNorm with a learned scale over the last axis; fused op with its own backward.
fn rms_norm(x: &Tensor, scale: &Tensor) -> Result<Tensor> {
    super::ops::rms_norm(x, scale, NORM_EPS)
}

/// `in_layer → SiLU → out_layer` (FLUX `MLPEmbedder`): `time_in`, `vector_in`, `guidance_in`.
#[derive(Debug, Clone)]
struct MlpEmbedder {
    in_layer: Linear,
    out_layer: Linear,
}

impl MlpEmbedder {
    fn load(in_dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            in_layer: Linear::load(in_dim, hidden, true, vb.pp("in_layer"))?,
            out_layer: Linear::load(hidden, hidden, true, vb.pp("out_layer"))?,
        })
    }

    fn forward(&self, x: &Tensor, ad: Adapters) -> Result<Tensor> {
        self.out_layer.forward(&self.in_layer.forward(x, ad)?.silu()?, ad)
    }
}

/// One (shift, scale, gate) triple, each [B, 1, hidden].
struct ModulationOut {
    shift: Tensor,
    scale: Tensor,
    gate: Tensor,
}

impl ModulationOut {
    fn scale_shift(&self, x: &Tensor) -> Result<Tensor> {
        super::ops::modulate(x, &self.scale, &self.shift)
    }

    fn gate(&self, x: &Tensor) -> Result<Tensor> {
        super::ops::gate(x, &self.gate)
    }
}

/// `SiLU → lin` producing `3 · n_triples` vectors from the conditioning vector (FLUX `Modulation`).
#[derive(Debug, Clone)]
struct Modulation {
    lin: Linear,
    n_triples: usize,
}

impl Modulation {
    fn load(hidden: usize, n_triples: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            lin: Linear::load(hidden, 3 * n_triples * hidden, true, vb.pp("lin"))?,
            n_triples,
        })
    }

    fn forward(&self, vec: &Tensor, ad: Adapters) -> Result<Vec<ModulationOut>> {
        let chunks = self
            .lin
            .forward(&vec.silu()?, ad)?
            .unsqueeze(1)?
            .chunk(3 * self.n_triples, D::Minus1)?;
        Ok(chunks
            .chunks_exact(3)
            .map(|c| ModulationOut {
                shift: c[0].clone(),
                scale: c[1].clone(),
                gate: c[2].clone(),
            })
            .collect())
    }
}

/// Learned RMSNorm scales for queries and keys (`norm.query_norm.scale`, `norm.key_norm.scale`), [head_dim].
#[derive(Debug, Clone)]
struct QkNorm {
    query_scale: Tensor,
    key_scale: Tensor,
    path: String,
}

impl QkNorm {
    fn load(head_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            query_scale: vb.get(head_dim, "query_norm.scale")?.to_dtype(DType::F32)?,
            key_scale: vb.get(head_dim, "key_norm.scale")?.to_dtype(DType::F32)?,
            path: vb.prefix(),
        })
    }

    fn named(&self) -> [(String, &Tensor); 2] {
        [
            (format!("{}.query_norm.scale", self.path), &self.query_scale),
            (format!("{}.key_norm.scale", self.path), &self.key_scale),
        ]
    }
}

/// Splits a fused [B, L, 3·hidden] projection into normalised q, k and v, each [B, H, L, head_dim].
fn split_qkv(qkv: &Tensor, num_heads: usize, norm: &QkNorm) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, l, three_hidden) = qkv.dims3()?;
    let head_dim = three_hidden / (3 * num_heads);
    let qkv = qkv.reshape((b, l, 3, num_heads, head_dim))?.permute((2, 0, 3, 1, 4))?; // [3, B, H, L, Dh]
    let q = rms_norm(&qkv.get(0)?, &norm.query_scale)?;
    let k = rms_norm(&qkv.get(1)?, &norm.key_scale)?;
    let v = qkv.get(2)?.contiguous()?;
    Ok((q, k, v))
}

/// Joint attention with RoPE (q·kᵀ/√d → softmax → ·v, [`super::attention`]: explicit while small, O(L) memory
/// beyond); returns [B, L, H·head_dim].
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, rope: &Rope) -> Result<Tensor> {
    let (b, h, l, d) = q.dims4()?;
    let (q, k) = (rope.apply(q)?, rope.apply(k)?);
    super::attention::attention(&q, &k, v, 1.0 / (d as f64).sqrt())?
        .transpose(1, 2)?
        .reshape((b, l, h * d))
}

/// Attention half of a double-stream block for one stream: `qkv`, `norm`, `proj`.
#[derive(Debug, Clone)]
struct SelfAttention {
    qkv: Linear,
    norm: QkNorm,
    proj: Linear,
}

impl SelfAttention {
    fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            qkv: Linear::load(h, 3 * h, cfg.qkv_bias, vb.pp("qkv"))?,
            norm: QkNorm::load(cfg.head_dim(), vb.pp("norm"))?,
            proj: Linear::load(h, h, true, vb.pp("proj"))?,
        })
    }
}

/// `0 → GELU(tanh) → 2` (FLUX's `nn.Sequential(Linear, GELU(approximate="tanh"), Linear)`).
#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (h, m) = (cfg.hidden_size, cfg.mlp_hidden_dim());
        Ok(Self {
            fc1: Linear::load(h, m, true, vb.pp("0"))?,
            fc2: Linear::load(m, h, true, vb.pp("2"))?,
        })
    }

    fn forward(&self, x: &Tensor, ad: Adapters) -> Result<Tensor> {
        self.fc2.forward(&super::ops::gelu_tanh(&self.fc1.forward(x, ad)?)?, ad)
    }
}

/// One stream (img or txt) of a double-stream block.
#[derive(Debug, Clone)]
struct Stream {
    modulation: Modulation,
    attn: SelfAttention,
    mlp: Mlp,
}

impl Stream {
    fn load(cfg: &Config, prefix: &str, vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            modulation: Modulation::load(cfg.hidden_size, 2, vb.pp(format!("{prefix}_mod")))?,
            attn: SelfAttention::load(cfg, vb.pp(format!("{prefix}_attn")))?,
            mlp: Mlp::load(cfg, vb.pp(format!("{prefix}_mlp")))?,
        })
    }

    /// Residual update after attention: `x + gate1·proj(attn)`, then `+ gate2·mlp(scale_shift2(norm2(x)))`.
    fn finish(
        &self,
        x: &Tensor,
        attn: &Tensor,
        m1: &ModulationOut,
        m2: &ModulationOut,
        ad: Adapters,
    ) -> Result<Tensor> {
        let x = (x + m1.gate(&self.attn.proj.forward(attn, ad)?)?)?;
        let mlp = self.mlp.forward(&m2.scale_shift(&layer_norm(&x)?)?, ad)?;
        &x + m2.gate(&mlp)?
    }
}

/// The LoRA variables (A then B) of the adapters attached to `linears`.
fn adapter_vars<'a>(linears: impl IntoIterator<Item = &'a Linear>) -> Vec<candle_core::Var> {
    linears
        .into_iter()
        .filter_map(Linear::adapter)
        .flat_map(|ad| [ad.a.clone(), ad.b.clone()])
        .collect()
}

/// FLUX `DoubleStreamBlock`: separate weights for text and image tokens, one joint attention over [txt; img].
#[derive(Debug, Clone)]
struct DoubleStreamBlock {
    img: Stream,
    txt: Stream,
    num_heads: usize,
}

impl DoubleStreamBlock {
    fn adapter_vars(&self) -> Vec<candle_core::Var> {
        let streams = [&self.img, &self.txt];
        adapter_vars(
            streams
                .into_iter()
                .flat_map(|s| [&s.modulation.lin, &s.attn.qkv, &s.attn.proj, &s.mlp.fc1, &s.mlp.fc2]),
        )
    }

    fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            img: Stream::load(cfg, "img", &vb)?,
            txt: Stream::load(cfg, "txt", &vb)?,
            num_heads: cfg.num_heads,
        })
    }

    fn forward(&self, img: &Tensor, txt: &Tensor, vec: &Tensor, rope: &Rope, ad: Adapters) -> Result<(Tensor, Tensor)> {
        let [img_m1, img_m2]: [ModulationOut; 2] = modulation_pair(self.img.modulation.forward(vec, ad)?)?;
        let [txt_m1, txt_m2]: [ModulationOut; 2] = modulation_pair(self.txt.modulation.forward(vec, ad)?)?;

        let img_in = img_m1.scale_shift(&layer_norm(img)?)?;
        let (img_q, img_k, img_v) = split_qkv(
            &self.img.attn.qkv.forward(&img_in, ad)?,
            self.num_heads,
            &self.img.attn.norm,
        )?;
        let txt_in = txt_m1.scale_shift(&layer_norm(txt)?)?;
        let (txt_q, txt_k, txt_v) = split_qkv(
            &self.txt.attn.qkv.forward(&txt_in, ad)?,
            self.num_heads,
            &self.txt.attn.norm,
        )?;

        let q = Tensor::cat(&[txt_q, img_q], 2)?;
        let k = Tensor::cat(&[txt_k, img_k], 2)?;
        let v = Tensor::cat(&[txt_v, img_v], 2)?;
        let attn = attention(&q, &k, &v, rope)?;
        let n_txt = txt.dim(1)?;
        let txt_attn = attn.narrow(1, 0, n_txt)?;
        let img_attn = attn.narrow(1, n_txt, img.dim(1)?)?;

        let img = self.img.finish(img, &img_attn, &img_m1, &img_m2, ad)?;
        let txt = self.txt.finish(txt, &txt_attn, &txt_m1, &txt_m2, ad)?;
        Ok((img, txt))
    }
}

fn modulation_pair(mods: Vec<ModulationOut>) -> Result<[ModulationOut; 2]> {
    mods.try_into()
        .map_err(|m: Vec<ModulationOut>| candle_core::Error::msg(format!("expected 2 modulations, got {}", m.len())))
}

/// FLUX `SingleStreamBlock`: one fused `linear1` producing qkv and the MLP input, attention and MLP in parallel,
/// fused `linear2` back to the width.
#[derive(Debug, Clone)]
struct SingleStreamBlock {
    linear1: Linear,
    linear2: Linear,
    norm: QkNorm,
    modulation: Modulation,
    hidden: usize,
    mlp_hidden: usize,
    num_heads: usize,
}

impl SingleStreamBlock {
    fn adapter_vars(&self) -> Vec<candle_core::Var> {
        adapter_vars([&self.modulation.lin, &self.linear1, &self.linear2])
    }

    fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (h, m) = (cfg.hidden_size, cfg.mlp_hidden_dim());
        Ok(Self {
            linear1: Linear::load(h, 3 * h + m, true, vb.pp("linear1"))?,
            linear2: Linear::load(h + m, h, true, vb.pp("linear2"))?,
            norm: QkNorm::load(cfg.head_dim(), vb.pp("norm"))?,
            modulation: Modulation::load(h, 1, vb.pp("modulation"))?,
            hidden: h,
            mlp_hidden: m,
            num_heads: cfg.num_heads,
        })
    }

    fn forward(&self, x: &Tensor, vec: &Tensor, rope: &Rope, ad: Adapters) -> Result<Tensor> {
        let mods = self.modulation.forward(vec, ad)?;
        let Some(m) = mods.first() else {
            candle_core::bail!("single-stream modulation produced nothing")
        };
        let fused = self.linear1.forward(&m.scale_shift(&layer_norm(x)?)?, ad)?;
        let qkv = fused.narrow(D::Minus1, 0, 3 * self.hidden)?;
        let mlp_in = fused.narrow(D::Minus1, 3 * self.hidden, self.mlp_hidden)?;
        let (q, k, v) = split_qkv(&qkv, self.num_heads, &self.norm)?;
        let attn = attention(&q, &k, &v, rope)?;
        let out = self
            .linear2
            .forward(&Tensor::cat(&[attn, super::ops::gelu_tanh(&mlp_in)?], D::Minus1)?, ad)?;
        x + m.gate(&out)?
    }
}

/// FLUX `LastLayer`: adaLN (shift, scale) then `linear` back to the token channels.
#[derive(Debug, Clone)]
struct LastLayer {
    linear: Linear,
    ada_ln: Linear,
}

impl LastLayer {
    fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            linear: Linear::load(h, cfg.in_channels, true, vb.pp("linear"))?,
            ada_ln: Linear::load(h, 2 * h, true, vb.pp("adaLN_modulation").pp("1"))?,
        })
    }

    fn forward(&self, x: &Tensor, vec: &Tensor, ad: Adapters) -> Result<Tensor> {
        let chunks = self
            .ada_ln
            .forward(&vec.silu()?, ad)?
            .unsqueeze(1)?
            .chunk(2, D::Minus1)?;
        let (shift, scale) = (&chunks[0], &chunks[1]);
        let modulated = super::ops::modulate(&layer_norm(x)?, scale, shift)?;
        self.linear.forward(&modulated, ad)
    }
}

/// One in-context reference image: tokens [B, N_k, in_channels] and position ids [B, N_k, 3] (see
/// [`reference_ids`]).
#[derive(Debug, Clone, Copy)]
pub struct Reference<'a> {
    /// Packed reference tokens, projected by the same `img_in` as the target.
    pub tokens: &'a Tensor,
    /// Position ids (index, row, col) as f32.
    pub ids: &'a Tensor,
}

/// Everything one forward pass reads.
#[derive(Debug, Clone, Copy)]
pub struct MmditInput<'a> {
    /// Noisy target tokens [B, N, in_channels].
    pub img: &'a Tensor,
    /// Target position ids [B, N, 3] (see [`target_ids`]).
    pub img_ids: &'a Tensor,
    /// Text-context tokens [B, L, context_in_dim].
    pub txt: &'a Tensor,
    /// Text position ids [B, L, 3] (all zeros in FLUX, see [`text_ids`]).
    pub txt_ids: &'a Tensor,
    /// Timesteps t ∈ [0, 1], [B].
    pub timesteps: &'a Tensor,
    /// Pooled text vector [B, vec_in_dim].
    pub y: &'a Tensor,
    /// Guidance strength [B]; required exactly when the config has `guidance_embed`.
    pub guidance: Option<&'a Tensor>,
    /// In-context references, concatenated after the target tokens in this order. Each must have the target's
    /// batch size (UNO repeats a batch-1 reference; callers do that here, e.g. with `repeat`).
    pub references: &'a [Reference<'a>],
    /// The previous estimate of the clean target `x̂₀` [B, N, in_channels] for a self-conditioned model
    /// ([`Config::self_condition`]); `None` is the estimate 0 (the first sampling step, or a model without it).
    pub self_condition: Option<&'a Tensor>,
}

/// Options of [`Mmdit::forward_with`].
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    /// Return each double-stream block's image-stream output, split per image (costs nothing when false).
    pub capture_hidden: bool,
    /// Apply the attached LoRA adapters (the policy, default) or not (the frozen reference model).
    pub adapters: Adapters,
    /// Block checkpointing (`train.checkpoint_blocks`): with adapters on, each block keeps only its inputs and is
    /// recomputed in backward; the gradients of its LoRA variables land here, to be merged into the step's
    /// ([`super::checkpoint::CheckpointGrads::merge_into`]).
    pub checkpoint: Option<std::sync::Arc<super::checkpoint::CheckpointGrads>>,
}

/// The image-stream output of one double-stream block, split into the target and each reference.
#[derive(Debug, Clone)]
pub struct BlockHidden {
    /// Target part, [B, N, hidden].
    pub target: Tensor,
    /// Reference parts in input order, each [B, N_k, hidden].
    pub references: Vec<Tensor>,
}

/// Result of [`Mmdit::forward_with`].
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// The velocity prediction for the target tokens, [B, N, in_channels].
    pub prediction: Tensor,
    /// One entry per double-stream block when `capture_hidden` was set, otherwise empty.
    pub hidden: Vec<BlockHidden>,
}

/// The FLUX / UNO MMDiT with frozen base weights.
#[derive(Debug, Clone)]
pub struct Mmdit {
    cfg: Config,
    img_in: Linear,
    /// [`Config::self_condition`]'s projection of `x̂₀`, added to the target tokens after `img_in`.
    self_cond_in: Option<Linear>,
    txt_in: Linear,
    time_in: MlpEmbedder,
    vector_in: MlpEmbedder,
    guidance_in: Option<MlpEmbedder>,
    double_blocks: Vec<DoubleStreamBlock>,
    single_blocks: Vec<SingleStreamBlock>,
    final_layer: LastLayer,
    /// The dtype of the activations between the layers ([`Mmdit::set_activation_dtype`]).
    activations: DType,
}

impl Mmdit {
    /// Builds the model from `vb`, whose paths are FLUX tensor names (use mmapped safetensors for base weights so
    /// that they stay plain tensors, not trainable `Var`s).
    pub fn new(cfg: &Config, vb: VarBuilder) -> std::result::Result<Self, ModelError> {
        cfg.validate()?;
        let h = cfg.hidden_size;
        let double_blocks = (0..cfg.depth)
            .map(|i| DoubleStreamBlock::load(cfg, vb.pp("double_blocks").pp(i)))
            .collect::<Result<_>>()?;
        let single_blocks = (0..cfg.depth_single_blocks)
            .map(|i| SingleStreamBlock::load(cfg, vb.pp("single_blocks").pp(i)))
            .collect::<Result<_>>()?;
        let guidance_in = if cfg.guidance_embed {
            Some(MlpEmbedder::load(TIMESTEP_EMBED_DIM, h, vb.pp("guidance_in"))?)
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            img_in: Linear::load(cfg.in_channels, h, true, vb.pp("img_in"))?,
            self_cond_in: if cfg.self_condition {
                Some(Linear::load(cfg.in_channels, h, false, vb.pp(SELF_COND_IN))?)
            } else {
                None
            },
            txt_in: Linear::load(cfg.context_in_dim, h, true, vb.pp("txt_in"))?,
            time_in: MlpEmbedder::load(TIMESTEP_EMBED_DIM, h, vb.pp("time_in"))?,
            vector_in: MlpEmbedder::load(cfg.vec_in_dim, h, vb.pp("vector_in"))?,
            guidance_in,
            double_blocks,
            single_blocks,
            final_layer: LastLayer::load(cfg, vb.pp("final_layer"))?,
            activations: DType::F32,
        })
    }

    /// The architecture this model was built with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.img_in.weight().device()
    }

    /// Every linear layer of the model, in checkpoint order.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = vec![&self.img_in, &self.txt_in];
        for e in [Some(&self.time_in), Some(&self.vector_in), self.guidance_in.as_ref()]
            .into_iter()
            .flatten()
        {
            out.extend([&e.in_layer, &e.out_layer]);
        }
        for b in &self.double_blocks {
            for s in [&b.img, &b.txt] {
                out.extend([&s.modulation.lin, &s.attn.qkv, &s.attn.proj, &s.mlp.fc1, &s.mlp.fc2]);
            }
        }
        for b in &self.single_blocks {
            out.extend([&b.modulation.lin, &b.linear1, &b.linear2]);
        }
        out.extend([&self.final_layer.ada_ln, &self.final_layer.linear]);
        out.extend(self.self_cond_in.as_ref());
        out
    }

    /// Every base tensor under its FLUX checkpoint name (the names of [`super::config::expected_tensor_shapes`]).
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        for l in self.linears() {
            out.push((format!("{}.weight", l.path()), l.weight()));
            if let Some(b) = l.bias() {
                out.push((format!("{}.bias", l.path()), b));
            }
        }
        for b in &self.double_blocks {
            out.extend(b.img.attn.norm.named());
            out.extend(b.txt.attn.norm.named());
        }
        for b in &self.single_blocks {
            out.extend(b.norm.named());
        }
        out
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = vec![&mut self.img_in, &mut self.txt_in];
        for e in [
            Some(&mut self.time_in),
            Some(&mut self.vector_in),
            self.guidance_in.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            out.extend([&mut e.in_layer, &mut e.out_layer]);
        }
        for b in &mut self.double_blocks {
            for s in [&mut b.img, &mut b.txt] {
                out.extend([
                    &mut s.modulation.lin,
                    &mut s.attn.qkv,
                    &mut s.attn.proj,
                    &mut s.mlp.fc1,
                    &mut s.mlp.fc2,
                ]);
            }
        }
        for b in &mut self.single_blocks {
            out.extend([&mut b.modulation.lin, &mut b.linear1, &mut b.linear2]);
        }
        out.extend([&mut self.final_layer.ada_ln, &mut self.final_layer.linear]);
        out.extend(self.self_cond_in.as_mut());
        out
    }

    /// Refuses `work` (on this model's device, with `lora_params` trainable parameters) when its working memory
    /// (activations, attention, optimiser) exceeds what the device has free ([`super::memory::device_available`]:
    /// `MemAvailable` on the CPU, free device memory on a GPU, or `FOCUSDPO_MEMORY_LIMIT_GB`).
    pub fn check_memory(
        &self,
        what: &str,
        lora_params: u64,
        work: super::memory::Workload,
    ) -> std::result::Result<super::memory::MemoryEstimate, super::memory::DoesNotFit> {
        use super::memory::{Resident, Workload, check, device_available, device_name, estimate};
        let dtype = super::weights::WeightDtype::of(self.weight_dtype());
        let work = Workload {
            on_cpu: self.device().is_cpu(),
            activations: super::weights::WeightDtype::of(self.activations),
            ..work
        };
        let resident = Resident {
            encoders: 0,
            lora_params,
        };
        let plan = estimate(&self.cfg, dtype, resident, &work);
        if let Some(available) = device_available(self.device()) {
            let what = format!("{what} ({} tokens a sequence)", work.tokens());
            check(&what, plan, available, &device_name(self.device()))?;
        }
        Ok(plan)
    }

    /// Holds every linear weight in `dtype` (bf16/f16 halve the frozen base; `model.dtype`). Biases, norm scales and
    /// LoRA adapters stay f32.
    pub fn narrow_weights(&mut self, dtype: DType) -> Result<()> {
        for linear in self.linears_mut() {
            linear.set_weight_dtype(dtype)?;
        }
        Ok(())
    }

    /// The dtype the linear weights are held in.
    pub fn weight_dtype(&self) -> DType {
        self.img_in.weight().dtype()
    }

    /// Runs the layers with activations in `dtype` (`model.activations`), as PyTorch's autocast does: the token
    /// streams, the linear products (LoRA adapters cast to it, their weights and gradients staying f32) and the
    /// attention in `dtype`; the norms and an explicit attention's softmax computed in f32 and cast back; the
    /// conditioning vector computed in f32; the prediction and the captured hidden states returned in f32. bf16
    /// or f16 halve the activations a training step keeps for backward.
    pub fn set_activation_dtype(&mut self, dtype: DType) {
        self.activations = dtype;
    }

    /// The dtype of the activations between the layers.
    pub fn activation_dtype(&self) -> DType {
        self.activations
    }

    /// Merges frozen low-rank updates (a base LoRA such as UNO's, [`super::xflux_lora`]) into the weights they
    /// adapt, each scaled by `scale`: the merged model is the new base (and the reference model of DPO).
    pub fn merge_base_lora(&mut self, pieces: &[super::xflux_lora::BaseLoraPiece], scale: f64) -> Result<()> {
        let mut pending: Vec<Option<&super::xflux_lora::BaseLoraPiece>> = pieces.iter().map(Some).collect();
        for linear in self.linears_mut() {
            for slot in pending.iter_mut() {
                if let Some(piece) = slot.filter(|p| p.target == linear.path()) {
                    linear.merge_into_weight(&piece.delta(scale)?, piece.rows.start)?;
                    *slot = None;
                }
            }
        }
        if let Some(piece) = pending.into_iter().flatten().next() {
            candle_core::bail!(
                "the base LoRA adapts `{}`, which this model does not have",
                piece.target
            );
        }
        Ok(())
    }

    /// Attaches the adapters of `lora` to the layers with the same FLUX path (the adapters share their `Var`s with
    /// the set, so an optimiser stepping `lora.vars()` trains this model). Every adapter of the set must find its
    /// layer with matching shapes; layers without an adapter in the set lose any previous one.
    pub fn attach_lora(&mut self, lora: &super::lora::LoraSet) -> Result<()> {
        let mut attached = 0;
        for linear in self.linears_mut() {
            let adapter = lora.get(linear.path()).cloned();
            attached += usize::from(adapter.is_some());
            linear.set_adapter(adapter)?;
        }
        if attached != lora.len() {
            candle_core::bail!(
                "only {attached} of the {} LoRA adapters match a layer of this model (was the set made for another \
                 config?)",
                lora.len()
            );
        }
        Ok(())
    }

    /// Removes every adapter.
    pub fn detach_lora(&mut self) -> Result<()> {
        for linear in self.linears_mut() {
            linear.set_adapter(None)?;
        }
        Ok(())
    }

    /// The prediction for the target tokens, [B, N, in_channels].
    pub fn forward(&self, input: &MmditInput) -> Result<Tensor> {
        Ok(self.forward_with(input, ForwardOptions::default())?.prediction)
    }

    /// Forward pass with options (hidden-state capture for the attention field).
    pub fn forward_with(&self, input: &MmditInput, opts: ForwardOptions) -> Result<ForwardOutput> {
        let (b, n_target, _) = self.check_tokens("img", input.img, input.img_ids, self.cfg.in_channels, None)?;
        let ref_lens = input
            .references
            .iter()
            .map(|r| {
                self.check_tokens("reference", r.tokens, r.ids, self.cfg.in_channels, Some(b))
                    .map(|s| s.1)
            })
            .collect::<Result<Vec<_>>>()?;
        let (_, n_txt, _) = self.check_tokens("txt", input.txt, input.txt_ids, self.cfg.context_in_dim, Some(b))?;

        // UNO appends the references after the target in the image stream; one concatenation then one `img_in`
        // GEMM is the same as projecting each part separately.
        let (img_tokens, img_ids) = if input.references.is_empty() {
            (input.img.clone(), input.img_ids.clone())
        } else {
            let mut tokens = vec![input.img.clone()];
            let mut ids = vec![input.img_ids.clone()];
            for r in input.references {
                tokens.push(r.tokens.clone());
                ids.push(r.ids.clone());
            }
            (Tensor::cat(&tokens, 1)?, Tensor::cat(&ids, 1)?)
        };
        let act = self.activations;
        let rope = Rope::new(
            &Tensor::cat(&[input.txt_ids, &img_ids], 1)?,
            &self.cfg.axes_dim,
            self.cfg.theta,
        )?
        .in_dtype(act)?;

        let ad = opts.adapters;
        let mut img = self.img_in.forward(&img_tokens.to_dtype(act)?, ad)?;
        match (&self.self_cond_in, input.self_condition) {
            (Some(sc_in), Some(x0)) => {
                if x0.dims() != input.img.dims() {
                    candle_core::bail!(
                        "self-conditioning estimate has shape {:?}, the target tokens {:?}",
                        x0.dims(),
                        input.img.dims()
                    );
                }
                // Only the target tokens carry the estimate: zeros where the references follow them.
                let sc = sc_in.forward(&x0.to_dtype(act)?, ad)?;
                img = (&img + sc.pad_with_zeros(1, 0, img.dim(1)? - n_target)?)?;
            }
            (None, Some(_)) => candle_core::bail!(
                "a self-conditioning estimate was passed to a model without `self_condition` in its config"
            ),
            (_, None) => {}
        }
        let mut txt = self.txt_in.forward(&input.txt.to_dtype(act)?, ad)?;
        let vec = self.conditioning(input, ad)?.to_dtype(act)?;

        // Checkpointing only matters where there is something to train (adapters on).
        let sink = opts.checkpoint.clone().filter(|_| ad == Adapters::On);
        let mut hidden = Vec::new();
        for block in &self.double_blocks {
            let vars = block.adapter_vars();
            (img, txt) = match &sink {
                Some(sink) if !vars.is_empty() => {
                    // The two streams travel as one tensor [img; txt] through the checkpointed op.
                    let n_img = img.dim(1)?;
                    let joint = move |block: &DoubleStreamBlock, s: &Tensor, v: &Tensor, rope: &Rope| {
                        let (i, t) = (s.narrow(1, 0, n_img)?, s.narrow(1, n_img, s.dim(1)? - n_img)?);
                        let (i, t) = block.forward(&i, &t, v, rope, ad)?;
                        Tensor::cat(&[&i, &t], 1)
                    };
                    let stream = Tensor::cat(&[&img, &txt], 1)?;
                    let (sd, vd) = (stream.detach(), vec.detach());
                    let value = checkpoint::without_graph(|| joint(block, &sd, &vd, &rope))?;
                    let (b, r) = (block.clone(), rope.clone());
                    let out = checkpoint::checkpointed(
                        &stream,
                        &vec,
                        value,
                        std::sync::Arc::new(move |s: &Tensor, v: &Tensor| joint(&b, s, v, &r)),
                        vars,
                        sink.clone(),
                    )?;
                    let n_txt = out.dim(1)? - n_img;
                    (out.narrow(1, 0, n_img)?, out.narrow(1, n_img, n_txt)?)
                }
                _ => block.forward(&img, &txt, &vec, &rope, ad)?,
            };
            if opts.capture_hidden {
                hidden.push(split_image_stream(&img.to_dtype(DType::F32)?, n_target, &ref_lens)?);
            }
        }
        let mut x = Tensor::cat(&[&txt, &img], 1)?;
        for block in &self.single_blocks {
            let vars = block.adapter_vars();
            x = match &sink {
                Some(sink) if !vars.is_empty() => {
                    let (xd, vd) = (x.detach(), vec.detach());
                    let value = checkpoint::without_graph(|| block.forward(&xd, &vd, &rope, ad))?;
                    let (b, r) = (block.clone(), rope.clone());
                    checkpoint::checkpointed(
                        &x,
                        &vec,
                        value,
                        std::sync::Arc::new(move |x: &Tensor, v: &Tensor| b.forward(x, v, &r, ad)),
                        vars,
                        sink.clone(),
                    )?
                }
                _ => block.forward(&x, &vec, &rope, ad)?,
            };
        }
        let target = x.narrow(1, n_txt, n_target)?;
        let out = self.final_layer.forward(&target, &vec, ad)?.to_dtype(DType::F32)?;
        let prediction = match self.cfg.prediction {
            Prediction::Velocity => out,
            Prediction::Sample => velocity_from_sample(input.img, &out, input.timesteps)?,
        };
        Ok(ForwardOutput { prediction, hidden })
    }

    /// The conditioning vector: `time_in(emb(t)) [+ guidance_in(emb(g))] + vector_in(y)`, [B, hidden].
    fn conditioning(&self, input: &MmditInput, ad: Adapters) -> Result<Tensor> {
        let mut vec = self
            .time_in
            .forward(&timestep_embedding(input.timesteps, TIMESTEP_EMBED_DIM)?, ad)?;
        match (&self.guidance_in, input.guidance) {
            (Some(g_in), Some(g)) => vec = (vec + g_in.forward(&timestep_embedding(g, TIMESTEP_EMBED_DIM)?, ad)?)?,
            (Some(_), None) => candle_core::bail!("this model is guidance-distilled: pass a guidance strength"),
            (None, Some(_)) => candle_core::bail!("guidance given, but the model has no guidance_in"),
            (None, None) => {}
        }
        vec + self.vector_in.forward(input.y, ad)?
    }

    /// Checks tokens [B, N, channels] against ids [B, N, 3]; returns (B, N, channels).
    fn check_tokens(
        &self,
        what: &str,
        tokens: &Tensor,
        ids: &Tensor,
        channels: usize,
        batch: Option<usize>,
    ) -> Result<(usize, usize, usize)> {
        let (b, n, c) = tokens.dims3()?;
        let ids_dims = ids.dims();
        if c != channels || batch.is_some_and(|batch| batch != b) || ids_dims != [b, n, self.cfg.axes_dim.len()] {
            candle_core::bail!(
                "{what}: tokens {:?} / ids {ids_dims:?} do not match batch {batch:?}, {channels} channels, {} axes",
                tokens.dims(),
                self.cfg.axes_dim.len()
            );
        }
        Ok((b, n, c))
    }
}

/// The velocity implied by a predicted clean sample under rectified flow: `v̂ = (x_t − x̂₀) / max(t, t_min)`
/// (from `x_t = (1 − t)·x₀ + t·ε` and `v = ε − x₀`; [`Prediction::Sample`]). `x_t` and `x̂₀` are [B, N, C], `t` is
/// [B].
pub fn velocity_from_sample(x_t: &Tensor, x0_hat: &Tensor, t: &Tensor) -> Result<Tensor> {
    let b = t.dim(0)?;
    let t = t
        .to_dtype(candle_core::DType::F32)?
        .maximum(SAMPLE_PREDICTION_T_MIN)?
        .to_dtype(x_t.dtype())?
        .reshape((b, 1, 1))?;
    (x_t - x0_hat)?.broadcast_div(&t)
}

/// Splits the image stream [B, N + ΣN_k, hidden] into the target and the references.
fn split_image_stream(img: &Tensor, n_target: usize, ref_lens: &[usize]) -> Result<BlockHidden> {
    let target = img.narrow(1, 0, n_target)?;
    let mut start = n_target;
    let mut references = Vec::with_capacity(ref_lens.len());
    for &len in ref_lens {
        references.push(img.narrow(1, start, len)?);
        start += len;
    }
    Ok(BlockHidden { target, references })
}

/// Position ids (0, row, col) of a target grid of `h × w` tokens in row-major order.
pub fn target_ids(h: usize, w: usize) -> Vec<[f32; 3]> {
    reference_ids(h, w, (0, 0))
}

/// Position ids of a reference grid of `h_k × w_k` tokens shifted by `offset` = (rows, cols): (0, row + dr,
/// col + dc). Use [`uno_reference_offsets`] for UNO's offsets.
pub fn reference_ids(h_k: usize, w_k: usize, offset: (usize, usize)) -> Vec<[f32; 3]> {
    let (dr, dc) = offset;
    (0..h_k)
        .flat_map(|r| (0..w_k).map(move |c| [0.0, (r + dr) as f32, (c + dc) as f32]))
        .collect()
}

/// UnoPE diagonal offsets, in token units, for references of grid sizes `refs` = [(h_k, w_k)] after a target of
/// `target` = (h, w) tokens.
///
/// UNO's `prepare_multi_ip` (`uno/flux/sampling.py`, `pe="d"`) starts with `pe_shift_h, pe_shift_w = h // 2,
/// w // 2` of the latent (= the target's token grid after 2×2 packing), gives reference k the offsets
/// `(pe_shift_h, pe_shift_w)` on (row, col), then adds that reference's own token grid `(ref_h // 2, ref_w // 2)`.
/// So reference k starts at row `h + Σ_{j<k} h_j` and col `w + Σ_{j<k} w_j`: each reference sits diagonally
/// below-right of everything before it, and rows and cols accumulate separately.
pub fn uno_reference_offsets(target: (usize, usize), refs: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let (mut shift_h, mut shift_w) = target;
    refs.iter()
        .map(|&(h_k, w_k)| {
            let offset = (shift_h, shift_w);
            shift_h += h_k;
            shift_w += w_k;
            offset
        })
        .collect()
}

/// Text position ids: all zeros (FLUX `txt_ids`), [batch, n, 3].
pub fn text_ids(n: usize, batch: usize, device: &Device) -> Result<Tensor> {
    Tensor::zeros((batch, n, 3), candle_core::DType::F32, device)
}

/// Stacks per-token ids into a [batch, N, 3] f32 tensor (the same ids for every batch element).
pub fn ids_tensor(ids: &[[f32; 3]], batch: usize, device: &Device) -> Result<Tensor> {
    let flat: Vec<f32> = ids.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (1, ids.len(), 3), device)?.repeat((batch, 1, 1))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use candle_core::{DType, Var};
    use candle_nn::VarMap;

    use super::*;
    use crate::model::testing::{expected_tensor_shapes, random_tensor, random_weights};

    const SEED: u64 = 11;

    /// Owned inputs for one forward pass: a `grid × grid` target, `n_refs` references of the same grid.
    struct Inputs {
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        t: Tensor,
        y: Tensor,
        refs: Vec<(Tensor, Tensor)>,
    }

    impl Inputs {
        fn new(cfg: &Config, batch: usize, grid: usize, n_refs: usize, seed: u64) -> Result<Self> {
            let dev = Device::Cpu;
            let n = grid * grid;
            let offsets = uno_reference_offsets((grid, grid), &vec![(grid, grid); n_refs]);
            let refs = offsets
                .iter()
                .enumerate()
                .map(|(k, &off)| {
                    let tokens = random_tensor(&[batch, n, cfg.in_channels], 1.0, seed + 10 + k as u64, &dev)?;
                    Ok((tokens, ids_tensor(&reference_ids(grid, grid, off), batch, &dev)?))
                })
                .collect::<Result<_>>()?;
            Ok(Self {
                img: random_tensor(&[batch, n, cfg.in_channels], 1.0, seed, &dev)?,
                img_ids: ids_tensor(&target_ids(grid, grid), batch, &dev)?,
                txt: random_tensor(&[batch, 16, cfg.context_in_dim], 1.0, seed + 1, &dev)?,
                txt_ids: text_ids(16, batch, &dev)?,
                t: Tensor::from_vec((0..batch).map(|i| 0.3 + 0.2 * i as f32).collect(), batch, &dev)?,
                y: random_tensor(&[batch, cfg.vec_in_dim], 1.0, seed + 2, &dev)?,
                refs,
            })
        }

        fn references(&self) -> Vec<Reference<'_>> {
            self.refs
                .iter()
                .map(|(tokens, ids)| Reference { tokens, ids })
                .collect()
        }

        fn run(&self, model: &Mmdit, img: &Tensor, opts: ForwardOptions) -> Result<ForwardOutput> {
            let references = self.references();
            model.forward_with(&self.input(img, &references, None), opts)
        }

        /// These inputs with `img` for the target tokens, the given references and self-conditioning estimate.
        fn input<'a>(
            &'a self,
            img: &'a Tensor,
            references: &'a [Reference<'a>],
            self_condition: Option<&'a Tensor>,
        ) -> MmditInput<'a> {
            MmditInput {
                img,
                img_ids: &self.img_ids,
                txt: &self.txt,
                txt_ids: &self.txt_ids,
                timesteps: &self.t,
                y: &self.y,
                guidance: None,
                references,
                self_condition,
            }
        }
    }

    fn load_mmapped(
        cfg: &Config,
        weights: &HashMap<String, Tensor>,
        dir: &Path,
    ) -> std::result::Result<Mmdit, ModelError> {
        let path = dir.join("weights.safetensors");
        candle_core::safetensors::save(weights, &path)?;
        // SAFETY: the file was just written by this test and nothing modifies it while it is mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &Device::Cpu)? };
        Mmdit::new(cfg, vb)
    }

    fn tiny_model() -> Mmdit {
        let cfg = Config::tiny();
        let dir = tempfile::tempdir().expect("temp dir");
        let weights = random_weights(&cfg, SEED, &Device::Cpu).expect("random weights");
        load_mmapped(&cfg, &weights, dir.path()).expect("tiny model loads")
    }

    fn max_abs(t: &Tensor) -> Result<f32> {
        t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn prediction_has_target_shape_for_one_and_two_references_at_batch_one_and_two() -> Result<()> {
        let model = tiny_model();
        let cfg = model.config().clone();
        for batch in [1, 2] {
            for n_refs in [1, 2] {
                let inputs = Inputs::new(&cfg, batch, 8, n_refs, SEED)?;
                let out = inputs.run(&model, &inputs.img, ForwardOptions::default())?;
                assert_eq!(out.prediction.dims(), inputs.img.dims(), "batch {batch}, {n_refs} refs");
                assert!(out.hidden.is_empty());
                assert!(max_abs(&out.prediction)? > 0.0);
            }
        }
        Ok(())
    }

    /// Self-conditioning: with its projection at zero (a warm start) the model predicts what the same weights
    /// without it do, estimate or not; with a projection `W` a constant estimate row `e` is `img_in`'s bias shifted
    /// by `W·e` for the target tokens and not for the references. A model without it refuses an estimate, and one
    /// of the wrong shape is refused.
    #[test]
    fn self_conditioning_adds_the_projected_estimate_to_the_target_tokens_only() -> Result<()> {
        let plain_cfg = Config::micro();
        let cfg = Config {
            self_condition: true,
            ..plain_cfg.clone()
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let mut weights = random_weights(&cfg, SEED, &Device::Cpu)?;
        let plain_weights = random_weights(&plain_cfg, SEED, &Device::Cpu)?;
        for (name, t) in &plain_weights {
            assert_eq!(
                weights[name].flatten_all()?.to_vec1::<f32>()?,
                t.flatten_all()?.to_vec1::<f32>()?,
                "{name}: drawn as without it"
            );
        }
        let sc_name = format!("{SELF_COND_IN}.weight");
        let projection = weights[&sc_name].clone();
        weights.insert(sc_name.clone(), projection.zeros_like()?);
        let zeroed = load_mmapped(&cfg, &weights, dir.path()).expect("loads");
        let plain_dir = tempfile::tempdir().expect("temp dir");
        let plain = load_mmapped(&plain_cfg, &plain_weights, plain_dir.path()).expect("loads");
        let inputs = Inputs::new(&cfg, 2, 4, 1, SEED)?;
        let refs = inputs.references();
        let estimate = random_tensor(inputs.img.dims(), 1.0, SEED + 7, &Device::Cpu)?;
        let with = |model: &Mmdit, e: Option<&Tensor>| model.forward(&inputs.input(&inputs.img, &refs, e));
        let base = with(&plain, None)?;
        assert_eq!(max_abs(&(with(&zeroed, Some(&estimate))? - &base)?)?, 0.0);
        assert_eq!(max_abs(&(with(&zeroed, None)? - &base)?)?, 0.0);
        assert!(
            with(&plain, Some(&estimate)).is_err(),
            "an estimate for a model without self-conditioning"
        );
        let bad = estimate.narrow(1, 0, 3)?;
        assert!(with(&zeroed, Some(&bad)).is_err(), "an estimate of the wrong shape");

        // A constant estimate row `e` adds `W·e` to every target token: without references, the same as the
        // plain model with `img_in`'s bias shifted by `W·e`.
        let dir2 = tempfile::tempdir().expect("temp dir");
        weights.insert(sc_name, projection.clone());
        let active = load_mmapped(&cfg, &weights, dir2.path()).expect("loads");
        let row = random_tensor(&[cfg.in_channels], 1.0, SEED + 8, &Device::Cpu)?;
        let constant = row
            .reshape((1, 1, cfg.in_channels))?
            .broadcast_as(inputs.img.dims())?
            .contiguous()?;
        let shift = projection.matmul(&row.reshape((cfg.in_channels, 1))?)?.flatten_all()?;
        let mut shifted_weights = plain_weights.clone();
        let bias = (&plain_weights["img_in.bias"] + shift)?;
        shifted_weights.insert("img_in.bias".into(), bias);
        let dir3 = tempfile::tempdir().expect("temp dir");
        let shifted = load_mmapped(&plain_cfg, &shifted_weights, dir3.path()).expect("loads");
        let bare = |model: &Mmdit, e: Option<&Tensor>| model.forward(&inputs.input(&inputs.img, &[], e));
        let got = bare(&active, Some(&constant))?;
        assert!(
            max_abs(&(&got - bare(&plain, None)?)?)? > 1e-4,
            "the estimate changes the prediction"
        );
        assert!(max_abs(&(&got - bare(&shifted, None)?)?)? < 1e-5);
        // With references the shifted bias would reach them too; the estimate does not.
        let with_refs = with(&active, Some(&constant))?;
        assert!(max_abs(&(&with_refs - with(&shifted, None)?)?)? > 1e-4);
        Ok(())
    }

    /// `v̂ = (x_t − x̂₀) / max(t, 0.05)`, by hand: t = 0.5 divides by 0.5, t = 0.01 by the floor 0.05.
    #[test]
    fn velocity_from_sample_is_the_rectified_flow_velocity_with_t_floored() -> Result<()> {
        let dev = Device::Cpu;
        let x_t = Tensor::from_vec(vec![1.0f32, -0.5, 0.2, 0.3], (2, 1, 2), &dev)?;
        let x0 = Tensor::from_vec(vec![0.5f32, 0.5, 0.1, 0.3], (2, 1, 2), &dev)?;
        let t = Tensor::from_vec(vec![0.5f32, 0.01], 2, &dev)?;
        let v = velocity_from_sample(&x_t, &x0, &t)?.flatten_all()?.to_vec1::<f32>()?;
        let want = [1.0, -2.0, 2.0, 0.0];
        for (got, want) in v.iter().zip(want) {
            assert!((got - want).abs() < 1e-5, "{v:?} vs {want:?}");
        }
        // Where t is above the floor, x_t − t·v̂ gives the predicted sample back (what the sampler's x̂₀ reads).
        let back = (&x_t.narrow(0, 0, 1)? - (velocity_from_sample(&x_t, &x0, &t)?.narrow(0, 0, 1)? * 0.5)?)?;
        assert!(max_abs(&(back - x0.narrow(0, 0, 1)?)?)? < 1e-6);
        Ok(())
    }

    /// A sample-predicting model is the velocity model's network with its output read as `x̂₀`: same weights, same
    /// inputs, and its forward returns `(x_t − out) / max(t, 0.05)` of the other's raw output.
    #[test]
    fn a_sample_predicting_model_returns_the_velocity_of_its_output() -> Result<()> {
        let velocity = tiny_model();
        let cfg = Config {
            prediction: Prediction::Sample,
            ..Config::tiny()
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let sample = load_mmapped(&cfg, &random_weights(&cfg, SEED, &Device::Cpu)?, dir.path())
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut inputs = Inputs::new(&cfg, 2, 8, 1, SEED)?;
        inputs.t = Tensor::from_vec(vec![0.6f32, 0.01], 2, &Device::Cpu)?;
        let out = inputs
            .run(&velocity, &inputs.img, ForwardOptions::default())?
            .prediction;
        let v = inputs.run(&sample, &inputs.img, ForwardOptions::default())?.prediction;
        for (k, t) in [(0, 0.6f64), (1, 0.05)] {
            let want = ((inputs.img.narrow(0, k, 1)? - out.narrow(0, k, 1)?)? / t)?;
            let diff = max_abs(&(v.narrow(0, k, 1)? - &want)?)?;
            assert!(diff <= 1e-5 * max_abs(&want)?, "sample {k}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn changing_a_reference_changes_the_prediction() -> Result<()> {
        let model = tiny_model();
        let mut inputs = Inputs::new(model.config(), 1, 8, 2, SEED)?;
        let before = inputs.run(&model, &inputs.img, ForwardOptions::default())?.prediction;
        inputs.refs[1].0 = random_tensor(inputs.refs[1].0.dims(), 1.0, 999, &Device::Cpu)?;
        let after = inputs.run(&model, &inputs.img, ForwardOptions::default())?.prediction;
        let diff = max_abs(&(after - &before)?)?;
        assert!(
            diff > 1e-6 * max_abs(&before)?,
            "reference had no effect (max diff {diff})"
        );
        Ok(())
    }

    #[test]
    fn capture_returns_each_double_block_split_per_image_without_changing_the_prediction() -> Result<()> {
        let model = tiny_model();
        let cfg = model.config().clone();
        let inputs = Inputs::new(&cfg, 2, 8, 2, SEED)?;
        let plain = inputs.run(&model, &inputs.img, ForwardOptions::default())?;
        let captured = inputs.run(
            &model,
            &inputs.img,
            ForwardOptions {
                capture_hidden: true,
                ..Default::default()
            },
        )?;
        assert_eq!(captured.hidden.len(), cfg.depth);
        for block in &captured.hidden {
            assert_eq!(block.target.dims(), &[2, 64, cfg.hidden_size]);
            assert_eq!(block.references.len(), 2);
            for r in &block.references {
                assert_eq!(r.dims(), &[2, 64, cfg.hidden_size]);
            }
        }
        // Different blocks capture different states, and target and references differ.
        assert!(max_abs(&(&captured.hidden[0].target - &captured.hidden[1].target)?)? > 0.0);
        assert!(max_abs(&(&captured.hidden[0].target - &captured.hidden[0].references[0])?)? > 0.0);
        let same = plain
            .prediction
            .eq(&captured.prediction)?
            .flatten_all()?
            .min(0)?
            .to_scalar::<u8>()?;
        assert_eq!(same, 1);
        Ok(())
    }

    #[test]
    fn same_weights_and_inputs_give_bit_identical_output() -> Result<()> {
        let (a, b) = (tiny_model(), tiny_model());
        let inputs = Inputs::new(a.config(), 1, 8, 1, SEED)?;
        let ya = inputs
            .run(&a, &inputs.img, ForwardOptions::default())?
            .prediction
            .flatten_all()?
            .to_vec1::<f32>()?;
        let yb = inputs
            .run(&b, &inputs.img, ForwardOptions::default())?
            .prediction
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(ya.iter().zip(&yb).all(|(x, y)| x.to_bits() == y.to_bits()));
        Ok(())
    }

    #[test]
    fn a_missing_tensor_is_an_error_that_names_it() -> Result<()> {
        let cfg = Config::tiny();
        let mut weights = random_weights(&cfg, SEED, &Device::Cpu)?;
        let missing = "double_blocks.1.img_attn.norm.key_norm.scale";
        assert!(weights.remove(missing).is_some());
        let dir = tempfile::tempdir()?;
        let err = load_mmapped(&cfg, &weights, dir.path()).expect_err("load must fail");
        assert!(err.to_string().contains(missing), "{err}");
        Ok(())
    }

    #[test]
    fn an_invalid_config_is_rejected_before_loading() {
        let cfg = Config {
            num_heads: 3,
            ..Config::tiny()
        };
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        assert!(matches!(
            Mmdit::new(&cfg, vb),
            Err(ModelError::Config(ConfigError::HeadsDoNotDivide { .. }))
        ));
    }

    /// The model asks for exactly the tensors of `expected_tensor_shapes`, with the same shapes.
    #[test]
    fn model_reads_exactly_the_expected_tensors() -> Result<()> {
        for cfg in [
            Config::tiny(),
            Config {
                guidance_embed: true,
                qkv_bias: false,
                ..Config::tiny()
            },
        ] {
            let varmap = VarMap::new();
            Mmdit::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).expect("builds");
            let data = varmap.data().lock().expect("varmap lock");
            let mut read: Vec<(String, Vec<usize>)> = data
                .iter()
                .map(|(name, var)| (name.clone(), var.dims().to_vec()))
                .collect();
            let mut expected = expected_tensor_shapes(&cfg);
            read.sort();
            expected.sort();
            assert_eq!(read, expected);
        }
        Ok(())
    }

    /// Catches silent gradient stops (fused softmax / norms / sdpa): with a frozen base (plain tensors, as loaded
    /// for LoRA training) the input and *every* LoRA adapter (A and B, every target kind, B made non-zero) must
    /// receive a non-zero gradient and no base tensor may get one (the frozen-matmul op skips them).
    #[test]
    fn gradients_reach_the_input_and_every_adapter_but_no_frozen_tensor() -> Result<()> {
        use crate::model::lora::{LoraConfig, LoraSet, LoraTargets};
        let cfg = Config::tiny();
        let dev = Device::Cpu;
        let weights = random_weights(&cfg, SEED, &dev)?;
        let mut model = Mmdit::new(&cfg, VarBuilder::from_tensors(weights, DType::F32, &dev)).expect("builds");
        let lora_cfg = LoraConfig {
            rank: 2,
            targets: LoraTargets {
                attention: true,
                mlp: true,
                modulation: true,
            },
            ..LoraConfig::default()
        };
        let lora = LoraSet::for_model(lora_cfg, &cfg, &dev).expect("lora");
        for (i, (_, ad)) in lora.iter().enumerate() {
            ad.b.set(&random_tensor(ad.b.dims(), 0.05, 1000 + i as u64, &dev)?)?;
        }
        model.attach_lora(&lora)?;
        let inputs = Inputs::new(&cfg, 1, 4, 2, SEED)?;
        let img = Var::from_tensor(&inputs.img)?;
        let out = inputs
            .run(&model, img.as_tensor(), ForwardOptions::default())?
            .prediction;
        let grads = out.sqr()?.sum_all()?.backward()?;
        let g_img = grads.get(img.as_tensor()).expect("input gradient exists");
        assert!(max_abs(g_img)? > 0.0);
        let mut dead = Vec::new();
        for (path, ad) in lora.iter() {
            for (part, var) in [("A", &ad.a), ("B", &ad.b)] {
                if !matches!(grads.get(var.as_tensor()).map(max_abs), Some(Ok(v)) if v > 0.0) {
                    dead.push(format!("{path}.lora_{part}"));
                }
            }
        }
        assert!(dead.is_empty(), "no gradient for {dead:?}");
        let leaked: Vec<String> = model
            .named_tensors()
            .into_iter()
            .filter(|(_, t)| grads.get(t).is_some())
            .map(|(n, _)| n)
            .collect();
        assert!(leaked.is_empty(), "frozen tensors got gradients: {leaked:?}");
        assert!(lora.len() >= 5 * 2 * cfg.depth + 3 * cfg.depth_single_blocks);
        Ok(())
    }

    /// With a trainable base (`Var`s, as in pretraining) every tensor, QK-norm scales included, gets a gradient.
    #[test]
    fn a_trainable_base_gets_gradients_for_every_tensor() -> Result<()> {
        let cfg = Config::tiny();
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().expect("varmap lock");
            for (name, t) in random_weights(&cfg, SEED, &dev)? {
                data.insert(name, Var::from_tensor(&t)?);
            }
        }
        let model = Mmdit::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).expect("builds");
        let inputs = Inputs::new(&cfg, 1, 4, 2, SEED)?;
        let out = inputs.run(&model, &inputs.img, ForwardOptions::default())?.prediction;
        let grads = out.sqr()?.sum_all()?.backward()?;
        let data = varmap.data().lock().expect("varmap lock");
        let mut dead = Vec::new();
        for (name, var) in data.iter() {
            if !matches!(grads.get(var.as_tensor()).map(max_abs), Some(Ok(v)) if v > 0.0) {
                dead.push(name.clone());
            }
        }
        dead.sort();
        assert!(dead.is_empty(), "no gradient for {dead:?}");
        assert_eq!(data.len(), expected_tensor_shapes(&cfg).len());
        Ok(())
    }

    /// A fresh adapter set (B = 0) leaves the model unchanged; a trained one changes the policy but not the
    /// reference pass (adapters off).
    #[test]
    fn adapters_switch_between_policy_and_reference_without_a_second_copy() -> Result<()> {
        use crate::model::lora::{LoraConfig, LoraSet};
        let cfg = Config::tiny();
        let dev = Device::Cpu;
        let mut model = tiny_model();
        let inputs = Inputs::new(&cfg, 1, 4, 1, SEED)?;
        let base = inputs.run(&model, &inputs.img, ForwardOptions::default())?.prediction;
        let lora = LoraSet::for_model(LoraConfig::default(), &cfg, &dev).expect("lora");
        model.attach_lora(&lora)?;
        let fresh = inputs.run(&model, &inputs.img, ForwardOptions::default())?.prediction;
        assert_eq!(
            max_abs(&(&fresh - &base)?)?,
            0.0,
            "B = 0 must give the base model exactly"
        );
        for (i, (_, ad)) in lora.iter().enumerate() {
            ad.b.set(&random_tensor(ad.b.dims(), 0.05, 2000 + i as u64, &dev)?)?;
        }
        let policy = inputs.run(&model, &inputs.img, ForwardOptions::default())?.prediction;
        let reference = inputs
            .run(
                &model,
                &inputs.img,
                ForwardOptions {
                    adapters: Adapters::Off,
                    ..Default::default()
                },
            )?
            .prediction;
        assert!(
            max_abs(&(&policy - &base)?)? > 1e-4,
            "a non-zero B must change the policy"
        );
        assert_eq!(
            max_abs(&(&reference - &base)?)?,
            0.0,
            "adapters off must be the base model"
        );
        model.detach_lora()?;
        let detached = inputs.run(&model, &inputs.img, ForwardOptions::default())?.prediction;
        assert_eq!(max_abs(&(&detached - &base)?)?, 0.0);
        Ok(())
    }

    #[test]
    fn named_tensors_are_exactly_the_checkpoint_layout() {
        let model = tiny_model();
        let mut names: Vec<(String, Vec<usize>)> = model
            .named_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect();
        let mut expected = expected_tensor_shapes(&Config::tiny());
        names.sort();
        expected.sort();
        assert_eq!(names, expected);
    }

    #[test]
    fn a_lora_set_for_another_config_is_rejected() -> Result<()> {
        use crate::model::lora::{LoraConfig, LoraSet};
        let mut model = tiny_model();
        let other = Config {
            hidden_size: 128,
            num_heads: 2,
            ..Config::tiny()
        };
        let lora = LoraSet::for_model(LoraConfig::default(), &other, &Device::Cpu).expect("lora");
        let err = model.attach_lora(&lora).expect_err("shape mismatch");
        assert!(err.to_string().contains("LoRA adapter for `double_blocks.0"), "{err}");
        Ok(())
    }

    #[test]
    fn timestep_embedding_follows_flux_convention() -> Result<()> {
        let t = Tensor::new(&[0f32, 0.001], &Device::Cpu)?;
        let emb = timestep_embedding(&t, 8)?.to_vec2::<f32>()?;
        assert_eq!(emb[0], vec![1., 1., 1., 1., 0., 0., 0., 0.]);
        // t = 0.001 → 1000·t = 1; frequencies exp(−ln(1e4)·i/4) = 1, 0.1, 0.01, 0.001; cos first, then sin.
        let expected = [
            1f32.cos(),
            0.1f32.cos(),
            0.01f32.cos(),
            0.001f32.cos(),
            1f32.sin(),
            0.1f32.sin(),
        ];
        for (a, e) in emb[1].iter().zip(expected) {
            assert!((a - e).abs() < 1e-6, "{:?}", emb[1]);
        }
        Ok(())
    }

    #[test]
    fn uno_offsets_accumulate_rows_and_cols_separately() {
        // Target 16×16; references 16×16, 8×12, 4×4 → start at (16,16), (32,32), (40,44).
        let offsets = uno_reference_offsets((16, 16), &[(16, 16), (8, 12), (4, 4)]);
        assert_eq!(offsets, vec![(16, 16), (32, 32), (40, 44)]);
        let ids = reference_ids(2, 3, (5, 7));
        assert_eq!(ids.len(), 6);
        assert_eq!(ids[0], [0., 5., 7.]);
        assert_eq!(ids[4], [0., 6., 8.]);
        assert_eq!(
            target_ids(2, 2),
            vec![[0., 0., 0.], [0., 0., 1.], [0., 1., 0.], [0., 1., 1.]]
        );
    }

    /// The tiny config with random weights (f32) and a LoRA whose `B` is random (so it changes the output), and one
    /// batch of inputs with a reference.
    fn tiny_with_lora() -> Result<(Mmdit, crate::model::lora::LoraSet, Inputs)> {
        let cfg = Config::tiny();
        let dev = Device::Cpu;
        let weights = crate::model::testing::random_weights(&cfg, 5, &dev)?;
        let mut model = Mmdit::new(&cfg, VarBuilder::from_tensors(weights, DType::F32, &dev)).expect("model");
        let lora = crate::model::lora::LoraSet::for_model(crate::model::lora::LoraConfig::default(), &cfg, &dev)
            .expect("lora");
        for (i, (_, ad)) in lora.iter().enumerate() {
            ad.b.set(&random_tensor(ad.b.dims(), 0.05, 3000 + i as u64, &dev)?)?;
        }
        model.attach_lora(&lora)?;
        Ok((model, lora, Inputs::new(&cfg, 1, 8, 1, SEED)?))
    }

    /// Narrow activations (`model.activations`, autocast) forward like f32 within their precision, with f32
    /// outputs and hidden states, and give the f32 LoRA adapters gradients that point the same way as f32's.
    #[test]
    fn narrow_activations_forward_like_f32_and_train_their_adapters() -> Result<()> {
        let (f32_model, lora, inputs) = tiny_with_lora()?;
        let opts = ForwardOptions {
            capture_hidden: true,
            ..ForwardOptions::default()
        };
        let want = inputs.run(&f32_model, &inputs.img, opts.clone())?;
        let want_grads = want.prediction.sqr()?.sum_all()?.backward()?;
        let flat = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
        // bf16 keeps 8 significant bits, f16 11: errors of a few 2^-8 and 2^-11 after nine blocks.
        for (dtype, tolerance) in [(DType::BF16, 2e-2), (DType::F16, 3e-3)] {
            let mut narrow = f32_model.clone();
            narrow.set_activation_dtype(dtype);
            narrow.narrow_weights(dtype)?;
            let got = inputs.run(&narrow, &inputs.img, opts.clone())?;
            assert_eq!(got.prediction.dtype(), DType::F32, "the prediction comes back in f32");
            let err = max_rel_diff(&got.prediction, &want.prediction)?;
            eprintln!("{dtype:?} activations vs f32: max relative error {err:e}");
            assert!(err <= tolerance, "{dtype:?}: {err}");
            assert_eq!(got.hidden.len(), want.hidden.len());
            for (g, w) in got.hidden.iter().zip(&want.hidden) {
                let pairs = std::iter::once((&g.target, &w.target)).chain(g.references.iter().zip(&w.references));
                for (g, w) in pairs {
                    assert_eq!(g.dtype(), DType::F32, "hidden states come back in f32");
                    assert!(max_rel_diff(g, w)? <= tolerance, "{dtype:?} hidden states");
                }
            }
            let grads = got.prediction.sqr()?.sum_all()?.backward()?;
            for (path, ad) in lora.iter() {
                let g = grads.get(ad.b.as_tensor()).expect("a gradient for every adapter");
                assert_eq!(g.dtype(), DType::F32, "{path}");
                let w = want_grads.get(ad.b.as_tensor()).expect("f32 gradient");
                let (g, w) = (flat(g)?, flat(w)?);
                let dot: f64 = g.iter().zip(&w).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                let norm = |v: &[f32]| v.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
                let cosine = dot / (norm(&g) * norm(&w)).max(1e-30);
                assert!(cosine > 0.99, "{dtype:?} {path}: gradient cosine {cosine}");
            }
        }
        Ok(())
    }

    /// A base held in bf16 / f16 (`model.dtype`) forwards like the f32 one within the precision of its weights
    /// (documented in docs/training.md), with adapters on; gradients still reach every adapter.
    #[test]
    fn narrow_weight_dtypes_forward_like_f32_and_train_their_adapters() -> Result<()> {
        let (f32_model, lora, inputs) = tiny_with_lora()?;
        let want = inputs
            .run(&f32_model, &inputs.img, ForwardOptions::default())?
            .prediction;
        for (dtype, tolerance) in [(DType::BF16, 1e-2), (DType::F16, 1e-3)] {
            let mut narrow = f32_model.clone();
            narrow.narrow_weights(dtype)?;
            assert_eq!(narrow.weight_dtype(), dtype);
            let got = inputs.run(&narrow, &inputs.img, ForwardOptions::default())?.prediction;
            assert_eq!(got.dtype(), DType::F32, "activations stay f32");
            let err = max_rel_diff(&got, &want)?;
            eprintln!("{dtype:?} weights vs f32: max relative error {err:e}");
            assert!(err <= tolerance, "{dtype:?}: {err}");
            let grads = got.sqr()?.sum_all()?.backward()?;
            for (path, ad) in lora.iter() {
                let g = grads.get(ad.b.as_tensor()).expect("a gradient for every adapter");
                assert_eq!(g.dtype(), DType::F32, "{path}");
            }
        }
        Ok(())
    }

    /// Block checkpointing gives the plain forward's prediction and hidden states, and the same gradients for
    /// every LoRA variable (collected by recomputation, merged into the step's) to 1e-5.
    #[test]
    fn checkpointed_blocks_give_the_plain_gradients() -> Result<()> {
        use crate::model::checkpoint::CheckpointGrads;
        use crate::model::lora::{LoraConfig, LoraSet, LoraTargets};
        let cfg = Config::micro();
        let dev = Device::Cpu;
        let weights = random_weights(&cfg, 8, &dev)?;
        let mut model = Mmdit::new(&cfg, VarBuilder::from_tensors(weights, DType::F32, &dev)).expect("model");
        let lora_cfg = LoraConfig {
            targets: LoraTargets {
                modulation: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let lora = LoraSet::for_model(lora_cfg, &cfg, &dev).expect("lora");
        for (i, (_, ad)) in lora.iter().enumerate() {
            ad.b.set(&random_tensor(ad.b.dims(), 0.05, 4000 + i as u64, &dev)?)?;
        }
        model.attach_lora(&lora)?;
        let inputs = Inputs::new(&cfg, 2, 4, 2, SEED)?;
        let weight = random_tensor(&[2, 16, cfg.in_channels], 1.0, 99, &dev)?;
        let vars = lora.vars();
        let run = |checkpoint: Option<std::sync::Arc<CheckpointGrads>>| -> Result<(ForwardOutput, Vec<Tensor>)> {
            let opts = ForwardOptions {
                capture_hidden: true,
                adapters: Adapters::On,
                checkpoint: checkpoint.clone(),
            };
            let out = inputs.run(&model, &inputs.img, opts)?;
            let mut grads = (&out.prediction * &weight)?.sum_all()?.backward()?;
            if let Some(c) = &checkpoint {
                // The blocks' variables get their gradients only through the recomputation.
                assert!(vars.iter().all(|v| grads.get(v.as_tensor()).is_none()));
                c.merge_into(&mut grads, &vars)?;
            }
            let names = lora.named_vars();
            let g =
                vars.iter()
                    .zip(&names)
                    .map(|(v, (name, _))| {
                        grads.get(v.as_tensor()).cloned().unwrap_or_else(|| {
                            panic!("{name} has no gradient (checkpointed: {})", checkpoint.is_some())
                        })
                    })
                    .collect();
            Ok((out, g))
        };
        let (plain, plain_g) = run(None)?;
        let (ckpt, ckpt_g) = run(Some(std::sync::Arc::new(CheckpointGrads::default())))?;
        assert!(max_rel_diff(&ckpt.prediction, &plain.prediction)? <= 1e-6);
        for (a, b) in ckpt.hidden.iter().zip(&plain.hidden) {
            assert!(max_rel_diff(&a.target, &b.target)? <= 1e-6);
        }
        let mut worst = 0f32;
        for ((a, b), (path, _)) in ckpt_g.iter().zip(&plain_g).zip(lora.named_vars()) {
            let err = max_rel_diff(a, b)?;
            worst = worst.max(err);
            assert!(err <= 1e-5, "{path}: {err}");
        }
        eprintln!("checkpointed vs plain LoRA gradients: max relative error {worst:e}");
        Ok(())
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        Ok(diff / scale.max(1e-12))
    }

    /// A FLUX-format file without our metadata, with the `model.diffusion_model.` prefix, of a size that is
    /// neither FLUX.1-dev nor the tiny default: the sizes come from the shapes and the model is the same.
    #[test]
    fn a_flux_file_without_metadata_loads_with_the_sizes_of_its_shapes() -> Result<()> {
        let cfg = Config {
            in_channels: 64,
            hidden_size: 64,
            num_heads: 2,
            axes_dim: crate::model::flux_shapes::flux_axes_dim(32),
            depth: 2,
            depth_single_blocks: 1,
            mlp_ratio: 3.0,
            guidance_embed: false,
            ..Config::tiny()
        };
        let weights = random_weights(&cfg, SEED, &Device::Cpu)?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("flux-small.safetensors");
        let prefixed: HashMap<String, Tensor> = weights
            .iter()
            .map(|(k, v)| (format!("model.diffusion_model.{k}"), v.clone()))
            .collect();
        candle_core::safetensors::save(&prefixed, &path)?;
        let base = crate::model::BaseModel::load_file(&path, &Device::Cpu).expect("loads");
        assert_eq!(base.config(), &cfg);
        assert_eq!(base.patch, 2);
        let direct = load_mmapped(&cfg, &weights, dir.path()).expect("direct");
        let inputs = Inputs::new(&cfg, 1, 4, 1, SEED)?;
        let a = inputs
            .run(&base.mmdit, &inputs.img, ForwardOptions::default())?
            .prediction;
        let b = inputs.run(&direct, &inputs.img, ForwardOptions::default())?.prediction;
        assert_eq!(max_rel_diff(&a, &b)?, 0.0);
        // Not FLUX-format: the error names the file and the first tensor that does not fit.
        let mut broken = prefixed.clone();
        broken.remove("model.diffusion_model.single_blocks.0.linear2.bias");
        candle_core::safetensors::save(&broken, &path)?;
        let e = crate::model::BaseModel::load_file(&path, &Device::Cpu)
            .expect_err("missing tensor")
            .to_string();
        assert!(
            e.contains("flux-small.safetensors") && e.contains("single_blocks.0.linear2.bias"),
            "{e}"
        );
        Ok(())
    }

    /// UNO's LoRA in x-flux naming on every block (image and text streams, the single blocks' q/k/v rows of
    /// `linear1` and `linear2`): merged into the base, the forward equals the same LoRA applied as adapters.
    #[test]
    fn an_xflux_lora_merged_into_the_base_equals_the_unmerged_adapters() -> Result<()> {
        use crate::model::lora::{LoraAdapter, LoraConfig, LoraSet};
        use crate::model::xflux_lora::read_xflux_lora;
        let cfg = Config::micro();
        let (h, m, r) = (cfg.hidden_size, cfg.mlp_hidden_dim(), 3);
        let dev = Device::Cpu;
        let mut lora = HashMap::new();
        let mut add = |stem: String, rows: usize, inp: usize, seed: u64| -> Result<()> {
            lora.insert(
                format!("{stem}.down.weight"),
                random_tensor(&[r, inp], 0.2, seed, &dev)?,
            );
            lora.insert(
                format!("{stem}.up.weight"),
                random_tensor(&[rows, r], 0.2, seed + 1, &dev)?,
            );
            Ok(())
        };
        for i in 0..cfg.depth {
            add(format!("double_blocks.{i}.processor.qkv_lora1"), 3 * h, h, 10)?;
            add(format!("double_blocks.{i}.processor.proj_lora1"), h, h, 20)?;
            add(format!("double_blocks.{i}.processor.qkv_lora2"), 3 * h, h, 30)?;
            add(format!("double_blocks.{i}.processor.proj_lora2"), h, h, 40)?;
        }
        for i in 0..cfg.depth_single_blocks {
            add(format!("single_blocks.{i}.processor.qkv_lora"), 3 * h, h, 50)?;
            add(format!("single_blocks.{i}.processor.proj_lora"), h, h + m, 60)?;
        }
        let weights = random_weights(&cfg, SEED, &dev)?;
        let dir = tempfile::tempdir()?;
        let plain = load_mmapped(&cfg, &weights, dir.path()).expect("base");
        let pieces = read_xflux_lora(&lora, &cfg).expect("x-flux LoRA");
        let scale = 0.7;
        let mut merged = plain.clone();
        merged.merge_base_lora(&pieces, scale)?;
        // Unmerged: each piece as an adapter covering the LoRA's leading rows of its layer.
        let mut adapters = std::collections::BTreeMap::new();
        for p in &pieces {
            let layer_rows = if p.target.ends_with("linear1") {
                3 * h + m
            } else {
                p.rows.len()
            };
            adapters.insert(
                p.target.clone(),
                LoraAdapter {
                    a: candle_core::Var::from_tensor(&p.down)?,
                    b: candle_core::Var::from_tensor(&p.up)?,
                    scale,
                    layer_rows,
                },
            );
        }
        let mut unmerged = plain.clone();
        unmerged.attach_lora(&LoraSet::from_adapters(LoraConfig::default(), adapters))?;
        let inputs = Inputs::new(&cfg, 2, 4, 2, SEED)?;
        let on = ForwardOptions::default();
        let a = inputs.run(&merged, &inputs.img, on.clone())?.prediction;
        let b = inputs.run(&unmerged, &inputs.img, on.clone())?.prediction;
        let base = inputs.run(&plain, &inputs.img, on)?.prediction;
        assert!(
            max_rel_diff(&a, &b)? <= 1e-5,
            "merged vs unmerged {}",
            max_rel_diff(&a, &b)?
        );
        assert!(max_rel_diff(&a, &base)? > 1e-3, "the LoRA changes the model");
        Ok(())
    }

    #[test]
    fn guidance_is_required_exactly_for_guidance_models() -> Result<()> {
        let cfg = Config {
            guidance_embed: true,
            ..Config::tiny()
        };
        let dir = tempfile::tempdir()?;
        let model = load_mmapped(&cfg, &random_weights(&cfg, SEED, &Device::Cpu)?, dir.path()).expect("loads");
        let inputs = Inputs::new(&cfg, 1, 4, 0, SEED)?;
        assert!(inputs.run(&model, &inputs.img, ForwardOptions::default()).is_err());
        let g = Tensor::new(&[3.5f32], &Device::Cpu)?;
        let input = MmditInput {
            guidance: Some(&g),
            ..inputs.input(&inputs.img, &[], None)
        };
        assert_eq!(model.forward(&input)?.dims(), inputs.img.dims());
        Ok(())
    }
}
