//! Metrics: embedding similarity, identity verification (AUC, EER, FMR100, FMR1000, FDR), set distances (Fréchet
//! distance, CMMD), pixel fidelity against the synthetic ground truth, and training stability / convergence.
//!
//! All functions are pure (no I/O) and take plain slices, so every formula is tested on hand-computed cases.

use nalgebra::{DMatrix, DVector, SymmetricEigen};
use serde::{Deserialize, Serialize};

use super::EvalError;

/// Cosine similarity of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na <= 1e-12 || nb <= 1e-12 {
        0.0
    } else {
        dot / (na * nb)
    }
}

/// Area under the ROC curve of genuine (should score high) vs impostor scores: the probability that a random
/// genuine score exceeds a random impostor score, ties counting ½ (Mann–Whitney U / (n_g·n_i)).
pub fn roc_auc(genuine: &[f32], impostor: &[f32]) -> Option<f64> {
    if genuine.is_empty() || impostor.is_empty() {
        return None;
    }
    let mut all: Vec<(f32, bool)> = genuine
        .iter()
        .map(|&s| (s, true))
        .chain(impostor.iter().map(|&s| (s, false)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Rank sum of the genuine scores with average ranks for ties.
    let mut rank_sum = 0f64;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += avg_rank * all[i..=j].iter().filter(|p| p.1).count() as f64;
        i = j + 1;
    }
    let (ng, ni) = (genuine.len() as f64, impostor.len() as f64);
    Some((rank_sum - ng * (ng + 1.0) / 2.0) / (ng * ni))
}

/// Identity-verification summary of genuine vs impostor similarity scores.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    /// ROC AUC.
    pub auc: f64,
    /// Equal error rate: where the false-match rate equals the false-non-match rate.
    pub eer: f64,
    /// FNMR at FMR ≤ 1 % (FMR100).
    pub fmr100: f64,
    /// FNMR at FMR ≤ 0.1 % (FMR1000).
    pub fmr1000: f64,
    /// Fisher discriminant ratio `(μ_g − μ_i)² / (σ_g² + σ_i²)`.
    pub fdr: f64,
}

/// Rates at threshold `th` (accept when score ≥ th): (FMR, FNMR).
fn rates(genuine: &[f32], impostor: &[f32], th: f32) -> (f64, f64) {
    let fmr = impostor.iter().filter(|&&s| s >= th).count() as f64 / impostor.len() as f64;
    let fnmr = genuine.iter().filter(|&&s| s < th).count() as f64 / genuine.len() as f64;
    (fmr, fnmr)
}

fn mean_var(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n;
    (mean, var)
}

/// EER, FNMR at FMR ≤ 1 % and ≤ 0.1 %, FDR and AUC. Thresholds are scanned over every observed score (plus +∞),
/// so the rates are exact for the given sets; the EER is the mean of FMR and FNMR where they are closest.
pub fn verification(genuine: &[f32], impostor: &[f32]) -> Result<Verification, EvalError> {
    let auc = roc_auc(genuine, impostor)
        .ok_or_else(|| EvalError::Invalid("verification needs genuine and impostor scores".into()))?;
    let mut thresholds: Vec<f32> = genuine
        .iter()
        .chain(impostor)
        .copied()
        .filter(|s| s.is_finite())
        .collect();
    thresholds.push(f32::INFINITY);
    thresholds.sort_by(f32::total_cmp);
    thresholds.dedup();
    let mut eer = (f64::INFINITY, 1.0);
    let (mut fmr100, mut fmr1000) = (1.0f64, 1.0f64);
    for &th in &thresholds {
        let (fmr, fnmr) = rates(genuine, impostor, th);
        let gap = (fmr - fnmr).abs();
        if gap < eer.0 {
            eer = (gap, (fmr + fnmr) / 2.0);
        }
        if fmr <= 0.01 {
            fmr100 = fmr100.min(fnmr);
        }
        if fmr <= 0.001 {
            fmr1000 = fmr1000.min(fnmr);
        }
    }
    let (mg, vg) = mean_var(genuine);
    let (mi, vi) = mean_var(impostor);
    let fdr = if vg + vi > 0.0 {
        (mg - mi).powi(2) / (vg + vi)
    } else {
        f64::INFINITY
    };
    Ok(Verification {
        auc,
        eer: eer.1,
        fmr100,
        fmr1000,
        fdr,
    })
}

