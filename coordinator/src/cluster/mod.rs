//! The coordinator's domain core: every job, node and placement, and the operations on them.
//!
//! [`Cluster`] owns the in-memory state (one lock, which guards memory only: it is never held
//! across a store round trip), persists every job change to the [`ClusterStore`] in the order
//! the changes happened (`persistence`), and tells workers what to do through their instruction
//! streams. A start instruction goes out only once the placement it carries is stored. The gRPC layer ([`crate::service`]) only decodes requests and calls it. Every
//! operation checks its whole request before it changes anything: a refused call changes
//! nothing.
//!
//! A job is *live* from submission until it is *retired*: ended, and every one of its processes
//! known to be gone. Only live jobs keep their record, parsed spec, log bookkeeping and
//! rendezvous in memory; a retired job keeps a [`JobSummary`] (what listing needs), and its
//! record is read back from the store when asked for, so memory does not grow with the number
//! of jobs run.
//!
//! - `jobs`: submit, cancel, inspect; job outcomes from rank reports.
//! - `membership`: worker registration, heartbeats, lost-node detection.
//! - `scheduling`: the scheduler pass that applies [`crate::placement::place`].
//! - `restarts`: a failed attempt restarted while restarts remain, away from the node to blame.
//! - `persistence`: the ordered queue of job writes and the one task that writes them.
//! - `history`: each job's metric curves, kept and stored.
//! - `sweeps`: hyper-parameter sweeps, advanced on every tick by [`crate::sweeps`]' decisions;
//!   their trials are ordinary jobs tagged with their sweep.
//! - `versions`: a job's checkpoint versions, listed and resolved for `--resume-from`.
//! - `watchdog`: running jobs whose communication hangs fail their attempt, naming who holds
//!   them up.

mod history;
mod jobs;
mod membership;
mod persistence;
mod restarts;
mod scheduling;
mod sweeps;
mod versions;
mod watchdog;

#[cfg(test)]
mod properties;
#[cfg(test)]
mod testing;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use cohort_jobspec::JobSpec;
use cohort_proto::v1::{Instruction, StopRank, instruction};
use cohort_proto::{JobId, NodeId};
use tokio::sync::{Mutex, Notify, broadcast, mpsc};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::auth::token::JobTokens;
use crate::config::CoordinatorConfig;
use crate::error::Result;
use crate::hangs::CommunicationWatch;
use crate::lifecycle::{JobState, transition};
use crate::limits::MAX_REASON_BYTES;
use crate::logs::LogStore;
use crate::model::{JobRecord, JobSummary, NodeRecord, RankRecord, RankState, now_ms};
use crate::rendezvous::Rendezvous;
use crate::store::ClusterStore;
use crate::stragglers::{NodeScore, StragglerWatch};
use cohort_proto::text::truncate;
use persistence::{WriteQueue, Written};

pub use jobs::{JobSubmission, MetricsReport};
pub use membership::SessionToken;

/// Capacity of a worker's instruction stream; a worker this far behind is treated as gone.
const INSTRUCTION_BUFFER: usize = 4096;
/// How many job changes a slow watcher may fall behind before it re-reads the job.
const EVENT_BUFFER: usize = 1024;

/// Sends instructions to one connected worker.
pub(crate) type InstructionSender = mpsc::Sender<std::result::Result<Instruction, tonic::Status>>;

/// A worker's live registration.
struct Session {
    /// Identifies the registration: a random token only the registering worker learns.
    /// Heartbeats and log pushes must carry it.
    token: SessionToken,
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
    /// Registered, but its instruction stream has closed (the worker died or its connection
    /// broke): not given work; lost at the heartbeat deadline unless it registers again.
    Disconnected,
}

impl NodeStatus {
    /// Lower-case name, as shown by the CLI.
    fn name(self) -> &'static str {
        match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Lost => "lost",
            NodeStatus::Left => "left",
            NodeStatus::Disconnected => "disconnected",
        }
    }
}

/// A node and its liveness.
struct NodeEntry {
    /// What the node registered.
    record: NodeRecord,
    /// Ready, lost or left.
    status: NodeStatus,
    /// When the last heartbeat (or registration) arrived.
    last_heartbeat: Instant,
    /// The same, in Unix milliseconds, for display.
    last_heartbeat_ms: i64,
    /// The live registration, if any.
    session: Option<Session>,
    /// How often its ranks were found straggling lately (kept across registrations, not
    /// stored).
    stragglers: NodeScore,
}

