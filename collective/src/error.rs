//! The crate's one error type and its `Result` alias.
//!
//! Every error that involves another rank names it, so that a job that fails can say which rank
//! to blame; [`Error::failed_rank`] extracts that rank for callers that report it elsewhere.

use std::io;
use std::time::Duration;

use crate::buffer::DType;
use crate::operation::Collective;

/// Result of every fallible operation in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a peer was declared failed, as carried by an abort notice around the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortCause {
    /// The peer's connection closed or was reset.
    Disconnected,
    /// The peer stopped sending or receiving for longer than the I/O timeout.
    Stalled,
    /// The peer sent something the protocol does not allow (often: ranks called different
    /// collectives, or the same collective with different lengths).
    ProtocolViolation,
    /// The reporting rank failed for a reason of its own (an I/O error on its side).
    LocalFailure,
}

impl AbortCause {
    /// Returns the code that represents the cause on the wire.
    pub(crate) fn code(self) -> u32 {
        match self {
            AbortCause::Disconnected => 1,
            AbortCause::Stalled => 2,
            AbortCause::ProtocolViolation => 3,
            AbortCause::LocalFailure => 4,
        }
    }

    /// Decodes a wire code; unknown codes read as [`AbortCause::LocalFailure`].
    pub(crate) fn from_code(code: u32) -> AbortCause {
        match code {
            1 => AbortCause::Disconnected,
            2 => AbortCause::Stalled,
            3 => AbortCause::ProtocolViolation,
            _ => AbortCause::LocalFailure,
        }
    }
}

impl std::fmt::Display for AbortCause {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            AbortCause::Disconnected => "disconnected",
            AbortCause::Stalled => "stalled",
            AbortCause::ProtocolViolation => "broke the protocol",
            AbortCause::LocalFailure => "failed",
        })
    }
}

/// How a [`PeerLink`](crate::PeerLink) failed; carried by [`Error::Link`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkFailure {
    /// The peer closed the connection or it was reset (the peer's process or link is gone).
    Disconnected,
    /// The peer made no progress for the receive timeout.
    Stalled {
        /// `"sent nothing"` (a receive waited) or `"accepted no data"` (a send waited).
        activity: &'static str,
        /// How long this rank waited.
        waited: Duration,
    },
    /// The peer sent something the protocol does not allow (another tag than expected, a bad
    /// or oversized frame).
    Protocol {
        /// What was expected and what arrived.
        detail: String,
    },
    /// An operating-system error on the connection other than a disconnection.
    Io {
        /// The operating system's error, as text.
        detail: String,
    },
    /// The message given to [`PeerLink::send`](crate::PeerLink::send) cannot be sent (its shape does not match its
    /// values, or it is too large). The link stays usable.
    Rejected {
        /// What was expected and what was given.
        detail: String,
    },
}

impl LinkFailure {
    /// Whether the failure is the peer's doing (rather than this rank's arguments).
    pub fn blames_peer(&self) -> bool {
        !matches!(self, LinkFailure::Rejected { .. })
    }

    /// Classifies an error of a read or write on the connection.
    pub(crate) fn from_io(
        error: &io::Error,
        activity: &'static str,
        waited: Duration,
    ) -> LinkFailure {
        match error.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::WriteZero => LinkFailure::Disconnected,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                LinkFailure::Stalled { activity, waited }
            }
            _ => LinkFailure::Io {
                detail: error.to_string(),
            },
        }
    }
}

impl std::fmt::Display for LinkFailure {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkFailure::Disconnected => formatter.write_str("peer disconnected"),
            LinkFailure::Stalled { activity, waited } => {
                write!(formatter, "peer {activity} for {waited:?}")
            }
            LinkFailure::Protocol { detail } => {
                write!(formatter, "peer broke the protocol: {detail}")
            }
            LinkFailure::Io { detail } => write!(formatter, "i/o error: {detail}"),
            LinkFailure::Rejected { detail } => write!(formatter, "message not sent: {detail}"),
        }
    }
}

