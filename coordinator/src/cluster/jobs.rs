//! Job operations: submission, cancellation, inspection, metrics, and job outcomes decided from
//! rank reports.

use cohort_proto::v1::{JobInfo, RankReport};
use cohort_proto::{JobId, NodeId};
use tracing::{info, instrument};

use super::{Cluster, JobEntry, State};
use crate::convert;
use crate::error::{Error, Result};
use crate::lifecycle::JobState;
use crate::model::{JobRecord, MetricsRecord, ProcessRole, RankRecord, RankState, now_ms};
use crate::placement::{self, QueuedJob};

impl Cluster {
    /// Validates a spec, refuses a job that could never fit (unless `wait_for_resources`),
    /// stores it as queued and wakes the scheduler.
    #[instrument(skip(self, spec_toml))]
    pub async fn submit(&self, spec_toml: String, wait_for_resources: bool) -> Result<JobInfo> {
        let spec = cohort_spec::parse(&spec_toml)?;
        let mut state = self.state.lock().await;
        let queued = QueuedJob {
            job_id: JobId::new("candidate")?,
            priority: spec.priority,
            seq: 0,
            ranks: spec.processes(),
            devices_per_rank: spec.resources.devices_per_rank,
            device_kind: spec.resources.device,
            rank_group: spec.rank_group(),
        };
        if !wait_for_resources {
            let view = state.cluster_view(false);
            placement::check_could_ever_fit(&view, &queued).map_err(|why| {
                Error::Unschedulable(format!(
                    "{why}; submit with --wait-for-resources to queue it until the cluster grows"
                ))
            })?;
        }
        let seq = self.store.next_job_seq().await?;
        let id = JobId::new(format!("{}-{seq}", spec.name))?;
        let record = JobRecord {
            id: id.clone(),
            seq,
            spec_toml,
            name: spec.name.clone(),
            kind: convert::kind_name(spec.kind).to_owned(),
            priority: spec.priority,
            ranks: spec.processes(),
            devices_per_rank: spec.resources.devices_per_rank,
            device_kind: spec.resources.device,
            wait_for_resources,
            state: JobState::Queued,
            reason: String::new(),
            blamed_rank: None,
            submitted_at_ms: now_ms(),
            scheduled_at_ms: None,
            started_at_ms: None,
            finished_at_ms: None,
            placement: Vec::new(),
            metrics: Default::default(),
        };
        self.store.put_job(&record).await?;
        info!(job_id = %id, ranks = record.ranks, priority = record.priority, "job queued");
        let entry = JobEntry {
            record,
            spec,
            recovery: None,
        };
        self.publish(&entry);
        let info = convert::job_info(&entry.record);
        state.jobs.insert(id, entry);
        drop(state);
        self.wake.notify_one();
        Ok(info)
    }

    /// Returns one job.
    pub async fn job(&self, job_id: &JobId) -> Result<JobInfo> {
        let state = self.state.lock().await;
        state
            .jobs
            .get(job_id)
            .map(|entry| convert::job_info(&entry.record))
            .ok_or_else(|| Error::JobNotFound(job_id.to_string()))
    }

    /// Returns every job, oldest first.
    pub async fn jobs(&self) -> Vec<JobInfo> {
        let state = self.state.lock().await;
        let mut jobs: Vec<_> = state.jobs.values().map(|e| &e.record).collect();
        jobs.sort_by_key(|record| record.seq);
        jobs.into_iter().map(convert::job_info).collect()
    }

    /// Cancels a job that has not ended: marks it cancelled and stops its ranks (SIGTERM, then
    /// SIGKILL after the job's grace period, done by the workers).
    #[instrument(skip(self), fields(%job_id))]
    pub async fn cancel(&self, job_id: &JobId) -> Result<JobInfo> {
        let mut state = self.state.lock().await;
        let entry = state
            .jobs
            .get(job_id)
            .ok_or_else(|| Error::JobNotFound(job_id.to_string()))?;
        if entry.record.state.is_terminal() {
            return Err(Error::FailedPrecondition(format!(
                "job {job_id} already {}",
                entry.record.state.name()
            )));
        }
        self.finish_job(
            &mut state,
            job_id,
            JobState::Cancelled,
            "cancelled by user".to_owned(),
        )
        .await?;
        Ok(convert::job_info(&state.jobs[job_id].record))
    }

    /// Records a rank's latest metrics and publishes them to watchers. Kept in memory and
    /// persisted with the job's next change.
    pub async fn report_metrics(
        &self,
        job_id: &JobId,
        metrics: MetricsRecord,
        rank: u32,
    ) -> Result<()> {
        let mut state = self.state.lock().await;
        let entry = state
            .jobs
            .get_mut(job_id)
            .ok_or_else(|| Error::JobNotFound(job_id.to_string()))?;
        if rank >= entry.record.ranks {
            return Err(Error::InvalidArgument(format!(
                "metrics.rank = {rank}, expected below the job's {} ranks",
                entry.record.ranks
            )));
        }
        if !entry.record.state.holds_devices() {
            return Err(Error::FailedPrecondition(format!(
                "job {job_id} is {}, not running",
                entry.record.state.name()
            )));
        }
        entry.record.metrics.insert(rank, metrics);
        self.publish(entry);
        Ok(())
    }

