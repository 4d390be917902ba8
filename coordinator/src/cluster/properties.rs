//! Property test of the cluster core under random sequences of valid and hostile calls.
//!
//! Simulated workers register, heartbeat, start and stop the ranks they are told to, and see
//! ranks exit; clients submit and cancel; hostile calls carry a malformed job id after valid
//! reports, a rank reported twice, an unknown state, a stale session id, an oversized host name
//! or a multi-megabyte detail. After every step the test checks:
//! - a refused call (an error, or a heartbeat answered "register again") changed nothing;
//! - every node marked ready has a live instruction stream;
//! - every job whose processes have all ended is settled (ended), and every ended job whose
//!   processes are all gone is retired, with no log or rendezvous bookkeeping left behind;
//! - no device is held by two processes, and no process is in two places;
//! - every record stays under the store's record bound.
//!
//! Every sequence ends with a restart of the coordinator on its data directory, which must
//! load and show the same jobs in the same states.

use std::collections::BTreeMap;
use std::sync::Arc;

use cohort_proto::v1::{self, instruction};
use cohort_proto::{JobId, NodeId};
use proptest::prelude::*;

use super::membership::InstructionReceiver;
use super::{Cluster, JobSlot, NodeStatus, State};
use crate::config::CoordinatorConfig;
use crate::limits::MAX_RECORD_BYTES;
use crate::store::ClusterStore;
use crate::store::embedded::EmbeddedStore;

/// Nodes of the simulated cluster.
const NODES: usize = 3;
/// CPU slots per node.
const SLOTS: u32 = 2;

/// A way a call can be malformed or out of date.
#[derive(Debug, Clone, Copy)]
enum Flaw {
    /// A valid report, then one with a job id that is not an id.
    BadJobIdAfterValidReports,
    /// The same rank twice.
    DuplicateRank,
    /// A rank state that does not exist.
    UnknownState,
    /// A session id that is not the node's.
    StaleSession,
    /// A host name far over its bound (registration only; heartbeats send it as a detail).
    Oversized,
}

/// One step of a sequence.
#[derive(Debug, Clone)]
enum Action {
    /// A client submits a command job of this many ranks.
    Submit(u32),
    /// A client cancels the n-th submitted job.
    Cancel(usize),
    /// The scheduler and the liveness checks run.
    Tick,
    /// A node registers, perhaps with a flaw.
    Register(usize, Option<Flaw>),
    /// A node heartbeats, perhaps with a flaw, perhaps leaving.
    Heartbeat(usize, Option<Flaw>, bool),
    /// A node's worker follows its instructions and heartbeats.
    Work(usize),
    /// The n-th running rank of a node exits with a code.
    Exit(usize, usize, i32),
    /// A node's worker dies and comes back with no ranks.
    WorkerRestart(usize),
    /// The coordinator restarts on its data directory.
    Restart,
}

fn flaw() -> impl Strategy<Value = Option<Flaw>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some(Flaw::BadJobIdAfterValidReports)),
        1 => Just(Some(Flaw::DuplicateRank)),
        1 => Just(Some(Flaw::UnknownState)),
        1 => Just(Some(Flaw::StaleSession)),
        1 => Just(Some(Flaw::Oversized)),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    let node = 0..NODES;
    prop_oneof![
        3 => (1u32..4).prop_map(Action::Submit),
        1 => (0usize..8).prop_map(Action::Cancel),
        3 => Just(Action::Tick),
        2 => (node.clone(), flaw()).prop_map(|(n, f)| Action::Register(n, f)),
        2 => (node.clone(), flaw(), prop::bool::weighted(0.1))
            .prop_map(|(n, f, leaving)| Action::Heartbeat(n, f, leaving)),
        5 => node.clone().prop_map(Action::Work),
        3 => (node.clone(), 0usize..4, prop_oneof![Just(0), Just(1), Just(137)])
            .prop_map(|(n, i, code)| Action::Exit(n, i, code)),
        1 => node.prop_map(Action::WorkerRestart),
        1 => Just(Action::Restart),
    ]
}

/// One rank process of a simulated worker.
#[derive(Debug, Clone)]
struct SimRank {
    /// What the worker reports.
    report: v1::RankReport,
}

/// A simulated worker daemon.
#[derive(Default)]
struct SimWorker {
    /// Its session id, once registered.
    session: Option<String>,
    /// The last session it was issued, kept in its state directory across restarts and shown
    /// when it registers again.
    kept_session: Option<String>,
    /// Its instruction stream (held open, as a connected worker holds it).
    stream: Option<InstructionReceiver>,
    /// Its ranks by (job, rank), until their end is acknowledged.
    ranks: BTreeMap<(String, u32), SimRank>,
    /// Next pid.
    next_pid: u32,
}

