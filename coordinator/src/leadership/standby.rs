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
