//! The records the coordinator keeps and persists: jobs, their ranks' placement, and nodes.
//!
//! Records are plain data. They are stored with bincode (see [`crate::store::codec`]) and
//! converted to protocol messages only at the gRPC boundary.

use cohort_jobspec::DeviceKind;
use cohort_proto::{JobId, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::lifecycle::JobState;

/// Milliseconds since the Unix epoch.
pub type UnixMillis = i64;

/// Returns the current time in Unix milliseconds.
pub fn now_ms() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// What happened to one rank, as far as the coordinator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RankState {
    /// Placed; the worker has not reported it yet.
    Pending,
    /// The worker reports the process alive.
    Running,
    /// The process ended (see `exit_code` / `signal`).
    Exited,
    /// Its node was lost; the process state is unknown.
    Lost,
    /// The worker could not start the process.
    StartFailed,
}

/// Whether Cohort itself stopped a rank process, and why (see `StopCause` in cohort.proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum StopCause {
    /// Cohort did not stop it: it ended on its own, or something else killed it.
    #[default]
    None,
    /// The coordinator told its worker to stop it.
    Instructed,
    /// Its worker was shut down and stopped it before leaving.
    WorkerShutdown,
    /// Its worker lost the coordinator for the heartbeat deadline and stopped it.
    CoordinatorLost,
    /// It outlived its worker; the restarted worker killed what was left of it.
    WorkerRestarted,
}

impl RankState {
    /// Whether the rank will not run again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RankState::Exited | RankState::Lost | RankState::StartFailed
        )
    }
}

/// One rank of a job: where it is placed and how it is doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankRecord {
    /// The rank, `0..world_size`.
    pub rank: u32,
    /// Node the rank runs on.
    pub node_id: NodeId,
    /// Index among the job's ranks on that node.
    pub local_rank: u32,
    /// Indices of the node's devices (of the job's device kind) the rank holds.
    pub devices: Vec<u32>,
    /// Last known state.
    pub state: RankState,
    /// OS process id on its node, 0 before it started.
    pub pid: u32,
    /// Exit code when the process exited normally.
    pub exit_code: Option<i32>,
    /// Signal number when the process was killed by a signal.
    pub signal: Option<i32>,
    /// When the worker saw the process end.
    pub exited_at_ms: Option<UnixMillis>,
    /// Free-form detail: why a start failed, the last line of error output of a failed
    /// process, why Cohort stopped it; at most [`crate::limits::MAX_DETAIL_BYTES`].
    pub detail: String,
    /// Whether Cohort stopped the process, and why.
    pub stop_cause: StopCause,
}

/// What one of a job's processes does. Placement records number every process; the
/// parameter servers of a `comm = "ps"` job come after its training ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessRole {
    /// A training rank (or a rank of a command job).
    Rank,
    /// The parameter server of one shard.
    ParameterServer {
        /// The shard it serves.
        shard: u32,
    },
}

impl ProcessRole {
    /// Returns the role of process `index` of a job with `ranks` training ranks.
    pub fn of(index: u32, ranks: u32) -> Self {
        match index.checked_sub(ranks) {
            None => Self::Rank,
            Some(shard) => Self::ParameterServer { shard },
        }
    }

    /// Names process `index` in messages: `rank 2`, `parameter server shard 1 (process 5)`.
    pub fn describe(self, index: u32) -> String {
        match self {
            Self::Rank => format!("rank {index}"),
            Self::ParameterServer { shard } => {
                format!("parameter server shard {shard} (process {index})")
            }
        }
    }
}

impl RankRecord {
    /// Whether the rank ended successfully.
    pub fn succeeded(&self) -> bool {
        self.state == RankState::Exited && self.exit_code == Some(0)
    }

