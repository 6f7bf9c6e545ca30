//! Pair quality and pair selection (the data side of the ablation plans: which DIP pairs a run trains on).
//!
//! **ψ (fidelity to the references).** `ψ(x | c)` is the built-in identity fidelity of an image `x` to the item's
//! references `c`: for each subject `j`, the crop of `x` inside the bounding box of that subject's mask
//! ([`subject_crop`], padded by one pixel, as the evaluation does) and the reference `c_j` are embedded with
//! [`IdentityEmbedder`] (`builtin-identity-v1`, no download); their cosine is mapped to `[0, 1]` as `(1 + cos) / 2`
//! and the subjects are averaged ([`psi_from_cosines`]). The winner and the loser of a pair are scored with the
//! same (the item's) masks.
//!
//! **Pair quality `q`** from `ψ_w = ψ(x_w | c)` and `ψ_l = ψ(x_l | c)` ([`PairQuality::score`]):
//! * `product` (the paper's): `ψ_w · (1 − ψ_l)` — high when the winner is faithful and the loser is not;
//! * `difference`: `ψ_w − ψ_l`;
//! * `ratio`: `ψ_w / (ψ_l + ε)` with `ε = data.pairs.epsilon` (default `1e-3`) so a loser with `ψ_l = 0` gives a
//!   finite score.
//!
//! **Selection** ([`select_pairs`]), on the scores of every candidate pair, in this order:
//! 1. *bottom filter*: drop the `round(n · bottom_percent / 100)` lowest-quality pairs;
//! 2. *select* among the rest (`m` pairs): `all`; `top-percent`: keep the best `max(1, round(m · top_percent / 100))`
//!    (rounding half up); `dynamic`: keep `q ≥ θ` with `θ = mean + k · std` (`mean-std`, population std over
//!    the `m` scores) or `θ` = Otsu's threshold (`otsu`, [`otsu_threshold`]).
//!
//! Pairs are ranked by `q` descending, ties broken by the pair's position (earlier first), so counts are exact and
//! a run is deterministic. NaN scores, an empty candidate set and an empty selection are errors, never panics.

use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::eval::identity::{IdentityEmbedder, subject_crop};
use crate::eval::metrics::cosine;
use crate::eval::{EvalError, ImageEmbedder};

/// Default `ε` of the ratio formula.
pub const DEFAULT_EPSILON: f64 = 1e-3;
/// Padding (pixels) around a subject mask's bounding box when cropping for ψ (the evaluation's).
pub const CROP_PAD_PX: u32 = 1;

/// How a pair's quality `q` is computed from `ψ_w` and `ψ_l`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairQuality {
    /// `ψ_w · (1 − ψ_l)` (the paper's ranking).
    #[default]
    Product,
    /// `ψ_w − ψ_l`.
    Difference,
    /// `ψ_w / (ψ_l + ε)`.
    Ratio,
}

impl PairQuality {
    /// Config name (`product`, `difference`, `ratio`).
    pub fn name(self) -> &'static str {
        match self {
            PairQuality::Product => "product",
            PairQuality::Difference => "difference",
            PairQuality::Ratio => "ratio",
        }
    }

    /// The quality of a pair with fidelities `psi_w`, `psi_l` (`epsilon` is used by `ratio` only).
    pub fn score(self, psi_w: f64, psi_l: f64, epsilon: f64) -> f64 {
        match self {
            PairQuality::Product => product_quality(psi_w, psi_l),
            PairQuality::Difference => difference_quality(psi_w, psi_l),
            PairQuality::Ratio => ratio_quality(psi_w, psi_l, epsilon),
        }
    }
}

/// `q = ψ_w · (1 − ψ_l)`: the paper's pair quality, high only when the winner is faithful **and** the loser is not.
pub fn product_quality(psi_w: f64, psi_l: f64) -> f64 {
    psi_w * (1.0 - psi_l)
}

/// `q = ψ_w − ψ_l`: the fidelity gap, in `[−1, 1]`.
pub fn difference_quality(psi_w: f64, psi_l: f64) -> f64 {
    psi_w - psi_l
}

