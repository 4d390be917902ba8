//! Worker daemon settings.

use std::path::PathBuf;

use cohort_proto::NodeId;

use crate::error::{Error, Result};

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
    /// Directory where the worker records its ranks until nothing of them runs, so that a
    /// worker restarted after a crash kills what the old one left. One per worker: a second
    /// worker on the same directory refuses to start. Default: [`default_state_dir`].
    pub state_dir: PathBuf,
    /// The cluster's join token, shown on every call to the coordinator.
    pub join_token: cohort_proto::Secret,
    /// The cluster's CA certificate file (absolute), when it serves TLS: the worker and its
    /// ranks reach the coordinator over TLS and trust only what it signed.
    pub ca: Option<PathBuf>,
    /// This node's certificate and key files (absolute), which parameter servers on the node
    /// serve TLS with.
    pub tls: Option<cohort_proto::launch::TlsFiles>,
}

/// The default state directory of node `node_id`: `$XDG_STATE_HOME/cohort/worker-<node id>`,
/// else `~/.local/state/cohort/worker-<node id>`.
pub fn default_state_dir(node_id: &NodeId) -> Result<PathBuf> {
    Ok(state_root()?.join(format!("worker-{node_id}")))
}

/// Where Cohort keeps state by default: `$XDG_STATE_HOME/cohort`, else
/// `~/.local/state/cohort`. An error when neither variable is set (or is a relative path, which
/// the XDG specification says to ignore).
pub fn state_root() -> Result<PathBuf> {
    let absolute = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .filter(|path| path.is_absolute())
    };
    if let Some(state_home) = absolute("XDG_STATE_HOME") {
        return Ok(state_home.join("cohort"));
    }
    match absolute("HOME") {
        Some(home) => Ok(home.join(".local/state/cohort")),
        None => Err(Error::Config(
            "no state directory: neither $XDG_STATE_HOME nor $HOME is an absolute path; pass --state-dir"
                .to_owned(),
        )),
    }
}

/// Returns the host name, or `localhost` when it cannot be read.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
