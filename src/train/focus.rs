//! The FocusDPO weight map of one step (Alg. 1, `COMPUTEMASKS`): `M_s` from the backbone's hidden states
//! (Eq. 3–6), fused with `M_prior` and `M_d` (Eq. 9 / 11 / variants). The math lives in [`crate::masks`]; this
//! module only moves hidden states out of tensors.

use candle_core::Tensor;

use crate::masks::{
    FusionOutput, FusionParams, Grid, LayerHidden, MaskError, MaskInputs, ReferencePool, attention_field, fuse,
    similarity_scores,
};
use crate::model::BlockHidden;

use super::config::AttentionConfig;
use super::data::PreparedItem;

/// Errors computing the map.
#[derive(Debug, thiserror::Error)]
pub enum FocusError {
    /// Mask math.
    #[error(transparent)]
    Mask(#[from] MaskError),
    /// Tensor access.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// Inconsistent inputs.
    #[error("{0}")]
    Inputs(String),
    /// The forward would not fit in memory.
    #[error(transparent)]
    Memory(#[from] crate::model::memory::DoesNotFit),
}

/// The maps of one step.
#[derive(Debug, Clone)]
pub struct StepMasks {
    /// `M_s` (when hidden states were available).
    pub m_s: Option<Grid>,
    /// Eq. 3 scores per subject (row-major over the target tokens).
    pub scores: Vec<Vec<f32>>,
    /// The fused map and `A_focus` / branch.
    pub fused: FusionOutput,
}

fn rows(t: &Tensor, batch_index: usize) -> candle_core::Result<(Vec<f32>, usize)> {
    let x = t.get(batch_index)?.to_dtype(candle_core::DType::F32)?;
    let dim = x.dim(1)?;
    Ok((x.flatten_all()?.to_vec1::<f32>()?, dim))
}

/// Eq. 3 scores for each of `item`'s subjects from the captured double-block states of batch element
/// `batch_index`, averaged over `cfg.layers` (all blocks when empty), `CLS` pooled as `cfg.pool` says.
pub fn subject_scores(
    hidden: &[BlockHidden],
    batch_index: usize,
    item: &PreparedItem,
    cfg: &AttentionConfig,
) -> Result<Vec<Vec<f32>>, FocusError> {
    let layers: Vec<&BlockHidden> = if cfg.layers.is_empty() {
        hidden.iter().collect()
    } else {
        cfg.layers
            .iter()
            .map(|&i| {
                hidden.get(i).ok_or_else(|| {
                    FocusError::Inputs(format!(
                        "masks.attention.layers names block {i}, the model has {} double-stream blocks",
                        hidden.len()
                    ))
                })
            })
            .collect::<Result<_, _>>()?
    };
    if layers.is_empty() {
        return Err(FocusError::Inputs("no hidden states were captured".into()));
    }
    let targets = layers
        .iter()
        .map(|h| rows(&h.target, batch_index))
        .collect::<candle_core::Result<Vec<_>>>()?;
    item.references
        .iter()
        .enumerate()
        .map(|(j, reference)| {
            let refs = layers
                .iter()
                .map(|h| {
                    let r = h.references.get(j).ok_or_else(|| {
                        FocusError::Inputs(format!("subject {j} has no reference in the hidden states"))
                    })?;
                    Ok(rows(r, batch_index)?)
                })
                .collect::<Result<Vec<_>, FocusError>>()?;
            let per_layer: Vec<LayerHidden<'_>> = targets
                .iter()
                .zip(&refs)
                .map(|((t, dim), (r, _))| LayerHidden {
                    target: t,
                    reference: r,
                    dim: *dim,
                })
                .collect();
            let pooled = match cfg.pool {
                ReferencePool::Mean => None,
                ReferencePool::Foreground => Some(reference.foreground.as_slice()),
            };
            Ok(similarity_scores(&per_layer, cfg.similarity, pooled)?)
        })
        .collect()
}

/// `M_s` (when `hidden` is given and the variant or the logging needs it) and the fused map for `item`.
pub fn step_masks(
    item: &PreparedItem,
    hidden: Option<(&[BlockHidden], usize)>,
    attention: &AttentionConfig,
    fusion: &FusionParams,
) -> Result<StepMasks, FocusError> {
    let (m_s, scores) = match hidden {
        Some((h, b)) => {
            let scores = subject_scores(h, b, item, attention)?;
            let m_s = attention_field(&scores, &item.masks.subject_priors)?;
            (Some(m_s), scores)
        }
        None => (None, Vec::new()),
    };
    let fused = fuse(
        fusion,
        &MaskInputs {
            m_prior: &item.masks.m_prior,
            m_d: &item.masks.m_d,
            m_s: m_s.as_ref(),
        },
    )?;
    Ok(StepMasks { m_s, scores, fused })
}

/// Where and how [`masks_at`] looks at an item.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    /// Schedule fraction `t` ∈ [0, 1].
    pub t: f32,
    /// Noise schedule.
    pub parameterisation: crate::model::schedule::Parameterisation,
    /// Seed of `ε`.
    pub noise_seed: u64,
    /// Adapters on (a run's policy) or off (the base).
    pub adapters: crate::model::Adapters,
}

/// The maps an inspector shows for `item` at `probe.t`: the winner is noised with a seeded `ε`, one forward pass
/// of `model` captures the hidden states, and `M_s` / `M` follow as in training.
pub fn masks_at(
    model: &crate::model::Mmdit,
    item: &PreparedItem,
    probe: Probe,
    attention: &AttentionConfig,
    fusion: &FusionParams,
) -> Result<StepMasks, FocusError> {
    use crate::model::schedule::{add_noise, model_time, schedule_time};
    let device = item.x0_w.device();
    let mut rng = crate::rng::stream_rng(probe.noise_seed, 0, 0);
    let eps = Tensor::from_vec(
        crate::rng::normal_vec(&mut rng, item.x0_w.elem_count()),
        item.x0_w.dims(),
        device,
    )?;
    let t_sched = schedule_time(probe.parameterisation, probe.t);
    let noised = add_noise(probe.parameterisation, &item.x0_w, &eps, &[t_sched])?;
    let timesteps = model_time(probe.parameterisation, &[t_sched], device)?;
    model.check_memory("the M_s forward", 0, item.workload(0, 1, false))?;
    let out = item.forward(
        model,
        &noised.x_t,
        &timesteps,
        crate::model::ForwardOptions {
            capture_hidden: true,
            adapters: probe.adapters,
            ..Default::default()
        },
    )?;
    step_masks(item, Some((&out.hidden, 0)), attention, fusion)
}
