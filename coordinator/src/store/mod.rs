//! Persistent cluster state behind one trait, [`ClusterStore`], with two implementations:
//!
//! - [`embedded::EmbeddedStore`]: a redb database file under the coordinator's `--data-dir`
//!   (the default; nothing else to run).
//! - [`etcd::EtcdStore`]: an etcd cluster (`--store etcd://host:port`), for a coordinator whose
//!   state must outlive its machine.
//!
//! Both store the same bincode-encoded records ([`codec`]) and pass the same conformance tests.
//!
//! # Quarantine
//!
//! A record the coordinator cannot use (bytes that no longer decode, or a job whose spec no
//! longer parses) must neither stop the coordinator from starting nor be lost. Listing moves an
//! undecodable record aside and goes on; [`ClusterStore::quarantine_job`] does the same for a
//! record the caller found unusable. Quarantine keeps the record's raw bytes as they were, in a
//! slot named after its key, with a [`QuarantineNote`] saying why and when. The move is atomic
//! (one transaction removes the record and writes both), and it only happens if the record is
//! still the one that was read, so a concurrent writer's newer record is never moved or lost.
//! Each move is logged at error level and returned to the caller.

pub mod codec;
pub mod embedded;
pub mod etcd;
pub mod fence;
pub mod legacy;

use async_trait::async_trait;
use cohort_proto::JobId;
use serde::{Deserialize, Serialize};
use tracing::error;

use crate::auth::records::{AuditEntry, UserRecord};
use crate::error::Result;
use crate::model::{JobRecord, MetricHistory, NodeRecord, SweepRecord, UnixMillis};

/// Where the coordinator keeps jobs, placements and nodes.
///
/// Writes are durable when the call returns: the scheduler persists a placement before it tells
/// any worker to start a rank.
#[async_trait]
pub trait ClusterStore: Send + Sync + 'static {
    /// Allocates the next job sequence number (starting at 1), durably and atomically.
    async fn next_job_seq(&self) -> Result<u64> {
        self.reserve_job_seqs(1).await
    }
    /// Reserves `count` (at least 1) consecutive job sequence numbers, durably and atomically,
    /// and returns the first: numbers no later reservation hands out again, whether or not
    /// they are used.
    async fn reserve_job_seqs(&self, count: u64) -> Result<u64>;
    /// Inserts or replaces a job record.
    async fn put_job(&self, job: &JobRecord) -> Result<()>;
    /// Inserts or replaces several job records in their order (a later record of the same job
    /// wins), in one durable write where the store can: the job writer's group commit. By
    /// default one at a time.
    async fn put_jobs(&self, jobs: &[&JobRecord]) -> Result<()> {
        for job in jobs {
            self.put_job(job).await?;
        }
        Ok(())
    }
    /// Returns one job record, if it exists. An undecodable record is an error naming its key
    /// (it stays where it is until a listing quarantines it).
    async fn get_job(&self, id: &JobId) -> Result<Option<JobRecord>>;
    /// Returns every job record, in no particular order, after moving every record that does
    /// not decode into quarantine (see the module doc).
    async fn list_jobs(&self) -> Result<Listing<JobRecord>>;
    /// Inserts or replaces a node record.
    async fn put_node(&self, node: &NodeRecord) -> Result<()>;
    /// Returns every node record, in no particular order, after moving every record that does
    /// not decode into quarantine.
    async fn list_nodes(&self) -> Result<Listing<NodeRecord>>;
    /// Moves the job record stored under `id` into quarantine with `reason`: for a record that
    /// decodes but can no longer be used (its spec no longer parses). Moves whatever is stored
    /// under `id` when the move happens. Returns `None` when there is no such record.
    async fn quarantine_job(&self, id: &JobId, reason: &str) -> Result<Option<Quarantined>>;
    /// Returns every quarantined record with its raw bytes, jobs first, each kind by slot.
    async fn list_quarantined(&self) -> Result<Vec<QuarantinedRecord>>;
    /// Inserts or replaces user `user.name`.
    async fn put_user(&self, user: &UserRecord) -> Result<()>;
    /// Removes user `name`; returns whether there was one.
    async fn remove_user(&self, name: &str) -> Result<bool>;
    /// Every user that decodes, sorted by name. One that does not decode is left where it is
    /// and logged: that user cannot sign in until added again, and nobody else is affected.
    async fn list_users(&self) -> Result<Vec<UserRecord>>;
    /// Appends `entry` under the next sequence number (its own `seq` is ignored) and returns
    /// that number; keeps the newest [`crate::limits::MAX_AUDIT_ENTRIES`].
    async fn append_audit(&self, entry: AuditEntry) -> Result<u64>;
    /// The entries after `after_seq`, oldest first, at most `limit`.
    async fn list_audit(&self, after_seq: u64, limit: usize) -> Result<Vec<AuditEntry>>;
    /// Inserts or replaces sweep `sweep.id`.
    async fn put_sweep(&self, sweep: &SweepRecord) -> Result<()>;
    /// Every sweep that decodes, oldest first (by sequence number). One that does not decode is
    /// left where it is and logged: it is neither lost nor continued.
    async fn list_sweeps(&self) -> Result<Vec<SweepRecord>>;
    /// Inserts or replaces the metric curves of job `id`.
    async fn put_job_metrics(&self, id: &JobId, history: &MetricHistory) -> Result<()>;
    /// The metric curves of job `id`, if any were stored. Curves that do not decode are an
    /// error naming the job (they stay where they are).
    async fn get_job_metrics(&self, id: &JobId) -> Result<Option<MetricHistory>>;
    /// A setting every coordinator sharing this store must agree on (the key job tokens are
    /// derived under, the join token's hash): stores `proposed` under `name` unless a value is
    /// there, atomically, and returns the value that is now stored, the same to every caller.
    /// `None`: this store is never shared between coordinators (the embedded store), and the
    /// caller keeps the setting itself.
    async fn shared_setting(&self, name: &str, proposed: &[u8]) -> Result<Option<Vec<u8>>> {
        let _ = (name, proposed);
        Ok(None)
    }
}