    /// Describes how the rank ended, e.g. `exited with code 3: error: data.path /x: ...`,
    /// `killed by signal 9 (SIGKILL), not by cohort`, `stopped by cohort (cancelled by user)`.
    pub fn describe_end(&self) -> String {
        let detail = if self.detail.is_empty() {
            String::new()
        } else {
            format!(": {}", self.detail)
        };
        let checkpointed = i32::from(cohort_proto::launch::EXIT_STOPPED_WITH_CHECKPOINT);
        match (self.state, self.exit_code, self.signal) {
            (RankState::StartFailed, _, _) => format!("failed to start{detail}"),
            (RankState::Exited, Some(code), _) if code == checkpointed => {
                format!("stopped with a checkpoint{detail}")
            }
            (RankState::Lost, _, _) if self.detail.is_empty() => "lost with its node".to_owned(),
            (RankState::Lost, _, _) => format!("lost{detail}"),
            (RankState::Exited, code, signal) if self.stop_cause != StopCause::None => {
                let how = match (code, signal) {
                    (Some(code), _) => format!("exited with code {code}"),
                    (None, Some(signal)) => format!("ended by {}", signal_name(signal)),
                    _ => "ended".to_owned(),
                };
                format!("{how} after it was stopped{detail}")
            }
            (RankState::Exited, Some(code), _) => format!("exited with code {code}{detail}"),
            (RankState::Exited, None, Some(signal)) => {
                format!("killed by {}, not by cohort{detail}", signal_name(signal))
            }
            _ => format!("ended{detail}"),
        }
    }
}

/// `signal 9 (SIGKILL)`: the number and, for the common ones, the name.
pub fn signal_name(signal: i32) -> String {
    let name = match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return format!("signal {signal}"),
    };
    format!("signal {signal} ({name})")
}

/// A job and everything the coordinator must remember about it across restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job's id.
    pub id: JobId,
    /// Submission order, unique and increasing; FIFO within a priority follows it.
    pub seq: u64,
    /// The spec as submitted (TOML). Parsed again when needed, so a record never depends on
    /// the in-memory layout of the spec types.
    pub spec_toml: String,
    /// Name from the spec.
    pub name: String,
    /// Kind from the spec (`command`, `train`).
    pub kind: String,
    /// Scheduling priority; higher first.
    pub priority: i32,
    /// Number of processes placed together (gang size): the training ranks, then one
    /// parameter server per shard for `parallel.comm = "ps"`.
    pub ranks: u32,
    /// Devices each rank holds.
    pub devices_per_rank: u32,
    /// Kind of those devices.
    pub device_kind: DeviceKind,
    /// Whether the job may wait for a cluster larger than the current one.
    pub wait_for_resources: bool,
    /// Who submitted it: the user's name (records written before users existed hold the
    /// client's address). Queue caps count per submitter.
    pub submitter: String,
    /// Lifecycle state.
    pub state: JobState,
    /// Why the job is in its state (empty when there is nothing to say).
    pub reason: String,
    /// The rank whose failure `reason` describes, when a rank's end failed the job. Later
    /// reports may move the blame to a rank that failed earlier (the root cause).
    pub blamed_rank: Option<u32>,
    /// When it was submitted.
    pub submitted_at_ms: UnixMillis,
    /// When it was placed.
    pub scheduled_at_ms: Option<UnixMillis>,
    /// When every rank first reported running.
    pub started_at_ms: Option<UnixMillis>,
    /// When it reached a final state.
    pub finished_at_ms: Option<UnixMillis>,
    /// One entry per rank once placed, ordered by rank; empty while queued.
    pub placement: Vec<RankRecord>,
    /// Latest metrics per rank. Persisted with the record's other changes (not on every
    /// report), so the final figures survive a coordinator restart.
    pub metrics: std::collections::BTreeMap<u32, MetricsRecord>,
    /// The current attempt, from 0: how often the job was restarted. `placement`,
    /// `scheduled_at_ms` and `started_at_ms` are this attempt's.
    pub attempt: u32,
    /// How often a failed attempt may be restarted (the spec's `fault_tolerance.max_restarts`).
    pub max_restarts: u32,
    /// The fewest ranks a restart may run on (the spec's `fault_tolerance.min_ranks`); 0 for a
    /// job that always runs whole. An attempt of an elastic job may hold fewer processes than
    /// `ranks`: its `placement` says how many.
    pub min_ranks: u32,
    /// Every attempt that ended, oldest first (the last one is the job's end once it ended).
    pub attempts: Vec<AttemptRecord>,
    /// Nodes the job's next attempts avoid after failing on them.
    pub backoff: Vec<NodeBackoff>,
    /// Every checkpoint its ranks reported writing, oldest first; at most
    /// [`crate::limits::MAX_CHECKPOINT_VERSIONS`] (the oldest deleted ones go first).
    pub checkpoints: Vec<CheckpointVersion>,
    /// The sweep trial the job runs, if it is one.
    pub trial: Option<TrialTag>,
}

