//! Detail-Preserving Complexity Estimator `M_d` (paper §4.2, Eq. 7–8).
//!
//! * Eq. 7, [`local_entropy_bits`]: `C_p` is the Shannon entropy (bits) of the grey-level histogram (256 bins,
//!   `u8` intensities) of the square `window × window` patch centred on pixel `p`. At the border the window is
//!   clipped to the image: only in-image pixels are counted, exactly like `skimage.filters.rank.entropy` with a
//!   square footprint on a `uint8` image.
//! * Pooling: the pixel map is average-pooled to the token grid ([`Grid::pool_mean`]): a token's complexity is
//!   the mean entropy of its pixels.
//! * Eq. 8, [`min_max_normalise`]: min–max normalisation over all tokens of the image, giving `M_d ∈ [0, 1]`.
//!
//! **Flat images.** When every token has the same complexity (`C_max − C_min` below [`FLAT_EPSILON_BITS`]),
//! Eq. 8 is 0/0. We then return [`ComplexityConfig::flat_value`] everywhere (default 1): no region is more
//! complex than another, so none is down-weighted, and the Eq. 9 blend branch degrades to
//! `γ·M_s + (1−γ)·M_prior` instead of silently dropping the `M_d` term.
//!
//! The fast path keeps, for each output row, a moving histogram over the window and an incrementally
//! maintained `S = Σ_b n_b·log₂ n_b`, so `H = log₂ N − S / N` costs `O(window)` per pixel; rows are processed
//! in parallel with rayon.

use rayon::prelude::*;

use super::{Grid, MaskError};

/// `C_max − C_min` (bits) below which the image is considered flat for Eq. 8.
pub const FLAT_EPSILON_BITS: f32 = 1e-6;

/// Settings of the complexity estimator.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComplexityConfig {
    /// Side of the square entropy window in pixels (odd). The paper gives no value; 9 px suits 64 px images with
    /// 4 px tokens (the window spans about two tokens); for FLUX-size images with 16 px tokens use ~17.
    pub window_px: usize,
    /// Value of `M_d` everywhere when the image has no complexity contrast (see module docs).
    pub flat_value: f32,
}

impl Default for ComplexityConfig {
    fn default() -> Self {
        Self {
            window_px: 9,
            flat_value: 1.0,
        }
    }
}

fn check_args(pixels: &[u8], width: usize, height: usize, window_px: usize) -> Result<(), MaskError> {
    if window_px == 0 || window_px.is_multiple_of(2) {
        return Err(MaskError::BadWindow(window_px));
    }
    if pixels.len() != width * height {
        return Err(MaskError::DataLength {
            height,
            width,
            len: pixels.len(),
        });
    }
    Ok(())
}

/// Eq. 7: per-pixel Shannon entropy in bits of the grey levels in the `window_px × window_px` patch centred on
/// each pixel, the patch clipped to the image (see module docs). `pixels` is row-major `u8` grey.
pub fn local_entropy_bits(pixels: &[u8], width: usize, height: usize, window_px: usize) -> Result<Grid, MaskError> {
    check_args(pixels, width, height, window_px)?;
    let radius = window_px / 2;
    let tables = EntropyTables::new(window_px);
    let mut out = vec![0.0f32; width * height];
    if width > 0 {
        out.par_chunks_mut(width).enumerate().for_each_init(
            || [0u32; 256],
            |hist, (y, row)| {
                entropy_row(pixels, width, height, radius, &tables, hist, y, row);
            },
        );
    }
    Grid::new(height, width, out)
}

/// Precomputed `n·log₂ n` increments and `log₂ N` for every count a window can hold.
struct EntropyTables {
    /// `add[n] = f(n+1) − f(n)` with `f(n) = n·log₂ n`.
    add: Vec<f64>,
    /// `log2[n] = log₂ n` (`log2[0]` unused).
    log2: Vec<f64>,
}

impl EntropyTables {
    fn new(window_px: usize) -> Self {
        let max = window_px * window_px;
        let f = |n: usize| if n == 0 { 0.0 } else { n as f64 * (n as f64).log2() };
        Self {
            add: (0..=max).map(|n| f(n + 1) - f(n)).collect(),
            log2: (0..=max)
                .map(|n| if n == 0 { 0.0 } else { (n as f64).log2() })
                .collect(),
        }
    }
}

