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
use std::time::Instant;

use candle_core::Tensor;
use candle_nn::Module;
use cohort_collective::Progress;
use cohort_collective::progress::Channel;
use cohort_jobspec::train::PsMode;
use cohort_parameter_server::{
    ClientConfig, ParameterClient, RowSelection, ScheduleConfig, ServerConfig, SparseGradient,
    TensorDeclaration,
};
use cohort_proto::JobId;
use tokio::runtime::Handle;

use crate::checkpoint;
use crate::data::{BatchBuffers, Dataset, TrainTestSplits};
use crate::error::{Result, TrainerError};
use crate::evaluation::evaluate_locally;
use crate::metrics::{EvaluationMetrics, MetricsSink, PhaseTimings, lap};
use crate::models::Model;
use crate::optim::{LearningRateSchedule, Optimizer};
use crate::run::TrainConfig;
use crate::run::driver::Run;
use crate::run::plan::{RunPlan, TrainOutcome};
use crate::run::step::{Applied, Gradients, ParameterUpdate, Step, StepSummary};
use crate::sampler::EpochOrder;
use crate::sampler::{DataPosition, DistributedSampler};

/// What a rank needs to reach its job's parameter servers.
#[derive(Debug, Clone)]
pub struct ParameterServerLink {
    /// Runtime the client's gRPC calls run on (the training thread blocks on them).
    pub runtime: Handle,
    /// The client's identity and limits (job id, rank).
    pub client: ClientConfig,
    /// `host:port` of each shard's server, by shard id.
    pub addresses: Vec<String>,
    /// Where the client's calls are recorded (a channel of this rank's own), for hang
    /// diagnosis.
    pub progress: Progress,
}

