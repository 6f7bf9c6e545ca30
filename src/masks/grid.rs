//! A dense, row-major 2-D field of `f32`: the one container every mask in the paper lives in.
//!
//! Pixel-level maps (the raw entropy `C_p` of Eq. 7) and token-level maps (`M_prior`, `M_s`, `M_d`, `M`) are both
//! `Grid`s; [`Grid::pool_mean`] takes one to the other.

use super::MaskError;

/// A `height × width` field of `f32` values stored row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    height: usize,
    width: usize,
    data: Vec<f32>,
}

impl Grid {
    /// Wraps `data` (row-major, `height * width` values) as a grid.
    pub fn new(height: usize, width: usize, data: Vec<f32>) -> Result<Self, MaskError> {
        if data.len() != height * width {
            return Err(MaskError::DataLength {
                height,
                width,
                len: data.len(),
            });
        }
        Ok(Self { height, width, data })
    }

    /// A grid with every cell equal to `value`.
    pub fn filled(height: usize, width: usize, value: f32) -> Self {
        Self {
            height,
            width,
            data: vec![value; height * width],
        }
    }

    /// A grid of zeros.
    pub fn zeros(height: usize, width: usize) -> Self {
        Self::filled(height, width, 0.0)
    }

    /// A grid of ones.
    pub fn ones(height: usize, width: usize) -> Self {
        Self::filled(height, width, 1.0)
    }

    /// Builds a grid from a closure of `(row, column)`.
    pub fn from_fn(height: usize, width: usize, mut f: impl FnMut(usize, usize) -> f32) -> Self {
        let mut data = Vec::with_capacity(height * width);
        for y in 0..height {
            for x in 0..width {
                data.push(f(y, x));
            }
        }
        Self { height, width, data }
    }

    /// Number of rows.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Number of columns.
    pub fn width(&self) -> usize {
        self.width
    }

