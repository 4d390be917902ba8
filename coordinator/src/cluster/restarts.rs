//! Restarts: what happens when an attempt of a job fails, or is ended on purpose.
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
//! An attempt also ends on purpose (a *planned* restart, which uses up no restart): when its
//! node is drained, when an elastic job running on fewer ranks than it asks for can have its
//! whole gang again (`grow_back`), and when a queued job of higher priority preempts it
//! (`preempt`; the next attempt is protected from preemption for a while). Its ranks are stopped with SIGTERM, which a data-parallel
//! training rank takes as a request to checkpoint first.
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
use crate::model::{AttemptRecord, JobRecord, NodeBackoff, UnixMillis, now_ms};
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

    /// Preempts running job `job_id` for the queued job `preemptor` of higher priority: a
    /// planned restart (it uses up no restart) whose ranks are stopped with SIGTERM, which a
    /// job that checkpoints when asked takes as the cue to write one; once they are gone the
    /// job queues again and resumes from its latest checkpoint when it is placed.
    pub(super) fn preempt(
        &self,
        state: &mut State,
        job_id: &JobId,
        preemptor: &JobId,
        preemptor_priority: i32,
        writes: &mut Vec<Written>,
    ) -> Result<()> {
        let Some(job) = state.live(job_id) else {
            return Ok(());
        };
        if job.record.state != JobState::Running {
            return Ok(());
        }
        let reason = format!(
            "preempted by job {preemptor} (priority {preemptor_priority} over {})",
            job.record.priority
        );
        let resumes = if job.spec.checkpoints_when_stopped() {
            "it checkpoints, then queues again to resume from that checkpoint"
        } else {
            "it queues again to resume from its latest checkpoint"
        };
        let mut ended = ended_attempt(&job.record, now_ms(), reason.clone(), None);
        ended.planned = true;
        ended.preempted_by = Some(preemptor.clone());
        info!(%job_id, %preemptor, "job preempted");
        self.restart(state, job_id, ended, format!("{reason}; {resumes}"), writes)
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
        super::mark_never_started(&mut record.placement);
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
        if shrunk.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        // Built once per pass: a planned restart below frees nothing until its ranks are gone.
        let free_now = state.cluster_view(false);
        for job_id in shrunk {
            let Some(job) = state.live(&job_id) else {
                continue;
            };
            let record = &job.record;
            let mut view = free_now.clone();
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
                owner: placement::Owner {
                    queue: job.spec.queue().to_owned(),
                    user: record.submitter.clone(),
                },
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

/// Whether job `job` is protected from preemption at `now`: its current attempt follows a
/// preemption and has not yet run for `min_runtime` (an attempt not yet started counts as not
/// having run).
pub fn protected_from_preemption(
    job: &JobRecord,
    now: UnixMillis,
    min_runtime: std::time::Duration,
) -> bool {
    let min_runtime_ms = i64::try_from(min_runtime.as_millis()).unwrap_or(i64::MAX);
    job.attempts
        .last()
        .is_some_and(|attempt| attempt.preempted_by.is_some())
        && job
            .started_at_ms
            .is_none_or(|started| now.saturating_sub(started) < min_runtime_ms)
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
        preempted_by: None,
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
    fn only_an_attempt_after_a_preemption_is_protected_and_only_for_the_minimum_run_time() {
        let mut job = crate::store::conformance::sample_job(1);
        let minute = Duration::from_secs(60);
        job.started_at_ms = Some(1_000_000);
        job.attempts.last_mut().unwrap().preempted_by = None;
        assert!(!protected_from_preemption(&job, 1_000_001, minute));
        job.attempts.last_mut().unwrap().preempted_by = Some(JobId::new("urgent-1").unwrap());
        assert!(protected_from_preemption(&job, 1_059_999, minute));
        assert!(!protected_from_preemption(&job, 1_060_000, minute));
        job.started_at_ms = None;
        assert!(
            protected_from_preemption(&job, i64::MAX, minute),
            "not started yet"
        );
        job.started_at_ms = Some(1_000_000);
        assert!(!protected_from_preemption(&job, 1_000_000, Duration::ZERO));
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
            preempted_by: None,
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

/// Restarts through the coordinator core, with test nodes standing in for workers.
#[cfg(test)]
mod cluster_tests {
    use std::time::Duration;

    use cohort_proto::v1;
    use cohort_proto::{JobId, NodeId};

    use super::super::testing::{TestNode, cluster, cluster_with, record_of, report_each};
    use super::*;
    use crate::config::CoordinatorConfig;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_attempt_restarts_away_from_its_node_until_restarts_run_out() {
        let data_dir = tempfile::tempdir().unwrap();
        let (cluster, _store) = cluster(data_dir.path()).await;
        let mut nodes = Vec::new();
        for id in ["node-a", "node-b", "node-c"] {
            nodes.push(TestNode::join(&cluster, id).await);
        }
        let spec = "version = 1\nname = \"flaky\"\nkind = \"command\"\n[resources]\nranks = 2\n\
                    [command]\nprogram = \"true\"\n[fault_tolerance]\nmax_restarts = 1\n";
        let job = cluster
            .submit(spec.to_owned(), false, "client".to_owned())
            .await
            .unwrap();
        let job_id = JobId::new(job.job_id).unwrap();
        cluster.schedule().await.unwrap();
        let placed = record_of(&cluster, &job_id).await.placement;
        let ids = ["node-a", "node-b", "node-c"];
        let node_of = |rank: u32, placement: &[crate::model::RankRecord]| {
            let id = &placement[rank as usize].node_id;
            ids.iter().position(|node| *node == id.as_str()).unwrap()
        };
        let (first, second) = (node_of(0, &placed), node_of(1, &placed));
        assert_eq!(nodes[first].started(), [(0, 0)]);
        assert_eq!(nodes[second].started(), [(1, 0)]);
        nodes[first]
            .report(&cluster, &job_id, (0, 0), v1::RankState::Running, None)
            .await;
        nodes[second]
            .report(&cluster, &job_id, (1, 0), v1::RankState::Running, None)
            .await;
        assert_eq!(record_of(&cluster, &job_id).await.state, JobState::Running);

        // Rank 1 fails: the attempt is stopped, and the job waits for rank 0 to be gone.
        nodes[second]
            .report(&cluster, &job_id, (1, 0), v1::RankState::Exited, Some(3))
            .await;
        let restarting = record_of(&cluster, &job_id).await;
        assert_eq!(restarting.state, JobState::Restarting);
        assert!(
            restarting.reason.contains("exited with code 3"),
            "{}",
            restarting.reason
        );
        assert!(
            cluster.check_live(&job_id).await.is_err(),
            "no rendezvous between attempts"
        );
        nodes[first]
            .report(&cluster, &job_id, (0, 0), v1::RankState::Exited, Some(143))
            .await;
        let queued = record_of(&cluster, &job_id).await;
        assert_eq!(queued.state, JobState::Queued);
        assert_eq!(queued.attempt, 1);
        assert!(queued.placement.is_empty());
        assert_eq!(queued.attempts.len(), 1);
        let failed_node = nodes[second].id.clone();
        assert_eq!(
            queued.attempts[0].failed_node.as_ref().map(NodeId::as_str),
            Some(failed_node.as_str()),
            "the rank that failed first is blamed, not the one stopped after it"
        );
        assert!(
            queued
                .reason
                .contains(&format!("keeping off node {failed_node}")),
            "{}",
            queued.reason
        );

        // The next attempt is placed away from the node it failed on, under attempt 1.
        cluster.schedule().await.unwrap();
        let replaced = record_of(&cluster, &job_id).await;
        assert_eq!(replaced.state, JobState::Scheduled);
        assert!(
            replaced
                .placement
                .iter()
                .all(|rank| rank.node_id.as_str() != failed_node)
        );
        let started: Vec<_> = nodes.iter_mut().flat_map(TestNode::started).collect();
        assert_eq!(started.len(), 2);
        assert!(
            started.iter().all(|&(_, attempt)| attempt == 1),
            "{started:?}"
        );
        // A late report of the first attempt changes nothing.
        let (third, fourth) = (
            node_of(0, &replaced.placement),
            node_of(1, &replaced.placement),
        );
        nodes[second]
            .report(&cluster, &job_id, (1, 0), v1::RankState::Exited, Some(3))
            .await;
        assert_eq!(
            record_of(&cluster, &job_id).await.state,
            JobState::Scheduled
        );

        // The second attempt fails too: no restart is left.
        nodes[third]
            .report(&cluster, &job_id, (0, 1), v1::RankState::Exited, Some(1))
            .await;
        nodes[fourth]
            .report(&cluster, &job_id, (1, 1), v1::RankState::Exited, Some(143))
            .await;
        let info = cluster.job(&job_id).await.unwrap();
        assert_eq!(info.state(), v1::JobState::Failed);
        assert!(
            info.reason.contains("all 1 restarts used"),
            "{}",
            info.reason
        );
        assert_eq!(info.attempt, 1);
        let reasons: Vec<_> = info
            .attempts
            .iter()
            .map(|a| (a.attempt, a.reason.clone()))
            .collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons[0].1.contains("exited with code 3"), "{reasons:?}");
        assert!(reasons[1].1.contains("exited with code 1"), "{reasons:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drained_node_takes_no_work_and_its_jobs_move_off_it_without_using_a_restart() {
        let data_dir = tempfile::tempdir().unwrap();
        let (cluster, _store) = cluster(data_dir.path()).await;
        let mut a = TestNode::join(&cluster, "node-a").await;
        let mut b = TestNode::join(&cluster, "node-b").await;
        let submit = |name: &str, restarts: u32| {
            let spec = format!(
                "version = 1\nname = \"{name}\"\nkind = \"command\"\n[command]\n\
                 program = \"true\"\n[fault_tolerance]\nmax_restarts = {restarts}\n"
            );
            let cluster = cluster.clone();
            async move {
                let job = cluster
                    .submit(spec, false, "client".to_owned())
                    .await
                    .unwrap();
                JobId::new(job.job_id).unwrap()
            }
        };
        let movable = submit("movable", 1).await;
        let staying = submit("staying", 0).await;
        cluster.schedule().await.unwrap();
        let on_a = record_of(&cluster, &movable).await.placement[0]
            .node_id
            .clone();
        let (first, second) = if on_a.as_str() == "node-a" {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        assert_eq!(first.started(), [(0, 0)]);
        assert_eq!(second.started(), [(0, 0)]);
        first
            .report(&cluster, &movable, (0, 0), v1::RankState::Running, None)
            .await;
        second
            .report(&cluster, &staying, (0, 0), v1::RankState::Running, None)
            .await;

        let drained = NodeId::new(first.id.clone()).unwrap();
        let response = cluster.drain(&drained, false).await.unwrap();
        assert_eq!(response.moved_jobs, [movable.to_string()]);
        assert!(response.staying_jobs.is_empty());
        let restarting = record_of(&cluster, &movable).await;
        assert_eq!(restarting.state, JobState::Restarting);
        assert!(restarting.attempts[0].planned);
        // The rank stops with its checkpoint; the job queues, and waits: the only free node is
        // drained, the other one busy.
        let checkpointed = i32::from(cohort_proto::launch::EXIT_STOPPED_WITH_CHECKPOINT);
        first
            .report(
                &cluster,
                &movable,
                (0, 0),
                v1::RankState::Exited,
                Some(checkpointed),
            )
            .await;
        cluster.schedule().await.unwrap();
        assert_eq!(record_of(&cluster, &movable).await.state, JobState::Queued);
        assert!(
            first.started().is_empty(),
            "nothing is placed on a drained node"
        );
        let nodes = cluster.nodes().await;
        assert!(
            nodes
                .iter()
                .any(|n| n.node_id == drained.as_str() && n.draining)
        );

        // The other node frees up: the job moves there, and still has its restart.
        second
            .report(&cluster, &staying, (0, 0), v1::RankState::Exited, Some(0))
            .await;
        cluster.schedule().await.unwrap();
        assert_eq!(second.started(), [(0, 1)]);
        second
            .report(&cluster, &movable, (0, 1), v1::RankState::Exited, Some(1))
            .await;
        let after_failure = record_of(&cluster, &movable).await;
        assert_eq!(
            after_failure.state,
            JobState::Queued,
            "the planned restart used no restart: {}",
            after_failure.reason
        );

        // Taken back, the node takes work again.
        cluster.drain(&drained, true).await.unwrap();
        cluster.schedule().await.unwrap();
        assert_eq!(first.started(), [(0, 2)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_higher_priority_job_preempts_one_that_resumes_after_it_and_is_then_protected() {
        let data_dir = tempfile::tempdir().unwrap();
        let (cluster, _store) = cluster(data_dir.path()).await;
        let nodes = [
            TestNode::join(&cluster, "node-a").await,
            TestNode::join(&cluster, "node-b").await,
        ];
        let submit = |name: &str, priority: i32, ranks: u32| {
            let spec = format!(
                "version = 1\nname = \"{name}\"\nkind = \"command\"\npriority = {priority}\n\
                 preemptible = true\n[resources]\nranks = {ranks}\n[command]\nprogram = \"true\"\n"
            );
            let cluster = cluster.clone();
            async move {
                let job = cluster
                    .submit(spec, false, "client".to_owned())
                    .await
                    .unwrap();
                JobId::new(job.job_id).unwrap()
            }
        };
        let low = submit("low", 0, 2).await;
        cluster.schedule().await.unwrap();
        let placement = record_of(&cluster, &low).await.placement;
        report_each(
            &cluster,
            &nodes,
            &low,
            &placement,
            (0, v1::RankState::Running, None),
        )
        .await;

        // The urgent job needs one of the two slots: the low one is preempted whole.
        let urgent = submit("urgent", 100, 1).await;
        cluster.schedule().await.unwrap();
        let preempted = record_of(&cluster, &low).await;
        assert_eq!(preempted.state, JobState::Restarting);
        assert!(preempted.attempts[0].planned);
        assert_eq!(preempted.attempts[0].preempted_by.as_ref(), Some(&urgent));
        assert!(
            preempted
                .reason
                .starts_with("preempted by job urgent-2 (priority 100 over 0)"),
            "{}",
            preempted.reason
        );
        let waiting = cluster.job(&urgent).await.unwrap().waiting;
        assert_eq!(
            waiting,
            format!("waiting for the job it preempted to checkpoint and stop: {low}")
        );
        // A job of middle priority submitted meanwhile takes nothing from a job already
        // stopping, and preempts nothing else (there is nothing else).
        let middle = submit("middle", 50, 1).await;
        cluster.schedule().await.unwrap();
        assert_eq!(record_of(&cluster, &middle).await.state, JobState::Queued);

        // The preempted ranks stop: the urgent job starts, the middle one takes the other slot,
        // and the preempted job queues for its next attempt, using no restart.
        report_each(
            &cluster,
            &nodes,
            &low,
            &placement,
            (0, v1::RankState::Exited, Some(143)),
        )
        .await;
        cluster.schedule().await.unwrap();
        assert_eq!(
            record_of(&cluster, &urgent).await.state,
            JobState::Scheduled
        );
        assert_eq!(
            record_of(&cluster, &middle).await.state,
            JobState::Scheduled
        );
        let requeued = record_of(&cluster, &low).await;
        assert_eq!((requeued.state, requeued.attempt), (JobState::Queued, 1));
        assert_eq!(restarts_used(&requeued), 0);
        let waiting = cluster.job(&low).await.unwrap().waiting;
        assert_eq!(
            waiting,
            "jobs of higher priority or of a lower fair share took the free devices first"
        );

        // Both finish; the preempted job runs again, and is protected from the next urgent job
        // for the minimum run time.
        for job in [&urgent, &middle] {
            let placement = record_of(&cluster, job).await.placement;
            report_each(
                &cluster,
                &nodes,
                job,
                &placement,
                (0, v1::RankState::Exited, Some(0)),
            )
            .await;
        }
        cluster.schedule().await.unwrap();
        let resumed = record_of(&cluster, &low).await;
        assert_eq!(resumed.state, JobState::Scheduled);
        report_each(
            &cluster,
            &nodes,
            &low,
            &resumed.placement,
            (1, v1::RankState::Running, None),
        )
        .await;
        let again = submit("again", 100, 1).await;
        cluster.schedule().await.unwrap();
        assert_eq!(record_of(&cluster, &low).await.state, JobState::Running);
        assert_eq!(record_of(&cluster, &again).await.state, JobState::Queued);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_elastic_job_restarts_on_the_ranks_that_fit_and_grows_back_when_it_can() {
        let data_dir = tempfile::tempdir().unwrap();
        // No back-off: the node that left may take the job's rank again as soon as it is back.
        let config = CoordinatorConfig {
            data_dir: data_dir.path().to_owned(),
            restart_backoff: Duration::ZERO,
            ..CoordinatorConfig::default()
        };
        let (cluster, _store) = cluster_with(data_dir.path(), config).await;
        let mut nodes = Vec::new();
        for id in ["node-a", "node-b", "node-c"] {
            nodes.push(TestNode::join(&cluster, id).await);
        }
        let spec = "version = 1\nname = \"elastic\"\nkind = \"train\"\n[parallel]\ndata = 3\n\
                    [fault_tolerance]\nmax_restarts = 1\nmin_ranks = 2\n";
        let job = cluster
            .submit(spec.to_owned(), false, "client".to_owned())
            .await
            .unwrap();
        let job_id = JobId::new(job.job_id).unwrap();
        cluster.schedule().await.unwrap();
        let placed = record_of(&cluster, &job_id).await.placement;
        let index_of = |id: &NodeId| {
            ["node-a", "node-b", "node-c"]
                .iter()
                .position(|n| *n == id.as_str())
                .unwrap()
        };
        report_each(
            &cluster,
            &nodes,
            &job_id,
            &placed,
            (0, v1::RankState::Running, None),
        )
        .await;

        // The worker of rank 2's node shuts down: its rank is stopped, and the node leaves.
        let leaving = index_of(&placed[2].node_id);
        let accepted = cluster
            .heartbeat(v1::HeartbeatRequest {
                node_id: nodes[leaving].id.clone(),
                session_id: nodes[leaving].session_id.clone(),
                ranks: vec![v1::RankReport {
                    job_id: job_id.to_string(),
                    rank: 2,
                    state: v1::RankState::Exited as i32,
                    signal: Some(15),
                    exited_at_unix_ms: now_ms(),
                    stop_cause: v1::StopCause::WorkerShutdown as i32,
                    ..v1::RankReport::default()
                }],
                leaving: true,
            })
            .await
            .unwrap();
        assert!(accepted);
        report_each(
            &cluster,
            &nodes,
            &job_id,
            &placed[..2],
            (0, v1::RankState::Exited, Some(143)),
        )
        .await;
        // Two nodes are left: the restart runs on 2 of the 3 ranks.
        cluster.schedule().await.unwrap();
        let shrunk = record_of(&cluster, &job_id).await;
        assert_eq!(shrunk.state, JobState::Scheduled);
        assert_eq!(shrunk.placement.len(), 2);
        report_each(
            &cluster,
            &nodes,
            &job_id,
            &shrunk.placement,
            (1, v1::RankState::Running, None),
        )
        .await;
        cluster.schedule().await.unwrap();
        assert_eq!(
            record_of(&cluster, &job_id).await.state,
            JobState::Running,
            "nothing to grow into"
        );

        // The node comes back: the job grows back through a planned restart, using no restart.
        nodes[leaving] = TestNode::join(&cluster, ["node-a", "node-b", "node-c"][leaving]).await;
        cluster.schedule().await.unwrap();
        let growing = record_of(&cluster, &job_id).await;
        assert_eq!(growing.state, JobState::Restarting);
        assert!(
            growing.reason.contains("growing back from 2 to 3 ranks"),
            "{}",
            growing.reason
        );
        let checkpointed = i32::from(cohort_proto::launch::EXIT_STOPPED_WITH_CHECKPOINT);
        report_each(
            &cluster,
            &nodes,
            &job_id,
            &shrunk.placement,
            (1, v1::RankState::Exited, Some(checkpointed)),
        )
        .await;
        cluster.schedule().await.unwrap();
        let whole = record_of(&cluster, &job_id).await;
        assert_eq!(whole.placement.len(), 3);
        assert_eq!(whole.attempt, 2);
        assert_eq!(restarts_used(&whole), 1, "the growth was planned");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_whose_input_is_at_fault_is_not_restarted() {
        let data_dir = tempfile::tempdir().unwrap();
        let (cluster, _store) = cluster(data_dir.path()).await;
        let node = TestNode::join(&cluster, "node-a").await;
        let spec = "version = 1\nname = \"bad-input\"\nkind = \"command\"\n\
                    [command]\nprogram = \"true\"\n[fault_tolerance]\nmax_restarts = 3\n";
        let job = cluster
            .submit(spec.to_owned(), false, "client".to_owned())
            .await
            .unwrap();
        let job_id = JobId::new(job.job_id).unwrap();
        cluster.schedule().await.unwrap();
        let input_error = i32::from(cohort_proto::launch::EXIT_INPUT_ERROR);
        node.report(
            &cluster,
            &job_id,
            (0, 0),
            v1::RankState::Exited,
            Some(input_error),
        )
        .await;
        let info = cluster.job(&job_id).await.unwrap();
        assert_eq!(info.state(), v1::JobState::Failed);
        assert!(info.reason.contains("not restarted"), "{}", info.reason);
        assert_eq!(info.attempt, 0);
    }
}
