//! The [`Communicator`] implementation of [`Nccl`], on host buffers: each call copies its input
//! into a device staging buffer, runs the NCCL collective there in place, waits for it under the
//! deadline, and copies the result back.
//!
//! Reductions widen bf16 and f16 to `f32` on the host, reduce in `f32` on the device, and round
//! once on the host after dividing averages: the trait's numerics, exactly as [`crate::TcpRing`]
//! has them. Data movement (broadcast, all-gather) moves the element type's bytes unchanged.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::CUresult;
use cudarc::driver::{CudaStream, DevicePtrMut, DriverError};
use cudarc::nccl::result::{self, NcclError, NcclStatus};
use cudarc::nccl::sys;

use super::state::{Nccl, Staging, cuda_message};
use crate::buffer::{BufferMut, BufferRef, DType, Element, ReduceOp};
use crate::communicator::{Communicator, TypedCollectives, typed};
use crate::error::Result;
use crate::operation::Collective;

/// The error returned when the staging buffer is used before it was reserved (never: every
/// call reserves first).
const NOT_RESERVED: DriverError = DriverError(CUresult::CUDA_ERROR_INVALID_VALUE);

impl Staging {
    /// Makes the device buffer hold at least `bytes` bytes (its contents are then undefined).
    fn reserve(&mut self, stream: &Arc<CudaStream>, bytes: usize) -> Result<(), DriverError> {
        if self
            .device
            .as_ref()
            .is_some_and(|device| device.len() >= bytes)
        {
            return Ok(());
        }
        // Free the smaller buffer first (ordered on the stream), so both never coexist.
        self.device = None;
        self.device = Some(stream.alloc_zeros::<u8>(bytes)?);
        Ok(())
    }

    /// Copies `values` into the device buffer from `byte_offset`, widened to `f32` when `widen`.
    fn upload<T: Element>(
        &mut self,
        stream: &Arc<CudaStream>,
        values: &[T],
        byte_offset: usize,
        widen: bool,
    ) -> Result<(), DriverError> {
        let bytes: &[u8] = if widen && T::DTYPE != DType::F32 {
            if self.widened.len() < values.len() {
                self.widened.resize(values.len(), 0.0);
            }
            let widened = &mut self.widened[..values.len()];
            T::widen_slice(values, widened);
            bytemuck::cast_slice(widened)
        } else {
            bytemuck::cast_slice(values)
        };
        let device = self.device.as_mut().ok_or(NOT_RESERVED)?;
        let end = byte_offset + bytes.len();
        if end > device.len() {
            return Err(NOT_RESERVED);
        }
        stream.memcpy_htod(bytes, &mut device.slice_mut(byte_offset..end))
    }

    /// Queues the copy of `values.len()` elements from the device buffer at `byte_offset`: into
    /// `values`, or as `f32` into the widened buffer when `widen` (for non-`f32` elements).
    /// The host memory must not be read before the stream has been waited for; then
    /// [`Staging::finish_download`] completes the result.
    fn queue_download<T: Element>(
        &mut self,
        stream: &Arc<CudaStream>,
        values: &mut [T],
        byte_offset: usize,
        widen: bool,
    ) -> Result<(), DriverError> {
        let device = self.device.as_ref().ok_or(NOT_RESERVED)?;
        let count = values.len();
        let element_bytes = if widen { 4 } else { T::DTYPE.size_bytes() };
        let end = byte_offset + count * element_bytes;
        if end > device.len() {
            return Err(NOT_RESERVED);
        }
        let source = device.slice(byte_offset..end);
        if widen && T::DTYPE != DType::F32 {
            if self.widened.len() < count {
                self.widened.resize(count, 0.0);
            }
            let widened = &mut self.widened[..count];
            stream.memcpy_dtoh(&source, bytemuck::cast_slice_mut::<f32, u8>(widened))
        } else {
            stream.memcpy_dtoh(&source, bytemuck::cast_slice_mut::<T, u8>(values))
        }
    }

    /// Completes a download whose copy has finished: divides by `divisor` if any, and narrows
    /// the widened `f32` values into `values` when `widen`.
    fn finish_download<T: Element>(&mut self, values: &mut [T], widen: bool, divisor: Option<f32>) {
        if widen && T::DTYPE != DType::F32 {
            let widened = &mut self.widened[..values.len()];
            if let Some(divisor) = divisor {
                widened.iter_mut().for_each(|value| *value /= divisor);
            }
            T::narrow_slice(widened, values);
        } else if let Some(divisor) = divisor {
            // `T` is `f32` here (only reductions divide, and they widen).
            for value in values.iter_mut() {
                *value = T::from_f32(value.to_f32() / divisor);
            }
        }
    }
}