impl NodeEntry {
    /// The node's status as it is now: a ready node whose instruction stream has closed is
    /// disconnected, whatever its last heartbeat said.
    fn current_status(&self) -> NodeStatus {
        match (&self.status, &self.session) {
            (NodeStatus::Ready, Some(session)) if !session.instructions.is_closed() => {
                NodeStatus::Ready
            }
            (NodeStatus::Ready, _) => NodeStatus::Disconnected,
            (status, _) => *status,
        }
    }

    /// Whether the node can take work now: ready and not drained.
    fn schedulable(&self) -> bool {
        self.current_status() == NodeStatus::Ready && !self.record.draining
    }
}

/// A live job: everything the coordinator acts on.
struct LiveJob {
    /// The persisted record.
    record: JobRecord,
    /// The parsed spec.
    spec: JobSpec,
    /// For jobs that were live when the coordinator restarted: until when their ranks may
    /// re-report, and which ranks have.
    recovery: Option<Recovery>,
    /// What the running attempt's ranks last reported of their communication (not stored: a
    /// restarted coordinator watches afresh).
    communication: CommunicationWatch,
    /// Which of its ranks drag it (from their compute times; not persisted).
    stragglers: StragglerWatch,
    /// While queued: why it is not running yet, as the last scheduler pass found.
    waiting: Option<scheduling::Waiting>,
    /// Why its run stopped early (early stopping), once a rank reported it: the reason the job
    /// succeeds with (not stored: after a coordinator restart the job succeeds without it).
    early_stop: Option<String>,
}

impl LiveJob {
    /// The job as `GetJob` shows it, with its stragglers.
    fn info(&self) -> cohort_proto::v1::JobInfo {
        let mut info = crate::convert::job_info(&self.record);
        info.stragglers = self
            .stragglers
            .stragglers()
            .into_iter()
            .map(|straggler| crate::convert::straggler_info(&self.record, &straggler))
            .collect();
        if self.record.state == JobState::Queued
            && let Some(waiting) = &self.waiting
        {
            info.waiting = waiting.to_string();
        }
        info
    }

    /// Its queue and user, for fair share and quotas.
    fn owner(&self) -> crate::placement::Owner {
        crate::placement::Owner {
            queue: self.spec.queue().to_owned(),
            user: self.record.submitter.clone(),
        }
    }

    /// Whether the job has ended and every one of its processes is known to be gone.
    fn done(&self) -> bool {
        self.record.state.is_terminal()
            && self
                .record
                .placement
                .iter()
                .all(|rank| rank.state.is_final())
    }
}

/// A live job found at start-up, waiting for its ranks to re-report.
struct Recovery {
    /// After this instant the job fails with "coordinator restarted".
    deadline: Instant,
    /// Ranks heard from since the restart.
    reported: HashSet<u32>,
}

/// A job as kept in memory.
enum JobSlot {
    /// Not retired: its whole record.
    Live(Box<LiveJob>),
    /// Retired: its summary; the record is in the store.
    Retired(JobSummary),
}

impl JobSlot {
    /// The job's id.
    fn id(&self) -> &JobId {
        match self {
            JobSlot::Live(job) => &job.record.id,
            JobSlot::Retired(summary) => &summary.id,
        }
    }
}

/// The submission sequence number a job id ends with (`mnist-12` -> 12).
fn seq_of(job_id: &JobId) -> Option<u64> {
    job_id.as_str().rsplit_once('-')?.1.parse().ok()
}

/// Everything behind the cluster lock.
#[derive(Default)]
struct State {
    /// Every job ever submitted, by submission sequence number (so in submission order).
    jobs: BTreeMap<u64, JobSlot>,
    /// Every node ever registered.
    nodes: BTreeMap<NodeId, NodeEntry>,
}

impl State {
    /// The job with this id, live or retired.
    fn slot(&self, job_id: &JobId) -> Option<&JobSlot> {
        self.jobs
            .get(&seq_of(job_id)?)
            .filter(|slot| slot.id() == job_id)
    }