/// Where a sweep stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SweepState {
    /// Trials are running or will be started or promoted.
    Running,
    /// Every trial ended and at least one reported its metric.
    Succeeded,
    /// Every trial ended and none reported its metric.
    Failed,
    /// Cancelled by a user: no trial starts or resumes any more.
    Cancelled,
}

impl SweepState {
    /// Its name in output (`running`, `succeeded`, `failed`, `cancelled`).
    pub fn name(self) -> &'static str {
        match self {
            SweepState::Running => "running",
            SweepState::Succeeded => "succeeded",
            SweepState::Failed => "failed",
            SweepState::Cancelled => "cancelled",
        }
    }

    /// Whether the sweep has ended.
    pub fn is_terminal(self) -> bool {
        self != SweepState::Running
    }
}

/// A hyper-parameter sweep as stored: its file, its searcher's state, and the jobs that ran
/// each trial. Written before each job it submits is, so that a restarted coordinator
/// continues it without running a trial twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRecord {
    /// Its id.
    pub id: cohort_proto::SweepId,
    /// Submission order (the job sequence).
    pub seq: u64,
    /// The sweep file as submitted.
    pub spec_toml: String,
    /// Name from the file.
    pub name: String,
    /// Who submitted it; its trials are their jobs.
    pub submitter: String,
    /// Where it stands.
    pub state: SweepState,
    /// Why it ended (empty while running or when there is nothing to say).
    pub reason: String,
    /// When it was submitted.
    pub submitted_at_ms: UnixMillis,
    /// When it ended.
    pub finished_at_ms: Option<UnixMillis>,
    /// The searcher's state: every trial's rung, results and status.
    pub search: crate::sweeps::SearchState,
    /// The jobs of each trial, by trial number: one per rung it ran, oldest first.
    pub trial_jobs: Vec<Vec<JobId>>,
}

impl crate::store::codec::Record for SweepRecord {}

/// A checkpoint a job wrote: what `cohort checkpoints` lists and `--resume-from JOB@...`
/// resolves through.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointVersion {
    /// Optimizer steps completed when it was written.
    pub step: u64,
    /// The epoch of that step (0-based).
    pub epoch: u64,
    /// The attempt that wrote it, from 0.
    pub attempt: u32,
    /// Its directory on the node that wrote it.
    pub path: String,
    /// Total bytes of its files.
    pub bytes: u64,
    /// Evaluation loss at its step, if an evaluation ran there.
    pub eval_loss: Option<f64>,
    /// Evaluation accuracy at its step, if an evaluation ran there.
    pub eval_accuracy: Option<f64>,
    /// When its writing rank reported it.
    pub written_at_ms: UnixMillis,
    /// Deleted by the job's retention (`checkpoint.keep_last`, `keep_best`).
    pub deleted: bool,
}

/// Which sweep, trial and rung a job runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrialTag {
    /// The sweep.
    pub sweep_id: cohort_proto::ids::SweepId,
    /// The trial's number, from 0.
    pub trial: u32,
    /// The rung the job runs up to, from 0.
    pub rung: u32,
}

/// One ended attempt of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// Its number, from 0.
    pub attempt: u32,
    /// The nodes its processes ran on, each once, sorted; empty for old attempts of a job on
    /// many nodes (see [`crate::limits::MAX_ATTEMPT_NODES`]).
    pub nodes: Vec<NodeId>,
    /// When every process first reported running (`None`: it never fully started).
    pub started_at_ms: Option<UnixMillis>,
    /// When it ended: when its failure was seen, or the job's end.
    pub ended_at_ms: UnixMillis,
    /// Why it ended; empty for the attempt that succeeded.
    pub reason: String,
    /// Ended on purpose (its node was drained), not by a failure: it used no restart.
    pub planned: bool,
    /// The node its failure is blamed on, if any (the job's next attempts keep off it for a
    /// while).
    pub failed_node: Option<NodeId>,
    /// The higher-priority job it was stopped for, if it was preempted (a planned end).
    pub preempted_by: Option<JobId>,
}

