//! The ordered write queue: how the cluster persists job records without holding its state
//! lock across a store round trip.
//!
//! - An operation changes the in-memory state under the lock and, before releasing it, enqueues
//!   every record it changed ([`WriteQueue::put_job`]). The order of the queue is therefore the
//!   order in which the state changed.
//! - One writer task takes records off the queue and writes them in order, so the store sees a
//!   job's states in the order they happened: a later state is never overwritten by an earlier
//!   one. What has queued up meanwhile is written together: consecutive job records in one
//!   transaction (group commit), so concurrent submissions and a scheduler pass's placements
//!   share one durable commit.
//! - A caller that must not answer before its change is durable (a submission, a cancellation,
//!   a scheduler pass before it starts any rank) awaits its [`Written`] tickets after releasing
//!   the lock; other callers (a heartbeat from another node) never wait for it.
//! - Watchers hear of a job change ([`JobChanged`]) only once its record is stored: the writer
//!   publishes it, so no user is shown a state (an ended job) that a crash could still undo.
//! - A failed write is returned to the caller waiting on it, as a direct write's error was.
//!   Memory keeps the change, and the job's next write, which carries the whole record, stores
//!   it (as before).
//! - A job's metric curves go through the queue once, just before its final record
//!   ([`WriteQueue::put_curves`]): whoever sees the job ended can read its whole curves.
//! - A barrier ([`WriteQueue::barrier`]) lands once every write enqueued before it has: reading
//!   a retired job back from the store, and shutdown, wait on one, so nothing is read stale or
//!   lost.

use std::sync::{Arc, Weak};

use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{error, warn};

use cohort_proto::JobId;

use super::JobChanged;
use crate::error::{Error, Result};
use crate::model::{JobRecord, MetricHistory};
use crate::store::ClusterStore;

/// What one entry of the queue writes.
enum Payload {
    /// A job record.
    Job(Box<JobRecord>),
    /// A job's metric curves (written with its final record, so an ended job's are whole).
    Curves(JobId, Box<MetricHistory>),
    /// Nothing: a barrier.
    Barrier,
}

/// One entry of the queue: what to write, with whom to tell.
struct Queued {
    /// What to write.
    payload: Payload,
    /// Receives the write's outcome.
    done: oneshot::Sender<Result<()>>,
}

/// The sending end of the queue, kept by the cluster.
pub(super) struct WriteQueue {
    /// Feeds the writer task.
    sender: mpsc::UnboundedSender<Queued>,
}

/// The outcome of one enqueued write, to await after the state lock is released. Dropping it
/// does not cancel the write.
#[must_use = "a write's outcome is awaited, or its failure goes unreported"]
pub(super) struct Written(oneshot::Receiver<Result<()>>);

impl WriteQueue {
    /// Starts the writer task over `store`, publishing each stored job change on `events`.
    ///
    /// The writer holds the store weakly: once the cluster (the store's owner) is dropped, the
    /// store closes at once, and a coordinator can open the same data directory again.
    pub(super) fn start(
        store: &Arc<dyn ClusterStore>,
        events: broadcast::Sender<JobChanged>,
    ) -> Self {
        let (sender, queue) = mpsc::unbounded_channel();
        tokio::spawn(write_in_order(Arc::downgrade(store), events, queue));
        Self { sender }
    }

    /// Enqueues a write of `job` as it is now.
    pub(super) fn put_job(&self, job: &JobRecord) -> Written {
        self.enqueue(Payload::Job(Box::new(job.clone())))
    }

    /// Enqueues a write of job `job_id`'s metric curves.
    pub(super) fn put_curves(&self, job_id: &JobId, curves: MetricHistory) -> Written {
        self.enqueue(Payload::Curves(job_id.clone(), Box::new(curves)))
    }

    /// Enqueues a barrier: it lands once every write enqueued before it has.
    pub(super) fn barrier(&self) -> Written {
        self.enqueue(Payload::Barrier)
    }

    /// Puts one entry on the queue and returns its ticket.
    fn enqueue(&self, payload: Payload) -> Written {
        let (done, outcome) = oneshot::channel();
        // When the writer is gone, `done` is dropped with the entry and the ticket says so.
        let _ = self.sender.send(Queued { payload, done });
        Written(outcome)
    }
}

