//! Data parallelism: keeping replicas identical by exchanging parameters and gradients.
//!
//! At start rank 0's parameters (and, when resuming, its optimizer state and step) are
//! broadcast, so every replica starts from the same point whatever its own initialisation or
//! file access. After each backward pass every rank packs its gradients, already weighted by
//! its share of the global batch (see [`crate::sampler`]), into one reused flat f32 buffer and
//! sum-all-reduces it bucket by bucket; the result is the exact mean gradient of the global
//! batch on every rank, so every rank applies the same update and the replicas never drift.

use cohort_collective::{Communicator, ReduceOp};

use crate::error::{Result, TrainerError};
use crate::optim::Optimizer;
use crate::parameters::ParameterSet;

/// Largest integer f32 represents exactly; steps are split into pieces below it for broadcast.
const F32_EXACT_INTEGER_BITS: u32 = 24;

/// The reused flat gradient buffer and its division into all-reduce buckets.
///
/// The buffer holds every parameter's gradient in flat order followed by one extra element, the
/// rank's weighted loss, so the global mean loss arrives with the last bucket at no extra
/// round trip.
#[derive(Debug, Clone)]
pub struct GradientBuckets {
    /// Gradients in flat parameter order, then the weighted loss.
    flat: Vec<f32>,
    /// Elements per bucket (the last bucket may be shorter).
    bucket_elements: usize,
}

impl GradientBuckets {
    /// Creates the buffer for `element_count` parameters with buckets of `bucket_bytes` bytes
    /// (at least one element each).
    pub fn new(element_count: usize, bucket_bytes: u64) -> Self {
        let bucket_elements = usize::try_from(bucket_bytes / 4)
            .unwrap_or(usize::MAX)
            .max(1);
        Self {
            flat: vec![0.0; element_count + 1],
            bucket_elements,
        }
    }

    /// Returns the gradients (without the loss slot).
    pub fn gradients(&self) -> &[f32] {
        &self.flat[..self.flat.len() - 1]
    }

    /// Returns the gradients mutably, for packing and clipping.
    pub fn gradients_mut(&mut self) -> &mut [f32] {
        let end = self.flat.len() - 1;
        &mut self.flat[..end]
    }

    /// Returns the loss slot: this rank's weighted loss before the all-reduce, the global mean
    /// loss after it.
    pub fn loss(&self) -> f32 {
        self.flat[self.flat.len() - 1]
    }

    /// Sets the loss slot.
    pub fn set_loss(&mut self, weighted_loss: f32) {
        let last = self.flat.len() - 1;
        self.flat[last] = weighted_loss;
    }

    /// Returns the number of all-reduce calls one exchange makes.
    pub fn bucket_count(&self) -> usize {
        self.flat.len().div_ceil(self.bucket_elements)
    }

    /// Sums the buffer over all ranks in place, one bucket per all-reduce call. With one rank
    /// it does nothing.
    pub fn all_reduce(&mut self, communicator: &mut dyn Communicator) -> Result<()> {
        if communicator.world_size() == 1 {
            return Ok(());
        }
        for bucket in self.flat.chunks_mut(self.bucket_elements) {
            communicator.all_reduce(bucket.into(), ReduceOp::Sum)?;
        }
        Ok(())
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
    if communicator.rank() == 0 {
        if let Ok(value) = outcome {
            message[0] = 1.0;
            message[1..].copy_from_slice(&split_integer(value));
        }
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

    #[test]
    fn buckets_cover_the_buffer_and_the_loss_slot() {
        let mut buckets = GradientBuckets::new(10, 16);
        assert_eq!(buckets.bucket_count(), 3);
        buckets.gradients_mut()[9] = 2.0;
        buckets.set_loss(0.5);
        assert_eq!(buckets.gradients().len(), 10);
        assert_eq!(buckets.gradients()[9], 2.0);
        assert_eq!(buckets.loss(), 0.5);
        assert_eq!(GradientBuckets::new(1000, 25 << 20).bucket_count(), 1);
    }
}