/// Everything that can go wrong in rendezvous, ring setup and collectives.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The rendezvous store failed (a transport or server error); the message comes from the
    /// store implementation.
    #[error("rendezvous store: {message}")]
    Store {
        /// What the store reported.
        message: String,
    },

    /// A [`crate::Store::wait`] call ran out of time before every key existed.
    #[error("rendezvous store: timed out after {timeout:?} waiting for keys {keys:?}")]
    StoreTimeout {
        /// The keys waited for (those still missing, where the store knows which).
        keys: Vec<String>,
        /// How long the call waited.
        timeout: Duration,
    },

    /// Some ranks never published their address, so the ring cannot form.
    #[error(
        "rendezvous {prefix:?}: rank(s) {missing_ranks:?} of {world_size} did not publish an \
         address within {timeout:?}"
    )]
    RanksMissing {
        /// The communicator's key prefix.
        prefix: String,
        /// Ranks whose address key is absent.
        missing_ranks: Vec<usize>,
        /// Number of ranks expected.
        world_size: usize,
        /// How long this rank waited.
        timeout: Duration,
    },

    /// A rank published something that is not a `host:port` socket address.
    #[error("rendezvous {prefix:?}: rank {peer} published address {found:?}, expected host:port")]
    BadAddress {
        /// The communicator's key prefix.
        prefix: String,
        /// The rank that published it.
        peer: usize,
        /// The published text (lossily decoded).
        found: String,
    },

    /// A local operating-system call failed (creating a poller, reading a socket's address).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The operating system's error.
        source: io::Error,
    },

    /// A constructor argument or configuration value is out of range.
    #[error("{field} = {found}, expected {expected}")]
    InvalidArgument {
        /// Name of the argument or configuration field (`config.chunk_bytes`).
        field: &'static str,
        /// The value given.
        found: String,
        /// What would have been accepted.
        expected: &'static str,
    },

    /// The listening socket could not be bound.
    #[error("listen on {address}: {source}")]
    Listen {
        /// The address asked for.
        address: String,
        /// The operating system's error.
        source: io::Error,
    },

    /// Connecting to the next rank failed.
    #[error("connect to rank {peer} at {address}: {source}")]
    Connect {
        /// The rank connected to.
        peer: usize,
        /// The address it published.
        address: String,
        /// The operating system's error.
        source: io::Error,
    },

    /// Setting up a connection with a neighbour failed or did not finish in time.
    #[error("handshake with rank {peer}: {detail}")]
    Handshake {
        /// The neighbour rank.
        peer: usize,
        /// What went wrong.
        detail: String,
    },

    /// A collective was called with buffers of the wrong length.
    #[error("{collective}: {what} has {found} elements, expected {expected}")]
    LengthMismatch {
        /// The collective called.
        collective: Collective,
        /// Which argument (`output`).
        what: &'static str,
        /// Its length.
        found: usize,
        /// The length required.
        expected: usize,
    },

    /// A collective was called with input and output of different element types.
    #[error("{collective}: output is {output}, expected {input} like the input")]
    DtypeMismatch {
        /// The collective called.
        collective: Collective,
        /// The input's element type.
        input: DType,
        /// The output's element type.
        output: DType,
    },

    /// A root rank outside `0..world_size`.
    #[error("{collective}: root rank {root} out of range, expected 0..{world_size}")]
    RootOutOfRange {
        /// The collective called.
        collective: Collective,
        /// The root given.
        root: usize,
        /// The communicator's world size.
        world_size: usize,
    },

    /// A neighbour's connection closed or was reset.
    #[error("{collective}: peer rank {peer} disconnected")]
    PeerDisconnected {
        /// The collective in progress.
        collective: Collective,
        /// The neighbour whose connection closed.
        peer: usize,
    },

    /// The ring made no progress for the I/O timeout; `peer` is the rank the ring was waiting on
    /// (found by following the ranks that were themselves waiting, not just the neighbour).
    #[error("{collective}: peer rank {peer} {activity} for {waited:?}")]
    PeerStalled {
        /// The collective in progress.
        collective: Collective,
        /// The rank blamed.
        peer: usize,
        /// `"sent nothing"`, `"accepted no data"` or `"stopped taking part"` (when the blame
        /// came from other waiting ranks).
        activity: &'static str,
        /// How long this rank waited without progress.
        waited: Duration,
    },

    /// Another rank detected a failure and told the ring to abort.
    #[error("{collective}: aborted, peer rank {failed_rank} {cause} (reported by rank {reporter})")]
    Aborted {
        /// The collective in progress.
        collective: Collective,
        /// The rank that failed.
        failed_rank: usize,
        /// How it failed.
        cause: AbortCause,
        /// The rank that detected it.
        reporter: usize,
    },

    /// An I/O error other than a disconnection on a neighbour's connection.
    #[error("{collective}: i/o error with peer rank {peer}: {source}")]
    PeerIo {
        /// The collective in progress.
        collective: Collective,
        /// The neighbour.
        peer: usize,
        /// The operating system's error.
        source: io::Error,
    },

    /// A neighbour sent a message this rank did not expect.
    #[error("{collective}: peer rank {peer} broke the protocol: {detail}")]
    Protocol {
        /// The collective in progress.
        collective: Collective,
        /// The neighbour.
        peer: usize,
        /// What was expected and what arrived.
        detail: String,
    },

    /// An earlier collective failed, leaving the connections in an unknown state; the
    /// communicator refuses further work.
    #[error("{collective}: communicator unusable after an earlier failure: {first_failure}")]
    Poisoned {
        /// The collective attempted.
        collective: Collective,
        /// The message of the failure that broke the communicator.
        first_failure: String,
        /// The rank blamed by that failure, if any.
        failed_rank: Option<usize>,
    },

    /// A point-to-point [`crate::PeerLink`] failed: the peer disconnected, stalled or broke
    /// the protocol, or a message could not be sent.
    #[error("link {link:?} with peer rank {peer}: {failure}")]
    Link {
        /// The link's name (its store key prefix).
        link: String,
        /// The rank at the other end.
        peer: usize,
        /// What went wrong.
        failure: LinkFailure,
    },

    /// A GPU path was asked for in a build without the `cuda` feature.
    #[error("this cohort was built without CUDA support: rebuild with `--features cuda`")]
    NotCompiledWithCuda,

    /// A GPU path was asked for, but the CUDA driver library could not be loaded.
    #[error("no CUDA driver found (libcuda.so.1 could not be loaded)")]
    NoCudaDriver,

    /// NCCL was asked for, but its library could not be loaded.
    #[error(
        "no NCCL library found (libnccl.so could not be loaded; install NCCL with its \
         development package, or put a libnccl.so link to libnccl.so.2 on LD_LIBRARY_PATH)"
    )]
    NoNccl,

    /// A CUDA driver call outside any communicator failed (counting devices).
    #[error("cuda {operation}: {message}")]
    Cuda {
        /// What was being done (`count devices`).
        operation: &'static str,
        /// The driver's error.
        message: String,
    },

    /// An NCCL communicator failed: an NCCL or CUDA call returned an error, NCCL reported an
    /// asynchronous error, or a collective did not complete within the communicator's timeout.
    /// The communicator has been aborted; later calls return [`Error::Poisoned`]. NCCL does not
    /// say which rank failed, so this error blames none.
    #[error("nccl {operation}: {message}")]
    Nccl {
        /// The collective's name (`all_reduce`, as [`Collective::name`]), `setup` while the
        /// communicator forms, or `synchronize` while waiting for device collectives.
        operation: &'static str,
        /// What went wrong, with NCCL's own description where it gives one.
        message: String,
    },
}

