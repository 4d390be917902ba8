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
//! times: the cost of authentication. `--transport tcp,shm` (the default) times the TCP ring
//! and shared memory ([`cohort_collective::ShmGroup`], what ranks on one node use) the same
//! way.
//!
//! `--mpi auto` (the default) then times Open MPI's `MPI_Allreduce` under `mpirun` on as many
//! ranks, with the same sizes, call counts and statistic (median call of the slowest rank),
//! once confined to shared memory and once to TCP, and reports Cohort's busbw against each
//! (see [`super::reference`]); where Open MPI or mpi4py is missing, one line says why.
//!
//! With `--backend nccl` it times NCCL's all-reduce on device buffers instead (no host copies),
//! one thread per local GPU in this process, as nccl-tests does; a build or machine without
//! CUDA or NCCL fails with the reason.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::ValueEnum as _;
use cohort_collective::bench::{self as collective_bench, StreamMeasurement};
use cohort_collective::cuda::{self, CudaLibrary};
use cohort_collective::{Communicator, DType, LinkSecret, NcclConfig, Transport};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::reference::{self, MpiTransport, OpenMpiReport, OpenMpiRequest, Reference, Skip};
use super::{dtype, gbps, parse_size, publish_result, read_result, run_job, start_cluster};
use crate::args::{AllreduceBackend, BenchDtype, BenchLinks, BenchTransport, MpiReference};
use crate::client;
use crate::rank::RankLink;

/// Bytes per loopback measurement.
const STREAM_BYTES: u64 = 512 << 20;
/// Loopback measurements; the median is reported.
const STREAM_REPEATS: usize = 3;
/// Longest one Open MPI run (one transport, every size) may take.
const OPEN_MPI_TIMEOUT: Duration = Duration::from_secs(600);

/// Untimed and timed all-reduces of `elements` elements: sized by the fp32-equivalent
/// payload, so that every type, and the Open MPI reference, makes the same number of calls.
fn calls_for(elements: usize) -> (usize, usize) {
    let iterations = collective_bench::iterations_for(elements * 4);
    ((iterations / 5).max(2), iterations)
}

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
    /// Payload bytes the rank sent over the network for one all-reduce of the benchmarked
    /// type (`None` for shared memory).
    bytes_sent: Option<u64>,
    /// Payload bytes the rank sent for one `f32` all-reduce.
    f32_bytes_sent: Option<u64>,
}

/// What one rank measured on one kind of links.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LinksSamples {
    /// `authenticated` or `plain` (TCP rings), or `shm`.
    links: String,
    /// Seconds this rank took to form the ring (after a first ring absorbed start-up skew).
    setup_s: f64,
    /// One sample per size.
    samples: Vec<RankSample>,
}

/// What `bench allreduce` times: the links of TCP rings and the transports.
#[derive(Debug, Clone)]
pub struct Variants {
    /// `--links`.
    pub links: BenchLinks,
    /// `--transport`.
    pub transports: Vec<BenchTransport>,
}

/// One communicator the benchmark times.
enum Kind {
    /// A TCP ring whose links prove `secret`.
    Ring(Option<LinkSecret>),
    /// The group [`cohort_collective::connect_group`] forms with `transport`.
    Group(Transport),
}

/// The kinds `variants` names, each with its name in the report.
fn kinds(link: &RankLink, variants: &Variants) -> Vec<(&'static str, Kind)> {
    let mut kinds = Vec::new();
    for transport in &variants.transports {
        match transport {
            BenchTransport::Tcp => {
                if variants.links != BenchLinks::Plain {
                    kinds.push(("authenticated", Kind::Ring(link.link_secret())));
                }
                if variants.links != BenchLinks::Authenticated {
                    kinds.push(("plain", Kind::Ring(None)));
                }
            }
            BenchTransport::Shm => kinds.push(("shm", Kind::Group(Transport::Shm))),
            BenchTransport::Auto => kinds.push(("auto", Kind::Group(Transport::Auto))),
        }
    }
    kinds
}