/// Returns the divisor that finishes `op` over `world_size` ranks.
fn divisor(op: ReduceOp, world_size: usize) -> Option<f32> {
    match op {
        ReduceOp::Sum => None,
        ReduceOp::Average => Some(world_size as f32),
    }
}

impl Nccl {
    /// Gets ready to stage a call of `bytes` bytes: waits for queued device collectives (so
    /// that the copies, which wait for the stream, cannot hang on one that never finishes),
    /// and grows the staging buffer if needed.
    fn prepare_staging(&mut self, collective: Collective, bytes: usize) -> Result<()> {
        self.bind(collective)?;
        self.wait_in_flight()?;
        let stream = Arc::clone(&self.stream);
        self.staging.call_bytes = bytes;
        let reserved = self.staging.reserve(&stream, bytes);
        reserved.map_err(|error| {
            let message = cuda_message(&format!("allocate {bytes} staging bytes"), &error);
            self.fail(collective, message)
        })
    }

    /// Copies `values` to the staging buffer (see [`Staging::upload`]).
    fn upload<T: Element>(
        &mut self,
        collective: Collective,
        values: &[T],
        byte_offset: usize,
        widen: bool,
    ) -> Result<()> {
        let stream = Arc::clone(&self.stream);
        let uploaded = self.staging.upload(&stream, values, byte_offset, widen);
        uploaded.map_err(|error| self.fail(collective, cuda_message("copy to the device", &error)))
    }

    /// Copies the result back into `values` (see [`Staging::queue_download`]), waits for the
    /// copy under the collective timeout, and completes the result.
    ///
    /// cudarc's copy into pageable host memory happens to return once the copy is done, but
    /// that is CUDA's documented behaviour for pageable memory, not a promise of the API
    /// called: the host memory is read only after an explicit, bounded wait on the stream.
    fn download<T: Element>(
        &mut self,
        collective: Collective,
        values: &mut [T],
        byte_offset: usize,
        widen: bool,
        divisor: Option<f32>,
    ) -> Result<()> {
        let stream = Arc::clone(&self.stream);
        let queued = self
            .staging
            .queue_download(&stream, values, byte_offset, widen);
        queued.map_err(|error| self.fail(collective, cuda_message("copy to the host", &error)))?;
        self.wait_for_stream(collective)?;
        self.staging.finish_download(values, widen, divisor);
        Ok(())
    }

    /// Runs a collective on the staging buffer (`launch` gets the communicator, the buffer's
    /// device address and the stream) and waits for it under the deadline.
    fn run_staged(
        &mut self,
        collective: Collective,
        call: &str,
        launch: impl FnOnce(sys::ncclComm_t, u64, sys::cudaStream_t) -> Result<NcclStatus, NcclError>,
    ) -> Result<()> {
        let Some(mut device) = self.staging.device.take() else {
            let message = "the staging buffer was not allocated".to_owned();
            return Err(self.fail(collective, message));
        };
        let stream = Arc::clone(&self.stream);
        let (address, written) = device.device_ptr_mut(&stream);
        // The staging buffer lives on the communicator's stream: no other stream to order with.
        let bytes = self.staging.call_bytes;
        let queued = self.enqueue(collective, call, bytes, &[], |comm, cu_stream| {
            launch(comm, address, cu_stream)
        });
        drop(written);
        self.staging.device = Some(device);
        queued?;
        self.wait_in_flight()
    }
}

/// Host buffers, staged through the device (see the module docs for the numerics).
impl TypedCollectives for Nccl {
    fn all_reduce_typed<T: Element>(&mut self, values: &mut [T], op: ReduceOp) -> Result<()> {
        let collective = Collective::AllReduce;
        self.check_usable(collective)?;
        if values.is_empty() {
            return Ok(());
        }
        let count = values.len();
        self.prepare_staging(collective, count * 4)?;
        self.upload(collective, values, 0, true)?;
        self.run_staged(collective, "ncclAllReduce", |comm, address, cu_stream| {
            // SAFETY: `address` is the staging buffer, reserved above for `count` `f32`s and
            // owned by `self` until the collective has been waited for; in place.
            unsafe {
                result::all_reduce(
                    address as *const c_void,
                    address as *mut c_void,
                    count,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    cu_stream,
                )
            }
        })?;
        let divisor = divisor(op, self.world_size);
        self.download(collective, values, 0, true, divisor)
    }

