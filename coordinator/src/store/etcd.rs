//! The etcd store: records kept in an etcd cluster under a key prefix (default `/cohort`).
//!
//! Keys:
//! - `{prefix}/jobs/{job id}`: encoded [`JobRecord`] ([`super::codec`]).
//! - `{prefix}/nodes/{node id}`: encoded [`NodeRecord`].
//! - `{prefix}/metrics/{job id}`: the job's encoded [`MetricHistory`].
//! - `{prefix}/meta/job_seq`: the last job sequence number handed out, in decimal ASCII (so
//!   `etcdctl get` shows it).
//! - `{prefix}/quarantine/jobs/{slot}`, `{prefix}/quarantine/nodes/{slot}`: the raw bytes of a
//!   record moved aside (see [the store's module doc](super)).
//! - `{prefix}/quarantine/notes/jobs/{slot}`, `{prefix}/quarantine/notes/nodes/{slot}`: the
//!   encoded [`QuarantineNote`] of that record (why and when).
//!
//! etcd acknowledges a write once a quorum has it on disk, so writes are durable when the call
//! returns. The job sequence is advanced by compare-and-swap transactions on the key's
//! `mod_revision`, retried on conflict, so concurrent coordinators never hand out the same
//! number. Listings are read page by page at one revision, so they are a consistent snapshot of
//! any number of records. A record moves into quarantine in one transaction that writes its raw
//! bytes and note and deletes it, on condition that its `mod_revision` is still the one read and
//! the quarantine slot is free; when another writer changed the record meanwhile, its new value
//! is looked at again instead of being clobbered.
//!
//! A leader's store ([`EtcdStore::fenced`]) adds its [`Fence`] to the conditions of every write
//! transaction: once the leadership is lost, every write fails with
//! [`Error::LostLeadership`] and changes nothing.
//!
//! `{prefix}/meta/settings/{name}` holds what every coordinator of a group must share
//! ([`ClusterStore::shared_setting`]): the key job tokens are derived under, and the join
//! token's hash.

mod quarantine;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use cohort_proto::JobId;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KvClient, Txn, TxnOp, TxnOpResponse,
    TxnResponse,
};
use tracing::{debug, info, warn};

use super::codec;
use super::fence::Fence;
use super::{
    ClusterStore, Listing, QuarantineNote, Quarantined, QuarantinedRecord, RecordKind,
    decode_record,
};
use crate::auth::records::{AuditEntry, UserRecord};
use crate::error::{Error, Result};
use crate::limits::MAX_AUDIT_ENTRIES;
use crate::model::{JobRecord, MetricHistory, NodeRecord, SweepRecord};
use quarantine::Settled;

/// Key prefix used when the operator names none.
pub const DEFAULT_PREFIX: &str = "/cohort";

/// How long [`EtcdStore::connect`] waits for the server to answer before giving up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long any one request may take before it fails.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Records fetched per request when listing. A job record holds a spec of at most 64 KiB, so a
/// page stays well under [`MAX_RESPONSE_BYTES`].
const LIST_PAGE_SIZE: i64 = 256;

/// Largest response accepted from etcd (tonic's default of 4 MiB is too small for a full page of
/// large records).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Compare-and-swap attempts [`EtcdStore::next_job_seq`] makes before reporting contention.
const MAX_SEQUENCE_ATTEMPTS: u32 = 1_000;

/// Times moving one record into quarantine starts over because another writer changed the
/// record, before reporting contention.
const MAX_QUARANTINE_RETRIES: u32 = 100;

/// A record as listed: its name (the key without the directory), raw value and `mod_revision`.
type StoredEntry = (String, Vec<u8>, i64);

