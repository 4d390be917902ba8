//! What every training loop shares: its configuration ([`TrainConfig`]), the schedule of a run
//! ([`schedule`]: steps, evaluations, checkpoints), the loop driver that follows it
//! ([`driver`]), and the one training step ([`step`]: from "gradients are ready" to "parameters
//! are updated"), and [`stop`], checkpoint on request. A loop (data-parallel [`crate::train`], parameter-server
//! [`crate::train_with_parameter_server`], the language model's mesh) only produces each step's
//! gradients and says how it evaluates and checkpoints.

pub mod config;
pub(crate) mod driver;
pub(crate) mod plan;
pub(crate) mod schedule;
pub(crate) mod step;
pub mod stop;

pub use config::{DEFAULT_EVALUATION_BATCH, TrainConfig};
pub use step::MAX_SKIPPED_STEPS_IN_A_ROW;
pub use stop::StopSignal;
