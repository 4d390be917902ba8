//! Coordinator settings.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::placement::sharing::{DEFAULT_QUEUE, QueuePolicy};

/// Longest time a job keeps off a node it failed on.
pub const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(600);

/// How the coordinator runs. Built by the CLI from flags; tests build it directly.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Directory for the embedded store and the job logs. Default `~/.local/share/cohort`.
    pub data_dir: PathBuf,
    /// How often workers heartbeat. Default 1 s.
    pub heartbeat_interval: Duration,
    /// A worker silent for this long is marked lost. Default 5 s.
    pub heartbeat_deadline: Duration,
    /// After a restart, how long ranks of running jobs have to re-report before their jobs are
    /// failed with "coordinator restarted". Default: the heartbeat deadline.
    pub restart_grace: Duration,
    /// How long a restarted job keeps off the node its failed attempt is blamed on; doubled
    /// for each further failure there, up to [`MAX_RESTART_BACKOFF`]. Default 10 s.
    pub restart_backoff: Duration,
    /// Most bytes of log kept per job; later lines are dropped and counted. Default 256 MiB.
    pub max_log_bytes_per_job: u64,
    /// How often the scheduler and the liveness checks run when nothing wakes them. Default
    /// 200 ms.
    pub tick: Duration,
    /// Most jobs queued at once; later submissions are refused until some start. Default
    /// 10,000 (Slurm's `MaxJobCount`).
    pub max_queued_jobs: usize,
    /// Most jobs one submitter (a user) may have queued at once. Default 5,000.
    pub max_queued_jobs_per_submitter: usize,
    /// The cluster's join token, which workers must show. `None`: the one in
    /// `<data_dir>/join-token`, drawn there on first start.
    pub join_token: Option<cohort_proto::Secret>,
    /// The certificate and key to serve TLS with. `None`: plaintext, which the CLI allows on
    /// loopback only (or with `--insecure`).
    pub tls: Option<cohort_proto::transport::ServerTls>,
    /// With the etcd store: how long the leader's lease lasts unrenewed, so how soon a
    /// standby takes over from a leader that died. Default 3 s.
    pub leader_lease: Duration,
    /// With the etcd store: the address standbys name when this coordinator leads. `None`:
    /// the address it listens on.
    pub advertise_address: Option<String>,
    /// Whether a queued job that does not fit may preempt running jobs of strictly lower
    /// priority. Default true.
    pub preemption: bool,
    /// How long an attempt that follows a preemption runs before it may be preempted again,
    /// so that two jobs cannot take devices from each other back and forth. Default 10 min.
    pub preemption_min_runtime: Duration,
    /// The scheduler's queues by name, with their weights and device quotas. `default` is
    /// always one of them (weight 1, no quota, unless configured otherwise); a job naming a
    /// queue not here is refused.
    pub queues: BTreeMap<String, QueuePolicy>,
    /// The most devices one user's jobs may hold at once. Default: no limit.
    pub user_quota: Option<u64>,
}

impl CoordinatorConfig {
    /// The policy of queue `name`, if it is configured (`default` always is).
    pub fn queue(&self, name: &str) -> Option<QueuePolicy> {
        match self.queues.get(name) {
            Some(policy) => Some(policy.clone()),
            None => (name == DEFAULT_QUEUE).then(QueuePolicy::default),
        }
    }

    /// The names of the configured queues, `default` included.
    pub fn queue_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.queues.keys().map(String::as_str).collect();
        if !self.queues.contains_key(DEFAULT_QUEUE) {
            names.insert(0, DEFAULT_QUEUE);
        }
        names
    }
}

/// The default of [`CoordinatorConfig::preemption_min_runtime`].
pub const DEFAULT_PREEMPTION_MIN_RUNTIME: Duration = Duration::from_secs(600);
/// The longest [`CoordinatorConfig::preemption_min_runtime`].
pub const MAX_PREEMPTION_MIN_RUNTIME: Duration = Duration::from_secs(86_400);

impl Default for CoordinatorConfig {
    fn default() -> Self {
        let heartbeat_deadline = Duration::from_secs(5);
        Self {
            data_dir: default_data_dir(),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_deadline,
            restart_grace: heartbeat_deadline,
            restart_backoff: Duration::from_secs(10),
            max_log_bytes_per_job: 256 * 1024 * 1024,
            tick: Duration::from_millis(200),
            max_queued_jobs: crate::limits::DEFAULT_MAX_QUEUED_JOBS,
            max_queued_jobs_per_submitter: crate::limits::DEFAULT_MAX_QUEUED_JOBS_PER_SUBMITTER,
            join_token: None,
            tls: None,
            leader_lease: crate::leadership::DEFAULT_LEASE,
            advertise_address: None,
            preemption: true,
            preemption_min_runtime: DEFAULT_PREEMPTION_MIN_RUNTIME,
            queues: BTreeMap::new(),
            user_quota: None,
        }
    }
}

/// `$XDG_DATA_HOME/cohort`, else `~/.local/share/cohort`, else `./.cohort-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("cohort");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/cohort"),
        None => PathBuf::from(".cohort-data"),
    }
}
