//! Early stopping's decision, apart from its effects: [`EarlyStopping`] is fed the value of the
//! job's metric at every evaluation and says whether it improved, whether to keep going, or
//! whether to stop ([`Verdict`]); the loop driver (`run::driver`) writes the checkpoints and
//! ends the run.
//!
//! The rules (Keras' `EarlyStopping` without a baseline):
//! - the first finite value is an improvement; after it, a value improves when it beats the best
//!   by more than `min_delta` ([`Objective::improves`]); a non-finite value (a diverged loss)
//!   never improves;
//! - the best is the last value that improved (a value that beats it by `min_delta` or less does
//!   not replace it);
//! - after `patience` evaluations in a row that do not improve, the run stops.
//!
//! Every rank of a data-parallel or language-model run gets the same evaluation, so every rank's
//! tracker says the same, and all stop after the same step. The driver judges the evaluations
//! after training steps only (not the language model's before its first step), and a restarted
//! attempt starts a fresh tracker; retention keeps the best checkpoint across attempts
//! ([`super::retention`]).

use cohort_jobspec::early_stopping::EarlyStoppingSpec;
use cohort_jobspec::objective::Objective;

use crate::metrics::EarlyStop;

/// What one evaluation means for the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It is the best so far: its checkpoint must exist.
    Improved,
    /// It did not improve, and patience remains.
    KeepGoing,
    /// `patience` evaluations in a row did not improve: the run ends.
    Stop,
}

/// Follows a run's evaluations and decides when it stops improving.
#[derive(Debug, Clone, PartialEq)]
pub struct EarlyStopping {
    /// The metric and its direction.
    objective: Objective,
    /// Evaluations without improvement allowed in a row.
    patience: u32,
    /// Margin an improvement beats the best by.
    min_delta: f64,
    /// The step and value of the best evaluation (the first one's, until one is finite).
    best: Option<(u64, f64)>,
    /// Evaluations since the best that did not improve on it.
    since_best: u32,
}

impl EarlyStopping {
    /// A tracker for `spec`'s metric, direction, patience and margin, that has seen nothing.
    pub fn new(spec: &EarlyStoppingSpec) -> Self {
        Self {
            objective: spec.objective(),
            patience: spec.patience.max(1),
            min_delta: spec.min_delta.max(0.0),
            best: None,
            since_best: 0,
        }
    }

    /// The metric and direction it judges by.
    pub fn objective(&self) -> Objective {
        self.objective
    }

    /// Judges the evaluation after step `step`, whose metric is `value`.
    pub fn observe(&mut self, step: u64, value: f64) -> Verdict {
        let improved = match self.best {
            None => value.is_finite(),
            Some((_, best)) => self.objective.improves(value, best, self.min_delta),
        };
        if improved || self.best.is_none() {
            self.best = Some((step, value));
        }
        if improved {
            self.since_best = 0;
            return Verdict::Improved;
        }
        self.since_best += 1;
        if self.since_best >= self.patience {
            Verdict::Stop
        } else {
            Verdict::KeepGoing
        }
    }

    /// The step and value of the best evaluation so far, if any was seen.
    pub fn best(&self) -> Option<(u64, f64)> {
        self.best
    }

    /// The report of a run stopped after step `step`.
    pub fn report(&self, step: u64) -> EarlyStop {
        let (best_step, best_value) = self.best.unwrap_or((step, f64::NAN));
        EarlyStop {
            step,
            best_step,
            best_value,
            objective: self.objective,
            patience: self.patience,
        }
    }
}

#[cfg(test)]
mod tests {
    use cohort_jobspec::objective::{Metric, Mode};

    use super::*;

    fn tracker(metric: Metric, patience: u32, min_delta: f64) -> EarlyStopping {
        EarlyStopping::new(&EarlyStoppingSpec {
            metric,
            patience,
            min_delta,
            ..EarlyStoppingSpec::default()
        })
    }

    /// Feeds `values` as the evaluations of steps 10, 20, 30...; returns the verdicts up to the
    /// first stop and the step it stopped at.
    fn run(tracker: &mut EarlyStopping, values: &[f64]) -> (Vec<Verdict>, Option<u64>) {
        let mut verdicts = Vec::new();
        for (index, &value) in values.iter().enumerate() {
            let step = 10 * (index as u64 + 1);
            let verdict = tracker.observe(step, value);
            verdicts.push(verdict);
            if verdict == Verdict::Stop {
                return (verdicts, Some(step));
            }
        }
        (verdicts, None)
    }

    use Verdict::{Improved, KeepGoing, Stop};

