//! Job commands: submit, status, logs, cancel, nodes.

use cohort_proto::failover::CoordinatorConnection;
use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use cohort_coordinator::logs::fold::{Folder, RankLine};
use cohort_proto::v1::job_control_client::JobControlClient;
use cohort_proto::v1::{
    CancelJobRequest, CreateDashboardLinkRequest, DrainNodeRequest, GetJobMetricsRequest,
    GetJobRequest, JobInfo, JobMetricsResponse, JobState, ListNodesRequest, LogStream,
    StreamLogsRequest, WatchJobRequest,
};

use crate::args::{
    CancelArgs, DashboardArgs, DrainArgs, LogsArgs, MetricsArgs, MetricsFormat, NodesArgs,
    OutputFormat, StatusArgs, SubmitArgs,
};
use crate::client;
use crate::render;

/// Reads and validates a job file locally, reporting every problem with its field path.
pub fn read_spec(path: &std::path::Path) -> Result<String> {
    let metadata =
        std::fs::metadata(path).with_context(|| format!("reading job file {}", path.display()))?;
    if metadata.len() > cohort_jobspec::MAX_SPEC_BYTES as u64 {
        bail!(
            "job file {}: {} bytes, expected at most {}",
            path.display(),
            metadata.len(),
            cohort_jobspec::MAX_SPEC_BYTES
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading job file {}", path.display()))?;
    if let Err(error) = cohort_jobspec::parse(&text) {
        let count = error.problems().len();
        // The spec error lists its first problems, each bounded, and counts the rest.
        let listed = match &error {
            cohort_jobspec::SpecError::Parse(problem) => problem.to_string(),
            cohort_jobspec::SpecError::Invalid(problems) => problems.to_string(),
        };
        bail!(
            "job file {}: {count} problem{}: {listed}",
            path.display(),
            if count == 1 { "" } else { "s" }
        );
    }
    Ok(text)
}

/// Submits a job file; with `--watch`, follows it and returns its outcome as the exit code.
pub async fn submit(args: SubmitArgs) -> Result<ExitCode> {
    let mut spec_toml = read_spec(&args.file)?;
    let mut resume_from = String::new();
    match args.resume_from.as_deref().map(ResumeFrom::of) {
        None => {}
        Some(ResumeFrom::Directory(checkpoint)) => {
            spec_toml = with_resume_from(&spec_toml, &checkpoint)?;
        }
        Some(ResumeFrom::Recorded(reference)) => {
            let spec = cohort_jobspec::parse(&spec_toml)?;
            if spec.kind != cohort_jobspec::JobKind::Train {
                bail!("--resume-from: only a kind = \"train\" job can start from a checkpoint");
            }
            resume_from = reference;
        }
    }
    let mut client = client::job_control(&args.coordinator.target()?).await?;
    let request = cohort_proto::v1::SubmitJobRequest {
        spec_toml,
        wait_for_resources: args.wait_for_resources,
        resume_from,
    };
    let job = client::submit_request(&mut client, request).await?;
    println!("{}", job.job_id);
    if !args.watch {
        return Ok(ExitCode::SUCCESS);
    }
    watch(&mut client, &job.job_id).await
}

/// What `--resume-from` names: a checkpoint directory here, or a checkpoint another job
/// recorded (`JOB@best`, `JOB@latest`, `JOB@step-N`), which the coordinator resolves.
#[derive(Debug, PartialEq)]
enum ResumeFrom {
    Directory(std::path::PathBuf),
    Recorded(String),
}

impl ResumeFrom {
    /// An existing directory wins, so that a directory whose name has an `@` still works.
    fn of(text: &str) -> Self {
        let path = std::path::Path::new(text);
        if !path.is_dir() && text.contains('@') && !text.contains('/') {
            ResumeFrom::Recorded(text.to_owned())
        } else {
            ResumeFrom::Directory(path.to_owned())
        }
    }
}

/// Returns the spec with `checkpoint.resume_from` set to `checkpoint` (made absolute, since
/// ranks resolve relative paths against their own output directory), validated again.
fn with_resume_from(spec_toml: &str, checkpoint: &std::path::Path) -> Result<String> {
    let spec = cohort_jobspec::parse(spec_toml)?;
    if spec.kind != cohort_jobspec::JobKind::Train {
        bail!("--resume-from: only a kind = \"train\" job can start from a checkpoint");
    }
    if !checkpoint.is_dir() {
        bail!(
            "--resume-from {}: not a checkpoint directory (nor JOB@best, JOB@latest or \
             JOB@step-N)",
            checkpoint.display()
        );
    }
    let absolute = std::path::absolute(checkpoint)?;
    Ok(cohort_jobspec::parse::with_field(
        spec_toml,
        "checkpoint.resume_from",
        absolute.display().to_string().into(),
    )?)
}

/// Follows a job until it ends, printing progress to stderr and a summary at the end. Returns
/// success only if the job succeeded.
pub async fn watch(
    client: &mut JobControlClient<CoordinatorConnection>,
    job_id: &str,
) -> Result<ExitCode> {
    let mut stream = client
        .watch_job(WatchJobRequest {
            job_id: job_id.to_owned(),
        })
        .await
        .map_err(client::status)?
        .into_inner();
    let mut progress = render::Progress::new();
    let mut last: Option<JobInfo> = None;
    while let Some(event) = stream.message().await.map_err(client::status)? {
        if let Some(job) = event.job {
            progress.show(&job);
            let done = render::is_final(&job);
            last = Some(job);
            if done {
                break;
            }
        }
    }
    progress.finish();
    let job = last.context("the watch ended before the job did")?;
    if !render::is_final(&job) {
        bail!("lost the watch of job {job_id} before it ended");
    }
    if let Some(accuracy) = job
        .metrics
        .iter()
        .find(|m| m.rank == 0)
        .and_then(|m| m.eval_accuracy)
    {
        eprintln!("final evaluation accuracy: {:.2}%", accuracy * 100.0);
    }
    Ok(if job.state() == JobState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Prints the job table, or one job in detail.
pub async fn status(args: StatusArgs) -> Result<ExitCode> {
    let mut client = client::job_control(&args.coordinator.target()?).await?;
    match args.job {
        Some(job_id) => {
            let job = client
                .get_job(GetJobRequest { job_id })
                .await
                .map_err(client::status)?
                .into_inner();
            match args.output {
                OutputFormat::Json => println!("{}", crate::commands::json::job(&job)),
                OutputFormat::Table => print!("{}", render::job_detail(&job)),
            }
        }
        None => {
            let jobs = client::list_jobs(&mut client).await?;
            match args.output {
                OutputFormat::Json => {
                    let list: Vec<_> = jobs.iter().map(crate::commands::json::job).collect();
                    println!("{}", serde_json::Value::Array(list));
                }
                OutputFormat::Table => print!("{}", render::jobs_table(&jobs)),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a job's captured output, each line prefixed by its rank.
pub async fn logs(args: LogsArgs) -> Result<ExitCode> {
    let mut client = client::job_control(&args.coordinator.target()?).await?;
    if args.errors_first {
        print_first_failure(&mut client, &args.job).await?;
    }
    if args.collapse {
        print_collapsed_logs(&mut client, &args.job, args.rank).await?;
    } else {
        print_logs(&mut client, &args.job, args.follow, args.rank).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `cohort metrics`.
pub async fn metrics(args: MetricsArgs) -> Result<ExitCode> {
    let mut client = client::job_control(&args.coordinator.target()?).await?;
    let curves = client
        .get_job_metrics(GetJobMetricsRequest {
            job_id: args.job.clone(),
            rank: args.rank,
        })
        .await
        .map_err(client::status)?
        .into_inner();
    print!("{}", render_curves(&curves, args.output));
    Ok(ExitCode::SUCCESS)
}

/// `cohort dashboard`: prints the dashboard's one-time login link (to the job's page with
/// `--job`).
pub async fn dashboard(args: DashboardArgs) -> Result<ExitCode> {
    let mut client = client::job_control(&args.coordinator.target()?).await?;
    let next = args
        .job
        .map(|job| format!("/jobs/{job}"))
        .unwrap_or_default();
    let link = client
        .create_dashboard_link(CreateDashboardLinkRequest { next })
        .await
        .map_err(client::status)?
        .into_inner();
    let scheme = if link.tls { "https" } else { "http" };
    println!("{scheme}://{}{}", link.http_address, link.login_path);
    eprintln!(
        "(the link logs one browser in, once, within two minutes; if the coordinator listens on \
         0.0.0.0, use its host name)"
    );
    Ok(ExitCode::SUCCESS)
}

/// A job's curves as `format` prints them.
fn render_curves(curves: &JobMetricsResponse, format: MetricsFormat) -> String {
    let optional = |value: Option<f64>| value.map_or(String::new(), |value| format!("{value}"));
    let rows: Vec<Vec<String>> = curves
        .ranks
        .iter()
        .flat_map(|curve| {
            curve.points.iter().map(move |point| {
                vec![
                    curve.rank.to_string(),
                    point.step.to_string(),
                    point.epoch.to_string(),
                    format!("{}", point.loss),
                    format!("{}", point.samples_per_s),
                    optional(point.eval_loss),
                    optional(point.eval_accuracy),
                    point.reported_at_unix_ms.to_string(),
                ]
            })
        })
        .collect();
    let header = [
        "rank",
        "step",
        "epoch",
        "loss",
        "samples_per_s",
        "eval_loss",
        "eval_accuracy",
        "reported_at_unix_ms",
    ];
    match format {
        MetricsFormat::Table => render::table(&header, &rows),
        MetricsFormat::Csv => std::iter::once(header.join(","))
            .chain(rows.iter().map(|row| row.join(",")))
            .map(|line| line + "\n")
            .collect(),
        MetricsFormat::Json => {
            let ranks: Vec<serde_json::Value> = curves
                .ranks
                .iter()
                .map(|curve| {
                    serde_json::json!({
                        "rank": curve.rank,
                        "points": curve.points.iter().map(|point| serde_json::json!({
                            "step": point.step,
                            "epoch": point.epoch,
                            "loss": point.loss,
                            "samples_per_s": point.samples_per_s,
                            "eval_loss": point.eval_loss,
                            "eval_accuracy": point.eval_accuracy,
                            "reported_at_unix_ms": point.reported_at_unix_ms,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            format!("{}\n", serde_json::json!({ "ranks": ranks }))
        }
    }
}

/// Lines of standard error `--errors-first` shows of the rank that failed first.
const FIRST_FAILURE_LINES: usize = 20;

/// Prints the last lines of standard error of the job's rank that failed first, or says that
/// none failed.
async fn print_first_failure(
    client: &mut JobControlClient<CoordinatorConnection>,
    job_id: &str,
) -> Result<()> {
    let job = client
        .get_job(GetJobRequest {
            job_id: job_id.to_owned(),
        })
        .await
        .map_err(client::status)?
        .into_inner();
    let Some(failed) = job
        .failed_rank
        .and_then(|failed| job.rank_info.iter().find(|rank| rank.rank == failed))
    else {
        println!("== no rank of job {job_id} has failed");
        return Ok(());
    };
    let how = match (failed.exit_code, failed.signal) {
        (_, Some(signal)) => format!("killed by signal {signal}"),
        (Some(code), None) => format!("exit code {code}"),
        (None, None) => "ended".to_owned(),
    };
    let mut stream = open_log(client, job_id, false, Some(failed.rank)).await?;
    let mut last = std::collections::VecDeque::with_capacity(FIRST_FAILURE_LINES);
    while let Some(line) = stream.message().await.map_err(client::status)? {
        if line.stream == LogStream::Stderr as i32 {
            if last.len() == FIRST_FAILURE_LINES {
                last.pop_front();
            }
            last.push_back(line.text);
        }
    }
    println!(
        "== rank {} on node {} failed first ({how}); its last {} lines of standard error:",
        failed.rank,
        failed.node_id,
        last.len()
    );
    for text in last {
        println!("[rank {}]! {text}", failed.rank);
    }
    println!("== the log:");
    Ok(())
}

/// Prints a job's whole log folded across its ranks ([`cohort_coordinator::logs::fold`]).
async fn print_collapsed_logs(
    client: &mut JobControlClient<CoordinatorConnection>,
    job_id: &str,
    rank: Option<u32>,
) -> Result<()> {
    let mut stream = open_log(client, job_id, false, rank).await?;
    let mut folder = Folder::new();
    while let Some(line) = stream.message().await.map_err(client::status)? {
        folder.push(RankLine {
            rank: line.rank,
            stderr: line.stream == LogStream::Stderr as i32,
            text: line.text,
        });
    }
    let mut out = std::io::stdout().lock();
    for folded in folder.finish() {
        if writeln!(out, "{folded}").is_err() {
            // A closed pipe (`| head`) ends the command quietly.
            break;
        }
    }
    Ok(())
}

/// Opens the stream of job `job_id`'s captured lines (only `rank`'s when given; with
/// `follow`, until the job ends).
async fn open_log(
    client: &mut JobControlClient<CoordinatorConnection>,
    job_id: &str,
    follow: bool,
    rank: Option<u32>,
) -> Result<tonic::Streaming<cohort_proto::v1::LogLine>> {
    Ok(client
        .stream_logs(StreamLogsRequest {
            job_id: job_id.to_owned(),
            follow,
            rank,
        })
        .await
        .map_err(client::status)?
        .into_inner())
}

/// Streams a job's captured output to stdout, each line prefixed by its rank; with `follow`,
/// until the job ends.
pub async fn print_logs(
    client: &mut JobControlClient<CoordinatorConnection>,
    job_id: &str,
    follow: bool,
    rank: Option<u32>,
) -> Result<()> {
    let mut stream = open_log(client, job_id, follow, rank).await?;
    let stdout = std::io::stdout();
    while let Some(line) = stream.message().await.map_err(client::status)? {
        let mut out = stdout.lock();
        let marker = if line.stream == LogStream::Stderr as i32 {
            "!"
        } else {
            ""
        };
        if writeln!(out, "[rank {}]{marker} {}", line.rank, line.text).is_err() {
            // A closed pipe (`| head`) ends the command quietly.
            return Ok(());
        }
    }
    Ok(())
}

/// Cancels a job and waits until the coordinator has heard every rank process end.
pub async fn cancel(args: CancelArgs) -> Result<ExitCode> {
    let mut client = client::job_control(&args.coordinator.target()?).await?;
    if args.checkpoint {
        let job = client
            .get_job(GetJobRequest {
                job_id: args.job.clone(),
            })
            .await
            .map_err(client::status)?
            .into_inner();
        check_stops_with_checkpoint(&job)?;
    }
    let job = cancel_and_wait(&mut client, &args.job).await?;
    println!(
        "{}: {} ({} ranks stopped)",
        job.job_id,
        render::job_state(job.state()),
        job.rank_info.len()
    );
    if args.checkpoint {
        let rank_zero = job.rank_info.iter().find(|rank| rank.rank == 0);
        let checkpointed = i32::from(cohort_proto::launch::EXIT_STOPPED_WITH_CHECKPOINT);
        match rank_zero {
            Some(rank) if rank.exit_code == Some(checkpointed) => {
                println!("{}", rank.detail.trim_start_matches("[cohort] "));
            }
            Some(rank) => bail!(
                "job {} cancelled, but no checkpoint was written: rank 0 {}{}",
                job.job_id,
                match rank.exit_code {
                    Some(code) => format!("exited with code {code}"),
                    None => "ended".to_owned(),
                },
                if rank.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", rank.detail)
                }
            ),
            None => bail!(
                "job {} cancelled before it was placed: nothing to checkpoint",
                job.job_id
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses `cancel --checkpoint` for a job whose processes do not checkpoint on request: only
/// the data-parallel loop of Cohort's own runtime over the TCP ring does.
fn check_stops_with_checkpoint(job: &JobInfo) -> Result<()> {
    use cohort_jobspec::train::{CollectiveBackend, Communication, ModelKind};
    let spec = cohort_jobspec::parse(&job.spec_toml)
        .with_context(|| format!("job {}'s spec", job.job_id))?;
    let why_not = match spec.kind {
        cohort_jobspec::JobKind::Command => Some(
            "a command job's program decides itself what to do on SIGTERM (its ranks get one \
             on any cancel)",
        ),
        cohort_jobspec::JobKind::Train => {
            let parallel = spec.parallel.clone().unwrap_or_default();
            let model = spec.model.clone().unwrap_or_default();
            if model.kind == ModelKind::Transformer {
                Some("transformer jobs do not checkpoint on request yet")
            } else if parallel.comm == Communication::Ps {
                Some("parameter-server jobs do not checkpoint on request yet")
            } else if cohort_jobspec::layout::gradient_transport(&spec) == CollectiveBackend::Nccl {
                Some("NCCL jobs do not checkpoint on request yet")
            } else {
                None
            }
        }
    };
    match why_not {
        Some(why) => bail!("--checkpoint: {why}; cancel without --checkpoint"),
        None => Ok(()),
    }
}

/// Cancels a job and polls until the workers have seen every rank process end (after at most
/// the job's grace period); returns the job as it is then.
pub async fn cancel_and_wait(
    client: &mut JobControlClient<CoordinatorConnection>,
    job_id: &str,
) -> Result<JobInfo> {
    let mut job = client
        .cancel_job(CancelJobRequest {
            job_id: job_id.to_owned(),
        })
        .await
        .map_err(client::status)?
        .into_inner();
    // The longest grace period a spec may ask for, plus time for the reports.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(660);
    while job.rank_info.iter().any(|rank| {
        matches!(
            rank.state(),
            cohort_proto::v1::RankState::Running | cohort_proto::v1::RankState::Pending
        )
    }) {
        if std::time::Instant::now() > deadline {
            bail!("job {job_id} cancelled, but some ranks still report running");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        job = client
            .get_job(GetJobRequest {
                job_id: job_id.to_owned(),
            })
            .await
            .map_err(client::status)?
            .into_inner();
    }
    Ok(job)
}

/// Drains a node (or takes the drain back) and says which jobs move off it and which stay to
/// their end.
pub async fn drain(args: DrainArgs) -> Result<ExitCode> {
    let mut client = client::job_control(&args.coordinator.target()?).await?;
    let response = client
        .drain_node(DrainNodeRequest {
            node_id: args.node.clone(),
            undo: args.undo,
        })
        .await
        .map_err(client::status)?
        .into_inner();
    if args.undo {
        println!("node {}: takes work again", args.node);
        return Ok(ExitCode::SUCCESS);
    }
    println!("node {}: draining, nothing new is placed on it", args.node);
    for job in &response.moved_jobs {
        println!("{job}: moving off it (checkpoint, then a restart elsewhere)");
    }
    for job in &response.staying_jobs {
        println!(
            "{job}: runs to its end there (it may not restart: fault_tolerance.max_restarts = 0)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the node table.
pub async fn queues(args: NodesArgs) -> Result<ExitCode> {
    let mut client = client::job_control(&args.coordinator.target()?).await?;
    let queues = client
        .list_queues(cohort_proto::v1::ListQueuesRequest {})
        .await
        .map_err(client::status)?
        .into_inner();
    match args.output {
        OutputFormat::Json => println!("{}", crate::commands::json::queues(&queues)),
        OutputFormat::Table => print!("{}", render::queues_table(&queues)),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn nodes(args: NodesArgs) -> Result<ExitCode> {
    let mut client = client::job_control(&args.coordinator.target()?).await?;
    let nodes = client
        .list_nodes(ListNodesRequest {})
        .await
        .map_err(client::status)?
        .into_inner()
        .nodes;
    match args.output {
        OutputFormat::Json => {
            let list: Vec<_> = nodes.iter().map(crate::commands::json::node).collect();
            println!("{}", serde_json::Value::Array(list));
        }
        OutputFormat::Table => print!("{}", render::nodes_table(&nodes)),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_from_is_a_recorded_checkpoint_unless_it_is_a_directory_or_a_path() {
        assert_eq!(
            ResumeFrom::of("mlp-3@best"),
            ResumeFrom::Recorded("mlp-3@best".to_owned())
        );
        assert_eq!(
            ResumeFrom::of("runs/a@b/step-00000020"),
            ResumeFrom::Directory("runs/a@b/step-00000020".into())
        );
    }
}