impl SimWorker {
    fn reports(&self) -> Vec<v1::RankReport> {
        self.ranks
            .values()
            .map(|rank| rank.report.clone())
            .collect()
    }

    /// Forgets ranks whose end was acknowledged (an accepted heartbeat carried it).
    fn acknowledge(&mut self) {
        self.ranks
            .retain(|_, rank| rank.report.state == v1::RankState::Running as i32);
    }

    /// Follows every instruction waiting in the stream.
    fn follow_instructions(&mut self) {
        let Some(stream) = &mut self.stream else {
            return;
        };
        let mut started = Vec::new();
        let mut stopped = Vec::new();
        while let Ok(Ok(message)) = stream.try_recv() {
            match message.kind {
                Some(instruction::Kind::StartRank(start)) => started.push(start),
                Some(instruction::Kind::StopRank(stop)) => stopped.push(stop),
                _ => {}
            }
        }
        for start in started {
            self.next_pid += 1;
            let pid = self.next_pid;
            self.ranks
                .entry((start.job_id.clone(), start.rank))
                .or_insert(SimRank {
                    report: v1::RankReport {
                        job_id: start.job_id,
                        rank: start.rank,
                        state: v1::RankState::Running as i32,
                        pid,
                        ..v1::RankReport::default()
                    },
                });
        }
        for stop in stopped {
            if let Some(rank) = self.ranks.get_mut(&(stop.job_id, stop.rank))
                && rank.report.state == v1::RankState::Running as i32
            {
                rank.report.state = v1::RankState::Exited as i32;
                rank.report.signal = Some(15);
                rank.report.exited_at_unix_ms = crate::model::now_ms();
                rank.report.stop_cause = v1::StopCause::Instructed as i32;
            }
        }
    }
}

fn node_id(node: usize) -> String {
    format!("node-{node}")
}

fn command_job(ranks: u32) -> String {
    format!(
        "version = 1\nname = \"p\"\nkind = \"command\"\n[resources]\nranks = {ranks}\n\
         [command]\nprogram = \"true\"\n"
    )
}

/// Applies a flaw to otherwise valid reports.
fn flawed_reports(mut reports: Vec<v1::RankReport>, flaw: Option<Flaw>) -> Vec<v1::RankReport> {
    let valid = v1::RankReport {
        job_id: "p-1".to_owned(),
        rank: 0,
        state: v1::RankState::Exited as i32,
        exit_code: Some(0),
        ..v1::RankReport::default()
    };
    match flaw {
        Some(Flaw::BadJobIdAfterValidReports) => {
            reports.push(v1::RankReport {
                job_id: "not an id!".to_owned(),
                ..valid
            });
        }
        Some(Flaw::DuplicateRank) => {
            let first = reports.first().cloned().unwrap_or(valid);
            reports.push(first.clone());
            reports.push(first);
        }
        Some(Flaw::UnknownState) => reports.push(v1::RankReport { state: 42, ..valid }),
        Some(Flaw::Oversized) => {
            // Free text is cut, not refused: the report must be kept and bounded.
            for report in &mut reports {
                report.detail = "d".repeat(3 * 1024 * 1024);
            }
        }
        Some(Flaw::StaleSession) | None => {}
    }
    reports
}

/// The coordinator and its simulated workers.
struct Harness {
    /// Data directory of the embedded store.
    data_dir: tempfile::TempDir,
    /// The coordinator's core, `None` only while restarting.
    cluster: Option<Arc<Cluster>>,
    /// Workers by node index.
    workers: Vec<SimWorker>,
    /// Ids of submitted jobs, in order.
    submitted: Vec<JobId>,
}

fn config(data_dir: &std::path::Path) -> CoordinatorConfig {
    CoordinatorConfig {
        data_dir: data_dir.to_owned(),
        ..CoordinatorConfig::default()
    }
}

async fn open_cluster(data_dir: &std::path::Path) -> Arc<Cluster> {
    let dir = data_dir.to_owned();
    let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&dir))
        .await
        .unwrap()
        .expect("the store opens");
    let store: Arc<dyn ClusterStore> = Arc::new(store);
    Arc::new(
        Cluster::load(config(data_dir), store)
            .await
            .expect("the coordinator starts on its data directory"),
    )
}

/// Everything a refused call must leave as it was.
fn fingerprint(state: &State) -> String {
    let mut text = String::new();
    for node in state.nodes.values() {
        text += &format!(
            "{:?} {:?} {:?}\n",
            node.record,
            node.status,
            node.session.as_ref().map(|s| s.token.to_string())
        );
    }
    for slot in state.jobs.values() {
        match slot {
            JobSlot::Live(job) => {
                text += &format!(
                    "{:?} {:?}\n",
                    job.record,
                    job.recovery.as_ref().map(|r| {
                        let mut reported: Vec<_> = r.reported.iter().collect();
                        reported.sort();
                        reported
                    })
                )
            }
            JobSlot::Retired(summary) => text += &format!("{summary:?}\n"),
        }
    }
    text
}

