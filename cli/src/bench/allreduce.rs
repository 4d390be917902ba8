//! `cohort bench allreduce`: ring all-reduce across N local rank processes (a real job on a local
//! cluster), reported nccl-tests style (time, algbw, busbw), against raw single-stream loopback
//! TCP between two processes measured by the same command.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cohort_collective::bench::{self as collective_bench, StreamMeasurement};
use serde_json::json;

use super::{dtype, gbps, parse_size, publish_result, read_result, run_job, start_cluster};
use crate::args::BenchDtype;
use crate::client;
use crate::rank::RankLink;

/// Bytes per loopback measurement.
const STREAM_BYTES: u64 = 512 << 20;
/// Loopback measurements; the median is reported.
const STREAM_REPEATS: usize = 3;

/// The receiving side of the loopback measurement: listens on loopback, prints its port, reads
/// `bytes` bytes and acknowledges.
pub fn stream_receive(bytes: u64) -> Result<ExitCode> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    println!("{}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    for _ in 0..STREAM_REPEATS {
        let (mut stream, _) = listener.accept()?;
        collective_bench::receive_stream(&mut stream, bytes)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Measures single-stream loopback TCP from this process to a child process, in bytes/s
/// (median of [`STREAM_REPEATS`]).
fn loopback_between_processes() -> Result<f64> {
    let executable = std::env::current_exe()?;
    let mut child = std::process::Command::new(executable)
        .args([
            "bench",
            "stream-receive",
            "--bytes",
            &STREAM_BYTES.to_string(),
        ])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .context("starting the loopback receiver")?;
    let mut port = String::new();
    BufReader::new(child.stdout.take().context("receiver stdout")?).read_line(&mut port)?;
    let port: u16 = port.trim().parse().context("receiver printed no port")?;
    let mut rates = Vec::new();
    for _ in 0..STREAM_REPEATS {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
        let measurement: StreamMeasurement =
            collective_bench::send_stream(&mut stream, STREAM_BYTES)?;
        rates.push(measurement.bytes_per_second());
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("loopback receiver failed ({status})");
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[rates.len() / 2])
}

/// One rank of the benchmark: times every size, publishes its medians, and rank 0 prints the
/// slowest rank's median per size.
pub fn rank(elements: &[usize], element_type: BenchDtype) -> Result<ExitCode> {
    let link = RankLink::connect()?;
    let mut ring = link.ring("bench-allreduce")?;
    let dtype = dtype(element_type);
    let mut medians = Vec::with_capacity(elements.len());
    for &count in elements {
        let iterations = collective_bench::iterations_for(count * dtype.size_bytes());
        let median = collective_bench::time_all_reduce(
            &mut ring,
            count,
            dtype,
            (iterations / 5).max(2),
            iterations,
        )?;
        medians.push(median.as_secs_f64());
    }
    publish_result(&link, &medians)?;
    Ok(ExitCode::SUCCESS)
}

/// `cohort bench allreduce`.
pub async fn run(ranks: u32, sizes: &[String], element_type: BenchDtype) -> Result<ExitCode> {
    if !(1..=64).contains(&ranks) {
        bail!("--ranks = {ranks}, expected 1 to 64");
    }
    let dtype = dtype(element_type);
    let payloads: Vec<usize> = sizes.iter().map(|s| parse_size(s)).collect::<Result<_>>()?;
    if let Some(too_big) = payloads.iter().find(|&&bytes| bytes > 4 << 30) {
        bail!("size {too_big} bytes, expected at most 4 GiB");
    }
    // Sizes are fp32-equivalent payloads: the same element count for every dtype.
    let elements: Vec<usize> = payloads.iter().map(|bytes| bytes / 4).collect();

    eprintln!("measuring single-stream loopback TCP between two processes...");
    let loopback = tokio::task::spawn_blocking(loopback_between_processes).await??;

    let data_dir = tempfile::Builder::new().prefix("cohort-bench-").tempdir()?;
    eprintln!("running {ranks} rank processes on a local cluster...");
    let cluster = start_cluster(data_dir.path(), 1, ranks).await?;
    let executable = std::env::current_exe()?;
    let element_list = elements
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let spec = format!(
        r#"
version = 1
name = "bench-allreduce"
kind = "command"
[resources]
ranks = {ranks}
[command]
program = {program}
args = ["bench", "allreduce-rank", "--elements", "{element_list}", "--dtype", "{dtype}"]
"#,
        program = json!(executable.display().to_string()),
    );
    let mut client = client::job_control(cluster.address()).await?;
    let outcome = run_job(&mut client, spec).await;
    let per_rank: Result<Vec<Vec<f64>>> = match outcome {
        Ok(job) => read_result(&mut client, &job.job_id).await,
        Err(error) => Err(error),
    };
    cluster.shutdown().await;
    // Each size is as slow as its slowest rank.
    let mut medians = vec![0.0_f64; elements.len()];
    for times in per_rank? {
        for (slowest, time) in medians.iter_mut().zip(times) {
            *slowest = slowest.max(time);
        }
    }

    let mut rows = Vec::new();
    let mut table = Vec::new();
    for ((&payload, &count), &time_s) in payloads.iter().zip(&elements).zip(&medians) {
        let bytes = count * dtype.size_bytes();
        let algbw = collective_bench::algorithm_bandwidth(bytes, Duration::from_secs_f64(time_s));
        let busbw = collective_bench::bus_bandwidth(algbw, ranks as usize);
        table.push(vec![
            payload.to_string(),
            bytes.to_string(),
            format!("{:.1}", time_s * 1e6),
            format!("{:.3}", gbps(algbw)),
            format!("{:.3}", gbps(busbw)),
            format!("{:.2}", busbw / loopback),
        ]);
        rows.push(json!({
            "fp32_equivalent_bytes": payload,
            "bytes": bytes,
            "time_s": time_s,
            "algbw_gbps": gbps(algbw),
            "busbw_gbps": gbps(busbw),
            "busbw_fraction_of_loopback": busbw / loopback,
        }));
    }
    println!(
        "all-reduce (ring over TCP), {ranks} ranks, {dtype}; loopback TCP {:.3} GB/s single stream",
        gbps(loopback)
    );
    print!(
        "{}",
        crate::render::table(
            &[
                "PAYLOAD(F32 BYTES)",
                "BYTES",
                "TIME(US)",
                "ALGBW(GB/S)",
                "BUSBW(GB/S)",
                "BUSBW/LOOPBACK"
            ],
            &table
        )
    );
    println!(
        "{}",
        json!({
            "bench": "allreduce",
            "ranks": ranks,
            "dtype": dtype.name(),
            "loopback_gbps": gbps(loopback),
            "results": rows,
        })
    );
    Ok(ExitCode::SUCCESS)
}
