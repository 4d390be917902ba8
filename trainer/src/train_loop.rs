//! The training loop a rank runs: [`train`] takes everything it needs as arguments (config,
//! data, communicator, metrics sink) and computes on the calling thread, on the CPU or (with a
//! working copy of the model there) on the device [`TrainConfig::device`] names.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::Module;
use cohort_collective::{Communicator, ReduceOp};
use cohort_spec::JobSpec;
use cohort_spec::precision::{Precision, TrainSpec};
use cohort_spec::train::{
    CheckpointSpec, DataSpec, ModelSpec, OptimizerSpec, ParallelSpec, ScheduleSpec,
};

use crate::checkpoint;
use crate::data::{Dataset, TrainTestSplits};
use crate::data_parallel::{
    GradientBuckets, broadcast_optimizer_state, broadcast_outcome, broadcast_parameters,
};
use crate::device::ComputeDevice;
use crate::error::{Result, TrainerError};
use crate::metrics::{EvaluationMetrics, MetricsSink, PhaseTimings, StepMetrics};
use crate::models::Model;
use crate::optim::{LearningRateSchedule, Optimizer, clip_gradient_norm};
use crate::precision::{self, LossScaler, NarrowBuffers};
use crate::sampler::{DistributedSampler, rank_share};

/// Steps skipped in a row after which a run is declared diverged (the loss scale would have
/// backed off by 2^-100 by then).
pub const MAX_SKIPPED_STEPS_IN_A_ROW: u64 = 100;

/// Examples per forward pass during evaluation, unless configured otherwise.
pub const DEFAULT_EVALUATION_BATCH: usize = 1000;

/// Everything a training run is configured with: the job spec's training sections plus what
/// the rank's launcher decides.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// `[model]`.
    pub model: ModelSpec,
    /// `[data]` (the data itself is passed to [`train`] separately; the seed is used here).
    pub data: DataSpec,
    /// `[optimizer]`.
    pub optimizer: OptimizerSpec,
    /// `[schedule]`.
    pub schedule: ScheduleSpec,
    /// `[parallel]`; `data` must equal the communicator's world size.
    pub parallel: ParallelSpec,
    /// `[checkpoint]`.
    pub checkpoint: CheckpointSpec,
    /// `[train]`: precision and loss scaling.
    pub train: TrainSpec,
    /// Directory relative checkpoint paths resolve against: the job's output directory.
    pub output_directory: PathBuf,
    /// Examples per forward pass during evaluation. Default 1000.
    pub evaluation_batch: usize,
    /// Evaluates on the test split at the end of every epoch and of training. Default true
    /// (benchmarks turn it off).
    pub evaluate: bool,
    /// Writes a checkpoint at the end of training. Default true (benchmarks turn it off).
    pub final_checkpoint: bool,
    /// With several ranks, runs the backward pass layer by layer and all-reduces each gradient
    /// bucket on a communication thread as soon as it is ready, overlapping communication with
    /// the rest of the backward pass. Default true; false exchanges all buckets after the
    /// backward pass (for comparison in benchmarks).
    pub overlap_communication: bool,
    /// Fault injection for tests: `(rank, step)` makes that rank's gradients of that
    /// (0-based) step infinite, as an fp16 overflow would. Default `None`.
    pub inject_overflow: Option<(usize, u64)>,
    /// Where the forward and backward passes run. Default [`ComputeDevice::Cpu`]; the rank's
    /// launcher sets the CUDA device of a `[resources] device = "gpu"` job, since only it knows
    /// the local device index. The f32 masters and the optimizer stay in host memory either way.
    pub device: ComputeDevice,
}

