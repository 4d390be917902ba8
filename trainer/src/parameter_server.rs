//! Training through sharded parameter servers (`[parallel] comm = "ps"`): each rank computes
//! the gradients of its share of the batch, pushes them and pulls the parameters to use next
//! in one round trip per shard; the servers run the optimizer.
//!
//! - [`train_with_parameter_server`]: the loop one rank runs.
//! - [`server_config`]: the shard configuration a job's training sections imply, for the
//!   server processes.
//! - [`tensor_declarations`]: how a model's parameters are declared to the servers (the
//!   embedding model's table as a row-sparse table, everything else dense).
//!
//! Gradients are scaled so that the servers' average over ranks equals the weighted mean of
//! all-reduce data parallelism ([`crate::sampler::DistributedSampler::gradient_weight`] times
//! the world size): in sync mode both produce the same parameters. Rank 0 evaluates (alone, on
//! parameters it pulls whole) and writes checkpoints that include every shard's snapshot.

use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use candle_nn::Module;
use cohort_parameter_server::config::{OptimizerConfig, OptimizerKind as ServerOptimizerKind};
use cohort_parameter_server::{
    ClientConfig, Mode, ParameterClient, RowSelection, ScheduleConfig, ServerConfig,
    SparseGradient, StepReport, TensorDeclaration,
};
use cohort_proto::JobId;
use cohort_spec::train::{OptimizerKind, PsMode};
use tokio::runtime::Handle;

use crate::checkpoint;
use crate::data::{Dataset, TrainTestSplits};
use crate::error::{Result, TrainerError};
use crate::metrics::{EvaluationMetrics, MetricsSink, PhaseTimings, StepMetrics};
use crate::models::Model;
use crate::optim::Optimizer;
use crate::sampler::DistributedSampler;
use crate::train_loop::{
    BatchBuffers, RunPlan, TrainConfig, TrainOutcome, evaluate_locally, lap, working_copy,
};

/// What a rank needs to reach its job's parameter servers.
#[derive(Debug, Clone)]
pub struct ParameterServerLink {
    /// Runtime the client's gRPC calls run on (the training thread blocks on them).
    pub runtime: Handle,
    /// The client's identity and limits (job id, rank).
    pub client: ClientConfig,
    /// `host:port` of each shard's server, by shard id.
    pub addresses: Vec<String>,
}

/// Returns the configuration of shard `shard_id` of `shard_count` for a job with `config`'s
/// training sections.
pub fn server_config(
    config: &TrainConfig,
    job_id: JobId,
    shard_id: u32,
    shard_count: u32,
) -> ServerConfig {
    let optimizer = &config.optimizer;
    let [beta1, beta2] = optimizer.betas();
    ServerConfig {
        job_id,
        shard_id,
        shard_count,
        ranks: config.parallel.world_size(),
        mode: match config.parallel.ps_mode() {
            PsMode::Sync => Mode::Sync,
            PsMode::Async => Mode::Async,
            PsMode::Ssp => Mode::Ssp,
        },
        staleness: match config.parallel.ps_mode() {
            PsMode::Ssp => config.parallel.staleness(),
            PsMode::Sync | PsMode::Async => 0,
        },
        optimizer: OptimizerConfig {
            kind: match optimizer.kind {
                OptimizerKind::Sgd => ServerOptimizerKind::Sgd,
                OptimizerKind::Adamw => ServerOptimizerKind::Adamw,
            },
            learning_rate: optimizer.learning_rate(),
            momentum: optimizer.momentum(),
            beta1,
            beta2,
            eps: optimizer.eps(),
            weight_decay: optimizer.weight_decay(),
        },
        schedule: ScheduleConfig {
            warmup_steps: config.schedule.warmup_steps,
            decay: config.schedule.lr_decay,
        },
        limits: Default::default(),
    }
}

