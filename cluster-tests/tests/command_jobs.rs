//! Command jobs end to end: rendezvous and logs, gang scheduling, rank failure, cancellation.

use std::time::{Duration, Instant};

use anyhow::Result;
use cohort_cluster_tests::sandbox::{DEFAULT_TIMEOUT, Sandbox, process_alive, shell_job};
use cohort_coordinator::logs::fold::{by_rank, unfold};

#[test]
fn the_log_of_ranks_that_print_alike_folds_to_a_quarter_and_reads_back_whole() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 4)?;
    // As a PyTorch DDP script logs: every rank prints every step, its own loss, and warnings.
    let script = r#"
echo "rank $RANK of $WORLD_SIZE starting"
i=1
while [ $i -le 100 ]; do
  echo "step $i loss 0.$((1000 + i * 7 + RANK)) lr 1e-3"
  i=$((i + 1))
done
echo "warning: {not a number} on rank $RANK" >&2
echo "done"
"#;
    let job_id = cluster.submit(&shell_job("chatty", 4, script), &[])?;
    cluster.wait_for_state(&job_id, "succeeded", DEFAULT_TIMEOUT)?;
    let raw = cluster.cli_ok(&["logs", &job_id])?;
    let collapsed = cluster.cli_ok(&["logs", &job_id, "--collapse"])?;
    let (raw_lines, collapsed_lines) = (raw.lines().count(), collapsed.lines().count());
    eprintln!("cohort logs --collapse: {collapsed_lines} lines for {raw_lines}");
    assert_eq!(raw_lines, 4 * 103);
    assert!(
        collapsed_lines * 3 <= raw_lines,
        "{collapsed_lines} folded lines for {raw_lines}:\n{collapsed}"
    );
    assert!(
        collapsed.contains("[ranks 0-3] step 1 loss {0.1007|0.1008|0.1009|0.1010} lr 1e-3"),
        "{collapsed}"
    );
    assert!(
        collapsed.contains("[ranks 0-3]! warning: {{not a number}} on rank {0|1|2|3}"),
        "{collapsed}"
    );
    assert_eq!(by_rank(&unfold(&collapsed)?), by_rank(&unfold(&raw)?));
    Ok(())
}

#[test]
fn three_ranks_agree_through_rendezvous_and_their_logs_are_kept() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    for node in ["node-a", "node-b", "node-c"] {
        cluster.add_worker(node, 1)?;
    }
    // Rank 0 draws a value; every rank reads it after a barrier and prints it.
    let script = r#"
set -e
echo "rank=$RANK world=$WORLD_SIZE local=$LOCAL_RANK"
if [ "$RANK" = 0 ]; then "$COHORT_BIN" kv set agreed "$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')"; fi
"$COHORT_BIN" kv barrier value-set
echo "agreed=$("$COHORT_BIN" kv get agreed)"
echo "to stderr" >&2
"#;
    let job_id = cluster.submit(&shell_job("agree", 3, script), &[])?;
    let job = cluster.wait_for_state(&job_id, "succeeded", DEFAULT_TIMEOUT)?;
    let nodes: std::collections::BTreeSet<_> = job["placement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|rank| rank["node_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(nodes.len(), 3, "one rank per node: {job}");

    let logs = cluster.cli_ok(&["logs", &job_id])?;
    let mut agreed = Vec::new();
    for rank in 0..3 {
        assert!(
            logs.contains(&format!("[rank {rank}] rank={rank} world=3 local=0")),
            "rank {rank} line missing from:\n{logs}"
        );
        assert!(
            logs.contains(&format!("[rank {rank}]! to stderr")),
            "{logs}"
        );
        let value = logs
            .lines()
            .find_map(|line| line.strip_prefix(&format!("[rank {rank}] agreed=")))
            .unwrap_or_else(|| panic!("rank {rank} printed no agreed value:\n{logs}"));
        agreed.push(value.to_owned());
    }
    assert!(!agreed[0].is_empty());
    assert!(
        agreed.iter().all(|v| v == &agreed[0]),
        "ranks disagree: {agreed:?}"
    );

    let rank1 = cluster.cli_ok(&["logs", &job_id, "--rank", "1"])?;
    assert!(
        rank1.lines().all(|line| line.starts_with("[rank 1]")),
        "{rank1}"
    );
    Ok(())
}

