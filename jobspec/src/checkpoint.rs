//! `[checkpoint]` of a `kind = "train"` job: where and how often checkpoints are written, which
//! are kept (`keep_last`, `keep_best` by the job's metric), and where a run resumes from.

use std::path::Component;

use cohort_proto::text::excerpt;
use serde::{Deserialize, Serialize};

use crate::job::MAX_STOP_GRACE_S;
use crate::problems::Problems;
use crate::train::{MAX_STEPS, check_path};

/// `[checkpoint]`: where and how often checkpoints are written. A checkpoint is always written
/// at the end of training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Also writes a checkpoint every this many optimizer steps. Default: only at the end.
    pub every_steps: Option<u64>,
    /// Checkpoint directory (a `step-NNNNNNNN` written by an earlier run) to resume from:
    /// model weights, optimizer state and step are restored; a relative path is resolved
    /// against the job's output directory. Default: start from scratch.
    pub resume_from: Option<String>,
    /// Directory checkpoints are written to, relative to the job's output directory and inside
    /// it: an absolute path or a `..` component is refused, so that a job writes only under
    /// its own outputs. Default `"checkpoints"`.
    pub directory: String,
    /// Seconds a stopped rank (cancel, drain, a restart) has to finish its step and write its
    /// checkpoint before it is killed (SIGTERM to SIGKILL), 0 to 600. Default 10.
    pub stop_grace_s: Option<f64>,
    /// Keeps only the this many newest checkpoints (1 to 10,000) besides those `keep_best`
    /// keeps, deleting older ones after each checkpoint; the newest is always kept. Default:
    /// absent (with `keep_best` absent too, every checkpoint is kept).
    pub keep_last: Option<u32>,
    /// Keeps the this many best checkpoints by the job's objective (`metric`, `mode`), 1 to
    /// 10,000; every checkpoint is then evaluated. Default: absent (none kept for being best,
    /// except the best one when early stopping is on and `keep_last` is set).
    pub keep_best: Option<u32>,
    /// The job's objective, what "best" means for `keep_best` (and a sweep's leaderboard):
    /// `"eval_loss"` or `"eval_accuracy"`. Default: `early_stopping.metric`, else
    /// `"eval_accuracy"`.
    pub metric: Option<crate::objective::Metric>,
    /// `"min"` or `"max"`, the direction of `metric` (only with it). Default: the metric's
    /// natural direction.
    pub mode: Option<crate::objective::Mode>,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            every_steps: None,
            resume_from: None,
            directory: "checkpoints".to_owned(),
            stop_grace_s: None,
            keep_last: None,
            keep_best: None,
            metric: None,
            mode: None,
        }
    }
}

impl CheckpointSpec {
    pub(crate) fn validate(&self, problems: &mut Problems) {
        if let Some(every_steps) = self.every_steps {
            problems.check_range("checkpoint.every_steps", every_steps, 1, MAX_STEPS);
        }
        if let Some(resume_from) = &self.resume_from {
            check_path("checkpoint.resume_from", resume_from, problems);
        }
        if let Some(grace) = self.stop_grace_s
            && !(grace.is_finite() && (0.0..=MAX_STOP_GRACE_S).contains(&grace))
        {
            problems.push(
                "checkpoint.stop_grace_s",
                format!("{grace}, expected 0 to {MAX_STOP_GRACE_S}"),
            );
        }
        check_path("checkpoint.directory", &self.directory, problems);
        check_inside_output("checkpoint.directory", &self.directory, problems);
    }
}

/// Records a problem unless `value` is a relative path that stays inside the job's output
/// directory: no root (`/etc/cron.d`) and no `..` component (`../other-job`).
fn check_inside_output(path: &str, value: &str, problems: &mut Problems) {
    let components = || std::path::Path::new(value).components();
    if components().any(|c| matches!(c, Component::RootDir | Component::Prefix(_))) {
        problems.push(
            path,
            format!(
                "{} is absolute, expected a path relative to the job's output directory",
                excerpt(value)
            ),
        );
    } else if components().any(|c| c == Component::ParentDir) {
        problems.push(
            path,
            format!(
                "{} has a \"..\" component, expected a path that stays inside the job's output \
                 directory",
                excerpt(value)
            ),
        );
    }
}
