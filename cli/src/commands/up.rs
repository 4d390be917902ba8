//! `cohort up`: a whole cluster on this machine, for a laptop or a demo (see
//! [`crate::local_cluster`]). Stays in the foreground until Ctrl-C (or until the `--run` job
//! ends), then stops the workers (which stop their ranks) and the coordinator.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use tracing::warn;

use crate::args::UpArgs;
use crate::client;
use crate::commands::{daemons, jobs};
use crate::local_cluster::{LocalCluster, LocalClusterConfig};

/// `cohort up`.
pub async fn up(args: UpArgs) -> Result<ExitCode> {
    if args.workers == 0 || args.workers > 256 {
        bail!("--workers = {}, expected 1 to 256", args.workers);
    }
    if args.cpu_slots == 0 || args.cpu_slots > 4096 {
        bail!("--cpu-slots = {}, expected 1 to 4096", args.cpu_slots);
    }
    // Validate the job before starting anything.
    let job_spec = match &args.run {
        Some(path) => Some(jobs::read_spec(path)?),
        None => None,
    };
    let (coordinator, store, listener) =
        daemons::prepare_coordinator(&args.settings, &args.listen).await?;
    let cluster = LocalCluster::start(LocalClusterConfig {
        coordinator,
        store,
        listener,
        workers: args.workers,
        cpu_slots: args.cpu_slots,
        output_dir: std::path::absolute(&args.output_dir)?,
    })
    .await?;
    let address = cluster.address().to_owned();
    eprintln!(
        "cohort: local cluster up: coordinator {address}, {} workers x {} cpu slots",
        args.workers, args.cpu_slots
    );
    let outcome = match job_spec {
        Some(spec_toml) => run_job(&address, spec_toml).await,
        None => {
            eprintln!("cohort: press Ctrl-C to stop");
            daemons::shutdown_signal().await;
            Ok(ExitCode::SUCCESS)
        }
    };
    eprintln!("cohort: stopping the local cluster");
    cluster.shutdown().await;
    outcome
}

/// Submits a job, streams its output to stdout and its progress to stderr until it ends.
async fn run_job(address: &str, spec_toml: String) -> Result<ExitCode> {
    let mut client = client::job_control(address).await?;
    let job = client::submit(&mut client, spec_toml, false).await?;
    eprintln!("cohort: submitted {}", job.job_id);
    let mut log_client = client.clone();
    let job_id = job.job_id.clone();
    let logs =
        tokio::spawn(async move { jobs::print_logs(&mut log_client, &job_id, true, None).await });
    // `None` when interrupted before the job ended.
    let finished = tokio::select! {
        code = jobs::watch(&mut client, &job.job_id) => Some(code),
        () = daemons::shutdown_signal() => None,
    };
    match finished {
        Some(code) => {
            // The log stream ends by itself once the job has ended.
            match tokio::time::timeout(Duration::from_secs(5), logs).await {
                Ok(Ok(Err(error))) => warn!(%error, "following the job's output failed"),
                Ok(_) => {}
                Err(_) => warn!("the job's output did not end with the job"),
            }
            code
        }
        None => {
            eprintln!("cohort: interrupted; cancelling {}", job.job_id);
            logs.abort();
            jobs::cancel_and_wait(&mut client, &job.job_id).await?;
            // 128 + SIGINT, as shells report an interrupted command.
            Ok(ExitCode::from(130))
        }
    }
}
