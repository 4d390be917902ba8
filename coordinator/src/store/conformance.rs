//! One conformance suite for every [`ClusterStore`] implementation.
//!
//! Each test is an async function taking a [`Backend`] (something that opens store handles over
//! the same underlying data); [`conformance_suite!`] instantiates every test once per backend:
//! `store::conformance::embedded_store::*` against a redb file in a temporary directory, and
//! `store::conformance::etcd_store::*` against a real `etcd` server started by [`TestEtcd`].
//!
//! [`TestEtcd`] is self-contained (std and `tempfile` only, no async) so that other test crates
//! (`cluster-tests`) can copy or move it as is.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use cohort_jobspec::DeviceKind;
use cohort_proto::{JobId, NodeId};

use cohort_cluster_tests::etcd::TestEtcd;

use super::embedded::EmbeddedStore;
use super::etcd::EtcdStore;
use super::{ClusterStore, Quarantined, RecordKind, codec};
use crate::auth::records::{AuditEntry, UserRecord};
use crate::lifecycle::JobState;
use crate::model::{
    AttemptRecord, CheckpointVersion, DeviceRecord, GpuPeerRecord, JobRecord, MetricsRecord,
    NodeBackoff, NodeRecord, RankRecord, RankState, SweepRecord, SweepState, TrialTag,
};

// ---------------------------------------------------------------------------------------------
// Backends and sample records.
// ---------------------------------------------------------------------------------------------

/// Opens store handles over one persistent state, as a restarted coordinator would.
#[async_trait]
trait Backend: Send + Sync {
    /// Opens a new handle. For the embedded store, every earlier handle must be dropped first
    /// (the file is locked while one is open).
    async fn open(&self) -> Arc<dyn ClusterStore>;

    /// Opens a new handle (as [`Backend::open`]) that keeps the newest `entries` audit entries.
    async fn open_with_audit_window(&self, entries: u64) -> Arc<dyn ClusterStore>;

    /// Stores `bytes` as they are as the record of `kind` under `key`, as a damaged store or an
    /// older coordinator could have left it. Every handle must be dropped first (as for
    /// [`Backend::open`]).
    async fn put_raw(&self, kind: RecordKind, key: &str, bytes: Vec<u8>);
}

/// The embedded store in a temporary data dir.
struct EmbeddedBackend {
    /// The data dir, removed at the end of the test.
    data_dir: tempfile::TempDir,
}

impl EmbeddedBackend {
    /// Creates an empty data dir.
    fn new() -> Self {
        Self {
            data_dir: tempfile::tempdir().expect("creating a temporary data dir"),
        }
    }
}

#[async_trait]
impl Backend for EmbeddedBackend {
    async fn open(&self) -> Arc<dyn ClusterStore> {
        let data_dir = self.data_dir.path().to_owned();
        let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&data_dir))
            .await
            .expect("opening task")
            .expect("opening the embedded store");
        Arc::new(store)
    }

    async fn open_with_audit_window(&self, entries: u64) -> Arc<dyn ClusterStore> {
        let data_dir = self.data_dir.path().to_owned();
        let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&data_dir))
            .await
            .expect("opening task")
            .expect("opening the embedded store");
        Arc::new(store.with_audit_window(entries))
    }

    async fn put_raw(&self, kind: RecordKind, key: &str, bytes: Vec<u8>) {
        let data_dir = self.data_dir.path().to_owned();
        let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&data_dir))
            .await
            .expect("opening task")
            .expect("opening the embedded store");
        store
            .put_raw(kind, key, bytes)
            .await
            .expect("writing a raw record");
    }
}

/// The etcd store against a server of its own.
struct EtcdBackend {
    /// The server, killed at the end of the test.
    server: TestEtcd,
}

