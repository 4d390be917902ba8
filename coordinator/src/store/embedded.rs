//! The embedded store: one redb database file, `cluster.redb`, under the coordinator's
//! `--data-dir`.
//!
//! Tables:
//! - `jobs`: job id -> encoded [`JobRecord`] ([`super::codec`]).
//! - `nodes`: node id -> encoded [`NodeRecord`].
//! - `meta`: `job_seq` -> the last job sequence number handed out.
//! - `quarantined_jobs`, `quarantined_nodes`: quarantine slot -> the raw bytes of a record moved
//!   aside (see [the store's module doc](super)).
//! - `quarantined_job_notes`, `quarantined_node_notes`: quarantine slot -> encoded
//!   [`QuarantineNote`] (why and when).
//!
//! Every write is one committed redb transaction with immediate durability, so it is on disk when
//! the call returns; a record moves into quarantine in the same transaction that deletes it.
//! redb's calls block, so each runs on tokio's blocking pool. redb locks the file: a second
//! coordinator opening the same data dir is refused with a readable error.
//!
//! The files are private: the data dir is created `0700` (an existing one that is looser is
//! tightened, with a warning) and `cluster.redb` is `0600`. redb's page cache is bounded at
//! [`CACHE_BYTES`] (64 MiB) instead of its 1 GiB default: the database holds job and node
//! records, megabytes for thousands of jobs, and the coordinator keeps what it acts on in memory
//! anyway.

use std::fmt;
use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use cohort_proto::JobId;
use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use tracing::{debug, info, warn};

use super::codec;
use super::{
    ClusterStore, Listing, QuarantineNote, Quarantined, QuarantinedRecord, RecordKind,
    decode_record, log_quarantined, quarantine_slots,
};
use crate::auth::records::{AuditEntry, UserRecord};
use crate::error::{Error, Result};
use crate::limits::MAX_AUDIT_ENTRIES;
use crate::model::{JobRecord, MetricHistory, NodeRecord, SweepRecord};

/// Name of the database file inside the data dir.
pub const DATABASE_FILE_NAME: &str = "cluster.redb";

/// Mode of the data dir: only the coordinator's user may list or enter it.
pub const DATA_DIR_MODE: u32 = 0o700;

/// Mode of `cluster.redb`: only the coordinator's user may read or write it.
pub const DATABASE_FILE_MODE: u32 = 0o600;

/// Memory redb may use to cache pages of the database file (its default is 1 GiB).
pub const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// A record table: key -> encoded record, or quarantine slot -> raw bytes or encoded note.
type RecordTable = TableDefinition<'static, &'static str, &'static [u8]>;

/// Job id -> encoded job record.
const JOBS: RecordTable = TableDefinition::new("jobs");
/// Node id -> encoded node record.
const NODES: RecordTable = TableDefinition::new("nodes");
/// Quarantine slot -> raw bytes of a job record moved aside.
const QUARANTINED_JOBS: RecordTable = TableDefinition::new("quarantined_jobs");
/// Quarantine slot -> raw bytes of a node record moved aside.
const QUARANTINED_NODES: RecordTable = TableDefinition::new("quarantined_nodes");
/// Quarantine slot -> encoded [`QuarantineNote`] of a job record moved aside.
const QUARANTINED_JOB_NOTES: RecordTable = TableDefinition::new("quarantined_job_notes");
/// Quarantine slot -> encoded [`QuarantineNote`] of a node record moved aside.
const QUARANTINED_NODE_NOTES: RecordTable = TableDefinition::new("quarantined_node_notes");
/// Small named counters.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Key in `meta` of the last job sequence number handed out.
const JOB_SEQ_KEY: &str = "job_seq";

/// Users by name.
const USERS: RecordTable = TableDefinition::new("users");
/// Sweeps by id.
const SWEEPS: RecordTable = TableDefinition::new("sweeps");
/// Metric curves of jobs by job id: encoded [`MetricHistory`].
const JOB_METRICS: RecordTable = TableDefinition::new("job_metrics");
/// Audit entries by sequence number.
const AUDIT: TableDefinition<u64, &'static [u8]> = TableDefinition::new("audit");
/// Key in [`META`] of the last audit sequence number.
const AUDIT_SEQ_KEY: &str = "audit_seq";

/// The tables that hold one kind of record: (records, quarantined raw bytes, quarantine notes).
fn tables(kind: RecordKind) -> (RecordTable, RecordTable, RecordTable) {
    match kind {
        RecordKind::Job => (JOBS, QUARANTINED_JOBS, QUARANTINED_JOB_NOTES),
        RecordKind::Node => (NODES, QUARANTINED_NODES, QUARANTINED_NODE_NOTES),
    }
}