#[test]
fn a_gang_waits_until_the_cluster_can_hold_all_of_it() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 2)?;
    cluster.add_worker("node-b", 2)?;
    let job = shell_job("gang", 6, "echo started; exit 0");

    // Without --wait-for-resources, a job that can never fit is refused outright.
    let path = cluster.write_job(&job)?;
    let refused = cluster.cli(&["submit", &path.display().to_string()])?;
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("6 ranks") && message.contains("--wait-for-resources"),
        "{message}"
    );

    let job_id = cluster.submit(&job, &["--wait-for-resources"])?;
    // It stays queued with nothing placed and no rank started while the cluster is too small,
    // however often we look.
    for _ in 0..10 {
        let status = cluster.job(&job_id)?;
        assert_eq!(status["state"], "queued", "{status}");
        assert!(status["placement"].as_array().unwrap().is_empty());
        let nodes = cluster.nodes()?;
        assert!(nodes.iter().all(|n| n["running_ranks"] == 0), "{nodes:?}");
    }
    cluster.add_worker("node-c", 2)?;
    let done = cluster.wait_for_state(&job_id, "succeeded", DEFAULT_TIMEOUT)?;
    assert_eq!(done["placement"].as_array().unwrap().len(), 6);
    Ok(())
}

#[test]
fn a_failing_rank_fails_the_job_within_two_seconds_and_stops_the_others() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 2)?;
    cluster.add_worker("node-b", 1)?;
    // Every rank waits at a barrier so all are alive; then rank 1 exits 3, the others sleep.
    let script = r#"
"$COHORT_BIN" kv barrier all-up
if [ "$RANK" = 1 ]; then exit 3; fi
exec sleep 600
"#;
    let job_id = cluster.submit(&shell_job("crash", 3, script), &[])?;
    let job = cluster.wait_for_state(&job_id, "failed", DEFAULT_TIMEOUT)?;
    let rank1 = &job["placement"][1];
    let node = rank1["node_id"].as_str().unwrap();
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains("rank 1") && reason.contains(node) && reason.contains("code 3"),
        "reason {reason:?} must name the rank, its node and the exit code"
    );
    let exited = rank1["exited_at_unix_ms"].as_i64().unwrap();
    let failed = job["finished_at_unix_ms"].as_i64().unwrap();
    eprintln!("job failed {} ms after rank 1 exited", failed - exited);
    assert!(
        failed - exited < 2_000,
        "job failed {} ms after the rank exited",
        failed - exited
    );
    let pids: Vec<u32> = job["placement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|rank| rank["pid"].as_u64().unwrap() as u32)
        .collect();
    assert!(pids.iter().all(|&pid| pid > 0), "{job}");
    cluster.wait_for_processes_gone(&pids, DEFAULT_TIMEOUT)?;
    Ok(())
}

#[test]
fn cancel_leaves_no_rank_process_behind() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 2)?;
    cluster.add_worker("node-b", 2)?;
    // Each rank starts a child of its own and ignores SIGTERM, so stopping it takes the group
    // kill after the grace period.
    let script = "trap '' TERM; sleep 600 & echo child=$!; exec sleep 600";
    let job_id = cluster.submit(&shell_job("long", 4, script), &[])?;
    let pids = cluster.wait_for_running_ranks(&job_id)?;
    let children: Vec<u32> =
        cohort_cluster_tests::sandbox::poll("children's pids", DEFAULT_TIMEOUT, || {
            let logs = cluster.cli_ok(&["logs", &job_id])?;
            let found: Vec<u32> = logs
                .lines()
                .filter_map(|line| line.split("child=").nth(1))
                .filter_map(|pid| pid.trim().parse().ok())
                .collect();
            Ok((found.len() == 4).then_some(found))
        })?;
    assert!(pids.iter().chain(&children).all(|&pid| process_alive(pid)));

    let started = Instant::now();
    let output = cluster.cli_ok(&["cancel", &job_id])?;
    assert!(output.contains("cancelled"), "{output}");
    // `cohort cancel` returns once the workers saw every rank end.
    for &pid in pids.iter().chain(&children) {
        assert!(!process_alive(pid), "process {pid} survived the cancel");
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    let job = cluster.job(&job_id)?;
    assert_eq!(job["state"], "cancelled");
    assert_eq!(job["reason"], "cancelled by user");
    Ok(())
}
