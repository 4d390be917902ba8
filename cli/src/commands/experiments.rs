//! Experiment commands: a job's checkpoint versions (`cohort checkpoints`) and hyper-parameter
//! sweeps (`cohort sweep FILE`, `status`, `list`, `cancel`).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cohort_proto::v1::{
    CancelSweepRequest, CheckpointInfo, GetSweepRequest, ListCheckpointsRequest, ListSweepsRequest,
    SubmitSweepRequest, SweepInfo,
};
use serde_json::{Value, json};

use crate::args::{CheckpointsArgs, OutputFormat, SweepArgs, SweepCommand, SweepIdArgs};
use crate::client;
use crate::render;

/// How often `cohort sweep FILE --watch` reads the sweep again.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// `cohort checkpoints JOB`.
pub async fn checkpoints(args: CheckpointsArgs) -> Result<ExitCode> {
    let mut client = client::job_control(&args.coordinator.target()?).await?;
    let checkpoints = client
        .list_checkpoints(ListCheckpointsRequest {
            job_id: args.job_id.clone(),
        })
        .await
        .map_err(client::status)?
        .into_inner()
        .checkpoints;
    match args.output {
        OutputFormat::Json => {
            let list: Vec<Value> = checkpoints.iter().map(checkpoint_json).collect();
            println!("{}", Value::Array(list));
        }
        OutputFormat::Table if checkpoints.is_empty() => {
            println!("job {} has recorded no checkpoint", args.job_id);
        }
        OutputFormat::Table => print!("{}", checkpoints_table(&checkpoints)),
    }
    Ok(ExitCode::SUCCESS)
}

/// `cohort sweep ...`.
pub async fn sweep(args: SweepArgs) -> Result<ExitCode> {
    match args.command {
        Some(SweepCommand::Status(args)) => status(args).await,
        Some(SweepCommand::Cancel(args)) => cancel(args).await,
        Some(SweepCommand::List(args)) => {
            let mut client = client::job_control(&args.coordinator.target()?).await?;
            let sweeps = client
                .list_sweeps(ListSweepsRequest {})
                .await
                .map_err(client::status)?
                .into_inner()
                .sweeps;
            match args.output {
                OutputFormat::Json => {
                    let list: Vec<Value> = sweeps.iter().map(sweep_json).collect();
                    println!("{}", Value::Array(list));
                }
                OutputFormat::Table => print!("{}", sweeps_table(&sweeps)),
            }
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let file = args.file.context("a sweep file is required")?;
            submit(&file, args.watch, &args.coordinator).await
        }
    }
}

