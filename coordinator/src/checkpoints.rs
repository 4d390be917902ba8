//! Checkpoint versions: what a job's writing rank reports of the checkpoints it writes and its
//! retention deletes, kept in the job's record, and how `JOB@best`, `JOB@latest` and
//! `JOB@step-N` resolve through them. Pure: the cluster applies the results.
//!
//! A version is recorded once its writing rank reports it committed, so every recorded version
//! was complete when written; retention on the rank deletes old ones and reports that too, and
//! the record marks them deleted rather than forgetting them, so `cohort checkpoints` shows the
//! job's whole history (bounded by [`MAX_CHECKPOINT_VERSIONS`]).

use std::fmt;
use std::str::FromStr;

use cohort_jobspec::objective::{Metric, Objective};
use cohort_proto::JobId;

use crate::error::{Error, Result};
use crate::limits::MAX_CHECKPOINT_VERSIONS;
use crate::model::CheckpointVersion;

/// Records `written` (replacing an earlier version of the same step: a restarted attempt that
/// wrote it again), keeping the versions in step order and at most
/// [`MAX_CHECKPOINT_VERSIONS`]: the oldest deleted ones are dropped first, then the oldest.
pub fn record(versions: &mut Vec<CheckpointVersion>, written: CheckpointVersion) {
    versions.retain(|version| version.step != written.step);
    let at = versions.partition_point(|version| version.step < written.step);
    versions.insert(at, written);
    while versions.len() > MAX_CHECKPOINT_VERSIONS {
        let drop = versions
            .iter()
            .position(|version| version.deleted)
            .unwrap_or(0);
        versions.remove(drop);
    }
}

/// Marks the versions of `steps` deleted (retention removed them from disk).
pub fn mark_deleted(versions: &mut [CheckpointVersion], steps: &[u64]) {
    for version in versions.iter_mut().filter(|v| steps.contains(&v.step)) {
        version.deleted = true;
    }
}

/// The value of `metric` a version recorded, if an evaluation ran at its step.
pub fn metric_of(version: &CheckpointVersion, metric: Metric) -> Option<f64> {
    match metric {
        Metric::EvalLoss => version.eval_loss,
        Metric::EvalAccuracy => version.eval_accuracy,
    }
}

/// The index of the best version still on disk by `objective`, among those with its metric
/// (the latest of equals).
pub fn best(versions: &[CheckpointVersion], objective: Objective) -> Option<usize> {
    versions
        .iter()
        .enumerate()
        .filter(|(_, version)| !version.deleted)
        .filter_map(|(index, version)| {
            metric_of(version, objective.metric)
                .filter(|value| value.is_finite())
                .map(|value| (index, value))
        })
        .min_by(|(a_index, a), (b_index, b)| {
            objective.best_first(*a, *b).then(b_index.cmp(a_index))
        })
        .map(|(index, _)| index)
}

/// Which of a job's checkpoints `--resume-from` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selector {
    /// The best by the job's objective.
    Best,
    /// The one of the highest step.
    Latest,
    /// The one of this step.
    Step(u64),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Best => f.write_str("best"),
            Selector::Latest => f.write_str("latest"),
            Selector::Step(step) => write!(f, "step-{step}"),
        }
    }
}

/// A checkpoint of another job: `JOB@best`, `JOB@latest` or `JOB@step-N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRef {
    /// The job that wrote it.
    pub job_id: JobId,
    /// Which of its checkpoints.
    pub selector: Selector,
}

impl FromStr for CheckpointRef {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let expected = || {
            Error::InvalidArgument(format!(
                "resume_from: {}, expected JOB@best, JOB@latest or JOB@step-N",
                cohort_proto::text::excerpt(text)
            ))
        };
        let (job, selector) = text.split_once('@').ok_or_else(expected)?;
        let job_id = JobId::new(job).map_err(|_| expected())?;
        let selector = match selector {
            "best" => Selector::Best,
            "latest" => Selector::Latest,
            other => Selector::Step(
                other
                    .strip_prefix("step-")
                    .and_then(|digits| digits.parse().ok())
                    .ok_or_else(expected)?,
            ),
        };
        Ok(Self { job_id, selector })
    }
}

impl fmt::Display for CheckpointRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.job_id, self.selector)
    }
}

/// Resolves `selector` among a job's versions (only those still on disk), with `objective`
/// for [`Selector::Best`]; the error says what the job has instead.
pub fn resolve<'a>(
    reference: &CheckpointRef,
    versions: &'a [CheckpointVersion],
    objective: Objective,
) -> Result<&'a CheckpointVersion> {
    let kept: Vec<&CheckpointVersion> = versions.iter().filter(|v| !v.deleted).collect();
    let available = || {
        if kept.is_empty() {
            "it has no checkpoint on disk".to_owned()
        } else {
            let steps: Vec<String> = kept.iter().map(|v| v.step.to_string()).collect();
            format!("it has the checkpoints of steps {}", steps.join(", "))
        }
    };
    let found = match reference.selector {
        Selector::Latest => kept.last().copied(),
        Selector::Step(step) => kept.iter().copied().find(|v| v.step == step),
        Selector::Best => best(versions, objective).map(|index| &versions[index]),
    };
    found.ok_or_else(|| {
        let what = match reference.selector {
            Selector::Best => format!("no checkpoint with a {} to rank by", objective.metric),
            other => format!("no checkpoint {other}"),
        };
        Error::FailedPrecondition(format!(
            "resume_from {reference}: job {} has {what}; {}",
            reference.job_id,
            available()
        ))
    })
}

