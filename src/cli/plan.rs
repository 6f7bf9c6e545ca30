//! `focusdpo plan`: the memory plan of a training step (or a forward) on a backbone, before anything is loaded:
//! weights by dtype, encoders, LoRA + optimiser, activations with or without block checkpointing, attention; and
//! which cards it fits.

use anyhow::Context;
use clap::Args;
use focusdpo::model::base::read_file_layout;
use focusdpo::model::lora::LoraConfig;
use focusdpo::model::memory::{
    MemoryEstimate, Resident, Workload, cpu_available, device_available, device_name, estimate, gb,
};
use focusdpo::model::weights::{WeightDtype, safetensors_files, tensor_shapes};
use focusdpo::model::{BaseSource, Config};
use focusdpo::train::config::ModelSettings;

use super::backbone::BackboneArgs;

/// Cards a researcher picks from, in GB as sold.
const CARDS: [(&str, f64); 4] = [("24 GB", 24.0), ("48 GB", 48.0), ("80 GB", 80.0), ("141 GB", 141.0)];

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    backbone: BackboneArgs,
    /// Target image side in pixels.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// References (subjects) per item.
    #[arg(long, default_value_t = 1)]
    references: usize,
    /// Reference side in pixels (default: the backbone's reference size).
    #[arg(long)]
    reference_px: Option<usize>,
    /// LoRA rank (the paper trains rank 32).
    #[arg(long, default_value_t = 32)]
    rank: usize,
    /// The transformer's dtype (default: the backbone's `dtype`).
    #[arg(long)]
    dtype: Option<WeightDtype>,
    /// The activations' dtype (default: the backbone's `activations`).
    #[arg(long)]
    activations: Option<WeightDtype>,
    /// Plan with block checkpointing (`train.checkpoint_blocks`).
    #[arg(long)]
    checkpoint_blocks: bool,
    /// Plan with the pair's winner and loser run one after the other (`train.split_pair`).
    #[arg(long)]
    split_pair: bool,
    /// Plan a forward without gradients (masks, sampling) instead of a DPO / FocusDPO step.
    #[arg(long)]
    inference: bool,
    /// Also print the table over 512 / 1024 px, 1–3 references, checkpointing off / on.
    #[arg(long)]
    table: bool,
    /// Plan for FLUX.1-dev's sizes without its files (transformer, autoencoder, T5-XXL and CLIP-L as released;
    /// 512 px references, 512 T5 tokens), e.g. before downloading it.
    #[arg(long, conflicts_with = "backbone")]
    flux_dev: bool,
    /// Where it will run (`cpu` plans the fused CPU attention, `cuda` the chunked GPU one); default: the
    /// backbone's `device`, `cuda` with --flux-dev.
    #[arg(long)]
    device: Option<String>,
}

/// f32 bytes of FLUX.1-dev's encoders as released: T5 v1.1 XXL encoder (4.76 B parameters, `text_encoder_2/`
/// 9.52 GB in bf16), CLIP-L text tower (123 M, `text_encoder/`), autoencoder (83.8 M, `ae.safetensors`).
const FLUX_DEV_ENCODER_PARAMS: u64 = 4_762_310_656 + 123_060_480 + 83_819_683;

/// f32 bytes of the weights behind `path` (a file or a folder of shards), as the encoders are held.
fn f32_bytes(path: &std::path::Path) -> anyhow::Result<u64> {
    let mut elements = 0u64;
    for f in safetensors_files(path)? {
        elements += tensor_shapes(&f)?
            .values()
            .map(|s| s.iter().product::<usize>() as u64)
            .sum::<u64>();
    }
    Ok(elements * 4)
}

struct Backbone {
    cfg: Config,
    dtype: WeightDtype,
    activations: WeightDtype,
    pixels_per_token: usize,
    text_tokens: usize,
    reference_px: usize,
    encoders: u64,
    on_gpu: bool,
}

