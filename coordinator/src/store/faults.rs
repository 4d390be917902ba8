//! A [`ClusterStore`] for tests that holds or fails writes on demand, over any other store.
//!
//! - Holding: while the gate is closed ([`FaultyStore::hold_writes`]), every job and node write
//!   waits at it, in flight, until [`FaultyStore::release_writes`]; a test learns that a write
//!   is waiting with [`FaultyStore::write_held`], so it synchronises on the write itself, never
//!   on time.
//! - Failing: [`FaultyStore::fail_writes`] makes the next record writes (job and node writes,
//!   quarantine moves) fail with a store error, as a full disk or an unreachable etcd would.
//!   Sequence allocation is left alone, so a test can fail a submission's record write.
//!
//! Every job write that reaches the underlying store is recorded, in order, for tests of write
//! order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cohort_proto::JobId;
use tokio::sync::watch;

use super::{ClusterStore, Listing, Quarantined, QuarantinedRecord};
use crate::auth::records::{AuditEntry, UserRecord};
use crate::error::{Error, Result};
use crate::lifecycle::JobState;
use crate::model::{JobRecord, MetricHistory, NodeRecord, SweepRecord};

/// The gate writes pass.
#[derive(Debug, Default, Clone, Copy)]
struct Gate {
    /// Whether writes wait at the gate.
    closed: bool,
    /// How many writes wait there now.
    waiting: usize,
}

/// Wraps a store; see the module doc.
pub struct FaultyStore {
    /// The store that does the work.
    inner: Arc<dyn ClusterStore>,
    /// The gate job and node writes pass.
    gate: watch::Sender<Gate>,
    /// How many of the next writes fail (`u64::MAX`: every one).
    failures: AtomicU64,
    /// Every job write the underlying store accepted, in order: the job and its state.
    written: Mutex<Vec<(JobId, JobState)>>,
}

impl FaultyStore {
    /// Wraps `inner`, passing every write through.
    pub fn new(inner: Arc<dyn ClusterStore>) -> Self {
        Self {
            inner,
            gate: watch::Sender::new(Gate::default()),
            failures: AtomicU64::new(0),
            written: Mutex::new(Vec::new()),
        }
    }

    /// Closes the gate: job and node writes from now on wait at it.
    pub fn hold_writes(&self) {
        self.gate.send_modify(|gate| gate.closed = true);
    }

    /// Opens the gate: every waiting write goes on.
    pub fn release_writes(&self) {
        self.gate.send_modify(|gate| gate.closed = false);
    }

    /// Waits until at least one write waits at the gate.
    pub async fn write_held(&self) {
        let mut gate = self.gate.subscribe();
        gate.wait_for(|gate| gate.waiting > 0)
            .await
            .expect("the store owns the gate");
    }

    /// Makes the next `count` writes fail (`u64::MAX`: every write from now on; 0: none).
    pub fn fail_writes(&self, count: u64) {
        self.failures.store(count, Ordering::SeqCst);
    }

    /// Every job write the underlying store accepted so far, in order.
    pub fn written_jobs(&self) -> Vec<(JobId, JobState)> {
        self.written.lock().expect("not poisoned").clone()
    }

    /// Waits while the gate is closed.
    async fn pass_gate(&self) {
        let mut gate = self.gate.subscribe();
        if !gate.borrow_and_update().closed {
            return;
        }
        self.gate.send_modify(|gate| gate.waiting += 1);
        gate.wait_for(|gate| !gate.closed)
            .await
            .expect("the store owns the gate");
        self.gate.send_modify(|gate| gate.waiting -= 1);
    }

    /// Fails this write if a failure is due.
    fn injected_failure(&self, operation: &str) -> Result<()> {
        let due = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| match left {
                0 => None,
                u64::MAX => Some(u64::MAX),
                left => Some(left - 1),
            })
            .is_ok();
        if due {
            return Err(Error::Store(format!("{operation}: injected failure")));
        }
        Ok(())
    }
}

#[async_trait]
impl ClusterStore for FaultyStore {
    async fn reserve_job_seqs(&self, count: u64) -> Result<u64> {
        self.inner.reserve_job_seqs(count).await
    }

    async fn put_job(&self, job: &JobRecord) -> Result<()> {
        self.pass_gate().await;
        self.injected_failure("writing job")?;
        self.inner.put_job(job).await?;
        self.written
            .lock()
            .expect("not poisoned")
            .push((job.id.clone(), job.state));
        Ok(())
    }

    async fn get_job(&self, id: &JobId) -> Result<Option<JobRecord>> {
        self.inner.get_job(id).await
    }

    async fn list_jobs(&self) -> Result<Listing<JobRecord>> {
        self.inner.list_jobs().await
    }

    async fn put_node(&self, node: &NodeRecord) -> Result<()> {
        self.pass_gate().await;
        self.injected_failure("writing node")?;
        self.inner.put_node(node).await
    }

    async fn list_nodes(&self) -> Result<Listing<NodeRecord>> {
        self.inner.list_nodes().await
    }

    async fn quarantine_job(&self, id: &JobId, reason: &str) -> Result<Option<Quarantined>> {
        self.injected_failure("quarantining job")?;
        self.inner.quarantine_job(id, reason).await
    }

    async fn list_quarantined(&self) -> Result<Vec<QuarantinedRecord>> {
        self.inner.list_quarantined().await
    }

    async fn put_user(&self, user: &UserRecord) -> Result<()> {
        self.injected_failure("writing user")?;
        self.inner.put_user(user).await
    }

    async fn remove_user(&self, name: &str) -> Result<bool> {
        self.injected_failure("removing user")?;
        self.inner.remove_user(name).await
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>> {
        self.inner.list_users().await
    }

    async fn put_sweep(&self, sweep: &SweepRecord) -> Result<()> {
        self.injected_failure("writing sweep")?;
        self.inner.put_sweep(sweep).await
    }

    async fn list_sweeps(&self) -> Result<Vec<SweepRecord>> {
        self.inner.list_sweeps().await
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<u64> {
        self.injected_failure("appending to the audit log")?;
        self.inner.append_audit(entry).await
    }

    async fn list_audit(&self, after_seq: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        self.inner.list_audit(after_seq, limit).await
    }

    async fn put_job_metrics(&self, id: &JobId, history: &MetricHistory) -> Result<()> {
        self.inner.put_job_metrics(id, history).await
    }

    async fn get_job_metrics(&self, id: &JobId) -> Result<Option<MetricHistory>> {
        self.inner.get_job_metrics(id).await
    }
}
