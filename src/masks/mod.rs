//! The math core of FocusDPO's spatial weighting: token-grid masks and their fusion.
//!
//! Nothing here touches files, threads of the GUI or egui: every function takes in-memory grids or pixel slices
//! and returns grids, so the same code serves the CLI, the Studio and the training loop.
//!
//! | paper | here |
//! |---|---|
//! | `M_prior` (§4.1, A.2) | [`prior`] |
//! | `M_s`, Eq. 3–6 | [`attention_field`] |
//! | `M_d`, Eq. 7–8 | [`complexity`] |
//! | `A_focus` (Alg. 1 l.10), Eq. 9, Eq. 11, ablation variants | [`fusion`] |

pub mod attention_field;
pub mod complexity;
pub mod fusion;
pub mod grid;
pub mod prior;

pub use attention_field::{
    FOREGROUND_DELTA, LayerHidden, ReferencePool, Similarity, attention_field, reference_foreground, similarity_scores,
    top_k_indicator,
};
pub use complexity::{ComplexityConfig, complexity_mask, local_entropy_bits, min_max_normalise};
pub use fusion::{
    Branch, FusionOutput, FusionParams, MaskInputs, MaskVariant, focus_coverage, fuse, fuse_eq9, fuse_eq11,
};
pub use grid::Grid;
pub use prior::{PriorConfig, prior_token_mask, union};

/// Errors of the mask math. They arise from shapes and parameters, never from numerical edge cases (those have
/// defined results, see each function).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MaskError {
    /// A grid was built from a buffer of the wrong length.
    #[error("grid {height}×{width} needs {} values, got {len}", height * width)]
    DataLength {
        /// Requested rows.
        height: usize,
        /// Requested columns.
        width: usize,
        /// Values supplied.
        len: usize,
    },
    /// Two grids that must align do not.
    #[error("shape mismatch: expected {expected:?} (height, width), found {found:?}")]
    ShapeMismatch {
        /// The shape required.
        expected: (usize, usize),
        /// The shape given.
        found: (usize, usize),
    },
    /// Pooling with stride 0.
    #[error("token stride must be at least 1")]
    ZeroStride,
    /// The entropy window must be a positive odd number of pixels so that it is centred on the pixel.
    #[error("entropy window must be odd and ≥ 1, got {0}")]
    BadWindow(usize),
    /// A parameter outside its domain (e.g. γ ∉ [0, 1]).
    #[error("{name} = {value} is outside {range}")]
    OutOfRange {
        /// Parameter name as in the paper.
        name: &'static str,
        /// The value given.
        value: f64,
        /// The allowed range, human-readable.
        range: &'static str,
    },
    /// A variant that uses the attention field `M_s` was asked for without one.
    #[error("mask variant `{0}` needs the attention field M_s, which was not provided")]
    MissingAttentionField(&'static str),
    /// An empty list where at least one grid is required.
    #[error("{0}: at least one mask is required")]
    NoMasks(&'static str),
}
