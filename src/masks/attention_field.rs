//! Structure-Preserving Attention Field `M_s` (paper §4.2, Eq. 3–6).
//!
//! For each subject `j` with reference `x_r^j`:
//! * **Eq. 3** ([`similarity_scores`]): for every multimodal (double-stream) layer `i`, `CLS^i = pool(H_{x_r}^i)`
//!   (the mean over the reference's tokens, or over its foreground tokens: [`ReferencePool`]) and each target
//!   token's score is the similarity of `H_{x_t}^i` with `CLS^i`; the scores are averaged over the `N` layers.
//! * **Eq. 4–5** ([`top_k_indicator`]): `M'` marks the `K` highest-scoring target tokens, with `K` = the number of
//!   target tokens of that subject (`‖M_prior^j‖₁`): where the model *places* the subject.
//! * **Eq. 6** ([`attention_field`]): `M_s^j = M_prior^j \ M'^j` — subject tokens the model does not align with the
//!   reference, i.e. where it needs correcting. `M_s = ∪_j M_s^j`.
//!
//! Choices (documented in `docs/masks.md`):
//! * Eq. 3 writes `⟨CLS/|CLS|², H/|H|²⟩`. We read it as **cosine similarity** ([`Similarity::Cosine`], default),
//!   which is scale-free and comparable across layers; the literal squared-norm form is available as
//!   [`Similarity::SquaredNorm`].
//! * Eq. 3 does not say how `pool` pools. [`ReferencePool::Mean`] averages every reference token, which on a
//!   reference shot on a plain background is mostly background; [`ReferencePool::Foreground`] (default) averages
//!   only the tokens [`reference_foreground`] finds to differ from the reference's border colour. On the bundled
//!   base and dataset the mean gives A_focus ≈ 0.97 at every t — what a random top-K gives — and the foreground
//!   0.49 (t = 0.1) to 0.95 (t = 0.9) (`docs/masks.md`).
//! * Ties in the top-K are broken by the lower token index, so `M'` is deterministic.
//! * A zero vector (a dead token or an all-zero reference) has similarity 0.

use super::{Grid, MaskError, prior};

/// How Eq. 3 normalises the inner product.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Similarity {
    /// `⟨c, h⟩ / (|c|·|h|)` — cosine similarity.
    #[default]
    Cosine,
    /// `⟨c, h⟩ / (|c|²·|h|²)` — Eq. 3 as printed.
    SquaredNorm,
}

/// How Eq. 3's `CLS = pool(H_{x_r})` pools a reference's tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReferencePool {
    /// Mean over all reference tokens.
    Mean,
    /// Mean over the reference's foreground tokens ([`reference_foreground`]); all tokens when it finds none.
    #[default]
    Foreground,
}

/// A reference pixel is foreground when one of its channels differs from the border colour by more than this
/// (of 255).
pub const FOREGROUND_DELTA: u8 = 24;

/// The foreground of a reference image on its token grid: the background colour is the per-channel median of the
/// image's one-pixel border; a pixel is foreground when a channel differs from it by more than
/// [`FOREGROUND_DELTA`]; a token is foreground when at least half its pixels are (the [`prior`] pooling rule).
/// `rgb` is row-major RGB, `width × height × 3` bytes.
pub fn reference_foreground(rgb: &[u8], width: usize, height: usize, stride: usize) -> Result<Grid, MaskError> {
    if width == 0 || height == 0 || rgb.len() != width * height * 3 {
        return Err(MaskError::DataLength {
            height,
            width: width * 3,
            len: rgb.len(),
        });
    }
    let pixel = |x: usize, y: usize| &rgb[(y * width + x) * 3..(y * width + x) * 3 + 3];
    let border: Vec<&[u8]> = (0..width)
        .flat_map(|x| [(x, 0), (x, height - 1)])
        .chain((0..height).flat_map(|y| [(0, y), (width - 1, y)]))
        .map(|(x, y)| pixel(x, y))
        .collect();
    let background: Vec<u8> = (0..3)
        .map(|c| {
            let mut v: Vec<u8> = border.iter().map(|p| p[c]).collect();
            v.sort_unstable();
            v[v.len() / 2]
        })
        .collect();
    let mask: Vec<u8> = rgb
        .chunks_exact(3)
        .map(|p| {
            let far = p
                .iter()
                .zip(&background)
                .any(|(&a, &b)| a.abs_diff(b) > FOREGROUND_DELTA);
            u8::from(far)
        })
        .collect();
    prior::prior_token_mask(
        &mask,
        width,
        height,
        &prior::PriorConfig {
            stride,
            ..prior::PriorConfig::default()
        },
    )
}

