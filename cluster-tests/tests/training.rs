//! Cohort's own training runtime through the real cluster: a 4-rank data-parallel MLP on
//! Fashion-MNIST, and a rank killed in the middle of training.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cohort_cluster_tests::jobs::mlp_job;
use cohort_cluster_tests::sandbox::{DEFAULT_TIMEOUT, Sandbox, poll, signal};
use cohort_coordinator::logs::fold::{by_rank, unfold};

/// Fashion-MNIST must be installed (scripts/setup.sh installs `dataset-fashion-mnist`); the
/// ranks find it in /usr/share/datasets/fashion-mnist or `$COHORT_DATA`.
fn train_job(name: &str, epochs: u32, max_steps: Option<u64>) -> String {
    train_job_of(name, epochs, max_steps, 4)
}

fn train_job_of(name: &str, epochs: u32, max_steps: Option<u64>, ranks: u32) -> String {
    mlp_job(name, ranks, epochs, max_steps, 0.002, "")
}

#[test]
fn four_ranks_train_the_mlp_to_83_percent_in_one_epoch() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 2)?;
    cluster.add_worker("node-b", 2)?;
    let job_id = cluster.submit(&train_job("mlp", 1, None), &[])?;
    let job = cluster.wait_for_state(&job_id, "succeeded", Duration::from_secs(900))?;
    let metrics = job["metrics"].as_array().unwrap();
    assert_eq!(metrics.len(), 4, "every rank reports: {job}");
    let accuracy = metrics[0]["eval_accuracy"].as_f64().unwrap();
    eprintln!(
        "4-rank MLP, 1 epoch: test accuracy {:.2}%",
        accuracy * 100.0
    );
    assert!(accuracy >= 0.83, "test accuracy {accuracy} after 1 epoch");
    // Every replica evaluated the same model.
    for rank in metrics {
        assert_eq!(rank["eval_accuracy"], metrics[0]["eval_accuracy"], "{job}");
        assert_eq!(rank["step"], 234, "60000 / 256 steps: {job}");
    }
    // No rank of the undisturbed run was ever taken for a straggler.
    let coordinator_log = cluster
        .coordinator(0)
        .map(|daemon| daemon.log())
        .unwrap_or_default();
    assert!(!coordinator_log.contains("straggler"), "{coordinator_log}");
    let logs = cluster.cli_ok(&["logs", &job_id, "--rank", "0"])?;
    assert!(logs.contains("final test accuracy"), "{logs}");
    assert!(logs.contains("final checkpoint"), "{logs}");

    // The log folded across ranks: shorter (the lines every rank writes fold; rank 0 alone
    // reports progress), and every rank's lines read back from it.
    let raw = cluster.cli_ok(&["logs", &job_id])?;
    let collapsed = cluster.cli_ok(&["logs", &job_id, "--collapse"])?;
    let (raw_lines, collapsed_lines) = (raw.lines().count(), collapsed.lines().count());
    eprintln!("cohort logs --collapse: {collapsed_lines} lines for {raw_lines}");
    assert!(
        collapsed_lines < raw_lines,
        "{collapsed_lines} folded lines for {raw_lines}:\n{collapsed}"
    );
    assert_eq!(by_rank(&unfold(&collapsed)?), by_rank(&unfold(&raw)?));
    Ok(())
}

#[test]
fn a_rank_slowed_by_half_is_named_a_straggler_within_thirty_steps() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    // Rank 1 computes every step half as long again. Two ranks on this machine's two cores:
    // four would share them, and a rank's compute time would measure the contention.
    cluster.set_worker_env(cohort_proto::env::FAULT_SLOW_RANK, "1:0.5");
    cluster.add_worker("node-a", 1)?;
    cluster.add_worker("node-b", 1)?;
    let job_id = cluster.submit(&train_job_of("slowed", 1, Some(400), 2), &[])?;
    // Watched through the coordinator's log, not by asking it: a `cohort status` process every
    // 50 ms would take its share of the two cores from one of the ranks.
    let flagged = poll("a straggler to be named", Duration::from_secs(600), || {
        let log = cluster
            .coordinator(0)
            .map(|daemon| daemon.log())
            .unwrap_or_default();
        Ok(log
            .lines()
            .find(|line| line.contains("straggler:"))
            .map(str::to_owned))
    })?;
    eprintln!("{flagged}");
    assert!(flagged.contains("rank=1"), "{flagged}");
    let step: u64 = flagged
        .split("step=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .context("no step")?
        .parse()?;
    assert!(step <= 30, "named at step {step}");
    // While the job runs, its status names the straggler and its node.
    let job = cluster.job(&job_id)?;
    assert_eq!(job["state"], "running", "{job}");
    let stragglers = job["stragglers"].as_array().context("no stragglers")?;
    assert_eq!(stragglers.len(), 1, "{job}");
    let straggler = &stragglers[0];
    assert_eq!(straggler["rank"], 1, "{job}");
    assert_eq!(
        straggler["node_id"], job["placement"][1]["node_id"],
        "{job}"
    );
    let slowdown = straggler["slowdown"].as_f64().unwrap_or_default();
    eprintln!("rank 1 named a straggler at step {step} ({slowdown:.2}x)");
    let status = cluster.cli_ok(&["status", &job_id])?;
    assert!(status.contains("straggler: rank 1 on node"), "{status}");
    // The slow rank's node now has a straggler score, which placement weighs; the other none.
    let scores: Vec<(String, f64)> = cluster
        .nodes()?
        .iter()
        .map(|node| {
            let id = node["node_id"].as_str().unwrap_or_default().to_owned();
            (id, node["straggler_score"].as_f64().unwrap_or(-1.0))
        })
        .collect();
    for (node, score) in &scores {
        if *node == straggler["node_id"] {
            assert!(*score >= 0.99, "{scores:?}");
        } else {
            assert_eq!(*score, 0.0, "{scores:?}");
        }
    }
    Ok(())
}

