//! The loop driver: [`drive`] owns the schedule of a run (its steps, evaluations, checkpoints,
//! progress reporting, timing, and how it ends) and asks a [`Run`] to do the loop-specific work.
//! Every training loop is a [`Run`] driven here, so what happens between steps is written once.
//!
//! After every step, in this order:
//! 1. its metrics are reported;
//! 2. an evaluation runs if one is due (the schedule's, or a checkpoint step's when every
//!    checkpoint is evaluated: with `checkpoint.keep_best` or early stopping), and early stopping
//!    judges it ([`crate::run::early_stopping`]);
//! 3. a checkpoint is written if one is due or if that evaluation is the best so far (early
//!    stopping's best checkpoint), recording the evaluation of its step; the writing rank then
//!    prunes the checkpoint directory ([`crate::run::retention`]);
//! 4. the run ends, with a checkpoint of the step, if early stopping says so, if the ranks agreed
//!    to stop on request ([`crate::run::stop`]), or at the step of `schedule.stop_after_*`
//!    (after an evaluation there).
//!
//! A run that reaches its last step ends with a final evaluation and checkpoint.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cohort_jobspec::early_stopping::EarlyStoppingSpec;

use crate::checkpoint;
use crate::error::Result;
use crate::metrics::{
    CheckpointWritten, EarlyStop, EvaluationMetrics, MetricsSink, PhaseTimings, StepMetrics,
};
use crate::run::config::TrainConfig;
use crate::run::early_stopping::{EarlyStopping, Verdict};
use crate::run::retention::{self, RetentionPolicy};
use crate::run::schedule::RunSchedule;
use crate::run::step::StepSummary;

/// The loop-specific half of a run.
pub(crate) trait Run {
    /// Trains step `step` (0-based), producing its gradients and finishing it through
    /// [`crate::run::step::Step::finish`].
    fn step(&mut self, step: u64) -> Result<StepSummary>;

    /// Evaluates after `completed` steps, reporting `epoch`. `Ok(None)` on ranks that take no
    /// part in evaluations.
    fn evaluate(&mut self, completed: u64, epoch: u64) -> Result<Option<EvaluationMetrics>>;

    /// Writes a checkpoint after `completed` steps that records `evaluation`, the evaluation
    /// at that step if one ran (written with the checkpoint's files, before it is committed).
    /// `Ok(None)` on ranks that do not write it.
    fn checkpoint(
        &mut self,
        completed: u64,
        evaluation: Option<&EvaluationMetrics>,
    ) -> Result<Option<PathBuf>>;

    /// Called once after the last step, before the final evaluation and checkpoint (not when
    /// the run ends before its last step).
    fn finish_steps(&mut self) -> Result<()> {
        Ok(())
    }

    /// Whether the ranks agreed, during the step just taken, to stop after it (some rank was
    /// asked to: see [`crate::run::stop`]); every rank answers the same. Runs that cannot agree
    /// never stop early.
    fn stop_agreed(&mut self) -> Result<bool> {
        Ok(false)
    }
}

/// What the driver does besides following the schedule: ending a run whose evaluations
/// stopped improving, and pruning its checkpoints.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunPolicy {
    /// Early stopping, when on.
    pub(crate) early_stopping: Option<EarlyStoppingSpec>,
    /// Which checkpoints the writing rank deletes after writing one.
    pub(crate) retention: RetentionPolicy,
}

impl RunPolicy {
    /// The policy `config` asks for.
    pub(crate) fn of(config: &TrainConfig) -> Self {
        Self {
            early_stopping: config.early_stopping.clone(),
            retention: RetentionPolicy {
                keep_last: config.checkpoint.keep_last,
                keep_best: config.checkpoint.keep_best,
                objective: config.objective,
                keep_the_best: config.early_stopping.is_some(),
            },
        }
    }
}