/// A [`ClusterStore`] kept in etcd.
///
/// Cloning gives another handle sharing the same connection.
#[derive(Clone)]
pub struct EtcdStore {
    /// The connected client; held so its endpoint list lives as long as the store.
    _client: Client,
    /// The key-value API of that client.
    kv: KvClient,
    /// The endpoint as given, for error messages.
    endpoint: String,
    /// Key prefix without a trailing `/`.
    prefix: String,
    /// Audit entries kept, the newest.
    audit_window: u64,
    /// The leadership every write must still hold; `None`: writes are not fenced.
    fence: Option<Fence>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EtcdStore")
            .field("endpoint", &self.endpoint)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to the etcd server at `endpoint` and checks that it answers.
    ///
    /// `endpoint` is `host:port`, `http://host:port` or `etcd://host:port`. `prefix` is the key
    /// prefix every record lives under ([`DEFAULT_PREFIX`] unless the operator chose another);
    /// a trailing `/` is ignored. Fails within [`CONNECT_TIMEOUT`] with an error naming the
    /// endpoint when the server cannot be reached.
    pub async fn connect(endpoint: &str, prefix: &str) -> Result<Self> {
        let url = endpoint_url(endpoint)?;
        let prefix = normalize_prefix(prefix)?;
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let unreachable = |detail: String| {
            Error::Store(format!(
                "etcd at {endpoint} is unreachable: {detail} (is etcd running there?)"
            ))
        };
        let client = tokio::time::timeout(CONNECT_TIMEOUT, Client::connect([&url], Some(options)))
            .await
            .map_err(|_| unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|error| unreachable(describe_etcd_error(&error)))?;
        let mut kv = client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        // The client connects lazily: one small read proves the server is there and answering.
        let probe_key = format!("{prefix}/meta/{JOB_SEQ_NAME}");
        tokio::time::timeout(CONNECT_TIMEOUT, kv.get(probe_key, None))
            .await
            .map_err(|_| unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|error| unreachable(describe_etcd_error(&error)))?;
        info!(endpoint, %prefix, "connected to etcd cluster store");
        Ok(Self {
            _client: client,
            kv,
            endpoint: endpoint.to_owned(),
            prefix,
            audit_window: MAX_AUDIT_ENTRIES,
            fence: None,
        })
    }

    /// This store, writing only while `fence` holds: every write transaction also checks the
    /// leader's election key, and fails with [`Error::LostLeadership`] once it is gone.
    pub fn fenced(self, fence: Fence) -> Self {
        Self {
            fence: Some(fence),
            ..self
        }
    }

    /// `conditions`, plus the fence's when the store is fenced.
    fn guarded(&self, conditions: impl IntoIterator<Item = Compare>) -> Vec<Compare> {
        let mut conditions: Vec<Compare> = conditions.into_iter().collect();
        conditions.extend(self.fence.as_ref().map(Fence::compare));
        conditions
    }

    /// `reads` to run when a transaction's conditions fail, plus a read of the fence's key
    /// (last) when the store is fenced.
    fn with_fence_read(&self, reads: impl IntoIterator<Item = TxnOp>) -> Vec<TxnOp> {
        let mut reads: Vec<TxnOp> = reads.into_iter().collect();
        reads.extend(
            self.fence
                .as_ref()
                .map(|fence| TxnOp::get(fence.key().to_vec(), None)),
        );
        reads
    }

    /// After a failed transaction built with [`Self::guarded`] and [`Self::with_fence_read`]:
    /// an error when the fence no longer holds, so that nothing is retried.
    fn check_fence(&self, operation: &str, response: &TxnResponse) -> Result<()> {
        let Some(fence) = &self.fence else {
            return Ok(());
        };
        let current = match response.op_responses().last() {
            Some(TxnOpResponse::Get(get)) => get.kvs().first().cloned(),
            _ => None,
        };
        if fence.holds(current.as_ref()) {
            return Ok(());
        }
        Err(fence.lose(&format!(
            "{operation} was refused: the leader key is gone (another coordinator leads now)"
        )))
    }

    /// Runs `then` when `conditions` (and the fence) hold; returns whether they did, or an
    /// error when the fence is gone. `otherwise` runs when they do not.
    async fn transact(
        &self,
        operation: &str,
        conditions: impl IntoIterator<Item = Compare>,
        then: Vec<TxnOp>,
        otherwise: impl IntoIterator<Item = TxnOp>,
    ) -> Result<TxnResponse> {
        let transaction = Txn::new()
            .when(self.guarded(conditions))
            .and_then(then)
            .or_else(self.with_fence_read(otherwise));
        let mut kv = self.kv.clone();
        let response = self.request(operation, kv.txn(transaction)).await?;
        if !response.succeeded() {
            self.check_fence(operation, &response)?;
        }
        Ok(response)
    }

