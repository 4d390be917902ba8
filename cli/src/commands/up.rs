//! `cohort up`: a whole cluster on this machine, for a laptop or a demo (see
//! [`crate::local_cluster`]). Stays in the foreground until Ctrl-C (or until the `--run` job
//! ends), then stops the workers (which stop their ranks) and the coordinator.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use tracing::warn;

use crate::args::UpArgs;
use crate::client::{self, Target};
use crate::commands::{daemons, jobs};
use crate::credentials;
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
    // A local cluster stays on this machine: no --insecure here.
    daemons::listen_policy(&args.listen, false, false)?;
    if let Some(http) = &args.http {
        daemons::listen_policy(http, false, false)?;
    }
    let config = daemons::coordinator_config(&args.settings)?;
    let prepared = daemons::prepare_coordinator(
        &args.settings,
        config,
        &args.listen,
        None,
        args.http.as_deref(),
    )
    .await?;
    let cluster = LocalCluster::start(LocalClusterConfig {
        coordinator: prepared,
        workers: args.workers,
        cpu_slots: args.cpu_slots,
        output_dir: std::path::absolute(&args.output_dir)?,
    })
    .await?;
    let target = cluster.target().clone();
    eprintln!(
        "cohort: local cluster up: coordinator {}, {} workers x {} cpu slots",
        target.address, args.workers, args.cpu_slots
    );
    if let Err(error) = save_credentials(&target) {
        warn!(%error, "could not write the credentials file; other shells need --token");
    }
    let outcome = match job_spec {
        Some(spec_toml) => run_job(&target, spec_toml).await,
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

/// Writes the credentials file of the OS user who ran `cohort up` (mode 0600), so that
/// `cohort status` from another shell works with no flags, as the cluster's admin. A file that
/// names another coordinator off this machine is left alone: it is how this user reaches a
/// real cluster.
fn save_credentials(target: &Target) -> Result<()> {
    let Some(token) = &target.token else {
        bail!("the first admin's token file is gone from the data directory");
    };
    let Some(path) = credentials::default_path() else {
        bail!("no home directory to keep a credentials file in");
    };
    if let Some(existing) = credentials::read(&path)?
        && let Some(coordinator) = &existing.coordinator
        && coordinator != &target.address
        && !daemons::is_loopback(coordinator)
    {
        eprintln!(
            "cohort: {} names coordinator {coordinator}; left as it is (this cluster's admin \
             token is in the data directory's admin-token)",
            path.display()
        );
        return Ok(());
    }
    credentials::write(
        &path,
        &credentials::CredentialsFile {
            coordinator: Some(target.address.clone()),
            token: Some(token.expose().to_owned()),
            ca: None,
        },
    )?;
    eprintln!(
        "cohort: credentials for this cluster's admin in {}",
        path.display()
    );
    Ok(())
}

/// Submits a job, streams its output to stdout and its progress to stderr until it ends.
async fn run_job(target: &Target, spec_toml: String) -> Result<ExitCode> {
    let mut client = client::job_control(target).await?;
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
