//! Training: objectives (Eq. 1, Eq. 10, SFT) and run directories.

pub mod objective;
pub mod optim;
pub mod run_store;
