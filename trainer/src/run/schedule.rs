//! [`RunSchedule`]: when a run takes its steps, evaluates, writes checkpoints and ends. Pure
//! decisions, shared by every training loop and tested here; [`super::driver`] acts on them.
//!
//! `schedule.stop_after_steps` (or `stop_after_epochs`) ends a run early without changing its
//! schedule: the learning rate, the epochs and the total steps stay those of the whole run, so a
//! later run resuming from the checkpoint of the stop continues as if there had been no stop.

use cohort_jobspec::train::ScheduleSpec;

use crate::run::config::TrainConfig;

/// When a run evaluates, besides once at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Evaluations {
    /// Never (benchmarks).
    Never,
    /// After the last step of every epoch, and every `schedule.eval_every_steps` steps if set
    /// (the image models).
    EveryEpoch,
    /// Before the first step, then every `every` steps if set (the language model, which
    /// reports its validation loss before training).
    FirstThenEvery(Option<u64>),
}

/// The schedule of one run: its steps, and which of them end with an evaluation or a
/// checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunSchedule {
    /// Optimizer steps of one epoch (at least 1).
    pub(crate) steps_per_epoch: u64,
    /// Optimizer steps of the whole run: the epochs, capped by `max_steps`.
    pub(crate) total_steps: u64,
    /// Writes a checkpoint after every this many steps (not after the last).
    checkpoint_every: Option<u64>,
    /// Writes a checkpoint after the last step.
    final_checkpoint: bool,
    /// When evaluations run.
    evaluations: Evaluations,
    /// `schedule.eval_every_steps`, which [`Evaluations::EveryEpoch`] honours too.
    eval_every_steps: Option<u64>,
    /// Ends the run after this step, short of `total_steps` (`schedule.stop_after_*`).
    stop_after: Option<u64>,
    /// Also evaluates at every checkpoint step, so that every checkpoint records an evaluation
    /// (to rank the best ones, or for early stopping).
    evaluate_checkpoints: bool,
}

impl RunSchedule {
    /// The schedule of `schedule`'s epochs of `steps_per_epoch` steps each.
    pub(crate) fn new(
        schedule: &ScheduleSpec,
        steps_per_epoch: u64,
        checkpoint_every: Option<u64>,
        final_checkpoint: bool,
        evaluations: Evaluations,
    ) -> Self {
        let planned = steps_per_epoch * u64::from(schedule.epochs);
        let total_steps = schedule.max_steps.map_or(planned, |max| max.min(planned));
        let steps_per_epoch = steps_per_epoch.max(1);
        Self {
            steps_per_epoch,
            total_steps,
            checkpoint_every,
            final_checkpoint,
            evaluations,
            eval_every_steps: schedule.eval_every_steps.filter(|&every| every > 0),
            stop_after: schedule
                .stop_step(steps_per_epoch, total_steps)
                .filter(|&step| step < total_steps),
            evaluate_checkpoints: false,
        }
    }

    /// This schedule, evaluating at every checkpoint step too when `evaluate` (if it evaluates
    /// at all).
    pub(crate) fn evaluating_checkpoints(mut self, evaluate: bool) -> Self {
        self.evaluate_checkpoints = evaluate;
        self
    }

    /// The schedule `config` gives epochs of `steps_per_epoch` steps, evaluating as
    /// `evaluations` says when `config.evaluate` is set.
    pub(crate) fn of(config: &TrainConfig, steps_per_epoch: u64, evaluations: Evaluations) -> Self {
        Self::new(
            &config.schedule,
            steps_per_epoch,
            config.checkpoint.every_steps,
            config.final_checkpoint,
            if config.evaluate {
                evaluations
            } else {
                Evaluations::Never
            },
        )
        .evaluating_checkpoints(
            config.checkpoint.keep_best.is_some() || config.early_stopping.is_some(),
        )
    }

    /// The step this run ends after, when it starts at `start_step`: the stop step of
    /// `schedule.stop_after_*` (at once, if the run starts past it), else the last step.
    pub(crate) fn end_step(&self, start_step: u64) -> u64 {
        match self.stop_after {
            Some(stop) => stop.max(start_step).min(self.total_steps),
            None => self.total_steps,
        }
    }

    /// The epoch (0-based) step `step` (0-based) belongs to.
    pub(crate) fn epoch_of_step(&self, step: u64) -> u64 {
        step / self.steps_per_epoch
    }

