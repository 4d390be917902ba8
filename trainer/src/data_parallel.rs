//! Data parallelism: keeping replicas identical by exchanging parameters and gradients.
//!
//! At start rank 0's parameters (and, when resuming, its optimizer state and step) are
//! broadcast, so every replica starts from the same point whatever its own initialisation or
//! file access. After each backward pass every rank packs its gradients, already weighted by
//! its share of the global batch (see [`crate::sampler`]), into one reused flat f32 buffer and
//! sum-all-reduces it bucket by bucket; the result is the exact mean gradient of the global
//! batch on every rank, so every rank applies the same update and the replicas never drift.
//!
//! With more than one bucket, [`GradientBuckets::backward_overlapped`] runs the backward pass
//! layer by layer and hands each bucket to a communication thread as soon as its gradients
//! exist, so the exchange of the last layers' gradients overlaps the backward pass of the
//! first ones; only what is left when the backward pass ends is exposed.

use std::ops::Range;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use cohort_collective::{Communicator, ReduceOp};

use cohort_jobspec::precision::Precision;

use crate::error::{Result, TrainerError};
use crate::models::{Model, StagedForward};
use crate::optim::Optimizer;
use crate::parameters::ParameterSet;
use crate::precision::NarrowBuffers;

/// Largest integer f32 represents exactly; steps are split into pieces below it for broadcast.
const F32_EXACT_INTEGER_BITS: u32 = 24;
/// Elements after the gradients in the flat buffer: the weighted loss and the stop flag.
const TRAILING_SLOTS: usize = 2;

/// One all-reduce unit: consecutive parameters whose gradients are exchanged by one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// Indices of its parameters in the [`ParameterSet`].
    pub parameters: Range<usize>,
    /// Its elements in the flat buffer (the first bucket also holds the loss and stop slots).
    pub elements: Range<usize>,
}

/// The reused flat gradient buffer and its division into all-reduce buckets.
///
/// The buffer holds every parameter's gradient in flat order followed by two extra elements:
/// the rank's weighted loss, so the global mean loss arrives with the gradients at no extra
/// round trip, and its stop flag (1 when the rank was asked to stop with a checkpoint), so the
/// ranks agree to stop after the same step at no extra round trip either. Buckets hold whole parameters, at most `bucket_bytes` of them unless one parameter is
/// larger by itself, and are formed from the last parameter backwards, the order in which the
/// backward pass produces gradients (as PyTorch DDP does).
#[derive(Debug, Clone)]
pub struct GradientBuckets {
    /// Gradients in flat parameter order, then the weighted loss and the stop flag.
    flat: Vec<f32>,
    /// Buckets in launch order: the one holding the last parameters first.
    buckets: Vec<Bucket>,
    /// Index in `buckets` of the bucket of each parameter.
    bucket_of_parameter: Vec<usize>,
}

impl GradientBuckets {
    /// Creates the buffer for `parameters` with buckets of about `bucket_bytes` bytes.
    pub fn new(parameters: &ParameterSet, bucket_bytes: u64) -> Self {
        let limit = usize::try_from(bucket_bytes / 4)
            .unwrap_or(usize::MAX)
            .max(1);
        let element_count = parameters.element_count();
        let mut buckets: Vec<Bucket> = Vec::new();
        let mut bucket_of_parameter = vec![0; parameters.len()];
        for (index, parameter) in parameters.iter().enumerate().rev() {
            let range = parameter.flat_range();
            match buckets.last_mut() {
                Some(bucket) if bucket.elements.end - range.start <= limit => {
                    bucket.parameters.start = index;
                    bucket.elements.start = range.start;
                }
                _ => buckets.push(Bucket {
                    parameters: index..index + 1,
                    elements: range,
                }),
            }
            bucket_of_parameter[index] = buckets.len() - 1;
        }
        match buckets.first_mut() {
            Some(first) => first.elements.end += TRAILING_SLOTS,
            None => buckets.push(Bucket {
                parameters: 0..0,
                elements: 0..TRAILING_SLOTS,
            }),
        }
        Self {
            flat: vec![0.0; element_count + TRAILING_SLOTS],
            buckets,
            bucket_of_parameter,
        }
    }

