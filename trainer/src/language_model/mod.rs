//! Training the transformer language model on a `data x pipeline x tensor` mesh:
//! [`train_language_model`].
//!
//! Each step, every replica takes its share of the global batch (the same deterministic
//! sampler as the image models), cuts it into micro-batches and runs them through its pipeline
//! with the configured schedule; tensor-parallel shards of a stage run the same micro-batches
//! and meet in the Megatron all-reduces inside the model. Gradients are then averaged over the
//! replicas of each stage and shard, optionally clipped to a global norm (every parameter
//! counted once), and each rank updates its own slices with the same optimizer as the other
//! models. The losses of the micro-batches are scaled by `1 / (replicas x micro-batches)`, so
//! the update equals the one-rank update on the whole batch.
//!
//! On a GPU (data parallelism only: pipeline and tensor parallelism exchange activations
//! through host memory) the stage's f32 master parameters and the optimizer stay in host
//! memory and a working copy of the stage on the device runs the schedules; it is refreshed
//! from the masters after every update, as for the image models (see [`crate::device`]).
//!
//! - `stage`: the pipeline stage the schedules drive.
//! - `checkpoint`: layout-independent checkpoints (full tensors by name).
//! - `sample`: text generation from a checkpoint.

pub mod checkpoint;
pub mod sample;
pub mod stage;

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use cohort_collective::ReduceOp;
use cohort_jobspec::layout::balanced_stage_layers;
use cohort_jobspec::precision::Precision;

use crate::error::{Result, TrainerError};
use crate::mesh::{MeshCoordinates, MeshGroups};
use crate::metrics::{EarlyStop, EvaluationMetrics, MetricsSink, PhaseTimings};
use crate::optim::Optimizer;
use crate::pipeline::{Schedule, ScheduleStats, run_forward_only, run_training_step};
use crate::precision::NarrowBuffers;
use crate::run::TrainConfig;
use crate::run::driver::{Run, RunPolicy, drive};
use crate::run::schedule::{Evaluations, RunSchedule};
use crate::run::step::{Gradients, LocalUpdate, SplitUpdate, Step, StepSummary};
use crate::sampler::{DistributedSampler, EpochOrder, rank_share};
use crate::text::{TextCorpus, Windows};
use crate::transformer::{Split, StagePlan, TensorParallel, TransformerConfig, TransformerStage};
use checkpoint::{FullParameter, SaveContext, check_layouts, full_parameters};
use stage::LanguageModelStage;

/// Validation sequences every evaluation reads (the first ones of the validation split).
pub const EVALUATION_SEQUENCES: usize = 256;

/// Time spent by the pipeline schedules over a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct PipelineTotals {
    /// Computing forwards and backwards.
    pub compute: Duration,
    /// Blocked waiting for a neighbour.
    pub waiting: Duration,
    /// Inside the schedules.
    pub total: Duration,
    /// Most micro-batches whose activations this stage held at once.
    pub max_live_activations: usize,
}

impl PipelineTotals {
    /// Adds one step's schedule statistics.
    fn add(&mut self, stats: &ScheduleStats) {
        self.compute += stats.compute;
        self.waiting += stats.waiting;
        self.total += stats.total;
        self.max_live_activations = self.max_live_activations.max(stats.max_live_activations);
    }
}

/// What a finished run leaves behind.
pub struct LanguageModelOutcome {
    /// Optimizer steps completed, including those before a resume: the step the run ended at.
    pub steps: u64,
    /// Validation before the first step of this run.
    pub initial_validation: Option<EvaluationMetrics>,
    /// The last validation.
    pub final_validation: Option<EvaluationMetrics>,
    /// The checkpoint of the step the run ended at (on world rank 0).
    pub checkpoint: Option<PathBuf>,
    /// The step after which the run ended because `schedule.stop_after_*` said so, short of its
    /// last step (its checkpoint is `checkpoint`); `None` otherwise.
    pub scheduled_stop: Option<u64>,
    /// Why and where early stopping ended the run; `None` otherwise.
    pub early_stop: Option<EarlyStop>,
    /// With early stopping, the checkpoint of this run's best validation (on world rank 0).
    pub best_checkpoint: Option<PathBuf>,
    /// Training tokens per second over this run's steps (all replicas together).
    pub tokens_per_second: f64,
    /// Wall time of this run's steps.
    pub training_time: Duration,
    /// This rank's pipeline time.
    pub pipeline: PipelineTotals,
    /// The trained part of the model on this rank.
    pub model: TransformerStage,
}

