//! The measurement behind `cohort bench ps`: push+pull throughput of S shards serving N ranks,
//! all in this process over loopback TCP with real gRPC clients.
//!
//! Every rank pushes a dense gradient of `bytes` bytes (f32) and pulls the same amount back in
//! each round trip. A rank's throughput counts both directions: `2 * bytes / round-trip time`;
//! the aggregate is the sum over ranks: `ranks * 2 * bytes * iterations / wall time` of the
//! timed iterations. The shards apply plain SGD (no momentum), so the numbers measure the
//! exchange rather than the optimizer. The loopback TCP rate to compare with is measured by the
//! caller (`cohort_collective::bench::loopback_tcp_throughput`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_proto::JobId;
use tokio::net::TcpListener;
use tokio::sync::{Barrier, oneshot};

use crate::client::ParameterClient;
use crate::config::{ClientConfig, Limits, OptimizerConfig, OptimizerKind, PsMode, ServerConfig};
use crate::encoding::DType;
use crate::error::{Error, Result};
use crate::service::serve;
use crate::sharding::TensorDeclaration;

/// What to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchConfig {
    /// Parameter shards, 1 to 64. Default 2.
    pub shards: u32,
    /// Ranks pushing concurrently, 1 to 64. Default 2.
    pub ranks: u32,
    /// Bytes of f32 parameters (and of each push and each pull), at least 4. Default 64 MiB.
    pub bytes: u64,
    /// Timed round trips per rank, at least 1. Default 5.
    pub iterations: u32,
    /// Untimed round trips per rank before the timed ones. Default 1.
    pub warmup_iterations: u32,
    /// The shards' mode. Default sync.
    pub mode: PsMode,
    /// Element type of the pushed gradients (bf16/f16 halve the push bytes). Default f32.
    pub gradient_dtype: DType,
    /// Largest tensor payload of one message, for servers and clients. Default 4 MiB.
    pub max_chunk_bytes: u64,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            shards: 2,
            ranks: 2,
            bytes: 64 << 20,
            iterations: 5,
            warmup_iterations: 1,
            mode: PsMode::Sync,
            gradient_dtype: DType::F32,
            max_chunk_bytes: Limits::default().max_chunk_bytes,
        }
    }
}

/// The measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchResult {
    /// Bytes of parameters.
    pub bytes: u64,
    /// Mean round-trip time of each rank's timed iterations.
    pub round_trip_per_rank: Vec<Duration>,
    /// Mean over ranks of `2 * bytes / round-trip time`, bytes per second.
    pub per_rank_bytes_per_second: f64,
    /// `ranks * 2 * bytes * iterations / wall time`, bytes per second.
    pub aggregate_bytes_per_second: f64,
    /// Wall time of the timed iterations, from the common start to the last rank's end.
    pub wall_time: Duration,
}

/// Starts `config.shards` shard servers and `config.ranks` clients in this process, runs the
/// round trips, stops the servers and returns the throughput.
pub async fn run(config: &BenchConfig) -> Result<BenchResult> {
    let mut problems = Vec::new();
    if !(1..=64).contains(&config.shards) {
        problems.push(format!("shards = {}, expected 1 to 64", config.shards));
    }
    if !(1..=64).contains(&config.ranks) {
        problems.push(format!("ranks = {}, expected 1 to 64", config.ranks));
    }
    if config.bytes < 4 {
        problems.push(format!("bytes = {}, expected at least 4", config.bytes));
    }
    if config.iterations == 0 {
        problems.push("iterations = 0, expected at least 1".to_owned());
    }
    if !problems.is_empty() {
        return Err(Error::Config { problems });
    }
    let job_id = JobId::new("bench-ps").map_err(|error| Error::invalid(error.to_string()))?;
    let elements = config.bytes / 4;
    let tensors = vec![TensorDeclaration::dense("bench.weight", elements)];
    let total_steps = u64::from(config.iterations + config.warmup_iterations);

    let mut addresses = Vec::new();
    let mut stops = Vec::new();
    let mut servers = Vec::new();
    for shard_id in 0..config.shards {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|source| Error::Io {
                context: "bind a benchmark shard".to_owned(),
                source,
            })?;
        addresses.push(
            listener
                .local_addr()
                .map_err(|source| Error::Io {
                    context: "read a benchmark shard's address".to_owned(),
                    source,
                })?
                .to_string(),
        );
        let server_config = ServerConfig {
            job_id: job_id.clone(),
            shard_id,
            shard_count: config.shards,
            ranks: config.ranks,
            mode: config.mode,
            optimizer: OptimizerConfig {
                kind: OptimizerKind::Sgd,
                learning_rate: 1e-6,
                momentum: 0.0,
                ..OptimizerConfig::default()
            },
            limits: Limits {
                max_chunk_bytes: config.max_chunk_bytes,
                ..Limits::default()
            },
            ..ServerConfig::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        stops.push(stop);
        servers.push(tokio::spawn(serve(server_config, listener, async {
            let _ = stopped.await;
        })));
    }

    let result = run_ranks(config, &job_id, &addresses, tensors, elements, total_steps).await;
    for stop in stops {
        let _ = stop.send(());
    }
    for server in servers {
        match server.await {
            Ok(outcome) => outcome?,
            Err(error) => return Err(Error::Internal(format!("benchmark shard task: {error}"))),
        }
    }
    result
}