impl TrainConfig {
    /// Builds the config of `spec`'s training sections (defaults for absent ones), with
    /// checkpoints under `output_directory`.
    pub fn from_job_spec(spec: &JobSpec, output_directory: impl Into<PathBuf>) -> Self {
        Self {
            model: spec.model.clone().unwrap_or_default(),
            data: spec.data.clone().unwrap_or_default(),
            optimizer: spec.optimizer.clone().unwrap_or_default(),
            schedule: spec.schedule.clone().unwrap_or_default(),
            parallel: spec.parallel.clone().unwrap_or_default(),
            checkpoint: spec.checkpoint.clone().unwrap_or_default(),
            train: spec.train.clone().unwrap_or_default(),
            output_directory: output_directory.into(),
            evaluation_batch: DEFAULT_EVALUATION_BATCH,
            evaluate: true,
            final_checkpoint: true,
            overlap_communication: true,
            inject_overflow: None,
            device: ComputeDevice::Cpu,
        }
    }

    /// Returns where checkpoints are written.
    pub fn checkpoint_directory(&self) -> PathBuf {
        self.output_directory.join(&self.checkpoint.directory)
    }

    /// Returns the checkpoint to resume from, if any, resolved like the checkpoint directory.
    pub fn resume_path(&self) -> Option<PathBuf> {
        self.checkpoint
            .resume_from
            .as_ref()
            .map(|path| self.output_directory.join(path))
    }
}

/// What a finished run leaves behind.
#[derive(Debug)]
pub struct TrainOutcome {
    /// The trained model (identical on every rank).
    pub model: Model,
    /// Optimizer steps completed, including those before a resume.
    pub steps: u64,
    /// The last evaluation, if evaluation is enabled.
    pub final_evaluation: Option<EvaluationMetrics>,
    /// The final checkpoint, on rank 0 when enabled.
    pub checkpoint: Option<PathBuf>,
    /// Time per phase summed over this run's steps.
    pub timings: PhaseTimings,
    /// Wall time of the steps of this run (excluding start-up and evaluation).
    pub training_time: Duration,
}

/// Reused host buffers of one batch.
#[derive(Debug, Default)]
pub(crate) struct BatchBuffers {
    /// Normalised pixels.
    pub(crate) images: Vec<f32>,
    /// Classes.
    pub(crate) labels: Vec<u32>,
    /// Example indices of an evaluation batch.
    indices: Vec<usize>,
}

impl BatchBuffers {
    /// Gathers `indices` of `dataset` and returns `(images, labels)` tensors.
    pub(crate) fn tensors(
        &mut self,
        dataset: &Dataset,
        indices: &[usize],
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        dataset.gather(indices, &mut self.images, &mut self.labels)?;
        let images = Tensor::from_slice(&self.images, (indices.len(), dataset.features()), device)?;
        let labels = Tensor::from_slice(&self.labels, indices.len(), device)?;
        Ok((images, labels))
    }
}

/// What every training loop derives from its config before the first step.
pub(crate) struct RunPlan {
    /// Where the passes run: batches and any working copy of the model live there.
    pub(crate) device: Device,
    /// Examples per optimizer step over all ranks.
    pub(crate) global_batch: usize,
    /// This rank's examples of every step.
    pub(crate) sampler: DistributedSampler,
    /// Optimizer steps of one epoch.
    pub(crate) steps_per_epoch: u64,
    /// Optimizer steps of the run (epochs, capped by `max_steps`).
    pub(crate) total_steps: u64,
    /// The freshly initialised model: the f32 masters, in host memory.
    pub(crate) model: Model,
}

impl RunPlan {
    /// Plans rank `rank` of `world_size` training `config` on `data`.
    pub(crate) fn new(
        config: &TrainConfig,
        data: &TrainTestSplits,
        world_size: usize,
        rank: usize,
    ) -> Result<Self> {
        let device = config.device.open()?;
        let global_batch = config.schedule.batch_size as usize;
        let sampler = DistributedSampler::new(
            data.train.len(),
            global_batch,
            world_size,
            rank,
            config.data.seed,
        )?;
        let steps_per_epoch = sampler.steps_per_epoch() as u64;
        let planned_steps = steps_per_epoch * u64::from(config.schedule.epochs);
        let total_steps = config
            .schedule
            .max_steps
            .map_or(planned_steps, |max| max.min(planned_steps));
        let model = Model::new(
            &config.model,
            data.train.image_shape(),
            data.train.classes(),
            &Device::Cpu,
        )?;
        Ok(Self {
            device,
            global_batch,
            sampler,
            steps_per_epoch,
            total_steps,
            model,
        })
    }
}