/// Hidden states of one multimodal layer for one subject, row-major.
#[derive(Clone, Copy, Debug)]
pub struct LayerHidden<'a> {
    /// Target tokens `H_{x_t}`: `tokens × dim`.
    pub target: &'a [f32],
    /// This subject's reference tokens `H_{x_r}`: `ref_tokens × dim`.
    pub reference: &'a [f32],
    /// Hidden size `d`.
    pub dim: usize,
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum()
}

/// Eq. 3: per-target-token scores averaged over the given layers. All layers must share `dim` and token counts.
///
/// `pooled` selects the reference tokens averaged into `CLS` (non-zero = pooled, one entry per reference token);
/// `None`, or a selection with no token, pools them all.
pub fn similarity_scores(
    layers: &[LayerHidden<'_>],
    mode: Similarity,
    pooled: Option<&[f32]>,
) -> Result<Vec<f32>, MaskError> {
    let first = layers
        .first()
        .ok_or(MaskError::NoMasks("similarity_scores (no layer)"))?;
    let dim = first.dim;
    if dim == 0 || first.target.len() % dim != 0 {
        return Err(MaskError::DataLength {
            height: first.target.len() / dim.max(1),
            width: dim,
            len: first.target.len(),
        });
    }
    let tokens = first.target.len() / dim;
    let mut scores = vec![0.0f64; tokens];
    for layer in layers {
        let ref_ok = layer.reference.len() % dim == 0 && !layer.reference.is_empty();
        if layer.dim != dim || layer.target.len() != tokens * dim || !ref_ok {
            return Err(MaskError::ShapeMismatch {
                expected: (tokens, dim),
                found: (layer.target.len() / layer.dim.max(1), layer.dim),
            });
        }
        let ref_tokens = layer.reference.len() / dim;
        let selection = match pooled {
            Some(sel) if sel.len() != ref_tokens => {
                return Err(MaskError::ShapeMismatch {
                    expected: (ref_tokens, 1),
                    found: (sel.len(), 1),
                });
            }
            Some(sel) if sel.iter().any(|&w| w != 0.0) => Some(sel),
            _ => None,
        };
        // CLS = mean of the pooled reference tokens.
        let mut cls = vec![0.0f64; dim];
        let mut count = 0usize;
        for (k, row) in layer.reference.chunks_exact(dim).enumerate() {
            if selection.is_some_and(|sel| sel[k] == 0.0) {
                continue;
            }
            count += 1;
            for (c, &v) in cls.iter_mut().zip(row) {
                *c += f64::from(v);
            }
        }
        let cls: Vec<f32> = cls.iter().map(|c| (c / count as f64) as f32).collect();
        let cls_norm = dot(&cls, &cls).sqrt();
        for (score, h) in scores.iter_mut().zip(layer.target.chunks_exact(dim)) {
            let h_norm = dot(h, h).sqrt();
            let denom = match mode {
                Similarity::Cosine => cls_norm * h_norm,
                Similarity::SquaredNorm => cls_norm * cls_norm * h_norm * h_norm,
            };
            if denom > 0.0 {
                *score += dot(&cls, h) / denom;
            }
        }
    }
    let n = layers.len() as f64;
    Ok(scores.iter().map(|s| (s / n) as f32).collect())
}

/// Eq. 4–5: `M'` with ones at the `k` highest scores (ties → lower index), as a grid of the prior's shape.
pub fn top_k_indicator(scores: &[f32], k: usize, height: usize, width: usize) -> Result<Grid, MaskError> {
    if scores.len() != height * width {
        return Err(MaskError::DataLength {
            height,
            width,
            len: scores.len(),
        });
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // NaN scores sort last so they are never selected before a real score.
    order.sort_by(|&a, &b| {
        let (x, y) = (scores[a], scores[b]);
        y.partial_cmp(&x)
            .unwrap_or_else(|| x.is_nan().cmp(&y.is_nan()))
            .then(a.cmp(&b))
    });
    let mut m = vec![0.0f32; scores.len()];
    for &i in order.iter().take(k) {
        m[i] = 1.0;
    }
    Grid::new(height, width, m)
}

/// Eq. 4–6 for all subjects: `M_s = ∪_j (M_prior^j \ top-K_j(S^j))`, `K_j = ‖M_prior^j‖₁`.
///
/// `scores[j]` are subject `j`'s Eq. 3 scores over the target tokens (row-major, the priors' shape).
pub fn attention_field(scores: &[Vec<f32>], subject_priors: &[Grid]) -> Result<Grid, MaskError> {
    if scores.len() != subject_priors.len() {
        return Err(MaskError::ShapeMismatch {
            expected: (subject_priors.len(), 1),
            found: (scores.len(), 1),
        });
    }
    let fields = scores
        .iter()
        .zip(subject_priors)
        .map(|(s, p)| {
            let k = p.l1_norm().round() as usize;
            let placed = top_k_indicator(s, k, p.height(), p.width())?;
            p.zip_with(
                &placed,
                |inside, chosen| if inside > 0.0 && chosen == 0.0 { 1.0 } else { 0.0 },
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    prior::union(&fields)
}

crate::config_enum!(Similarity, [Similarity::Cosine, Similarity::SquaredNorm]);
crate::config_enum!(ReferencePool, [ReferencePool::Mean, ReferencePool::Foreground]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_scores_hand_computed() {
        // dim 2, 3 target tokens, reference of 2 tokens whose mean is CLS = (1, 0).
        let reference = [1.0, 1.0, 1.0, -1.0];
        let target = [2.0, 0.0, 0.0, 3.0, 1.0, 1.0];
        let layer = LayerHidden {
            target: &target,
            reference: &reference,
            dim: 2,
        };
        let s = similarity_scores(&[layer], Similarity::Cosine, None).unwrap();
        let want = [1.0, 0.0, std::f32::consts::FRAC_1_SQRT_2];
        for (a, b) in s.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{s:?}");
        }
        // Literal Eq. 3: ⟨c,h⟩/(|c|²|h|²): token 0 → 2/(1·4) = 0.5; token 2 → 1/(1·2) = 0.5.
        let lit = similarity_scores(&[layer], Similarity::SquaredNorm, None).unwrap();
        for (a, b) in lit.iter().zip([0.5, 0.0, 0.5]) {
            assert!((a - b).abs() < 1e-6, "{lit:?}");
        }
    }

    #[test]
    fn scores_average_over_layers() {
        let reference = [1.0, 0.0];
        let t1 = [1.0, 0.0, 0.0, 1.0];
        let t2 = [0.0, 1.0, 0.0, 1.0];
        let layers = [
            LayerHidden {
                target: &t1,
                reference: &reference,
                dim: 2,
            },
            LayerHidden {
                target: &t2,
                reference: &reference,
                dim: 2,
            },
        ];
        assert_eq!(
            similarity_scores(&layers, Similarity::Cosine, None).unwrap(),
            [0.5, 0.0]
        );
    }

    #[test]
    fn zero_vectors_score_zero_and_bad_shapes_error() {
        let s = similarity_scores(
            &[LayerHidden {
                target: &[0.0, 0.0],
                reference: &[1.0, 0.0],
                dim: 2,
            }],
            Similarity::Cosine,
            None,
        )
        .unwrap();
        assert_eq!(s, [0.0]);
        assert!(similarity_scores(&[], Similarity::Cosine, None).is_err());
        let bad = [
            LayerHidden {
                target: &[1.0, 0.0],
                reference: &[1.0, 0.0],
                dim: 2,
            },
            LayerHidden {
                target: &[1.0, 0.0, 1.0, 0.0],
                reference: &[1.0, 0.0],
                dim: 2,
            },
        ];
        assert!(matches!(
            similarity_scores(&bad, Similarity::Cosine, None),
            Err(MaskError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn foreground_pooling_hand_computed() {
        // Reference of 3 tokens: two background (0, 1), one subject (1, 0). Mean CLS = (1/3, 2/3); foreground
        // CLS = (1, 0). Target tokens (1, 0) and (0, 1).
        let reference = [0.0, 1.0, 0.0, 1.0, 1.0, 0.0];
        let target = [1.0, 0.0, 0.0, 1.0];
        let layer = LayerHidden {
            target: &target,
            reference: &reference,
            dim: 2,
        };
        let norm = (1.0f32 / 9.0 + 4.0 / 9.0).sqrt();
        let mean = similarity_scores(&[layer], Similarity::Cosine, None).unwrap();
        assert!((mean[0] - (1.0 / 3.0) / norm).abs() < 1e-6 && (mean[1] - (2.0 / 3.0) / norm).abs() < 1e-6);
        let fg = similarity_scores(&[layer], Similarity::Cosine, Some(&[0.0, 0.0, 1.0])).unwrap();
        assert_eq!(fg, [1.0, 0.0]);
        // An empty selection pools every token; a selection of the wrong length is an error.
        assert_eq!(
            similarity_scores(&[layer], Similarity::Cosine, Some(&[0.0; 3])).unwrap(),
            mean
        );
        assert!(similarity_scores(&[layer], Similarity::Cosine, Some(&[1.0; 2])).is_err());
    }

    #[test]
    fn reference_foreground_finds_the_subject_against_the_border_colour() {
        // 4×4 grey image (stride 2 → 2×2 tokens) with a red 2×2 block in the top-left token and one stray
        // slightly-off pixel (within FOREGROUND_DELTA) in the bottom-right token.
        let mut rgb = vec![200u8; 4 * 4 * 3];
        for (x, y) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            rgb[(y * 4 + x) * 3..(y * 4 + x) * 3 + 3].copy_from_slice(&[220, 10, 10]);
        }
        rgb[(3 * 4 + 3) * 3] = 200 + FOREGROUND_DELTA;
        let fg = reference_foreground(&rgb, 4, 4, 2).unwrap();
        assert_eq!(fg.as_slice(), &[1.0, 0.0, 0.0, 0.0]);
        // A token half covered by the subject counts (the prior's ≥ 50 % rule).
        rgb[(2 * 4 + 2) * 3..(2 * 4 + 2) * 3 + 3].copy_from_slice(&[0, 0, 0]);
        rgb[(2 * 4 + 3) * 3..(2 * 4 + 3) * 3 + 3].copy_from_slice(&[0, 0, 0]);
        assert_eq!(
            reference_foreground(&rgb, 4, 4, 2).unwrap().as_slice(),
            &[1.0, 0.0, 0.0, 1.0]
        );
        assert!(reference_foreground(&rgb[..10], 4, 4, 2).is_err());
        assert!(reference_foreground(&[], 0, 0, 2).is_err());
    }

    #[test]
    fn top_k_breaks_ties_by_index_and_ignores_nan() {
        let m = top_k_indicator(&[0.5, 0.9, 0.5, f32::NAN], 2, 2, 2).unwrap();
        assert_eq!(m.as_slice(), &[1.0, 1.0, 0.0, 0.0]);
        assert_eq!(top_k_indicator(&[0.1, 0.2], 0, 1, 2).unwrap().as_slice(), &[0.0, 0.0]);
        assert!(top_k_indicator(&[0.1], 1, 1, 2).is_err());
    }

    #[test]
    fn eq6_hand_computed_two_subjects() {
        // 1×4 grid. Subject 0 occupies tokens {0, 1} (K = 2), subject 1 token {3} (K = 1).
        let p0 = Grid::new(1, 4, vec![1.0, 1.0, 0.0, 0.0]).unwrap();
        let p1 = Grid::new(1, 4, vec![0.0, 0.0, 0.0, 1.0]).unwrap();
        // Subject 0's top-2 are tokens 1 and 2 → token 0 is in the subject but not placed: M_s^0 = {0}.
        let s0 = vec![0.1, 0.9, 0.8, 0.2];
        // Subject 1's top-1 is token 3 → perfectly placed: M_s^1 = ∅.
        let s1 = vec![0.0, 0.1, 0.2, 0.7];
        let ms = attention_field(&[s0, s1], &[p0.clone(), p1.clone()]).unwrap();
        assert_eq!(ms.as_slice(), &[1.0, 0.0, 0.0, 0.0]);
        // A_focus = 1/3 against the union prior.
        let union = prior::union(&[p0, p1]).unwrap();
        assert!((crate::masks::focus_coverage(&ms, &union).unwrap() - 1.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn perfect_alignment_gives_empty_field_and_misplacement_gives_full() {
        let p = Grid::new(1, 3, vec![0.0, 1.0, 1.0]).unwrap();
        let aligned = attention_field(&[vec![0.0, 0.5, 0.6]], std::slice::from_ref(&p)).unwrap();
        assert_eq!(aligned.l1_norm(), 0.0);
        let misplaced = attention_field(&[vec![0.9, 0.1, 0.95]], std::slice::from_ref(&p)).unwrap();
        assert_eq!(misplaced.as_slice(), &[0.0, 1.0, 0.0]);
        assert!(attention_field(&[], std::slice::from_ref(&p)).is_err());
    }
}