async fn run_ranks(
    config: &BenchConfig,
    job_id: &JobId,
    addresses: &[String],
    tensors: Vec<TensorDeclaration>,
    elements: u64,
    total_steps: u64,
) -> Result<BenchResult> {
    let barrier = Arc::new(Barrier::new(config.ranks as usize));
    let mut ranks = Vec::new();
    for rank in 0..config.ranks {
        let client_config = ClientConfig {
            job_id: job_id.clone(),
            rank,
            gradient_dtype: config.gradient_dtype,
            max_chunk_bytes: config.max_chunk_bytes,
            ..ClientConfig::default()
        };
        let addresses = addresses.to_vec();
        let tensors = tensors.clone();
        let barrier = barrier.clone();
        let (warmup, iterations) = (config.warmup_iterations, config.iterations);
        ranks.push(tokio::spawn(async move {
            let mut client = ParameterClient::connect(client_config, &addresses, tensors).await?;
            let mut parameters = vec![0.0f32; elements as usize];
            if rank == 0 {
                client.init(&parameters, total_steps).await?;
            }
            client.pull(&mut parameters).await?;
            let gradient = vec![1.0f32; elements as usize];
            for _ in 0..warmup {
                client
                    .push_pull(&gradient, &[], &mut parameters, &[])
                    .await?;
            }
            barrier.wait().await;
            let started = Instant::now();
            for _ in 0..iterations {
                client
                    .push_pull(&gradient, &[], &mut parameters, &[])
                    .await?;
            }
            Ok::<_, Error>((started, Instant::now()))
        }));
    }
    let mut spans = Vec::new();
    for rank in ranks {
        spans.push(
            rank.await
                .map_err(|error| Error::Internal(format!("benchmark rank task: {error}")))??,
        );
    }
    let start = spans
        .iter()
        .map(|(start, _)| *start)
        .min()
        .unwrap_or_else(Instant::now);
    let end = spans.iter().map(|(_, end)| *end).max().unwrap_or(start);
    let wall_time = end - start;
    let bytes = elements * 4;
    let round_trip_per_rank: Vec<Duration> = spans
        .iter()
        .map(|(start, end)| (*end - *start) / config.iterations)
        .collect();
    let per_rank_bytes_per_second = round_trip_per_rank
        .iter()
        .map(|time| 2.0 * bytes as f64 / time.as_secs_f64().max(f64::MIN_POSITIVE))
        .sum::<f64>()
        / round_trip_per_rank.len() as f64;
    let aggregate_bytes_per_second =
        f64::from(config.ranks) * 2.0 * bytes as f64 * f64::from(config.iterations)
            / wall_time.as_secs_f64().max(f64::MIN_POSITIVE);
    Ok(BenchResult {
        bytes,
        round_trip_per_rank,
        per_rank_bytes_per_second,
        aggregate_bytes_per_second,
        wall_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_benchmark_runs_and_reports_consistent_rates() {
        let config = BenchConfig {
            shards: 2,
            ranks: 2,
            bytes: 1 << 20,
            iterations: 3,
            warmup_iterations: 1,
            ..BenchConfig::default()
        };
        let result = run(&config).await.unwrap();
        assert_eq!(result.bytes, 1 << 20);
        assert_eq!(result.round_trip_per_rank.len(), 2);
        assert!(result.per_rank_bytes_per_second > 0.0);
        // The aggregate over two ranks running concurrently is at most twice the per-rank rate
        // (up to timing noise) and at least the per-rank rate of the slowest rank alone.
        assert!(result.aggregate_bytes_per_second <= 2.2 * result.per_rank_bytes_per_second);
        assert!(run(&BenchConfig { ranks: 0, ..config }).await.is_err());
    }
}
