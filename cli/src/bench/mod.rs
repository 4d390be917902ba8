//! Benchmarks. Each prints a table and, as its last line, one JSON object
//! (`{"bench": NAME, ..., "results": [rows]}`); rates are `_gbps` (1e9 bytes/s) or `_per_s`,
//! times `_s`.
//!
//! Where the figure is what a job would see, the ranks run as real jobs on a local cluster:
//! [`allreduce`] over TCP and [`train`] on the CPU. The others run in this process, so their
//! figures isolate one mechanism from process start-up: [`mesh`] runs its ranks as threads
//! joined through an in-memory rendezvous store, [`ps`] its servers and clients over loopback
//! gRPC, `allreduce --backend nccl` one thread per GPU, and `train --device gpu` one rank.
//!
//! [`reference`] runs the well-known systems two of them are compared with in the same run:
//! Open MPI's all-reduce for [`allreduce`], PyTorch DDP for [`train`], each skipped with a
//! printed reason where it is not installed.

pub mod allreduce;
pub mod mesh;
pub mod ps;
pub mod reference;
pub mod scheduler;
pub mod submit;
pub mod train;

use cohort_proto::failover::CoordinatorConnection;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use cohort_coordinator::CoordinatorConfig;
use cohort_proto::v1::job_control_client::JobControlClient;
use cohort_proto::v1::{GetJobRequest, JobInfo, JobState, WatchJobRequest};

use cohort_collective::{DType, Store};
use cohort_proto::v1::StreamLogsRequest;
use serde::de::DeserializeOwned;

use crate::args::{BenchArgs, BenchDevice, BenchDtype, Benchmark};
use crate::client;
use crate::local_cluster::{LocalCluster, LocalClusterConfig};
use crate::rank::RankLink;

/// Prefix of the line rank 0 of a benchmark job prints with the results.
const RESULT_PREFIX: &str = "cohort-bench-result ";
/// Longest rank 0 waits for the other ranks' results.
const RESULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Runs the benchmark named on the command line.
pub async fn run(args: BenchArgs) -> Result<ExitCode> {
    match args.benchmark {
        Benchmark::Allreduce {
            ranks,
            backend,
            sizes,
            dtype,
            links,
            transport,
            mpi,
            python,
        } => {
            let reference = allreduce::OpenMpiOptions { mpi, python };
            let variants = allreduce::Variants {
                links,
                transports: transport,
            };
            allreduce::run(backend, ranks, &sizes, dtype, &variants, &reference).await
        }
        Benchmark::Ps {
            shards,
            ranks,
            size,
            dtype,
            iterations,
            chunk_bytes,
        } => {
            ps::run(
                shards,
                ranks,
                &size,
                dtype,
                iterations,
                chunk_bytes.as_deref(),
            )
            .await
        }
        Benchmark::Train {
            ranks,
            steps,
            device: BenchDevice::Cpu,
            telemetry,
            reference,
            python,
            ..
        } => {
            let reference = train::PytorchOptions { reference, python };
            train::run(ranks.as_deref(), steps, telemetry, &reference).await
        }
        Benchmark::Train {
            ranks,
            steps,
            device: BenchDevice::Gpu,
            gpu,
            ..
        } => {
            // Tensor math: on a thread of its own, not on the async runtime.
            tokio::task::spawn_blocking(move || train::run_on_gpu(ranks.as_deref(), steps, gpu))
                .await
                .context("the gpu benchmark thread")?
        }
        Benchmark::Scheduler {
            nodes,
            gpus_per_node,
            jobs,
            repeat,
            seed,
        } => tokio::task::spawn_blocking(move || {
            scheduler::run(nodes, gpus_per_node, jobs, repeat, seed)
        })
        .await
        .context("the scheduler benchmark thread")?,
        Benchmark::Submit {
            jobs,
            workers,
            submitters,
            store,
        } => submit::run(jobs, workers, submitters, &store).await,
        Benchmark::Mesh { .. } => {
            bail!("the mesh benchmark starts outside the CLI runtime (see main)")
        }
        Benchmark::StreamReceive { .. }
        | Benchmark::AllreduceRank { .. }
        | Benchmark::TrainRank { .. } => {
            bail!("benchmark ranks start outside the CLI runtime (see main)")
        }
    }
}