impl EtcdBackend {
    /// Starts a server, or returns `None` when the test is skipped (see [`TestEtcd`]).
    async fn start_or_skip(test_name: &'static str) -> Option<Self> {
        match tokio::task::spawn_blocking(move || TestEtcd::start_or_skip(test_name)).await {
            Ok(server) => server.map(|server| Self { server }),
            // Re-raise the helper's own message (missing binary under CI, failed startup).
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }
}

#[async_trait]
impl Backend for EtcdBackend {
    async fn open(&self) -> Arc<dyn ClusterStore> {
        let store = EtcdStore::connect(&self.server.endpoint(), super::etcd::DEFAULT_PREFIX)
            .await
            .expect("connecting to the test etcd");
        Arc::new(store)
    }

    async fn open_with_audit_window(&self, entries: u64) -> Arc<dyn ClusterStore> {
        let store = EtcdStore::connect(&self.server.endpoint(), super::etcd::DEFAULT_PREFIX)
            .await
            .expect("connecting to the test etcd");
        Arc::new(store.with_audit_window(entries))
    }

    async fn put_raw(&self, kind: RecordKind, key: &str, bytes: Vec<u8>) {
        EtcdStore::connect(&self.server.endpoint(), super::etcd::DEFAULT_PREFIX)
            .await
            .expect("connecting to the test etcd")
            .put_raw(kind, key, bytes)
            .await
            .expect("writing a raw record");
    }
}

/// A job record exercising every field kind: options, nested placement, enums.
pub(crate) fn sample_job(number: u64) -> JobRecord {
    let node_id = NodeId::new(format!("node-{}", number % 3)).expect("valid node id");
    JobRecord {
        id: JobId::new(format!("job-{number}")).expect("valid job id"),
        seq: number,
        spec_toml: format!("version = 1\nname = \"job {number}\"\n[command]\nprogram = \"true\"\n"),
        name: format!("job {number}"),
        kind: "command".to_owned(),
        priority: (number % 5) as i32 - 2,
        ranks: 2,
        devices_per_rank: 1,
        device_kind: if number.is_multiple_of(2) {
            DeviceKind::Cpu
        } else {
            DeviceKind::Gpu
        },
        wait_for_resources: number % 2 == 1,
        submitter: "127.0.0.1".to_owned(),
        state: JobState::Running,
        reason: String::new(),
        blamed_rank: None,
        submitted_at_ms: 1_700_000_000_000 + number as i64,
        scheduled_at_ms: Some(1_700_000_000_100),
        started_at_ms: None,
        finished_at_ms: None,
        placement: (0..2)
            .map(|rank| RankRecord {
                rank,
                node_id: node_id.clone(),
                local_rank: rank,
                devices: vec![rank],
                state: RankState::Running,
                pid: 4_000 + rank,
                exit_code: None,
                signal: None,
                exited_at_ms: None,
                detail: String::new(),
                stop_cause: Default::default(),
            })
            .collect(),
        metrics: [(
            0,
            MetricsRecord {
                step: number * 10,
                ..MetricsRecord::default()
            },
        )]
        .into_iter()
        .collect(),
        attempt: 1,
        max_restarts: 3,
        min_ranks: 1,
        attempts: vec![AttemptRecord {
            attempt: 0,
            nodes: vec![node_id.clone()],
            started_at_ms: Some(1_700_000_000_050),
            ended_at_ms: 1_700_000_000_090,
            reason: "rank 1 on node node-0 exited with code 1".to_owned(),
            planned: false,
            failed_node: Some(node_id.clone()),
            preempted_by: None,
        }],
        backoff: vec![NodeBackoff {
            node_id,
            failures: 1,
            until_ms: 1_700_000_010_090,
        }],
        checkpoints: vec![CheckpointVersion {
            step: 20,
            epoch: 0,
            attempt: 0,
            path: format!("/var/lib/cohort/outputs/job-{number}/checkpoints/step-00000020"),
            bytes: 1 << 20,
            eval_loss: Some(0.5),
            eval_accuracy: None,
            written_at_ms: 1_700_000_000_080,
            deleted: number.is_multiple_of(2),
        }],
        trial: number.is_multiple_of(3).then(|| TrialTag {
            sweep_id: cohort_proto::SweepId::new("sweep-1").expect("valid sweep id"),
            trial: number as u32,
            rung: 1,
        }),
    }
}

/// A node record with one CPU slot and one GPU.
pub(crate) fn sample_node(number: u64) -> NodeRecord {
    NodeRecord {
        id: NodeId::new(format!("node-{number}")).expect("valid node id"),
        hostname: format!("host{number}.local"),
        address: format!("10.0.0.{}:7070", number % 250),
        devices: vec![
            DeviceRecord {
                kind: DeviceKind::Cpu,
                index: 0,
                name: "cpu".to_owned(),
                memory_total_bytes: 0,
                memory_free_bytes: 0,
                compute_capability: String::new(),
                pci_bus_id: String::new(),
                peers: Vec::new(),
            },
            DeviceRecord {
                kind: DeviceKind::Gpu,
                index: 0,
                name: "NVIDIA H100".to_owned(),
                memory_total_bytes: 80 << 30,
                memory_free_bytes: 79 << 30,
                compute_capability: "9.0".to_owned(),
                pci_bus_id: "0000:01:00.0".to_owned(),
                peers: vec![GpuPeerRecord {
                    index: 1,
                    access: true,
                    native_atomics: true,
                    performance_rank: 0,
                }],
            },
        ],
        registered_at_ms: 1_700_000_000_000 + number as i64,
        draining: number % 2 == 1,
    }
}

/// Lists jobs sorted by id (stores promise no order).
async fn sorted_jobs(store: &dyn ClusterStore) -> Vec<JobRecord> {
    let mut jobs = store.list_jobs().await.expect("listing jobs").records;
    jobs.sort_by(|left, right| left.id.cmp(&right.id));
    jobs
}

/// Lists nodes sorted by id (stores promise no order).
async fn sorted_nodes(store: &dyn ClusterStore) -> Vec<NodeRecord> {
    let mut nodes = store.list_nodes().await.expect("listing nodes").records;
    nodes.sort_by(|left, right| left.id.cmp(&right.id));
    nodes
}

// ---------------------------------------------------------------------------------------------
// The suite.
// ---------------------------------------------------------------------------------------------

/// Instantiates each named test once per backend.
macro_rules! conformance_suite {
    ($($test:ident),* $(,)?) => {
        /// The suite against the embedded (redb) store.
        mod embedded_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let backend = super::EmbeddedBackend::new();
                    super::$test(&backend).await;
                }
            )*
        }

        /// The suite against the etcd store and a real etcd server.
        mod etcd_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let Some(backend) = super::EtcdBackend::start_or_skip(stringify!($test)).await
                    else {
                        return;
                    };
                    super::$test(&backend).await;
                }
            )*
        }
    };
}

