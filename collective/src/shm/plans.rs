//! What each collective writes and reads in each epoch (see [`super::sync`]).
//!
//! - all-reduce, small buffers: every rank copies its buffer into its slot; after one epoch
//!   every rank reduces all slots itself. One barrier, and the fewest steps for latency.
//! - all-reduce, large buffers, chunk by chunk: every rank copies into its slot the stripes of
//!   the chunk that other ranks own; rank `r` reduces stripe `r` from its own buffer and the
//!   others' slots; it publishes the result in its slot in a second epoch, from which everyone
//!   copies the other stripes. Each rank moves about `4 - 2/N` times the buffer through memory,
//!   and the reductions run on every core at once.
//! - broadcast: the root copies a chunk into its slot, everyone copies it out.
//! - all-gather: everyone copies a chunk of its input into its slot and copies out the others'.
//! - reduce-scatter: everyone copies into its slot the pieces of the others' blocks, and
//!   reduces its own block.
//!
//! Sums run in rank order and accumulate in `f32` (rounding once): every rank computes the
//! same sum of the same values in the same order, so results are bit-identical across ranks.

use super::segment::Segment;
use super::sync::{Call, Epochs};
use crate::buffer::{
    Addend, Element, ReduceOp, accumulate, finish_in_place, finish_into, sum_pair,
};
use crate::error::Result;
use crate::operation::Collective;

/// All-reduces of at most this many bytes take the one-epoch path.
const SMALL_BYTES: usize = 32 * 1024;

/// A formed group: the mapped segment and this rank's epoch state.
pub(crate) struct Group {
    pub rank: usize,
    pub world_size: usize,
    pub segment: Segment,
    pub epochs: Epochs,
    /// `f32` partial sums of one stripe (kept between calls).
    pub partial: Vec<f32>,
}

impl Group {
    /// Elements of `T` that fit in a slot.
    fn slot_elements<T: Element>(&self) -> usize {
        self.segment.slot_bytes() / size_of::<T>()
    }

    /// [`crate::Communicator::all_reduce`] (a non-empty buffer, two or more ranks).
    pub fn all_reduce<T: Element>(&mut self, buffer: &mut [T], op: ReduceOp) -> Result<()> {
        let call = Call {
            collective: Collective::AllReduce,
            dtype: T::DTYPE,
            op: Some(op),
            root: 0,
            len: buffer.len(),
        };
        let divisor = self.divisor(op);
        let capacity = self.slot_elements::<T>();
        if size_of_val(buffer) <= SMALL_BYTES && buffer.len() <= capacity {
            let parity = self.epochs.next_parity();
            // SAFETY: the next epoch's parity, within the slot (checked above).
            unsafe { own_slot(&self.segment, self.rank, parity, 0, buffer.len()) }
                .copy_from_slice(buffer);
            let parity = self.epochs.arrive_and_wait(&self.segment, call)?;
            let len = buffer.len();
            // SAFETY: the epoch of `parity` has been waited for.
            let source = |peer: usize| unsafe { slot::<T>(&self.segment, peer, parity, 0, len) };
            reduce_in_place(
                buffer,
                self.rank,
                source,
                self.world_size,
                divisor,
                &mut self.partial,
            );
            return Ok(());
        }
        let (rank, world_size) = (self.rank, self.world_size);
        for chunk in buffer.chunks_mut(capacity) {
            let n = chunk.len();
            let stripe = |owner: usize| n * owner / world_size..n * (owner + 1) / world_size;
            let own = stripe(rank);
            let parity = self.epochs.next_parity();
            {
                // SAFETY: the next epoch's parity, within the slot (a chunk fits).
                let slot =
                    unsafe { own_slot::<T>(&self.segment, self.rank, parity, 0, chunk.len()) };
                slot[..own.start].copy_from_slice(&chunk[..own.start]);
                slot[own.end..].copy_from_slice(&chunk[own.end..]);
            }
            let parity = self.epochs.arrive_and_wait(&self.segment, call)?;
            {
                let (start, len) = (own.start, own.len());
                // SAFETY: the epoch of `parity` has been waited for.
                let source =
                    |peer: usize| unsafe { slot::<T>(&self.segment, peer, parity, start, len) };
                let partial = &mut self.partial;
                reduce_in_place(
                    &mut chunk[own.clone()],
                    rank,
                    source,
                    world_size,
                    divisor,
                    partial,
                );
            }
            let parity = self.epochs.next_parity();
            // SAFETY: the next epoch's parity, within the slot.
            unsafe { own_slot::<T>(&self.segment, self.rank, parity, own.start, own.len()) }
                .copy_from_slice(&chunk[own.clone()]);
            let parity = self.epochs.arrive_and_wait(&self.segment, call)?;
            for owner in (0..world_size).filter(|&owner| owner != rank) {
                let theirs = stripe(owner);
                // SAFETY: the epoch of `parity` has been waited for.
                let reduced =
                    unsafe { slot::<T>(&self.segment, owner, parity, theirs.start, theirs.len()) };
                chunk[theirs].copy_from_slice(reduced);
            }
        }
        Ok(())
    }

