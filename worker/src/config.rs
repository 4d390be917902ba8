//! Worker daemon settings.

use std::path::PathBuf;

use cohort_proto::NodeId;

/// How the worker runs. Built by the CLI from flags; tests build it directly.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The coordinator's `host:port`.
    pub coordinator: String,
    /// This node's id. Default: the host name.
    pub node_id: NodeId,
    /// The address other nodes reach this node's ranks at (only the host part matters).
    /// Default `127.0.0.1`: a worker is reachable from other machines only when asked.
    pub advertise_address: String,
    /// CPU slots offered to the scheduler. Default: the number of logical CPUs.
    pub cpu_slots: u32,
    /// Directory under which each job gets `<job id>/` for its outputs (`COHORT_OUTPUT_DIR`).
    /// Default `./cohort-output`.
    pub output_dir: PathBuf,
    /// The `cohort` executable that ranks of `kind = "train"` jobs run. Default: the running
    /// executable.
    pub cohort_executable: PathBuf,
}

/// Returns the host name, or `localhost` when it cannot be read.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
