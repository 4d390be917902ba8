//! The coordinator's error type and its one mapping to `tonic::Status`.

use cohort_jobspec::SpecError;
use cohort_proto::IdError;

/// Everything that can go wrong inside the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing, malformed or out of bounds.
    #[error("{0}")]
    InvalidArgument(String),
    /// A submitted job spec was refused.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// An identifier in a request is malformed.
    #[error(transparent)]
    Id(#[from] IdError),
    /// The job asks for more than the cluster could ever give it.
    #[error("{0}")]
    Unschedulable(String),
    /// No job with this id.
    #[error("job {0} not found")]
    JobNotFound(String),
    /// No sweep with this id.
    #[error("sweep {0} not found")]
    SweepNotFound(String),
    /// No node with this id has ever registered.
    #[error("node {0} not found: no worker ever registered it")]
    NodeNotFound(String),
    /// A node's session is unknown or stale: it must register again.
    #[error("node {0} is not registered (or registered again elsewhere)")]
    UnknownSession(String),
    /// The job lifecycle refused a state change.
    #[error("job {job_id}: cannot go from {from} to {to}")]
    IllegalTransition {
        /// The job.
        job_id: String,
        /// Its current state.
        from: &'static str,
        /// The state asked for.
        to: &'static str,
    },
    /// A rendezvous wait or barrier ran out of time.
    #[error("{0}")]
    Timeout(String),
    /// The call carries no credential, or one the cluster does not know.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// A request is valid but the job is in no state to serve it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A resource bound was hit (log volume, key-value entries...).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The cluster store failed.
    #[error("cluster store: {0}")]
    Store(String),
    /// This coordinator no longer leads its group (its lease ended): it must write nothing
    /// more, and stops.
    #[error("this coordinator lost the leadership: {0}")]
    LostLeadership(String),
    /// Reading or writing local files failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Result with the coordinator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<Error> for tonic::Status {
    /// Maps the error to its status code. The message is cut to
    /// [`cohort_proto::text::MAX_ERROR_BYTES`], so every client can read it.
    fn from(error: Error) -> Self {
        let message =
            cohort_proto::text::truncate(&error.to_string(), cohort_proto::text::MAX_ERROR_BYTES)
                .into_owned();
        match error {
            Error::InvalidArgument(_) | Error::Spec(_) | Error::Id(_) => {
                tonic::Status::invalid_argument(message)
            }
            Error::Unschedulable(_)
            | Error::FailedPrecondition(_)
            | Error::IllegalTransition { .. } => tonic::Status::failed_precondition(message),
            Error::JobNotFound(_) | Error::NodeNotFound(_) | Error::SweepNotFound(_) => {
                tonic::Status::not_found(message)
            }
            Error::UnknownSession(_) => tonic::Status::unauthenticated(message),
            Error::Timeout(_) => tonic::Status::deadline_exceeded(message),
            Error::Unauthenticated(_) => tonic::Status::unauthenticated(message),
            Error::PermissionDenied(_) => tonic::Status::permission_denied(message),
            Error::ResourceExhausted(_) => tonic::Status::resource_exhausted(message),
            Error::LostLeadership(_) => tonic::Status::unavailable(message),
            Error::Store(_) | Error::Io { .. } | Error::Transport(_) => {
                tonic::Status::internal(message)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_message_fits_grpc_clients() {
        let error = Error::InvalidArgument("é".repeat(100_000));
        let status = tonic::Status::from(error);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().len() <= cohort_proto::text::MAX_ERROR_BYTES,
            "{}",
            status.message().len()
        );
        assert!(status.message().ends_with("bytes cut]"));
    }
}