/// The blocks of every stage: `parallel.stage_layers`, or balanced by parameters.
pub fn stage_layers(config: &TrainConfig, vocabulary: usize) -> Result<Vec<u32>> {
    let shape = config.model.transformer();
    if let Some(layers) = &config.parallel.stage_layers {
        return Ok(layers.clone());
    }
    let split = balanced_stage_layers(
        shape.layers,
        config.parallel.pipeline,
        shape.block_parameters(),
        shape.embedding_parameters(vocabulary as u64),
        shape.head_parameters(vocabulary as u64),
    );
    if split.is_empty() {
        return Err(TrainerError::Config(format!(
            "{} blocks cannot fill {} pipeline stages",
            shape.layers, config.parallel.pipeline
        )));
    }
    Ok(split)
}

/// Trains the transformer of `config` on `corpus` as one rank of `mesh`, reporting to
/// `metrics`. Every rank of the mesh calls it with the same config and corpus.
pub fn train_language_model(
    config: &TrainConfig,
    corpus: &TextCorpus,
    mut mesh: MeshGroups,
    metrics: &mut dyn MetricsSink,
) -> Result<LanguageModelOutcome> {
    if !config.device.is_cpu() && mesh.shape.pipeline * mesh.shape.tensor > 1 {
        return Err(TrainerError::Config(format!(
            "device {} with a {} mesh, expected data parallelism only (parallel.pipeline = \
             parallel.tensor = 1): pipeline and tensor parallelism exchange activations through \
             host memory",
            config.device,
            mesh.shape.name()
        )));
    }
    let device = config.device.open()?;
    let stage = StageSetup::new(config, corpus, &mut mesh)?;
    let batching = Batching::new(config, corpus, &mesh)?;
    let mut optimizer =
        Optimizer::new(&config.optimizer, stage.model.parameters().element_count())?;
    let start_step = match config.resume_path() {
        Some(path) => checkpoint::load(
            &path,
            &stage.model_config,
            &stage.model,
            &stage.tensor_parallel,
            &mut optimizer,
        )?,
        None => 0,
    };
    let working = stage.working_copy(&device)?;
    tracing::info!(
        rank = mesh.world.rank(),
        device = %config.device,
        mesh = %mesh.shape.name(),
        replica = mesh.coordinates.data,
        stage = mesh.coordinates.stage,
        shard = mesh.coordinates.tensor,
        blocks = ?stage.plan.blocks,
        parameters = stage.model.parameters().element_count(),
        micro_batches = batching.micro_batches,
        micro_sequences = batching.micro_sequences,
        schedule = config.parallel.pipeline_schedule.name(),
        start_step,
        total_steps = batching.schedule.total_steps,
        "language model training starts"
    );
    let (totals, pipeline) = {
        let compute_model = working.as_ref().unwrap_or(&stage.model);
        let parts = RunParts {
            config,
            corpus,
            setup: &stage,
            batching: &batching,
            device,
        };
        let mut run =
            LanguageModelRun::new(parts, mesh, compute_model, working.as_ref(), optimizer);
        let totals = drive(
            &batching.schedule,
            &RunPolicy::of(config),
            start_step,
            batching.global_batch,
            &mut run,
            metrics,
        )?;
        (totals, run.pipeline)
    };
    let tokens = (batching.global_batch * batching.context) as f64;
    let tokens_per_second =
        totals.steps_run as f64 * tokens / totals.training_time.as_secs_f64().max(1e-9);
    let steps = totals
        .ended_early_at()
        .unwrap_or(batching.schedule.total_steps);
    tracing::info!(
        steps,
        validation_loss = totals.final_evaluation.as_ref().map(|e| e.loss),
        tokens_per_second,
        "language model training finished"
    );
    Ok(LanguageModelOutcome {
        steps,
        initial_validation: totals.initial_evaluation,
        final_validation: totals.final_evaluation,
        checkpoint: totals.final_checkpoint,
        scheduled_stop: totals.scheduled_stop,
        early_stop: totals.early_stop,
        best_checkpoint: totals.best_checkpoint,
        tokens_per_second,
        training_time: totals.training_time,
        pipeline,
        model: stage.model,
    })
}

