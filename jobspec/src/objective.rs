//! What "better" means for a training job: an evaluation metric and whether higher or lower is
//! better. One type serves every place that ranks evaluations: early stopping, keeping the best
//! checkpoints, and a sweep's leaderboard.
//!
//! ```toml
//! metric = "eval_loss"   # or "eval_accuracy"
//! mode = "min"           # optional: "min" for a loss, "max" for an accuracy
//! ```

use serde::{Deserialize, Serialize};

/// An evaluation figure every `kind = "train"` job reports on its test (or validation) split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Mean loss over the evaluation split.
    EvalLoss,
    /// Share of the evaluation split classified (or, for a language model, predicted) right.
    #[default]
    EvalAccuracy,
}

impl Metric {
    /// The name used in job files and in output (`eval_loss`, `eval_accuracy`).
    pub fn name(self) -> &'static str {
        match self {
            Metric::EvalLoss => "eval_loss",
            Metric::EvalAccuracy => "eval_accuracy",
        }
    }

    /// The direction that is better unless a file says otherwise: lower for a loss, higher for
    /// an accuracy.
    pub fn natural_mode(self) -> Mode {
        match self {
            Metric::EvalLoss => Mode::Min,
            Metric::EvalAccuracy => Mode::Max,
        }
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether lower or higher values of a metric are better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Lower is better (a loss).
    Min,
    /// Higher is better (an accuracy).
    Max,
}

impl Mode {
    /// The name used in job files (`min`, `max`).
    pub fn name(self) -> &'static str {
        match self {
            Mode::Min => "min",
            Mode::Max => "max",
        }
    }
}

/// A metric and its direction: what a job, a checkpoint or a sweep trial is ranked by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Objective {
    /// The evaluation figure.
    pub metric: Metric,
    /// Whether lower or higher is better.
    pub mode: Mode,
}

impl Default for Objective {
    /// Highest evaluation accuracy.
    fn default() -> Self {
        Self::natural(Metric::EvalAccuracy)
    }
}

impl Objective {
    /// `metric` in its natural direction.
    pub fn natural(metric: Metric) -> Self {
        Self {
            metric,
            mode: metric.natural_mode(),
        }
    }

    /// `metric` in direction `mode`, or its natural one when `None`.
    pub fn new(metric: Metric, mode: Option<Mode>) -> Self {
        Self {
            metric,
            mode: mode.unwrap_or(metric.natural_mode()),
        }
    }

    /// Whether `candidate` beats `incumbent` by more than `min_delta` (`>= 0`). A non-finite
    /// candidate (a diverged loss) never improves; any finite value beats a non-finite one.
    pub fn improves(self, candidate: f64, incumbent: f64, min_delta: f64) -> bool {
        if !candidate.is_finite() {
            return false;
        }
        if !incumbent.is_finite() {
            return true;
        }
        match self.mode {
            Mode::Min => candidate < incumbent - min_delta,
            Mode::Max => candidate > incumbent + min_delta,
        }
    }

    /// Orders two values best first: the sort key for leaderboards and for keeping the best
    /// checkpoints. Non-finite values sort last in either mode.
    pub fn best_first(self, a: f64, b: f64) -> std::cmp::Ordering {
        match (a.is_finite(), b.is_finite()) {
            (true, false) => std::cmp::Ordering::Less,
            (false, true) => std::cmp::Ordering::Greater,
            (false, false) => std::cmp::Ordering::Equal,
            (true, true) => match self.mode {
                Mode::Min => a.total_cmp(&b),
                Mode::Max => b.total_cmp(&a),
            },
        }
    }
}

impl std::fmt::Display for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.metric, self.mode.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn improvement_respects_the_direction_and_the_minimum_delta() {
        let loss = Objective::natural(Metric::EvalLoss);
        assert!(loss.improves(0.5, 0.6, 0.05));
        assert!(!loss.improves(0.56, 0.6, 0.05));
        assert!(!loss.improves(f64::NAN, 0.6, 0.0));
        assert!(loss.improves(3.0, f64::INFINITY, 0.0));
        let accuracy = Objective::natural(Metric::EvalAccuracy);
        assert!(accuracy.improves(0.9, 0.8, 0.0));
        assert!(!accuracy.improves(0.8, 0.8, 0.0));
        assert!(Objective::new(Metric::EvalAccuracy, Some(Mode::Min)).improves(0.1, 0.2, 0.0));
    }

    #[test]
    fn best_first_puts_non_finite_values_last() {
        let loss = Objective::natural(Metric::EvalLoss);
        let mut values = [f64::NAN, 0.3, 0.1, f64::INFINITY, 0.2];
        values.sort_by(|a, b| loss.best_first(*a, *b));
        assert_eq!(&values[..3], &[0.1, 0.2, 0.3]);
        let accuracy = Objective::natural(Metric::EvalAccuracy);
        let mut values = [0.3, f64::NAN, 0.9];
        values.sort_by(|a, b| accuracy.best_first(*a, *b));
        assert_eq!(&values[..2], &[0.9, 0.3]);
    }
}