fn matrix(set: &[Vec<f32>], what: &str) -> Result<DMatrix<f64>, EvalError> {
    let d = set.first().map_or(0, Vec::len);
    if set.len() < 2 || d == 0 || set.iter().any(|v| v.len() != d) {
        return Err(EvalError::Invalid(format!(
            "{what}: need at least 2 embeddings of one dimension (got {} of {:?})",
            set.len(),
            set.iter().map(Vec::len).collect::<std::collections::BTreeSet<_>>()
        )));
    }
    Ok(DMatrix::from_fn(set.len(), d, |i, j| f64::from(set[i][j])))
}

fn mean_cov(x: &DMatrix<f64>) -> (DVector<f64>, DMatrix<f64>) {
    let n = x.nrows() as f64;
    let mean = x.row_mean().transpose();
    let mut centred = x.clone();
    for mut row in centred.row_iter_mut() {
        row -= mean.transpose();
    }
    let cov = centred.transpose() * &centred / (n - 1.0);
    (mean, cov)
}

/// Symmetric PSD square root by eigendecomposition (negative round-off eigenvalues clamped to 0).
fn sqrtm_psd(m: &DMatrix<f64>) -> DMatrix<f64> {
    let eig = SymmetricEigen::new(m.clone());
    let vals = eig.eigenvalues.map(|v| v.max(0.0).sqrt());
    &eig.eigenvectors * DMatrix::from_diagonal(&vals) * eig.eigenvectors.transpose()
}

/// Fréchet distance between Gaussians fitted to two embedding sets (FID's formula):
/// `‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½)`. Name the embedder with the number (FD_DINO, FD_identity).
pub fn frechet_distance(a: &[Vec<f32>], b: &[Vec<f32>]) -> Result<f64, EvalError> {
    let (xa, xb) = (
        matrix(a, "Fréchet distance, set 1")?,
        matrix(b, "Fréchet distance, set 2")?,
    );
    if xa.ncols() != xb.ncols() {
        return Err(EvalError::Invalid(format!(
            "Fréchet distance: dimensions differ ({} vs {})",
            xa.ncols(),
            xb.ncols()
        )));
    }
    let (ma, ca) = mean_cov(&xa);
    let (mb, cb) = mean_cov(&xb);
    let s = sqrtm_psd(&ca);
    let inner = &s * &cb * &s;
    let inner = (&inner + inner.transpose()) * 0.5;
    let tr_sqrt: f64 = SymmetricEigen::new(inner)
        .eigenvalues
        .iter()
        .map(|v| v.max(0.0).sqrt())
        .sum();
    Ok((ma - mb).norm_squared() + ca.trace() + cb.trace() - 2.0 * tr_sqrt)
}

/// Bandwidth σ of the CMMD kernel (Jayasumana et al. 2024).
pub const CMMD_SIGMA: f64 = 10.0;
/// Scale of the reported CMMD (the paper reports MMD² × 1000).
pub const CMMD_SCALE: f64 = 1000.0;