impl Error {
    /// Returns the rank this error blames, if it blames one: the peer that disconnected,
    /// stalled, broke the protocol or never showed up.
    pub fn failed_rank(&self) -> Option<usize> {
        match self {
            Error::RanksMissing { missing_ranks, .. } => missing_ranks.first().copied(),
            Error::BadAddress { peer, .. }
            | Error::Connect { peer, .. }
            | Error::Handshake { peer, .. }
            | Error::PeerDisconnected { peer, .. }
            | Error::PeerStalled { peer, .. }
            | Error::PeerIo { peer, .. }
            | Error::Protocol { peer, .. } => Some(*peer),
            Error::Aborted { failed_rank, .. } => Some(*failed_rank),
            Error::Poisoned { failed_rank, .. } => *failed_rank,
            Error::Link { peer, failure, .. } => failure.blames_peer().then_some(*peer),
            Error::Store { .. }
            | Error::StoreTimeout { .. }
            | Error::Io { .. }
            | Error::InvalidArgument { .. }
            | Error::Listen { .. }
            | Error::LengthMismatch { .. }
            | Error::DtypeMismatch { .. }
            | Error::RootOutOfRange { .. }
            | Error::NotCompiledWithCuda
            | Error::NoCudaDriver
            | Error::NoNccl
            | Error::Cuda { .. }
            | Error::Nccl { .. } => None,
        }
    }

