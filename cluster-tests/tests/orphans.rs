//! No orphans: a worker killed with SIGKILL takes its ranks' main processes along (the
//! parent-death signal), but not the processes they started (a shell's background jobs,
//! DataLoader workers). The worker restarted under the same node id and state directory kills
//! those before it offers the node's devices again, and reports the rank.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use cohort_cluster_tests::sandbox::{
    DEFAULT_TIMEOUT, Sandbox, Store, poll, process_alive, shell_job, signal,
};

/// SIGKILLs, when dropped, the processes of a job that are still alive, so a failing test
/// leaves nothing running. Only processes this test's cluster started are listed, and each is
/// checked again (by its environment) right before the signal, against a reused pid.
struct KillOnDrop {
    /// The processes.
    pids: Vec<u32>,
    /// `NAME=value` entries every listed process's environment holds.
    environment: Vec<String>,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let still_ours =
            cohort_cluster_tests::sandbox::processes_with_environment(&self.environment);
        for pid in self.pids.iter().filter(|pid| still_ours.contains(pid)) {
            signal(*pid, libc::SIGKILL);
        }
    }
}

/// The rank records in a worker's state directory.
fn rank_records(cluster: &Sandbox, node_id: &str) -> Result<Vec<String>> {
    Ok(std::fs::read_dir(cluster.state_dir(node_id))?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str().map(str::to_owned))
        .filter(|name| name.ends_with(".rank"))
        .collect())
}

#[test]
fn a_restarted_worker_kills_what_its_killed_predecessor_left_before_offering_devices() -> Result<()>
{
    // A long deadline: the node is never marked lost here, so only the restarted worker's
    // report of the rank can fail the job.
    let mut cluster = Sandbox::start_with(Store::Embedded, 30.0)?;
    cluster.add_worker("node-a", 1)?;
    let script = "sleep 600 & sleep 600 & echo started; wait";
    let job_id = cluster.submit(&shell_job("orphans", 1, script), &[])?;
    let rank_pids = cluster.wait_for_running_ranks(&job_id)?;
    let processes = poll("the rank and its two children", DEFAULT_TIMEOUT, || {
        let found = cluster.processes_of_job(&job_id);
        Ok((found.len() >= 3).then_some(found))
    })?;
    let _cleanup = KillOnDrop {
        pids: processes.clone(),
        environment: vec![
            format!("COHORT_JOB_ID={job_id}"),
            format!("COHORT_COORDINATOR_ADDR={}", cluster.address()),
        ],
    };
    assert!(
        processes.contains(&rank_pids[0]),
        "{processes:?} {rank_pids:?}"
    );
    let children: Vec<u32> = processes
        .iter()
        .copied()
        .filter(|&pid| pid != rank_pids[0])
        .collect();
    assert_eq!(
        rank_records(&cluster, "node-a")?.len(),
        1,
        "a running rank is recorded"
    );

    cluster.kill_worker("node-a")?;
    // The rank's main process dies with its worker; its children outlive both.
    cluster.wait_for_processes_gone(&rank_pids, DEFAULT_TIMEOUT)?;
    let orphans: Vec<u32> = children
        .iter()
        .copied()
        .filter(|&pid| process_alive(pid))
        .collect();
    assert_eq!(
        orphans.len(),
        2,
        "the children outlive the worker: {children:?}"
    );

    // The restarted worker offers 2 slots instead of 1: the node shows 2 devices only once
    // the new worker has registered, even though the coordinator never saw the node go.
    let restarted_at = Instant::now();
    cluster.start_worker("node-a", 2)?;
    poll(
        "node-a to offer the restarted worker's devices",
        DEFAULT_TIMEOUT,
        || {
            let offered = cluster.nodes()?.into_iter().find(|node| {
                node["node_id"] == "node-a"
                    && node["status"] == "ready"
                    && node["devices"].as_array().map_or(0, Vec::len) == 2
            });
            let Some(node) = offered else {
                return Ok(None);
            };
            // The moment the devices are first seen offered, nothing of the old rank runs.
            let survivors: Vec<u32> = orphans
                .iter()
                .copied()
                .filter(|&pid| process_alive(pid))
                .collect();
            if !survivors.is_empty() {
                let log = cluster.worker("node-a").map(|w| w.log_tail());
                bail!(
                    "node-a offers its devices while {survivors:?} of the old rank still run: \
                     {node}\n{}",
                    log.unwrap_or_default()
                );
            }
            Ok(Some(node))
        },
    )?;
    eprintln!(
        "devices offered again {:?} after the restart",
        restarted_at.elapsed()
    );
    assert!(cluster.processes_of_job(&job_id).is_empty());

    // The restarted worker's report of the killed rank reaches the coordinator and fails the
    // job, long before the node's heartbeat deadline.
    let job = cluster.wait_for_state(&job_id, "failed", Duration::from_secs(20))?;
    let rank = &job["placement"][0];
    assert_eq!(rank["state"], "exited", "{job}");
    assert_eq!(rank["signal"], libc::SIGKILL, "{job}");
    assert!(rank_records(&cluster, "node-a")?.is_empty(), "records stay");

    // The node runs work again, and a rank that ends leaves no record.
    let again = cluster.submit(&shell_job("after", 1, "echo fine"), &[])?;
    cluster.wait_for_state(&again, "succeeded", DEFAULT_TIMEOUT)?;
    assert!(rank_records(&cluster, "node-a")?.is_empty());
    Ok(())
}

#[test]
fn a_second_worker_on_the_same_state_directory_refuses_to_start() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 1)?;
    let job_id = cluster.submit(&shell_job("busy", 1, "exec sleep 600"), &[])?;
    let pids = cluster.wait_for_running_ranks(&job_id)?;
    // Another worker with the same node id (so the same state directory), by mistake: it
    // must not take the first one's live rank for a leftover.
    let state_dir = cluster.state_dir("node-a").display().to_string();
    let output = std::process::Command::new(cohort_cluster_tests::sandbox::cohort_executable())
        .args([
            "worker",
            "--coordinator",
            cluster.address(),
            "--node-id",
            "node-a",
        ])
        .args(["--state-dir", &state_dir])
        .arg("--join-token-file")
        .arg(cluster.join_token_file())
        .env_remove("RUST_LOG")
        .output()?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("in use by another worker"), "{stderr}");
    assert!(pids.iter().all(|&pid| process_alive(pid)));
    assert_eq!(cluster.job(&job_id)?["state"], "running");
    Ok(())
}
