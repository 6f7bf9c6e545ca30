//! The backbone: one FLUX-format MMDiT for the tiny default and for FLUX.1/UNO, plus noise schedules.

pub mod attention;
pub mod base;
pub mod checkpoint;
pub mod codec;
pub mod config;
pub mod encoder;
pub mod flux_shapes;
pub mod flux_text;
pub mod hf;
pub mod linear;
pub mod lora;
pub mod memory;
pub mod mmdit;
pub mod ops;
pub mod rope;
pub mod schedule;
pub mod testing;
pub mod text;
pub mod weights;
pub mod xflux_lora;

pub use base::{BaseError, BaseLora, BaseModel, BaseSource};
pub use codec::ImageCodec;
pub use config::{Config, ConfigError, Prediction};
pub use flux_text::TextConditioner;
pub use linear::{Adapters, Linear};
pub use mmdit::{
    BlockHidden, ForwardOptions, ForwardOutput, Mmdit, MmditInput, ModelError, Reference, ids_tensor, reference_ids,
    target_ids, text_ids, uno_reference_offsets,
};
pub use rope::Rope;
