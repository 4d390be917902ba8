//! The transformer through the real cluster: a 4-rank hybrid mesh (2 replicas x 2 pipeline
//! stages) trains on Shakespeare, `cohort sample` generates from its checkpoint, and invalid
//! meshes are refused at submission naming their field.

use std::time::Duration;

use anyhow::Result;
use cohort_cluster_tests::sandbox::Sandbox;

/// The Shakespeare text must be reachable by the ranks: `scripts/setup.sh` fetches it into the
/// per-user cache when `../shared/data/shakespeare` is absent.
fn transformer_job(name: &str, parallel: &str) -> String {
    format!(
        r#"
version = 1
name = "{name}"
kind = "train"
[model]
kind = "transformer"
layers = 2
heads = 4
width = 64
context = 32
[data]
dataset = "shakespeare"
[optimizer]
kind = "adamw"
lr = 0.005
[schedule]
batch_size = 32
max_steps = 150
warmup_steps = 10
[parallel]
{parallel}
"#
    )
}

/// Reads `initial validation loss X` / `final validation loss Y` from rank 0's output.
fn validation_loss(logs: &str, which: &str) -> f64 {
    let prefix = format!("{which} validation loss ");
    logs.lines()
        .find_map(|line| line.split(&prefix).nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {which} validation loss in:\n{logs}"))
}

#[test]
fn a_hybrid_mesh_trains_the_transformer_and_its_checkpoint_samples() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 2)?;
    cluster.add_worker("node-b", 2)?;
    let job_id = cluster.submit(
        &transformer_job(
            "gpt",
            "data = 2\npipeline = 2\nmicro_batches = 4\npipeline_schedule = \"1f1b\"",
        ),
        &[],
    )?;
    let job = cluster.wait_for_state(&job_id, "succeeded", Duration::from_secs(900))?;
    assert_eq!(job["metrics"].as_array().map(Vec::len), Some(4), "{job}");
    let logs = cluster.cli_ok(&["logs", &job_id, "--rank", "0"])?;
    let initial = validation_loss(&logs, "initial");
    let last = validation_loss(&logs, "final");
    eprintln!("2x2x1 transformer, 150 steps: validation loss {initial:.4} -> {last:.4}");
    assert!(
        last <= initial - 1.0,
        "validation loss {initial} -> {last}, expected a drop of at least 1 nat"
    );
    let checkpoint = logs
        .lines()
        .find_map(|line| line.split("final checkpoint: ").nth(1))
        .unwrap_or_else(|| panic!("no checkpoint in:\n{logs}"))
        .trim()
        .to_owned();
    let text = cluster.cli_ok(&[
        "sample",
        &checkpoint,
        "--prompt",
        "KING:",
        "--tokens",
        "120",
        "--seed",
        "3",
    ])?;
    eprintln!("sampled:\n{text}");
    assert!(text.starts_with("KING:"), "{text}");
    assert!(text.trim_end().len() >= "KING:".len() + 100, "{text}");
    Ok(())
}

#[test]
fn invalid_meshes_are_refused_at_submission_naming_the_field() -> Result<()> {
    let mut cluster = Sandbox::start()?;
    cluster.add_worker("node-a", 2)?;
    for (parallel, field) in [
        ("data = 2\npipeline = 3", "parallel.pipeline"),
        ("tensor = 3", "parallel.tensor"),
        (
            "pipeline = 2\nstage_layers = [2, 1]",
            "parallel.stage_layers",
        ),
    ] {
        let path = cluster.write_job(&transformer_job("bad", parallel))?;
        let output = cluster.cli(&["submit", path.to_str().unwrap()])?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{parallel}: accepted");
        assert!(stderr.contains(field), "{parallel}: {stderr}");
    }
    assert!(cluster.jobs()?.is_empty(), "nothing invalid was stored");
    Ok(())
}