/// A node a job keeps off after an attempt failed there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeBackoff {
    /// The node.
    pub node_id: NodeId,
    /// Attempts of the job that failed on it.
    pub failures: u32,
    /// Until when the job's attempts are not placed on it.
    pub until_ms: UnixMillis,
}

/// What is kept in memory of a retired job (ended, every process gone): what listing needs.
/// The full record stays in the store.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSummary {
    /// The job's id.
    pub id: JobId,
    /// Submission order.
    pub seq: u64,
    /// Name from the spec.
    pub name: String,
    /// Kind from the spec.
    pub kind: String,
    /// Scheduling priority.
    pub priority: i32,
    /// Gang size.
    pub ranks: u32,
    /// Devices each rank holds.
    pub devices_per_rank: u32,
    /// Kind of those devices.
    pub device_kind: DeviceKind,
    /// Who submitted it.
    pub submitter: String,
    /// Lifecycle state.
    pub state: JobState,
    /// Why the job is in its state.
    pub reason: String,
    /// When it was submitted.
    pub submitted_at_ms: UnixMillis,
    /// When it was placed.
    pub scheduled_at_ms: Option<UnixMillis>,
    /// When every rank first ran.
    pub started_at_ms: Option<UnixMillis>,
    /// When it ended.
    pub finished_at_ms: Option<UnixMillis>,
    /// The current attempt, from 0.
    pub attempt: u32,
}

impl JobSummary {
    /// The summary of a record.
    pub fn of(record: &JobRecord) -> Self {
        Self {
            id: record.id.clone(),
            seq: record.seq,
            name: record.name.clone(),
            kind: record.kind.clone(),
            priority: record.priority,
            ranks: record.ranks,
            devices_per_rank: record.devices_per_rank,
            device_kind: record.device_kind,
            submitter: record.submitter.clone(),
            state: record.state,
            reason: record.reason.clone(),
            submitted_at_ms: record.submitted_at_ms,
            scheduled_at_ms: record.scheduled_at_ms,
            started_at_ms: record.started_at_ms,
            finished_at_ms: record.finished_at_ms,
            attempt: record.attempt,
        }
    }
}

/// One device a node offers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// CPU slot or GPU.
    pub kind: DeviceKind,
    /// Index among the node's devices of that kind.
    pub index: u32,
    /// Model name.
    pub name: String,
    /// Total memory in bytes (0 for CPU slots).
    pub memory_total_bytes: u64,
    /// Free memory in bytes at registration.
    pub memory_free_bytes: u64,
    /// CUDA compute capability (empty for CPU slots).
    pub compute_capability: String,
    /// PCI bus id (empty for CPU slots).
    pub pci_bus_id: String,
    /// For a GPU, its direct paths to the node's other GPUs (absent in records written before
    /// GPUs reported them).
    #[serde(default)]
    pub peers: Vec<GpuPeerRecord>,
}

/// A direct path from one GPU to another of the same node (see `GpuPeer` in cohort.proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuPeerRecord {
    /// Index of the other GPU.
    pub index: u32,
    /// Whether peer-to-peer memory access works.
    pub access: bool,
    /// Whether atomics work natively over the path (NVLink, NVSwitch).
    pub native_atomics: bool,
    /// The driver's relative performance rank of the path (0 is best).
    pub performance_rank: i32,
}

/// A worker node as registered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node's id.
    pub id: NodeId,
    /// Host name reported by the worker.
    pub hostname: String,
    /// Address other nodes reach the node's ranks at.
    pub address: String,
    /// Devices the node offers.
    pub devices: Vec<DeviceRecord>,
    /// When it last registered.
    pub registered_at_ms: UnixMillis,
    /// Drained by an admin: nothing new is placed on it (kept across its registrations and
    /// the coordinator's restarts).
    pub draining: bool,
}

/// Latest metrics one rank reported.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct MetricsRecord {
    /// Optimizer steps done.
    pub step: u64,
    /// Steps the job will run in all (0 when unknown).
    pub total_steps: u64,
    /// Current epoch.
    pub epoch: u32,
    /// Training loss of the last step.
    pub loss: f64,
    /// Training throughput of this rank.
    pub samples_per_s: f64,
    /// Loss on the evaluation split, after the last evaluation.
    pub eval_loss: Option<f64>,
    /// Accuracy on the evaluation split, after the last evaluation.
    pub eval_accuracy: Option<f64>,
    /// Other named figures.
    pub extra: std::collections::BTreeMap<String, f64>,
    /// When it was reported.
    pub reported_at_ms: UnixMillis,
}

