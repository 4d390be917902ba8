//! What a job may reach: a rank that cannot read the data set or the checkpoint its spec names
//! fails before joining its peers, and the job's failure reason says which path and why (the
//! rank's last stderr line, which its worker reports and the coordinator appends to the
//! reason). The spec-level refusals (a checkpoint directory outside the job's outputs, a
//! variable Cohort manages) are in `validation.rs`.

use std::time::Duration;

use anyhow::Result;
use cohort_cluster_tests::jobs::mlp_job;
use cohort_cluster_tests::sandbox::Sandbox;

/// Submits a one-rank, one-step MLP job with `extra` sections appended, waits for it to fail
/// and returns its reason.
fn failure_reason(cluster: &mut Sandbox, name: &str, extra: &str) -> Result<String> {
    let job = format!("{}{extra}", mlp_job(name, 1, 1, Some(1), 0.002, ""));
    let job_id = cluster.submit(&job, &[])?;
    let job = cluster.wait_for_state(&job_id, "failed", Duration::from_secs(120))?;
    Ok(job["reason"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn a_rank_that_cannot_read_its_data_fails_the_job_naming_the_path() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-data", 1)?;
    let missing = cluster.path().join("missing");
    let reason = failure_reason(
        &mut cluster,
        "no-data",
        &format!("[data]\npath = \"{}\"\n", missing.display()),
    )?;
    assert!(
        reason.contains("data.path")
            && reason.contains(&missing.display().to_string())
            && reason.contains("No such file or directory"),
        "the reason must name data.path, {} and the os error: {reason:?}",
        missing.display()
    );
    Ok(())
}

/// Fashion-MNIST must be installed (the rank checks its data set first).
#[test]
fn a_rank_that_cannot_read_its_checkpoint_fails_the_job_naming_the_path() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-checkpoint", 1)?;
    let missing = cluster.path().join("old-run").join("step-00000500");
    let reason = failure_reason(
        &mut cluster,
        "no-checkpoint",
        &format!("[checkpoint]\nresume_from = \"{}\"\n", missing.display()),
    )?;
    assert!(
        reason.contains("checkpoint.resume_from")
            && reason.contains(&missing.display().to_string())
            && reason.contains("model.safetensors")
            && reason.contains("No such file or directory"),
        "the reason must name checkpoint.resume_from, {} and the os error: {reason:?}",
        missing.display()
    );
    Ok(())
}
