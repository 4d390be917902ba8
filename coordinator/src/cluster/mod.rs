//! The coordinator's domain core: every job, node and placement, and the operations on them.
//!
//! [`Cluster`] owns the in-memory state (one lock), persists every job change to the
//! [`ClusterStore`] before acting on it, and tells workers what to do through their instruction
//! streams. The gRPC layer ([`crate::service`]) only decodes requests and calls it.
//!
//! - `jobs`: submit, cancel, inspect; job outcomes from rank reports.
//! - `membership`: worker registration, heartbeats, lost-node detection.
//! - `scheduling`: the scheduler pass that applies [`crate::placement::place`].

mod jobs;
mod membership;
mod scheduling;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use cohort_proto::v1::{Instruction, JobInfo, StopRank, instruction};
use cohort_proto::{JobId, NodeId};
use cohort_spec::JobSpec;
use tokio::sync::{Mutex, Notify, broadcast, mpsc};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::CoordinatorConfig;
use crate::convert;
use crate::error::Result;
use crate::lifecycle::{JobState, transition};
use crate::logs::LogStore;
use crate::model::{JobRecord, NodeRecord, RankState, now_ms};
use crate::rendezvous::Rendezvous;
use crate::store::ClusterStore;

/// Capacity of a worker's instruction stream; a worker this far behind is treated as gone.
const INSTRUCTION_BUFFER: usize = 4096;
/// How many job snapshots a slow watcher may fall behind before it re-reads the job.
const EVENT_BUFFER: usize = 1024;

/// Sends instructions to one connected worker.
pub(crate) type InstructionSender = mpsc::Sender<std::result::Result<Instruction, tonic::Status>>;

/// A worker's live registration.
struct Session {
    /// Identifies the registration: a random token only the registering worker learns.
    /// Heartbeats and log pushes must carry it.
    token: membership::SessionToken,
    /// The worker's instruction stream.
    instructions: InstructionSender,
}

/// Whether a node takes part in scheduling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeStatus {
    /// Registered and heartbeating.
    Ready,
    /// Missed its heartbeat deadline, or not seen since the coordinator started.
    Lost,
    /// Shut down cleanly (its last heartbeat said so).
    Left,
}

/// A node and its liveness.
struct NodeEntry {
    /// What the node registered.
    record: NodeRecord,
    /// Ready or lost.
    status: NodeStatus,
    /// When the last heartbeat (or registration) arrived.
    last_heartbeat: Instant,
    /// The same, in Unix milliseconds, for display.
    last_heartbeat_ms: i64,
    /// The live registration, if any.
    session: Option<Session>,
}

/// A job and the in-memory facts that are not persisted.
struct JobEntry {
    /// The persisted record.
    record: JobRecord,
    /// The parsed spec.
    spec: JobSpec,
    /// For jobs that were live when the coordinator restarted: until when their ranks may
    /// re-report, and which ranks have.
    recovery: Option<Recovery>,
}

/// A live job found at start-up, waiting for its ranks to re-report.
struct Recovery {
    /// After this instant the job fails with "coordinator restarted".
    deadline: Instant,
    /// Ranks heard from since the restart.
    reported: HashSet<u32>,
}

/// Everything behind the cluster lock.
#[derive(Default)]
struct State {
    /// Every job ever submitted.
    jobs: BTreeMap<JobId, JobEntry>,
    /// Every node ever registered.
    nodes: BTreeMap<NodeId, NodeEntry>,
}

impl State {
    /// Sends an instruction to a node; returns false when the node is not connected.
    fn send(&self, node_id: &NodeId, instruction: instruction::Kind) -> bool {
        let Some(session) = self.nodes.get(node_id).and_then(|n| n.session.as_ref()) else {
            return false;
        };
        let message = Instruction {
            kind: Some(instruction),
        };
        match session.instructions.try_send(Ok(message)) {
            Ok(()) => true,
            Err(error) => {
                warn!(%node_id, %error, "instruction stream of node is closed or full");
                false
            }
        }
    }

    /// Tells the nodes of every rank of `job_id` that may still run to stop it.
    fn stop_ranks(&self, job_id: &JobId, reason: &str) {
        let Some(job) = self.jobs.get(job_id) else {
            return;
        };
        for rank in job.record.placement.iter().filter(|r| !r.state.is_final()) {
            self.send(
                &rank.node_id,
                instruction::Kind::StopRank(StopRank {
                    job_id: job_id.to_string(),
                    rank: rank.rank,
                    reason: reason.to_owned(),
                }),
            );
        }
    }
}

/// The coordinator's state and operations. Shared by the gRPC services and the background
/// scheduler loop.
pub struct Cluster {
    /// Settings.
    config: CoordinatorConfig,
    /// Durable store of jobs and nodes.
    store: Arc<dyn ClusterStore>,
    /// In-memory state.
    state: Mutex<State>,
    /// Captured rank output.
    logs: LogStore,
    /// Per-job key-value stores.
    rendezvous: Rendezvous,
    /// Job snapshots after every change, for watchers.
    events: broadcast::Sender<Arc<JobInfo>>,
    /// Wakes the scheduler loop early.
    wake: Notify,
}

