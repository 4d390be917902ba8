//! Joining and leaving an [`Nccl`] communicator: the unique id through the store, then NCCL's
//! own rendezvous under the connect timeout; a graceful close (or an abort) under the
//! collective timeout, on [`Nccl::close`] or on drop.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaStream};
use tracing::{debug, warn};

use super::NcclConfig;
use super::handle::{self, RawComm};
use super::state::{Nccl, Staging, cuda_message};
use crate::cuda::{self, CudaLibrary};
use crate::error::{Error, Result};
use crate::rendezvous::Store;

/// Maps a setup problem to the error [`Nccl::connect`] returns.
fn setup_error(message: String) -> Error {
    Error::Nccl {
        operation: "setup",
        message,
    }
}

impl Nccl {
    /// Joins the communicator named `config.prefix` as `config.rank` of `config.world_size`, on
    /// CUDA device `config.device` and a new stream of its own. Rank 0 publishes NCCL's unique id
    /// under `{prefix}/nccl/unique_id` in `store`; the others wait for it. Returns once every rank
    /// has joined, or fails within `config.connect_timeout`.
    ///
    /// Every rank must call this concurrently with the same prefix and world size, each on its
    /// own device. Fails with [`Error::NoCudaDriver`] or [`Error::NoNccl`] when this machine
    /// lacks them, before any CUDA call.
    pub fn connect(store: &dyn Store, config: &NcclConfig) -> Result<Nccl> {
        config.validate()?;
        cuda::require(CudaLibrary::Nccl)?;
        let device = config.device;
        let context = CudaContext::new(device)
            .map_err(|error| setup_error(cuda_message(&format!("open device {device}"), &error)))?;
        let stream = context.new_stream().map_err(|error| {
            setup_error(cuda_message(
                &format!("create a stream on device {device}"),
                &error,
            ))
        })?;
        Self::join(store, config, stream)
    }

    /// Like [`Nccl::connect`], but queues every collective on `stream` (candle's device stream,
    /// say), so that they run in order with the kernels queued there. `stream` must belong to
    /// device `config.device`, and must be a stream of its own: the legacy and per-thread
    /// default streams (handles 0x0, 0x1 and 0x2) are refused with [`Error::InvalidArgument`],
    /// because a non-blocking NCCL communicator may queue work from a thread of its own, where
    /// the per-thread handle names another stream.
    ///
    /// candle 0.11's `Device::new_cuda` runs on the per-thread default stream: build the device
    /// with `Device::new_cuda_with_stream` and pass its `CudaDevice::cuda_stream()` instead.
    pub fn connect_on_stream(
        store: &dyn Store,
        config: &NcclConfig,
        stream: Arc<CudaStream>,
    ) -> Result<Nccl> {
        config.validate()?;
        cuda::require(CudaLibrary::Nccl)?;
        let handle = stream.cu_stream() as usize;
        if let Some(name) = default_stream_name(handle) {
            return Err(Error::InvalidArgument {
                field: "stream",
                found: format!("{name} (handle {handle:#x})"),
                expected: "a stream of its own, such as CudaContext::new_stream gives",
            });
        }
        let ordinal = stream.context().ordinal();
        if ordinal != config.device {
            return Err(Error::InvalidArgument {
                field: "config.device",
                found: format!("{} (the stream is on device {ordinal})", config.device),
                expected: "the ordinal of the stream's device",
            });
        }
        Self::join(store, config, stream)
    }

    /// Exchanges the unique id and joins the NCCL communicator.
    fn join(store: &dyn Store, config: &NcclConfig, stream: Arc<CudaStream>) -> Result<Nccl> {
        let deadline = Instant::now() + config.connect_timeout;
        handle::check_version().map_err(setup_error)?;
        stream.context().bind_to_thread().map_err(|error| {
            setup_error(cuda_message(
                &format!("make device {} current", config.device),
                &error,
            ))
        })?;
        if let Some(value) = handle::blocking_forced_by_environment() {
            warn!(
                prefix = %config.prefix,
                rank = config.rank,
                %value,
                "NCCL_COMM_BLOCKING makes this nccl communicator blocking: joining, collectives \
                 and closing are no longer bounded by the connect and collective timeouts, so a \
                 rank that dies or stops can hang this one"
            );
        }
        let unique_id = exchange_unique_id(store, config, deadline)?;
        let comm = RawComm::join(&unique_id, config.rank, config.world_size, deadline)
            .map_err(setup_error)?;
        debug!(
            prefix = %config.prefix,
            rank = config.rank,
            world_size = config.world_size,
            device = config.device,
            "nccl communicator ready"
        );
        Ok(Nccl {
            comm: Some(comm),
            rank: config.rank,
            world_size: config.world_size,
            prefix: config.prefix.clone(),
            device: config.device,
            collective_timeout: config.collective_timeout,
            stream,
            in_flight: VecDeque::new(),
            spare_events: Vec::new(),
            staging: Staging::default(),
            failure: None,
            channel: config.progress.channel(&config.prefix, config.world_size),
        })
    }
}

