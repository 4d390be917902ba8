//! Ranks on one node exchange gradients through shared memory (`parallel.transport`): the
//! ranks really map the segment, a job leaves nothing behind in `/dev/shm`, and a rank
//! SIGKILLed mid-training is named while its peer fails instead of hanging.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::Result;
use cohort_cluster_tests::jobs::mlp_job;
use cohort_cluster_tests::sandbox::{DEFAULT_TIMEOUT, Sandbox, poll, signal};
use cohort_collective::shm::MEMFD_NAME;

/// The names in `/dev/shm` that could be Cohort's (other software on the machine, such as Open
/// MPI, may create its own there meanwhile).
fn dev_shm() -> BTreeSet<String> {
    std::fs::read_dir("/dev/shm")
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok())
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.contains("cohort"))
                .collect()
        })
        .unwrap_or_default()
}

/// Process `pid`'s memory map (empty once it is gone).
fn maps(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default()
}

/// Whether process `pid` maps a shared-memory group's segment.
fn maps_a_segment(pid: u32) -> bool {
    maps(pid).contains(&format!("memfd:{MEMFD_NAME}"))
}

/// Waits until the job's ranks have reported a step past 2 (they exchange gradients) and
/// every one of `pids` maps the segment.
fn wait_for_shared_training(cluster: &Sandbox, job_id: &str, pids: &[u32]) -> Result<()> {
    poll(
        "ranks training through shared memory",
        DEFAULT_TIMEOUT,
        || {
            let job = cluster.job(job_id)?;
            let stepped = job["metrics"]
                .as_array()
                .is_some_and(|m| m.iter().any(|r| r["step"].as_u64().unwrap_or(0) > 2));
            Ok((stepped && pids.iter().all(|&pid| maps_a_segment(pid))).then_some(()))
        },
    )?;
    // The segment is anonymous: no rank maps anything under /dev/shm.
    for &pid in pids {
        let maps = maps(pid);
        assert!(!maps.contains("/dev/shm/"), "rank process {pid}: {maps}");
    }
    Ok(())
}

#[test]
fn ranks_on_one_node_train_through_shared_memory_and_leave_nothing_behind() -> Result<()> {
    let before = dev_shm();
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 2)?;
    let job = mlp_job("shm", 2, 1, Some(120), 0.002, "transport = \"shm\"");
    let job_id = cluster.submit(&job, &[])?;
    let pids = cluster.wait_for_running_ranks(&job_id)?;
    wait_for_shared_training(&cluster, &job_id, &pids)?;
    let job = cluster.wait_for_state(&job_id, "succeeded", DEFAULT_TIMEOUT)?;
    let metrics = job["metrics"].as_array().unwrap();
    assert_eq!(metrics.len(), 2, "{job}");
    assert_eq!(
        metrics[0]["eval_accuracy"], metrics[1]["eval_accuracy"],
        "{job}"
    );
    cluster.wait_for_processes_gone(&pids, DEFAULT_TIMEOUT)?;
    assert_eq!(dev_shm(), before, "/dev/shm changed");
    Ok(())
}

#[test]
fn a_rank_killed_while_sharing_memory_is_named_and_its_peer_does_not_hang() -> Result<()> {
    let before = dev_shm();
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 2)?;
    // The default transport: shared memory, since both ranks are on node-a.
    let job = mlp_job(
        "shm-kill",
        2,
        50,
        None,
        0.002,
        "\n[fault_tolerance]\nmax_restarts = 0\n",
    );
    let job_id = cluster.submit(&job, &[])?;
    let pids = cluster.wait_for_running_ranks(&job_id)?;
    wait_for_shared_training(&cluster, &job_id, &pids)?;
    let killed_at = Instant::now();
    signal(pids[1], libc::SIGKILL);
    let job = cluster.wait_for_state(&job_id, "failed", DEFAULT_TIMEOUT)?;
    let failed_after = killed_at.elapsed();
    eprintln!("job failed {failed_after:?} after rank 1 was killed (as observed by polling)");
    assert!(failed_after < Duration::from_secs(5), "{failed_after:?}");
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("rank 1 ") && reason.contains("signal 9"),
        "{reason}"
    );
    cluster.wait_for_processes_gone(&pids, DEFAULT_TIMEOUT)?;
    // Rank 0 noticed its peer's death in the collective and named it.
    let logs = cluster.cli_ok(&["logs", &job_id, "--rank", "0"])?;
    assert!(logs.contains("peer rank 1 disconnected"), "{logs}");
    // The segment had no name, and died with the ranks that mapped it.
    assert_eq!(dev_shm(), before, "/dev/shm changed");
    assert!(pids.iter().all(|&pid| !maps_a_segment(pid)));
    Ok(())
}