impl Harness {
    async fn new() -> Self {
        let data_dir = tempfile::tempdir().unwrap();
        let cluster = Some(open_cluster(data_dir.path()).await);
        Self {
            data_dir,
            cluster,
            workers: (0..NODES).map(|_| SimWorker::default()).collect(),
            submitted: Vec::new(),
        }
    }

    fn cluster(&self) -> &Arc<Cluster> {
        self.cluster.as_ref().expect("running")
    }

    async fn fingerprint(&self) -> String {
        fingerprint(&*self.cluster().state.lock().await)
    }

    async fn register(&mut self, node: usize, flaw: Option<Flaw>) -> bool {
        let worker = &self.workers[node];
        let request = v1::RegisterRequest {
            node_id: node_id(node),
            hostname: match flaw {
                Some(Flaw::Oversized) => "h".repeat(100_000),
                _ => format!("host-{node}"),
            },
            address: "127.0.0.1".to_owned(),
            devices: (0..SLOTS)
                .map(|index| v1::Device {
                    kind: v1::DeviceKind::Cpu as i32,
                    index,
                    name: "cpu slot".to_owned(),
                    ..v1::Device::default()
                })
                .collect(),
            ranks: flawed_reports(
                worker.reports(),
                flaw.filter(|f| !matches!(f, Flaw::Oversized)),
            ),
            session_id: worker.kept_session.clone().unwrap_or_default(),
        };
        let before = self.fingerprint().await;
        match self.cluster().register(request).await {
            Ok(mut stream) => {
                let Some(Ok(v1::Instruction {
                    kind: Some(instruction::Kind::Registered(registered)),
                })) = stream.recv().await
                else {
                    panic!("a registration's stream opens with `registered`");
                };
                let worker = &mut self.workers[node];
                worker.kept_session = Some(registered.session_id.clone());
                worker.session = Some(registered.session_id);
                worker.stream = Some(stream);
                worker.acknowledge();
                true
            }
            Err(error) => {
                assert_eq!(
                    before,
                    self.fingerprint().await,
                    "refused register ({error}) changed state"
                );
                false
            }
        }
    }

    async fn heartbeat(&mut self, node: usize, flaw: Option<Flaw>, leaving: bool) {
        let worker = &self.workers[node];
        let Some(session) = worker.session.clone() else {
            return;
        };
        let request = v1::HeartbeatRequest {
            node_id: node_id(node),
            session_id: match flaw {
                Some(Flaw::StaleSession) => "0".repeat(32),
                _ => session,
            },
            ranks: flawed_reports(worker.reports(), flaw),
            leaving: leaving && flaw.is_none(),
        };
        let leaving = request.leaving;
        let before = self.fingerprint().await;
        match self.cluster().heartbeat(request).await {
            Ok(true) => {
                let worker = &mut self.workers[node];
                worker.acknowledge();
                if leaving {
                    worker.session = None;
                    worker.stream = None;
                    worker.ranks.clear();
                }
            }
            Ok(false) => {
                assert_eq!(
                    before,
                    self.fingerprint().await,
                    "a stale heartbeat changed state"
                );
                if flaw.is_none() {
                    // The worker learns its session is gone and will register again; a forged
                    // heartbeat (a stale session id) tells the real worker nothing.
                    let worker = &mut self.workers[node];
                    worker.session = None;
                    worker.stream = None;
                }
            }
            Err(error) => {
                assert_eq!(
                    before,
                    self.fingerprint().await,
                    "refused heartbeat ({error}) changed state"
                );
            }
        }
    }

