//! Evaluation: sampling from a base (+ LoRA), embedders (the built-in identity embedder that needs no download;
//! DINOv2 / CLIP from user-given weights) and the metrics of the paper and of the synthetic benchmark.

pub mod benchmark;
pub mod claim;
pub mod denoise;
pub mod dinov2;
pub mod dreambench;
pub mod identity;
pub mod metrics;
pub mod pretrained;
pub mod sampler;
pub mod study;

use std::path::PathBuf;

use image::RgbImage;

/// Errors from evaluation; each names the file or the input at fault.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Weights or tokenizer files that cannot be read or do not fit the model.
    #[error("{path}: {message}")]
    Weights {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Inputs the computation cannot take (empty sets, mismatched lengths, bad sizes).
    #[error("{0}")]
    Invalid(String),
    /// Tensor error.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// An image embedder: images → embedding vectors, L2-normalised, one per image.
pub trait ImageEmbedder: Send + Sync {
    /// Name reported with every metric computed from it (e.g. `dinov2-vits14`, `builtin-identity-v1`).
    fn name(&self) -> String;
    /// Embeds `images` (any size; the embedder resizes as it needs).
    fn embed_images(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>, EvalError>;
}

/// A text embedder in the same space as an [`ImageEmbedder`] (CLIP-T).
pub trait TextEmbedder: Send + Sync {
    /// Name reported with the metric.
    fn name(&self) -> String;
    /// Embeds `texts`, L2-normalised, one per text.
    fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EvalError>;
}