fn backbone(settings: &ModelSettings) -> anyhow::Result<Backbone> {
    let layout_path = match &settings.base {
        BaseSource::Bundled => Some(focusdpo::model::base::bundled_base_path()),
        BaseSource::File(p) => Some(p.clone()),
        BaseSource::Random(_) | BaseSource::RandomFluxDev(_) => None,
    };
    let (cfg, patch) = match &layout_path {
        Some(p) => {
            let layout = read_file_layout(p).with_context(|| format!("{}", p.display()))?;
            (layout.config, layout.patch)
        }
        None if matches!(settings.base, BaseSource::RandomFluxDev(_)) => (settings.base.config()?, 16),
        None => (settings.base.config()?, 4),
    };
    let mut encoders = 0;
    for p in [&settings.autoencoder, &settings.t5, &settings.clip]
        .into_iter()
        .flatten()
    {
        encoders += f32_bytes(p).with_context(|| format!("{}", p.display()))?;
    }
    Ok(Backbone {
        cfg,
        dtype: settings.dtype,
        activations: settings.activations,
        // The FLUX autoencoder downsamples by 8 before the patch packing.
        pixels_per_token: if settings.autoencoder.is_some() {
            8 * patch
        } else {
            patch
        },
        text_tokens: if settings.t5.is_some() {
            settings.t5_max_tokens
        } else {
            focusdpo::model::text::PROMPT_TOKENS
        },
        reference_px: settings.reference_px as usize,
        encoders,
        on_gpu: settings.device.trim().starts_with("cuda"),
    })
}

/// How a step is computed: `train.checkpoint_blocks` and `train.split_pair`.
#[derive(Clone, Copy)]
struct StepMode {
    checkpoint: bool,
    split: bool,
}

impl StepMode {
    fn describe(self) -> &'static str {
        match (self.checkpoint, self.split) {
            (false, false) => "off",
            (true, false) => "on",
            (false, true) => "off, split pair",
            (true, true) => "on, split pair",
        }
    }
}

fn plan(b: &Backbone, args: &PlanArgs, size: usize, references: usize, mode: StepMode) -> (Workload, MemoryEstimate) {
    let side = |px: usize| px.div_ceil(b.pixels_per_token);
    let ref_px = args.reference_px.unwrap_or(b.reference_px);
    let work = Workload {
        with_grad: match (args.inference, mode.split) {
            (true, _) => 0,
            (false, true) => 1,
            (false, false) => 2,
        },
        without_grad: 2,
        target_tokens: side(size) * side(size),
        reference_tokens: references * side(ref_px) * side(ref_px),
        text_tokens: b.text_tokens,
        checkpoint_blocks: mode.checkpoint,
        on_cpu: !b.on_gpu,
        activations: args.activations.unwrap_or(b.activations),
    };
    let lora = LoraConfig {
        rank: args.rank,
        alpha: args.rank as f32,
        ..LoraConfig::default()
    };
    let resident = Resident {
        encoders: b.encoders,
        lora_params: if args.inference {
            0
        } else {
            lora.parameter_count(&b.cfg)
        },
    };
    (work, estimate(&b.cfg, args.dtype.unwrap_or(b.dtype), resident, &work))
}