    async fn step(&mut self, action: &Action) {
        match action {
            Action::Submit(ranks) => {
                let cluster = self.cluster().clone();
                if let Ok(job) = cluster
                    .submit(command_job(*ranks), true, "client".to_owned())
                    .await
                {
                    self.submitted.push(JobId::new(job.job_id).unwrap());
                }
            }
            Action::Cancel(index) => {
                if let Some(job_id) = self.submitted.get(*index).cloned() {
                    let _ = self.cluster().cancel(&job_id).await;
                }
            }
            Action::Tick => {
                let cluster = self.cluster().clone();
                cluster.check_liveness().await.unwrap();
                cluster.schedule().await.unwrap();
            }
            Action::Register(node, flaw) => {
                self.register(*node, *flaw).await;
            }
            Action::Heartbeat(node, flaw, leaving) => self.heartbeat(*node, *flaw, *leaving).await,
            Action::Work(node) => {
                self.workers[*node].follow_instructions();
                if self.workers[*node].session.is_none() {
                    self.register(*node, None).await;
                } else {
                    self.heartbeat(*node, None, false).await;
                }
            }
            Action::Exit(node, index, code) => {
                let worker = &mut self.workers[*node];
                if let Some(rank) = worker
                    .ranks
                    .values_mut()
                    .filter(|rank| rank.report.state == v1::RankState::Running as i32)
                    .nth(*index)
                {
                    rank.report.state = v1::RankState::Exited as i32;
                    rank.report.exit_code = Some(*code);
                    rank.report.exited_at_unix_ms = crate::model::now_ms();
                    if *code != 0 {
                        rank.report.detail = format!("error: exit {code}");
                    }
                }
            }
            Action::WorkerRestart(node) => {
                let kept_session = self.workers[*node].kept_session.take();
                self.workers[*node] = SimWorker {
                    kept_session,
                    ..SimWorker::default()
                };
            }
            Action::Restart => self.restart().await,
        }
    }

    /// Restarts the coordinator on its data directory and checks it shows the same jobs.
    async fn restart(&mut self) {
        let before = self.job_states().await;
        let cluster = self.cluster.take().expect("running");
        drop(cluster);
        let cluster = open_cluster(self.data_dir.path()).await;
        self.cluster = Some(cluster);
        assert_eq!(
            before,
            self.job_states().await,
            "jobs changed across a restart"
        );
        for worker in &mut self.workers {
            worker.session = None;
            worker.stream = None;
        }
    }

    async fn job_states(&self) -> Vec<(String, String)> {
        let page = self.cluster().jobs(1000, "").await.unwrap();
        page.jobs
            .into_iter()
            .map(|job| (job.job_id.clone(), format!("{:?}", job.state())))
            .collect()
    }

    /// Checks every invariant.
    async fn check(&self) {
        let cluster = self.cluster();
        let state = cluster.state.lock().await;
        for (index, worker) in self.workers.iter().enumerate() {
            let Some(node) = state.nodes.get(&NodeId::new(node_id(index)).unwrap()) else {
                continue;
            };
            let current = node.session.as_ref().map(|s| s.token.to_string());
            let connected = worker.stream.is_some() && worker.session == current;
            if node.current_status() == NodeStatus::Ready {
                assert!(
                    connected,
                    "node {} is shown ready without a live instruction stream",
                    node.record.id
                );
            }
            if connected && node.status == NodeStatus::Ready {
                assert_eq!(node.current_status(), NodeStatus::Ready);
            }
        }
        let mut held = BTreeMap::new();
        let mut live = 0;
        let mut placed = 0;
        for slot in state.jobs.values() {
            let JobSlot::Live(job) = slot else {
                continue;
            };
            live += 1;
            let record = &job.record;
            placed += usize::from(record.state.holds_devices());
            let encoded = crate::store::codec::encode(record).expect("the record encodes");
            assert!(encoded.len() <= MAX_RECORD_BYTES);
            assert!(
                !job.done(),
                "job {} ended with every process gone but is not retired",
                record.id
            );
            if !record.placement.is_empty()
                && record.placement.iter().all(|rank| rank.state.is_final())
            {
                assert!(
                    record.state.is_terminal(),
                    "job {} has every process ended but is {}",
                    record.id,
                    record.state.name()
                );
            }
            let mut ranks: Vec<_> = record.placement.iter().map(|rank| rank.rank).collect();
            ranks.sort_unstable();
            ranks.dedup();
            assert_eq!(
                ranks.len(),
                record.placement.len(),
                "a process of {} placed twice",
                record.id
            );
            for rank in record
                .placement
                .iter()
                .filter(|rank| !rank.state.is_final())
            {
                for &device in &rank.devices {
                    let holder = (record.id.clone(), rank.rank);
                    if let Some(other) = held.insert((rank.node_id.clone(), device), holder.clone())
                    {
                        panic!(
                            "device cpu:{device} of {} held by {other:?} and {holder:?}",
                            rank.node_id
                        );
                    }
                }
            }
        }
        assert_eq!(
            cluster.logs.tracked(),
            live,
            "log bookkeeping of retired jobs left behind"
        );
        assert!(
            cluster.rendezvous.open_jobs() <= placed,
            "rendezvous of jobs that are not placed left behind"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn hostile_and_valid_calls_keep_every_invariant(actions in prop::collection::vec(action(), 1..80)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut harness = Harness::new().await;
            for action in &actions {
                harness.step(action).await;
                harness.check().await;
            }
            harness.restart().await;
            harness.check().await;
        });
    }
}