/// Returns the model the passes run on when it cannot be `master` itself: a copy on `device` in
/// `dtype`, holding the master's values, or `None` when the master already lives there in that
/// format. The caller refreshes it with [`crate::parameters::ParameterSet::copy_from`] after
/// every update of the master. One mechanism serves mixed precision (another format) and GPU
/// ranks (another device).
pub(crate) fn working_copy(
    config: &TrainConfig,
    data: &TrainTestSplits,
    master: &Model,
    device: &Device,
    dtype: DType,
) -> Result<Option<Model>> {
    let parameters = master.parameters();
    if parameters.device().same_device(device) && parameters.dtype() == dtype {
        return Ok(None);
    }
    let working = Model::with_dtype(
        &config.model,
        data.train.image_shape(),
        data.train.classes(),
        device,
        dtype,
    )?;
    working.parameters().copy_from(parameters)?;
    Ok(Some(working))
}

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
    let RunPlan {
        device,
        global_batch,
        sampler,
        steps_per_epoch,
        total_steps,
        model,
    } = RunPlan::new(config, data, world_size, rank)?;
    let parameters = model.parameters();
    let mut optimizer = Optimizer::new(&config.optimizer, parameters.element_count());
    let schedule = LearningRateSchedule::new(
        config.optimizer.learning_rate(),
        config.schedule.warmup_steps,
        config.schedule.lr_decay,
        total_steps,
    );

    let mut scratch = Vec::new();
    let mut start_step = 0;
    if let Some(path) = config.resume_path() {
        let loaded = if rank == 0 {
            checkpoint::load(&path, parameters, &mut optimizer, config.optimizer.kind)
                .map(|restored| restored.step)
        } else {
            Ok(0)
        };
        let what = format!("loading checkpoint {}", path.display());
        start_step = broadcast_outcome(communicator, loaded.as_ref().copied(), &what)?;
        broadcast_optimizer_state(communicator, &mut optimizer)?;
    }
    broadcast_parameters(communicator, parameters, &mut scratch)?;
    tracing::info!(
        rank,
        world_size,
        device = %config.device,
        parameters = parameters.element_count(),
        global_batch,
        local_batch = sampler.local_batch(),
        steps_per_epoch,
        start_step,
        total_steps,
        "training starts"
    );

    let mut buckets = GradientBuckets::new(parameters, config.parallel.gradient_bucket_bytes);
    // Mixed precision or a GPU: a working copy computes, the f32 host masters are updated.
    let precision = config.train.precision;
    let gradient_format = config.train.grad_comm_dtype();
    let working = working_copy(
        config,
        data,
        &model,
        &device,
        precision::tensor_dtype(precision),
    )?;
    let compute_model = working.as_ref().unwrap_or(&model);
    // Evaluation runs where the passes do: the f32 masters on the CPU, the working copy (in
    // its compute format) on a GPU.
    let evaluation_model = if device.is_cpu() {
        &model
    } else {
        compute_model
    };
    let mixed = precision != Precision::Fp32 || gradient_format != Precision::Fp32;
    let mut scaler = LossScaler::new(config.train.loss_scaling());
    let mut narrow = NarrowBuffers::default();
    let gradient_bytes = if world_size > 1 {
        precision::gradient_bytes(parameters.element_count(), gradient_format)
    } else {
        0
    };
    // Overlap needs a second bucket to send early; with one there is nothing to hide behind.
    // Mixed precision exchanges after the ranks agree the step is clean, so it does not overlap;
    // a communicator bound to this thread (NCCL) cannot run on the exchange thread.
    let overlap = config.overlap_communication
        && world_size > 1
        && buckets.buckets().len() > 1
        && !mixed
        && communicator.as_send().is_some();
    let gradient_weight = sampler.gradient_weight() as f32;
    let mut order = Vec::new();
    let mut order_epoch = None;
    let mut batch = BatchBuffers::default();
    let mut run_timings = PhaseTimings::default();
    let mut training_time = Duration::ZERO;
    let mut final_evaluation = None;
    let mut last_evaluated_step = None;

    for step in start_step..total_steps {
        let epoch = step / steps_per_epoch;
        let step_in_epoch = (step % steps_per_epoch) as usize;
        if order_epoch != Some(epoch) {
            sampler.epoch_order(epoch, &mut order);
            order_epoch = Some(epoch);
        }
        let started = Instant::now();
        let mut timings = PhaseTimings::default();

        let (images, labels) = batch.tensors(
            &data.train,
            sampler.rank_batch(&order, step_in_epoch),
            &device,
        )?;
        let phase = Instant::now();
        timings.data = phase - started;

        let mut overflow = false;
        if let Some(communicator) = communicator.as_send().filter(|_| overlap) {
            // Not mixed, so the compute model is f32: the master, or its copy on a GPU.
            let forward = compute_model.forward_staged(&images)?;
            let loss = candle_nn::loss::cross_entropy(forward.logits(), &labels)?;
            buckets.set_loss(loss.to_scalar::<f32>()? * gradient_weight);
            let phase = lap(phase, &mut timings.forward);
            let exposed = buckets.backward_overlapped(
                communicator,
                compute_model,
                forward,
                &loss,
                gradient_weight,
            )?;
            timings.exposed_communication = exposed;
            timings.backward = phase.elapsed() - exposed;
        } else {
            let logits = compute_model.forward(&images)?.to_dtype(DType::F32)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            let local_loss = loss.to_scalar::<f32>()?;
            buckets.set_loss(local_loss * gradient_weight);
            let phase = lap(phase, &mut timings.forward);
            let scale = scaler.scale();
            let gradients = if scale == 1.0 {
                loss.backward()?
            } else {
                loss.affine(scale, 0.0)?.backward()?
            };
            compute_model.parameters().read_gradients(
                &gradients,
                buckets.gradients_mut(),
                gradient_weight,
            )?;
            drop(gradients);
            if config.inject_overflow == Some((rank, step)) {
                buckets.gradients_mut()[0] = f32::INFINITY;
            }
            let phase = lap(phase, &mut timings.backward);
            if mixed {
                let local_overflow =
                    !local_loss.is_finite() || precision::has_non_finite(buckets.gradients());
                overflow = precision::agree_on_overflow(local_overflow, communicator)?;
                if !overflow {
                    buckets.all_reduce_as(communicator, gradient_format, &mut narrow)?;
                }
            } else {
                buckets.all_reduce(communicator)?;
            }
            lap(phase, &mut timings.exposed_communication);
        }
        let phase = Instant::now();

        let learning_rate = schedule.learning_rate(step);
        let global_loss = buckets.loss();
        if overflow {
            // Every rank skips this step: no update, a smaller scale next time.
            scaler.update(true);
            if scaler.skipped_in_a_row() > MAX_SKIPPED_STEPS_IN_A_ROW {
                return Err(TrainerError::Diverged {
                    step: step + 1,
                    loss: global_loss,
                });
            }
            tracing::warn!(
                rank,
                step = step + 1,
                loss_scale = scaler.scale(),
                skipped_steps = scaler.skipped_steps(),
                "gradients overflowed on some rank: step skipped"
            );
        } else {
            if !global_loss.is_finite() {
                return Err(TrainerError::Diverged {
                    step: step + 1,
                    loss: global_loss,
                });
            }
            let scale = scaler.scale();
            if scale != 1.0 {
                let unscale = (1.0 / scale) as f32;
                buckets
                    .gradients_mut()
                    .iter_mut()
                    .for_each(|g| *g *= unscale);
            }
            if mixed {
                scaler.update(false);
            }
            if let Some(max_norm) = config.optimizer.grad_clip_norm {
                clip_gradient_norm(buckets.gradients_mut(), max_norm);
            }
            optimizer.step(parameters, buckets.gradients(), learning_rate)?;
            if let Some(working) = &working {
                working.parameters().copy_from(parameters)?;
            }
        }
        lap(phase, &mut timings.optimizer);

        let elapsed = started.elapsed();
        training_time += elapsed;
        run_timings.accumulate(&timings);
        let completed = step + 1;
        metrics.on_step(&StepMetrics {
            step: completed,
            total_steps,
            epoch,
            loss: global_loss,
            learning_rate,
            global_batch,
            samples_per_second: global_batch as f64 / elapsed.as_secs_f64().max(1e-9),
            timings,
            loss_scale: scaler.scale(),
            skipped_steps: scaler.skipped_steps(),
            gradient_bytes: if overflow { 0 } else { gradient_bytes },
        });

        if let Some(every) = config.checkpoint.every_steps
            && completed % every == 0
            && completed != total_steps
            && rank == 0
        {
            let path = checkpoint::save(
                &config.checkpoint_directory(),
                completed,
                parameters,
                &optimizer,
            )?;
            metrics.on_checkpoint(completed, &path);
        }
        if config.evaluate && completed % steps_per_epoch == 0 {
            let evaluation = evaluate_split(
                evaluation_model,
                &data.test,
                communicator,
                config.evaluation_batch,
                &mut batch,
                (completed, epoch),
            )?;
            metrics.on_evaluation(&evaluation);
            final_evaluation = Some(evaluation);
            last_evaluated_step = Some(completed);
        }
    }

    if config.evaluate && last_evaluated_step != Some(total_steps) {
        let epoch = total_steps.saturating_sub(1) / steps_per_epoch;
        let evaluation = evaluate_split(
            evaluation_model,
            &data.test,
            communicator,
            config.evaluation_batch,
            &mut batch,
            (total_steps, epoch),
        )?;
        metrics.on_evaluation(&evaluation);
        final_evaluation = Some(evaluation);
    }
    let mut final_checkpoint = None;
    if config.final_checkpoint && rank == 0 {
        let path = checkpoint::save(
            &config.checkpoint_directory(),
            total_steps,
            parameters,
            &optimizer,
        )?;
        metrics.on_checkpoint(total_steps, &path);
        final_checkpoint = Some(path);
    }
    tracing::info!(
        rank,
        steps = total_steps,
        accuracy = final_evaluation.as_ref().map(|e| e.accuracy),
        training_seconds = training_time.as_secs_f64(),
        "training finished"
    );
    Ok(TrainOutcome {
        model,
        steps: total_steps,
        final_evaluation,
        checkpoint: final_checkpoint,
        timings: run_timings,
        training_time,
    })
}