/// Fills one output row by sliding the window left to right.
#[allow(clippy::too_many_arguments)]
fn entropy_row(
    pixels: &[u8],
    width: usize,
    height: usize,
    radius: usize,
    tables: &EntropyTables,
    hist: &mut [u32; 256],
    y: usize,
    row: &mut [f32],
) {
    hist.fill(0);
    let y0 = y.saturating_sub(radius);
    let y1 = (y + radius).min(height - 1);
    let rows = y1 - y0 + 1;
    // S = Σ n·log₂ n over the bins of the current window.
    let mut s = 0.0f64;
    let add_column = |hist: &mut [u32; 256], s: &mut f64, x: usize| {
        for yy in y0..=y1 {
            let b = usize::from(pixels[yy * width + x]);
            let n = hist[b] as usize;
            *s += tables.add[n];
            hist[b] += 1;
        }
    };
    let remove_column = |hist: &mut [u32; 256], s: &mut f64, x: usize| {
        for yy in y0..=y1 {
            let b = usize::from(pixels[yy * width + x]);
            hist[b] -= 1;
            *s -= tables.add[hist[b] as usize];
        }
    };
    let first_cols = radius.min(width - 1);
    for x in 0..=first_cols {
        add_column(hist, &mut s, x);
    }
    let mut cols = first_cols + 1;
    for (x, out) in row.iter_mut().enumerate() {
        if x > 0 {
            // Remove before adding so no bin ever exceeds window² (the size of the lookup tables).
            if x > radius {
                remove_column(hist, &mut s, x - radius - 1);
                cols -= 1;
            }
            let entering = x + radius;
            if entering < width {
                add_column(hist, &mut s, entering);
                cols += 1;
            }
        }
        let n = rows * cols;
        // H = −Σ (n_b/N) log₂(n_b/N) = log₂ N − S/N. Clamp the ~1e-15 rounding residue at flat windows.
        *out = (tables.log2[n] - s / n as f64).max(0.0) as f32;
    }
}

/// Reference implementation of Eq. 7 that builds every window's histogram from scratch. `O(window²)` per pixel:
/// for tests and benchmarks only.
#[doc(hidden)]
pub fn local_entropy_bits_naive(
    pixels: &[u8],
    width: usize,
    height: usize,
    window_px: usize,
) -> Result<Grid, MaskError> {
    check_args(pixels, width, height, window_px)?;
    let r = window_px / 2;
    Ok(Grid::from_fn(height, width, |y, x| {
        let mut hist = [0u32; 256];
        let mut n = 0u32;
        for yy in y.saturating_sub(r)..=(y + r).min(height - 1) {
            for xx in x.saturating_sub(r)..=(x + r).min(width - 1) {
                hist[usize::from(pixels[yy * width + xx])] += 1;
                n += 1;
            }
        }
        let n = f64::from(n);
        -hist
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = f64::from(c) / n;
                p * p.log2()
            })
            .sum::<f64>() as f32
    }))
}

/// Eq. 8: `M_d = (C − C_min) / (C_max − C_min)` over all cells of `c`.
///
/// When `C_max − C_min < FLAT_EPSILON_BITS` (including a 1-cell grid) every cell is `flat_value`; an empty grid
/// stays empty. The result never contains NaN for finite input.
pub fn min_max_normalise(c: &Grid, flat_value: f32) -> Grid {
    let Some((lo, hi)) = c.min_max() else {
        return c.clone();
    };
    let range = hi - lo;
    if range.is_nan() || range < FLAT_EPSILON_BITS {
        return c.map(|_| flat_value);
    }
    c.map(|v| ((v - lo) / range).clamp(0.0, 1.0))
}

/// `M_d` on the token grid: Eq. 7 on the grey image, then [`complexity_from_entropy`].
pub fn complexity_mask(
    pixels: &[u8],
    width: usize,
    height: usize,
    stride: usize,
    cfg: &ComplexityConfig,
) -> Result<Grid, MaskError> {
    let c_raw = local_entropy_bits(pixels, width, height, cfg.window_px)?;
    complexity_from_entropy(&c_raw, stride, cfg)
}