    /// Returns the buckets in launch order.
    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// Where the trailing slots start: the gradients end there.
    fn trailing(&self) -> usize {
        self.flat.len() - TRAILING_SLOTS
    }

    /// Returns the gradients (without the trailing slots).
    pub fn gradients(&self) -> &[f32] {
        &self.flat[..self.trailing()]
    }

    /// Returns the gradients mutably, for packing and clipping.
    pub fn gradients_mut(&mut self) -> &mut [f32] {
        let end = self.trailing();
        &mut self.flat[..end]
    }

    /// Returns the loss slot: this rank's weighted loss before the all-reduce, the global mean
    /// loss after it.
    pub fn loss(&self) -> f32 {
        self.flat[self.trailing()]
    }

    /// Sets the loss slot.
    pub fn set_loss(&mut self, weighted_loss: f32) {
        let slot = self.trailing();
        self.flat[slot] = weighted_loss;
    }

    /// Sets the stop slot: whether this rank was asked to stop after this step.
    pub fn set_stop_request(&mut self, requested: bool) {
        let slot = self.trailing() + 1;
        self.flat[slot] = f32::from(u8::from(requested));
    }

    /// Sums the stop slot alone over all ranks: for a step whose gradients are not exchanged
    /// (an overflow skipped it), so that the ranks still agree whether to stop after it.
    pub fn all_reduce_stop(&mut self, communicator: &mut dyn Communicator) -> Result<()> {
        if communicator.world_size() == 1 {
            return Ok(());
        }
        let slot = self.trailing() + 1;
        communicator.all_reduce((&mut self.flat[slot..]).into(), ReduceOp::Sum)?;
        Ok(())
    }

    /// Whether, after the all-reduce, some rank asked to stop after this step (before it, or
    /// alone, whether this one did).
    pub fn stop_agreed(&self) -> bool {
        self.flat[self.trailing() + 1] > 0.0
    }

    /// Sums the buffer over all ranks in place, one all-reduce call per bucket. With one rank
    /// it does nothing.
    pub fn all_reduce(&mut self, communicator: &mut dyn Communicator) -> Result<()> {
        if communicator.world_size() == 1 {
            return Ok(());
        }
        for bucket in &self.buckets {
            communicator.all_reduce(
                (&mut self.flat[bucket.elements.clone()]).into(),
                ReduceOp::Sum,
            )?;
        }
        Ok(())
    }

    /// Sums the gradients over all ranks in `format` (bucket by bucket; the collective
    /// accumulates in f32 and rounds once) and the trailing slots in f32. With one rank it does
    /// nothing.
    pub fn all_reduce_as(
        &mut self,
        communicator: &mut dyn Communicator,
        format: Precision,
        narrow: &mut NarrowBuffers,
    ) -> Result<()> {
        if communicator.world_size() == 1 {
            return Ok(());
        }
        let trailing = self.trailing();
        for bucket in &self.buckets {
            let end = bucket.elements.end.min(trailing);
            if bucket.elements.start < end {
                narrow.all_reduce(
                    &mut self.flat[bucket.elements.start..end],
                    format,
                    communicator,
                )?;
            }
        }
        communicator.all_reduce((&mut self.flat[trailing..]).into(), ReduceOp::Sum)?;
        Ok(())
    }

