//! Numerics shared by the training ranks and the parameter servers, so that neither reaches into
//! the other (or into `collective`) for its math: a job's update rule and learning rate are the
//! same whichever way its gradients travel.
//!
//! The crate knows flat `f32` buffers and nothing of models, tensor libraries or the network.
//!
//! - [`dtype`]: [`DType`], the element types gradients and parameters travel in (f32, bf16,
//!   f16).
//! - [`optimizer`]: the update rules over flat buffers, SGD with momentum and AdamW
//!   ([`OptimizerKind`], [`OptimizerConfig`], [`OptimizerState`], [`UpdateConstants`],
//!   [`optimizer::apply`]).
//! - [`schedule`]: the learning-rate schedule ([`LearningRateSchedule`]: linear warmup, then
//!   cosine or constant, [`LearningRateDecay`]).
//! - [`error`]: the crate's [`Error`] and [`Result`].

pub mod dtype;
pub mod error;
pub mod optimizer;
pub mod schedule;

pub use dtype::DType;
pub use error::{Error, Result};
pub use optimizer::{OptimizerConfig, OptimizerKind, OptimizerState, UpdateConstants};
pub use schedule::{LearningRateDecay, LearningRateSchedule};
