//! Restarts through the real cluster: a training job whose rank is killed restarts from its
//! latest checkpoint and ends as an undisturbed run of it does, on exactly the same examples;
//! a rank killed in the middle of a checkpoint write leaves nothing a restart would load; a
//! command job sees its restart count.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cohort_cluster_tests::jobs::mlp_job;
use cohort_cluster_tests::sandbox::{DEFAULT_TIMEOUT, Sandbox, poll, shell_job, signal};
use serde_json::Value;

/// Longest a one-epoch run of the 4-rank MLP may take on a slow machine.
const TRAINING_TIMEOUT: Duration = Duration::from_secs(600);

/// The demo MLP on 4 ranks for one epoch (234 steps), checkpointing every 50 steps, recording
/// the examples of every step, restarting at most twice; `extra` is appended.
fn restartable_job(name: &str, extra: &str) -> String {
    let sections = format!(
        "\n[checkpoint]\nevery_steps = 50\n[data]\nrecord_samples = true\n\
         [fault_tolerance]\nmax_restarts = 2\n{extra}"
    );
    mlp_job(name, 4, 1, None, 0.002, &sections)
}

/// A cluster of five one-slot workers: a 4-rank job fits and one node is spare, so a restart
/// can keep off the node its failure is blamed on.
fn five_node_cluster(fault: Option<(&str, &str)>) -> Result<Sandbox> {
    let mut cluster = Sandbox::start()?;
    if let Some((name, value)) = fault {
        cluster.set_worker_env(name, value);
    }
    for node in ["node-a", "node-b", "node-c", "node-d", "node-e"] {
        cluster.add_worker(node, 1)?;
    }
    Ok(cluster)
}