    /// Runs the staged backward pass of `forward` on the calling thread while a communication
    /// thread all-reduces each bucket as soon as its gradients (scaled by `scale`) are packed,
    /// so the exchange of the last layers overlaps the backward pass of the first ones. The
    /// loss and stop slots must be set first. Returns how long the calling thread then waited for the
    /// remaining all-reduces: the communication left exposed.
    pub fn backward_overlapped(
        &mut self,
        communicator: &mut (dyn Communicator + Send),
        model: &Model,
        forward: StagedForward,
        loss: &Tensor,
        scale: f32,
    ) -> Result<Duration> {
        // Cut the flat buffer into one slice per bucket; buckets cover it from the end down.
        let mut slices: Vec<Option<&mut [f32]>> = Vec::with_capacity(self.buckets.len());
        let mut rest = self.flat.as_mut_slice();
        for bucket in &self.buckets {
            let (head, tail) = rest.split_at_mut(bucket.elements.start);
            slices.push(Some(tail));
            rest = head;
        }
        let buckets = &self.buckets;
        let bucket_of_parameter = &self.bucket_of_parameter;
        let parameters = model.parameters();
        std::thread::scope(|scope| {
            let (sender, receiver) = mpsc::channel::<&mut [f32]>();
            let exchange = scope.spawn(move || -> Result<()> {
                for bucket in receiver {
                    communicator.all_reduce(bucket.into(), ReduceOp::Sum)?;
                }
                Ok(())
            });
            let mut next_bucket = 0;
            let backward = model.backward_staged(forward, loss, |stage, gradients| {
                for index in stage.clone() {
                    let bucket = bucket_of_parameter[index];
                    let start = parameters.get(index)?.flat_range().start;
                    let offset = start - buckets[bucket].elements.start;
                    let length = parameters.get(index)?.len();
                    let Some(slice) = slices[bucket].as_deref_mut() else {
                        return Err(TrainerError::Config(format!(
                            "bucket {bucket} sent before parameter {index} was packed"
                        )));
                    };
                    parameters.read_gradient(
                        index,
                        gradients,
                        &mut slice[offset..offset + length],
                        scale,
                    )?;
                }
                while next_bucket < buckets.len()
                    && buckets[next_bucket].parameters.start >= stage.start
                {
                    if let Some(slice) = slices[next_bucket].take() {
                        // A closed channel means the exchange failed; join reports why.
                        let _ = sender.send(slice);
                    }
                    next_bucket += 1;
                }
                Ok(())
            });
            drop(sender);
            let waiting = Instant::now();
            let exchanged = exchange.join().unwrap_or_else(|_| {
                Err(TrainerError::Config(
                    "the gradient exchange thread panicked".to_owned(),
                ))
            });
            let exposed = waiting.elapsed();
            backward?;
            exchanged?;
            Ok(exposed)
        })
    }
}

/// Overwrites every rank's parameters with rank 0's; `scratch` is reused as the flat buffer.
pub fn broadcast_parameters(
    communicator: &mut dyn Communicator,
    parameters: &ParameterSet,
    scratch: &mut Vec<f32>,
) -> Result<()> {
    if communicator.world_size() == 1 {
        return Ok(());
    }
    scratch.clear();
    scratch.resize(parameters.element_count(), 0.0);
    if communicator.rank() == 0 {
        parameters.read_values(scratch)?;
    }
    communicator.broadcast(scratch.as_mut_slice().into(), 0)?;
    parameters.write_values(scratch)
}

/// Overwrites every rank's optimizer state with rank 0's.
pub fn broadcast_optimizer_state(
    communicator: &mut dyn Communicator,
    optimizer: &mut Optimizer,
) -> Result<()> {
    if communicator.world_size() == 1 {
        return Ok(());
    }
    let mut steps_taken = [0.0f32; 3];
    if communicator.rank() == 0 {
        steps_taken = split_integer(optimizer.steps_taken());
    }
    communicator.broadcast(steps_taken.as_mut_slice().into(), 0)?;
    let mut buffers: Vec<(String, Vec<f32>)> = optimizer
        .state()
        .buffers()
        .into_iter()
        .map(|(name, values)| (name.to_owned(), values.to_vec()))
        .collect();
    for (_, values) in &mut buffers {
        communicator.broadcast(values.as_mut_slice().into(), 0)?;
    }
    optimizer.restore(join_integer(steps_taken), &buffers)
}