/// One rank of the benchmark: times every size (against `f32` for low-precision types) on
/// each kind of communicator, the kinds taking turns to go first, publishes its medians, and
/// rank 0 prints every rank's.
pub fn rank(
    elements: &[usize],
    element_type: BenchDtype,
    links: BenchLinks,
    transports: &[BenchTransport],
) -> Result<ExitCode> {
    let link = RankLink::connect()?;
    // Ranks start at different moments: the first ring absorbs that, so that the setup times
    // below are the rings' own.
    drop(link.ring("bench-allreduce-start")?);
    let variants = Variants {
        links,
        transports: transports.to_vec(),
    };
    let mut rings: Vec<Box<dyn Communicator + Send>> = Vec::new();
    let mut results = Vec::new();
    for (name, kind) in kinds(&link, &variants) {
        let started = std::time::Instant::now();
        let prefix = format!("bench-allreduce-{name}");
        rings.push(match kind {
            Kind::Ring(secret) => Box::new(link.ring_proving(&prefix, secret)?),
            Kind::Group(transport) => link.group(&prefix, transport)?,
        });
        results.push(LinksSamples {
            links: name.to_owned(),
            setup_s: started.elapsed().as_secs_f64(),
            samples: Vec::with_capacity(elements.len()),
        });
    }
    let dtype = dtype(element_type);
    for (index, &count) in elements.iter().enumerate() {
        let (warmup, iterations) = calls_for(count);
        // Kinds take turns going first, so neither always meets a warmer machine.
        let mut turn: Vec<_> = rings.iter_mut().zip(&mut results).collect();
        if index % 2 == 1 {
            turn.reverse();
        }
        for (ring, result) in turn {
            let [own, f32_sample] = collective_bench::compare_all_reduce_with_f32(
                &mut **ring,
                count,
                dtype,
                warmup,
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
            bytes_sent: None,
            f32_bytes_sent: None,
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

/// Whether and with which Python `bench allreduce` runs the Open MPI reference.
#[derive(Debug, Clone)]
pub struct OpenMpiOptions {
    /// `--mpi`.
    pub mpi: MpiReference,
    /// `--python`.
    pub python: Option<PathBuf>,
}

/// `cohort bench allreduce`.
pub async fn run(
    backend: AllreduceBackend,
    ranks: Option<u32>,
    sizes: &[String],
    element_type: BenchDtype,
    variants: &Variants,
    open_mpi: &OpenMpiOptions,
) -> Result<ExitCode> {
    match backend {
        AllreduceBackend::Tcp => {
            run_tcp(ranks.unwrap_or(2), sizes, element_type, variants, open_mpi).await
        }
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

/// The job of `ranks` rank processes that time `elements` of `dtype` on `variants`.
fn rank_job_spec(
    ranks: u32,
    elements: &[usize],
    dtype: DType,
    variants: &Variants,
) -> Result<String> {
    let transports = variants
        .transports
        .iter()
        .map(|transport| {
            transport
                .to_possible_value()
                .map(|value| value.get_name().to_owned())
                .context("--transport has a name")
        })
        .collect::<Result<Vec<_>>>()?
        .join(",");
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
args = ["bench", "allreduce-rank", "--elements", "{element_list}", "--dtype", "{dtype}", "--links", "{links}", "--transport", "{transports}"]
"#,
        program = json!(executable.display().to_string()),
        links = variants
            .links
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
    variants: &Variants,
    open_mpi: &OpenMpiOptions,
) -> Result<ExitCode> {
    if !(1..=64).contains(&ranks) {
        bail!("--ranks = {ranks}, expected 1 to 64");
    }
    if variants.transports.is_empty() {
        bail!("--transport names nothing to time, expected tcp, shm or both");
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
    let spec = rank_job_spec(ranks, &elements, dtype, variants)?;
    let mut client = client::job_control(cluster.target()).await?;
    let outcome = run_job(&mut client, spec).await;
    let per_rank: Result<Vec<Vec<LinksSamples>>> = match outcome {
        Ok(job) => read_result(&mut client, &job.job_id).await,
        Err(error) => Err(error),
    };
    cluster.shutdown().await;
    let measured = combine_kinds(&per_rank?, elements.len())?;
    // After Cohort's job, so that neither run shares the machine with the other.
    let open_mpi = measure_open_mpi(open_mpi, ranks, dtype, &elements).await;
    report_tcp(
        &TcpRun {
            ranks,
            dtype,
            payloads: &payloads,
            elements: &elements,
            loopback,
        },
        &measured,
        &open_mpi,
    );
    Ok(ExitCode::SUCCESS)
}

/// Open MPI's all-reduce of the same sizes on as many ranks, once per transport.
#[derive(Debug, Default)]
struct OpenMpiMeasured {
    /// The library's version, once a run reported it.
    library: Option<String>,
    /// The shared-memory transport's single-copy mechanism, as `ompi_info` reports it.
    single_copy: Option<String>,
    /// Per transport measured, the slowest rank's median time of each size, in seconds.
    runs: Vec<(MpiTransport, Vec<f64>)>,
    /// Why the reference, or one transport of it, was not measured.
    skips: Vec<Skip>,
}

impl OpenMpiMeasured {
    /// A reference not measured at all, for `reason`.
    fn skipped(skip: Skip) -> Self {
        Self {
            skips: vec![skip],
            ..Self::default()
        }
    }

    /// The slowest rank's time of size `index` over `transport`, if measured.
    fn time_s(&self, transport: MpiTransport, index: usize) -> Option<f64> {
        self.runs
            .iter()
            .find(|(measured, _)| *measured == transport)
            .and_then(|(_, times)| times.get(index).copied())
    }
}

/// Runs Open MPI's `MPI_Allreduce` under `mpirun` on `ranks` processes over each
/// [`MpiTransport`], with the call counts Cohort's ranks use for `elements`, unless `options`
/// or the machine rule it out (then the result says why).
async fn measure_open_mpi(
    options: &OpenMpiOptions,
    ranks: u32,
    dtype: DType,
    elements: &[usize],
) -> OpenMpiMeasured {
    let label = Reference::OpenMpi.label();
    if options.mpi == MpiReference::Off {
        return OpenMpiMeasured::skipped(Skip::because(label, "--mpi off"));
    }
    if dtype != DType::F32 {
        return OpenMpiMeasured::skipped(Skip::because(
            label,
            format!("--dtype {dtype}: MPI has no {dtype} sum, the reference runs with --dtype f32"),
        ));
    }
    let search_path = std::env::var_os("PATH");
    let mpirun = match reference::find_mpirun(search_path.as_deref()) {
        Ok(mpirun) => mpirun,
        Err(skip) => return OpenMpiMeasured::skipped(skip),
    };
    let python = options.python.as_deref();
    let python =
        match reference::find_python(Reference::OpenMpi, python, search_path.as_deref()).await {
            Ok(python) => python,
            Err(skip) => return OpenMpiMeasured::skipped(skip),
        };
    let (warmup, iterations) = elements.iter().map(|&count| calls_for(count)).unzip();
    let request = OpenMpiRequest {
        elements: elements.to_vec(),
        warmup,
        iterations,
    };
    let mut measured = OpenMpiMeasured {
        single_copy: reference::vader_single_copy_mechanism(&mpirun).await,
        ..OpenMpiMeasured::default()
    };
    for transport in MpiTransport::ALL {
        eprintln!(
            "running Open MPI's MPI_Allreduce on {ranks} processes over btl {}...",
            transport.btl()
        );
        match run_open_mpi(&mpirun, &python, ranks, transport, &request).await {
            Ok((library, times)) => {
                measured.library = Some(library);
                measured.runs.push((transport, times));
            }
            Err(error) => measured.skips.push(Skip::because(
                format!("{label} {}", transport.name()),
                format!("{error:#}"),
            )),
        }
    }
    measured
}

/// One Open MPI run: the library's version and the slowest rank's time of each size.
async fn run_open_mpi(
    mpirun: &Path,
    python: &Path,
    ranks: u32,
    transport: MpiTransport,
    request: &OpenMpiRequest,
) -> Result<(String, Vec<f64>)> {
    let launcher =
        reference::mpirun_arguments(mpirun, ranks, transport, reference::running_as_root());
    let report: OpenMpiReport = reference::run(
        Reference::OpenMpi,
        &launcher,
        python,
        &request.arguments(),
        OPEN_MPI_TIMEOUT,
    )
    .await?;
    let times = report.slowest_rank_times(request, ranks)?;
    Ok((report.library, times))
}

/// What every row of a TCP run shares.
struct TcpRun<'a> {
    /// World size.
    ranks: u32,
    /// Element type moved.
    dtype: DType,
    /// fp32-equivalent payload of each size, in bytes.
    payloads: &'a [usize],
    /// Elements of each size.
    elements: &'a [usize],
    /// Single-stream loopback TCP, in bytes/s.
    loopback: f64,
}

/// Prints the TCP run's header, skips, tables and JSON line.
fn report_tcp(
    run: &TcpRun<'_>,
    measured: &[(String, f64, Vec<RankSample>)],
    open_mpi: &OpenMpiMeasured,
) {
    let TcpRun {
        ranks,
        dtype,
        loopback,
        ..
    } = *run;
    let (rows, table) = tcp_rows(run, measured, open_mpi);
    let comparison = if dtype == DType::F32 {
        String::new()
    } else {
        " against f32 at the same element count (calls interleaved)".to_owned()
    };
    println!(
        "all-reduce (authenticated and plain: TCP rings; shm: shared memory), {ranks} ranks, \
         {dtype}{comparison}; loopback TCP {:.3} GB/s single stream",
        gbps(loopback)
    );
    for (kind, setup_s, _) in measured {
        println!("{kind}: group formed in {:.1} ms", setup_s * 1e3);
    }
    for skip in &open_mpi.skips {
        skip.print();
    }
    print!(
        "{}",
        crate::render::table(
            &[
                "TRANSPORT",
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
                "BUSBW/PLAIN",
                "BUSBW/OPEN MPI SHM",
                "BUSBW/OPEN MPI TCP",
            ],
            &table
        )
    );
    let open_mpi_json = report_open_mpi(run, open_mpi);
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
            "open_mpi": open_mpi_json,
            "skipped": open_mpi.skips.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })
    );
}

/// Cohort's JSON rows and table rows: each kind of links, size by size, with its ratios to
/// loopback TCP, to f32, to plain links and to Open MPI over each transport.
fn tcp_rows(
    run: &TcpRun<'_>,
    measured: &[(String, f64, Vec<RankSample>)],
    open_mpi: &OpenMpiMeasured,
) -> (Vec<serde_json::Value>, Vec<Vec<String>>) {
    let TcpRun {
        ranks,
        dtype,
        payloads,
        elements,
        loopback,
    } = *run;
    // With both kinds, each authenticated size against the plain one of the same size.
    let plain_times: Option<Vec<f64>> = measured
        .iter()
        .find(|(kind, _, _)| kind == "plain")
        .filter(|_| measured.len() > 1)
        .map(|(_, _, samples)| samples.iter().map(|sample| sample.time_s).collect());

    let mut rows = Vec::new();
    let mut table = Vec::new();
    for (kind, _, samples) in measured {
        for (index, ((&payload, &count), sample)) in
            payloads.iter().zip(elements).zip(samples).enumerate()
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
            let busbw_ratio_vs_open_mpi = MpiTransport::ALL.map(|transport| {
                open_mpi
                    .time_s(transport, index)
                    .map(|open_mpi_time_s| open_mpi_time_s / time_s.max(f64::MIN_POSITIVE))
            });
            let ratio = |ratio: Option<f64>| ratio.map_or("-".to_owned(), |r| format!("{r:.2}"));
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
                sample
                    .bytes_sent
                    .map_or("-".to_owned(), |bytes| bytes.to_string()),
                sample
                    .f32_bytes_sent
                    .map_or("-".to_owned(), |bytes| bytes.to_string()),
                ratio(busbw_ratio_vs_plain),
                ratio(busbw_ratio_vs_open_mpi[0]),
                ratio(busbw_ratio_vs_open_mpi[1]),
            ]);
            let mut row = json!({
                "links": kind,
                "transport": match kind.as_str() {
                    "shm" | "auto" => kind.as_str(),
                    _ => "tcp",
                },
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
            });
            for (transport, ratio) in MpiTransport::ALL.iter().zip(busbw_ratio_vs_open_mpi) {
                row[format!("busbw_ratio_vs_open_mpi_{}", transport.name())] = json!(ratio);
            }
            rows.push(row);
        }
    }
    (rows, table)
}

