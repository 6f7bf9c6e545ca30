//! Backbone profiles: everything that makes up one backbone (transformer, base LoRAs, autoencoder, T5 and CLIP
//! with their tokenizers, device, reference size) as one thing every command and the Studio open by path.
//!
//! A profile is either
//! * a **TOML file** with the keys of the run config's `[model]` section ([`ModelSettings`]; `transformer` is
//!   accepted for `base`), relative paths taken from the file's folder, e.g.
//!   ```toml
//!   transformer = "FLUX.1-dev/flux1-dev.safetensors"
//!   base_loras = [{ path = "UNO/dit_lora.safetensors", scale = 1.0 }]
//!   autoencoder = "FLUX.1-dev/ae.safetensors"
//!   t5 = "FLUX.1-dev/text_encoder_2"
//!   t5_tokenizer = "FLUX.1-dev/tokenizer_2/tokenizer.json"
//!   clip = "FLUX.1-dev/text_encoder"
//!   clip_tokenizer = "clip-vit-large-patch14/tokenizer.json"
//!   device = "cuda"
//!   reference_px = 512
//!   ```
//! * or a **FLUX.1 folder as downloaded** ([`FLUX_FOLDER_LAYOUT`]): its usual files are found by name.
//!
//! Every file a profile names is checked before any weight is read ([`missing_files`], called by
//! [`ModelSettings::load_base`]), and all that are missing are reported at once, by key and path.

use std::path::{Path, PathBuf};

use super::config::{ConfigError, ModelSettings};
use crate::model::BaseSource;

/// The files of a FLUX.1 folder as downloaded (FLUX.1-dev / FLUX.1-schnell repositories), by key.
pub const FLUX_FOLDER_LAYOUT: [(&str, &str); 6] = [
    (
        "transformer",
        "flux1-dev.safetensors or flux1-schnell.safetensors (BFL naming)",
    ),
    ("autoencoder", "ae.safetensors"),
    ("t5", "text_encoder_2/ (config.json + *.safetensors)"),
    ("t5_tokenizer", "tokenizer_2/tokenizer.json"),
    ("clip", "text_encoder/ (config.json + *.safetensors)"),
    (
        "clip_tokenizer",
        "tokenizer/ (vocab.json + merges.txt, or tokenizer.json)",
    ),
];

/// T5 tokens per prompt of FLUX.1-schnell (FLUX.1-dev uses 512).
const SCHNELL_T5_TOKENS: usize = 256;

/// A profile that cannot be read; each names the file or folder and what to change.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    /// The profile path does not exist.
    #[error("{0}: no such backbone profile (a TOML file or a FLUX.1 folder)")]
    NotFound(PathBuf),
    /// The TOML profile is malformed (the message has line and column).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A folder that does not hold a FLUX.1 layout.
    #[error("{folder}: {message}")]
    Folder {
        /// The folder.
        folder: PathBuf,
        /// What is missing or ambiguous.
        message: String,
    },
}

