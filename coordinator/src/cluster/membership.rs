//! Worker membership: registration, heartbeats, and what happens when a node goes quiet.
//!
//! A registration or heartbeat is decoded and checked whole ([`convert::registration`],
//! [`convert::rank_reports`]) before it touches any state, so a refused call changes nothing.
//! A registration is the worker's complete account of its ranks: a rank the coordinator placed
//! on the node that the worker does not report is not running there, and is recorded lost with
//! the reason. The same holds for a node's last heartbeat when it leaves.

use cohort_proto::v1::{
    DrainNodeResponse, HeartbeatRequest, Instruction, NodeInfo, RegisterRequest, Registered,
    instruction,
};
use cohort_proto::{JobId, NodeId};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, instrument, warn};

use super::persistence::{Written, all_landed};
use super::{Cluster, INSTRUCTION_BUFFER, NodeEntry, NodeStatus, Session, State, millis};
use crate::convert::{self, RankReport};
use crate::error::{Error, Result};
use crate::model::{RankState, now_ms};

/// The receiving end of a worker's instruction stream.
pub type InstructionReceiver = mpsc::Receiver<std::result::Result<Instruction, tonic::Status>>;

/// Identifies one registration of a worker: 128 bits from the operating system's random
/// source, shown as 32 hexadecimal digits. Only the worker that registered learns it (in its
/// instruction stream), so nobody else can heartbeat, report ranks or push logs for the node.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionToken([u8; 16]);

impl SessionToken {
    /// Draws a new token.
    pub fn generate() -> Self {
        use rand::TryRngCore;
        let mut bytes = [0u8; 16];
        rand::rngs::OsRng
            .try_fill_bytes(&mut bytes)
            .expect("the operating system's random source works");
        Self(bytes)
    }

    /// Whether `text` is this token, compared in constant time so that response timing tells
    /// nothing about how much of a guess was right.
    pub fn matches(&self, text: &str) -> bool {
        crate::auth::token::constant_time_eq(text.as_bytes(), self.to_string().as_bytes())
    }
}

impl std::fmt::Display for SessionToken {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0
            .iter()
            .try_for_each(|byte| write!(formatter, "{byte:02x}"))
    }
}

/// Whether a worker presenting session `presented` may register node `node_id`: a node whose
/// session is live belongs to that session's holder (a restarted worker presents the session
/// it kept in its state directory); anyone with the join token may take a lost node or a new
/// one.
fn may_register(state: &State, node_id: &NodeId, presented: &str) -> Result<()> {
    let Some(node) = state.nodes.get(node_id) else {
        return Ok(());
    };
    let live = node.current_status() == NodeStatus::Ready;
    match &node.session {
        Some(session) if live && !session.token.matches(presented) => {
            Err(Error::PermissionDenied(format!(
                "node {node_id} is registered by a live worker (heard from {} ms ago), and this \
                 registration does not hold its session: give each worker its own --node-id; \
                 the id is free again once that worker is lost",
                node.last_heartbeat.elapsed().as_millis()
            )))
        }
        _ => Ok(()),
    }
}

impl Cluster {
    /// Registers (or re-registers) a worker, replacing any earlier session of the same node,
    /// and returns its instruction stream, which opens with a `Registered` message carrying the
    /// new session's id.
    #[instrument(skip(self, request), fields(node_id = %request.node_id))]
    pub async fn register(&self, request: RegisterRequest) -> Result<InstructionReceiver> {
        let mut registration = convert::registration(&request)?;
        let node_id = registration.node.id.clone();
        {
            let state = self.state.lock().await;
            may_register(&state, &node_id, &request.session_id)?;
            // A drain outlives the worker's registrations.
            registration.node.draining = state
                .nodes
                .get(&node_id)
                .is_some_and(|node| node.record.draining);
        }
        self.store.put_node(&registration.node).await?;

        let mut writes = Vec::new();
        let mut state = self.state.lock().await;
        // Another registration may have won the node while the record was written: the
        // winner's record goes back, and this one is refused.
        if let Err(refused) = may_register(&state, &node_id, &request.session_id) {
            let winner = state.nodes.get(&node_id).map(|node| node.record.clone());
            drop(state);
            if let Some(winner) = winner {
                self.store.put_node(&winner).await?;
            }
            return Err(refused);
        }
        let token = SessionToken::generate();
        let (sender, receiver) = mpsc::channel(INSTRUCTION_BUFFER);
        let registered = Registered {
            session_id: token.to_string(),
            heartbeat_interval_ms: millis(self.config.heartbeat_interval),
            heartbeat_deadline_ms: millis(self.config.heartbeat_deadline),
        };
        sender
            .try_send(Ok(Instruction {
                kind: Some(instruction::Kind::Registered(registered)),
            }))
            .expect("a new channel has room");
        let was_lost = state
            .nodes
            .get(&node_id)
            .is_some_and(|node| node.current_status() != NodeStatus::Ready);
        let stragglers = state
            .nodes
            .get(&node_id)
            .map(|node| node.stragglers)
            .unwrap_or_default();
        // The earlier session's stream, if any, closes with its sender.
        state.nodes.insert(
            node_id.clone(),
            NodeEntry {
                record: registration.node,
                status: NodeStatus::Ready,
                last_heartbeat: Instant::now(),
                last_heartbeat_ms: now_ms(),
                session: Some(Session {
                    token,
                    instructions: sender,
                }),
                stragglers,
            },
        );
        info!(
            %node_id,
            devices = request.devices.len(),
            reported_ranks = registration.ranks.len(),
            was_lost,
            "node registered"
        );
        self.apply_rank_reports(&mut state, &node_id, &registration.ranks, &mut writes)?;
        let why = format!(
            "not running when node {node_id} registered again (its worker restarted, or never received the start)"
        );
        self.lose_unreported_ranks(&mut state, &node_id, &registration.ranks, &why, &mut writes)?;
        drop(state);
        all_landed(writes).await?;
        self.wake.notify_one();
        Ok(receiver)
    }

