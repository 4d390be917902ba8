//! Mixed precision: the working format of the forward and backward passes, the format
//! gradients travel in, fp16's dynamic loss scaling and the agreement on skipped steps.
//!
//! The optimizer always owns fp32 master weights and state. With bf16 or fp16 a working copy of
//! the model in that format computes the passes and is refreshed from the masters after every
//! update; gradients are widened to fp32 as they are read. fp16 multiplies the loss by a scale
//! before the backward pass (so small gradients do not flush to zero) and divides the fp32
//! gradients by it; a step whose gradients hold inf or NaN on any rank is skipped on every rank
//! (the ranks agree through the communicator), and the scale backs off.

use candle_core::DType;
use cohort_collective::{BufferMut, Communicator, ReduceOp};
use cohort_jobspec::precision::{LossScaling, Precision};
use half::{bf16, f16};

use crate::error::Result;

/// candle's element type of a working precision.
pub fn tensor_dtype(precision: Precision) -> DType {
    match precision {
        Precision::Fp32 => DType::F32,
        Precision::Bf16 => DType::BF16,
        Precision::Fp16 => DType::F16,
    }
}

/// The collective's element type of a gradient-exchange precision.
pub fn wire_dtype(precision: Precision) -> cohort_numerics::DType {
    match precision {
        Precision::Fp32 => cohort_numerics::DType::F32,
        Precision::Bf16 => cohort_numerics::DType::Bf16,
        Precision::Fp16 => cohort_numerics::DType::F16,
    }
}

/// fp16's loss scale and the steps skipped so far.
#[derive(Debug, Clone)]
pub struct LossScaler {
    /// Dynamic scaling, or `None` (scale fixed at 1).
    scaling: Option<LossScaling>,
    /// The current scale.
    scale: f64,
    /// Steps in a row without overflow.
    clean_steps: u64,
    /// Steps skipped because of an overflow.
    skipped_steps: u64,
    /// Skipped steps in a row.
    skipped_in_a_row: u64,
}

impl LossScaler {
    /// A scaler for `scaling` (fp16), or a fixed scale of 1.
    pub fn new(scaling: Option<LossScaling>) -> Self {
        Self {
            scale: scaling.map_or(1.0, |scaling| scaling.initial_scale),
            scaling,
            clean_steps: 0,
            skipped_steps: 0,
            skipped_in_a_row: 0,
        }
    }

    /// The scale the next loss is multiplied by.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Steps skipped so far.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }

    /// Steps skipped in a row up to now.
    pub fn skipped_in_a_row(&self) -> u64 {
        self.skipped_in_a_row
    }

    /// Records a step's outcome: an overflow backs the scale off and counts a skip; a clean
    /// step grows it after `growth_interval` clean steps in a row.
    pub fn update(&mut self, overflow: bool) {
        if overflow {
            self.skipped_steps += 1;
            self.skipped_in_a_row += 1;
            self.clean_steps = 0;
            if let Some(scaling) = self.scaling {
                self.scale = (self.scale * scaling.backoff_factor).max(f64::MIN_POSITIVE);
            }
            return;
        }
        self.skipped_in_a_row = 0;
        self.clean_steps += 1;
        if let Some(scaling) = self.scaling
            && self.clean_steps.is_multiple_of(scaling.growth_interval)
        {
            self.scale =
                (self.scale * scaling.growth_factor).min(cohort_jobspec::precision::MAX_LOSS_SCALE);
        }
    }
}

/// Whether `values` hold an inf or a NaN.
pub fn has_non_finite(values: &[f32]) -> bool {
    // Summing propagates inf and NaN without a branch per element.
    let sum: f32 = values.iter().map(|value| value * 0.0).sum();
    sum != 0.0
}

/// Agrees with every rank of `communicator` on whether any rank overflowed.
pub fn agree_on_overflow(
    local_overflow: bool,
    communicator: &mut dyn Communicator,
) -> Result<bool> {
    let mut flag = [if local_overflow { 1.0f32 } else { 0.0 }];
    if communicator.world_size() > 1 {
        communicator.all_reduce(flag.as_mut_slice().into(), ReduceOp::Sum)?;
    }
    Ok(flag[0] > 0.0)
}

/// Reusable buffers for exchanging f32 gradients in a narrower format.
#[derive(Debug, Default)]
pub struct NarrowBuffers {
    /// bf16 copy.
    bf16: Vec<bf16>,
    /// f16 copy.
    f16: Vec<f16>,
}

impl NarrowBuffers {
    /// Sums `values` over `communicator` in `precision` (the collective accumulates in f32 and
    /// rounds once), writing the result back as f32.
    pub fn all_reduce(
        &mut self,
        values: &mut [f32],
        precision: Precision,
        communicator: &mut dyn Communicator,
    ) -> Result<()> {
        match precision {
            Precision::Fp32 => communicator.all_reduce(BufferMut::F32(values), ReduceOp::Sum)?,
            Precision::Bf16 => {
                self.bf16.clear();
                self.bf16.extend(values.iter().map(|&v| bf16::from_f32(v)));
                communicator.all_reduce(BufferMut::Bf16(&mut self.bf16), ReduceOp::Sum)?;
                for (out, value) in values.iter_mut().zip(&self.bf16) {
                    *out = value.to_f32();
                }
            }
            Precision::Fp16 => {
                self.f16.clear();
                self.f16.extend(values.iter().map(|&v| f16::from_f32(v)));
                communicator.all_reduce(BufferMut::F16(&mut self.f16), ReduceOp::Sum)?;
                for (out, value) in values.iter_mut().zip(&self.f16) {
                    *out = value.to_f32();
                }
            }
        }
        Ok(())
    }
}

/// Bytes of `elements` gradient values in `precision`.
pub fn gradient_bytes(elements: usize, precision: Precision) -> u64 {
    let size = match precision {
        Precision::Fp32 => 4,
        Precision::Bf16 | Precision::Fp16 => 2,
    };
    (elements * size) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_backs_off_on_overflow_and_grows_after_clean_steps() {
        let mut scaler = LossScaler::new(Some(LossScaling {
            initial_scale: 65_536.0,
            growth_interval: 3,
            growth_factor: 2.0,
            backoff_factor: 0.5,
        }));
        scaler.update(true);
        assert_eq!(scaler.scale(), 32_768.0);
        assert_eq!(scaler.skipped_steps(), 1);
        scaler.update(false);
        scaler.update(false);
        assert_eq!(scaler.scale(), 32_768.0);
        scaler.update(false);
        assert_eq!(scaler.scale(), 65_536.0);
        assert_eq!(scaler.skipped_in_a_row(), 0);
        let mut fixed = LossScaler::new(None);
        fixed.update(true);
        assert_eq!(fixed.scale(), 1.0);
        assert_eq!(fixed.skipped_steps(), 1);
    }

    #[test]
    fn non_finite_values_are_found() {
        assert!(!has_non_finite(&[1.0, -2.0, 3e38]));
        assert!(has_non_finite(&[1.0, f32::INFINITY]));
        assert!(has_non_finite(&[f32::NAN, 0.0]));
        assert!(has_non_finite(&[f32::NEG_INFINITY]));
        assert!(!has_non_finite(&[]));
    }
}
