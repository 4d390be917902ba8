//! The message schedules of the ring collectives, as [`Plan`]s for the transport.
//!
//! A buffer of `len` elements is split into `world_size` segments whose lengths differ by at
//! most one, and every segment into the same number of chunks (so that every step of the ring
//! has the same number of messages, however uneven the segments). Message `m` of a ring phase is
//! chunk `m % chunks` of the segment handled at step `m / chunks`, and send `m` waits for
//! receive `m - chunks`: each chunk is forwarded as soon as it has arrived (and been reduced),
//! which is what pipelines the ring.
//!
//! Reduce-scatter keeps partial sums in `f32` whatever the element type: they travel as `f32`
//! between ranks and are rounded to the element type once, by the rank that owns the segment.
//! The first step's messages are the exception: they carry only the sender's own values, which
//! travel exactly in their own type, so with two ranks (one step) a bf16 or f16 reduction moves
//! only 2-byte elements, half the bytes of an `f32` one.

use std::ops::Range;

use super::transport::Plan;
use crate::buffer::{
    Addend, DType, Element, ReduceOp, accumulate, finish_in_place, finish_into, sum_pair,
};

/// Returns part `index` of `len` elements split into `parts` near-equal parts (the first
/// `len % parts` parts are one element longer).
pub(crate) fn split_range(len: usize, parts: usize, index: usize) -> Range<usize> {
    let base = len / parts;
    let extra = len % parts;
    let start = index * base + index.min(extra);
    start..start + base + usize::from(index < extra)
}

/// How a buffer is cut into segments and chunks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RingLayout {
    /// Elements in the buffer.
    len: usize,
    /// Number of segments (the world size).
    segments: usize,
    /// Chunks per segment, at least one.
    chunks: usize,
}

impl RingLayout {
    /// Cuts `len` elements into `segments` segments of chunks of at most `max_chunk_elements`.
    pub fn new(len: usize, segments: usize, max_chunk_elements: usize) -> Self {
        let longest_segment = len.div_ceil(segments);
        let chunks = longest_segment.div_ceil(max_chunk_elements.max(1)).max(1);
        Self {
            len,
            segments,
            chunks,
        }
    }

    /// Returns the element range of `chunk` of `segment`.
    pub fn chunk(&self, segment: usize, chunk: usize) -> Range<usize> {
        let segment_range = split_range(self.len, self.segments, segment);
        let within = split_range(segment_range.len(), self.chunks, chunk);
        segment_range.start + within.start..segment_range.start + within.end
    }

    /// Returns the element range of `segment`.
    pub fn segment(&self, segment: usize) -> Range<usize> {
        split_range(self.len, self.segments, segment)
    }
}

/// Buffers a communicator keeps between calls, so that collectives do not allocate (the
/// accumulator grows to the largest buffer seen, once, and only for reductions over more than
/// two ranks that cannot accumulate in the caller's buffer).
#[derive(Debug)]
pub(crate) struct Scratch {
    /// Landing place of one received chunk before it is reduced: `f32` partial sums added into
    /// an `f32` buffer, or a first-step chunk of the sender's own values in their element type.
    received: Vec<f32>,
    /// `f32` partial sums for reductions that cannot accumulate in the caller's buffer
    /// (low-precision elements, or a separate output) over more than two ranks: one element
    /// per input element.
    accumulator: Vec<f32>,
}

impl Scratch {
    /// Allocates room for one chunk of `chunk_bytes` bytes (a multiple of 4).
    pub fn new(chunk_bytes: usize) -> Self {
        Self {
            received: vec![0.0; chunk_bytes / 4],
            accumulator: Vec::new(),
        }
    }

    /// Returns the largest chunk, in bytes.
    pub fn chunk_bytes(&self) -> usize {
        self.received.len() * 4
    }

    /// Returns the landing place of a received chunk of `len` elements of type `T`.
    fn received_mut<T: Element>(&mut self, len: usize) -> &mut [T] {
        &mut bytemuck::cast_slice_mut(&mut self.received)[..len]
    }
}

/// The data a reduction works on.
pub(crate) enum ReduceData<'a, T> {
    /// All-reduce: the buffer is the input and receives the result.
    InPlace(&'a mut [T]),
    /// Reduce-scatter: the full input, and this rank's block of the result.
    Separate {
        /// `n * world_size` elements.
        input: &'a [T],
        /// `n` elements, the block of segment `own_segment`.
        output: &'a mut [T],
    },
}

