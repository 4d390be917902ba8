//! The data-parallel training loop: [`train`] takes everything it needs as arguments (config,
//! data, communicator, metrics sink) and computes on the calling thread, on the CPU or (with a
//! working copy of the model there) on the device [`TrainConfig::device`] names.
//!
//! Each step trains on this rank's share of the global batch and all-reduces the gradients in
//! buckets (overlapped with the backward pass where it can); [`crate::run::step`] finishes the
//! step and [`crate::run::driver`] follows the run's schedule.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor};
use candle_nn::Module;
use cohort_collective::Communicator;
use cohort_jobspec::precision::Precision;

use crate::checkpoint;
use crate::data::{BatchBuffers, TrainTestSplits};
use crate::data_parallel::{
    GradientBuckets, broadcast_optimizer_state, broadcast_outcome, broadcast_parameters,
};
use crate::error::{Result, TrainerError};
use crate::evaluation::evaluate_split;
use crate::metrics::{EvaluationMetrics, MetricsSink, PhaseTimings, lap};
use crate::models::Model;
use crate::optim::Optimizer;
use crate::parameters::ParameterSet;
use crate::precision::{self, NarrowBuffers};
use crate::run::driver::Run;
use crate::run::plan::{RunPlan, TrainOutcome};
use crate::run::step::{Gradients, LocalUpdate, Step, StepSummary};
use crate::run::{StopSignal, TrainConfig};
use crate::sampler::{DistributedSampler, EpochOrder, SampleRecord};

/// Trains `config`'s model on `data` as one rank of `communicator`'s group, reporting to
/// `metrics`, and returns the trained model.
///
/// Every rank of the group must call it with the same config and data. Rank 0's initial
/// parameters (or checkpoint) are broadcast first; each step then trains on this rank's share of
/// the global batch and all-reduces the gradients. Computation runs on the calling thread
/// (candle may use its own thread pool for matrix products), or on `config.device`'s GPU with
/// the masters and the optimizer on the host; ranks on different devices may train together.
pub fn train(
    config: &TrainConfig,
    data: &TrainTestSplits,
    communicator: &mut dyn Communicator,
    metrics: &mut dyn MetricsSink,
) -> Result<TrainOutcome> {
    let rank = communicator.rank();
    let world_size = communicator.world_size();
    if world_size != config.parallel.data as usize {
        return Err(TrainerError::Config(format!(
            "communicator of world size {world_size}, expected parallel.data = {}",
            config.parallel.data
        )));
    }
    let plan = RunPlan::new(config, data, world_size, rank)?;
    let parameters = plan.model.parameters();
    let mut optimizer = Optimizer::new(&config.optimizer, parameters.element_count())?;
    let start_step = start_from_rank_zero(
        config,
        &plan.sampler,
        communicator,
        parameters,
        &mut optimizer,
    )?;
    let mut run = DataParallel::new(config, data, &plan, communicator, optimizer)?;
    let totals = plan.drive(config, (rank, world_size), start_step, &mut run, metrics)?;
    drop(run);
    Ok(plan.finish(rank, totals))
}

/// Brings every rank to rank 0's starting point: its checkpoint (weights, optimizer state and
/// step) if the run resumes, and its parameters. Returns the step to start from.
///
/// The data stream resumes where `sampler` puts the checkpoint's step: where the checkpoint says
/// it stood when it was written with the same global batch and data set (always, for a restart).
/// A checkpoint resumed under another batch size says otherwise, and is warned about.
fn start_from_rank_zero(
    config: &TrainConfig,
    sampler: &DistributedSampler,
    communicator: &mut dyn Communicator,
    parameters: &ParameterSet,
    optimizer: &mut Optimizer,
) -> Result<u64> {
    let mut start_step = 0;
    if let Some(path) = config.resume_path() {
        let loaded = if communicator.rank() == 0 {
            checkpoint::load(&path, parameters, optimizer, config.optimizer.kind).map(|restored| {
                let resumed_at = sampler.position(restored.step);
                if let Some(recorded) = restored.position
                    && recorded != resumed_at
                {
                    tracing::warn!(
                        step = restored.step,
                        %recorded,
                        %resumed_at,
                        "the checkpoint was written with another batch size or data set: the \
                         data stream does not continue exactly where it stopped"
                    );
                }
                restored.step
            })
        } else {
            Ok(0)
        };
        let what = format!("loading checkpoint {}", path.display());
        start_step = broadcast_outcome(communicator, loaded.as_ref().copied(), &what)?;
        broadcast_optimizer_state(communicator, optimizer)?;
    }
    broadcast_parameters(communicator, parameters, &mut Vec::new())?;
    Ok(start_step)
}

