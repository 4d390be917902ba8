//! Ships captured rank output to the coordinator in batches.
//!
//! Rank readers hand lines to a bounded channel (a rank that prints faster than the coordinator
//! takes lines is slowed down rather than losing them); one task batches them per job and pushes
//! them. A rank's exit is reported only after its last lines are shipped ([`LogShipper::flush`]),
//! so a finished job's log is complete. Every push carries the worker's current session id;
//! while the worker has none (registering again), or when the coordinator no longer knows the
//! one a push carried, the batch waits for the next session instead of being dropped.

use std::collections::BTreeMap;
use std::time::Duration;

use cohort_proto::failover::CoordinatorConnection;
use cohort_proto::v1::membership_client::MembershipClient;
use cohort_proto::v1::{LogLine, PushLogsRequest};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::warn;

/// Lines buffered between the rank readers and the shipping task.
const CHANNEL_LINES: usize = 8192;
/// Most lines in one push.
const BATCH_LINES: usize = 1024;
/// Longest a line waits before it is pushed.
const BATCH_DELAY: Duration = Duration::from_millis(100);
/// Attempts per batch before it is dropped (with a warning) while the coordinator is away.
const PUSH_ATTEMPTS: u32 = 5;
/// Longest a batch waits for the worker to register (again) before it is dropped.
const SESSION_WAIT: Duration = Duration::from_secs(10);

enum Message {
    Line { job_id: String, line: LogLine },
    Flush(oneshot::Sender<()>),
}

/// Hands lines to the shipping task. Cheap to clone.
#[derive(Clone)]
pub struct LogShipper {
    /// Feeds the shipping task.
    sender: mpsc::Sender<Message>,
}

impl LogShipper {
    /// Starts the shipping task, pushing through `client` on behalf of node `node_id` with the
    /// session id `session` holds.
    pub fn start(
        client: MembershipClient<CoordinatorConnection>,
        node_id: String,
        session: watch::Receiver<Option<String>>,
    ) -> Self {
        let (sender, receiver) = mpsc::channel(CHANNEL_LINES);
        tokio::spawn(ship(
            Pusher {
                client,
                node_id,
                session,
            },
            receiver,
        ));
        Self { sender }
    }

    /// Queues one line; waits while the queue is full.
    pub async fn send(&self, job_id: &str, line: LogLine) {
        let _ = self
            .sender
            .send(Message::Line {
                job_id: job_id.to_owned(),
                line,
            })
            .await;
    }

    /// Returns once every line queued before the call has been pushed (or given up on).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.sender.send(Message::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

/// What a push needs: the connection and who is pushing.
struct Pusher {
    /// The coordinator's membership service.
    client: MembershipClient<CoordinatorConnection>,
    /// This node.
    node_id: String,
    /// The current session id (`None` while registering).
    session: watch::Receiver<Option<String>>,
}

impl Pusher {
    /// Waits (at most [`SESSION_WAIT`]) for a session other than `stale`; returns it.
    async fn session_other_than(&mut self, stale: Option<&str>) -> Option<String> {
        let wait = self.session.wait_for(|current| {
            current
                .as_deref()
                .is_some_and(|session| Some(session) != stale)
        });
        match tokio::time::timeout(SESSION_WAIT, wait).await {
            Ok(Ok(session)) => session.clone(),
            _ => None,
        }
    }

    /// Pushes every pending line, batch by batch.
    async fn push_all(&mut self, pending: &mut BTreeMap<String, Vec<LogLine>>) {
        for (job_id, lines) in std::mem::take(pending) {
            for batch in lines.chunks(BATCH_LINES) {
                self.push(&job_id, batch).await;
            }
        }
    }

    /// Pushes one batch, retrying while the coordinator is unreachable and waiting for a new
    /// session when it does not know the one the push carried.
    async fn push(&mut self, job_id: &str, batch: &[LogLine]) {
        let mut session = self.session.borrow().clone();
        let mut attempt = 0;
        loop {
            attempt += 1;
            if session.is_none() {
                session = self.session_other_than(None).await;
            }
            let Some(session_id) = session.clone() else {
                warn!(%job_id, lines = batch.len(), "dropping log lines: the worker is not registered");
                return;
            };
            let request = PushLogsRequest {
                node_id: self.node_id.clone(),
                job_id: job_id.to_owned(),
                lines: batch.to_vec(),
                session_id: session_id.clone(),
            };
            match self.client.push_logs(request).await {
                Ok(_) => return,
                Err(status) if attempt < PUSH_ATTEMPTS => match status.code() {
                    tonic::Code::Unavailable => {
                        tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                    }
                    tonic::Code::Unauthenticated => {
                        session = self.session_other_than(Some(&session_id)).await;
                    }
                    _ => {
                        warn!(%job_id, lines = batch.len(), %status, "dropping log lines the coordinator did not take");
                        return;
                    }
                },
                Err(status) => {
                    warn!(%job_id, lines = batch.len(), %status, "dropping log lines the coordinator did not take");
                    return;
                }
            }
        }
    }
}

async fn ship(mut pusher: Pusher, mut receiver: mpsc::Receiver<Message>) {
    let mut pending: BTreeMap<String, Vec<LogLine>> = BTreeMap::new();
    let mut pending_lines = 0usize;
    loop {
        let message = if pending_lines == 0 {
            receiver.recv().await
        } else {
            match tokio::time::timeout(BATCH_DELAY, receiver.recv()).await {
                Ok(message) => message,
                Err(_) => {
                    pusher.push_all(&mut pending).await;
                    pending_lines = 0;
                    continue;
                }
            }
        };
        match message {
            None => {
                pusher.push_all(&mut pending).await;
                return;
            }
            Some(Message::Line { job_id, line }) => {
                pending.entry(job_id).or_default().push(line);
                pending_lines += 1;
                if pending_lines >= BATCH_LINES {
                    pusher.push_all(&mut pending).await;
                    pending_lines = 0;
                }
            }
            Some(Message::Flush(done)) => {
                pusher.push_all(&mut pending).await;
                pending_lines = 0;
                let _ = done.send(());
            }
        }
    }
}