/// Reduce-scatter, followed for all-reduce by an all-gather of the reduced segments.
///
/// Receives never wait for storage (a rank that cannot read while its successor cannot read
/// either would deadlock the ring): an `f32` all-reduce adds each received chunk into the
/// caller's buffer and forwards the partial sums from there; other reductions keep partial
/// sums in an `f32` accumulator as long as the input. The first step sends the sender's own
/// values in their element type, straight from the caller's buffer; its receiver lands them in
/// one chunk of scratch and adds its own values in `f32`, which, with two ranks, completes the
/// sum, rounded once.
pub(crate) struct ReducePlan<'a, T> {
    /// How the buffer is cut.
    layout: RingLayout,
    /// Number of ranks.
    world_size: usize,
    /// The segment this rank reduces completely (and, for all-reduce, distributes first).
    own_segment: usize,
    /// Input and output.
    data: ReduceData<'a, T>,
    /// Divisor applied to the final sums (`Some(world_size)` for averages).
    divisor: Option<f32>,
    /// Whether the all-gather phase follows (all-reduce).
    gather: bool,
    /// Whether partial sums live in the caller's buffer (`f32` all-reduce) rather than in the
    /// accumulator.
    in_place: bool,
    /// The communicator's reusable buffers.
    scratch: &'a mut Scratch,
}

impl<'a, T: Element> ReducePlan<'a, T> {
    /// Plans an in-place all-reduce of `buffer`.
    pub fn all_reduce(
        buffer: &'a mut [T],
        rank: usize,
        world_size: usize,
        op: ReduceOp,
        scratch: &'a mut Scratch,
    ) -> Self {
        Self::new(
            ReduceData::InPlace(buffer),
            (rank + 1) % world_size,
            world_size,
            op,
            true,
            scratch,
        )
    }

    /// Plans a reduce-scatter of `input` (`n * world_size` elements) into `output` (`n`).
    pub fn reduce_scatter(
        input: &'a [T],
        output: &'a mut [T],
        rank: usize,
        world_size: usize,
        op: ReduceOp,
        scratch: &'a mut Scratch,
    ) -> Self {
        Self::new(
            ReduceData::Separate { input, output },
            rank,
            world_size,
            op,
            false,
            scratch,
        )
    }

    fn new(
        data: ReduceData<'a, T>,
        own_segment: usize,
        world_size: usize,
        op: ReduceOp,
        gather: bool,
        scratch: &'a mut Scratch,
    ) -> Self {
        let (len, in_place) = match &data {
            ReduceData::InPlace(buffer) => (buffer.len(), T::DTYPE == DType::F32),
            ReduceData::Separate { input, .. } => (input.len(), false),
        };
        // With two ranks the only reduce-scatter step is the first: no partial sums travel.
        let partial_sums_travel = !in_place && world_size > 2;
        if partial_sums_travel && scratch.accumulator.len() < len {
            scratch.accumulator.resize(len, 0.0);
        }
        // Messages carry `f32` partial sums or elements of `T`: the chunk is as long as the
        // widest of them allows.
        let widest_element = if partial_sums_travel {
            4
        } else {
            T::DTYPE.size_bytes()
        };
        Self {
            layout: RingLayout::new(len, world_size, scratch.chunk_bytes() / widest_element),
            world_size,
            own_segment,
            data,
            divisor: match op {
                ReduceOp::Sum => None,
                ReduceOp::Average => Some(world_size as f32),
            },
            gather,
            in_place,
            scratch,
        }
    }

    /// Messages per phase.
    fn phase_messages(&self) -> usize {
        (self.world_size - 1) * self.layout.chunks
    }

    /// Returns whether message `index` belongs to the reduce-scatter phase, and its step
    /// within its phase.
    fn locate(&self, index: usize) -> (bool, usize) {
        let phase_messages = self.phase_messages();
        if index < phase_messages {
            (true, index / self.layout.chunks)
        } else {
            (false, (index - phase_messages) / self.layout.chunks)
        }
    }

    /// Returns segment `own_segment - offset` (mod world size).
    fn segment_before_own(&self, offset: usize) -> usize {
        (self.own_segment + self.world_size * 2 - offset % self.world_size) % self.world_size
    }

    /// Element range sent as message `index`.
    fn send_range(&self, index: usize) -> Range<usize> {
        let (reducing, step) = self.locate(index);
        let segment = if reducing {
            self.segment_before_own(1 + step)
        } else {
            self.segment_before_own(step)
        };
        self.layout.chunk(segment, index % self.layout.chunks)
    }