/// One data-parallel rank's part of a run.
struct DataParallel<'a> {
    config: &'a TrainConfig,
    data: &'a TrainTestSplits,
    plan: &'a RunPlan,
    communicator: &'a mut dyn Communicator,
    /// The model the passes run on when it is not the masters (mixed precision, a GPU).
    working: Option<Model>,
    /// The flat gradient, cut into all-reduce buckets.
    buckets: GradientBuckets,
    /// The one step, and the optimizer it applies.
    step: Step,
    update: LocalUpdate,
    /// Exchange format of the gradients and reused narrow buffers.
    gradient_format: Precision,
    narrow: NarrowBuffers,
    /// Bytes of gradients this rank sends a step (0 alone).
    gradient_bytes: u64,
    /// Overlaps the all-reduces with the backward pass.
    overlap: bool,
    /// This rank's share of the global mean gradient (see [`crate::sampler`]).
    gradient_weight: f32,
    order: EpochOrder,
    batch: BatchBuffers,
    /// Where the examples of every step are recorded, when the config asks.
    samples: Option<SampleRecord>,
}

impl<'a> DataParallel<'a> {
    fn new(
        config: &'a TrainConfig,
        data: &'a TrainTestSplits,
        plan: &'a RunPlan,
        communicator: &'a mut dyn Communicator,
        optimizer: Optimizer,
    ) -> Result<Self> {
        let parameters = plan.model.parameters();
        let buckets = GradientBuckets::new(parameters, config.parallel.gradient_bucket_bytes);
        // Mixed precision or a GPU: a working copy computes, the f32 host masters are updated.
        let working = plan.working_copy(
            config,
            data,
            precision::tensor_dtype(config.train.precision),
        )?;
        let step = Step::new(
            communicator.rank(),
            &config.train,
            config.optimizer.grad_clip_norm,
        );
        let update = LocalUpdate::new(
            optimizer,
            config.learning_rate_schedule(plan.schedule.total_steps),
            parameters,
            working.as_ref().map(Model::parameters),
        );
        let world_size = communicator.world_size();
        let gradient_format = config.train.grad_comm_dtype();
        // Overlap needs a second bucket to send early; with one there is nothing to hide
        // behind. Mixed precision exchanges after the ranks agree the step is clean, so it does
        // not overlap; a communicator bound to this thread (NCCL) cannot run on the exchange
        // thread.
        let overlap = config.overlap_communication
            && world_size > 1
            && buckets.buckets().len() > 1
            && !step.mixed()
            && communicator.as_send().is_some();
        Ok(Self {
            gradient_bytes: if world_size > 1 {
                precision::gradient_bytes(parameters.element_count(), gradient_format)
            } else {
                0
            },
            gradient_weight: plan.sampler.gradient_weight() as f32,
            config,
            data,
            plan,
            communicator,
            working,
            buckets,
            step,
            update,
            gradient_format,
            narrow: NarrowBuffers::default(),
            overlap,
            order: EpochOrder::default(),
            batch: BatchBuffers::default(),
            samples: config
                .sample_record
                .as_deref()
                .map(SampleRecord::create)
                .transpose()?,
        })
    }

    /// Forward and backward with each bucket all-reduced as soon as its gradients are ready.
    fn overlapped_pass(
        &mut self,
        images: &Tensor,
        labels: &Tensor,
        timings: &mut PhaseTimings,
    ) -> Result<()> {
        let phase = Instant::now();
        let model = self.working.as_ref().unwrap_or(&self.plan.model);
        // Not mixed, so the compute model is f32: the master, or its copy on a GPU.
        let forward = model.forward_staged(images)?;
        let loss = candle_nn::loss::cross_entropy(forward.logits(), labels)?;
        self.buckets
            .set_loss(loss.to_scalar::<f32>()? * self.gradient_weight);
        let phase = lap(phase, &mut timings.forward);
        let Some(communicator) = self.communicator.as_send() else {
            return Err(TrainerError::Config(
                "overlapped exchange on a communicator bound to its thread".into(),
            ));
        };
        let exposed = self.buckets.backward_overlapped(
            communicator,
            model,
            forward,
            &loss,
            self.gradient_weight,
        )?;
        timings.exposed_communication = exposed;
        timings.backward = phase.elapsed() - exposed;
        Ok(())
    }

