//! Checkpoint retention (`checkpoint.keep_last`, `checkpoint.keep_best`): which checkpoints a
//! run deletes after writing one. The decision is the pure [`retention`]; `apply` lists the
//! directory, deletes what it says and reports it.
//!
//! Rules, over the complete checkpoints in the directory (whoever wrote them: a restarted run
//! prunes its earlier attempts' as well):
//! - with neither `keep_last` nor `keep_best` set, nothing is deleted;
//! - the `keep_last` newest are kept;
//! - the `keep_best` best by the job's objective are kept; only checkpoints with a recorded
//!   evaluation compete, non-finite values rank last, and of equal values the older ranks first
//!   (the one that reached it first, as early stopping counts);
//! - with early stopping on, the best one is kept even when `keep_best` is unset;
//! - the newest one (what a restart resumes from) and the protected ones (the one just written,
//!   early stopping's best) are always kept;
//! - everything else is deleted.

use std::collections::BTreeSet;
use std::path::Path;

use cohort_jobspec::objective::Objective;

use crate::checkpoint;
use crate::metrics::MetricsSink;

/// What a run keeps of its checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RetentionPolicy {
    /// Keeps this many newest checkpoints.
    pub keep_last: Option<u32>,
    /// Keeps this many best checkpoints by `objective`.
    pub keep_best: Option<u32>,
    /// What "best" means.
    pub objective: Objective,
    /// Keeps the best checkpoint even without `keep_best` (early stopping is on).
    pub keep_the_best: bool,
}

impl RetentionPolicy {
    /// Whether the policy ever deletes anything.
    pub fn deletes(&self) -> bool {
        self.keep_last.is_some() || self.keep_best.is_some()
    }
}

/// Returns the steps of the checkpoints to delete, lowest first, out of `checkpoints` (each a
/// step and its metric's value, if it recorded an evaluation), under `policy`, never deleting
/// one of `protected`.
pub fn retention(
    checkpoints: &[(u64, Option<f64>)],
    policy: &RetentionPolicy,
    protected: &[u64],
) -> Vec<u64> {
    if !policy.deletes() {
        return Vec::new();
    }
    let mut newest_first: Vec<u64> = checkpoints.iter().map(|(step, _)| *step).collect();
    newest_first.sort_unstable_by(|a, b| b.cmp(a));
    newest_first.dedup();
    let mut kept: BTreeSet<u64> = protected.iter().copied().collect();
    let last = policy.keep_last.unwrap_or(0).max(1) as usize;
    kept.extend(newest_first.iter().take(last));

    let mut ranked: Vec<(u64, f64)> = checkpoints
        .iter()
        .filter_map(|(step, value)| value.map(|value| (*step, value)))
        .collect();
    ranked.sort_by(|a, b| {
        policy
            .objective
            .best_first(a.1, b.1)
            .then_with(|| a.0.cmp(&b.0))
    });
    let best = policy
        .keep_best
        .unwrap_or(0)
        .max(u32::from(policy.keep_the_best)) as usize;
    kept.extend(ranked.iter().take(best).map(|(step, _)| *step));

    newest_first
        .into_iter()
        .rev()
        .filter(|step| !kept.contains(step))
        .collect()
}

