//! [`RunPlan`] and [`TrainOutcome`]: what a run of the image models (data-parallel or through parameter servers)
//! derives from its config before the first step, and the working copy of a model.

use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Device};

use crate::data::TrainTestSplits;
use crate::error::Result;
use crate::metrics::{EarlyStop, EvaluationMetrics, MetricsSink, PhaseTimings};
use crate::models::Model;
use crate::run::config::TrainConfig;
use crate::run::driver::{Run, RunPolicy, RunTotals, drive};
use crate::run::schedule::{Evaluations, RunSchedule};
use crate::sampler::DistributedSampler;

/// What a finished run leaves behind.
#[derive(Debug)]
pub struct TrainOutcome {
    /// The trained model (identical on every rank).
    pub model: Model,
    /// Optimizer steps completed, including those before a resume: the step the run ended at.
    pub steps: u64,
    /// The last evaluation, if evaluation is enabled.
    pub final_evaluation: Option<EvaluationMetrics>,
    /// The checkpoint of the step the run ended at, on rank 0 (the rank that writes
    /// checkpoints) when one was written.
    pub checkpoint: Option<PathBuf>,
    /// Time per phase summed over this run's steps.
    pub timings: PhaseTimings,
    /// Wall time of the steps of this run (excluding start-up and evaluation).
    pub training_time: Duration,
    /// The step after which the run stopped on request ([`TrainConfig::stop`]), its checkpoint
    /// being `checkpoint`; `None` when it ran to the end.
    pub stopped_at: Option<u64>,
    /// The step after which the run ended because `schedule.stop_after_steps` or
    /// `stop_after_epochs` said so, short of its last step, its checkpoint being `checkpoint`
    /// (a run resuming from it continues the same schedule); `None` otherwise.
    pub scheduled_stop: Option<u64>,
    /// Why and where early stopping ended the run (`[early_stopping]`), its checkpoint being
    /// `checkpoint`; `None` otherwise.
    pub early_stop: Option<EarlyStop>,
    /// With early stopping, the checkpoint of this run's best evaluation, on rank 0.
    pub best_checkpoint: Option<PathBuf>,
}

/// What an image-model run derives from its config before the first step.
pub(crate) struct RunPlan {
    /// Where the passes run: batches and any working copy of the model live there.
    pub(crate) device: Device,
    /// Examples per optimizer step over all ranks.
    pub(crate) global_batch: usize,
    /// This rank's examples of every step.
    pub(crate) sampler: DistributedSampler,
    /// Steps, evaluations (after every epoch) and checkpoints.
    pub(crate) schedule: RunSchedule,
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
        let schedule = RunSchedule::of(
            config,
            sampler.steps_per_epoch() as u64,
            Evaluations::EveryEpoch,
        );
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
            schedule,
            model,
        })
    }

    /// Drives `run` as rank `rank` of `world_size`, from `start_step` to the end of
    /// the plan's schedule, reporting to `metrics`.
    pub(crate) fn drive(
        &self,
        config: &TrainConfig,
        (rank, world_size): (usize, usize),
        start_step: u64,
        run: &mut dyn Run,
        metrics: &mut dyn MetricsSink,
    ) -> Result<RunTotals> {
        tracing::info!(
            rank,
            world_size,
            device = %config.device,
            parameters = self.model.parameters().element_count(),
            global_batch = self.global_batch,
            local_batch = self.sampler.local_batch(),
            steps_per_epoch = self.schedule.steps_per_epoch,
            start_step,
            total_steps = self.schedule.total_steps,
            "training starts"
        );
        drive(
            &self.schedule,
            &RunPolicy::of(config),
            start_step,
            self.global_batch,
            run,
            metrics,
        )
    }

    /// Ends the run of rank `rank` with what [`crate::run::driver::drive`] observed.
    pub(crate) fn finish(self, rank: usize, totals: RunTotals) -> TrainOutcome {
        tracing::info!(
            rank,
            steps = totals.ended_early_at().unwrap_or(self.schedule.total_steps),
            accuracy = totals.final_evaluation.as_ref().map(|e| e.accuracy),
            training_seconds = totals.training_time.as_secs_f64(),
            "training finished"
        );
        TrainOutcome {
            steps: totals.ended_early_at().unwrap_or(self.schedule.total_steps),
            stopped_at: totals.stopped_at,
            scheduled_stop: totals.scheduled_stop,
            early_stop: totals.early_stop,
            best_checkpoint: totals.best_checkpoint,
            model: self.model,
            final_evaluation: totals.final_evaluation,
            checkpoint: totals.final_checkpoint,
            timings: totals.timings,
            training_time: totals.training_time,
        }
    }

    /// Returns the model the passes run on when it cannot be the masters themselves: a copy on
    /// this plan's device in `dtype`, holding the masters' values, or `None` when the masters
    /// already live there in that format. [`crate::run::step::LocalUpdate`] refreshes it after
    /// every update. One mechanism serves mixed precision (another format) and GPU ranks
    /// (another device).
    pub(crate) fn working_copy(
        &self,
        config: &TrainConfig,
        data: &TrainTestSplits,
        dtype: DType,
    ) -> Result<Option<Model>> {
        let parameters = self.model.parameters();
        if parameters.device().same_device(&self.device) && parameters.dtype() == dtype {
            return Ok(None);
        }
        let working = Model::with_dtype(
            &config.model,
            data.train.image_shape(),
            data.train.classes(),
            &self.device,
            dtype,
        )?;
        working.parameters().copy_from(parameters)?;
        Ok(Some(working))
    }
}