/// A [`ClusterStore`] kept in a redb file under the coordinator's data dir.
///
/// Cloning gives another handle to the same open database.
#[derive(Clone)]
pub struct EmbeddedStore {
    /// The open database, shared with the blocking tasks that use it.
    database: Arc<Database>,
    /// Path of `cluster.redb`, for error messages.
    path: PathBuf,
    /// Audit entries kept, the newest.
    audit_window: u64,
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `data_dir`: the directory itself (mode `0700`,
    /// as are parents it creates) and the `cluster.redb` file inside it (mode `0600`). An
    /// existing directory or file that grants more is tightened to these modes, with a warning.
    ///
    /// The file's integrity is checked on open, so a damaged file is reported as an error rather
    /// than trusted. Fails with `data dir DIR is in use by another coordinator` when another
    /// process (or another handle in this one) holds the database open.
    ///
    /// This call blocks briefly (file creation and the integrity check); call it at startup, or
    /// from `spawn_blocking`.
    pub fn open(data_dir: &Path) -> Result<Self> {
        DirBuilder::new()
            .recursive(true)
            .mode(DATA_DIR_MODE)
            .create(data_dir)
            .map_err(|error| {
                Error::io(format!("creating data dir {}", data_dir.display()), error)
            })?;
        restrict_mode(data_dir, "data dir", DATA_DIR_MODE)?;
        let path = data_dir.join(DATABASE_FILE_NAME);
        // Created here rather than by redb, so that it is private from its first moment.
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(DATABASE_FILE_MODE)
            .open(&path)
            .map_err(|error| Error::io(format!("creating {}", path.display()), error))?;
        restrict_mode(&path, "database file", DATABASE_FILE_MODE)?;
        // redb documents that a file altered outside redb may panic a plain open; the integrity
        // check turns that into an error, and the unwind guard keeps any remaining case from
        // taking the coordinator down.
        let opened = catch_unwind(AssertUnwindSafe(|| {
            Database::builder()
                .set_check_integrity_on_open(true)
                .set_cache_size(CACHE_BYTES)
                .create(&path)
        }));
        let database = match opened {
            Ok(Ok(database)) => database,
            Ok(Err(error)) => return Err(open_error(data_dir, &path, error)),
            Err(_) => {
                return Err(Error::Store(format!(
                    "{}: the database file is damaged (opening it panicked); move it aside to \
                     start with an empty store",
                    path.display()
                )));
            }
        };
        create_tables(&database).map_err(|error| {
            Error::Store(format!("{}: creating tables: {error}", path.display()))
        })?;
        info!(path = %path.display(), cache_bytes = CACHE_BYTES, "opened embedded cluster store");
        Ok(Self {
            database: Arc::new(database),
            path,
            audit_window: MAX_AUDIT_ENTRIES,
        })
    }

    /// Keeps only the newest `entries` audit entries (default
    /// [`crate::limits::MAX_AUDIT_ENTRIES`]).
    pub fn with_audit_window(self, entries: u64) -> Self {
        Self {
            audit_window: entries.max(1),
            ..self
        }
    }

    /// Returns the path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` against the database on tokio's blocking pool.
    async fn run_blocking<T, F>(&self, operation: &'static str, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T> + Send + 'static,
    {
        let database = Arc::clone(&self.database);
        tokio::task::spawn_blocking(move || work(&database))
            .await
            .map_err(|error| Error::Store(format!("{operation}: blocking task failed: {error}")))?
    }

    /// Inserts or replaces one encoded record in `table`, in its own committed transaction.
    async fn put_bytes(
        &self,
        operation: &'static str,
        table: RecordTable,
        key: String,
        bytes: Vec<u8>,
    ) -> Result<()> {
        self.run_blocking(operation, move |database| {
            let transaction = database.begin_write().within(operation, &key)?;
            transaction
                .open_table(table)
                .within(operation, &key)?
                .insert(key.as_str(), bytes.as_slice())
                .within(operation, &key)?;
            transaction.commit().within(operation, &key)
        })
        .await
    }

    /// Every (key, bytes) of `table`.
    async fn list_table(
        &self,
        operation: &'static str,
        table: RecordTable,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        self.run_blocking(operation, move |database| {
            let transaction = database.begin_read().within(operation, "")?;
            let records = transaction.open_table(table).within(operation, "")?;
            let mut stored = Vec::new();
            for entry in records.iter().within(operation, "")? {
                let (key, value) = entry.within(operation, "")?;
                stored.push((key.value().to_owned(), value.value().to_vec()));
            }
            Ok(stored)
        })
        .await
    }

    /// Stores `bytes` as they are as the record of `kind` under `key`, bypassing the codec: for
    /// tests that need a record this coordinator would never write.
    #[cfg(test)]
    pub(super) async fn put_raw(&self, kind: RecordKind, key: &str, bytes: Vec<u8>) -> Result<()> {
        let (table, _, _) = tables(kind);
        self.put_bytes("writing raw record", table, key.to_owned(), bytes)
            .await
    }

    /// Returns every record of `kind` that decodes, after moving every one that does not into
    /// quarantine.
    ///
    /// The records are read in one read transaction. Only when some fail to decode does a write
    /// transaction follow, which reads each of those again (a writer may have replaced or
    /// removed it meanwhile), and moves the ones that still fail, all in one commit.
    async fn list_records<T>(&self, kind: RecordKind) -> Result<Listing<T>>
    where
        T: codec::Record + Send + 'static,
    {
        let operation = match kind {
            RecordKind::Job => "listing jobs",
            RecordKind::Node => "listing nodes",
        };
        let (table, _, _) = tables(kind);
        let listing = self
            .run_blocking(operation, move |database| {
                let mut records = Vec::new();
                let mut undecodable = Vec::new();
                let transaction = database.begin_read().within(operation, "")?;
                let stored = transaction.open_table(table).within(operation, "")?;
                for entry in stored.iter().within(operation, "")? {
                    let (key, value) = entry.within(operation, "")?;
                    match codec::decode::<T>(value.value()) {
                        Ok(record) => records.push(record),
                        Err(_) => undecodable.push(key.value().to_owned()),
                    }
                }
                drop(stored);
                drop(transaction);
                let mut quarantined = Vec::new();
                if undecodable.is_empty() {
                    return Ok(Listing {
                        records,
                        quarantined,
                    });
                }
                let transaction = database.begin_write().within(operation, "")?;
                for key in undecodable {
                    let current = transaction
                        .open_table(table)
                        .within(operation, &key)?
                        .get(key.as_str())
                        .within(operation, &key)?
                        .map(|guard| codec::decode::<T>(guard.value()));
                    let reason = match current {
                        None => continue,
                        Some(Ok(record)) => {
                            records.push(record);
                            continue;
                        }
                        Some(Err(error)) => error.to_string(),
                    };
                    quarantined.extend(move_aside(&transaction, kind, &key, &reason)?);
                }
                transaction.commit().within(operation, "")?;
                Ok(Listing {
                    records,
                    quarantined,
                })
            })
            .await?;
        listing.quarantined.iter().for_each(log_quarantined);
        Ok(listing)
    }
}

/// Moves the record of `kind` stored under `key` into quarantine, within `transaction`: its raw
/// bytes into the first free slot, a [`QuarantineNote`] beside them, and the record out of its
/// table. Returns `None` when there is no record under `key`.
fn move_aside(
    transaction: &WriteTransaction,
    kind: RecordKind,
    key: &str,
    reason: &str,
) -> Result<Option<Quarantined>> {
    let operation = "quarantining";
    let (records_table, raw_table, notes_table) = tables(kind);
    let mut records = transaction
        .open_table(records_table)
        .within(operation, key)?;
    let Some(bytes) = records
        .remove(key)
        .within(operation, key)?
        .map(|guard| guard.value().to_vec())
    else {
        return Ok(None);
    };
    let mut raw = transaction.open_table(raw_table).within(operation, key)?;
    let mut notes = transaction.open_table(notes_table).within(operation, key)?;
    let mut free = None;
    for slot in quarantine_slots(key) {
        let taken = raw.get(slot.as_str()).within(operation, key)?.is_some()
            || notes.get(slot.as_str()).within(operation, key)?.is_some();
        if !taken {
            free = Some(slot);
            break;
        }
    }
    let Some(slot) = free else {
        return Err(Error::Store(format!(
            "{operation} {} {key}: every quarantine slot for it is taken",
            kind.name()
        )));
    };
    let note = QuarantineNote::new(key, reason);
    raw.insert(slot.as_str(), bytes.as_slice())
        .within(operation, key)?;
    notes
        .insert(slot.as_str(), codec::encode(&note)?.as_slice())
        .within(operation, key)?;
    Ok(Some(note.into_quarantined(kind, slot)))
}

/// Sets `path` to `mode` when it grants any permission `mode` does not (a looser file or
/// directory left by an earlier version or by hand), saying so in a warning. A stricter mode is
/// left alone.
fn restrict_mode(path: &Path, what: &'static str, mode: u32) -> Result<()> {
    let metadata = std::fs::metadata(path)
        .map_err(|error| Error::io(format!("reading the mode of {}", path.display()), error))?;
    let current = metadata.permissions().mode() & 0o7777;
    if current & !mode == 0 {
        return Ok(());
    }
    std::fs::set_permissions(path, Permissions::from_mode(mode)).map_err(|error| {
        Error::io(
            format!("restricting {what} {} to mode {mode:o}", path.display()),
            error,
        )
    })?;
    let (was, now) = (format!("{current:o}"), format!("{mode:o}"));
    warn!(
        path = %path.display(),
        what,
        was = %was,
        now = %now,
        "tightened the permissions of the coordinator's state: others could access it"
    );
    Ok(())
}

/// Creates the tables if they do not exist yet, so that readers never find one missing.
fn create_tables(database: &Database) -> std::result::Result<(), redb::Error> {
    let transaction = database.begin_write()?;
    for kind in RecordKind::ALL {
        let (records, raw, notes) = tables(kind);
        transaction.open_table(records)?;
        transaction.open_table(raw)?;
        transaction.open_table(notes)?;
    }
    transaction.open_table(META)?;
    transaction.open_table(USERS)?;
    transaction.open_table(SWEEPS)?;
    transaction.open_table(AUDIT)?;
    transaction.commit()?;
    Ok(())
}

/// Turns a failed open into a message that says what to do about it.
fn open_error(data_dir: &Path, path: &Path, error: DatabaseError) -> Error {
    match error {
        DatabaseError::DatabaseAlreadyOpen => Error::Store(format!(
            "data dir {} is in use by another coordinator ({} is locked)",
            data_dir.display(),
            path.display()
        )),
        DatabaseError::LockProtocolMismatch => Error::Store(format!(
            "data dir {} is in use by another coordinator built with a different version of \
             cohort ({} is locked)",
            data_dir.display(),
            path.display()
        )),
        DatabaseError::UpgradeRequired(version) => Error::Store(format!(
            "{}: file format version {version} is older than this coordinator reads; it must be \
             upgraded",
            path.display()
        )),
        other => Error::Store(format!("opening {}: {other}", path.display())),
    }
}

/// Wraps a redb failure with the operation and, when there is one, the key it concerned.
fn redb_error(operation: &str, key: &str, error: impl Into<redb::Error>) -> Error {
    let error: redb::Error = error.into();
    if key.is_empty() {
        Error::Store(format!("{operation}: {error}"))
    } else {
        Error::Store(format!("{operation} {key}: {error}"))
    }
}

/// Attaches [`redb_error`]'s context to any redb result.
trait WithinOperation<T> {
    /// Maps a failure to an [`Error::Store`] naming `operation` and `key` (empty for none).
    fn within(self, operation: &str, key: &str) -> Result<T>;
}

impl<T, E: Into<redb::Error>> WithinOperation<T> for std::result::Result<T, E> {
    fn within(self, operation: &str, key: &str) -> Result<T> {
        self.map_err(|error| redb_error(operation, key, error))
    }
}

#[async_trait]
impl ClusterStore for EmbeddedStore {
    async fn reserve_job_seqs(&self, count: u64) -> Result<u64> {
        let first = self
            .run_blocking("allocating job sequence", move |database| {
                let operation = "allocating job sequence";
                let transaction = database.begin_write().within(operation, JOB_SEQ_KEY)?;
                let first = {
                    let mut meta = transaction
                        .open_table(META)
                        .within(operation, JOB_SEQ_KEY)?;
                    let last = meta
                        .get(JOB_SEQ_KEY)
                        .within(operation, JOB_SEQ_KEY)?
                        .map_or(0, |guard| guard.value());
                    let exhausted =
                        || Error::Store(format!("{operation}: job sequence exhausted at {last}"));
                    let first = last.checked_add(1).ok_or_else(exhausted)?;
                    let end = last.checked_add(count.max(1)).ok_or_else(exhausted)?;
                    meta.insert(JOB_SEQ_KEY, end)
                        .within(operation, JOB_SEQ_KEY)?;
                    first
                };
                transaction.commit().within(operation, JOB_SEQ_KEY)?;
                Ok(first)
            })
            .await?;
        debug!(first, count, "reserved job sequence numbers");
        Ok(first)
    }

    async fn put_job(&self, job: &JobRecord) -> Result<()> {
        let bytes = codec::encode(job)?;
        self.put_bytes("writing job", JOBS, job.id.as_str().to_owned(), bytes)
            .await?;
        debug!(job_id = %job.id, state = job.state.name(), "stored job");
        Ok(())
    }

    async fn put_jobs(&self, jobs: &[&JobRecord]) -> Result<()> {
        let encoded = jobs
            .iter()
            .map(|job| Ok((job.id.as_str().to_owned(), codec::encode(*job)?)))
            .collect::<Result<Vec<(String, Vec<u8>)>>>()?;
        let count = encoded.len();
        self.run_blocking("writing jobs", move |database| {
            let operation = "writing jobs";
            let first = encoded
                .first()
                .map_or("", |(key, _)| key.as_str())
                .to_owned();
            let transaction = database.begin_write().within(operation, &first)?;
            {
                let mut table = transaction.open_table(JOBS).within(operation, &first)?;
                for (key, bytes) in &encoded {
                    table
                        .insert(key.as_str(), bytes.as_slice())
                        .within(operation, key)?;
                }
            }
            transaction.commit().within(operation, &first)
        })
        .await?;
        debug!(count, "stored jobs in one transaction");
        Ok(())
    }

    async fn get_job(&self, id: &JobId) -> Result<Option<JobRecord>> {
        let key = id.as_str().to_owned();
        let bytes = self
            .run_blocking("reading job", move |database| {
                let operation = "reading job";
                let transaction = database.begin_read().within(operation, &key)?;
                let jobs = transaction.open_table(JOBS).within(operation, &key)?;
                let found = jobs.get(key.as_str()).within(operation, &key)?;
                Ok(found.map(|guard| guard.value().to_vec()))
            })
            .await?;
        bytes
            .map(|bytes| decode_record(&bytes, RecordKind::Job, id.as_str()))
            .transpose()
    }

    async fn list_jobs(&self) -> Result<Listing<JobRecord>> {
        self.list_records(RecordKind::Job).await
    }

    async fn put_node(&self, node: &NodeRecord) -> Result<()> {
        let bytes = codec::encode(node)?;
        self.put_bytes("writing node", NODES, node.id.as_str().to_owned(), bytes)
            .await?;
        debug!(node_id = %node.id, "stored node");
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Listing<NodeRecord>> {
        self.list_records(RecordKind::Node).await
    }

    async fn quarantine_job(&self, id: &JobId, reason: &str) -> Result<Option<Quarantined>> {
        let key = id.as_str().to_owned();
        let reason = reason.to_owned();
        let moved = self
            .run_blocking("quarantining job", move |database| {
                let operation = "quarantining job";
                let transaction = database.begin_write().within(operation, &key)?;
                let moved = move_aside(&transaction, RecordKind::Job, &key, &reason)?;
                transaction.commit().within(operation, &key)?;
                Ok(moved)
            })
            .await?;
        if let Some(quarantined) = &moved {
            log_quarantined(quarantined);
        }
        Ok(moved)
    }

    async fn put_job_metrics(&self, id: &JobId, history: &MetricHistory) -> Result<()> {
        let bytes = codec::encode(history)?;
        self.put_bytes(
            "writing metric curves",
            JOB_METRICS,
            id.as_str().to_owned(),
            bytes,
        )
        .await
    }

    async fn get_job_metrics(&self, id: &JobId) -> Result<Option<MetricHistory>> {
        let key = id.as_str().to_owned();
        let bytes = self
            .run_blocking("reading metric curves", move |database| {
                let operation = "reading metric curves";
                let transaction = database.begin_read().within(operation, &key)?;
                let table = match transaction.open_table(JOB_METRICS) {
                    Ok(table) => table,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                    Err(error) => return Err(error).within(operation, &key),
                };
                let found = table.get(key.as_str()).within(operation, &key)?;
                Ok(found.map(|guard| guard.value().to_vec()))
            })
            .await?;
        bytes
            .map(|bytes| super::decode_metrics(&bytes, id))
            .transpose()
    }

    async fn put_user(&self, user: &UserRecord) -> Result<()> {
        let bytes = codec::encode(user)?;
        self.put_bytes("writing user", USERS, user.name.clone(), bytes)
            .await
    }

    async fn remove_user(&self, name: &str) -> Result<bool> {
        let key = name.to_owned();
        self.run_blocking("removing user", move |database| {
            let operation = "removing user";
            let transaction = database.begin_write().within(operation, &key)?;
            let existed = transaction
                .open_table(USERS)
                .within(operation, &key)?
                .remove(key.as_str())
                .within(operation, &key)?
                .is_some();
            transaction.commit().within(operation, &key)?;
            Ok(existed)
        })
        .await
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>> {
        let stored = self.list_table("listing users", USERS).await?;
        Ok(super::decode_users(stored))
    }

    async fn put_sweep(&self, sweep: &SweepRecord) -> Result<()> {
        let bytes = codec::encode(sweep)?;
        self.put_bytes("writing sweep", SWEEPS, sweep.id.to_string(), bytes)
            .await
    }

    async fn list_sweeps(&self) -> Result<Vec<SweepRecord>> {
        let stored = self.list_table("listing sweeps", SWEEPS).await?;
        Ok(super::decode_sweeps(stored))
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<u64> {
        let window = self.audit_window;
        self.run_blocking("appending to the audit log", move |database| {
            let operation = "appending to the audit log";
            let transaction = database.begin_write().within(operation, AUDIT_SEQ_KEY)?;
            let seq = {
                let mut meta = transaction
                    .open_table(META)
                    .within(operation, AUDIT_SEQ_KEY)?;
                let seq = meta
                    .get(AUDIT_SEQ_KEY)
                    .within(operation, AUDIT_SEQ_KEY)?
                    .map_or(0, |guard| guard.value())
                    + 1;
                meta.insert(AUDIT_SEQ_KEY, seq)
                    .within(operation, AUDIT_SEQ_KEY)?;
                seq
            };
            let bytes = codec::encode(&AuditEntry { seq, ..entry }.bounded())?;
            {
                let mut audit = transaction.open_table(AUDIT).within(operation, "")?;
                audit.insert(seq, bytes.as_slice()).within(operation, "")?;
                // Keep the newest entries: drop the one that just fell out of the window.
                if let Some(oldest) = seq.checked_sub(window) {
                    audit.remove(oldest).within(operation, "")?;
                }
            }
            transaction.commit().within(operation, AUDIT_SEQ_KEY)?;
            Ok(seq)
        })
        .await
    }

    async fn list_audit(&self, after_seq: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        let stored = self
            .run_blocking("reading the audit log", move |database| {
                let operation = "reading the audit log";
                let transaction = database.begin_read().within(operation, "")?;
                let audit = transaction.open_table(AUDIT).within(operation, "")?;
                let mut stored = Vec::new();
                let start = after_seq.saturating_add(1);
                for entry in audit.range(start..).within(operation, "")?.take(limit) {
                    let (seq, value) = entry.within(operation, "")?;
                    stored.push((seq.value(), value.value().to_vec()));
                }
                Ok(stored)
            })
            .await?;
        Ok(super::decode_audit(stored))
    }

    async fn list_quarantined(&self) -> Result<Vec<QuarantinedRecord>> {
        self.run_blocking("listing quarantine", |database| {
            let operation = "listing quarantine";
            let transaction = database.begin_read().within(operation, "")?;
            let mut found = Vec::new();
            for kind in RecordKind::ALL {
                let (_, raw_table, notes_table) = tables(kind);
                let raw = transaction.open_table(raw_table).within(operation, "")?;
                let notes = transaction.open_table(notes_table).within(operation, "")?;
                for entry in raw.iter().within(operation, "")? {
                    let (slot, bytes) = entry.within(operation, "")?;
                    let slot = slot.value().to_owned();
                    let note = notes.get(slot.as_str()).within(operation, &slot)?;
                    let note =
                        QuarantineNote::read(&slot, note.as_ref().map(|guard| guard.value()));
                    found.push(QuarantinedRecord {
                        quarantined: note.into_quarantined(kind, slot),
                        bytes: bytes.value().to_vec(),
                    });
                }
            }
            Ok(found)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{sample_job, sample_node};

    #[test]
    fn creates_the_data_dir_and_the_database_file() {
        let root = tempfile::tempdir().unwrap();
        let data_dir = root.path().join("nested").join("data");
        let store = EmbeddedStore::open(&data_dir).unwrap();
        assert_eq!(store.path(), data_dir.join(DATABASE_FILE_NAME));
        assert!(store.path().is_file());
    }

    #[test]
    fn a_second_open_of_the_same_data_dir_is_refused_with_a_readable_error() {
        let data_dir = tempfile::tempdir().unwrap();
        let first = EmbeddedStore::open(data_dir.path()).unwrap();
        let error = EmbeddedStore::open(data_dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(&format!(
                "data dir {} is in use by another coordinator",
                data_dir.path().display()
            )),
            "{error}"
        );
        drop(first);
        EmbeddedStore::open(data_dir.path()).expect("the lock is released with the store");
    }

    #[test]
    fn a_data_dir_that_is_a_file_is_an_io_error_naming_it() {
        let root = tempfile::tempdir().unwrap();
        let not_a_dir = root.path().join("plain-file");
        std::fs::write(&not_a_dir, b"x").unwrap();
        let error = EmbeddedStore::open(&not_a_dir).unwrap_err();
        assert!(matches!(error, Error::Io { .. }), "{error:?}");
        assert!(error.to_string().contains("plain-file"), "{error}");
    }

    #[test]
    fn a_garbage_database_file_is_an_error_not_a_panic() {
        let data_dir = tempfile::tempdir().unwrap();
        let garbage: Vec<u8> = (0..64 * 1024u32)
            .map(|index| (index * 7 + 3) as u8)
            .collect();
        std::fs::write(data_dir.path().join(DATABASE_FILE_NAME), garbage).unwrap();
        let error = EmbeddedStore::open(data_dir.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains(DATABASE_FILE_NAME), "{error}");
    }

    /// Returns the permission bits of `path`.
    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn the_data_dir_and_the_database_file_are_private() {
        let root = tempfile::tempdir().unwrap();
        let data_dir = root.path().join("nested").join("data");
        let store = EmbeddedStore::open(&data_dir).unwrap();
        assert_eq!(mode_of(&data_dir), DATA_DIR_MODE);
        assert_eq!(
            mode_of(&data_dir.join("..")),
            DATA_DIR_MODE,
            "created parent"
        );
        assert_eq!(mode_of(store.path()), DATABASE_FILE_MODE);
    }

    #[test]
    fn a_looser_data_dir_and_database_file_are_tightened() {
        let data_dir = tempfile::tempdir().unwrap();
        {
            EmbeddedStore::open(data_dir.path()).unwrap();
        }
        let file = data_dir.path().join(DATABASE_FILE_NAME);
        std::fs::set_permissions(data_dir.path(), Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&file, Permissions::from_mode(0o644)).unwrap();
        let store = EmbeddedStore::open(data_dir.path()).unwrap();
        assert_eq!(mode_of(data_dir.path()), DATA_DIR_MODE);
        assert_eq!(mode_of(store.path()), DATABASE_FILE_MODE);
    }

    #[test]
    fn a_stricter_mode_is_left_alone() {
        let data_dir = tempfile::tempdir().unwrap();
        let file = data_dir.path().join(DATABASE_FILE_NAME);
        std::fs::write(&file, b"").unwrap();
        std::fs::set_permissions(&file, Permissions::from_mode(0o400)).unwrap();
        std::fs::set_permissions(data_dir.path(), Permissions::from_mode(0o300)).unwrap();
        restrict_mode(data_dir.path(), "data dir", DATA_DIR_MODE).unwrap();
        restrict_mode(&file, "database file", DATABASE_FILE_MODE).unwrap();
        assert_eq!(mode_of(data_dir.path()), 0o300);
        assert_eq!(mode_of(&file), 0o400);
        std::fs::set_permissions(data_dir.path(), Permissions::from_mode(0o700)).unwrap();
    }

    #[tokio::test]
    async fn an_undecodable_record_is_quarantined_naming_its_key() {
        let data_dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(data_dir.path()).unwrap();
        store.put_job(&sample_job(1)).await.unwrap();
        // The hostile case: a record written before writes were bounded, too large to read.
        let mut oversized = vec![0u8; 22 * 1024 * 1024];
        oversized[0] = codec::FORMAT_VERSION;
        store
            .put_bytes("writing job", JOBS, "job-2".to_owned(), oversized.clone())
            .await
            .unwrap();
        store
            .put_bytes("writing job", JOBS, "broken-7".to_owned(), vec![9, 9, 9])
            .await
            .unwrap();

        let listing = store.list_jobs().await.unwrap();
        assert_eq!(listing.records, vec![sample_job(1)]);
        let mut quarantined = listing.quarantined;
        quarantined.sort_by(|left, right| left.key.cmp(&right.key));
        let keys: Vec<&str> = quarantined.iter().map(|entry| entry.key.as_str()).collect();
        assert_eq!(keys, ["broken-7", "job-2"]);
        assert!(
            quarantined[0].reason.contains(&format!(
                "format version 9, expected {}",
                codec::FORMAT_VERSION
            )),
            "{}",
            quarantined[0].reason
        );
        assert!(
            quarantined[1].reason.contains(&format!(
                "expected at most {}",
                crate::limits::MAX_RECORD_BYTES
            )),
            "{}",
            quarantined[1].reason
        );
        assert_eq!(
            store.get_job(&JobId::new("job-2").unwrap()).await.unwrap(),
            None
        );

        // The raw bytes are kept whole, in the quarantine table.
        let kept = store.list_quarantined().await.unwrap();
        let large = kept
            .iter()
            .find(|record| record.quarantined.key == "job-2")
            .unwrap();
        assert_eq!(large.bytes, oversized);
        assert_eq!(large.quarantined, quarantined[1]);
    }

    #[tokio::test]
    async fn a_quarantine_slot_already_taken_is_kept_and_the_next_one_used() {
        let data_dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(data_dir.path()).unwrap();
        for (round, bytes) in [vec![9u8], vec![8u8, 8]].into_iter().enumerate() {
            store
                .put_bytes("writing node", NODES, "node-1".to_owned(), bytes)
                .await
                .unwrap();
            let listing = store.list_nodes().await.unwrap();
            let slot = if round == 0 { "node-1" } else { "node-1~2" };
            assert_eq!(listing.quarantined[0].slot, slot);
        }
        let kept = store.list_quarantined().await.unwrap();
        let slots: Vec<(&str, &[u8])> = kept
            .iter()
            .map(|record| (record.quarantined.slot.as_str(), record.bytes.as_slice()))
            .collect();
        assert_eq!(slots, [("node-1", &[9u8][..]), ("node-1~2", &[8u8, 8][..])]);
        assert!(kept.iter().all(|record| record.quarantined.key == "node-1"));
    }

    #[tokio::test]
    async fn the_coordinator_starts_over_undecodable_and_unusable_records() {
        let data_dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(data_dir.path()).unwrap());
        let mut good = sample_job(1);
        good.spec_toml = "version = 1\nname = \"good\"\nkind = \"command\"\n\n[resources]\n\
                          ranks = 2\n\n[command]\nprogram = \"true\"\n"
            .to_owned();
        cohort_jobspec::parse(&good.spec_toml).expect("a valid spec");
        store.put_job(&good).await.unwrap();
        let mut unparsable = sample_job(2);
        unparsable.spec_toml = "this is not a job spec".to_owned();
        store.put_job(&unparsable).await.unwrap();
        store
            .put_bytes("writing job", JOBS, "job-3".to_owned(), vec![9, 9, 9])
            .await
            .unwrap();
        store
            .put_bytes("writing node", NODES, "node-9".to_owned(), vec![])
            .await
            .unwrap();
        store.put_node(&sample_node(1)).await.unwrap();

        let config = crate::config::CoordinatorConfig {
            data_dir: data_dir.path().to_owned(),
            ..Default::default()
        };
        let cluster = crate::cluster::Cluster::load(config, store.clone())
            .await
            .expect("the coordinator starts");
        assert!(cluster.job(&good.id).await.is_ok());
        assert!(cluster.job(&unparsable.id).await.is_err());

        let mut moved: Vec<(RecordKind, String)> = store
            .list_quarantined()
            .await
            .unwrap()
            .into_iter()
            .map(|record| (record.quarantined.kind, record.quarantined.key))
            .collect();
        moved.sort();
        assert_eq!(
            moved,
            [
                (RecordKind::Job, "job-2".to_owned()),
                (RecordKind::Job, "job-3".to_owned()),
                (RecordKind::Node, "node-9".to_owned()),
            ]
        );
        assert_eq!(store.list_jobs().await.unwrap().records, vec![good]);
        assert_eq!(
            store.list_nodes().await.unwrap().records,
            vec![sample_node(1)]
        );
    }

    #[tokio::test]
    async fn nodes_and_jobs_live_in_separate_tables() {
        let data_dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(data_dir.path()).unwrap();
        store.put_node(&sample_node(1)).await.unwrap();
        assert!(store.list_jobs().await.unwrap().records.is_empty());
        assert_eq!(
            store.list_nodes().await.unwrap().records,
            vec![sample_node(1)]
        );
    }
}
