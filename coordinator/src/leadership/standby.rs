//! What a coordinator serves while it stands by: every call of every service is answered with
//! [`cohort_proto::failover::standby_status`], naming the leader when one is known, so that
//! clients given several coordinators move on to the leader at once and never wait on a
//! coordinator that cannot serve them.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::Arc;

use cohort_proto::failover::standby_status;
use cohort_proto::transport::ServerTls;
use cohort_proto::v1::job_control_server::JobControlServer;
use cohort_proto::v1::membership_server::MembershipServer;
use cohort_proto::v1::rendezvous_server::RendezvousServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

use crate::error::{Error, Result};
use crate::service::CoordinatorService;

/// Answers every call to service `S` (named as `S` is) as a standby.
struct Standby<S> {
    /// The current leader's address, if one is known.
    leader: watch::Receiver<Option<String>>,
    /// Which service this stands in for.
    service: PhantomData<fn() -> S>,
}

impl<S> Standby<S> {
    fn new(leader: watch::Receiver<Option<String>>) -> Self {
        Self {
            leader,
            service: PhantomData,
        }
    }
}

impl<S> Clone for Standby<S> {
    fn clone(&self) -> Self {
        Self::new(self.leader.clone())
    }
}

impl<S: NamedService> NamedService for Standby<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Standby<S> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: http::Request<Body>) -> Self::Future {
        let leader = self.leader.borrow().clone();
        std::future::ready(Ok(standby_status(leader.as_deref()).into_http()))
    }
}

/// Serves standby answers on `listener` (with `tls` when given) until `until` resolves, naming
/// the leader `leader` holds.
pub async fn serve(
    listener: Arc<TcpListener>,
    tls: Option<ServerTls>,
    leader: watch::Receiver<Option<String>>,
    until: impl Future<Output = ()>,
) -> Result<()> {
    let mut server = tonic::transport::Server::builder();
    if let Some(identity) = &tls {
        server = server.tls_config(identity.config()).map_err(|error| {
            Error::InvalidArgument(format!("the TLS certificate and key: {error}"))
        })?;
    }
    server
        .add_service(Standby::<JobControlServer<CoordinatorService>>::new(
            leader.clone(),
        ))
        .add_service(Standby::<MembershipServer<CoordinatorService>>::new(
            leader.clone(),
        ))
        .add_service(Standby::<RendezvousServer<CoordinatorService>>::new(leader))
        .serve_with_incoming_shutdown(crate::Incoming::new(listener), until)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_proto::failover::Failover;
    use cohort_proto::transport::Credentials;
    use cohort_proto::v1::ListNodesRequest;
    use cohort_proto::v1::job_control_client::JobControlClient;

    /// An address nothing listens on (it did a moment ago).
    fn dead_address() -> String {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn a_client_reaches_the_leader_past_a_dead_member_and_a_standby_naming_it() {
        // The leader: a real coordinator on the embedded store.
        let data = tempfile::tempdir().unwrap();
        let config = crate::CoordinatorConfig {
            data_dir: data.path().to_owned(),
            ..crate::CoordinatorConfig::default()
        };
        let store: Arc<dyn crate::ClusterStore> =
            Arc::new(crate::store::embedded::EmbeddedStore::open(data.path()).unwrap());
        let auth = Arc::new(
            crate::auth::Authenticator::load(store.clone(), data.path(), None)
                .await
                .unwrap(),
        );
        let admin = crate::auth::read_secret_file(&data.path().join(crate::auth::ADMIN_TOKEN_FILE))
            .unwrap()
            .unwrap();
        let leader = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
        let leader_address = leader.local_addr().unwrap().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(crate::run(config, store, auth, leader, None, None, async {
            let _ = stopped.await;
        }));
        // A dead member, and a standby that still names it as the leader (its poll of etcd
        // has not seen the new leader yet).
        let dead = dead_address();
        let standby = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
        let standby_address = standby.local_addr().unwrap().to_string();
        let (_leader_hint, hint) = watch::channel(Some(dead.clone()));
        tokio::spawn(serve(standby, None, hint, std::future::pending()));

        let group = format!("{dead},{standby_address},{leader_address}");
        let failover = Failover::lazy(&group, None, |endpoint| endpoint).unwrap();
        let mut client = JobControlClient::new(
            Credentials::new(Some(&admin))
                .unwrap()
                .wrap(failover.clone()),
        );
        let started = std::time::Instant::now();
        client.list_nodes(ListNodesRequest {}).await.unwrap();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        // The next call starts at the leader.
        assert_eq!(failover.current_address(), leader_address);

        // A group where nobody answers at all fails at once, without waiting for an election.
        let nobody = Failover::lazy(
            &format!("{},{}", dead_address(), dead_address()),
            None,
            |e| e,
        )
        .unwrap();
        let mut client =
            JobControlClient::new(Credentials::new(Some(&admin)).unwrap().wrap(nobody));
        let started = std::time::Instant::now();
        let refused = client.list_nodes(ListNodesRequest {}).await.unwrap_err();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{refused}"
        );

        let _ = stop.send(());
        serving.await.unwrap().unwrap();
    }
}
