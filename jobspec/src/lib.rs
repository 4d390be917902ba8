//! Job spec files: the TOML a user submits, its defaults, and its validation.
//!
//! The CLI validates a spec before sending it and the coordinator validates it again on
//! arrival, with the same code, so both report the same problems. Validation collects every
//! problem with its field path (`resources.ranks: 0, expected 1 to 4096`) instead of stopping at
//! the first.
//!
//! - [`job`]: the top-level [`JobSpec`] and its `[resources]` and `[command]` sections.
//! - [`mod@parse`]: from text to a validated [`JobSpec`], toml's and serde's errors turned into
//!   bounded problems that name the field.
//! - [`train`]: the sections of a `kind = "train"` job (`[model]`, `[data]`, `[optimizer]`,
//!   `[schedule]`, `[parallel]`; `[checkpoint]` re-exported from [`checkpoint`]).
//! - [`checkpoint`]: `[checkpoint]`, where checkpoints go, which are kept, and resuming.
//! - [`fault_tolerance`]: `[fault_tolerance]`, how often a failed job is restarted.
//! - [`early_stopping`]: `[early_stopping]`, and the rules of the fields that end a training run
//!   early or prune its checkpoints (`schedule.stop_after_*`, `checkpoint.keep_*`).
//! - [`objective`]: [`objective::Objective`], an evaluation metric and its direction, what early
//!   stopping, the best checkpoints and sweep leaderboards rank by.
//! - [`layout`]: the rules across training sections (model and data set, transformer meshes,
//!   parameter-server jobs) and the pure pipeline-stage balancing.
//! - [`parallel`]: `[parallel]`, the mesh of replicas, stages and shards and the gradient
//!   exchange (all-reduce or parameter servers).
//! - [`precision`]: `[train]`, the compute and gradient-exchange formats and fp16 loss scaling.
//! - [`problems`]: [`Problems`], the list of field-path errors validation produces, each bounded
//!   so that no error quotes more than a short excerpt of the input.
//! - [`sweep`]: sweep files, a base training job and the fields to search, their validation
//!   against the real job parser, and the job of each trial segment.

pub mod checkpoint;
pub mod early_stopping;
pub mod fault_tolerance;
pub mod job;
pub mod layout;
pub mod objective;
pub mod parallel;
pub mod parse;
pub mod precision;
pub mod problems;
pub mod sweep;
pub mod train;

pub use job::{CommandSpec, DeviceKind, JobKind, JobSpec, MAX_SPEC_BYTES, Resources};
pub use parse::parse;
pub use problems::{Problem, Problems, SpecError};

/// The only job-file format version this build understands.
pub const SPEC_VERSION: u32 = 1;
