//! The `ParameterServer` gRPC service: decodes each request, calls [`ShardServer`], encodes the
//! reply. Errors become statuses through the crate's one mapping (`From<Error> for Status`).
//! [`serve`] and [`serve_shard`] put a shard behind it on a listener.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use cohort_proto::Secret;
use cohort_proto::ps_v1::parameter_server_server::ParameterServerServer;
use cohort_proto::ps_v1::{self, init_chunk, push_chunk};
use cohort_proto::transport::bearer_token;
use futures::{Stream, TryStreamExt};
use prost::bytes::Bytes;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, instrument};

use crate::config::{CONNECTION_WINDOW_BYTES, MAX_FRAME_BYTES, STREAM_WINDOW_BYTES, ServerConfig};
use crate::error::{Error, Result};
use crate::server::{InitStart, ShardServer};
use crate::shard::assembly::{GradientAssembly, InitAssembly};

/// A stream of reply messages.
type ReplyStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Turns a finished list of reply messages into a reply stream.
fn reply_stream<T: Send + 'static>(messages: Vec<T>) -> ReplyStream<T> {
    Box::pin(futures::stream::iter(messages.into_iter().map(Ok)))
}

/// The gRPC face of one shard.
#[derive(Debug, Clone)]
pub struct ParameterService {
    /// The shard it serves.
    server: Arc<ShardServer>,
}

impl ParameterService {
    /// Wraps a shard.
    pub fn new(server: Arc<ShardServer>) -> Self {
        Self { server }
    }
}

#[tonic::async_trait]
impl ps_v1::parameter_server_server::ParameterServer for ParameterService {
    #[instrument(skip_all, fields(shard_id = self.server.config().shard_id))]
    async fn describe(
        &self,
        request: Request<ps_v1::DescribeRequest>,
    ) -> Result<Response<ps_v1::DescribeReply>, Status> {
        let request = request.into_inner();
        self.server
            .check_target(&request.job_id, request.shard_id)?;
        Ok(Response::new(self.server.describe().await))
    }

    #[instrument(skip_all, fields(shard_id = self.server.config().shard_id))]
    async fn init(
        &self,
        request: Request<Streaming<ps_v1::InitChunk>>,
    ) -> Result<Response<ps_v1::InitReply>, Status> {
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(ps_v1::InitChunk {
                body: Some(init_chunk::Body::Header(header)),
            }) => header,
            _ => return Err(Error::invalid("init: the first message must be the header").into()),
        };
        let shape = match self.server.start_init(&header)? {
            InitStart::AlreadyInitialised(reply) => return Ok(Response::new(reply)),
            InitStart::Needed(shape) => shape,
        };
        let mut assembly = InitAssembly::new(&shape, &self.server.config().limits)?;
        while let Some(chunk) = stream.message().await? {
            match chunk.body {
                Some(init_chunk::Body::Dense(chunk)) => assembly.add_dense(&chunk)?,
                Some(init_chunk::Body::Rows(chunk)) => assembly.add_rows(&chunk)?,
                Some(init_chunk::Body::Header(_)) | None => {
                    return Err(
                        Error::invalid("init: a header or empty message after the header").into(),
                    );
                }
            }
        }
        let values = assembly.finish()?;
        Ok(Response::new(self.server.initialise(shape, values).await?))
    }

    type PullStream = ReplyStream<ps_v1::PullChunk>;

    #[instrument(skip_all, fields(shard_id = self.server.config().shard_id))]
    async fn pull(
        &self,
        request: Request<ps_v1::PullRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        let request = request.into_inner();
        let rank = self.server.check_sender(request.sender.as_ref())?;
        let spec = request.pull.unwrap_or_default();
        let chunks = self
            .server
            .pull(rank, request.min_version, &spec, 0)
            .await?;
        Ok(Response::new(reply_stream(chunks)))
    }

    type PushPullStream = ReplyStream<ps_v1::PullChunk>;

    #[instrument(skip_all, fields(shard_id = self.server.config().shard_id))]
    async fn push_pull(
        &self,
        request: Request<Streaming<ps_v1::PushChunk>>,
    ) -> Result<Response<Self::PushPullStream>, Status> {
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(ps_v1::PushChunk {
                body: Some(push_chunk::Body::Header(header)),
            }) => header,
            _ => return Err(Error::invalid("push: the first message must be the header").into()),
        };
        let push = self.server.push_request(&header)?;
        self.server.precheck_push(&push).await?;
        let (limits, shape) = self.server.limits_and_shape()?;
        let mut assembly = GradientAssembly::new(shape, limits, push.dtype)?;
        while let Some(chunk) = stream.message().await? {
            match chunk.body {
                Some(push_chunk::Body::Dense(chunk)) => assembly.add_dense(chunk)?,
                Some(push_chunk::Body::Rows(chunk)) => assembly.add_rows(&chunk)?,
                Some(push_chunk::Body::Header(_)) | None => {
                    return Err(
                        Error::invalid("push: a header or empty message after the header").into(),
                    );
                }
            }
        }
        let gradient = assembly.finish()?;
        let staleness = self.server.push(&push, gradient).await?;
        let chunks = self
            .server
            .pull_planned(push.rank, push.pull, staleness)
            .await?;
        Ok(Response::new(reply_stream(chunks)))
    }

    type SnapshotStream = ReplyStream<ps_v1::SnapshotChunk>;

    #[instrument(skip_all, fields(shard_id = self.server.config().shard_id))]
    async fn snapshot(
        &self,
        request: Request<ps_v1::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let request = request.into_inner();
        self.server
            .check_target(&request.job_id, request.shard_id)?;
        let bytes = Bytes::from(self.server.snapshot(request.min_version).await?);
        let chunk_bytes = self.server.config().limits.max_chunk_bytes as usize;
        let total_bytes = bytes.len() as u64;
        let chunks = (0..bytes.len())
            .step_by(chunk_bytes)
            .map(|offset| ps_v1::SnapshotChunk {
                total_bytes,
                offset: offset as u64,
                data: bytes.slice(offset..(offset + chunk_bytes).min(bytes.len())),
            })
            .collect();
        Ok(Response::new(reply_stream(chunks)))
    }
}