    /// [`crate::Communicator::broadcast`] (a non-empty buffer, two or more ranks).
    pub fn broadcast<T: Element>(&mut self, buffer: &mut [T], root: usize) -> Result<()> {
        let call = Call {
            collective: Collective::Broadcast,
            dtype: T::DTYPE,
            op: None,
            root,
            len: buffer.len(),
        };
        for chunk in buffer.chunks_mut(self.slot_elements::<T>()) {
            let parity = self.epochs.next_parity();
            if self.rank == root {
                // SAFETY: the next epoch's parity, within the slot.
                unsafe { own_slot(&self.segment, self.rank, parity, 0, chunk.len()) }
                    .copy_from_slice(chunk);
            }
            let parity = self.epochs.arrive_and_wait(&self.segment, call)?;
            if self.rank != root {
                // SAFETY: the epoch of `parity` has been waited for.
                chunk.copy_from_slice(unsafe { slot(&self.segment, root, parity, 0, chunk.len()) });
            }
        }
        Ok(())
    }

    /// [`crate::Communicator::all_gather`] (a non-empty input, two or more ranks; this rank's
    /// own block of `output` already holds its input).
    pub fn all_gather<T: Element>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        let call = Call {
            collective: Collective::AllGather,
            dtype: T::DTYPE,
            op: None,
            root: 0,
            len: input.len(),
        };
        let block = input.len();
        let capacity = self.slot_elements::<T>();
        for start in (0..block).step_by(capacity) {
            let len = capacity.min(block - start);
            let parity = self.epochs.next_parity();
            // SAFETY: the next epoch's parity, within the slot.
            unsafe { own_slot(&self.segment, self.rank, parity, 0, len) }
                .copy_from_slice(&input[start..start + len]);
            let parity = self.epochs.arrive_and_wait(&self.segment, call)?;
            for peer in (0..self.world_size).filter(|&peer| peer != self.rank) {
                let at = peer * block + start;
                // SAFETY: the epoch of `parity` has been waited for.
                output[at..at + len]
                    .copy_from_slice(unsafe { slot(&self.segment, peer, parity, 0, len) });
            }
        }
        Ok(())
    }

    /// [`crate::Communicator::reduce_scatter`] (a non-empty output, two or more ranks).
    pub fn reduce_scatter<T: Element>(
        &mut self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let call = Call {
            collective: Collective::ReduceScatter,
            dtype: T::DTYPE,
            op: Some(op),
            root: 0,
            len: input.len(),
        };
        let (rank, world_size, divisor) = (self.rank, self.world_size, self.divisor(op));
        let block = output.len();
        // Each slot holds one piece of every rank's block.
        let piece = (self.slot_elements::<T>() / world_size).max(1);
        for start in (0..block).step_by(piece) {
            let len = piece.min(block - start);
            let parity = self.epochs.next_parity();
            for owner in (0..world_size).filter(|&owner| owner != rank) {
                let from = owner * block + start;
                // SAFETY: the next epoch's parity, within the slot.
                unsafe { own_slot(&self.segment, self.rank, parity, owner * piece, len) }
                    .copy_from_slice(&input[from..from + len]);
            }
            let parity = self.epochs.arrive_and_wait(&self.segment, call)?;
            let own = &input[rank * block + start..rank * block + start + len];
            let source = |peer: usize| {
                if peer == rank {
                    own
                } else {
                    // SAFETY: the epoch of `parity` has been waited for.
                    unsafe { slot::<T>(&self.segment, peer, parity, rank * piece, len) }
                }
            };
            let partial = &mut self.partial;
            reduce_into(
                &mut output[start..start + len],
                source,
                world_size,
                divisor,
                partial,
            );
        }
        Ok(())
    }

    /// [`crate::Communicator::barrier`] (two or more ranks).
    pub fn barrier(&mut self) -> Result<()> {
        let call = Call {
            collective: Collective::Barrier,
            dtype: crate::DType::F32,
            op: None,
            root: 0,
            len: 0,
        };
        self.epochs.arrive_and_wait(&self.segment, call).map(drop)
    }

    fn divisor(&self, op: ReduceOp) -> Option<f32> {
        match op {
            ReduceOp::Sum => None,
            ReduceOp::Average => Some(self.world_size as f32),
        }
    }
}

