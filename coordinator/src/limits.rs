//! The one table of bounds on what enters the coordinator: every field of a request that reaches
//! memory or the store is checked against these where it is decoded, and the store's codec reads
//! and writes records under [`MAX_RECORD_BYTES`], which a record built from in-bound fields can
//! never reach (`model::tests::the_largest_records_fit_the_record_bound` builds the largest
//! possible job and node records from this table and checks it).
//!
//! Two kinds of bound:
//! - identity and structure (ids, counts, names, addresses): a request over the bound is refused
//!   whole, naming the field, and changes nothing;
//! - free text (a rank's detail, a job's reason, log lines): cut at the bound with a visible
//!   marker ([`cohort_proto::text::truncate`]), so a worker's report is never lost whole.

/// Largest encoded record (job or node) the store writes or reads, in bytes.
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

/// Most processes one job runs (its ranks and parameter servers): the spec's bound.
pub const MAX_PROCESSES_PER_JOB: usize = cohort_jobspec::job::MAX_RANKS as usize;

/// Most node entries a job's ended attempts keep in all: the latest attempts keep their nodes
/// while the sum fits (every attempt of a job on a few nodes; the last one of the widest job);
/// older ones keep their number, times and reason.
pub const MAX_ATTEMPT_NODES: usize = MAX_PROCESSES_PER_JOB;
/// Most attempts a job has: its first and one per restart.
pub const MAX_ATTEMPTS: usize = cohort_jobspec::fault_tolerance::MAX_RESTARTS as usize + 1;
/// Most checkpoint versions a job record keeps (the oldest deleted ones are dropped first, then
/// the oldest): 256 paths of at most 4 KiB stay far below [`MAX_RECORD_BYTES`].
pub const MAX_CHECKPOINT_VERSIONS: usize = 256;
/// Most checkpoints (and deletions) one metrics report may carry.
pub const MAX_CHECKPOINTS_PER_REPORT: usize = 64;

/// Longest rendezvous key, in bytes.
pub const MAX_KEY_BYTES: usize = 512;
/// Largest rendezvous value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Most keys one job's rendezvous store may hold.
pub const MAX_KEYS_PER_JOB: usize = 100_000;
/// Most bytes (keys and values) one job's rendezvous store may hold.
pub const MAX_KV_BYTES_PER_JOB: usize = 256 * 1024 * 1024;
/// Most keys one wait may ask for.
pub const MAX_WAIT_KEYS: usize = 4096;
/// Most bytes of key names one wait may ask for.
pub const MAX_WAIT_KEY_BYTES: usize = 64 * 1024;
/// Most waits and barriers in progress at once for one job: this many per process of the job,
/// and never fewer than [`MIN_WAITS_PER_JOB`]. A wait holds its request (up to
/// [`MAX_WAIT_KEY_BYTES`] of keys) until it returns.
pub const MAX_WAITS_PER_PROCESS: usize = 4;
/// Floor of the concurrent waits of a small job.
pub const MIN_WAITS_PER_JOB: usize = 64;
/// Longest wait or barrier timeout, in milliseconds (one hour).
pub const MAX_TIMEOUT_MS: u32 = 3_600_000;

/// Most devices a node may register.
pub const MAX_DEVICES_PER_NODE: usize = 1024;
/// Longest host name, address, device name, compute capability or PCI bus id, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Most peer paths one GPU may report.
pub const MAX_GPU_PEERS: usize = 64;

/// Most rank reports in one heartbeat or registration.
pub const MAX_RANK_REPORTS: usize = 4096;
/// Longest rank detail kept, in bytes; longer details are cut with a marker.
pub const MAX_DETAIL_BYTES: usize = 512;
/// Longest job reason kept, in bytes; longer reasons are cut with a marker.
pub const MAX_REASON_BYTES: usize = 2048;

/// Longest actor, action or target of an audit entry, in bytes.
pub const MAX_AUDIT_FIELD_BYTES: usize = 256;
/// Most audit entries kept; the oldest go first (about 50 MB at the bounds' worst).
pub const MAX_AUDIT_ENTRIES: u64 = 100_000;

/// Most log lines in one push.
pub const MAX_LOG_LINES_PER_PUSH: usize = 10_000;
/// Longest log line kept, in bytes; longer lines are cut with a marker.
pub const MAX_LOG_LINE_BYTES: usize = 16 * 1024;

/// Most extra metrics in one report.
pub const MAX_EXTRA_METRICS: usize = 32;
/// Longest name of an extra metric, in bytes.
pub const MAX_METRIC_NAME_BYTES: usize = 64;

/// Default of the most jobs queued at once, over all submitters (Slurm's `MaxJobCount` default).
pub const DEFAULT_MAX_QUEUED_JOBS: usize = 10_000;
/// Default of the most jobs one submitter may have queued at once.
pub const DEFAULT_MAX_QUEUED_JOBS_PER_SUBMITTER: usize = 5_000;

/// Default page of `ListJobs`.
pub const DEFAULT_LIST_PAGE: usize = 500;
/// Largest page of `ListJobs`.
pub const MAX_LIST_PAGE: usize = 1000;