/// What [`drive`] observed of a run.
#[derive(Debug, Default)]
pub(crate) struct RunTotals {
    /// The evaluation before the first step, when the schedule has one.
    pub(crate) initial_evaluation: Option<EvaluationMetrics>,
    /// The last evaluation this rank took part in.
    pub(crate) final_evaluation: Option<EvaluationMetrics>,
    /// The checkpoint of the step the run ended at, on the rank that wrote it.
    pub(crate) final_checkpoint: Option<PathBuf>,
    /// Time per phase summed over the steps.
    pub(crate) timings: PhaseTimings,
    /// Wall time of the steps (excluding start-up, evaluations and checkpoints).
    pub(crate) training_time: Duration,
    /// Steps this run took (after a resume, fewer than the schedule's).
    pub(crate) steps_run: u64,
    /// The step after which the run stopped on request (its checkpoint is `final_checkpoint`
    /// on the rank that wrote it); `None` when it ran to the end.
    pub(crate) stopped_at: Option<u64>,
    /// The step after which the run ended as `schedule.stop_after_*` asks (its checkpoint is
    /// `final_checkpoint`); `None` otherwise.
    pub(crate) scheduled_stop: Option<u64>,
    /// Why and where early stopping ended the run; `None` otherwise.
    pub(crate) early_stop: Option<EarlyStop>,
    /// With early stopping, the checkpoint of the best evaluation, on the rank that wrote it.
    pub(crate) best_checkpoint: Option<PathBuf>,
}

impl RunTotals {
    /// The step the run ended at, when it ended before its last step.
    pub(crate) fn ended_early_at(&self) -> Option<u64> {
        self.stopped_at
            .or(self.scheduled_stop)
            .or(self.early_stop.as_ref().map(|stop| stop.step))
    }
}

/// Runs `run` from step `start_step` to the end of `schedule` (or the step its
/// `stop_after_*` names), reporting to `metrics` every step (with `global_batch` examples),
/// evaluation, checkpoint, deletion and early stop, and applying `policy`. The run also ends
/// after a step where early stopping says so, or where the ranks agree to stop
/// ([`Run::stop_agreed`]), after a checkpoint of that step.
pub(crate) fn drive(
    schedule: &RunSchedule,
    policy: &RunPolicy,
    start_step: u64,
    global_batch: usize,
    run: &mut dyn Run,
    metrics: &mut dyn MetricsSink,
) -> Result<RunTotals> {
    let mut driver = Driver {
        schedule,
        policy,
        run,
        metrics,
        early_stopping: policy.early_stopping.as_ref().map(EarlyStopping::new),
        totals: RunTotals::default(),
        last_evaluated: None,
        last_checkpoint: None,
    };
    if schedule.evaluates_first() {
        driver.totals.initial_evaluation = driver.evaluate(start_step)?;
    }
    let end = schedule.end_step(start_step);
    for step in start_step..end {
        driver.train(step, global_batch)?;
        if driver.between_steps(step + 1, end)? == Flow::End {
            return Ok(driver.totals);
        }
    }
    if end < schedule.total_steps {
        driver.stop_at_schedule(end)?;
    } else {
        driver.run.finish_steps()?;
        driver.finish(end)?;
    }
    Ok(driver.totals)
}

/// Whether a run goes on after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    End,
}

/// One run being driven: what [`drive`] acts on and what it remembers between steps.
struct Driver<'a> {
    schedule: &'a RunSchedule,
    policy: &'a RunPolicy,
    run: &'a mut dyn Run,
    metrics: &'a mut dyn MetricsSink,
    /// Early stopping's tracker, when it is on.
    early_stopping: Option<EarlyStopping>,
    totals: RunTotals,
    /// The step of the last evaluation every rank was asked for (some take no part).
    last_evaluated: Option<u64>,
    /// The step of the last checkpoint, and its path on the rank that wrote it.
    last_checkpoint: Option<(u64, Option<PathBuf>)>,
}

