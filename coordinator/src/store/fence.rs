//! The proof a leader's writes carry ([`Fence`]): see [`crate::leadership`] for the election
//! that issues it. A fenced [`super::etcd::EtcdStore`] adds it to every write transaction.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, KeyValue};
use tokio::sync::watch;
use tracing::warn;

use crate::error::Error;

/// Why the leadership was lost, once it is: set once, by whoever learns it first.
pub(crate) type Loss = Arc<watch::Sender<Option<String>>>;

/// Proof that a coordinator still leads, checked by etcd inside every write transaction: the
/// leader's election key must still exist with the create revision it had when it won.
#[derive(Clone)]
pub struct Fence {
    /// The leader's election key.
    key: Vec<u8>,
    /// Its create revision when the election was won.
    revision: i64,
    /// Told when a write finds the fence gone.
    loss: Loss,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Fence")
            .field("key", &String::from_utf8_lossy(&self.key))
            .field("revision", &self.revision)
            .finish()
    }
}

impl Fence {
    /// A fence on `key` created at `revision`, telling `loss` when a write finds it gone.
    pub(crate) fn new(key: Vec<u8>, revision: i64, loss: Loss) -> Self {
        Self {
            key,
            revision,
            loss,
        }
    }

    /// The comparison a write transaction adds to its conditions.
    pub(crate) fn compare(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.revision)
    }

    /// The election key, to read back when a transaction failed.
    pub(crate) fn key(&self) -> &[u8] {
        &self.key
    }

    /// Whether `current` (the election key as read) still proves the leadership.
    pub(crate) fn holds(&self, current: Option<&KeyValue>) -> bool {
        current.is_some_and(|pair| pair.create_revision() == self.revision)
    }

    /// Records that the leadership is lost, for `why`, and returns the error to report.
    pub(crate) fn lose(&self, why: &str) -> Error {
        lose(&self.loss, why.to_owned());
        Error::LostLeadership(why.to_owned())
    }
}

/// Records the first reason the leadership was lost.
pub(crate) fn lose(loss: &Loss, why: String) {
    loss.send_if_modified(|reason| {
        if reason.is_some() {
            return false;
        }
        warn!(why = %why, "lost the leadership");
        *reason = Some(why);
        true
    });
}
