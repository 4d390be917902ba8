//! Configuration of a shard server and of the client a rank uses: plain data with defaults and a
//! `validate()` that lists every problem with its field path.
//!
//! What the coordinator knows from the job spec (job, shard, ranks, mode, optimizer, schedule)
//! is in [`ServerConfig`]; what only the training ranks know (the model's tensors, their initial
//! values, the planned number of steps) arrives with the first `Init` call.

use std::time::Duration;

pub use cohort_jobspec::parallel::PsMode;
pub use cohort_numerics::{LearningRateDecay, OptimizerConfig, OptimizerKind};
use cohort_proto::transport::{CaCertificate, ServerTls};
use cohort_proto::{JobId, Secret};
use serde::{Deserialize, Serialize};

use crate::encoding::DType;
use crate::error::{Error, Result};
use crate::sharding::MAX_SHARDS;

/// Largest number of ranks a shard serves.
pub const MAX_RANKS: u32 = 4096;

/// HTTP/2 flow-control window of one stream, in bytes: large enough for several chunks in
/// flight, so a push is not throttled to one window per round trip.
pub const STREAM_WINDOW_BYTES: u32 = 16 << 20;

/// HTTP/2 flow-control window of one connection, in bytes.
pub const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;

/// Largest HTTP/2 frame either side sends, in bytes (the protocol's maximum is 16 MiB - 1).
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

/// Bytes a gRPC message may hold beyond its tensor data: the headers, row indices (at most 10
/// bytes each as varints) and tensor declarations of an `Init` header.
pub const MESSAGE_OVERHEAD_BYTES: u64 = 4 << 20;

/// Returns the protocol's value for `mode`.
pub fn mode_to_wire(mode: PsMode) -> cohort_proto::ps_v1::Mode {
    match mode {
        PsMode::Sync => cohort_proto::ps_v1::Mode::Sync,
        PsMode::Async => cohort_proto::ps_v1::Mode::Async,
        PsMode::Ssp => cohort_proto::ps_v1::Mode::Ssp,
    }
}

/// The learning-rate schedule, driven by the shard's global step (its update count in sync
/// mode, updates divided by the number of ranks otherwise). The planned number of steps comes
/// from the `Init` call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Steps of linear warmup from `learning_rate / warmup_steps` to `learning_rate`. Default 0.
    pub warmup_steps: u64,
    /// Decay after warmup. Default `cosine`.
    pub decay: LearningRateDecay,
}

/// Bounds on what one shard accepts and keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest tensor payload of one chunk (the `data` of a dense, rows or snapshot chunk), in
    /// bytes, 4 KiB to 64 MiB. Default 4 MiB.
    pub max_chunk_bytes: u64,
    /// Largest number of rows in one rows chunk, 1 to 1,048,576. Default 65,536.
    pub max_rows_per_chunk: u64,
    /// Largest number of rows one push may carry or one pull may select (all tables together),
    /// 1 to 2^28. Default 4,194,304.
    pub max_rows_per_request: u64,
    /// Largest shard the server allocates (parameters plus optimizer state), in bytes, at least
    /// 1 KiB. Default 32 GiB.
    pub max_shard_bytes: u64,
    /// How long a request may wait for other ranks (sync step completion, the ssp bound,
    /// initialisation), in seconds, above 0 and at most 86,400. Default 600.
    pub wait_timeout_s: f64,
    /// In async and ssp modes, the largest number of updates by others between the version a
    /// push was computed from and the shard's current version; older pushes are refused as
    /// stale. Default: no bound.
    pub max_push_staleness: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_chunk_bytes: 4 << 20,
            max_rows_per_chunk: 65_536,
            max_rows_per_request: 4 << 20,
            max_shard_bytes: 32 << 30,
            wait_timeout_s: 600.0,
            max_push_staleness: None,
        }
    }
}

impl Limits {
    /// Returns the largest gRPC message the server accepts or sends: a chunk's data plus
    /// [`MESSAGE_OVERHEAD_BYTES`].
    pub fn max_message_bytes(&self) -> usize {
        (self.max_chunk_bytes + MESSAGE_OVERHEAD_BYTES) as usize
    }

