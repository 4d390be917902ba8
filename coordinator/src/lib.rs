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
//! - [`leadership`]: with etcd, one leader among several coordinators: election, fenced
//!   writes, and what a standby answers.
//! - [`hangs`]: hang diagnosis: which ranks never entered the operation a job waits in, and
//!   which are stuck in it (a pure function of the ranks' progress reports).
//! - [`stragglers`]: which rank drags a job (step-by-step compute times against the median),
//!   and each node's straggler score that placement weighs.
//! - [`rendezvous`]: the per-job key-value store and barrier ranks use to find each other.
//! - [`logs`]: captured rank output, on disk and live to followers.
//! - [`sweeps`]: hyperparameter sweeps: each trial's parameter values and asynchronous
//!   successive halving, which trial starts or goes on next (pure decisions).
//! - [`checkpoints`]: the checkpoint versions a job recorded, and how `JOB@best`,
//!   `JOB@latest` and `JOB@step-N` resolve through them.
//! - [`auth`]: who is calling (users, workers, jobs, by token) and what they may do.
//! - [`service`]: the gRPC layer: authenticate, decode, call [`cluster::Cluster`], encode.
//! - [`telemetry`], [`http`], [`dashboard`]: `/metrics` for Prometheus and the web dashboard,
//!   on `--http`.
//! - [`model`], [`convert`], [`config`], [`limits`], [`error`]: records, protocol conversions,
//!   settings, request bounds, and the crate's error type.

pub mod auth;
pub mod checkpoints;
pub mod cluster;
pub mod config;
pub mod convert;
pub mod dashboard;
pub mod error;
pub mod hangs;
pub mod http;
pub mod leadership;
pub mod lifecycle;
pub mod limits;
pub mod logs;
pub mod model;
pub mod placement;
pub mod rendezvous;
pub mod service;
pub mod store;
pub mod stragglers;
pub mod sweeps;
pub mod telemetry;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use cohort_proto::MAX_MESSAGE_BYTES;
use cohort_proto::v1::job_control_server::JobControlServer;
use cohort_proto::v1::membership_server::MembershipServer;
use cohort_proto::v1::rendezvous_server::RendezvousServer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{error, info, warn};

pub use cluster::Cluster;
pub use config::CoordinatorConfig;
pub use error::{Error, Result};
pub use leadership::Leadership;
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

/// Opens the store named by `location`. With etcd, first wins the leadership of the
/// coordinators sharing that store (see [`leadership`]), serving standby answers on `listener`
/// until then; the store returned writes only while that leadership lasts.
pub async fn open_store(
    location: &StoreLocation,
    config: &CoordinatorConfig,
    listener: &Arc<TcpListener>,
) -> Result<(Arc<dyn ClusterStore>, Option<Leadership>)> {
    match location {
        StoreLocation::Embedded => Ok((
            Arc::new(store::embedded::EmbeddedStore::open(&config.data_dir)?),
            None,
        )),
        StoreLocation::Etcd(endpoint) => {
            let prefix = store::etcd::DEFAULT_PREFIX;
            let store = store::etcd::EtcdStore::connect(endpoint, prefix).await?;
            let address = match &config.advertise_address {
                Some(address) => address.clone(),
                None => listener
                    .local_addr()
                    .map_err(|e| Error::io("reading the listener's address", e))?
                    .to_string(),
            };
            let leadership = elect(endpoint, prefix, &address, config, listener).await?;
            let store = store.fenced(leadership.fence());
            Ok((Arc::new(store), Some(leadership)))
        }
    }
}

