//! [`TrainConfig`]: everything a run is configured with, the job spec's training sections plus
//! what the rank's launcher decides.

use std::path::PathBuf;

use cohort_jobspec::JobSpec;
use cohort_jobspec::early_stopping::EarlyStoppingSpec;
use cohort_jobspec::objective::Objective;
use cohort_jobspec::precision::TrainSpec;
use cohort_jobspec::train::{
    CheckpointSpec, DataSpec, ModelSpec, OptimizerSpec, ParallelSpec, ScheduleSpec,
};
use cohort_numerics::LearningRateSchedule;

use crate::device::ComputeDevice;

/// Examples per forward pass during evaluation, unless configured otherwise.
pub const DEFAULT_EVALUATION_BATCH: usize = 1000;

/// Everything a training run is configured with: the job spec's training sections plus what
/// the rank's launcher decides.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// `[model]`.
    pub model: ModelSpec,
    /// `[data]` (the data itself is passed to [`crate::train`] separately; the seed is used here).
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
    /// `[early_stopping]`: the run ends once its evaluations stop improving. Default `None`.
    pub early_stopping: Option<EarlyStoppingSpec>,
    /// What "best" means for the checkpoints `checkpoint.keep_best` keeps
    /// ([`JobSpec::objective`]). Default: the highest evaluation accuracy.
    pub objective: Objective,
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
    /// Where this rank records the examples it trains on at every step (see
    /// [`crate::sampler::SampleRecord`]); set by the rank's launcher when the spec's
    /// `data.record_samples` asks. Default `None`.
    pub sample_record: Option<PathBuf>,
    /// Fault injection for tests: the rank that writes the checkpoint of this step stops itself
    /// (`SIGSTOP`) once its files are written and before they are committed, so that a test can
    /// kill it in the middle of a checkpoint write. Set by the launcher from
    /// `COHORT_FAULT_STOP_IN_CHECKPOINT`. Default `None`.
    pub stop_in_checkpoint: Option<u64>,
    /// Fault injection for tests: the rank computes each step for longer, as a slow node
    /// would (it sleeps after its backward pass). Set by the launcher from
    /// `COHORT_FAULT_SLOW_RANK` for the rank it names; only the data-parallel loop honours it.
    /// Default `None`.
    pub slow_down: Option<SlowDown>,
    /// Checkpoint on request: once raised, the run stops after the next step every rank agrees
    /// on, writes a checkpoint and ends early. Only the data-parallel loop honours it. Default
    /// `None`: the run cannot be stopped that way (and pays nothing for it).
    pub stop: Option<crate::run::StopSignal>,
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
            early_stopping: spec.early_stopping.clone(),
            objective: spec.objective(),
            output_directory: output_directory.into(),
            evaluation_batch: DEFAULT_EVALUATION_BATCH,
            evaluate: true,
            final_checkpoint: true,
            overlap_communication: true,
            inject_overflow: None,
            sample_record: None,
            stop_in_checkpoint: None,
            slow_down: None,
            stop: None,
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

    /// The learning rate of every update of a run of `total_steps` optimizer steps: the
    /// optimizer's rate, warmed up and decayed as the schedule section says.
    pub fn learning_rate_schedule(&self, total_steps: u64) -> LearningRateSchedule {
        LearningRateSchedule::new(
            self.optimizer.learning_rate(),
            self.schedule.warmup_steps,
            self.schedule.lr_decay,
            total_steps,
        )
    }
}

/// How much longer an injected slow rank computes each step ([`TrainConfig::slow_down`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SlowDown {
    /// This share of the step's data, forward and backward time more (0.5: half as long again).
    Share(f64),
    /// This long more.
    Fixed(std::time::Duration),
}

impl SlowDown {
    /// Reads `RANK:SHARE` (`1:0.5`) or `RANK:MSms` (`1:40ms`) as the slow-down of rank `rank`
    /// (`None` when it names another rank).
    pub fn parse(text: &str, rank: usize) -> std::result::Result<Option<SlowDown>, String> {
        let expected = || {
            format!(
                "{text:?}, expected RANK:SHARE (a share from 0 to 100 of the step's compute) or \
                 RANK:MSms (milliseconds, at most 60000)"
            )
        };
        let (target, amount) = text.trim().split_once(':').ok_or_else(expected)?;
        let target: usize = target.parse().map_err(|_| expected())?;
        let slow_down = match amount.strip_suffix("ms") {
            Some(millis) => {
                let millis: u64 = millis.parse().map_err(|_| expected())?;
                if millis > 60_000 {
                    return Err(expected());
                }
                SlowDown::Fixed(std::time::Duration::from_millis(millis))
            }
            None => {
                let share: f64 = amount.parse().map_err(|_| expected())?;
                if !(share.is_finite() && (0.0..=100.0).contains(&share)) {
                    return Err(expected());
                }
                SlowDown::Share(share)
            }
        };
        Ok((target == rank).then_some(slow_down))
    }

    /// The extra time of a step whose data, forward and backward passes took `compute`.
    pub fn extra(self, compute: std::time::Duration) -> std::time::Duration {
        match self {
            SlowDown::Share(share) => compute.mul_f64(share),
            SlowDown::Fixed(extra) => extra,
        }
    }
}

#[cfg(test)]
mod slow_down_tests {
    use std::time::Duration;

    use super::SlowDown;

    #[test]
    fn slow_downs_are_a_share_or_milliseconds_for_one_rank() {
        assert_eq!(SlowDown::parse("1:0.5", 1), Ok(Some(SlowDown::Share(0.5))));
        assert_eq!(
            SlowDown::parse("1:40ms", 1),
            Ok(Some(SlowDown::Fixed(Duration::from_millis(40))))
        );
        assert_eq!(SlowDown::parse("1:40ms", 0), Ok(None));
        for bad in ["", "1", "x:1", "1:-1", "1:NaN", "1:fast", "1:70000ms"] {
            assert!(SlowDown::parse(bad, 1).is_err(), "{bad}");
        }
        let step = Duration::from_millis(10);
        assert_eq!(SlowDown::Share(0.5).extra(step), Duration::from_millis(5));
        assert_eq!(
            SlowDown::Fixed(Duration::from_millis(3)).extra(step),
            Duration::from_millis(3)
        );
    }
}
