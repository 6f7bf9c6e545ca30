//! The memory plan: an estimate of the peak memory of a forward or a training step before it runs, so that an
//! input too large is refused with numbers and what to change instead of the process aborting on a failed
//! allocation.
//!
//! The estimate adds the frozen weights (parameters × `model.dtype`), the encoders (held with a forward; released
//! before a training step, which keeps only the transformer once the items are prepared), the LoRA state
//! (weights, gradients and two AdamW moments, f32), the activations and the attention scores:
//!
//! * **Activations**, in units of `hidden × tokens × sequences × 4 bytes`: a training step keeps
//!   [`KEPT_PER_BLOCK`] units per block for backward (every block, or with `train.checkpoint_blocks` one unit —
//!   the block's input — per block plus one block's [`KEPT_PER_BLOCK`] while it is recomputed), plus
//!   [`TRANSIENT`] units of gradients and temporaries at the peak of backward. A forward without gradients holds
//!   [`FORWARD_TRANSIENT`] units at a time. The three constants were measured (peak RSS of `focusdpo train` on
//!   the tiny model at 256 px with and without checkpointing, `docs/training.md`), not derived. A training step
//!   on a GPU holds [`GPU_STEP_UNITS_PER_SEQUENCE`] more (measured on an H200 at FLUX.1-dev size).
//! * **Attention scores** `[sequences, heads, L, L]` f32 ([`super::attention`]): small ones are materialised,
//!   and two such matrices per block are kept for backward (one block with checkpointing); large ones take the
//!   fused CPU kernel (none held) or, elsewhere, the chunked path, which holds one chunk's
//!   ([`CHUNK_SCORE_BYTES`]) at a time: four matrices of it in backward, two in a forward.

use std::fmt;

use super::attention::{CHUNK_SCORE_BYTES, FUSED_MIN_SCORE_BYTES};
use super::config::Config;
use super::weights::WeightDtype;

/// Activation units a block keeps for backward (measured).
pub const KEPT_PER_BLOCK: u64 = 56;
/// Activation units of gradients and temporaries at the peak of backward (measured).
pub const TRANSIENT: u64 = 40;
/// What a training step holds on a GPU beyond the CPU-measured constants, in activation units of one sequence
/// (`width × tokens × 4 B`): measured on an H200 (`nvidia-smi` peak of FocusDPO steps at FLUX.1-dev size, bf16,
/// checkpointing; `docs/scale.md`) as 195, 212 and 221 units at 2 088, 6 184 and 6 184 tokens a sequence. It
/// scales with the tokens but not with the sequences that keep a graph (the split pair left it unchanged):
/// candle's elementary CUDA kernels keep intermediates our fused CPU ops do not, the bf16 copies autocast makes,
/// and the slack of the CUDA memory pool.
pub const GPU_STEP_UNITS_PER_SEQUENCE: u64 = 220;
/// Activation units a forward without gradients holds at a time.
pub const FORWARD_TRANSIENT: u64 = 16;

/// What runs: how many sequences of how many tokens, with or without gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Sequences whose forward keeps a graph for backward (a DPO pair's policy: 2; SFT: 1; 0 for inference).
    pub with_grad: usize,
    /// Sequences forwarded without gradients (DPO's reference, sampling, `M_s` probes).
    pub without_grad: usize,
    /// Target image tokens.
    pub target_tokens: usize,
    /// Reference image tokens, all references together.
    pub reference_tokens: usize,
    /// Text tokens.
    pub text_tokens: usize,
    /// `train.checkpoint_blocks`.
    pub checkpoint_blocks: bool,
    /// Whether it runs on the CPU: the fused O(L) attention kernel for large scores and the activation constants
    /// measured there. Elsewhere (a GPU): the chunked attention, which holds one chunk's scores, and
    /// [`GPU_STEP_UNITS_PER_SEQUENCE`] on top of a training step.
    pub on_cpu: bool,
    /// The activations' dtype (`model.activations`): bf16 / f16 halve every activation unit (the constants were
    /// measured in f32; the halving is the plan's assumption until measured).
    pub activations: WeightDtype,
}

impl Workload {
    /// Tokens of one sequence.
    pub fn tokens(&self) -> usize {
        self.target_tokens + self.reference_tokens + self.text_tokens
    }
}

/// What else is held besides the transformer: encoders, and the trainable LoRA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resident {
    /// Autoencoder and text encoders held in memory, bytes.
    pub encoders: u64,
    /// Trainable LoRA parameters (0 for inference).
    pub lora_params: u64,
}