/// Declares `model`'s parameters, in order, as the servers shard them.
pub fn tensor_declarations(model: &Model) -> Vec<TensorDeclaration> {
    let table = model.embedding_table();
    model
        .parameters()
        .iter()
        .enumerate()
        .map(|(index, parameter)| match &table {
            Some(table) if table.parameter_index == index => TensorDeclaration::embedding_table(
                parameter.name(),
                table.rows as u64,
                table.width as u64,
            ),
            _ => TensorDeclaration::dense(parameter.name(), parameter.len() as u64),
        })
        .collect()
}

/// Where each parameter lives in the servers' dense vector, and the sparse table if any.
#[derive(Debug)]
struct Layout {
    /// Dense parameters: index in the parameter set and range in the dense vector.
    dense: Vec<(usize, Range<usize>)>,
    /// The embedding table: parameter index and row width.
    table: Option<(usize, usize)>,
    /// Elements of the dense vector.
    dense_len: usize,
}

impl Layout {
    fn new(model: &Model, client: &ParameterClient) -> Result<Self> {
        let plan = client.plan();
        let table = model.embedding_table();
        let mut dense = Vec::new();
        for (index, parameter) in model.parameters().iter().enumerate() {
            if table.as_ref().is_some_and(|t| t.parameter_index == index) {
                continue;
            }
            let offset = plan.tensor_dense_offset(index).ok_or_else(|| {
                TrainerError::Config(format!("parameter {} is not in the shard plan", index))
            })? as usize;
            dense.push((index, offset..offset + parameter.len()));
        }
        Ok(Self {
            dense,
            table: table.map(|t| (t.parameter_index, t.width)),
            dense_len: plan.dense_element_count() as usize,
        })
    }

    /// Copies the dense vector into the model's dense parameters.
    fn write_dense(&self, model: &Model, dense: &[f32]) -> Result<()> {
        for (index, range) in &self.dense {
            model.parameters().update(*index, |values| {
                values.copy_from_slice(&dense[range.clone()])
            })?;
        }
        Ok(())
    }

    /// Copies pulled table rows (`rows.len() * width` values) into the model's table.
    fn write_rows(&self, model: &Model, rows: &[u64], values: &[f32]) -> Result<()> {
        let Some((index, width)) = self.table else {
            return Ok(());
        };
        if values.len() != rows.len() * width {
            return Err(TrainerError::Config(format!(
                "{} pulled values for {} rows of width {width}",
                values.len(),
                rows.len()
            )));
        }
        model.parameters().update(index, |table| {
            for (row, source) in rows.iter().zip(values.chunks_exact(width)) {
                let start = *row as usize * width;
                table[start..start + width].copy_from_slice(source);
            }
        })?;
        Ok(())
    }
}

/// Reused buffers of one step's exchange.
#[derive(Debug, Default)]
struct ExchangeBuffers {
    /// The dense gradient, then (after the round trip) the fresh dense parameters.
    dense_gradient: Vec<f32>,
    /// Fresh dense parameters.
    dense: Vec<f32>,
    /// The whole table's gradient (zero outside the batch's rows).
    table_gradient: Vec<f32>,
    /// The gradient of the batch's rows, row after row.
    row_gradient: Vec<f32>,
}

/// A batch gathered ahead of its step, with the table rows it touches.
#[derive(Debug, Default)]
struct PreparedBatch {
    /// Host images and labels.
    buffers: BatchBuffers,
    /// Examples in it.
    len: usize,
    /// Sorted table rows it touches (empty without a table).
    rows: Vec<u64>,
}

/// Deterministic batches of one rank, gathered one step ahead.
struct Batches<'a> {
    /// The data.
    dataset: &'a Dataset,
    /// Which examples each step takes.
    sampler: &'a DistributedSampler,
    /// Order of `order_epoch`.
    order: Vec<usize>,
    /// Epoch `order` belongs to.
    order_epoch: Option<u64>,
}

impl Batches<'_> {
    /// Gathers the batch of `step` into `batch` and finds its table rows.
    fn prepare(&mut self, model: &Model, step: u64, batch: &mut PreparedBatch) -> Result<()> {
        let steps_per_epoch = self.sampler.steps_per_epoch() as u64;
        let epoch = step / steps_per_epoch;
        if self.order_epoch != Some(epoch) {
            self.sampler.epoch_order(epoch, &mut self.order);
            self.order_epoch = Some(epoch);
        }
        let indices = self
            .sampler
            .rank_batch(&self.order, (step % steps_per_epoch) as usize);
        let PreparedBatch { buffers, len, rows } = batch;
        self.dataset
            .gather(indices, &mut buffers.images, &mut buffers.labels)?;
        *len = indices.len();
        model.touched_rows(&buffers.images, *len, rows);
        Ok(())
    }
}

