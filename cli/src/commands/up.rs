//! `cohort up`: a whole cluster on this machine, for a laptop or a demo. The coordinator runs in
//! this process; every worker is a separate `cohort worker` process, exactly as on a real
//! cluster. Stays in the foreground until Ctrl-C (or until the `--run` job ends), then stops the
//! workers (which stop their ranks) and the coordinator.

use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cohort_proto::v1::ListNodesRequest;
use tokio::process::{Child, Command};
use tracing::warn;

use crate::args::UpArgs;
use crate::client;
use crate::commands::{daemons, jobs};

/// How long workers get to register before `up` gives up.
const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(60);

fn spawn_worker(address: &str, index: u32, cpu_slots: u32) -> Result<Child> {
    let executable = std::env::current_exe().context("locating the cohort executable")?;
    let mut command = Command::new(executable);
    command
        .args(["worker", "--coordinator", address])
        .args(["--cpu-slots", &cpu_slots.to_string()])
        .args(["--node-id", &format!("local-{index}")])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if std::env::var_os("RUST_LOG").is_none() {
        // Progress goes to this terminal; workers only speak up when something is wrong.
        command.env("RUST_LOG", "warn");
    }
    cohort_worker::process::die_with_parent(&mut command);
    command
        .spawn()
        .with_context(|| format!("starting worker {index}"))
}

/// Polls the coordinator until `workers` nodes are ready.
async fn wait_for_workers(address: &str, workers: u32, children: &mut [Child]) -> Result<()> {
    let mut client = client::job_control(address).await?;
    let deadline = tokio::time::Instant::now() + REGISTRATION_TIMEOUT;
    loop {
        let nodes = client
            .list_nodes(ListNodesRequest {})
            .await
            .map_err(client::status)?
            .into_inner()
            .nodes;
        let ready = nodes.iter().filter(|n| n.status == "ready").count();
        if ready >= workers as usize {
            return Ok(());
        }
        for (index, child) in children.iter_mut().enumerate() {
            if let Some(status) = child.try_wait()? {
                bail!("worker {index} exited during start-up ({status})");
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("only {ready} of {workers} workers registered within {REGISTRATION_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops every worker with SIGTERM (they stop their ranks first) and waits for them.
async fn stop_workers(children: &mut [Child]) {
    for child in children.iter() {
        if let Some(pid) = child.id() {
            cohort_worker::process::signal_process(pid, cohort_worker::process::SIGTERM);
        }
    }
    for child in children.iter_mut() {
        match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                warn!("a worker did not stop within 30 s; killing it");
                let _ = child.kill().await;
            }
        }
    }
}

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
    let (config, store, listener) =
        daemons::prepare_coordinator(&args.settings, &args.listen).await?;
    let address = listener.local_addr()?.to_string();
    let (stop_coordinator, coordinator_stopped) = tokio::sync::oneshot::channel::<()>();
    let coordinator = tokio::spawn(cohort_coordinator::run(config, store, listener, async {
        let _ = coordinator_stopped.await;
    }));

    let mut children = Vec::new();
    for index in 0..args.workers {
        children.push(spawn_worker(&address, index, args.cpu_slots)?);
    }
    let outcome = async {
        wait_for_workers(&address, args.workers, &mut children).await?;
        eprintln!(
            "cohort: local cluster up: coordinator {address}, {} workers x {} cpu slots",
            args.workers, args.cpu_slots
        );
        match job_spec {
            Some(spec_toml) => {
                let mut client = client::job_control(&address).await?;
                let job = client
                    .submit_job(cohort_proto::v1::SubmitJobRequest {
                        spec_toml,
                        wait_for_resources: false,
                    })
                    .await
                    .map_err(client::status)?
                    .into_inner()
                    .job
                    .context("coordinator answered without the job")?;
                eprintln!("cohort: submitted {}", job.job_id);
                // The job's output goes to stdout while its progress goes to stderr.
                let mut log_client = client.clone();
                let job_id = job.job_id.clone();
                let logs = tokio::spawn(async move {
                    jobs::print_logs(&mut log_client, &job_id, true, None).await
                });
                let code = tokio::select! {
                    code = jobs::watch(&mut client, &job.job_id) => code,
                    () = daemons::shutdown_signal() => Ok(ExitCode::FAILURE),
                };
                // The log stream ends by itself once the job has ended.
                match tokio::time::timeout(Duration::from_secs(5), logs).await {
                    Ok(Ok(Err(error))) => warn!(%error, "following the job's output failed"),
                    Ok(_) => {}
                    Err(_) => warn!("the job's output did not end with the job"),
                }
                code
            }
            None => {
                eprintln!("cohort: press Ctrl-C to stop");
                daemons::shutdown_signal().await;
                Ok(ExitCode::SUCCESS)
            }
        }
    }
    .await;
    eprintln!("cohort: stopping the local cluster");
    stop_workers(&mut children).await;
    let _ = stop_coordinator.send(());
    match coordinator.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => warn!(%error, "coordinator stopped with an error"),
        Err(error) => warn!(%error, "coordinator task failed"),
    }
    outcome
}
