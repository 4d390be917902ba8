//! The one training step: what happens between "this step's gradients are ready" and "the
//! parameters are updated", shared by every training loop.
//!
//! The loops differ only in how they produce a step's gradients (data-parallel backward and
//! bucketed all-reduce, parameter-server push and pull, the pipeline and tensor-parallel
//! schedules) and hand them to [`Step::finish`] as [`Gradients`], with the
//! [`ParameterUpdate`] that applies them. [`Step::finish`] then, in this order:
//!
//! 1. skips the step if some rank's gradients overflowed (fp16 loss scaling backs off; a run that
//!    skips [`MAX_SKIPPED_STEPS_IN_A_ROW`] steps in a row, or any step without mixed precision,
//!    has diverged);
//! 2. refuses a non-finite loss (diverged);
//! 3. divides the gradients by the loss scale;
//! 4. clips them to `optimizer.grad_clip_norm` over the whole model's norm
//!    ([`clip_factor`], PyTorch's `clip_grad_norm_`);
//! 5. applies them ([`ParameterUpdate::apply`]: the local optimizer on the f32 masters and the
//!    working-copy refresh, or the parameter servers' round trip);
//! 6. returns the step's report, from which the driver builds the step metrics.

use std::ops::Range;
use std::time::{Duration, Instant};

use cohort_collective::{Communicator, ReduceOp};
use cohort_jobspec::precision::{Precision, TrainSpec};

use crate::error::{Result, TrainerError};
use crate::metrics::PhaseTimings;
use crate::optim::{LearningRateSchedule, Optimizer};
use crate::parameters::ParameterSet;
use crate::precision::LossScaler;

/// Steps skipped in a row after which a run is declared diverged (the loss scale would have
/// backed off by 2^-100 by then).
pub const MAX_SKIPPED_STEPS_IN_A_ROW: u64 = 100;

/// One step's gradients, as a loop hands them to [`Step::finish`].
#[derive(Debug)]
pub(crate) struct Gradients<'a> {
    /// The step's loss: over the global batch where the loop reduces it, else this rank's.
    pub(crate) loss: f32,
    /// Whether some rank's gradients overflowed, agreed by every rank (only asked for with
    /// mixed precision; a loop without it passes `false`).
    pub(crate) overflow: bool,
    /// This rank's flat gradient, still multiplied by the loss scale; already exchanged where
    /// the loop exchanges gradients before the update.
    pub(crate) values: &'a mut [f32],
    /// Bytes this rank contributed to that exchange (0 without one).
    pub(crate) exchanged_bytes: u64,
}

/// What an applied update reports.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Applied {
    /// The learning rate the update used.
    pub(crate) learning_rate: f64,
    /// Bytes the update itself sent (the parameter servers' push).
    pub(crate) sent_bytes: u64,
    /// Time the update spent waiting on communication.
    pub(crate) communication: Duration,
}

/// How a step's clean gradients become new parameters.
pub(crate) trait ParameterUpdate {
    /// The learning rate the schedule gives step `step` (0-based); reported for skipped steps.
    fn learning_rate(&self, step: u64) -> f64;

    /// The squared L2 norm of the whole model's gradient, of which `gradients` is this rank's
    /// part. By default this rank holds all of it (data parallelism after the all-reduce).
    fn squared_norm(&mut self, gradients: &[f32]) -> Result<f64> {
        Ok(squared_norm(gradients))
    }

    /// Applies the unscaled, clipped `gradients` as step `step` (0-based), leaving every copy
    /// of the parameters the passes use up to date.
    fn apply(&mut self, step: u64, gradients: &[f32]) -> Result<Applied>;
}

/// What a finished step reports: the step metrics but for what the driver knows (step,
/// epoch, batch and throughput).
#[derive(Debug, Clone, Default)]
pub(crate) struct StepSummary {
    /// See [`crate::metrics::StepMetrics::loss`].
    pub(crate) loss: f32,
    /// See [`crate::metrics::StepMetrics::learning_rate`].
    pub(crate) learning_rate: f64,
    /// See [`crate::metrics::StepMetrics::timings`].
    pub(crate) timings: PhaseTimings,
    /// See [`crate::metrics::StepMetrics::loss_scale`].
    pub(crate) loss_scale: f64,
    /// See [`crate::metrics::StepMetrics::skipped_steps`].
    pub(crate) skipped_steps: u64,
    /// See [`crate::metrics::StepMetrics::gradient_bytes`].
    pub(crate) gradient_bytes: u64,
}

