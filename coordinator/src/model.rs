//! The records the coordinator keeps and persists: jobs, their ranks' placement, and nodes.
//!
//! Records are plain data. They are stored with bincode (see [`crate::store::codec`]) and
//! converted to protocol messages only at the gRPC boundary.

use cohort_proto::{JobId, NodeId};
use cohort_spec::DeviceKind;
use serde::{Deserialize, Serialize};

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
    /// Free-form detail (why a start failed).
    pub detail: String,
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

    /// Describes how the rank ended, e.g. `exited with code 3` or `killed by signal 9`.
    pub fn describe_end(&self) -> String {
        match (self.state, self.exit_code, self.signal) {
            (RankState::Exited, Some(code), _) => format!("exited with code {code}"),
            (RankState::Exited, None, Some(signal)) => format!("killed by signal {signal}"),
            (RankState::StartFailed, _, _) => format!("failed to start: {}", self.detail),
            (RankState::Lost, _, _) => "lost with its node".to_owned(),
            _ => "ended".to_owned(),
        }
    }
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