#[cfg(test)]
mod tests {
    use cohort_jobspec::objective::Mode;

    use super::*;

    fn version(step: u64, accuracy: Option<f64>) -> CheckpointVersion {
        CheckpointVersion {
            step,
            epoch: 0,
            attempt: 0,
            path: format!("/out/checkpoints/step-{step:08}"),
            bytes: 10,
            eval_loss: accuracy.map(|a| 1.0 - a),
            eval_accuracy: accuracy,
            written_at_ms: 0,
            deleted: false,
        }
    }

    fn reference(text: &str) -> CheckpointRef {
        text.parse().unwrap()
    }

    #[test]
    fn references_parse_and_print_and_bad_ones_are_refused() {
        assert_eq!(reference("mlp-3@best").selector, Selector::Best);
        assert_eq!(reference("mlp-3@latest").selector, Selector::Latest);
        assert_eq!(reference("mlp-3@step-40").selector, Selector::Step(40));
        assert_eq!(reference("mlp-3@step-40").to_string(), "mlp-3@step-40");
        for bad in [
            "mlp-3",
            "@best",
            "mlp-3@",
            "mlp-3@step-",
            "mlp-3@step-x",
            "a b@best",
        ] {
            let error = bad.parse::<CheckpointRef>().unwrap_err().to_string();
            assert!(error.contains("JOB@best"), "{bad}: {error}");
        }
    }

    #[test]
    fn best_latest_and_step_resolve_among_kept_versions() {
        let mut versions = Vec::new();
        for (step, accuracy) in [(20, 0.7), (40, 0.9), (60, 0.8), (80, 0.85)] {
            record(&mut versions, version(step, Some(accuracy)));
        }
        let accuracy = Objective::natural(Metric::EvalAccuracy);
        let resolve_step = |versions: &[CheckpointVersion], text: &str, objective| -> Result<u64> {
            resolve(&reference(text), versions, objective).map(|v| v.step)
        };
        assert_eq!(resolve_step(&versions, "j@best", accuracy).unwrap(), 40);
        assert_eq!(resolve_step(&versions, "j@latest", accuracy).unwrap(), 80);
        assert_eq!(resolve_step(&versions, "j@step-60", accuracy).unwrap(), 60);
        let loss = Objective::natural(Metric::EvalLoss);
        assert_eq!(resolve_step(&versions, "j@best", loss).unwrap(), 40);
        let worst = Objective::new(Metric::EvalAccuracy, Some(Mode::Min));
        assert_eq!(resolve_step(&versions, "j@best", worst).unwrap(), 20);
        // Deleted versions are neither best nor latest nor found by step.
        mark_deleted(&mut versions, &[40, 80]);
        assert_eq!(resolve_step(&versions, "j@best", accuracy).unwrap(), 60);
        assert_eq!(resolve_step(&versions, "j@latest", accuracy).unwrap(), 60);
        let error = resolve_step(&versions, "j@step-40", accuracy).unwrap_err();
        assert!(
            error.to_string().contains("steps 20, 60"),
            "{error}: names what is there"
        );
    }

    #[test]
    fn best_needs_a_metric_and_says_so() {
        let versions = vec![version(10, None), version(20, None)];
        let error = resolve(
            &reference("j@best"),
            &versions,
            Objective::natural(Metric::EvalAccuracy),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("no checkpoint with a eval_accuracy"),
            "{error}"
        );
        let error = resolve(&reference("j@latest"), &[], Objective::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("no checkpoint on disk"), "{error}");
    }

    #[test]
    fn recording_replaces_a_step_keeps_order_and_bounds_the_list() {
        let mut versions = Vec::new();
        record(&mut versions, version(40, None));
        record(&mut versions, version(20, None));
        record(&mut versions, version(40, Some(0.5)));
        let steps: Vec<u64> = versions.iter().map(|v| v.step).collect();
        assert_eq!(steps, [20, 40]);
        assert_eq!(versions[1].eval_accuracy, Some(0.5));
        let mut versions = Vec::new();
        for step in 1..=MAX_CHECKPOINT_VERSIONS as u64 {
            record(&mut versions, version(step, None));
        }
        mark_deleted(&mut versions, &[5]);
        record(&mut versions, version(100_000, None));
        assert_eq!(versions.len(), MAX_CHECKPOINT_VERSIONS);
        assert!(
            versions.iter().all(|v| v.step != 5),
            "a deleted one went first"
        );
        record(&mut versions, version(100_001, None));
        assert_eq!(versions[0].step, 2, "then the oldest");
    }
}
