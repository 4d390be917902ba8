//! Worker membership: registration, heartbeats, and what happens when a node goes quiet.

use cohort_proto::NodeId;
use cohort_proto::v1::{
    HeartbeatRequest, Instruction, NodeInfo, RegisterRequest, Registered, instruction,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, instrument, warn};

use super::{Cluster, INSTRUCTION_BUFFER, NodeEntry, NodeStatus, Session, millis};
use crate::convert;
use crate::error::{Error, Result};
use crate::lifecycle::JobState;
use crate::limits::{MAX_DEVICES_PER_NODE, MAX_NAME_BYTES, MAX_RANK_REPORTS};
use crate::model::{NodeRecord, RankState, now_ms};

/// The receiving end of a worker's instruction stream.
pub type InstructionReceiver = mpsc::Receiver<std::result::Result<Instruction, tonic::Status>>;

fn check_field(name: &str, value: &str) -> Result<()> {
    if value.len() > MAX_NAME_BYTES {
        return Err(Error::InvalidArgument(format!(
            "{name} of {} bytes, expected at most {MAX_NAME_BYTES}",
            value.len()
        )));
    }
    Ok(())
}

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
        let expected = self.to_string();
        text.len() == expected.len()
            && text
                .bytes()
                .zip(expected.bytes())
                .fold(0u8, |difference, (a, b)| difference | (a ^ b))
                == 0
    }
}

impl std::fmt::Display for SessionToken {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0
            .iter()
            .try_for_each(|byte| write!(formatter, "{byte:02x}"))
    }
}

impl Cluster {
    /// Registers (or re-registers) a worker, replacing any earlier session of the same node,
    /// and returns its instruction stream, which opens with a `Registered` message.
    #[instrument(skip(self, request), fields(node_id = %request.node_id))]
    pub async fn register(&self, request: RegisterRequest) -> Result<InstructionReceiver> {
        let node_id = NodeId::new(request.node_id.clone())?;
        check_field("hostname", &request.hostname)?;
        check_field("address", &request.address)?;
        if request.devices.len() > MAX_DEVICES_PER_NODE {
            return Err(Error::InvalidArgument(format!(
                "{} devices, expected at most {MAX_DEVICES_PER_NODE}",
                request.devices.len()
            )));
        }
        if request.ranks.len() > MAX_RANK_REPORTS {
            return Err(Error::InvalidArgument(format!(
                "{} rank reports, expected at most {MAX_RANK_REPORTS}",
                request.ranks.len()
            )));
        }
        let devices = convert::device_records(&request.devices)?;
        let record = NodeRecord {
            id: node_id.clone(),
            hostname: request.hostname.clone(),
            address: request.address.clone(),
            devices,
            registered_at_ms: now_ms(),
        };
        self.store.put_node(&record).await?;

        let mut state = self.state.lock().await;
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
            .is_some_and(|node| node.status != NodeStatus::Ready);
        state.nodes.insert(
            node_id.clone(),
            NodeEntry {
                record,
                status: NodeStatus::Ready,
                last_heartbeat: Instant::now(),
                last_heartbeat_ms: now_ms(),
                session: Some(Session {
                    token,
                    instructions: sender,
                }),
            },
        );
        info!(
            %node_id,
            devices = request.devices.len(),
            running_ranks = request.ranks.len(),
            was_lost,
            "node registered"
        );
        self.apply_rank_reports(&mut state, &node_id, &request.ranks)
            .await?;
        drop(state);
        self.wake.notify_one();
        Ok(receiver)
    }

    /// Records a heartbeat and the rank states it carries. Returns false when the session is
    /// unknown (the worker must register again).
    pub async fn heartbeat(&self, request: HeartbeatRequest) -> Result<bool> {
        let node_id = NodeId::new(request.node_id.clone())?;
        if request.ranks.len() > MAX_RANK_REPORTS {
            return Err(Error::InvalidArgument(format!(
                "{} rank reports, expected at most {MAX_RANK_REPORTS}",
                request.ranks.len()
            )));
        }
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
        self.apply_rank_reports(&mut state, &node_id, &request.ranks)
            .await?;
        if request.leaving {
            // Its ranks were reported above; the node takes no more work until it registers
            // again.
            info!(%node_id, "node left");
            if let Some(node) = state.nodes.get_mut(&node_id) {
                node.status = NodeStatus::Left;
                node.session = None;
            }
        }
        Ok(true)
    }

    /// Returns every node with its current load.
    pub async fn nodes(&self) -> Vec<NodeInfo> {
        let state = self.state.lock().await;
        let busy = state.busy_devices();
        state
            .nodes
            .values()
            .map(|node| {
                let status = match node.status {
                    NodeStatus::Ready => "ready",
                    NodeStatus::Lost => "lost",
                    NodeStatus::Left => "left",
                };
                let node_busy = busy.get(&node.record.id);
                convert::node_info(
                    &node.record,
                    status,
                    node.last_heartbeat_ms,
                    node_busy.map_or(&[][..], |b| &b.devices[..]),
                    node_busy.map_or(0, |b| b.ranks),
                )
            })
            .collect()
    }

    /// Marks nodes that missed their heartbeat deadline as lost (failing their jobs), and fails
    /// jobs whose ranks did not re-report in time after a coordinator restart.
    pub(super) async fn check_liveness(&self) -> Result<()> {
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
            if let Some(node) = state.nodes.get_mut(&node_id) {
                node.status = NodeStatus::Lost;
                node.session = None;
            }
            let reason = format!(
                "node {node_id} lost: no heartbeat for {:.1} s",
                deadline.as_secs_f64()
            );
            let affected: Vec<_> = state
                .jobs
                .values_mut()
                .filter_map(|entry| {
                    let mut hit = false;
                    for rank in &mut entry.record.placement {
                        if rank.node_id == node_id && !rank.state.is_final() {
                            rank.state = RankState::Lost;
                            hit = true;
                        }
                    }
                    hit.then(|| entry.record.id.clone())
                })
                .collect();
            for job_id in affected {
                self.finish_job(&mut state, &job_id, JobState::Failed, reason.clone())
                    .await?;
            }
        }

        let now = Instant::now();
        let expired: Vec<_> = state
            .jobs
            .values()
            .filter(|entry| {
                entry
                    .recovery
                    .as_ref()
                    .is_some_and(|recovery| recovery.deadline <= now)
            })
            .map(|entry| entry.record.id.clone())
            .collect();
        for job_id in expired {
            self.finish_job(
                &mut state,
                &job_id,
                JobState::Failed,
                "coordinator restarted".to_owned(),
            )
            .await?;
        }
        Ok(())
    }
}
