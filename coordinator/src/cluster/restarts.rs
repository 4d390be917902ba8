//! Restarts: what happens when an attempt of a job fails.
//!
//! While restarts remain (`fault_tolerance.max_restarts`), a failed attempt is not the job's
//! end: the job moves to `restarting`, every process of the attempt is stopped, and once all of
//! them are known to be gone the job queues again under the next attempt number. Waiting for
//! the whole gang to be gone keeps two attempts from ever running side by side (and a worker
//! never sees a start for a rank whose previous process it still supervises). The next attempt
//! is placed like any queued job, except on the node its failure was blamed on, which the job
//! keeps off for a back-off period that doubles with each further failure there: a bad node
//! cannot eat every restart. Each attempt's processes get a token of their own, so a process of
//! a failed attempt that still runs somewhere reaches nothing of the next one.
//!
//! The decisions (what the back-off is, which nodes are avoided now, which ended attempts keep
//! their placement) are pure functions at the end of this module, tested on their own.

use cohort_proto::text::truncate;
use cohort_proto::{JobId, NodeId};
use tracing::{info, warn};

use super::persistence::Written;
use super::{Cluster, State};
use crate::error::Result;
use crate::lifecycle::{JobState, transition};
use crate::limits::{MAX_ATTEMPT_NODES, MAX_REASON_BYTES};
use crate::model::{AttemptRecord, JobRecord, NodeBackoff, RankState, UnixMillis, now_ms};
use crate::placement::{self, QueuedJob};

impl Cluster {
    /// The attempt that runs job `job_id` failed for `reason` (blaming `failed_node`, if a node
    /// is to blame): restarts the job while restarts remain and the failure is `retryable`, else
    /// fails it for good. The records to store go on `writes`.
    pub(super) fn fail_attempt(
        &self,
        state: &mut State,
        job_id: &JobId,
        (reason, retryable): (String, bool),
        failed_node: Option<NodeId>,
        writes: &mut Vec<Written>,
    ) -> Result<()> {
        let Some(job) = state.live_mut(job_id) else {
            return Ok(());
        };
        if !job.record.state.runs_attempt() {
            return Ok(());
        }
        let record = &mut job.record;
        if !retryable || restarts_used(record) >= record.max_restarts {
            let reason = match (retryable, record.max_restarts) {
                (_, 0) => reason,
                (false, _) => format!(
                    "{reason} (not restarted: the job's input is at fault, and every attempt \
                     would fail the same way)"
                ),
                (true, restarts) => format!(
                    "{reason} (attempt {}; all {restarts} restarts used)",
                    record.attempt + 1
                ),
            };
            return self.finish_job(state, job_id, JobState::Failed, reason, writes);
        }
        let reason = truncate(&reason, MAX_REASON_BYTES).into_owned();
        let ended = ended_attempt(record, now_ms(), reason.clone(), failed_node);
        let why = format!(
            "restarting (attempt {} failed; {} of {} restarts used): {reason}",
            record.attempt + 1,
            restarts_used(record) + 1,
            record.max_restarts
        );
        self.restart(state, job_id, ended, why, writes)
    }

    /// Restarts job `job_id` on purpose, for `reason` (its node is drained, it grows back to
    /// its full size): its attempt is stopped (a training job's ranks checkpoint first) and the
    /// job restarted, using up no restart.
    pub(super) fn restart_planned(
        &self,
        state: &mut State,
        job_id: &JobId,
        reason: String,
        writes: &mut Vec<Written>,
    ) -> Result<()> {
        let Some(job) = state.live(job_id) else {
            return Ok(());
        };
        if !job.record.state.runs_attempt() {
            return Ok(());
        }
        let mut ended = ended_attempt(&job.record, now_ms(), reason.clone(), None);
        ended.planned = true;
        self.restart(
            state,
            job_id,
            ended,
            format!("restarting: {reason}"),
            writes,
        )
    }