/// Adds the time since `since` to `phase` and returns now.
pub(crate) fn lap(since: Instant, phase: &mut Duration) -> Instant {
    let now = Instant::now();
    *phase += now - since;
    now
}

/// Evaluates `model` on `dataset`, each rank taking a contiguous share, and sums the results
/// over all ranks.
pub fn evaluate(
    model: &Model,
    dataset: &Dataset,
    communicator: &mut dyn Communicator,
    batch_size: usize,
    step: u64,
    epoch: u64,
) -> Result<EvaluationMetrics> {
    let mut batch = BatchBuffers::default();
    evaluate_split(
        model,
        dataset,
        communicator,
        batch_size,
        &mut batch,
        (step, epoch),
    )
}

fn evaluate_split(
    model: &Model,
    dataset: &Dataset,
    communicator: &mut dyn Communicator,
    batch_size: usize,
    batch: &mut BatchBuffers,
    (step, epoch): (u64, u64),
) -> Result<EvaluationMetrics> {
    let share = rank_share(
        dataset.len(),
        communicator.world_size(),
        communicator.rank(),
    );
    let mut summed = evaluation_totals(model, dataset, share, batch_size, batch)?;
    if communicator.world_size() > 1 {
        communicator.all_reduce(summed.as_mut_slice().into(), ReduceOp::Sum)?;
    }
    Ok(evaluation_metrics(summed, step, epoch))
}

