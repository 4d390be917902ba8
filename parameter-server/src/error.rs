//! The crate's one error type, its `Result` alias, and its one mapping to `tonic::Status`.
//!
//! Server-side errors become gRPC statuses in [`From<Error> for tonic::Status`]; client-side, a
//! status the server answered with becomes [`Error::Remote`], naming the shard, so that a rank
//! can report which parameter server refused or failed.

use std::time::Duration;

/// Result of every fallible operation in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in sharding, the server and the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field, tensor length, chunk size or configuration value is out of range or
    /// does not match the shard.
    #[error("{0}")]
    InvalidArgument(String),

    /// The server or client configuration has problems; every one is listed with its field path.
    #[error("parameter server config: {}", problems.join("; "))]
    Config {
        /// One entry per problem: `limits.max_chunk_bytes = 0, expected 4096 to 67108864`.
        problems: Vec<String>,
    },

    /// A rank pushed a step it has already pushed (a retried request).
    #[error("rank {rank} already pushed step {step}; the shard expects step {next_step} next")]
    DuplicatePush {
        /// The pushing rank.
        rank: u32,
        /// The step it pushed.
        step: u64,
        /// The step the shard expects from it.
        next_step: u64,
    },

    /// A push was computed from parameters that are too old for the shard's mode.
    #[error("rank {rank} pushed step {step} computed from version {version}: {detail}")]
    StalePush {
        /// The pushing rank.
        rank: u32,
        /// Its step.
        step: u64,
        /// The parameter version the gradients were computed from.
        version: u64,
        /// What the shard expected instead.
        detail: String,
    },

    /// The shard has no parameters yet: no Init has completed.
    #[error("shard {shard_id} is not initialised: a rank must call Init first")]
    NotInitialised {
        /// The shard.
        shard_id: u32,
    },

    /// A request was sharded with a different tensor list or shard count than the shard's.
    #[error(
        "shard {shard_id}: layout fingerprint {found:#018x}, expected {expected:#018x} (the rank \
         declared different tensors or shard count than the rank that initialised the shard)"
    )]
    LayoutMismatch {
        /// The shard.
        shard_id: u32,
        /// The shard's fingerprint.
        expected: u64,
        /// The request's fingerprint.
        found: u64,
    },

    /// A wait (for other ranks' gradients, the staleness bound or initialisation) ran out of
    /// time.
    #[error("shard {shard_id}: {who} waited {waited:?} for {what}")]
    Timeout {
        /// The shard.
        shard_id: u32,
        /// Who waited (`rank 3`, `a snapshot request`).
        who: String,
        /// What it waited for.
        what: &'static str,
        /// How long.
        waited: Duration,
    },

    /// Memory for a shard's buffers could not be reserved.
    #[error("cannot allocate {bytes} bytes for {what}")]
    OutOfMemory {
        /// What the memory was for.
        what: &'static str,
        /// How much was asked for.
        bytes: u64,
    },

    /// A snapshot could not be written or read back.
    #[error("snapshot: {0}")]
    Snapshot(String),

    /// A local operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// The gRPC server or a client connection failed at the transport level.
    #[error("{context}: {source}")]
    Transport {
        /// What was being done (`connect to shard 1 at 10.0.0.2:4000`).
        context: String,
        /// The transport's error.
        source: tonic::transport::Error,
    },

    /// A shard's server answered a request with an error.
    #[error("shard {shard_id} at {address}: {code:?}: {message}")]
    Remote {
        /// The shard.
        shard_id: u32,
        /// The address the client connected to.
        address: String,
        /// The gRPC status code.
        code: tonic::Code,
        /// The server's message.
        message: String,
    },

    /// A shard's server answered with something the protocol does not allow.
    #[error("shard {shard_id} at {address} broke the protocol: {detail}")]
    Protocol {
        /// The shard.
        shard_id: u32,
        /// The address the client connected to.
        address: String,
        /// What was expected and what arrived.
        detail: String,
    },

    /// A worker thread doing tensor work failed (a bug, not bad input).
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// Builds an [`Error::InvalidArgument`] from a message.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }

    /// Returns the gRPC code a server would answer this error with, or the code a remote shard
    /// answered with.
    pub fn code(&self) -> tonic::Code {
        match self {
            Error::InvalidArgument(_) | Error::Config { .. } | Error::Snapshot(_) => {
                tonic::Code::InvalidArgument
            }
            Error::DuplicatePush { .. } => tonic::Code::AlreadyExists,
            Error::StalePush { .. }
            | Error::NotInitialised { .. }
            | Error::LayoutMismatch { .. } => tonic::Code::FailedPrecondition,
            Error::Timeout { .. } => tonic::Code::DeadlineExceeded,
            Error::OutOfMemory { .. } => tonic::Code::ResourceExhausted,
            Error::Transport { .. } => tonic::Code::Unavailable,
            Error::Remote { code, .. } => *code,
            Error::Io { .. } | Error::Protocol { .. } | Error::Internal(_) => tonic::Code::Internal,
        }
    }
}

impl From<cohort_numerics::Error> for Error {
    fn from(error: cohort_numerics::Error) -> Self {
        match error {
            cohort_numerics::Error::OutOfMemory { what, bytes } => {
                Error::OutOfMemory { what, bytes }
            }
            cohort_numerics::Error::StateMismatch => Error::Internal(error.to_string()),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        // Cut like the coordinator's, so that no request can make the answer unreadable.
        let message = error.to_string();
        let message = cohort_proto::text::truncate(&message, cohort_proto::text::MAX_ERROR_BYTES);
        tonic::Status::new(error.code(), message.into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_message_stays_short_whatever_the_request_held() {
        let status = tonic::Status::from(Error::invalid(format!(
            "tensor {} is not declared",
            "é".repeat(1_000_000)
        )));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().len() <= cohort_proto::text::MAX_ERROR_BYTES);
        assert!(status.message().starts_with("tensor éé"));
    }

    #[test]
    fn statuses_carry_the_code_and_the_message() {
        let status = tonic::Status::from(Error::DuplicatePush {
            rank: 2,
            step: 4,
            next_step: 5,
        });
        assert_eq!(status.code(), tonic::Code::AlreadyExists);
        assert_eq!(
            status.message(),
            "rank 2 already pushed step 4; the shard expects step 5 next"
        );
        let status = tonic::Status::from(Error::invalid("shard_id = 7, expected 0..2"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let config = Error::Config {
            problems: vec!["ranks = 0, expected 1 to 4096".into(), "b".into()],
        };
        assert_eq!(
            config.to_string(),
            "parameter server config: ranks = 0, expected 1 to 4096; b"
        );
    }
}
