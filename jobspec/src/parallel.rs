//! `[parallel]`: how a training job divides its ranks: data-parallel replicas, pipeline stages
//! and tensor-parallel shards of a transformer, and how gradients are exchanged (ring
//! all-reduce or parameter servers).

use serde::{Deserialize, Serialize};

use crate::job::MAX_RANKS;
use crate::problems::Problems;
use crate::train::{
    DEFAULT_GRADIENT_BUCKET_BYTES, DEFAULT_STALENESS, MAX_GRADIENT_BUCKET_BYTES, MAX_MESH_AXIS,
    MAX_MICRO_BATCHES, MAX_PS_SHARDS, MAX_STALENESS, MIN_GRADIENT_BUCKET_BYTES,
};

/// How ranks exchange gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Communication {
    /// Ring all-reduce between the ranks; every rank runs the optimizer on the averaged
    /// gradients.
    #[default]
    Allreduce,
    /// Sharded parameter servers: ranks push gradients and pull parameters; the servers run
    /// the optimizer.
    Ps,
}

/// Which transport carries an all-reduce job's gradients between ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CollectiveBackend {
    /// NCCL for image models on GPU ranks with more than one replica, the TCP ring otherwise.
    #[default]
    Auto,
    /// The ring all-reduce over TCP between the ranks' host memory.
    Tcp,
    /// NCCL between the ranks' GPUs (GPU ranks only).
    Nccl,
}

impl CollectiveBackend {
    /// The backend's name in job specs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Tcp => "tcp",
            Self::Nccl => "nccl",
        }
    }
}

/// How ranks' host buffers travel between the ranks of a collective group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HostTransport {
    /// Shared memory when every rank of a group is on one node, the TCP ring otherwise.
    #[default]
    Auto,
    /// The TCP ring, even between ranks of one node.
    Tcp,
    /// Shared memory; the job fails at start unless its ranks share a node.
    Shm,
}

impl HostTransport {
    /// The transport's name in job specs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Tcp => "tcp",
            Self::Shm => "shm",
        }
    }
}

/// When a parameter server applies pushed gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PsMode {
    /// Waits for every rank's gradients of a step, averages them and applies the optimizer
    /// once: the same result as all-reduce data parallelism.
    #[default]
    Sync,
    /// Applies each push on arrival (one at a time per shard); ranks never wait for each other.
    Async,
    /// Stale-synchronous: applied on arrival, but a rank may run at most `staleness` steps
    /// ahead of the slowest one.
    Ssp,
}

impl PsMode {
    /// The mode's name in job specs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Async => "async",
            Self::Ssp => "ssp",
        }
    }
}

impl std::fmt::Display for PsMode {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.name())
    }
}

/// `[parallel]`: how ranks divide the work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParallelSpec {
    /// Data-parallel degree: number of model replicas, each taking a share of every global
    /// batch (1 to 4096). Default 1.
    pub data: u32,
    /// Size of the flat f32 buffers gradients are packed into before each all-reduce, in bytes
    /// (4 KiB to 1 GiB). Default 25 MiB.
    pub gradient_bucket_bytes: u64,
    /// How gradients are exchanged: `"allreduce"` or `"ps"` (parameter servers, run by the
    /// job as extra processes on CPU slots). Default `"allreduce"`.
    pub comm: Communication,
    /// Transport of `comm = "allreduce"`: `"auto"`, `"tcp"` or `"nccl"`. `"auto"` picks NCCL
    /// for image models on GPU ranks (`resources.device = "gpu"`) with `data` > 1, the TCP ring
    /// otherwise. Default `"auto"`.
    pub collective: CollectiveBackend,
    /// How host-memory collectives travel (the TCP ring's and the transformer mesh's groups):
    /// `"auto"` (shared memory between ranks on one node, TCP otherwise), `"tcp"` or `"shm"`
    /// (every rank on one node). Default `"auto"`.
    pub transport: HostTransport,
    /// Parameter-server processes (shards) with `comm = "ps"`, 1 to 256. Default 1.
    pub ps_shards: Option<u32>,
    /// Parameter-server mode with `comm = "ps"`: `"sync"`, `"async"` or `"ssp"`.
    /// Default `"sync"`.
    pub ps_mode: Option<PsMode>,
    /// How many steps a rank may run ahead of the slowest with `ps_mode = "ssp"` (0 to
    /// 1,000,000; 0 behaves like sync without averaging). Default 2.
    pub staleness: Option<u64>,
    /// Pipeline stages: the transformer's blocks are split into this many consecutive stages,
    /// each on its own rank (1 to 256, at most `model.layers`). Default 1.
    pub pipeline: u32,
    /// Tensor-parallel degree: each block's attention heads and MLP are split over this many
    /// ranks (1 to 256, dividing `model.heads` and `model.width`). Default 1.
    pub tensor: u32,
    /// Micro-batches each data-parallel replica's share of a step is cut into for the
    /// pipeline (1 to 1024; the share must divide evenly). Default: `pipeline`.
    pub micro_batches: Option<u32>,
    /// Pipeline schedule: `"gpipe"` (all forwards, then all backwards) or `"1f1b"` (one
    /// forward, one backward; at most `pipeline` micro-batches of activations held).
    /// Default `"1f1b"`.
    pub pipeline_schedule: PipelineSchedule,
    /// Blocks of each pipeline stage, in order (one entry per stage, each at least 1, summing
    /// to `model.layers`). Default: balanced by parameter count.
    pub stage_layers: Option<Vec<u32>>,
}

