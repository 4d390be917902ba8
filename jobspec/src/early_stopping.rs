//! `[early_stopping]`, and the other fields that end a training run before its schedule does or
//! prune what it wrote, with the rules across sections that bind them:
//!
//! - `[early_stopping]`: the run ends once its evaluations stop improving;
//! - `schedule.stop_after_steps` / `schedule.stop_after_epochs`: the run ends at a step
//!   ([`ScheduleSpec::stop_step`]), with a checkpoint a later run resumes from (a sweep's
//!   successive halving pauses trials this way);
//! - `checkpoint.keep_last` / `checkpoint.keep_best`, ranked by the job's objective
//!   (`checkpoint.metric` and `checkpoint.mode`, see [`crate::JobSpec::objective`]).
//!
//! ```toml
//! [early_stopping]
//! metric = "eval_loss"   # or "eval_accuracy"
//! mode = "min"           # default: the metric's natural direction
//! patience = 3           # evaluations in a row without improvement before the run ends
//! min_delta = 0.0        # an improvement beats the best by more than this
//! ```
//!
//! Early stopping judges the evaluations the run takes: at the end of every epoch, every
//! `schedule.eval_every_steps`, at the end, and at every checkpoint (with early stopping on,
//! every checkpoint is evaluated). After `patience` evaluations in a row that do not beat the
//! best one by more than `min_delta` (a non-finite value never does), the run writes a
//! checkpoint and ends successfully; the checkpoint of the best evaluation is kept. It is
//! refused with `parallel.comm = "ps"`: only rank 0 evaluates there, so the ranks could not
//! agree on when to stop.

use serde::{Deserialize, Serialize};

use crate::job::JobSpec;
use crate::objective::{Metric, Mode, Objective};
use crate::parallel::{Communication, ParallelSpec};
use crate::problems::Problems;
use crate::train::{MAX_STEPS, ScheduleSpec};

/// Evaluations without improvement before the run ends, unless given.
pub const DEFAULT_PATIENCE: u32 = 3;
/// Most evaluations without improvement a job may allow.
pub const MAX_PATIENCE: u32 = 10_000;
/// Most checkpoints `checkpoint.keep_last` or `checkpoint.keep_best` may keep.
pub const MAX_KEPT_CHECKPOINTS: u32 = 10_000;

/// `[early_stopping]`: when a run ends because its evaluations stopped improving.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EarlyStoppingSpec {
    /// The evaluation figure judged: `"eval_loss"` or `"eval_accuracy"`. Default `"eval_loss"`.
    pub metric: Metric,
    /// `"min"` or `"max"`: whether lower or higher values are better. Default: the metric's
    /// natural direction (`"min"` for the loss, `"max"` for the accuracy).
    pub mode: Option<Mode>,
    /// Evaluations in a row that do not improve on the best before the run ends, 1 to 10,000.
    /// Default 3.
    pub patience: u32,
    /// How much an evaluation must beat the best by to count as an improvement: finite and at
    /// least 0. Default 0.
    pub min_delta: f64,
}

impl Default for EarlyStoppingSpec {
    fn default() -> Self {
        Self {
            metric: Metric::EvalLoss,
            mode: None,
            patience: DEFAULT_PATIENCE,
            min_delta: 0.0,
        }
    }
}

impl EarlyStoppingSpec {
    /// The metric and direction early stopping judges by.
    pub fn objective(&self) -> Objective {
        Objective::new(self.metric, self.mode)
    }

    /// Records the section's own problems.
    pub fn validate(&self, problems: &mut Problems) {
        problems.check_range("early_stopping.patience", self.patience, 1, MAX_PATIENCE);
        if !(self.min_delta.is_finite() && self.min_delta >= 0.0) {
            problems.push(
                "early_stopping.min_delta",
                format!("{}, expected a finite value of at least 0", self.min_delta),
            );
        }
    }
}

impl ScheduleSpec {
    /// The step after which a run of `total_steps` steps, in epochs of `steps_per_epoch`,
    /// ends by `stop_after_steps` or `stop_after_epochs`, if either is set: at least 1 and at
    /// most `total_steps`. A product of epochs and steps within a billionth of a whole number
    /// counts as that number (`0.7 x 10` is 7 steps, not 8).
    pub fn stop_step(&self, steps_per_epoch: u64, total_steps: u64) -> Option<u64> {
        let step = match (self.stop_after_steps, self.stop_after_epochs) {
            (Some(steps), _) => steps,
            (None, Some(epochs)) => {
                let exact = epochs * steps_per_epoch as f64;
                let nearest = exact.round();
                let whole = (exact - nearest).abs() <= 1e-9 * nearest.max(1.0);
                // Saturating float-to-integer conversion; the spec bounds the value anyway.
                (if whole { nearest } else { exact.ceil() }) as u64
            }
            (None, None) => return None,
        };
        Some(step.max(1).min(total_steps))
    }
}