/// `q = ψ_w / (ψ_l + ε)`: the fidelity ratio; `ε > 0` keeps it finite when `ψ_l = 0`.
pub fn ratio_quality(psi_w: f64, psi_l: f64, epsilon: f64) -> f64 {
    psi_w / (psi_l + epsilon)
}

/// Which pairs are kept after the bottom filter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairSelect {
    /// Every pair (the default: today's behaviour).
    #[default]
    All,
    /// The best `top_percent` % (at least one pair).
    TopPercent,
    /// `q ≥ θ` with a threshold from the score distribution ([`DynamicThreshold`]).
    Dynamic,
}

/// The distribution-based threshold of `select = "dynamic"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DynamicThreshold {
    /// `θ = mean + dynamic_k · std` (population std).
    #[default]
    MeanStd,
    /// Otsu's threshold of the score histogram ([`otsu_threshold`]).
    Otsu,
}

/// `[data.pairs]`: pair quality and selection (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PairsConfig {
    /// Formula of `q`.
    pub quality: PairQuality,
    /// Selection rule (after the bottom filter).
    pub select: PairSelect,
    /// `select = "top-percent"`: percentage of pairs kept, in `(0, 100]`.
    pub top_percent: f64,
    /// `select = "dynamic"`: which threshold.
    pub dynamic: DynamicThreshold,
    /// `dynamic = "mean-std"`: `k` of `mean + k · std`.
    pub dynamic_k: f64,
    /// Percentage of lowest-quality pairs dropped first, in `[0, 100]`.
    pub bottom_percent: f64,
    /// `ε` of the ratio formula (> 0).
    pub epsilon: f64,
}

impl Default for PairsConfig {
    fn default() -> Self {
        Self {
            quality: PairQuality::Product,
            select: PairSelect::All,
            top_percent: 5.33,
            dynamic: DynamicThreshold::MeanStd,
            dynamic_k: 0.0,
            bottom_percent: 0.0,
            epsilon: DEFAULT_EPSILON,
        }
    }
}

impl PairsConfig {
    /// Whether every pair is kept whatever the scores (no bottom filter, `select = "all"`).
    pub fn keeps_everything(&self) -> bool {
        self.select == PairSelect::All && self.bottom_percent == 0.0
    }

    /// Checks ranges; the error names the `data.pairs` key.
    pub fn validate(&self) -> Result<(), PairsError> {
        let bad = |field: &'static str, message: String| Err(PairsError::Config { field, message });
        if !(self.top_percent.is_finite() && self.top_percent > 0.0 && self.top_percent <= 100.0) {
            return bad(
                "data.pairs.top_percent",
                format!("must be in (0, 100], got {}", self.top_percent),
            );
        }
        if !(self.bottom_percent.is_finite() && (0.0..=100.0).contains(&self.bottom_percent)) {
            return bad(
                "data.pairs.bottom_percent",
                format!("must be in [0, 100], got {}", self.bottom_percent),
            );
        }
        if !self.dynamic_k.is_finite() {
            return bad(
                "data.pairs.dynamic_k",
                format!("must be finite, got {}", self.dynamic_k),
            );
        }
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            return bad("data.pairs.epsilon", format!("must be positive, got {}", self.epsilon));
        }
        Ok(())
    }
}

