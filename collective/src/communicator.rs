//! The [`Communicator`] trait every transport implements.

use crate::buffer::{BufferMut, BufferRef, Element, ReduceOp};
use crate::error::{Error, Result};
use crate::operation::Collective;

/// A group of `world_size` ranks that run collectives together.
///
/// Every rank must call the same collectives in the same order with the same lengths, element
/// types, operations and roots; implementations detect mismatches where they can and report them
/// as errors. Calls block the calling thread until this rank's part is done. A call that fails
/// (a peer died, stalled, or broke the protocol) leaves the communicator unusable: later calls
/// return [`crate::Error::Poisoned`]; build a new one to continue.
///
/// Buffers of length 0 are allowed everywhere and return at once without communicating (all
/// ranks must then pass length 0). With `world_size() == 1` every collective is a local copy or
/// a no-op.
///
/// Communicators need not be `Send`: NCCL's belong to the thread that created them. Those that
/// may move to another thread say so through [`Communicator::as_send`].
pub trait Communicator {
    /// Returns this rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// Returns the number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Replaces `buffer` on every rank with the element-wise reduction over all ranks' buffers.
    ///
    /// Every rank receives bit-identical results. Low-precision buffers are accumulated in `f32`
    /// and rounded once.
    fn all_reduce(&mut self, buffer: BufferMut<'_>, op: ReduceOp) -> Result<()>;

    /// Copies `root`'s `buffer` into every other rank's `buffer`.
    fn broadcast(&mut self, buffer: BufferMut<'_>, root: usize) -> Result<()>;

    /// Concatenates every rank's `input` (all of one length `n`) in rank order into `output`,
    /// which must hold `n * world_size()` elements of the same type.
    fn all_gather(&mut self, input: BufferRef<'_>, output: BufferMut<'_>) -> Result<()>;

    /// Reduces the ranks' `input`s (all of length `n * world_size()`) element-wise and leaves
    /// block `rank()` of the result, `n` elements, in `output`.
    fn reduce_scatter(
        &mut self,
        input: BufferRef<'_>,
        output: BufferMut<'_>,
        op: ReduceOp,
    ) -> Result<()>;

    /// Returns only once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<()>;

    /// Returns the payload bytes this rank has sent to other ranks over the network since the
    /// group formed, where the transport counts them (the TCP ring does; shared memory sends
    /// nothing over a network and NCCL does not say): the difference across a call is the
    /// traffic that collective put on this rank's outgoing link.
    fn network_bytes_sent(&self) -> Option<u64> {
        None
    }

    /// Returns this communicator as one that may be used from another thread (to overlap the
    /// gradient exchange with the backward pass), or `None` when it is bound to its thread.
    fn as_send(&mut self) -> Option<&mut (dyn Communicator + Send)> {
        None
    }
}

/// The collectives of a transport over slices of one element type. The transports implement
/// these; [`Communicator`]'s methods route buffers of every element type to them through the
/// functions of [`typed`], so the routing and the argument checks exist once.
pub(crate) trait TypedCollectives {
    /// [`Communicator::all_reduce`] for elements of type `T`.
    fn all_reduce_typed<T: Element>(&mut self, buffer: &mut [T], op: ReduceOp) -> Result<()>;

    /// [`Communicator::broadcast`]; `root` is already checked to be a rank.
    fn broadcast_typed<T: Element>(&mut self, buffer: &mut [T], root: usize) -> Result<()>;

    /// [`Communicator::all_gather`]; `output` already holds `world_size` blocks of `input`'s
    /// length.
    fn all_gather_typed<T: Element>(&mut self, input: &[T], output: &mut [T]) -> Result<()>;

    /// [`Communicator::reduce_scatter`]; `input` already holds `world_size` blocks of
    /// `output`'s length.
    fn reduce_scatter_typed<T: Element>(
        &mut self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<()>;
}

/// Routes [`Communicator`] calls to a [`TypedCollectives`] after the checks every transport
/// shares: matching element types, roots in range, block lengths.
pub(crate) mod typed {
    use super::*;

    /// [`Communicator::all_reduce`].
    pub(crate) fn all_reduce(
        transport: &mut impl TypedCollectives,
        buffer: BufferMut<'_>,
        op: ReduceOp,
    ) -> Result<()> {
        match buffer {
            BufferMut::F32(buffer) => transport.all_reduce_typed(buffer, op),
            BufferMut::Bf16(buffer) => transport.all_reduce_typed(buffer, op),
            BufferMut::F16(buffer) => transport.all_reduce_typed(buffer, op),
        }
    }

    /// [`Communicator::broadcast`] in a group of `world_size`.
    pub(crate) fn broadcast(
        transport: &mut impl TypedCollectives,
        world_size: usize,
        buffer: BufferMut<'_>,
        root: usize,
    ) -> Result<()> {
        if root >= world_size {
            return Err(Error::RootOutOfRange {
                collective: Collective::Broadcast,
                root,
                world_size,
            });
        }
        match buffer {
            BufferMut::F32(buffer) => transport.broadcast_typed(buffer, root),
            BufferMut::Bf16(buffer) => transport.broadcast_typed(buffer, root),
            BufferMut::F16(buffer) => transport.broadcast_typed(buffer, root),
        }
    }

    /// [`Communicator::all_gather`] in a group of `world_size`.
    pub(crate) fn all_gather(
        transport: &mut impl TypedCollectives,
        world_size: usize,
        input: BufferRef<'_>,
        output: BufferMut<'_>,
    ) -> Result<()> {
        let collective = Collective::AllGather;
        check_blocks(collective, "output", output.len(), input.len(), world_size)?;
        match (input, output) {
            (BufferRef::F32(input), BufferMut::F32(output)) => {
                transport.all_gather_typed(input, output)
            }
            (BufferRef::Bf16(input), BufferMut::Bf16(output)) => {
                transport.all_gather_typed(input, output)
            }
            (BufferRef::F16(input), BufferMut::F16(output)) => {
                transport.all_gather_typed(input, output)
            }
            (input, output) => Err(dtype_mismatch(collective, &input, &output)),
        }
    }

    /// [`Communicator::reduce_scatter`] in a group of `world_size`.
    pub(crate) fn reduce_scatter(
        transport: &mut impl TypedCollectives,
        world_size: usize,
        input: BufferRef<'_>,
        output: BufferMut<'_>,
        op: ReduceOp,
    ) -> Result<()> {
        let collective = Collective::ReduceScatter;
        check_blocks(collective, "input", input.len(), output.len(), world_size)?;
        match (input, output) {
            (BufferRef::F32(input), BufferMut::F32(output)) => {
                transport.reduce_scatter_typed(input, output, op)
            }
            (BufferRef::Bf16(input), BufferMut::Bf16(output)) => {
                transport.reduce_scatter_typed(input, output, op)
            }
            (BufferRef::F16(input), BufferMut::F16(output)) => {
                transport.reduce_scatter_typed(input, output, op)
            }
            (input, output) => Err(dtype_mismatch(collective, &input, &output)),
        }
    }

    /// Fails unless the buffer called `what` holds `found` = `world_size` blocks of `block`.
    pub(crate) fn check_blocks(
        collective: Collective,
        what: &'static str,
        found: usize,
        block: usize,
        world_size: usize,
    ) -> Result<()> {
        let expected = block * world_size;
        if found == expected {
            Ok(())
        } else {
            Err(Error::LengthMismatch {
                collective,
                what,
                found,
                expected,
            })
        }
    }

    /// The error for an input and output of different element types.
    fn dtype_mismatch(
        collective: Collective,
        input: &BufferRef<'_>,
        output: &BufferMut<'_>,
    ) -> Error {
        Error::DtypeMismatch {
            collective,
            input: input.dtype(),
            output: output.dtype(),
        }
    }
}

/// Implements [`Communicator`] for a transport that implements [`TypedCollectives`] and records
/// every operation on its progress channel: routes each call through [`typed`] between
/// `self.enter(...)` and `self.channel.complete(...)`. The type needs fields `rank`,
/// `world_size` and `channel` (a [`crate::progress::Channel`]), methods `enter(collective,
/// len, dtype)` and `name_error(error)` (how its errors name ranks), the given barrier method (unrecorded) and, if named, the method that counts the
/// bytes it sent over the network; it may move between threads.
macro_rules! recorded_communicator {
    ($transport:ty, barrier = $barrier:ident $(, bytes_sent = $bytes_sent:ident)?) => {
        impl $crate::communicator::Communicator for $transport {
            fn rank(&self) -> usize {
                self.rank
            }

            fn world_size(&self) -> usize {
                self.world_size
            }

            fn all_reduce(
                &mut self,
                buffer: $crate::buffer::BufferMut<'_>,
                op: $crate::buffer::ReduceOp,
            ) -> $crate::error::Result<()> {
                use $crate::operation::Collective;
                let entered = self.enter(Collective::AllReduce, buffer.len(), buffer.dtype());
                let result = $crate::communicator::typed::all_reduce(self, buffer, op)
                    .map_err(|error| self.name_error(error));
                self.channel.complete(entered, &result);
                result
            }

            fn broadcast(
                &mut self,
                buffer: $crate::buffer::BufferMut<'_>,
                root: usize,
            ) -> $crate::error::Result<()> {
                use $crate::operation::Collective;
                let entered = self.enter(Collective::Broadcast, buffer.len(), buffer.dtype());
                let world_size = self.world_size;
                let result = $crate::communicator::typed::broadcast(self, world_size, buffer, root)
                    .map_err(|error| self.name_error(error));
                self.channel.complete(entered, &result);
                result
            }

            fn all_gather(
                &mut self,
                input: $crate::buffer::BufferRef<'_>,
                output: $crate::buffer::BufferMut<'_>,
            ) -> $crate::error::Result<()> {
                use $crate::operation::Collective;
                let entered = self.enter(Collective::AllGather, output.len(), output.dtype());
                let world_size = self.world_size;
                let result =
                    $crate::communicator::typed::all_gather(self, world_size, input, output)
                        .map_err(|error| self.name_error(error));
                self.channel.complete(entered, &result);
                result
            }

            fn reduce_scatter(
                &mut self,
                input: $crate::buffer::BufferRef<'_>,
                output: $crate::buffer::BufferMut<'_>,
                op: $crate::buffer::ReduceOp,
            ) -> $crate::error::Result<()> {
                use $crate::operation::Collective;
                let entered = self.enter(Collective::ReduceScatter, input.len(), input.dtype());
                let world_size = self.world_size;
                let result = $crate::communicator::typed::reduce_scatter(
                    self, world_size, input, output, op,
                )
                .map_err(|error| self.name_error(error));
                self.channel.complete(entered, &result);
                result
            }

            fn barrier(&mut self) -> $crate::error::Result<()> {
                use $crate::operation::Collective;
                let entered = self.enter(Collective::Barrier, 0, $crate::DType::F32);
                let result = self.$barrier().map_err(|error| self.name_error(error));
                self.channel.complete(entered, &result);
                result
            }

            $(
                fn network_bytes_sent(&self) -> Option<u64> {
                    Some(self.$bytes_sent())
                }
            )?

            fn as_send(&mut self) -> Option<&mut (dyn $crate::communicator::Communicator + Send)> {
                Some(self)
            }
        }
    };
}
pub(crate) use recorded_communicator;