    /// Forward and backward, then the exchange (after agreeing on overflows with mixed
    /// precision). Returns whether some rank overflowed.
    fn pass_then_exchange(
        &mut self,
        step: u64,
        images: &Tensor,
        labels: &Tensor,
        timings: &mut PhaseTimings,
    ) -> Result<bool> {
        let phase = Instant::now();
        let model = self.working.as_ref().unwrap_or(&self.plan.model);
        let logits = model.forward(images)?.to_dtype(DType::F32)?;
        let loss = candle_nn::loss::cross_entropy(&logits, labels)?;
        let local_loss = loss.to_scalar::<f32>()?;
        self.buckets.set_loss(local_loss * self.gradient_weight);
        let phase = lap(phase, &mut timings.forward);
        let scale = self.step.loss_scale();
        let gradients = if scale == 1.0 {
            loss.backward()?
        } else {
            loss.affine(scale, 0.0)?.backward()?
        };
        model.parameters().read_gradients(
            &gradients,
            self.buckets.gradients_mut(),
            self.gradient_weight,
        )?;
        drop(gradients);
        if self.config.inject_overflow == Some((self.communicator.rank(), step)) {
            self.buckets.gradients_mut()[0] = f32::INFINITY;
        }
        let phase = lap(phase, &mut timings.backward);
        let mut overflow = false;
        if self.step.mixed() {
            let local_overflow =
                !local_loss.is_finite() || precision::has_non_finite(self.buckets.gradients());
            overflow = precision::agree_on_overflow(local_overflow, self.communicator)?;
            if overflow {
                self.buckets.all_reduce_stop(self.communicator)?;
            } else {
                self.buckets.all_reduce_as(
                    self.communicator,
                    self.gradient_format,
                    &mut self.narrow,
                )?;
            }
        } else {
            self.buckets.all_reduce(self.communicator)?;
        }
        lap(phase, &mut timings.exposed_communication);
        Ok(overflow)
    }
}

impl Run for DataParallel<'_> {
    fn step(&mut self, step: u64) -> Result<StepSummary> {
        let started = Instant::now();
        let mut timings = PhaseTimings::default();
        // Read before the exchange, which carries it: every rank learns whether any was asked
        // to stop after this step.
        let stop_requested = self.config.stop.as_ref().is_some_and(StopSignal::raised);
        self.buckets.set_stop_request(stop_requested);
        let indices = self.order.rank_batch(&self.plan.sampler, step);
        if let Some(samples) = &mut self.samples {
            samples.record(step + 1, indices)?;
        }
        let (images, labels) = self
            .batch
            .tensors(&self.data.train, indices, &self.plan.device)?;
        lap(started, &mut timings.data);
        let overflow = if self.overlap {
            self.overlapped_pass(&images, &labels, &mut timings)?;
            false
        } else {
            self.pass_then_exchange(step, &images, &labels, &mut timings)?
        };
        if let Some(slow_down) = self.config.slow_down {
            // Fault injection: a slow node, whose computation takes longer.
            let extra = slow_down.extra(timings.data + timings.forward + timings.backward);
            std::thread::sleep(extra);
            timings.backward += extra;
        }
        let gradients = Gradients {
            loss: self.buckets.loss(),
            overflow,
            values: self.buckets.gradients_mut(),
            exchanged_bytes: self.gradient_bytes,
        };
        self.step.finish(step, gradients, &mut self.update, timings)
    }

    fn evaluate(&mut self, completed: u64, epoch: u64) -> Result<Option<EvaluationMetrics>> {
        // Evaluation runs where the passes do: the f32 masters on the CPU, the working copy (in
        // its compute format) on a GPU.
        let model = match &self.working {
            Some(working) if !self.plan.device.is_cpu() => working,
            _ => &self.plan.model,
        };
        let evaluation = evaluate_split(
            model,
            &self.data.test,
            self.communicator,
            self.config.evaluation_batch,
            &mut self.batch,
            (completed, epoch),
        )?;
        Ok(Some(evaluation))
    }

    fn stop_agreed(&mut self) -> Result<bool> {
        // The stop slot travelled with the step's gradients.
        Ok(self.buckets.stop_agreed())
    }

    fn checkpoint(
        &mut self,
        completed: u64,
        evaluation: Option<&EvaluationMetrics>,
    ) -> Result<Option<PathBuf>> {
        if self.communicator.rank() != 0 {
            return Ok(None);
        }
        let files: Vec<_> = evaluation
            .map(checkpoint::evaluation_file)
            .into_iter()
            .collect();
        let path = checkpoint::save_with_files(
            &self.config.checkpoint_directory(),
            completed,
            self.plan.sampler.position(completed),
            self.plan.model.parameters(),
            &self.update.optimizer,
            &files,
            self.config.stop_in_checkpoint == Some(completed),
        )?;
        Ok(Some(path))
    }
}