impl MetricsRecord {
    /// Its last evaluation's value of `metric`, if it reported one.
    pub fn evaluation(&self, metric: cohort_jobspec::objective::Metric) -> Option<f64> {
        match metric {
            cohort_jobspec::objective::Metric::EvalLoss => self.eval_loss,
            cohort_jobspec::objective::Metric::EvalAccuracy => self.eval_accuracy,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use prost::Message;

    use super::*;
    use crate::limits::{
        MAX_ATTEMPT_NODES, MAX_ATTEMPTS, MAX_DETAIL_BYTES, MAX_DEVICES_PER_NODE, MAX_EXTRA_METRICS,
        MAX_GPU_PEERS, MAX_METRIC_NAME_BYTES, MAX_NAME_BYTES, MAX_PROCESSES_PER_JOB,
        MAX_REASON_BYTES, MAX_RECORD_BYTES,
    };
    use cohort_jobspec::job::{MAX_DEVICES_PER_RANK, MAX_NAME_LEN, MAX_SPEC_BYTES};
    use cohort_proto::ids::MAX_ID_LEN;

    /// The largest job record the bounds allow: the largest spec, the widest gang with every
    /// process on its own longest-named node holding the most devices, the longest details and
    /// reason, and every rank's metrics with the most, longest-named extras.
    fn largest_job() -> JobRecord {
        let node = |index: usize| {
            let suffix = index.to_string();
            NodeId::new(format!("{}{suffix}", "n".repeat(MAX_ID_LEN - suffix.len()))).unwrap()
        };
        JobRecord {
            id: JobId::new(format!("{}-{}", "j".repeat(MAX_NAME_LEN), u64::MAX)).unwrap(),
            seq: u64::MAX,
            spec_toml: "#".repeat(MAX_SPEC_BYTES),
            name: "j".repeat(MAX_NAME_LEN),
            kind: "command".to_owned(),
            priority: i32::MIN,
            ranks: u32::MAX,
            devices_per_rank: u32::MAX,
            device_kind: DeviceKind::Gpu,
            wait_for_resources: true,
            submitter: "f".repeat(64),
            state: JobState::Failed,
            reason: "r".repeat(MAX_REASON_BYTES),
            blamed_rank: Some(u32::MAX),
            submitted_at_ms: i64::MIN,
            scheduled_at_ms: Some(i64::MIN),
            started_at_ms: Some(i64::MIN),
            finished_at_ms: Some(i64::MIN),
            placement: (0..MAX_PROCESSES_PER_JOB)
                .map(|rank| RankRecord {
                    rank: u32::MAX - rank as u32,
                    node_id: node(rank),
                    local_rank: u32::MAX,
                    devices: vec![u32::MAX; MAX_DEVICES_PER_RANK as usize],
                    state: RankState::StartFailed,
                    pid: u32::MAX,
                    exit_code: Some(i32::MIN),
                    signal: Some(i32::MIN),
                    exited_at_ms: Some(i64::MIN),
                    detail: "d".repeat(MAX_DETAIL_BYTES),
                    stop_cause: StopCause::WorkerRestarted,
                })
                .collect(),
            metrics: (0..MAX_PROCESSES_PER_JOB as u32)
                .map(|rank| {
                    let extra: BTreeMap<String, f64> = (0..MAX_EXTRA_METRICS)
                        .map(|index| {
                            let suffix = index.to_string();
                            let name = "m".repeat(MAX_METRIC_NAME_BYTES - suffix.len()) + &suffix;
                            (name, f64::MAX)
                        })
                        .collect();
                    let metrics = MetricsRecord {
                        step: u64::MAX,
                        total_steps: u64::MAX,
                        epoch: u32::MAX,
                        loss: f64::MAX,
                        samples_per_s: f64::MAX,
                        eval_loss: Some(f64::MAX),
                        eval_accuracy: Some(f64::MAX),
                        extra,
                        reported_at_ms: i64::MIN,
                    };
                    (u32::MAX - rank, metrics)
                })
                .collect(),
            attempt: u32::MAX,
            max_restarts: u32::MAX,
            min_ranks: u32::MAX,
            attempts: (0..MAX_ATTEMPTS)
                .map(|attempt| AttemptRecord {
                    attempt: u32::MAX - attempt as u32,
                    // The nodes kept add up to the bound; the widest gang has each process on
                    // its own node.
                    nodes: if attempt + 1 == MAX_ATTEMPTS {
                        (0..MAX_ATTEMPT_NODES).map(node).collect()
                    } else {
                        Vec::new()
                    },
                    started_at_ms: Some(i64::MIN),
                    ended_at_ms: i64::MIN,
                    reason: "r".repeat(MAX_REASON_BYTES),
                    planned: false,
                    failed_node: Some(node(attempt)),
                    preempted_by: Some(
                        JobId::new(format!("{}-{}", "p".repeat(MAX_NAME_LEN), u64::MAX)).unwrap(),
                    ),
                })
                .collect(),
            backoff: (0..MAX_ATTEMPTS)
                .map(|attempt| NodeBackoff {
                    node_id: node(attempt),
                    failures: u32::MAX,
                    until_ms: i64::MIN,
                })
                .collect(),
            checkpoints: (0..crate::limits::MAX_CHECKPOINT_VERSIONS)
                .map(|index| CheckpointVersion {
                    step: u64::MAX - index as u64,
                    epoch: u64::MAX,
                    attempt: u32::MAX,
                    path: "p".repeat(cohort_jobspec::job::MAX_STRING_LEN),
                    bytes: u64::MAX,
                    eval_loss: Some(f64::MAX),
                    eval_accuracy: Some(f64::MAX),
                    written_at_ms: i64::MIN,
                    deleted: true,
                })
                .collect(),
            trial: Some(TrialTag {
                sweep_id: cohort_proto::SweepId::new("s".repeat(MAX_ID_LEN)).unwrap(),
                trial: u32::MAX,
                rung: u32::MAX,
            }),
        }
    }

    /// The largest node record the bounds allow.
    fn largest_node() -> NodeRecord {
        let name = "x".repeat(MAX_NAME_BYTES);
        NodeRecord {
            id: NodeId::new("n".repeat(MAX_ID_LEN)).unwrap(),
            hostname: name.clone(),
            address: name.clone(),
            devices: (0..MAX_DEVICES_PER_NODE)
                .map(|index| DeviceRecord {
                    kind: DeviceKind::Gpu,
                    index: u32::MAX - index as u32,
                    name: name.clone(),
                    memory_total_bytes: u64::MAX,
                    memory_free_bytes: u64::MAX,
                    compute_capability: name.clone(),
                    pci_bus_id: name.clone(),
                    peers: vec![
                        GpuPeerRecord {
                            index: u32::MAX,
                            access: true,
                            native_atomics: true,
                            performance_rank: i32::MIN,
                        };
                        MAX_GPU_PEERS
                    ],
                })
                .collect(),
            registered_at_ms: i64::MIN,
            draining: true,
        }
    }

    #[test]
    fn the_largest_records_fit_the_record_bound() {
        let job = crate::store::codec::encode(&largest_job()).unwrap();
        let node = crate::store::codec::encode(&largest_node()).unwrap();
        eprintln!(
            "largest job record {} bytes, node record {} bytes, bound {MAX_RECORD_BYTES}",
            job.len(),
            node.len()
        );
        assert!(job.len() <= MAX_RECORD_BYTES, "{} bytes", job.len());
        assert!(node.len() <= MAX_RECORD_BYTES, "{} bytes", node.len());
    }

    #[test]
    fn the_largest_job_fits_one_grpc_message() {
        let info = crate::convert::job_info(&largest_job());
        let bytes = info.encoded_len();
        assert!(
            bytes <= cohort_proto::MAX_MESSAGE_BYTES,
            "{bytes} bytes, over {}",
            cohort_proto::MAX_MESSAGE_BYTES
        );
    }
}

/// One point of a rank's metric curve: its figures after one reported step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    /// The step the figures are of.
    pub step: u64,
    /// The epoch, from 1.
    pub epoch: u32,
    /// Training loss.
    pub loss: f64,
    /// Job-wide throughput as the rank saw it.
    pub samples_per_s: f64,
    /// The evaluation's loss, on a step that evaluated.
    pub eval_loss: Option<f64>,
    /// The evaluation's accuracy, on a step that evaluated.
    pub eval_accuracy: Option<f64>,
    /// When the rank reported it.
    pub at_ms: UnixMillis,
}

impl MetricPoint {
    /// Whether the point carries an evaluation (such points are kept longest).
    fn evaluated(&self) -> bool {
        self.eval_loss.is_some() || self.eval_accuracy.is_some()
    }
}

/// Every rank's metric curve of one job, bounded: each rank keeps at most
/// [`MetricHistory::MAX_POINTS`]; when a curve is full, its older half is thinned to every
/// other point (evaluations kept while they fit), so a long run keeps its whole shape at a
/// coarser grain and its recent steps in full.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricHistory {
    /// The points of each rank, in step order.
    pub ranks: BTreeMap<u32, Vec<MetricPoint>>,
}