    /// Keeps only the newest `entries` audit entries (default
    /// [`crate::limits::MAX_AUDIT_ENTRIES`]).
    pub fn with_audit_window(self, entries: u64) -> Self {
        Self {
            audit_window: entries.max(1),
            ..self
        }
    }

    /// Returns the key prefix records live under, without a trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Key of one job.
    fn job_key(&self, id: &str) -> String {
        self.record_key(RecordKind::Job, id)
    }

    /// Key of one node.
    fn node_key(&self, id: &str) -> String {
        self.record_key(RecordKind::Node, id)
    }

    /// Key of one record of `kind`.
    fn record_key(&self, kind: RecordKind, name: &str) -> String {
        format!("{}/{}/{name}", self.prefix, kind.plural())
    }

    /// Directory (under the prefix) of the raw bytes of quarantined records of `kind`.
    fn quarantine_directory(kind: RecordKind) -> String {
        format!("quarantine/{}", kind.plural())
    }

    /// Directory (under the prefix) of the notes of quarantined records of `kind`.
    fn quarantine_notes_directory(kind: RecordKind) -> String {
        format!("quarantine/notes/{}", kind.plural())
    }

    /// Key of the job sequence counter.
    fn job_seq_key(&self) -> String {
        format!("{}/meta/{JOB_SEQ_NAME}", self.prefix)
    }

    /// Wraps an etcd failure with what was being done and the endpoint.
    fn etcd_error(&self, operation: &str, error: impl std::fmt::Display) -> Error {
        Error::Store(format!("{operation} (etcd at {}): {error}", self.endpoint))
    }