/// Rank `rank`'s slot of `parity`, elements `start..start + len`, for reading.
///
/// # Safety
/// The epoch protocol must allow reading it: this rank has waited for an epoch of `parity` and
/// not arrived at the next, and the range lies within the slot.
unsafe fn slot<T: Element>(
    segment: &Segment,
    rank: usize,
    parity: usize,
    start: usize,
    len: usize,
) -> &[T] {
    debug_assert!((start + len) * size_of::<T>() <= segment.slot_bytes());
    // SAFETY: in bounds and 64-byte aligned (segment layout); no rank writes it while readable
    // (the caller's promise); every bit pattern is a valid T (Pod).
    unsafe { std::slice::from_raw_parts(segment.slot(rank, parity).cast::<T>().add(start), len) }
}

/// This rank's (`rank`) slot of `parity`, elements `start..start + len`, for writing before it
/// arrives at the next epoch.
///
/// # Safety
/// `parity` must be the next epoch's, the range must lie within the slot, and the caller must
/// hold no other view of it.
#[allow(clippy::mut_from_ref)]
unsafe fn own_slot<T: Element>(
    segment: &Segment,
    rank: usize,
    parity: usize,
    start: usize,
    len: usize,
) -> &mut [T] {
    debug_assert!((start + len) * size_of::<T>() <= segment.slot_bytes());
    // SAFETY: as in `slot`; no other rank reads this slot until this rank arrives.
    unsafe {
        std::slice::from_raw_parts_mut(segment.slot(rank, parity).cast::<T>().add(start), len)
    }
}

/// Replaces `own` (rank `rank`'s values) with the reduction, in rank order, of every rank's
/// values (`others(peer)` for the others).
fn reduce_in_place<'a, T: Element>(
    own: &mut [T],
    rank: usize,
    others: impl Fn(usize) -> &'a [T],
    world_size: usize,
    divisor: Option<f32>,
    partial: &mut Vec<f32>,
) {
    if world_size == 2 {
        // a + b = b + a exactly, so both ranks get the same bits.
        finish_in_place(own, Addend::Values(others(1 - rank)), divisor);
        return;
    }
    let last = world_size - 1;
    {
        let values = |peer: usize| if peer == rank { &*own } else { others(peer) };
        partial.resize(own.len(), 0.0);
        let partial = &mut partial[..own.len()];
        sum_pair(partial, values(0), values(1));
        for peer in 2..last {
            accumulate(partial, values(peer));
        }
    }
    let partial = &partial[..own.len()];
    if rank == last {
        finish_in_place(own, Addend::Sums(partial), divisor);
    } else {
        finish_into(own, others(last), Addend::Sums(partial), divisor);
    }
}

/// Writes into `output` the reduction, in rank order, of every rank's values
/// (`values(rank)`).
fn reduce_into<'a, T: Element>(
    output: &mut [T],
    values: impl Fn(usize) -> &'a [T],
    world_size: usize,
    divisor: Option<f32>,
    partial: &mut Vec<f32>,
) {
    if world_size == 2 {
        finish_into(output, values(1), Addend::Values(values(0)), divisor);
        return;
    }
    let last = world_size - 1;
    partial.resize(output.len(), 0.0);
    let partial = &mut partial[..output.len()];
    sum_pair(partial, values(0), values(1));
    for peer in 2..last {
        accumulate(partial, values(peer));
    }
    finish_into(output, values(last), Addend::Sums(partial), divisor);
}
