//! Experiments through the real cluster: checkpoint retention and `--resume-from JOB@best`,
//! early stopping ending a job with its reason, and an ASHA sweep that outlives a SIGKILL of
//! its coordinator without running a trial twice.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cohort_cluster_tests::sandbox::{Sandbox, poll};
use serde_json::Value;

/// A small one-rank MLP job on Fashion-MNIST (installed by `scripts/setup.sh`).
fn small_mlp(name: &str, extra: &str) -> String {
    format!(
        r#"
version = 1
name = "{name}"
kind = "train"
[model]
kind = "mlp"
hidden = [32]
[optimizer]
kind = "adamw"
lr = 0.003
[schedule]
epochs = 1
batch_size = 128
lr_decay = "constant"
{extra}
"#
    )
}

/// `cohort checkpoints JOB --output json`.
fn checkpoints(cluster: &Sandbox, job_id: &str) -> Result<Vec<Value>> {
    let text = cluster.cli_ok(&["checkpoints", job_id, "--output", "json"])?;
    match serde_json::from_str(&text)? {
        Value::Array(list) => Ok(list),
        other => bail!("expected a JSON array, got {other}"),
    }
}

#[test]
fn retention_keeps_the_last_and_the_best_and_resume_from_best_starts_there() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 1)?;
    let spec = small_mlp(
        "kept",
        "max_steps = 120\n[checkpoint]\nevery_steps = 20\nkeep_last = 2\nkeep_best = 1\n",
    );
    let job_id = cluster.submit(&spec, &[])?;
    cluster.wait_for_state(&job_id, "succeeded", Duration::from_secs(300))?;

    let versions = checkpoints(&cluster, &job_id)?;
    let steps: Vec<u64> = versions
        .iter()
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [20, 40, 60, 80, 100, 120], "{versions:?}");
    // The expected survivors, from the recorded evaluations: the two newest and the most
    // accurate (the first of equals).
    let accuracy = |v: &Value| {
        v["eval_accuracy"]
            .as_f64()
            .expect("every checkpoint evaluated")
    };
    let best = versions
        .iter()
        .fold(None::<&Value>, |best, v| match best {
            Some(b) if accuracy(b) >= accuracy(v) => Some(b),
            _ => Some(v),
        })
        .unwrap();
    let best_step = best["step"].as_u64().unwrap();
    let expected: BTreeSet<u64> = [100, 120, best_step].into_iter().collect();
    for version in &versions {
        let step = version["step"].as_u64().unwrap();
        let path = std::path::Path::new(version["path"].as_str().unwrap());
        let kept = expected.contains(&step);
        assert_eq!(
            version["state"],
            if kept { "complete" } else { "deleted" },
            "{version}"
        );
        assert_eq!(path.is_dir(), kept, "step {step} at {}", path.display());
        assert_eq!(version["best"], step == best_step, "{version}");
    }
    // Nothing else is left in the checkpoint directory (no partial or hidden leftovers).
    let directory = std::path::Path::new(best["path"].as_str().unwrap())
        .parent()
        .context("checkpoint directory")?;
    let on_disk: BTreeSet<String> = std::fs::read_dir(directory)?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    let named: BTreeSet<String> = expected.iter().map(|s| format!("step-{s:08}")).collect();
    assert_eq!(on_disk, named);
    eprintln!(
        "retention: checkpoints {steps:?}, kept {expected:?} (best step {best_step}, accuracy \
         {:.4})",
        accuracy(best)
    );

    // Resumed from JOB@best with nothing left to train, the job stands exactly where the best
    // checkpoint did: its step and its evaluation.
    let resumed_spec = small_mlp(
        "resumed",
        &format!("max_steps = {best_step}\n[checkpoint]\nevery_steps = 20\n"),
    );
    let reference = format!("{job_id}@best");
    let resumed = cluster.submit(&resumed_spec, &["--resume-from", &reference])?;
    let job = cluster.wait_for_state(&resumed, "succeeded", Duration::from_secs(300))?;
    let log = cluster.cli_ok(&["logs", &resumed, "--rank", "0"])?;
    assert!(log.contains(&format!("after {best_step} steps")), "{log}");
    let resumed_accuracy = job["metrics"][0]["eval_accuracy"].as_f64().unwrap();
    assert!(
        (resumed_accuracy - accuracy(best)).abs() < 1e-6,
        "evaluated {resumed_accuracy} at the best checkpoint, recorded {}",
        accuracy(best)
    );
    // A reference to a checkpoint that is not there is refused, naming what is.
    let file = cluster.write_job(&resumed_spec)?;
    let missing = cluster.cli(&[
        "submit",
        file.to_str().unwrap(),
        "--resume-from",
        &format!("{job_id}@step-20"),
    ])?;
    let error = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(error.contains("no checkpoint step-20"), "{error}");
    Ok(())
}