/// Validates a sweep file locally, submits it, prints its id; with `watch`, follows it.
async fn submit(
    file: &std::path::Path,
    watch: bool,
    coordinator: &crate::args::CoordinatorArgs,
) -> Result<ExitCode> {
    let metadata = std::fs::metadata(file)
        .with_context(|| format!("reading sweep file {}", file.display()))?;
    if metadata.len() > cohort_jobspec::MAX_SPEC_BYTES as u64 {
        bail!(
            "sweep file {}: {} bytes, expected at most {}",
            file.display(),
            metadata.len(),
            cohort_jobspec::MAX_SPEC_BYTES
        );
    }
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading sweep file {}", file.display()))?;
    if let Err(error) = cohort_jobspec::sweep::parse_sweep(&text) {
        bail!("sweep file {}: {error}", file.display());
    }
    let mut client = client::job_control(&coordinator.target()?).await?;
    let sweep = client
        .submit_sweep(SubmitSweepRequest { spec_toml: text })
        .await
        .map_err(client::status)?
        .into_inner();
    println!("{}", sweep.sweep_id);
    if !watch {
        return Ok(ExitCode::SUCCESS);
    }
    let mut shown = String::new();
    loop {
        let sweep = client
            .get_sweep(GetSweepRequest {
                sweep_id: sweep.sweep_id.clone(),
            })
            .await
            .map_err(client::status)?
            .into_inner();
        let view = sweep_detail(&sweep);
        if view != shown {
            eprint!("{view}");
            shown = view;
        }
        if sweep.state != "running" {
            return Ok(if sweep.state == "succeeded" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        tokio::time::sleep(WATCH_INTERVAL).await;
    }
}

async fn status(args: SweepIdArgs) -> Result<ExitCode> {
    let mut client = client::job_control(&args.coordinator.target()?).await?;
    let sweep = client
        .get_sweep(GetSweepRequest {
            sweep_id: args.sweep_id,
        })
        .await
        .map_err(client::status)?
        .into_inner();
    match args.output {
        OutputFormat::Json => println!("{}", sweep_json(&sweep)),
        OutputFormat::Table => print!("{}", sweep_detail(&sweep)),
    }
    Ok(ExitCode::SUCCESS)
}

async fn cancel(args: SweepIdArgs) -> Result<ExitCode> {
    let mut client = client::job_control(&args.coordinator.target()?).await?;
    let sweep = client
        .cancel_sweep(CancelSweepRequest {
            sweep_id: args.sweep_id,
        })
        .await
        .map_err(client::status)?
        .into_inner();
    match args.output {
        OutputFormat::Json => println!("{}", sweep_json(&sweep)),
        OutputFormat::Table => println!("sweep {} is {}", sweep.sweep_id, sweep.state),
    }
    Ok(ExitCode::SUCCESS)
}

fn optional_figure(value: Option<f64>) -> String {
    value.map_or("-".to_owned(), |value| format!("{value:.4}"))
}

/// Bytes as KiB, MiB or GiB.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn checkpoints_table(checkpoints: &[CheckpointInfo]) -> String {
    let rows: Vec<Vec<String>> = checkpoints
        .iter()
        .map(|checkpoint| {
            vec![
                checkpoint.step.to_string(),
                checkpoint.epoch.to_string(),
                checkpoint.attempt.to_string(),
                optional_figure(checkpoint.eval_loss),
                optional_figure(checkpoint.eval_accuracy),
                size(checkpoint.bytes),
                if checkpoint.best {
                    format!("{} (best)", checkpoint.state)
                } else {
                    checkpoint.state.clone()
                },
                checkpoint.path.clone(),
            ]
        })
        .collect();
    render::table(
        &[
            "STEP",
            "EPOCH",
            "ATTEMPT",
            "EVAL LOSS",
            "EVAL ACC",
            "SIZE",
            "STATE",
            "PATH",
        ],
        &rows,
    )
}

fn checkpoint_json(checkpoint: &CheckpointInfo) -> Value {
    json!({
        "step": checkpoint.step,
        "epoch": checkpoint.epoch,
        "attempt": checkpoint.attempt,
        "path": checkpoint.path,
        "bytes": checkpoint.bytes,
        "eval_loss": checkpoint.eval_loss,
        "eval_accuracy": checkpoint.eval_accuracy,
        "written_at_unix_ms": checkpoint.written_at_unix_ms,
        "state": checkpoint.state,
        "best": checkpoint.best,
    })
}

fn sweeps_table(sweeps: &[SweepInfo]) -> String {
    let rows: Vec<Vec<String>> = sweeps
        .iter()
        .map(|sweep| {
            vec![
                sweep.sweep_id.clone(),
                sweep.state.clone(),
                sweep.searcher.clone(),
                format!("{} ({})", sweep.metric, sweep.mode),
                sweep.max_trials.to_string(),
                sweep.steps_used.to_string(),
                sweep.submitter.clone(),
            ]
        })
        .collect();
    render::table(
        &[
            "SWEEP", "STATE", "SEARCHER", "METRIC", "TRIALS", "STEPS", "USER",
        ],
        &rows,
    )
}

/// A sweep's header and leaderboard.
fn sweep_detail(sweep: &SweepInfo) -> String {
    let mut out = format!(
        "sweep {}: {}{} ({} search, {} trials at most, {} at once; {} {})\nsteps used: {}\n",
        sweep.sweep_id,
        sweep.state,
        if sweep.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", sweep.reason)
        },
        sweep.searcher,
        sweep.max_trials,
        sweep.max_concurrent_trials,
        sweep.mode,
        sweep.metric,
        sweep.steps_used,
    );
    let rows: Vec<Vec<String>> = sweep
        .trials
        .iter()
        .map(|trial| {
            let mut parameters: Vec<String> = trial
                .parameters
                .iter()
                .map(|(path, value)| format!("{path}={value}"))
                .collect();
            parameters.sort();
            vec![
                trial.trial.to_string(),
                optional_figure(trial.metric),
                trial.rung.to_string(),
                trial.steps.to_string(),
                trial.state.clone(),
                parameters.join(" "),
                trial
                    .job_ids
                    .last()
                    .cloned()
                    .unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    out.push_str(&render::table(
        &[
            "TRIAL",
            &sweep.metric.to_uppercase(),
            "RUNG",
            "STEPS",
            "STATE",
            "PARAMETERS",
            "LAST JOB",
        ],
        &rows,
    ));
    out
}

fn sweep_json(sweep: &SweepInfo) -> Value {
    json!({
        "sweep_id": sweep.sweep_id,
        "name": sweep.name,
        "state": sweep.state,
        "reason": sweep.reason,
        "searcher": sweep.searcher,
        "metric": sweep.metric,
        "mode": sweep.mode,
        "max_trials": sweep.max_trials,
        "max_concurrent_trials": sweep.max_concurrent_trials,
        "submitter": sweep.submitter,
        "submitted_at_unix_ms": sweep.submitted_at_unix_ms,
        "finished_at_unix_ms": sweep.finished_at_unix_ms,
        "steps_used": sweep.steps_used,
        "trials": sweep.trials.iter().map(|trial| json!({
            "trial": trial.trial,
            "parameters": trial.parameters,
            "metric": trial.metric,
            "rung": trial.rung,
            "steps": trial.steps,
            "state": trial.state,
            "job_ids": trial.job_ids,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_shown_in_binary_units() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(3 * 1024 * 1024 + 512 * 1024), "3.5 MiB");
    }
}