    /// Returns the wait timeout as a duration.
    pub fn wait_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.wait_timeout_s.clamp(0.0, 86_400.0))
    }

    fn validate(&self, problems: &mut Vec<String>) {
        check_range(
            problems,
            "limits.max_chunk_bytes",
            self.max_chunk_bytes,
            4 << 10,
            64 << 20,
        );
        check_range(
            problems,
            "limits.max_rows_per_chunk",
            self.max_rows_per_chunk,
            1,
            1 << 20,
        );
        check_range(
            problems,
            "limits.max_rows_per_request",
            self.max_rows_per_request,
            1,
            1 << 28,
        );
        check_range(
            problems,
            "limits.max_shard_bytes",
            self.max_shard_bytes,
            1 << 10,
            u64::MAX,
        );
        if !(self.wait_timeout_s.is_finite()
            && self.wait_timeout_s > 0.0
            && self.wait_timeout_s <= 86_400.0)
        {
            problems.push(format!(
                "limits.wait_timeout_s = {}, expected above 0 and at most 86400",
                self.wait_timeout_s
            ));
        }
    }
}

/// Everything a shard server needs at start-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// The job the shard belongs to; requests naming another job are refused. Default `job`.
    pub job_id: JobId,
    /// This server's shard, `0..shard_count`. Default 0.
    pub shard_id: u32,
    /// Shards of the job, 1 to 1024. Default 1.
    pub shard_count: u32,
    /// Training ranks that push to the shard, 1 to 4096. Default 1.
    pub ranks: u32,
    /// How updates from different ranks are ordered. Default `sync`.
    pub mode: PsMode,
    /// Ssp only: steps a rank may run ahead of the slowest, 0 to 1,000,000 (0 is lockstep).
    /// Default 0.
    pub staleness: u64,
    /// The server-side optimizer.
    pub optimizer: OptimizerConfig,
    /// The learning-rate schedule.
    pub schedule: ScheduleConfig,
    /// Size and time bounds.
    pub limits: Limits,
    /// The job's token (`COHORT_JOB_TOKEN`): when set, every request must show it, so only the
    /// job's own ranks reach the shard. Never serialized. Default none (tests in one process).
    #[serde(skip)]
    pub token: Option<Secret>,
    /// The certificate and key to serve TLS with (the node's, on a TLS cluster). Never
    /// serialized. Default none: plaintext.
    #[serde(skip)]
    pub tls: Option<ServerTls>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            job_id: default_job_id(),
            shard_id: 0,
            shard_count: 1,
            ranks: 1,
            mode: PsMode::Sync,
            staleness: 0,
            optimizer: OptimizerConfig::default(),
            schedule: ScheduleConfig::default(),
            limits: Limits::default(),
            token: None,
            tls: None,
        }
    }
}

impl ServerConfig {
    /// Checks every field and returns all problems at once.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        check_range(
            &mut problems,
            "shard_count",
            self.shard_count,
            1,
            MAX_SHARDS,
        );
        if self.shard_id >= self.shard_count {
            problems.push(format!(
                "shard_id = {}, expected 0..{}",
                self.shard_id, self.shard_count
            ));
        }
        check_range(&mut problems, "ranks", self.ranks, 1, MAX_RANKS);
        check_range(&mut problems, "staleness", self.staleness, 0, 1_000_000);
        if self.mode != PsMode::Ssp && self.staleness != 0 {
            problems.push(format!(
                "staleness = {}, only allowed with mode = \"ssp\"",
                self.staleness
            ));
        }
        validate_optimizer(&self.optimizer, &mut problems);
        self.limits.validate(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Config { problems })
        }
    }
}

fn validate_optimizer(optimizer: &OptimizerConfig, problems: &mut Vec<String>) {
    let finite_in =
        |value: f64, low: f64, high: f64| value.is_finite() && value >= low && value < high;
    if !(optimizer.learning_rate.is_finite()
        && optimizer.learning_rate > 0.0
        && optimizer.learning_rate <= 100.0)
    {
        problems.push(format!(
            "optimizer.learning_rate = {}, expected above 0 and at most 100",
            optimizer.learning_rate
        ));
    }
    for (field, value) in [
        ("optimizer.momentum", optimizer.momentum),
        ("optimizer.beta1", optimizer.beta1),
        ("optimizer.beta2", optimizer.beta2),
    ] {
        if !finite_in(value, 0.0, 1.0) {
            problems.push(format!("{field} = {value}, expected 0 to below 1"));
        }
    }
    if !(optimizer.eps.is_finite() && optimizer.eps > 0.0 && optimizer.eps <= 1.0) {
        problems.push(format!(
            "optimizer.eps = {}, expected above 0 and at most 1",
            optimizer.eps
        ));
    }
    if !(optimizer.weight_decay.is_finite() && (0.0..=1.0).contains(&optimizer.weight_decay)) {
        problems.push(format!(
            "optimizer.weight_decay = {}, expected 0 to 1",
            optimizer.weight_decay
        ));
    }
}