/// What can go wrong scoring or selecting pairs.
#[derive(Debug, thiserror::Error)]
pub enum PairsError {
    /// A `data.pairs` value out of range.
    #[error("config field `{field}`: {message}")]
    Config {
        /// Dotted key.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No pair to score or select from.
    #[error("no pairs to select from (the dataset, after data.items, has no usable item)")]
    NoPairs,
    /// A score that is not a number (a degenerate image or formula).
    #[error("pair {index}: quality score is {value} (not a finite number)")]
    NonFiniteScore {
        /// Position of the pair among the candidates.
        index: usize,
        /// The score.
        value: f64,
    },
    /// Distribution-based thresholds need a distribution.
    #[error("select = \"dynamic\" needs at least 2 pairs to estimate a threshold, got {0}")]
    TooFewForDynamic(usize),
    /// The rules left nothing to train on.
    #[error("pair selection kept no pair of {total} ({why}); lower data.pairs.bottom_percent or dynamic_k")]
    EmptySelection {
        /// Candidate pairs.
        total: usize,
        /// Which rule removed the last pair.
        why: String,
    },
    /// An image cannot be scored (empty image, subject/reference count mismatch).
    #[error("{item}: {message}")]
    Scoring {
        /// Item id.
        item: String,
        /// What is wrong.
        message: String,
    },
}

/// The outcome of [`select_pairs`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Selection {
    /// Per candidate pair (input order): kept for training.
    pub kept: Vec<bool>,
    /// Pairs left after the bottom filter.
    pub after_bottom: usize,
    /// The highest score the bottom filter dropped (None when it dropped none).
    pub bottom_cut: Option<f64>,
    /// The selection threshold: pairs with `q ≥ threshold` are kept (the lowest kept score for `top-percent`;
    /// `mean + k·std` or Otsu's `θ` for `dynamic`; None for `all`).
    pub threshold: Option<f64>,
}

impl Selection {
    /// Number of kept pairs.
    pub fn kept_count(&self) -> usize {
        self.kept.iter().filter(|k| **k).count()
    }
}

/// `round(n · percent / 100)`, halves rounded up, clamped to `0..=n`.
pub fn percent_count(n: usize, percent: f64) -> usize {
    let raw = (n as f64 * percent / 100.0 + 0.5).floor();
    if raw <= 0.0 { 0 } else { (raw as usize).min(n) }
}

/// Indices ranked by score descending; ties keep input order (earlier first).
fn rank_desc(scores: &[f64], among: &[usize]) -> Vec<usize> {
    let mut order = among.to_vec();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order
}

/// Population mean and standard deviation.
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Otsu's threshold of a set of scores: the split of the sorted scores into a low and a high class that maximises
/// the between-class variance `w_0 · w_1 · (μ_0 − μ_1)²`. The histogram has one bin per distinct score (no binning
/// error); the threshold is the midpoint between the highest low score and the lowest high score, so the high class
/// is `q ≥ θ`. Equal between-class variances pick the lowest split (keeps more pairs). All scores equal: `θ` is that
/// score (everything kept). Empty input: None.
pub fn otsu_threshold(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let (&lo, &hi) = (sorted.first()?, sorted.last()?);
    if lo == hi {
        return Some(lo);
    }
    let n = sorted.len() as f64;
    let total: f64 = sorted.iter().sum();
    let mut best: Option<(f64, f64)> = None;
    let mut low_sum = 0.0;
    for i in 0..sorted.len() - 1 {
        low_sum += sorted[i];
        if sorted[i] == sorted[i + 1] {
            continue;
        }
        let (n0, n1) = ((i + 1) as f64, n - (i + 1) as f64);
        let (mu0, mu1) = (low_sum / n0, (total - low_sum) / n1);
        let between = (n0 / n) * (n1 / n) * (mu0 - mu1).powi(2);
        let theta = 0.5 * (sorted[i] + sorted[i + 1]);
        if best.is_none_or(|(b, _)| between > b) {
            best = Some((between, theta));
        }
    }
    best.map(|(_, theta)| theta)
}