    /// The epoch an evaluation after `completed` steps reports: the one its last step belongs
    /// to (epoch 0 before any step).
    pub(crate) fn epoch_after(&self, completed: u64) -> u64 {
        self.epoch_of_step(completed.saturating_sub(1))
    }

    /// Whether the run evaluates before its first step.
    pub(crate) fn evaluates_first(&self) -> bool {
        matches!(self.evaluations, Evaluations::FirstThenEvery(_))
    }

    /// Whether the run evaluates at all (then always at the end).
    pub(crate) fn evaluates(&self) -> bool {
        self.evaluations != Evaluations::Never
    }

    /// Whether a checkpoint follows step `completed` (counted from 1) inside the run; the last
    /// step's checkpoint is [`Self::final_checkpoint`]'s.
    pub(crate) fn checkpoint_due(&self, completed: u64) -> bool {
        self.checkpoint_every
            .is_some_and(|every| completed.is_multiple_of(every) && completed != self.total_steps)
    }

    /// Whether an evaluation follows step `completed` (counted from 1): at the schedule's
    /// evaluation steps, at the step `stop_after_*` ends the run at, and at the checkpoint
    /// steps when it evaluates checkpoints.
    pub(crate) fn evaluation_due(&self, completed: u64) -> bool {
        let scheduled = match self.evaluations {
            Evaluations::Never | Evaluations::FirstThenEvery(None) => false,
            Evaluations::EveryEpoch => {
                completed.is_multiple_of(self.steps_per_epoch)
                    || self
                        .eval_every_steps
                        .is_some_and(|every| completed.is_multiple_of(every))
            }
            Evaluations::FirstThenEvery(Some(every)) => completed.is_multiple_of(every),
        };
        scheduled
            || (self.evaluates() && self.stop_after == Some(completed))
            || (self.evaluates_checkpoints() && self.checkpoint_due(completed))
    }

    /// Whether every checkpoint records an evaluation: one runs at every checkpoint step that
    /// has none.
    pub(crate) fn evaluates_checkpoints(&self) -> bool {
        self.evaluate_checkpoints && self.evaluates()
    }

    /// Whether the run ends with an evaluation, given the step of the last one: not when that
    /// one already saw the final parameters.
    pub(crate) fn final_evaluation_due(&self, last_evaluated: Option<u64>) -> bool {
        self.evaluates() && last_evaluated != Some(self.total_steps)
    }