    /// Records a heartbeat and the rank states it carries. Returns false when the session is
    /// not the node's current one (the worker must register again). Answers once the records
    /// its reports changed are stored; it never waits for other callers' writes under the lock.
    pub async fn heartbeat(&self, request: HeartbeatRequest) -> Result<bool> {
        let node_id = NodeId::new(request.node_id.clone())?;
        let reports = convert::rank_reports(&request.ranks)?;
        let mut writes = Vec::new();
        let mut state = self.state.lock().await;
        let Some(node) = state.nodes.get_mut(&node_id) else {
            return Ok(false);
        };
        let current = node
            .session
            .as_ref()
            .is_some_and(|session| session.token.matches(&request.session_id));
        if !current || node.status != NodeStatus::Ready {
            return Ok(false);
        }
        node.last_heartbeat = Instant::now();
        node.last_heartbeat_ms = now_ms();
        self.apply_rank_reports(&mut state, &node_id, &reports, &mut writes)?;
        if request.leaving {
            // Its ranks were reported above; the node takes no more work until it registers
            // again, and a rank it did not report will not run.
            info!(%node_id, "node left");
            if let Some(node) = state.nodes.get_mut(&node_id) {
                node.status = NodeStatus::Left;
                node.session = None;
            }
            let why = format!("node {node_id} left without running it");
            self.lose_unreported_ranks(&mut state, &node_id, &reports, &why, &mut writes)?;
        }
        drop(state);
        all_landed(writes).await?;
        if request.leaving {
            self.wake.notify_one();
        }
        Ok(true)
    }

    /// Marks every rank placed on `node_id` that may still run, and that `reports` does not
    /// mention, as lost with `why`, and settles the jobs concerned (their records go on
    /// `writes`).
    fn lose_unreported_ranks(
        &self,
        state: &mut State,
        node_id: &NodeId,
        reports: &[RankReport],
        why: &str,
        writes: &mut Vec<Written>,
    ) -> Result<()> {
        let mut touched = Vec::new();
        for job in state.live_jobs_mut() {
            let mut hit = false;
            for rank in job.record.placement.iter_mut().filter(|rank| {
                &rank.node_id == node_id
                    && !rank.state.is_final()
                    && !reports
                        .iter()
                        .any(|report| report.job_id == job.record.id && report.rank == rank.rank)
            }) {
                rank.state = RankState::Lost;
                rank.detail = why.to_owned();
                rank.exited_at_ms = Some(now_ms());
                hit = true;
            }
            if hit {
                warn!(%node_id, job_id = %job.record.id, why, "ranks lost");
                touched.push(job.record.id.clone());
            }
        }
        for job_id in touched {
            self.settle_job(state, &job_id, writes)?;
        }
        Ok(())
    }

    /// Returns every node with its current load.
    pub async fn nodes(&self) -> Vec<NodeInfo> {
        let state = self.state.lock().await;
        let busy = state.busy_devices();
        state
            .nodes
            .values()
            .map(|node| {
                let node_busy = busy.get(&node.record.id);
                convert::node_info(
                    &node.record,
                    node.current_status().name(),
                    node.last_heartbeat_ms,
                    node_busy.map_or(&[][..], |b| &b.devices[..]),
                    node_busy.map_or(0, |b| b.ranks),
                    node.stragglers.value(now_ms()),
                )
            })
            .collect()
    }

