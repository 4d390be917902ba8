//! Persistent cluster state behind one trait, [`ClusterStore`], with two implementations:
//!
//! - [`embedded::EmbeddedStore`]: a redb database file under the coordinator's `--data-dir`
//!   (the default; nothing else to run).
//! - [`etcd::EtcdStore`]: an etcd cluster (`--store etcd://host:port`), for a coordinator whose
//!   state must outlive its machine.
//!
//! Both store the same bincode-encoded records ([`codec`]) and pass the same conformance tests.

pub mod codec;
pub mod embedded;
pub mod etcd;

use async_trait::async_trait;
use cohort_proto::JobId;

use crate::error::Result;
use crate::model::{JobRecord, NodeRecord};

/// Where the coordinator keeps jobs, placements and nodes.
///
/// Writes are durable when the call returns: the scheduler persists a placement before it tells
/// any worker to start a rank.
#[async_trait]
pub trait ClusterStore: Send + Sync + 'static {
    /// Allocates the next job sequence number (starting at 1), durably and atomically.
    async fn next_job_seq(&self) -> Result<u64>;
    /// Inserts or replaces a job record.
    async fn put_job(&self, job: &JobRecord) -> Result<()>;
    /// Returns one job record, if it exists.
    async fn get_job(&self, id: &JobId) -> Result<Option<JobRecord>>;
    /// Returns every job record, in no particular order.
    async fn list_jobs(&self) -> Result<Vec<JobRecord>>;
    /// Inserts or replaces a node record.
    async fn put_node(&self, node: &NodeRecord) -> Result<()>;
    /// Returns every node record, in no particular order.
    async fn list_nodes(&self) -> Result<Vec<NodeRecord>>;
}

#[cfg(test)]
mod conformance;