conformance_suite!(
    metric_curves_round_trip_are_replaced_and_survive_reopening,
    sequence_starts_at_one_and_counts_up,
    sequence_is_unique_and_increasing_under_concurrent_callers,
    jobs_round_trip_through_put_get_and_list,
    nodes_round_trip_through_put_and_list,
    put_replaces_an_existing_record,
    records_and_sequence_survive_reopening,
    listing_returns_more_records_than_one_page,
    a_large_job_record_round_trips,
    undecodable_records_are_quarantined_and_the_listing_goes_on,
    quarantine_job_moves_a_usable_record_aside_keeping_its_bytes,
    users_are_put_replaced_listed_by_name_and_removed,
    audit_entries_get_increasing_numbers_page_by_page_and_survive_reopening,
    concurrent_audit_appends_get_distinct_numbers,
    the_audit_log_keeps_the_newest_entries_of_its_window,
    jobs_written_together_are_stored_in_their_order,
    sweeps_are_put_replaced_and_listed_in_submission_order,
);

async fn sequence_starts_at_one_and_counts_up(backend: &dyn Backend) {
    let store = backend.open().await;
    let mut sequence = Vec::new();
    for _ in 0..3 {
        sequence.push(store.next_job_seq().await.unwrap());
    }
    assert_eq!(sequence, vec![1, 2, 3]);
    // A block is reserved whole: the next number follows it.
    assert_eq!(store.reserve_job_seqs(64).await.unwrap(), 4);
    assert_eq!(store.next_job_seq().await.unwrap(), 68);
}

