//! The Cohort worker daemon: runs on every node, offers the node's devices to the coordinator,
//! runs one OS process per rank it is told to start, forwards their output, reports how they
//! end, and stops them on instruction, on shutdown, or when the coordinator has been silent for
//! longer than its heartbeat deadline. It spawns rank processes and never links training code.
//! Each rank's whole process tree is contained (a cgroup, else its process group) and recorded
//! in the worker's state directory until it is gone, so a worker restarted after a crash kills
//! what its predecessor left before it offers the devices again.
//!
//! - [`session`]: registration, the instruction stream and heartbeats.
//! - [`ranks`]: the rank table and each rank's supervising task, stop causes and exit details.
//! - [`containment`]: one cgroup (or process group) per rank's process tree, killing it whole.
//! - [`records`]: the state directory and its per-rank records.
//! - [`leftovers`]: at start, killing and reporting ranks that outlived the previous worker.
//! - [`process`]: spawning a rank's main process, signals and bounded line reading.
//! - [`logship`]: batched, back-pressured shipping of rank output.
//! - [`devices`]: the [`devices::DeviceInventory`] trait and CPU slots.
//! - [`gpu`]: GPUs through the CUDA driver (`cuda` feature), or a typed error without it.
//! - [`config`], [`error`]: settings and the crate's error type.

pub mod config;
pub mod containment;
pub mod devices;
pub mod error;
pub mod gpu;
pub mod leftovers;
pub mod logship;
pub mod process;
pub mod ranks;
pub mod records;
pub mod session;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cohort_proto::MAX_MESSAGE_BYTES;
use cohort_proto::failover::Failover;
use cohort_proto::transport::{CaCertificate, Credentials};
use cohort_proto::v1::StopCause;
use cohort_proto::v1::membership_client::MembershipClient;
use tokio::time::Instant;
use tracing::{info, warn};

pub use config::WorkerConfig;
pub use error::{Error, Result};

use containment::Containment;
use devices::DeviceInventory;
use ranks::{RankContext, Ranks};
use records::StateDir;
use session::{Contact, SessionEnd};

/// Longest wait between two registration attempts.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);
/// Grace period for ranks when the worker itself shuts down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the worker until `shutdown` resolves, then stops every rank and returns. Before it
/// registers (and so before it offers any device), it kills whatever ranks of a previous
/// worker with the same state directory still run; their reports go with the registration.
pub async fn run(
    config: WorkerConfig,
    inventory: Box<dyn DeviceInventory>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let ca = config
        .ca
        .as_deref()
        .map(CaCertificate::read)
        .transpose()
        .map_err(|e| Error::Config(format!("the cluster's CA: {e}")))?;
    let coordinators = Failover::lazy(&config.coordinator, ca.as_ref(), |endpoint| {
        endpoint.connect_timeout(Duration::from_secs(3))
    })
    .map_err(|e| Error::Config(format!("the coordinator's {e}")))?;
    let credentials = Credentials::new(Some(&config.join_token))
        .map_err(|e| Error::Config(format!("join token: {e}")))?;
    let mut client = MembershipClient::new(credentials.wrap(coordinators))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (state, containment, leftovers) = prepare_node(&config).await?;
    let (session, session_changes) = tokio::sync::watch::channel(None);
    let session_state = state.clone();
    let shipper =
        logship::LogShipper::start(client.clone(), config.node_id.to_string(), session_changes);
    let ranks = Ranks::new(
        shipper,
        RankContext {
            coordinator: config.coordinator.clone(),
            node_id: config.node_id.clone(),
            node_address: config.advertise_address.clone(),
            cohort_executable: config.cohort_executable.clone(),
            output_dir: config.output_dir.clone(),
            ca: config.ca.clone(),
            tls: config.tls.clone(),
        },
        containment.clone(),
        state,
    );
    ranks.adopt(leftovers);
    info!(
        node_id = %config.node_id,
        coordinator = %config.coordinator,
        devices = inventory.devices().len(),
        containment = containment.kind(),
        "worker ready"
    );
    let mut contact = Contact {
        last: Instant::now(),
        deadline: Duration::from_secs(5),
        session,
        state: session_state,
    };
    let sessions = async {
        let mut delay = Duration::from_millis(100);
        loop {
            match session::serve(
                &mut client,
                &config,
                inventory.as_ref(),
                &ranks,
                &mut contact,
            )
            .await
            {
                Ok(SessionEnd::Lost(why)) => {
                    warn!(coordinator = %config.coordinator, why, "lost the coordinator; registering again");
                    // Registering again comes first: with several coordinators, the next one
                    // to lead adopts the running ranks if they reach it in time.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    delay = Duration::from_millis(100);
                    continue;
                }
                Err(error) => warn!(%error, "registration failed"),
            }
            if contact.last.elapsed() > contact.deadline && ranks.running() > 0 {
                warn!(
                    deadline_s = contact.deadline.as_secs_f64(),
                    "coordinator silent past its deadline; stopping every rank"
                );
                let ranks = ranks.clone();
                tokio::spawn(async move {
                    ranks
                        .stop_all(SHUTDOWN_GRACE, StopCause::CoordinatorLost)
                        .await;
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_RETRY_DELAY);
        }
    };
    tokio::select! {
        () = shutdown => {}
        () = sessions => {}
    }
    info!("worker shutting down; stopping ranks");
    ranks
        .stop_all(SHUTDOWN_GRACE, StopCause::WorkerShutdown)
        .await;
    let session_id = contact.session.borrow().clone();
    if let Some(session_id) = session_id {
        session::final_heartbeat(&mut client, &config, &ranks, session_id).await;
    }
    containment.release();
    Ok(())
}

/// Makes the node fit to offer its devices: locks the state directory, kills what ranks of a
/// previous worker left (their reports are returned), and decides the containment of new ranks.
async fn prepare_node(
    config: &WorkerConfig,
) -> Result<(
    Arc<StateDir>,
    Containment,
    Vec<cohort_proto::v1::RankReport>,
)> {
    let state = StateDir::open(&config.state_dir)?;
    info!(state_dir = %state.path().display(), "worker state directory");
    // Before the probe: the previous worker's cgroup directory may carry this worker's name
    // (the same pid after a restart in a container), and is removed once empty.
    let leftovers = leftovers::reclaim(&state).await;
    if !leftovers.is_empty() {
        warn!(
            ranks = leftovers.len(),
            "killed ranks that outlived the previous worker; reporting them"
        );
    }
    let containment = Containment::probe(config.node_id.as_str());
    Ok((Arc::new(state), containment, leftovers))
}