/// Trains `config`'s model on `data` as one rank of a parameter-server job, reporting to
/// `metrics`.
///
/// Every rank of the job calls it with the same config and data and its own link. Rank 0
/// initialises the servers (with its initial parameters or checkpoint; servers restored from a
/// checkpoint's snapshots keep theirs); every rank then continues from the step its shard
/// clocks say.
pub fn train_with_parameter_server(
    config: &TrainConfig,
    data: &TrainTestSplits,
    link: &ParameterServerLink,
    metrics: &mut dyn MetricsSink,
) -> Result<TrainOutcome> {
    let rank = link.client.rank as usize;
    let world_size = config.parallel.world_size() as usize;
    if !config.device.is_cpu() {
        return Err(TrainerError::Config(format!(
            "device {} with parameter servers, expected cpu (the job spec refuses \
             resources.device = \"gpu\" with parallel.comm = \"ps\")",
            config.device
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
    let runtime = &link.runtime;
    let mut client = runtime.block_on(ParameterClient::connect(
        link.client.clone(),
        &link.addresses,
        tensor_declarations(&model),
    ))?;
    let layout = Layout::new(&model, &client)?;
    let mut full_values = vec![0.0f32; parameters.element_count()];
    // The checkpoint format keeps an optimizer file; the servers hold the real state.
    let optimizer = Optimizer::new(&config.optimizer, 0);
    if rank == 0 {
        // Servers restored from the checkpoint's snapshots ignore these values.
        if let Some(path) = config.resume_path() {
            checkpoint::load_weights(&path, parameters)?;
        }
        parameters.read_values(&mut full_values)?;
        runtime.block_on(client.init(&full_values, total_steps))?;
    }

    let mut exchange = ExchangeBuffers {
        dense_gradient: vec![0.0; layout.dense_len],
        dense: vec![0.0; layout.dense_len],
        ..ExchangeBuffers::default()
    };
    let first = runtime.block_on(client.pull(&mut exchange.dense))?;
    layout.write_dense(&model, &exchange.dense)?;
    let start_step = first.next_step.min(total_steps);
    let final_version = match config.parallel.ps_mode() {
        PsMode::Sync => total_steps,
        PsMode::Async | PsMode::Ssp => total_steps * world_size as u64,
    };
    tracing::info!(
        rank,
        world_size,
        shards = link.addresses.len(),
        mode = config.parallel.ps_mode().name(),
        parameters = parameters.element_count(),
        global_batch,
        local_batch = sampler.local_batch(),
        steps_per_epoch,
        start_step,
        total_steps,
        "training through parameter servers starts"
    );

    let mut batches = Batches {
        dataset: &data.train,
        sampler: &sampler,
        order: Vec::new(),
        order_epoch: None,
    };
    let mut current = PreparedBatch::default();
    let mut next = PreparedBatch::default();
    if start_step < total_steps {
        batches.prepare(&model, start_step, &mut current)?;
        pull_rows(runtime, &mut client, &layout, &model, &current.rows)?;
    }
    // Servers average the pushes of all ranks; scaling by the world size makes that average
    // the weighted mean all-reduce data parallelism uses.
    let gradient_scale = (sampler.gradient_weight() * world_size as f64) as f32;
    let mut evaluation_batch = BatchBuffers::default();
    let mut run_timings = PhaseTimings::default();
    let mut training_time = Duration::ZERO;
    let mut final_evaluation = None;
    let mut last_evaluated_step = None;

    // Mixed precision (bf16): a working copy refreshed from the pulled f32 values computes.
    let working = working_copy(
        config,
        data,
        &model,
        &device,
        crate::precision::tensor_dtype(config.train.precision),
    )?;
    let compute_model = working.as_ref().unwrap_or(&model);
    for step in start_step..total_steps {
        let epoch = step / steps_per_epoch;
        let started = Instant::now();
        let mut timings = PhaseTimings::default();
        if let Some(working) = &working {
            working.parameters().copy_from(model.parameters())?;
        }
        let traffic_before = client.traffic();
        let images = Tensor::from_slice(
            &current.buffers.images,
            (current.len, data.train.features()),
            &device,
        )?;
        let labels = Tensor::from_slice(&current.buffers.labels, current.len, &device)?;
        let phase = lap(started, &mut timings.data);

        let logits = compute_model
            .forward(&images)?
            .to_dtype(candle_core::DType::F32)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        let local_loss = loss.to_scalar::<f32>()?;
        if !local_loss.is_finite() {
            return Err(TrainerError::Diverged {
                step: step + 1,
                loss: local_loss,
            });
        }
        let phase = lap(phase, &mut timings.forward);
        let gradients = loss.backward()?;
        read_gradients(
            compute_model,
            &layout,
            &gradients,
            gradient_scale,
            &current.rows,
            &mut exchange,
        )?;
        drop(gradients);
        let phase = lap(phase, &mut timings.backward);

        let has_next = step + 1 < total_steps;
        if has_next {
            batches.prepare(&model, step + 1, &mut next)?;
        }
        let report = {
            let ExchangeBuffers {
                dense_gradient,
                dense,
                row_gradient,
                ..
            } = &mut exchange;
            let sparse: Vec<SparseGradient<'_>> = layout
                .table
                .iter()
                .map(|&(tensor_index, _)| SparseGradient {
                    tensor_index,
                    rows: &current.rows,
                    values: row_gradient,
                })
                .collect();
            let selections: Vec<RowSelection<'_>> = layout
                .table
                .iter()
                .filter(|_| has_next)
                .map(|&(tensor_index, _)| RowSelection {
                    tensor_index,
                    rows: &next.rows,
                })
                .collect();
            runtime.block_on(client.push_pull(dense_gradient, &sparse, dense, &selections))?
        };
        layout.write_dense(&model, &exchange.dense)?;
        if has_next && let Some(values) = report.rows.first() {
            layout.write_rows(&model, &next.rows, values)?;
        }
        lap(phase, &mut timings.exposed_communication);
        std::mem::swap(&mut current, &mut next);

        let elapsed = started.elapsed();
        training_time += elapsed;
        run_timings.accumulate(&timings);
        let completed = step + 1;
        metrics.on_step(&StepMetrics {
            step: completed,
            total_steps,
            epoch,
            loss: local_loss,
            learning_rate: report.learning_rate,
            global_batch,
            samples_per_second: global_batch as f64 / elapsed.as_secs_f64().max(1e-9),
            timings,
            loss_scale: 1.0,
            skipped_steps: 0,
            gradient_bytes: client.traffic().since(&traffic_before).bytes_sent,
        });

        if rank != 0 {
            continue;
        }
        let checkpoint_due = config
            .checkpoint
            .every_steps
            .is_some_and(|every| completed % every == 0 && completed != total_steps);
        let evaluation_due = config.evaluate && completed % steps_per_epoch == 0;
        if checkpoint_due || evaluation_due {
            pull_everything(runtime, &mut client, &model, &mut full_values, 0)?;
        }
        if checkpoint_due {
            let min_version = report.versions.iter().copied().min().unwrap_or(0);
            let snapshots = runtime.block_on(client.snapshot(min_version))?;
            let path = write_checkpoint(config, completed, &model, &optimizer, snapshots)?;
            metrics.on_checkpoint(completed, &path);
        }
        if evaluation_due {
            let evaluation = evaluate_locally(
                &model,
                &data.test,
                config.evaluation_batch,
                &mut evaluation_batch,
                (completed, epoch),
            )?;
            metrics.on_evaluation(&evaluation);
            final_evaluation = Some(evaluation);
            last_evaluated_step = Some(completed);
        }
        // The model now holds everything just pulled (the next batch's rows included): the
        // next step trains on it.
    }

    let mut final_checkpoint = None;
    if rank == 0 {
        // The end state: every rank's last push applied.
        pull_everything(
            runtime,
            &mut client,
            &model,
            &mut full_values,
            final_version,
        )?;
        if config.evaluate && last_evaluated_step != Some(total_steps) {
            let epoch = total_steps.saturating_sub(1) / steps_per_epoch;
            let evaluation = evaluate_locally(
                &model,
                &data.test,
                config.evaluation_batch,
                &mut evaluation_batch,
                (total_steps, epoch),
            )?;
            metrics.on_evaluation(&evaluation);
            final_evaluation = Some(evaluation);
        }
        if config.final_checkpoint {
            let snapshots = runtime.block_on(client.snapshot(final_version))?;
            let path = write_checkpoint(config, total_steps, &model, &optimizer, snapshots)?;
            metrics.on_checkpoint(total_steps, &path);
            final_checkpoint = Some(path);
        }
    }
    let traffic = client.traffic();
    tracing::info!(
        rank,
        steps = total_steps,
        accuracy = final_evaluation
            .as_ref()
            .map(|e: &EvaluationMetrics| e.accuracy),
        training_seconds = training_time.as_secs_f64(),
        bytes_sent = traffic.bytes_sent,
        bytes_received = traffic.bytes_received,
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

/// Reads the step's gradients, scaled: dense ones into the dense vector, the table's batch
/// rows into `row_gradient`.
fn read_gradients(
    model: &Model,
    layout: &Layout,
    gradients: &candle_core::backprop::GradStore,
    scale: f32,
    rows: &[u64],
    exchange: &mut ExchangeBuffers,
) -> Result<()> {
    let parameters = model.parameters();
    for (index, range) in &layout.dense {
        parameters.read_gradient(
            *index,
            gradients,
            &mut exchange.dense_gradient[range.clone()],
            scale,
        )?;
    }
    if let Some((index, width)) = layout.table {
        let table_len = parameters.get(index)?.len();
        exchange.table_gradient.resize(table_len, 0.0);
        parameters.read_gradient(index, gradients, &mut exchange.table_gradient, scale)?;
        exchange.row_gradient.clear();
        for &row in rows {
            let start = row as usize * width;
            exchange
                .row_gradient
                .extend_from_slice(&exchange.table_gradient[start..start + width]);
        }
    }
    Ok(())
}

/// Pulls the table rows a batch touches into the model (nothing without a table).
fn pull_rows(
    runtime: &Handle,
    client: &mut ParameterClient,
    layout: &Layout,
    model: &Model,
    rows: &[u64],
) -> Result<()> {
    let Some((tensor_index, _)) = layout.table else {
        return Ok(());
    };
    let selection = [RowSelection { tensor_index, rows }];
    let pulled = runtime.block_on(client.pull_rows(&selection))?;
    layout.write_rows(model, rows, &pulled[0])
}

/// Pulls every parameter (tables whole) into the model once every shard applied
/// `min_version` updates.
fn pull_everything(
    runtime: &Handle,
    client: &mut ParameterClient,
    model: &Model,
    full_values: &mut [f32],
    min_version: u64,
) -> Result<StepReport> {
    let report = runtime.block_on(client.pull_all_at(full_values, min_version))?;
    model.parameters().write_values(full_values)?;
    Ok(report)
}

/// Writes a checkpoint of `model` at `step` holding every shard's snapshot.
fn write_checkpoint(
    config: &TrainConfig,
    step: u64,
    model: &Model,
    optimizer: &Optimizer,
    snapshots: Vec<Vec<u8>>,
) -> Result<PathBuf> {
    let files: Vec<(String, Vec<u8>)> = snapshots
        .into_iter()
        .enumerate()
        .map(|(shard, bytes)| {
            (
                checkpoint::parameter_server_snapshot_name(shard as u32),
                bytes,
            )
        })
        .collect();
    checkpoint::save_with_files(
        &config.checkpoint_directory(),
        step,
        model.parameters(),
        optimizer,
        &files,
    )
}