/// An estimate, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Transformer weights.
    pub weights: u64,
    /// Encoders.
    pub encoders: u64,
    /// LoRA weights, gradients and AdamW moments.
    pub optimiser: u64,
    /// Activations at the peak.
    pub activations: u64,
    /// Attention scores at the peak.
    pub attention: u64,
    /// A training step: the encoders are released before it (a run prepares every item first, then keeps only
    /// the transformer), so they count against the working part, not on top of it.
    pub training: bool,
}

impl MemoryEstimate {
    /// The peak: weights plus the encoders and the working part, together for a forward, one after the other for
    /// training.
    pub fn total(&self) -> u64 {
        if self.training {
            self.weights + self.encoders.max(self.working())
        } else {
            self.weights + self.encoders + self.working()
        }
    }

    /// What a run needs beyond what is loaded already (activations, attention, optimiser).
    pub fn working(&self) -> u64 {
        self.optimiser + self.activations + self.attention
    }
}

/// Gigabytes (10⁹ bytes), as the cards are sold.
pub fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

impl fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.2} GB: weights {:.2}, encoders {:.2}, LoRA + optimiser {:.2}, activations {:.2}, attention {:.2}",
            gb(self.total()),
            gb(self.weights),
            gb(self.encoders),
            gb(self.optimiser),
            gb(self.activations),
            gb(self.attention)
        )
    }
}

/// Parameters of the transformer of `cfg` (every tensor of its checkpoint).
pub fn transformer_params(cfg: &Config) -> u64 {
    super::config::expected_tensor_shapes(cfg)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum()
}

/// The peak memory of `work` on the model `cfg` with `resident` parts and weights in `dtype`.
pub fn estimate(cfg: &Config, dtype: WeightDtype, resident: Resident, work: &Workload) -> MemoryEstimate {
    let blocks = (cfg.depth + cfg.depth_single_blocks) as u64;
    let tokens = work.tokens() as u64;
    let unit = |sequences: usize| cfg.hidden_size as u64 * tokens * sequences as u64 * work.activations.bytes() as u64;
    let heads = cfg.num_heads as u64;
    let scores = |sequences: usize| sequences as u64 * heads * tokens * tokens * 4;
    let explicit = |sequences: usize| scores(sequences) <= FUSED_MIN_SCORE_BYTES as u64;
    // Large scores: none held by the fused kernel, one chunk's (`matrices` of them at once) by the chunked path.
    let large = |sequences: usize, matrices: u64| {
        if work.on_cpu {
            0
        } else {
            matrices * scores(sequences).min(CHUNK_SCORE_BYTES as u64)
        }
    };
    let (activations, attention) = if work.with_grad > 0 {
        let s = work.with_grad;
        let kept = if work.checkpoint_blocks {
            blocks + KEPT_PER_BLOCK
        } else {
            blocks * KEPT_PER_BLOCK
        };
        let attention_blocks = if work.checkpoint_blocks { 1 } else { blocks };
        let attention = if explicit(s) {
            2 * scores(s) * attention_blocks
        } else {
            large(s, 4)
        };
        // The reference forward (no graph) runs before backward: its transient is below the training peak.
        let gpu = if work.on_cpu {
            0
        } else {
            GPU_STEP_UNITS_PER_SEQUENCE * unit(1)
        };
        ((kept + TRANSIENT) * unit(s) + gpu, attention)
    } else {
        let s = work.without_grad.max(1);
        // One block at a time: small scores whole, large ones by the fused kernel (none) or in chunks.
        let attention = if explicit(s) { 2 * scores(s) } else { large(s, 2) };
        (FORWARD_TRANSIENT * unit(s), attention)
    };
    MemoryEstimate {
        weights: transformer_params(cfg) * dtype.bytes() as u64,
        encoders: resident.encoders,
        optimiser: resident.lora_params * 16,
        activations,
        attention,
        training: work.with_grad > 0,
    }
}

/// A plan that does not fit; the message names the numbers and what to change.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} needs about {need:.2} GB ({estimate}) but {available:.2} GB are available on {device}: lower the image \
     or reference size, set train.checkpoint_blocks = true (and train.split_pair = true), hold the base in bf16 \
     (model.dtype = \"bf16\"), run the activations in bf16 (model.activations = \"bf16\"), or run on a larger \
     device (model.device)"
)]
pub struct DoesNotFit {
    /// What was planned (`a FocusDPO step at 4 264 tokens`, …).
    pub what: String,
    /// GB needed beyond what is already loaded.
    pub need: f64,
    /// GB available.
    pub available: f64,
    /// The device.
    pub device: String,
    /// The whole estimate.
    pub estimate: MemoryEstimate,
}

