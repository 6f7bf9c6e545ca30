//! `focusdpo masks`: the masks of one item as safetensors (and optional PNG views).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use focusdpo::dip::dataset::read_binary_mask;
use focusdpo::dip::{DipDataset, LoadedItem, bundled_dataset_dir};
use focusdpo::knobs;
use focusdpo::masks::{
    ComplexityConfig, FusionOutput, FusionParams, Grid, MaskInputs, MaskVariant, PriorConfig, ReferencePool,
    Similarity, fuse,
};
use focusdpo::model::Adapters;
use focusdpo::model::schedule::Parameterisation;
use focusdpo::pipeline::{ItemMasks, MaskSettings, item_masks, subject_prior};
use focusdpo::store::{NamedTensor, grid_to_grey, overlay_red, safetensors_bytes, write_atomic};
use focusdpo::train::config::{AttentionConfig, HiddenSource};
use focusdpo::train::data::prepare_item;

use super::backbone::BackboneArgs;
use focusdpo::train::focus::{Probe, masks_at};

#[derive(Debug, Args)]
pub struct MasksArgs {
    /// Dataset folder. Default: the bundled dataset.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Item id. Default: the first item.
    #[arg(long)]
    item: Option<String>,
    /// Focus coverage threshold τ of Eq. 9 / 11 (knob masks.fusion.tau).
    #[arg(long, default_value_t = FusionParams::default().tau, value_parser = knobs::flag::<f32>("masks.fusion.tau"))]
    tau: f32,
    /// Fusion coefficient γ of Eq. 9 / 11 (knob masks.fusion.gamma).
    #[arg(long, default_value_t = FusionParams::default().gamma, value_parser = knobs::flag::<f32>("masks.fusion.gamma"))]
    gamma: f32,
    /// Mask variant: focus, uniform, prior, complexity, unconstrained, no-ms, no-md.
    #[arg(long, default_value = "focus")]
    variant: MaskVariant,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
    /// Also write PNG views of every map (and the fused map over the winner) into this folder.
    #[arg(long)]
    png: Option<PathBuf>,
    /// Token side in pixels. Default: the backbone's (4 for the tiny model, 16 for FLUX); 4 when M_s is not used.
    #[arg(long)]
    stride: Option<usize>,
    /// Minimum fraction of a token's pixels inside a subject mask for the token to be in M_prior.
    #[arg(long, default_value_t = 0.5)]
    coverage: f32,
    /// Entropy window side in pixels (odd) for M_d and --raw-entropy.
    #[arg(long, default_value_t = 9)]
    window: usize,
    /// Also write `c_raw` [H_px, W_px]: the unnormalised per-pixel entropy in bits (Eq. 7).
    #[arg(long)]
    raw_entropy: bool,
    /// Timesteps T (integers in 0..=1000, t = T/1000) for which m_s.t{T}, m.t{T}, a_focus.t{T} are written.
    #[arg(long, value_delimiter = ',', default_value = "500")]
    timesteps: Vec<u32>,
    /// A binary PNG at the winner's size used as M_s (intersected with M_prior, as Eq. 6 implies) instead of
    /// the backbone's attention field.
    #[arg(long)]
    ms_mask: Option<PathBuf>,
    /// The backbone for M_s (not loaded for variants without M_s or with --ms-mask).
    #[command(flatten)]
    backbone: BackboneArgs,
    /// Seed of the noise ε used to make x_t from the winner.
    #[arg(long, default_value_t = 0)]
    noise_seed: u64,
    /// Double-stream blocks averaged in Eq. 3 (comma-separated, 0-based). Default: all.
    #[arg(long, value_delimiter = ',')]
    layers: Vec<usize>,
    /// Eq. 3 similarity: cosine or squared-norm.
    #[arg(long, default_value = "cosine")]
    similarity: Similarity,
    /// Eq. 3's CLS pooling: mean (all reference tokens) or foreground (the reference's non-background tokens).
    #[arg(long, default_value = "foreground")]
    pool: ReferencePool,
    /// Side of the reference images fed to the backbone, in pixels. Default: the backbone's `reference_px`.
    #[arg(long)]
    reference_px: Option<u32>,
}

/// M_s and the fused map at one timestep.
struct AtTimestep {
    t: u32,
    m_s: Option<Grid>,
    fused: FusionOutput,
}

/// Token side without a backbone: the tiny default's.
const DEFAULT_STRIDE: usize = 4;