    /// The live job with this id.
    fn live(&self, job_id: &JobId) -> Option<&LiveJob> {
        match self.slot(job_id)? {
            JobSlot::Live(job) => Some(job),
            JobSlot::Retired(_) => None,
        }
    }

    /// The live job with this id, to change it.
    fn live_mut(&mut self, job_id: &JobId) -> Option<&mut LiveJob> {
        match self.jobs.get_mut(&seq_of(job_id)?)? {
            JobSlot::Live(job) if &job.record.id == job_id => Some(job),
            _ => None,
        }
    }

    /// Every live job.
    fn live_jobs(&self) -> impl Iterator<Item = &LiveJob> {
        self.jobs.values().filter_map(|slot| match slot {
            JobSlot::Live(job) => Some(&**job),
            JobSlot::Retired(_) => None,
        })
    }

    /// Every live job, to change them.
    fn live_jobs_mut(&mut self) -> impl Iterator<Item = &mut LiveJob> {
        self.jobs.values_mut().filter_map(|slot| match slot {
            JobSlot::Live(job) => Some(&mut **job),
            JobSlot::Retired(_) => None,
        })
    }

    /// Notes why queued job `job_id` waits.
    fn note_waiting(&mut self, job_id: &JobId, waiting: scheduling::Waiting) {
        if let Some(job) = self.live_mut(job_id)
            && job.waiting.as_ref() != Some(&waiting)
        {
            job.waiting = Some(waiting);
        }
    }

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
        let Some(job) = self.live(job_id) else {
            return;
        };
        for rank in job.record.placement.iter().filter(|r| !r.state.is_final()) {
            self.send(
                &rank.node_id,
                instruction::Kind::StopRank(StopRank {
                    job_id: job_id.to_string(),
                    rank: rank.rank,
                    reason: reason.to_owned(),
                    attempt: job.record.attempt,
                }),
            );
        }
    }
}

/// A job changed: watchers of that job read it again.
#[derive(Debug, Clone)]
pub struct JobChanged {
    /// The job.
    pub job_id: JobId,
    /// Whether it reached a final state.
    pub finished: bool,
}

/// The coordinator's state and operations. Shared by the gRPC services and the background
/// scheduler loop.
pub struct Cluster {
    /// Settings.
    config: CoordinatorConfig,
    /// Durable store of jobs and nodes.
    store: Arc<dyn ClusterStore>,
    /// Job writes, in the order the state changed; drained by one writer task.
    writes: WriteQueue,
    /// Submissions whose records are being written (counted by the queue-room checks), and
    /// the job sequence numbers reserved for submissions.
    submissions: Mutex<jobs::Submissions>,
    /// In-memory state. Never held across a store round trip.
    state: Mutex<State>,
    /// Captured rank output.
    logs: LogStore,
    /// Per-job key-value stores.
    rendezvous: Rendezvous,
    /// Which job changed, after every change, for watchers.
    events: broadcast::Sender<JobChanged>,
    /// Wakes the scheduler loop early.
    wake: Notify,
    /// Issues the token a placed job's processes get, and checks it.
    job_tokens: JobTokens,
    /// The series recorded for Prometheus as things happen.
    telemetry: crate::telemetry::Telemetry,
    /// Each job's metric curves.
    histories: history::Histories,
    /// Hyper-parameter sweeps. Taken before `state` when both are held, never after.
    sweeps: Mutex<sweeps::Sweeps>,
}