/// Applies the bottom filter, then the selection rule of `cfg`, to the quality scores of the candidate pairs
/// (module docs). Errors: no pairs, a non-finite score, a bad config, `dynamic` with fewer than 2 pairs, or an
/// empty selection.
pub fn select_pairs(scores: &[f64], cfg: &PairsConfig) -> Result<Selection, PairsError> {
    cfg.validate()?;
    if scores.is_empty() {
        return Err(PairsError::NoPairs);
    }
    if let Some((index, &value)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
        return Err(PairsError::NonFiniteScore { index, value });
    }
    let n = scores.len();
    let ranked = rank_desc(scores, &(0..n).collect::<Vec<_>>());
    let drop = percent_count(n, cfg.bottom_percent);
    let bottom_cut = ranked[n - drop..].first().map(|&i| scores[i]);
    let mut survivors: Vec<usize> = ranked[..n - drop].to_vec();
    if survivors.is_empty() {
        return Err(PairsError::EmptySelection {
            total: n,
            why: format!("bottom_percent = {} drops all {n}", cfg.bottom_percent),
        });
    }
    let after_bottom = survivors.len();
    let threshold = match cfg.select {
        PairSelect::All => None,
        PairSelect::TopPercent => {
            let keep = percent_count(after_bottom, cfg.top_percent).max(1);
            survivors.truncate(keep);
            survivors.last().map(|&i| scores[i])
        }
        PairSelect::Dynamic => {
            if after_bottom < 2 {
                return Err(PairsError::TooFewForDynamic(after_bottom));
            }
            let values: Vec<f64> = survivors.iter().map(|&i| scores[i]).collect();
            let theta = match cfg.dynamic {
                DynamicThreshold::MeanStd => {
                    let (lo, hi) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                        (lo.min(v), hi.max(v))
                    });
                    // Equal scores: the rounded mean may sit a hair above them; the threshold is the score itself.
                    if lo == hi {
                        lo
                    } else {
                        let (mean, std) = mean_std(&values);
                        mean + cfg.dynamic_k * std
                    }
                }
                DynamicThreshold::Otsu => otsu_threshold(&values).ok_or(PairsError::TooFewForDynamic(0))?,
            };
            survivors.retain(|&i| scores[i] >= theta);
            if survivors.is_empty() {
                return Err(PairsError::EmptySelection {
                    total: n,
                    why: format!("no score reaches the dynamic threshold {theta:.6}"),
                });
            }
            Some(theta)
        }
    };
    let mut kept = vec![false; n];
    for i in survivors {
        kept[i] = true;
    }
    Ok(Selection {
        kept,
        after_bottom,
        bottom_cut,
        threshold,
    })
}

/// The inputs of one pair for [`score_and_select`].
#[derive(Clone, Debug, PartialEq)]
pub struct PairInput {
    /// Item id.
    pub id: String,
    /// `ψ(x_w | c)`.
    pub psi_w: f64,
    /// `ψ(x_l | c)`.
    pub psi_l: f64,
    /// Where the loser came from (`dataset`, `winner of <id>`, `base sample, seed <n>`).
    pub loser: String,
}

/// One pair as scored and selected (an entry of `pairs.json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PairScore {
    /// Item id.
    pub id: String,
    /// `ψ(x_w | c)`.
    pub psi_w: f64,
    /// `ψ(x_l | c)`.
    pub psi_l: f64,
    /// Pair quality `q`.
    pub quality: f64,
    /// Trained on.
    pub kept: bool,
    /// Where the loser came from.
    pub loser: String,
}

/// How many pairs a selection kept, and where it cut.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PairsSummary {
    /// Candidate pairs.
    pub total: usize,
    /// Pairs left after the bottom filter.
    pub after_bottom: usize,
    /// Pairs trained on.
    pub kept: usize,
    /// Selection threshold (`q ≥ threshold` kept), when the rule has one.
    pub threshold: Option<f64>,
    /// Highest score dropped by the bottom filter.
    pub bottom_cut: Option<f64>,
    /// Mean `ψ_w` over all candidates.
    pub mean_psi_w: f64,
    /// Mean `ψ_l` over all candidates.
    pub mean_psi_l: f64,
    /// Fraction of candidates with `ψ_w > ψ_l` (how often the embedder agrees with the dataset's preference).
    pub winner_preferred: f64,
}

/// The content of `pairs.json`: the rule, the summary and every pair.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PairsReport {
    /// The `data.pairs` config used.
    pub config: PairsConfig,
    /// Name of the fidelity embedder behind ψ.
    pub embedder: String,
    /// Counts, threshold, ψ statistics.
    #[serde(flatten)]
    pub summary: PairsSummary,
    /// Every candidate pair, in training-set order.
    pub pairs: Vec<PairScore>,
}

