//! Sampling images from a base (or base + LoRA): Euler on the rectified-flow ODE, DDIM for ε-prediction, with
//! classifier-free guidance on the prompt and a fixed seed per image.
//!
//! The unconditional branch of CFG is the **empty prompt** with the same references: the base is pretrained with
//! prompt dropout to the empty prompt (`train::pretrain`), and keeping the references makes guidance push towards
//! the prompt, not away from the subjects. Guidance on the references as well (`reference_cfg_scale` ≠ 1, for a base
//! pretrained with reference dropout) is InstructPix2Pix's two-condition form, references as its image condition:
//! `v = v(∅, ∅) + s_ref·(v(∅, refs) − v(∅, ∅)) + s_txt·(v(prompt, refs) − v(∅, refs))`, one more forward a step.
//! Each image's noise comes from its own seed, so an image does not depend on which other images share its batch.

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::EvalError;
use crate::model::encoder::reference_at;
use crate::model::schedule::{DDPM_STEPS, Parameterisation, ddpm_alphas_cumprod, model_time, shift_time};
use crate::model::{
    Adapters, BaseModel, ForwardOptions, MmditInput, Reference, ids_tensor, reference_ids, target_ids, text_ids,
    uno_reference_offsets,
};
use crate::rng::{normal_vec, stream_rng};

pub use crate::model::base::SamplerChoices;

const STREAM_SAMPLE: u64 = 0x5341_4D50_0001;

/// Sampler settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleSettings {
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale on the prompt (1 = no guidance, one forward per step).
    pub cfg_scale: f32,
    /// Rectified flow only: time shift `s` of SD3/FLUX (`model::schedule::shift_time`); 1 = the uniform grid.
    pub shift: f32,
    /// Euler (rectified flow) or DDIM (ε-prediction): must match how the base was trained.
    pub parameterisation: Parameterisation,
    /// Side the references are resized to (the base's training setting).
    pub reference_px: u32,
    /// Guidance strength fed to a guidance-distilled base (FLUX.1-dev's `guidance_in`; 3.5 is BFL's default);
    /// unused by bases without it. Such a base is usually sampled with `cfg_scale` 1.
    #[serde(default = "default_distilled_guidance")]
    pub distilled_guidance: f32,
    /// Guidance scale on the references (1 = none: no extra forward). Only a base pretrained with reference dropout
    /// has learned the branch without references that it needs.
    #[serde(default = "no_reference_guidance")]
    pub reference_cfg_scale: f32,
    /// Rectified flow only: how much fresh noise each step puts back, `η ∈ [0, 1]`. From `t` to `t'` the step is
    /// `x' = (1 − t')·x̂₀ + t'·(√(1 − η²)·ε̂ + η·z)` with `x̂₀ = x − t·v`, `ε̂ = x + (1 − t)·v` and `z` fresh
    /// noise (seeded per image and step): `η = 0` is the Euler ODE step exactly (the default), `η = 1` is diffusers'
    /// `FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`, which re-noises `x̂₀` to the next level.
    #[serde(default)]
    pub stochasticity: f32,
    /// Autoguidance (Karras et al. 2024): `v ← v + (w − 1)·(v_main(c) − v_guide(c))`, the main model's conditional
    /// prediction pushed away from a weaker model's ([`BaseModel::guide`]) under the same prompt and references, on
    /// top of whatever CFG makes of `v`. With CFG and reference CFG at 1 it is the paper's
    /// `v_guide + w·(v_main − v_guide)`. 1 = off (no extra forward); ≠ 1 needs a guide.
    #[serde(default = "no_reference_guidance")]
    pub autoguidance_scale: f32,
}

fn no_reference_guidance() -> f32 {
    1.0
}

fn default_distilled_guidance() -> f32 {
    3.5
}

impl Default for SampleSettings {
    fn default() -> Self {
        Self {
            steps: 24,
            cfg_scale: 3.0,
            shift: 1.0,
            parameterisation: Parameterisation::RectifiedFlow,
            reference_px: 32,
            distilled_guidance: default_distilled_guidance(),
            reference_cfg_scale: no_reference_guidance(),
            stochasticity: 0.0,
            autoguidance_scale: no_reference_guidance(),
        }
    }
}

impl SampleSettings {
    /// These settings with what `base` recommends ([`BaseModel::sampling`], from its file) in place of theirs:
    /// the defaults a base is sampled with when nothing else is asked for.
    pub fn recommended_by(self, base: &BaseModel) -> Self {
        base.sampling.over(self)
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), EvalError> {
        if self.steps == 0 || self.steps > 1000 {
            return Err(EvalError::Invalid(format!(
                "sampler steps {} must be in 1..=1000",
                self.steps
            )));
        }
        if !(self.cfg_scale.is_finite() && self.cfg_scale >= 0.0) {
            return Err(EvalError::Invalid(format!("cfg scale {} must be ≥ 0", self.cfg_scale)));
        }
        if !(self.reference_cfg_scale.is_finite() && self.reference_cfg_scale >= 0.0) {
            return Err(EvalError::Invalid(format!(
                "reference cfg scale {} must be ≥ 0",
                self.reference_cfg_scale
            )));
        }
        if !(self.autoguidance_scale.is_finite() && self.autoguidance_scale >= 0.0) {
            return Err(EvalError::Invalid(format!(
                "autoguidance scale {} must be ≥ 0",
                self.autoguidance_scale
            )));
        }
        if !(self.shift.is_finite() && self.shift > 0.0) {
            return Err(EvalError::Invalid(format!("time shift {} must be > 0", self.shift)));
        }
        if !(0.0..=1.0).contains(&self.stochasticity) {
            return Err(EvalError::Invalid(format!(
                "sampler stochasticity {} must be in [0, 1] (0 = the Euler ODE)",
                self.stochasticity
            )));
        }
        Ok(())
    }
}

/// What a [`SamplerChoices`] does with the settings it leaves out.
impl SamplerChoices {
    /// Only the number of steps chosen.
    pub fn steps(steps: usize) -> Self {
        Self {
            steps: Some(steps),
            ..Self::default()
        }
    }

