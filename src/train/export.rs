//! A run's trained LoRA in the naming another tool loads (`focusdpo export-lora`).
//!
//! * **x-flux** (UNO's own pipeline, `inference.py` with `LORA=file --lora_rank R`): UNO replaces every block's
//!   attention processor by one LoRA processor, so the file holds the whole fine-tuned model: the run's base LoRAs
//!   (UNO's `dit_lora.safetensors`, times their scales) and the FocusDPO LoRA (times `α/r`), concatenated along the
//!   rank; their sum is exact ([`crate::model::xflux_lora::write_xflux_lora`]). Only attention is expressible: runs
//!   trained with `lora.targets.mlp = false`.
//! * **kohya** (ComfyUI, diffusers' `load_lora_weights`) and **PEFT** (`adapter_model.safetensors` +
//!   `adapter_config.json`): the FocusDPO LoRA alone, on top of the base the run names.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::Device;

use super::RunConfig;
use super::session::{TrainError, load_run_lora};
use crate::model::base::read_base_lora;
use crate::model::lora::LoraFormat;
use crate::model::xflux_lora::{BaseLoraPiece, write_xflux_lora};

/// The naming of an exported LoRA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// x-flux processor naming: UNO's pipeline, with the run's base LoRAs folded in.
    Xflux,
    /// kohya-ss / ComfyUI.
    Kohya,
    /// Hugging Face PEFT (a folder).
    Peft,
}

impl FromStr for ExportFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "xflux" | "uno" => Ok(Self::Xflux),
            "kohya" | "comfyui" => Ok(Self::Kohya),
            "peft" => Ok(Self::Peft),
            _ => Err(format!("`{s}` is not a LoRA format: use xflux (UNO), kohya or peft")),
        }
    }
}

impl fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Xflux => "x-flux",
            Self::Kohya => "kohya",
            Self::Peft => "PEFT",
        })
    }
}

/// What [`export_run_lora`] produced: files to write (name relative to the output: a file name, or inside a folder
/// for PEFT) and what they hold.
#[derive(Debug)]
pub struct ExportedLora {
    /// `(file name, bytes)`; one file, except PEFT's folder of two.
    pub files: Vec<(&'static str, Vec<u8>)>,
    /// Whether the output is a folder (PEFT) rather than one file.
    pub folder: bool,
    /// The checkpoint's step.
    pub step: u64,
    /// The rank of the written adapters.
    pub rank: usize,
    /// One line for the user: what the file holds and how to load it.
    pub summary: String,
}

/// Exports the LoRA of `run`'s latest checkpoint in `format`. For x-flux, `with_base_loras` also folds the run's
/// base LoRAs in (what UNO's pipeline needs, as it loads one LoRA); for kohya and PEFT it must be false.
pub fn export_run_lora(run: &Path, format: ExportFormat, with_base_loras: bool) -> Result<ExportedLora, TrainError> {
    let cfg: RunConfig = super::run_store::read_config(run)?;
    let device = Device::Cpu;
    let model = cfg.model.base.config()?;
    let Some((lora, step)) = load_run_lora(run, &cfg, &model, &device)? else {
        return Err(TrainError::Data(format!(
            "{} has no checkpoint yet: train it for at least `train.checkpoint_every` steps first",
            run.display()
        )));
    };
    let rank = lora.config().rank;
    match format {
        ExportFormat::Kohya | ExportFormat::Peft => {
            if with_base_loras && !cfg.model.base_loras.is_empty() {
                return Err(TrainError::Data(format!(
                    "{format} files hold one LoRA on the base; the run's base LoRAs ({}) can only be folded into an \
                     x-flux export",
                    list(&cfg)
                )));
            }
            let (naming, files) = if format == ExportFormat::Kohya {
                (
                    LoraFormat::Kohya,
                    vec![("", lora.to_safetensors_bytes(LoraFormat::Kohya)?)],
                )
            } else {
                let config = serde_json::to_vec_pretty(&lora.peft_adapter_config())
                    .map_err(|e| TrainError::Data(format!("adapter_config.json: {e}")))?;
                (
                    LoraFormat::Peft,
                    vec![
                        (
                            "adapter_model.safetensors",
                            lora.to_safetensors_bytes(LoraFormat::Peft)?,
                        ),
                        ("adapter_config.json", config),
                    ],
                )
            };
            let base_note = if cfg.model.base_loras.is_empty() {
                String::new()
            } else {
                format!(" (on the base with {} merged)", list(&cfg))
            };
            Ok(ExportedLora {
                folder: naming == LoraFormat::Peft,
                files,
                step,
                rank,
                summary: format!(
                    "{format} LoRA of step {step}: {} adapters, rank {rank}, α {}{base_note}",
                    lora.len(),
                    lora.config().alpha
                ),
            })
        }
        ExportFormat::Xflux => {
            let mut pieces: Vec<BaseLoraPiece> = Vec::new();
            let mut parts = Vec::new();
            if with_base_loras {
                for b in &cfg.model.base_loras {
                    let read = read_base_lora(&b.path, &model, &device)?;
                    parts.push(format!(
                        "{} ×{} (rank {})",
                        b.path.display(),
                        b.scale,
                        read.first().map_or(0, BaseLoraPiece::rank)
                    ));
                    for p in read {
                        pieces.push(p.scaled(b.scale)?);
                    }
                }
            }
            parts.push(format!("the run's LoRA of step {step} (rank {rank})"));
            for (path, ad) in lora.iter() {
                pieces.push(BaseLoraPiece::from_adapter(path, ad)?);
            }
            let export = write_xflux_lora(&pieces, &model)?;
            let mut named: Vec<(String, candle_core::Tensor)> = export.tensors.into_iter().collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            let metadata = std::collections::HashMap::from([
                ("format".to_string(), "xflux".to_string()),
                ("rank".to_string(), export.rank.to_string()),
                ("generator".to_string(), "focusdpo".to_string()),
                ("contents".to_string(), parts.join(" + ")),
            ]);
            let bytes = safetensors::serialize(named, Some(metadata))
                .map_err(|e| TrainError::Data(format!("x-flux export: {e}")))?;
            let left_out = if !with_base_loras && !cfg.model.base_loras.is_empty() {
                format!(
                    "; the run's base LoRAs ({}) are left out, so UNO's pipeline would run without them",
                    list(&cfg)
                )
            } else {
                String::new()
            };
            Ok(ExportedLora {
                files: vec![("", bytes)],
                folder: false,
                step,
                rank: export.rank,
                summary: format!(
                    "x-flux LoRA of rank {}: {}{left_out}. Load it in UNO with `LORA=<file> python inference.py \
                     --lora_rank {}`",
                    export.rank,
                    parts.join(" + "),
                    export.rank
                ),
            })
        }
    }
}

fn list(cfg: &RunConfig) -> String {
    cfg.model
        .base_loras
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