fn fits(total: u64) -> String {
    CARDS
        .iter()
        .map(|(name, cap)| format!("{name} {}", if gb(total) <= *cap { "yes" } else { "no" }))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn run(args: &PlanArgs) -> anyhow::Result<()> {
    let mut settings = args.backbone.settings()?;
    if let Some(d) = &args.device {
        settings.device = d.clone();
    } else if args.flux_dev {
        settings.device = "cuda".into();
    }
    let b = if args.flux_dev {
        Backbone {
            cfg: Config::flux_dev(),
            dtype: settings.dtype,
            activations: settings.activations,
            pixels_per_token: 16,
            text_tokens: focusdpo::model::flux_text::FLUX_T5_TOKENS,
            reference_px: 512,
            encoders: FLUX_DEV_ENCODER_PARAMS * 4,
            on_gpu: settings.device.trim().starts_with("cuda"),
        }
    } else {
        backbone(&settings)?
    };
    let dtype = args.dtype.unwrap_or(b.dtype);
    let what = if args.inference {
        "a forward without gradients (masks, sampling)"
    } else if args.split_pair {
        "a DPO / FocusDPO step (a pair: the winner's and the loser's policy passes with gradients one after the \
         other, 2 reference sequences)"
    } else {
        "a DPO / FocusDPO step (a pair: 2 policy sequences with gradients, 2 reference ones)"
    };
    let mode = StepMode {
        checkpoint: args.checkpoint_blocks,
        split: args.split_pair,
    };
    let (work, e) = plan(&b, args, args.size, args.references, mode);
    println!(
        "{} on {}: width {}, {} + {} blocks, weights {dtype}, activations {}, LoRA rank {}, {} attention",
        what,
        if args.flux_dev {
            "FLUX.1-dev's sizes".to_string()
        } else {
            args.backbone.describe(&settings)
        },
        b.cfg.hidden_size,
        b.cfg.depth,
        b.cfg.depth_single_blocks,
        work.activations,
        args.rank,
        if b.on_gpu { "chunked (GPU)" } else { "fused O(L) (CPU)" }
    );
    println!(
        "{} px target, {} × {} px references, {} text tokens: {} tokens a sequence; block checkpointing {}",
        args.size,
        args.references,
        args.reference_px.unwrap_or(b.reference_px),
        work.text_tokens,
        work.tokens(),
        mode.describe()
    );
    println!("  weights      {:8.2} GB", gb(e.weights));
    println!("  encoders     {:8.2} GB", gb(e.encoders));
    println!("  LoRA + AdamW {:8.2} GB", gb(e.optimiser));
    println!("  activations  {:8.2} GB", gb(e.activations));
    println!("  attention    {:8.2} GB", gb(e.attention));
    println!("  total        {:8.2} GB — fits: {}", gb(e.total()), fits(e.total()));
    if !b.on_gpu
        && let Some(avail) = cpu_available()
    {
        println!(
            "  this machine: {:.2} GB available for the working part ({:.2} GB): {}",
            gb(avail),
            gb(e.working()),
            if e.working() <= avail { "fits" } else { "does not fit" }
        );
    } else if b.on_gpu {
        // Nothing is loaded yet: the whole step must fit in what the GPU has free.
        match settings.device() {
            Ok(device) => match device_available(&device) {
                Some(free) => println!(
                    "  this machine: {:.2} GB free on {} for the whole step ({:.2} GB): {}",
                    gb(free),
                    device_name(&device),
                    gb(e.total()),
                    if e.total() <= free { "fits" } else { "does not fit" }
                ),
                None => println!(
                    "  this machine: the free memory of {} cannot be read",
                    device_name(&device)
                ),
            },
            Err(err) => println!("  this machine: no {} ({err})", settings.device.trim()),
        }
    }
    if args.table {
        println!();
        println!(
            "| target | references | checkpointing | total GB | {} |",
            CARDS.map(|c| c.0).join(" | ")
        );
        println!("|---|---|---|---|{}", "---|".repeat(CARDS.len()));
        for size in [512, 1024] {
            for refs in 1..=3 {
                for (checkpoint, split) in [(false, false), (true, false), (true, true)] {
                    let mode = StepMode { checkpoint, split };
                    let (_, e) = plan(&b, args, size, refs, mode);
                    let cells: Vec<&str> = CARDS
                        .iter()
                        .map(|(_, cap)| if gb(e.total()) <= *cap { "fits" } else { "–" })
                        .collect();
                    println!(
                        "| {size} px | {refs} | {} | {:.1} | {} |",
                        mode.describe(),
                        gb(e.total()),
                        cells.join(" | ")
                    );
                }
            }
        }
    }
    Ok(())
}