/// This rank's stage of the model and what places it in the whole.
struct StageSetup {
    /// The whole model's vocabulary, shape and seed.
    model_config: TransformerConfig,
    /// This stage's blocks and ends.
    plan: StagePlan,
    /// This stage's tensor-parallel group.
    tensor_parallel: Arc<TensorParallel>,
    /// The f32 masters the optimizer updates and checkpoints hold, in host memory.
    model: TransformerStage,
    /// The full model's tensors in canonical order.
    full: Vec<FullParameter>,
    /// World rank of the rank that writes each stage's tensors.
    stage_roots: Vec<usize>,
}

impl StageSetup {
    fn new(config: &TrainConfig, corpus: &TextCorpus, mesh: &mut MeshGroups) -> Result<Self> {
        let model_config = TransformerConfig {
            vocabulary: corpus.vocabulary.len(),
            shape: config.model.transformer(),
            seed: config.model.seed,
        };
        let layers = stage_layers(config, model_config.vocabulary)?;
        let stage_index = mesh.coordinates.stage;
        let first_block: u32 = layers[..stage_index].iter().sum();
        let plan = StagePlan {
            blocks: first_block as usize..(first_block + layers[stage_index]) as usize,
            first: stage_index == 0,
            last: stage_index + 1 == mesh.shape.pipeline,
        };
        let tensor_parallel = Arc::new(match mesh.tensor.take() {
            Some(group) if mesh.shape.tensor > 1 => TensorParallel::new(group),
            _ => TensorParallel::single(),
        });
        let mut model = TransformerStage::new(
            &model_config,
            plan.clone(),
            tensor_parallel.clone(),
            &Device::Cpu,
        )?;
        model.set_compute_dtype(crate::precision::tensor_dtype(config.train.precision));
        let full = full_parameters(&model_config, &layers);
        check_layouts(model.layouts(), &full)?;
        let stage_roots = (0..mesh.shape.pipeline)
            .map(|stage| {
                mesh.shape.rank(MeshCoordinates {
                    data: 0,
                    stage,
                    tensor: 0,
                })
            })
            .collect();
        Ok(Self {
            model_config,
            plan,
            tensor_parallel,
            model,
            full,
            stage_roots,
        })
    }

    /// On a GPU, the stage the schedules run: f32 parameters on the device (cast to the compute
    /// format on use, like the masters on the CPU), refreshed after every update.
    fn working_copy(&self, device: &Device) -> Result<Option<TransformerStage>> {
        if device.is_cpu() {
            return Ok(None);
        }
        let mut working = TransformerStage::new(
            &self.model_config,
            self.plan.clone(),
            self.tensor_parallel.clone(),
            device,
        )?;
        working.set_compute_dtype(self.model.compute_dtype());
        working.parameters().copy_from(self.model.parameters())?;
        Ok(Some(working))
    }

    /// The ranges of the flat gradient that count towards the global norm on a rank at
    /// `coordinates`: each parameter once (replica 0; replicated ones on shard 0 only).
    fn counted_in_norm(&self, coordinates: MeshCoordinates) -> Vec<Range<usize>> {
        if coordinates.data != 0 {
            return Vec::new();
        }
        self.model
            .parameters()
            .iter()
            .zip(self.model.layouts())
            .filter(|(_, layout)| {
                !matches!(layout.split, Split::Replicated) || coordinates.tensor == 0
            })
            .map(|(parameter, _)| parameter.flat_range())
            .collect()
    }
}

/// How a replica cuts the training windows into steps and micro-batches.
struct Batching<'c> {
    /// The training split's windows.
    windows: Windows<'c>,
    /// This replica's windows of every step.
    sampler: DistributedSampler,
    /// Sequences of a step over all replicas.
    global_batch: usize,
    /// Tokens of a sequence.
    context: usize,
    /// Micro-batches of a step and sequences of each.
    micro_batches: usize,
    micro_sequences: usize,
    /// Steps, evaluations and checkpoints.
    schedule: RunSchedule,
}