    /// Element range received as message `index`.
    fn recv_range(&self, index: usize) -> Range<usize> {
        let (reducing, step) = self.locate(index);
        let segment = if reducing {
            self.segment_before_own(2 + step)
        } else {
            self.segment_before_own(step + 1)
        };
        self.layout.chunk(segment, index % self.layout.chunks)
    }

    /// This rank's own contribution.
    fn local(&self) -> &[T] {
        match &self.data {
            ReduceData::InPlace(buffer) => buffer,
            ReduceData::Separate { input, .. } => input,
        }
    }
}

impl<T: Element> Plan for ReducePlan<'_, T> {
    fn send_count(&self) -> usize {
        self.phase_messages() * if self.gather { 2 } else { 1 }
    }

    fn recv_count(&self) -> usize {
        self.send_count()
    }

    fn send_dependency(&self, index: usize) -> Option<usize> {
        index.checked_sub(self.layout.chunks)
    }

    fn prepare_send(&mut self, _index: usize) {}

    fn send_payload(&self, index: usize) -> &[u8] {
        let range = self.send_range(index);
        let (reducing, step) = self.locate(index);
        if reducing && step > 0 && !self.in_place {
            bytemuck::cast_slice(&self.scratch.accumulator[range])
        } else {
            // The sender's own values (first step), the gather phase, or an `f32` reduction
            // whose partial sums are in the buffer.
            bytemuck::cast_slice(&self.local()[range])
        }
    }

    fn finish_send(&mut self, _index: usize) {}

    fn recv_bytes(&self, index: usize) -> usize {
        let (reducing, step) = self.locate(index);
        let element_bytes = if reducing && step > 0 {
            4
        } else {
            T::DTYPE.size_bytes()
        };
        self.recv_range(index).len() * element_bytes
    }

    fn begin_recv(&mut self, _index: usize) -> bool {
        true
    }

    fn recv_buffer(&mut self, index: usize) -> &mut [u8] {
        let range = self.recv_range(index);
        let (reducing, step) = self.locate(index);
        match (&mut self.data, reducing) {
            // `f32` partial sums to add into the buffer, or the sender's own values.
            (_, true) if self.in_place || step == 0 => {
                bytemuck::cast_slice_mut(self.scratch.received_mut::<T>(range.len()))
            }
            (_, true) => bytemuck::cast_slice_mut(&mut self.scratch.accumulator[range]),
            (ReduceData::InPlace(buffer), false) => bytemuck::cast_slice_mut(&mut buffer[range]),
            // Reduce-scatter has no gather phase.
            (ReduceData::Separate { .. }, false) => &mut [],
        }
    }

    fn finish_recv(&mut self, index: usize) {
        let (reducing, step) = self.locate(index);
        if !reducing {
            return;
        }
        let range = self.recv_range(index);
        let final_step = step + 2 == self.world_size;
        let own_start = self.layout.segment(self.own_segment).start;
        let received: &[T] = &bytemuck::cast_slice(&self.scratch.received)[..range.len()];
        let accumulator = &mut self.scratch.accumulator;
        match &mut self.data {
            // An `f32` all-reduce accumulates in the buffer.
            ReduceData::InPlace(buffer) if self.in_place => {
                let divisor = if final_step { self.divisor } else { None };
                let partial_sums = Addend::Sums(bytemuck::cast_slice(received));
                finish_in_place(&mut buffer[range], partial_sums, divisor);
            }
            ReduceData::InPlace(buffer) if final_step => {
                let others = others(step, received, accumulator, range.clone());
                finish_in_place(&mut buffer[range], others, self.divisor);
            }
            ReduceData::Separate { input, output } if final_step => {
                let others = others(step, received, accumulator, range.clone());
                let output = &mut output[range.start - own_start..range.end - own_start];
                finish_into(output, &input[range], others, self.divisor);
            }
            ReduceData::InPlace(buffer) if step == 0 => {
                sum_pair(&mut accumulator[range.clone()], &buffer[range], received);
            }
            ReduceData::Separate { input, .. } if step == 0 => {
                sum_pair(&mut accumulator[range.clone()], &input[range], received);
            }
            ReduceData::InPlace(buffer) => {
                accumulate(&mut accumulator[range.clone()], &buffer[range]);
            }
            ReduceData::Separate { input, .. } => {
                accumulate(&mut accumulator[range.clone()], &input[range]);
            }
        }
    }
}

