//! Hang diagnosis through the real cluster: a rank made to hang before all-reduce #50 is named
//! as never having entered it, with its node and pid, within the hang timeout and a few
//! seconds; a rank that entered it and stalls is named as stuck, not missing, and the hang
//! restarts the job, whose next attempt succeeds.

use std::time::Duration;

use anyhow::{Context, Result};
use cohort_cluster_tests::jobs::mlp_job;
use cohort_cluster_tests::sandbox::Sandbox;
use cohort_proto::env::FAULT_HANG;
use serde_json::Value;

/// The hang timeout the jobs ask for.
const HANG_TIMEOUT_S: f64 = 5.0;
/// Longest a job of these tests may take on a slow machine.
const JOB_TIMEOUT: Duration = Duration::from_secs(600);

/// Four one-slot workers whose ranks hang as `fault` says (`COHORT_FAULT_HANG`).
fn cluster_with_fault(fault: &str) -> Result<Sandbox> {
    let mut cluster = Sandbox::start()?;
    cluster.set_worker_env(FAULT_HANG, fault);
    for node in ["node-a", "node-b", "node-c", "node-d"] {
        cluster.add_worker(node, 1)?;
    }
    Ok(cluster)
}

/// The demo MLP on 4 ranks for at most `steps` steps, hang timeout [`HANG_TIMEOUT_S`],
/// `restarts` restarts, ranks stopped within a second.
fn hanging_job(name: &str, steps: u64, restarts: u32) -> String {
    let sections = format!(
        "\n[checkpoint]\nstop_grace_s = 1.0\n[fault_tolerance]\nhang_timeout_s = \
         {HANG_TIMEOUT_S}\nmax_restarts = {restarts}\n"
    );
    mlp_job(name, 4, 1, Some(steps), 0.002, &sections)
}

/// `rank N (node X, pid P` as the diagnosis names rank `rank` of `job`'s placement.
fn named(job: &Value, rank: usize) -> String {
    let placed = &job["placement"][rank];
    format!(
        "rank {rank} (node {}, pid {}",
        placed["node_id"].as_str().unwrap_or_default(),
        placed["pid"]
    )
}

/// The seconds the diagnosis says the stuck ranks waited (`... (for 5.3 s)`).
fn waited_s(reason: &str) -> Result<f64> {
    let start = reason.rfind("(for ").context("no wait in the reason")? + "(for ".len();
    let end = start + reason[start..].find(" s)").context("no unit")?;
    Ok(reason[start..end].parse()?)
}

#[test]
fn a_rank_that_never_enters_all_reduce_50_is_named_within_the_timeout() -> Result<()> {
    let mut cluster = cluster_with_fault("2:before:50")?;
    let job_id = cluster.submit(&hanging_job("missing", 200, 0), &[])?;
    let job = cluster.wait_for_state(&job_id, "failed", JOB_TIMEOUT)?;
    let reason = job["reason"].as_str().unwrap_or_default();
    eprintln!("reason: {reason}");
    assert!(reason.starts_with("communication hang"), "{reason}");
    assert!(reason.contains("#50 on data-parallel"), "{reason}");
    let missing = format!("never entered by {}, last completed #49)", named(&job, 2));
    assert!(reason.contains(&missing), "{missing:?} not in {reason}");
    let stuck = format!(
        "entered and stuck in {}), {}), {})",
        named(&job, 0),
        named(&job, 1),
        named(&job, 3)
    );
    assert!(reason.contains(&stuck), "{stuck:?} not in {reason}");
    // From the moment the others entered #50 to the diagnosis.
    let delay = waited_s(reason)?;
    eprintln!("hang named {delay:.1} s after the ranks entered all-reduce #50");
    assert!(
        (HANG_TIMEOUT_S..=HANG_TIMEOUT_S + 5.0).contains(&delay),
        "named after {delay} s"
    );
    Ok(())
}

#[test]
fn a_rank_stalled_inside_a_collective_is_stuck_and_the_hang_restarts_the_job() -> Result<()> {
    let mut cluster = cluster_with_fault("2:in:50")?;
    let job_id = cluster.submit(&hanging_job("stalled", 80, 1), &[])?;
    let job = cluster.wait_for_state(&job_id, "succeeded", JOB_TIMEOUT)?;
    let attempts = job["attempts"].as_array().context("no attempts")?;
    assert_eq!(attempts.len(), 2, "{job}");
    let reason = attempts[0]["reason"].as_str().unwrap_or_default();
    eprintln!("first attempt: {reason}");
    assert!(reason.starts_with("communication hang"), "{reason}");
    assert!(
        reason.contains("#50 on data-parallel") && reason.contains("entered by every member"),
        "{reason}"
    );
    assert!(reason.contains("rank 2 (node "), "{reason}");
    assert!(!reason.contains("never entered"), "{reason}");
    let delay = waited_s(reason)?;
    assert!(delay <= HANG_TIMEOUT_S + 5.0, "named after {delay} s");
    Ok(())
}