#[test]
fn a_plateauing_job_stops_early_with_its_reason_and_keeps_its_best_checkpoint() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 1)?;
    // A learning rate too small to move the loss by 0.05 between evaluations every 10 steps:
    // the first evaluation improves on nothing, the next two do not improve on it.
    let spec = small_mlp("plateau", "max_steps = 400\neval_every_steps = 10\n")
        .replace("lr = 0.003", "lr = 0.000001")
        + "[early_stopping]\nmetric = \"eval_loss\"\npatience = 2\nmin_delta = 0.05\n";
    let job_id = cluster.submit(&spec, &[])?;
    let job = cluster.wait_for_state(&job_id, "succeeded", Duration::from_secs(300))?;
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("early stopped at step 30: eval_loss did not improve on"),
        "{job}"
    );
    assert!(reason.contains("(step 10) for 2 evaluations"), "{reason}");
    assert_eq!(job["metrics"][0]["step"].as_u64(), Some(30), "{job}");
    // The checkpoint of the best evaluation (step 10) and the one of the stop are written.
    let versions = checkpoints(&cluster, &job_id)?;
    let written: Vec<(u64, &str)> = versions
        .iter()
        .map(|v| (v["step"].as_u64().unwrap(), v["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        written,
        [(10, "complete"), (30, "complete")],
        "{versions:?}"
    );
    Ok(())
}

/// An ASHA sweep of 6 trials over the learning rate, rungs at 10, 20 and 40 steps.
const SWEEP: &str = r#"
version = 1
name = "survivor"
[sweep]
max_trials = 6
max_concurrent_trials = 2
seed = 3
[sweep.searcher]
kind = "asha"
reduction_factor = 2
min_resource = 10
max_resource = 40
resource_unit = "steps"
[sweep.parameters]
"optimizer.lr" = { loguniform = [1e-4, 1e-1] }
[job]
version = 1
kind = "train"
[job.model]
kind = "mlp"
hidden = [32]
[job.schedule]
epochs = 1
batch_size = 128
max_steps = 40
"#;

/// `cohort sweep status SWEEP --output json`.
fn sweep(cluster: &Sandbox, sweep_id: &str) -> Result<Value> {
    let text = cluster.cli_ok(&["sweep", "status", sweep_id, "--output", "json"])?;
    Ok(serde_json::from_str(&text)?)
}

#[test]
fn an_asha_sweep_survives_a_coordinator_kill_without_running_a_trial_twice() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 1)?;
    cluster.add_worker("node-b", 1)?;
    let file = cluster.write_job(SWEEP)?;
    let sweep_id = cluster
        .cli_ok(&["sweep", file.to_str().unwrap()])?
        .trim()
        .to_owned();

    // Killed once some trial has finished a rung and others still run.
    let before = poll("a trial to finish a rung", Duration::from_secs(300), || {
        let sweep = sweep(&cluster, &sweep_id)?;
        let trials = sweep["trials"].as_array().cloned().unwrap_or_default();
        let finished = trials.iter().any(|t| t["metric"].is_number());
        let running = trials.iter().any(|t| t["state"] == "running");
        Ok((finished && running).then_some(sweep))
    })?;
    cluster.kill_coordinator();
    cluster.restart_coordinator()?;

    let after = poll("the sweep to end", Duration::from_secs(600), || {
        let sweep = sweep(&cluster, &sweep_id)?;
        Ok((sweep["state"] != "running").then_some(sweep))
    })?;
    assert_eq!(after["state"], "succeeded", "{after}");
    let trials = after["trials"].as_array().context("trials")?;
    assert_eq!(trials.len(), 6, "{after}");
    // The same trial set: every trial seen before the kill has the same values after it.
    let values = |sweep: &Value| -> BTreeMap<u64, Value> {
        sweep["trials"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| (t["trial"].as_u64().unwrap(), t["parameters"].clone()))
            .collect()
    };
    let (seen, ended) = (values(&before), values(&after));
    for (trial, parameters) in &seen {
        assert_eq!(ended.get(trial), Some(parameters), "trial {trial}");
    }
    assert_eq!(
        ended.keys().copied().collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>()
    );

    // No segment ran twice: one job per (trial, rung) it reached, each tagged with it, and no
    // other job of the sweep exists.
    let mut segments = 0;
    let mut steps_used = 0;
    for trial in trials {
        let number = trial["trial"].as_u64().unwrap();
        let rung = trial["rung"].as_u64().unwrap();
        let jobs = trial["job_ids"].as_array().unwrap();
        assert_eq!(jobs.len() as u64, rung + 1, "{trial}");
        let mut last_step = 0;
        for (index, job_id) in jobs.iter().enumerate() {
            let job = cluster.job(job_id.as_str().unwrap())?;
            assert_eq!(job["trial"]["trial"].as_u64(), Some(number), "{job}");
            assert_eq!(job["trial"]["rung"].as_u64(), Some(index as u64), "{job}");
            assert_eq!(job["state"], "succeeded", "{job}");
            last_step = job["metrics"][0]["step"].as_u64().unwrap();
            segments += 1;
        }
        // A promoted trial resumed: its last segment ends at its rung's step, not beyond.
        assert_eq!(last_step, [10, 20, 40][rung as usize], "{trial}");
        assert_eq!(trial["steps"].as_u64(), Some(last_step), "{trial}");
        steps_used += last_step;
    }
    let sweep_jobs = cluster
        .jobs()?
        .into_iter()
        .filter(|job| {
            job["name"]
                .as_str()
                .is_some_and(|name| name.starts_with("survivor-t"))
        })
        .count();
    assert_eq!(
        sweep_jobs, segments,
        "every job of the sweep is one of its segments"
    );
    assert_eq!(after["steps_used"].as_u64(), Some(steps_used), "{after}");
    // ASHA stopped the others: fewer steps than 6 trials run to the end.
    assert!(steps_used < 6 * 40, "{steps_used} steps");
    eprintln!(
        "sweep {sweep_id}: {segments} segments, {steps_used} steps of {} for 6 full trials",
        6 * 40
    );
    Ok(())
}

