//! One shard's connection: connecting and checking it, running one call and decoding its reply
//! into the caller's buffers, and counting the bytes on the wire.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cohort_proto::ps_v1::{self, parameter_server_client::ParameterServerClient, pull_chunk};
use cohort_proto::transport::{Connection, Credentials};
use prost::Message;

use crate::config::{CONNECTION_WINDOW_BYTES, ClientConfig, MAX_FRAME_BYTES, STREAM_WINDOW_BYTES};
use crate::encoding::{self, DType};
use crate::error::{Error, Result};
use crate::sharding::ShardPlan;

/// Bytes of the gRPC prefix of every message (compression flag and length).
const GRPC_MESSAGE_PREFIX_BYTES: u64 = 5;

/// Bytes and messages a client sent and received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes of gRPC messages sent (protobuf encoding plus the 5-byte prefix).
    pub bytes_sent: u64,
    /// Bytes of gRPC messages received.
    pub bytes_received: u64,
    /// Messages sent.
    pub messages_sent: u64,
    /// Messages received.
    pub messages_received: u64,
}

impl Traffic {
    /// Returns the traffic between an earlier reading `before` and this one.
    pub fn since(&self, before: &Traffic) -> Traffic {
        Traffic {
            bytes_sent: self.bytes_sent - before.bytes_sent,
            bytes_received: self.bytes_received - before.bytes_received,
            messages_sent: self.messages_sent - before.messages_sent,
            messages_received: self.messages_received - before.messages_received,
        }
    }
}

/// Running totals behind [`Traffic`], shared by a client's concurrent calls.
#[derive(Debug, Default)]
pub(crate) struct TrafficCounters {
    /// Bytes sent.
    bytes_sent: AtomicU64,
    /// Bytes received.
    bytes_received: AtomicU64,
    /// Messages sent.
    messages_sent: AtomicU64,
    /// Messages received.
    messages_received: AtomicU64,
}

impl TrafficCounters {
    /// Counts a message about to be sent.
    pub(crate) fn sent(&self, message: &impl Message) {
        let bytes = message.encoded_len() as u64 + GRPC_MESSAGE_PREFIX_BYTES;
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        self.messages_sent.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a message received.
    pub(crate) fn received(&self, message: &impl Message) {
        let bytes = message.encoded_len() as u64 + GRPC_MESSAGE_PREFIX_BYTES;
        self.bytes_received.fetch_add(bytes, Ordering::Relaxed);
        self.messages_received.fetch_add(1, Ordering::Relaxed);
    }

    /// Returns the totals.
    pub(crate) fn read(&self) -> Traffic {
        Traffic {
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            messages_sent: self.messages_sent.load(Ordering::Relaxed),
            messages_received: self.messages_received.load(Ordering::Relaxed),
        }
    }
}

/// One shard's connection and limits.
#[derive(Debug, Clone)]
pub(crate) struct ShardConnection {
    /// The shard.
    pub(crate) shard_id: u32,
    /// Where it listens.
    pub(crate) address: String,
    /// The gRPC client.
    pub(crate) client: ParameterServerClient<Connection>,
    /// Largest chunk payload to send.
    pub(crate) max_chunk_bytes: usize,
    /// Largest number of rows in one chunk.
    pub(crate) max_rows_per_chunk: usize,
}

impl ShardConnection {
    /// Wraps a status the shard answered with.
    pub(crate) fn remote(&self, status: tonic::Status) -> Error {
        Error::Remote {
            shard_id: self.shard_id,
            address: self.address.clone(),
            code: status.code(),
            message: status.message().to_owned(),
        }
    }

    /// Describes a reply the protocol does not allow.
    pub(crate) fn protocol(&self, detail: impl Into<String>) -> Error {
        Error::Protocol {
            shard_id: self.shard_id,
            address: self.address.clone(),
            detail: detail.into(),
        }
    }

