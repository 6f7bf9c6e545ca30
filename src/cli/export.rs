//! `focusdpo export-lora`: a run's trained LoRA for UNO's pipeline (x-flux), ComfyUI / diffusers (kohya) or PEFT.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use focusdpo::store::write_atomic;
use focusdpo::train::export::{ExportFormat, export_run_lora};

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The run folder (its latest checkpoint is exported).
    #[arg(long)]
    run: PathBuf,
    /// xflux: UNO's own pipeline, with the run's base LoRAs (UNO's dit_lora) folded in; kohya: ComfyUI and
    /// diffusers' load_lora_weights; peft: a folder with adapter_model.safetensors + adapter_config.json.
    #[arg(long)]
    format: ExportFormat,
    /// The file to write (a folder for peft).
    #[arg(long, short)]
    output: PathBuf,
    /// x-flux: write the run's own LoRA alone, without its base LoRAs.
    #[arg(long)]
    trained_only: bool,
}

pub fn run(args: &ExportArgs) -> anyhow::Result<()> {
    let with_base = args.format == ExportFormat::Xflux && !args.trained_only;
    let export = export_run_lora(&args.run, args.format, with_base)
        .with_context(|| format!("cannot export the LoRA of {}", args.run.display()))?;
    if export.folder {
        std::fs::create_dir_all(&args.output).with_context(|| format!("cannot create {}", args.output.display()))?;
    } else if let Some(parent) = args.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    for (name, bytes) in &export.files {
        let path = if export.folder {
            args.output.join(name)
        } else {
            args.output.clone()
        };
        write_atomic(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {} ({} bytes)", path.display(), bytes.len());
    }
    println!("{}", export.summary);
    Ok(())
}
