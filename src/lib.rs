//! FocusDPO Studio: a workbench for FocusDPO (spatially-weighted Diffusion-DPO) on multi-subject personalized
//! image generators.
//!
//! - [`masks`]: the math core — `M_prior`, `M_d` (Eq. 7–8), fusion (Eq. 9, 11) — with no I/O.
//! - [`dip`]: Disrupted-Instance Pair datasets — manifest, loading, validation, synthetic generator.
//! - [`pipeline`]: glue from a loaded dataset item to its token-grid masks.
//! - [`experiment`]: ablation plans in the seeds' Markdown format and their mapping onto run-config knobs.
//! - [`store`]: atomic writes, safetensors and PNG export.
//! - `app` (the `gui` feature, on by default): the Studio window (eframe/egui); it only draws and sends commands to
//!   worker threads.

pub mod alloc;
#[cfg(feature = "gui")]
pub mod app;
pub mod config_enum;
pub mod dip;
pub mod eval;
pub mod experiment;
pub mod knobs;
pub mod masks;
pub mod model;
pub mod pipeline;
pub mod rng;
pub mod store;
pub mod train;