impl Driver<'_> {
    /// Trains step `step` (0-based) and reports it.
    fn train(&mut self, step: u64, global_batch: usize) -> Result<()> {
        let started = Instant::now();
        let report = self.run.step(step)?;
        let elapsed = started.elapsed();
        self.totals.training_time += elapsed;
        self.totals.timings.accumulate(&report.timings);
        self.totals.steps_run += 1;
        let metrics = step_metrics(self.schedule, step, global_batch, elapsed, report);
        self.metrics.on_step(&metrics);
        Ok(())
    }

    /// Evaluates and checkpoints after step `completed` as due, and says whether the run, to
    /// end at `end`, goes on.
    fn between_steps(&mut self, completed: u64, end: u64) -> Result<Flow> {
        // Between two steps every rank holds the same parameters: where a request to stop now
        // and checkpoint (preemption, early stopping) is to be honoured.
        let (evaluation, verdict) = if self.schedule.evaluation_due(completed) {
            self.evaluate_and_judge(completed)?
        } else {
            (None, None)
        };
        // At the last step, early stopping changes nothing (the run ends there anyway) and the
        // final checkpoint follows [`Run::finish_steps`].
        let before_the_end = completed < self.schedule.total_steps;
        let stop = verdict == Some(Verdict::Stop) && before_the_end;
        let improved = verdict == Some(Verdict::Improved) && before_the_end;
        if self.schedule.checkpoint_due(completed) || improved || stop {
            self.checkpoint(completed, evaluation.as_ref())?;
        }
        if stop {
            self.early_stop(completed);
            return Ok(Flow::End);
        }
        if completed < end && self.run.stop_agreed()? {
            // Every rank holds the parameters after `completed`: checkpoint them and end.
            let evaluation = if self.last_evaluated == Some(completed) {
                evaluation
            } else if self.schedule.evaluates_checkpoints() {
                self.evaluate(completed)?
            } else {
                None
            };
            self.checkpoint(completed, evaluation.as_ref())?;
            self.totals.final_checkpoint = self.checkpoint_path_at(completed);
            self.totals.stopped_at = Some(completed);
            return Ok(Flow::End);
        }
        Ok(Flow::Continue)
    }

    /// Ends a run at `end`, the step of `schedule.stop_after_*`, short of its last step: an
    /// evaluation there (unless one just ran) and a checkpoint. Early stopping, if that
    /// evaluation exhausts its patience, has the last word.
    fn stop_at_schedule(&mut self, end: u64) -> Result<()> {
        let (evaluation, verdict) = if self.schedule.evaluates() && self.last_evaluated != Some(end)
        {
            self.evaluate_and_judge(end)?
        } else {
            (self.evaluation_at(end), None)
        };
        self.checkpoint(end, evaluation.as_ref())?;
        if verdict == Some(Verdict::Stop) {
            self.early_stop(end);
        } else {
            tracing::info!(step = end, "stopping as schedule.stop_after_* asks");
            self.totals.scheduled_stop = Some(end);
        }
        self.totals.final_checkpoint = self.checkpoint_path_at(end);
        Ok(())
    }

    /// Ends a run after its last step, `end`: the final evaluation and checkpoint (also
    /// when the final evaluation is early stopping's best, checkpoints otherwise off).
    fn finish(&mut self, end: u64) -> Result<()> {
        let evaluation = if self.schedule.final_evaluation_due(self.last_evaluated) {
            self.evaluate_and_judge(end)?.0
        } else {
            self.evaluation_at(end)
        };
        let best_at_end = self
            .early_stopping
            .as_ref()
            .and_then(EarlyStopping::best)
            .is_some_and(|(step, _)| step == end);
        if self.schedule.final_checkpoint() || best_at_end {
            self.checkpoint(end, evaluation.as_ref())?;
        }
        self.totals.final_checkpoint = self.checkpoint_path_at(end);
        Ok(())
    }

    /// Runs an evaluation after `completed` steps and reports it; returns it as well.
    fn evaluate(&mut self, completed: u64) -> Result<Option<EvaluationMetrics>> {
        let evaluation = self
            .run
            .evaluate(completed, self.schedule.epoch_after(completed))?;
        self.last_evaluated = Some(completed);
        if let Some(evaluation) = &evaluation {
            self.metrics.on_evaluation(evaluation);
            self.totals.final_evaluation = Some(evaluation.clone());
        }
        Ok(evaluation)
    }

    /// [`Self::evaluate`], then early stopping's verdict on it (when it is on and this rank
    /// takes part in evaluations).
    fn evaluate_and_judge(
        &mut self,
        completed: u64,
    ) -> Result<(Option<EvaluationMetrics>, Option<Verdict>)> {
        let evaluation = self.evaluate(completed)?;
        let verdict = match (&mut self.early_stopping, &evaluation) {
            (Some(tracker), Some(evaluation)) => {
                let value = evaluation.value(tracker.objective().metric);
                Some(tracker.observe(completed, value))
            }
            _ => None,
        };
        Ok((evaluation, verdict))
    }

    /// The evaluation after `completed` steps, if the last one ran there (on this rank).
    fn evaluation_at(&self, completed: u64) -> Option<EvaluationMetrics> {
        if self.last_evaluated != Some(completed) {
            return None;
        }
        self.totals
            .final_evaluation
            .clone()
            .filter(|evaluation| evaluation.step == completed)
    }

    /// The path of the checkpoint after `completed` steps, if the last one was written there
    /// (by this rank).
    fn checkpoint_path_at(&self, completed: u64) -> Option<PathBuf> {
        match &self.last_checkpoint {
            Some((step, path)) if *step == completed => path.clone(),
            _ => None,
        }
    }

    /// Writes the checkpoint after `completed` steps (once), recording `evaluation`; on the
    /// writing rank, reports it and applies retention.
    fn checkpoint(&mut self, completed: u64, evaluation: Option<&EvaluationMetrics>) -> Result<()> {
        let best = self
            .early_stopping
            .as_ref()
            .and_then(EarlyStopping::best)
            .map(|(step, _)| step);
        if self.last_checkpoint.as_ref().map(|(step, _)| *step) != Some(completed) {
            let path = self.run.checkpoint(completed, evaluation)?;
            if let Some(path) = &path {
                let bytes = checkpoint::size(path).unwrap_or_else(|error| {
                    tracing::warn!(%error, "cannot measure a checkpoint");
                    0
                });
                self.metrics.on_checkpoint(&CheckpointWritten {
                    step: completed,
                    epoch: self.schedule.epoch_after(completed),
                    path: path.clone(),
                    bytes,
                    evaluation: evaluation.cloned(),
                });
                let protected: Vec<u64> = std::iter::once(completed).chain(best).collect();
                retention::apply(path, &self.policy.retention, &protected, self.metrics);
            }
            self.last_checkpoint = Some((completed, path));
        }
        if best == Some(completed) {
            self.totals.best_checkpoint = self.checkpoint_path_at(completed);
        }
        Ok(())
    }

    /// Ends the run after `completed` steps for early stopping (its checkpoint written) and
    /// reports why.
    fn early_stop(&mut self, completed: u64) {
        let Some(tracker) = &self.early_stopping else {
            return;
        };
        let stop = tracker.report(completed);
        tracing::info!(
            step = completed,
            best_step = stop.best_step,
            best_value = stop.best_value,
            metric = %stop.objective.metric,
            "early stopping: the evaluations stopped improving"
        );
        self.metrics.on_early_stop(&stop);
        self.totals.final_checkpoint = self.checkpoint_path_at(completed);
        self.totals.early_stop = Some(stop);
    }
}

