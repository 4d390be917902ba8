//! What a training run reports while it runs: per-step and per-evaluation metrics, per-phase
//! timings, and the [`MetricsSink`] trait the caller implements to receive them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cohort_jobspec::objective::{Metric, Objective};

/// Wall-clock time of one step's phases on this rank.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseTimings {
    /// Gathering and normalising the batch and building its tensors.
    pub data: Duration,
    /// Forward pass and loss.
    pub forward: Duration,
    /// Backward pass and packing the gradients into the flat buffer.
    pub backward: Duration,
    /// Time the compute thread waited for gradient all-reduces: communication not hidden
    /// behind computation.
    pub exposed_communication: Duration,
    /// Clipping and the optimizer update.
    pub optimizer: Duration,
}

impl PhaseTimings {
    /// Returns the sum of the phases.
    pub fn total(&self) -> Duration {
        self.data + self.forward + self.backward + self.exposed_communication + self.optimizer
    }

    /// Adds `other` phase by phase.
    pub fn accumulate(&mut self, other: &PhaseTimings) {
        self.data += other.data;
        self.forward += other.forward;
        self.backward += other.backward;
        self.exposed_communication += other.exposed_communication;
        self.optimizer += other.optimizer;
    }
}

/// Adds the time since `since` to `phase` and returns now: timing a step's phases in turn.
pub(crate) fn lap(since: Instant, phase: &mut Duration) -> Instant {
    let now = Instant::now();
    *phase += now - since;
    now
}

/// Metrics of one optimizer step, identical on every rank except the timings.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMetrics {
    /// Steps completed, counting this one (1 after the first update).
    pub step: u64,
    /// Steps the run will take in total.
    pub total_steps: u64,
    /// Epoch this step belongs to (0-based).
    pub epoch: u64,
    /// Mean training loss over the whole global batch of this step.
    pub loss: f32,
    /// Learning rate this step's update used.
    pub learning_rate: f64,
    /// Examples of the global batch.
    pub global_batch: usize,
    /// Global throughput: the global batch divided by this step's wall time.
    pub samples_per_second: f64,
    /// Where this step's time went on this rank.
    pub timings: PhaseTimings,
    /// Mixed precision: the loss scale this step used (1 without fp16 loss scaling).
    pub loss_scale: f64,
    /// Steps skipped so far because a gradient overflowed on some rank.
    pub skipped_steps: u64,
    /// Bytes of gradients this rank contributed to the exchange this step (elements times the
    /// exchange format's size; 0 when it did not communicate).
    pub gradient_bytes: u64,
}

/// Results of one evaluation on the test split, summed over all ranks' shares.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluationMetrics {
    /// Steps completed when it ran.
    pub step: u64,
    /// Epoch that just ended (0-based).
    pub epoch: u64,
    /// Mean cross-entropy over the test split.
    pub loss: f32,
    /// Fraction of test examples classified correctly, 0 to 1.
    pub accuracy: f32,
    /// Test examples evaluated.
    pub examples: usize,
}

impl EvaluationMetrics {
    /// The value of `metric` in this evaluation.
    pub fn value(&self, metric: Metric) -> f64 {
        match metric {
            Metric::EvalLoss => f64::from(self.loss),
            Metric::EvalAccuracy => f64::from(self.accuracy),
        }
    }
}

/// A checkpoint a run has written and committed.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointWritten {
    /// Optimizer steps completed when it was written (the run resumes with this step).
    pub step: u64,
    /// The epoch (0-based) of its last step.
    pub epoch: u64,
    /// Its directory (`.../step-NNNNNNNN`).
    pub path: PathBuf,
    /// Total bytes of its files.
    pub bytes: u64,
    /// The evaluation at its step, if one ran there.
    pub evaluation: Option<EvaluationMetrics>,
}

/// Why and where a run stopped early (early stopping).
#[derive(Debug, Clone, PartialEq)]
pub struct EarlyStop {
    /// The step the run stopped after (its checkpoint is written).
    pub step: u64,
    /// The step of the best evaluation, the last that improved.
    pub best_step: u64,
    /// That evaluation's value of the objective's metric.
    pub best_value: f64,
    /// The metric and direction judged.
    pub objective: Objective,
    /// Evaluations in a row that did not improve on the best before the run stopped.
    pub patience: u32,
}

/// Receives metrics as training runs; the CLI forwards them to the coordinator.
///
/// Called on the training thread after every step, so implementations should return quickly
/// (buffer and send elsewhere). Every rank calls it; rank 0's values are as good as any, since
/// losses and evaluations are global.
pub trait MetricsSink {
    /// Called after every optimizer step.
    fn on_step(&mut self, metrics: &StepMetrics);

    /// Called after every evaluation (end of each epoch, and at the end of training).
    fn on_evaluation(&mut self, metrics: &EvaluationMetrics);

    /// Called on the rank that wrote it (rank 0) once a checkpoint is committed. Does nothing
    /// by default.
    fn on_checkpoint(&mut self, checkpoint: &CheckpointWritten) {
        let _ = checkpoint;
    }

    /// Called on the rank that wrote it once the checkpoint of `step` at `path` has been
    /// deleted by retention (`checkpoint.keep_last`, `keep_best`). Does nothing by default.
    fn on_checkpoint_deleted(&mut self, step: u64, path: &Path) {
        let _ = (step, path);
    }

    /// Called on every rank when early stopping ends the run, after its last checkpoint and
    /// before the run returns. Does nothing by default.
    fn on_early_stop(&mut self, stop: &EarlyStop) {
        let _ = stop;
    }
}

/// A sink that drops everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiscardMetrics;

impl MetricsSink for DiscardMetrics {
    fn on_step(&mut self, _metrics: &StepMetrics) {}

    fn on_evaluation(&mut self, _metrics: &EvaluationMetrics) {}
}

/// A sink that logs evaluations, and every `step_interval`-th step, through `tracing`.
#[derive(Debug, Clone, Copy)]
pub struct LogMetrics {
    /// Logs one step in this many (at least 1).
    pub step_interval: u64,
}

impl MetricsSink for LogMetrics {
    fn on_step(&mut self, metrics: &StepMetrics) {
        if metrics.step.is_multiple_of(self.step_interval.max(1))
            || metrics.step == metrics.total_steps
        {
            tracing::info!(
                step = metrics.step,
                total_steps = metrics.total_steps,
                epoch = metrics.epoch,
                loss = metrics.loss,
                learning_rate = metrics.learning_rate,
                samples_per_second = metrics.samples_per_second,
                "training step"
            );
        }
    }

    fn on_evaluation(&mut self, metrics: &EvaluationMetrics) {
        tracing::info!(
            step = metrics.step,
            epoch = metrics.epoch,
            loss = metrics.loss,
            accuracy = metrics.accuracy,
            examples = metrics.examples,
            "evaluation"
        );
    }

    fn on_checkpoint(&mut self, checkpoint: &CheckpointWritten) {
        tracing::info!(
            step = checkpoint.step,
            path = %checkpoint.path.display(),
            bytes = checkpoint.bytes,
            "checkpoint"
        );
    }

    fn on_checkpoint_deleted(&mut self, step: u64, path: &Path) {
        tracing::info!(step, path = %path.display(), "checkpoint deleted by retention");
    }

    fn on_early_stop(&mut self, stop: &EarlyStop) {
        tracing::info!(
            step = stop.step,
            best_step = stop.best_step,
            best_value = stop.best_value,
            metric = %stop.objective.metric,
            patience = stop.patience,
            "early stopping"
        );
    }
}