#[test]
fn a_rank_killed_during_training_fails_the_job_within_five_seconds() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 2)?;
    cluster.add_worker("node-b", 2)?;
    // No restarts: the job is to fail.
    let job = mlp_job(
        "victim",
        4,
        50,
        None,
        0.002,
        "\n[fault_tolerance]\nmax_restarts = 0\n",
    );
    let job_id = cluster.submit(&job, &[])?;
    let pids = cluster.wait_for_running_ranks(&job_id)?;
    // Wait until gradients are being exchanged: rank 2 has reported a step.
    poll("training steps", DEFAULT_TIMEOUT, || {
        let job = cluster.job(&job_id)?;
        Ok(job["metrics"]
            .as_array()
            .is_some_and(|m| m.iter().any(|r| r["step"].as_u64().unwrap_or(0) > 2))
            .then_some(()))
    })?;
    let killed_at = Instant::now();
    signal(pids[2], libc::SIGKILL);
    let job = cluster.wait_for_state(&job_id, "failed", DEFAULT_TIMEOUT)?;
    let failed_after = killed_at.elapsed();
    eprintln!("job failed {failed_after:?} after rank 2 was killed (as observed by polling)");
    assert!(
        failed_after < Duration::from_secs(5),
        "failed {failed_after:?} after the kill"
    );
    // The reason names the killed rank (the root cause), not a rank that lost its peer.
    let mut last_reason = String::new();
    let named = poll("the reason to name rank 2", Duration::from_secs(5), || {
        let job = cluster.job(&job_id)?;
        last_reason = job["reason"].as_str().unwrap_or_default().to_owned();
        Ok(last_reason
            .starts_with("rank 2 ")
            .then(|| last_reason.clone()))
    })
    .map_err(|error| error.context(format!("the reason stayed {last_reason:?}")))?;
    assert!(named.contains("signal 9"), "{named} / {job}");
    cluster.wait_for_processes_gone(&pids, DEFAULT_TIMEOUT)?;
    // The log opens with the rank that failed first.
    let logs = cluster.cli_ok(&["logs", &job_id, "--errors-first"])?;
    let first = logs.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("== rank 2 on node ") && first.contains("killed by signal 9"),
        "{logs}"
    );
    Ok(())
}

#[test]
fn a_job_resumes_from_the_checkpoint_of_another() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 2)?;
    let first = cluster.submit(&train_job_of("first", 1, Some(20), 2), &[])?;
    cluster.wait_for_state(&first, "succeeded", DEFAULT_TIMEOUT)?;
    let logs = cluster.cli_ok(&["logs", &first, "--rank", "0"])?;
    let checkpoint = logs
        .lines()
        .find_map(|line| line.split("final checkpoint: ").nth(1))
        .unwrap_or_else(|| panic!("no checkpoint in:\n{logs}"))
        .trim()
        .to_owned();
    assert!(checkpoint.ends_with("step-00000020"), "{checkpoint}");

    let second = cluster.submit(
        &train_job_of("second", 1, Some(30), 2),
        &["--resume-from", &checkpoint],
    )?;
    let job = cluster.wait_for_state(&second, "succeeded", DEFAULT_TIMEOUT)?;
    assert_eq!(job["metrics"][0]["step"], 30, "{job}");
    let logs = cluster.cli_ok(&["logs", &second, "--rank", "0"])?;
    assert!(logs.contains("step-00000030"), "{logs}");
    // It ran steps 21 to 30 only (the sandbox's workers run ranks with RUST_LOG=info, so the
    // trainer's start-up line is in the log).
    assert!(
        logs.contains("start_step=20"),
        "did not resume at step 20:\n{logs}"
    );
    Ok(())
}