/// CMMD: the unbiased MMD² between two embedding sets with the Gaussian kernel `exp(−‖x − y‖² / (2σ²))`,
/// σ = [`CMMD_SIGMA`], reported × [`CMMD_SCALE`] as in the CMMD paper (which uses CLIP embeddings; name the
/// embedder used).
pub fn cmmd(a: &[Vec<f32>], b: &[Vec<f32>]) -> Result<f64, EvalError> {
    let (xa, xb) = (matrix(a, "CMMD, set 1")?, matrix(b, "CMMD, set 2")?);
    if xa.ncols() != xb.ncols() {
        return Err(EvalError::Invalid("CMMD: embedding dimensions differ".into()));
    }
    let gamma = 1.0 / (2.0 * CMMD_SIGMA * CMMD_SIGMA);
    let k = |u: &[f32], v: &[f32]| {
        let d2: f64 = u.iter().zip(v).map(|(p, q)| f64::from(p - q).powi(2)).sum();
        (-gamma * d2).exp()
    };
    let within = |s: &[Vec<f32>]| {
        let n = s.len() as f64;
        let mut sum = 0.0;
        for i in 0..s.len() {
            for j in 0..s.len() {
                if i != j {
                    sum += k(&s[i], &s[j]);
                }
            }
        }
        sum / (n * (n - 1.0))
    };
    let mut cross = 0.0;
    for u in a {
        for v in b {
            cross += k(u, v);
        }
    }
    cross /= (a.len() * b.len()) as f64;
    Ok((within(a) + within(b) - 2.0 * cross) * CMMD_SCALE)
}

/// Peak signal-to-noise ratio (dB) between two same-size RGB images, optionally inside a mask (pixels ≥ 128).
/// `None` when sizes differ or the mask is empty; `+∞` for identical images.
pub fn psnr(a: &image::RgbImage, b: &image::RgbImage, mask: Option<&image::GrayImage>) -> Option<f64> {
    if a.dimensions() != b.dimensions() || mask.is_some_and(|m| m.dimensions() != a.dimensions()) {
        return None;
    }
    let (mut se, mut n) = (0f64, 0usize);
    for (x, y, pa) in a.enumerate_pixels() {
        if mask.is_some_and(|m| m.get_pixel(x, y).0[0] < 128) {
            continue;
        }
        let pb = b.get_pixel(x, y);
        for c in 0..3 {
            se += (f64::from(pa.0[c]) - f64::from(pb.0[c])).powi(2);
        }
        n += 3;
    }
    if n == 0 {
        return None;
    }
    let mse = se / n as f64;
    Some(if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    })
}