fn step_metrics(
    schedule: &RunSchedule,
    step: u64,
    global_batch: usize,
    elapsed: Duration,
    report: StepSummary,
) -> StepMetrics {
    StepMetrics {
        step: step + 1,
        total_steps: schedule.total_steps,
        epoch: schedule.epoch_of_step(step),
        loss: report.loss,
        learning_rate: report.learning_rate,
        global_batch,
        samples_per_second: global_batch as f64 / elapsed.as_secs_f64().max(1e-9),
        timings: report.timings,
        loss_scale: report.loss_scale,
        skipped_steps: report.skipped_steps,
        gradient_bytes: report.gradient_bytes,
    }
}

#[cfg(test)]
mod tests {
    use cohort_jobspec::objective::{Metric, Objective};
    use cohort_jobspec::train::ScheduleSpec;

    use super::*;
    use crate::run::schedule::Evaluations;

    /// A run that records what the driver asked of it, in order.
    #[derive(Default)]
    struct Script {
        calls: Vec<String>,
        /// Only "rank 0" evaluates and writes checkpoints.
        rank: usize,
        /// The evaluation loss after a step (0 without).
        loss_at: Option<fn(u64) -> f32>,
        /// The step and evaluation of every checkpoint written.
        written: Vec<(u64, Option<f32>)>,
    }

