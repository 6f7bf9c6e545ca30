//! Training: objectives (Eq. 1, Eq. 10, SFT).

pub mod objective;
