//! `cohort coordinator` and `cohort worker`: thin wrappers that turn flags into configs and run
//! the daemons until Ctrl-C or SIGTERM.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cohort_coordinator::{CoordinatorConfig, StoreLocation};
use cohort_proto::NodeId;
use cohort_worker::WorkerConfig;
use cohort_worker::devices::{Combined, CpuSlots};
use cohort_worker::gpu::GpuInventory;
use tokio::net::TcpListener;

use crate::args::{ClusterSettings, CoordinatorDaemonArgs, WorkerDaemonArgs};

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

fn seconds(flag: &str, value: f64) -> Result<Duration> {
    if !(value.is_finite() && value > 0.0 && value <= 3600.0) {
        bail!("--{flag} = {value}, expected more than 0 and at most 3600 seconds");
    }
    Ok(Duration::from_secs_f64(value))
}

/// Builds the coordinator's config from flags.
pub fn coordinator_config(settings: &ClusterSettings) -> Result<CoordinatorConfig> {
    let defaults = CoordinatorConfig::default();
    let heartbeat_deadline = seconds("heartbeat-deadline-s", settings.heartbeat_deadline_s)?;
    let heartbeat_interval = seconds("heartbeat-interval-s", settings.heartbeat_interval_s)?;
    if heartbeat_interval >= heartbeat_deadline {
        bail!(
            "--heartbeat-interval-s = {}, expected less than --heartbeat-deadline-s = {}",
            settings.heartbeat_interval_s,
            settings.heartbeat_deadline_s
        );
    }
    Ok(CoordinatorConfig {
        data_dir: settings.data_dir.clone().unwrap_or(defaults.data_dir),
        heartbeat_interval,
        heartbeat_deadline,
        restart_grace: heartbeat_deadline,
        max_queued_jobs: positive("max-queued-jobs", settings.max_queued_jobs)?,
        max_queued_jobs_per_submitter: positive(
            "max-queued-jobs-per-submitter",
            settings.max_queued_jobs_per_submitter,
        )?,
        ..defaults
    })
}

fn positive(flag: &str, value: usize) -> Result<usize> {
    if value == 0 {
        bail!("--{flag} = 0, expected at least 1");
    }
    Ok(value)
}

/// Opens the store the flags name and binds the listener.
pub async fn prepare_coordinator(
    settings: &ClusterSettings,
    listen: &str,
) -> Result<(
    CoordinatorConfig,
    std::sync::Arc<dyn cohort_coordinator::ClusterStore>,
    TcpListener,
)> {
    let config = coordinator_config(settings)?;
    let location: StoreLocation = settings.store.parse()?;
    let store = cohort_coordinator::open_store(&location, &config).await?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    Ok((config, store, listener))
}

/// Writes `contents` to `path` atomically (temporary file, then rename), so that a reader
/// polling for the file never sees it half written.
fn write_atomically(path: &Path, contents: &str) -> Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, contents)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))
}

/// `cohort coordinator`.
pub async fn coordinator(args: CoordinatorDaemonArgs) -> Result<ExitCode> {
    let (config, store, listener) = prepare_coordinator(&args.settings, &args.listen).await?;
    if let Some(path) = &args.address_file {
        write_atomically(path, &listener.local_addr()?.to_string())?;
    }
    cohort_coordinator::run(config, store, listener, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// The GPUs to offer: those `--gpus` lists (an error if any is missing), none for `none`, or
/// every GPU found when the flag is absent (none, with a note, when there is no CUDA).
fn gpu_inventory(flag: Option<&str>) -> Result<GpuInventory> {
    match flag {
        Some("none") => Ok(GpuInventory::default()),
        Some(list) => {
            let indices = list
                .split(',')
                .map(|index| {
                    index.trim().parse::<u32>().with_context(|| {
                        format!("--gpus {list:?}: expected GPU indices like 0,1 or `none`")
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(GpuInventory::detect(Some(&indices)).with_context(|| format!("--gpus {list}"))?)
        }
        None => match GpuInventory::detect(None) {
            Ok(gpus) => Ok(gpus),
            Err(error) => {
                tracing::info!(%error, "offering no GPUs");
                Ok(GpuInventory::default())
            }
        },
    }
}

/// `cohort worker`.
pub async fn worker(args: WorkerDaemonArgs) -> Result<ExitCode> {
    let node_id = NodeId::new(args.node_id.unwrap_or_else(cohort_worker::config::hostname))?;
    let cpu_slots = match args.cpu_slots {
        Some(0) => bail!("--cpu-slots = 0, expected at least 1"),
        Some(slots) if slots > 4096 => bail!("--cpu-slots = {slots}, expected at most 4096"),
        Some(slots) => slots,
        None => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    };
    let state_dir = match &args.state_dir {
        Some(dir) => std::path::absolute(dir)
            .with_context(|| format!("state directory {}", dir.display()))?,
        None => cohort_worker::config::default_state_dir(&node_id)?,
    };
    let config = WorkerConfig {
        coordinator: args.coordinator,
        state_dir,
        node_id,
        advertise_address: args.advertise_address,
        cpu_slots,
        output_dir: std::path::absolute(&args.output_dir)
            .with_context(|| format!("output directory {}", args.output_dir.display()))?,
        cohort_executable: std::env::current_exe().context("locating the cohort executable")?,
    };
    let gpus = gpu_inventory(args.gpus.as_deref())?;
    let inventory = Combined(vec![
        Box::new(CpuSlots { slots: cpu_slots }),
        Box::new(gpus),
    ]);
    cohort_worker::run(config, Box::new(inventory), shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}
