//! Bounds on what a request may carry. Every RPC checks its fields against these before
//! touching any state.

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
/// Longest wait or barrier timeout, in milliseconds (one hour).
pub const MAX_TIMEOUT_MS: u32 = 3_600_000;
/// Most devices a node may register.
pub const MAX_DEVICES_PER_NODE: usize = 1024;
/// Most rank reports in one heartbeat or registration.
pub const MAX_RANK_REPORTS: usize = 4096;
/// Most log lines in one push.
pub const MAX_LOG_LINES_PER_PUSH: usize = 10_000;
/// Longest log line kept, in bytes; longer lines are cut.
pub const MAX_LOG_LINE_BYTES: usize = 16 * 1024;
/// Longest free-form string field (hostname, address, detail), in bytes.
pub const MAX_FIELD_BYTES: usize = 4096;
/// Most peer paths one GPU may report.
pub const MAX_GPU_PEERS: usize = 64;
/// Most extra metrics in one report.
pub const MAX_EXTRA_METRICS: usize = 64;
