//! `cohort bench allreduce`: ring all-reduce across N local rank processes (a real job on a local
//! cluster), reported nccl-tests style (time, algbw, busbw), against raw single-stream loopback
//! TCP between two processes measured by the same command.
//!
//! For bf16 and f16 the ranks also time `f32` at the same element count (the same
//! fp32-equivalent payload), alternating call by call, and report the time ratio and the bytes
//! each rank sent for one all-reduce of each type: what mixed precision saves, measured under
//! the same load.
//!
//! `--links both` times rings whose links prove the job's secret at setup (as Cohort's ranks'
//! do) and rings whose links prove nothing, size by size in the same job, with their setup
//! times: the cost of authentication.
//!
//! With `--backend nccl` it times NCCL's all-reduce on device buffers instead (no host copies),
//! one thread per local GPU in this process, as nccl-tests does; a build or machine without
//! CUDA or NCCL fails with the reason.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::ValueEnum as _;
use cohort_collective::bench::{self as collective_bench, StreamMeasurement};
use cohort_collective::cuda::{self, CudaLibrary};
use cohort_collective::{DType, LinkSecret, NcclConfig};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{dtype, gbps, parse_size, publish_result, read_result, run_job, start_cluster};
use crate::args::{AllreduceBackend, BenchDtype, BenchLinks};
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

/// What one rank measured for one size.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct RankSample {
    /// Median time of one all-reduce of the benchmarked type, in seconds.
    time_s: f64,
    /// Median time of one `f32` all-reduce of as many elements, in seconds (`time_s` when the
    /// benchmarked type is `f32`).
    f32_time_s: f64,
    /// Payload bytes the rank sent for one all-reduce of the benchmarked type.
    bytes_sent: u64,
    /// Payload bytes the rank sent for one `f32` all-reduce.
    f32_bytes_sent: u64,
}

/// What one rank measured on one kind of links.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LinksSamples {
    /// `authenticated` or `plain`.
    links: String,
    /// Seconds this rank took to form the ring (after a first ring absorbed start-up skew).
    setup_s: f64,
    /// One sample per size.
    samples: Vec<RankSample>,
}

/// The kinds of links `links` names, with the secret each proves.
fn link_kinds(link: &RankLink, links: BenchLinks) -> Vec<(&'static str, Option<LinkSecret>)> {
    let authenticated = ("authenticated", link.link_secret());
    let plain = ("plain", None);
    match links {
        BenchLinks::Authenticated => vec![authenticated],
        BenchLinks::Plain => vec![plain],
        BenchLinks::Both => vec![authenticated, plain],
    }
}

/// One rank of the benchmark: times every size (against `f32` for low-precision types) on
/// each kind of links, the kinds taking turns to go first, publishes its medians, and rank 0
/// prints every rank's.
pub fn rank(elements: &[usize], element_type: BenchDtype, links: BenchLinks) -> Result<ExitCode> {
    let link = RankLink::connect()?;
    // Ranks start at different moments: the first ring absorbs that, so that the setup times
    // below are the rings' own.
    drop(link.ring("bench-allreduce-start")?);
    let mut rings = Vec::new();
    let mut results = Vec::new();
    for (name, secret) in link_kinds(&link, links) {
        let started = std::time::Instant::now();
        rings.push(link.ring_proving(&format!("bench-allreduce-{name}"), secret)?);
        results.push(LinksSamples {
            links: name.to_owned(),
            setup_s: started.elapsed().as_secs_f64(),
            samples: Vec::with_capacity(elements.len()),
        });
    }
    let dtype = dtype(element_type);
    for (index, &count) in elements.iter().enumerate() {
        // Sized by the fp32-equivalent payload, so every type gets the same number of calls.
        let iterations = collective_bench::iterations_for(count * 4);
        // Kinds take turns going first, so neither always meets a warmer machine.
        let mut turn: Vec<_> = rings.iter_mut().zip(&mut results).collect();
        if index % 2 == 1 {
            turn.reverse();
        }
        for (ring, result) in turn {
            let [own, f32_sample] = collective_bench::compare_all_reduce_with_f32(
                ring,
                count,
                dtype,
                (iterations / 5).max(2),
                iterations,
            )?;
            result.samples.push(RankSample {
                time_s: own.time.as_secs_f64(),
                f32_time_s: f32_sample.time.as_secs_f64(),
                bytes_sent: own.bytes_sent,
                f32_bytes_sent: f32_sample.bytes_sent,
            });
        }
    }
    publish_result(&link, &results)?;
    Ok(ExitCode::SUCCESS)
}

