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

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use cohort_collective::ReduceOp;
use cohort_spec::layout::balanced_stage_layers;

use crate::error::{Result, TrainerError};
use crate::mesh::{MeshCoordinates, MeshGroups};
use crate::metrics::{EvaluationMetrics, MetricsSink, PhaseTimings, StepMetrics};
use crate::optim::{LearningRateSchedule, Optimizer};
use crate::pipeline::{Schedule, run_forward_only, run_training_step};
use crate::precision::{LossScaler, NarrowBuffers};
use crate::sampler::{DistributedSampler, rank_share};
use crate::text::{TextCorpus, Windows};
use crate::train_loop::TrainConfig;
use crate::transformer::{Split, StagePlan, TensorParallel, TransformerConfig, TransformerStage};
use checkpoint::{FullParameter, SaveContext, check_layouts, full_parameters};
use cohort_spec::precision::Precision;
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

/// What a finished run leaves behind.
pub struct LanguageModelOutcome {
    /// Optimizer steps completed, including those before a resume.
    pub steps: u64,
    /// Validation before the first step of this run.
    pub initial_validation: Option<EvaluationMetrics>,
    /// The last validation.
    pub final_validation: Option<EvaluationMetrics>,
    /// The final checkpoint (on world rank 0).
    pub checkpoint: Option<PathBuf>,
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
    let shape = config.model.transformer();
    let context = shape.context as usize;
    let model_config = TransformerConfig {
        vocabulary: corpus.vocabulary.len(),
        shape,
        seed: config.model.seed,
    };
    let layers = stage_layers(config, model_config.vocabulary)?;
    let MeshCoordinates {
        data: replica,
        stage: stage_index,
        tensor: shard,
    } = mesh.coordinates;
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
    // The f32 masters the optimizer updates and checkpoints hold, in host memory.
    let mut model = TransformerStage::new(
        &model_config,
        plan.clone(),
        tensor_parallel.clone(),
        &Device::Cpu,
    )?;
    let precision = config.train.precision;
    model.set_compute_dtype(crate::precision::tensor_dtype(precision));
    let gradient_format = config.train.grad_comm_dtype();
    let mixed = precision != Precision::Fp32 || gradient_format != Precision::Fp32;
    let mut scaler = LossScaler::new(config.train.loss_scaling());
    let mut narrow = NarrowBuffers::default();
    let full = full_parameters(&model_config, &layers);
    check_layouts(model.layouts(), &full)?;
    let mut optimizer = Optimizer::new(&config.optimizer, model.parameters().element_count());

