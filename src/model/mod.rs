//! The backbone: one FLUX-format MMDiT for the tiny default and for FLUX.1/UNO, plus noise schedules.

pub mod config;
pub mod encoder;
pub mod linear;
pub mod lora;
pub mod mmdit;
pub mod rope;
pub mod schedule;
pub mod testing;

pub use config::{Config, ConfigError};
pub use linear::Linear;
pub use mmdit::{
    BlockHidden, ForwardOptions, ForwardOutput, Mmdit, MmditInput, ModelError, Reference, ids_tensor, reference_ids,
    target_ids, text_ids, uno_reference_offsets,
};
pub use rope::Rope;
