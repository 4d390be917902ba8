//! Acting on hang diagnosis ([`crate::hangs`]): on every tick, each running job whose
//! communication has stood still for its `fault_tolerance.hang_timeout_s` fails its attempt
//! with a reason naming the ranks that never entered the operation waited in and those stuck
//! in it (with their nodes and pids), and is restarted while restarts remain, the node of the
//! first missing rank kept off for the back-off.

use cohort_proto::{JobId, NodeId};
use tracing::warn;

use super::persistence::all_landed;
use super::{Cluster, LiveJob};
use crate::error::Result;
use crate::hangs;
use crate::lifecycle::JobState;
use crate::model::{UnixMillis, now_ms};

impl Cluster {
    /// Fails the attempt of every running job found hung.
    pub(super) async fn check_hangs(&self) -> Result<()> {
        let now = now_ms();
        let mut writes = Vec::new();
        let mut state = self.state.lock().await;
        let hung: Vec<(JobId, String, Option<NodeId>)> = state
            .live_jobs()
            .filter_map(|job| find_hang(job, now))
            .collect();
        for (job_id, reason, node) in hung {
            warn!(%job_id, %reason, "communication hang");
            self.fail_attempt(&mut state, &job_id, (reason, true), node, &mut writes)?;
        }
        drop(state);
        all_landed(writes).await
    }
}

/// The reason and the node to blame when `job` runs and is hung at `now`.
fn find_hang(job: &LiveJob, now: UnixMillis) -> Option<(JobId, String, Option<NodeId>)> {
    if job.record.state != JobState::Running {
        return None;
    }
    let timeout_ms = u64::from(job.spec.hang_timeout_s()) * 1000;
    let servers = job.spec.processes().saturating_sub(job.spec.ranks());
    let ranks = (job.record.placement.len() as u32).saturating_sub(servers);
    let hang = hangs::diagnose(
        &job.communication,
        job.record.attempt,
        now,
        timeout_ms,
        ranks,
    )?;
    let placement = &job.record.placement;
    let place = |rank: u32| match placement.get(rank as usize) {
        Some(placed) => format!("node {}, pid {}", placed.node_id, placed.pid),
        None => "not placed".to_owned(),
    };
    let node = hang
        .blamed_rank()
        .and_then(|rank| placement.get(rank as usize))
        .map(|placed| placed.node_id.clone());
    Some((job.record.id.clone(), hang.describe(place), node))
}