/// What a training rank's client needs besides the shard addresses and the tensor list.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    /// The job; every request names it. Default `job`.
    pub job_id: JobId,
    /// This rank. Default 0.
    pub rank: u32,
    /// Element type gradients are pushed in (accumulated in f32 on the server). Default f32.
    pub gradient_dtype: DType,
    /// Element type parameters are pulled in. Default f32.
    pub parameter_dtype: DType,
    /// Largest chunk payload this client sends or accepts, in bytes; the smaller of this and the
    /// server's limit is used. Default 4 MiB.
    pub max_chunk_bytes: u64,
    /// How long connecting to a shard may take. Default 30 s.
    pub connect_timeout: Duration,
    /// The job's token, shown on every request. Default none.
    pub token: Option<Secret>,
    /// The cluster's CA: with one, shards are reached over TLS and trusted only with a
    /// certificate it signed (as are shards whose address starts with `https://`). Default
    /// none.
    pub ca: Option<CaCertificate>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            job_id: default_job_id(),
            rank: 0,
            gradient_dtype: DType::F32,
            parameter_dtype: DType::F32,
            max_chunk_bytes: 4 << 20,
            connect_timeout: Duration::from_secs(30),
            token: None,
            ca: None,
        }
    }
}

impl ClientConfig {
    /// Checks every field and returns all problems at once.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        check_range(
            &mut problems,
            "max_chunk_bytes",
            self.max_chunk_bytes,
            4 << 10,
            64 << 20,
        );
        check_range(&mut problems, "rank", self.rank, 0, MAX_RANKS - 1);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Config { problems })
        }
    }

    /// Returns the largest gRPC message the client accepts.
    pub fn max_message_bytes(&self) -> usize {
        (self.max_chunk_bytes + MESSAGE_OVERHEAD_BYTES) as usize
    }
}

/// The job id used by the defaults: `job`.
fn default_job_id() -> JobId {
    JobId::new("job").unwrap_or_else(|_| unreachable!("\"job\" is a valid job id"))
}

fn check_range<T: PartialOrd + std::fmt::Display>(
    problems: &mut Vec<String>,
    field: &str,
    value: T,
    low: T,
    high: T,
) {
    if value < low || value > high {
        problems.push(format!("{field} = {value}, expected {low} to {high}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        ServerConfig::default().validate().unwrap();
        ClientConfig::default().validate().unwrap();
    }

    #[test]
    fn every_problem_is_reported_with_its_field_path() {
        let config = ServerConfig {
            shard_id: 3,
            shard_count: 2,
            ranks: 0,
            staleness: 2,
            optimizer: OptimizerConfig {
                learning_rate: -1.0,
                beta2: 1.0,
                ..OptimizerConfig::default()
            },
            limits: Limits {
                max_chunk_bytes: 10,
                wait_timeout_s: f64::NAN,
                ..Limits::default()
            },
            ..ServerConfig::default()
        };
        let Err(Error::Config { problems }) = config.validate() else {
            panic!("expected a config error");
        };
        let text = problems.join("\n");
        for expected in [
            "shard_id = 3, expected 0..2",
            "ranks = 0, expected 1 to 4096",
            "staleness = 2, only allowed with mode = \"ssp\"",
            "optimizer.learning_rate = -1",
            "optimizer.beta2 = 1, expected 0 to below 1",
            "limits.max_chunk_bytes = 10, expected 4096 to 67108864",
            "limits.wait_timeout_s = NaN",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert_eq!(problems.len(), 7, "{text}");
    }

    #[test]
    fn config_reads_from_json_and_refuses_unknown_fields() {
        let config: ServerConfig = serde_json::from_str(
            r#"{"job_id": "ps-3", "shard_count": 2, "ranks": 4, "mode": "ssp", "staleness": 2,
                "optimizer": {"kind": "sgd", "learning_rate": 0.1}}"#,
        )
        .unwrap();
        assert_eq!(config.mode, PsMode::Ssp);
        assert_eq!(config.optimizer.kind, OptimizerKind::Sgd);
        assert_eq!(config.optimizer.momentum, 0.9);
        config.validate().unwrap();
        assert!(serde_json::from_str::<ServerConfig>(r#"{"shards": 2}"#).is_err());
        assert!(serde_json::from_str::<ServerConfig>(r#"{"job_id": "bad id"}"#).is_err());
    }
}