/// Training stability of a run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stability {
    /// Standard deviation of the loss over the last `window` steps.
    pub loss_std: f64,
    /// Steps whose gradient norm exceeds `spike_factor` × the median of the preceding `window` steps.
    pub grad_spikes: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Loss standard deviation over the last `window` steps and the number of gradient-norm spikes (a step whose norm
/// is above `spike_factor` × the median norm of the `window` steps before it).
pub fn stability(losses: &[f64], grad_norms: &[f64], window: usize, spike_factor: f64) -> Stability {
    let w = window.max(1);
    let tail = &losses[losses.len().saturating_sub(w)..];
    let loss_std = if tail.len() < 2 {
        0.0
    } else {
        let m = tail.iter().sum::<f64>() / tail.len() as f64;
        (tail.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (tail.len() - 1) as f64).sqrt()
    };
    let grad_spikes = (w..grad_norms.len())
        .filter(|&i| grad_norms[i] > spike_factor * median(grad_norms[i - w..i].to_vec()))
        .count();
    Stability { loss_std, grad_spikes }
}

/// Convergence speed: the first step (1-based index into `values`) at which the trailing moving average (over
/// `window` steps) reaches `fraction` of its final value (the average of the last `window` steps). `None` when it
/// never does, when `values` is empty, or when the final value is not positive (an accuracy that stays at 0 has
/// nothing to converge to; "step 1" would read as instant convergence).
pub fn steps_to_fraction(values: &[f64], window: usize, fraction: f64) -> Option<usize> {
    let w = window.max(1).min(values.len().max(1));
    if values.is_empty() {
        return None;
    }
    let final_value = values[values.len() - w..].iter().sum::<f64>() / w as f64;
    if final_value.is_nan() || final_value <= 0.0 {
        return None;
    }
    let target = fraction * final_value;
    let mut sum = 0.0;
    for (i, v) in values.iter().enumerate() {
        sum += v;
        if i >= w {
            sum -= values[i - w];
        }
        let avg = sum / (i + 1).min(w) as f64;
        if avg >= target {
            return Some(i + 1);
        }
    }
    None
}

/// Rank-1 (top-1) identification accuracy: each probe `(its scores against the gallery, its true gallery index)` is
/// assigned the gallery entry of highest score (`f32::NEG_INFINITY` for an entry the probe may not be identified
/// as); the fraction assigned correctly. A tie with the true entry counts as a miss unless the true entry comes
/// first (the first maximum wins), so a constant embedder cannot score above chance. `None` without probes or
/// gallery, or when a probe's index is outside the gallery.
pub fn top1_identification(rows: &[(Vec<f32>, usize)]) -> Option<f64> {
    if rows.is_empty() || rows.iter().any(|(s, truth)| *truth >= s.len()) {
        return None;
    }
    let hits = rows
        .iter()
        .filter(|(scores, truth)| {
            let mut best = (0usize, f32::NEG_INFINITY);
            for (k, &s) in scores.iter().enumerate() {
                if s > best.1 {
                    best = (k, s);
                }
            }
            best.0 == *truth
        })
        .count();
    Some(hits as f64 / rows.len() as f64)
}

/// TensorBoard's curve smoothing: the exponential moving average `s_i = w·s_{i−1} + (1 − w)·y_i` from `s_0 = 0`,
/// divided by `1 − w^i` so the first points are not pulled towards zero. `points` are `[x, y]`; non-finite `y`
/// are skipped (the average goes on from the last finite one); `w` is clamped to [0, 0.999].
pub fn debiased_ema(points: &[[f64; 2]], weight: f64) -> Vec<[f64; 2]> {
    let w = if weight.is_finite() {
        weight.clamp(0.0, 0.999)
    } else {
        0.0
    };
    let mut last = 0.0;
    let mut n = 0i32;
    points
        .iter()
        .filter(|p| p[1].is_finite())
        .map(|&[x, y]| {
            last = w * last + (1.0 - w) * y;
            n += 1;
            let debias = 1.0 - w.powi(n);
            [x, if debias > 0.0 { last / debias } else { y }]
        })
        .collect()
}

/// The temperature of the built-in identity classifier behind [`identity_inception_score`]: cosine similarities
/// (in [-1, 1]) divided by it are the logits.
pub const IDENTITY_CLASSIFIER_TEMPERATURE: f64 = 0.1;

/// An Inception-style score over identity classes: `exp(E_x KL(p(y|x) ‖ p(y)))`, where `p(y|x)` is the built-in
/// identity classifier's softmax over the gallery identities (each probe's row of scores, cosine similarities,
/// divided by `temperature`; `f32::NEG_INFINITY` = class excluded for that probe; the true index is not used) and
/// `p(y)` its mean over the probes. 1 when every probe gets the same distribution; up to the number of classes when
/// each probe is confidently one class and the classes are used evenly (recognisable and diverse). `None` without
/// probes or gallery, or for a temperature that is not positive.
pub fn identity_inception_score(rows: &[(Vec<f32>, usize)], temperature: f64) -> Option<f64> {
    let k = rows.first()?.0.len();
    if k == 0 || rows.iter().any(|(s, _)| s.len() != k) || temperature.is_nan() || temperature <= 0.0 {
        return None;
    }
    let conditionals: Vec<Vec<f64>> = rows
        .iter()
        .map(|(scores, _)| {
            let logits: Vec<f64> = scores.iter().map(|&s| f64::from(s) / temperature).collect();
            let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let exp: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let sum: f64 = exp.iter().sum();
            exp.iter().map(|x| x / sum).collect()
        })
        .collect();
    let marginal: Vec<f64> = (0..k)
        .map(|j| conditionals.iter().map(|p| p[j]).sum::<f64>() / conditionals.len() as f64)
        .collect();
    let kl: f64 = conditionals
        .iter()
        .map(|p| {
            p.iter()
                .zip(&marginal)
                .filter(|(pj, _)| **pj > 0.0)
                .map(|(pj, mj)| pj * (pj / mj).ln())
                .sum::<f64>()
        })
        .sum::<f64>()
        / conditionals.len() as f64;
    Some(kl.exp())
}

/// Mean and half-width of the 95 % confidence interval of the mean (Student t, n − 1 degrees of freedom); the
/// half-width is NaN for fewer than two values.
pub fn mean_ci95(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let sd = (values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    (mean, t975((n - 1) as f64) * sd / (n as f64).sqrt())
}

/// The two-sided 95 % quantile of Student's t with `df` (fractional) degrees of freedom (statrs).
pub fn t975(df: f64) -> f64 {
    use statrs::distribution::{ContinuousCDF, StudentsT};
    StudentsT::new(0.0, 1.0, df).map_or(f64::NAN, |t| t.inverse_cdf(0.975))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debiased_ema_hand_cases() {
        let pts = [[1.0, 1.0], [2.0, 3.0], [3.0, f64::NAN], [4.0, 3.0]];
        assert_eq!(debiased_ema(&pts, 0.0), vec![[1.0, 1.0], [2.0, 3.0], [4.0, 3.0]]);
        // w = ½: s1 = ½ → ½ / ½ = 1; s2 = ¼ + 3/2 = 1.75 → 1.75 / ¾; s3 = 0.875 + 1.5 = 2.375 → / ⅞.
        let s = debiased_ema(&pts, 0.5);
        let want = [1.0, 1.75 / 0.75, 2.375 / 0.875];
        for (got, want) in s.iter().zip(want) {
            assert!((got[1] - want).abs() < 1e-12, "{got:?} vs {want}");
        }
        assert_eq!(s.iter().map(|p| p[0]).collect::<Vec<_>>(), [1.0, 2.0, 4.0]);
        // A constant stays constant at any weight (the debiasing).
        let flat: Vec<[f64; 2]> = (0..50).map(|i| [f64::from(i), 0.7]).collect();
        assert!(debiased_ema(&flat, 0.95).iter().all(|p| (p[1] - 0.7).abs() < 1e-12));
        assert!(debiased_ema(&[], 0.6).is_empty());
    }

    /// Each probe embedding's cosine similarities to the gallery, with its true index.
    fn similarity_rows(probes: &[(Vec<f32>, usize)], gallery: &[Vec<f32>]) -> Vec<(Vec<f32>, usize)> {
        probes
            .iter()
            .map(|(e, truth)| (gallery.iter().map(|g| cosine(e, g)).collect(), *truth))
            .collect()
    }

    #[test]
    fn identity_inception_score_hand_cases() {
        let gallery = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        // Every probe the same: p(y|x) = p(y), KL = 0, IS = 1.
        let same = vec![(vec![1.0, 1.0], 0), (vec![2.0, 2.0], 1)];
        let is = identity_inception_score(&similarity_rows(&same, &gallery), 0.1).expect("score");
        assert!((is - 1.0).abs() < 1e-12, "{is}");
        // One probe on each axis: cos 1 vs 0, logits 10 vs 0 at T = 0.1. p(y|x) = (a, 1 − a) and (1 − a, a) with
        // a = 1 / (1 + e^-10); p(y) = (½, ½); KL = ln 2 + a ln a + (1 − a) ln(1 − a) for both.
        let apart = vec![(vec![1.0, 0.0], 0), (vec![0.0, 1.0], 1)];
        let a = 1.0 / (1.0 + (-10f64).exp());
        let want = (2f64.ln() + a * a.ln() + (1.0 - a) * (1.0 - a).ln()).exp();
        let is = identity_inception_score(&similarity_rows(&apart, &gallery), 0.1).expect("score");
        assert!((is - want).abs() < 1e-9 && is > 1.99, "{is} vs {want}");
        // Recognisable but all the same identity: not diverse, IS ≈ 1.
        let one_class = vec![(vec![1.0, 0.0], 0), (vec![1.0, 0.01], 0)];
        assert!(identity_inception_score(&similarity_rows(&one_class, &gallery), 0.1).expect("score") < 1.01);
        assert_eq!(identity_inception_score(&similarity_rows(&[], &gallery), 0.1), None);
        assert_eq!(identity_inception_score(&similarity_rows(&apart, &[]), 0.1), None);
        assert_eq!(identity_inception_score(&similarity_rows(&apart, &gallery), 0.0), None);
    }

    #[test]
    fn top1_identification_hand_cases() {
        let gallery = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![-1.0, 0.0]];
        // Probe 0 is nearest to entry 0 (right), probe 1 nearest to entry 1 (right), probe 2 nearest to entry 0
        // but belongs to entry 2 (wrong): 2/3.
        let probes = vec![(vec![0.9, 0.1], 0), (vec![0.2, 0.8], 1), (vec![0.7, 0.3], 2)];
        assert_eq!(
            top1_identification(&similarity_rows(&probes, &gallery)),
            Some(2.0 / 3.0)
        );
        // A constant (zero) embedder scores every entry 0: the first entry wins, so only its probes hit.
        let zeros = vec![(vec![0.0, 0.0], 0), (vec![0.0, 0.0], 1), (vec![0.0, 0.0], 2)];
        assert_eq!(top1_identification(&similarity_rows(&zeros, &gallery)), Some(1.0 / 3.0));
        assert_eq!(top1_identification(&similarity_rows(&[], &gallery)), None);
        assert_eq!(
            top1_identification(&similarity_rows(&[(vec![1.0, 0.0], 3)], &gallery)),
            None
        );
    }

    #[test]
    fn cosine_hand_cases() {
        assert!((cosine(&[1.0, 0.0], &[1.0, 1.0]) - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }

    #[test]
    fn auc_hand_cases() {
        assert_eq!(roc_auc(&[0.9, 0.8], &[0.1, 0.2]), Some(1.0));
        assert_eq!(roc_auc(&[0.1], &[0.9]), Some(0.0));
        // One tie of two pairs: (0.5 + 1) / 2.
        assert_eq!(roc_auc(&[0.5], &[0.5, 0.1]), Some(0.75));
        assert_eq!(roc_auc(&[], &[0.1]), None);
    }

    #[test]
    fn verification_hand_case() {
        // Genuine 0.9, 0.8, 0.4; impostor 0.5, 0.3, 0.2, 0.1.
        let g = [0.9, 0.8, 0.4];
        let i = [0.5, 0.3, 0.2, 0.1];
        let v = verification(&g, &i).expect("non-empty");
        // At th = 0.8: FMR 0, FNMR 0 → no, 0.4 is genuine below: FNMR 1/3. At th = 0.4: FMR 1/4, FNMR 0.
        // Closest rates: th = 0.5 → FMR 1/4, FNMR 1/3 (gap 1/12) vs th = 0.8 → 0, 1/3 (gap 1/3) vs th = 0.4 → 1/4, 0
        // (gap 1/4). EER = (1/4 + 1/3)/2.
        assert!((v.eer - (0.25 + 1.0 / 3.0) / 2.0).abs() < 1e-9, "{v:?}");
        // FMR ≤ 1 % means no impostor accepted: th > 0.5 → best FNMR 1/3.
        assert!((v.fmr100 - 1.0 / 3.0).abs() < 1e-9);
        assert!((v.fmr1000 - 1.0 / 3.0).abs() < 1e-9);
        // AUC: 11 of 12 genuine-impostor pairs ordered (0.4 < 0.5).
        assert!((v.auc - 11.0 / 12.0).abs() < 1e-9);
        // FDR from population means/variances.
        let (mg, vg) = (0.7f64, ((0.2f64).powi(2) + 0.1f64.powi(2) + 0.3f64.powi(2)) / 3.0);
        let (mi, vi) = (
            0.275f64,
            (0.225f64.powi(2) + 0.025f64.powi(2) + 0.075f64.powi(2) + 0.175f64.powi(2)) / 4.0,
        );
        assert!(
            (v.fdr - (mg - mi).powi(2) / (vg + vi)).abs() < 1e-5,
            "{} vs {}",
            v.fdr,
            (mg - mi).powi(2) / (vg + vi)
        );
    }

    #[test]
    fn frechet_distance_hand_cases() {
        // Identical sets: 0.
        let a = vec![vec![0.0, 1.0], vec![1.0, 0.0], vec![2.0, 2.0]];
        assert!(frechet_distance(&a, &a).expect("fd").abs() < 1e-9);
        // A shifted copy: only the mean term, ‖(3, −1)‖² = 10.
        let b: Vec<Vec<f32>> = a.iter().map(|v| vec![v[0] + 3.0, v[1] - 1.0]).collect();
        assert!((frechet_distance(&a, &b).expect("fd") - 10.0).abs() < 1e-6);
        // 1-D: (μ1 − μ2)² + (σ1 − σ2)². Set {0, 2}: μ 1, var 2; set {0, 4}: μ 2, var 8 → 1 + (√2 − √8)² = 3.
        let x = vec![vec![0.0], vec![2.0]];
        let y = vec![vec![0.0], vec![4.0]];
        assert!((frechet_distance(&x, &y).expect("fd") - 3.0).abs() < 1e-9);
        assert!(frechet_distance(&x[..1], &y).is_err());
    }

    #[test]
    fn cmmd_hand_case() {
        // Two points per set in 1-D. Within-set kernels exclude the diagonal.
        let a = vec![vec![0.0], vec![1.0]];
        let b = vec![vec![0.0], vec![3.0]];
        let k = |d: f64| (-d * d / 200.0).exp();
        let expect = (k(1.0) + k(3.0) - 2.0 * (k(0.0) + k(3.0) + k(1.0) + k(2.0)) / 4.0) * 1000.0;
        assert!((cmmd(&a, &b).expect("cmmd") - expect).abs() < 1e-9);
        // The unbiased estimator of a set against itself: k(1) − k(0) (slightly negative, as unbiased MMD² can be).
        assert!((cmmd(&a, &a).expect("cmmd") - (k(1.0) - k(0.0)) * 1000.0).abs() < 1e-9);
    }

    #[test]
    fn psnr_hand_case() {
        let a = image::RgbImage::from_pixel(2, 1, image::Rgb([10, 10, 10]));
        let mut b = a.clone();
        b.put_pixel(1, 0, image::Rgb([20, 10, 10]));
        // MSE = 100 / 6.
        let expect = 10.0 * (255.0f64 * 255.0 / (100.0 / 6.0)).log10();
        assert!((psnr(&a, &b, None).expect("psnr") - expect).abs() < 1e-9);
        let mut mask = image::GrayImage::new(2, 1);
        mask.put_pixel(0, 0, image::Luma([255]));
        assert_eq!(psnr(&a, &b, Some(&mask)), Some(f64::INFINITY));
        assert_eq!(psnr(&a, &b, Some(&image::GrayImage::new(2, 1))), None);
    }

    #[test]
    fn stability_and_convergence_hand_cases() {
        let s = stability(&[5.0, 1.0, 2.0, 3.0], &[1.0, 1.0, 1.0, 5.0, 1.0], 3, 3.0);
        assert!((s.loss_std - 1.0).abs() < 1e-12);
        assert_eq!(s.grad_spikes, 1);
        // Accuracy 0, 0.5, 1, 1 with window 1: final 1, 90 % first reached at step 3.
        assert_eq!(steps_to_fraction(&[0.0, 0.5, 1.0, 1.0], 1, 0.9), Some(3));
        assert_eq!(steps_to_fraction(&[], 5, 0.9), None);
        // An accuracy that never leaves 0 did not converge at step 1.
        assert_eq!(steps_to_fraction(&[0.0, 0.0, 0.0], 1, 0.9), None);
        // t(2) = 4.303 (tables); sd 1.
        let (m, h) = mean_ci95(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (h - 4.303 / 3f64.sqrt()).abs() < 1e-3, "{h}");
        // 41 values ±1 alternating around 0 (sd √(41/40)): t(40) = 2.021, not the normal 1.96.
        let v: Vec<f64> = (0..41).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
        let (m, h) = mean_ci95(&v);
        let sd = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / 40.0).sqrt();
        assert!((h - 2.021 * sd / 41f64.sqrt()).abs() < 1e-3, "{h}");
    }
}