/// The state the step keeps across a run: the loss scale and the clipping bound.
#[derive(Debug)]
pub(crate) struct Step {
    /// This rank, for logs.
    rank: usize,
    /// Mixed precision: an overflow skips the step instead of ending the run.
    mixed: bool,
    /// fp16's dynamic loss scale (fixed at 1 otherwise) and the skipped steps.
    scaler: LossScaler,
    /// `optimizer.grad_clip_norm`.
    clip_norm: Option<f64>,
}

impl Step {
    /// The step of rank `rank` of a run with `train`'s precision, clipping to `clip_norm`.
    pub(crate) fn new(rank: usize, train: &TrainSpec, clip_norm: Option<f64>) -> Self {
        Self {
            rank,
            mixed: train.precision != Precision::Fp32 || train.grad_comm_dtype() != Precision::Fp32,
            scaler: LossScaler::new(train.loss_scaling()),
            clip_norm,
        }
    }

    /// Whether the run uses mixed precision: the loops then agree on overflows.
    pub(crate) fn mixed(&self) -> bool {
        self.mixed
    }

    /// The scale this step's loss is multiplied by before the backward pass.
    pub(crate) fn loss_scale(&self) -> f64 {
        self.scaler.scale()
    }

    /// Finishes step `step` (0-based) with `gradients`, applied through `update`, adding its
    /// time to `timings`, and returns the step's report.
    pub(crate) fn finish(
        &mut self,
        step: u64,
        gradients: Gradients<'_>,
        update: &mut dyn ParameterUpdate,
        mut timings: PhaseTimings,
    ) -> Result<StepSummary> {
        let started = Instant::now();
        let Gradients {
            loss,
            overflow,
            values,
            exchanged_bytes,
        } = gradients;
        let diverged = TrainerError::Diverged {
            step: step + 1,
            loss,
        };
        if overflow {
            if !self.mixed {
                return Err(diverged);
            }
            // Every rank skips this step: no update, a smaller scale next time.
            self.scaler.update(true);
            if self.scaler.skipped_in_a_row() > MAX_SKIPPED_STEPS_IN_A_ROW {
                return Err(diverged);
            }
            tracing::warn!(
                rank = self.rank,
                step = step + 1,
                loss_scale = self.scaler.scale(),
                skipped_steps = self.scaler.skipped_steps(),
                "gradients overflowed on some rank: step skipped"
            );
            timings.optimizer += started.elapsed();
            return Ok(self.report(loss, update.learning_rate(step), timings, 0));
        }
        if !loss.is_finite() {
            return Err(diverged);
        }
        let scale = self.scaler.scale();
        if scale != 1.0 {
            scale_in_place(values, (1.0 / scale) as f32);
        }
        if self.mixed {
            self.scaler.update(false);
        }
        if let Some(max_norm) = self.clip_norm {
            let norm = update.squared_norm(values)?.sqrt();
            if let Some(factor) = clip_factor(norm, max_norm) {
                scale_in_place(values, factor);
            }
        }
        let applied = update.apply(step, values)?;
        timings.exposed_communication += applied.communication;
        timings.optimizer += started.elapsed().saturating_sub(applied.communication);
        let bytes = exchanged_bytes + applied.sent_bytes;
        Ok(self.report(loss, applied.learning_rate, timings, bytes))
    }

    fn report(
        &self,
        loss: f32,
        learning_rate: f64,
        timings: PhaseTimings,
        gradient_bytes: u64,
    ) -> StepSummary {
        StepSummary {
            loss,
            learning_rate,
            timings,
            loss_scale: self.scaler.scale(),
            skipped_steps: self.scaler.skipped_steps(),
            gradient_bytes,
        }
    }
}

/// The factor that brings a gradient of L2 norm `norm` down to `max_norm`, or `None` when it is
/// within the bound. PyTorch's `clip_grad_norm_` adds 1e-6 to the denominator in the same way.
pub(crate) fn clip_factor(norm: f64, max_norm: f64) -> Option<f32> {
    (norm > max_norm).then(|| (max_norm / (norm + 1e-6)) as f32)
}

/// The squared L2 norm of `values`, summed in f64.
pub(crate) fn squared_norm(values: &[f32]) -> f64 {
    values.iter().map(|&g| f64::from(g) * f64::from(g)).sum()
}