    /// Checks that `session_id` is the live session of node `node_id` and that the node runs
    /// (or ran) a rank of `job_id`, so that only a job's own workers add to its log.
    pub async fn check_log_source(
        &self,
        node_id: &NodeId,
        session_id: &str,
        job_id: &JobId,
    ) -> Result<()> {
        let state = self.state.lock().await;
        let registered = state
            .nodes
            .get(node_id)
            .and_then(|node| node.session.as_ref())
            .is_some_and(|session| session.token.matches(session_id));
        if !registered {
            return Err(Error::UnknownSession(node_id.to_string()));
        }
        let entry = state
            .jobs
            .get(job_id)
            .ok_or_else(|| Error::JobNotFound(job_id.to_string()))?;
        if entry
            .record
            .placement
            .iter()
            .any(|rank| &rank.node_id == node_id)
        {
            Ok(())
        } else {
            Err(Error::FailedPrecondition(format!(
                "node {node_id} runs no rank of job {job_id}"
            )))
        }
    }

    /// Checks that a job exists and is placed, for rendezvous calls.
    pub async fn check_live(&self, job_id: &JobId) -> Result<()> {
        let state = self.state.lock().await;
        let entry = state
            .jobs
            .get(job_id)
            .ok_or_else(|| Error::JobNotFound(job_id.to_string()))?;
        if entry.record.state.holds_devices() {
            Ok(())
        } else {
            Err(Error::FailedPrecondition(format!(
                "job {job_id} is {}, not running",
                entry.record.state.name()
            )))
        }
    }

    /// Applies the rank states a worker reported and decides the outcome of every job they
    /// touch: running once every rank runs, failed as soon as one rank fails, succeeded once
    /// every rank exited 0.
    pub(super) async fn apply_rank_reports(
        &self,
        state: &mut State,
        node_id: &NodeId,
        reports: &[RankReport],
    ) -> Result<()> {
        let mut touched: Vec<JobId> = Vec::new();
        for report in reports {
            let job_id = JobId::new(report.job_id.clone())?;
            let Some(entry) = state.jobs.get_mut(&job_id) else {
                self.stop_stray_rank(state, node_id, &report.job_id, report.rank, false);
                continue;
            };
            let terminal = entry.record.state.is_terminal();
            let Some(rank) = entry
                .record
                .placement
                .iter_mut()
                .find(|r| r.rank == report.rank && &r.node_id == node_id)
            else {
                self.stop_stray_rank(state, node_id, &report.job_id, report.rank, false);
                continue;
            };
            let reported = convert::rank_state(report.state());
            if reported == RankState::Running && terminal {
                // The job ended (cancel, another rank failed) and this rank still runs: the
                // stop may have been lost with a dropped stream. Ask again.
                rank.pid = report.pid;
                self.stop_stray_rank(state, node_id, &report.job_id, report.rank, true);
                continue;
            }
            if rank.state.is_final() || reported == RankState::Pending {
                continue;
            }
            let changed = rank.state != reported || rank.pid != report.pid;
            rank.state = reported;
            rank.pid = report.pid;
            rank.exit_code = report.exit_code;
            rank.signal = report.signal;
            rank.exited_at_ms = (report.exited_at_unix_ms > 0).then_some(report.exited_at_unix_ms);
            rank.detail = report.detail.clone();
            let recovered = entry
                .recovery
                .as_mut()
                .is_some_and(|recovery| recovery.reported.insert(report.rank));
            if (changed || recovered) && !touched.contains(&job_id) {
                touched.push(job_id);
            }
        }
        for job_id in touched {
            self.settle_job(state, &job_id).await?;
        }
        Ok(())
    }

