//! The entry point of processes that run as ranks of a job: `cohort rank` (Cohort's training
//! runtime, or one of a job's parameter servers) and the benchmark ranks. Each reads its place
//! from the environment, reaches the job's rendezvous store through the coordinator, and joins
//! a communicator; `cohort rank` first checks that it can read its inputs.
//!
//! - [`env`]: the rank's place in its job, from the environment its worker gave it.
//! - [`inputs`]: the data set and the checkpoint being resumed, checked before joining.
//! - [`train`]: `cohort rank` itself; [`parameter_server`]: its parameter-server role.
//! - [`metrics`]: forwarding training metrics to the coordinator.
//! - [`store`]: the rendezvous store over gRPC.

pub mod env;
pub mod inputs;
pub mod metrics;
pub mod parameter_server;
pub mod store;
pub mod train;

use std::net::SocketAddr;

use anyhow::{Context, Result};
use cohort_collective::{Nccl, NcclConfig, TcpRing, TcpRingConfig};
use tokio::runtime::Runtime;

use crate::client;
use env::RankEnv;
use store::GrpcStore;

/// A rank's connection to its job: the runtime its gRPC calls run on and the rendezvous store.
pub struct RankLink {
    /// Where the rank is.
    pub env: RankEnv,
    /// Runtime for gRPC calls (the caller's thread stays free of async code).
    pub runtime: Runtime,
    /// The job's rendezvous store.
    pub store: GrpcStore,
}

impl RankLink {
    /// Reads the environment and connects to the rendezvous service.
    pub fn connect() -> Result<Self> {
        let env = RankEnv::from_env()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("starting the rank's runtime")?;
        let rendezvous = runtime.block_on(client::rendezvous(&env.rendezvous))?;
        let store = GrpcStore::new(runtime.handle().clone(), rendezvous, env.job_id.clone());
        Ok(Self {
            env,
            runtime,
            store,
        })
    }

    /// Starts forwarding this rank's training metrics to the coordinator.
    pub fn metrics(&self) -> Result<metrics::CoordinatorMetrics> {
        let rendezvous = self
            .runtime
            .block_on(client::rendezvous(&self.env.rendezvous))?;
        Ok(metrics::CoordinatorMetrics::start(
            self.runtime.handle().clone(),
            rendezvous,
            self.env.job_id.clone(),
            self.env.rank as u32,
        ))
    }

    /// Joins the ring of all the job's ranks under key prefix `name`, listening on the node's
    /// address.
    pub fn ring(&self, name: &str) -> Result<TcpRing> {
        let config = TcpRingConfig {
            listen_address: SocketAddr::new(self.env.node_address, 0),
            ..TcpRingConfig::default()
        };
        TcpRing::connect(
            &self.store,
            name,
            self.env.rank,
            self.env.world_size,
            &config,
        )
        .with_context(|| format!("rank {} joining communicator {name:?}", self.env.rank))
    }

    /// Joins the job's NCCL communicator `name` (every rank of the job), on local CUDA device
    /// `ordinal`. Rank 0 publishes NCCL's unique id through the rendezvous store.
    pub fn nccl(&self, name: &str, ordinal: usize) -> Result<Nccl> {
        let config = NcclConfig {
            prefix: name.to_owned(),
            rank: self.env.rank,
            world_size: self.env.world_size,
            device: ordinal,
            ..NcclConfig::default()
        };
        Nccl::connect(&self.store, &config).with_context(|| {
            format!(
                "rank {} joining NCCL communicator {name:?} on cuda:{ordinal}",
                self.env.rank
            )
        })
    }
}
