//! Environment variables the worker daemon sets for every rank process.
//!
//! The `COHORT_*` names are Cohort's own; `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` are those a PyTorch script expects.

/// The job's id.
pub const JOB_ID: &str = "COHORT_JOB_ID";
/// The rank of this process, `0..world_size`.
pub const RANK: &str = "COHORT_RANK";
/// Number of ranks in the job.
pub const WORLD_SIZE: &str = "COHORT_WORLD_SIZE";
/// Index of this rank among the job's ranks on the same node.
pub const LOCAL_RANK: &str = "COHORT_LOCAL_RANK";
/// Number of the job's ranks on this node.
pub const LOCAL_WORLD_SIZE: &str = "COHORT_LOCAL_WORLD_SIZE";
/// The node the rank runs on.
pub const NODE_ID: &str = "COHORT_NODE_ID";
/// Devices assigned to the rank, as a comma-separated list of `kind:index` (`cpu:0,cpu:1`).
pub const DEVICES: &str = "COHORT_DEVICES";
/// Index of the rank's first GPU among those `CUDA_VISIBLE_DEVICES` makes visible (always 0:
/// the worker lists only the rank's own GPUs there).
pub const CUDA_DEVICE: &str = "COHORT_CUDA_DEVICE";
/// Address (`host:port`) of the rendezvous service (served by the coordinator).
pub const RENDEZVOUS_ADDR: &str = "COHORT_RENDEZVOUS_ADDR";
/// Address (`host:port`) of the coordinator.
pub const COORDINATOR_ADDR: &str = "COHORT_COORDINATOR_ADDR";
/// Address other ranks of the job can reach this rank's node at (host only).
pub const NODE_ADDR: &str = "COHORT_NODE_ADDR";
/// Directory for the rank's outputs (checkpoints): `<worker --output-dir>/<job id>`, shared by
/// the job's ranks on one node.
pub const OUTPUT_DIR: &str = "COHORT_OUTPUT_DIR";
/// What the process is: [`ROLE_RANK`] (a training rank, the default when unset) or
/// [`ROLE_PARAMETER_SERVER`].
pub const ROLE: &str = "COHORT_ROLE";
/// `COHORT_ROLE` of a training rank.
pub const ROLE_RANK: &str = "rank";
/// `COHORT_ROLE` of a parameter-server process. Its `COHORT_RANK` is its process index
/// (`world_size + shard`) and `COHORT_WORLD_SIZE` the number of training ranks it serves.
pub const ROLE_PARAMETER_SERVER: &str = "parameter-server";
/// The shard a parameter-server process serves, `0..COHORT_PS_SHARDS`.
pub const PS_SHARD: &str = "COHORT_PS_SHARD";
/// Number of parameter-server shards of the job.
pub const PS_SHARDS: &str = "COHORT_PS_SHARDS";
/// Path of the `cohort` executable the worker runs, so rank scripts can call `cohort kv ...`.
pub const COHORT_BIN: &str = "COHORT_BIN";

/// PyTorch-compatible names.
pub mod torch {
    /// Same as `COHORT_RANK`.
    pub const RANK: &str = "RANK";
    /// Same as `COHORT_WORLD_SIZE`.
    pub const WORLD_SIZE: &str = "WORLD_SIZE";
    /// Same as `COHORT_LOCAL_RANK`.
    pub const LOCAL_RANK: &str = "LOCAL_RANK";
    /// Same as `COHORT_LOCAL_WORLD_SIZE`.
    pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
    /// Host of rank 0's node.
    pub const MASTER_ADDR: &str = "MASTER_ADDR";
    /// A port chosen by the coordinator for the job, for rank 0 to listen on.
    pub const MASTER_PORT: &str = "MASTER_PORT";
}