/// The kinds of record a store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordKind {
    /// A [`JobRecord`].
    Job,
    /// A [`NodeRecord`].
    Node,
}

impl RecordKind {
    /// Both kinds, in the order [`ClusterStore::list_quarantined`] reports them.
    pub const ALL: [RecordKind; 2] = [RecordKind::Job, RecordKind::Node];

    /// The singular name used in messages and logs (`job`).
    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Job => "job",
            RecordKind::Node => "node",
        }
    }

    /// The plural used in table and key names (`jobs`).
    pub fn plural(self) -> &'static str {
        match self {
            RecordKind::Job => "jobs",
            RecordKind::Node => "nodes",
        }
    }
}

/// What a listing returns: the records that decoded, and the ones it moved into quarantine.
#[derive(Debug, Clone, PartialEq)]
pub struct Listing<T> {
    /// Every usable record, in no particular order.
    pub records: Vec<T>,
    /// The records this listing moved aside; empty when every record decoded.
    pub quarantined: Vec<Quarantined>,
}

/// One record moved into quarantine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// Which kind of record it was.
    pub kind: RecordKind,
    /// The key it was stored under (the job or node id).
    pub key: String,
    /// Its name in quarantine: the key, or `key~N` when an earlier record with the same key is
    /// already there (ids never contain `~`).
    pub slot: String,
    /// Why it was moved.
    pub reason: String,
    /// When it was moved, in Unix milliseconds.
    pub quarantined_at_ms: UnixMillis,
}

/// A quarantined record and its bytes, exactly as they were stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedRecord {
    /// What was moved, from where, and why.
    pub quarantined: Quarantined,
    /// The record's raw bytes.
    pub bytes: Vec<u8>,
}

/// Why and when a record was quarantined, stored (encoded with [`codec`]) beside its raw bytes.
/// The raw bytes are kept apart from it, unencoded, so that a record too large to decode can
/// still be quarantined whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineNote {
    /// The key the record was stored under.
    pub key: String,
    /// Why it was moved, cut to [`crate::limits::MAX_REASON_BYTES`].
    pub reason: String,
    /// When it was moved, in Unix milliseconds.
    pub quarantined_at_ms: UnixMillis,
}

/// Most quarantine slots tried for one key (`key`, `key~2`, ...) before the move fails.
const MAX_QUARANTINE_SLOTS: usize = 1_000;

impl codec::Record for QuarantineNote {}

impl QuarantineNote {
    /// A note for moving the record under `key` now, for `reason`.
    fn new(key: &str, reason: &str) -> Self {
        Self {
            key: key.to_owned(),
            reason: cohort_proto::text::truncate(reason, crate::limits::MAX_REASON_BYTES)
                .into_owned(),
            quarantined_at_ms: crate::model::now_ms(),
        }
    }

    /// Reads a stored note; an unreadable or missing one becomes a note saying so, so that
    /// reporting quarantine never fails on quarantine's own damage.
    fn read(slot: &str, bytes: Option<&[u8]>) -> Self {
        let unreadable = |reason: String| Self {
            key: slot.to_owned(),
            reason,
            quarantined_at_ms: 0,
        };
        match bytes.map(codec::decode::<QuarantineNote>) {
            Some(Ok(note)) => note,
            Some(Err(error)) => unreadable(format!("quarantine note unreadable: {error}")),
            None => unreadable("quarantine note missing".to_owned()),
        }
    }

