//! [`Nccl`]: setup (the unique id through the store, then NCCL's own rendezvous) and the
//! collectives on device buffers.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DevicePtr, DevicePtrMut, DriverError};
use cudarc::nccl::result;
use cudarc::nccl::sys;
use tracing::{debug, warn};

use super::NcclConfig;
use super::handle::{self, RawComm};
use super::host::Staging;
use super::watchdog::{Failure, InFlight};
use crate::buffer::{DType, Element, ReduceOp};
use crate::communicator::{Collective, typed};
use crate::cuda::{self, CudaLibrary};
use crate::error::{Error, Result};
use crate::rendezvous::Store;

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
    device: usize,
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

/// Maps a setup problem to the error [`Nccl::connect`] returns.
fn setup_error(message: String) -> Error {
    Error::Nccl {
        operation: "setup",
        message,
    }
}

/// Returns a CUDA driver error as a message saying what was being done.
pub(super) fn cuda_message(doing: &str, error: &DriverError) -> String {
    format!("{doing}: cuda error {error}")
}

/// Returns NCCL's element type for `dtype`.
pub(super) fn nccl_type(dtype: DType) -> sys::ncclDataType_t {
    match dtype {
        DType::F32 => sys::ncclDataType_t::ncclFloat32,
        DType::Bf16 => sys::ncclDataType_t::ncclBfloat16,
        DType::F16 => sys::ncclDataType_t::ncclFloat16,
    }
}