impl crate::store::codec::Record for MetricHistory {}

impl MetricHistory {
    /// Most points kept per rank.
    pub const MAX_POINTS: usize = 1024;

    /// Adds `point` to `rank`'s curve. A report of the step the curve ends at replaces that
    /// point (an evaluation reported after its step); one of an earlier step (a restarted
    /// attempt going back to its checkpoint) drops the points after it first.
    pub fn record(&mut self, rank: u32, point: MetricPoint) {
        let points = self.ranks.entry(rank).or_default();
        while points.last().is_some_and(|last| last.step > point.step) {
            points.pop();
        }
        match points.last_mut() {
            Some(last) if last.step == point.step => *last = point,
            _ => points.push(point),
        }
        if points.len() > Self::MAX_POINTS {
            thin_older_half(points, true);
            if points.len() > Self::MAX_POINTS {
                thin_older_half(points, false);
            }
        }
    }
}

/// Drops every other point of the older half of `points`, keeping evaluations when
/// `keep_evaluations`.
fn thin_older_half(points: &mut Vec<MetricPoint>, keep_evaluations: bool) {
    let half = points.len() / 2;
    let mut index = 0;
    points.retain(|point| {
        let keep = index >= half || index % 2 == 0 || (keep_evaluations && point.evaluated());
        index += 1;
        keep
    });
}