/// Evaluates `model` on all of `dataset` on this rank alone.
pub(crate) fn evaluate_locally(
    model: &Model,
    dataset: &Dataset,
    batch_size: usize,
    batch: &mut BatchBuffers,
    (step, epoch): (u64, u64),
) -> Result<EvaluationMetrics> {
    let totals = evaluation_totals(model, dataset, 0..dataset.len(), batch_size, batch)?;
    Ok(evaluation_metrics(totals, step, epoch))
}

/// Loss sum, correct predictions and examples of `model` on the examples `share` of `dataset`.
fn evaluation_totals(
    model: &Model,
    dataset: &Dataset,
    share: std::ops::Range<usize>,
    batch_size: usize,
    batch: &mut BatchBuffers,
) -> Result<[f32; 3]> {
    let mut totals = [0.0f64; 3];
    let mut start = share.start;
    while start < share.end {
        let end = (start + batch_size.max(1)).min(share.end);
        let mut indices = std::mem::take(&mut batch.indices);
        indices.clear();
        indices.extend(start..end);
        let (images, labels) = batch.tensors(dataset, &indices, model.parameters().device())?;
        batch.indices = indices;
        // A working copy in bf16 or f16 returns logits in its format.
        let logits = model.forward(&images)?.to_dtype(DType::F32)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?.to_scalar::<f32>()?;
        let predictions = logits.argmax(1)?.to_vec1::<u32>()?;
        let correct = predictions
            .iter()
            .zip(&batch.labels)
            .filter(|(prediction, label)| prediction == label)
            .count();
        totals[0] += f64::from(loss) * (end - start) as f64;
        totals[1] += correct as f64;
        totals[2] += (end - start) as f64;
        start = end;
    }
    Ok(totals.map(|value| value as f32))
}