pub fn run(args: &MasksArgs) -> anyhow::Result<()> {
    if let Some(&bad) = args.timesteps.iter().find(|&&t| t > 1000) {
        bail!("--timesteps: {bad} is outside 0..=1000");
    }
    let params = FusionParams {
        variant: args.variant,
        tau: args.tau,
        gamma: args.gamma,
    };
    params.validate().context("--tau/--gamma")?;
    let dir = args.data.clone().unwrap_or_else(bundled_dataset_dir);
    let dataset = DipDataset::open(&dir)?;
    let item = match &args.item {
        Some(id) => dataset.load_by_id(id)?,
        None if dataset.is_empty() => bail!("{}: the dataset has no valid item", dir.display()),
        None => dataset.load_item(0)?,
    };
    let attention = AttentionConfig {
        source: HiddenSource::Reference,
        layers: args.layers.clone(),
        similarity: args.similarity,
        pool: args.pool,
    };
    // The backbone is loaded only when the variant reads M_s and no --ms-mask replaces it.
    let model_settings = args.backbone.settings()?;
    let base = if args.ms_mask.is_none() && args.variant.needs_attention_field() {
        let loaded = model_settings
            .device()
            .map_err(anyhow::Error::from)
            .and_then(|device| Ok(model_settings.load_base(&device)?));
        match loaded {
            Ok(base) => Some(base),
            Err(e) => bail!(
                "variant `{}` needs the attention field M_s (Eq. 3–6) from the backbone, which cannot be loaded: \
                 {e:#}. Choose --base random:SEED or a file, pass --ms-mask FILE.png, or choose a variant without \
                 M_s (uniform, prior, complexity, no-ms)",
                args.variant
            ),
        }
    } else {
        None
    };
    let stride = match (args.stride, &base) {
        (Some(s), Some(b)) if s != b.pixels_per_token() => bail!(
            "--stride {s} differs from the backbone's {} pixels per token; M_s lives on the model's token grid",
            b.pixels_per_token()
        ),
        (Some(s), _) => s,
        (None, Some(b)) => b.pixels_per_token(),
        (None, None) => DEFAULT_STRIDE,
    };
    let reference_px = args.reference_px.unwrap_or(model_settings.reference_px);
    let settings = MaskSettings {
        prior: PriorConfig {
            stride,
            coverage_threshold: args.coverage,
        },
        complexity: ComplexityConfig {
            window_px: args.window,
            ..ComplexityConfig::default()
        },
    };
    let masks = item_masks(&item, &settings).context("computing masks")?;
    // Maps that do not depend on t (M_s from a file, or no M_s): fused once, repeated for every timestep.
    let same_for_every_t = |m_s: Option<Grid>| -> anyhow::Result<Vec<AtTimestep>> {
        let fused = fuse(
            &params,
            &MaskInputs {
                m_prior: &masks.m_prior,
                m_d: &masks.m_d,
                m_s: m_s.as_ref(),
            },
        )?;
        Ok(args
            .timesteps
            .iter()
            .map(|&t| AtTimestep {
                t,
                m_s: m_s.clone(),
                fused: fused.clone(),
            })
            .collect())
    };
    let (per_t, m_s_source) = match (&args.ms_mask, &base) {
        (Some(path), _) => {
            let m_s = attention_field_from_file(path, &item, &settings, &masks.m_prior)?;
            (
                same_for_every_t(Some(m_s))?,
                format!("file:{} (same for every timestep)", path.display()),
            )
        }
        (None, Some(base)) => {
            let device = base.mmdit.device().clone();
            let prepared = prepare_item(base, &item, &settings, reference_px, &device)?;
            let per_t = args
                .timesteps
                .iter()
                .map(|&t| {
                    let probe = Probe {
                        t: t as f32 / 1000.0,
                        parameterisation: Parameterisation::RectifiedFlow,
                        noise_seed: args.noise_seed,
                        adapters: Adapters::Off,
                    };
                    let sm = masks_at(&base.mmdit, &prepared, probe, &attention, &params)?;
                    Ok(AtTimestep {
                        t,
                        m_s: sm.m_s,
                        fused: sm.fused,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            (
                per_t,
                format!(
                    "{} (reference hidden states, noise seed {})",
                    args.backbone.describe(&model_settings),
                    args.noise_seed
                ),
            )
        }
        // The variant does not read M_s: no backbone is loaded and no forward runs.
        (None, None) => (
            same_for_every_t(None)?,
            format!("none (variant {} does not use M_s; no backbone forward)", args.variant),
        ),
    };

    let mut tensors = vec![
        NamedTensor::Grid("m_prior".into(), &masks.m_prior),
        NamedTensor::Grid("m_d".into(), &masks.m_d),
    ];
    for (j, p) in masks.subject_priors.iter().enumerate() {
        tensors.push(NamedTensor::Grid(format!("m_prior.s{j}"), p));
    }
    for at in &per_t {
        let t = at.t;
        if let Some(ms) = &at.m_s {
            tensors.push(NamedTensor::Grid(format!("m_s.t{t}"), ms));
        }
        if let Some(a) = at.fused.a_focus {
            tensors.push(NamedTensor::Scalar(format!("a_focus.t{t}"), a));
        }
        tensors.push(NamedTensor::Grid(format!("m.t{t}"), &at.fused.mask));
    }
    if args.raw_entropy {
        tensors.push(NamedTensor::Grid("c_raw".into(), &masks.c_raw));
    }
    let branches: Vec<String> = per_t
        .iter()
        .map(|a| format!("t{}={}", a.t, a.fused.branch.name()))
        .collect();
    let mut metadata = HashMap::from([
        ("item".to_string(), item.record.id.clone()),
        ("dataset".to_string(), dir.display().to_string()),
        ("variant".to_string(), args.variant.to_string()),
        ("tau".to_string(), args.tau.to_string()),
        ("gamma".to_string(), args.gamma.to_string()),
        ("stride".to_string(), stride.to_string()),
        ("coverage_threshold".to_string(), args.coverage.to_string()),
        ("entropy_window".to_string(), args.window.to_string()),
        ("branch".to_string(), branches.join(",")),
        ("m_s_source".to_string(), m_s_source),
    ]);
    if !args.layers.is_empty() {
        metadata.insert("layers".to_string(), format!("{:?}", args.layers));
    }
    let bytes = safetensors_bytes(&tensors, metadata.clone()).context("serialising safetensors")?;
    write_atomic(&args.out, &bytes).with_context(|| format!("writing {}", args.out.display()))?;

    println!(
        "item {} ({} subject(s)): token grid {}×{}, ‖M_prior‖₁ = {}, variant {}, M_s from {}",
        item.record.id,
        item.subject_count(),
        masks.m_prior.height(),
        masks.m_prior.width(),
        masks.m_prior.l1_norm(),
        args.variant,
        metadata.get("m_s_source").map_or("none", String::as_str),
    );
    for at in &per_t {
        let a_focus = at
            .fused
            .a_focus
            .map_or("n/a (no M_s)".to_string(), |a| format!("{a:.4}"));
        println!(
            "  T={:4}: A_focus = {a_focus}, branch {}, ‖M‖₁ = {:.3}",
            at.t,
            at.fused.branch.name(),
            at.fused.mask.l1_norm()
        );
    }
    println!("wrote {}", args.out.display());
    if let (Some(png_dir), Some(first)) = (&args.png, per_t.first()) {
        write_pngs(
            png_dir,
            &item,
            &masks,
            first.m_s.as_ref(),
            &first.fused.mask,
            stride,
            args,
        )?;
        println!("wrote PNG views (T={}) to {}", first.t, png_dir.display());
    }
    Ok(())
}

/// M_s supplied as a pixel mask: pooled like M_prior, then restricted to M_prior (M_s ⊆ M_prior by Eq. 6).
fn attention_field_from_file(
    path: &Path,
    item: &LoadedItem,
    settings: &MaskSettings,
    m_prior: &Grid,
) -> anyhow::Result<Grid> {
    let mask = read_binary_mask(path)?;
    if mask.dimensions() != item.winner.dimensions() {
        bail!(
            "{}: --ms-mask is {}×{} but the winner is {}×{}",
            path.display(),
            mask.width(),
            mask.height(),
            item.winner.width(),
            item.winner.height()
        );
    }
    Ok(subject_prior(&mask, &settings.prior)?.hadamard(m_prior)?)
}

fn write_pngs(
    dir: &Path,
    item: &LoadedItem,
    masks: &ItemMasks,
    m_s: Option<&Grid>,
    m: &Grid,
    stride: usize,
    args: &MasksArgs,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let save_grey = |name: &str, grid: &Grid, stride: usize, hi: f32| -> anyhow::Result<()> {
        let path = dir.join(name);
        grid_to_grey(grid, stride, 0.0, hi)
            .save(&path)
            .with_context(|| format!("writing {}", path.display()))
    };
    let s = stride;
    save_grey("m_prior.png", &masks.m_prior, s, 1.0)?;
    save_grey("m_d.png", &masks.m_d, s, 1.0)?;
    save_grey("m.png", m, s, 1.0)?;
    if let Some(ms) = m_s {
        save_grey("m_s.png", ms, s, 1.0)?;
    }
    for (j, p) in masks.subject_priors.iter().enumerate() {
        save_grey(&format!("m_prior.s{j}.png"), p, s, 1.0)?;
    }
    if args.raw_entropy {
        let hi = masks.c_raw.min_max().map_or(1.0, |(_, hi)| hi);
        save_grey("c_raw.png", &masks.c_raw, 1, hi)?;
    }
    let save_rgb = |name: &str, img: &image::RgbImage| -> anyhow::Result<()> {
        let path = dir.join(name);
        img.save(&path).with_context(|| format!("writing {}", path.display()))
    };
    save_rgb("winner.png", &item.winner)?;
    save_rgb("loser.png", &item.loser)?;
    save_rgb("m_over_winner.png", &overlay_red(&item.winner, m, s, 0.6))?;
    Ok(())
}
