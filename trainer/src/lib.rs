//! The training runtime a rank runs: models, data, optimizers and the data-parallel loop, on
//! the CPU or a CUDA device with candle.
//!
//! The `cohort` binary's rank entry point parses the job spec, loads the data with
//! [`data::load`], connects a communicator and calls [`train`]; everything else lives here.
//!
//! - [`train_loop`]: [`train`], the loop one rank runs (broadcast, per-step forward, backward,
//!   gradient exchange and update, end-of-epoch evaluation, checkpoints), and [`TrainConfig`].
//! - [`parameter_server`]: [`train_with_parameter_server`], the loop of a rank of a
//!   `comm = "ps"` job (push gradients, pull parameters, row-sparse embedding tables), and the
//!   server configuration a job spec implies.
//! - [`device`]: [`ComputeDevice`], where the passes run (CPU or a CUDA device, with the f32
//!   masters and the optimizer kept in host memory), and opening it with typed errors.
//! - [`data_parallel`]: parameter broadcast and the bucketed gradient all-reduce that keeps
//!   replicas identical, overlapped with the backward pass.
//! - [`precision`]: mixed precision: working formats, gradient-exchange formats, fp16 loss
//!   scaling and the agreement on skipped steps.
//! - [`sampler`]: the deterministic distributed sampler (which examples each rank takes at each
//!   step) and how uneven shares are weighted.
//! - [`language_model`]: training the transformer on a data x pipeline x tensor mesh
//!   ([`language_model::train_language_model`]), layout-independent checkpoints, sampling.
//! - [`mesh`]: where a rank sits in the mesh and its data, tensor and pipeline communicators.
//! - [`text`]: the Shakespeare corpus, its character vocabulary, splits and windows.
//! - [`data`]: in-memory data sets, Fashion-MNIST discovery and loading, synthetic data.
//! - [`idx`]: the strict reader of (gzipped) IDX files.
//! - [`pipeline`]: pipeline parallelism on one stage: the GPipe and 1F1B schedules and the
//!   engine that runs a [`pipeline::PipelineStage`] in their order over peer links.
//! - [`models`]: the MLP and the CNN, and their layer-by-layer (staged) backward pass.
//! - [`embedding`]: the embedding model's pixel tokens and its bag-of-tokens first stage.
//! - [`transformer`]: the GPT-style transformer, cut into pipeline stages and split over
//!   tensor-parallel ranks (Megatron's `f` and `g`), with name-seeded initialisation.
//! - [`host_memory`]: the allocator setting that keeps freed tensor buffers for the next step.
//! - [`parameters`]: a model's parameters as one ordered set with a flat f32 view.
//! - [`optim`]: [`optim::Optimizer`], a rank's SGD or AdamW over its parameters, with the update
//!   rules and learning-rate schedule of `cohort_numerics` (clipping is part of the step).
//! - [`checkpoint`]: safetensors checkpoints of weights, optimizer state and step.
//! - [`metrics`]: step and evaluation metrics, phase timings and the [`MetricsSink`] trait.
//! - [`error`]: [`TrainerError`] and the crate's `Result`.

pub mod checkpoint;
pub mod data;
pub mod data_parallel;
pub mod device;
pub mod embedding;
pub mod error;
pub mod evaluation;
pub mod host_memory;
pub mod idx;
pub mod language_model;
pub mod mesh;
pub mod metrics;
pub mod models;
pub mod optim;
pub mod parameter_server;
pub mod parameters;
pub mod pipeline;
pub mod precision;
pub mod run;
pub mod sampler;
pub mod text;
pub mod train_loop;
pub mod transformer;

pub use device::ComputeDevice;
pub use error::{Result, TrainerError};
pub use metrics::{
    CheckpointWritten, EarlyStop, EvaluationMetrics, MetricsSink, PhaseTimings, StepMetrics,
};
pub use parameter_server::{ParameterServerLink, train_with_parameter_server};
pub use run::TrainConfig;
pub use run::plan::TrainOutcome;
pub use train_loop::train;