impl PairsReport {
    /// Ids of the kept pairs, in order.
    pub fn kept_ids(&self) -> Vec<&str> {
        self.pairs.iter().filter(|p| p.kept).map(|p| p.id.as_str()).collect()
    }
}

/// Scores every pair with `cfg.quality` and selects with [`select_pairs`].
pub fn score_and_select(pairs: Vec<PairInput>, cfg: &PairsConfig) -> Result<PairsReport, PairsError> {
    cfg.validate()?;
    let scores: Vec<f64> = pairs
        .iter()
        .map(|p| cfg.quality.score(p.psi_w, p.psi_l, cfg.epsilon))
        .collect();
    let selection = select_pairs(&scores, cfg)?;
    let n = pairs.len() as f64;
    let mean = |f: fn(&PairInput) -> f64| pairs.iter().map(f).sum::<f64>() / n;
    let summary = PairsSummary {
        total: pairs.len(),
        after_bottom: selection.after_bottom,
        kept: selection.kept_count(),
        threshold: selection.threshold,
        bottom_cut: selection.bottom_cut,
        mean_psi_w: mean(|p| p.psi_w),
        mean_psi_l: mean(|p| p.psi_l),
        winner_preferred: pairs.iter().filter(|p| p.psi_w > p.psi_l).count() as f64 / n,
    };
    let pairs = pairs
        .into_iter()
        .zip(scores)
        .zip(&selection.kept)
        .map(|((p, quality), &kept)| PairScore {
            id: p.id,
            psi_w: p.psi_w,
            psi_l: p.psi_l,
            quality,
            kept,
            loser: p.loser,
        })
        .collect();
    Ok(PairsReport {
        config: *cfg,
        embedder: crate::eval::identity::IDENTITY_EMBEDDER.to_string(),
        summary,
        pairs,
    })
}

/// `ψ` from the per-subject cosines between an image's subject crops and the references: the mean of
/// `(1 + cos) / 2`, in `[0, 1]`. None for no subject.
pub fn psi_from_cosines(cosines: &[f32]) -> Option<f64> {
    if cosines.is_empty() {
        return None;
    }
    let sum: f64 = cosines.iter().map(|&c| (1.0 + f64::from(c)) / 2.0).sum();
    Some(sum / cosines.len() as f64)
}

/// The descriptors of the references of one item (computed once, reused for winner and loser).
pub fn reference_descriptors(item: &str, references: &[RgbImage]) -> Result<Vec<Vec<f32>>, PairsError> {
    IdentityEmbedder
        .embed_images(references)
        .map_err(|e| scoring_error(item, e))
}

fn scoring_error(item: &str, e: EvalError) -> PairsError {
    PairsError::Scoring {
        item: item.to_string(),
        message: e.to_string(),
    }
}

/// `ψ(image | references)`: the built-in identity fidelity of `image` (one crop per subject mask) to the item's
/// reference descriptors (module docs). The masks must be at the image's size, one per reference.
pub fn psi(item: &str, image: &RgbImage, masks: &[GrayImage], references: &[Vec<f32>]) -> Result<f64, PairsError> {
    if masks.len() != references.len() || masks.is_empty() {
        return Err(PairsError::Scoring {
            item: item.to_string(),
            message: format!(
                "{} mask(s) for {} reference(s): need one per subject",
                masks.len(),
                references.len()
            ),
        });
    }
    let crops: Vec<RgbImage> = masks.iter().map(|m| subject_crop(image, m, CROP_PAD_PX)).collect();
    let embedded = IdentityEmbedder
        .embed_images(&crops)
        .map_err(|e| scoring_error(item, e))?;
    let cosines: Vec<f32> = embedded.iter().zip(references).map(|(a, b)| cosine(a, b)).collect();
    psi_from_cosines(&cosines).ok_or_else(|| PairsError::Scoring {
        item: item.to_string(),
        message: "no subject".into(),
    })
}