#[cfg(test)]
mod tests {
    use cohort_jobspec::early_stopping::EarlyStoppingSpec;
    use cohort_jobspec::objective::{Metric, Mode, Objective};
    use cohort_jobspec::train::{LearningRateDecay, OptimizerKind};

    use super::*;
    use crate::data::synthetic_splits;
    use crate::metrics::{CheckpointWritten, DiscardMetrics, EarlyStop, StepMetrics};
    use cohort_collective::{InMemoryStore, TcpRing, TcpRingConfig};

    /// Records everything a run reports.
    #[derive(Default)]
    struct Recorder {
        steps: Vec<StepMetrics>,
        evaluations: Vec<EvaluationMetrics>,
        checkpoints: Vec<(u64, PathBuf)>,
        written: Vec<CheckpointWritten>,
        deleted: Vec<(u64, PathBuf)>,
        early_stops: Vec<EarlyStop>,
    }

    impl MetricsSink for Recorder {
        fn on_step(&mut self, metrics: &StepMetrics) {
            self.steps.push(metrics.clone());
        }
        fn on_evaluation(&mut self, metrics: &EvaluationMetrics) {
            self.evaluations.push(metrics.clone());
        }
        fn on_checkpoint(&mut self, checkpoint: &CheckpointWritten) {
            self.checkpoints
                .push((checkpoint.step, checkpoint.path.clone()));
            self.written.push(checkpoint.clone());
        }
        fn on_checkpoint_deleted(&mut self, step: u64, path: &std::path::Path) {
            self.deleted.push((step, path.to_owned()));
        }
        fn on_early_stop(&mut self, stop: &EarlyStop) {
            self.early_stops.push(stop.clone());
        }
    }

    fn small_splits() -> TrainTestSplits {
        synthetic_splits(1200, 300, 8, 5, 1).unwrap()
    }

    fn small_config(world_size: u32, output: &std::path::Path) -> TrainConfig {
        let mut config = TrainConfig::from_job_spec(
            &cohort_jobspec::parse("version = 1\nkind = \"train\"\n").unwrap(),
            output,
        );
        config.model.hidden = vec![16];
        config.parallel.data = world_size;
        config.schedule.batch_size = 100;
        config.schedule.epochs = 2;
        config.optimizer.lr = Some(0.01);
        config
    }

    fn flat_values(model: &Model) -> Vec<f32> {
        let mut flat = vec![0.0; model.parameters().element_count()];
        model.parameters().read_values(&mut flat).unwrap();
        flat
    }