/// Parses `4K`, `64M`, `1G` or a plain byte count.
pub fn parse_size(text: &str) -> Result<usize> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((index, _)) => text.split_at(index),
        None => (text, ""),
    };
    let value: usize = digits
        .parse()
        .with_context(|| format!("size {text:?}: expected a number with an optional K, M or G"))?;
    let multiplier = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        other => bail!("size {text:?}: unknown unit {other:?}, expected K, M or G"),
    };
    value
        .checked_mul(multiplier)
        .with_context(|| format!("size {text:?} is too large"))
}

/// Starts a local cluster of one worker with `slots` CPU slots, in a temporary data dir.
pub async fn start_cluster(data_dir: &Path, workers: u32, slots: u32) -> Result<LocalCluster> {
    let coordinator = CoordinatorConfig {
        data_dir: data_dir.to_owned(),
        ..CoordinatorConfig::default()
    };
    let coordinator = crate::coordinator_setup::prepare(
        coordinator,
        &cohort_coordinator::StoreLocation::Embedded,
        "127.0.0.1:0",
        None,
        None,
    )
    .await?;
    LocalCluster::start(LocalClusterConfig {
        coordinator,
        workers,
        cpu_slots: slots,
        output_dir: data_dir.join("outputs"),
    })
    .await
}

/// Submits a job and waits for it to end; fails with the job's reason unless it succeeded.
pub async fn run_job(
    client: &mut JobControlClient<CoordinatorConnection>,
    spec_toml: String,
) -> Result<JobInfo> {
    let job = client::submit(client, spec_toml, false).await?;
    let mut events = client
        .watch_job(WatchJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .map_err(client::status)?
        .into_inner();
    while let Some(event) = events.message().await.map_err(client::status)? {
        if event.job.as_ref().is_some_and(crate::render::is_final) {
            break;
        }
    }
    let job = client
        .get_job(GetJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .map_err(client::status)?
        .into_inner();
    if job.state() != JobState::Succeeded {
        bail!(
            "benchmark job {} {}: {}",
            job.job_id,
            crate::render::job_state(job.state()),
            job.reason
        );
    }
    Ok(job)
}

/// Publishes this rank's result (JSON) in the job's rendezvous store; on rank 0, waits for every
/// rank's and prints them all on one line for [`read_result`] to find.
pub fn publish_result(link: &RankLink, result: &impl serde::Serialize) -> Result<()> {
    link.store.set(
        &format!("result/{}", link.rank()),
        serde_json::to_string(result)?.as_bytes(),
    )?;
    if link.rank() == 0 {
        let keys: Vec<String> = (0..link.world_size())
            .map(|r| format!("result/{r}"))
            .collect();
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let per_rank: Vec<serde_json::Value> = link
            .store
            .wait(&key_refs, RESULT_TIMEOUT)?
            .iter()
            .map(|value| serde_json::from_slice(value))
            .collect::<Result<_, _>>()?;
        println!("{RESULT_PREFIX}{}", serde_json::Value::Array(per_rank));
    }
    Ok(())
}

/// Reads the per-rank results rank 0 of a finished benchmark job printed.
pub async fn read_result<T: DeserializeOwned>(
    client: &mut JobControlClient<CoordinatorConnection>,
    job_id: &str,
) -> Result<Vec<T>> {
    let mut lines = client
        .stream_logs(StreamLogsRequest {
            job_id: job_id.to_owned(),
            follow: false,
            rank: Some(0),
        })
        .await
        .map_err(client::status)?
        .into_inner();
    while let Some(line) = lines.message().await.map_err(client::status)? {
        if let Some(result) = line.text.strip_prefix(RESULT_PREFIX) {
            return Ok(serde_json::from_str(result)?);
        }
    }
    bail!("rank 0 of {job_id} printed no result")
}

/// The element type a `--dtype` flag names.
pub fn dtype(dtype: BenchDtype) -> DType {
    match dtype {
        BenchDtype::F32 => DType::F32,
        BenchDtype::Bf16 => DType::Bf16,
        BenchDtype::F16 => DType::F16,
    }
}

/// Formats bytes per second as GB/s (1e9).
pub fn gbps(bytes_per_second: f64) -> f64 {
    bytes_per_second / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
    }
}
