//! peft-train: optimizers, learning-rate schedules, gradient clipping, metrics, early stopping,
//! metrics logs for the peft-rs trainer loop.

pub mod bench;
pub mod clip;
pub mod early_stop;
pub mod error;
pub mod log;
pub mod metrics;
pub mod ner;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod tasks;
pub mod trainer;
pub mod vision;

pub use error::{Result, TrainError};
pub use schedule::ScheduleConfig;
pub use trainer::{Evaluation, Task, TrainSummary, Trainer, TrainerConfig};