    /// Runs one request with [`REQUEST_TIMEOUT`] as an upper bound, also while the connection
    /// is being re-established.
    async fn request<T>(
        &self,
        operation: &str,
        call: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(self.etcd_error(operation, describe_etcd_error(&error))),
            Err(_) => {
                Err(self.etcd_error(operation, format!("no answer within {REQUEST_TIMEOUT:?}")))
            }
        }
    }

    /// Advances the counter at `key` by `step` (at least one) in a transaction that also applies `with(next)`,
    /// retrying when another writer advanced it first; returns the new value.
    async fn advance_sequence(
        &self,
        operation: &str,
        key: String,
        step: u64,
        with: impl Fn(u64) -> Vec<TxnOp>,
    ) -> Result<u64> {
        let mut kv = self.kv.clone();
        // Current (value, mod_revision); a missing key has mod_revision 0, which is exactly what
        // a compare on a missing key's mod_revision sees.
        let response = self.request(operation, kv.get(key.clone(), None)).await?;
        let mut current = match response.kvs().first() {
            Some(pair) => (parse_sequence(&key, pair.value())?, pair.mod_revision()),
            None => (0, 0),
        };
        for _ in 1..=MAX_SEQUENCE_ATTEMPTS {
            let (last, mod_revision) = current;
            let next = last.checked_add(step.max(1)).ok_or_else(|| {
                Error::Store(format!("{operation}: sequence {key} exhausted at {last}"))
            })?;
            let mut then = vec![TxnOp::put(key.clone(), next.to_string(), None)];
            then.extend(with(next));
            let response = self
                .transact(
                    operation,
                    [Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        mod_revision,
                    )],
                    then,
                    [TxnOp::get(key.clone(), None)],
                )
                .await?;
            if response.succeeded() {
                return Ok(next);
            }
            // Someone else advanced the counter: retry from what the failed transaction read.
            current = match response.op_responses().first() {
                Some(TxnOpResponse::Get(get)) => match get.kvs().first() {
                    Some(pair) => (parse_sequence(&key, pair.value())?, pair.mod_revision()),
                    None => (0, 0),
                },
                _ => {
                    return Err(self.etcd_error(
                        operation,
                        "transaction failed without returning the current value",
                    ));
                }
            };
        }
        warn!(attempts = MAX_SEQUENCE_ATTEMPTS, key, "sequence contention");
        Err(self.etcd_error(
            operation,
            format!("still conflicting after {MAX_SEQUENCE_ATTEMPTS} attempts"),
        ))
    }

    /// Key of audit entry `seq`: zero-padded, so that keys sort as numbers.
    fn audit_key(&self, seq: u64) -> String {
        format!("{}/audit/{seq:020}", self.prefix)
    }

    /// Writes one value.
    async fn put_bytes(&self, operation: &str, key: String, bytes: Vec<u8>) -> Result<()> {
        if self.fence.is_none() {
            let mut kv = self.kv.clone();
            self.request(operation, kv.put(key, bytes, None)).await?;
            return Ok(());
        }
        self.transact(operation, [], vec![TxnOp::put(key, bytes, None)], [])
            .await?;
        Ok(())
    }

    /// Returns every key (without `{prefix}/{directory}/`), value and `mod_revision` under
    /// `{prefix}/{directory}/`, page by page at the revision of the first page.
    async fn list_bytes(&self, operation: &str, directory: &str) -> Result<Vec<StoredEntry>> {
        let key_prefix = format!("{}/{directory}/", self.prefix);
        let range_end = prefix_range_end(key_prefix.as_bytes());
        let mut start = key_prefix.clone().into_bytes();
        let mut revision = 0;
        let mut entries = Vec::new();
        loop {
            let options = GetOptions::new()
                .with_range(range_end.clone())
                .with_limit(LIST_PAGE_SIZE)
                .with_revision(revision);
            let mut kv = self.kv.clone();
            let mut response = self
                .request(operation, kv.get(start.clone(), Some(options)))
                .await?;
            if revision == 0 {
                revision = response.header().map_or(0, |header| header.revision());
            }
            let more = response.more();
            let page = response.take_kvs();
            let Some(last) = page.last() else {
                break;
            };
            // The next page starts just after the last key of this one.
            start = last.key().to_vec();
            start.push(0);
            for pair in page {
                let mod_revision = pair.mod_revision();
                let (key, value) = pair.into_key_value();
                let key = String::from_utf8_lossy(&key);
                let name = key.strip_prefix(&key_prefix).unwrap_or(&key).to_owned();
                entries.push((name, value, mod_revision));
            }
            if !more {
                break;
            }
        }
        debug!(
            directory,
            records = entries.len(),
            revision,
            "listed etcd records"
        );
        Ok(entries)
    }

    /// Stores `bytes` as they are as the record of `kind` under `key`, bypassing the codec: for
    /// tests that need a record this coordinator would never write.
    #[cfg(test)]
    pub(super) async fn put_raw(&self, kind: RecordKind, key: &str, bytes: Vec<u8>) -> Result<()> {
        self.put_bytes("writing raw record", self.record_key(kind, key), bytes)
            .await
    }

    /// Returns every record of `kind` that decodes, after moving every one that does not into
    /// quarantine.
    async fn list_records<T: codec::Record>(&self, kind: RecordKind) -> Result<Listing<T>> {
        let operation = format!("listing {}", kind.plural());
        let entries = self.list_bytes(&operation, kind.plural()).await?;
        let mut records = Vec::with_capacity(entries.len());
        let mut quarantined = Vec::new();
        for (name, value, mod_revision) in entries {
            let reason = match codec::decode::<T>(&value) {
                Ok(record) => {
                    records.push(record);
                    continue;
                }
                Err(error) => error.to_string(),
            };
            match self
                .quarantine(kind, &name, (value, mod_revision), reason, true)
                .await?
            {
                Settled::Moved(moved) => quarantined.push(moved),
                Settled::Record(record) => records.push(record),
                Settled::Gone => {}
            }
        }
        Ok(Listing {
            records,
            quarantined,
        })
    }
}

/// Last part of the job sequence counter's key.
const JOB_SEQ_NAME: &str = "job_seq";

/// Describes an etcd-client failure in one readable line: the server's message, or for a
/// transport failure its innermost cause (`tcp connect error: Connection refused (os error 111)`)
/// instead of the nested debug output of the error types.
pub(crate) fn describe_etcd_error(error: &etcd_client::Error) -> String {
    let etcd_client::Error::GRpcStatus(status) = error else {
        return error.to_string();
    };
    let mut innermost = None;
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        innermost = Some(cause.to_string());
        source = cause.source();
    }
    match innermost {
        Some(cause) if !status.message().contains(&cause) => {
            format!("{}: {cause}", status.message())
        }
        _ => status.message().to_owned(),
    }
}

