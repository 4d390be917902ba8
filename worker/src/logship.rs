//! Ships captured rank output to the coordinator in batches.
//!
//! Rank readers hand lines to a bounded channel (a rank that prints faster than the coordinator
//! takes lines is slowed down rather than losing them); one task batches them per job and pushes
//! them. A rank's exit is reported only after its last lines are shipped ([`LogShipper::flush`]),
//! so a finished job's log is complete.

use std::collections::BTreeMap;
use std::time::Duration;

use cohort_proto::v1::membership_client::MembershipClient;
use cohort_proto::v1::{LogLine, PushLogsRequest};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;
use tracing::warn;

/// Lines buffered between the rank readers and the shipping task.
const CHANNEL_LINES: usize = 8192;
/// Most lines in one push.
const BATCH_LINES: usize = 1024;
/// Longest a line waits before it is pushed.
const BATCH_DELAY: Duration = Duration::from_millis(100);
/// Attempts per batch before it is dropped (with a warning) while the coordinator is away.
const PUSH_ATTEMPTS: u32 = 5;

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
    /// Starts the shipping task, pushing through `client` on behalf of node `node_id`.
    pub fn start(client: MembershipClient<Channel>, node_id: String) -> Self {
        let (sender, receiver) = mpsc::channel(CHANNEL_LINES);
        tokio::spawn(ship(client, node_id, receiver));
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

async fn push_all(
    client: &mut MembershipClient<Channel>,
    node_id: &str,
    pending: &mut BTreeMap<String, Vec<LogLine>>,
) {
    for (job_id, lines) in std::mem::take(pending) {
        for batch in lines.chunks(BATCH_LINES) {
            let request = PushLogsRequest {
                node_id: node_id.to_owned(),
                job_id: job_id.clone(),
                lines: batch.to_vec(),
            };
            let mut attempt = 0;
            loop {
                attempt += 1;
                match client.push_logs(request.clone()).await {
                    Ok(_) => break,
                    Err(status)
                        if attempt < PUSH_ATTEMPTS && status.code() == tonic::Code::Unavailable =>
                    {
                        tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                    }
                    Err(status) => {
                        warn!(%job_id, lines = batch.len(), %status, "dropping log lines the coordinator did not take");
                        break;
                    }
                }
            }
        }
    }
}

async fn ship(
    mut client: MembershipClient<Channel>,
    node_id: String,
    mut receiver: mpsc::Receiver<Message>,
) {
    let mut pending: BTreeMap<String, Vec<LogLine>> = BTreeMap::new();
    let mut pending_lines = 0usize;
    loop {
        let message = if pending_lines == 0 {
            receiver.recv().await
        } else {
            match tokio::time::timeout(BATCH_DELAY, receiver.recv()).await {
                Ok(message) => message,
                Err(_) => {
                    push_all(&mut client, &node_id, &mut pending).await;
                    pending_lines = 0;
                    continue;
                }
            }
        };
        match message {
            None => {
                push_all(&mut client, &node_id, &mut pending).await;
                return;
            }
            Some(Message::Line { job_id, line }) => {
                pending.entry(job_id).or_default().push(line);
                pending_lines += 1;
                if pending_lines >= BATCH_LINES {
                    push_all(&mut client, &node_id, &mut pending).await;
                    pending_lines = 0;
                }
            }
            Some(Message::Flush(done)) => {
                push_all(&mut client, &node_id, &mut pending).await;
                pending_lines = 0;
                let _ = done.send(());
            }
        }
    }
}