impl Cluster {
    /// Loads the persisted state and returns a cluster ready to serve. Jobs that were live
    /// when the coordinator stopped get `restart_grace` for their ranks to re-report.
    pub async fn load(config: CoordinatorConfig, store: Arc<dyn ClusterStore>) -> Result<Self> {
        let logs = LogStore::open(config.data_dir.join("logs"), config.max_log_bytes_per_job)?;
        let mut state = State::default();
        let grace_deadline = Instant::now() + config.restart_grace;
        let mut recovering = 0;
        for record in store.list_jobs().await? {
            let spec = match cohort_spec::parse(&record.spec_toml) {
                Ok(spec) => spec,
                Err(error) => {
                    warn!(job_id = %record.id, %error, "stored job spec no longer parses; skipping job");
                    continue;
                }
            };
            let recovery = record.state.holds_devices().then(|| {
                recovering += 1;
                Recovery {
                    deadline: grace_deadline,
                    // Ranks whose end was already recorded have nothing left to report.
                    reported: record
                        .placement
                        .iter()
                        .filter(|rank| rank.state.is_final())
                        .map(|rank| rank.rank)
                        .collect(),
                }
            });
            state.jobs.insert(
                record.id.clone(),
                JobEntry {
                    record,
                    spec,
                    recovery,
                },
            );
        }
        for record in store.list_nodes().await? {
            state.nodes.insert(
                record.id.clone(),
                NodeEntry {
                    record,
                    status: NodeStatus::Lost,
                    last_heartbeat: Instant::now(),
                    last_heartbeat_ms: 0,
                    session: None,
                },
            );
        }
        info!(
            jobs = state.jobs.len(),
            nodes = state.nodes.len(),
            recovering,
            "cluster state loaded"
        );
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Ok(Self {
            config,
            store,
            state: Mutex::new(state),
            logs,
            rendezvous: Rendezvous::default(),
            events,
            wake: Notify::new(),
        })
    }

    /// The coordinator's settings.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// The per-job key-value stores.
    pub fn rendezvous(&self) -> &Rendezvous {
        &self.rendezvous
    }

    /// The captured rank output.
    pub fn logs(&self) -> &LogStore {
        &self.logs
    }

    /// Subscribes to job snapshots published after every change.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<JobInfo>> {
        self.events.subscribe()
    }

    /// Runs the scheduler and liveness checks until `shutdown` resolves: on every tick and
    /// whenever something (a submission, a registration, a finished job) wakes it.
    pub async fn run_background(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        let mut ticker = tokio::time::interval(self.config.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = ticker.tick() => {}
                _ = self.wake.notified() => {}
            }
            if let Err(error) = self.check_liveness().await {
                warn!(%error, "liveness check failed");
            }
            if let Err(error) = self.schedule().await {
                warn!(%error, "scheduler pass failed");
            }
        }
    }

    /// Publishes the job's current snapshot to watchers.
    fn publish(&self, entry: &JobEntry) {
        // No watcher is not an error.
        let _ = self.events.send(Arc::new(convert::job_info(&entry.record)));
    }

    /// Moves a live job to a final state: records why, stops every rank that may still run,
    /// closes its rendezvous, persists and publishes.
    async fn finish_job(
        &self,
        state: &mut State,
        job_id: &JobId,
        to: JobState,
        reason: String,
    ) -> Result<()> {
        let Some(entry) = state.jobs.get_mut(job_id) else {
            return Ok(());
        };
        if entry.record.state.is_terminal() {
            return Ok(());
        }
        entry.record.state = transition(job_id.as_str(), entry.record.state, to)?;
        entry.record.reason = reason;
        entry.record.finished_at_ms = Some(now_ms());
        entry.recovery = None;
        // Ranks never started will not start now.
        for rank in &mut entry.record.placement {
            if rank.state == RankState::Pending {
                rank.state = RankState::Exited;
                rank.detail = "never started".to_owned();
            }
        }
        match to {
            JobState::Succeeded => info!(%job_id, "job succeeded"),
            _ => warn!(%job_id, state = to.name(), reason = %entry.record.reason, "job ended"),
        }
        self.store.put_job(&entry.record).await?;
        self.publish(entry);
        let reason = entry.record.reason.clone();
        state.stop_ranks(job_id, &reason);
        self.rendezvous.drop_job(job_id);
        self.wake.notify_one();
        Ok(())
    }

    /// Tells a node to stop one rank the coordinator does not expect to run: one of an ended
    /// job that is still inside its grace period (`expected`, logged quietly), or one the
    /// coordinator does not know at all (a warning).
    fn stop_stray_rank(
        &self,
        state: &State,
        node_id: &NodeId,
        job_id: &str,
        rank: u32,
        expected: bool,
    ) {
        if expected {
            debug!(%node_id, job_id, rank, "rank of an ended job still runs; asking again to stop it");
        } else {
            warn!(%node_id, job_id, rank, "stopping a rank the coordinator does not know");
        }
        state.send(
            node_id,
            instruction::Kind::StopRank(StopRank {
                job_id: job_id.to_owned(),
                rank,
                reason: "job is not running".to_owned(),
            }),
        );
    }
}

/// Converts a duration to whole milliseconds for the protocol, saturating.
fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}