    /// Connects `world_size` ranks through a TCP ring on loopback, each on its own thread, and
    /// returns what `run` returns on each rank, in rank order.
    fn on_ring<T: Send>(
        world_size: usize,
        run: impl Fn(usize, &mut TcpRing) -> T + Sync,
    ) -> Vec<T> {
        let store = InMemoryStore::new();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..world_size)
                .map(|rank| {
                    let (store, run) = (&store, &run);
                    scope.spawn(move || {
                        let config = TcpRingConfig::default();
                        let mut ring =
                            TcpRing::connect(store, "test", rank, world_size, &config).unwrap();
                        run(rank, &mut ring)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Runs `configs[r]` on rank `r` and returns every rank's outcome and recorder.
    fn run_group(
        configs: Vec<TrainConfig>,
        data: &TrainTestSplits,
    ) -> Vec<(TrainOutcome, Recorder)> {
        on_ring(configs.len(), |rank, ring| {
            let mut recorder = Recorder::default();
            let outcome = train(&configs[rank], data, ring, &mut recorder).unwrap();
            (outcome, recorder)
        })
    }

    #[test]
    fn single_rank_learns_and_reports_every_step_and_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let data = small_splits();
        let config = small_config(1, dir.path());
        let (outcome, recorder) = run_group(vec![config], &data).pop().unwrap();
        assert_eq!(outcome.steps, 24);
        assert_eq!(recorder.steps.len(), 24);
        assert_eq!(recorder.steps[0].step, 1);
        assert_eq!(recorder.steps[23].epoch, 1);
        assert_eq!(recorder.evaluations.len(), 2);
        assert_eq!(recorder.evaluations[1].examples, 300);
        let first = recorder.steps[0].loss;
        let last = recorder.steps[23].loss;
        assert!(last < first * 0.5, "loss {first} -> {last}");
        assert!(
            recorder.evaluations[1].accuracy > 0.9,
            "{:?}",
            recorder.evaluations
        );
        let checkpoint = outcome.checkpoint.unwrap();
        assert_eq!(checkpoint, dir.path().join("checkpoints/step-00000024"));
        assert_eq!(recorder.checkpoints, vec![(24, checkpoint)]);
    }

    #[test]
    fn ranks_start_from_rank_zero_and_stay_identical() {
        let dir = tempfile::tempdir().unwrap();
        let data = small_splits();
        let configs: Vec<_> = (0..3)
            .map(|rank| {
                let mut config = small_config(3, dir.path());
                // Different initialisations: the broadcast must erase them.
                config.model.seed = rank;
                config.schedule.epochs = 1;
                config.final_checkpoint = false;
                config
            })
            .collect();
        let results = run_group(configs, &data);
        let reference = flat_values(&results[0].0.model);
        for (outcome, recorder) in &results {
            assert_eq!(flat_values(&outcome.model), reference);
            assert_eq!(recorder.evaluations, results[0].1.evaluations);
            let losses: Vec<_> = recorder.steps.iter().map(|s| s.loss).collect();
            let reference_losses: Vec<_> = results[0].1.steps.iter().map(|s| s.loss).collect();
            assert_eq!(losses, reference_losses);
            assert!(outcome.checkpoint.is_none());
        }
    }

    #[test]
    fn world_size_mismatch_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let config = small_config(2, dir.path());
        let error = on_ring(1, |_, ring| {
            train(&config, &small_splits(), ring, &mut DiscardMetrics)
                .unwrap_err()
                .to_string()
        });
        let error = &error[0];
        assert!(error.contains("expected parallel.data = 2"), "{error}");
    }

    #[test]
    fn resuming_from_a_checkpoint_continues_the_same_run() {
        let dir = tempfile::tempdir().unwrap();
        let data = small_splits();
        let mut config = small_config(2, dir.path());
        config.optimizer.kind = OptimizerKind::Adamw;
        config.schedule.lr_decay = LearningRateDecay::Cosine;
        config.schedule.warmup_steps = 3;
        config.checkpoint.every_steps = Some(10);
        config.checkpoint.directory = "uninterrupted".into();
        let uninterrupted = run_group(vec![config.clone(), config.clone()], &data);
        let saved = dir.path().join("uninterrupted/step-00000010");
        assert!(
            uninterrupted[0]
                .1
                .checkpoints
                .iter()
                .any(|(_, p)| p == &saved)
        );

        let mut resumed = config.clone();
        resumed.checkpoint.every_steps = None;
        resumed.checkpoint.directory = "resumed".into();
        resumed.checkpoint.resume_from = Some(saved.display().to_string());
        let results = run_group(vec![resumed.clone(), resumed], &data);
        assert_eq!(results[0].1.steps.first().unwrap().step, 11);
        assert_eq!(results[0].0.steps, 24);
        let expected = flat_values(&uninterrupted[0].0.model);
        for (outcome, _) in &results {
            let got = flat_values(&outcome.model);
            let difference = got
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(difference < 1e-6, "max difference {difference}");
        }
    }

    #[test]
    fn a_run_stopped_after_some_steps_then_resumed_ends_as_an_uninterrupted_one() {
        let dir = tempfile::tempdir().unwrap();
        let data = small_splits();
        let mut config = small_config(2, dir.path());
        config.schedule.warmup_steps = 3;
        config.schedule.lr_decay = LearningRateDecay::Cosine;
        config.checkpoint.directory = "uninterrupted".into();
        let uninterrupted = run_group(vec![config.clone(), config.clone()], &data);

        // 0.75 of an epoch of 12 steps: the run ends after step 9, evaluated and checkpointed.
        let mut stopped = config.clone();
        stopped.schedule.stop_after_epochs = Some(0.75);
        stopped.checkpoint.directory = "stopped".into();
        let results = run_group(vec![stopped.clone(), stopped], &data);
        let checkpoint = dir.path().join("stopped/step-00000009");
        for (rank, (outcome, recorder)) in results.iter().enumerate() {
            assert_eq!(outcome.scheduled_stop, Some(9));
            assert_eq!((outcome.steps, outcome.stopped_at), (9, None));
            assert!(outcome.early_stop.is_none());
            assert_eq!(recorder.steps.len(), 9);
            assert_eq!(recorder.evaluations.last().unwrap().step, 9);
            let expected = (rank == 0).then_some(checkpoint.as_path());
            assert_eq!(outcome.checkpoint.as_deref(), expected);
        }
        let recorded = checkpoint::read_evaluation(&checkpoint).unwrap().unwrap();
        assert_eq!(Some(&recorded), results[0].1.evaluations.last());
        assert_eq!(results[0].1.written[0].evaluation, Some(recorded));

        // Resumed without the stop, it takes steps 10 to 24 of the same schedule.
        let mut resumed = config.clone();
        resumed.checkpoint.directory = "resumed".into();
        resumed.checkpoint.resume_from = Some(checkpoint.display().to_string());
        let results = run_group(vec![resumed.clone(), resumed], &data);
        let expected = flat_values(&uninterrupted[0].0.model);
        for (outcome, recorder) in &results {
            assert_eq!(recorder.steps.first().unwrap().step, 10);
            assert_eq!(outcome.steps, 24);
            assert_eq!(outcome.scheduled_stop, None);
            // The same world size sums in the same order: bit for bit (tolerance 0).
            assert_eq!(flat_values(&outcome.model), expected);
        }
        let learning_rates = |recorder: &Recorder| -> Vec<f64> {
            recorder
                .steps
                .iter()
                .filter(|step| step.step > 9)
                .map(|step| step.learning_rate)
                .collect()
        };
        assert_eq!(
            learning_rates(&results[0].1),
            learning_rates(&uninterrupted[0].1)
        );
    }

    /// The steps of the checkpoint directories in `directory`, hidden ones included.
    fn steps_on_disk(directory: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(directory)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn retention_leaves_the_newest_and_the_best_checkpoints_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let data = small_splits();
        let mut config = small_config(1, dir.path());
        // 10 epochs of 12 steps; checkpoints every 20 steps and at 120.
        config.schedule.epochs = 10;
        config.checkpoint.every_steps = Some(20);
        config.checkpoint.keep_last = Some(2);
        config.checkpoint.keep_best = Some(1);
        // Ranking by the highest loss makes the best an early checkpoint, not a newest one.
        config.objective = Objective::new(Metric::EvalLoss, Some(Mode::Max));
        let (outcome, recorder) = run_group(vec![config], &data).pop().unwrap();
        assert_eq!(outcome.steps, 120);

        // Every checkpoint was evaluated at its step, and that evaluation was reported.
        let written: Vec<u64> = recorder.written.iter().map(|c| c.step).collect();
        assert_eq!(written, [20, 40, 60, 80, 100, 120]);
        let loss_at = |step: u64| {
            let evaluation = recorder.evaluations.iter().find(|e| e.step == step);
            evaluation.unwrap().loss
        };
        for checkpoint in &recorder.written {
            let evaluation = checkpoint.evaluation.as_ref().unwrap();
            assert_eq!(evaluation.loss, loss_at(checkpoint.step));
        }
        // Expected: the 2 newest, and the one of the highest loss (the first, on a tie).
        let mut highest = written[0];
        for &step in &written {
            if loss_at(step) > loss_at(highest) {
                highest = step;
            }
        }
        let mut expected: Vec<u64> = vec![100, 120, highest];
        expected.sort();
        expected.dedup();
        let names: Vec<String> = expected
            .iter()
            .map(|step| format!("step-{step:08}"))
            .collect();
        assert_eq!(steps_on_disk(&dir.path().join("checkpoints")), names);
        let deleted: Vec<u64> = recorder.deleted.iter().map(|(step, _)| *step).collect();
        let not_kept: Vec<u64> = written
            .iter()
            .copied()
            .filter(|step| !expected.contains(step))
            .collect();
        assert_eq!(deleted, not_kept);
        // What is left lists with the evaluations that were reported.
        let listed = checkpoint::list(&dir.path().join("checkpoints")).unwrap();
        assert_eq!(
            listed.iter().map(|entry| entry.step).collect::<Vec<_>>(),
            expected
        );
        for entry in &listed {
            assert_eq!(entry.evaluation.as_ref().unwrap().loss, loss_at(entry.step));
            assert!(entry.bytes > 0);
        }
    }

    #[test]
    fn early_stopping_stops_every_rank_after_the_same_evaluation() {
        let dir = tempfile::tempdir().unwrap();
        let data = small_splits();
        let mut config = small_config(2, dir.path());
        config.schedule.epochs = 4;
        // No evaluation can beat the first by 10: the second (step 24 of 48) ends the run.
        config.early_stopping = Some(EarlyStoppingSpec {
            patience: 1,
            min_delta: 10.0,
            ..EarlyStoppingSpec::default()
        });
        let results = run_group(vec![config.clone(), config], &data);
        let checkpoints = dir.path().join("checkpoints");
        for (rank, (outcome, recorder)) in results.iter().enumerate() {
            let stop = outcome.early_stop.clone().unwrap();
            assert_eq!((stop.step, stop.best_step, stop.patience), (24, 12, 1));
            assert_eq!(stop.best_value, f64::from(recorder.evaluations[0].loss));
            assert_eq!(recorder.early_stops, [stop]);
            assert_eq!(outcome.steps, 24);
            assert_eq!(recorder.steps.len(), 24);
            let (best, last) = match rank {
                0 => (
                    Some(checkpoints.join("step-00000012")),
                    Some(checkpoints.join("step-00000024")),
                ),
                _ => (None, None),
            };
            assert_eq!(outcome.best_checkpoint, best);
            assert_eq!(outcome.checkpoint, last);
            assert_eq!(
                flat_values(&outcome.model),
                flat_values(&results[0].0.model)
            );
        }
        assert_eq!(
            steps_on_disk(&checkpoints),
            ["step-00000012", "step-00000024"]
        );
    }

    /// The examples of every step of a sample record, by step.
    fn recorded_samples(path: &std::path::Path) -> std::collections::BTreeMap<u64, Vec<usize>> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|line| {
                let (step, indices) = line.split_once(' ').unwrap();
                let indices = indices.split(',').map(|i| i.parse().unwrap()).collect();
                (step.parse().unwrap(), indices)
            })
            .collect()
    }