    /// Drains node `node_id` (or, with `undo`, takes the drain back): nothing new is placed on
    /// it, and every job with a rank there that may restart (`fault_tolerance.max_restarts` is
    /// not 0) is moved off through a planned restart, which uses up no restart (a training
    /// job's ranks checkpoint on the way: they stop with SIGTERM). Jobs that may not restart run
    /// to their end there. Answers once the node's record and the moved jobs' are stored.
    pub async fn drain(&self, node_id: &NodeId, undo: bool) -> Result<DrainNodeResponse> {
        let mut writes = Vec::new();
        let mut response = DrainNodeResponse::default();
        let record = {
            let mut state = self.state.lock().await;
            let Some(node) = state.nodes.get_mut(node_id) else {
                return Err(Error::NodeNotFound(node_id.to_string()));
            };
            node.record.draining = !undo;
            let record = node.record.clone();
            let on_node: Vec<(JobId, bool)> = state
                .live_jobs()
                .filter(|job| job.record.state.holds_devices())
                .filter(|job| {
                    job.record
                        .placement
                        .iter()
                        .any(|rank| &rank.node_id == node_id && !rank.state.is_final())
                })
                .map(|job| (job.record.id.clone(), job.record.max_restarts > 0))
                .collect();
            for (job_id, movable) in on_node {
                if undo {
                    continue;
                }
                if movable {
                    let reason = format!("moved off node {node_id}, which is draining");
                    self.restart_planned(&mut state, &job_id, reason, &mut writes)?;
                    response.moved_jobs.push(job_id.to_string());
                } else {
                    response.staying_jobs.push(job_id.to_string());
                }
            }
            record
        };
        info!(%node_id, undo, moved = ?response.moved_jobs, staying = ?response.staying_jobs, "node drain changed");
        self.store.put_node(&record).await?;
        all_landed(writes).await?;
        self.wake.notify_one();
        Ok(response)
    }

    /// Marks nodes that missed their heartbeat deadline as lost (failing their jobs), and fails
    /// jobs whose ranks did not re-report in time after a coordinator restart.
    pub(super) async fn check_liveness(&self) -> Result<()> {
        let mut writes = Vec::new();
        let mut state = self.state.lock().await;
        let deadline = self.config.heartbeat_deadline;
        let lost: Vec<NodeId> = state
            .nodes
            .values()
            .filter(|n| n.status == NodeStatus::Ready && n.last_heartbeat.elapsed() > deadline)
            .map(|n| n.record.id.clone())
            .collect();
        for node_id in lost {
            warn!(%node_id, deadline_s = deadline.as_secs_f64(), "node lost: heartbeat deadline passed");
            let mut last_heard = None;
            if let Some(node) = state.nodes.get_mut(&node_id) {
                node.status = NodeStatus::Lost;
                node.session = None;
                last_heard = Some(node.last_heartbeat_ms);
            }
            let reason = format!(
                "node {node_id} lost: no heartbeat for {:.1} s",
                deadline.as_secs_f64()
            );
            let affected: Vec<_> = state
                .live_jobs_mut()
                .filter_map(|job| {
                    let mut hit = false;
                    for rank in &mut job.record.placement {
                        if rank.node_id == node_id && !rank.state.is_final() {
                            rank.state = RankState::Lost;
                            // Dated by when its node was last heard from: a peer that failed
                            // after that (its link to the rank broke) is an echo, and the lost
                            // rank the root cause.
                            rank.exited_at_ms = last_heard;
                            hit = true;
                        }
                    }
                    hit.then(|| job.record.id.clone())
                })
                .collect();
            for job_id in affected {
                self.fail_attempt(
                    &mut state,
                    &job_id,
                    (reason.clone(), true),
                    Some(node_id.clone()),
                    &mut writes,
                )?;
                // A job that had ended, or was restarting, already: its record now knows those
                // ranks are gone.
                self.settle_job(&mut state, &job_id, &mut writes)?;
            }
        }

        let now = Instant::now();
        let expired: Vec<_> = state
            .live_jobs()
            .filter(|job| {
                job.recovery
                    .as_ref()
                    .is_some_and(|recovery| recovery.deadline <= now)
            })
            .map(|job| job.record.id.clone())
            .collect();
        for job_id in expired {
            if let Some(job) = state.live_mut(&job_id) {
                let reported = job
                    .recovery
                    .as_ref()
                    .map(|recovery| recovery.reported.clone())
                    .unwrap_or_default();
                for rank in job
                    .record
                    .placement
                    .iter_mut()
                    .filter(|rank| !rank.state.is_final() && !reported.contains(&rank.rank))
                {
                    rank.state = RankState::Lost;
                    rank.detail = "not reported again after the coordinator restarted".to_owned();
                }
                job.recovery = None;
            }
            self.fail_attempt(
                &mut state,
                &job_id,
                ("coordinator restarted".to_owned(), true),
                None,
                &mut writes,
            )?;
            // A job that was restarting already queues its next attempt now.
            self.settle_job(&mut state, &job_id, &mut writes)?;
        }
        drop(state);
        all_landed(writes).await
    }
}