/// Returns what the other ranks contributed to chunk `range`, received at `step` by a
/// reduction that keeps partial sums in the accumulator: the predecessor's own values at the
/// first step (`received`), their partial sums after it (received into `accumulator`).
fn others<'b, T>(
    step: usize,
    received: &'b [T],
    accumulator: &'b [f32],
    range: Range<usize>,
) -> Addend<'b, T> {
    if step == 0 {
        Addend::Values(received)
    } else {
        Addend::Sums(&accumulator[range])
    }
}

/// All-gather: every rank's block travels once around the ring.
pub(crate) struct GatherPlan<'a, T> {
    /// How the output is cut (one segment per rank).
    layout: RingLayout,
    /// Number of ranks.
    world_size: usize,
    /// This rank, whose block is already in place.
    rank: usize,
    /// The `n * world_size` output.
    output: &'a mut [T],
}

impl<'a, T: Element> GatherPlan<'a, T> {
    /// Plans an all-gather into `output`, which must already hold this rank's block.
    pub fn new(output: &'a mut [T], rank: usize, world_size: usize, chunk_bytes: usize) -> Self {
        let max_chunk_elements = chunk_bytes / T::DTYPE.size_bytes();
        Self {
            layout: RingLayout::new(output.len(), world_size, max_chunk_elements),
            world_size,
            rank,
            output,
        }
    }

    /// Returns the element range of message `index`, sent (`offset` 0) or received (1).
    fn range(&self, index: usize, offset: usize) -> Range<usize> {
        let step = index / self.layout.chunks;
        let segment = (self.rank + self.world_size * 2 - step - offset) % self.world_size;
        self.layout.chunk(segment, index % self.layout.chunks)
    }
}

impl<T: Element> Plan for GatherPlan<'_, T> {
    fn send_count(&self) -> usize {
        (self.world_size - 1) * self.layout.chunks
    }
    fn recv_count(&self) -> usize {
        self.send_count()
    }
    fn send_dependency(&self, index: usize) -> Option<usize> {
        index.checked_sub(self.layout.chunks)
    }
    fn prepare_send(&mut self, _index: usize) {}
    fn send_payload(&self, index: usize) -> &[u8] {
        bytemuck::cast_slice(&self.output[self.range(index, 0)])
    }
    fn finish_send(&mut self, _index: usize) {}
    fn recv_bytes(&self, index: usize) -> usize {
        self.range(index, 1).len() * T::DTYPE.size_bytes()
    }
    fn begin_recv(&mut self, _index: usize) -> bool {
        true
    }
    fn recv_buffer(&mut self, index: usize) -> &mut [u8] {
        let range = self.range(index, 1);
        bytemuck::cast_slice_mut(&mut self.output[range])
    }
    fn finish_recv(&mut self, _index: usize) {}
}

/// Broadcast: the root's buffer flows down the ring in chunks, each rank forwarding a chunk as
/// soon as it has it; the rank before the root only receives.
pub(crate) struct BroadcastPlan<'a, T> {
    /// The buffer, sent by the root and overwritten elsewhere.
    buffer: &'a mut [T],
    /// Number of chunks.
    chunks: usize,
    /// Whether this rank receives (every rank but the root).
    receives: bool,
    /// Whether this rank sends (every rank but the one before the root).
    sends: bool,
}

impl<'a, T: Element> BroadcastPlan<'a, T> {
    /// Plans a broadcast from `root`.
    pub fn new(
        buffer: &'a mut [T],
        rank: usize,
        world_size: usize,
        root: usize,
        chunk_bytes: usize,
    ) -> Self {
        let distance = (rank + world_size - root) % world_size;
        let max_chunk_elements = (chunk_bytes / T::DTYPE.size_bytes()).max(1);
        Self {
            chunks: buffer.len().div_ceil(max_chunk_elements).max(1),
            buffer,
            receives: distance != 0,
            sends: distance != world_size - 1,
        }
    }

    fn range(&self, index: usize) -> Range<usize> {
        split_range(self.buffer.len(), self.chunks, index)
    }
}