    /// `under` with each setting chosen here in place of its own.
    pub fn over(&self, under: SampleSettings) -> SampleSettings {
        SampleSettings {
            steps: self.steps.unwrap_or(under.steps),
            cfg_scale: self.cfg_scale.unwrap_or(under.cfg_scale),
            shift: self.shift.unwrap_or(under.shift),
            parameterisation: self.parameterisation.unwrap_or(under.parameterisation),
            reference_px: self.reference_px.unwrap_or(under.reference_px),
            distilled_guidance: self.distilled_guidance.unwrap_or(under.distilled_guidance),
            reference_cfg_scale: self.reference_cfg_scale.unwrap_or(under.reference_cfg_scale),
            stochasticity: self.stochasticity.unwrap_or(under.stochasticity),
            autoguidance_scale: self.autoguidance_scale.unwrap_or(under.autoguidance_scale),
        }
    }

    /// The settings `base` is sampled with: these choices, then its recommendation, then the defaults.
    pub fn resolve(&self, base: &BaseModel) -> SampleSettings {
        self.over(SampleSettings::default().recommended_by(base))
    }

    /// Checks the chosen values' ranges (those left out are checked once resolved).
    pub fn validate(&self) -> Result<(), EvalError> {
        self.over(SampleSettings::default()).validate()
    }
}

impl From<SampleSettings> for SamplerChoices {
    /// Every setting chosen: samples exactly so whatever the base recommends.
    fn from(s: SampleSettings) -> Self {
        Self {
            steps: Some(s.steps),
            cfg_scale: Some(s.cfg_scale),
            shift: Some(s.shift),
            parameterisation: Some(s.parameterisation),
            reference_px: Some(s.reference_px),
            distilled_guidance: Some(s.distilled_guidance),
            reference_cfg_scale: Some(s.reference_cfg_scale),
            stochasticity: Some(s.stochasticity),
            autoguidance_scale: Some(s.autoguidance_scale),
        }
    }
}

/// What to generate: one prompt, its references, an image size.
#[derive(Clone, Debug)]
pub struct SampleRequest<'a> {
    /// Prompt.
    pub prompt: &'a str,
    /// One reference per subject.
    pub references: &'a [RgbImage],
    /// Output width and height in pixels (multiples of the base's pixels per token).
    pub size_px: (u32, u32),
}

/// Model inputs shared by every step of a sampling run.
struct Conditioning {
    grid: (usize, usize),
    img_ids: Tensor,
    refs: Vec<(Tensor, Tensor)>,
    txt: Tensor,
    txt_ids: Tensor,
    y: Tensor,
}

fn conditioning(
    base: &BaseModel,
    request: &SampleRequest<'_>,
    settings: &SampleSettings,
    batch: usize,
    guided: bool,
    device: &Device,
) -> Result<Conditioning, EvalError> {
    let codec = &base.codec;
    let grid = codec
        .grid_for(request.size_px.0, request.size_px.1)
        .map_err(|e| EvalError::Invalid(e.to_string()))?;
    let rp = settings.reference_px;
    let rgrid = codec
        .grid_for(rp, rp)
        .map_err(|e| EvalError::Invalid(format!("reference size: {e}")))?;
    // With guidance the batch is [cond × batch, uncond × batch].
    let rows = if guided { 2 * batch } else { batch };
    let offsets = uno_reference_offsets(grid, &vec![rgrid; request.references.len()]);
    let refs = request
        .references
        .iter()
        .zip(offsets)
        .map(|(r, off)| {
            let tokens = codec
                .encode(&reference_at(r, rp), device)
                .map_err(|e| EvalError::Invalid(e.to_string()))?;
            Ok((
                tokens.repeat((rows, 1, 1))?,
                ids_tensor(&reference_ids(rgrid.0, rgrid.1, off), rows, device)?,
            ))
        })
        .collect::<Result<Vec<_>, EvalError>>()?;
    let text = base
        .text_conditioner()
        .ok_or_else(|| EvalError::Invalid("the base has no text encoder (prompt tables or T5/CLIP)".into()))?;
    let mut prompts = vec![request.prompt; batch];
    if guided {
        prompts.extend(std::iter::repeat_n("", batch));
    }
    let enc = text.encode(&prompts).map_err(|e| EvalError::Invalid(e.to_string()))?;
    Ok(Conditioning {
        grid,
        img_ids: ids_tensor(&target_ids(grid.0, grid.1), rows, device)?,
        refs,
        txt_ids: text_ids(enc.txt.dim(1)?, rows, device)?,
        txt: enc.txt,
        y: enc.y,
    })
}

/// One forward of `base` on `x_t` (`[rows, tokens, channels]`, the grid of `request.size_px`) at per-row model
/// times `model_t` (`[rows]`), every row conditioned on `request`'s prompt and references, without guidance: the
/// raw prediction (`v` or `ε`). The denoising scores of the benchmark use it.
pub fn predict_conditioned(
    base: &BaseModel,
    request: &SampleRequest<'_>,
    settings: &SampleSettings,
    x_t: &Tensor,
    model_t: &Tensor,
    adapters: Adapters,
) -> Result<Tensor, EvalError> {
    let device = base.mmdit.device().clone();
    let cond = conditioning(base, request, settings, x_t.dim(0)?, false, &device)?;
    forward(base, &cond, settings, x_t, model_t, adapters, None)
}

/// One forward on `x` (as many rows as `cond` was built for) at per-row model times; the detached prediction.
/// `estimate` is the previous step's `x̂₀` for a self-conditioned base (ignored by one without it; `None` = 0).
fn forward(
    base: &BaseModel,
    cond: &Conditioning,
    settings: &SampleSettings,
    x: &Tensor,
    model_t: &Tensor,
    adapters: Adapters,
    estimate: Option<&Tensor>,
) -> Result<Tensor, EvalError> {
    let guidance = base.guidance_tensor(settings.distilled_guidance, x.dim(0)?)?;
    let references: Vec<Reference<'_>> = cond
        .refs
        .iter()
        .map(|(tokens, ids)| Reference { tokens, ids })
        .collect();
    let input = MmditInput {
        img: x,
        img_ids: &cond.img_ids,
        txt: &cond.txt,
        txt_ids: &cond.txt_ids,
        timesteps: model_t,
        y: &cond.y,
        guidance: guidance.as_ref(),
        references: &references,
        self_condition: estimate.filter(|_| base.config().self_condition),
    };
    let out = base.mmdit.forward_with(
        &input,
        ForwardOptions {
            capture_hidden: false,
            adapters,
            ..Default::default()
        },
    )?;
    Ok(out.prediction.detach())
}

