//! Faults injected on purpose: a worker killed with SIGKILL, the coordinator killed and
//! restarted on its data (embedded store and a real etcd).

use std::time::{Duration, Instant};

use anyhow::Result;
use cohort_cluster_tests::etcd::TestEtcd;
use cohort_cluster_tests::sandbox::{DEFAULT_TIMEOUT, Sandbox, Store, shell_job};

fn sleeper(name: &str, ranks: u32) -> String {
    shell_job(name, ranks, "exec sleep 600")
}

fn one_shot(name: &str, exit_code: u32) -> String {
    shell_job(name, 1, &format!("echo finishing; exit {exit_code}"))
}

#[test]
fn a_killed_worker_is_marked_lost_and_fails_its_job() -> Result<()> {
    let deadline_s = 2.0;
    let mut cluster = Sandbox::start_with(Store::Embedded, deadline_s)?;
    cluster.add_worker("node-a", 1)?;
    cluster.add_worker("node-b", 1)?;
    let job_id = cluster.submit(&sleeper("victim", 2), &[])?;
    let pids = cluster.wait_for_running_ranks(&job_id)?;

    let killed_at = Instant::now();
    cluster.kill_worker("node-b")?;
    cluster.wait_for_node("node-b", "lost", DEFAULT_TIMEOUT)?;
    let lost_after = killed_at.elapsed();
    eprintln!("node marked lost {lost_after:?} after the kill (deadline {deadline_s} s)");
    // The deadline, plus one scheduler tick and the time to look.
    assert!(
        lost_after < Duration::from_secs_f64(deadline_s + 1.5),
        "node marked lost {lost_after:?} after the kill"
    );
    let job = cluster.wait_for_state(&job_id, "failed", DEFAULT_TIMEOUT)?;
    let reason = job["reason"].as_str().unwrap();
    assert!(reason.contains("node node-b lost"), "{reason}");
    // The survivor on node-a is stopped; the rank on node-b died with its worker.
    cluster.wait_for_processes_gone(&pids, DEFAULT_TIMEOUT)?;

    // The worker comes back under the same id and runs work again.
    cluster.add_worker("node-b", 1)?;
    let again = cluster.submit(&one_shot("after", 0), &[])?;
    cluster.wait_for_state(&again, "succeeded", DEFAULT_TIMEOUT)?;
    Ok(())
}