    impl Run for Script {
        fn step(&mut self, step: u64) -> Result<StepSummary> {
            self.calls.push(format!("step {step}"));
            Ok(StepSummary {
                loss: step as f32,
                ..StepSummary::default()
            })
        }

        fn evaluate(&mut self, completed: u64, epoch: u64) -> Result<Option<EvaluationMetrics>> {
            self.calls
                .push(format!("evaluate {completed} (epoch {epoch})"));
            Ok((self.rank == 0).then_some(EvaluationMetrics {
                step: completed,
                epoch,
                loss: self.loss_at.map_or(0.0, |loss_at| loss_at(completed)),
                accuracy: 0.0,
                examples: 1,
            }))
        }

        fn checkpoint(
            &mut self,
            completed: u64,
            evaluation: Option<&EvaluationMetrics>,
        ) -> Result<Option<PathBuf>> {
            self.calls.push(format!("checkpoint {completed}"));
            if let Some(evaluation) = evaluation {
                assert_eq!(
                    evaluation.step, completed,
                    "a checkpoint records its own step"
                );
            }
            self.written
                .push((completed, evaluation.map(|evaluation| evaluation.loss)));
            Ok((self.rank == 0).then(|| PathBuf::from(format!("step-{completed}"))))
        }

        fn finish_steps(&mut self) -> Result<()> {
            self.calls.push("finish".into());
            Ok(())
        }
    }

    #[derive(Default)]
    struct Counts {
        steps: Vec<u64>,
        evaluations: Vec<u64>,
        checkpoints: Vec<u64>,
        early_stops: Vec<EarlyStop>,
    }

    impl MetricsSink for Counts {
        fn on_step(&mut self, metrics: &StepMetrics) {
            self.steps.push(metrics.step);
        }
        fn on_evaluation(&mut self, metrics: &EvaluationMetrics) {
            self.evaluations.push(metrics.step);
        }
        fn on_checkpoint(&mut self, checkpoint: &CheckpointWritten) {
            self.checkpoints.push(checkpoint.step);
        }
        fn on_early_stop(&mut self, stop: &EarlyStop) {
            self.early_stops.push(stop.clone());
        }
    }

    fn schedule(max_steps: u64, evaluations: Evaluations) -> RunSchedule {
        let spec = ScheduleSpec {
            epochs: 2,
            max_steps: Some(max_steps),
            ..ScheduleSpec::default()
        };
        RunSchedule::new(&spec, 3, Some(2), true, evaluations)
    }

    fn drive_plainly(
        schedule: &RunSchedule,
        start_step: u64,
        run: &mut Script,
        counts: &mut Counts,
    ) -> RunTotals {
        drive(schedule, &RunPolicy::default(), start_step, 10, run, counts).unwrap()
    }

    #[test]
    fn steps_checkpoints_and_evaluations_come_in_schedule_order() {
        let mut run = Script::default();
        let mut counts = Counts::default();
        let schedule = schedule(5, Evaluations::EveryEpoch);
        let totals = drive_plainly(&schedule, 1, &mut run, &mut counts);
        assert_eq!(
            run.calls,
            [
                "step 1",
                "checkpoint 2",
                "step 2",
                "evaluate 3 (epoch 0)",
                "step 3",
                "checkpoint 4",
                "step 4",
                "finish",
                "evaluate 5 (epoch 1)",
                "checkpoint 5",
            ]
        );
        assert_eq!(counts.steps, [2, 3, 4, 5]);
        assert_eq!(counts.evaluations, [3, 5]);
        assert_eq!(counts.checkpoints, [2, 4, 5]);
        assert_eq!(totals.steps_run, 4);
        assert_eq!(totals.final_evaluation.as_ref().unwrap().step, 5);
        assert_eq!(totals.final_checkpoint, Some(PathBuf::from("step-5")));
        assert!(totals.initial_evaluation.is_none());
        assert_eq!(totals.ended_early_at(), None);
    }