/// The rectified-flow time grid from 1 to 0 (`steps + 1` points), shifted by `shift`.
pub fn flow_time_grid(steps: usize, shift: f32) -> Vec<f32> {
    (0..=steps)
        .map(|i| {
            let t = 1.0 - i as f32 / steps as f32;
            shift_time(t, shift)
        })
        .collect()
}

/// The DDIM step grid: `steps` integer timesteps from 999 down, evenly spaced.
pub fn ddim_steps(steps: usize) -> Vec<usize> {
    (0..steps)
        .map(|i| ((DDPM_STEPS - 1) as f64 * (1.0 - i as f64 / steps as f64)).round() as usize)
        .collect()
}

/// An image to start from instead of pure noise (SDEdit; diffusers' img2img): it is noised to the time that
/// `strength` reaches on the sampler's grid, and sampling runs from there.
#[derive(Clone, Copy, Debug)]
pub struct InitImage<'a> {
    /// The image (resized to the request's size when it differs).
    pub image: &'a RgbImage,
    /// Which part of the grid is run, as diffusers' `strength`: the last `⌊steps·strength⌋` of its `steps` steps,
    /// from `x_t = (1 − t)·x_image + t·ε` at that part's first time `t`. 1 = from pure noise (the image unused);
    /// must be in (0, 1] and leave at least one step.
    pub strength: f32,
}

/// Generates one image per seed for `request` with `base`'s model (adapters `On` uses an attached LoRA).
pub fn sample(
    base: &BaseModel,
    request: &SampleRequest<'_>,
    settings: &SampleSettings,
    seeds: &[u64],
    adapters: Adapters,
) -> Result<Vec<RgbImage>, EvalError> {
    sample_from(base, request, settings, seeds, adapters, None)
}

/// The rectified-flow time grid that a run with `init` walks: the whole grid from `t = 1`, or its last
/// `⌊steps·strength⌋` steps (diffusers' `get_timesteps` of its img2img pipelines).
fn start_grid(settings: &SampleSettings, init: Option<InitImage<'_>>) -> Result<Vec<f32>, EvalError> {
    let ts = flow_time_grid(settings.steps, settings.shift);
    let Some(init) = init else {
        return Ok(ts);
    };
    if !(init.strength > 0.0 && init.strength <= 1.0) {
        return Err(EvalError::Invalid(format!(
            "img2img strength {} must be in (0, 1] (1 = from pure noise)",
            init.strength
        )));
    }
    let run = ((settings.steps as f64 * f64::from(init.strength)).floor() as usize).min(settings.steps);
    if run == 0 {
        return Err(EvalError::Invalid(format!(
            "img2img strength {} runs no step of {}: raise --strength to at least {:.3} or use more --steps",
            init.strength,
            settings.steps,
            1.0 / settings.steps as f64
        )));
    }
    Ok(ts[settings.steps - run..].to_vec())
}

/// [`sample`], optionally starting from an [`InitImage`] (rectified-flow bases only).
pub fn sample_from(
    base: &BaseModel,
    request: &SampleRequest<'_>,
    settings: &SampleSettings,
    seeds: &[u64],
    adapters: Adapters,
    init: Option<InitImage<'_>>,
) -> Result<Vec<RgbImage>, EvalError> {
    sample_observed(base, request, settings, seeds, adapters, init, None)
}

/// One step of a sampling run, decoded, as [`sample_observed`] reports it: what the model saw and what it predicted
/// (diffusers' `callback_on_step_end`, decoded for viewing).
#[derive(Clone, Debug)]
pub struct TrajectoryStep {
    /// The step's time (rectified flow: `t ∈ (0, 1]`, 1 = pure noise; DDIM: the DDPM timestep / 1000).
    pub t: f32,
    /// The model's input `x_t`, one image per seed.
    pub x_t: Vec<RgbImage>,
    /// The (guided) prediction of the clean image, `x̂₀ = x_t − t·v̂` (rectified flow) or
    /// `(x_t − √(1 − ᾱ)·ε̂) / √ᾱ` (DDIM), one image per seed.
    pub x0: Vec<RgbImage>,
}

