//! The worker daemon's error type.

/// Everything that can go wrong in the worker daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is invalid (node id, coordinator address, device list).
    #[error("{0}")]
    Config(String),
    /// The coordinator refused a call or could not be reached.
    #[error("coordinator {address}: {status}")]
    Rpc {
        /// The coordinator's address.
        address: String,
        /// What it answered.
        status: Box<tonic::Status>,
    },
    /// Connecting to the coordinator failed.
    #[error("coordinator {address}: {source}")]
    Connect {
        /// The coordinator's address.
        address: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// A start instruction does not hold a valid launch.
    #[error("start instruction: {0}")]
    Launch(#[from] cohort_proto::launch::LaunchError),
    /// The coordinator's instruction stream broke the protocol.
    #[error("coordinator {0}: protocol error: {1}")]
    Protocol(String, String),
    /// The device inventory could not be read.
    #[error("device inventory: {0}")]
    Devices(String),
    /// GPUs were asked for, but this build has no CUDA support.
    #[error("not compiled with CUDA support: rebuild with `--features cuda`")]
    NotCompiledWithCuda,
    /// GPUs were asked for, but the CUDA driver library could not be loaded.
    #[error("no CUDA driver found (libcuda.so could not be loaded)")]
    NoCudaDriver,
    /// Another live worker holds the state directory.
    #[error(
        "state directory {0} is in use by another worker: give each worker on a machine its own --state-dir"
    )]
    StateDirInUse(std::path::PathBuf),
    /// A rank process could not be started or controlled, or the state directory could not
    /// be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Result with the worker's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
