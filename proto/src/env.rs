//! Environment variables the worker daemon sets for every rank process. [`crate::launch`]
//! writes and reads them all; this module names them.
//!
//! The `COHORT_*` names are Cohort's own; `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` are those a PyTorch script expects.
//! [`is_managed`] says which names Cohort sets itself, so that a job spec may not: a job's `env`
//! that set `CUDA_VISIBLE_DEVICES` or `RANK` would override its device allocation or its place.

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
/// The job's token: what its processes show the coordinator (rendezvous, metrics) and, derived,
/// each other on their links. Valid for this job only, and only while it runs.
pub const JOB_TOKEN: &str = "COHORT_JOB_TOKEN";
/// How often the job was restarted: 0 for its first attempt. A restarted process finds the
/// same [`OUTPUT_DIR`] and resumes from what it saved there.
pub const RESTART_COUNT: &str = "COHORT_RESTART_COUNT";
/// Fault injection for tests, read by `cohort rank` from the environment its worker passes on:
/// the rank that writes the checkpoint of this step stops itself (`SIGSTOP`) in the middle of
/// the write, for the test to kill it there. Honoured on a job's first attempt only. Never set
/// by Cohort.
pub const FAULT_STOP_IN_CHECKPOINT: &str = "COHORT_FAULT_STOP_IN_CHECKPOINT";
/// Fault injection for tests, read by `cohort rank`: `RANK:before:N` makes that rank hang
/// before it enters operation #N of its communicators (a collective, a pipeline send or
/// receive, a parameter-server call), `RANK:in:N` right after it entered it (it then stops
/// reading and writing). Honoured on a job's first attempt only. Never set by Cohort.
pub const FAULT_HANG: &str = "COHORT_FAULT_HANG";
/// Fault injection for tests, read by `cohort rank`: `RANK:SHARE` makes that rank of a
/// data-parallel training job compute each step SHARE longer (`1:0.5`: half as long again),
/// `RANK:MSms` that many milliseconds longer (`1:40ms`): it sleeps after its backward pass, as
/// a slow node would. Never set by Cohort.
pub const FAULT_SLOW_RANK: &str = "COHORT_FAULT_SLOW_RANK";
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
/// The CA certificate (PEM file) the cluster's TLS certificates are signed by: clients verify
/// the coordinator and parameter servers against it. Set for the processes of a TLS cluster;
/// the CLI reads the same variable.
pub const CA: &str = "COHORT_CA";
/// The node's TLS certificate (PEM file), which its parameter servers serve.
pub const TLS_CERT: &str = "COHORT_TLS_CERT";
/// The private key (PEM file) of [`TLS_CERT`].
pub const TLS_KEY: &str = "COHORT_TLS_KEY";
/// The job's spec as submitted (TOML), for the processes of `kind = "train"` jobs (Cohort's own
/// runtime reads it instead of asking the coordinator); unset for command jobs.
pub const JOB_SPEC: &str = "COHORT_JOB_SPEC";

/// The GPUs a GPU rank may see (its own, renumbered from 0).
pub const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";
/// The interface NCCL listens on; Cohort sets it to `lo` on a cluster that lives on loopback.
pub const NCCL_SOCKET_IFNAME: &str = "NCCL_SOCKET_IFNAME";
/// Threads of OpenMP pools: the CPU slots a CPU rank holds.
pub const OMP_NUM_THREADS: &str = "OMP_NUM_THREADS";
/// Threads of rayon pools: the CPU slots a CPU rank holds.
pub const RAYON_NUM_THREADS: &str = "RAYON_NUM_THREADS";

/// Prefix of every variable Cohort owns.
pub const COHORT_PREFIX: &str = "COHORT_";

/// Names outside `COHORT_*` that Cohort sets for a rank (some only for some ranks).
pub const MANAGED_NAMES: [&str; 11] = [
    torch::RANK,
    torch::WORLD_SIZE,
    torch::LOCAL_RANK,
    torch::LOCAL_WORLD_SIZE,
    torch::MASTER_ADDR,
    torch::MASTER_PORT,
    torch::TORCHELASTIC_RESTART_COUNT,
    CUDA_VISIBLE_DEVICES,
    NCCL_SOCKET_IFNAME,
    OMP_NUM_THREADS,
    RAYON_NUM_THREADS,
];

/// Whether Cohort sets the variable `name` itself: every `COHORT_*` name and
/// [`MANAGED_NAMES`]. A job spec may not set these; the rest of `NCCL_*` (`NCCL_DEBUG`...) is
/// the job's own.
pub fn is_managed(name: &str) -> bool {
    name.starts_with(COHORT_PREFIX) || MANAGED_NAMES.contains(&name)
}

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
    /// Same as `COHORT_RESTART_COUNT`, under torchrun's name.
    pub const TORCHELASTIC_RESTART_COUNT: &str = "TORCHELASTIC_RESTART_COUNT";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cohort_names_and_the_torch_and_device_names_are_managed() {
        for name in [
            JOB_ID,
            RANK,
            OUTPUT_DIR,
            "COHORT_ANYTHING",
            torch::MASTER_PORT,
        ] {
            assert!(is_managed(name), "{name}");
        }
        for name in MANAGED_NAMES {
            assert!(is_managed(name), "{name}");
        }
        for name in [
            "NCCL_DEBUG",
            "PYTHONPATH",
            "COHORT",
            "cohort_rank",
            "MY_RANK",
        ] {
            assert!(!is_managed(name), "{name}");
        }
    }
}