/// Combines the ranks' samples of each size: a size is as slow, and sends as much, as its
/// slowest and busiest rank.
fn slowest_ranks(per_rank: &[Vec<RankSample>], sizes: usize) -> Result<Vec<RankSample>> {
    let mut combined = vec![
        RankSample {
            time_s: 0.0,
            f32_time_s: 0.0,
            bytes_sent: 0,
            f32_bytes_sent: 0,
        };
        sizes
    ];
    for (rank, samples) in per_rank.iter().enumerate() {
        if samples.len() != sizes {
            bail!(
                "rank {rank} reported {} sizes, expected {sizes}",
                samples.len()
            );
        }
        for (combined, sample) in combined.iter_mut().zip(samples) {
            combined.time_s = combined.time_s.max(sample.time_s);
            combined.f32_time_s = combined.f32_time_s.max(sample.f32_time_s);
            combined.bytes_sent = combined.bytes_sent.max(sample.bytes_sent);
            combined.f32_bytes_sent = combined.f32_bytes_sent.max(sample.f32_bytes_sent);
        }
    }
    Ok(combined)
}

/// `cohort bench allreduce`.
pub async fn run(
    backend: AllreduceBackend,
    ranks: Option<u32>,
    sizes: &[String],
    element_type: BenchDtype,
    links: BenchLinks,
) -> Result<ExitCode> {
    match backend {
        AllreduceBackend::Tcp => run_tcp(ranks.unwrap_or(2), sizes, element_type, links).await,
        AllreduceBackend::Nccl => {
            let sizes = sizes.to_vec();
            tokio::task::spawn_blocking(move || run_nccl(ranks, &sizes, element_type)).await?
        }
    }
}

/// Parses `--sizes` (fp32-equivalent payloads) into bytes.
fn payloads(sizes: &[String]) -> Result<Vec<usize>> {
    let payloads: Vec<usize> = sizes.iter().map(|s| parse_size(s)).collect::<Result<_>>()?;
    if let Some(too_big) = payloads.iter().find(|&&bytes| bytes > 4 << 30) {
        bail!("size {too_big} bytes, expected at most 4 GiB");
    }
    Ok(payloads)
}

/// Per kind of links: its name, its slowest rank's setup time and its slowest ranks' samples
/// of each of `sizes` sizes.
fn combine_kinds(
    per_rank: &[Vec<LinksSamples>],
    sizes: usize,
) -> Result<Vec<(String, f64, Vec<RankSample>)>> {
    let kinds: Vec<String> = per_rank
        .first()
        .map(|kinds| kinds.iter().map(|kind| kind.links.clone()).collect())
        .unwrap_or_default();
    let mut measured = Vec::new();
    for (index, kind) in kinds.iter().enumerate() {
        let of_kind = per_rank
            .iter()
            .map(|rank| rank.get(index).map(|k| k.samples.clone()))
            .collect::<Option<Vec<_>>>()
            .context("a rank reported fewer kinds of links")?;
        let setup_s = per_rank
            .iter()
            .filter_map(|rank| rank.get(index))
            .map(|k| k.setup_s)
            .fold(0.0, f64::max);
        measured.push((kind.clone(), setup_s, slowest_ranks(&of_kind, sizes)?));
    }
    Ok(measured)
}

/// The job of `ranks` rank processes that time `elements` of `dtype` on `links`.
fn rank_job_spec(
    ranks: u32,
    elements: &[usize],
    dtype: DType,
    links: BenchLinks,
) -> Result<String> {
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
args = ["bench", "allreduce-rank", "--elements", "{element_list}", "--dtype", "{dtype}", "--links", "{links}"]
"#,
        program = json!(executable.display().to_string()),
        links = links
            .to_possible_value()
            .context("--links has a name")?
            .get_name(),
    );
    Ok(spec)
}