crate::config_enum!(
    PairQuality,
    [PairQuality::Product, PairQuality::Difference, PairQuality::Ratio]
);
crate::config_enum!(
    PairSelect,
    [PairSelect::All, PairSelect::TopPercent, PairSelect::Dynamic]
);
crate::config_enum!(DynamicThreshold, [DynamicThreshold::MeanStd, DynamicThreshold::Otsu]);

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(select: PairSelect) -> PairsConfig {
        PairsConfig {
            select,
            ..PairsConfig::default()
        }
    }

    #[test]
    fn the_three_formulas_by_hand() {
        // ψ_w = 0.8, ψ_l = 0.3: 0.8·0.7 = 0.56; 0.8 − 0.3 = 0.5; 0.8 / 0.301.
        assert!((PairQuality::Product.score(0.8, 0.3, 1e-3) - 0.56).abs() < 1e-12);
        assert!((PairQuality::Difference.score(0.8, 0.3, 1e-3) - 0.5).abs() < 1e-12);
        assert!((PairQuality::Ratio.score(0.8, 0.3, 1e-3) - 0.8 / 0.301).abs() < 1e-12);
        // ε keeps the ratio finite at ψ_l = 0.
        assert_eq!(PairQuality::Ratio.score(0.5, 0.0, 0.5), 1.0);
        // A faithful loser makes the product 0 whatever the winner.
        assert_eq!(PairQuality::Product.score(0.9, 1.0, 1e-3), 0.0);
        assert_eq!(PairQuality::Difference.score(0.2, 0.6, 1e-3), 0.2 - 0.6);
    }

    #[test]
    fn psi_maps_cosines_to_unit_interval_and_averages_subjects() {
        assert_eq!(psi_from_cosines(&[1.0]), Some(1.0));
        assert_eq!(psi_from_cosines(&[-1.0]), Some(0.0));
        // (1 + 0)/2 = 0.5 and (1 + 0.5)/2 = 0.75 → 0.625.
        assert_eq!(psi_from_cosines(&[0.0, 0.5]), Some(0.625));
        assert_eq!(psi_from_cosines(&[]), None);
    }

    #[test]
    fn percent_counts_round_half_up() {
        assert_eq!(percent_count(48, 5.33), 3); // 2.558 → 3
        assert_eq!(percent_count(40, 5.0), 2); // 2.0
        assert_eq!(percent_count(10, 25.0), 3); // 2.5 → 3
        assert_eq!(percent_count(10, 24.0), 2); // 2.4 → 2
        assert_eq!(percent_count(10, 0.0), 0);
        assert_eq!(percent_count(10, 100.0), 10);
        assert_eq!(percent_count(3, 10.0), 0); // 0.3 → 0 (top-percent then keeps at least 1)
    }

    #[test]
    fn top_percent_keeps_the_best_with_at_least_one() {
        let scores = [0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 0.8, 0.4, 0.6, 0.0];
        let mut c = cfg(PairSelect::TopPercent);
        c.top_percent = 30.0;
        let s = select_pairs(&scores, &c).expect("select");
        assert_eq!(s.kept_count(), 3);
        let kept: Vec<usize> = (0..10).filter(|&i| s.kept[i]).collect();
        assert_eq!(kept, vec![1, 3, 6]);
        assert_eq!(s.threshold, Some(0.7));
        c.top_percent = 1.0; // 0.1 pair → at least one
        let s = select_pairs(&scores, &c).expect("select");
        assert_eq!(s.kept, (0..10).map(|i| i == 1).collect::<Vec<_>>());
    }

    #[test]
    fn ties_break_by_position() {
        let scores = [0.5, 0.9, 0.5, 0.5];
        let mut c = cfg(PairSelect::TopPercent);
        c.top_percent = 50.0;
        let s = select_pairs(&scores, &c).expect("select");
        assert_eq!(s.kept, vec![true, true, false, false]);
        // The bottom filter drops the last of the tied pairs first.
        let mut b = cfg(PairSelect::All);
        b.bottom_percent = 25.0;
        let s = select_pairs(&scores, &b).expect("select");
        assert_eq!(s.kept, vec![true, true, true, false]);
        assert_eq!(s.bottom_cut, Some(0.5));
    }

    #[test]
    fn bottom_filter_runs_before_select() {
        let scores = [0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 0.8, 0.4, 0.6, 0.0];
        let mut c = cfg(PairSelect::All);
        c.bottom_percent = 20.0;
        let s = select_pairs(&scores, &c).expect("select");
        assert_eq!(s.after_bottom, 8);
        assert!(!s.kept[0] && !s.kept[9] && s.kept_count() == 8);
        assert_eq!(s.bottom_cut, Some(0.1));
        // Top 50 % of the 8 survivors = 4.
        c.select = PairSelect::TopPercent;
        c.top_percent = 50.0;
        let s = select_pairs(&scores, &c).expect("select");
        assert_eq!(s.kept_count(), 4);
        assert_eq!(s.threshold, Some(0.6));
        c.bottom_percent = 100.0;
        let e = select_pairs(&scores, &c).expect_err("all dropped");
        assert!(matches!(e, PairsError::EmptySelection { total: 10, .. }), "{e}");
    }

    #[test]
    fn mean_std_threshold_by_hand() {
        // mean 2.5, population std √1.25 ≈ 1.118.
        let scores = [1.0, 2.0, 3.0, 4.0];
        let (m, s) = mean_std(&scores);
        assert_eq!(m, 2.5);
        assert!((s - 1.25f64.sqrt()).abs() < 1e-12);
        let mut c = cfg(PairSelect::Dynamic);
        let sel = select_pairs(&scores, &c).expect("k = 0");
        assert_eq!(sel.kept, vec![false, false, true, true]);
        assert_eq!(sel.threshold, Some(2.5));
        c.dynamic_k = 1.0; // θ = 3.618: only 4 survives
        let sel = select_pairs(&scores, &c).expect("k = 1");
        assert_eq!(sel.kept, vec![false, false, false, true]);
        c.dynamic_k = -1.0; // θ = 1.382
        assert_eq!(select_pairs(&scores, &c).expect("k = -1").kept_count(), 3);
        c.dynamic_k = 5.0;
        assert!(matches!(
            select_pairs(&scores, &c),
            Err(PairsError::EmptySelection { .. })
        ));
        // Equal scores keep everything.
        c.dynamic_k = 0.0;
        assert_eq!(select_pairs(&[0.1; 5], &c).expect("equal").kept_count(), 5);
    }

    #[test]
    fn otsu_splits_a_bimodal_set() {
        // Two clusters around 0.1 and 0.8: the best split is between 0.12 and 0.78.
        let scores = [0.10, 0.78, 0.08, 0.12, 0.80, 0.82, 0.09, 0.11];
        let theta = otsu_threshold(&scores).expect("non-empty");
        assert!((theta - 0.45).abs() < 1e-12, "{theta}");
        let c = PairsConfig {
            select: PairSelect::Dynamic,
            dynamic: DynamicThreshold::Otsu,
            ..PairsConfig::default()
        };
        let s = select_pairs(&scores, &c).expect("otsu");
        assert_eq!(s.kept, vec![false, true, false, false, true, true, false, false]);
        // Hand case: {0, 0, 1}: the only split is between 0 and 1.
        assert_eq!(otsu_threshold(&[0.0, 1.0, 0.0]), Some(0.5));
        // {0, 1, 2, 10}: between-class variances 0.25·0.75·(0−13/3)², 0.5·0.5·(0.5−6)², 0.75·0.25·(1−10)²
        // = 3.52, 7.5625, 15.1875 → split between 2 and 10.
        assert_eq!(otsu_threshold(&[0.0, 1.0, 2.0, 10.0]), Some(6.0));
        assert_eq!(otsu_threshold(&[0.3, 0.3]), Some(0.3));
        assert_eq!(otsu_threshold(&[]), None);
    }

    #[test]
    fn empty_single_and_nan_inputs_are_errors_not_panics() {
        assert!(matches!(
            select_pairs(&[], &PairsConfig::default()),
            Err(PairsError::NoPairs)
        ));
        // One pair: kept by all and top-percent; dynamic needs a distribution.
        assert_eq!(
            select_pairs(&[0.4], &cfg(PairSelect::All)).expect("one").kept,
            vec![true]
        );
        assert_eq!(
            select_pairs(&[0.4], &cfg(PairSelect::TopPercent)).expect("one").kept,
            vec![true]
        );
        let e = select_pairs(&[0.4], &cfg(PairSelect::Dynamic)).expect_err("one");
        assert!(matches!(e, PairsError::TooFewForDynamic(1)), "{e}");
        let e = select_pairs(&[0.4, f64::NAN], &cfg(PairSelect::All)).expect_err("nan");
        assert!(matches!(e, PairsError::NonFiniteScore { index: 1, .. }), "{e}");
    }

    #[test]
    fn bad_config_values_name_the_key() {
        let bad = |c: PairsConfig| select_pairs(&[0.1, 0.2], &c).expect_err("bad").to_string();
        let d = PairsConfig::default();
        assert!(bad(PairsConfig { top_percent: 0.0, ..d }).contains("data.pairs.top_percent"));
        assert!(
            bad(PairsConfig {
                bottom_percent: 101.0,
                ..d
            })
            .contains("data.pairs.bottom_percent")
        );
        assert!(bad(PairsConfig { epsilon: 0.0, ..d }).contains("data.pairs.epsilon"));
        assert!(
            bad(PairsConfig {
                dynamic_k: f64::NAN,
                ..d
            })
            .contains("data.pairs.dynamic_k")
        );
        assert!(d.keeps_everything());
    }

    #[test]
    fn reports_score_select_and_summarise() {
        let input = |id: &str, w: f64, l: f64| PairInput {
            id: id.into(),
            psi_w: w,
            psi_l: l,
            loser: "dataset".into(),
        };
        let c = PairsConfig {
            quality: PairQuality::Difference,
            select: PairSelect::TopPercent,
            top_percent: 50.0,
            ..PairsConfig::default()
        };
        let r = score_and_select(
            vec![
                input("a", 0.9, 0.2),
                input("b", 0.5, 0.6),
                input("c", 0.7, 0.3),
                input("d", 0.6, 0.5),
            ],
            &c,
        )
        .expect("report");
        assert_eq!(r.kept_ids(), vec!["a", "c"]);
        assert_eq!(r.summary.kept, 2);
        assert!((r.summary.mean_psi_w - 0.675).abs() < 1e-12);
        assert!((r.summary.mean_psi_l - 0.4).abs() < 1e-12);
        assert_eq!(r.summary.winner_preferred, 0.75);
        assert!((r.pairs[1].quality + 0.1).abs() < 1e-12);
        assert!(matches!(score_and_select(Vec::new(), &c), Err(PairsError::NoPairs)));
    }

    #[test]
    fn psi_of_an_image_is_highest_for_the_reference_itself() {
        let reference = RgbImage::from_fn(16, 16, |x, y| {
            if (4..12).contains(&x) && (4..12).contains(&y) {
                image::Rgb([220, 30, 30])
            } else {
                image::Rgb([20, 20, 20])
            }
        });
        let other = RgbImage::from_fn(16, 16, |x, y| {
            if (2..14).contains(&x) && (6..10).contains(&y) {
                image::Rgb([30, 30, 220])
            } else {
                image::Rgb([20, 20, 20])
            }
        });
        let mask = GrayImage::from_pixel(16, 16, image::Luma([255]));
        let refs = reference_descriptors("it", std::slice::from_ref(&reference)).expect("refs");
        let same = psi("it", &reference, std::slice::from_ref(&mask), &refs).expect("psi");
        let diff = psi("it", &other, std::slice::from_ref(&mask), &refs).expect("psi");
        assert!((same - 1.0).abs() < 1e-6, "{same}");
        assert!(diff < same && (0.0..=1.0).contains(&diff), "{diff}");
        assert!(psi("it", &reference, &[], &refs).is_err());
    }
}