/// Finished jobs keep their final state across a coordinator crash; a running job whose ranks
/// re-report in time keeps running; one whose worker died with the coordinator fails with
/// "coordinator restarted".
fn restart_keeps_job_records(store: Store) -> Result<()> {
    let mut cluster = Sandbox::start_with(store, 3.0)?;
    cluster.add_worker("steady", 2)?;
    cluster.add_worker("doomed", 1)?;
    let succeeded = cluster.submit(&one_shot("good", 0), &[])?;
    cluster.wait_for_state(&succeeded, "succeeded", DEFAULT_TIMEOUT)?;
    let failed = cluster.submit(&one_shot("bad", 7), &[])?;
    cluster.wait_for_state(&failed, "failed", DEFAULT_TIMEOUT)?;
    // Fill "steady" first so the next job lands on "doomed".
    let survivor = cluster.submit(&sleeper("survivor", 2), &[])?;
    let survivor_pids = cluster.wait_for_running_ranks(&survivor)?;
    let orphan = cluster.submit(&sleeper("orphan", 1), &[])?;
    cluster.wait_for_running_ranks(&orphan)?;
    let orphan_job = cluster.job(&orphan)?;
    assert_eq!(
        orphan_job["placement"][0]["node_id"], "doomed",
        "{orphan_job}"
    );

    cluster.kill_coordinator();
    cluster.kill_worker("doomed")?;
    cluster.restart_coordinator()?;

    let jobs = cluster.jobs()?;
    let state_of = |id: &str| {
        jobs.iter()
            .find(|job| job["job_id"] == id)
            .map(|job| job["state"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(state_of(&succeeded).as_deref(), Some("succeeded"));
    assert_eq!(state_of(&failed).as_deref(), Some("failed"));
    let failed_job = cluster.job(&failed)?;
    assert!(
        failed_job["reason"].as_str().unwrap().contains("code 7"),
        "{failed_job}"
    );

    let orphan_job = cluster.wait_for_state(&orphan, "failed", DEFAULT_TIMEOUT)?;
    assert_eq!(orphan_job["reason"], "coordinator restarted");
    // The survivor's worker re-registered and re-reported both ranks: still running, same pids.
    cluster.wait_for_node("steady", "ready", DEFAULT_TIMEOUT)?;
    let survivor_job = cluster.job(&survivor)?;
    assert_eq!(survivor_job["state"], "running", "{survivor_job}");
    assert_eq!(cluster.rank_pids(&survivor)?, survivor_pids);
    let output = cluster.cli_ok(&["cancel", &survivor])?;
    assert!(output.contains("cancelled"), "{output}");
    Ok(())
}

#[test]
fn coordinator_restart_keeps_jobs_with_the_embedded_store() -> Result<()> {
    restart_keeps_job_records(Store::Embedded)
}

#[test]
fn coordinator_restart_keeps_jobs_with_etcd() -> Result<()> {
    let Some(etcd) = TestEtcd::start_or_skip("coordinator_restart_keeps_jobs_with_etcd") else {
        return Ok(());
    };
    restart_keeps_job_records(Store::Etcd(etcd.endpoint()))
}

#[test]
fn a_worker_that_loses_the_coordinator_stops_its_ranks() -> Result<()> {
    let deadline_s = 2.0;
    let mut cluster = Sandbox::start_with(Store::Embedded, deadline_s)?;
    cluster.add_worker("node-a", 2)?;
    let job_id = cluster.submit(&sleeper("stranded", 2), &[])?;
    let pids = cluster.wait_for_running_ranks(&job_id)?;
    let killed_at = Instant::now();
    cluster.kill_coordinator();
    cluster.wait_for_processes_gone(&pids, DEFAULT_TIMEOUT)?;
    let gone_after = killed_at.elapsed();
    // Deadline, then SIGTERM (sleep exits at once), plus a retry interval of slack.
    assert!(
        gone_after >= Duration::from_secs_f64(deadline_s) - Duration::from_millis(200),
        "ranks stopped {gone_after:?} after the coordinator died, before the deadline"
    );
    assert!(
        gone_after < Duration::from_secs_f64(deadline_s + 4.0),
        "{gone_after:?}"
    );
    assert!(
        cluster
            .worker("node-a")
            .is_some_and(|w| cohort_cluster_tests::sandbox::process_alive(w.pid()))
    );
    Ok(())
}

#[test]
fn a_worker_shut_down_cleanly_reports_its_stopped_ranks_at_once() -> Result<()> {
    // A long deadline: the job must fail from the worker's last report, not from node loss.
    let mut cluster = Sandbox::start_with(Store::Embedded, 30.0)?;
    cluster.add_worker("node-a", 1)?;
    cluster.add_worker("node-b", 1)?;
    let job_id = cluster.submit(&sleeper("drained", 2), &[])?;
    let pids = cluster.wait_for_running_ranks(&job_id)?;
    let stopped_at = Instant::now();
    cluster.terminate_worker("node-b")?;
    let job = cluster.wait_for_state(&job_id, "failed", DEFAULT_TIMEOUT)?;
    assert!(
        stopped_at.elapsed() < Duration::from_secs(10),
        "{:?}",
        stopped_at.elapsed()
    );
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains("node node-b left") && reason.contains("worker was shut down"),
        "the reason must name the node that left, not a signal: {reason}"
    );
    cluster.wait_for_processes_gone(&pids, DEFAULT_TIMEOUT)?;
    // The node left: nothing is scheduled on it, long before its heartbeat deadline.
    cluster.wait_for_node("node-b", "left", Duration::from_secs(5))?;
    Ok(())
}

#[test]
fn a_worker_that_lost_the_coordinator_is_named_as_the_cause() -> Result<()> {
    let deadline_s = 2.0;
    let mut cluster = Sandbox::start_with(Store::Embedded, deadline_s)?;
    cluster.add_worker("node-a", 1)?;
    let job_id = cluster.submit(&sleeper("stranded", 1), &[])?;
    let pids = cluster.wait_for_running_ranks(&job_id)?;
    cluster.kill_coordinator();
    cluster.wait_for_processes_gone(&pids, DEFAULT_TIMEOUT)?;
    // The worker stopped its rank on its own; back up, the coordinator hears why.
    cluster.restart_coordinator()?;
    let job = cluster.wait_for_state(&job_id, "failed", DEFAULT_TIMEOUT)?;
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains("node node-a lost the coordinator"),
        "the reason must name the lost coordinator, not a signal: {reason}"
    );
    Ok(())
}

#[test]
fn a_rank_killed_by_something_else_is_told_apart_from_one_cohort_stopped() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 2)?;
    let job_id = cluster.submit(&sleeper("oom", 2), &[])?;
    let pids = cluster.wait_for_running_ranks(&job_id)?;
    // Something other than Cohort (the OOM killer, an operator) kills rank 1.
    cohort_cluster_tests::sandbox::signal(pids[1], libc::SIGKILL);
    let job = cluster.wait_for_state(&job_id, "failed", DEFAULT_TIMEOUT)?;
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains("rank 1") && reason.contains("signal 9 (SIGKILL), not by cohort"),
        "{reason}"
    );
    // Rank 0 was stopped by Cohort because of it, and says so.
    let job = poll_rank_detail(&cluster, &job_id, 0)?;
    let detail = job.as_str().unwrap_or_default();
    assert!(detail.contains("stopped by cohort"), "{detail}");
    Ok(())
}

/// Polls until rank `rank` of the job has a detail; returns it.
fn poll_rank_detail(cluster: &Sandbox, job_id: &str, rank: usize) -> Result<serde_json::Value> {
    cohort_cluster_tests::sandbox::poll("the rank's detail", DEFAULT_TIMEOUT, || {
        let job = cluster.job(job_id)?;
        let detail = job["placement"][rank]["detail"].clone();
        Ok(detail
            .as_str()
            .is_some_and(|text| !text.is_empty())
            .then_some(detail))
    })
}