/// Refuses `estimate` when what it needs beyond the loaded parts (`working`) exceeds `available` bytes.
pub fn check(what: &str, estimate: MemoryEstimate, available: u64, device: &str) -> Result<(), DoesNotFit> {
    if estimate.working() <= available {
        return Ok(());
    }
    Err(DoesNotFit {
        what: what.to_string(),
        need: gb(estimate.working()),
        available: gb(available),
        device: device.to_string(),
        estimate,
    })
}

/// The memory available to this process on the CPU: `FOCUSDPO_MEMORY_LIMIT_GB` when set (for shared machines,
/// and tests), else the kernel's `MemAvailable` (Linux), else `None` (not checked).
pub fn cpu_available() -> Option<u64> {
    if let Some(limit) = env_limit() {
        return Some(limit);
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// The memory available to this process on `device`: on the CPU [`cpu_available`]; on a GPU (the `cuda`
/// feature) the free device memory (`cuMemGetInfo`, so what is already loaded is not counted), lowered to
/// `FOCUSDPO_MEMORY_LIMIT_GB` when that is set; `None` where it cannot be read (not checked).
pub fn device_available(device: &candle_core::Device) -> Option<u64> {
    if device.is_cpu() {
        return cpu_available();
    }
    let (free, _) = gpu_memory(device)?;
    Some(match env_limit() {
        Some(limit) => limit.min(free),
        None => free,
    })
}

fn env_limit() -> Option<u64> {
    std::env::var("FOCUSDPO_MEMORY_LIMIT_GB")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(|v| (v * 1e9) as u64)
}

/// A GPU's free and total memory in bytes (`cuMemGetInfo`); `None` off CUDA.
#[cfg(feature = "cuda")]
fn gpu_memory(device: &candle_core::Device) -> Option<(u64, u64)> {
    let cuda = device.as_cuda_device().ok()?;
    let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
    Some((free as u64, total as u64))
}

#[cfg(not(feature = "cuda"))]
fn gpu_memory(_: &candle_core::Device) -> Option<(u64, u64)> {
    None
}

/// `FOCUSDPO_MEMORY_TRACE=1`: [`trace`] prints the memory in use on the device at the points a training step
/// passes (synchronising first, so that memory freed by then is counted out), and [`trace_point`] keeps the
/// largest value seen inside backward. For measuring the plan against a device; off, both cost nothing.
fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FOCUSDPO_MEMORY_TRACE").is_ok_and(|v| v == "1"))
}

static TRACE_MAX: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bytes in use on `device` after a synchronisation (GPU: total − free; CPU: resident set), when tracing.
fn in_use(device: &candle_core::Device) -> Option<u64> {
    if device.is_cpu() {
        return crate::alloc::resident_mib().map(|mib| (mib * 1024.0 * 1024.0) as u64);
    }
    device.synchronize().ok()?;
    let (free, total) = gpu_memory(device)?;
    Some(total - free)
}

/// Prints `label` and the memory in use (and the largest [`trace_point`] since the last call) to stderr, when
/// `FOCUSDPO_MEMORY_TRACE=1`.
pub fn trace(device: &candle_core::Device, label: &str) {
    if !tracing() {
        return;
    }
    if let Some(used) = in_use(device) {
        let inside = TRACE_MAX.swap(0, std::sync::atomic::Ordering::Relaxed);
        if inside > 0 {
            eprintln!(
                "memory: {label}: {:.2} GB in use (at most {:.2} GB before it)",
                gb(used),
                gb(inside)
            );
        } else {
            eprintln!("memory: {label}: {:.2} GB in use", gb(used));
        }
    }
}

/// Prints what a gradient store holds beyond the gradients of `vars` (candle keeps a gradient for every input
/// of an op that backward passes, tracked or not), when tracing.
pub fn trace_grads(label: &str, grads: &candle_core::backprop::GradStore, vars: &[candle_core::Var]) {
    if !tracing() {
        return;
    }
    let ids: std::collections::HashSet<_> = vars.iter().map(|v| v.as_tensor().id()).collect();
    let mut other: Vec<(u64, Vec<usize>, candle_core::DType)> = Vec::new();
    let mut held = 0u64;
    for id in grads.get_ids() {
        if let Some(g) = grads.get_id(*id) {
            let bytes = (g.elem_count() * g.dtype().size_in_bytes()) as u64;
            held += bytes;
            if !ids.contains(id) {
                other.push((bytes, g.dims().to_vec(), g.dtype()));
            }
        }
    }
    other.sort_by_key(|o| std::cmp::Reverse(o.0));
    let beyond: u64 = other.iter().map(|o| o.0).sum();
    let largest: Vec<String> = other.iter().take(4).map(|(_, d, t)| format!("{d:?} {t:?}")).collect();
    eprintln!(
        "memory: {label}: gradients hold {:.2} GB, {:.2} GB of it for {} tensors that are not trained (largest: {})",
        gb(held),
        gb(beyond),
        other.len(),
        largest.join(", ")
    );
}

/// Records the memory in use now (inside backward, where [`trace`] cannot print), when tracing.
pub fn trace_point(device: &candle_core::Device) {
    if tracing()
        && let Some(used) = in_use(device)
    {
        TRACE_MAX.fetch_max(used, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How a device is named in messages: `the CPU`, `the GPU (cuda:0)`.
pub fn device_name(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "the CPU".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("the GPU (cuda:{gpu_id})"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("the GPU (metal:{gpu_id})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(with_grad: usize, tokens: usize, checkpoint: bool) -> Workload {
        Workload {
            with_grad,
            without_grad: 2,
            target_tokens: tokens,
            reference_tokens: 0,
            text_tokens: 0,
            checkpoint_blocks: checkpoint,
            on_cpu: true,
            activations: WeightDtype::F32,
        }
    }

    /// The calibration case by hand: the tiny model, a DPO pair (2 sequences) of 4 264 tokens, fused attention.
    #[test]
    fn the_tiny_256_px_step_by_hand() {
        let cfg = Config::tiny();
        let none = Resident::default();
        let unit = 256 * 4264 * 2 * 4;
        let plain = estimate(&cfg, WeightDtype::F32, none, &work(2, 4264, false));
        assert_eq!(plain.activations, (6 * 56 + 40) * unit);
        assert_eq!(plain.attention, 0, "fused: no scores");
        let ckpt = estimate(&cfg, WeightDtype::F32, none, &work(2, 4264, true));
        assert_eq!(ckpt.activations, (6 + 56 + 40) * unit);
        // Off the CPU the chunked path holds four chunk-sized matrices in backward, two in a forward; scores
        // below a chunk count whole (2 · 4 heads · 4264² · 4 B = 582 MB > 512 MiB; 2 · 4 · 3000² · 4 B < it).
        let gpu = |with_grad, tokens| Workload {
            on_cpu: false,
            ..work(with_grad, tokens, true)
        };
        let chunked = estimate(&cfg, WeightDtype::F32, none, &gpu(2, 4264));
        assert_eq!(chunked.attention, 4 * (512 << 20));
        // … and the GPU's measured allowance, per sequence's tokens.
        assert_eq!(chunked.activations, ckpt.activations + 220 * unit / 2);
        // bf16 activations halve every activation unit, the GPU allowance included; the scores are planned f32.
        let narrow = Workload {
            activations: WeightDtype::Bf16,
            ..gpu(2, 4264)
        };
        let half = estimate(&cfg, WeightDtype::F32, none, &narrow);
        assert_eq!(2 * half.activations, chunked.activations);
        assert_eq!(half.attention, chunked.attention);
        let forward = estimate(&cfg, WeightDtype::F32, none, &gpu(0, 4264));
        assert_eq!(forward.attention, 2 * (512 << 20));
        let smaller = estimate(&cfg, WeightDtype::F32, none, &gpu(2, 3000));
        assert_eq!(smaller.attention, 4 * (2 * 4 * 3000 * 3000 * 4));
        // The tiny default (424 tokens): explicit scores, two per block kept.
        let small = estimate(&cfg, WeightDtype::F32, none, &work(2, 424, false));
        assert_eq!(small.attention, 2 * (2 * 4 * 424 * 424 * 4) * 6);
        // bf16 halves the weights.
        let bf16 = estimate(&cfg, WeightDtype::Bf16, none, &work(2, 424, false));
        assert_eq!(bf16.weights * 2, small.weights);
        assert_eq!(small.weights, transformer_params(&cfg) * 4);
    }

    #[test]
    fn a_plan_over_the_limit_is_refused_with_numbers_and_what_to_change() {
        let cfg = Config::tiny();
        let r = Resident {
            encoders: 0,
            lora_params: 1_000_000,
        };
        let e = estimate(&cfg, WeightDtype::F32, r, &work(2, 65_000, false));
        let err = check("a FocusDPO step", e, 1_000_000_000, "cpu")
            .expect_err("too big")
            .to_string();
        assert!(
            err.contains("a FocusDPO step needs about")
                && err.contains("1.00 GB are available on cpu")
                && err.contains("train.checkpoint_blocks")
                && err.contains("bf16"),
            "{err}"
        );
        assert!(check("x", e, e.working(), "cpu").is_ok());
    }
}