/// Returns the configuration of shard `shard_id` of `shard_count` for a job with `config`'s
/// training sections.
pub fn server_config(
    config: &TrainConfig,
    job_id: JobId,
    shard_id: u32,
    shard_count: u32,
) -> ServerConfig {
    let mode = config.parallel.ps_mode();
    ServerConfig {
        job_id,
        shard_id,
        shard_count,
        ranks: config.parallel.world_size(),
        mode,
        staleness: match mode {
            PsMode::Ssp => config.parallel.staleness(),
            PsMode::Sync | PsMode::Async => 0,
        },
        optimizer: config.optimizer.config(),
        schedule: ScheduleConfig {
            warmup_steps: config.schedule.warmup_steps,
            decay: config.schedule.lr_decay,
        },
        limits: Default::default(),
        // The caller's: the rank runtime gives the job's token and the node's certificate.
        token: None,
        tls: None,
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

impl PreparedBatch {
    /// Gathers this rank's batch of `step` and finds its table rows.
    fn prepare(
        &mut self,
        dataset: &Dataset,
        sampler: &DistributedSampler,
        order: &mut EpochOrder,
        model: &Model,
        step: u64,
    ) -> Result<()> {
        let indices = order.rank_batch(sampler, step);
        dataset.gather(indices, &mut self.buffers.images, &mut self.buffers.labels)?;
        self.len = indices.len();
        model.touched_rows(&self.buffers.images, self.len, &mut self.rows);
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
    // The parameter server numbers ranks as its messages do (u32); the trainer indexes by them.
    let rank = link.client.rank as usize;
    let world_size = config.parallel.world_size() as usize;
    if config.early_stopping.is_some() {
        return Err(TrainerError::Config(
            "early stopping with parameter servers, expected none (the job spec refuses \
             [early_stopping] with parallel.comm = \"ps\": only rank 0 evaluates, so the ranks \
             could not agree on when to stop)"
                .into(),
        ));
    }
    if !config.device.is_cpu() {
        return Err(TrainerError::Config(format!(
            "device {} with parameter servers, expected cpu (the job spec refuses \
             resources.device = \"gpu\" with parallel.comm = \"ps\")",
            config.device
        )));
    }
    let plan = RunPlan::new(config, data, world_size, rank)?;
    let mut run = ParameterServerRun::connect(config, data, &plan, link, rank)?;
    let start_step = run.start()?;
    tracing::info!(
        rank,
        shards = link.addresses.len(),
        mode = config.parallel.ps_mode().name(),
        "training through parameter servers"
    );
    let totals = plan.drive(config, (rank, world_size), start_step, &mut run, metrics)?;
    let traffic = run.client.traffic();
    drop(run);
    tracing::info!(
        rank,
        bytes_sent = traffic.bytes_sent,
        bytes_received = traffic.bytes_received,
        "parameter-server traffic"
    );
    Ok(plan.finish(rank, totals))
}

/// One rank's part of a parameter-server run.
struct ParameterServerRun<'a> {
    config: &'a TrainConfig,
    data: &'a TrainTestSplits,
    plan: &'a RunPlan,
    rank: usize,
    runtime: &'a Handle,
    client: ParameterClient,
    /// Where the client's calls are recorded.
    channel: Channel,
    layout: Layout,
    /// The bf16 model the passes run on under mixed precision.
    working: Option<Model>,
    step: Step,
    /// The learning rate of a skipped step (the servers report the applied ones).
    schedule: LearningRateSchedule,
    exchange: ExchangeBuffers,
    /// This step's batch and the next one, gathered (and its rows pulled) a step ahead.
    current: PreparedBatch,
    next: PreparedBatch,
    order: EpochOrder,
    /// Servers average the pushes of all ranks; scaling by the world size makes that average
    /// the weighted mean all-reduce data parallelism uses.
    gradient_scale: f32,
    /// Every shard's version after the last push.
    versions: Vec<u64>,
    /// The version every shard reaches once every rank pushed its last step.
    final_version: u64,
    /// Rank 0: the whole model, pulled for checkpoints and evaluations.
    full_values: Vec<f32>,
    /// The step after which the whole model was last pulled.
    pulled_after: Option<u64>,
    /// The checkpoint format keeps an optimizer file; the servers hold the real state.
    optimizer: Optimizer,
    evaluation_batch: BatchBuffers,
}

impl<'a> ParameterServerRun<'a> {
    fn connect(
        config: &'a TrainConfig,
        data: &'a TrainTestSplits,
        plan: &'a RunPlan,
        link: &'a ParameterServerLink,
        rank: usize,
    ) -> Result<Self> {
        let model = &plan.model;
        let client = link.runtime.block_on(ParameterClient::connect(
            link.client.clone(),
            &link.addresses,
            tensor_declarations(model),
        ))?;
        let layout = Layout::new(model, &client)?;
        let world_size = config.parallel.world_size() as u64;
        let total_steps = plan.schedule.total_steps;
        Ok(Self {
            rank,
            runtime: &link.runtime,
            channel: link
                .progress
                .channel(&format!("parameter-servers/rank-{rank}"), 1),
            exchange: ExchangeBuffers {
                dense_gradient: vec![0.0; layout.dense_len],
                dense: vec![0.0; layout.dense_len],
                ..ExchangeBuffers::default()
            },
            client,
            layout,
            working: None,
            step: Step::new(rank, &config.train, None),
            schedule: config.learning_rate_schedule(total_steps),
            current: PreparedBatch::default(),
            next: PreparedBatch::default(),
            order: EpochOrder::default(),
            gradient_scale: (plan.sampler.gradient_weight() * world_size as f64) as f32,
            versions: Vec::new(),
            final_version: match config.parallel.ps_mode() {
                PsMode::Sync => total_steps,
                PsMode::Async | PsMode::Ssp => total_steps * world_size,
            },
            full_values: vec![0.0; model.parameters().element_count()],
            pulled_after: None,
            optimizer: Optimizer::new(&config.optimizer, 0)?,
            evaluation_batch: BatchBuffers::default(),
            config,
            data,
            plan,
        })
    }

    /// Initialises the servers (rank 0), pulls the parameters and the first batch's rows, and
    /// returns the step to start from, as the shard clocks say.
    fn start(&mut self) -> Result<u64> {
        let model = &self.plan.model;
        let total_steps = self.plan.schedule.total_steps;
        if self.rank == 0 {
            // Servers restored from the checkpoint's snapshots ignore these values.
            if let Some(path) = self.config.resume_path() {
                checkpoint::load_weights(&path, model.parameters())?;
            }
            model.parameters().read_values(&mut self.full_values)?;
            self.runtime
                .block_on(self.client.init(&self.full_values, total_steps))?;
        }
        let bytes = std::mem::size_of_val(self.exchange.dense.as_slice());
        let first = self.channel.run("pull", bytes, None, || {
            self.runtime
                .block_on(self.client.pull(&mut self.exchange.dense))
        })?;
        self.layout.write_dense(model, &self.exchange.dense)?;
        let start_step = first.next_step.min(total_steps);
        if start_step < total_steps {
            self.current.prepare(
                &self.data.train,
                &self.plan.sampler,
                &mut self.order,
                model,
                start_step,
            )?;
            pull_rows(
                self.runtime,
                &mut self.client,
                &self.layout,
                model,
                &self.current.rows,
            )?;
        }
        // Mixed precision (bf16): a working copy refreshed from the pulled f32 values computes.
        self.working = self.plan.working_copy(
            self.config,
            self.data,
            crate::precision::tensor_dtype(self.config.train.precision),
        )?;
        Ok(start_step)
    }

    /// Rank 0: pulls every parameter (tables whole) after step `completed`, once, at least at
    /// shard version `min_version`.
    fn pull_everything(&mut self, completed: u64, min_version: u64) -> Result<()> {
        if self.pulled_after == Some(completed) {
            return Ok(());
        }
        let bytes = std::mem::size_of_val(self.full_values.as_slice());
        let entered = self.channel.enter("pull_all", bytes, None);
        let pulled = self
            .runtime
            .block_on(self.client.pull_all_at(&mut self.full_values, min_version));
        self.channel.complete(entered, &pulled);
        pulled?;
        self.plan
            .model
            .parameters()
            .write_values(&self.full_values)?;
        if let Some(working) = &self.working {
            working
                .parameters()
                .copy_from(self.plan.model.parameters())?;
        }
        self.pulled_after = Some(completed);
        Ok(())
    }
}

impl Run for ParameterServerRun<'_> {
    fn step(&mut self, step: u64) -> Result<StepSummary> {
        let started = Instant::now();
        let mut timings = PhaseTimings::default();
        let model = &self.plan.model;
        let compute_model = self.working.as_ref().unwrap_or(model);
        let device = &self.plan.device;
        let (current, features) = (&self.current, self.data.train.features());
        let images = Tensor::from_slice(&current.buffers.images, (current.len, features), device)?;
        let labels = Tensor::from_slice(&current.buffers.labels, current.len, device)?;
        let phase = lap(started, &mut timings.data);

        let logits = compute_model
            .forward(&images)?
            .to_dtype(candle_core::DType::F32)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        let local_loss = loss.to_scalar::<f32>()?;
        let phase = lap(phase, &mut timings.forward);
        if local_loss.is_finite() {
            let gradients = loss.backward()?;
            read_gradients(
                compute_model,
                &self.layout,
                &gradients,
                self.gradient_scale,
                &current.rows,
                &mut self.exchange,
            )?;
        }
        let has_next = step + 1 < self.plan.schedule.total_steps;
        if has_next {
            self.next.prepare(
                &self.data.train,
                &self.plan.sampler,
                &mut self.order,
                model,
                step + 1,
            )?;
        }
        lap(phase, &mut timings.backward);
        let ExchangeBuffers {
            dense_gradient,
            dense,
            row_gradient,
            ..
        } = &mut self.exchange;
        let mut update = RemoteUpdate {
            runtime: self.runtime,
            client: &mut self.client,
            channel: &self.channel,
            layout: &self.layout,
            model,
            working: self.working.as_ref(),
            schedule: &self.schedule,
            rows: &self.current.rows,
            row_gradient,
            dense,
            next_rows: has_next.then_some(self.next.rows.as_slice()),
            versions: &mut self.versions,
        };
        let gradients = Gradients {
            loss: local_loss,
            overflow: false,
            values: dense_gradient,
            exchanged_bytes: 0,
        };
        let report = self.step.finish(step, gradients, &mut update, timings)?;
        std::mem::swap(&mut self.current, &mut self.next);
        Ok(report)
    }

    fn evaluate(&mut self, completed: u64, epoch: u64) -> Result<Option<EvaluationMetrics>> {
        if self.rank != 0 {
            return Ok(None);
        }
        self.pull_everything(completed, 0)?;
        let evaluation = evaluate_locally(
            &self.plan.model,
            &self.data.test,
            self.config.evaluation_batch,
            &mut self.evaluation_batch,
            (completed, epoch),
        )?;
        Ok(Some(evaluation))
    }

    fn checkpoint(
        &mut self,
        completed: u64,
        evaluation: Option<&EvaluationMetrics>,
    ) -> Result<Option<PathBuf>> {
        if self.rank != 0 {
            return Ok(None);
        }
        let version = if completed == self.plan.schedule.total_steps {
            self.final_version
        } else {
            self.versions.iter().copied().min().unwrap_or(0)
        };
        self.pull_everything(completed, 0)?;
        let snapshots = self.runtime.block_on(self.client.snapshot(version))?;
        let path = write_checkpoint(
            self.config,
            completed,
            self.plan.sampler.position(completed),
            &self.plan.model,
            &self.optimizer,
            snapshots,
            evaluation,
        )?;
        Ok(Some(path))
    }

    fn finish_steps(&mut self) -> Result<()> {
        if self.rank == 0 {
            // The end state: every rank's last push applied.
            self.pulled_after = None;
            self.pull_everything(self.plan.schedule.total_steps, self.final_version)?;
        }
        Ok(())
    }
}

/// The parameter servers as the step's update: push the gradients, pull the fresh parameters
/// (and the next batch's table rows) in one round trip per shard.
struct RemoteUpdate<'r> {
    runtime: &'r Handle,
    client: &'r mut ParameterClient,
    channel: &'r Channel,
    layout: &'r Layout,
    /// The f32 parameters the pulls land in.
    model: &'r Model,
    /// The bf16 working copy, refreshed from them.
    working: Option<&'r Model>,
    schedule: &'r LearningRateSchedule,
    /// This step's table rows and their gradient.
    rows: &'r [u64],
    row_gradient: &'r [f32],
    /// The fresh dense parameters.
    dense: &'r mut [f32],
    /// The next batch's table rows, to pull with the push.
    next_rows: Option<&'r [u64]>,
    /// Every shard's version after the push.
    versions: &'r mut Vec<u64>,
}