#[cfg(test)]
mod history_tests {
    use super::*;

    fn point(step: u64) -> MetricPoint {
        MetricPoint {
            step,
            epoch: 1,
            loss: 1.0 / (step as f64 + 1.0),
            samples_per_s: 100.0,
            eval_loss: None,
            eval_accuracy: step.is_multiple_of(500).then_some(0.5),
            at_ms: step as i64,
        }
    }

    #[test]
    fn a_long_run_keeps_its_whole_span_in_bounded_points_with_every_evaluation() {
        let mut history = MetricHistory::default();
        for step in 0..=20_000 {
            history.record(0, point(step));
        }
        let points = &history.ranks[&0];
        assert!(
            points.len() <= MetricHistory::MAX_POINTS,
            "{}",
            points.len()
        );
        assert!(
            points.len() >= MetricHistory::MAX_POINTS / 2,
            "{}",
            points.len()
        );
        assert_eq!(points.first().unwrap().step, 0);
        assert_eq!(points.last().unwrap().step, 20_000);
        assert!(points.windows(2).all(|pair| pair[0].step < pair[1].step));
        let evaluations = points.iter().filter(|point| point.evaluated()).count();
        assert_eq!(evaluations, 41, "every 500th step evaluated");
        // The newest steps are kept at full resolution.
        let tail: Vec<u64> = points[points.len() - 5..].iter().map(|p| p.step).collect();
        assert_eq!(tail, [19_996, 19_997, 19_998, 19_999, 20_000]);
    }

    #[test]
    fn a_repeated_step_replaces_its_point_and_a_restart_rewinds_the_curve() {
        let mut history = MetricHistory::default();
        for step in [1, 2, 3] {
            history.record(1, point(step));
        }
        let mut evaluated = point(3);
        evaluated.eval_loss = Some(0.3);
        history.record(1, evaluated.clone());
        assert_eq!(history.ranks[&1].len(), 3);
        assert_eq!(history.ranks[&1][2], evaluated);
        // The next attempt resumes from step 2's checkpoint.
        history.record(1, point(2));
        let steps: Vec<u64> = history.ranks[&1].iter().map(|p| p.step).collect();
        assert_eq!(steps, [1, 2]);
    }
}
