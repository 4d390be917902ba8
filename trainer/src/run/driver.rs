//! The loop driver: [`drive`] owns the schedule of a run (its steps, evaluations,
//! checkpoints, progress reporting and timing) and asks a [`Run`] to do the loop-specific work.
//! Every training loop is a [`Run`] driven here, so what happens between steps is written once.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::metrics::{EvaluationMetrics, MetricsSink, PhaseTimings, StepMetrics};
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

    /// Writes a checkpoint after `completed` steps. `Ok(None)` on ranks that do not write it.
    fn checkpoint(&mut self, completed: u64) -> Result<Option<PathBuf>>;

    /// Called once after the last step, before the final evaluation and checkpoint.
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

/// What [`drive`] observed of a run.
#[derive(Debug, Default)]
pub(crate) struct RunTotals {
    /// The evaluation before the first step, when the schedule has one.
    pub(crate) initial_evaluation: Option<EvaluationMetrics>,
    /// The last evaluation this rank took part in.
    pub(crate) final_evaluation: Option<EvaluationMetrics>,
    /// The checkpoint written after the last step, on the rank that wrote it.
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
}

/// Runs `run` from step `start_step` to the end of `schedule`, reporting to `metrics` every
/// step (with `global_batch` examples), evaluation and checkpoint. When the ranks agree to stop
/// after a step ([`Run::stop_agreed`]), the run ends there, after a checkpoint of that step.
pub(crate) fn drive(
    schedule: &RunSchedule,
    start_step: u64,
    global_batch: usize,
    run: &mut dyn Run,
    metrics: &mut dyn MetricsSink,
) -> Result<RunTotals> {
    let mut totals = RunTotals::default();
    let mut last_evaluated = None;
    if schedule.evaluates_first() {
        totals.initial_evaluation = evaluate(run, schedule, start_step, metrics, &mut totals)?;
        last_evaluated = Some(start_step);
    }
    for step in start_step..schedule.total_steps {
        // Between two steps every rank holds the same parameters: where a request to stop now
        // and checkpoint (preemption, early stopping) is to be honoured.
        let started = Instant::now();
        let report = run.step(step)?;
        let elapsed = started.elapsed();
        totals.training_time += elapsed;
        totals.timings.accumulate(&report.timings);
        totals.steps_run += 1;
        let completed = step + 1;
        metrics.on_step(&step_metrics(schedule, step, global_batch, elapsed, report));
        if schedule.checkpoint_due(completed)
            && let Some(path) = run.checkpoint(completed)?
        {
            metrics.on_checkpoint(completed, &path);
        }
        if schedule.evaluation_due(completed) {
            evaluate(run, schedule, completed, metrics, &mut totals)?;
            last_evaluated = Some(completed);
        }
        if completed < schedule.total_steps && run.stop_agreed()? {
            // Every rank holds the parameters after `completed`: checkpoint them and end.
            totals.final_checkpoint = run.checkpoint(completed)?;
            if let Some(path) = &totals.final_checkpoint {
                metrics.on_checkpoint(completed, path);
            }
            totals.stopped_at = Some(completed);
            return Ok(totals);
        }
    }
    run.finish_steps()?;
    let end = schedule.total_steps;
    if schedule.final_evaluation_due(last_evaluated) {
        evaluate(run, schedule, end, metrics, &mut totals)?;
    }
    if schedule.final_checkpoint()
        && let Some(path) = run.checkpoint(end)?
    {
        metrics.on_checkpoint(end, &path);
        totals.final_checkpoint = Some(path);
    }
    Ok(totals)
}

/// Runs an evaluation after `completed` steps and reports it; returns it as well.
fn evaluate(
    run: &mut dyn Run,
    schedule: &RunSchedule,
    completed: u64,
    metrics: &mut dyn MetricsSink,
    totals: &mut RunTotals,
) -> Result<Option<EvaluationMetrics>> {
    let evaluation = run.evaluate(completed, schedule.epoch_after(completed))?;
    if let Some(evaluation) = &evaluation {
        metrics.on_evaluation(evaluation);
        totals.final_evaluation = Some(evaluation.clone());
    }
    Ok(evaluation)
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
    use cohort_jobspec::train::ScheduleSpec;

    use super::*;
    use crate::run::schedule::Evaluations;

    /// A run that records what the driver asked of it, in order.
    #[derive(Default)]
    struct Script {
        calls: Vec<String>,
        /// Only "rank 0" evaluates and writes checkpoints.
        rank: usize,
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
                loss: 0.0,
                accuracy: 0.0,
                examples: 1,
            }))
        }

        fn checkpoint(&mut self, completed: u64) -> Result<Option<PathBuf>> {
            self.calls.push(format!("checkpoint {completed}"));
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
    }

    impl MetricsSink for Counts {
        fn on_step(&mut self, metrics: &StepMetrics) {
            self.steps.push(metrics.step);
        }
        fn on_evaluation(&mut self, metrics: &EvaluationMetrics) {
            self.evaluations.push(metrics.step);
        }
        fn on_checkpoint(&mut self, step: u64, _path: &std::path::Path) {
            self.checkpoints.push(step);
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

    #[test]
    fn steps_checkpoints_and_evaluations_come_in_schedule_order() {
        let mut run = Script::default();
        let mut counts = Counts::default();
        let totals = drive(
            &schedule(5, Evaluations::EveryEpoch),
            1,
            10,
            &mut run,
            &mut counts,
        )
        .unwrap();
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
        assert_eq!(totals.final_evaluation.unwrap().step, 5);
        assert_eq!(totals.final_checkpoint, Some(PathBuf::from("step-5")));
        assert!(totals.initial_evaluation.is_none());
    }

    #[test]
    fn an_evaluation_first_counts_as_the_last_when_nothing_is_left_to_train() {
        let mut run = Script::default();
        let totals = drive(
            &schedule(4, Evaluations::FirstThenEvery(None)),
            4,
            10,
            &mut run,
            &mut Counts::default(),
        )
        .unwrap();
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
        let totals = drive(
            &schedule(3, Evaluations::EveryEpoch),
            0,
            10,
            &mut run,
            &mut counts,
        )
        .unwrap();
        assert!(counts.evaluations.is_empty() && counts.checkpoints.is_empty());
        assert!(totals.final_evaluation.is_none() && totals.final_checkpoint.is_none());
        // The final evaluation is not repeated although this rank saw none.
        let evaluations = run.calls.iter().filter(|c| c.starts_with("evaluate"));
        assert_eq!(evaluations.count(), 1);
    }
}