/// Returns NCCL's operation for `op`. Every [`ReduceOp`] has one; a new variant NCCL cannot do
/// must be rejected here with [`Error::InvalidArgument`].
fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Average => sys::ncclRedOp_t::ncclAvg,
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
        })
    }

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

    /// Replaces `buffer` on every rank with the element-wise reduction over all ranks' buffers,
    /// in place, and returns once it is queued on [`Nccl::stream`].
    ///
    /// The reduction runs in the element type, as NCCL does (bf16 and f16 sums round at every
    /// step, and NCCL computes averages by scaling each rank's values by `1 / world_size`
    /// before summing): unlike the [`Communicator`](crate::Communicator) methods, which reduce
    /// in `f32`.
    pub fn all_reduce_device<T: Element, B: DevicePtrMut<T>>(
        &mut self,
        buffer: &mut B,
        op: ReduceOp,
    ) -> Result<()> {
        self.in_place(
            Collective::AllReduce,
            "ncclAllReduce",
            buffer,
            |pointer, count, comm, cu_stream| {
                // SAFETY: `pointer` addresses `count` elements of `T` on this communicator's
                // device (checked by `in_place`), kept alive and unaliased by the borrow of the
                // buffer until the collective has been queued and recorded; in-place reduction
                // (send and receive buffers equal) is allowed by NCCL.
                unsafe {
                    result::all_reduce(
                        pointer as *const c_void,
                        pointer,
                        count,
                        nccl_type(T::DTYPE),
                        nccl_op(op),
                        comm,
                        cu_stream,
                    )
                }
            },
        )
    }

    /// All-reduces every bucket in one NCCL group call (one launch for all of them), each in
    /// place, and returns once they are queued. Reduces in the element type, like
    /// [`Nccl::all_reduce_device`]. Empty buckets are skipped.
    pub fn all_reduce_buckets<T: Element, B: DevicePtrMut<T>>(
        &mut self,
        buckets: &mut [&mut B],
        op: ReduceOp,
    ) -> Result<()> {
        let collective = Collective::AllReduce;
        for bucket in buckets.iter() {
            self.check_device(bucket.stream(), "bucket")?;
        }
        self.check_usable(collective)?;
        let stream = Arc::clone(&self.stream);
        let mut pointers = Vec::with_capacity(buckets.len());
        let mut buffer_streams = Vec::with_capacity(buckets.len());
        let mut written = Vec::with_capacity(buckets.len());
        for bucket in buckets.iter_mut().filter(|bucket| !bucket.is_empty()) {
            let count = bucket.len();
            buffer_streams.push(Arc::clone(bucket.stream()));
            let (pointer, record) = bucket.device_ptr_mut(&stream);
            pointers.push((pointer, count));
            written.push(record);
        }
        if pointers.is_empty() {
            return Ok(());
        }
        let call = "grouped ncclAllReduce";
        let queued = self.enqueue(collective, call, &buffer_streams, |comm, cu_stream| {
            handle::classify(result::group_start())?;
            let mut first_error = None;
            for &(pointer, count) in &pointers {
                // SAFETY: as in `all_reduce_device`, for each bucket: `pointer` addresses `count`
                // elements of `T` on this device, borrowed mutably (and so distinct from the
                // other buckets) until the events in `written` record after the group.
                let added = unsafe {
                    result::all_reduce(
                        pointer as *const c_void,
                        pointer as *mut c_void,
                        count,
                        nccl_type(T::DTYPE),
                        nccl_op(op),
                        comm,
                        cu_stream,
                    )
                };
                if let Err(error) = handle::classify(added) {
                    first_error = Some(error);
                    break;
                }
            }
            // The group is closed whatever happened inside it, so that this thread's next NCCL
            // call does not land in a group left open.
            let ended = result::group_end();
            match first_error {
                Some(error) => Err(error),
                None => ended,
            }
        });
        drop(written);
        queued
    }

    /// Copies `root`'s `buffer` into every other rank's `buffer`; returns once queued.
    pub fn broadcast_device<T: Element, B: DevicePtrMut<T>>(
        &mut self,
        buffer: &mut B,
        root: usize,
    ) -> Result<()> {
        let collective = Collective::Broadcast;
        let root_int = self.check_root(collective, root)?;
        self.in_place(
            collective,
            "ncclBroadcast",
            buffer,
            |pointer, count, comm, cu_stream| {
                // SAFETY: as in `all_reduce_device`; in-place broadcast is allowed by NCCL.
                unsafe {
                    result::broadcast(
                        pointer as *const c_void,
                        pointer,
                        count,
                        nccl_type(T::DTYPE),
                        root_int,
                        comm,
                        cu_stream,
                    )
                }
            },
        )
    }

    /// Queues the in-place collective `launch` on `buffer` after the checks every in-place
    /// device call makes (the buffer is on this device, the communicator usable, the buffer not
    /// empty); `launch` gets the buffer's address and length, the communicator and the stream.
    fn in_place<T: Element, B: DevicePtrMut<T>>(
        &mut self,
        collective: Collective,
        call: &str,
        buffer: &mut B,
        launch: impl FnOnce(
            *mut c_void,
            usize,
            sys::ncclComm_t,
            sys::cudaStream_t,
        ) -> std::result::Result<result::NcclStatus, result::NcclError>,
    ) -> Result<()> {
        self.check_device(buffer.stream(), "buffer")?;
        self.check_usable(collective)?;
        let count = buffer.len();
        if count == 0 {
            return Ok(());
        }
        let stream = Arc::clone(&self.stream);
        let buffer_stream = Arc::clone(buffer.stream());
        let (pointer, written) = buffer.device_ptr_mut(&stream);
        let buffer_streams = std::slice::from_ref(&buffer_stream);
        let queued = self.enqueue(collective, call, buffer_streams, |comm, cu_stream| {
            launch(pointer as *mut c_void, count, comm, cu_stream)
        });
        drop(written);
        queued
    }

    /// Concatenates every rank's `input` (all of one length `n`) in rank order into `output`,
    /// which must hold `n * world_size` elements; returns once queued.
    pub fn all_gather_device<T: Element, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &mut self,
        input: &S,
        output: &mut R,
    ) -> Result<()> {
        let collective = Collective::AllGather;
        let count = input.len();
        typed::check_blocks(collective, "output", output.len(), count, self.world_size)?;
        self.check_device(input.stream(), "input")?;
        self.check_device(output.stream(), "output")?;
        self.check_usable(collective)?;
        if count == 0 {
            return Ok(());
        }
        let stream = Arc::clone(&self.stream);
        let buffer_streams = [Arc::clone(input.stream()), Arc::clone(output.stream())];
        let (input_pointer, read) = input.device_ptr(&stream);
        let (output_pointer, written) = output.device_ptr_mut(&stream);
        let queued = self.enqueue(
            collective,
            "ncclAllGather",
            &buffer_streams,
            |comm, cu_stream| {
                // SAFETY: both pointers address buffers of this device of the lengths checked above
                // (`count` and `count * world_size` elements of `T`), borrowed until `read` and
                // `written` record after the collective; the borrow checker keeps them from
                // overlapping.
                unsafe {
                    result::all_gather(
                        input_pointer as *const c_void,
                        output_pointer as *mut c_void,
                        count,
                        nccl_type(T::DTYPE),
                        comm,
                        cu_stream,
                    )
                }
            },
        );
        drop((read, written));
        queued
    }

    /// Reduces the ranks' `input`s (all of length `n * world_size`) element-wise and leaves block
    /// `rank` of the result, `n` elements, in `output`; returns once queued. Reduces in the
    /// element type, like [`Nccl::all_reduce_device`].
    pub fn reduce_scatter_device<T: Element, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &mut self,
        input: &S,
        output: &mut R,
        op: ReduceOp,
    ) -> Result<()> {
        let collective = Collective::ReduceScatter;
        let count = output.len();
        typed::check_blocks(collective, "input", input.len(), count, self.world_size)?;
        self.check_device(input.stream(), "input")?;
        self.check_device(output.stream(), "output")?;
        self.check_usable(collective)?;
        if count == 0 {
            return Ok(());
        }
        let stream = Arc::clone(&self.stream);
        let buffer_streams = [Arc::clone(input.stream()), Arc::clone(output.stream())];
        let (input_pointer, read) = input.device_ptr(&stream);
        let (output_pointer, written) = output.device_ptr_mut(&stream);
        let call = "ncclReduceScatter";
        let queued = self.enqueue(collective, call, &buffer_streams, |comm, cu_stream| {
            // SAFETY: as in `all_gather_device`, with `count * world_size` input elements and
            // `count` output elements.
            unsafe {
                result::reduce_scatter(
                    input_pointer as *const c_void,
                    output_pointer as *mut c_void,
                    count,
                    nccl_type(T::DTYPE),
                    nccl_op(op),
                    comm,
                    cu_stream,
                )
            }
        });
        drop((read, written));
        queued
    }

    /// Fails unless `root` is a rank; returns it as NCCL's int.
    pub(super) fn check_root(&self, collective: Collective, root: usize) -> Result<i32> {
        match i32::try_from(root) {
            Ok(root_int) if root < self.world_size => Ok(root_int),
            _ => Err(Error::RootOutOfRange {
                collective,
                root,
                world_size: self.world_size,
            }),
        }
    }

    /// Fails unless a buffer's stream belongs to this communicator's device (NCCL would read or
    /// write another device's memory through a pointer it cannot use).
    fn check_device(&self, stream: &Arc<CudaStream>, what: &'static str) -> Result<()> {
        if stream.context() == self.stream.context() {
            return Ok(());
        }
        Err(Error::InvalidArgument {
            field: what,
            found: format!("memory of CUDA device {}", stream.context().ordinal()),
            expected: "memory of the communicator's CUDA device",
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
