//! The Cohort coordinator: accepts jobs, keeps cluster state, tracks workers by heartbeat, and
//! gang-schedules each job's ranks onto devices. It never links training code: it knows jobs,
//! nodes and devices, not tensors.
//!
//! Where things are decided:
//! - [`placement`]: where a job's ranks go (a pure function with property tests).
//! - [`lifecycle`]: which job state changes are legal (the one state machine).
//! - [`cluster`]: the domain core that applies both: submission, cancellation, rank outcomes,
//!   membership and lost-node handling, the scheduler pass.
//! - [`store`]: durable state behind [`store::ClusterStore`] (embedded redb, or etcd).
//! - [`rendezvous`]: the per-job key-value store and barrier ranks use to find each other.
//! - [`logs`]: captured rank output, on disk and live to followers.
//! - [`auth`]: who is calling (users, workers, jobs, by token) and what they may do.
//! - [`service`]: the gRPC layer: authenticate, decode, call [`cluster::Cluster`], encode.
//! - [`model`], [`convert`], [`config`], [`limits`], [`error`]: records, protocol conversions,
//!   settings, request bounds, and the crate's error type.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod convert;
pub mod error;
pub mod lifecycle;
pub mod limits;
pub mod logs;
pub mod model;
pub mod placement;
pub mod rendezvous;
pub mod service;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use cohort_proto::MAX_MESSAGE_BYTES;
use cohort_proto::v1::job_control_server::JobControlServer;
use cohort_proto::v1::membership_server::MembershipServer;
use cohort_proto::v1::rendezvous_server::RendezvousServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

pub use cluster::Cluster;
pub use config::CoordinatorConfig;
pub use error::{Error, Result};
pub use store::ClusterStore;

/// Which store the coordinator keeps its state in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// The embedded database under the data directory.
    Embedded,
    /// An etcd cluster at `host:port`.
    Etcd(String),
}

impl std::str::FromStr for StoreLocation {
    type Err = Error;

    /// Parses `embedded` or `etcd://host:port`.
    fn from_str(text: &str) -> Result<Self> {
        if text == "embedded" {
            return Ok(StoreLocation::Embedded);
        }
        match text.strip_prefix("etcd://") {
            Some(endpoint) if !endpoint.is_empty() => Ok(StoreLocation::Etcd(endpoint.to_owned())),
            _ => Err(Error::InvalidArgument(format!(
                "store {text:?}: expected \"embedded\" or \"etcd://host:port\""
            ))),
        }
    }
}

/// Opens the store named by `location`.
pub async fn open_store(
    location: &StoreLocation,
    config: &CoordinatorConfig,
) -> Result<Arc<dyn ClusterStore>> {
    Ok(match location {
        StoreLocation::Embedded => {
            Arc::new(store::embedded::EmbeddedStore::open(&config.data_dir)?)
        }
        StoreLocation::Etcd(endpoint) => {
            Arc::new(store::etcd::EtcdStore::connect(endpoint, "/cohort").await?)
        }
    })
}

/// Serves the coordinator on `listener` until `shutdown` resolves, to the callers `auth`
/// knows (built with [`auth::Authenticator::load`] over the same store, before the address is
/// published, so that the credential files it writes exist once anyone can connect).
pub async fn run(
    config: CoordinatorConfig,
    store: Arc<dyn ClusterStore>,
    auth: Arc<auth::Authenticator>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let address = listener
        .local_addr()
        .map_err(|e| Error::io("reading the listener's address", e))?;
    let mut server = tonic::transport::Server::builder();
    let tls = config.tls.is_some();
    if let Some(identity) = &config.tls {
        server = server.tls_config(identity.config()).map_err(|error| {
            Error::InvalidArgument(format!("the TLS certificate and key: {error}"))
        })?;
    }
    let cluster = Arc::new(Cluster::load(config, store).await?);
    let (stop_background, background_stopped) = tokio::sync::oneshot::channel::<()>();
    let background = tokio::spawn(cluster.clone().run_background(async {
        let _ = background_stopped.await;
    }));
    let service = service::CoordinatorService::new(cluster.clone(), auth);
    info!(%address, tls, "coordinator ready");
    let result = server
        .add_service(
            JobControlServer::new(service.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            MembershipServer::new(service.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            RendezvousServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    let _ = stop_background.send(());
    let _ = background.await;
    // Every job change made before the server stopped is stored before the coordinator exits.
    if let Err(error) = cluster.flush().await {
        tracing::warn!(%error, "job writes did not all land before shutdown");
    }
    info!(%address, "coordinator stopped");
    Ok(result?)
}
