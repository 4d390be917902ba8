//! The worker's membership session: register, follow the instruction stream, heartbeat, and
//! register again whenever the coordinator forgets or loses this worker.

use std::time::Duration;

use cohort_proto::failover::CoordinatorConnection;
use cohort_proto::v1::membership_client::MembershipClient;
use cohort_proto::v1::{HeartbeatRequest, RegisterRequest, instruction};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::WorkerConfig;
use crate::devices::DeviceInventory;
use crate::error::{Error, Result};
use crate::ranks::Ranks;

/// When the coordinator was last heard from, and how long the worker may go without it.
pub struct Contact {
    /// Last successful registration or heartbeat.
    pub last: Instant,
    /// Silence after which the worker stops its ranks (the coordinator's heartbeat deadline).
    pub deadline: Duration,
    /// The current registration's session id, once registered; the log shipper follows it.
    pub session: watch::Sender<Option<String>>,
    /// Where the last session id is kept across worker restarts; registering again presents
    /// it, since a node whose session is live belongs to that session's holder.
    pub state: std::sync::Arc<crate::records::StateDir>,
}

/// Why a session ended.
pub enum SessionEnd {
    /// The coordinator closed the instruction stream or forgot the session.
    Lost(String),
}

/// Sends the last heartbeat, on shutdown: the final rank states, so the coordinator hears at
/// once how the ranks ended, and that this node leaves.
pub async fn final_heartbeat(
    client: &mut MembershipClient<CoordinatorConnection>,
    config: &WorkerConfig,
    ranks: &Ranks,
    session_id: String,
) {
    let request = HeartbeatRequest {
        node_id: config.node_id.to_string(),
        session_id,
        ranks: ranks.reports(),
        leaving: true,
    };
    match tokio::time::timeout(Duration::from_secs(2), client.heartbeat(request)).await {
        Ok(Ok(_)) => {}
        Ok(Err(status)) => warn!(%status, "final heartbeat failed"),
        Err(_) => warn!("final heartbeat timed out"),
    }
}

/// Registers and serves one session until the coordinator goes away or forgets this worker.
pub async fn serve(
    client: &mut MembershipClient<CoordinatorConnection>,
    config: &WorkerConfig,
    inventory: &dyn DeviceInventory,
    ranks: &Ranks,
    contact: &mut Contact,
) -> Result<SessionEnd> {
    let reports = ranks.reports();
    let request = RegisterRequest {
        node_id: config.node_id.to_string(),
        hostname: crate::config::hostname(),
        address: config.advertise_address.clone(),
        devices: inventory.devices(),
        ranks: reports.clone(),
        session_id: contact
            .session
            .borrow()
            .clone()
            .or_else(|| contact.state.read_session())
            .unwrap_or_default(),
    };
    let rpc_error = |status: tonic::Status| Error::Rpc {
        address: config.coordinator.clone(),
        status: Box::new(status),
    };
    let mut stream = client
        .register(request)
        .await
        .map_err(rpc_error)?
        .into_inner();
    let registered = match stream.message().await.map_err(rpc_error)? {
        Some(message) => match message.kind {
            Some(instruction::Kind::Registered(registered)) => registered,
            other => {
                // Named, not printed: a start instruction carries its job's token.
                let got = match other {
                    Some(instruction::Kind::StartRank(_)) => "a start instruction",
                    Some(instruction::Kind::StopRank(_)) => "a stop instruction",
                    _ => "an empty instruction",
                };
                return Err(Error::Protocol(
                    config.coordinator.clone(),
                    format!("expected a registration first, got {got}"),
                ));
            }
        },
        None => return Ok(SessionEnd::Lost("instruction stream closed".to_owned())),
    };
    ranks.acknowledge(&reports);
    contact.last = Instant::now();
    contact
        .session
        .send_replace(Some(registered.session_id.clone()));
    if let Err(error) = contact.state.write_session(&registered.session_id) {
        warn!(%error, "could not keep the session id; after a restart this worker waits until the node is lost");
    }
    contact.deadline = Duration::from_millis(u64::from(registered.heartbeat_deadline_ms.max(100)));
    let interval = Duration::from_millis(u64::from(registered.heartbeat_interval_ms.max(10)));
    info!(
        node_id = %config.node_id,
        coordinator = %config.coordinator,
        "worker registered"
    );

    let mut changes = ranks.subscribe();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = stream.message() => match message {
                Ok(Some(message)) => match message.kind {
                    Some(instruction::Kind::StartRank(start)) => {
                        debug!(job_id = %start.job_id, rank = start.rank, "start instruction");
                        ranks.start(start);
                    }
                    Some(instruction::Kind::StopRank(stop)) => {
                        ranks.stop(&stop.job_id, stop.rank, stop.attempt, &stop.reason);
                    }
                    Some(instruction::Kind::Registered(_)) | None => {
                        warn!("ignoring an unexpected instruction");
                    }
                },
                Ok(None) => return Ok(SessionEnd::Lost("instruction stream closed".to_owned())),
                Err(status) => return Ok(SessionEnd::Lost(status.to_string())),
            },
            _ = ticker.tick() => {}
            changed = changes.changed() => {
                if changed.is_err() {
                    return Ok(SessionEnd::Lost("rank table closed".to_owned()));
                }
            }
        }
        let reports = ranks.reports();
        let heartbeat = HeartbeatRequest {
            node_id: config.node_id.to_string(),
            session_id: registered.session_id.clone(),
            ranks: reports.clone(),
            leaving: false,
        };
        match client.heartbeat(heartbeat).await {
            Ok(response) if response.get_ref().accepted => {
                contact.last = Instant::now();
                ranks.acknowledge(&reports);
            }
            Ok(_) => {
                return Ok(SessionEnd::Lost(
                    "coordinator forgot this session".to_owned(),
                ));
            }
            Err(status) => {
                warn!(%status, "heartbeat failed");
                if contact.last.elapsed() > contact.deadline {
                    return Ok(SessionEnd::Lost(format!(
                        "no answer for {:?}",
                        contact.deadline
                    )));
                }
            }
        }
    }
}