impl Cluster {
    /// Loads the persisted state and returns a cluster ready to serve. Jobs that were live
    /// when the coordinator stopped get `restart_grace` for their ranks to re-report.
    pub async fn load(config: CoordinatorConfig, store: Arc<dyn ClusterStore>) -> Result<Self> {
        let logs = LogStore::open(config.data_dir.join("logs"), config.max_log_bytes_per_job)?;
        let job_tokens = crate::auth::load_job_tokens(&config.data_dir, store.as_ref()).await?;
        let mut state = State::default();
        let rendezvous = Rendezvous::default();
        let grace_deadline = Instant::now() + config.restart_grace;
        let mut recovering = 0;
        let jobs = store.list_jobs().await?;
        let mut quarantined = jobs.quarantined.len();
        let mut sweeps = sweeps::Sweeps::load(store.list_sweeps().await?);
        for sweep_id in sweeps::adopt_tagged_jobs(&mut sweeps, &jobs.records) {
            sweeps.store(&sweep_id, store.as_ref()).await?;
        }
        for record in jobs.records {
            if record.state.is_terminal()
                && record.placement.iter().all(|rank| rank.state.is_final())
            {
                state
                    .jobs
                    .insert(record.seq, JobSlot::Retired(JobSummary::of(&record)));
                continue;
            }
            let spec = match cohort_jobspec::parse(&record.spec_toml) {
                Ok(spec) => spec,
                Err(error) => {
                    warn!(job_id = %record.id, %error, "stored job spec no longer parses; quarantining job");
                    let reason = format!("stored job spec no longer parses: {error}");
                    if store.quarantine_job(&record.id, &reason).await?.is_some() {
                        quarantined += 1;
                    }
                    continue;
                }
            };
            logs.track(&record.id)?;
            if record.state.runs_attempt() {
                rendezvous.open(&record.id, record.ranks);
            }
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
                record.seq,
                JobSlot::Live(Box::new(LiveJob {
                    record,
                    spec,
                    recovery,
                    communication: CommunicationWatch::default(),
                    stragglers: StragglerWatch::default(),
                    waiting: None,
                    early_stop: None,
                })),
            );
        }
        let nodes = store.list_nodes().await?;
        quarantined += nodes.quarantined.len();
        for record in nodes.records {
            state.nodes.insert(
                record.id.clone(),
                NodeEntry {
                    record,
                    status: NodeStatus::Lost,
                    last_heartbeat: Instant::now(),
                    last_heartbeat_ms: 0,
                    session: None,
                    stragglers: NodeScore::default(),
                },
            );
        }
        info!(
            jobs = state.jobs.len(),
            nodes = state.nodes.len(),
            recovering,
            quarantined,
            "cluster state loaded"
        );
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let writes = WriteQueue::start(&store, events.clone());
        Ok(Self {
            config,
            store,
            writes,
            submissions: Mutex::new(jobs::Submissions::default()),
            state: Mutex::new(state),
            logs,
            rendezvous,
            events,
            wake: Notify::new(),
            job_tokens,
            telemetry: crate::telemetry::Telemetry::new()?,
            histories: history::Histories::default(),
            sweeps: Mutex::new(sweeps),
        })
    }

    /// What `/metrics` shows to `viewer`: every job's state and every node, and the running
    /// jobs the viewer may see (an admin all, a user their own).
    pub async fn snapshot(&self, viewer: &crate::auth::Caller) -> crate::telemetry::Snapshot {
        let nodes = self.nodes().await;
        let state = self.state.lock().await;
        let mut jobs_by_state = BTreeMap::new();
        let mut running = Vec::new();
        for slot in state.jobs.values() {
            let (job_state, live) = match slot {
                JobSlot::Live(job) => (job.record.state, Some(job)),
                JobSlot::Retired(summary) => (summary.state, None),
            };
            *jobs_by_state.entry(job_state.name()).or_insert(0) += 1;
            let Some(job) = live.filter(|job| job.record.state == JobState::Running) else {
                continue;
            };
            if !crate::auth::access::sees_job(viewer, &job.record.submitter) {
                continue;
            }
            running.push(crate::telemetry::RunningJob {
                stragglers: job
                    .stragglers
                    .stragglers()
                    .iter()
                    .map(|straggler| straggler.rank)
                    .collect(),
                job_id: job.record.id.to_string(),
                user: job.record.submitter.clone(),
                restarts: job.record.attempt,
                nodes: job
                    .record
                    .placement
                    .iter()
                    .map(|rank| rank.node_id.to_string())
                    .collect(),
                metrics: crate::convert::rank_metrics(&job.record),
                stalled_s: job
                    .communication
                    .stalled_ms(job.record.attempt, now_ms())
                    .map_or(0.0, |stalled| stalled as f64 / 1000.0),
            });
        }
        crate::telemetry::Snapshot {
            jobs_by_state,
            nodes,
            now_ms: now_ms(),
            running,
        }
    }

    /// The exposition `/metrics` serves to `viewer`.
    pub async fn exposition(&self, viewer: &crate::auth::Caller) -> Result<String> {
        let snapshot = self.snapshot(viewer).await;
        self.telemetry.exposition(&snapshot)
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

    /// Subscribes to the ids of jobs as they change.
    pub fn subscribe(&self) -> broadcast::Receiver<JobChanged> {
        self.events.subscribe()
    }

    /// Runs the scheduler and liveness checks until `shutdown` resolves: on every tick and
    /// whenever something (a submission, a registration, a finished job) wakes it.
    pub async fn run_background(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        let mut ticker = tokio::time::interval(self.config.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush_curves = tokio::time::interval(history::FLUSH_INTERVAL);
        flush_curves.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = ticker.tick() => {}
                _ = self.wake.notified() => {}
                _ = flush_curves.tick() => {
                    if let Err(error) = self.flush_histories().await {
                        warn!(%error, "storing metric curves failed");
                    }
                    continue;
                }
            }
            if let Err(error) = self.check_liveness().await {
                warn!(%error, "liveness check failed");
            }
            if let Err(error) = self.check_hangs().await {
                warn!(%error, "hang check failed");
            }
            if let Err(error) = self.advance_sweeps().await {
                warn!(%error, "advancing sweeps failed");
            }
            if let Err(error) = self.schedule().await {
                warn!(%error, "scheduler pass failed");
            }
        }
    }

    /// Waits until every job change made so far is stored; for shutdown, so that nothing is
    /// lost.
    pub async fn flush(&self) -> Result<()> {
        let curves = self.flush_histories().await;
        self.writes.barrier().landed().await?;
        curves
    }

    /// Tells watchers that the job changed, for changes that are not stored (metrics); the
    /// writer tells them of stored ones.
    fn publish(&self, job: &LiveJob) {
        // No watcher is not an error.
        let _ = self.events.send(JobChanged {
            job_id: job.record.id.clone(),
            finished: job.record.state.is_terminal(),
        });
    }

    /// Retires the job if it has ended and every process of it is gone: its log bookkeeping
    /// and rendezvous go, and only its summary stays in memory.
    fn retire_if_done(&self, state: &mut State, job_id: &JobId) {
        let Some(seq) = seq_of(job_id) else {
            return;
        };
        let Some(JobSlot::Live(job)) = state.jobs.get(&seq) else {
            return;
        };
        if &job.record.id != job_id || !job.done() {
            return;
        }
        let summary = JobSummary::of(&job.record);
        state.jobs.insert(seq, JobSlot::Retired(summary));
        self.logs.close(job_id);
        self.rendezvous.drop_job(job_id);
        debug!(%job_id, "job retired");
    }

    /// Moves a live job to a final state: records why, enqueues its record on `writes`, stops
    /// every rank that may still run and closes its rendezvous (stopping needs no durable
    /// record first; watchers hear of the end once it is stored).
    fn finish_job(
        &self,
        state: &mut State,
        job_id: &JobId,
        to: JobState,
        reason: String,
        writes: &mut Vec<Written>,
    ) -> Result<()> {
        let Some(entry) = state.live_mut(job_id) else {
            return Ok(());
        };
        if entry.record.state.is_terminal() {
            return Ok(());
        }
        let ran_attempt = entry.record.state.runs_attempt();
        entry.record.state = transition(job_id.as_str(), entry.record.state, to)?;
        entry.record.reason = truncate(&reason, MAX_REASON_BYTES).into_owned();
        let now = now_ms();
        entry.record.finished_at_ms = Some(now);
        if ran_attempt {
            let failed_node = entry
                .record
                .blamed_rank
                .and_then(|blamed| entry.record.placement.iter().find(|r| r.rank == blamed))
                .map(|rank| rank.node_id.clone());
            let ended = restarts::ended_attempt(
                &entry.record,
                now,
                entry.record.reason.clone(),
                failed_node,
            );
            entry.record.attempts.push(ended);
            restarts::forget_old_placements(&mut entry.record.attempts);
        }
        entry.recovery = None;
        mark_never_started(&mut entry.record.placement);
        match to {
            JobState::Succeeded => info!(%job_id, "job succeeded"),
            _ => warn!(%job_id, state = to.name(), reason = %entry.record.reason, "job ended"),
        }
        // The curves first: whoever hears that the job ended can read them whole.
        if let Some(curves) = self.histories.take_final(job_id) {
            writes.push(self.writes.put_curves(job_id, curves));
        }
        writes.push(self.writes.put_job(&entry.record));
        let reason = entry.record.reason.clone();
        state.stop_ranks(job_id, &reason);
        self.rendezvous.drop_job(job_id);
        self.retire_if_done(state, job_id);
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
        (job_id, rank, attempt): (&str, u32, u32),
        expected: bool,
    ) {
        if expected {
            debug!(%node_id, job_id, rank, attempt, "rank of an ended attempt still runs; asking again to stop it");
        } else {
            warn!(%node_id, job_id, rank, attempt, "stopping a rank the coordinator does not know");
        }
        state.send(
            node_id,
            instruction::Kind::StopRank(StopRank {
                job_id: job_id.to_owned(),
                rank,
                reason: "job is not running".to_owned(),
                attempt,
            }),
        );
    }
}

