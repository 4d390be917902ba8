//! What every training loop shares: its configuration ([`TrainConfig`]), the schedule of a run
//! ([`schedule`]: steps, evaluations, checkpoints, `stop_after_*`), the loop driver that follows
//! it ([`driver`]), the one training step ([`step`]: from "gradients are ready" to "parameters
//! are updated"), [`stop`], checkpoint on request, [`early_stopping`], the decision to end a run
//! whose evaluations stopped improving, and [`retention`], which checkpoints a run deletes. A
//! loop (data-parallel [`crate::train`], parameter-server [`crate::train_with_parameter_server`],
//! the language model's mesh) only produces each step's gradients and says how it evaluates and
//! checkpoints.

pub mod config;
pub(crate) mod driver;
pub mod early_stopping;
pub(crate) mod plan;
pub mod retention;
pub(crate) mod schedule;
pub(crate) mod step;
pub mod stop;

pub use config::{DEFAULT_EVALUATION_BATCH, TrainConfig};
pub use step::MAX_SKIPPED_STEPS_IN_A_ROW;
pub use stop::StopSignal;