/// [`sample_from`], calling `observe` after each step's prediction with that step decoded (a decode per seed and
/// step: for looking at a few images, not for benchmarks). The images are those of [`sample_from`] exactly.
pub fn sample_observed(
    base: &BaseModel,
    request: &SampleRequest<'_>,
    settings: &SampleSettings,
    seeds: &[u64],
    adapters: Adapters,
    init: Option<InitImage<'_>>,
    mut observe: Option<&mut dyn FnMut(TrajectoryStep)>,
) -> Result<Vec<RgbImage>, EvalError> {
    settings.validate()?;
    base.check_parameterisation(settings.parameterisation)
        .map_err(EvalError::Invalid)?;
    if init.is_some() && settings.parameterisation != Parameterisation::RectifiedFlow {
        return Err(EvalError::Invalid(
            "starting from an image (img2img) needs a rectified-flow base; this one predicts ε (DDIM)".into(),
        ));
    }
    let ts = start_grid(settings, init)?;
    if seeds.is_empty() {
        return Ok(Vec::new());
    }
    let device = base.mmdit.device().clone();
    let b = seeds.len();
    let ref_guided = settings.reference_cfg_scale != 1.0 && !request.references.is_empty();
    let guided = settings.cfg_scale != 1.0 || ref_guided;
    let cond = conditioning(base, request, settings, b, guided, &device)?;
    // The branch with neither prompt nor references.
    let bare = if ref_guided {
        let bare = SampleRequest {
            prompt: "",
            references: &[],
            size_px: request.size_px,
        };
        Some(conditioning(base, &bare, settings, b, false, &device)?)
    } else {
        None
    };
    // Autoguidance's guide, conditioned as the main model's conditional branch (its own prompt tables).
    let guide = if settings.autoguidance_scale != 1.0 {
        let g = base.guide.as_deref().ok_or_else(|| {
            EvalError::Invalid(format!(
                "autoguidance scale {} needs a guide model (`--guide FILE`: a weaker base of the same kind); \
                 1 turns autoguidance off",
                settings.autoguidance_scale
            ))
        })?;
        g.check_parameterisation(settings.parameterisation)
            .map_err(|e| EvalError::Invalid(format!("guide model: {e}")))?;
        Some((g, conditioning(g, request, settings, b, false, &device)?))
    } else {
        None
    };
    let n = cond.grid.0 * cond.grid.1;
    base.mmdit
        .check_memory(
            "sampling",
            0,
            crate::model::memory::Workload {
                with_grad: 0,
                without_grad: if guided { 2 * b } else { b } + if guide.is_some() { b } else { 0 },
                target_tokens: n,
                reference_tokens: cond
                    .refs
                    .iter()
                    .map(|(t, _)| t.dims().get(1).copied().unwrap_or(0))
                    .sum(),
                text_tokens: cond.txt.dims().get(1).copied().unwrap_or(0),
                checkpoint_blocks: false,
                on_cpu: true,
                activations: crate::model::weights::WeightDtype::F32,
            },
        )
        .map_err(|e| EvalError::Invalid(e.to_string()))?;
    let c = base.config().in_channels;
    // Each image's noise for draw `k` (0: the start; k ≥ 1: the stochastic step k) from its own seed's stream, so an
    // image does not depend on the batch it is in.
    let noise = |k: u64| -> candle_core::Result<Tensor> {
        let per_image = seeds
            .iter()
            .map(|&s| {
                Tensor::from_vec(
                    normal_vec(&mut stream_rng(s, STREAM_SAMPLE, k), n * c),
                    (1, n, c),
                    &device,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&per_image, 0)
    };
    let mut x = noise(0)?;
    if let Some(init) = init {
        let (w, h) = request.size_px;
        let resized;
        let image = if init.image.dimensions() == (w, h) {
            init.image
        } else {
            resized = image::imageops::resize(init.image, w, h, image::imageops::FilterType::Triangle);
            &resized
        };
        let x0 = base
            .codec
            .encode(image, &device)
            .map_err(|e| EvalError::Invalid(format!("the init image: {e}")))?
            .broadcast_as(x.shape())?;
        let t = f64::from(ts[0]);
        x = ((x0 * (1.0 - t))? + (x * t)?)?;
    }
    // Self-conditioning (a base with `self_condition`): every branch of a step gets the previous step's guided
    // `x̂₀`, the first step none.
    let predict = |x: &Tensor, model_t: f32, estimate: Option<&Tensor>| -> Result<Tensor, EvalError> {
        let rows = if guided { 2 * b } else { b };
        let x_in = if guided { Tensor::cat(&[x, x], 0)? } else { x.clone() };
        let estimate_in = match estimate {
            Some(e) if guided => Some(Tensor::cat(&[e, e], 0)?),
            other => other.cloned(),
        };
        let timesteps = Tensor::from_vec(vec![model_t; rows], rows, &device)?;
        let pred = forward(base, &cond, settings, &x_in, &timesteps, adapters, estimate_in.as_ref())?;
        let cond_pred = if guided { pred.narrow(0, 0, b)? } else { pred.clone() };
        let mut v = if guided {
            let uncond = pred.narrow(0, b, b)?;
            let text_guided = (&uncond + ((&cond_pred - &uncond)? * f64::from(settings.cfg_scale))?)?;
            match &bare {
                Some(bare) => {
                    let timesteps = Tensor::from_vec(vec![model_t; b], b, &device)?;
                    let none = forward(base, bare, settings, x, &timesteps, adapters, estimate)?;
                    // v(∅,∅) + s_ref·(v(∅,refs) − v(∅,∅)) + s_txt·(v(prompt,refs) − v(∅,refs))
                    //   = text_guided + (s_ref − 1)·(v(∅,refs) − v(∅,∅))
                    (text_guided + ((uncond - none)? * f64::from(settings.reference_cfg_scale - 1.0))?)?
                }
                None => text_guided,
            }
        } else {
            pred
        };
        if let Some((g, g_cond)) = &guide {
            let timesteps = Tensor::from_vec(vec![model_t; b], b, &device)?;
            // The guide is a plain base: no LoRA of the run is attached to it.
            let weak = forward(g, g_cond, settings, x, &timesteps, Adapters::Off, estimate)?;
            v = (v + ((cond_pred - weak)? * f64::from(settings.autoguidance_scale - 1.0))?)?;
        }
        Ok(v)
    };
    let decode_all = |x: &Tensor| -> Result<Vec<RgbImage>, EvalError> {
        (0..b)
            .map(|k| {
                base.codec
                    .decode(&x.narrow(0, k, 1)?, cond.grid)
                    .map_err(|e| EvalError::Invalid(e.to_string()))
            })
            .collect()
    };
    let mut report = |t: f64, x: &Tensor, x0: &Tensor| -> Result<(), EvalError> {
        if let Some(observe) = observe.as_mut() {
            observe(TrajectoryStep {
                t: t as f32,
                x_t: decode_all(x)?,
                x0: decode_all(x0)?,
            });
        }
        Ok(())
    };
    let self_conditioned = base.config().self_condition;
    let mut estimate: Option<Tensor> = None;
    match settings.parameterisation {
        Parameterisation::RectifiedFlow => {
            let eta = f64::from(settings.stochasticity);
            for (i, w) in ts.windows(2).enumerate() {
                let v = predict(&x, w[0], estimate.as_ref())?;
                let (t, next) = (f64::from(w[0]), f64::from(w[1]));
                let x0 = (&x - (&v * t)?)?;
                report(t, &x, &x0)?;
                if self_conditioned {
                    estimate = Some(x0.clone());
                }
                if eta == 0.0 || next == 0.0 {
                    // dx/dt = v = ε − x0, integrated from t = 1 (noise) to 0 (image).
                    x = (x + (v * (next - t))?)?;
                    continue;
                }
                let eps = (&x + (&v * (1.0 - t))?)?;
                let mixed = ((eps * (1.0 - eta * eta).sqrt())? + (noise(i as u64 + 1)? * eta)?)?;
                x = ((x0 * (1.0 - next))? + (mixed * next)?)?;
            }
        }
        Parameterisation::Epsilon => {
            let abar = ddpm_alphas_cumprod();
            let steps = ddim_steps(settings.steps);
            for (i, &t) in steps.iter().enumerate() {
                let mt = model_time(Parameterisation::Epsilon, &[t as f32], &device)?.to_vec1::<f32>()?[0];
                let eps = predict(&x, mt, estimate.as_ref())?;
                let a = abar[t];
                let a_prev = steps.get(i + 1).map_or(1.0, |&p| abar[p]);
                let x0 = ((&x - (&eps * (1.0 - a).sqrt())?)? / a.sqrt())?;
                report(t as f64 / 1000.0, &x, &x0)?;
                if self_conditioned {
                    estimate = Some(x0.clone());
                }
                x = ((x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?)?;
            }
        }
    }
    decode_all(&x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BaseModel, Config};

    fn tiny_base() -> BaseModel {
        base_of(&Config::micro())
    }

    /// Random weights of `cfg` (seed 3), 4 px a token.
    fn base_of(cfg: &Config) -> BaseModel {
        BaseModel::random(cfg, 4, 3, &Device::Cpu).expect("random base")
    }

    #[test]
    fn time_grids_run_from_noise_to_data() {
        let g = flow_time_grid(4, 1.0);
        assert_eq!(g, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
        // A shift of 3 keeps the end points and spends more steps at high noise (FLUX's motivation).
        let s = flow_time_grid(4, 3.0);
        assert_eq!((s[0], s[4]), (1.0, 0.0));
        assert!((s[2] - 0.75).abs() < 1e-6, "3·0.5/(1+2·0.5) = 0.75, got {}", s[2]);
        assert_eq!(ddim_steps(4), vec![999, 749, 500, 250]);
    }

    /// A 32 px request for `prompt` with `refs`.
    fn request<'a>(prompt: &'a str, refs: &'a [RgbImage]) -> SampleRequest<'a> {
        SampleRequest {
            prompt,
            references: refs,
            size_px: (32, 32),
        }
    }

    /// A 32 px reference with a colour gradient (so every token differs).
    fn gradient_reference() -> RgbImage {
        RgbImage::from_fn(32, 32, |x, y| image::Rgb([(8 * x) as u8, (8 * y) as u8, 90]))
    }

    /// The token grid of a `side`² image on `base`: (grid, tokens, channels).
    fn token_grid(base: &BaseModel, side: u32) -> Result<((usize, usize), usize, usize), EvalError> {
        let grid = base
            .codec
            .grid_for(side, side)
            .map_err(|e| EvalError::Invalid(e.to_string()))?;
        Ok((grid, grid.0 * grid.1, base.config().in_channels))
    }

    /// One Euler step from t = 1 is `x̂₀ = ε − v`: the sampler's guided `v` equals the two-condition formula
    /// computed from the three unguided branches; reference scale 1 is plain prompt guidance.
    #[test]
    fn reference_guidance_is_the_two_condition_formula() -> Result<(), EvalError> {
        let base = tiny_base();
        let refs = [gradient_reference()];
        let req = request("a red ball", &refs);
        let settings = SampleSettings {
            steps: 1,
            cfg_scale: 2.0,
            reference_cfg_scale: 3.0,
            ..SampleSettings::default()
        };
        let dev = Device::Cpu;
        let (grid, n, c) = token_grid(&base, 32)?;
        let noise = Tensor::from_vec(normal_vec(&mut stream_rng(5, STREAM_SAMPLE, 0), n * c), (1, n, c), &dev)?;
        let t = Tensor::new(&[1f32], &dev)?;
        let branch = |prompt: &str, references: &[RgbImage]| {
            let r = SampleRequest {
                prompt,
                references,
                size_px: (32, 32),
            };
            predict_conditioned(&base, &r, &settings, &noise, &t, Adapters::Off)
        };
        let (full, no_prompt, none) = (branch("a red ball", &refs)?, branch("", &refs)?, branch("", &[])?);
        let expected = |s_ref: f64| -> Result<RgbImage, EvalError> {
            let v = ((&none + ((&no_prompt - &none)? * s_ref)?)? + ((&full - &no_prompt)? * 2.0)?)?;
            base.codec
                .decode(&(&noise - v)?, grid)
                .map_err(|e| EvalError::Invalid(e.to_string()))
        };
        let close = |a: &RgbImage, b: &RgbImage| a.as_raw().iter().zip(b.as_raw()).all(|(x, y)| x.abs_diff(*y) <= 1);
        let guided = sample(&base, &req, &settings, &[5], Adapters::Off)?;
        assert!(close(&guided[0], &expected(3.0)?));
        let plain = SampleSettings {
            reference_cfg_scale: 1.0,
            ..settings
        };
        let text_only = sample(&base, &req, &plain, &[5], Adapters::Off)?;
        assert!(close(&text_only[0], &expected(1.0)?));
        assert_ne!(guided[0], text_only[0]);
        let bad = SampleSettings {
            reference_cfg_scale: -1.0,
            ..settings
        };
        assert!(sample(&base, &req, &bad, &[5], Adapters::Off).is_err());
        Ok(())
    }

    /// Self-conditioning by hand, two Euler steps: the first forward gets no estimate, the second the first's
    /// `x̂₀ = x − t·v`; leaving the estimate out of the second gives another image.
    #[test]
    fn a_self_conditioned_base_gets_the_previous_steps_estimate() -> Result<(), EvalError> {
        let cfg = Config {
            self_condition: true,
            ..Config::micro()
        };
        let base = base_of(&cfg);
        let req = request("a red ball", &[]);
        let settings = SampleSettings {
            steps: 2,
            cfg_scale: 1.0,
            ..SampleSettings::default()
        };
        let dev = Device::Cpu;
        let (grid, n, c) = token_grid(&base, 32)?;
        let noise = Tensor::from_vec(normal_vec(&mut stream_rng(5, STREAM_SAMPLE, 0), n * c), (1, n, c), &dev)?;
        let ts = flow_time_grid(2, settings.shift);
        let cond = conditioning(&base, &req, &settings, 1, false, &dev)?;
        let at = |t: f32| Tensor::from_vec(vec![t], 1, &dev);
        let v1 = forward(&base, &cond, &settings, &noise, &at(ts[0])?, Adapters::Off, None)?;
        let x0 = (&noise - (&v1 * f64::from(ts[0]))?)?;
        let x1 = (&noise + (&v1 * f64::from(ts[1] - ts[0]))?)?;
        let end = |estimate: Option<&Tensor>| -> Result<RgbImage, EvalError> {
            let v2 = forward(&base, &cond, &settings, &x1, &at(ts[1])?, Adapters::Off, estimate)?;
            let x = (&x1 + (v2 * f64::from(ts[2] - ts[1]))?)?;
            base.codec
                .decode(&x, grid)
                .map_err(|e| EvalError::Invalid(e.to_string()))
        };
        let close = |a: &RgbImage, b: &RgbImage| a.as_raw().iter().zip(b.as_raw()).all(|(x, y)| x.abs_diff(*y) <= 1);
        let got = sample(&base, &req, &settings, &[5], Adapters::Off)?;
        assert!(close(&got[0], &end(Some(&x0))?));
        assert!(!close(&got[0], &end(None)?), "the estimate changes the image");
        Ok(())
    }

    /// Autoguidance by hand: one Euler step from t = 1 with prompt CFG 2 and guide scale 3 is
    /// `v = v(∅) + 2·(v(c) − v(∅)) + (3 − 1)·(v(c) − v_guide(c))`; without CFG it is the paper's
    /// `v_guide + 3·(v − v_guide)`. A guide identical to the model changes nothing, a scale without a guide is refused
    /// naming the flag, and a guide of another token size is refused when attached.
    #[test]
    fn autoguidance_pushes_away_from_the_guide() -> Result<(), EvalError> {
        let guide = BaseModel::random(&Config::micro(), 4, 11, &Device::Cpu).expect("guide");
        let base = tiny_base()
            .with_guide(guide.clone())
            .map_err(|e| EvalError::Invalid(e.to_string()))?;
        let refs = [gradient_reference()];
        let req = request("a red ball", &refs);
        let dev = Device::Cpu;
        let (grid, n, c) = token_grid(&base, 32)?;
        let noise = Tensor::from_vec(normal_vec(&mut stream_rng(5, STREAM_SAMPLE, 0), n * c), (1, n, c), &dev)?;
        let t = Tensor::new(&[1f32], &dev)?;
        let settings = SampleSettings {
            steps: 1,
            cfg_scale: 2.0,
            autoguidance_scale: 3.0,
            ..SampleSettings::default()
        };
        let branch = |model: &BaseModel, prompt: &str| {
            let r = SampleRequest {
                prompt,
                references: &refs,
                size_px: (32, 32),
            };
            predict_conditioned(model, &r, &settings, &noise, &t, Adapters::Off)
        };
        let (full, no_prompt, weak) = (
            branch(&base, "a red ball")?,
            branch(&base, "")?,
            branch(&guide, "a red ball")?,
        );
        let image_of = |v: Tensor| -> Result<RgbImage, EvalError> {
            base.codec
                .decode(&(&noise - v)?, grid)
                .map_err(|e| EvalError::Invalid(e.to_string()))
        };
        let close = |a: &RgbImage, b: &RgbImage| a.as_raw().iter().zip(b.as_raw()).all(|(x, y)| x.abs_diff(*y) <= 1);
        let with_cfg = ((&no_prompt + ((&full - &no_prompt)? * 2.0)?)? + ((&full - &weak)? * 2.0)?)?;
        let guided = sample(&base, &req, &settings, &[5], Adapters::Off)?;
        assert!(close(&guided[0], &image_of(with_cfg)?));
        let pure = SampleSettings {
            cfg_scale: 1.0,
            ..settings
        };
        let expected = (&weak + ((&full - &weak)? * 3.0)?)?;
        let pure_images = sample(&base, &req, &pure, &[5], Adapters::Off)?;
        assert!(close(&pure_images[0], &image_of(expected)?));
        let unguided = SampleSettings {
            autoguidance_scale: 1.0,
            ..pure
        };
        assert_ne!(pure_images, sample(&base, &req, &unguided, &[5], Adapters::Off)?);
        // A guide equal to the model: v(c) − v_guide(c) = 0.
        let itself = tiny_base()
            .with_guide(tiny_base())
            .map_err(|e| EvalError::Invalid(e.to_string()))?;
        assert_eq!(
            sample(&itself, &req, &pure, &[5], Adapters::Off)?,
            sample(&itself, &req, &unguided, &[5], Adapters::Off)?
        );
        let err = sample(&tiny_base(), &req, &pure, &[5], Adapters::Off).expect_err("no guide");
        assert!(err.to_string().contains("--guide"), "{err}");
        let other_patch = BaseModel::random(&Config::micro(), 2, 3, &Device::Cpu).expect("2 px a token");
        let err = tiny_base().with_guide(other_patch).expect_err("another token size");
        assert!(err.to_string().contains("px per token"), "{err}");
        Ok(())
    }

    /// The observed run is the plain run: the same images, one report per step at the grid's times, the first input
    /// the seed's start noise, and each step's input the previous step's Euler update `x_t + (t' − t)·v̂` with
    /// `v̂ = (x_t − x̂₀) / t`; with a single step from t = 1 the image is that step's `x̂₀` exactly.
    #[test]
    fn observed_sampling_reports_every_step_of_the_same_run() -> Result<(), EvalError> {
        let base = base_of(&Config::micro());
        let refs = [gradient_reference()];
        let req = request("a red ball", &refs);
        let dev = Device::Cpu;
        for steps in [1usize, 3] {
            let settings = SampleSettings {
                steps,
                cfg_scale: 2.0,
                ..SampleSettings::default()
            };
            let mut seen = Vec::new();
            let mut keep = |s: TrajectoryStep| seen.push(s);
            let observed = sample_observed(&base, &req, &settings, &[5, 6], Adapters::Off, None, Some(&mut keep))?;
            assert_eq!(observed, sample(&base, &req, &settings, &[5, 6], Adapters::Off)?);
            let grid = flow_time_grid(steps, 1.0);
            assert_eq!(seen.iter().map(|s| s.t).collect::<Vec<_>>(), grid[..steps]);
            assert!(seen.iter().all(|s| s.x_t.len() == 2 && s.x0.len() == 2));
            let (g, n, c) = token_grid(&base, 32)?;
            let noise = Tensor::from_vec(normal_vec(&mut stream_rng(5, STREAM_SAMPLE, 0), n * c), (1, n, c), &dev)?;
            let decoded = base
                .codec
                .decode(&noise, g)
                .map_err(|e| EvalError::Invalid(e.to_string()))?;
            assert_eq!(seen[0].x_t[0], decoded);
            if steps == 1 {
                assert_eq!(seen[0].x0, observed);
            } else {
                // In pixels (8-bit, so to rounding): x_{t'} = x_t + (t' − t)·(x_t − x̂₀)/t.
                for k in 0..steps - 1 {
                    let (t, next) = (grid[k], grid[k + 1]);
                    let (x, x0, x1) = (&seen[k].x_t[1], &seen[k].x0[1], &seen[k + 1].x_t[1]);
                    let errors: Vec<f32> = (0..x.as_raw().len())
                        .filter_map(|i| {
                            let (a, p) = (f32::from(x.as_raw()[i]), f32::from(x0.as_raw()[i]));
                            let want = a + (next - t) * (a - p) / t;
                            // Pixels clipped to 0 or 255 by the decode do not follow.
                            let clipped = |v: u8| v == 0 || v == 255;
                            let skip = clipped(x.as_raw()[i]) || clipped(x0.as_raw()[i]);
                            (!skip && (0.0..=255.0).contains(&want)).then(|| (want - f32::from(x1.as_raw()[i])).abs())
                        })
                        .collect();
                    assert!(
                        errors.len() > x.as_raw().len() / 4,
                        "step {k}: {} pixels compared",
                        errors.len()
                    );
                    let worst = errors.iter().fold(0f32, |m, &e| m.max(e));
                    assert!(worst <= 2.0, "step {k}: {worst}");
                }
            }
        }
        Ok(())
    }

    /// The stochastic step by hand, over a 2-step grid (t = 1, 0.5, 0) at η = 0.6: `x' = 0.5·x̂₀ + 0.5·(0.8·ε̂ +
    /// 0.6·z)` with `z` the seed's stream at step 1, then the last step to t = 0 is the plain Euler step. η = 0 is
    /// the Euler sampler; η outside [0, 1] is an error.
    #[test]
    fn stochastic_sampling_renoises_the_prediction() -> Result<(), EvalError> {
        let base = tiny_base();
        let refs = [gradient_reference()];
        let req = request("a red ball", &refs);
        let settings = SampleSettings {
            steps: 2,
            cfg_scale: 1.0,
            stochasticity: 0.6,
            ..SampleSettings::default()
        };
        let dev = Device::Cpu;
        let (grid, n, c) = token_grid(&base, 32)?;
        let draw = |step: u64| {
            Tensor::from_vec(
                normal_vec(&mut stream_rng(5, STREAM_SAMPLE, step), n * c),
                (1, n, c),
                &dev,
            )
        };
        let v_at = |x: &Tensor, t: f32| -> Result<Tensor, EvalError> {
            predict_conditioned(&base, &req, &settings, x, &Tensor::new(&[t], &dev)?, Adapters::Off)
        };
        let x = draw(0)?;
        let v1 = v_at(&x, 1.0)?;
        let (x0, eps) = ((&x - &v1)?, x.clone());
        let x_half = ((x0 * 0.5)? + (((eps * 0.8)? + (draw(1)? * 0.6)?)? * 0.5)?)?;
        let v2 = v_at(&x_half, 0.5)?;
        let expected = base
            .codec
            .decode(&(&x_half - (v2 * 0.5)?)?, grid)
            .map_err(|e| EvalError::Invalid(e.to_string()))?;
        let got = sample(&base, &req, &settings, &[5], Adapters::Off)?;
        let diff = got[0]
            .as_raw()
            .iter()
            .zip(expected.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max();
        assert!(diff.is_some_and(|d| d <= 1), "differs by {diff:?} levels");
        let euler = sample(
            &base,
            &req,
            &SampleSettings {
                stochasticity: 0.0,
                ..settings
            },
            &[5],
            Adapters::Off,
        )?;
        assert_ne!(got[0], euler[0]);
        for bad in [-0.1, 1.5, f32::NAN] {
            let s = SampleSettings {
                stochasticity: bad,
                ..settings
            };
            assert!(sample(&base, &req, &s, &[5], Adapters::Off).is_err(), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn samples_are_deterministic_per_seed_and_independent_of_the_batch() -> Result<(), EvalError> {
        let base = tiny_base();
        let reference = RgbImage::from_pixel(32, 32, image::Rgb([200, 40, 40]));
        let refs = [reference];
        let req = request("a red ball", &refs);
        let settings = SampleSettings {
            steps: 3,
            ..SampleSettings::default()
        };
        let both = sample(&base, &req, &settings, &[7, 8], Adapters::Off)?;
        let alone = sample(&base, &req, &settings, &[8], Adapters::Off)?;
        assert_eq!(both.len(), 2);
        assert_eq!(both[0].dimensions(), (32, 32));
        // Batched matmuls may round differently from a batch of one: compare within one grey level.
        let diff = both[1]
            .as_raw()
            .iter()
            .zip(alone[0].as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max();
        assert!(diff.is_some_and(|d| d <= 1), "seed 8 differs by {diff:?} levels");
        assert_ne!(both[0], both[1], "different seeds give different images");
        let eps = sample(
            &base,
            &req,
            &SampleSettings {
                parameterisation: Parameterisation::Epsilon,
                cfg_scale: 1.0,
                ..settings
            },
            &[7],
            Adapters::Off,
        )?;
        assert_eq!(eps[0].dimensions(), (32, 32));
        Ok(())
    }

    /// A guidance-distilled base (FLUX.1-dev's `guidance_in`) samples with its guidance strength, and the
    /// strength changes the result.
    #[test]
    fn distilled_guidance_reaches_guidance_models() -> Result<(), EvalError> {
        let cfg = Config {
            guidance_embed: true,
            ..Config::micro()
        };
        let base = base_of(&cfg);
        let refs = [RgbImage::from_pixel(32, 32, image::Rgb([20, 200, 40]))];
        let req = request("a green ball", &refs);
        let at = |g: f32| {
            let settings = SampleSettings {
                steps: 2,
                cfg_scale: 1.0,
                distilled_guidance: g,
                ..SampleSettings::default()
            };
            sample(&base, &req, &settings, &[3], Adapters::Off)
        };
        assert_ne!(at(1.0)?, at(6.0)?);
        Ok(())
    }

    /// A base that predicts the clean sample samples under rectified flow (its last step lands on its `x̂₀`), and
    /// asking for DDIM on it is an error that names the fix instead of a silently wrong image.
    #[test]
    fn a_sample_predicting_base_samples_as_rectified_flow_only() -> Result<(), EvalError> {
        let cfg = Config {
            prediction: crate::model::Prediction::Sample,
            ..Config::micro()
        };
        let base = base_of(&cfg);
        let refs = [RgbImage::from_pixel(32, 32, image::Rgb([20, 200, 40]))];
        let req = request("a green ball", &refs);
        let settings = SampleSettings {
            steps: 3,
            ..SampleSettings::default()
        };
        assert_eq!(
            sample(&base, &req, &settings, &[3], Adapters::Off)?[0].dimensions(),
            (32, 32)
        );
        let ddim = SampleSettings {
            parameterisation: Parameterisation::Epsilon,
            ..settings
        };
        let err = sample(&base, &req, &ddim, &[3], Adapters::Off).expect_err("ε on an x̂₀ base");
        assert!(err.to_string().contains("rectified flow"), "{err}");
        Ok(())
    }

    /// img2img (SDEdit): strength 1 is sampling from noise exactly; a small strength runs only the last steps from
    /// the noised image and stays near it, nearer than a sample from noise; the grid is diffusers' (the last
    /// ⌊steps·strength⌋ steps); bad strengths and ε bases are errors that say what to change.
    #[test]
    fn img2img_runs_the_end_of_the_grid_from_the_noised_image() -> Result<(), EvalError> {
        let base = tiny_base();
        let refs = [gradient_reference()];
        let req = request("a ball", &refs);
        let settings = SampleSettings {
            steps: 8,
            ..SampleSettings::default()
        };
        let image = RgbImage::from_fn(32, 32, |x, y| image::Rgb([(7 * x) as u8, 60, (7 * y) as u8]));
        let init = |strength| {
            Some(InitImage {
                image: &image,
                strength,
            })
        };
        let from_noise = sample(&base, &req, &settings, &[5], Adapters::Off)?;
        assert_eq!(
            sample_from(&base, &req, &settings, &[5], Adapters::Off, init(1.0))?,
            from_noise
        );
        let near = sample_from(&base, &req, &settings, &[5], Adapters::Off, init(0.25))?;
        let mean_diff = |a: &RgbImage| {
            a.as_raw()
                .iter()
                .zip(image.as_raw())
                .map(|(p, q)| f64::from(p.abs_diff(*q)))
                .sum::<f64>()
                / a.as_raw().len() as f64
        };
        let (d_near, d_noise) = (mean_diff(&near[0]), mean_diff(&from_noise[0]));
        assert!(d_near < 0.5 * d_noise, "{d_near} vs {d_noise}");
        // A 16 px init image is resized to the request's 32 px.
        let small = image::imageops::resize(&image, 16, 16, image::imageops::FilterType::Triangle);
        let resized = InitImage {
            image: &small,
            strength: 0.25,
        };
        assert_eq!(
            sample_from(&base, &req, &settings, &[5], Adapters::Off, Some(resized))?[0].dimensions(),
            (32, 32)
        );
        // The grid: 8 steps at strength 0.25 run the last 2 (t = 0.25, 0.125 → 0); 0.3 runs ⌊2.4⌋ = 2 as well.
        assert_eq!(start_grid(&settings, init(0.25))?, vec![0.25, 0.125, 0.0]);
        assert_eq!(start_grid(&settings, init(0.3))?, vec![0.25, 0.125, 0.0]);
        for bad in [0.0, -1.0, 1.5, f32::NAN, 0.1] {
            let e = sample_from(&base, &req, &settings, &[5], Adapters::Off, init(bad)).expect_err("bad strength");
            assert!(e.to_string().contains("strength"), "{e}");
        }
        let eps = SampleSettings {
            parameterisation: Parameterisation::Epsilon,
            ..settings
        };
        let e = sample_from(&base, &req, &eps, &[5], Adapters::Off, init(0.5)).expect_err("ε base");
        assert!(e.to_string().contains("rectified-flow"), "{e}");
        Ok(())
    }

    #[test]
    fn bad_settings_and_sizes_are_errors() {
        let base = tiny_base();
        let req = SampleRequest {
            prompt: "x",
            references: &[],
            size_px: (30, 32),
        };
        assert!(sample(&base, &req, &SampleSettings::default(), &[1], Adapters::Off).is_err());
        let zero = SampleSettings {
            steps: 0,
            ..SampleSettings::default()
        };
        assert!(zero.validate().is_err());
    }

    /// A setting chosen wins; one left out is the base's recommendation, else the sampler's default; a config
    /// written with every setting (an older run's) samples as it says whatever the base recommends.
    #[test]
    fn choices_win_over_the_base_which_wins_over_the_defaults() {
        let mut base = tiny_base();
        base.sampling = SamplerChoices {
            reference_cfg_scale: Some(3.0),
            steps: Some(30),
            ..Default::default()
        };
        let d = SampleSettings::default();
        let none = SamplerChoices::default().resolve(&base);
        assert_eq!(
            (none.reference_cfg_scale, none.steps, none.cfg_scale),
            (3.0, 30, d.cfg_scale)
        );
        let some = SamplerChoices {
            steps: Some(16),
            stochasticity: Some(0.5),
            ..SamplerChoices::default()
        }
        .resolve(&base);
        assert_eq!(
            (some.steps, some.stochasticity, some.reference_cfg_scale),
            (16, 0.5, 3.0)
        );
        assert_eq!(SamplerChoices::from(d).resolve(&base), d, "every setting chosen");
        assert_eq!(
            SamplerChoices::default().resolve(&tiny_base()),
            d,
            "a base that recommends nothing"
        );

        // TOML: an older run's full `[samples.sampler]` table reads as every setting chosen; a new one writes only
        // what it chooses; a typo is refused.
        let full: SamplerChoices = toml::from_str(&toml::to_string(&d).expect("toml")).expect("full table");
        assert_eq!(full, SamplerChoices::from(d));
        let steps = toml::to_string(&SamplerChoices::steps(16)).expect("toml");
        assert_eq!(steps.trim(), "steps = 16");
        let e = toml::from_str::<SamplerChoices>("ref_cfg = 3").expect_err("unknown field");
        assert!(e.to_string().contains("ref_cfg"), "{e}");
        assert!(SamplerChoices::steps(0).validate().is_err());
    }
}