    /// `(height, width)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.height, self.width)
    }

    /// Number of cells.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the grid has no cells.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The cells, row-major.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// Consumes the grid and returns its cells, row-major.
    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }

    /// The cell at `(row, column)`, or `None` outside the grid.
    pub fn get(&self, y: usize, x: usize) -> Option<f32> {
        (y < self.height && x < self.width).then(|| self.data[y * self.width + x])
    }

    /// ‖·‖₁: the sum of absolute values.
    pub fn l1_norm(&self) -> f64 {
        self.data.iter().map(|v| f64::from(v.abs())).sum()
    }

    /// The smallest and largest cell, or `None` for an empty grid.
    pub fn min_max(&self) -> Option<(f32, f32)> {
        let mut it = self.data.iter().copied();
        let first = it.next()?;
        Some(it.fold((first, first), |(lo, hi), v| (lo.min(v), hi.max(v))))
    }

    /// Applies `f` to every cell.
    pub fn map(&self, f: impl Fn(f32) -> f32) -> Self {
        Self {
            height: self.height,
            width: self.width,
            data: self.data.iter().map(|&v| f(v)).collect(),
        }
    }

    /// Combines two grids of the same shape cell by cell.
    pub fn zip_with(&self, other: &Grid, f: impl Fn(f32, f32) -> f32) -> Result<Self, MaskError> {
        self.expect_shape(other.shape())?;
        Ok(Self {
            height: self.height,
            width: self.width,
            data: self.data.iter().zip(&other.data).map(|(&a, &b)| f(a, b)).collect(),
        })
    }

    /// Hadamard product `self ⊙ other`.
    pub fn hadamard(&self, other: &Grid) -> Result<Self, MaskError> {
        self.zip_with(other, |a, b| a * b)
    }

    /// Errors unless the grid has the given `(height, width)`.
    pub fn expect_shape(&self, shape: (usize, usize)) -> Result<(), MaskError> {
        if self.shape() == shape {
            Ok(())
        } else {
            Err(MaskError::ShapeMismatch {
                expected: shape,
                found: self.shape(),
            })
        }
    }

    /// Average-pools non-overlapping `stride × stride` cells.
    ///
    /// The output has `ceil(height / stride) × ceil(width / stride)` cells. A cell on the right or bottom edge
    /// that covers fewer than `stride²` input cells averages only the cells that exist, so no padding value
    /// leaks into the result.
    pub fn pool_mean(&self, stride: usize) -> Result<Self, MaskError> {
        if stride == 0 {
            return Err(MaskError::ZeroStride);
        }
        let out_h = self.height.div_ceil(stride);
        let out_w = self.width.div_ceil(stride);
        let mut sums = vec![0.0f64; out_h * out_w];
        let mut counts = vec![0u32; out_h * out_w];
        for y in 0..self.height {
            let row = &self.data[y * self.width..(y + 1) * self.width];
            let oy = y / stride;
            for (x, &v) in row.iter().enumerate() {
                let o = oy * out_w + x / stride;
                sums[o] += f64::from(v);
                counts[o] += 1;
            }
        }
        let data = sums
            .iter()
            .zip(&counts)
            .map(|(&s, &c)| (s / f64::from(c.max(1))) as f32)
            .collect();
        Ok(Self {
            height: out_h,
            width: out_w,
            data,
        })
    }

    /// Nearest-neighbour upsampling by an integer factor (for visualising token grids at pixel size).
    pub fn upsample_nearest(&self, factor: usize) -> Self {
        let factor = factor.max(1);
        Self::from_fn(self.height * factor, self.width * factor, |y, x| {
            self.data[(y / factor) * self.width + x / factor]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_rejects_wrong_length() {
        assert!(matches!(
            Grid::new(2, 3, vec![0.0; 5]),
            Err(MaskError::DataLength { len: 5, .. })
        ));
    }

    #[test]
    fn pool_mean_exact_blocks() {
        // 2×4 → stride 2 → 1×2: means of [1,2,5,6] and [3,4,7,8].
        let g = Grid::new(2, 4, vec![1., 2., 3., 4., 5., 6., 7., 8.]).unwrap();
        let p = g.pool_mean(2).unwrap();
        assert_eq!(p.shape(), (1, 2));
        assert_eq!(p.as_slice(), &[3.5, 5.5]);
    }

    #[test]
    fn pool_mean_partial_edge_cells_average_only_real_pixels() {
        // 3×3 → stride 2 → 2×2. Bottom-right cell holds only the pixel 9.
        let g = Grid::new(3, 3, (1..=9).map(|v| v as f32).collect()).unwrap();
        let p = g.pool_mean(2).unwrap();
        assert_eq!(p.shape(), (2, 2));
        assert_eq!(p.as_slice(), &[3.0, 4.5, 7.5, 9.0]);
    }

    #[test]
    fn pool_mean_zero_stride_is_an_error() {
        assert!(matches!(Grid::zeros(2, 2).pool_mean(0), Err(MaskError::ZeroStride)));
    }

    #[test]
    fn zip_with_shape_mismatch_is_an_error() {
        let e = Grid::zeros(2, 2).hadamard(&Grid::zeros(2, 3)).unwrap_err();
        assert!(matches!(
            e,
            MaskError::ShapeMismatch {
                expected: (2, 3),
                found: (2, 2)
            }
        ));
    }

    #[test]
    fn l1_and_min_max() {
        let g = Grid::new(1, 3, vec![-1.0, 0.5, 2.0]).unwrap();
        assert_eq!(g.l1_norm(), 3.5);
        assert_eq!(g.min_max(), Some((-1.0, 2.0)));
        assert_eq!(Grid::zeros(0, 0).min_max(), None);
    }

    #[test]
    fn upsample_nearest_repeats_cells() {
        let g = Grid::new(1, 2, vec![1.0, 2.0]).unwrap();
        assert_eq!(
            g.upsample_nearest(2).as_slice(),
            &[1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0]
        );
    }
}
