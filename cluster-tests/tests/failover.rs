//! Coordinator high availability on a real etcd: a group of coordinators, one leading, the
//! others standing by; the leader killed while a job trains, and a leader paused past its
//! lease and then resumed.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use cohort_cluster_tests::etcd::TestEtcd;
use cohort_cluster_tests::jobs::mlp_job;
use cohort_cluster_tests::sandbox::{
    DEFAULT_TIMEOUT, Sandbox, SandboxOptions, Store, poll, shell_job,
};
use serde_json::Value;

/// Longest the 2-rank training job may take on a slow machine.
const TRAINING_TIMEOUT: Duration = Duration::from_secs(600);

/// Most a failover may take, from the leader's death to the first answered `cohort status`.
const FAILOVER_BOUND: Duration = Duration::from_secs(5);

/// A sandbox of `coordinators` coordinators sharing one etcd, each worker started after them
/// (so that it is given every coordinator's address).
fn group(etcd: &TestEtcd, coordinators: usize) -> Result<Sandbox> {
    let mut cluster = Sandbox::start_with_options(SandboxOptions {
        store: Store::Etcd(etcd.endpoint()),
        ..SandboxOptions::default()
    })?;
    for _ in 1..coordinators {
        cluster.add_coordinator()?;
    }
    Ok(cluster)
}

/// Every job's id and state, as `cohort status` lists them.
fn job_states(cluster: &Sandbox) -> Result<Vec<(String, String)>> {
    let mut states: Vec<(String, String)> = cluster
        .jobs()?
        .iter()
        .map(|job| {
            (
                job["job_id"].as_str().unwrap_or_default().to_owned(),
                job["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    states.sort();
    Ok(states)
}

/// The highest step any rank of the job has reported.
fn reported_step(job: &Value) -> u64 {
    job["metrics"]
        .as_array()
        .and_then(|ranks| ranks.iter().filter_map(|rank| rank["step"].as_u64()).max())
        .unwrap_or(0)
}

#[test]
fn a_standby_takes_over_from_a_killed_leader_and_the_training_job_never_notices() -> Result<()> {
    let Some(etcd) = TestEtcd::start_or_skip("a_standby_takes_over_from_a_killed_leader") else {
        return Ok(());
    };
    let mut cluster = group(&etcd, 3)?;
    assert_eq!(cluster.leader(), Some(0), "the first coordinator leads");
    cluster.add_worker("node-a", 1)?;
    cluster.add_worker("node-b", 1)?;
    // Records of every kind that must survive: finished jobs, and the one that trains.
    let finished = cluster.submit(&shell_job("done", 1, "echo done"), &[])?;
    cluster.wait_for_state(&finished, "succeeded", DEFAULT_TIMEOUT)?;
    let failed = cluster.submit(&shell_job("broken", 1, "exit 3"), &[])?;
    cluster.wait_for_state(&failed, "failed", DEFAULT_TIMEOUT)?;
    // Three epochs (702 steps): it trains well past the failover.
    let training = cluster.submit(&mlp_job("ha-mlp", 2, 3, None, 0.002, ""), &[])?;
    let pids = cluster.wait_for_running_ranks(&training)?;
    poll("the job to train a few steps", TRAINING_TIMEOUT, || {
        Ok((reported_step(&cluster.job(&training)?) >= 20).then_some(()))
    })?;
    let before = job_states(&cluster)?;
    let step_at_kill = reported_step(&cluster.job(&training)?);

    let killed_at = Instant::now();
    cluster.kill_coordinator_at(0);
    let served_after = poll("a new leader to answer", DEFAULT_TIMEOUT, || {
        Ok(cluster
            .cli(&["status"])
            .ok()
            .filter(|output| output.status.success())
            .map(|_| killed_at.elapsed()))
    })?;
    let leader = cluster.leader();
    eprintln!(
        "failover: the first `cohort status` answered {served_after:?} after the leader's \
         SIGKILL; coordinator {leader:?} leads"
    );
    assert!(matches!(leader, Some(1 | 2)), "{leader:?}");
    assert!(
        served_after < FAILOVER_BOUND,
        "a new leader served {served_after:?} after the kill"
    );
    // No record lost: every job is there, in the state it had.
    assert_eq!(job_states(&cluster)?, before);

    // The workers followed the new leader and it adopted the running ranks: same processes.
    cluster.wait_for_node("node-a", "ready", DEFAULT_TIMEOUT)?;
    cluster.wait_for_node("node-b", "ready", DEFAULT_TIMEOUT)?;
    assert_eq!(cluster.rank_pids(&training)?, pids);
    // Its ranks report their progress to the new leader.
    poll("steps reported to the new leader", TRAINING_TIMEOUT, || {
        Ok((reported_step(&cluster.job(&training)?) > step_at_kill).then_some(()))
    })?;
    let job = cluster.wait_for_state(&training, "succeeded", TRAINING_TIMEOUT)?;
    assert_eq!(job["restarts"], 0, "{job}");
    eprintln!(
        "the job trained through the failover to {:.2}% test accuracy",
        job["metrics"][0]["eval_accuracy"].as_f64().unwrap_or(0.0) * 100.0
    );
    assert!(
        job["metrics"][0]["eval_accuracy"].as_f64().unwrap_or(0.0) > 0.8,
        "{job}"
    );
    Ok(())
}

#[test]
fn a_leader_paused_past_its_lease_writes_nothing_when_it_resumes() -> Result<()> {
    let Some(etcd) = TestEtcd::start_or_skip("a_leader_paused_past_its_lease") else {
        return Ok(());
    };
    let mut cluster = group(&etcd, 2)?;
    cluster.add_worker("node-a", 2)?;
    let job = cluster.submit(&shell_job("sleeper", 2, "exec sleep 600"), &[])?;
    let pids = cluster.wait_for_running_ranks(&job)?;

    cluster.pause_coordinator(0)?;
    let result = (|| {
        poll("the standby to take over", DEFAULT_TIMEOUT, || {
            Ok(cluster.leads(1).then_some(()))
        })?;
        cluster.wait_for_node("node-a", "ready", DEFAULT_TIMEOUT)?;
        anyhow::Ok(())
    })();
    // Resume it whatever happened, so that it can be killed and reaped.
    cluster.resume_coordinator(0)?;
    result?;
    // Its state is the one from before the pause: its node silent for many heartbeat
    // deadlines, its job's ranks unreported. Whatever it tries to write about them (the node
    // lost, the job failed) is refused by etcd, and it stops.
    let exit = poll("the resumed leader to stop", DEFAULT_TIMEOUT, || {
        Ok(cluster.coordinator(0).and_then(|daemon| daemon.exited()))
    })?;
    let log = cluster
        .coordinator(0)
        .map(|daemon| daemon.log())
        .unwrap_or_default();
    assert!(!exit.success(), "{exit}");
    assert!(log.contains("lost the leadership"), "{log}");
    for line in log
        .lines()
        .filter(|line| line.contains("leadership") || line.contains("refused"))
    {
        eprintln!("resumed leader: {line}");
    }
    // The new leader's state stands: the node ready, the job running on the same processes.
    let node = cluster.wait_for_node("node-a", "ready", DEFAULT_TIMEOUT)?;
    assert_eq!(node["status"], "ready");
    let record = cluster.job(&job)?;
    if record["state"] != "running" {
        bail!("the job changed while the old leader resumed: {record}");
    }
    assert_eq!(cluster.rank_pids(&job)?, pids);
    let output = cluster.cli_ok(&["cancel", &job])?;
    assert!(output.contains("cancelled"), "{output}");
    Ok(())
}
