//! [`ParameterClient`]: what a training rank uses to talk to every shard of its job.
//!
//! The client shards the model with the same pure function as the servers, so it knows which
//! slice of the flat gradient and which embedding rows go where. Every call talks to all shards
//! concurrently and reassembles the replies. Two flat layouts appear in the API: the **dense
//! vector** (the non-sparse tensors concatenated in model order: what is pushed and pulled every
//! step) and the **full vector** (every tensor in model order, embedding tables included: what
//! `init` sends and `pull_all` returns). Row-sparse tables travel as rows.
//!
//! Bytes on the wire are counted per gRPC message (its protobuf encoding plus the 5-byte gRPC
//! message prefix; HTTP/2 and TCP framing are not counted) and reported by
//! [`ParameterClient::traffic`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cohort_proto::ps_v1::{self, parameter_server_client::ParameterServerClient, pull_chunk};
use futures::future::try_join_all;
use prost::Message;
use tonic::transport::{Channel, Endpoint};

use crate::config::{CONNECTION_WINDOW_BYTES, ClientConfig, MAX_FRAME_BYTES, STREAM_WINDOW_BYTES};
use crate::encoding::{self, DType};
use crate::error::{Error, Result};
use crate::sharding::{MAX_SHARDS, ShardPlan, TensorDeclaration, plan_shards};

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

/// Running totals behind [`Traffic`].
#[derive(Debug, Default)]
struct TrafficCounters {
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    messages_sent: AtomicU64,
    messages_received: AtomicU64,
}

impl TrafficCounters {
    fn sent(&self, message: &impl Message) {
        let bytes = message.encoded_len() as u64 + GRPC_MESSAGE_PREFIX_BYTES;
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        self.messages_sent.fetch_add(1, Ordering::Relaxed);
    }

    fn received(&self, message: &impl Message) {
        let bytes = message.encoded_len() as u64 + GRPC_MESSAGE_PREFIX_BYTES;
        self.bytes_received.fetch_add(bytes, Ordering::Relaxed);
        self.messages_received.fetch_add(1, Ordering::Relaxed);
    }

    fn read(&self) -> Traffic {
        Traffic {
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            messages_sent: self.messages_sent.load(Ordering::Relaxed),
            messages_received: self.messages_received.load(Ordering::Relaxed),
        }
    }
}

/// Gradients of some rows of one embedding table.
#[derive(Debug, Clone, Copy)]
pub struct SparseGradient<'a> {
    /// Index of the table in the model's tensor list.
    pub tensor_index: usize,
    /// Rows the batch touched (a row may appear more than once: its gradients are summed).
    pub rows: &'a [u64],
    /// `rows.len() * width` gradient values, row by row.
    pub values: &'a [f32],
}

/// Rows of one embedding table to pull.
#[derive(Debug, Clone, Copy)]
pub struct RowSelection<'a> {
    /// Index of the table in the model's tensor list.
    pub tensor_index: usize,
    /// The rows, in the order they are returned.
    pub rows: &'a [u64],
}

/// What the shards reported with a pull or push.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Version of each shard's returned parameters.
    pub versions: Vec<u64>,
    /// Step of the learning-rate schedule (the smallest over shards).
    pub global_step: u64,
    /// The step this rank pushes next.
    pub next_step: u64,
    /// The step the slowest rank pushes next (the smallest over shards).
    pub slowest_step: u64,
    /// The largest staleness of this push over shards (0 for pulls and in sync mode).
    pub staleness: u64,
    /// Learning rate of the shards' last update.
    pub learning_rate: f64,
    /// Values of each requested row selection, `rows.len() * width` each.
    pub rows: Vec<Vec<f32>>,
}

/// One shard's connection and limits.
#[derive(Debug, Clone)]
struct ShardConnection {
    /// The shard.
    shard_id: u32,
    /// Where it listens.
    address: String,
    /// The gRPC client.
    client: ParameterServerClient<Channel>,
    /// Largest chunk payload to send.
    max_chunk_bytes: usize,
    /// Largest number of rows in one chunk.
    max_rows_per_chunk: usize,
}

impl ShardConnection {
    fn remote(&self, status: tonic::Status) -> Error {
        Error::Remote {
            shard_id: self.shard_id,
            address: self.address.clone(),
            code: status.code(),
            message: status.message().to_owned(),
        }
    }