/// The highest step any rank of the job has reported.
fn reported_step(job: &Value) -> u64 {
    job["metrics"]
        .as_array()
        .map(|ranks| {
            ranks
                .iter()
                .filter_map(|rank| rank["step"].as_u64())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// The test accuracy the job ended with, as rank 0 reported it.
fn final_accuracy(job: &Value) -> f64 {
    job["metrics"][0]["eval_accuracy"]
        .as_f64()
        .unwrap_or_else(|| panic!("no accuracy: {job}"))
}

/// Asserts that a restarted job ended with the test accuracy of its undisturbed reference,
/// within 0.3 percentage points, and prints both.
fn assert_same_accuracy(what: &str, job: &Value, reference: &Value) {
    let (accuracy, expected) = (final_accuracy(job), final_accuracy(reference));
    eprintln!(
        "{what}: final test accuracy {:.2}%, undisturbed {:.2}%",
        accuracy * 100.0,
        expected * 100.0
    );
    assert!(
        (accuracy - expected).abs() <= 0.003,
        "{what}: {accuracy} against {expected}"
    );
}

/// The global batch of every step of one attempt of a job: its ranks' sample records joined in
/// rank order (each rank takes a contiguous share of the global batch).
fn global_batches(
    cluster: &Sandbox,
    job_id: &str,
    (attempt, ranks): (u32, u32),
) -> Result<BTreeMap<u64, Vec<usize>>> {
    let directory = cluster.path().join("outputs").join(job_id).join("samples");
    let mut batches = BTreeMap::<u64, Vec<usize>>::new();
    for rank in 0..ranks {
        let path = directory.join(format!("attempt-{attempt}.rank-{rank}.txt"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        for line in text.lines() {
            let (step, indices) = line.split_once(' ').context("a sample line")?;
            let batch = batches.entry(step.parse()?).or_default();
            for index in indices.split(',') {
                batch.push(index.parse()?);
            }
        }
    }
    Ok(batches)
}

/// Whether process `pid` is stopped (state `T` in `/proc/PID/stat`).
fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, after_name) = stat.rsplit_once(')')?;
            after_name
                .split_whitespace()
                .next()
                .map(|state| state == "T")
        })
        .unwrap_or(false)
}

/// The partial (uncommitted) checkpoint directories in `directory`.
fn partial_checkpoints(directory: &Path) -> Vec<String> {
    std::fs::read_dir(directory)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok())
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.contains(".partial-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_killed_rank_restarts_the_job_from_its_checkpoint_on_exactly_the_undisturbed_examples()
-> Result<()> {
    let mut cluster = five_node_cluster(None)?;
    let undisturbed = cluster.submit(&restartable_job("undisturbed", ""), &[])?;
    let reference = cluster.wait_for_state(&undisturbed, "succeeded", TRAINING_TIMEOUT)?;
    assert_eq!(reference["restarts"], 0, "{reference}");
    let reference_batches = global_batches(&cluster, &undisturbed, (0, 4))?;
    assert_eq!(reference_batches.len(), 234);
    // No rank of the undisturbed run was taken for a straggler (four ranks on two cores).
    let log = cluster.coordinator(0).map(|d| d.log()).unwrap_or_default();
    assert!(!log.contains("straggler:"), "{log}");

    let job_id = cluster.submit(&restartable_job("disturbed", ""), &[])?;
    let pids = cluster.wait_for_running_ranks(&job_id)?;
    // Past step 100, whose checkpoint rank 0 wrote before any rank could finish step 101.
    poll("step 101", TRAINING_TIMEOUT, || {
        Ok((reported_step(&cluster.job(&job_id)?) > 100).then_some(()))
    })?;
    let killed_node = cluster.job(&job_id)?["placement"][2]["node_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let killed_at = Instant::now();
    signal(pids[2], libc::SIGKILL);
    let restarted = poll("the next attempt's first step", DEFAULT_TIMEOUT, || {
        let job = cluster.job(&job_id)?;
        Ok((job["restarts"] == 1 && reported_step(&job) > 0).then_some(job))
    })?;
    let recovery = killed_at.elapsed();
    eprintln!(
        "kill to the first step of the next attempt: {:.2} s (as observed by polling)",
        recovery.as_secs_f64()
    );
    assert!(recovery < Duration::from_secs(10), "{recovery:?}");
    let placed_on: Vec<&str> = restarted["placement"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|rank| rank["node_id"].as_str())
        .collect();
    assert!(
        !placed_on.contains(&killed_node.as_str()),
        "the restart went back to {killed_node}, where the failure was: {placed_on:?}"
    );

    let job = cluster.wait_for_state(&job_id, "succeeded", TRAINING_TIMEOUT)?;
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{job}");
    assert_eq!(job["restarts"], 1);
    let reason = attempts[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("rank 2 ") && reason.contains("signal 9"),
        "the first attempt's end names the killed rank: {reason}"
    );
    assert_eq!(attempts[1]["reason"], "", "{job}");
    let status = cluster.cli_ok(&["status", &job_id])?;
    assert!(
        status.contains("ATTEMPT") && status.contains("signal 9"),
        "{status}"
    );

    assert_same_accuracy("restarted", &job, &reference);

    // Exactly once: the steps the first attempt made up to the checkpoint it was resumed
    // from, then the second attempt's, are the undisturbed run's, example for example.
    let (effective, resumed_from) = effective_batches(
        global_batches(&cluster, &job_id, (0, 4))?,
        global_batches(&cluster, &job_id, (1, 4))?,
    );
    assert!(
        resumed_from >= 100 && resumed_from % 50 == 0,
        "resumed after step {resumed_from}, expected the checkpoint of step 100 or later"
    );
    assert_eq!(effective.len(), reference_batches.len());
    assert!(
        effective == reference_batches,
        "the restarted run trained on other examples than the undisturbed one"
    );
    Ok(())
}

/// The steps of a restarted run as they count: the first attempt's up to the checkpoint the
/// second resumed from, then the second's. Returns them and that checkpoint's step.
fn effective_batches(
    first: BTreeMap<u64, Vec<usize>>,
    second: BTreeMap<u64, Vec<usize>>,
) -> (BTreeMap<u64, Vec<usize>>, u64) {
    let resumed_from = second.keys().next().copied().unwrap_or(1) - 1;
    let mut effective: BTreeMap<u64, Vec<usize>> = first
        .into_iter()
        .filter(|(step, _)| *step <= resumed_from)
        .collect();
    effective.extend(second);
    (effective, resumed_from)
}

#[test]
fn an_elastic_job_whose_worker_is_killed_goes_on_with_fewer_ranks_on_the_same_examples()
-> Result<()> {
    let mut cluster = Sandbox::start_with(cohort_cluster_tests::sandbox::Store::Embedded, 2.0)?;
    for node in ["node-a", "node-b", "node-c", "node-d"] {
        cluster.add_worker(node, 1)?;
    }
    let elastic = "min_ranks = 2\n";
    let undisturbed = cluster.submit(&restartable_job("whole", elastic), &[])?;
    let reference = cluster.wait_for_state(&undisturbed, "succeeded", TRAINING_TIMEOUT)?;
    let reference_batches = global_batches(&cluster, &undisturbed, (0, 4))?;

    let job_id = cluster.submit(&restartable_job("shrunk", elastic), &[])?;
    cluster.wait_for_running_ranks(&job_id)?;
    poll("step 101", TRAINING_TIMEOUT, || {
        Ok((reported_step(&cluster.job(&job_id)?) > 100).then_some(()))
    })?;
    let victim = cluster.job(&job_id)?["placement"][3]["node_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    cluster.kill_worker(&victim)?;
    let job = cluster.wait_for_state(&job_id, "succeeded", TRAINING_TIMEOUT)?;
    assert_eq!(job["restarts"], 1, "{job}");
    let ranks = job["placement"].as_array().unwrap().len();
    assert_eq!(
        ranks, 3,
        "the second attempt ran on the three nodes left: {job}"
    );
    assert_same_accuracy("elastic, 4 then 3 ranks", &job, &reference);
    let (effective, resumed_from) = effective_batches(
        global_batches(&cluster, &job_id, (0, 4))?,
        global_batches(&cluster, &job_id, (1, 3))?,
    );
    assert!(resumed_from >= 100, "resumed after step {resumed_from}");
    assert!(
        effective == reference_batches,
        "3 ranks trained on other examples than 4 would have"
    );
    Ok(())
}

#[test]
fn a_rank_killed_while_writing_a_checkpoint_restarts_from_the_one_before() -> Result<()> {
    let cluster = five_node_cluster(Some((cohort_proto::env::FAULT_STOP_IN_CHECKPOINT, "100")))?;
    let mut cluster = cluster;
    let job_id = cluster.submit(
        &mlp_job(
            "torn",
            4,
            1,
            Some(120),
            0.002,
            "\n[checkpoint]\nevery_steps = 50\n[fault_tolerance]\nmax_restarts = 1\n",
        ),
        &[],
    )?;
    let pids = cluster.wait_for_running_ranks(&job_id)?;
    let checkpoints = cluster
        .path()
        .join("outputs")
        .join(&job_id)
        .join("checkpoints");
    // Rank 0 stops itself with step 100's files written and not yet committed.
    let partial = poll(
        "rank 0 to stop inside its checkpoint write",
        TRAINING_TIMEOUT,
        || {
            let partial = partial_checkpoints(&checkpoints);
            Ok((is_stopped(pids[0]) && !partial.is_empty()).then_some(partial))
        },
    )?;
    assert!(
        partial[0].starts_with(".step-00000100.partial-"),
        "{partial:?}"
    );
    assert!(!checkpoints.join("step-00000100").exists());
    signal(pids[0], libc::SIGKILL);

    let job = cluster.wait_for_state(&job_id, "succeeded", TRAINING_TIMEOUT)?;
    assert_eq!(job["restarts"], 1, "{job}");
    let logs = cluster.cli_ok(&["logs", &job_id, "--rank", "0"])?;
    assert!(
        logs.contains("attempt 2: resuming from the checkpoint of step 50"),
        "the next attempt did not resume from the last complete checkpoint:\n{logs}"
    );
    assert!(checkpoints.join("step-00000100").exists());
    assert!(checkpoints.join("step-00000120").exists());
    Ok(())
}

#[test]
fn a_command_job_restarts_with_its_restart_count_and_its_output_directory() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 1)?;
    cluster.add_worker("node-b", 1)?;
    // The first attempt leaves a mark in the output directory and fails; the second finds it.
    let script = "echo \"attempt $COHORT_RESTART_COUNT torch $TORCHELASTIC_RESTART_COUNT\"; \
                  if [ -e \"$COHORT_OUTPUT_DIR/mark\" ]; then exit 0; fi; \
                  mkdir -p \"$COHORT_OUTPUT_DIR\" && touch \"$COHORT_OUTPUT_DIR/mark\"; exit 5";
    let job = format!(
        "{}[fault_tolerance]\nmax_restarts = 1\n",
        shell_job("again", 1, script)
    );
    let job_id = cluster.submit(&job, &["--wait-for-resources"])?;
    let job = cluster.wait_for_state(&job_id, "succeeded", DEFAULT_TIMEOUT)?;
    assert_eq!(job["restarts"], 1, "{job}");
    let attempts = job["attempts"].as_array().unwrap();
    assert!(
        attempts[0]["reason"]
            .as_str()
            .unwrap()
            .contains("exited with code 5"),
        "{job}"
    );
    let logs = cluster.cli_ok(&["logs", &job_id])?;
    assert!(logs.contains("attempt 0 torch 0"), "{logs}");
    assert!(logs.contains("attempt 1 torch 1"), "{logs}");
    Ok(())
}

#[test]
fn cancel_with_checkpoint_stops_every_rank_after_one_step_and_the_checkpoint_resumes() -> Result<()>
{
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 2)?;
    let job_id = cluster.submit(&mlp_job("stopped", 2, 50, None, 0.002, ""), &[])?;
    cluster.wait_for_running_ranks(&job_id)?;
    poll("a few steps", TRAINING_TIMEOUT, || {
        Ok((reported_step(&cluster.job(&job_id)?) > 5).then_some(()))
    })?;
    let output = cluster.cli_ok(&["cancel", &job_id, "--checkpoint"])?;
    let line = output
        .lines()
        .find(|line| line.starts_with("stopped on request after step "))
        .with_context(|| format!("no checkpoint line in:\n{output}"))?;
    let (step, path) = line
        .trim_start_matches("stopped on request after step ")
        .split_once(": checkpoint ")
        .context("step and path")?;
    let step: u64 = step.parse()?;
    assert!(
        Path::new(path).join("model.safetensors").is_file(),
        "{path}"
    );
    assert!(path.ends_with(&format!("step-{step:08}")), "{path}");
    let job = cluster.job(&job_id)?;
    assert_eq!(job["state"], "cancelled");
    for rank in job["placement"].as_array().unwrap() {
        assert_eq!(
            rank["exit_code"], 75,
            "every rank stopped on request: {job}"
        );
    }

    // The checkpoint is a complete one: a job resumes from it.
    let resumed = cluster.submit(
        &mlp_job("resumed", 2, 50, Some(step + 3), 0.002, ""),
        &["--resume-from", path],
    )?;
    let resumed = cluster.wait_for_state(&resumed, "succeeded", TRAINING_TIMEOUT)?;
    assert_eq!(resumed["metrics"][0]["step"], step + 3, "{resumed}");

    // A command job's program decides itself what SIGTERM means: refused, named.
    let sleeper = cluster.submit(&shell_job("sleeper", 1, "exec sleep 600"), &[])?;
    let refused = cluster.cli(&["cancel", &sleeper, "--checkpoint"])?;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--checkpoint: a command job"), "{stderr}");
    cluster.cli_ok(&["cancel", &sleeper])?;
    Ok(())
}

#[test]
fn draining_a_node_moves_a_training_job_off_it_through_a_checkpoint_without_using_a_restart()
-> Result<()> {
    let mut cluster = Sandbox::start()?;
    for node in ["node-a", "node-b", "node-c"] {
        cluster.add_worker(node, 1)?;
    }
    let job_id = cluster.submit(
        &mlp_job(
            "moved",
            2,
            1,
            Some(150),
            0.002,
            "\n[fault_tolerance]\nmax_restarts = 1\n",
        ),
        &[],
    )?;
    cluster.wait_for_running_ranks(&job_id)?;
    poll("a few steps", TRAINING_TIMEOUT, || {
        Ok((reported_step(&cluster.job(&job_id)?) > 5).then_some(()))
    })?;
    let job = cluster.job(&job_id)?;
    let drained = job["placement"][1]["node_id"].as_str().unwrap().to_owned();
    let output = cluster.cli_ok(&["drain", &drained])?;
    assert!(
        output.contains(&format!("{job_id}: moving off it")),
        "{output}"
    );
    let nodes = cluster.nodes()?;
    assert!(
        nodes
            .iter()
            .any(|node| node["node_id"] == drained.as_str() && node["draining"] == true),
        "{nodes:?}"
    );

    let job = cluster.wait_for_state(&job_id, "succeeded", TRAINING_TIMEOUT)?;
    assert_eq!(job["metrics"][0]["step"], 150, "{job}");
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{job}");
    assert_eq!(attempts[0]["planned"], true, "{job}");
    let placed: Vec<&str> = job["placement"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|rank| rank["node_id"].as_str())
        .collect();
    assert!(!placed.contains(&drained.as_str()), "{placed:?}");
    // The move went through the checkpoint the ranks wrote when asked to stop, and used no
    // restart: the job still had its one.
    let logs = cluster.cli_ok(&["logs", &job_id, "--rank", "0"])?;
    assert!(
        logs.contains("stopped on request after step")
            && logs.contains("attempt 2: resuming from the checkpoint of step"),
        "{logs}"
    );
    let status = cluster.cli_ok(&["status", &job_id])?;
    assert!(
        status.contains("0 of 1 restarts after failures used, 1 planned"),
        "{status}"
    );
    cluster.cli_ok(&["drain", &drained, "--undo"])?;
    let nodes = cluster.nodes()?;
    assert!(
        nodes
            .iter()
            .any(|node| node["node_id"] == drained.as_str() && node["draining"] == false),
        "{nodes:?}"
    );
    Ok(())
}

#[test]
fn an_urgent_job_preempts_a_training_job_that_checkpoints_and_resumes_to_the_same_accuracy()
-> Result<()> {
    let mut cluster = Sandbox::start()?;
    for node in ["node-a", "node-b"] {
        cluster.add_worker(node, 1)?;
    }
    // Checkpointing every 50 steps: the reference run writes what the preempted one writes, and
    // the preempted one checkpoints again when it is stopped.
    let training = |name: &str| {
        mlp_job(
            name,
            2,
            1,
            Some(150),
            0.002,
            "\n[checkpoint]\nevery_steps = 50\n",
        )
    };
    let undisturbed = cluster.submit(&training("undisturbed"), &[])?;
    let reference = cluster.wait_for_state(&undisturbed, "succeeded", TRAINING_TIMEOUT)?;

    let job_id = cluster.submit(&training("preempted"), &[])?;
    cluster.wait_for_running_ranks(&job_id)?;
    poll("a few steps", TRAINING_TIMEOUT, || {
        Ok((reported_step(&cluster.job(&job_id)?) > 20).then_some(()))
    })?;
    // One slot is enough for the urgent job, but a gang is stopped whole.
    let urgent = cluster.submit(
        &format!(
            "priority = 100\n{}",
            shell_job("urgent", 1, "echo urgent job ran")
        ),
        &[],
    )?;
    let urgent_job = cluster.wait_for_state(&urgent, "succeeded", DEFAULT_TIMEOUT)?;
    let job = cluster.wait_for_state(&job_id, "succeeded", TRAINING_TIMEOUT)?;

    let attempts = job["attempts"].as_array().context("no attempts")?;
    assert_eq!(attempts.len(), 2, "{job}");
    assert_eq!(attempts[0]["preempted_by"], urgent.as_str(), "{job}");
    assert_eq!(attempts[0]["planned"], true, "{job}");
    // The urgent job ran while the preempted one waited: it started before the second attempt.
    let resumed_at = attempts[1]["started_at_unix_ms"]
        .as_i64()
        .context("no start")?;
    let urgent_started = urgent_job["started_at_unix_ms"]
        .as_i64()
        .context("no start")?;
    assert!(urgent_started < resumed_at, "{urgent_job}\n{job}");
    let logs = cluster.cli_ok(&["logs", &job_id, "--rank", "0"])?;
    assert!(
        logs.contains("stopped on request after step")
            && logs.contains("attempt 2: resuming from the checkpoint of step"),
        "{logs}"
    );
    let status = cluster.cli_ok(&["status", &job_id])?;
    assert!(status.contains("preempted by job urgent-"), "{status}");
    assert_eq!(job["metrics"][0]["step"], 150, "{job}");
    let (expected, got) = (final_accuracy(&reference), final_accuracy(&job));
    eprintln!(
        "final test accuracy: undisturbed {:.2}%, preempted and resumed {:.2}%",
        expected * 100.0,
        got * 100.0
    );
    assert!((expected - got).abs() <= 0.003, "{expected} against {got}");
    Ok(())
}