    /// Returns how many rows of `width` elements of `dtype` fit one chunk.
    pub(crate) fn rows_per_chunk(&self, width: u64, dtype: DType) -> usize {
        (self.max_chunk_bytes / (width as usize * dtype.size_bytes()).max(1))
            .clamp(1, self.max_rows_per_chunk.max(1))
    }
}

/// Where a shard's dense reply goes.
pub(crate) enum DenseOutput<'a> {
    /// Straight into the caller's slice.
    Slice(&'a mut [f32]),
    /// Into a new vector of this length.
    Owned(usize),
    /// No dense data expected.
    Nothing,
}

/// A shard's decoded reply.
pub(crate) struct ShardReply {
    /// The reply header.
    pub(crate) header: ps_v1::PullHeader,
    /// Dense values, when decoded into an owned vector.
    pub(crate) dense: Vec<f32>,
    /// Rows received: table, rows, values.
    pub(crate) rows: Vec<(u32, Vec<u64>, Vec<f32>)>,
}

/// A call to one shard.
pub(crate) enum ShardCall {
    /// A pull.
    Pull(ps_v1::PullRequest),
    /// A push; the pull is the fallback when the shard already has this push (a retry).
    PushPull(Vec<ps_v1::PushChunk>, ps_v1::PullRequest),
}

/// Connects to one shard (retrying until the connect timeout: the shard may not listen yet
/// when a job starts) and checks that it is the expected shard of this job.
pub(crate) async fn connect_shard(
    config: &ClientConfig,
    traffic: &TrafficCounters,
    shard_id: u32,
    address: &str,
    shard_count: u32,
) -> Result<ShardConnection> {
    let context = || format!("connect to shard {shard_id} at {address}");
    let endpoint = cohort_proto::transport::endpoint(address, config.ca.as_ref())
        .map_err(|error| Error::InvalidArgument(format!("{}: {error}", context())))?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES);
    let deadline = tokio::time::Instant::now() + config.connect_timeout;
    let mut pause = Duration::from_millis(20);
    let channel = loop {
        match endpoint.connect().await {
            Ok(channel) => break channel,
            Err(source) if tokio::time::Instant::now() + pause >= deadline => {
                return Err(Error::Transport {
                    context: context(),
                    source,
                });
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    };
    let message_bytes = config.max_message_bytes();
    let credentials = Credentials::new(config.token.as_ref())
        .map_err(|error| Error::InvalidArgument(format!("{}: {error}", context())))?;
    let mut client = ParameterServerClient::new(credentials.wrap(channel))
        .max_decoding_message_size(message_bytes)
        .max_encoding_message_size(message_bytes);
    let mut connection = ShardConnection {
        shard_id,
        address: address.to_owned(),
        client: client.clone(),
        max_chunk_bytes: config.max_chunk_bytes as usize,
        max_rows_per_chunk: 1,
    };
    let request = ps_v1::DescribeRequest {
        job_id: config.job_id.to_string(),
        shard_id,
    };
    traffic.sent(&request);
    let reply = client
        .describe(request)
        .await
        .map_err(|status| connection.remote(status))?
        .into_inner();
    traffic.received(&reply);
    if reply.shard_count != shard_count {
        return Err(connection.protocol(format!(
            "the shard belongs to a job of {} shards, expected {shard_count}",
            reply.shard_count
        )));
    }
    if config.rank >= reply.ranks {
        return Err(Error::invalid(format!(
            "rank = {}, but shard {shard_id} serves ranks 0..{}",
            config.rank, reply.ranks
        )));
    }
    connection.max_chunk_bytes = connection
        .max_chunk_bytes
        .min(reply.max_chunk_bytes as usize)
        .max(4);
    connection.max_rows_per_chunk = reply.max_rows_per_chunk.max(1) as usize;
    Ok(connection)
}

/// Runs one call on one shard and decodes its reply, dense data into `output`.
pub(crate) async fn call_shard(
    connection: &ShardConnection,
    traffic: &TrafficCounters,
    plan: &ShardPlan,
    call: ShardCall,
    output: DenseOutput<'_>,
) -> Result<ShardReply> {
    let mut client = connection.client.clone();
    let response = match call {
        ShardCall::Pull(request) => {
            traffic.sent(&request);
            client.pull(request).await
        }
        ShardCall::PushPull(chunks, fallback) => {
            chunks.iter().for_each(|chunk| traffic.sent(chunk));
            match client.push_pull(futures::stream::iter(chunks)).await {
                Err(status) if status.code() == tonic::Code::AlreadyExists => {
                    traffic.sent(&fallback);
                    client.pull(fallback).await
                }
                other => other,
            }
        }
    };
    let mut stream = response
        .map_err(|status| connection.remote(status))?
        .into_inner();
    let mut next = async || -> Result<Option<ps_v1::PullChunk>> {
        let message = stream
            .message()
            .await
            .map_err(|status| connection.remote(status))?;
        if let Some(message) = &message {
            traffic.received(message);
        }
        Ok(message)
    };
    let header = match next().await? {
        Some(ps_v1::PullChunk {
            body: Some(pull_chunk::Body::Header(header)),
        }) => header,
        _ => return Err(connection.protocol("the reply does not start with a header")),
    };
    let layout = &plan.shards()[connection.shard_id as usize];
    if header.layout_fingerprint != plan.fingerprint() {
        return Err(connection.protocol(format!(
            "parameters of layout {:#x}, expected {:#x} (another model initialised the shard)",
            header.layout_fingerprint,
            plan.fingerprint()
        )));
    }
    let dtype = crate::encoding::from_wire(header.dtype, "reply dtype")
        .map_err(|error| connection.protocol(error.to_string()))?;
    let mut owned = Vec::new();
    let (dense, expected): (&mut [f32], usize) = match output {
        DenseOutput::Slice(slice) => {
            let length = slice.len();
            (slice, length)
        }
        DenseOutput::Owned(length) => {
            owned = vec![0.0; length];
            (owned.as_mut_slice(), length)
        }
        DenseOutput::Nothing => (&mut [], 0),
    };
    if expected != 0 && expected as u64 != layout.dense_element_count() {
        return Err(connection.protocol("dense output of the wrong length"));
    }
    let mut filled = 0usize;
    let mut rows = Vec::new();
    while let Some(chunk) = next().await? {
        match chunk.body {
            Some(pull_chunk::Body::Dense(chunk)) => {
                let count = encoding::element_count(dtype, chunk.data.len(), "dense chunk")
                    .map_err(|error| connection.protocol(error.to_string()))?;
                if chunk.offset != filled as u64 || filled + count > expected {
                    return Err(connection.protocol(format!(
                        "dense chunk of {count} elements at offset {}, expected offset {filled} \
                         of {expected}",
                        chunk.offset
                    )));
                }
                encoding::decode_into(dtype, &chunk.data, &mut dense[filled..filled + count]);
                filled += count;
            }
            Some(pull_chunk::Body::Rows(chunk)) => {
                let width = match plan.tensors().get(chunk.tensor_index as usize) {
                    Some(tensor) if tensor.sparse => tensor.row_elements as usize,
                    _ => {
                        return Err(connection.protocol(format!(
                            "rows of tensor {}, not a sparse table",
                            chunk.tensor_index
                        )));
                    }
                };
                if chunk.data.len() != chunk.rows.len() * width * dtype.size_bytes() {
                    return Err(connection.protocol(format!(
                        "{} bytes for {} rows of width {width}",
                        chunk.data.len(),
                        chunk.rows.len()
                    )));
                }
                let mut values = vec![0.0; chunk.rows.len() * width];
                encoding::decode_into(dtype, &chunk.data, &mut values);
                rows.push((chunk.tensor_index, chunk.rows, values));
            }
            Some(pull_chunk::Body::Header(_)) | None => {
                return Err(connection.protocol("a second header or an empty message"));
            }
        }
    }
    if filled != expected {
        return Err(connection.protocol(format!(
            "dense reply of {filled} elements, expected {expected}"
        )));
    }
    Ok(ShardReply {
        header,
        dense: owned,
        rows,
    })
}