    /// Decides a live job's state from its ranks' states.
    async fn settle_job(&self, state: &mut State, job_id: &JobId) -> Result<()> {
        let Some(entry) = state.jobs.get_mut(job_id) else {
            return Ok(());
        };
        let ranks = entry.spec.ranks();
        if entry.record.state.is_terminal() {
            // Ranks of an ended job still report their end: keep the record current, and let
            // the earliest rank failure stay the reason (the root cause, not its echoes in the
            // ranks that lost a peer).
            if let (Some(blamed), Some(earliest)) = (
                entry.record.blamed_rank,
                earliest_failure(&entry.record.placement, ranks),
            ) && earliest.rank != blamed
            {
                entry.record.reason = failure_reason(earliest, ranks);
                entry.record.blamed_rank = Some(earliest.rank);
            }
            self.store.put_job(&entry.record).await?;
            self.publish(entry);
            return Ok(());
        }
        let placement = &entry.record.placement;
        if let Some(failed) = earliest_failure(placement, ranks) {
            let reason = failure_reason(failed, ranks);
            entry.record.blamed_rank = Some(failed.rank);
            return self
                .finish_job(state, job_id, JobState::Failed, reason)
                .await;
        }
        // The job is done when its training ranks are; its parameter servers are then stopped.
        if placement
            .iter()
            .filter(|r| ProcessRole::of(r.rank, ranks) == ProcessRole::Rank)
            .all(|r| r.succeeded())
        {
            return self
                .finish_job(state, job_id, JobState::Succeeded, String::new())
                .await;
        }
        let all_started = placement
            .iter()
            .all(|r| r.state == RankState::Running || r.succeeded());
        if entry.record.state == JobState::Scheduled && all_started {
            entry.record.state = crate::lifecycle::transition(
                job_id.as_str(),
                entry.record.state,
                JobState::Running,
            )?;
            entry.record.started_at_ms = Some(now_ms());
            info!(%job_id, "job running");
        }
        if entry
            .recovery
            .as_ref()
            .is_some_and(|recovery| recovery.reported.len() == placement.len())
        {
            info!(%job_id, "every rank re-reported after the coordinator restarted");
            entry.recovery = None;
        }
        self.store.put_job(&entry.record).await?;
        self.publish(entry);
        Ok(())
    }
}

/// The failed process that ended first (ties by index), if any failed, of a job with `ranks`
/// training ranks. A parameter server fails by ending at all: it serves until stopped.
fn earliest_failure(placement: &[RankRecord], ranks: u32) -> Option<&RankRecord> {
    placement
        .iter()
        .filter(|rank| {
            rank.state.is_final()
                && (!rank.succeeded() || ProcessRole::of(rank.rank, ranks) != ProcessRole::Rank)
        })
        .min_by_key(|rank| (rank.exited_at_ms.unwrap_or(i64::MAX), rank.rank))
}

/// `rank 2 on node n1 exited with code 3`, `parameter server shard 1 (process 5) on node n1
/// killed by signal 9`.
fn failure_reason(rank: &RankRecord, ranks: u32) -> String {
    format!(
        "{} on node {} {}",
        ProcessRole::of(rank.rank, ranks).describe(rank.rank),
        rank.node_id,
        rank.describe_end()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(
        rank: u32,
        state: RankState,
        exit_code: Option<i32>,
        exited_at_ms: Option<i64>,
    ) -> RankRecord {
        RankRecord {
            rank,
            node_id: NodeId::new(format!("node-{rank}")).unwrap(),
            local_rank: 0,
            devices: vec![0],
            state,
            pid: 100 + rank,
            exit_code,
            signal: None,
            exited_at_ms,
            detail: String::new(),
        }
    }

    #[test]
    fn the_rank_that_failed_first_is_blamed() {
        let placement = vec![
            rank(0, RankState::Running, None, None),
            rank(1, RankState::Exited, Some(1), Some(2_000)),
            rank(2, RankState::Exited, Some(0), Some(500)),
            rank(3, RankState::Exited, Some(3), Some(1_000)),
        ];
        let blamed = earliest_failure(&placement, 4).unwrap();
        assert_eq!(
            blamed.rank, 3,
            "rank 2 succeeded; rank 3 failed before rank 1"
        );
        assert_eq!(
            failure_reason(blamed, 4),
            "rank 3 on node node-3 exited with code 3"
        );
    }

    #[test]
    fn no_failure_when_every_rank_ran_or_succeeded() {
        let placement = vec![
            rank(0, RankState::Running, None, None),
            rank(1, RankState::Exited, Some(0), Some(10)),
        ];
        assert!(earliest_failure(&placement, 4).is_none());
    }

    #[test]
    fn a_lost_rank_without_exit_time_is_blamed_after_timed_failures() {
        let placement = vec![
            rank(0, RankState::Lost, None, None),
            rank(1, RankState::Exited, Some(9), Some(10)),
        ];
        assert_eq!(earliest_failure(&placement, 4).unwrap().rank, 1);
    }

    #[test]
    fn a_parameter_server_that_ends_at_all_is_blamed_by_shard() {
        // Two ranks, then the servers of shards 0 and 1 (processes 2 and 3).
        let placement = vec![
            rank(0, RankState::Running, None, None),
            rank(1, RankState::Exited, Some(1), Some(2_000)),
            rank(2, RankState::Running, None, None),
            rank(3, RankState::Exited, Some(0), Some(1_000)),
        ];
        let blamed = earliest_failure(&placement, 2).unwrap();
        assert_eq!(
            blamed.rank, 3,
            "a server exiting 0 mid-job is still a failure"
        );
        assert_eq!(
            failure_reason(blamed, 2),
            "parameter server shard 1 (process 3) on node node-3 exited with code 0"
        );
    }
}