/// `M_d` from an Eq. 7 pixel map `c_raw`: mean-pooled to `stride × stride` tokens, then Eq. 8. For callers that
/// keep `c_raw` too.
pub fn complexity_from_entropy(c_raw: &Grid, stride: usize, cfg: &ComplexityConfig) -> Result<Grid, MaskError> {
    Ok(min_max_normalise(&c_raw.pool_mean(stride)?, cfg.flat_value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg_image(width: usize, height: usize, seed: u64, levels: u64) -> Vec<u8> {
        let mut s = seed;
        (0..width * height)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) % levels) as u8
            })
            .collect()
    }

    #[test]
    fn hand_computed_3x3_window_1_and_3() {
        // Image (3×3):
        //   0 0 1
        //   0 1 1
        //   2 2 2
        let img = [0u8, 0, 1, 0, 1, 1, 2, 2, 2];
        // Window 1: every patch is one pixel → entropy 0.
        let w1 = local_entropy_bits(&img, 3, 3, 1).unwrap();
        assert!(w1.as_slice().iter().all(|&v| v == 0.0));
        // Window 3 at the centre: counts {0:3, 1:3, 2:3} → log₂3.
        let w3 = local_entropy_bits(&img, 3, 3, 3).unwrap();
        assert!((w3.get(1, 1).unwrap() - 3f32.log2()).abs() < 1e-6);
        // Top-left corner: clipped 2×2 patch {0,0,0,1} → H(3/4, 1/4) = 0.811278 bits.
        let h = -(0.75f32 * 0.75f32.log2() + 0.25 * 0.25f32.log2());
        assert!((w3.get(0, 0).unwrap() - h).abs() < 1e-6);
        // Bottom-right: patch rows 1..2, cols 1..2 = {1,1,2,2} → 1 bit.
        assert!((w3.get(2, 2).unwrap() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn fast_matches_naive_on_random_images() {
        for (w, h, win, levels, seed) in [
            (1, 1, 3, 256, 1),
            (7, 1, 5, 4, 2),
            (1, 9, 5, 4, 3),
            (13, 11, 3, 256, 4),
            (13, 11, 9, 8, 5),
            (20, 17, 17, 256, 6),
            (5, 4, 21, 3, 7), // window larger than the image
            (64, 48, 9, 16, 8),
        ] {
            let img = lcg_image(w, h, seed, levels);
            let fast = local_entropy_bits(&img, w, h, win).unwrap();
            let slow = local_entropy_bits_naive(&img, w, h, win).unwrap();
            for (a, b) in fast.as_slice().iter().zip(slow.as_slice()) {
                assert!((a - b).abs() < 1e-5, "{w}x{h} win {win}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn bad_window_and_length_are_errors() {
        assert_eq!(local_entropy_bits(&[0; 4], 2, 2, 4), Err(MaskError::BadWindow(4)));
        assert_eq!(local_entropy_bits(&[0; 4], 2, 2, 0), Err(MaskError::BadWindow(0)));
        assert!(matches!(
            local_entropy_bits(&[0; 3], 2, 2, 3),
            Err(MaskError::DataLength { len: 3, .. })
        ));
    }

    #[test]
    fn empty_image_gives_empty_grid() {
        let g = local_entropy_bits(&[], 0, 0, 3).unwrap();
        assert!(g.is_empty());
        assert!(
            complexity_mask(&[], 0, 0, 4, &ComplexityConfig::default())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn eq8_hand_computed() {
        let c = Grid::new(1, 4, vec![1.0, 2.0, 3.0, 5.0]).unwrap();
        let m = min_max_normalise(&c, 1.0);
        assert_eq!(m.as_slice(), &[0.0, 0.25, 0.5, 1.0]);
    }

    #[test]
    fn constant_image_is_flat_value_not_nan() {
        let img = vec![77u8; 32 * 32];
        let cfg = ComplexityConfig::default();
        let m = complexity_mask(&img, 32, 32, 4, &cfg).unwrap();
        assert_eq!(m.shape(), (8, 8));
        assert!(m.as_slice().iter().all(|&v| v == 1.0));
        let zero = ComplexityConfig { flat_value: 0.0, ..cfg };
        assert!(
            complexity_mask(&img, 32, 32, 4, &zero)
                .unwrap()
                .as_slice()
                .iter()
                .all(|&v| v == 0.0)
        );
    }

    #[test]
    fn textured_half_outweighs_flat_half() {
        // Left half noise, right half constant → M_d is high inside the noise and 0 on the far right.
        let (w, h) = (32, 16);
        let noise = lcg_image(w, h, 9, 256);
        let img: Vec<u8> = (0..w * h).map(|i| if i % w < w / 2 { noise[i] } else { 10 }).collect();
        let m = complexity_mask(&img, w, h, 4, &ComplexityConfig::default()).unwrap();
        assert_eq!(m.shape(), (4, 8));
        assert_eq!(m.get(2, 7), Some(0.0));
        assert!(m.get(2, 1).unwrap() > 0.9);
        assert!(m.as_slice().iter().all(|v| (0.0..=1.0).contains(v)));
    }
}