    /// The global batch of every step of a run: its ranks' records joined in rank order.
    fn global_batches(
        directory: &std::path::Path,
        world_size: usize,
    ) -> std::collections::BTreeMap<u64, Vec<usize>> {
        let mut batches = std::collections::BTreeMap::<u64, Vec<usize>>::new();
        for rank in 0..world_size {
            for (step, indices) in recorded_samples(&directory.join(format!("rank-{rank}.txt"))) {
                batches.entry(step).or_default().extend(indices);
            }
        }
        batches
    }

    #[test]
    fn a_resumed_run_trains_on_exactly_the_examples_and_to_the_parameters_of_an_undisturbed_one() {
        let dir = tempfile::tempdir().unwrap();
        let data = small_splits();
        let mut config = small_config(2, dir.path());
        config.optimizer.kind = OptimizerKind::Sgd;
        config.checkpoint.every_steps = Some(5);
        config.checkpoint.directory = "undisturbed".into();
        // 12 steps an epoch: the checkpoint of step 15 is in the middle of the second.
        let configs = |config: &TrainConfig, world_size: usize, record: &str| -> Vec<_> {
            (0..world_size)
                .map(|rank| {
                    let mut config = config.clone();
                    config.parallel.data = world_size as u32;
                    config.sample_record =
                        Some(dir.path().join(format!("{record}/rank-{rank}.txt")));
                    config
                })
                .collect()
        };
        let undisturbed = run_group(configs(&config, 2, "undisturbed-samples"), &data);
        let expected = flat_values(&undisturbed[0].0.model);
        let expected_batches = global_batches(&dir.path().join("undisturbed-samples"), 2);
        assert_eq!(expected_batches.len(), 24);

        let checkpoint = dir.path().join("undisturbed/step-00000015");
        for world_size in [2, 3] {
            let mut resumed = config.clone();
            resumed.checkpoint.every_steps = None;
            resumed.checkpoint.directory = format!("resumed-{world_size}");
            resumed.checkpoint.resume_from = Some(checkpoint.display().to_string());
            let record = format!("resumed-samples-{world_size}");
            let results = run_group(configs(&resumed, world_size, &record), &data);
            // Exactly the steps after the checkpoint, each on exactly the examples, in the
            // order, the undisturbed run trained that step on.
            let batches = global_batches(&dir.path().join(&record), world_size);
            let after_checkpoint: std::collections::BTreeMap<_, _> = expected_batches
                .iter()
                .filter(|(step, _)| **step > 15)
                .map(|(step, batch)| (*step, batch.clone()))
                .collect();
            assert_eq!(batches, after_checkpoint, "world size {world_size}");
            for (outcome, _) in &results {
                let got = flat_values(&outcome.model);
                if world_size == 2 {
                    // The same world size sums in the same order: bit for bit.
                    assert_eq!(got, expected);
                } else {
                    // Another world size sums the same mean gradient in another order.
                    let difference = got
                        .iter()
                        .zip(&expected)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0f32, f32::max);
                    assert!(difference < 1e-5, "max difference {difference}");
                }
            }
        }
    }

    /// Raises a stop signal when a step is reported, as a rank's SIGTERM handler would.
    struct RaiseAt {
        step: u64,
        signal: crate::run::StopSignal,
    }

    impl MetricsSink for RaiseAt {
        fn on_step(&mut self, metrics: &StepMetrics) {
            if metrics.step == self.step {
                self.signal.raise();
            }
        }
        fn on_evaluation(&mut self, _metrics: &EvaluationMetrics) {}
    }

    #[test]
    fn a_stop_asked_of_one_rank_stops_every_rank_after_the_same_step_with_a_checkpoint() {
        stop_after_step_eight(None);
    }

    #[test]
    fn a_stop_asked_in_a_step_an_overflow_skips_still_stops_every_rank() {
        // fp16, and rank 0's gradients of step 8 (0-based 7) overflow: the step is skipped on
        // every rank and its gradients never exchanged, but the stop request still is.
        stop_after_step_eight(Some((0, 7)));
    }

    /// Two ranks, rank 1 asked to stop after its 7th step (fp16 with `overflow` injected, when
    /// given): both stop after step 8 with the same parameters, rank 0 having checkpointed.
    fn stop_after_step_eight(overflow: Option<(usize, u64)>) {
        let dir = tempfile::tempdir().unwrap();
        let data = small_splits();
        let outcomes = on_ring(2, |rank, ring| {
            let mut config = small_config(2, dir.path());
            if overflow.is_some() {
                config.train.precision = Precision::Fp16;
                config.inject_overflow = overflow;
            }
            config.stop = Some(crate::run::StopSignal::new());
            // Only rank 1 is asked, after its 7th step.
            let mut sink: Box<dyn MetricsSink> = match rank {
                1 => Box::new(RaiseAt {
                    step: 7,
                    signal: config.stop.clone().unwrap(),
                }),
                _ => Box::new(DiscardMetrics),
            };
            train(&config, &data, ring, sink.as_mut()).unwrap()
        });
        // Asked after step 7, rank 1 says so with step 8's gradients: every rank stops after 8.
        for outcome in &outcomes {
            assert_eq!(outcome.stopped_at, Some(8));
            assert_eq!(outcome.steps, 8);
        }
        assert_eq!(
            outcomes[0].checkpoint.as_deref(),
            Some(dir.path().join("checkpoints/step-00000008").as_path())
        );
        assert!(outcomes[1].checkpoint.is_none(), "rank 0 alone writes");
        assert_eq!(
            flat_values(&outcomes[0].model),
            flat_values(&outcomes[1].model)
        );
    }

    #[test]
    fn missing_checkpoint_fails_every_rank() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = small_config(2, dir.path());
        config.checkpoint.resume_from = Some("does-not-exist".into());
        let data = small_splits();
        let errors = on_ring(2, |_, ring| {
            train(&config, &data, ring, &mut DiscardMetrics)
                .unwrap_err()
                .to_string()
        });
        assert!(errors[0].contains("does-not-exist"), "{errors:?}");
        assert!(errors[1].contains("failed on rank 0"), "{errors:?}");
    }
}