    #[test]
    fn a_plateauing_loss_stops_after_patience_evaluations_without_improvement() {
        let mut early = tracker(Metric::EvalLoss, 2, 0.0);
        let (verdicts, stopped) = run(&mut early, &[1.0, 0.8, 0.7, 0.71, 0.72, 0.69, 0.5]);
        assert_eq!(verdicts, [Improved, Improved, Improved, KeepGoing, Stop]);
        assert_eq!(stopped, Some(50));
        assert_eq!(early.best(), Some((30, 0.7)));
        let report = early.report(50);
        assert_eq!((report.step, report.best_step), (50, 30));
        assert_eq!(report.best_value, 0.7);
        assert_eq!(report.patience, 2);
        assert_eq!(report.objective, Objective::natural(Metric::EvalLoss));
    }

    #[test]
    fn an_improvement_resets_the_count() {
        let mut early = tracker(Metric::EvalLoss, 2, 0.0);
        let (verdicts, stopped) = run(&mut early, &[1.0, 1.1, 0.9, 0.95, 0.9, 0.8]);
        assert_eq!(
            verdicts,
            [Improved, KeepGoing, Improved, KeepGoing, Stop],
            "an equal value is no improvement"
        );
        assert_eq!(stopped, Some(50));
        assert_eq!(early.best(), Some((30, 0.9)));
    }

    #[test]
    fn improvements_within_min_delta_do_not_count_nor_replace_the_best() {
        let mut early = tracker(Metric::EvalLoss, 3, 0.05);
        // 0.97 and 0.96 are within 0.05 of 1.0; 0.94 beats it by 0.06.
        let (verdicts, stopped) = run(&mut early, &[1.0, 0.97, 0.96, 0.94, 0.92, 0.91, 0.9]);
        assert_eq!(
            verdicts,
            [
                Improved, KeepGoing, KeepGoing, Improved, KeepGoing, KeepGoing, Stop
            ]
        );
        assert_eq!(stopped, Some(70));
        assert_eq!(early.best(), Some((40, 0.94)));
    }

    #[test]
    fn a_diverging_loss_never_improves() {
        let mut early = tracker(Metric::EvalLoss, 3, 0.0);
        let (verdicts, stopped) = run(&mut early, &[2.0, 1.5, f64::NAN, f64::INFINITY, 1.6]);
        assert_eq!(verdicts, [Improved, Improved, KeepGoing, KeepGoing, Stop]);
        assert_eq!(stopped, Some(50));
        assert_eq!(early.best(), Some((20, 1.5)));
        // A run diverged from its first evaluation: the first finite value is the first best.
        let mut diverged = tracker(Metric::EvalLoss, 2, 0.0);
        let (verdicts, _) = run(&mut diverged, &[f64::NAN, 3.0, f64::NAN, f64::NAN]);
        assert_eq!(verdicts, [KeepGoing, Improved, KeepGoing, Stop]);
        assert_eq!(diverged.best(), Some((20, 3.0)));
        let mut never = tracker(Metric::EvalLoss, 1, 0.0);
        assert_eq!(never.observe(10, f64::NAN), Stop);
        assert_eq!(never.report(10).best_step, 10);
        assert!(never.report(10).best_value.is_nan());
    }

    #[test]
    fn accuracy_improves_upwards_unless_the_mode_says_otherwise() {
        let mut early = tracker(Metric::EvalAccuracy, 2, 0.0);
        let (verdicts, stopped) = run(&mut early, &[0.5, 0.7, 0.6, 0.8, 0.8, 0.79]);
        assert_eq!(
            verdicts,
            [Improved, Improved, KeepGoing, Improved, KeepGoing, Stop]
        );
        assert_eq!(stopped, Some(60));
        assert_eq!(early.best(), Some((40, 0.8)));
        let mut lowest = EarlyStopping::new(&EarlyStoppingSpec {
            metric: Metric::EvalAccuracy,
            mode: Some(Mode::Min),
            patience: 1,
            ..EarlyStoppingSpec::default()
        });
        let (verdicts, stopped) = run(&mut lowest, &[0.5, 0.4, 0.6]);
        assert_eq!(verdicts, [Improved, Improved, Stop]);
        assert_eq!(stopped, Some(30));
    }

    #[test]
    fn a_steadily_improving_run_never_stops() {
        let mut early = tracker(Metric::EvalLoss, 1, 0.0);
        let values: Vec<f64> = (0..100).map(|i| 1.0 / f64::from(i + 1)).collect();
        let (verdicts, stopped) = run(&mut early, &values);
        assert!(verdicts.iter().all(|v| *v == Improved));
        assert_eq!(stopped, None);
        assert_eq!(early.best(), Some((1000, 0.01)));
    }
}
