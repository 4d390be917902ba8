//! The coordinator's HTTP endpoint (`cohort coordinator --http ADDR`): the web dashboard
//! ([`crate::dashboard`]), and `/metrics` in the Prometheus text format ([`crate::telemetry`]).
//! `/metrics` answers callers the gRPC API would: a user's token as a bearer token
//! (`Authorization: Bearer ...`; Prometheus' `authorization: {credentials_file: ...}`); the
//! dashboard, browsers with a session from a one-time login link. Over TLS with the
//! coordinator's certificate when the cluster serves TLS. An admin sees every job, a user their
//! own (and the cluster-wide series).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cohort_proto::transport::ServerTls;
use tokio::net::TcpListener;
use tracing::info;

use crate::auth::{Action, Authenticator, authorize};
use crate::cluster::Cluster;
use crate::dashboard::{Dashboard, Logins};
use crate::error::{Error, Result};

/// The content type of the Prometheus text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the handlers share.
#[derive(Clone)]
struct Endpoint {
    cluster: Arc<Cluster>,
    auth: Arc<Authenticator>,
}

/// The routes of the HTTP endpoint: `/metrics`, and the web dashboard
/// ([`crate::dashboard`]), whose browsers log in with codes from `logins`.
pub fn router(
    cluster: Arc<Cluster>,
    auth: Arc<Authenticator>,
    logins: Arc<Logins>,
    tls: bool,
) -> axum::Router {
    let dashboard = Dashboard {
        cluster: cluster.clone(),
        logins,
        tls,
    };
    axum::Router::new()
        .route("/metrics", get(metrics))
        .with_state(Endpoint { cluster, auth })
        .merge(crate::dashboard::routes(dashboard))
}

/// `GET /metrics`.
async fn metrics(State(endpoint): State<Endpoint>, headers: HeaderMap) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .filter(|token| !token.is_empty());
    let caller = match endpoint
        .auth
        .caller(token)
        .and_then(|caller| authorize(&caller, Action::ReadMetrics).map(|()| caller))
    {
        Ok(caller) => caller,
        Err(error) => return refusal(error),
    };
    match endpoint.cluster.exposition(&caller).await {
        Ok(text) => ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response(),
        Err(error) => refusal(error),
    }
}

/// The HTTP answer to an error: the status its gRPC code maps to, and its message.
fn refusal(error: Error) -> Response {
    let status = match tonic::Status::from(error) {
        status if status.code() == tonic::Code::Unauthenticated => {
            (StatusCode::UNAUTHORIZED, status.message().to_owned())
        }
        status if status.code() == tonic::Code::PermissionDenied => {
            (StatusCode::FORBIDDEN, status.message().to_owned())
        }
        status => (
            StatusCode::INTERNAL_SERVER_ERROR,
            status.message().to_owned(),
        ),
    };
    status.into_response()
}

/// Serves `router` on `listener` (HTTP/1.1 and HTTP/2; TLS with `tls`) until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<ServerTls>,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let address = listener
        .local_addr()
        .map_err(|e| Error::io("reading the HTTP listener's address", e))?;
    let mut server = tonic::transport::Server::builder().accept_http1(true);
    if let Some(identity) = &tls {
        server = server.tls_config(identity.config()).map_err(|error| {
            Error::InvalidArgument(format!("the TLS certificate and key: {error}"))
        })?;
    }
    info!(%address, tls = tls.is_some(), "HTTP endpoint ready (dashboard, /metrics)");
    server
        .add_routes(tonic::service::Routes::from(router))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await?;
    Ok(())
}
