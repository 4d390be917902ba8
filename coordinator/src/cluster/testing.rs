//! What the cluster's tests share: a coordinator core over a store a test can hold, and test
//! nodes that register, receive start instructions and report their ranks.

use std::sync::Arc;

use cohort_proto::JobId;
use cohort_proto::v1::{self, Instruction, instruction};

use super::{Cluster, JobSlot, membership};
use crate::config::CoordinatorConfig;
use crate::model::{JobRecord, now_ms};
use crate::store::embedded::EmbeddedStore;
use crate::store::faults::FaultyStore;

/// A coordinator core over a store whose writes a test can hold.
pub(super) async fn cluster(data_dir: &std::path::Path) -> (Arc<Cluster>, Arc<FaultyStore>) {
    cluster_with(
        data_dir,
        CoordinatorConfig {
            data_dir: data_dir.to_owned(),
            ..CoordinatorConfig::default()
        },
    )
    .await
}

/// A coordinator core with `config`.
pub(super) async fn cluster_with(
    data_dir: &std::path::Path,
    config: CoordinatorConfig,
) -> (Arc<Cluster>, Arc<FaultyStore>) {
    let embedded = Arc::new(EmbeddedStore::open(data_dir).unwrap());
    let store = Arc::new(FaultyStore::new(embedded));
    let cluster = Cluster::load(config, store.clone()).await.unwrap();
    (Arc::new(cluster), store)
}

/// Registers a node with one CPU slot; returns its session id and instruction stream.
pub(super) async fn register(
    cluster: &Cluster,
    node: &str,
) -> (String, membership::InstructionReceiver) {
    let mut stream = cluster
        .register(v1::RegisterRequest {
            node_id: node.to_owned(),
            hostname: node.to_owned(),
            address: "127.0.0.1".to_owned(),
            devices: vec![v1::Device {
                kind: v1::DeviceKind::Cpu as i32,
                index: 0,
                name: "cpu slot".to_owned(),
                ..v1::Device::default()
            }],
            ranks: Vec::new(),
            session_id: String::new(),
        })
        .await
        .unwrap();
    let Some(Ok(Instruction {
        kind: Some(instruction::Kind::Registered(registered)),
    })) = stream.recv().await
    else {
        panic!("a registration's stream opens with `registered`");
    };
    (registered.session_id, stream)
}

/// A node of a test cluster: its id, session and instruction stream.
pub(super) struct TestNode {
    pub(super) id: String,
    pub(super) session_id: String,
    pub(super) stream: membership::InstructionReceiver,
}

impl TestNode {
    pub(super) async fn join(cluster: &Cluster, id: &str) -> Self {
        let (session_id, stream) = register(cluster, id).await;
        Self {
            id: id.to_owned(),
            session_id,
            stream,
        }
    }

    /// The start instructions received so far, as `(rank, attempt)`.
    pub(super) fn started(&mut self) -> Vec<(u32, u32)> {
        let mut started = Vec::new();
        while let Ok(Ok(Instruction { kind: Some(kind) })) = self.stream.try_recv() {
            if let instruction::Kind::StartRank(start) = kind {
                started.push((start.rank, start.attempt));
            }
        }
        started
    }

    /// Reports one rank of `job_id`'s `attempt` in `state`.
    pub(super) async fn report(
        &self,
        cluster: &Cluster,
        job_id: &JobId,
        (rank, attempt): (u32, u32),
        state: v1::RankState,
        exit_code: Option<i32>,
    ) {
        let report = v1::RankReport {
            job_id: job_id.to_string(),
            rank,
            attempt,
            state: state as i32,
            pid: 100 + rank,
            exit_code,
            exited_at_unix_ms: if exit_code.is_some() { now_ms() } else { 0 },
            // 143 is 128 + SIGTERM: what a rank the worker stopped exits with.
            stop_cause: if exit_code == Some(143) {
                v1::StopCause::Instructed as i32
            } else {
                v1::StopCause::Unspecified as i32
            },
            ..v1::RankReport::default()
        };
        let accepted = cluster
            .heartbeat(v1::HeartbeatRequest {
                node_id: self.id.clone(),
                session_id: self.session_id.clone(),
                ranks: vec![report],
                leaving: false,
            })
            .await
            .unwrap();
        assert!(accepted);
    }
}

/// Reports every rank of `placement` (of `attempt`) in `state`, each from its own node.
pub(super) async fn report_each(
    cluster: &Cluster,
    nodes: &[TestNode],
    job_id: &JobId,
    placement: &[crate::model::RankRecord],
    (attempt, state, exit_code): (u32, v1::RankState, Option<i32>),
) {
    for rank in placement {
        let node = nodes
            .iter()
            .find(|node| node.id == rank.node_id.as_str())
            .expect("a rank on a test node");
        node.report(cluster, job_id, (rank.rank, attempt), state, exit_code)
            .await;
    }
}

/// The job's record in memory.
pub(super) async fn record_of(cluster: &Cluster, job_id: &JobId) -> JobRecord {
    match cluster.state.lock().await.slot(job_id) {
        Some(JobSlot::Live(job)) => job.record.clone(),
        _ => panic!("job {job_id} is not live"),
    }
}