impl Nccl {
    /// Ends the communicator at the end of a job, gracefully: waits for the queued collectives
    /// (under the collective timeout), then finalizes the NCCL communicator (`ncclCommFinalize`:
    /// NCCL finishes sending what is still in flight, and waits until every rank of this
    /// communicator on this host has finalized, so that none still reads this rank's buffers)
    /// and destroys it. Every rank should call it once its last collective is queued.
    ///
    /// Fails with [`Error::Nccl`] (operation `close`) when finalizing fails or does not finish
    /// within the collective timeout (a peer died, or never closes), after aborting the
    /// communicator; with the error of a queued collective that failed; and with
    /// [`Error::Poisoned`] when an earlier failure had already aborted it.
    pub fn close(mut self) -> Result<()> {
        self.shut_down()
    }

    /// The body of [`Nccl::close`], also run when an unclosed communicator drops.
    fn shut_down(&mut self) -> Result<()> {
        self.synchronize()?;
        let Some(comm) = self.comm.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + self.collective_timeout;
        let closed = match self.stream.context().bind_to_thread() {
            Ok(()) => comm.close(deadline),
            Err(error) => {
                comm.abort();
                Err(format!(
                    "{}; the communicator was aborted",
                    cuda_message("make the device current", &error)
                ))
            }
        };
        closed.map_err(|message| Error::Nccl {
            operation: "close",
            message,
        })?;
        debug!(prefix = %self.prefix, rank = self.rank, "nccl communicator closed");
        Ok(())
    }
}

impl Drop for Nccl {
    /// Closes a communicator still open (not closed, and not aborted by a failure), logging
    /// what goes wrong; aborts it instead while the thread panics, since its job has failed.
    fn drop(&mut self) {
        if self.comm.is_none() {
            return;
        }
        if std::thread::panicking() {
            self.in_flight.clear();
            if let Some(comm) = self.comm.take() {
                comm.abort();
            }
            return;
        }
        if let Err(error) = self.shut_down() {
            warn!(
                prefix = %self.prefix,
                rank = self.rank,
                %error,
                "closing the nccl communicator on drop failed"
            );
        }
    }
}

/// Names the special stream handles CUDA gives a meaning of its own (the legacy default stream,
/// `CU_STREAM_LEGACY`, `CU_STREAM_PER_THREAD`), or `None` for a stream's own handle.
fn default_stream_name(handle: usize) -> Option<&'static str> {
    match handle {
        0x0 => Some("the default stream"),
        0x1 => Some("the legacy default stream"),
        0x2 => Some("the per-thread default stream"),
        _ => None,
    }
}

/// Returns NCCL's unique id for the communicator: created here on rank 0 (and published in
/// the store for the others), read from the store on the others.
fn exchange_unique_id(
    store: &dyn Store,
    config: &NcclConfig,
    deadline: Instant,
) -> Result<[u8; 128]> {
    if config.world_size == 1 {
        return handle::new_unique_id().map_err(setup_error);
    }
    let key = config.unique_id_key();
    if config.rank == 0 {
        let unique_id = handle::new_unique_id().map_err(setup_error)?;
        store.set(&key, &unique_id)?;
        return Ok(unique_id);
    }
    let remaining = deadline.saturating_duration_since(Instant::now());
    let value = store.wait(&[&key], remaining)?.pop().unwrap_or_default();
    <[u8; 128]>::try_from(value.as_slice()).map_err(|_| {
        setup_error(format!(
            "rank 0 published a unique id of {} bytes under {key:?}, expected 128",
            value.len()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_stream_handles_are_named_and_others_are_not() {
        assert_eq!(default_stream_name(0x0), Some("the default stream"));
        assert_eq!(default_stream_name(0x1), Some("the legacy default stream"));
        assert_eq!(
            default_stream_name(0x2),
            Some("the per-thread default stream")
        );
        assert_eq!(default_stream_name(0x7f00_dead_b000), None);
    }
}