/// Broadcasts rank 0's outcome of a fallible start-up action (such as loading a checkpoint)
/// together with an integer result, so that every rank fails when rank 0 failed instead of
/// waiting on it. Returns rank 0's integer.
pub fn broadcast_outcome(
    communicator: &mut dyn Communicator,
    outcome: std::result::Result<u64, &TrainerError>,
    what: &str,
) -> Result<u64> {
    if communicator.world_size() == 1 {
        return match outcome {
            Ok(value) => Ok(value),
            Err(error) => Err(TrainerError::Config(format!("{what}: {error}"))),
        };
    }
    let mut message = [0.0f32; 4];
    if let (0, Ok(value)) = (communicator.rank(), outcome) {
        message[0] = 1.0;
        message[1..].copy_from_slice(&split_integer(value));
    }
    communicator.broadcast(message.as_mut_slice().into(), 0)?;
    if message[0] != 1.0 {
        return Err(TrainerError::Config(match outcome {
            Err(error) if communicator.rank() == 0 => format!("{what}: {error}"),
            _ => format!("{what} failed on rank 0"),
        }));
    }
    Ok(join_integer([message[1], message[2], message[3]]))
}

/// Splits `value` into three f32s of at most 24 bits each (exact up to 2^72).
fn split_integer(value: u64) -> [f32; 3] {
    let mask = (1u64 << F32_EXACT_INTEGER_BITS) - 1;
    [
        (value & mask) as f32,
        ((value >> F32_EXACT_INTEGER_BITS) & mask) as f32,
        (value >> (2 * F32_EXACT_INTEGER_BITS)) as f32,
    ]
}

fn join_integer(parts: [f32; 3]) -> u64 {
    (parts[0] as u64)
        | ((parts[1] as u64) << F32_EXACT_INTEGER_BITS)
        | ((parts[2] as u64) << (2 * F32_EXACT_INTEGER_BITS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_survive_the_f32_split() {
        for value in [0, 1, 16_777_215, 16_777_216, 1 << 40, u64::MAX >> 16] {
            assert_eq!(join_integer(split_integer(value)), value);
        }
    }

    fn parameters_of_sizes(sizes: &[usize]) -> ParameterSet {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let mut set = ParameterSet::new(candle_core::Device::Cpu);
        for (index, &size) in sizes.iter().enumerate() {
            set.add(
                format!("p{index}"),
                size,
                crate::parameters::Initialization::Zeros,
                &mut rng,
            )
            .unwrap();
        }
        set
    }

    #[test]
    fn buckets_hold_whole_parameters_from_the_last_backwards() {
        // Sizes 3, 5, 2, 9, 1 with 8-element buckets: [p4 p3] is 10 > 8 so p3 starts anew.
        let set = parameters_of_sizes(&[3, 5, 2, 9, 1]);
        let buckets = GradientBuckets::new(&set, 32);
        let expected = vec![
            Bucket {
                parameters: 4..5,
                elements: 19..22,
            },
            Bucket {
                parameters: 3..4,
                elements: 10..19,
            },
            Bucket {
                parameters: 1..3,
                elements: 3..10,
            },
            Bucket {
                parameters: 0..1,
                elements: 0..3,
            },
        ];
        assert_eq!(buckets.buckets(), expected.as_slice());
        assert_eq!(buckets.bucket_of_parameter, vec![3, 2, 2, 1, 0]);
        let one = GradientBuckets::new(&set, 25 << 20);
        assert_eq!(one.buckets().len(), 1);
        assert_eq!(one.buckets()[0].elements, 0..22);
    }

    #[test]
    fn the_loss_and_stop_slots_follow_the_gradients() {
        let set = parameters_of_sizes(&[4, 6]);
        let mut buckets = GradientBuckets::new(&set, 16);
        buckets.gradients_mut()[9] = 2.0;
        buckets.set_loss(0.5);
        assert!(!buckets.stop_agreed());
        buckets.set_stop_request(true);
        assert_eq!(buckets.gradients().len(), 10);
        assert_eq!(buckets.gradients()[9], 2.0);
        assert_eq!(buckets.loss(), 0.5);
        assert!(buckets.stop_agreed());
        let empty = GradientBuckets::new(&parameters_of_sizes(&[]), 16);
        assert_eq!(empty.buckets()[0].elements, 0..2);
    }
}