/// `cohort bench allreduce --backend tcp`.
async fn run_tcp(
    ranks: u32,
    sizes: &[String],
    element_type: BenchDtype,
    links: BenchLinks,
) -> Result<ExitCode> {
    if !(1..=64).contains(&ranks) {
        bail!("--ranks = {ranks}, expected 1 to 64");
    }
    let dtype = dtype(element_type);
    let payloads = payloads(sizes)?;
    // Sizes are fp32-equivalent payloads: the same element count for every dtype.
    let elements: Vec<usize> = payloads.iter().map(|bytes| bytes / 4).collect();

    eprintln!("measuring single-stream loopback TCP between two processes...");
    let loopback = tokio::task::spawn_blocking(loopback_between_processes).await??;

    let data_dir = tempfile::Builder::new().prefix("cohort-bench-").tempdir()?;
    eprintln!("running {ranks} rank processes on a local cluster...");
    let cluster = start_cluster(data_dir.path(), 1, ranks).await?;
    let spec = rank_job_spec(ranks, &elements, dtype, links)?;
    let mut client = client::job_control(cluster.target()).await?;
    let outcome = run_job(&mut client, spec).await;
    let per_rank: Result<Vec<Vec<LinksSamples>>> = match outcome {
        Ok(job) => read_result(&mut client, &job.job_id).await,
        Err(error) => Err(error),
    };
    cluster.shutdown().await;
    let measured = combine_kinds(&per_rank?, elements.len())?;
    // With both kinds, each authenticated size against the plain one of the same size.
    let plain_times: Option<Vec<f64>> = measured
        .iter()
        .find(|(kind, _, _)| kind == "plain")
        .filter(|_| measured.len() > 1)
        .map(|(_, _, samples)| samples.iter().map(|sample| sample.time_s).collect());

    let mut rows = Vec::new();
    let mut table = Vec::new();
    for (kind, _, samples) in &measured {
        for (index, ((&payload, &count), sample)) in
            payloads.iter().zip(&elements).zip(samples).enumerate()
        {
            let bytes = count * dtype.size_bytes();
            let time_s = sample.time_s;
            let algbw =
                collective_bench::algorithm_bandwidth(bytes, Duration::from_secs_f64(time_s));
            let busbw = collective_bench::bus_bandwidth(algbw, ranks as usize);
            let time_ratio_vs_f32 = time_s / sample.f32_time_s.max(f64::MIN_POSITIVE);
            // busbw is proportional to 1 / time at the same size and ranks.
            let busbw_ratio_vs_plain = plain_times
                .as_ref()
                .filter(|_| kind != "plain")
                .map(|plain| plain[index] / time_s.max(f64::MIN_POSITIVE));
            table.push(vec![
                kind.clone(),
                payload.to_string(),
                bytes.to_string(),
                format!("{:.1}", time_s * 1e6),
                format!("{:.3}", gbps(algbw)),
                format!("{:.3}", gbps(busbw)),
                format!("{:.2}", busbw / loopback),
                format!("{:.1}", sample.f32_time_s * 1e6),
                format!("{time_ratio_vs_f32:.2}"),
                sample.bytes_sent.to_string(),
                sample.f32_bytes_sent.to_string(),
                busbw_ratio_vs_plain.map_or("-".to_owned(), |ratio| format!("{ratio:.2}")),
            ]);
            rows.push(json!({
                "links": kind,
                "busbw_ratio_vs_plain": busbw_ratio_vs_plain,
                "fp32_equivalent_bytes": payload,
                "bytes": bytes,
                "time_s": time_s,
                "algbw_gbps": gbps(algbw),
                "busbw_gbps": gbps(busbw),
                "busbw_fraction_of_loopback": busbw / loopback,
                "f32_time_s": sample.f32_time_s,
                "time_ratio_vs_f32": time_ratio_vs_f32,
                "bytes_sent_per_rank": sample.bytes_sent,
                "f32_bytes_sent_per_rank": sample.f32_bytes_sent,
            }));
        }
    }
    let comparison = if dtype == DType::F32 {
        String::new()
    } else {
        " against f32 at the same element count (calls interleaved)".to_owned()
    };
    println!(
        "all-reduce (ring over TCP), {ranks} ranks, {dtype}{comparison}; loopback TCP {:.3} GB/s \
         single stream",
        gbps(loopback)
    );
    for (kind, setup_s, _) in &measured {
        println!("{kind} links: ring formed in {:.1} ms", setup_s * 1e3);
    }
    print!(
        "{}",
        crate::render::table(
            &[
                "LINKS",
                "PAYLOAD(F32 BYTES)",
                "BYTES",
                "TIME(US)",
                "ALGBW(GB/S)",
                "BUSBW(GB/S)",
                "BUSBW/LOOPBACK",
                "F32 TIME(US)",
                "TIME/F32",
                "SENT/RANK(BYTES)",
                "F32 SENT/RANK(BYTES)",
                "BUSBW/PLAIN"
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
            "setup_s": measured
                .iter()
                .map(|(kind, setup_s, _)| (kind.clone(), json!(setup_s)))
                .collect::<serde_json::Map<_, _>>(),
            "results": rows,
        })
    );
    Ok(ExitCode::SUCCESS)
}

