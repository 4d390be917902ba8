//! [`Nccl`] itself: what one rank's communicator holds (the raw NCCL communicator, its stream,
//! the collectives in flight, the host path's staging buffers, the failure that poisoned it),
//! its accessors, and the helpers every part uses. The methods live by concern beside it:
//! `setup` (joining and closing), `device` (collectives on device buffers), `watchdog`
//! (deadlines) and `host` (the [`Communicator`](crate::Communicator) trait).

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DriverError};

use super::handle::RawComm;
use crate::operation::Collective;
use crate::progress::{Channel, Entered};

/// A communicator whose ranks run NCCL collectives, one CUDA device each.
///
/// Built by every rank with [`Nccl::connect`] (on a stream of its own) or
/// [`Nccl::connect_on_stream`] (on the caller's stream, so that collectives are ordered with the
/// caller's kernels); one per thread, and used on that thread only (it is neither `Send` nor
/// `Sync`, like the NCCL communicator it owns).
///
/// Device methods queue a collective on [`Nccl::stream`] and return; [`Nccl::synchronize`]
/// waits until every queued collective has finished, or fails once one has taken longer than
/// the collective timeout. Wait through it rather than through the stream's own `synchronize`,
/// which would wait forever for a collective a dead rank never joins. Host collectives (the
/// [`Communicator`](crate::Communicator) trait) wait before they return.
///
/// Device buffers may live on another stream than [`Nccl::stream`]: each device method orders
/// the collective after the work queued so far on its buffers' streams, and the work queued on
/// them afterwards after the collective (by events, without waiting on the host). A buffer of
/// the per-thread default stream (candle's `Device::new_cuda`) is ordered with the calling
/// thread's, so call from the thread that queues its work.
///
/// Every failure (an NCCL or CUDA error, an asynchronous error NCCL reports, or a collective
/// past its deadline) aborts the NCCL communicator and fails the call with [`Error::Nccl`];
/// later calls return [`Error::Poisoned`].
///
/// At the end of a job every rank should call [`Nccl::close`]: it waits for the queued
/// collectives, then finalizes the NCCL communicator, which lets NCCL finish sending what is
/// still in flight and waits until every rank on this host has finalized too (so that none is
/// still reading this rank's buffers), and reports any error. Dropping a communicator that was
/// not closed does the same but can only log errors, and a rank that panics aborts instead.
/// Both are bounded by the collective timeout: a peer that never closes makes this rank abort
/// after it.
pub struct Nccl {
    /// The NCCL communicator; `None` once closed, or aborted after a failure.
    pub(super) comm: Option<RawComm>,
    /// This rank.
    pub(super) rank: usize,
    /// Number of ranks.
    pub(super) world_size: usize,
    /// The key prefix the communicator was formed under.
    pub(super) prefix: String,
    /// Ordinal of the CUDA device.
    pub(super) device: usize,
    /// Longest one collective may take once waited for.
    pub(super) collective_timeout: Duration,
    /// The stream every collective is queued on.
    pub(super) stream: Arc<CudaStream>,
    /// Collectives queued on `stream` that have not been seen finished, oldest first.
    pub(super) in_flight: VecDeque<InFlight>,
    /// Events of finished collectives, recorded again for later ones.
    pub(super) spare_events: Vec<CudaEvent>,
    /// The host path's buffers, kept between calls.
    pub(super) staging: Staging,
    /// The failure that aborted the communicator, if one did.
    pub(super) failure: Option<Failure>,
    /// Where the communicator's collectives are recorded: entered when queued, completed
    /// when their event is seen complete.
    pub(super) channel: Channel,
}

impl fmt::Debug for Nccl {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Nccl")
            .field("prefix", &self.prefix)
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("device", &self.device)
            .field("in_flight", &self.in_flight.len())
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl Nccl {
    /// Returns the key prefix the communicator was formed under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Returns the ordinal of this rank's CUDA device.
    pub fn device(&self) -> usize {
        self.device
    }

    /// Returns the stream collectives are queued on. To wait for them, call
    /// [`Nccl::synchronize`], which gives up after the collective timeout.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Returns the longest one collective may take once waited for.
    pub fn collective_timeout(&self) -> Duration {
        self.collective_timeout
    }
}

/// Buffers the host path keeps between calls: both only grow, so calls no larger than earlier
/// ones allocate nothing.
#[derive(Debug, Default)]
pub(super) struct Staging {
    /// Device bytes, as many as the largest call so far needed; `None` before the first.
    pub(super) device: Option<CudaSlice<u8>>,
    /// `f32` copies of bf16 and f16 values, widened before a reduction and narrowed after.
    pub(super) widened: Vec<f32>,
    /// Bytes the call being staged moves (its size in the progress record).
    pub(super) call_bytes: usize,
}

/// A collective queued on the stream, with an event recorded right after it.
#[derive(Debug)]
pub(super) struct InFlight {
    /// Which collective (for the error if it never finishes).
    pub(super) collective: Collective,
    /// Completes when the collective has.
    pub(super) done: CudaEvent,
    /// The collective's place in the progress record (none for waits on the stream alone).
    pub(super) entered: Option<Entered>,
}

/// The failure that aborted the communicator.
#[derive(Debug)]
pub(super) struct Failure {
    /// The collective that failed.
    pub(super) collective: Collective,
    /// The error's message.
    pub(super) message: String,
}

/// Returns a CUDA driver error as a message saying what was being done.
pub(super) fn cuda_message(doing: &str, error: &DriverError) -> String {
    format!("{doing}: cuda error {error}")
}