/// The order in which a pipeline stage runs its micro-batches' forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum PipelineSchedule {
    /// GPipe: every micro-batch forward, then every micro-batch backward.
    #[serde(rename = "gpipe")]
    Gpipe,
    /// One forward, one backward (PipeDream-Flush): after a warm-up of forwards, forwards and
    /// backwards alternate.
    #[default]
    #[serde(rename = "1f1b")]
    OneForwardOneBackward,
}

impl PipelineSchedule {
    /// The schedule's name in job specs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gpipe => "gpipe",
            Self::OneForwardOneBackward => "1f1b",
        }
    }
}

impl Default for ParallelSpec {
    fn default() -> Self {
        Self {
            data: 1,
            gradient_bucket_bytes: DEFAULT_GRADIENT_BUCKET_BYTES,
            comm: Communication::Allreduce,
            collective: CollectiveBackend::Auto,
            transport: HostTransport::Auto,
            ps_shards: None,
            ps_mode: None,
            staleness: None,
            pipeline: 1,
            tensor: 1,
            micro_batches: None,
            pipeline_schedule: PipelineSchedule::OneForwardOneBackward,
            stage_layers: None,
        }
    }
}

impl ParallelSpec {
    /// Number of training ranks the layout needs: `data x pipeline x tensor` (saturating).
    pub fn world_size(&self) -> u32 {
        self.data
            .saturating_mul(self.pipeline)
            .saturating_mul(self.tensor)
    }

    /// Micro-batches per step (`pipeline` unless given).
    pub fn micro_batches(&self) -> u32 {
        self.micro_batches.unwrap_or(self.pipeline)
    }

    /// Whether the layout splits the model (pipeline or tensor parallelism).
    pub fn splits_the_model(&self) -> bool {
        self.pipeline > 1 || self.tensor > 1
    }

    /// Number of parameter-server processes the job runs besides its training ranks.
    pub fn server_count(&self) -> u32 {
        match self.comm {
            Communication::Allreduce => 0,
            Communication::Ps => self.ps_shards.unwrap_or(1),
        }
    }

    /// The parameter-server mode (`sync` unless given).
    pub fn ps_mode(&self) -> PsMode {
        self.ps_mode.unwrap_or_default()
    }

    /// The `ssp` staleness bound (2 unless given).
    pub fn staleness(&self) -> u64 {
        self.staleness.unwrap_or(DEFAULT_STALENESS)
    }

    pub(crate) fn validate(&self, problems: &mut Problems) {
        problems.check_range("parallel.data", self.data, 1, MAX_RANKS);
        problems.check_range("parallel.pipeline", self.pipeline, 1, MAX_MESH_AXIS);
        problems.check_range("parallel.tensor", self.tensor, 1, MAX_MESH_AXIS);
        if let Some(micro_batches) = self.micro_batches {
            problems.check_range(
                "parallel.micro_batches",
                micro_batches,
                1,
                MAX_MICRO_BATCHES,
            );
        }
        let ranks = u64::from(self.data)
            .saturating_mul(u64::from(self.pipeline))
            .saturating_mul(u64::from(self.tensor));
        if ranks > u64::from(MAX_RANKS) {
            problems.push(
                "parallel",
                format!("data x pipeline x tensor = {ranks} ranks, expected at most {MAX_RANKS}"),
            );
        }
        problems.check_range(
            "parallel.gradient_bucket_bytes",
            self.gradient_bucket_bytes,
            MIN_GRADIENT_BUCKET_BYTES,
            MAX_GRADIENT_BUCKET_BYTES,
        );
        match self.comm {
            Communication::Allreduce => {
                for (field, present) in [
                    ("ps_shards", self.ps_shards.is_some()),
                    ("ps_mode", self.ps_mode.is_some()),
                    ("staleness", self.staleness.is_some()),
                ] {
                    if present {
                        problems.push(
                            format!("parallel.{field}"),
                            "only allowed with comm = \"ps\"",
                        );
                    }
                }
            }
            Communication::Ps => {
                problems.check_range("parallel.ps_shards", self.server_count(), 1, MAX_PS_SHARDS);
                if let Some(staleness) = self.staleness {
                    if self.ps_mode() == PsMode::Ssp {
                        problems.check_range("parallel.staleness", staleness, 0, MAX_STALENESS);
                    } else {
                        problems.push("parallel.staleness", "only allowed with ps_mode = \"ssp\"");
                    }
                }
            }
        }
    }
}
