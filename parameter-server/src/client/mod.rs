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
//!
//! - [`connection`]: connecting to one shard, running one call, decoding its reply, counting
//!   bytes.
//! - [`routing`]: sending rows and dense slices to the shards that hold them and putting replies
//!   back in the caller's order.

pub mod connection;
pub mod routing;

use std::sync::Arc;

use cohort_proto::ps_v1;
use futures::future::try_join_all;

use crate::config::ClientConfig;
use crate::encoding::{self, DType};
use crate::error::{Error, Result};
use crate::sharding::{MAX_SHARDS, ShardLayout, ShardPlan, TensorDeclaration, plan_shards};
pub use connection::Traffic;
use connection::{
    DenseOutput, ShardCall, ShardConnection, ShardReply, TrafficCounters, call_shard, connect_shard,
};
use routing::{
    RoutedRows, RoutedSelection, check_length, route_gradients, route_selections, row_outputs,
    scatter_rows, split_dense, wire_selections,
};

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
    /// Connects to every shard (`addresses[s]` serves shard `s`, as `host:port`), checks that
    /// each serves this job and the expected shard, and plans the sharding of `tensors`.
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
        let shard_count = addresses.len() as u32;
        let connections = addresses.iter().enumerate().map(|(shard_id, address)| {
            connect_shard(&config, &traffic, shard_id as u32, address, shard_count)
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

    fn flat_start(&self, tensor_index: usize) -> u64 {
        self.plan
            .tensor_flat_range(tensor_index)
            .map_or(0, |range| range.start)
    }

    fn pull_spec(&self, dense: bool, rows: Vec<ps_v1::RowSelection>) -> ps_v1::PullSpec {
        ps_v1::PullSpec {
            dense,
            dtype: crate::encoding::to_wire(self.config.parameter_dtype) as i32,
            rows,
            all_rows: false,
        }
    }

    fn pull_request(&self, shard_id: u32, spec: ps_v1::PullSpec) -> ShardCall {
        ShardCall::Pull(ps_v1::PullRequest {
            sender: self.sender(shard_id),
            min_version: 0,
            pull: Some(spec),
        })
    }

    /// Sends the model's initial values (`values`: the full vector) to every shard not yet
    /// initialised, with the run's planned number of optimizer steps. Returns whether this call
    /// initialised any shard. Other ranks need not call it: their first pull waits for it.
    pub async fn init(&self, values: &[f32], total_steps: u64) -> Result<bool> {
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
        let fingerprint = self.plan.fingerprint();
        let calls = self.shards.iter().map(|connection| {
            let declarations = &declarations;
            async move {
                let mut client = connection.client.clone();
                // A shard already holding this layout needs no values (a rank restarting).
                let describe = ps_v1::DescribeRequest {
                    job_id: self.config.job_id.to_string(),
                    shard_id: connection.shard_id,
                };
                self.traffic.sent(&describe);
                let described = client
                    .describe(describe)
                    .await
                    .map_err(|status| connection.remote(status))?
                    .into_inner();
                self.traffic.received(&described);
                if described.initialised && described.layout_fingerprint == fingerprint {
                    return Ok(false);
                }
                let chunks = self.init_chunks(connection, values, declarations, total_steps);
                chunks.iter().for_each(|chunk| self.traffic.sent(chunk));
                let reply = client
                    .init(futures::stream::iter(chunks))
                    .await
                    .map_err(|status| connection.remote(status))?
                    .into_inner();
                self.traffic.received(&reply);
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

    /// Builds one shard's init stream: the header, its dense values, its rows of every table.
    fn init_chunks(
        &self,
        connection: &ShardConnection,
        values: &[f32],
        declarations: &[ps_v1::TensorDeclaration],
        total_steps: u64,
    ) -> Vec<ps_v1::InitChunk> {
        use ps_v1::init_chunk::Body;
        let layout = &self.plan.shards()[connection.shard_id as usize];
        let mut dense = Vec::with_capacity(layout.dense_element_count() as usize);
        let mut row_chunks = Vec::new();
        for segment in &layout.segments {
            let tensor = &self.plan.tensors()[segment.tensor_index];
            let start = (self.flat_start(segment.tensor_index) + segment.tensor_offset) as usize;
            let segment_values = &values[start..start + segment.element_count as usize];
            if !tensor.sparse {
                dense.extend_from_slice(segment_values);
                continue;
            }
            let width = tensor.row_elements;
            let first_row = segment.tensor_offset / width;
            let rows_per_chunk = connection.rows_per_chunk(width, DType::F32);
            for (index, rows) in segment_values
                .chunks(rows_per_chunk * width as usize)
                .enumerate()
            {
                let first = first_row + (index * rows_per_chunk) as u64;
                let count = rows.len() as u64 / width;
                row_chunks.push(ps_v1::InitChunk {
                    body: Some(Body::Rows(ps_v1::RowsChunk {
                        tensor_index: segment.tensor_index as u32,
                        rows: (first..first + count).collect(),
                        data: encoding::encode(DType::F32, rows),
                    })),
                });
            }
        }
        let header = ps_v1::InitChunk {
            body: Some(Body::Header(ps_v1::InitHeader {
                sender: self.sender(connection.shard_id),
                tensors: declarations.to_vec(),
                total_steps,
            })),
        };
        let dense_chunks = encoding::encode_chunks(DType::F32, &dense, connection.max_chunk_bytes)
            .into_iter()
            .map(|(offset, data)| ps_v1::InitChunk {
                body: Some(Body::Dense(ps_v1::DenseChunk { offset, data })),
            });
        std::iter::once(header)
            .chain(dense_chunks)
            .chain(row_chunks)
            .collect()
    }

    /// Pulls the dense vector into `dense` once this rank may proceed (the first pull waits
    /// for initialisation).
    pub async fn pull(&mut self, dense: &mut [f32]) -> Result<StepReport> {
        check_length("dense output", dense.len(), self.plan.dense_element_count())?;
        let outputs = split_dense(&self.plan, dense);
        let calls = self.shards.iter().zip(outputs).map(|(connection, output)| {
            let call = self.pull_request(connection.shard_id, self.pull_spec(true, Vec::new()));
            call_shard(
                connection,
                &self.traffic,
                &self.plan,
                call,
                DenseOutput::Slice(output),
            )
        });
        let replies = try_join_all(calls).await?;
        self.finish(replies, &[], &[])
    }

    /// Pulls every parameter (the full vector, embedding tables whole, in f32) into `values`:
    /// for evaluation, checkpoints and export, not for every step.
    pub async fn pull_all(&mut self, values: &mut [f32]) -> Result<StepReport> {
        self.pull_all_at(values, 0).await
    }

    /// Like [`ParameterClient::pull_all`], once every shard has applied at least `min_version`
    /// updates (the state at the end of training: `steps` in sync mode, `steps * ranks`
    /// otherwise).
    pub async fn pull_all_at(
        &mut self,
        values: &mut [f32],
        min_version: u64,
    ) -> Result<StepReport> {
        check_length("full output", values.len(), self.plan.total_element_count())?;
        let spec = ps_v1::PullSpec {
            dense: true,
            dtype: crate::encoding::to_wire(DType::F32) as i32,
            rows: Vec::new(),
            all_rows: true,
        };
        let calls = self.shards.iter().map(|connection| {
            let layout = &self.plan.shards()[connection.shard_id as usize];
            let output = DenseOutput::Owned(layout.dense_element_count() as usize);
            let call = ShardCall::Pull(ps_v1::PullRequest {
                sender: self.sender(connection.shard_id),
                min_version,
                pull: Some(spec.clone()),
            });
            call_shard(connection, &self.traffic, &self.plan, call, output)
        });
        let replies = try_join_all(calls).await?;
        for (layout, reply) in self.plan.shards().iter().zip(&replies) {
            self.place_full(layout, reply, values);
        }
        self.finish(replies, &[], &[])
    }

    /// Writes one shard's dense values and whole-table rows into the full vector.
    fn place_full(&self, layout: &ShardLayout, reply: &ShardReply, values: &mut [f32]) {
        let mut dense = reply.dense.as_slice();
        for segment in &layout.segments {
            if self.plan.tensors()[segment.tensor_index].sparse {
                continue;
            }
            let start = (self.flat_start(segment.tensor_index) + segment.tensor_offset) as usize;
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

    /// Pulls the selected embedding rows from the shards holding them; returns one vector per
    /// selection, `rows.len() * width` values each.
    pub async fn pull_rows(&mut self, selections: &[RowSelection<'_>]) -> Result<Vec<Vec<f32>>> {
        let routes = route_selections(&self.plan, selections)?;
        let involved: Vec<usize> = (0..self.shards.len())
            .filter(|shard| !routes[*shard].is_empty())
            .collect();
        let calls = involved.iter().map(|&shard| {
            let connection = &self.shards[shard];
            let spec = self.pull_spec(false, wire_selections(&routes[shard]));
            let call = self.pull_request(connection.shard_id, spec);
            call_shard(
                connection,
                &self.traffic,
                &self.plan,
                call,
                DenseOutput::Nothing,
            )
        });
        let replies = try_join_all(calls).await?;
        let mut outputs = row_outputs(&self.plan, selections);
        for (&shard, reply) in involved.iter().zip(&replies) {
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
        let sparse_routes = route_gradients(&self.plan, sparse)?;
        let selection_routes = route_selections(&self.plan, selections)?;
        let outputs = split_dense(&self.plan, dense_output);
        let calls = self.shards.iter().zip(outputs).map(|(connection, output)| {
            let shard = connection.shard_id as usize;
            let range = &self.plan.shards()[shard].dense_range;
            let spec = self.pull_spec(true, wire_selections(&selection_routes[shard]));
            let chunks = self.push_chunks(
                connection,
                step,
                spec.clone(),
                &dense_gradient[range.start as usize..range.end as usize],
                &sparse_routes[shard],
            );
            let ShardCall::Pull(fallback) = self.pull_request(connection.shard_id, spec) else {
                unreachable!("pull_request builds a pull");
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

    /// Builds one shard's push stream: the header, dense gradient chunks, row chunks.
    fn push_chunks(
        &self,
        connection: &ShardConnection,
        step: u64,
        pull: ps_v1::PullSpec,
        dense_gradient: &[f32],
        rows: &[RoutedRows],
    ) -> Vec<ps_v1::PushChunk> {
        use ps_v1::push_chunk::Body;
        let dtype = self.config.gradient_dtype;
        let shard = connection.shard_id as usize;
        let mut chunks = vec![ps_v1::PushChunk {
            body: Some(Body::Header(ps_v1::PushHeader {
                sender: self.sender(connection.shard_id),
                step,
                version: self.versions[shard].unwrap_or(0),
                dtype: crate::encoding::to_wire(dtype) as i32,
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
        for routed in rows {
            let width = self.plan.tensors()[routed.tensor_index].row_elements;
            let rows_per_chunk = connection.rows_per_chunk(width, dtype);
            for (row_chunk, value_chunk) in routed
                .rows
                .chunks(rows_per_chunk)
                .zip(routed.values.chunks(rows_per_chunk * width as usize))
            {
                chunks.push(ps_v1::PushChunk {
                    body: Some(Body::Rows(ps_v1::RowsChunk {
                        tensor_index: routed.tensor_index as u32,
                        rows: row_chunk.to_vec(),
                        data: encoding::encode(dtype, value_chunk),
                    })),
                });
            }
        }
        chunks
    }

    /// Records versions and clocks from every shard's reply and assembles the report.
    fn finish(
        &mut self,
        replies: Vec<ShardReply>,
        selections: &[RowSelection<'_>],
        selection_routes: &[Vec<RoutedSelection>],
    ) -> Result<StepReport> {
        let mut outputs = row_outputs(&self.plan, selections);
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

    /// Fetches a snapshot of every shard once each has applied at least `min_version` updates
    /// (for a checkpoint after step t in sync mode: `min_version = t + 1`). Returns them by
    /// shard id.
    pub async fn snapshot(&self, min_version: u64) -> Result<Vec<Vec<u8>>> {
        let calls = self.shards.iter().map(|connection| async move {
            let request = ps_v1::SnapshotRequest {
                job_id: self.config.job_id.to_string(),
                shard_id: connection.shard_id,
                min_version,
            };
            self.traffic.sent(&request);
            let mut stream = connection
                .client
                .clone()
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
                self.traffic.received(&chunk);
                let announced = *total.get_or_insert(chunk.total_bytes);
                if chunk.offset != bytes.len() as u64
                    || announced != chunk.total_bytes
                    || bytes.len() as u64 + chunk.data.len() as u64 > announced
                {
                    return Err(connection.protocol(format!(
                        "snapshot chunk of {} bytes at offset {} of {}, expected offset {} of \
                         {announced}",
                        chunk.data.len(),
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
        });
        try_join_all(calls).await
    }
}
