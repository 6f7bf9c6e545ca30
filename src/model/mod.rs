//! The backbone: one FLUX-format MMDiT for the tiny default and for FLUX.1/UNO, plus noise schedules.

pub mod encoder;
pub mod schedule;