    fn protocol(&self, detail: impl Into<String>) -> Error {
        Error::Protocol {
            shard_id: self.shard_id,
            address: self.address.clone(),
            detail: detail.into(),
        }
    }

    /// Returns how many rows of `width` elements of `dtype` fit one chunk.
    fn rows_per_chunk(&self, width: u64, dtype: DType) -> usize {
        (self.max_chunk_bytes / (width as usize * dtype.size_bytes()).max(1))
            .clamp(1, self.max_rows_per_chunk.max(1))
    }
}

/// Where a shard's dense reply goes.
enum DenseOutput<'a> {
    /// Straight into the caller's slice.
    Slice(&'a mut [f32]),
    /// Into a new vector of this length.
    Owned(usize),
    /// No dense data expected.
    Nothing,
}

/// A shard's decoded reply.
struct ShardReply {
    /// The reply header.
    header: ps_v1::PullHeader,
    /// Dense values, when decoded into an owned vector.
    dense: Vec<f32>,
    /// Rows received: table, rows, values.
    rows: Vec<(u32, Vec<u64>, Vec<f32>)>,
}

/// A call to one shard.
enum ShardCall {
    /// A pull.
    Pull(ps_v1::PullRequest),
    /// A push; the pull is the fallback when the shard already has this push (a retry).
    PushPull(Vec<ps_v1::PushChunk>, ps_v1::PullRequest),
}

/// A training rank's connection to all shards of its job.
#[derive(Debug)]
pub struct ParameterClient {
    /// The client's configuration.
    config: ClientConfig,
    /// The model's sharding.
    plan: ShardPlan,
    /// One connection per shard, by shard id.
    shards: Vec<ShardConnection>,
    /// Bytes on the wire.
    traffic: Arc<TrafficCounters>,
    /// Version of each shard's parameters as last pulled.
    versions: Vec<Option<u64>>,
    /// The step this rank pushes next, once known from a pull.
    next_step: Option<u64>,
}

impl ParameterClient {
    /// Connects to every shard (`addresses[s]` serves shard `s`), checks that each serves this
    /// job and the expected shard, and plans the sharding of `tensors`.
    pub async fn connect(
        config: ClientConfig,
        addresses: &[String],
        tensors: Vec<TensorDeclaration>,
    ) -> Result<Self> {
        config.validate()?;
        if addresses.is_empty() || addresses.len() > MAX_SHARDS as usize {
            return Err(Error::invalid(format!(
                "{} shard addresses, expected 1 to {MAX_SHARDS}",
                addresses.len()
            )));
        }
        let plan = plan_shards(&tensors, addresses.len() as u32)?;
        let traffic = Arc::new(TrafficCounters::default());
        let connections = addresses.iter().enumerate().map(|(shard_id, address)| {
            connect_shard(
                &config,
                &traffic,
                shard_id as u32,
                address,
                addresses.len() as u32,
            )
        });
        let shards = try_join_all(connections).await?;
        Ok(Self {
            versions: vec![None; shards.len()],
            config,
            plan,
            shards,
            traffic,
            next_step: None,
        })
    }