impl<'c> Batching<'c> {
    fn new(config: &TrainConfig, corpus: &'c TextCorpus, mesh: &MeshGroups) -> Result<Self> {
        let context = config.model.transformer().context as usize;
        let windows = Windows::new(&corpus.train, context);
        let global_batch = config.schedule.batch_size as usize;
        let sampler = DistributedSampler::new(
            windows.len(),
            global_batch,
            mesh.shape.data,
            mesh.coordinates.data,
            config.data.seed,
        )?;
        let micro_batches = config.parallel.micro_batches() as usize;
        let micro_sequences = sampler.local_batch() / micro_batches;
        if micro_sequences == 0 || sampler.local_batch() % micro_batches != 0 {
            return Err(TrainerError::Config(format!(
                "{} sequences per replica cannot be cut into {micro_batches} equal micro-batches",
                sampler.local_batch()
            )));
        }
        let schedule = RunSchedule::of(
            config,
            sampler.steps_per_epoch() as u64,
            Evaluations::FirstThenEvery(config.schedule.eval_every_steps),
        );
        Ok(Self {
            windows,
            sampler,
            global_batch,
            context,
            micro_batches,
            micro_sequences,
            schedule,
        })
    }
}

/// What a [`LanguageModelRun`] reads and does not own.
struct RunParts<'a> {
    config: &'a TrainConfig,
    corpus: &'a TextCorpus,
    setup: &'a StageSetup,
    batching: &'a Batching<'a>,
    /// Where the schedules run.
    device: Device,
}

/// One mesh rank's part of a language-model run.
struct LanguageModelRun<'a> {
    parts: RunParts<'a>,
    mesh: MeshGroups,
    /// The stage the schedules drive, over the compute model.
    stage: LanguageModelStage<'a>,
    step: Step,
    update: LocalUpdate,
    /// The ranges of the gradient this rank counts in the global norm.
    counted: Vec<Range<usize>>,
    gradient_format: Precision,
    narrow: NarrowBuffers,
    order: EpochOrder,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    /// The pipeline schedules' time over the run.
    pipeline: PipelineTotals,
}

impl<'a> LanguageModelRun<'a> {
    fn new(
        parts: RunParts<'a>,
        mesh: MeshGroups,
        compute_model: &'a TransformerStage,
        working: Option<&TransformerStage>,
        optimizer: Optimizer,
    ) -> Self {
        let RunParts { config, setup, .. } = &parts;
        let update = LocalUpdate::new(
            optimizer,
            config.learning_rate_schedule(parts.batching.schedule.total_steps),
            setup.model.parameters(),
            working.map(TransformerStage::parameters),
        );
        let stage = LanguageModelStage::new(
            compute_model,
            parts.device.clone(),
            setup.plan.first,
            setup.plan.last,
        );
        Self {
            step: Step::new(
                mesh.world.rank(),
                &config.train,
                config.optimizer.grad_clip_norm,
            ),
            counted: setup.counted_in_norm(mesh.coordinates),
            gradient_format: config.train.grad_comm_dtype(),
            update,
            stage,
            mesh,
            narrow: NarrowBuffers::default(),
            order: EpochOrder::default(),
            inputs: Vec::new(),
            targets: Vec::new(),
            pipeline: PipelineTotals::default(),
            parts,
        }
    }

    /// Loads this replica's share of step `step`'s sequences into the stage.
    fn load_batch(&mut self, step: u64) -> Result<()> {
        let batching = self.parts.batching;
        let indices = self.order.rank_batch(&batching.sampler, step);
        batching
            .windows
            .gather(indices, &mut self.inputs, &mut self.targets);
        // The losses of the micro-batches are scaled by `1 / (replicas x micro-batches)`.
        let loss_scale = 1.0 / (self.mesh.shape.data * batching.micro_batches) as f64;
        self.stage.load_batch(
            &self.inputs,
            &self.targets,
            batching.micro_sequences,
            batching.context,
            loss_scale,
        )?;
        self.stage.set_gradient_scale(self.step.loss_scale());
        Ok(())
    }