/// Serves a new, uninitialised shard configured by `config` on `listener` until `shutdown`
/// completes.
pub async fn serve(
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let server = Arc::new(ShardServer::new(config)?);
    serve_shard(server, listener, shutdown).await
}

/// Admits a request that shows the job's `token` (every request, when the shard has one).
fn admit(token: Option<&Secret>, request: Request<()>) -> std::result::Result<Request<()>, Status> {
    let Some(token) = token else {
        return Ok(request);
    };
    match bearer_token(request.metadata()) {
        Some(shown) if token.matches(shown) => Ok(request),
        Some(_) => Err(Status::permission_denied(
            "the token is not this job's: only the job's own ranks may use its parameter servers",
        )),
        None => Err(Status::unauthenticated(
            "no credentials: a parameter server answers its job's ranks, which show the job's token",
        )),
    }
}

/// Serves an existing shard (new, restored from a snapshot, or shared with a test) on
/// `listener` until `shutdown` completes.
pub async fn serve_shard(
    server: Arc<ShardServer>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let address = listener.local_addr().map_err(|source| Error::Io {
        context: "read the listener's address".to_owned(),
        source,
    })?;
    let config = server.config().clone();
    let message_bytes = config.limits.max_message_bytes();
    let service = ParameterServerServer::new(ParameterService::new(server))
        .max_decoding_message_size(message_bytes)
        .max_encoding_message_size(message_bytes);
    info!(
        %address,
        job_id = %config.job_id,
        shard_id = config.shard_id,
        shard_count = config.shard_count,
        ranks = config.ranks,
        mode = %config.mode,
        tls = config.tls.is_some(),
        "parameter server ready"
    );
    let incoming = TcpListenerStream::new(listener).map_ok(|stream| {
        let _ = stream.set_nodelay(true);
        stream
    });
    let token = config.token.clone();
    let service = tonic::service::interceptor::InterceptedService::new(
        service,
        move |request: Request<()>| admit(token.as_ref(), request),
    );
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder
            .tls_config(tls.config())
            .map_err(|source| Error::Transport {
                context: format!("serve shard {} over TLS", config.shard_id),
                source,
            })?;
    }
    let result = builder
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    info!(%address, shard_id = config.shard_id, "parameter server stopped");
    result.map_err(|source| Error::Transport {
        context: format!("serve shard {} on {address}", config.shard_id),
        source,
    })
}
