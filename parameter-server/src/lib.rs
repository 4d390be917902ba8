//! Sharded parameter servers: the second way Cohort jobs exchange gradients, besides all-reduce.
//!
//! A job's flat parameter space (the model's tensors in order) is split into S shards by a pure
//! function of the tensor list ([`plan_shards`]); one server process holds one shard
//! ([`ShardServer`], served over gRPC by [`serve`]) and applies the optimizer there. Training
//! ranks use a [`ParameterClient`] to push gradients to every shard and pull fresh parameters in
//! the same round trip. Shards run in sync mode (the result of all-reduce data parallelism),
//! async mode (each push applied on arrival) or ssp mode (bounded staleness). Embedding tables
//! can be declared row-sparse: only the rows a batch touched travel. The crate knows flat `f32`
//! tensors, not models.
//!
//! - [`sharding`]: [`TensorDeclaration`], [`plan_shards`] and the [`ShardPlan`] it returns.
//! - [`config`]: [`ServerConfig`] (job, shard, mode, optimizer, schedule, [`Limits`]) and
//!   [`ClientConfig`]. The update rules, their hyper-parameters and the learning-rate schedule
//!   come from `cohort_numerics` (shared with the training ranks), the mode ([`PsMode`]) from
//!   the job spec.
//! - [`encoding`]: wire element types ([`DType`]: f32, bf16, f16) and chunking of raw bytes.
//! - [`shard`]: one shard's state and rules (admission of pushes per mode, pull gates, updates);
//!   [`shard::assembly`] checks streamed requests against the shard before anything changes.
//! - [`server`]: [`ShardServer`], the shard as an async library type.
//! - [`service`]: the gRPC handlers (decode, call [`ShardServer`], encode), and [`serve`] /
//!   [`serve_shard`], which put a shard behind them on a listener.
//! - [`snapshot`]: safetensors snapshots of a shard for checkpoints, and restoring from them.
//! - [`client`]: [`ParameterClient`], used by training ranks: splits, pushes and pulls all
//!   shards concurrently, counts bytes on the wire.
//! - [`bench`]: push+pull throughput for `cohort bench ps`.
//! - [`error`]: the crate's [`Error`], [`Result`] and the mapping to `tonic::Status`.

#![warn(missing_docs)]

pub mod bench;
pub mod client;
pub mod config;
pub mod encoding;
pub mod error;
pub mod server;
pub mod service;
pub mod shard;
pub mod sharding;
pub mod snapshot;

pub use client::{ParameterClient, RowSelection, SparseGradient, StepReport, Traffic};
pub use config::{
    ClientConfig, LearningRateDecay, Limits, OptimizerConfig, OptimizerKind, PsMode,
    ScheduleConfig, ServerConfig,
};
pub use encoding::DType;
pub use error::{Error, Result};
pub use server::{ShardParameters, ShardServer, ShardStatus, shard_address_key};
pub use service::{serve, serve_shard};
pub use sharding::{ShardLayout, ShardPlan, TensorDeclaration, plan_shards};