    /// The report of this note's record, moved into `slot`.
    fn into_quarantined(self, kind: RecordKind, slot: String) -> Quarantined {
        Quarantined {
            kind,
            key: self.key,
            slot,
            reason: self.reason,
            quarantined_at_ms: self.quarantined_at_ms,
        }
    }
}

/// The quarantine slots to try, in order, for a record stored under `key`: `key`, then `key~2`,
/// `key~3`, ... up to [`MAX_QUARANTINE_SLOTS`].
fn quarantine_slots(key: &str) -> impl Iterator<Item = String> + '_ {
    std::iter::once(key.to_owned())
        .chain((2..=MAX_QUARANTINE_SLOTS).map(move |number| format!("{key}~{number}")))
}

/// Logs one record moved into quarantine.
fn log_quarantined(quarantined: &Quarantined) {
    error!(
        kind = quarantined.kind.name(),
        key = %quarantined.key,
        slot = %quarantined.slot,
        reason = %quarantined.reason,
        "moved an unusable record into quarantine; it is no longer part of the cluster state"
    );
}

/// Decodes a stored record, naming the record in the error (`job mnist-3: decoding ...`).
/// The users among `stored` (name, bytes) that decode, sorted by name; the rest are logged.
fn decode_users(stored: Vec<(String, Vec<u8>)>) -> Vec<UserRecord> {
    let mut users: Vec<UserRecord> = stored
        .into_iter()
        .filter_map(|(name, bytes)| match codec::decode::<UserRecord>(&bytes) {
            Ok(user) => Some(user),
            Err(error) => {
                error!(user = %name, %error, "a stored user does not decode; they cannot sign in until added again");
                None
            }
        })
        .collect();
    users.sort_by(|a, b| a.name.cmp(&b.name));
    users
}

/// The sweeps among `stored` (id, bytes) that decode, oldest first; the rest are logged and left
/// in the store.
fn decode_sweeps(stored: Vec<(String, Vec<u8>)>) -> Vec<SweepRecord> {
    let mut sweeps: Vec<SweepRecord> = stored
        .into_iter()
        .filter_map(|(id, bytes)| match codec::decode::<SweepRecord>(&bytes) {
            Ok(sweep) => Some(sweep),
            Err(error) => {
                error!(sweep = %id, %error, "a stored sweep does not decode; it is left in the store and not continued");
                None
            }
        })
        .collect();
    sweeps.sort_by_key(|sweep| sweep.seq);
    sweeps
}

/// Decodes stored audit entries, skipping (and logging) any that do not decode.
fn decode_audit(stored: Vec<(u64, Vec<u8>)>) -> Vec<AuditEntry> {
    stored
        .into_iter()
        .filter_map(|(seq, bytes)| match codec::decode::<AuditEntry>(&bytes) {
            Ok(entry) => Some(entry),
            Err(error) => {
                error!(seq, %error, "a stored audit entry does not decode; skipped");
                None
            }
        })
        .collect()
}

/// Decodes a job's stored metric curves, naming the job in the error.
fn decode_metrics(bytes: &[u8], id: &JobId) -> Result<MetricHistory> {
    codec::decode(bytes)
        .map_err(|error| crate::error::Error::Store(format!("metric curves of job {id}: {error}")))
}

fn decode_record<T: codec::Record>(bytes: &[u8], kind: RecordKind, key: &str) -> Result<T> {
    codec::decode(bytes)
        .map_err(|error| crate::error::Error::Store(format!("{} {key}: {error}", kind.name())))
}

#[cfg(test)]
pub(crate) mod conformance;
#[cfg(test)]
pub mod faults;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantine_slots_start_with_the_key_and_stay_bounded() {
        let slots: Vec<String> = quarantine_slots("job-7").collect();
        assert_eq!(slots[..3], ["job-7", "job-7~2", "job-7~3"]);
        assert_eq!(slots.len(), MAX_QUARANTINE_SLOTS);
    }

    #[test]
    fn a_note_cuts_a_long_reason_and_round_trips() {
        let note = QuarantineNote::new("job-7", &"x".repeat(100_000));
        assert!(note.reason.len() <= crate::limits::MAX_REASON_BYTES);
        let bytes = codec::encode(&note).unwrap();
        assert_eq!(QuarantineNote::read("job-7", Some(&bytes)), note);
    }

    #[test]
    fn an_unreadable_or_missing_note_is_reported_not_an_error() {
        let note = QuarantineNote::read("job-7~2", Some(&[9, 9]));
        assert_eq!(note.key, "job-7~2");
        assert!(
            note.reason.contains("quarantine note unreadable"),
            "{}",
            note.reason
        );
        let note = QuarantineNote::read("job-7", None);
        assert_eq!(note.reason, "quarantine note missing");
    }
}
