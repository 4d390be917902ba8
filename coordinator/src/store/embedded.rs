//! The embedded store: one redb database file, `cluster.redb`, under the coordinator's
//! `--data-dir`.
//!
//! Tables:
//! - `jobs`: job id -> encoded [`JobRecord`] ([`super::codec`]).
//! - `nodes`: node id -> encoded [`NodeRecord`].
//! - `meta`: `job_seq` -> the last job sequence number handed out.
//!
//! Every write is one committed redb transaction with immediate durability, so it is on disk when
//! the call returns. redb's calls block, so each runs on tokio's blocking pool. redb locks the
//! file: a second coordinator opening the same data dir is refused with a readable error.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use cohort_proto::JobId;
use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition};
use tracing::{debug, info};

use super::ClusterStore;
use super::codec;
use crate::error::{Error, Result};
use crate::model::{JobRecord, NodeRecord};

/// Name of the database file inside the data dir.
pub const DATABASE_FILE_NAME: &str = "cluster.redb";

/// Job id -> encoded job record.
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// Node id -> encoded node record.
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
/// Small named counters.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Key in `meta` of the last job sequence number handed out.
const JOB_SEQ_KEY: &str = "job_seq";

/// A [`ClusterStore`] kept in a redb file under the coordinator's data dir.
///
/// Cloning gives another handle to the same open database.
#[derive(Clone)]
pub struct EmbeddedStore {
    /// The open database, shared with the blocking tasks that use it.
    database: Arc<Database>,
    /// Path of `cluster.redb`, for error messages.
    path: PathBuf,
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
    /// Opens (creating if needed) the store in `data_dir`: the directory itself and the
    /// `cluster.redb` file inside it.
    ///
    /// The file's integrity is checked on open, so a damaged file is reported as an error rather
    /// than trusted. Fails with `data dir DIR is in use by another coordinator` when another
    /// process (or another handle in this one) holds the database open.
    ///
    /// This call blocks briefly (file creation and the integrity check); call it at startup, or
    /// from `spawn_blocking`.
    pub fn open(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir).map_err(|error| {
            Error::io(format!("creating data dir {}", data_dir.display()), error)
        })?;
        let path = data_dir.join(DATABASE_FILE_NAME);
        // redb documents that a file altered outside redb may panic a plain open; the integrity
        // check turns that into an error, and the unwind guard keeps any remaining case from
        // taking the coordinator down.
        let opened = catch_unwind(AssertUnwindSafe(|| {
            Database::builder()
                .set_check_integrity_on_open(true)
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
        info!(path = %path.display(), "opened embedded cluster store");
        Ok(Self {
            database: Arc::new(database),
            path,
        })
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
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        key: String,
        bytes: Vec<u8>,
    ) -> Result<()> {
        self.run_blocking(operation, move |database| {
            let transaction = database
                .begin_write()
                .map_err(|error| redb_error(operation, &key, error))?;
            {
                let mut records = transaction
                    .open_table(table)
                    .map_err(|error| redb_error(operation, &key, error))?;
                records
                    .insert(key.as_str(), bytes.as_slice())
                    .map_err(|error| redb_error(operation, &key, error))?;
            }
            transaction
                .commit()
                .map_err(|error| redb_error(operation, &key, error))
        })
        .await
    }

    /// Returns every encoded record of `table` with its key.
    async fn list_bytes(
        &self,
        operation: &'static str,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        self.run_blocking(operation, move |database| {
            let transaction = database
                .begin_read()
                .map_err(|error| redb_error(operation, "", error))?;
            let records = transaction
                .open_table(table)
                .map_err(|error| redb_error(operation, "", error))?;
            let mut entries = Vec::new();
            for entry in records
                .iter()
                .map_err(|error| redb_error(operation, "", error))?
            {
                let (key, value) = entry.map_err(|error| redb_error(operation, "", error))?;
                entries.push((key.value().to_owned(), value.value().to_vec()));
            }
            Ok(entries)
        })
        .await
    }
}