/// Turns the operator's endpoint into the URL etcd-client expects.
pub(crate) fn endpoint_url(endpoint: &str) -> Result<String> {
    let trimmed = endpoint.trim();
    let address = trimmed
        .strip_prefix("etcd://")
        .or_else(|| trimmed.strip_prefix("http://"))
        .unwrap_or(trimmed);
    let valid = !address.is_empty()
        && !address.contains("://")
        && !address.contains('/')
        && address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port != 0)
        });
    if valid {
        Ok(format!("http://{address}"))
    } else {
        Err(Error::InvalidArgument(format!(
            "etcd endpoint {endpoint:?}: expected host:port, http://host:port or etcd://host:port"
        )))
    }
}

/// Strips trailing slashes from a key prefix; an empty prefix keeps keys at the root (`/jobs/..`).
fn normalize_prefix(prefix: &str) -> Result<String> {
    if prefix.contains(char::is_whitespace) {
        return Err(Error::InvalidArgument(format!(
            "etcd key prefix {prefix:?}: expected no whitespace"
        )));
    }
    Ok(prefix.trim_end_matches('/').to_owned())
}

/// Returns the smallest key greater than every key starting with `prefix` (etcd's range end
/// for a prefix).
fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: the range is open-ended ("\0" means "to the end" for etcd).
    vec![0]
}

/// Parses the stored job sequence counter.
fn parse_sequence(key: &str, value: &[u8]) -> Result<u64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse::<u64>().ok())
        .ok_or_else(|| {
            Error::Store(format!(
                "{key}: value {:?} is not a decimal job sequence number",
                String::from_utf8_lossy(value)
            ))
        })
}

#[async_trait]
impl ClusterStore for EtcdStore {
    async fn reserve_job_seqs(&self, count: u64) -> Result<u64> {
        let count = count.max(1);
        let last = self
            .advance_sequence("allocating job sequence", self.job_seq_key(), count, |_| {
                Vec::new()
            })
            .await?;
        let first = last - (count - 1);
        debug!(first, count, "reserved job sequence numbers");
        Ok(first)
    }

    async fn put_job(&self, job: &JobRecord) -> Result<()> {
        let bytes = codec::encode(job)?;
        let operation = format!("writing job {}", job.id);
        self.put_bytes(&operation, self.job_key(job.id.as_str()), bytes)
            .await?;
        debug!(job_id = %job.id, state = job.state.name(), "stored job");
        Ok(())
    }

    async fn get_job(&self, id: &JobId) -> Result<Option<JobRecord>> {
        let operation = format!("reading job {id}");
        let mut kv = self.kv.clone();
        let response = self
            .request(&operation, kv.get(self.job_key(id.as_str()), None))
            .await?;
        response
            .kvs()
            .first()
            .map(|pair| decode_record(pair.value(), RecordKind::Job, id.as_str()))
            .transpose()
    }

    async fn list_jobs(&self) -> Result<Listing<JobRecord>> {
        self.list_records(RecordKind::Job).await
    }