/// Prints Open MPI's own figures (when measured) and returns them for the JSON line.
fn report_open_mpi(run: &TcpRun<'_>, open_mpi: &OpenMpiMeasured) -> serde_json::Value {
    if open_mpi.runs.is_empty() {
        return serde_json::Value::Null;
    }
    let library = open_mpi.library.as_deref().unwrap_or("Open MPI");
    let single_copy = open_mpi.single_copy.as_deref().unwrap_or("unknown");
    println!(
        "{library} MPI_Allreduce (mpirun, pml ob1), {} processes, f32 in place, median call of \
         the slowest rank: shm = btl self,vader (single-copy mechanism {single_copy}), tcp = btl \
         self,tcp over loopback",
        run.ranks
    );
    let mut table = Vec::new();
    let mut runs = Vec::new();
    for (transport, times) in &open_mpi.runs {
        let mut sizes = Vec::new();
        for ((&payload, &count), &time_s) in run.payloads.iter().zip(run.elements).zip(times) {
            let bytes = count * 4;
            let algbw =
                collective_bench::algorithm_bandwidth(bytes, Duration::from_secs_f64(time_s));
            let busbw = collective_bench::bus_bandwidth(algbw, run.ranks as usize);
            let (_, iterations) = calls_for(count);
            table.push(vec![
                transport.name().to_owned(),
                payload.to_string(),
                bytes.to_string(),
                iterations.to_string(),
                format!("{:.1}", time_s * 1e6),
                format!("{:.3}", gbps(algbw)),
                format!("{:.3}", gbps(busbw)),
                format!("{:.2}", busbw / run.loopback),
            ]);
            sizes.push(json!({
                "bytes": bytes,
                "iterations": iterations,
                "time_s": time_s,
                "algbw_gbps": gbps(algbw),
                "busbw_gbps": gbps(busbw),
                "busbw_fraction_of_loopback": busbw / run.loopback,
            }));
        }
        runs.push(json!({
            "transport": transport.name(),
            "btl": transport.btl(),
            "results": sizes,
        }));
    }
    print!(
        "{}",
        crate::render::table(
            &[
                "OPEN MPI",
                "PAYLOAD(F32 BYTES)",
                "BYTES",
                "CALLS",
                "TIME(US)",
                "ALGBW(GB/S)",
                "BUSBW(GB/S)",
                "BUSBW/LOOPBACK",
            ],
            &table
        )
    );
    json!({
        "library": library,
        "vader_single_copy_mechanism": open_mpi.single_copy,
        "runs": runs,
    })
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