/// Creates the tables if they do not exist yet, so that readers never find one missing.
fn create_tables(database: &Database) -> std::result::Result<(), redb::Error> {
    let transaction = database.begin_write()?;
    transaction.open_table(JOBS)?;
    transaction.open_table(NODES)?;
    transaction.open_table(META)?;
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

#[async_trait]
impl ClusterStore for EmbeddedStore {
    async fn next_job_seq(&self) -> Result<u64> {
        let sequence = self
            .run_blocking("allocating job sequence", |database| {
                let operation = "allocating job sequence";
                let transaction = database
                    .begin_write()
                    .map_err(|error| redb_error(operation, JOB_SEQ_KEY, error))?;
                let next = {
                    let mut meta = transaction
                        .open_table(META)
                        .map_err(|error| redb_error(operation, JOB_SEQ_KEY, error))?;
                    let last = meta
                        .get(JOB_SEQ_KEY)
                        .map_err(|error| redb_error(operation, JOB_SEQ_KEY, error))?
                        .map_or(0, |guard| guard.value());
                    let next = last.checked_add(1).ok_or_else(|| {
                        Error::Store(format!("{operation}: job sequence exhausted at {last}"))
                    })?;
                    meta.insert(JOB_SEQ_KEY, next)
                        .map_err(|error| redb_error(operation, JOB_SEQ_KEY, error))?;
                    next
                };
                transaction
                    .commit()
                    .map_err(|error| redb_error(operation, JOB_SEQ_KEY, error))?;
                Ok(next)
            })
            .await?;
        debug!(sequence, "allocated job sequence");
        Ok(sequence)
    }

    async fn put_job(&self, job: &JobRecord) -> Result<()> {
        let bytes = codec::encode(job)?;
        self.put_bytes("writing job", JOBS, job.id.as_str().to_owned(), bytes)
            .await?;
        debug!(job_id = %job.id, state = job.state.name(), "stored job");
        Ok(())
    }

    async fn get_job(&self, id: &JobId) -> Result<Option<JobRecord>> {
        let key = id.as_str().to_owned();
        let bytes = self
            .run_blocking("reading job", move |database| {
                let operation = "reading job";
                let transaction = database
                    .begin_read()
                    .map_err(|error| redb_error(operation, &key, error))?;
                let jobs = transaction
                    .open_table(JOBS)
                    .map_err(|error| redb_error(operation, &key, error))?;
                let found = jobs
                    .get(key.as_str())
                    .map_err(|error| redb_error(operation, &key, error))?;
                Ok(found.map(|guard| guard.value().to_vec()))
            })
            .await?;
        bytes
            .map(|bytes| decode_record(&bytes, "job", id.as_str()))
            .transpose()
    }

    async fn list_jobs(&self) -> Result<Vec<JobRecord>> {
        let entries = self.list_bytes("listing jobs", JOBS).await?;
        entries
            .iter()
            .map(|(key, bytes)| decode_record(bytes, "job", key))
            .collect()
    }

    async fn put_node(&self, node: &NodeRecord) -> Result<()> {
        let bytes = codec::encode(node)?;
        self.put_bytes("writing node", NODES, node.id.as_str().to_owned(), bytes)
            .await?;
        debug!(node_id = %node.id, "stored node");
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Vec<NodeRecord>> {
        let entries = self.list_bytes("listing nodes", NODES).await?;
        entries
            .iter()
            .map(|(key, bytes)| decode_record(bytes, "node", key))
            .collect()
    }
}

/// Decodes a stored record, naming the record in the error (`job mnist-3: decoding ...`).
fn decode_record<T: serde::de::DeserializeOwned>(bytes: &[u8], kind: &str, key: &str) -> Result<T> {
    codec::decode(bytes).map_err(|error| Error::Store(format!("{kind} {key}: {error}")))
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

    #[tokio::test]
    async fn an_undecodable_record_fails_the_listing_naming_its_key() {
        let data_dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(data_dir.path()).unwrap();
        store.put_job(&sample_job(1)).await.unwrap();
        store
            .put_bytes("writing job", JOBS, "broken-7".to_owned(), vec![9, 9, 9])
            .await
            .unwrap();
        let error = store.list_jobs().await.unwrap_err().to_string();
        assert!(error.contains("job broken-7"), "{error}");
        assert!(error.contains("format version 9, expected 1"), "{error}");
        // The good record is still there.
        let good = store.get_job(&sample_job(1).id).await.unwrap();
        assert_eq!(good, Some(sample_job(1)));
    }

    #[tokio::test]
    async fn nodes_and_jobs_live_in_separate_tables() {
        let data_dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(data_dir.path()).unwrap();
        store.put_node(&sample_node(1)).await.unwrap();
        assert!(store.list_jobs().await.unwrap().is_empty());
        assert_eq!(store.list_nodes().await.unwrap(), vec![sample_node(1)]);
    }
}
