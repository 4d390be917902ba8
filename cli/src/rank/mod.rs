//! The entry point of processes that run as ranks of a job: `cohort rank` (Cohort's training
//! runtime, or one of a job's parameter servers) and the benchmark ranks. Each reads its launch
//! from the environment its worker gave it ([`cohort_proto::launch::Launch::from_env`]: its
//! place, its node, and for `cohort rank` the job's spec), reaches the job's rendezvous store
//! through the coordinator, and joins a communicator; `cohort rank` first checks that it can
//! read its inputs.
//!
//! - [`inputs`]: the data set and the checkpoint being resumed, checked before joining.
//! - [`train`]: `cohort rank` itself; [`parameter_server`]: its parameter-server role.
//! - [`metrics`]: forwarding training metrics to the coordinator.
//! - [`store`]: the rendezvous store over gRPC.

pub mod inputs;
pub mod metrics;
pub mod parameter_server;
pub mod store;
pub mod train;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use cohort_collective::progress::Fault;
use cohort_collective::{
    Communicator, LinkSecret, Nccl, NcclConfig, Progress, TcpRing, TcpRingConfig, Transport,
    connect_group,
};
use cohort_proto::env;
use cohort_proto::launch::Launch;
use cohort_proto::transport::CaCertificate;
use cohort_trainer::mesh::MeshLinks;
use tokio::runtime::Runtime;

use crate::client;
use store::GrpcStore;

/// A rank's connection to its job: the runtime its gRPC calls run on and the rendezvous store.
pub struct RankLink {
    /// Where the rank is, as its worker launched it.
    pub launch: Launch,
    /// The address other ranks reach this node at (`COHORT_NODE_ADDR`).
    pub node_address: IpAddr,
    /// Runtime for gRPC calls (the caller's thread stays free of async code).
    pub runtime: Runtime,
    /// The job's rendezvous store.
    pub store: GrpcStore,
    /// The cluster's CA, when it serves TLS (`COHORT_CA`, read once): what the rank's
    /// clients (rendezvous, metrics, parameter servers) trust.
    pub ca: Option<CaCertificate>,
    /// The record of what this rank's communicators do, reported with its metrics for hang
    /// diagnosis.
    pub progress: Progress,
    /// Longest a collective may wait on a peer before it fails on its own
    /// ([`RankLink::watch_hangs`] sets it past the job's hang timeout).
    pub communication_timeout: Duration,
}

/// The communicators' own timeout when nothing else is asked for, and the margin they keep
/// past the job's hang timeout, so that the coordinator's diagnosis comes first.
const COMMUNICATION_TIMEOUT: Duration = Duration::from_secs(30);

/// The rendezvous service, as this process's job, trusting `ca`.
fn rendezvous_target(launch: &Launch, ca: Option<&CaCertificate>) -> client::Target {
    client::Target {
        address: launch.node.rendezvous.clone(),
        token: launch.place.job_token.clone(),
        ca: ca.cloned(),
    }
}

impl RankLink {
    /// Sets the allocator to keep freed tensor buffers, reads the launch from the environment
    /// and connects to the rendezvous service.
    pub fn connect() -> Result<Self> {
        // Before any tensor exists: freed step buffers stay in the heap for the next step.
        if !cohort_trainer::host_memory::keep_freed_buffers() {
            tracing::debug!("the allocator keeps its default thresholds");
        }
        let launch = Launch::from_env()?;
        let node_address = launch.node.node_ip()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("starting the rank's runtime")?;
        let ca = launch
            .node
            .ca
            .as_deref()
            .map(CaCertificate::read)
            .transpose()?;
        let rendezvous =
            runtime.block_on(client::rendezvous(&rendezvous_target(&launch, ca.as_ref())))?;
        let job_id = launch.place.job_id.to_string();
        let store = GrpcStore::new(runtime.handle().clone(), rendezvous, job_id);
        let fault = match (std::env::var(env::FAULT_HANG), launch.place.restart_count) {
            (Ok(text), 0) => Fault::parse(&text, launch.place.rank as usize)
                .map_err(|error| anyhow::anyhow!("{}: {error}", env::FAULT_HANG))?,
            _ => None,
        };
        Ok(Self {
            launch,
            node_address,
            runtime,
            store,
            ca,
            progress: Progress::with_fault(fault),
            communication_timeout: COMMUNICATION_TIMEOUT,
        })
    }