/// Marks the ranks of an ended attempt that never started as ended: they will not start now.
fn mark_never_started(placement: &mut [RankRecord]) {
    for rank in placement
        .iter_mut()
        .filter(|rank| rank.state == RankState::Pending)
    {
        rank.state = RankState::Exited;
        rank.detail = "never started".to_owned();
    }
}

/// Converts a duration to whole milliseconds for the protocol, saturating.
fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use cohort_proto::v1;

    use super::testing::{cluster, register};
    use super::*;
    use crate::error::Error;

    const SPEC: &str =
        "version = 1\nname = \"held\"\nkind = \"command\"\n[command]\nprogram = \"true\"\n";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_heartbeat_completes_while_a_submission_is_being_written() {
        let data_dir = tempfile::tempdir().unwrap();
        let (cluster, store) = cluster(data_dir.path()).await;
        let (session_id, _stream) = register(&cluster, "node-b").await;

        store.hold_writes();
        let submitting = tokio::spawn({
            let cluster = cluster.clone();
            async move {
                cluster
                    .submit(SPEC.to_owned(), true, "client".to_owned())
                    .await
            }
        });
        store.write_held().await;

        // The submission's record is in flight; another node's heartbeat must not wait for it.
        // The bound only turns a hang into a failure: the heartbeat needs no store write.
        let heartbeat = cluster.heartbeat(v1::HeartbeatRequest {
            node_id: "node-b".to_owned(),
            session_id,
            ranks: Vec::new(),
            leaving: false,
        });
        let answered = tokio::time::timeout(Duration::from_secs(10), heartbeat).await;
        assert!(
            matches!(answered, Ok(Ok(true))),
            "the heartbeat waited for the submission's store write: {answered:?}"
        );
        assert!(
            !submitting.is_finished(),
            "a submission is answered only once its record is stored"
        );
        assert!(store.written_jobs().is_empty());

        store.release_writes();
        let job = submitting.await.unwrap().unwrap();
        let job_id = JobId::new(job.job_id).unwrap();
        assert_eq!(store.written_jobs(), [(job_id, JobState::Queued)]);
    }

    /// The state of a job in memory, stored or not (reads wait for the store).
    async fn state_in_memory(cluster: &Cluster, job_id: &JobId) -> JobState {
        match cluster.state.lock().await.slot(job_id) {
            Some(JobSlot::Live(job)) => job.record.state,
            Some(JobSlot::Retired(summary)) => summary.state,
            None => panic!("job {job_id} is not in memory"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_of_one_job_land_in_the_order_its_state_changed() {
        let data_dir = tempfile::tempdir().unwrap();
        let (cluster, store) = cluster(data_dir.path()).await;
        let (_session_id, mut stream) = register(&cluster, "node-a").await;
        let job = cluster
            .submit(SPEC.to_owned(), false, "client".to_owned())
            .await
            .unwrap();
        let job_id = JobId::new(job.job_id).unwrap();

        store.hold_writes();
        // The scheduler places the job; its placement is being written.
        let scheduling = tokio::spawn({
            let cluster = cluster.clone();
            async move { cluster.schedule().await }
        });
        store.write_held().await;
        assert_eq!(
            state_in_memory(&cluster, &job_id).await,
            JobState::Scheduled
        );
        // The user cancels meanwhile: memory changes at once, the record queues behind.
        let cancelling = tokio::spawn({
            let (cluster, job_id) = (cluster.clone(), job_id.clone());
            async move { cluster.cancel(&job_id).await }
        });
        // The bound only turns a hang into a failure: the cancel needs no store write to apply.
        tokio::time::timeout(Duration::from_secs(10), async {
            while state_in_memory(&cluster, &job_id).await != JobState::Cancelled {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the cancellation reached memory while the placement was being written");
        assert!(
            !cancelling.is_finished(),
            "a cancellation is answered only once its record is stored"
        );
        assert_eq!(store.written_jobs(), [(job_id.clone(), JobState::Queued)]);
        // A read of the (now retired) job waits for the queue: it shows the cancelled record,
        // never an older stored one.
        let reading = tokio::spawn({
            let (cluster, job_id) = (cluster.clone(), job_id.clone());
            async move { cluster.job(&job_id).await }
        });

        store.release_writes();
        scheduling.await.unwrap().unwrap();
        let cancelled = cancelling.await.unwrap().unwrap();
        assert_eq!(cancelled.state(), v1::JobState::Cancelled);
        assert_eq!(
            reading.await.unwrap().unwrap().state(),
            v1::JobState::Cancelled
        );
        assert_eq!(
            store.written_jobs(),
            [
                (job_id.clone(), JobState::Queued),
                (job_id.clone(), JobState::Scheduled),
                (job_id.clone(), JobState::Cancelled),
            ]
        );
        let stored = store.get_job(&job_id).await.unwrap().unwrap();
        assert_eq!(stored.state, JobState::Cancelled);
        // The job was cancelled before its placement was stored: no rank was started.
        assert!(
            matches!(stream.try_recv(), Err(mpsc::error::TryRecvError::Empty)),
            "a rank of a cancelled job was started"
        );
    }

    #[tokio::test]
    async fn a_submission_whose_write_fails_is_refused_and_leaves_nothing_behind() {
        let data_dir = tempfile::tempdir().unwrap();
        let (cluster, store) = cluster(data_dir.path()).await;
        store.fail_writes(1);
        let error = cluster
            .submit(SPEC.to_owned(), true, "client".to_owned())
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Store(_)), "{error}");
        assert!(cluster.jobs(0, "").await.unwrap().jobs.is_empty());

        let job = cluster
            .submit(SPEC.to_owned(), true, "client".to_owned())
            .await
            .unwrap();
        let listed: Vec<_> = cluster
            .jobs(0, "")
            .await
            .unwrap()
            .jobs
            .into_iter()
            .map(|job| job.job_id)
            .collect();
        let job_id = JobId::new(job.job_id).unwrap();
        assert_eq!(listed, [job_id.to_string()]);
        assert_eq!(store.written_jobs(), [(job_id, JobState::Queued)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_hangs_up_during_its_submission_leaves_a_known_job() {
        use cohort_proto::v1::job_control_server::JobControl;

        let data_dir = tempfile::tempdir().unwrap();
        let (cluster, store) = cluster(data_dir.path()).await;
        let auth = crate::auth::Authenticator::load(store.clone(), data_dir.path(), None)
            .await
            .unwrap();
        let service = crate::service::CoordinatorService::new(cluster.clone(), Arc::new(auth));
        let admin =
            std::fs::read_to_string(data_dir.path().join(crate::auth::ADMIN_TOKEN_FILE)).unwrap();
        let request = || {
            let mut request = tonic::Request::new(v1::SubmitJobRequest {
                spec_toml: SPEC.to_owned(),
                wait_for_resources: true,
                resume_from: String::new(),
            });
            let bearer = format!("Bearer {}", admin.trim()).parse().unwrap();
            request.metadata_mut().insert("authorization", bearer);
            request
        };

        store.hold_writes();
        tokio::select! {
            answer = service.submit_job(request()) => {
                panic!("answered before its record was written: {answer:?}")
            }
            // The client hangs up: its call is dropped while the record is being written.
            () = store.write_held() => {}
        }
        store.release_writes();

        // Submissions run one at a time, so once a second one is answered the first has ended.
        let second = service.submit_job(request()).await.unwrap().into_inner();
        let written = store.written_jobs();
        assert_eq!(written.len(), 2, "both records are stored: {written:?}");
        let (first, _) = &written[0];
        assert_ne!(first.as_str(), second.job.unwrap().job_id);
        let known = cluster.job(first).await;
        assert!(
            known.is_ok(),
            "the stored job of a client that hung up is unknown until a restart: {known:?}"
        );
    }
}