/// `cohort bench allreduce --backend nccl`: one rank thread per GPU (all of them, or `ranks`
/// capped at their number), all-reducing device buffers. Runs on a blocking thread.
fn run_nccl(ranks: Option<u32>, sizes: &[String], element_type: BenchDtype) -> Result<ExitCode> {
    let dtype = dtype(element_type);
    let payloads = payloads(sizes)?;
    let elements: Vec<usize> = payloads.iter().map(|bytes| bytes / 4).collect();
    cuda::require(CudaLibrary::Nccl)?;
    let gpus = cuda::device_count()?;
    if gpus == 0 {
        bail!("no CUDA device found: the nccl backend needs at least one GPU");
    }
    let world_size = match ranks {
        None => gpus,
        Some(0) => bail!("--ranks = 0, expected at least 1"),
        Some(ranks) if ranks as usize > gpus => {
            eprintln!("--ranks = {ranks}: this machine has {gpus} GPUs, running {gpus} ranks");
            gpus
        }
        Some(ranks) => ranks as usize,
    };
    eprintln!("running {world_size} NCCL ranks, one thread per GPU...");
    let rows = collective_bench::nccl_all_reduce_in_threads(
        world_size,
        &elements,
        dtype,
        NcclConfig::default().collective_timeout,
    )?;

    let mut table = Vec::new();
    let mut results = Vec::new();
    for (&payload, row) in payloads.iter().zip(&rows) {
        let time_s = row.time.as_secs_f64();
        table.push(vec![
            payload.to_string(),
            row.bytes.to_string(),
            format!("{:.1}", time_s * 1e6),
            format!("{:.3}", gbps(row.algorithm_bandwidth)),
            format!("{:.3}", gbps(row.bus_bandwidth)),
        ]);
        results.push(json!({
            "fp32_equivalent_bytes": payload,
            "bytes": row.bytes,
            "time_s": time_s,
            "algbw_gbps": gbps(row.algorithm_bandwidth),
            "busbw_gbps": gbps(row.bus_bandwidth),
        }));
    }
    let device = cuda::device_name(0)?;
    println!("all-reduce (NCCL, device buffers), {world_size} x {device}, {dtype}");
    println!("{}", collective_bench::NCCL_TIME_NOTE);
    print!(
        "{}",
        crate::render::table(
            &[
                "PAYLOAD(F32 BYTES)",
                "BYTES",
                "TIME(US)",
                "ALGBW(GB/S)",
                "BUSBW(GB/S)"
            ],
            &table
        )
    );
    println!(
        "{}",
        json!({
            "bench": "allreduce",
            "backend": "nccl",
            "ranks": world_size,
            "gpus": gpus,
            "device": device,
            "dtype": dtype.name(),
            "results": results,
        })
    );
    Ok(ExitCode::SUCCESS)
}