/// Campaigns for the leadership, answering calls on `listener` as a standby meanwhile.
async fn elect(
    endpoint: &str,
    prefix: &str,
    address: &str,
    config: &CoordinatorConfig,
    listener: &Arc<TcpListener>,
) -> Result<Leadership> {
    let (leader, known_leader) = watch::channel(None);
    let (elected, standby_ends) = tokio::sync::oneshot::channel::<()>();
    let standby = tokio::spawn(leadership::standby::serve(
        listener.clone(),
        config.tls.clone(),
        known_leader,
        async {
            let _ = standby_ends.await;
        },
    ));
    info!(%address, "standing by until elected");
    let outcome =
        Leadership::campaign(endpoint, prefix, address, config.leader_lease, &leader).await;
    let _ = elected.send(());
    // Standby answers are immediate, so connections drain at once; a client that holds one
    // open is cut off rather than allowed to keep the leader from serving.
    match tokio::time::timeout(STANDBY_DRAIN, standby).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => return Err(error),
        Ok(Err(join_error)) => error!(%join_error, "the standby server failed"),
        Err(_) => warn!("standby connections still open after {STANDBY_DRAIN:?}; serving anyway"),
    }
    outcome
}

/// Longest the standby server may take to close its connections once elected.
const STANDBY_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// The connections accepted on a listener shared by the standby and the leader servers
/// (one after the other).
pub struct Incoming(Arc<TcpListener>);

impl Incoming {
    /// Connections accepted on `listener`.
    pub fn new(listener: Arc<TcpListener>) -> Self {
        Self(listener)
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = std::io::Result<TcpStream>;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0
            .poll_accept(context)
            .map(|accepted| Some(accepted.map(|(stream, _)| stream)))
    }
}

/// Serves the coordinator on `listener` until `shutdown` resolves, to the callers `auth`
/// knows (built with [`auth::Authenticator::load`] over the same store, before the address is
/// published, so that the credential files it writes exist once anyone can connect).
///
/// With a `leadership` (the etcd store), it also stops when the leadership is lost, and then
/// returns [`Error::LostLeadership`]; on `shutdown` it resigns, so a standby takes over at
/// once. With `http`, it serves [`http`] there too, as long as the gRPC API.
pub async fn run(
    config: CoordinatorConfig,
    store: Arc<dyn ClusterStore>,
    auth: Arc<auth::Authenticator>,
    listener: Arc<TcpListener>,
    http: Option<TcpListener>,
    leadership: Option<Leadership>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let address = listener
        .local_addr()
        .map_err(|e| Error::io("reading the listener's address", e))?;
    let mut server = tonic::transport::Server::builder();
    let tls = config.tls.is_some();
    let config_tls = config.tls.clone();
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
    let (stop_http, http_stopped) = watch::channel(false);
    let logins = Arc::new(dashboard::Logins::default());
    let mut service = service::CoordinatorService::new(cluster.clone(), auth.clone());
    if let Some(listener) = &http {
        let address = listener
            .local_addr()
            .map_err(|e| Error::io("reading the HTTP listener's address", e))?;
        service = service.with_dashboard(service::DashboardAccess {
            logins: logins.clone(),
            address,
            tls,
        });
    }
    let http_server = http.map(|listener| {
        let router = http::router(cluster.clone(), auth.clone(), logins.clone(), tls);
        let mut stopped = http_stopped.clone();
        tokio::spawn(http::serve(
            listener,
            config_tls.clone(),
            router,
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            },
        ))
    });
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
        .serve_with_incoming_shutdown(Incoming::new(listener), async {
            match &leadership {
                Some(leadership) => {
                    tokio::select! {
                        () = shutdown => {}
                        _ = leadership.lost() => {}
                    }
                }
                None => shutdown.await,
            }
        })
        .await;
    let _ = stop_background.send(());
    let _ = background.await;
    let _ = stop_http.send(true);
    if let Some(http_server) = http_server {
        match http_server.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(%error, "the HTTP endpoint failed"),
            Err(error) => warn!(%error, "the HTTP endpoint's task failed"),
        }
    }
    // Every job change made before the server stopped is stored before the coordinator exits.
    if let Err(error) = cluster.flush().await {
        tracing::warn!(%error, "job writes did not all land before shutdown");
    }
    if let Some(leadership) = leadership {
        if let Some(why) = leadership.lost_reason() {
            error!(%address, why = %why, "coordinator stopped: it no longer leads");
            return Err(Error::LostLeadership(why));
        }
        leadership.resign().await;
    }
    info!(%address, "coordinator stopped");
    Ok(result?)
}