    let windows = Windows::new(&corpus.train, context);
    let global_batch = config.schedule.batch_size as usize;
    let replicas = mesh.shape.data;
    let sampler = DistributedSampler::new(
        windows.len(),
        global_batch,
        replicas,
        replica,
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
    let steps_per_epoch = sampler.steps_per_epoch() as u64;
    let planned = steps_per_epoch * u64::from(config.schedule.epochs);
    let total_steps = config
        .schedule
        .max_steps
        .map_or(planned, |max| max.min(planned));
    let schedule = LearningRateSchedule::new(
        config.optimizer.learning_rate(),
        config.schedule.warmup_steps,
        config.schedule.lr_decay,
        total_steps,
    );
    let mut start_step = 0;
    if let Some(path) = config.resume_path() {
        start_step = checkpoint::load(
            &path,
            &model_config,
            &model,
            &tensor_parallel,
            &mut optimizer,
        )?;
    }
    let stage_roots: Vec<usize> = (0..mesh.shape.pipeline)
        .map(|stage| {
            mesh.shape.rank(MeshCoordinates {
                data: 0,
                stage,
                tensor: 0,
            })
        })
        .collect();
    // Replicated parameters count once in the global norm: on shard 0 only.
    let counted_once: Vec<bool> = model
        .layouts()
        .iter()
        .map(|layout| !matches!(layout.split, Split::Replicated) || shard == 0)
        .collect();
    let schedule_kind = Schedule::from(config.parallel.pipeline_schedule);
    let position = mesh.position();
    // On a GPU, the stage the schedules run: f32 parameters on the device (cast to the compute
    // format on use, like the masters on the CPU), refreshed after every update.
    let working = if device.is_cpu() {
        None
    } else {
        let mut working = TransformerStage::new(
            &model_config,
            plan.clone(),
            tensor_parallel.clone(),
            &device,
        )?;
        working.set_compute_dtype(model.compute_dtype());
        working.parameters().copy_from(model.parameters())?;
        Some(working)
    };
    let compute_model = working.as_ref().unwrap_or(&model);
    tracing::info!(
        rank = mesh.world.rank(),
        device = %config.device,
        mesh = %mesh.shape.name(),
        replica,
        stage = stage_index,
        shard,
        blocks = ?plan.blocks,
        parameters = model.parameters().element_count(),
        micro_batches,
        micro_sequences,
        schedule = config.parallel.pipeline_schedule.name(),
        start_step,
        total_steps,
        "language model training starts"
    );

    let mut stage = LanguageModelStage::new(compute_model, device.clone(), plan.first, plan.last);
    let loss_scale = 1.0 / (replicas * micro_batches) as f64;
    let evaluate = |stage: &mut LanguageModelStage<'_>,
                    mesh: &mut MeshGroups,
                    step: u64|
     -> Result<EvaluationMetrics> {
        let validation = Windows::new(&corpus.validation, context);
        let sequences = validation.len().min(EVALUATION_SEQUENCES);
        let share: Vec<usize> = rank_share(sequences, replicas, replica).collect();
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        validation.gather(&share, &mut inputs, &mut targets);
        let count = stage.load_batch(&inputs, &targets, micro_sequences, context, 1.0)?;
        run_forward_only(position, count, stage, &mut mesh.links, &device)?;
        let sums = stage.take_evaluation();
        // Each replica's last stage, shard 0, contributes its sums.
        let mut totals = if plan.last && shard == 0 {
            [sums.loss as f32, sums.correct as f32, sums.tokens as f32]
        } else {
            [0.0; 3]
        };
        mesh.world
            .all_reduce(totals.as_mut_slice().into(), ReduceOp::Sum)?;
        let tokens = totals[2].max(1.0);
        Ok(EvaluationMetrics {
            step,
            epoch: step.saturating_sub(1) / steps_per_epoch.max(1),
            loss: totals[0] / tokens,
            accuracy: totals[1] / tokens,
            examples: totals[2] as usize,
        })
    };

    let initial_validation = if config.evaluate {
        let evaluation = evaluate(&mut stage, &mut mesh, start_step)?;
        metrics.on_evaluation(&evaluation);
        Some(evaluation)
    } else {
        None
    };
    let mut final_validation = initial_validation.clone();
    let mut totals = PipelineTotals::default();
    let mut training_time = Duration::ZERO;
    let mut order = Vec::new();
    let mut order_epoch = None;
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    let mut reduced = [0.0f32; 2];
    for step in start_step..total_steps {
        let started = Instant::now();
        let epoch = step / steps_per_epoch;
        if order_epoch != Some(epoch) {
            sampler.epoch_order(epoch, &mut order);
            order_epoch = Some(epoch);
        }
        let mut timings = PhaseTimings::default();
        windows.gather(
            sampler.rank_batch(&order, (step % steps_per_epoch) as usize),
            &mut inputs,
            &mut targets,
        );
        stage.load_batch(&inputs, &targets, micro_sequences, context, loss_scale)?;
        stage.set_gradient_scale(scaler.scale());
        timings.data = started.elapsed();

        let stats = run_training_step(
            schedule_kind,
            position,
            micro_batches,
            &mut stage,
            &mut mesh.links,
            &device,
        )?;
        totals.compute += stats.compute;
        totals.waiting += stats.waiting;
        totals.total += stats.total;
        totals.max_live_activations = totals.max_live_activations.max(stats.max_live_activations);
        timings.forward = stats.compute;
        timings.exposed_communication = stats.waiting;

        let phase = Instant::now();
        // The step's loss (each replica's last stage, shard 0) and whether any rank's gradients
        // overflowed, agreed over the whole mesh.
        let local_loss = if plan.last && shard == 0 {
            stage.loss() as f32
        } else {
            0.0
        };
        let local_overflow =
            !stage.loss().is_finite() || crate::precision::has_non_finite(stage.gradients());
        reduced[0] = local_loss;
        reduced[1] = if local_overflow { 1.0 } else { 0.0 };
        mesh.world
            .all_reduce(reduced.as_mut_slice().into(), ReduceOp::Sum)?;
        let loss = reduced[0];
        let overflow = reduced[1] > 0.0 || !loss.is_finite();
        if overflow && !mixed {
            return Err(TrainerError::Diverged {
                step: step + 1,
                loss,
            });
        }
        let learning_rate = schedule.learning_rate(step);
        if overflow {
            scaler.update(true);
            if scaler.skipped_in_a_row() > crate::train_loop::MAX_SKIPPED_STEPS_IN_A_ROW {
                return Err(TrainerError::Diverged {
                    step: step + 1,
                    loss,
                });
            }
            tracing::warn!(
                step = step + 1,
                loss_scale = scaler.scale(),
                skipped_steps = scaler.skipped_steps(),
                "gradients overflowed on some rank: step skipped"
            );
        } else {
            if replicas > 1 {
                narrow.all_reduce(stage.gradients_mut(), gradient_format, mesh.data.as_mut())?;
            }
            let unscale = 1.0 / scaler.scale();
            if unscale != 1.0 {
                let unscale = unscale as f32;
                stage.gradients_mut().iter_mut().for_each(|g| *g *= unscale);
            }
            if mixed {
                scaler.update(false);
            }
            timings.exposed_communication += phase.elapsed();
            if let Some(max_norm) = config.optimizer.grad_clip_norm {
                // The global norm: each parameter once (replica 0; replicated ones on shard 0).
                let squared: f64 = if replica == 0 {
                    model
                        .parameters()
                        .iter()
                        .zip(&counted_once)
                        .filter(|(_, counted)| **counted)
                        .map(|(parameter, _)| {
                            stage.gradients()[parameter.flat_range()]
                                .iter()
                                .map(|g| f64::from(*g) * f64::from(*g))
                                .sum::<f64>()
                        })
                        .sum()
                } else {
                    0.0
                };
                let mut norm = [squared as f32];
                mesh.world
                    .all_reduce(norm.as_mut_slice().into(), ReduceOp::Sum)?;
                let norm = f64::from(norm[0]).sqrt();
                if norm > max_norm {
                    let factor = (max_norm / norm) as f32;
                    stage.gradients_mut().iter_mut().for_each(|g| *g *= factor);
                }
            }
            let phase = Instant::now();
            optimizer.step(model.parameters(), stage.gradients(), learning_rate)?;
            if let Some(working) = &working {
                working.parameters().copy_from(model.parameters())?;
            }
            timings.optimizer = phase.elapsed();
        }

        let elapsed = started.elapsed();
        training_time += elapsed;
        let completed = step + 1;
        metrics.on_step(&StepMetrics {
            step: completed,
            total_steps,
            epoch,
            loss,
            learning_rate,
            global_batch,
            samples_per_second: global_batch as f64 / elapsed.as_secs_f64().max(1e-9),
            timings,
            loss_scale: scaler.scale(),
            skipped_steps: scaler.skipped_steps(),
            gradient_bytes: if overflow || replicas == 1 {
                0
            } else {
                crate::precision::gradient_bytes(stage.gradients().len(), gradient_format)
            },
        });
        let checkpoint_due = config
            .checkpoint
            .every_steps
            .is_some_and(|every| completed % every == 0 && completed != total_steps);
        if checkpoint_due {
            let path = save(
                config,
                &mut mesh,
                &model,
                &tensor_parallel,
                &optimizer,
                &full,
                &stage_roots,
                corpus,
                completed,
            )?;
            if let Some(path) = path {
                metrics.on_checkpoint(completed, &path);
            }
        }
        let evaluation_due = config.evaluate
            && config
                .schedule
                .eval_every_steps
                .is_some_and(|every| completed % every == 0)
            && completed != total_steps;
        if evaluation_due {
            let evaluation = evaluate(&mut stage, &mut mesh, completed)?;
            metrics.on_evaluation(&evaluation);
            final_validation = Some(evaluation);
        }
    }
    if config.evaluate && total_steps > start_step {
        let evaluation = evaluate(&mut stage, &mut mesh, total_steps)?;
        metrics.on_evaluation(&evaluation);
        final_validation = Some(evaluation);
    }
    let checkpoint = if config.final_checkpoint {
        let path = save(
            config,
            &mut mesh,
            &model,
            &tensor_parallel,
            &optimizer,
            &full,
            &stage_roots,
            corpus,
            total_steps,
        )?;
        if let Some(path) = &path {
            metrics.on_checkpoint(total_steps, path);
        }
        path
    } else {
        None
    };
    let steps_run = total_steps.saturating_sub(start_step);
    let tokens_per_second = (steps_run as f64 * (global_batch * context) as f64)
        / training_time.as_secs_f64().max(1e-9);
    drop(stage);
    tracing::info!(
        steps = total_steps,
        validation_loss = final_validation.as_ref().map(|e| e.loss),
        tokens_per_second,
        "language model training finished"
    );
    Ok(LanguageModelOutcome {
        steps: total_steps,
        initial_validation,
        final_validation,
        checkpoint,
        tokens_per_second,
        training_time,
        pipeline: totals,
        model,
    })
}

/// Writes a checkpoint of the whole mesh's model (every rank calls it; rank 0 writes).
#[allow(clippy::too_many_arguments)]
fn save(
    config: &TrainConfig,
    mesh: &mut MeshGroups,
    model: &TransformerStage,
    tensor_parallel: &TensorParallel,
    optimizer: &Optimizer,
    full: &[FullParameter],
    stage_roots: &[usize],
    corpus: &TextCorpus,
    step: u64,
) -> Result<Option<PathBuf>> {
    checkpoint::save(
        SaveContext {
            world: mesh.world.as_mut(),
            tensor_parallel,
            full,
            stage_roots,
            vocabulary: &corpus.vocabulary,
            shape: config.model.transformer(),
        },
        &config.checkpoint_directory(),
        step,
        model,
        optimizer,
    )
}
