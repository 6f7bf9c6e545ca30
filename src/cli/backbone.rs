//! The backbone options every command shares: `--backbone PROFILE` (a TOML profile or a FLUX.1 folder),
//! `--base` (the transformer alone) and `--base-lora FILE[:SCALE]` (UNO's LoRA), declared once.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use focusdpo::model::{BaseLora, BaseSource};
use focusdpo::train::backbone::read_profile;
use focusdpo::train::config::ModelSettings;

/// Which backbone a command runs on.
#[derive(Debug, Args, Clone, Default)]
pub struct BackboneArgs {
    /// A backbone profile: a TOML file of model settings (transformer, base_loras, autoencoder, t5, clip, their
    /// tokenizers, device, reference_px) or a FLUX.1 folder as downloaded; see docs/backbone.md.
    #[arg(long, value_name = "PROFILE")]
    pub backbone: Option<PathBuf>,
    /// The transformer: `bundled` (default), `random:SEED` or a safetensors file (replaces the profile's).
    #[arg(long)]
    pub base: Option<BaseSource>,
    /// A LoRA merged into the base, e.g. UNO's dit_lora.safetensors (x-flux naming): FILE or FILE:SCALE;
    /// repeatable, applied after the profile's.
    #[arg(long = "base-lora", value_name = "FILE[:SCALE]")]
    pub base_loras: Vec<BaseLora>,
}

impl BackboneArgs {
    /// Whether any backbone option was given.
    pub fn given(&self) -> bool {
        self.backbone.is_some() || self.base.is_some() || !self.base_loras.is_empty()
    }

    /// `start` (the defaults, or a run config's `[model]`) replaced by the profile, then `--base` and
    /// `--base-lora` applied.
    pub fn apply(&self, start: ModelSettings) -> anyhow::Result<ModelSettings> {
        let mut settings = match &self.backbone {
            Some(p) => read_profile(p).with_context(|| format!("--backbone {}", p.display()))?,
            None => start,
        };
        if let Some(b) = &self.base {
            settings.base = b.clone();
        }
        settings.base_loras.extend(self.base_loras.iter().cloned());
        Ok(settings)
    }

    /// The model settings these options describe (the defaults: the bundled tiny base).
    pub fn settings(&self) -> anyhow::Result<ModelSettings> {
        self.apply(ModelSettings::default())
    }

    /// A short name for reports.
    pub fn describe(&self, settings: &ModelSettings) -> String {
        let mut name = match &self.backbone {
            Some(p) => format!("backbone {} ({})", p.display(), settings.base),
            None => format!("base {}", settings.base),
        };
        for lora in &settings.base_loras {
            name.push_str(&format!(" + {lora}"));
        }
        name
    }
}
