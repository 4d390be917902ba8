//! A whole cluster on this machine: the coordinator in this process, every worker a separate
//! `cohort worker` process, exactly as on a real cluster. Used by `cohort up` and by the
//! benchmarks, which run their ranks as real jobs.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cohort_proto::v1::ListNodesRequest;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::client::{self, Target};
use crate::coordinator_setup::PreparedCoordinator;
use cohort_proto::Secret;

/// How long workers get to register before start-up fails.
const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a worker gets to stop its ranks and exit before it is killed.
const WORKER_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// What to start.
pub struct LocalClusterConfig {
    /// The coordinator: settings, store, users, bound listener.
    pub coordinator: PreparedCoordinator,
    /// Number of worker processes. The first offers the machine's GPUs (in a `cuda` build);
    /// the others offer CPU slots only.
    pub workers: u32,
    /// CPU slots of each worker.
    pub cpu_slots: u32,
    /// Parent of the jobs' output directories (`--output-dir` of the workers).
    pub output_dir: PathBuf,
}

/// A running local cluster. Call [`LocalCluster::shutdown`] to stop it cleanly; dropping it
/// kills the workers.
pub struct LocalCluster {
    /// The coordinator, and the first admin's token to call it with.
    target: Target,
    /// Worker processes.
    workers: Vec<Child>,
    /// The workers' state directories, under `<state root>/up-<coordinator port>`: local
    /// clusters running at once never share one (their coordinators' ports differ), and one
    /// started again on the same port kills what a crashed predecessor's ranks left.
    state_dirs: Vec<PathBuf>,
    /// Stops the in-process coordinator.
    stop_coordinator: Option<oneshot::Sender<()>>,
    /// The coordinator's task.
    coordinator: Option<JoinHandle<cohort_coordinator::Result<()>>>,
}

/// The state directory of local worker `index` of the cluster whose coordinator is at
/// `address`.
fn state_dir(address: &str, index: u32) -> Result<PathBuf> {
    let port = address.rsplit_once(':').map_or(address, |(_, port)| port);
    Ok(cohort_worker::config::state_root()?
        .join(format!("up-{port}"))
        .join(format!("worker-local-{index}")))
}

fn spawn_worker(
    address: &str,
    join_token: &Secret,
    index: u32,
    cpu_slots: u32,
    output_dir: &PathBuf,
    state_dir: &PathBuf,
) -> Result<Child> {
    let executable = std::env::current_exe().context("locating the cohort executable")?;
    let mut command = Command::new(executable);
    command
        .args(["worker", "--coordinator", address])
        .args(["--cpu-slots", &cpu_slots.to_string()])
        .args(["--node-id", &format!("local-{index}")])
        .arg("--output-dir")
        .arg(output_dir)
        .arg("--state-dir")
        .arg(state_dir)
        // In the environment, which only this user can read, rather than on the command line.
        .env("COHORT_JOIN_TOKEN", join_token.expose())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if index > 0 {
        // The workers share one machine: only the first offers its GPUs, or each GPU would be
        // handed out once per worker.
        command.args(["--gpus", "none"]);
    }
    if std::env::var_os("RUST_LOG").is_none() {
        // The command's own output goes to this terminal; workers speak up only when something
        // is wrong.
        command.env("RUST_LOG", "warn");
    }
    cohort_worker::process::die_with_parent(&mut command);
    command
        .spawn()
        .with_context(|| format!("starting worker {index}"))
}

impl LocalCluster {
    /// Starts the coordinator and the workers, and returns once every worker is registered.
    pub async fn start(config: LocalClusterConfig) -> Result<Self> {
        let prepared = config.coordinator;
        let target = Target {
            address: prepared.listener.local_addr()?.to_string(),
            token: prepared.admin_token.clone(),
            ca: None,
        };
        let join_token = prepared.join_token.clone();
        let (stop_coordinator, coordinator_stopped) = oneshot::channel::<()>();
        let coordinator = tokio::spawn(cohort_coordinator::run(
            prepared.config,
            prepared.store,
            prepared.auth,
            prepared.listener,
            prepared.http,
            prepared.leadership,
            async {
                let _ = coordinator_stopped.await;
            },
        ));
        let mut cluster = Self {
            target,
            workers: Vec::new(),
            state_dirs: Vec::new(),
            stop_coordinator: Some(stop_coordinator),
            coordinator: Some(coordinator),
        };
        for index in 0..config.workers {
            let state_dir = state_dir(&cluster.target.address, index)?;
            let worker = spawn_worker(
                &cluster.target.address,
                &join_token,
                index,
                config.cpu_slots,
                &config.output_dir,
                &state_dir,
            )?;
            cluster.workers.push(worker);
            cluster.state_dirs.push(state_dir);
        }
        cluster.wait_for_workers(config.workers).await?;
        Ok(cluster)
    }

    /// The coordinator, with the first admin's token.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Polls the coordinator until `workers` nodes are ready.
    async fn wait_for_workers(&mut self, workers: u32) -> Result<()> {
        let mut client = client::job_control(&self.target).await?;
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
            for (index, child) in self.workers.iter_mut().enumerate() {
                if let Some(status) = child.try_wait()? {
                    bail!("worker {index} exited during start-up ({status})");
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "only {ready} of {workers} workers registered within {REGISTRATION_TIMEOUT:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every worker with SIGTERM (they stop their ranks first), then the coordinator.
    pub async fn shutdown(mut self) {
        for child in &self.workers {
            if let Some(pid) = child.id() {
                cohort_worker::process::signal_process(pid, cohort_worker::process::SIGTERM);
            }
        }
        for child in &mut self.workers {
            if tokio::time::timeout(WORKER_STOP_TIMEOUT, child.wait())
                .await
                .is_err()
            {
                warn!("a worker did not stop within {WORKER_STOP_TIMEOUT:?}; killing it");
                let _ = child.kill().await;
            }
        }
        // Workers that stopped cleanly left nothing to reclaim: drop their state directories
        // (one that still holds rank records stays, for a later cluster on this port).
        for dir in &self.state_dirs {
            let _ = cohort_worker::records::remove_if_unused(dir);
        }
        if let Some(parent) = self.state_dirs.first().and_then(|dir| dir.parent()) {
            let _ = std::fs::remove_dir(parent);
        }
        if let Some(stop) = self.stop_coordinator.take() {
            let _ = stop.send(());
        }
        if let Some(coordinator) = self.coordinator.take() {
            match coordinator.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => warn!(%error, "coordinator stopped with an error"),
                Err(error) => warn!(%error, "coordinator task failed"),
            }
        }
    }
}