impl ParameterUpdate for RemoteUpdate<'_> {
    fn learning_rate(&self, step: u64) -> f64 {
        self.schedule.learning_rate(step)
    }

    fn apply(&mut self, _step: u64, gradients: &[f32]) -> Result<Applied> {
        let started = Instant::now();
        let traffic_before = self.client.traffic();
        let table = self.layout.table.map(|(tensor_index, _)| tensor_index);
        let sparse: Vec<SparseGradient<'_>> = table
            .iter()
            .map(|&tensor_index| SparseGradient {
                tensor_index,
                rows: self.rows,
                values: self.row_gradient,
            })
            .collect();
        let selections: Vec<RowSelection<'_>> = table
            .iter()
            .zip(self.next_rows)
            .map(|(&tensor_index, rows)| RowSelection { tensor_index, rows })
            .collect();
        let bytes = std::mem::size_of_val(gradients);
        let report = self.channel.run("push_pull", bytes, None, || {
            self.runtime.block_on(self.client.push_pull(
                gradients,
                &sparse,
                self.dense,
                &selections,
            ))
        })?;
        self.layout.write_dense(self.model, self.dense)?;
        if let Some(rows) = self.next_rows
            && let Some(values) = report.rows.first()
        {
            self.layout.write_rows(self.model, rows, values)?;
        }
        let communication = started.elapsed();
        // The model now holds everything just pulled (the next batch's rows included): the next
        // step trains on it.
        if let Some(working) = self.working {
            working.parameters().copy_from(self.model.parameters())?;
        }
        *self.versions = report.versions;
        Ok(Applied {
            learning_rate: report.learning_rate,
            sent_bytes: self.client.traffic().since(&traffic_before).bytes_sent,
            communication,
        })
    }
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

/// Writes a checkpoint of `model` (and the placeholder `optimizer`) at `step` holding every
/// shard's snapshot and `evaluation`, the evaluation at that step if one ran.
fn write_checkpoint(
    config: &TrainConfig,
    step: u64,
    position: DataPosition,
    model: &Model,
    optimizer: &Optimizer,
    snapshots: Vec<Vec<u8>>,
    evaluation: Option<&EvaluationMetrics>,
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
        .chain(evaluation.map(checkpoint::evaluation_file))
        .collect();
    checkpoint::save_with_files(
        &config.checkpoint_directory(),
        step,
        position,
        model.parameters(),
        optimizer,
        &files,
        config.stop_in_checkpoint == Some(step),
    )
}