impl Written {
    /// Waits until the write has landed; returns its error if it failed.
    pub(super) async fn landed(self) -> Result<()> {
        self.0.await.unwrap_or_else(|_| {
            Err(Error::Store(
                "the job writer stopped before writing the record".to_owned(),
            ))
        })
    }
}

/// Waits until every write in `writes` has landed; returns the first failure.
pub(super) async fn all_landed(writes: Vec<Written>) -> Result<()> {
    let mut first_failure = None;
    for written in writes {
        if let Err(error) = written.landed().await {
            first_failure.get_or_insert(error);
        }
    }
    first_failure.map_or(Ok(()), Err)
}

/// Most writes the writer takes off the queue at once: consecutive job records among them are
/// stored in one transaction (group commit).
const MAX_BATCH: usize = 512;

/// The writer task: writes every queued record in order until the queue closes (the cluster
/// was dropped) and is empty. It takes what is queued at once (up to [`MAX_BATCH`]) and stores
/// each run of consecutive job records with one [`ClusterStore::put_jobs`], so that many
/// submissions and scheduler changes share one durable commit.
async fn write_in_order(
    store: Weak<dyn ClusterStore>,
    events: broadcast::Sender<JobChanged>,
    mut queue: mpsc::UnboundedReceiver<Queued>,
) {
    let mut batch: Vec<Queued> = Vec::with_capacity(MAX_BATCH);
    let mut jobs: Vec<(Box<JobRecord>, oneshot::Sender<Result<()>>)> = Vec::new();
    while let Some(first) = queue.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        for Queued { payload, done } in batch.drain(..) {
            match payload {
                Payload::Job(job) => jobs.push((job, done)),
                Payload::Barrier => {
                    write_jobs(&store, &events, &mut jobs).await;
                    let _ = done.send(Ok(()));
                }
                Payload::Curves(job_id, curves) => {
                    write_jobs(&store, &events, &mut jobs).await;
                    let result = match store.upgrade() {
                        Some(store) => store.put_job_metrics(&job_id, &curves).await,
                        None => Err(Error::Store(format!(
                            "writing the metric curves of job {job_id}: the store was closed"
                        ))),
                    };
                    if let Err(Err(error)) = done.send(result) {
                        warn!(%job_id, %error, "metric curves not written and nobody waited");
                    }
                }
            }
        }
        write_jobs(&store, &events, &mut jobs).await;
    }
}

/// Stores the job records of `jobs` in one write, then tells each waiter the outcome and
/// watchers of each stored change; empties `jobs`.
async fn write_jobs(
    store: &Weak<dyn ClusterStore>,
    events: &broadcast::Sender<JobChanged>,
    jobs: &mut Vec<(Box<JobRecord>, oneshot::Sender<Result<()>>)>,
) {
    if jobs.is_empty() {
        return;
    }
    let records: Vec<&JobRecord> = jobs.iter().map(|(job, _)| &**job).collect();
    let result = match store.upgrade() {
        Some(store) if records.len() == 1 => store.put_job(records[0]).await,
        Some(store) => store.put_jobs(&records).await,
        None => Err(Error::Store(format!(
            "writing {} job records: the store was closed",
            records.len()
        ))),
    };
    if let Err(error) = &result {
        error!(jobs = records.len(), %error, "job records not written");
    }
    for (job, done) in jobs.drain(..) {
        let outcome = match &result {
            Ok(()) => {
                // No watcher is not an error.
                let _ = events.send(JobChanged {
                    job_id: job.id.clone(),
                    finished: job.state.is_terminal(),
                });
                Ok(())
            }
            Err(error) => Err(shared_failure(error)),
        };
        if let Err(Err(error)) = done.send(outcome) {
            warn!(job_id = %job.id, %error, "job write failed and nobody waited for it");
        }
    }
}

/// The failure of a write shared by several waiters, as each of them is told it: the same kind
/// of error with the same words.
fn shared_failure(error: &Error) -> Error {
    match error {
        Error::Store(message) => Error::Store(message.clone()),
        Error::LostLeadership(message) => Error::LostLeadership(message.clone()),
        other => Error::Store(other.to_string()),
    }
}