    /// The step's loss (each replica's last stage, shard 0) and whether any rank's gradients
    /// overflowed, agreed over the whole mesh.
    fn agree_on_loss(&mut self) -> Result<(f32, bool)> {
        let counts_loss = self.parts.setup.plan.last && self.mesh.coordinates.tensor == 0;
        let local_loss = if counts_loss {
            self.stage.loss() as f32
        } else {
            0.0
        };
        let local_overflow = !self.stage.loss().is_finite()
            || crate::precision::has_non_finite(self.stage.gradients());
        let mut reduced = [local_loss, if local_overflow { 1.0 } else { 0.0 }];
        self.mesh
            .world
            .all_reduce(reduced.as_mut_slice().into(), ReduceOp::Sum)?;
        let loss = reduced[0];
        Ok((loss, reduced[1] > 0.0 || !loss.is_finite()))
    }
}

impl Run for LanguageModelRun<'_> {
    fn step(&mut self, step: u64) -> Result<StepSummary> {
        let started = Instant::now();
        let mut timings = PhaseTimings::default();
        self.load_batch(step)?;
        timings.data = started.elapsed();
        let stats = run_training_step(
            Schedule::from(self.parts.config.parallel.pipeline_schedule),
            self.mesh.position(),
            self.parts.batching.micro_batches,
            &mut self.stage,
            &mut self.mesh.links,
            &self.parts.device,
        )?;
        self.pipeline.add(&stats);
        timings.forward = stats.compute;
        timings.exposed_communication = stats.waiting;

        let phase = Instant::now();
        let (loss, overflow) = self.agree_on_loss()?;
        let mut exchanged_bytes = 0;
        if !overflow && self.mesh.shape.data > 1 {
            let gradients = self.stage.gradients_mut();
            exchanged_bytes =
                crate::precision::gradient_bytes(gradients.len(), self.gradient_format);
            self.narrow
                .all_reduce(gradients, self.gradient_format, self.mesh.data.as_mut())?;
        }
        timings.exposed_communication += phase.elapsed();
        let gradients = Gradients {
            loss,
            overflow,
            values: self.stage.gradients_mut(),
            exchanged_bytes,
        };
        let mut update = SplitUpdate {
            update: &mut self.update,
            group: self.mesh.world.as_mut(),
            counted: &self.counted,
        };
        self.step.finish(step, gradients, &mut update, timings)
    }

    fn evaluate(&mut self, completed: u64, epoch: u64) -> Result<Option<EvaluationMetrics>> {
        let RunParts {
            corpus,
            batching,
            setup,
            device,
            ..
        } = &self.parts;
        let MeshCoordinates {
            data: replica,
            tensor: shard,
            ..
        } = self.mesh.coordinates;
        let validation = Windows::new(&corpus.validation, batching.context);
        let sequences = validation.len().min(EVALUATION_SEQUENCES);
        let share: Vec<usize> = rank_share(sequences, self.mesh.shape.data, replica).collect();
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        validation.gather(&share, &mut inputs, &mut targets);
        let count = self.stage.load_batch(
            &inputs,
            &targets,
            batching.micro_sequences,
            batching.context,
            1.0,
        )?;
        let position = self.mesh.position();
        run_forward_only(
            position,
            count,
            &mut self.stage,
            &mut self.mesh.links,
            device,
        )?;
        let sums = self.stage.take_evaluation();
        // Each replica's last stage, shard 0, contributes its sums.
        let mut totals = if setup.plan.last && shard == 0 {
            [sums.loss as f32, sums.correct as f32, sums.tokens as f32]
        } else {
            [0.0; 3]
        };
        self.mesh
            .world
            .all_reduce(totals.as_mut_slice().into(), ReduceOp::Sum)?;
        let tokens = totals[2].max(1.0);
        Ok(Some(EvaluationMetrics {
            step: completed,
            epoch,
            loss: totals[0] / tokens,
            accuracy: totals[1] / tokens,
            examples: totals[2] as usize,
        }))
    }

    fn checkpoint(
        &mut self,
        completed: u64,
        evaluation: Option<&EvaluationMetrics>,
    ) -> Result<Option<PathBuf>> {
        let RunParts {
            config,
            corpus,
            setup,
            ..
        } = &self.parts;
        checkpoint::save(
            SaveContext {
                world: self.mesh.world.as_mut(),
                tensor_parallel: &setup.tensor_parallel,
                full: &setup.full,
                stage_roots: &setup.stage_roots,
                vocabulary: &corpus.vocabulary,
                shape: config.model.transformer(),
            },
            &config.checkpoint_directory(),
            completed,
            &setup.model,
            &self.update.optimizer,
            evaluation,
        )
    }
}
