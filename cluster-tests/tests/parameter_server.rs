//! Parameter-server training through the real cluster: the coordinator runs a job's shard
//! servers as extra processes of its gang, ranks find them through rendezvous, async and ssp
//! jobs train Fashion-MNIST, a killed server fails the job naming its shard, and a job resumes
//! from a checkpoint holding the servers' snapshots.

use std::time::{Duration, Instant};

use anyhow::Result;
use cohort_cluster_tests::jobs::mlp_job;
use cohort_cluster_tests::sandbox::{DEFAULT_TIMEOUT, Sandbox, poll, process_alive, signal};

/// An MLP job of `ranks` ranks with 2 shards in `mode` (`staleness = 2` for ssp).
fn ps_job(name: &str, mode: &str, ranks: u32, epochs: u32, max_steps: Option<u64>) -> String {
    let staleness = if mode == "ssp" { "staleness = 2" } else { "" };
    let parallel = format!("comm = \"ps\"\nps_shards = 2\nps_mode = \"{mode}\"\n{staleness}");
    mlp_job(name, ranks, epochs, max_steps, 0.001, &parallel)
}

/// Runs one epoch in `mode` and returns rank 0's final test accuracy, checking the job's
/// shape on the way: 4 ranks and 2 servers placed, the servers gone once the ranks are done.
fn train_one_epoch(cluster: &mut Sandbox, mode: &str) -> Result<f64> {
    let job_id = cluster.submit(&ps_job(mode, mode, 4, 1, None), &[])?;
    let pids = cluster.wait_for_running_ranks(&job_id)?;
    assert_eq!(pids.len(), 6, "4 ranks and 2 servers");
    let job = cluster.wait_for_state(&job_id, "succeeded", Duration::from_secs(900))?;
    let metrics = job["metrics"].as_array().unwrap();
    assert_eq!(
        metrics.len(),
        4,
        "the ranks report metrics, the servers do not: {job}"
    );
    for rank in metrics {
        assert_eq!(rank["step"], 234, "60000 / 256 steps on every rank: {job}");
    }
    let accuracy = metrics[0]["eval_accuracy"].as_f64().unwrap();
    eprintln!(
        "{mode}: 4 ranks x 2 shards, 1 epoch: test accuracy {:.2}%",
        accuracy * 100.0
    );
    // The servers are stopped once the ranks are done.
    cluster.wait_for_processes_gone(&pids, DEFAULT_TIMEOUT)?;
    let logs = cluster.cli_ok(&["logs", &job_id, "--rank", "4"])?;
    assert!(logs.contains("parameter server listening"), "{logs}");
    Ok(accuracy)
}

#[test]
fn async_and_ssp_jobs_reach_82_percent_in_one_epoch() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 2)?;
    cluster.add_worker("node-b", 2)?;
    cluster.add_worker("node-c", 2)?;
    for mode in ["async", "ssp"] {
        let accuracy = train_one_epoch(&mut cluster, mode)?;
        assert!(accuracy >= 0.82, "{mode}: test accuracy {accuracy}");
    }
    Ok(())
}

#[test]
fn a_killed_parameter_server_fails_the_job_naming_its_shard() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 2)?;
    cluster.add_worker("node-b", 2)?;
    // No restarts: the job is to fail.
    let job = format!(
        "{}\n[fault_tolerance]\nmax_restarts = 0\n",
        ps_job("victim", "sync", 2, 50, None)
    );
    let job_id = cluster.submit(&job, &[])?;
    let pids = cluster.wait_for_running_ranks(&job_id)?;
    assert_eq!(pids.len(), 4, "2 ranks and 2 servers");
    poll("training steps", DEFAULT_TIMEOUT, || {
        let job = cluster.job(&job_id)?;
        Ok(job["metrics"]
            .as_array()
            .is_some_and(|m| m.iter().any(|r| r["step"].as_u64().unwrap_or(0) > 2))
            .then_some(()))
    })?;
    // Process 3 is the server of shard 1 (servers are numbered after the ranks).
    let killed_at = Instant::now();
    signal(pids[3], libc::SIGKILL);
    cluster.wait_for_state(&job_id, "failed", DEFAULT_TIMEOUT)?;
    eprintln!(
        "job failed {:?} after the server was killed",
        killed_at.elapsed()
    );
    let reason = poll("the reason to name shard 1", Duration::from_secs(5), || {
        let job = cluster.job(&job_id)?;
        let reason = job["reason"].as_str().unwrap_or_default().to_owned();
        Ok(reason
            .starts_with("parameter server shard 1 (process 3) on node ")
            .then_some(reason))
    })?;
    assert!(reason.contains("signal 9"), "{reason}");
    cluster.wait_for_processes_gone(&pids, DEFAULT_TIMEOUT)?;
    assert!(pids.iter().all(|&pid| !process_alive(pid)));
    Ok(())
}

#[test]
fn a_parameter_server_job_resumes_with_its_servers_state() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 2)?;
    cluster.add_worker("node-b", 2)?;
    let first = cluster.submit(&ps_job("first", "sync", 2, 1, Some(20)), &[])?;
    cluster.wait_for_state(&first, "succeeded", DEFAULT_TIMEOUT)?;
    let logs = cluster.cli_ok(&["logs", &first, "--rank", "0"])?;
    let checkpoint = logs
        .lines()
        .find_map(|line| line.split("final checkpoint: ").nth(1))
        .unwrap_or_else(|| panic!("no checkpoint in:\n{logs}"))
        .trim()
        .to_owned();
    for shard in 0..2 {
        let snapshot = std::path::Path::new(&checkpoint)
            .join(format!("parameter-server-shard-{shard}.safetensors"));
        assert!(snapshot.is_file(), "{} is missing", snapshot.display());
    }

    let second = cluster.submit(
        &ps_job("second", "sync", 2, 1, Some(30)),
        &["--resume-from", &checkpoint],
    )?;
    let job = cluster.wait_for_state(&second, "succeeded", DEFAULT_TIMEOUT)?;
    assert_eq!(job["metrics"][0]["step"], 30, "{job}");
    let server_logs = cluster.cli_ok(&["logs", &second, "--rank", "2"])?;
    assert!(server_logs.contains("restoring the shard"), "{server_logs}");
    // The servers' clocks put the ranks at step 20: they ran steps 21 to 30 only.
    let logs = cluster.cli_ok(&["logs", &second, "--rank", "0"])?;
    assert!(
        logs.contains("start_step=20"),
        "did not resume at step 20:\n{logs}"
    );
    Ok(())
}