    /// Ends the running attempt of job `job_id` as `ended` says and restarts the job (its
    /// reason meanwhile `why`): stops every process of the attempt and queues the next attempt
    /// once they are gone.
    fn restart(
        &self,
        state: &mut State,
        job_id: &JobId,
        ended: AttemptRecord,
        why: String,
        writes: &mut Vec<Written>,
    ) -> Result<()> {
        let Some(job) = state.live_mut(job_id) else {
            return Ok(());
        };
        let record = &mut job.record;
        record.state = transition(job_id.as_str(), record.state, JobState::Restarting)?;
        record.attempts.push(ended);
        forget_old_placements(&mut record.attempts);
        record.reason = truncate(&why, MAX_REASON_BYTES).into_owned();
        for rank in &mut record.placement {
            if rank.state == RankState::Pending {
                rank.state = RankState::Exited;
                rank.detail = "never started".to_owned();
            }
        }
        job.recovery = None;
        warn!(%job_id, attempt = job.record.attempt, reason = %job.record.reason, "attempt ended; restarting the job");
        writes.push(self.writes.put_job(&job.record));
        let stop_reason = job.record.reason.clone();
        state.stop_ranks(job_id, &stop_reason);
        self.rendezvous.drop_job(job_id);
        self.requeue_if_stopped(state, job_id, writes).map(drop)
    }

    /// Restarts every elastic job that runs on fewer ranks than it asks for once its whole gang
    /// fits again (counting the devices it holds itself, and keeping off the nodes it backs off
    /// from): a planned restart through a checkpoint, so that it grows back to its full size.
    pub(super) fn grow_back(&self, state: &mut State, writes: &mut Vec<Written>) -> Result<()> {
        let shrunk: Vec<JobId> = state
            .live_jobs()
            .filter(|job| {
                job.record.state == JobState::Running
                    && job.record.min_ranks > 0
                    && job.record.placement.len() < job.record.ranks as usize
            })
            .map(|job| job.record.id.clone())
            .collect();
        let now = now_ms();
        for job_id in shrunk {
            let Some(job) = state.live(&job_id) else {
                continue;
            };
            let record = &job.record;
            let mut view = state.cluster_view(false);
            for rank in &record.placement {
                if let Some(node) = view.nodes.iter_mut().find(|n| n.node_id == rank.node_id) {
                    let free = node.free.entry(record.device_kind).or_default();
                    free.extend(&rank.devices);
                    free.sort_unstable();
                }
            }
            let whole = QueuedJob {
                job_id: job_id.clone(),
                priority: record.priority,
                seq: record.seq,
                ranks: record.ranks,
                devices_per_rank: record.devices_per_rank,
                device_kind: record.device_kind,
                rank_group: job.spec.rank_group(),
                avoid_nodes: avoided_nodes(&record.backoff, now),
                min_ranks: 0,
            };
            if placement::place(&view, &[whole]).is_empty() {
                continue;
            }
            let reason = format!(
                "growing back from {} to {} ranks",
                record.placement.len(),
                record.ranks
            );
            self.restart_planned(state, &job_id, reason, writes)?;
        }
        Ok(())
    }