async fn jobs_written_together_are_stored_in_their_order(backend: &dyn Backend) {
    let store = backend.open().await;
    let first = sample_job(1);
    let mut later = sample_job(1);
    later.reason = "the later state".to_owned();
    let other = sample_job(2);
    store.put_jobs(&[&first, &other, &later]).await.unwrap();
    let mut listed = store.list_jobs().await.unwrap().records;
    listed.sort_by(|left, right| left.id.cmp(&right.id));
    assert_eq!(listed, vec![later, other]);
}

async fn sequence_is_unique_and_increasing_under_concurrent_callers(backend: &dyn Backend) {
    const TASKS: u64 = 8;
    const CALLS_PER_TASK: u64 = 20;
    let store = backend.open().await;
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..CALLS_PER_TASK {
                seen.push(store.next_job_seq().await.unwrap());
            }
            seen
        }));
    }
    let mut all = BTreeSet::new();
    for task in tasks {
        let seen = task.await.unwrap();
        assert!(
            seen.windows(2).all(|pair| pair[0] < pair[1]),
            "one caller saw a non-increasing sequence: {seen:?}"
        );
        for value in seen {
            assert!(all.insert(value), "sequence {value} was handed out twice");
        }
    }
    let expected: BTreeSet<u64> = (1..=TASKS * CALLS_PER_TASK).collect();
    assert_eq!(
        all, expected,
        "sequence numbers must be exactly 1..=N without gaps"
    );
    assert_eq!(
        store.next_job_seq().await.unwrap(),
        TASKS * CALLS_PER_TASK + 1
    );
}

async fn jobs_round_trip_through_put_get_and_list(backend: &dyn Backend) {
    let store = backend.open().await;
    assert!(store.list_jobs().await.unwrap().records.is_empty());
    let mut finished = sample_job(3);
    finished.state = JobState::Failed;
    finished.reason = "rank 1 on node-0 exited with code 3".to_owned();
    finished.finished_at_ms = Some(1_700_000_009_999);
    let jobs = vec![sample_job(1), sample_job(2), finished];
    for job in &jobs {
        store.put_job(job).await.unwrap();
    }
    for job in &jobs {
        assert_eq!(store.get_job(&job.id).await.unwrap().as_ref(), Some(job));
    }
    assert_eq!(sorted_jobs(store.as_ref()).await, jobs);
    let missing = JobId::new("job-404").unwrap();
    assert_eq!(store.get_job(&missing).await.unwrap(), None);
    // A job id that is a prefix of another must not match it.
    let prefix_only = JobId::new("job-").unwrap();
    assert_eq!(store.get_job(&prefix_only).await.unwrap(), None);
}

async fn nodes_round_trip_through_put_and_list(backend: &dyn Backend) {
    let store = backend.open().await;
    assert!(store.list_nodes().await.unwrap().records.is_empty());
    let nodes = vec![sample_node(1), sample_node(2), sample_node(3)];
    for node in &nodes {
        store.put_node(node).await.unwrap();
    }
    assert_eq!(sorted_nodes(store.as_ref()).await, nodes);
    // Nodes are not jobs.
    assert!(store.list_jobs().await.unwrap().records.is_empty());
}

async fn put_replaces_an_existing_record(backend: &dyn Backend) {
    let store = backend.open().await;
    let original = sample_job(7);
    store.put_job(&original).await.unwrap();
    let mut updated = original.clone();
    updated.state = JobState::Cancelled;
    updated.reason = "cancelled by user".to_owned();
    updated.placement.clear();
    store.put_job(&updated).await.unwrap();
    assert_eq!(
        store.get_job(&original.id).await.unwrap(),
        Some(updated.clone())
    );
    assert_eq!(store.list_jobs().await.unwrap().records, vec![updated]);

    let node = sample_node(4);
    store.put_node(&node).await.unwrap();
    let mut moved = node.clone();
    moved.address = "10.9.9.9:7070".to_owned();
    moved.devices.truncate(1);
    store.put_node(&moved).await.unwrap();
    assert_eq!(store.list_nodes().await.unwrap().records, vec![moved]);
}