/// Applies `policy` to the directory of the checkpoint just written at `written`: deletes the
/// checkpoints [`retention`] lets go (never one of `protected`) and reports each to `metrics`.
/// A listing or a deletion that fails is logged and does not fail the run.
pub(crate) fn apply(
    written: &Path,
    policy: &RetentionPolicy,
    protected: &[u64],
    metrics: &mut dyn MetricsSink,
) {
    if !policy.deletes() {
        return;
    }
    let Some(directory) = written.parent() else {
        return;
    };
    let entries = match checkpoint::list(directory) {
        Ok(entries) => entries,
        Err(error) => {
            tracing::warn!(%error, "cannot list the checkpoints for retention; none deleted");
            return;
        }
    };
    let metric = policy.objective.metric;
    let candidates: Vec<(u64, Option<f64>)> = entries
        .iter()
        .map(|entry| {
            let value = entry.evaluation.as_ref().map(|e| e.value(metric));
            (entry.step, value)
        })
        .collect();
    for step in retention(&candidates, policy, protected) {
        let Some(entry) = entries.iter().find(|entry| entry.step == step) else {
            continue;
        };
        match checkpoint::remove(&entry.path) {
            Ok(()) => {
                tracing::info!(step, path = %entry.path.display(), "checkpoint deleted by retention");
                metrics.on_checkpoint_deleted(step, &entry.path);
            }
            Err(error) => tracing::warn!(
                step,
                %error,
                "could not delete a checkpoint retention let go; training goes on"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use cohort_jobspec::objective::{Metric, Mode};
    use proptest::prelude::*;

    use super::*;

    fn policy(keep_last: Option<u32>, keep_best: Option<u32>) -> RetentionPolicy {
        RetentionPolicy {
            keep_last,
            keep_best,
            objective: Objective::natural(Metric::EvalLoss),
            keep_the_best: false,
        }
    }

    /// Checkpoints every 10 steps with these losses (`None`: not evaluated).
    fn losses(values: &[Option<f64>]) -> Vec<(u64, Option<f64>)> {
        values
            .iter()
            .enumerate()
            .map(|(i, value)| (10 * (i as u64 + 1), *value))
            .collect()
    }

    #[test]
    fn without_limits_nothing_is_deleted() {
        let checkpoints = losses(&[Some(0.5), Some(0.4), None]);
        assert!(retention(&checkpoints, &policy(None, None), &[30]).is_empty());
        let early_stopping = RetentionPolicy {
            keep_the_best: true,
            ..policy(None, None)
        };
        assert!(retention(&checkpoints, &early_stopping, &[30]).is_empty());
    }

    #[test]
    fn the_newest_and_the_best_are_kept() {
        let checkpoints = losses(&[
            Some(0.9),
            Some(0.3),
            Some(0.5),
            None,
            Some(0.2),
            Some(0.6),
            Some(0.7),
        ]);
        // keep_last 2: 60 and 70; keep_best 2: 50 (0.2) and 20 (0.3).
        assert_eq!(
            retention(&checkpoints, &policy(Some(2), Some(2)), &[70]),
            [10, 30, 40]
        );
        // keep_best alone: the best and the newest.
        assert_eq!(
            retention(&checkpoints, &policy(None, Some(1)), &[70]),
            [10, 20, 30, 40, 60]
        );
        // keep_last alone, with early stopping on: its best stays too.
        let early_stopping = RetentionPolicy {
            keep_the_best: true,
            ..policy(Some(1), None)
        };
        assert_eq!(
            retention(&checkpoints, &early_stopping, &[70]),
            [10, 20, 30, 40, 60]
        );
        // Protected checkpoints stay whatever they rank.
        assert_eq!(
            retention(&checkpoints, &policy(Some(1), None), &[10, 70]),
            [20, 30, 40, 50, 60]
        );
        // The best by the highest accuracy, ties to the older one, non-finite values last.
        let accuracy = RetentionPolicy {
            objective: Objective::new(Metric::EvalAccuracy, Some(Mode::Max)),
            ..policy(Some(1), Some(1))
        };
        let accuracies = losses(&[Some(0.8), Some(f64::NAN), Some(0.9), Some(0.9), Some(0.1)]);
        assert_eq!(retention(&accuracies, &accuracy, &[]), [10, 20, 40]);
    }

    /// Checkpoints: each a step and its metric's value, if evaluated.
    type Checkpoints = Vec<(u64, Option<f64>)>;

    /// A policy, checkpoints with distinct steps and the protected ones among them.
    fn case() -> impl Strategy<Value = (RetentionPolicy, Checkpoints, Vec<u64>)> {
        let value = prop_oneof![
            3 => (0u32..20).prop_map(|v| Some(f64::from(v) / 10.0)),
            1 => Just(None),
            1 => Just(Some(f64::NAN)),
        ];
        let checkpoints = proptest::collection::btree_map(0u64..200, value, 0..25)
            .prop_map(|map| map.into_iter().collect::<Vec<_>>());
        let policy = (
            proptest::option::of(1u32..6),
            proptest::option::of(1u32..6),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(keep_last, keep_best, accuracy, max, keep_the_best)| {
                let metric = if accuracy {
                    Metric::EvalAccuracy
                } else {
                    Metric::EvalLoss
                };
                RetentionPolicy {
                    keep_last,
                    keep_best,
                    objective: Objective::new(
                        metric,
                        Some(if max { Mode::Max } else { Mode::Min }),
                    ),
                    keep_the_best,
                }
            });
        (policy, checkpoints).prop_flat_map(|(policy, checkpoints)| {
            let steps: Vec<u64> = checkpoints.iter().map(|(step, _)| *step).collect();
            let protected = proptest::sample::subsequence(steps.clone(), 0..=steps.len().min(2));
            (Just(policy), Just(checkpoints), protected)
        })
    }

    proptest! {
        #[test]
        fn retention_keeps_exactly_what_its_rules_ask((policy, checkpoints, protected) in case()) {
            let deleted = retention(&checkpoints, &policy, &protected);
            let steps: BTreeSet<u64> = checkpoints.iter().map(|(step, _)| *step).collect();
            let kept: Checkpoints = checkpoints
                .iter()
                .filter(|(step, _)| !deleted.contains(step))
                .copied()
                .collect();
            // Deletions are real checkpoints, each once, in order.
            prop_assert!(deleted.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(deleted.iter().all(|step| steps.contains(step)));
            if !policy.deletes() {
                prop_assert!(deleted.is_empty());
            }
            // The newest and the protected ones stay.
            if let Some(newest) = steps.last() {
                prop_assert!(!deleted.contains(newest));
            }
            prop_assert!(protected.iter().all(|step| !deleted.contains(step)));
            // The keep_last newest stay.
            let last = policy.keep_last.unwrap_or(0) as usize;
            prop_assert!(steps.iter().rev().take(last).all(|step| !deleted.contains(step)));
            // No deleted checkpoint is better than one kept for being best: at least
            // `best` kept ones are at least as good as each deleted one with a value.
            let best = if policy.deletes() {
                policy.keep_best.unwrap_or(0).max(u32::from(policy.keep_the_best)) as usize
            } else {
                0
            };
            for (step, value) in &checkpoints {
                let (Some(value), true) = (value, deleted.contains(step)) else { continue };
                let as_good = kept
                    .iter()
                    .filter_map(|(_, kept_value)| *kept_value)
                    .filter(|kept_value| {
                        policy.objective.best_first(*kept_value, *value)
                            != std::cmp::Ordering::Greater
                    })
                    .count();
                prop_assert!(as_good >= best, "{step} deleted with {as_good} kept as good");
            }
            // Nothing is kept without a reason: at most the newest, the protected ones, the
            // keep_last newest and the best ones.
            if policy.deletes() {
                prop_assert!(kept.len() <= 1 + protected.len() + last + best);
            }
            // Applying it again to what is left deletes nothing more.
            prop_assert!(retention(&kept, &policy, &protected).is_empty());
        }
    }
}