    /// Queues the next attempt of a restarting job once every process of its failed attempt is
    /// gone, blaming the failure on the process that failed first (the root cause, now that
    /// every echo of it has arrived) and keeping the job off that process's node for a while.
    /// Returns whether it queued the job (and enqueued its record on `writes`).
    pub(super) fn requeue_if_stopped(
        &self,
        state: &mut State,
        job_id: &JobId,
        writes: &mut Vec<Written>,
    ) -> Result<bool> {
        let backoff = self.config.restart_backoff;
        let Some(job) = state.live_mut(job_id) else {
            return Ok(false);
        };
        let record = &mut job.record;
        if record.state != JobState::Restarting
            || !record.placement.iter().all(|rank| rank.state.is_final())
        {
            return Ok(false);
        }
        let ranks = job.spec.ranks();
        if record.blamed_rank.is_some()
            && let Some(root) = super::jobs::earliest_failure(&record.placement, ranks)
            && let Some(ended) = record.attempts.last_mut()
        {
            ended.reason =
                truncate(&super::jobs::failure_reason(root, ranks), MAX_REASON_BYTES).into_owned();
            ended.failed_node = Some(root.node_id.clone());
        }
        let now = now_ms();
        if let Some(node) = record.attempts.last().and_then(|a| a.failed_node.clone()) {
            note_failure(&mut record.backoff, node, now, backoff);
        }
        record.state = transition(job_id.as_str(), record.state, JobState::Queued)?;
        record.attempt += 1;
        record.placement.clear();
        // The failed attempt's figures; the next one reports its own from its first step.
        record.metrics.clear();
        record.blamed_rank = None;
        record.scheduled_at_ms = None;
        record.started_at_ms = None;
        let avoided = avoided_nodes(&record.backoff, now);
        let last = record.attempts.last().map_or("", |a| a.reason.as_str());
        record.reason = truncate(
            &format!(
                "attempt {} queued after: {last}{}",
                record.attempt + 1,
                describe_avoided(&record.backoff, &avoided, now)
            ),
            MAX_REASON_BYTES,
        )
        .into_owned();
        info!(%job_id, attempt = record.attempt, avoided = ?avoided, "job queued for its next attempt");
        writes.push(self.writes.put_job(&job.record));
        self.wake.notify_one();
        Ok(true)
    }
}

/// The restarts a job has used: its attempts that ended in a failure (not the planned ones).
pub fn restarts_used(job: &JobRecord) -> u32 {
    let failed = job
        .attempts
        .iter()
        .filter(|attempt| !attempt.planned)
        .count();
    u32::try_from(failed).unwrap_or(u32::MAX)
}

/// The record of `job`'s current attempt, ended at `now` for `reason`.
pub(super) fn ended_attempt(
    job: &JobRecord,
    now: UnixMillis,
    reason: String,
    failed_node: Option<NodeId>,
) -> AttemptRecord {
    let mut nodes: Vec<NodeId> = job
        .placement
        .iter()
        .map(|rank| rank.node_id.clone())
        .collect();
    nodes.sort();
    nodes.dedup();
    AttemptRecord {
        attempt: job.attempt,
        nodes,
        started_at_ms: job.started_at_ms,
        ended_at_ms: now,
        reason,
        planned: false,
        failed_node,
    }
}

/// Keeps the nodes of the latest ended attempts while they add up to at most
/// [`MAX_ATTEMPT_NODES`] and forgets older ones', so that a job's record stays bounded however
/// wide it is and however often it restarts.
pub(super) fn forget_old_placements(attempts: &mut [AttemptRecord]) {
    let mut kept = 0usize;
    for attempt in attempts.iter_mut().rev() {
        kept = kept.saturating_add(attempt.nodes.len());
        if kept > MAX_ATTEMPT_NODES {
            attempt.nodes = Vec::new();
        }
    }
}

/// How long a job keeps off a node after its `failures`-th failure there: `base`, doubled for
/// each earlier one, at most [`crate::config::MAX_RESTART_BACKOFF`].
pub fn backoff_after(base: std::time::Duration, failures: u32) -> std::time::Duration {
    let doublings = failures.saturating_sub(1).min(16);
    base.saturating_mul(1 << doublings)
        .min(crate::config::MAX_RESTART_BACKOFF)
}