/// Reads a backbone profile: a TOML file of model settings or a FLUX.1 folder. The files are not opened.
pub fn read_profile(path: &Path) -> Result<ModelSettings, BackboneError> {
    if path.is_dir() {
        return flux_folder_profile(path);
    }
    if !path.is_file() {
        return Err(BackboneError::NotFound(path.to_path_buf()));
    }
    let mut settings: ModelSettings = super::config::read_toml_file(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    settings.resolve_paths(dir);
    Ok(settings)
}

/// The profile of a FLUX.1 folder as downloaded: `flux1-dev.safetensors` (or `flux1-schnell.safetensors`, or the
/// only other `*.safetensors` at the top), `ae.safetensors`, `text_encoder/` + `tokenizer/` (CLIP: `vocab.json` + `merges.txt` as downloaded),
/// `text_encoder_2/` + `tokenizer_2/tokenizer.json` (T5); 512 px references. Every part is named whether it
/// exists or not, so that [`missing_files`] reports all that are absent.
pub fn flux_folder_profile(folder: &Path) -> Result<ModelSettings, BackboneError> {
    let fail = |message: String| BackboneError::Folder {
        folder: folder.to_path_buf(),
        message,
    };
    let mut top: Vec<PathBuf> = std::fs::read_dir(folder)
        .map_err(|e| fail(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
        .filter(|p| p.file_name().is_some_and(|n| n != "ae.safetensors"))
        .collect();
    top.sort();
    let named = |name: &str| top.iter().find(|p| p.file_name().is_some_and(|n| n == name)).cloned();
    let transformer = match (named("flux1-dev.safetensors"), named("flux1-schnell.safetensors")) {
        (Some(dev), _) => dev,
        (None, Some(schnell)) => schnell,
        (None, None) => match top.as_slice() {
            [only] => only.clone(),
            [] if folder.join("transformer").is_dir() => {
                return Err(fail(
                    "only the diffusers-format `transformer/` folder is here; the BFL single file \
                     (flux1-dev.safetensors, at the top of the FLUX.1-dev repository) is needed"
                        .into(),
                ));
            }
            [] => {
                return Err(fail(format!(
                    "no transformer checkpoint; a FLUX.1 folder holds {}",
                    FLUX_FOLDER_LAYOUT
                        .iter()
                        .map(|(k, f)| format!("{k}: {f}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            several => {
                return Err(fail(format!(
                    "several checkpoints ({}); name the transformer in a TOML profile",
                    several
                        .iter()
                        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        },
    };
    let part = |rel: &str| Some(folder.join(rel));
    let schnell = transformer
        .file_name()
        .is_some_and(|n| n.to_string_lossy().contains("schnell"));
    Ok(ModelSettings {
        base: BaseSource::File(transformer),
        autoencoder: part("ae.safetensors"),
        t5: part("text_encoder_2"),
        t5_tokenizer: part("tokenizer_2/tokenizer.json"),
        t5_max_tokens: if schnell {
            SCHNELL_T5_TOKENS
        } else {
            crate::model::flux_text::FLUX_T5_TOKENS
        },
        clip: part("text_encoder"),
        clip_tokenizer: part("tokenizer"),
        reference_px: 512,
        ..ModelSettings::default()
    })
}

/// Every file the settings name that does not exist, as `key = path (what to do)`.
pub fn missing_files(settings: &ModelSettings) -> Vec<String> {
    let mut missing = Vec::new();
    let mut check = |key: &str, path: Option<&Path>, hint: &str| {
        if let Some(p) = path
            && !p.exists()
        {
            missing.push(format!("{key} = {} (not found{hint})", p.display()));
        }
    };
    if let BaseSource::File(p) = &settings.base {
        check("transformer", Some(p), "");
    }
    for (i, lora) in settings.base_loras.iter().enumerate() {
        check(&format!("base_loras[{i}]"), Some(&lora.path), "");
    }
    check("autoencoder", settings.autoencoder.as_deref(), "");
    check("t5", settings.t5.as_deref(), "");
    check("t5_tokenizer", settings.t5_tokenizer.as_deref(), "");
    check("clip", settings.clip.as_deref(), "");
    if let Some(p) = settings.clip_tokenizer.as_deref() {
        let folder_lacks = p.is_dir()
            && !p.join("tokenizer.json").is_file()
            && !(p.join("vocab.json").is_file() && p.join("merges.txt").is_file());
        if folder_lacks {
            missing.push(format!(
                "clip_tokenizer = {} (a CLIP tokenizer folder holds tokenizer.json, or vocab.json + merges.txt)",
                p.display()
            ));
        } else {
            check("clip_tokenizer", Some(p), "");
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BaseLora;

    #[test]
    fn a_toml_profile_reads_with_paths_from_its_folder_and_the_transformer_alias() {
        let dir = tempfile::tempdir().expect("tmp");
        let profile = dir.path().join("uno.toml");
        std::fs::write(
            &profile,
            "transformer = \"flux/flux1-dev.safetensors\"\nbase_loras = [{ path = \"/abs/dit_lora.safetensors\", \
             scale = 0.5 }]\nautoencoder = \"flux/ae.safetensors\"\nreference_px = 512\n",
        )
        .expect("write");
        let s = read_profile(&profile).expect("reads");
        assert_eq!(s.base, BaseSource::File(dir.path().join("flux/flux1-dev.safetensors")));
        assert_eq!(
            s.base_loras,
            [BaseLora {
                path: PathBuf::from("/abs/dit_lora.safetensors"),
                scale: 0.5
            }]
        );
        assert_eq!(s.autoencoder, Some(dir.path().join("flux/ae.safetensors")));
        assert_eq!(s.reference_px, 512);
        let missing = missing_files(&s);
        assert_eq!(missing.len(), 3, "{missing:?}");
        assert!(missing[0].starts_with("transformer = ") && missing[1].starts_with("base_loras[0] = "));
        std::fs::write(&profile, "transformer = 3\n").expect("write");
        let e = read_profile(&profile).expect_err("type").to_string();
        assert!(e.contains("uno.toml") && e.contains("line 1"), "{e}");
        std::fs::write(&profile, "vae = \"x\"\n").expect("write");
        let e = read_profile(&profile).expect_err("unknown key").to_string();
        assert!(e.contains("vae"), "{e}");
        let e = read_profile(&dir.path().join("nope.toml"))
            .expect_err("missing")
            .to_string();
        assert!(e.contains("nope.toml"), "{e}");
    }

    #[test]
    fn a_tiny_flux_folder_with_unos_lora_loads_whole() {
        use crate::model::testing::{tiny_flux_config, write_tiny_flux_folder, write_tiny_uno_lora};
        let dir = tempfile::tempdir().expect("tmp");
        let flux = dir.path().join("FLUX.1-dev");
        write_tiny_flux_folder(&flux, 3).expect("folder");
        let lora = dir.path().join("dit_lora.safetensors");
        write_tiny_uno_lora(&lora, &tiny_flux_config(), 4, 9).expect("lora");
        let mut settings = read_profile(&flux).expect("profile");
        assert!(missing_files(&settings).is_empty(), "{:?}", missing_files(&settings));
        let device = candle_core::Device::Cpu;
        let plain = settings.load_base(&device).expect("loads");
        assert_eq!(plain.config(), &tiny_flux_config(), "sizes from the shapes");
        assert_eq!(plain.pixels_per_token(), 16, "autoencoder attached");
        assert!(
            plain.flux_text.is_some() && plain.prompt.is_none(),
            "T5 + CLIP attached"
        );
        settings.base_loras.push(BaseLora { path: lora, scale: 1.0 });
        // Every byte of every file is counted while it loads (what the Studio's progress bar shows).
        let progress = std::sync::Arc::new(crate::model::weights::LoadProgress::default());
        let merged =
            crate::model::weights::track(&progress, || settings.load_base(&device)).expect("loads with the LoRA");
        let snap = progress.snapshot();
        let on_disk: u64 = settings
            .weight_files()
            .iter()
            .map(|p| crate::model::weights::weight_bytes(p))
            .sum();
        assert_eq!(settings.weight_files().len(), 5, "transformer, LoRA, AE, T5, CLIP");
        assert!(on_disk > 0);
        assert_eq!((snap.read, snap.total), (on_disk, on_disk));
        assert_eq!(snap.part, "T5 and CLIP text encoders");
        let w = |b: &crate::model::BaseModel| {
            b.mmdit
                .named_tensors()
                .into_iter()
                .find(|(n, _)| n == "single_blocks.0.linear1.weight")
                .map(|(_, t)| t.clone())
        };
        let (a, b) = (w(&plain).expect("w"), w(&merged).expect("w"));
        let h = tiny_flux_config().hidden_size;
        let diff = |rows: std::ops::Range<usize>| {
            let part = |t: &candle_core::Tensor| t.narrow(0, rows.start, rows.len()).expect("rows");
            crate::model::testing::max_abs_diff(&part(&a), &part(&b)).expect("diff")
        };
        assert!(diff(0..3 * h) > 0.0, "the q/k/v rows of linear1 changed");
        assert_eq!(diff(3 * h..a.dim(0).expect("rows")), 0.0, "the MLP rows did not");
    }

    #[test]
    fn a_flux_folder_is_found_by_its_usual_names() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path();
        let e = flux_folder_profile(f).expect_err("empty").to_string();
        assert!(
            e.contains("no transformer checkpoint") && e.contains("ae.safetensors"),
            "{e}"
        );
        std::fs::create_dir_all(f.join("transformer")).expect("mkdir");
        let e = flux_folder_profile(f).expect_err("diffusers").to_string();
        assert!(e.contains("diffusers-format"), "{e}");
        for file in ["flux1-dev.safetensors", "ae.safetensors"] {
            std::fs::write(f.join(file), b"x").expect("write");
        }
        for d in ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"] {
            std::fs::create_dir_all(f.join(d)).expect("mkdir");
        }
        std::fs::write(f.join("tokenizer_2/tokenizer.json"), b"{}").expect("write");
        std::fs::write(f.join("tokenizer/vocab.json"), b"{}").expect("write");
        let s = flux_folder_profile(f).expect("profile");
        assert_eq!(s.base, BaseSource::File(f.join("flux1-dev.safetensors")));
        assert_eq!(s.autoencoder, Some(f.join("ae.safetensors")));
        assert_eq!(
            (s.t5.clone(), s.clip.clone()),
            (Some(f.join("text_encoder_2")), Some(f.join("text_encoder")))
        );
        assert_eq!(s.t5_max_tokens, 512);
        let missing = missing_files(&s);
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert!(
            missing[0].contains("clip_tokenizer") && missing[0].contains("vocab.json + merges.txt"),
            "{missing:?}"
        );
        let e = s.load_base(&candle_core::Device::Cpu).expect_err("missing").to_string();
        assert!(e.contains("nothing was loaded") && e.contains("clip_tokenizer"), "{e}");
        // FLUX.1's tokenizer/ as downloaded: vocab.json + merges.txt, no tokenizer.json.
        std::fs::write(f.join("tokenizer/merges.txt"), b"#version: 0.2\n").expect("write");
        assert!(missing_files(&s).is_empty(), "{:?}", missing_files(&s));
    }
}