    /// Whether the run ends with a checkpoint.
    pub(crate) fn final_checkpoint(&self) -> bool {
        self.final_checkpoint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(epochs: u32, max_steps: Option<u64>) -> ScheduleSpec {
        ScheduleSpec {
            epochs,
            max_steps,
            ..ScheduleSpec::default()
        }
    }

    #[test]
    fn the_run_lasts_its_epochs_capped_by_max_steps() {
        let run = RunSchedule::new(&schedule(3, None), 10, None, true, Evaluations::Never);
        assert_eq!(run.total_steps, 30);
        assert_eq!(run.epoch_of_step(9), 0);
        assert_eq!(run.epoch_of_step(10), 1);
        assert_eq!(run.epoch_after(10), 0);
        assert_eq!(run.epoch_after(0), 0);
        let capped = RunSchedule::new(&schedule(3, Some(12)), 10, None, true, Evaluations::Never);
        assert_eq!(capped.total_steps, 12);
        let uncapped = RunSchedule::new(&schedule(1, Some(99)), 10, None, true, Evaluations::Never);
        assert_eq!(uncapped.total_steps, 10);
    }

    #[test]
    fn periodic_checkpoints_leave_the_last_step_to_the_final_one() {
        let run = RunSchedule::new(&schedule(2, None), 10, Some(5), false, Evaluations::Never);
        let due: Vec<u64> = (1..=20).filter(|&s| run.checkpoint_due(s)).collect();
        assert_eq!(due, vec![5, 10, 15]);
        assert!(!run.final_checkpoint());
        let none = RunSchedule::new(&schedule(2, None), 10, None, true, Evaluations::Never);
        assert!((1..=20).all(|s| !none.checkpoint_due(s)));
        assert!(none.final_checkpoint());
    }

    #[test]
    fn image_models_evaluate_every_epoch_and_once_at_a_ragged_end() {
        let run = RunSchedule::new(
            &schedule(3, Some(25)),
            10,
            None,
            true,
            Evaluations::EveryEpoch,
        );
        let due: Vec<u64> = (1..=25).filter(|&s| run.evaluation_due(s)).collect();
        assert_eq!(due, vec![10, 20]);
        assert!(!run.evaluates_first());
        assert!(run.final_evaluation_due(Some(20)));
        let whole = RunSchedule::new(&schedule(2, None), 10, None, true, Evaluations::EveryEpoch);
        assert!(!whole.final_evaluation_due(Some(20)));
        // A run resumed at its end still reports where it stands.
        assert!(whole.final_evaluation_due(None));
        // `eval_every_steps` adds evaluations between the epochs' ends.
        let spec = ScheduleSpec {
            eval_every_steps: Some(4),
            ..schedule(2, None)
        };
        let often = RunSchedule::new(&spec, 10, None, true, Evaluations::EveryEpoch);
        let due: Vec<u64> = (1..=20).filter(|&s| often.evaluation_due(s)).collect();
        assert_eq!(due, vec![4, 8, 10, 12, 16, 20]);
    }

    #[test]
    fn the_language_model_evaluates_first_then_periodically() {
        let every = Evaluations::FirstThenEvery(Some(4));
        let run = RunSchedule::new(&schedule(1, None), 10, None, true, every);
        assert!(run.evaluates_first());
        let due: Vec<u64> = (1..=10).filter(|&s| run.evaluation_due(s)).collect();
        assert_eq!(due, vec![4, 8]);
        assert!(run.final_evaluation_due(Some(8)));
        let only_ends = RunSchedule::new(
            &schedule(1, None),
            10,
            None,
            true,
            Evaluations::FirstThenEvery(None),
        );
        assert!((1..=10).all(|s| !only_ends.evaluation_due(s)));
        // Nothing to train: the evaluation before the first step is also the last.
        assert!(!only_ends.final_evaluation_due(Some(10)));
    }

    #[test]
    fn stop_after_ends_the_run_early_without_changing_its_schedule() {
        let spec = ScheduleSpec {
            stop_after_epochs: Some(1.5),
            ..schedule(3, None)
        };
        let run = RunSchedule::new(&spec, 10, Some(4), true, Evaluations::EveryEpoch);
        assert_eq!(run.total_steps, 30);
        assert_eq!(run.end_step(0), 15);
        assert_eq!(run.end_step(12), 15);
        // A run resumed at or past the stop ends where it starts.
        assert_eq!(run.end_step(20), 20);
        assert_eq!(run.end_step(30), 30);
        // The checkpoint interval and evaluations keep their places; the stop is evaluated.
        assert!(run.checkpoint_due(12) && run.checkpoint_due(16));
        let due: Vec<u64> = (1..=30).filter(|&s| run.evaluation_due(s)).collect();
        assert_eq!(due, vec![10, 15, 20, 30]);
        let at_the_end = RunSchedule::new(
            &ScheduleSpec {
                stop_after_steps: Some(30),
                ..schedule(3, None)
            },
            10,
            None,
            true,
            Evaluations::EveryEpoch,
        );
        assert_eq!(at_the_end.end_step(0), 30);
        assert_eq!(
            at_the_end.stop_after, None,
            "stopping at the end is no stop"
        );
    }

    #[test]
    fn checkpoints_are_evaluated_when_asked() {
        let run = RunSchedule::new(
            &schedule(2, None),
            10,
            Some(4),
            true,
            Evaluations::EveryEpoch,
        )
        .evaluating_checkpoints(true);
        let due: Vec<u64> = (1..=20).filter(|&s| run.evaluation_due(s)).collect();
        assert_eq!(due, vec![4, 8, 10, 12, 16, 20]);
        let never = RunSchedule::new(&schedule(2, None), 10, Some(4), true, Evaluations::Never)
            .evaluating_checkpoints(true);
        assert!(!never.evaluates_checkpoints());
        assert!((1..=20).all(|s| !never.evaluation_due(s)));
    }

    #[test]
    fn without_evaluations_nothing_is_due() {
        let run = RunSchedule::new(&schedule(2, None), 10, None, true, Evaluations::Never);
        assert!(!run.evaluates() && !run.evaluates_first());
        assert!((1..=20).all(|s| !run.evaluation_due(s)));
        assert!(!run.final_evaluation_due(None));
    }
}