    #[test]
    fn an_evaluation_comes_before_the_checkpoint_of_its_step_which_records_it() {
        let mut run = Script {
            loss_at: Some(|step| step as f32 / 100.0),
            ..Script::default()
        };
        // Epochs of 3 steps, checkpoints every 2, evaluated too.
        let schedule = schedule(6, Evaluations::EveryEpoch).evaluating_checkpoints(true);
        drive_plainly(&schedule, 0, &mut run, &mut Counts::default());
        assert_eq!(
            run.calls,
            [
                "step 0",
                "step 1",
                "evaluate 2 (epoch 0)",
                "checkpoint 2",
                "step 2",
                "evaluate 3 (epoch 0)",
                "step 3",
                "evaluate 4 (epoch 1)",
                "checkpoint 4",
                "step 4",
                "step 5",
                "evaluate 6 (epoch 1)",
                "finish",
                "checkpoint 6",
            ]
        );
        // Every checkpoint was evaluated at its step and records that evaluation.
        assert_eq!(
            run.written,
            [(2, Some(0.02)), (4, Some(0.04)), (6, Some(0.06))]
        );
    }

    #[test]
    fn an_evaluation_first_counts_as_the_last_when_nothing_is_left_to_train() {
        let mut run = Script::default();
        let schedule = schedule(4, Evaluations::FirstThenEvery(None));
        let totals = drive_plainly(&schedule, 4, &mut run, &mut Counts::default());
        assert_eq!(
            run.calls,
            ["evaluate 4 (epoch 1)", "finish", "checkpoint 4"]
        );
        assert_eq!(totals.initial_evaluation, totals.final_evaluation);
        assert_eq!(totals.steps_run, 0);
    }

    #[test]
    fn ranks_that_do_not_evaluate_or_write_report_nothing() {
        let mut run = Script {
            rank: 1,
            ..Script::default()
        };
        let mut counts = Counts::default();
        let schedule = schedule(3, Evaluations::EveryEpoch);
        let totals = drive_plainly(&schedule, 0, &mut run, &mut counts);
        assert!(counts.evaluations.is_empty() && counts.checkpoints.is_empty());
        assert!(totals.final_evaluation.is_none() && totals.final_checkpoint.is_none());
        // The final evaluation is not repeated although this rank saw none.
        let evaluations = run.calls.iter().filter(|c| c.starts_with("evaluate"));
        assert_eq!(evaluations.count(), 1);
    }

    #[test]
    fn a_run_stopped_after_a_step_evaluates_and_checkpoints_it_and_skips_the_end() {
        let spec = ScheduleSpec {
            epochs: 2,
            stop_after_steps: Some(4),
            ..ScheduleSpec::default()
        };
        let schedule = RunSchedule::new(&spec, 3, Some(2), true, Evaluations::EveryEpoch);
        let mut run = Script::default();
        let mut counts = Counts::default();
        let totals = drive_plainly(&schedule, 0, &mut run, &mut counts);
        // Step 4 is a checkpoint step anyway: evaluated first, written once; no "finish", the
        // run does not reach its last step.
        assert_eq!(
            run.calls,
            [
                "step 0",
                "step 1",
                "checkpoint 2",
                "step 2",
                "evaluate 3 (epoch 0)",
                "step 3",
                "evaluate 4 (epoch 1)",
                "checkpoint 4",
            ]
        );
        assert_eq!(totals.scheduled_stop, Some(4));
        assert_eq!(totals.ended_early_at(), Some(4));
        assert_eq!(totals.final_checkpoint, Some(PathBuf::from("step-4")));
        assert_eq!(counts.checkpoints, [2, 4]);
        assert_eq!(
            run.written[1],
            (4, Some(0.0)),
            "the stop's checkpoint is evaluated"
        );
        // The schedule is the whole run's: the learning rate's steps count to 6.
        assert_eq!(schedule.total_steps, 6);

        // Resumed there without the stop, it runs to the end.
        let whole = RunSchedule::new(
            &ScheduleSpec {
                epochs: 2,
                ..ScheduleSpec::default()
            },
            3,
            Some(2),
            true,
            Evaluations::EveryEpoch,
        );
        let mut resumed = Script::default();
        let totals = drive_plainly(&whole, 4, &mut resumed, &mut Counts::default());
        assert_eq!(resumed.calls[0], "step 4");
        assert_eq!(totals.scheduled_stop, None);
        assert_eq!(totals.final_checkpoint, Some(PathBuf::from("step-6")));
    }

