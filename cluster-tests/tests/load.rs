//! A busy cluster's coordinator keeps nothing per finished job but its summary: 5,000 short
//! jobs under an open-file limit of 256 leave its open files and memory where they were, and
//! every job's log stays readable.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cohort_cluster_tests::sandbox::{Sandbox, SandboxOptions, poll, shell_job};
use cohort_proto::v1::job_control_client::JobControlClient;
use cohort_proto::v1::{JobState, ListJobsRequest, StreamLogsRequest, SubmitJobRequest};

/// Jobs run by the test (`COHORT_LOAD_JOBS` overrides, for a quick look).
fn job_count() -> usize {
    std::env::var("COHORT_LOAD_JOBS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(5_000)
}
/// Jobs run before the baseline is taken, so that pools and caches have grown to their size.
const WARM_UP_JOBS: usize = 200;
/// Jobs submitted before waiting for them to finish.
const BATCH: usize = 250;
/// Open files the coordinator may hold beyond its baseline once idle.
const FD_MARGIN: usize = 8;
/// Memory the coordinator may hold beyond its baseline once idle: 5,000 job summaries take
/// about 1.5 MB; the rest is allocator slack.
const RSS_MARGIN_BYTES: u64 = 16 * 1024 * 1024;

/// Open files of a process.
fn open_files(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Resident memory of a process, in bytes.
fn resident_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .context("VmRSS in /proc/PID/status")?;
    Ok(kib * 1024)
}

/// Every job's id and state, through the paged listing.
async fn states(
    client: &mut JobControlClient<cohort_proto::transport::Connection>,
) -> Result<Vec<(String, JobState)>> {
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_jobs(ListJobsRequest {
                page_size: 1000,
                page_token,
            })
            .await?
            .into_inner();
        jobs.extend(
            page.jobs
                .iter()
                .map(|job| (job.job_id.clone(), job.state())),
        );
        if page.next_page_token.is_empty() {
            return Ok(jobs);
        }
        page_token = page.next_page_token;
    }
}

/// Submits `count` jobs in batches and waits for each batch to succeed; returns their ids.
async fn run_jobs(
    client: &mut JobControlClient<cohort_proto::transport::Connection>,
    count: usize,
) -> Result<Vec<String>> {
    let mut ids = Vec::with_capacity(count);
    for batch in (0..count).collect::<Vec<_>>().chunks(BATCH) {
        let mut pending = HashSet::new();
        for _ in batch {
            let job = client
                .submit_job(SubmitJobRequest {
                    spec_toml: shell_job("short", 1, "echo \"job $COHORT_JOB_ID rank $RANK\""),
                    wait_for_resources: false,
                    resume_from: String::new(),
                })
                .await?
                .into_inner()
                .job
                .context("submitted job")?;
            pending.insert(job.job_id.clone());
            ids.push(job.job_id);
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        while !pending.is_empty() {
            for (id, state) in states(client).await? {
                match state {
                    JobState::Succeeded => {
                        pending.remove(&id);
                    }
                    JobState::Failed | JobState::Cancelled if pending.contains(&id) => {
                        bail!("job {id} ended {state:?}")
                    }
                    _ => {}
                }
            }
            if Instant::now() > deadline {
                bail!("{} jobs still unfinished after 300 s", pending.len());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(ids)
}

/// Waits until the coordinator's open files are back within the margin of `baseline` (the
/// last connections and log reads close), then returns its open files and memory.
fn idle_figures(pid: u32, baseline_files: usize) -> Result<(usize, u64)> {
    let files = poll(
        "the coordinator's open files to settle",
        Duration::from_secs(30),
        || {
            let files = open_files(pid)?;
            Ok((files <= baseline_files + FD_MARGIN).then_some(files))
        },
    )
    .or_else(|_| open_files(pid))?;
    Ok((files, resident_bytes(pid)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_jobs_leave_no_open_files_or_memory_behind() -> Result<()> {
    let jobs = job_count();
    let cluster = tokio::task::spawn_blocking(|| -> Result<Sandbox> {
        let mut cluster = Sandbox::start_with_options(SandboxOptions {
            coordinator_open_files: Some(256),
            ..SandboxOptions::default()
        })?;
        cluster.add_worker("node-a", 4)?;
        cluster.add_worker("node-b", 4)?;
        Ok(cluster)
    })
    .await??;
    let pid = cluster.coordinator_pid().context("the coordinator runs")?;
    let channel =
        cohort_cluster_tests::sandbox::connect_as(cluster.address(), Some(cluster.admin_token()))
            .await?;
    let mut client = JobControlClient::new(channel.clone());

    let mut ids = run_jobs(&mut client, WARM_UP_JOBS).await?;
    let (baseline_files, baseline_rss) = idle_figures(pid, open_files(pid)?)?;
    let started = Instant::now();
    ids.extend(run_jobs(&mut client, jobs.saturating_sub(WARM_UP_JOBS)).await?);
    let elapsed = started.elapsed();
    let (files, rss) = idle_figures(pid, baseline_files)?;
    eprintln!(
        "{} jobs in {:.1} s ({:.0} jobs/s); idle coordinator: {baseline_files} -> {files} open files, \
         {:.1} -> {:.1} MB resident",
        ids.len(),
        elapsed.as_secs_f64(),
        (ids.len() - WARM_UP_JOBS) as f64 / elapsed.as_secs_f64(),
        baseline_rss as f64 / 1e6,
        rss as f64 / 1e6
    );
    assert!(
        files <= baseline_files + FD_MARGIN,
        "open files grew from {baseline_files} to {files}"
    );
    assert!(
        rss <= baseline_rss + RSS_MARGIN_BYTES,
        "resident memory grew from {baseline_rss} to {rss} bytes"
    );

    // Every job's log is readable, with its one line.
    let reads = ids.chunks(ids.len().div_ceil(8)).map(|chunk| {
        let mut client = JobControlClient::new(channel.clone());
        let chunk = chunk.to_vec();
        tokio::spawn(async move {
            for id in chunk {
                let mut stream = client
                    .stream_logs(StreamLogsRequest {
                        job_id: id.clone(),
                        follow: false,
                        rank: None,
                    })
                    .await?
                    .into_inner();
                let mut text = String::new();
                while let Some(line) = stream.message().await? {
                    text.push_str(&line.text);
                }
                if !text.contains(&format!("job {id} rank 0")) {
                    bail!("log of {id} lacks its line: {text:?}");
                }
            }
            Ok(())
        })
    });
    for read in futures_join(reads).await {
        read??;
    }
    let (files_after_reads, _) = idle_figures(pid, baseline_files)?;
    assert!(
        files_after_reads <= baseline_files + FD_MARGIN,
        "reading every log left {files_after_reads} files open (baseline {baseline_files})"
    );
    drop(cluster);
    Ok(())
}

/// Awaits every task, in order.
async fn futures_join<T>(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut results = Vec::new();
    for task in tasks.collect::<Vec<_>>() {
        results.push(task.await);
    }
    results
}