    async fn put_node(&self, node: &NodeRecord) -> Result<()> {
        let bytes = codec::encode(node)?;
        let operation = format!("writing node {}", node.id);
        self.put_bytes(&operation, self.node_key(node.id.as_str()), bytes)
            .await?;
        debug!(node_id = %node.id, "stored node");
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Listing<NodeRecord>> {
        self.list_records(RecordKind::Node).await
    }

    async fn put_job_metrics(&self, id: &JobId, history: &MetricHistory) -> Result<()> {
        let bytes = codec::encode(history)?;
        let key = format!("{}/metrics/{id}", self.prefix);
        self.put_bytes(&format!("writing metric curves of job {id}"), key, bytes)
            .await
    }

    async fn get_job_metrics(&self, id: &JobId) -> Result<Option<MetricHistory>> {
        let operation = format!("reading metric curves of job {id}");
        let mut kv = self.kv.clone();
        let key = format!("{}/metrics/{id}", self.prefix);
        let response = self.request(&operation, kv.get(key, None)).await?;
        response
            .kvs()
            .first()
            .map(|pair| super::decode_metrics(pair.value(), id))
            .transpose()
    }

    async fn put_user(&self, user: &UserRecord) -> Result<()> {
        let bytes = codec::encode(user)?;
        let key = format!("{}/users/{}", self.prefix, user.name);
        self.put_bytes(&format!("writing user {}", user.name), key, bytes)
            .await
    }

    async fn remove_user(&self, name: &str) -> Result<bool> {
        let key = format!("{}/users/{name}", self.prefix);
        let response = self
            .transact(
                &format!("removing user {name}"),
                [],
                vec![TxnOp::delete(key, None)],
                [],
            )
            .await?;
        Ok(response.op_responses().iter().any(
            |answer| matches!(answer, TxnOpResponse::Delete(deleted) if deleted.deleted() > 0),
        ))
    }

    async fn shared_setting(&self, name: &str, proposed: &[u8]) -> Result<Option<Vec<u8>>> {
        let key = format!("{}/meta/settings/{name}", self.prefix);
        let operation = format!("sharing setting {name}");
        let response = self
            .transact(
                &operation,
                [Compare::create_revision(key.clone(), CompareOp::Equal, 0)],
                vec![TxnOp::put(key.clone(), proposed.to_vec(), None)],
                [TxnOp::get(key, None)],
            )
            .await?;
        if response.succeeded() {
            return Ok(Some(proposed.to_vec()));
        }
        match response.op_responses().first() {
            Some(TxnOpResponse::Get(get)) => match get.kvs().first() {
                Some(pair) => Ok(Some(pair.value().to_vec())),
                None => Err(self.etcd_error(&operation, "the setting vanished while read")),
            },
            _ => Err(self.etcd_error(
                &operation,
                "transaction failed without returning the setting",
            )),
        }
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>> {
        let stored = self.list_bytes("listing users", "users").await?;
        Ok(super::decode_users(
            stored
                .into_iter()
                .map(|(name, bytes, _)| (name, bytes))
                .collect(),
        ))
    }

    async fn put_sweep(&self, sweep: &SweepRecord) -> Result<()> {
        let bytes = codec::encode(sweep)?;
        let key = format!("{}/sweeps/{}", self.prefix, sweep.id);
        self.put_bytes(&format!("writing sweep {}", sweep.id), key, bytes)
            .await
    }

    async fn list_sweeps(&self) -> Result<Vec<SweepRecord>> {
        let stored = self.list_bytes("listing sweeps", "sweeps").await?;
        Ok(super::decode_sweeps(
            stored
                .into_iter()
                .map(|(id, bytes, _)| (id, bytes))
                .collect(),
        ))
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<u64> {
        let key = format!("{}/meta/audit_seq", self.prefix);
        let entry = entry.bounded();
        // Encoded inside the transaction builder, which runs per attempt with that attempt's
        // sequence number; an encoding failure is found first, outside it.
        codec::encode(&entry)?;
        self.advance_sequence("appending to the audit log", key, 1, |seq| {
            let bytes = codec::encode(&AuditEntry {
                seq,
                ..entry.clone()
            })
            .unwrap_or_default();
            let mut ops = vec![TxnOp::put(self.audit_key(seq), bytes, None)];
            // Keep the newest entries: drop the one that just fell out of the window.
            if let Some(oldest) = seq.checked_sub(self.audit_window) {
                ops.push(TxnOp::delete(self.audit_key(oldest), None));
            }
            ops
        })
        .await
    }

    async fn list_audit(&self, after_seq: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        let start = self.audit_key(after_seq.saturating_add(1));
        let range_end = prefix_range_end(format!("{}/audit/", self.prefix).as_bytes());
        let options = GetOptions::new()
            .with_range(range_end)
            .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        let mut kv = self.kv.clone();
        let response = self
            .request("reading the audit log", kv.get(start, Some(options)))
            .await?;
        let stored = response
            .kvs()
            .iter()
            .map(|pair| {
                let seq = String::from_utf8_lossy(pair.key())
                    .rsplit('/')
                    .next()
                    .and_then(|digits| digits.parse().ok())
                    .unwrap_or(0);
                (seq, pair.value().to_vec())
            })
            .collect();
        Ok(super::decode_audit(stored))
    }

    async fn quarantine_job(&self, id: &JobId, reason: &str) -> Result<Option<Quarantined>> {
        let operation = format!("quarantining job {id}");
        let mut kv = self.kv.clone();
        let response = self
            .request(&operation, kv.get(self.job_key(id.as_str()), None))
            .await?;
        let Some(pair) = response.kvs().first() else {
            return Ok(None);
        };
        let current = (pair.value().to_vec(), pair.mod_revision());
        let settled = self
            .quarantine::<JobRecord>(
                RecordKind::Job,
                id.as_str(),
                current,
                reason.to_owned(),
                false,
            )
            .await?;
        Ok(match settled {
            Settled::Moved(moved) => Some(moved),
            Settled::Record(_) | Settled::Gone => None,
        })
    }

    async fn list_quarantined(&self) -> Result<Vec<QuarantinedRecord>> {
        let operation = "listing quarantine";
        let mut found = Vec::new();
        for kind in RecordKind::ALL {
            let raw = self
                .list_bytes(operation, &Self::quarantine_directory(kind))
                .await?;
            let notes: HashMap<String, Vec<u8>> = self
                .list_bytes(operation, &Self::quarantine_notes_directory(kind))
                .await?
                .into_iter()
                .map(|(slot, note, _)| (slot, note))
                .collect();
            for (slot, bytes, _) in raw {
                let note = QuarantineNote::read(&slot, notes.get(&slot).map(Vec::as_slice));
                found.push(QuarantinedRecord {
                    quarantined: note.into_quarantined(kind, slot),
                    bytes,
                });
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_cluster_tests::etcd::TestEtcd;

    use super::quarantine::MoveAttempt;
    use crate::store::conformance::{sample_job, sample_node};

    #[test]
    fn accepts_the_three_endpoint_spellings() {
        for spelling in [
            "127.0.0.1:2379",
            "http://127.0.0.1:2379",
            "etcd://127.0.0.1:2379",
        ] {
            assert_eq!(endpoint_url(spelling).unwrap(), "http://127.0.0.1:2379");
        }
        assert_eq!(
            endpoint_url("etcd.internal:2379").unwrap(),
            "http://etcd.internal:2379"
        );
    }

    #[test]
    fn rejects_malformed_endpoints_naming_them() {
        for bad in [
            "",
            "127.0.0.1",
            "127.0.0.1:0",
            "host:port",
            "https://h:1",
            "h:1/x",
            ":2379",
        ] {
            let error = endpoint_url(bad).unwrap_err().to_string();
            assert!(error.contains(&format!("{bad:?}")), "{error}");
            assert!(error.contains("expected host:port"), "{error}");
        }
    }

    #[test]
    fn normalizes_the_prefix() {
        assert_eq!(normalize_prefix("/cohort").unwrap(), "/cohort");
        assert_eq!(normalize_prefix("/cohort//").unwrap(), "/cohort");
        assert_eq!(normalize_prefix("").unwrap(), "");
        assert!(normalize_prefix("/co hort").is_err());
    }

    #[test]
    fn computes_prefix_range_ends() {
        assert_eq!(
            prefix_range_end(b"/cohort/jobs/"),
            b"/cohort/jobs0".to_vec()
        );
        assert_eq!(prefix_range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_range_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn parses_the_sequence_counter_or_names_the_key() {
        assert_eq!(parse_sequence("k", b"42").unwrap(), 42);
        let error = parse_sequence("/cohort/meta/job_seq", b"x1")
            .unwrap_err()
            .to_string();
        assert!(error.contains("/cohort/meta/job_seq"), "{error}");
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_fails_quickly_naming_it() {
        // A port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoint = format!("127.0.0.1:{port}");
        let started = std::time::Instant::now();
        let error = EtcdStore::connect(&endpoint, DEFAULT_PREFIX)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            started.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
        assert!(
            error.contains(&format!("etcd at {endpoint} is unreachable")),
            "{error}"
        );
        assert!(error.contains("Connection refused"), "{error}");
    }

    #[tokio::test]
    async fn a_silent_endpoint_fails_after_the_connect_timeout() {
        // Accepts TCP connections (the kernel completes the handshake) but never answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = listener.local_addr().unwrap().to_string();
        let started = std::time::Instant::now();
        let error = EtcdStore::connect(&endpoint, DEFAULT_PREFIX)
            .await
            .unwrap_err()
            .to_string();
        let elapsed = started.elapsed();
        assert!(
            elapsed >= CONNECT_TIMEOUT / 2 && elapsed < CONNECT_TIMEOUT + Duration::from_secs(3),
            "took {elapsed:?}"
        );
        assert!(
            error.contains(&format!("etcd at {endpoint} is unreachable")),
            "{error}"
        );
        drop(listener);
    }

    #[tokio::test]
    async fn stores_with_different_prefixes_do_not_see_each_other() {
        let Some(etcd) = TestEtcd::start_or_skip("stores_with_different_prefixes") else {
            return;
        };
        let first = EtcdStore::connect(&etcd.endpoint(), "/first")
            .await
            .unwrap();
        let second = EtcdStore::connect(&etcd.endpoint(), "/first-but-longer/")
            .await
            .unwrap();
        first.put_job(&sample_job(1)).await.unwrap();
        first.put_node(&sample_node(1)).await.unwrap();
        assert_eq!(first.next_job_seq().await.unwrap(), 1);
        assert!(second.list_jobs().await.unwrap().records.is_empty());
        assert!(second.list_nodes().await.unwrap().records.is_empty());
        assert_eq!(second.next_job_seq().await.unwrap(), 1);
        assert_eq!(
            first.list_jobs().await.unwrap().records,
            vec![sample_job(1)]
        );
    }

    #[tokio::test]
    async fn an_undecodable_record_is_quarantined_naming_its_key() {
        let Some(etcd) = TestEtcd::start_or_skip("an_undecodable_record_is_quarantined") else {
            return;
        };
        let store = EtcdStore::connect(&etcd.endpoint(), DEFAULT_PREFIX)
            .await
            .unwrap();
        store.put_job(&sample_job(1)).await.unwrap();
        store
            .put_bytes("writing job", store.job_key("broken-7"), vec![9, 9, 9])
            .await
            .unwrap();
        let listing = store.list_jobs().await.unwrap();
        assert_eq!(listing.records, vec![sample_job(1)]);
        assert_eq!(listing.quarantined.len(), 1);
        let moved = &listing.quarantined[0];
        assert_eq!(
            (moved.key.as_str(), moved.slot.as_str()),
            ("broken-7", "broken-7")
        );
        assert!(
            moved.reason.contains(&format!(
                "format version 9, expected {}",
                codec::FORMAT_VERSION
            )),
            "{}",
            moved.reason
        );
        // Where the module doc says: the raw bytes, and the note beside them.
        let mut kv = store.kv.clone();
        let raw = kv
            .get("/cohort/quarantine/jobs/broken-7", None)
            .await
            .unwrap();
        assert_eq!(raw.kvs()[0].value(), &[9, 9, 9]);
        let note = kv
            .get("/cohort/quarantine/notes/jobs/broken-7", None)
            .await
            .unwrap();
        let note: QuarantineNote = codec::decode(note.kvs()[0].value()).unwrap();
        assert_eq!(note.reason, moved.reason);
        assert!(
            kv.get(store.job_key("broken-7"), None)
                .await
                .unwrap()
                .kvs()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_record_changed_since_it_was_read_is_not_moved() {
        let Some(etcd) = TestEtcd::start_or_skip("a_record_changed_since_it_was_read") else {
            return;
        };
        let store = EtcdStore::connect(&etcd.endpoint(), DEFAULT_PREFIX)
            .await
            .unwrap();
        let key = store.job_key("job-1");
        store
            .put_bytes("writing job", key.clone(), vec![9])
            .await
            .unwrap();
        let mut kv = store.kv.clone();
        let stale = kv.get(key.clone(), None).await.unwrap().kvs()[0].mod_revision();
        // Another writer replaces the garbage with a good record.
        store.put_job(&sample_job(1)).await.unwrap();
        let attempt = store
            .try_move_aside(RecordKind::Job, "job-1", &[9], stale, "job-1", b"note")
            .await
            .unwrap();
        let MoveAttempt::Changed(Some((value, _))) = attempt else {
            panic!("a stale mod_revision must not move the record");
        };
        assert_eq!(value, codec::encode(&sample_job(1)).unwrap());
        // The good record is where it was, and the listing reports it.
        let settled = store
            .quarantine::<JobRecord>(
                RecordKind::Job,
                "job-1",
                (vec![9], stale),
                "garbage".to_owned(),
                true,
            )
            .await
            .unwrap();
        assert!(matches!(settled, Settled::Record(record) if record == sample_job(1)));
        assert_eq!(
            store.list_jobs().await.unwrap().records,
            vec![sample_job(1)]
        );
        assert!(store.list_quarantined().await.unwrap().is_empty());
    }
}