    /// Drives a scripted run of epochs of 3 steps, checkpoints every 10 steps and early
    /// stopping with `patience`, whose evaluation losses are `loss_at`.
    fn early_stopping_run(patience: u32, loss_at: fn(u64) -> f32) -> (Script, Counts, RunTotals) {
        let spec = ScheduleSpec {
            epochs: 100,
            ..ScheduleSpec::default()
        };
        let schedule = RunSchedule::new(&spec, 3, Some(10), true, Evaluations::EveryEpoch)
            .evaluating_checkpoints(true);
        let policy = RunPolicy {
            early_stopping: Some(EarlyStoppingSpec {
                patience,
                ..EarlyStoppingSpec::default()
            }),
            ..RunPolicy::default()
        };
        let mut run = Script {
            loss_at: Some(loss_at),
            ..Script::default()
        };
        let mut counts = Counts::default();
        let totals = drive(&schedule, &policy, 0, 10, &mut run, &mut counts).unwrap();
        (run, counts, totals)
    }

    #[test]
    fn a_plateauing_run_stops_early_keeping_its_best_checkpoint() {
        // Evaluated at every epoch end (3, 6, 9, ...) and every checkpoint (10, 20, ...).
        let (run, counts, totals) = early_stopping_run(3, |step| match step {
            3 => 1.0,
            6 => 0.8,
            9 => 0.85,
            10 => 0.7,
            12 => 0.72,
            15 => 0.75,
            18 => 0.7,
            _ => 0.1,
        });
        assert_eq!(counts.evaluations, [3, 6, 9, 10, 12, 15, 18]);
        // Improvements at 3, 6 and 10 (due anyway) are checkpointed; the stop at 18 too.
        let written: Vec<u64> = run.written.iter().map(|(step, _)| *step).collect();
        assert_eq!(written, [3, 6, 10, 18]);
        assert_eq!(run.calls.last().unwrap(), "checkpoint 18");
        assert!(!run.calls.contains(&"finish".to_owned()));
        let stop = totals.early_stop.clone().unwrap();
        assert_eq!(
            stop,
            EarlyStop {
                step: 18,
                best_step: 10,
                best_value: 0.7f32.into(),
                objective: Objective::natural(Metric::EvalLoss),
                patience: 3,
            }
        );
        assert_eq!(counts.early_stops, [stop]);
        assert_eq!(totals.best_checkpoint, Some(PathBuf::from("step-10")));
        assert_eq!(totals.final_checkpoint, Some(PathBuf::from("step-18")));
        assert_eq!(totals.steps_run, 18);
        assert_eq!(totals.ended_early_at(), Some(18));
    }

    #[test]
    fn a_diverging_run_stops_early_at_its_patience() {
        // Improves until 9, then diverges: NaN losses never improve.
        let (run, counts, totals) = early_stopping_run(2, |step| {
            if step <= 9 {
                1.0 / step as f32
            } else {
                f32::NAN
            }
        });
        assert_eq!(counts.evaluations, [3, 6, 9, 10, 12]);
        let written: Vec<u64> = run.written.iter().map(|(step, _)| *step).collect();
        assert_eq!(written, [3, 6, 9, 10, 12]);
        let stop = totals.early_stop.unwrap();
        assert_eq!((stop.step, stop.best_step), (12, 9));
        assert_eq!(totals.best_checkpoint, Some(PathBuf::from("step-9")));
    }

    #[test]
    fn a_run_that_keeps_improving_runs_to_its_end() {
        let (run, counts, totals) = early_stopping_run(1, |step| 1.0 / step as f32);
        assert!(totals.early_stop.is_none() && counts.early_stops.is_empty());
        assert_eq!(totals.steps_run, 300);
        assert_eq!(run.calls.last().unwrap(), "checkpoint 300");
        assert_eq!(totals.best_checkpoint, Some(PathBuf::from("step-300")));
    }
}