    /// Sets the communicators' own timeout past the job's hang timeout (`hang_timeout_s`; 0:
    /// no diagnosis, the default timeout), so that a hang is named by the coordinator first.
    pub fn watch_hangs(&mut self, hang_timeout_s: u32) {
        if hang_timeout_s > 0 {
            self.communication_timeout =
                Duration::from_secs(u64::from(hang_timeout_s)) + COMMUNICATION_TIMEOUT;
        }
    }

    /// This process's index in its job: a training rank, or a parameter server after them.
    pub fn rank(&self) -> usize {
        self.launch.place.rank as usize
    }

    /// Training ranks in the job.
    pub fn world_size(&self) -> usize {
        self.launch.place.world_size as usize
    }

    /// Starts forwarding this rank's training metrics to the coordinator.
    pub fn metrics(&self) -> Result<metrics::CoordinatorMetrics> {
        let rendezvous = self
            .runtime
            .block_on(client::rendezvous(&rendezvous_target(
                &self.launch,
                self.ca.as_ref(),
            )))?;
        Ok(metrics::CoordinatorMetrics::start(
            self.runtime.handle().clone(),
            rendezvous,
            self.launch.place.job_id.to_string(),
            self.launch.place.rank,
            self.progress.clone(),
        ))
    }

    /// The secret the job's links prove they share, derived from the job's token (none only
    /// from a coordinator that issues no tokens).
    pub fn link_secret(&self) -> Option<LinkSecret> {
        self.launch
            .place
            .job_token
            .as_ref()
            .map(|token| LinkSecret::derive(token.expose()))
    }

    /// Joins the ring of all the job's ranks under key prefix `name`, listening on the node's
    /// address, proving the job's secret on both links.
    pub fn ring(&self, name: &str) -> Result<TcpRing> {
        self.ring_proving(name, self.link_secret())
    }

    /// Joins the ring under key prefix `name` as [`Self::ring`] does, its links proving
    /// `secret` (`None`: nothing; for benchmarks that compare).
    pub fn ring_proving(&self, name: &str, secret: Option<LinkSecret>) -> Result<TcpRing> {
        let config = TcpRingConfig {
            listen_address: SocketAddr::new(self.node_address, 0),
            secret,
            io_timeout: self.communication_timeout,
            progress: self.progress.clone(),
            ..TcpRingConfig::default()
        };
        TcpRing::connect(&self.store, name, self.rank(), self.world_size(), &config)
            .with_context(|| format!("rank {} joining communicator {name:?}", self.rank()))
    }

    /// Joins the group of all the job's ranks under key prefix `name` through `transport`:
    /// shared memory between ranks on this node where `transport` allows, the TCP ring (on
    /// the node's address) otherwise; every link proves the job's secret.
    pub fn group(&self, name: &str, transport: Transport) -> Result<Box<dyn Communicator + Send>> {
        let config = self.mesh_links(transport).group_config();
        connect_group(&self.store, name, self.rank(), self.world_size(), &config)
            .with_context(|| format!("rank {} joining communicator {name:?}", self.rank()))
    }

    /// How this rank's collective groups and links are made: on the node's address, proving
    /// the job's secret, sharing memory with the ranks of this node as `transport` allows.
    pub fn mesh_links(&self, transport: Transport) -> MeshLinks {
        MeshLinks {
            listen_address: SocketAddr::new(self.node_address, 0),
            secret: self.link_secret(),
            progress: self.progress.clone(),
            io_timeout: self.communication_timeout,
            transport,
            node: self.launch.node.node_id.to_string(),
        }
    }

    /// Joins the job's NCCL communicator `name` (every rank of the job), on local CUDA device
    /// `ordinal`. Rank 0 publishes NCCL's unique id through the rendezvous store.
    pub fn nccl(&self, name: &str, ordinal: usize) -> Result<Nccl> {
        let config = NcclConfig {
            prefix: name.to_owned(),
            rank: self.rank(),
            world_size: self.world_size(),
            device: ordinal,
            collective_timeout: self.communication_timeout,
            progress: self.progress.clone(),
            ..NcclConfig::default()
        };
        Nccl::connect(&self.store, &config).with_context(|| {
            format!(
                "rank {} joining NCCL communicator {name:?} on cuda:{ordinal}",
                self.rank()
            )
        })
    }
}