impl<T: Element> Plan for BroadcastPlan<'_, T> {
    fn send_count(&self) -> usize {
        if self.sends { self.chunks } else { 0 }
    }
    fn recv_count(&self) -> usize {
        if self.receives { self.chunks } else { 0 }
    }
    fn send_dependency(&self, index: usize) -> Option<usize> {
        self.receives.then_some(index)
    }
    fn prepare_send(&mut self, _index: usize) {}
    fn send_payload(&self, index: usize) -> &[u8] {
        bytemuck::cast_slice(&self.buffer[self.range(index)])
    }
    fn finish_send(&mut self, _index: usize) {}
    fn recv_bytes(&self, index: usize) -> usize {
        self.range(index).len() * T::DTYPE.size_bytes()
    }
    fn begin_recv(&mut self, _index: usize) -> bool {
        true
    }
    fn recv_buffer(&mut self, index: usize) -> &mut [u8] {
        let range = self.range(index);
        bytemuck::cast_slice_mut(&mut self.buffer[range])
    }
    fn finish_recv(&mut self, _index: usize) {}
}

/// Barrier: `world_size - 1` empty messages, each forwarded after the previous one arrived, so
/// the last one to arrive proves every rank has entered.
pub(crate) struct BarrierPlan {
    /// Messages each way.
    messages: usize,
}

impl BarrierPlan {
    /// Plans a barrier among `world_size` ranks.
    pub fn new(world_size: usize) -> Self {
        Self {
            messages: world_size - 1,
        }
    }
}

impl Plan for BarrierPlan {
    fn send_count(&self) -> usize {
        self.messages
    }
    fn recv_count(&self) -> usize {
        self.messages
    }
    fn send_dependency(&self, index: usize) -> Option<usize> {
        index.checked_sub(1)
    }
    fn prepare_send(&mut self, _index: usize) {}
    fn send_payload(&self, _index: usize) -> &[u8] {
        &[]
    }
    fn finish_send(&mut self, _index: usize) {}
    fn recv_bytes(&self, _index: usize) -> usize {
        0
    }
    fn begin_recv(&mut self, _index: usize) -> bool {
        true
    }
    fn recv_buffer(&mut self, _index: usize) -> &mut [u8] {
        &mut []
    }
    fn finish_recv(&mut self, _index: usize) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_ranges_cover_the_buffer_without_gaps() {
        for len in [0, 1, 7, 10, 1023] {
            for parts in 1..=6 {
                let mut next_start = 0;
                for index in 0..parts {
                    let range = split_range(len, parts, index);
                    assert_eq!(range.start, next_start);
                    assert!(range.len() <= len.div_ceil(parts));
                    next_start = range.end;
                }
                assert_eq!(next_start, len);
            }
        }
    }

    #[test]
    fn layout_chunks_respect_the_size_limit_and_cover_each_segment() {
        let layout = RingLayout::new(1_048_579, 3, 131_072);
        assert_eq!(layout.chunks, 3);
        for segment in 0..3 {
            let mut covered = layout.segment(segment).start;
            for chunk in 0..layout.chunks {
                let range = layout.chunk(segment, chunk);
                assert_eq!(range.start, covered);
                assert!(range.len() <= 131_072);
                covered = range.end;
            }
            assert_eq!(covered, layout.segment(segment).end);
        }
        // Tiny buffers take one message per step, even with empty segments.
        let tiny = RingLayout::new(1, 5, 131_072);
        assert_eq!(tiny.chunks, 1);
        assert_eq!(tiny.chunk(4, 0).len(), 0);
    }

    #[test]
    fn reduce_schedule_visits_every_segment_once_per_phase() {
        let mut scratch = Scratch::new(16);
        let mut buffer = vec![0.0_f32; 10];
        let world_size = 4;
        let rank = 2;
        let plan =
            ReducePlan::all_reduce(&mut buffer, rank, world_size, ReduceOp::Sum, &mut scratch);
        let chunks = plan.layout.chunks;
        let phase = plan.phase_messages();
        assert!(plan.in_place);
        let segments_of = |ranges: Vec<Range<usize>>| {
            let mut starts: Vec<usize> = ranges.iter().map(|range| range.start).collect();
            starts.sort_unstable();
            starts
        };
        // Reduce-scatter receives every segment except the one this rank sends first, and
        // the last one received is the one it owns.
        let received = segments_of(
            (0..phase)
                .step_by(chunks)
                .map(|m| plan.recv_range(m))
                .collect(),
        );
        assert_eq!(received.len(), world_size - 1);
        assert!(!received.contains(&plan.send_range(0).start));
        assert_eq!(
            plan.recv_range(phase - chunks).start,
            plan.layout.segment(plan.own_segment).start
        );
        // The gather phase starts by sending the owned segment.
        assert_eq!(
            plan.send_range(phase),
            plan.layout.chunk(plan.own_segment, 0)
        );
    }
}
