//! The crate's error type.

use std::path::PathBuf;

/// Everything that can stop a rank's training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// A data file could not be opened or read (missing, permissions, broken gzip stream).
    #[error("data file {path}: {source}")]
    DataRead {
        /// The file being read.
        path: PathBuf,
        /// The underlying failure.
        source: std::io::Error,
    },
    /// A data file was read but its contents are not what the format promises.
    #[error("data file {path}: {message}")]
    DataFormat {
        /// The offending file.
        path: PathBuf,
        /// What was expected and what was found.
        message: String,
    },
    /// No directory holding the data set was found.
    #[error("data set {dataset} not found; looked in {}", looked_in.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    DatasetNotFound {
        /// Name of the data set.
        dataset: String,
        /// Every directory searched, in order, with why it was a candidate.
        looked_in: Vec<PathBuf>,
    },
    /// The configuration cannot be run on the data or world it was given.
    #[error("training config: {0}")]
    Config(String),
    /// candle refused a tensor operation.
    #[error("tensor operation: {0}")]
    Tensor(#[from] candle_core::Error),
    /// A collective operation between ranks failed.
    #[error("collective: {0}")]
    Collective(#[from] cohort_collective::Error),
    /// The optimizer could not reserve its state or was given state of another rule.
    #[error("optimizer: {0}")]
    Optimizer(#[from] cohort_numerics::Error),
    /// A parameter-server call failed (a server is gone, refused a request, timed out).
    #[error("parameter server: {0}")]
    ParameterServer(#[from] cohort_parameter_server::Error),
    /// A checkpoint could not be written or read back.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A CUDA device was asked for but this build or machine has no CUDA: the build lacks the
    /// `cuda` feature, or the driver is missing. The reason is part of the message, not a
    /// separate cause, so that one-line reports do not repeat it.
    #[error("cuda device {ordinal}: {reason}")]
    NoCuda {
        /// The device asked for.
        ordinal: usize,
        /// Why CUDA cannot be used ([`cohort_collective::Error::NotCompiledWithCuda`] or
        /// [`cohort_collective::Error::NoCudaDriver`]).
        reason: cohort_collective::Error,
    },
    /// A CUDA device was asked for in a build with device selection but without candle's CUDA
    /// kernels, so nothing could compute on it.
    #[error(
        "cuda device {ordinal}: this cohort was built without candle's CUDA kernels: rebuild \
         with --features candle-cuda (needs the CUDA toolkit)"
    )]
    NoCandleCudaKernels {
        /// The device asked for.
        ordinal: usize,
    },
    /// The driver is there but the device could not be opened (no such device, out of memory,
    /// a driver and runtime mismatch).
    #[error("cuda device {ordinal}: opening it failed: {reason}")]
    CudaDevice {
        /// The device asked for.
        ordinal: usize,
        /// candle's (cudarc's) error, part of the message like [`TrainerError::NoCuda`]'s.
        reason: candle_core::Error,
    },
    /// The loss became NaN or infinite; continuing would only spread garbage.
    #[error("training diverged at step {step}: loss is {loss}")]
    Diverged {
        /// Optimizer step at which the loss was observed.
        step: u64,
        /// The non-finite loss.
        loss: f32,
    },
}

/// Result alias of the crate.
pub type Result<T, E = TrainerError> = std::result::Result<T, E>;

impl TrainerError {
    /// Returns the peer rank a collective failure blames (one that disconnected, stalled or
    /// never joined), for reporting which rank brought the job down.
    pub fn failed_rank(&self) -> Option<usize> {
        match self {
            TrainerError::Collective(error) => error.failed_rank(),
            _ => None,
        }
    }
}