    fn broadcast_typed<T: Element>(&mut self, values: &mut [T], root: usize) -> Result<()> {
        let collective = Collective::Broadcast;
        let root_int = self.check_root(collective, root)?;
        self.check_usable(collective)?;
        if values.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::size_of_val(values);
        self.prepare_staging(collective, bytes)?;
        if self.rank == root {
            self.upload(collective, values, 0, false)?;
        }
        self.run_staged(collective, "ncclBroadcast", |comm, address, cu_stream| {
            // SAFETY: `address` is the staging buffer, reserved above for `bytes` bytes and
            // owned by `self` until the collective has been waited for; in place.
            unsafe {
                result::broadcast(
                    address as *const c_void,
                    address as *mut c_void,
                    bytes,
                    sys::ncclDataType_t::ncclUint8,
                    root_int,
                    comm,
                    cu_stream,
                )
            }
        })?;
        if self.rank != root {
            self.download(collective, values, 0, false, None)?;
        }
        Ok(())
    }

    fn all_gather_typed<T: Element>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        let collective = Collective::AllGather;
        self.check_usable(collective)?;
        if input.is_empty() {
            return Ok(());
        }
        let block = std::mem::size_of_val(input);
        let own_block = self.rank * block;
        self.prepare_staging(collective, block * self.world_size)?;
        // In place: this rank's block already sits where the gathered result puts it.
        self.upload(collective, input, own_block, false)?;
        self.run_staged(collective, "ncclAllGather", |comm, address, cu_stream| {
            // SAFETY: `address` is the staging buffer, reserved above for `block * world_size`
            // bytes and owned by `self` until the collective has been waited for; the send
            // buffer is this rank's block of the receive buffer, NCCL's in-place layout.
            unsafe {
                result::all_gather(
                    (address + own_block as u64) as *const c_void,
                    address as *mut c_void,
                    block,
                    sys::ncclDataType_t::ncclUint8,
                    comm,
                    cu_stream,
                )
            }
        })?;
        self.download(collective, output, 0, false, None)
    }

    fn reduce_scatter_typed<T: Element>(
        &mut self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let collective = Collective::ReduceScatter;
        self.check_usable(collective)?;
        if output.is_empty() {
            return Ok(());
        }
        let count = output.len();
        let own_block = self.rank * count * 4;
        self.prepare_staging(collective, input.len() * 4)?;
        self.upload(collective, input, 0, true)?;
        self.run_staged(
            collective,
            "ncclReduceScatter",
            |comm, address, cu_stream| {
                // SAFETY: `address` is the staging buffer, reserved above for `count * world_size`
                // `f32`s and owned by `self` until the collective has been waited for; the receive
                // buffer is this rank's block of the send buffer, NCCL's in-place layout.
                unsafe {
                    result::reduce_scatter(
                        address as *const c_void,
                        (address + own_block as u64) as *mut c_void,
                        count,
                        sys::ncclDataType_t::ncclFloat32,
                        sys::ncclRedOp_t::ncclSum,
                        comm,
                        cu_stream,
                    )
                }
            },
        )?;
        let divisor = divisor(op, self.world_size);
        self.download(collective, output, own_block, true, divisor)
    }
}

/// Host buffers, staged through the device. bf16 and f16 reductions are widened to `f32` on the
/// host and reduced in `f32` by NCCL, then divided (averages) and rounded once on the host: the
/// trait's numerics hold exactly, at the price of moving `f32` between the GPUs (twice the bytes
/// of the element type); the device methods reduce natively instead. A barrier is a one-element
/// all-reduce, which no rank can finish before every rank has joined it.
impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&mut self, buffer: BufferMut<'_>, op: ReduceOp) -> Result<()> {
        typed::all_reduce(self, buffer, op)
    }

    fn broadcast(&mut self, buffer: BufferMut<'_>, root: usize) -> Result<()> {
        typed::broadcast(self, self.world_size, buffer, root)
    }

    fn all_gather(&mut self, input: BufferRef<'_>, output: BufferMut<'_>) -> Result<()> {
        typed::all_gather(self, self.world_size, input, output)
    }

    fn reduce_scatter(
        &mut self,
        input: BufferRef<'_>,
        output: BufferMut<'_>,
        op: ReduceOp,
    ) -> Result<()> {
        typed::reduce_scatter(self, self.world_size, input, output, op)
    }

    fn barrier(&mut self) -> Result<()> {
        let collective = Collective::Barrier;
        self.check_usable(collective)?;
        self.prepare_staging(collective, 4)?;
        self.run_staged(collective, "ncclAllReduce", |comm, address, cu_stream| {
            // SAFETY: `address` is the staging buffer, reserved above for at least one `f32`
            // and owned by `self` until the collective has been waited for; its value does not
            // matter.
            unsafe {
                result::all_reduce(
                    address as *const c_void,
                    address as *mut c_void,
                    1,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    cu_stream,
                )
            }
        })
    }
}