fn scale_in_place(values: &mut [f32], factor: f32) {
    values.iter_mut().for_each(|value| *value *= factor);
}

/// The update of the loops that own their parameters: the optimizer on the f32 masters (in
/// host memory), then the refresh of the working copy the passes run on, if any.
#[derive(Debug)]
pub(crate) struct LocalUpdate {
    /// SGD or AdamW and its state.
    pub(crate) optimizer: Optimizer,
    /// The learning rate of every step.
    schedule: LearningRateSchedule,
    /// The f32 masters (sharing storage with the model's).
    masters: ParameterSet,
    /// The working copy (another device or format), sharing storage with the model it belongs
    /// to.
    working: Option<ParameterSet>,
}

impl LocalUpdate {
    /// Updates `masters` with `optimizer` on `schedule`, then refreshes `working`.
    pub(crate) fn new(
        optimizer: Optimizer,
        schedule: LearningRateSchedule,
        masters: &ParameterSet,
        working: Option<&ParameterSet>,
    ) -> Self {
        Self {
            optimizer,
            schedule,
            masters: masters.clone(),
            working: working.cloned(),
        }
    }
}

impl ParameterUpdate for LocalUpdate {
    fn learning_rate(&self, step: u64) -> f64 {
        self.schedule.learning_rate(step)
    }

    fn apply(&mut self, step: u64, gradients: &[f32]) -> Result<Applied> {
        let learning_rate = self.schedule.learning_rate(step);
        self.optimizer
            .step(&self.masters, gradients, learning_rate)?;
        if let Some(working) = &self.working {
            working.copy_from(&self.masters)?;
        }
        Ok(Applied {
            learning_rate,
            ..Applied::default()
        })
    }
}

/// A [`LocalUpdate`] whose gradient is split over a group of ranks: the clipping norm sums
/// each rank's counted part over `group` (the language model's mesh, where every parameter must
/// count once although replicas and tensor-parallel shards hold copies).
pub(crate) struct SplitUpdate<'a> {
    /// The update itself.
    pub(crate) update: &'a mut LocalUpdate,
    /// Every rank holding part of the gradient.
    pub(crate) group: &'a mut dyn Communicator,
    /// The ranges of this rank's flat gradient that count towards the norm (empty on ranks
    /// whose gradient another rank already counts).
    pub(crate) counted: &'a [Range<usize>],
}

