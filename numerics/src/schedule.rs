//! The learning-rate schedule: linear warmup, then a cosine down to 0 or a constant. The
//! trainer and the parameter server share it, so a job's learning rate is the same whichever
//! way its gradients travel; the job spec's `[schedule]` names its [`LearningRateDecay`].

use serde::{Deserialize, Serialize};

/// How the learning rate moves after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LearningRateDecay {
    /// Half a cosine from the peak down to 0 at the last step.
    #[default]
    Cosine,
    /// Stays at the peak.
    Constant,
}

/// Learning rate as a function of the optimizer step: linear warmup, then cosine or constant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LearningRateSchedule {
    /// Learning rate reached at the end of warmup.
    peak: f64,
    /// Steps of linear warmup.
    warmup_steps: u64,
    /// Total steps of the run; the cosine reaches 0 here.
    total_steps: u64,
    /// What happens after warmup.
    decay: LearningRateDecay,
}

impl LearningRateSchedule {
    /// Creates the schedule of a run of `total_steps` steps peaking at `peak` after
    /// `warmup_steps`. The trainer and the parameter server share it, so a job's learning rate
    /// is the same whichever way its gradients travel.
    pub fn new(peak: f64, warmup_steps: u64, decay: LearningRateDecay, total_steps: u64) -> Self {
        Self {
            peak,
            warmup_steps,
            total_steps,
            decay,
        }
    }

    /// Returns the learning rate of the update made at `step` (0-based): `peak * (step + 1) /
    /// warmup_steps` during warmup, then `peak * (1 + cos(pi * progress)) / 2` where progress
    /// runs from 0 right after warmup to 1 at `total_steps`.
    pub fn learning_rate(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.decay {
            LearningRateDecay::Constant => self.peak,
            LearningRateDecay::Cosine => {
                let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
                self.peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_follows_a_cosine() {
        let schedule = LearningRateSchedule::new(1.0, 10, LearningRateDecay::Cosine, 110);
        assert!((schedule.learning_rate(0) - 0.1).abs() < 1e-12);
        assert!((schedule.learning_rate(9) - 1.0).abs() < 1e-12);
        assert!((schedule.learning_rate(10) - 1.0).abs() < 1e-12);
        assert!((schedule.learning_rate(60) - 0.5).abs() < 1e-12);
        assert!(schedule.learning_rate(110).abs() < 1e-12);
        assert!(schedule.learning_rate(500).abs() < 1e-12);
        let schedule = LearningRateSchedule::new(0.3, 0, LearningRateDecay::Constant, 5);
        assert_eq!(schedule.learning_rate(0), 0.3);
        assert_eq!(schedule.learning_rate(100), 0.3);
    }
}
