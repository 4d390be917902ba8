//! The collectives of [`Nccl`] on device buffers: queued on the communicator's stream, ordered
//! with the buffers' own streams, reduced in the element type as NCCL does.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::result;
use cudarc::nccl::sys;

use super::handle;
use super::state::Nccl;
use crate::buffer::{DType, Element, ReduceOp};
use crate::communicator::typed;
use crate::error::{Error, Result};
use crate::operation::Collective;

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
        let bytes = pointers.iter().map(|&(_, count)| count).sum::<usize>() * size_of::<T>();
        let queued = self.enqueue(
            collective,
            call,
            bytes,
            &buffer_streams,
            |comm, cu_stream| {
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
            },
        );
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
        let bytes = count * size_of::<T>();
        let queued = self.enqueue(
            collective,
            call,
            bytes,
            buffer_streams,
            |comm, cu_stream| launch(pointer as *mut c_void, count, comm, cu_stream),
        );
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
            count * size_of::<T>(),
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
        let bytes = count * self.world_size * size_of::<T>();
        let queued = self.enqueue(
            collective,
            call,
            bytes,
            &buffer_streams,
            |comm, cu_stream| {
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
            },
        );
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