    /// Returns the error with every rank it names replaced by `names[rank]` (ranks beyond
    /// `names` stay as they are): a communicator that is one part of a larger group reports
    /// the group's ranks. [`Error::Aborted`] is left alone: abort notices already carry names.
    pub(crate) fn with_rank_names(self, names: &[usize]) -> Error {
        let name = |rank: usize| names.get(rank).copied().unwrap_or(rank);
        match self {
            Error::RanksMissing {
                prefix,
                missing_ranks,
                world_size,
                timeout,
            } => Error::RanksMissing {
                prefix,
                missing_ranks: missing_ranks.into_iter().map(name).collect(),
                world_size,
                timeout,
            },
            Error::BadAddress {
                prefix,
                peer,
                found,
            } => Error::BadAddress {
                prefix,
                peer: name(peer),
                found,
            },
            Error::Connect {
                peer,
                address,
                source,
            } => Error::Connect {
                peer: name(peer),
                address,
                source,
            },
            Error::Handshake { peer, detail } => Error::Handshake {
                peer: name(peer),
                detail,
            },
            Error::PeerDisconnected { collective, peer } => Error::PeerDisconnected {
                collective,
                peer: name(peer),
            },
            Error::PeerStalled {
                collective,
                peer,
                activity,
                waited,
            } => Error::PeerStalled {
                collective,
                peer: name(peer),
                activity,
                waited,
            },
            Error::PeerIo {
                collective,
                peer,
                source,
            } => Error::PeerIo {
                collective,
                peer: name(peer),
                source,
            },
            Error::Protocol {
                collective,
                peer,
                detail,
            } => Error::Protocol {
                collective,
                peer: name(peer),
                detail,
            },
            Error::Poisoned {
                collective,
                first_failure,
                failed_rank,
            } => Error::Poisoned {
                collective,
                first_failure,
                failed_rank: failed_rank.map(name),
            },
            Error::Link {
                link,
                peer,
                failure,
            } => Error::Link {
                link,
                peer: name(peer),
                failure,
            },
            other => other,
        }
    }

    /// Returns how the blamed rank failed, for the abort notice sent to the other ranks.
    pub(crate) fn abort_cause(&self) -> AbortCause {
        match self {
            Error::PeerDisconnected { .. } => AbortCause::Disconnected,
            Error::PeerStalled { .. } => AbortCause::Stalled,
            Error::Protocol { .. } => AbortCause::ProtocolViolation,
            Error::Aborted { cause, .. } => *cause,
            _ => AbortCause::LocalFailure,
        }
    }
}

/// The failure that made a communicator unusable, kept so that every later call fails with
/// [`Error::Poisoned`] naming it.
#[derive(Debug, Default)]
pub(crate) struct FirstFailure(Option<(String, Option<usize>)>);

impl FirstFailure {
    /// Fails with [`Error::Poisoned`] if a failure was recorded.
    pub(crate) fn check(&self, collective: Collective) -> Result<()> {
        match &self.0 {
            None => Ok(()),
            Some((first_failure, failed_rank)) => Err(Error::Poisoned {
                collective,
                first_failure: first_failure.clone(),
                failed_rank: *failed_rank,
            }),
        }
    }

    /// Records `error` unless a failure was recorded before.
    pub(crate) fn record(&mut self, error: &Error) {
        self.record_text(error.to_string(), error.failed_rank());
    }

    /// Records a failure described by `text`, blaming `failed_rank`, unless one was recorded
    /// before.
    pub(crate) fn record_text(&mut self, text: String, failed_rank: Option<usize>) {
        if self.0.is_none() {
            self.0 = Some((text, failed_rank));
        }
    }

    /// Whether a failure was recorded.
    pub(crate) fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

/// Fails with [`Error::InvalidArgument`] naming the first of `durations` that is zero: the
/// timeouts of every communicator's config must be positive.
pub(crate) fn check_positive_durations(durations: &[(&'static str, Duration)]) -> Result<()> {
    match durations.iter().find(|(_, value)| value.is_zero()) {
        Some(&(field, value)) => Err(Error::InvalidArgument {
            field,
            found: format!("{value:?}"),
            expected: "a positive duration",
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_collective_and_the_peer() {
        let error = Error::PeerDisconnected {
            collective: Collective::AllReduce,
            peer: 2,
        };
        assert_eq!(error.to_string(), "all_reduce: peer rank 2 disconnected");
        assert_eq!(error.failed_rank(), Some(2));

        let aborted = Error::Aborted {
            collective: Collective::Broadcast,
            failed_rank: 3,
            cause: AbortCause::Stalled,
            reporter: 4,
        };
        assert_eq!(
            aborted.to_string(),
            "broadcast: aborted, peer rank 3 stalled (reported by rank 4)"
        );
        assert_eq!(aborted.failed_rank(), Some(3));
    }

    #[test]
    fn abort_causes_survive_the_wire_code() {
        for cause in [
            AbortCause::Disconnected,
            AbortCause::Stalled,
            AbortCause::ProtocolViolation,
            AbortCause::LocalFailure,
        ] {
            assert_eq!(AbortCause::from_code(cause.code()), cause);
        }
    }
}