fn evaluation_metrics(summed: [f32; 3], step: u64, epoch: u64) -> EvaluationMetrics {
    let examples = summed[2].max(1.0);
    EvaluationMetrics {
        step,
        epoch,
        loss: summed[0] / examples,
        accuracy: summed[1] / examples,
        examples: summed[2] as usize,
    }
}

#[cfg(test)]
mod tests {
    use cohort_spec::train::{LearningRateDecay, OptimizerKind};

    use super::*;
    use crate::data::synthetic_splits;
    use crate::metrics::DiscardMetrics;
    use cohort_collective::{InMemoryStore, TcpRing, TcpRingConfig};

    /// Records everything a run reports.
    #[derive(Default)]
    struct Recorder {
        steps: Vec<StepMetrics>,
        evaluations: Vec<EvaluationMetrics>,
        checkpoints: Vec<(u64, PathBuf)>,
    }

    impl MetricsSink for Recorder {
        fn on_step(&mut self, metrics: &StepMetrics) {
            self.steps.push(metrics.clone());
        }
        fn on_evaluation(&mut self, metrics: &EvaluationMetrics) {
            self.evaluations.push(metrics.clone());
        }
        fn on_checkpoint(&mut self, step: u64, path: &std::path::Path) {
            self.checkpoints.push((step, path.to_owned()));
        }
    }

    fn small_splits() -> TrainTestSplits {
        synthetic_splits(1200, 300, 8, 5, 1).unwrap()
    }

    fn small_config(world_size: u32, output: &std::path::Path) -> TrainConfig {
        let mut config = TrainConfig::from_job_spec(
            &cohort_spec::parse("version = 1\nkind = \"train\"\n").unwrap(),
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