/// Records the problems of `[early_stopping]`, `schedule.stop_after_*` and the retention and
/// objective fields of `[checkpoint]` of the train job `spec`, whose mesh is `parallel`.
pub(crate) fn validate(spec: &JobSpec, parallel: &ParallelSpec, problems: &mut Problems) {
    if let Some(early_stopping) = &spec.early_stopping {
        early_stopping.validate(problems);
        if parallel.comm == Communication::Ps {
            problems.push(
                "early_stopping",
                "not with parallel.comm = \"ps\": only rank 0 evaluates there, so the ranks could \
                 not agree on when to stop",
            );
        }
    }
    let schedule = spec.schedule.clone().unwrap_or_default();
    if let Some(steps) = schedule.stop_after_steps {
        problems.check_range("schedule.stop_after_steps", steps, 1, MAX_STEPS);
    }
    if let Some(epochs) = schedule.stop_after_epochs {
        let most = f64::from(schedule.epochs);
        if !(epochs.is_finite() && epochs > 0.0 && epochs <= most) {
            problems.push(
                "schedule.stop_after_epochs",
                format!("{epochs}, expected above 0 and at most schedule.epochs = {most}"),
            );
        }
        if schedule.stop_after_steps.is_some() {
            problems.push(
                "schedule.stop_after_epochs",
                "given with schedule.stop_after_steps, expected at most one of the two",
            );
        }
    }
    if let Some(checkpoint) = &spec.checkpoint {
        for (field, keep) in [
            ("keep_last", checkpoint.keep_last),
            ("keep_best", checkpoint.keep_best),
        ] {
            if let Some(keep) = keep {
                problems.check_range(
                    &format!("checkpoint.{field}"),
                    keep,
                    1,
                    MAX_KEPT_CHECKPOINTS,
                );
            }
        }
        if checkpoint.mode.is_some() && checkpoint.metric.is_none() {
            problems.push(
                "checkpoint.mode",
                "given without checkpoint.metric, expected both (the mode is that metric's \
                 direction)",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;
    use crate::problems::problem_strings;

    const TRAIN: &str = "version = 1\nkind = \"train\"\n";

    fn with(sections: &str) -> String {
        format!("{TRAIN}{sections}")
    }

    #[test]
    fn early_stopping_takes_its_defaults() {
        let spec = parse(&with("[early_stopping]\n")).unwrap();
        let early_stopping = spec.early_stopping.clone().unwrap();
        assert_eq!(early_stopping, EarlyStoppingSpec::default());
        assert_eq!(early_stopping.patience, 3);
        assert_eq!(early_stopping.min_delta, 0.0);
        assert_eq!(
            early_stopping.objective(),
            Objective::natural(Metric::EvalLoss)
        );
        // The job's objective follows early stopping unless [checkpoint] names one.
        assert_eq!(spec.objective(), Objective::natural(Metric::EvalLoss));
        let accuracy = parse(&with(
            "[early_stopping]\nmetric = \"eval_accuracy\"\npatience = 5\nmin_delta = 0.01\n",
        ))
        .unwrap();
        assert_eq!(
            accuracy.early_stopping.unwrap().objective(),
            Objective::natural(Metric::EvalAccuracy)
        );
    }

    #[test]
    fn the_objective_is_the_checkpoint_sections_then_early_stoppings_then_accuracy() {
        assert_eq!(parse(TRAIN).unwrap().objective(), Objective::default());
        let spec = parse(&with(
            "[early_stopping]\nmetric = \"eval_accuracy\"\n[checkpoint]\nmetric = \"eval_loss\"\n\
             mode = \"max\"\nkeep_best = 2\n",
        ))
        .unwrap();
        assert_eq!(
            spec.objective(),
            Objective::new(Metric::EvalLoss, Some(Mode::Max))
        );
        assert_eq!(spec.checkpoint.unwrap().keep_best, Some(2));
    }

    #[test]
    fn bad_early_stopping_and_retention_fields_are_named() {
        let problems = problem_strings(&with(
            "[early_stopping]\npatience = 0\nmin_delta = -0.5\n[checkpoint]\nkeep_last = 0\n\
             keep_best = 10001\nmode = \"min\"\n",
        ));
        for path in [
            "early_stopping.patience: 0, expected 1 to 10000",
            "early_stopping.min_delta: -0.5, expected a finite value of at least 0",
            "checkpoint.keep_last: 0, expected 1 to 10000",
            "checkpoint.keep_best: 10001, expected 1 to 10000",
            "checkpoint.mode: given without checkpoint.metric",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(path)),
                "{path} not in {problems:?}"
            );
        }
        assert_eq!(problems.len(), 5, "{problems:?}");
        let problems = problem_strings(&with("[early_stopping]\nmin_delta = nan\n"));
        assert!(
            problems[0].starts_with("early_stopping.min_delta: NaN"),
            "{problems:?}"
        );
        let problems = problem_strings(&with("[early_stopping]\nmetric = \"accuracy\"\n"));
        assert!(
            problems[0].starts_with("early_stopping.metric"),
            "{problems:?}"
        );
        let problems = problem_strings(&with("[early_stopping]\npatiense = 2\n"));
        assert!(
            problems[0].starts_with("early_stopping") && problems[0].contains("patiense"),
            "{problems:?}"
        );
    }

    #[test]
    fn early_stopping_is_refused_with_parameter_servers() {
        let problems = problem_strings(&with(
            "[early_stopping]\n[parallel]\ndata = 2\ncomm = \"ps\"\n",
        ));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("early_stopping: not with parallel.comm = \"ps\""),
            "{problems:?}"
        );
        // Retention works there: rank 0 evaluates and writes the checkpoints.
        parse(&with(
            "[checkpoint]\nkeep_best = 1\n[parallel]\ndata = 2\ncomm = \"ps\"\n",
        ))
        .unwrap();
    }

    #[test]
    fn stop_after_takes_steps_or_epochs_within_the_run() {
        let spec = parse(&with("[schedule]\nepochs = 4\nstop_after_epochs = 1.5\n")).unwrap();
        assert_eq!(spec.schedule.unwrap().stop_after_epochs, Some(1.5));
        let spec = parse(&with("[schedule]\nstop_after_steps = 40\n")).unwrap();
        assert_eq!(spec.schedule.unwrap().stop_after_steps, Some(40));
        for (fields, expected) in [
            (
                "stop_after_steps = 0",
                "schedule.stop_after_steps: 0, expected 1 to 1000000000",
            ),
            (
                "epochs = 2\nstop_after_epochs = 2.5",
                "schedule.stop_after_epochs: 2.5, expected above 0 and at most schedule.epochs = 2",
            ),
            (
                "stop_after_epochs = 0.0",
                "schedule.stop_after_epochs: 0, expected above 0",
            ),
            (
                "stop_after_epochs = inf",
                "schedule.stop_after_epochs: inf, expected above 0",
            ),
            (
                "stop_after_steps = 5\nstop_after_epochs = 0.5",
                "schedule.stop_after_epochs: given with schedule.stop_after_steps, expected at \
                 most one of the two",
            ),
        ] {
            let problems = problem_strings(&with(&format!("[schedule]\n{fields}\n")));
            assert_eq!(problems.len(), 1, "{fields}: {problems:?}");
            assert!(problems[0].starts_with(expected), "{fields}: {problems:?}");
        }
    }

    #[test]
    fn command_jobs_refuse_the_training_only_fields() {
        let command = "version = 1\nkind = \"command\"\n[command]\nprogram = \"sh\"\n";
        let problems = problem_strings(&format!("{command}[early_stopping]\npatience = 2\n"));
        assert_eq!(
            problems,
            ["early_stopping: only allowed with kind = \"train\""]
        );
        let problems = problem_strings(&format!(
            "{command}[schedule]\nstop_after_steps = 3\n[checkpoint]\nkeep_last = 2\n"
        ));
        assert_eq!(
            problems,
            [
                "schedule: only allowed with kind = \"train\"",
                "checkpoint: only allowed with kind = \"train\""
            ]
        );
    }

    #[test]
    fn stop_after_epochs_converts_to_whole_steps_within_the_run() {
        let schedule = |steps: Option<u64>, epochs: Option<f64>| ScheduleSpec {
            epochs: 3,
            stop_after_steps: steps,
            stop_after_epochs: epochs,
            ..ScheduleSpec::default()
        };
        assert_eq!(schedule(None, None).stop_step(10, 30), None);
        assert_eq!(schedule(Some(7), None).stop_step(10, 30), Some(7));
        assert_eq!(schedule(Some(70), None).stop_step(10, 30), Some(30));
        assert_eq!(schedule(None, Some(1.5)).stop_step(10, 30), Some(15));
        assert_eq!(schedule(None, Some(1.01)).stop_step(10, 30), Some(11));
        // 0.7 x 10 is 7.000000000000001 in floating point: still 7 steps.
        assert_eq!(schedule(None, Some(0.7)).stop_step(10, 30), Some(7));
        assert_eq!(schedule(None, Some(0.001)).stop_step(10, 30), Some(1));
        // Capped at the run's steps (max_steps may end it first).
        assert_eq!(schedule(None, Some(2.5)).stop_step(10, 12), Some(12));
    }
}
