//! `cohort bench submit`: a real coordinator (a `cohort coordinator` process with the embedded
//! store, or etcd) and simulated workers in this process (gRPC clients that register one CPU
//! slot each, heartbeat every second and finish every rank they are told to start at once).
//! Measures, in one run: the coordinator's CPU time while it only takes heartbeats; accepted
//! submissions per second from concurrent clients, with the latency of each; how long jobs
//! waited to be scheduled; and, last, that no acknowledged job is lost when the coordinator is
//! killed (SIGKILL) in the middle of submissions and started again.

use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cohort_proto::Secret;
use cohort_proto::transport::{Connection, Credentials, endpoint};
use cohort_proto::v1::job_control_client::JobControlClient;
use cohort_proto::v1::membership_client::MembershipClient;
use cohort_proto::v1::{
    HeartbeatRequest, ListJobsRequest, ListNodesRequest, RankReport, RankState, RegisterRequest,
    SubmitJobRequest, instruction,
};
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio::task::JoinSet;

/// How often a simulated worker heartbeats.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How long the coordinator's CPU time is measured while it only takes heartbeats.
const IDLE_WINDOW: Duration = Duration::from_secs(10);
/// How long the coordinator and the workers get to come up.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);
/// The job every submission sends: one rank of one CPU slot.
const JOB: &str =
    "version = 1\nname = \"bench\"\nkind = \"command\"\n[command]\nprogram = \"true\"\n";

/// A `cohort coordinator` process of the benchmark.
struct Coordinator {
    child: Child,
    address: String,
    admin: Secret,
    join: Secret,
}