impl ParameterUpdate for SplitUpdate<'_> {
    fn learning_rate(&self, step: u64) -> f64 {
        self.update.learning_rate(step)
    }

    fn squared_norm(&mut self, gradients: &[f32]) -> Result<f64> {
        let own: f64 = self
            .counted
            .iter()
            .map(|range| squared_norm(&gradients[range.clone()]))
            .sum();
        let mut total = [own as f32];
        self.group
            .all_reduce(total.as_mut_slice().into(), ReduceOp::Sum)?;
        Ok(f64::from(total[0]))
    }

    fn apply(&mut self, step: u64, gradients: &[f32]) -> Result<Applied> {
        self.update.apply(step, gradients)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what reaches the update.
    #[derive(Default)]
    struct Recorded {
        applied: Vec<(u64, Vec<f32>)>,
    }

    impl ParameterUpdate for Recorded {
        fn learning_rate(&self, step: u64) -> f64 {
            0.1 / (step + 1) as f64
        }

        fn apply(&mut self, step: u64, gradients: &[f32]) -> Result<Applied> {
            self.applied.push((step, gradients.to_vec()));
            Ok(Applied {
                learning_rate: self.learning_rate(step),
                sent_bytes: 7,
                communication: Duration::ZERO,
            })
        }
    }

    fn fp16() -> TrainSpec {
        TrainSpec {
            precision: Precision::Fp16,
            initial_loss_scale: Some(1024.0),
            loss_scale_growth_interval: Some(2),
            ..TrainSpec::default()
        }
    }

    fn gradients(values: &mut [f32], overflow: bool) -> Gradients<'_> {
        Gradients {
            loss: 0.5,
            overflow,
            values,
            exchanged_bytes: 100,
        }
    }

    #[test]
    fn a_clean_step_unscales_clips_and_applies() {
        let mut step = Step::new(0, &fp16(), Some(5.0));
        let mut update = Recorded::default();
        // Scaled by 1024: unscaled (30, 40) has norm 50, clipped to 5.
        let mut values = [30.0 * 1024.0, 40.0 * 1024.0];
        let report = step
            .finish(
                3,
                gradients(&mut values, false),
                &mut update,
                PhaseTimings::default(),
            )
            .unwrap();
        let (applied_step, applied) = &update.applied[0];
        assert_eq!(*applied_step, 3);
        let norm = squared_norm(applied).sqrt();
        assert!((norm - 5.0).abs() < 1e-4, "norm {norm}");
        assert!((applied[0] / applied[1] - 0.75).abs() < 1e-6);
        assert_eq!(report.learning_rate, 0.025);
        assert_eq!(report.gradient_bytes, 107);
        assert_eq!(report.skipped_steps, 0);
        assert_eq!(report.loss_scale, 1024.0);
    }

    #[test]
    fn an_overflow_skips_the_step_and_backs_the_scale_off() {
        let mut step = Step::new(0, &fp16(), None);
        let mut update = Recorded::default();
        let mut values = [f32::INFINITY];
        let report = step
            .finish(
                0,
                gradients(&mut values, true),
                &mut update,
                PhaseTimings::default(),
            )
            .unwrap();
        assert!(update.applied.is_empty());
        assert_eq!(report.skipped_steps, 1);
        assert_eq!(report.loss_scale, 512.0);
        assert_eq!(report.gradient_bytes, 0);
        assert_eq!(report.learning_rate, 0.1);
    }

    #[test]
    fn too_many_skipped_steps_in_a_row_diverge() {
        let mut step = Step::new(0, &fp16(), None);
        let mut update = Recorded::default();
        for index in 0..MAX_SKIPPED_STEPS_IN_A_ROW {
            step.finish(
                index,
                gradients(&mut [0.0], true),
                &mut update,
                Default::default(),
            )
            .unwrap();
        }
        let error = step
            .finish(
                100,
                gradients(&mut [0.0], true),
                &mut update,
                Default::default(),
            )
            .unwrap_err();
        assert!(
            matches!(error, TrainerError::Diverged { step: 101, .. }),
            "{error}"
        );
    }

    #[test]
    fn without_mixed_precision_an_overflow_or_a_non_finite_loss_diverges() {
        let mut step = Step::new(0, &TrainSpec::default(), None);
        let mut update = Recorded::default();
        let error = step
            .finish(
                4,
                gradients(&mut [1.0], true),
                &mut update,
                Default::default(),
            )
            .unwrap_err();
        assert!(
            matches!(error, TrainerError::Diverged { step: 5, .. }),
            "{error}"
        );
        let mut values = [1.0];
        let mut nan_loss = gradients(&mut values, false);
        nan_loss.loss = f32::NAN;
        let error = step
            .finish(6, nan_loss, &mut update, Default::default())
            .unwrap_err();
        assert!(
            matches!(error, TrainerError::Diverged { step: 7, .. }),
            "{error}"
        );
        assert!(update.applied.is_empty());
    }

    #[test]
    fn clipping_matches_pytorch_and_leaves_small_gradients_alone() {
        assert_eq!(clip_factor(0.5, 1.0), None);
        assert_eq!(clip_factor(1.0, 1.0), None);
        let factor = clip_factor(5.0, 1.0).unwrap();
        assert!((factor - 0.2).abs() < 1e-7, "{factor}");
        // The 1e-6 in the denominator shows on tiny norms: 1e-6 / (2e-6 + 1e-6), not 1/2.
        let tiny = clip_factor(2e-6, 1e-6).unwrap();
        assert!((tiny - 1.0 / 3.0).abs() < 1e-6, "{tiny}");
        // A (3, 4) gradient has norm 5: left alone under a bound of 10, brought to norm 1 in
        // the same direction under a bound of 1.
        let mut values = [3.0f32, 4.0];
        let norm = squared_norm(&values).sqrt();
        assert_eq!(norm, 5.0);
        assert_eq!(clip_factor(norm, 10.0), None);
        scale_in_place(&mut values, clip_factor(norm, 1.0).unwrap());
        let clipped = squared_norm(&values).sqrt();
        assert!((clipped - 1.0).abs() < 1e-5, "{clipped}");
        assert!((values[0] / values[1] - 0.75).abs() < 1e-6);
    }
}