    /// Returns the model's sharding.
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// Returns the bytes sent and received so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic.read()
    }

    /// Returns the step this rank pushes next (known after the first pull).
    pub fn next_step(&self) -> Option<u64> {
        self.next_step
    }

    fn sender(&self, shard_id: u32) -> Option<ps_v1::Sender> {
        Some(ps_v1::Sender {
            job_id: self.config.job_id.to_string(),
            shard_id,
            rank: self.config.rank,
        })
    }

    /// Sends the model's initial values (`values`: the full vector) to every shard not yet
    /// initialised, with the run's planned number of optimizer steps. Returns whether this call
    /// initialised any shard. Other ranks need not call it: their first pull waits for it.
    pub async fn init(&mut self, values: &[f32], total_steps: u64) -> Result<bool> {
        check_length("init values", values.len(), self.plan.total_element_count())?;
        let declarations: Vec<ps_v1::TensorDeclaration> = self
            .plan
            .tensors()
            .iter()
            .map(|tensor| ps_v1::TensorDeclaration {
                name: tensor.name.clone(),
                element_count: tensor.element_count,
                row_elements: tensor.row_elements,
                sparse: tensor.sparse,
            })
            .collect();
        let this = &*self;
        let calls = this.shards.iter().map(|connection| {
            let chunks = this.init_chunks(connection, values, &declarations, total_steps);
            let traffic = this.traffic.clone();
            let mut client = connection.client.clone();
            let fingerprint = this.plan.fingerprint();
            async move {
                chunks.iter().for_each(|chunk| traffic.sent(chunk));
                let reply = client
                    .init(futures::stream::iter(chunks))
                    .await
                    .map_err(|status| connection.remote(status))?
                    .into_inner();
                traffic.received(&reply);
                if reply.layout_fingerprint != fingerprint {
                    return Err(connection.protocol(format!(
                        "init reply for layout {:#x}, expected {fingerprint:#x}",
                        reply.layout_fingerprint
                    )));
                }
                Ok(reply.initialised_by_this_call)
            }
        });
        let initialised = try_join_all(calls).await?;
        Ok(initialised.into_iter().any(|initialised| initialised))
    }

    /// Builds one shard's init stream: header, dense values, then its rows of every table.
    fn init_chunks(
        &self,
        connection: &ShardConnection,
        values: &[f32],
        declarations: &[ps_v1::TensorDeclaration],
        total_steps: u64,
    ) -> Vec<ps_v1::InitChunk> {
        use ps_v1::init_chunk::Body;
        let layout = &self.plan.shards()[connection.shard_id as usize];
        let mut chunks = vec![ps_v1::InitChunk {
            body: Some(Body::Header(ps_v1::InitHeader {
                sender: self.sender(connection.shard_id),
                tensors: declarations.to_vec(),
                total_steps,
            })),
        }];
        let mut dense = Vec::with_capacity(layout.dense_element_count() as usize);
        for segment in &layout.segments {
            let tensor = &self.plan.tensors()[segment.tensor_index];
            let start = self.flat_start(segment.tensor_index) + segment.tensor_offset;
            let segment_values = &values[start as usize..(start + segment.element_count) as usize];
            if tensor.sparse {
                let width = tensor.row_elements;
                let first_row = segment.tensor_offset / width;
                let rows_per_chunk = connection.rows_per_chunk(width, DType::F32);
                for (index, rows) in segment_values
                    .chunks(rows_per_chunk * width as usize)
                    .enumerate()
                {
                    let first = first_row + (index * rows_per_chunk) as u64;
                    let count = rows.len() as u64 / width;
                    chunks.push(ps_v1::InitChunk {
                        body: Some(Body::Rows(ps_v1::RowsChunk {
                            tensor_index: segment.tensor_index as u32,
                            rows: (first..first + count).collect(),
                            data: encoding::encode(DType::F32, rows),
                        })),
                    });
                }
            } else {
                dense.extend_from_slice(segment_values);
            }
        }
        // Dense chunks go before row chunks in the stream; insert them after the header.
        let dense_chunks = encoding::encode_chunks(DType::F32, &dense, connection.max_chunk_bytes)
            .into_iter()
            .map(|(offset, data)| ps_v1::InitChunk {
                body: Some(Body::Dense(ps_v1::DenseChunk { offset, data })),
            });
        chunks.splice(1..1, dense_chunks);
        chunks
    }

    fn flat_start(&self, tensor_index: usize) -> u64 {
        self.plan
            .tensor_flat_range(tensor_index)
            .map_or(0, |range| range.start)
    }

    /// Pulls the dense vector into `dense` once this rank may proceed (the first pull waits
    /// for initialisation).
    pub async fn pull(&mut self, dense: &mut [f32]) -> Result<StepReport> {
        check_length("dense output", dense.len(), self.plan.dense_element_count())?;
        let spec = ps_v1::PullSpec {
            dense: true,
            dtype: self.config.parameter_dtype.to_wire() as i32,
            rows: Vec::new(),
            all_rows: false,
        };
        let outputs = split_dense(&self.plan, dense);
        let calls = self.shards.iter().zip(outputs).map(|(connection, output)| {
            let request = ps_v1::PullRequest {
                sender: self.sender(connection.shard_id),
                min_version: 0,
                pull: Some(spec.clone()),
            };
            call_shard(
                connection,
                &self.traffic,
                &self.plan,
                ShardCall::Pull(request),
                DenseOutput::Slice(output),
            )
        });
        let replies = try_join_all(calls).await?;
        self.finish(replies, &[], &[])
    }

    /// Pulls every parameter (the full vector, embedding tables whole) into `values`: for
    /// evaluation, checkpoints and export, not for every step.
    pub async fn pull_all(&mut self, values: &mut [f32]) -> Result<StepReport> {
        check_length("full output", values.len(), self.plan.total_element_count())?;
        let spec = ps_v1::PullSpec {
            dense: true,
            dtype: DType::F32.to_wire() as i32,
            rows: Vec::new(),
            all_rows: true,
        };
        let calls = self.shards.iter().map(|connection| {
            let request = ps_v1::PullRequest {
                sender: self.sender(connection.shard_id),
                min_version: 0,
                pull: Some(spec.clone()),
            };
            let layout = &self.plan.shards()[connection.shard_id as usize];
            let output = DenseOutput::Owned(layout.dense_element_count() as usize);
            call_shard(
                connection,
                &self.traffic,
                &self.plan,
                ShardCall::Pull(request),
                output,
            )
        });
        let replies = try_join_all(calls).await?;
        for (layout, reply) in self.plan.shards().iter().zip(&replies) {
            let mut dense = reply.dense.as_slice();
            for segment in &layout.segments {
                let tensor = &self.plan.tensors()[segment.tensor_index];
                if tensor.sparse {
                    continue;
                }
                let start =
                    (self.flat_start(segment.tensor_index) + segment.tensor_offset) as usize;
                let (head, rest) = dense.split_at(segment.element_count as usize);
                values[start..start + head.len()].copy_from_slice(head);
                dense = rest;
            }
            for (tensor_index, rows, row_values) in &reply.rows {
                let width = self.plan.tensors()[*tensor_index as usize].row_elements as usize;
                let table_start = self.flat_start(*tensor_index as usize) as usize;
                for (index, row) in rows.iter().enumerate() {
                    let start = table_start + *row as usize * width;
                    values[start..start + width]
                        .copy_from_slice(&row_values[index * width..(index + 1) * width]);
                }
            }
        }
        self.finish(replies, &[], &[])
    }

    /// Pulls the selected embedding rows (from the shards holding them); returns one vector
    /// per selection.
    pub async fn pull_rows(&mut self, selections: &[RowSelection<'_>]) -> Result<Vec<Vec<f32>>> {
        let routes = self.route_selections(selections)?;
        let calls = self.shards.iter().filter_map(|connection| {
            let shard_selections = &routes[connection.shard_id as usize];
            if shard_selections.is_empty() {
                return None;
            }
            let request = ps_v1::PullRequest {
                sender: self.sender(connection.shard_id),
                min_version: 0,
                pull: Some(ps_v1::PullSpec {
                    dense: false,
                    dtype: self.config.parameter_dtype.to_wire() as i32,
                    rows: wire_selections(shard_selections),
                    all_rows: false,
                }),
            };
            Some(call_shard(
                connection,
                &self.traffic,
                &self.plan,
                ShardCall::Pull(request),
                DenseOutput::Nothing,
            ))
        });
        let replies = try_join_all(calls).await?;
        let shard_ids: Vec<usize> = (0..self.shards.len())
            .filter(|s| !routes[*s].is_empty())
            .collect();
        let mut outputs = self.row_outputs(selections);
        for (shard, reply) in shard_ids.into_iter().zip(&replies) {
            scatter_rows(&self.shards[shard], &routes[shard], reply, &mut outputs)?;
        }
        Ok(outputs)
    }

    /// Pushes one step's gradients and pulls the parameters to use next, in one round trip per
    /// shard: `dense_gradient` (the dense vector's gradient) and `sparse` rows go out,
    /// `dense_output` receives the fresh dense vector and the report carries the `selections`'
    /// rows. Needs a pull first (to know the versions). A shard that already has this step (a
    /// retried call) answers with a pull instead.
    pub async fn push_pull(
        &mut self,
        dense_gradient: &[f32],
        sparse: &[SparseGradient<'_>],
        dense_output: &mut [f32],
        selections: &[RowSelection<'_>],
    ) -> Result<StepReport> {
        let dense_count = self.plan.dense_element_count();
        check_length("dense gradient", dense_gradient.len(), dense_count)?;
        check_length("dense output", dense_output.len(), dense_count)?;
        let Some(step) = self.next_step else {
            return Err(Error::invalid(
                "push before the first pull: call pull first",
            ));
        };
        let sparse_routes = self.route_gradients(sparse)?;
        let selection_routes = self.route_selections(selections)?;
        let outputs = split_dense(&self.plan, dense_output);
        let calls = self.shards.iter().zip(outputs).map(|(connection, output)| {
            let shard = connection.shard_id as usize;
            let layout = &self.plan.shards()[shard];
            let spec = ps_v1::PullSpec {
                dense: true,
                dtype: self.config.parameter_dtype.to_wire() as i32,
                rows: wire_selections(&selection_routes[shard]),
                all_rows: false,
            };
            let chunks = self.push_chunks(
                connection,
                step,
                spec.clone(),
                &dense_gradient[layout.dense_range.start as usize..layout.dense_range.end as usize],
                &sparse_routes[shard],
            );
            let fallback = ps_v1::PullRequest {
                sender: self.sender(connection.shard_id),
                min_version: 0,
                pull: Some(spec),
            };
            call_shard(
                connection,
                &self.traffic,
                &self.plan,
                ShardCall::PushPull(chunks, fallback),
                DenseOutput::Slice(output),
            )
        });
        let replies = try_join_all(calls).await?;
        self.finish(replies, selections, &selection_routes)
    }

    /// Builds one shard's push stream: header, dense gradient chunks, row chunks.
    fn push_chunks(
        &self,
        connection: &ShardConnection,
        step: u64,
        pull: ps_v1::PullSpec,
        dense_gradient: &[f32],
        rows: &[(usize, Vec<u64>, Vec<f32>)],
    ) -> Vec<ps_v1::PushChunk> {
        use ps_v1::push_chunk::Body;
        let dtype = self.config.gradient_dtype;
        let shard = connection.shard_id as usize;
        let mut chunks = vec![ps_v1::PushChunk {
            body: Some(Body::Header(ps_v1::PushHeader {
                sender: self.sender(connection.shard_id),
                step,
                version: self.versions[shard].unwrap_or(0),
                dtype: dtype.to_wire() as i32,
                layout_fingerprint: self.plan.fingerprint(),
                pull: Some(pull),
            })),
        }];
        chunks.extend(
            encoding::encode_chunks(dtype, dense_gradient, connection.max_chunk_bytes)
                .into_iter()
                .map(|(offset, data)| ps_v1::PushChunk {
                    body: Some(Body::Dense(ps_v1::DenseChunk { offset, data })),
                }),
        );
        for (tensor_index, table_rows, values) in rows {
            let width = self.plan.tensors()[*tensor_index].row_elements;
            let rows_per_chunk = connection.rows_per_chunk(width, dtype);
            for (row_chunk, value_chunk) in table_rows
                .chunks(rows_per_chunk)
                .zip(values.chunks(rows_per_chunk * width as usize))
            {
                chunks.push(ps_v1::PushChunk {
                    body: Some(Body::Rows(ps_v1::RowsChunk {
                        tensor_index: *tensor_index as u32,
                        rows: row_chunk.to_vec(),
                        data: encoding::encode(dtype, value_chunk),
                    })),
                });
            }
        }
        chunks
    }

    /// Checks sparse gradients and groups them by shard: per shard, (table, rows, values).
    fn route_gradients(
        &self,
        sparse: &[SparseGradient<'_>],
    ) -> Result<Vec<Vec<(usize, Vec<u64>, Vec<f32>)>>> {
        let mut routes: Vec<Vec<(usize, Vec<u64>, Vec<f32>)>> = vec![Vec::new(); self.shards.len()];
        for (index, gradient) in sparse.iter().enumerate() {
            let width = self.table_width(gradient.tensor_index, &format!("sparse[{index}]"))?;
            check_length(
                &format!("sparse[{index}].values"),
                gradient.values.len(),
                gradient.rows.len() as u64 * width,
            )?;
            for (position, &row) in gradient.rows.iter().enumerate() {
                let shard =
                    self.row_owner(gradient.tensor_index, row, &format!("sparse[{index}]"))?;
                let entry = match routes[shard]
                    .iter_mut()
                    .position(|(table, _, _)| *table == gradient.tensor_index)
                {
                    Some(entry) => entry,
                    None => {
                        routes[shard].push((gradient.tensor_index, Vec::new(), Vec::new()));
                        routes[shard].len() - 1
                    }
                };
                let (_, rows, values) = &mut routes[shard][entry];
                rows.push(row);
                let width = width as usize;
                values
                    .extend_from_slice(&gradient.values[position * width..(position + 1) * width]);
            }
        }
        Ok(routes)
    }

    /// Checks row selections and groups them by shard: per shard, (selection index, table,
    /// positions in the selection, rows).
    fn route_selections(
        &self,
        selections: &[RowSelection<'_>],
    ) -> Result<Vec<Vec<RoutedSelection>>> {
        let mut routes: Vec<Vec<RoutedSelection>> = vec![Vec::new(); self.shards.len()];
        for (index, selection) in selections.iter().enumerate() {
            self.table_width(selection.tensor_index, &format!("selections[{index}]"))?;
            for (position, &row) in selection.rows.iter().enumerate() {
                let shard =
                    self.row_owner(selection.tensor_index, row, &format!("selections[{index}]"))?;
                match routes[shard].last_mut() {
                    Some(routed) if routed.selection == index => {
                        routed.positions.push(position);
                        routed.rows.push(row);
                    }
                    _ => routes[shard].push(RoutedSelection {
                        selection: index,
                        tensor_index: selection.tensor_index as u32,
                        positions: vec![position],
                        rows: vec![row],
                    }),
                }
            }
        }
        Ok(routes)
    }

    fn table_width(&self, tensor_index: usize, what: &str) -> Result<u64> {
        match self.plan.tensors().get(tensor_index) {
            Some(tensor) if tensor.sparse => Ok(tensor.row_elements),
            _ => Err(Error::invalid(format!(
                "{what}.tensor_index = {tensor_index}, expected the index of a sparse embedding table"
            ))),
        }
    }

    fn row_owner(&self, tensor_index: usize, row: u64, what: &str) -> Result<usize> {
        self.plan
            .row_owner(tensor_index, row)
            .map(|shard| shard as usize)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{what}: row {row} of table {tensor_index}, which has {} rows",
                    self.plan.tensors()[tensor_index].row_count()
                ))
            })
    }

    fn row_outputs(&self, selections: &[RowSelection<'_>]) -> Vec<Vec<f32>> {
        selections
            .iter()
            .map(|selection| {
                let width = self.plan.tensors()[selection.tensor_index].row_elements as usize;
                vec![0.0; selection.rows.len() * width]
            })
            .collect()
    }

    /// Records versions and clocks from all shards' replies and assembles the report.
    fn finish(
        &mut self,
        replies: Vec<ShardReply>,
        selections: &[RowSelection<'_>],
        selection_routes: &[Vec<RoutedSelection>],
    ) -> Result<StepReport> {
        let mut outputs = self.row_outputs(selections);
        if !selections.is_empty() {
            for (shard, reply) in replies.iter().enumerate() {
                scatter_rows(
                    &self.shards[shard],
                    &selection_routes[shard],
                    reply,
                    &mut outputs,
                )?;
            }
        }
        for (shard, reply) in replies.iter().enumerate() {
            self.versions[shard] = Some(reply.header.version);
        }
        let headers: Vec<&ps_v1::PullHeader> = replies.iter().map(|reply| &reply.header).collect();
        let next_step = headers.iter().map(|h| h.next_step).min().unwrap_or(0);
        self.next_step = Some(next_step);
        Ok(StepReport {
            versions: headers.iter().map(|h| h.version).collect(),
            global_step: headers.iter().map(|h| h.global_step).min().unwrap_or(0),
            next_step,
            slowest_step: headers.iter().map(|h| h.slowest_step).min().unwrap_or(0),
            staleness: headers.iter().map(|h| h.staleness).max().unwrap_or(0),
            learning_rate: headers.first().map_or(0.0, |h| h.learning_rate),
            rows: outputs,
        })
    }

    /// Fetches a snapshot of every shard, once each is at `min_version` or later (for a
    /// checkpoint at step t in sync mode: `min_version = t`). Returns them by shard id.
    pub async fn snapshot(&self, min_version: u64) -> Result<Vec<Vec<u8>>> {
        let calls = self.shards.iter().map(|connection| {
            let request = ps_v1::SnapshotRequest {
                job_id: self.config.job_id.to_string(),
                shard_id: connection.shard_id,
                min_version,
            };
            let traffic = self.traffic.clone();
            let mut client = connection.client.clone();
            async move {
                traffic.sent(&request);
                let mut stream = client
                    .snapshot(request)
                    .await
                    .map_err(|status| connection.remote(status))?
                    .into_inner();
                let mut bytes = Vec::new();
                let mut total = None;
                while let Some(chunk) = stream
                    .message()
                    .await
                    .map_err(|status| connection.remote(status))?
                {
                    traffic.received(&chunk);
                    if chunk.offset != bytes.len() as u64
                        || *total.get_or_insert(chunk.total_bytes) != chunk.total_bytes
                    {
                        return Err(connection.protocol(format!(
                            "snapshot chunk at offset {} of {}, expected offset {}",
                            chunk.offset,
                            chunk.total_bytes,
                            bytes.len()
                        )));
                    }
                    bytes.extend_from_slice(&chunk.data);
                }
                if bytes.len() as u64 != total.unwrap_or(0) {
                    return Err(connection.protocol(format!(
                        "snapshot of {} bytes, announced {}",
                        bytes.len(),
                        total.unwrap_or(0)
                    )));
                }
                Ok(bytes)
            }
        });
        try_join_all(calls).await
    }
}

/// Part of a row selection routed to one shard.
#[derive(Debug, Clone)]
struct RoutedSelection {
    /// Index of the selection in the caller's list.
    selection: usize,
    /// The table.
    tensor_index: u32,
    /// Positions of the routed rows in the selection.
    positions: Vec<usize>,
    /// The routed rows.
    rows: Vec<u64>,
}

fn wire_selections(routes: &[RoutedSelection]) -> Vec<ps_v1::RowSelection> {
    routes
        .iter()
        .map(|routed| ps_v1::RowSelection {
            tensor_index: routed.tensor_index,
            rows: routed.rows.clone(),
        })
        .collect()
}

/// Writes a shard's returned rows into the selections' outputs, checking they are the rows
/// asked for, in order.
fn scatter_rows(
    connection: &ShardConnection,
    routes: &[RoutedSelection],
    reply: &ShardReply,
    outputs: &mut [Vec<f32>],
) -> Result<()> {
    let mut received = reply.rows.iter().flat_map(|(table, rows, values)| {
        let width = values.len() / rows.len().max(1);
        rows.iter()
            .enumerate()
            .map(move |(index, row)| (*table, *row, &values[index * width..(index + 1) * width]))
    });
    for routed in routes {
        for (&position, &row) in routed.positions.iter().zip(&routed.rows) {
            match received.next() {
                Some((table, received_row, values))
                    if table == routed.tensor_index && received_row == row =>
                {
                    let width = values.len();
                    outputs[routed.selection][position * width..(position + 1) * width]
                        .copy_from_slice(values);
                }
                other => {
                    return Err(connection.protocol(format!(
                        "expected row {row} of table {}, received {:?}",
                        routed.tensor_index,
                        other.map(|(table, row, _)| (table, row))
                    )));
                }
            }
        }
    }
    Ok(())
}

fn check_length(what: &str, found: usize, expected: u64) -> Result<()> {
    if found as u64 != expected {
        return Err(Error::invalid(format!(
            "{what} has {found} elements, expected {expected}"
        )));
    }
    Ok(())
}

/// Splits the dense vector into the shards' disjoint slices.
fn split_dense<'a>(plan: &ShardPlan, mut dense: &'a mut [f32]) -> Vec<&'a mut [f32]> {
    plan.shards()
        .iter()
        .map(|layout| {
            let (head, rest) =
                std::mem::take(&mut dense).split_at_mut(layout.dense_element_count() as usize);
            dense = rest;
            head
        })
        .collect()
}

/// Connects to one shard and checks that it is the expected shard of this job.
async fn connect_shard(
    config: &ClientConfig,
    traffic: &TrafficCounters,
    shard_id: u32,
    address: &str,
    shard_count: u32,
) -> Result<ShardConnection> {
    let context = || format!("connect to shard {shard_id} at {address}");
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|source| Error::Transport {
            context: context(),
            source,
        })?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES);
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| Error::Transport {
            context: context(),
            source,
        })?;
    let message_bytes = config.max_message_bytes();
    let mut client = ParameterServerClient::new(channel)
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
async fn call_shard(
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
    let dtype = DType::from_wire(header.dtype, "reply dtype")?;
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
                        "dense chunk of {count} elements at offset {}, expected offset {filled} of {expected}",
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
