//! Training: objectives (Eq. 1, Eq. 10, SFT), run configuration, data preparation, the FocusDPO weight map of a
//! step, the optimiser, run directories and the threaded training session.

pub mod backbone;
pub mod config;
pub mod data;
pub mod export;
pub mod focus;
pub mod negatives;
pub mod objective;
pub mod optim;
pub mod pairs;
pub mod parallel;
pub mod pretrain;
pub mod run_store;
pub mod samples;
pub mod session;

pub use config::RunConfig;
pub use session::{Event, Launch, Session, SessionOptions, StepRecord, TrainError, Trainer};
