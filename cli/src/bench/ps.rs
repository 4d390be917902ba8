//! `cohort bench ps`: push+pull round trips against sharded parameter servers (servers and
//! clients in this process, talking gRPC over loopback TCP), per rank and aggregate, against
//! single-stream loopback TCP measured in the same run.

use std::process::ExitCode;

use anyhow::{Result, bail};
use cohort_parameter_server::bench::{BenchConfig, run as run_rounds};
use serde_json::json;

use super::{gbps, parse_size};
use crate::args::BenchDtype;

/// Bytes of each loopback measurement.
const LOOPBACK_BYTES: u64 = 512 << 20;

/// `cohort bench ps`.
pub async fn run(
    shards: u32,
    ranks: u32,
    sizes: &[String],
    dtype: BenchDtype,
    iterations: u32,
    chunk_bytes: Option<&str>,
) -> Result<ExitCode> {
    let defaults = BenchConfig::default();
    let max_chunk_bytes = match chunk_bytes {
        Some(text) => parse_size(text)? as u64,
        None => defaults.max_chunk_bytes,
    };
    let sizes: Vec<usize> = sizes.iter().map(|s| parse_size(s)).collect::<Result<_>>()?;
    if let Some(size) = sizes
        .iter()
        .find(|&&bytes| !(4..=(4usize << 30)).contains(&bytes))
    {
        bail!("--size {size}: expected 4 bytes to 4 GiB");
    }
    let gradient_dtype = super::dtype(dtype);
    eprintln!("measuring single-stream loopback TCP...");
    let loopback = tokio::task::spawn_blocking(|| {
        cohort_collective::bench::loopback_tcp_throughput(LOOPBACK_BYTES)
    })
    .await??;
    let mut rows = Vec::new();
    let mut table = Vec::new();
    for bytes in sizes {
        eprintln!("{ranks} ranks against {shards} shards, {bytes} bytes...");
        let result = run_rounds(&BenchConfig {
            shards,
            ranks,
            bytes: bytes as u64,
            gradient_dtype,
            iterations,
            max_chunk_bytes,
            ..defaults.clone()
        })
        .await?;
        table.push(vec![
            bytes.to_string(),
            format!("{:.3}", gbps(result.per_rank_bytes_per_second)),
            format!("{:.3}", gbps(result.aggregate_bytes_per_second)),
            format!("{:.2}", result.aggregate_bytes_per_second / loopback),
        ]);
        rows.push(json!({
            "bytes": bytes,
            "per_rank_gbps": gbps(result.per_rank_bytes_per_second),
            "aggregate_gbps": gbps(result.aggregate_bytes_per_second),
            "aggregate_fraction_of_loopback": result.aggregate_bytes_per_second / loopback,
        }));
    }
    println!(
        "parameter server push+pull, {shards} shards, {ranks} ranks, gradients {}; loopback TCP {:.3} GB/s single stream",
        gradient_dtype.name(),
        gbps(loopback)
    );
    print!(
        "{}",
        crate::render::table(
            &[
                "BYTES",
                "PER RANK(GB/S)",
                "AGGREGATE(GB/S)",
                "AGGREGATE/LOOPBACK"
            ],
            &table
        )
    );
    println!(
        "{}",
        json!({
            "bench": "ps",
            "shards": shards,
            "ranks": ranks,
            "iterations": iterations,
            "max_chunk_bytes": max_chunk_bytes,
            "dtype": gradient_dtype.name(),
            "loopback_gbps": gbps(loopback),
            "results": rows,
        })
    );
    Ok(ExitCode::SUCCESS)
}
