//! Subject prior `M_prior ∈ {0,1}^{H×W}` on the token grid (paper §4, A.2).
//!
//! A DIP item carries one binary pixel mask per subject. The model sees the image as a grid of tokens of
//! `stride × stride` pixels, so each mask is pooled to that grid:
//!
//! **Pooling rule.** A token belongs to the subject when the fraction of its pixels inside the mask is at least
//! [`PriorConfig::coverage_threshold`] (default 0.5, i.e. a token is in the subject if ≥ 50 % of its pixels are).
//! Tokens on the right/bottom edge of an image whose size is not a multiple of the stride count only their
//! in-image pixels. The union over subjects (multi-subject `M_prior`) is the cell-wise maximum.

use super::{Grid, MaskError};

/// Settings of the pixel-to-token pooling of masks.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PriorConfig {
    /// Token side in pixels (4 for the tiny pixel-unshuffle model, 16 for FLUX: 8× VAE × 2×2 patches).
    pub stride: usize,
    /// Minimum fraction of a token's pixels inside the mask for the token to be in the subject, in `(0, 1]`.
    pub coverage_threshold: f32,
}

impl Default for PriorConfig {
    fn default() -> Self {
        Self {
            stride: 4,
            coverage_threshold: 0.5,
        }
    }
}

/// Fraction of each token's pixels inside a pixel mask (`mask` row-major, non-zero = inside).
pub fn token_coverage(mask: &[u8], width: usize, height: usize, stride: usize) -> Result<Grid, MaskError> {
    let pixels = Grid::new(
        height,
        width,
        mask.iter().map(|&v| if v > 0 { 1.0 } else { 0.0 }).collect(),
    )?;
    pixels.pool_mean(stride)
}

/// `M_prior^j` of one subject on the token grid, by the pooling rule in the module docs.
pub fn prior_token_mask(mask: &[u8], width: usize, height: usize, cfg: &PriorConfig) -> Result<Grid, MaskError> {
    let threshold = cfg.coverage_threshold;
    if !(threshold > 0.0 && threshold <= 1.0) {
        return Err(MaskError::OutOfRange {
            name: "coverage_threshold",
            value: f64::from(threshold),
            range: "(0, 1]",
        });
    }
    // Compare with a small tolerance so that exactly-half tokens are not lost to float rounding of the mean.
    Ok(token_coverage(mask, width, height, cfg.stride)?.map(|f| if f + 1e-6 >= threshold { 1.0 } else { 0.0 }))
}

/// Union of subject masks (cell-wise max): `M_prior = ∪_j M_prior^j`.
pub fn union(masks: &[Grid]) -> Result<Grid, MaskError> {
    let (first, rest) = masks.split_first().ok_or(MaskError::NoMasks("union"))?;
    rest.iter().try_fold(first.clone(), |acc, m| acc.zip_with(m, f32::max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_covered_tokens_are_in_the_subject() {
        // 4×4 pixels, stride 2 → 2×2 tokens with coverage [4/4, 2/4; 1/4, 0/4].
        #[rustfmt::skip]
        let mask = [
            1, 1, 1, 0,
            1, 1, 1, 0,
            1, 0, 0, 0,
            0, 0, 0, 0u8,
        ];
        let cov = token_coverage(&mask, 4, 4, 2).unwrap();
        assert_eq!(cov.as_slice(), &[1.0, 0.5, 0.25, 0.0]);
        let m = prior_token_mask(
            &mask,
            4,
            4,
            &PriorConfig {
                stride: 2,
                coverage_threshold: 0.5,
            },
        )
        .unwrap();
        assert_eq!(m.as_slice(), &[1.0, 1.0, 0.0, 0.0]);
        let strict = prior_token_mask(
            &mask,
            4,
            4,
            &PriorConfig {
                stride: 2,
                coverage_threshold: 0.75,
            },
        )
        .unwrap();
        assert_eq!(strict.as_slice(), &[1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn foreground_255_counts_like_1() {
        let mask = [255u8, 0, 0, 0];
        let m = prior_token_mask(
            &mask,
            2,
            2,
            &PriorConfig {
                stride: 1,
                coverage_threshold: 0.5,
            },
        )
        .unwrap();
        assert_eq!(m.as_slice(), &[1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn ragged_edge_tokens_count_only_real_pixels() {
        // 3×1 image, stride 2: second token has one pixel, inside → 1.
        let m = prior_token_mask(
            &[0, 0, 9],
            3,
            1,
            &PriorConfig {
                stride: 2,
                coverage_threshold: 0.5,
            },
        )
        .unwrap();
        assert_eq!(m.as_slice(), &[0.0, 1.0]);
    }

    #[test]
    fn threshold_out_of_range_is_an_error() {
        for t in [0.0, -1.0, 1.5, f32::NAN] {
            let cfg = PriorConfig {
                stride: 1,
                coverage_threshold: t,
            };
            assert!(matches!(
                prior_token_mask(&[1], 1, 1, &cfg),
                Err(MaskError::OutOfRange { .. })
            ));
        }
    }

    #[test]
    fn union_is_cellwise_max() {
        let a = Grid::new(1, 3, vec![1.0, 0.0, 0.0]).unwrap();
        let b = Grid::new(1, 3, vec![0.0, 0.0, 1.0]).unwrap();
        assert_eq!(union(&[a, b]).unwrap().as_slice(), &[1.0, 0.0, 1.0]);
        assert_eq!(union(&[]), Err(MaskError::NoMasks("union")));
    }
}