impl Coordinator {
    /// Starts one over `data_dir` and waits until it answers.
    async fn start(data_dir: &Path, store: &str, jobs: u32) -> Result<Self> {
        let address_file = data_dir.join("address");
        let _ = std::fs::remove_file(&address_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("coordinator.log"))?;
        let room = (jobs as usize * 2).max(10_000).to_string();
        let child = Command::new(std::env::current_exe()?)
            .args(["coordinator", "--listen", "127.0.0.1:0", "--store", store])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--address-file")
            .arg(&address_file)
            .args([
                "--max-queued-jobs",
                &room,
                "--max-queued-jobs-per-submitter",
                &room,
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting the coordinator")?;
        let read = |name: &str| std::fs::read_to_string(data_dir.join(name)).ok();
        let started = Instant::now();
        let (address, admin, join) = loop {
            if let (Some(address), Some(admin), Some(join)) =
                (read("address"), read("admin-token"), read("join-token"))
                && !address.trim().is_empty()
            {
                break (address, admin, join);
            }
            if started.elapsed() > STARTUP_TIMEOUT {
                bail!(
                    "the coordinator did not start; see {}",
                    data_dir.join("coordinator.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Ok(Self {
            child,
            address: address.trim().to_owned(),
            admin: Secret::new(admin.trim()),
            join: Secret::new(join.trim()),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// CPU seconds the process has used (user and system).
    fn cpu_seconds(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        let (_, after_name) = stat.rsplit_once(')').context("malformed /proc stat")?;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        Ok(ticks as f64 / 100.0)
    }

    async fn connect(&self, token: &Secret) -> Result<Connection> {
        let channel = endpoint(&self.address, None)?.connect().await?;
        Ok(Credentials::new(Some(token))?.wrap(channel))
    }
}

/// Runs the benchmark.
pub async fn run(jobs: u32, workers: u32, submitters: u32, store: &str) -> Result<ExitCode> {
    anyhow::ensure!(
        jobs > 0 && workers > 0 && submitters > 0,
        "--jobs, --workers and --submitters must be above 0"
    );
    let directory = tempfile::Builder::new()
        .prefix("cohort-bench-submit-")
        .tempdir()?;
    let store_flag = match store {
        "embedded" => "embedded".to_owned(),
        other => other.to_owned(),
    };
    let coordinator = Coordinator::start(directory.path(), &store_flag, jobs).await?;
    eprintln!(
        "coordinator pid {} at {}; registering {workers} simulated workers...",
        coordinator.pid(),
        coordinator.address
    );
    let heartbeats = Arc::new(AtomicU64::new(0));
    let registered = Arc::new(AtomicU64::new(0));
    let mut fleet = JoinSet::new();
    for index in 0..workers {
        let connection = coordinator.connect(&coordinator.join).await?;
        let counters = (registered.clone(), heartbeats.clone());
        fleet.spawn(simulated_worker(
            connection,
            format!("sim-{index:05}"),
            counters,
        ));
    }
    let mut control = JobControlClient::new(coordinator.connect(&coordinator.admin).await?);
    let started = Instant::now();
    // Every worker's registration answered (not only recorded: the answer comes after the
    // registration's audit entry is stored), so every worker heartbeats from now on.
    loop {
        let nodes = control
            .list_nodes(ListNodesRequest {})
            .await?
            .into_inner()
            .nodes;
        let ready = nodes.iter().filter(|node| node.status == "ready").count();
        let answered = registered.load(Ordering::Relaxed);
        if ready >= workers as usize && answered >= u64::from(workers) {
            break;
        }
        if started.elapsed() > STARTUP_TIMEOUT {
            bail!("{answered} of {workers} workers registered, {ready} ready");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let registration_s = started.elapsed().as_secs_f64();

    // Heartbeats alone: the coordinator's CPU time over a fixed window.
    eprintln!("measuring heartbeats for {} s...", IDLE_WINDOW.as_secs());
    let (idle_wall, idle_cpu, idle_beats) = heartbeat_load(&coordinator, &heartbeats).await?;

    // Submissions from concurrent clients.
    eprintln!("submitting {jobs} jobs from {submitters} clients...");
    let cpu_before = coordinator.cpu_seconds()?;
    let mut coordinator = coordinator;
    let submitted = submit_all(&mut coordinator, jobs, submitters, None).await?;
    let cpu_submitting = coordinator.cpu_seconds()? - cpu_before;
    let mut latencies: Vec<f64> = submitted.latencies.clone();
    latencies.sort_by(f64::total_cmp);
    let rate = submitted.accepted.len() as f64 / submitted.wall_s;

    // Every job scheduled: how long each waited.
    eprintln!("waiting for every job to be scheduled...");
    let waits = scheduling_waits(&mut control, jobs as usize).await?;
    fleet.abort_all();

    // Crash safety: kill the coordinator in the middle of submissions, start it again, and
    // count the acknowledged jobs it lost.
    eprintln!("killing the coordinator during submissions...");
    let (acknowledged, lost) = crash_round(
        &mut coordinator,
        directory.path(),
        &store_flag,
        jobs,
        submitters,
    )
    .await?;

    let percentile = |sorted: &[f64], p: f64| {
        sorted
            .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let row = json!({
        "store": store,
        "workers": workers,
        "registration_s": registration_s,
        "submitters": submitters,
        "jobs": jobs,
        "accepted": submitted.accepted.len(),
        "refused": submitted.refused,
        "accepted_per_s": rate,
        "submit_p50_s": percentile(&latencies, 0.50),
        "submit_p99_s": percentile(&latencies, 0.99),
        "scheduling_p50_s": percentile(&waits, 0.50),
        "scheduling_p99_s": percentile(&waits, 0.99),
        "heartbeats_per_s": idle_beats as f64 / idle_wall,
        "heartbeat_cores": idle_cpu / idle_wall,
        "cpu_s_per_heartbeat": idle_cpu / idle_beats.max(1) as f64,
        "cpu_s_per_submission": cpu_submitting / submitted.accepted.len().max(1) as f64,
        "acknowledged_before_kill": acknowledged,
        "lost_after_kill": lost,
    });
    println!(
        "submit benchmark: a coordinator ({store} store), {workers} simulated workers heartbeating every {} s (all registered in {registration_s:.1} s), {submitters} concurrent clients",
        HEARTBEAT_INTERVAL.as_secs()
    );
    print!(
        "{}",
        crate::render::table(
            &[
                "STORE",
                "JOBS/S",
                "SUBMIT P50(MS)",
                "SUBMIT P99(MS)",
                "SCHED P50(MS)",
                "SCHED P99(MS)",
                "HEARTBEAT CORES",
                "LOST AFTER KILL"
            ],
            &[vec![
                store.to_owned(),
                format!("{rate:.0}"),
                format!("{:.1}", percentile(&latencies, 0.50) * 1e3),
                format!("{:.1}", percentile(&latencies, 0.99) * 1e3),
                format!("{:.1}", percentile(&waits, 0.50) * 1e3),
                format!("{:.1}", percentile(&waits, 0.99) * 1e3),
                format!("{:.3}", idle_cpu / idle_wall),
                format!("{lost} of {}", acknowledged),
            ]],
        )
    );
    println!("{}", json!({"bench": "submit", "results": [row]}));
    Ok(if lost == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Submits `jobs / 2` jobs, SIGKILLs the coordinator a quarter of `jobs` into them, starts it
/// again on the same store and returns how many submissions were acknowledged and how many of
/// those jobs it no longer knows.
async fn crash_round(
    coordinator: &mut Coordinator,
    data_dir: &Path,
    store: &str,
    jobs: u32,
    submitters: u32,
) -> Result<(usize, usize)> {
    let kill_after = (jobs / 4).max(1);
    let crash = submit_all(coordinator, jobs / 2, submitters, Some(kill_after)).await?;
    let restarted = Coordinator::start(data_dir, store, jobs).await?;
    let mut control = JobControlClient::new(restarted.connect(&restarted.admin).await?);
    // With etcd the restarted coordinator stands by until the killed one's lease runs out.
    let restarted_at = Instant::now();
    let known = loop {
        match all_job_ids(&mut control).await {
            Ok(known) => break known,
            Err(error) if restarted_at.elapsed() < STARTUP_TIMEOUT => {
                tracing::debug!(%error, "the restarted coordinator does not answer yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(error.context("the restarted coordinator")),
        }
    };
    let lost = crash
        .accepted
        .iter()
        .filter(|id| !known.contains(*id))
        .count();
    Ok((crash.accepted.len(), lost))
}

/// The coordinator's wall seconds, CPU seconds and heartbeats received over [`IDLE_WINDOW`]
/// (`heartbeats` counts the simulated workers' heartbeats).
async fn heartbeat_load(
    coordinator: &Coordinator,
    heartbeats: &AtomicU64,
) -> Result<(f64, f64, u64)> {
    let (cpu_before, beats_before, started) = (
        coordinator.cpu_seconds()?,
        heartbeats.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(IDLE_WINDOW).await;
    Ok((
        started.elapsed().as_secs_f64(),
        coordinator.cpu_seconds()? - cpu_before,
        heartbeats.load(Ordering::Relaxed) - beats_before,
    ))
}

/// What a round of submissions did.
struct Submitted {
    /// Ids of the jobs the coordinator acknowledged.
    accepted: Vec<String>,
    /// Submissions refused or failed.
    refused: u64,
    /// Seconds each acknowledged submission took.
    latencies: Vec<f64>,
    /// Seconds from the first submission to the last answer.
    wall_s: f64,
}

/// Submits `jobs` jobs from `clients` concurrent clients; with `kill`, SIGKILLs the coordinator
/// once that many have been acknowledged (and counts only what was acknowledged before).
async fn submit_all(
    coordinator: &mut Coordinator,
    jobs: u32,
    clients: u32,
    kill_after: Option<u32>,
) -> Result<Submitted> {
    let next = Arc::new(AtomicU64::new(0));
    let results = Arc::new(Mutex::new(Submitted {
        accepted: Vec::with_capacity(jobs as usize),
        refused: 0,
        latencies: Vec::with_capacity(jobs as usize),
        wall_s: 0.0,
    }));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..clients {
        let mut client = JobControlClient::new(coordinator.connect(&coordinator.admin).await?);
        let (next, results, acknowledged) = (next.clone(), results.clone(), acknowledged.clone());
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < u64::from(jobs) {
                let sent = Instant::now();
                let answer = client
                    .submit_job(SubmitJobRequest {
                        spec_toml: JOB.to_owned(),
                        // Queued whatever the cluster holds: the crash round runs without
                        // workers.
                        wait_for_resources: true,
                        resume_from: String::new(),
                    })
                    .await;
                let took = sent.elapsed().as_secs_f64();
                let mut results = results.lock().await;
                match answer.ok().and_then(|answer| answer.into_inner().job) {
                    Some(job) => {
                        results.accepted.push(job.job_id);
                        results.latencies.push(took);
                        acknowledged.fetch_add(1, Ordering::Relaxed);
                    }
                    None => results.refused += 1,
                }
            }
        });
    }
    if let Some(after) = kill_after {
        while acknowledged.load(Ordering::Relaxed) < u64::from(after) && !tasks.is_empty() {
            if let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(1), tasks.join_next()).await
            {
                continue;
            }
        }
        coordinator.child.start_kill()?;
        coordinator.child.wait().await?;
    }
    while tasks.join_next().await.is_some() {}
    let mut results = std::mem::replace(
        &mut *results.lock().await,
        Submitted {
            accepted: Vec::new(),
            refused: 0,
            latencies: Vec::new(),
            wall_s: 0.0,
        },
    );
    results.wall_s = started.elapsed().as_secs_f64();
    Ok(results)
}

/// One simulated worker: registers one CPU slot, heartbeats every second, and reports every
/// rank it is told to start as having exited with 0 at once.
async fn simulated_worker(
    connection: Connection,
    node_id: String,
    (registered_count, heartbeats): (Arc<AtomicU64>, Arc<AtomicU64>),
) -> Result<()> {
    let mut client = MembershipClient::new(connection);
    let mut stream = client
        .register(RegisterRequest {
            node_id: node_id.clone(),
            hostname: node_id.clone(),
            address: "127.0.0.1".to_owned(),
            devices: vec![cohort_proto::v1::Device {
                kind: cohort_proto::v1::DeviceKind::Cpu as i32,
                index: 0,
                name: "simulated cpu slot".to_owned(),
                ..cohort_proto::v1::Device::default()
            }],
            ..RegisterRequest::default()
        })
        .await?
        .into_inner();
    let Some(instruction::Kind::Registered(registered)) =
        stream.message().await?.and_then(|m| m.kind)
    else {
        bail!("{node_id}: the instruction stream did not open with `registered`");
    };
    registered_count.fetch_add(1, Ordering::Relaxed);
    let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut ranks = Vec::new();
        tokio::select! {
            _ = ticker.tick() => {}
            message = stream.message() => {
                let Some(message) = message? else { return Ok(()) };
                if let Some(instruction::Kind::StartRank(start)) = message.kind {
                    ranks.push(RankReport {
                        job_id: start.job_id,
                        rank: start.rank,
                        attempt: start.attempt,
                        state: RankState::Exited as i32,
                        pid: 1,
                        exit_code: Some(0),
                        exited_at_unix_ms: now_unix_ms(),
                        ..RankReport::default()
                    });
                } else {
                    continue;
                }
            }
        }
        client
            .heartbeat(HeartbeatRequest {
                node_id: node_id.clone(),
                session_id: registered.session_id.clone(),
                ranks,
                leaving: false,
            })
            .await?;
        heartbeats.fetch_add(1, Ordering::Relaxed);
    }
}

/// Seconds each of the benchmark's jobs waited between submission and placement, once all
/// `jobs` of them were placed.
async fn scheduling_waits(
    control: &mut JobControlClient<Connection>,
    jobs: usize,
) -> Result<Vec<f64>> {
    let started = Instant::now();
    loop {
        let summaries = all_jobs(control).await?;
        let placed: Vec<f64> = summaries
            .iter()
            .filter(|job| job.scheduled_at_unix_ms > 0)
            .map(|job| (job.scheduled_at_unix_ms - job.submitted_at_unix_ms) as f64 / 1e3)
            .collect();
        if placed.len() >= jobs.min(summaries.len()) && !summaries.is_empty() {
            let mut placed = placed;
            placed.sort_by(f64::total_cmp);
            return Ok(placed);
        }
        if started.elapsed() > STARTUP_TIMEOUT {
            bail!("{} of {} jobs placed", placed.len(), summaries.len());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Now, in Unix milliseconds.
fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        })
}

/// Every job the coordinator lists.
async fn all_jobs(
    control: &mut JobControlClient<Connection>,
) -> Result<Vec<cohort_proto::v1::JobInfo>> {
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = control
            .list_jobs(ListJobsRequest {
                page_size: 1000,
                page_token,
            })
            .await?
            .into_inner();
        jobs.extend(page.jobs);
        if page.next_page_token.is_empty() {
            return Ok(jobs);
        }
        page_token = page.next_page_token;
    }
}

/// The ids of every job the coordinator lists.
async fn all_job_ids(
    control: &mut JobControlClient<Connection>,
) -> Result<std::collections::HashSet<String>> {
    Ok(all_jobs(control)
        .await?
        .into_iter()
        .map(|job| job.job_id)
        .collect())
}