/// Records a failure of the job on `node` at `now`: it keeps off the node for the back-off its
/// failures there have earned.
pub fn note_failure(
    backoff: &mut Vec<NodeBackoff>,
    node: NodeId,
    now: UnixMillis,
    base: std::time::Duration,
) {
    let entry = match backoff.iter().position(|entry| entry.node_id == node) {
        Some(index) => &mut backoff[index],
        None => {
            backoff.push(NodeBackoff {
                node_id: node,
                failures: 0,
                until_ms: now,
            });
            backoff.last_mut().expect("just pushed")
        }
    };
    entry.failures = entry.failures.saturating_add(1);
    let wait = backoff_after(base, entry.failures);
    entry.until_ms = now.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
}

/// The nodes a job keeps off at `now`.
pub fn avoided_nodes(backoff: &[NodeBackoff], now: UnixMillis) -> Vec<NodeId> {
    backoff
        .iter()
        .filter(|entry| entry.until_ms > now)
        .map(|entry| entry.node_id.clone())
        .collect()
}

/// `; keeping off node n2 for 10 s`, or nothing when no node is avoided.
fn describe_avoided(backoff: &[NodeBackoff], avoided: &[NodeId], now: UnixMillis) -> String {
    let parts: Vec<String> = backoff
        .iter()
        .filter(|entry| avoided.contains(&entry.node_id))
        .map(|entry| {
            let seconds = (entry.until_ms - now).max(0) as f64 / 1000.0;
            format!("node {} for {seconds:.0} s", entry.node_id)
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("; keeping off {}", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    #[test]
    fn the_backoff_doubles_with_each_failure_on_a_node_and_is_capped() {
        let base = Duration::from_secs(10);
        assert_eq!(backoff_after(base, 1), Duration::from_secs(10));
        assert_eq!(backoff_after(base, 2), Duration::from_secs(20));
        assert_eq!(backoff_after(base, 3), Duration::from_secs(40));
        assert_eq!(backoff_after(base, 50), crate::config::MAX_RESTART_BACKOFF);
        assert_eq!(backoff_after(Duration::ZERO, 3), Duration::ZERO);
    }

    #[test]
    fn a_node_is_avoided_until_its_backoff_ends_and_failures_add_up_per_node() {
        let base = Duration::from_secs(10);
        let mut backoff = Vec::new();
        note_failure(&mut backoff, node("a"), 1_000, base);
        note_failure(&mut backoff, node("b"), 1_000, base);
        note_failure(&mut backoff, node("a"), 2_000, base);
        assert_eq!(backoff.len(), 2);
        assert_eq!(backoff[0].failures, 2);
        assert_eq!(backoff[0].until_ms, 22_000);
        assert_eq!(backoff[1].until_ms, 11_000);
        assert_eq!(avoided_nodes(&backoff, 10_999), [node("a"), node("b")]);
        assert_eq!(avoided_nodes(&backoff, 11_000), [node("a")]);
        assert!(avoided_nodes(&backoff, 22_000).is_empty());
        assert_eq!(
            describe_avoided(&backoff, &avoided_nodes(&backoff, 12_000), 12_000),
            "; keeping off node a for 10 s"
        );
    }

    #[test]
    fn the_latest_attempts_keep_their_nodes_while_they_fit_the_bound() {
        let attempt = |number, nodes: usize| AttemptRecord {
            attempt: number,
            nodes: (0..nodes).map(|index| node(&format!("n{index}"))).collect(),
            started_at_ms: None,
            ended_at_ms: 0,
            reason: String::new(),
            planned: false,
            failed_node: None,
        };
        // A job on a few nodes keeps every attempt's.
        let mut small: Vec<_> = (0..101).map(|number| attempt(number, 4)).collect();
        forget_old_placements(&mut small);
        assert!(small.iter().all(|a| a.nodes.len() == 4));
        // The widest job keeps its last attempt's alone.
        let half = MAX_ATTEMPT_NODES / 2;
        let mut wide = vec![attempt(0, half), attempt(1, half + 1), attempt(2, half)];
        forget_old_placements(&mut wide);
        let kept: Vec<usize> = wide.iter().map(|a| a.nodes.len()).collect();
        assert_eq!(kept, [0, 0, half]);
    }
}