async fn records_and_sequence_survive_reopening(backend: &dyn Backend) {
    let mut finished = sample_job(2);
    finished.state = JobState::Succeeded;
    finished.finished_at_ms = Some(1_700_000_005_000);
    let jobs = vec![sample_job(1), finished];
    let nodes = vec![sample_node(1), sample_node(2)];
    {
        let store = backend.open().await;
        assert_eq!(store.next_job_seq().await.unwrap(), 1);
        assert_eq!(store.next_job_seq().await.unwrap(), 2);
        for job in &jobs {
            store.put_job(job).await.unwrap();
        }
        for node in &nodes {
            store.put_node(node).await.unwrap();
        }
    }
    let reopened = backend.open().await;
    assert_eq!(sorted_jobs(reopened.as_ref()).await, jobs);
    assert_eq!(sorted_nodes(reopened.as_ref()).await, nodes);
    assert_eq!(
        reopened.get_job(&jobs[1].id).await.unwrap().as_ref(),
        Some(&jobs[1])
    );
    assert_eq!(reopened.next_job_seq().await.unwrap(), 3);
}

async fn listing_returns_more_records_than_one_page(backend: &dyn Backend) {
    const JOBS: u64 = 1_100;
    let store = backend.open().await;
    let mut writers = Vec::new();
    for writer in 0..8u64 {
        let store = Arc::clone(&store);
        writers.push(tokio::spawn(async move {
            for number in (writer..JOBS).step_by(8) {
                let mut job = sample_job(number);
                job.placement.clear();
                store.put_job(&job).await.unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let jobs = store.list_jobs().await.unwrap().records;
    assert_eq!(jobs.len() as u64, JOBS);
    let numbers: BTreeSet<u64> = jobs.iter().map(|job| job.seq).collect();
    assert_eq!(numbers, (0..JOBS).collect::<BTreeSet<u64>>());
}

async fn a_large_job_record_round_trips(backend: &dyn Backend) {
    let store = backend.open().await;
    let mut job = sample_job(1);
    // The largest spec a submission may carry, and a wide gang.
    job.spec_toml = "#".repeat(cohort_jobspec::MAX_SPEC_BYTES);
    job.placement = (0..1_024)
        .map(|rank| RankRecord {
            rank,
            node_id: NodeId::new(format!("node-{}", rank / 8)).unwrap(),
            local_rank: rank % 8,
            devices: vec![rank % 8],
            state: RankState::Pending,
            pid: 0,
            exit_code: None,
            signal: None,
            exited_at_ms: None,
            detail: String::new(),
            stop_cause: Default::default(),
        })
        .collect();
    store.put_job(&job).await.unwrap();
    assert_eq!(store.get_job(&job.id).await.unwrap(), Some(job.clone()));
    assert_eq!(store.list_jobs().await.unwrap().records, vec![job]);
}

/// Returns the quarantined records' kinds and keys, sorted.
fn kinds_and_keys(quarantined: &[Quarantined]) -> Vec<(RecordKind, &str)> {
    let mut found: Vec<(RecordKind, &str)> = quarantined
        .iter()
        .map(|entry| (entry.kind, entry.key.as_str()))
        .collect();
    found.sort();
    found
}

async fn undecodable_records_are_quarantined_and_the_listing_goes_on(backend: &dyn Backend) {
    // A wrong format version, an empty value, and bytes that are no record at all.
    let garbage = [
        (RecordKind::Job, "job-2", vec![9, 9, 9]),
        (RecordKind::Job, "job-4", Vec::new()),
        (
            RecordKind::Node,
            "node-7",
            vec![codec::FORMAT_VERSION, 0xff, 0xff],
        ),
    ];
    for (kind, key, bytes) in &garbage {
        backend.put_raw(*kind, key, bytes.clone()).await;
    }
    let store = backend.open().await;
    let good_jobs = vec![sample_job(1), sample_job(3)];
    for job in &good_jobs {
        store.put_job(job).await.unwrap();
    }
    store.put_node(&sample_node(1)).await.unwrap();

    let mut jobs = store.list_jobs().await.unwrap();
    jobs.records.sort_by(|left, right| left.id.cmp(&right.id));
    assert_eq!(jobs.records, good_jobs);
    assert_eq!(
        kinds_and_keys(&jobs.quarantined),
        [(RecordKind::Job, "job-2"), (RecordKind::Job, "job-4")]
    );
    let nodes = store.list_nodes().await.unwrap();
    assert_eq!(nodes.records, vec![sample_node(1)]);
    assert_eq!(
        kinds_and_keys(&nodes.quarantined),
        [(RecordKind::Node, "node-7")]
    );
    let mut moved: Vec<Quarantined> = jobs
        .quarantined
        .into_iter()
        .chain(nodes.quarantined)
        .collect();
    for entry in &moved {
        let expected = match entry.kind {
            RecordKind::Job => "decoding JobRecord",
            RecordKind::Node => "decoding NodeRecord",
        };
        assert!(entry.reason.contains(expected), "{}", entry.reason);
        assert_eq!(entry.slot, entry.key);
        assert!(entry.quarantined_at_ms > 1_600_000_000_000, "{entry:?}");
    }
    assert!(moved.iter().any(|entry| entry.reason.contains(&format!(
        "format version 9, expected {}",
        codec::FORMAT_VERSION
    ))));
    assert_eq!(
        store.get_job(&JobId::new("job-2").unwrap()).await.unwrap(),
        None
    );

    // A second listing finds only the good records and moves nothing.
    let again = store.list_jobs().await.unwrap();
    assert!(again.quarantined.is_empty(), "{:?}", again.quarantined);
    assert_eq!(again.records.len(), good_jobs.len());
    assert!(store.list_nodes().await.unwrap().quarantined.is_empty());

    // Quarantine keeps each record's raw bytes and why, also across reopening.
    drop(store);
    let reopened = backend.open().await;
    let kept = reopened.list_quarantined().await.unwrap();
    let mut kept_entries: Vec<Quarantined> = kept
        .iter()
        .map(|record| record.quarantined.clone())
        .collect();
    kept_entries.sort_by(|left, right| (left.kind, &left.key).cmp(&(right.kind, &right.key)));
    moved.sort_by(|left, right| (left.kind, &left.key).cmp(&(right.kind, &right.key)));
    assert_eq!(kept_entries, moved);
    for (kind, key, bytes) in &garbage {
        let record = kept
            .iter()
            .find(|record| record.quarantined.kind == *kind && record.quarantined.key == *key)
            .unwrap();
        assert_eq!(&record.bytes, bytes, "{kind:?} {key}");
    }
    assert_eq!(sorted_jobs(reopened.as_ref()).await, good_jobs);
}

async fn quarantine_job_moves_a_usable_record_aside_keeping_its_bytes(backend: &dyn Backend) {
    let store = backend.open().await;
    let first = sample_job(1);
    store.put_job(&first).await.unwrap();
    store.put_job(&sample_job(2)).await.unwrap();
    let reason = "stored job spec no longer parses: unknown field `gpus`";

    let moved = store
        .quarantine_job(&first.id, reason)
        .await
        .unwrap()
        .expect("the job exists");
    assert_eq!(moved.kind, RecordKind::Job);
    assert_eq!(
        (moved.key.as_str(), moved.slot.as_str()),
        ("job-1", "job-1")
    );
    assert_eq!(moved.reason, reason);
    assert_eq!(store.get_job(&first.id).await.unwrap(), None);
    let listing = store.list_jobs().await.unwrap();
    assert_eq!(listing.records, vec![sample_job(2)]);
    assert!(listing.quarantined.is_empty());

    let missing = JobId::new("job-404").unwrap();
    assert_eq!(store.quarantine_job(&missing, reason).await.unwrap(), None);

    // The same id quarantined again takes the next slot; the first stays.
    store.put_job(&first).await.unwrap();
    let again = store
        .quarantine_job(&first.id, "again")
        .await
        .unwrap()
        .expect("the job exists again");
    assert_eq!(again.slot, "job-1~2");

    let kept = store.list_quarantined().await.unwrap();
    let slots: Vec<(&str, &str)> = kept
        .iter()
        .map(|record| {
            (
                record.quarantined.slot.as_str(),
                record.quarantined.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(slots, [("job-1", reason), ("job-1~2", "again")]);
    assert_eq!(kept[0].quarantined, moved);
    for record in &kept {
        let back: JobRecord = codec::decode(&record.bytes).unwrap();
        assert_eq!(back, first);
    }
}

fn sample_user(name: &str, admin: bool) -> UserRecord {
    UserRecord {
        name: name.to_owned(),
        admin,
        token_hash: [name.len() as u8; 32],
        created_at_ms: 1_700_000_000_000,
        created_by: "user admin".to_owned(),
    }
}

fn sample_audit(target: &str) -> AuditEntry {
    AuditEntry {
        seq: 0,
        at_ms: 1_700_000_000_000,
        actor: "user alice".to_owned(),
        action: "submit".to_owned(),
        target: target.to_owned(),
        outcome: "ok".to_owned(),
    }
}

async fn metric_curves_round_trip_are_replaced_and_survive_reopening(backend: &dyn Backend) {
    let id = sample_job(1).id;
    let point = |step| crate::model::MetricPoint {
        step,
        epoch: 1,
        loss: 0.5,
        samples_per_s: 1_000.0,
        eval_loss: None,
        eval_accuracy: Some(0.8),
        at_ms: 1_700_000_000_000,
    };
    let mut history = crate::model::MetricHistory::default();
    {
        let store = backend.open().await;
        assert_eq!(store.get_job_metrics(&id).await.unwrap(), None);
        history.record(0, point(1));
        store.put_job_metrics(&id, &history).await.unwrap();
        history.record(0, point(2));
        history.record(1, point(2));
        store.put_job_metrics(&id, &history).await.unwrap();
        assert_eq!(
            store.get_job_metrics(&id).await.unwrap().as_ref(),
            Some(&history)
        );
    }
    let reopened = backend.open().await;
    assert_eq!(reopened.get_job_metrics(&id).await.unwrap(), Some(history));
    assert_eq!(
        reopened.get_job_metrics(&sample_job(2).id).await.unwrap(),
        None
    );
}

/// A running ASHA sweep over one parameter, with its first trials started.
fn sample_sweep(seq: u64) -> SweepRecord {
    let spec_toml = format!(
        "version = 1\nname = \"sweep-{seq}\"\n[sweep]\nmax_trials = 4\n\
         [sweep.searcher]\nkind = \"asha\"\nmin_resource = 0.25\n\
         [sweep.parameters]\n\"optimizer.lr\" = {{ loguniform = [1e-4, 1e-1] }}\n\
         [job]\nversion = 1\nkind = \"train\"\n"
    );
    let spec = cohort_jobspec::sweep::parse_sweep(&spec_toml).expect("a valid sweep");
    let mut search = crate::sweeps::SearchState::new(crate::sweeps::Plan::from_spec(&spec));
    let started = search.next();
    SweepRecord {
        id: cohort_proto::SweepId::new(format!("sweep-{seq}")).expect("valid sweep id"),
        seq,
        spec_toml,
        name: format!("sweep-{seq}"),
        submitter: "alice".to_owned(),
        state: SweepState::Running,
        reason: String::new(),
        submitted_at_ms: 1_700_000_000_000,
        finished_at_ms: None,
        search,
        trial_jobs: (0..started.len())
            .map(|trial| vec![JobId::new(format!("sweep-{seq}-t{trial}-9")).expect("job id")])
            .collect(),
    }
}

async fn sweeps_are_put_replaced_and_listed_in_submission_order(backend: &dyn Backend) {
    let store = backend.open().await;
    assert!(store.list_sweeps().await.unwrap().is_empty());
    for seq in [12, 3, 7] {
        store.put_sweep(&sample_sweep(seq)).await.unwrap();
    }
    let mut ended = sample_sweep(7);
    ended.search.cancel();
    ended.state = SweepState::Cancelled;
    ended.finished_at_ms = Some(1_700_000_000_500);
    store.put_sweep(&ended).await.unwrap();
    let expected = vec![sample_sweep(3), ended, sample_sweep(12)];
    assert!(
        expected[0].search.running() > 0,
        "the sample has running trials"
    );
    assert_eq!(store.list_sweeps().await.unwrap(), expected);
    drop(store);
    assert_eq!(backend.open().await.list_sweeps().await.unwrap(), expected);
}

async fn users_are_put_replaced_listed_by_name_and_removed(backend: &dyn Backend) {
    let store = backend.open().await;
    assert!(store.list_users().await.unwrap().is_empty());
    for name in ["carol", "alice", "bob"] {
        store.put_user(&sample_user(name, false)).await.unwrap();
    }
    let promoted = sample_user("bob", true);
    store.put_user(&promoted).await.unwrap();
    let names: Vec<_> = store
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|user| (user.name, user.admin))
        .collect();
    assert_eq!(
        names,
        [
            ("alice".to_owned(), false),
            ("bob".to_owned(), true),
            ("carol".to_owned(), false)
        ]
    );
    assert!(store.remove_user("alice").await.unwrap());
    assert!(!store.remove_user("alice").await.unwrap());
    drop(store);
    let reopened = backend.open().await;
    let users = reopened.list_users().await.unwrap();
    assert_eq!(users, [promoted, sample_user("carol", false)]);
}

async fn audit_entries_get_increasing_numbers_page_by_page_and_survive_reopening(
    backend: &dyn Backend,
) {
    {
        let store = backend.open().await;
        for number in 1..=5u64 {
            let seq = store
                .append_audit(sample_audit(&format!("job-{number}")))
                .await
                .unwrap();
            assert_eq!(seq, number);
        }
        let first = store.list_audit(0, 2).await.unwrap();
        let seqs: Vec<u64> = first.iter().map(|entry| entry.seq).collect();
        assert_eq!(seqs, [1, 2]);
        assert_eq!(first[1].target, "job-2");
        let rest = store.list_audit(2, 100).await.unwrap();
        let seqs: Vec<u64> = rest.iter().map(|entry| entry.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
        assert!(store.list_audit(5, 100).await.unwrap().is_empty());
    }
    let reopened = backend.open().await;
    assert_eq!(reopened.list_audit(0, 100).await.unwrap().len(), 5);
    assert_eq!(
        reopened.append_audit(sample_audit("job-6")).await.unwrap(),
        6
    );
}

async fn the_audit_log_keeps_the_newest_entries_of_its_window(backend: &dyn Backend) {
    let store = backend.open_with_audit_window(3).await;
    for number in 1..=7u64 {
        let seq = store
            .append_audit(sample_audit(&format!("job-{number}")))
            .await
            .unwrap();
        assert_eq!(seq, number, "numbers keep counting past the window");
    }
    let kept = store.list_audit(0, 100).await.unwrap();
    let targets: Vec<&str> = kept.iter().map(|entry| entry.target.as_str()).collect();
    assert_eq!(targets, ["job-5", "job-6", "job-7"]);
    assert_eq!(kept[0].seq, 5);
}

async fn concurrent_audit_appends_get_distinct_numbers(backend: &dyn Backend) {
    let store = backend.open().await;
    let appends: Vec<_> = (0..16)
        .map(|number| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .append_audit(sample_audit(&format!("job-{number}")))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut seqs: Vec<u64> = Vec::new();
    for append in appends {
        seqs.push(append.await.unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=16).collect::<Vec<u64>>());
    assert_eq!(store.list_audit(0, 100).await.unwrap().len(), 16);
}