#[test]
fn a_bad_sweep_is_refused_naming_each_field_before_anything_runs() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    let with_parameters = |parameters: &str, extra: &str| {
        SWEEP
            .replace(
                "\"optimizer.lr\" = { loguniform = [1e-4, 1e-1] }",
                parameters,
            )
            .replace("max_trials = 6\n", extra)
    };
    let cases = [
        (
            with_parameters("\"optimizer.nonsense\" = { uniform = [0.1, 0.2] }", "max_trials = 6\n"),
            "optimizer.nonsense",
        ),
        (
            with_parameters("\"optimizer.lr\" = { uniform = [0.2, 0.1] }", "max_trials = 6\n"),
            "optimizer.lr",
        ),
        (
            with_parameters("\"model.kind\" = { uniform = [0.0, 1.0] }", "max_trials = 6\n"),
            "model.kind",
        ),
        (
            with_parameters(
                "\"model.hidden\" = { choice = [[8], [16], [32]] }\n\"schedule.batch_size\" = \
                 { choice = [32, 64, 128] }",
                "max_trials = 4\n",
            )
            .replace("kind = \"asha\"", "kind = \"grid\"")
            .replace("reduction_factor = 2\nmin_resource = 10\nmax_resource = 40\nresource_unit = \"steps\"\n", ""),
            "grid of 9 trials",
        ),
    ];
    for (text, named) in cases {
        let file = cluster.write_job(&text)?;
        let output = cluster.cli(&["sweep", file.to_str().unwrap()])?;
        let error = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "accepted: {text}");
        assert!(error.contains(named), "{named}: {error}");
    }
    let listed = cluster.cli_ok(&["sweep", "list", "--output", "json"])?;
    assert_eq!(listed.trim(), "[]");
    assert!(cluster.jobs()?.is_empty());
    Ok(())
}

#[test]
fn a_cancelled_sweep_cancels_its_running_trial_and_starts_no_other() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 1)?;
    // Long trials, one at a time.
    let long = SWEEP
        .replace("max_concurrent_trials = 2", "max_concurrent_trials = 1")
        .replace("max_resource = 40", "max_resource = 100000")
        .replace("epochs = 1\n", "epochs = 300\n")
        .replace("max_steps = 40\n", "max_steps = 100000\n")
        .replace("min_resource = 10", "min_resource = 50000");
    let file = cluster.write_job(&long)?;
    let sweep_id = cluster
        .cli_ok(&["sweep", file.to_str().unwrap()])?
        .trim()
        .to_owned();
    let running = poll("a trial to run", Duration::from_secs(120), || {
        let jobs = cluster.jobs()?;
        Ok(jobs
            .into_iter()
            .find(|job| job["state"] == "running")
            .and_then(|job| job["job_id"].as_str().map(str::to_owned)))
    })?;
    let pids = cluster.wait_for_running_ranks(&running)?;
    let cancelled = cluster.cli_ok(&["sweep", "cancel", &sweep_id])?;
    assert!(cancelled.contains("cancelled"), "{cancelled}");
    let job = cluster.wait_for_state(&running, "cancelled", Duration::from_secs(60))?;
    assert_eq!(job["trial"]["trial"].as_u64(), Some(0), "{job}");
    cluster.wait_for_processes_gone(&pids, Duration::from_secs(60))?;
    let sweep = sweep(&cluster, &sweep_id)?;
    assert_eq!(sweep["state"], "cancelled", "{sweep}");
    assert_eq!(sweep["reason"], "cancelled by user", "{sweep}");
    assert_eq!(sweep["trials"].as_array().map(Vec::len), Some(1), "{sweep}");
    assert_eq!(sweep["trials"][0]["state"], "stopped", "{sweep}");
    assert_eq!(cluster.jobs()?.len(), 1, "no other trial started");
    let again = cluster.cli(&["sweep", "cancel", &sweep_id])?;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already cancelled"));
    Ok(())
}
