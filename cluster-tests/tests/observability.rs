//! Observability through real tools: a real Prometheus server scrapes the coordinator's
//! `/metrics` while a job trains and answers for the job's loss; `promtool` accepts the
//! exposition; a user's token shows only that user's jobs; the job's metric curves outlive it
//! and a coordinator crash.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cohort_cluster_tests::external::{binary_or_skip, http_get};
use cohort_cluster_tests::jobs::mlp_job;
use cohort_cluster_tests::prometheus::TestPrometheus;
use cohort_cluster_tests::sandbox::{DEFAULT_TIMEOUT, Sandbox, SandboxOptions, poll};

/// Longest the training job may take on a slow machine.
const TRAINING_TIMEOUT: Duration = Duration::from_secs(600);

/// `promtool check metrics` on `exposition`: its verdict, or why it refused.
fn promtool_check(promtool: &std::path::Path, exposition: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting promtool")?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(exposition.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "promtool check metrics refused the exposition ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

#[test]
fn prometheus_reads_a_training_jobs_loss_from_the_coordinator() -> Result<()> {
    let test = "prometheus_reads_a_training_jobs_loss";
    let Some(promtool) = binary_or_skip(
        test,
        "PROMTOOL_BIN",
        "/usr/bin/promtool",
        "promtool",
        "prometheus",
    ) else {
        return Ok(());
    };
    let mut cluster = Sandbox::start_with_options(SandboxOptions {
        http: true,
        ..SandboxOptions::default()
    })?;
    let http = cluster
        .http_address()
        .context("the HTTP endpoint")?
        .to_owned();
    let http_address: SocketAddr = http.parse()?;
    let Some(prometheus) = TestPrometheus::start_or_skip(test, &http, cluster.admin_token()) else {
        return Ok(());
    };
    cluster.add_worker("node-a", 1)?;
    cluster.add_worker("node-b", 1)?;
    let job_id = cluster.submit(&mlp_job("watched", 2, 3, None, 0.002, ""), &[])?;

    // Prometheus scrapes every second: the job's loss arrives, for both ranks.
    let query = format!("cohort_rank_loss{{job_id=\"{job_id}\"}}");
    let series = poll(
        "Prometheus to hold the job's loss",
        TRAINING_TIMEOUT,
        || {
            let series = prometheus.query(&query)?;
            Ok((series.len() == 2).then_some(series))
        },
    )?;
    let mut ranks = Vec::new();
    for sample in &series {
        let loss: f64 = sample["value"][1]
            .as_str()
            .context("a sample value")?
            .parse()?;
        assert!(loss.is_finite() && loss > 0.0 && loss < 10.0, "{sample}");
        assert_eq!(sample["metric"]["user"], "admin", "{sample}");
        ranks.push(
            sample["metric"]["rank"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    ranks.sort();
    assert_eq!(ranks, ["0", "1"]);
    eprintln!("Prometheus: {query} = {series:?}");

    // The exposition itself, while the job's series are in it: promtool accepts it.
    let (status, exposition) = http_get(http_address, "/metrics", Some(cluster.admin_token()))?;
    assert_eq!(status, 200, "{exposition}");
    assert!(exposition.contains(&job_id), "{exposition}");
    promtool_check(&promtool, &exposition)?;
    // The ring's bus bandwidth, from the ranks' records of their collectives.
    let bandwidth = poll("the ranks' bus bandwidth", TRAINING_TIMEOUT, || {
        let (_, exposition) = http_get(http_address, "/metrics", Some(cluster.admin_token()))?;
        Ok(exposition
            .lines()
            .find(|line| line.starts_with("cohort_rank_allreduce_bus_bandwidth_bytes_per_second{"))
            .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok()))
    })?;
    eprintln!("bus bandwidth of the ring: {:.3} GB/s", bandwidth / 1e9);
    assert!(bandwidth > 0.0 && bandwidth.is_finite(), "{bandwidth}");

    // Without a token: refused. Another user: the cluster's series, none of this job's.
    let (status, _) = http_get(http_address, "/metrics", None)?;
    assert_eq!(status, 401);
    let added = cluster.cli_ok(&["users", "add", "bob"])?;
    let bob = added
        .split_whitespace()
        .find(|word| word.starts_with("cohort-user-"))
        .context("bob's token")?
        .to_owned();
    let (status, theirs) = http_get(http_address, "/metrics", Some(&bob))?;
    assert_eq!(status, 200, "{theirs}");
    assert!(
        theirs.contains("cohort_jobs{state=\"running\"} 1"),
        "{theirs}"
    );
    assert!(!theirs.contains(&job_id), "{theirs}");

    cluster.wait_for_state(&job_id, "succeeded", TRAINING_TIMEOUT)?;
    // Once it ended, its series leave the exposition.
    poll("the job's series to expire", DEFAULT_TIMEOUT, || {
        let (_, exposition) = http_get(http_address, "/metrics", Some(cluster.admin_token()))?;
        Ok((!exposition.contains(&job_id)).then_some(()))
    })?;

    // Its curves stay: every rank's steps in order up to the last, across a coordinator crash.
    let curves: serde_json::Value =
        serde_json::from_str(&cluster.cli_ok(&["metrics", &job_id, "--output", "json"])?)?;
    let ranks = curves["ranks"].as_array().context("ranks")?;
    assert_eq!(ranks.len(), 2, "{curves}");
    for rank in ranks {
        let steps: Vec<u64> = rank["points"]
            .as_array()
            .context("points")?
            .iter()
            .filter_map(|point| point["step"].as_u64())
            .collect();
        assert!(steps.len() >= 5, "{rank}");
        assert!(steps.windows(2).all(|pair| pair[0] < pair[1]), "{steps:?}");
        assert_eq!(steps.last(), Some(&702), "3 epochs of 234 steps: {steps:?}");
    }
    let csv = cluster.cli_ok(&["metrics", &job_id, "--rank", "1", "--output", "csv"])?;
    assert_eq!(
        csv.lines().count(),
        1 + ranks[1]["points"].as_array().map_or(0, Vec::len),
        "{csv}"
    );
    eprintln!(
        "cohort metrics: {} points for rank 0, {} for rank 1",
        ranks[0]["points"].as_array().map_or(0, Vec::len),
        ranks[1]["points"].as_array().map_or(0, Vec::len)
    );
    cluster.kill_coordinator();
    cluster.restart_coordinator()?;
    let after: serde_json::Value =
        serde_json::from_str(&cluster.cli_ok(&["metrics", &job_id, "--output", "json"])?)?;
    assert_eq!(after, curves);
    Ok(())
}
