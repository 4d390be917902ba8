//! The ranks this worker runs: starting them, watching them to the end, stopping them, and the
//! state reported to the coordinator.
//!
//! Each rank has one supervising task that owns its process: it records the rank in the state
//! directory, starts it contained ([`crate::containment`]), forwards the output, waits for the
//! exit, kills whatever the rank left (its cgroup, else its process group), ships the last
//! lines, removes the record once nothing of the rank runs, and only then records the exit, so
//! a reported exit always comes with a complete log.
//!
//! A report says why a rank ended. When Cohort stopped it, `stop_cause` says who asked
//! (the coordinator, the worker's shutdown, the loss of the coordinator) and `detail` says so
//! in words; a rank that failed on its own carries its last non-empty line of error output as
//! `detail` (Kubernetes' `FallbackToLogsOnError`), so the job's failure reason can show it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_proto::launch::{self, COHORT_EXECUTABLE, NodeFacts, RankPlace};
use cohort_proto::v1::{LogLine, LogStream, RankReport, RankState, StartRank, StopCause};
use cohort_proto::{NodeId, text};
use tokio::io::{AsyncRead, BufReader};
use tokio::process::Child;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::containment::{Containment, RankTree, procfs};
use crate::error::{Error, Result};
use crate::logship::LogShipper;
use crate::process::{self, Launch};
use crate::records::{RankRecord, StateDir};

/// Longest `detail` a report carries; longer text is cut with a visible marker.
pub const DETAIL_BYTES: usize = 512;
/// Longest wait for a rank's output forwarders once its processes are gone.
const FORWARDERS_TIMEOUT: Duration = Duration::from_secs(30);

/// Identifies a rank's process on this worker: its job, rank and the job's attempt.
type RankKey = (String, u32, u32);

/// The key of the process a start instruction starts.
fn key_of(start: &StartRank) -> RankKey {
    (start.job_id.clone(), start.rank, start.attempt)
}

/// A request to stop a rank, sent to its supervising task.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StopRequest {
    /// Time between SIGTERM and SIGKILL.
    grace: Duration,
    /// Who asked.
    cause: StopCause,
    /// Reported as the rank's `detail`.
    detail: String,
}

/// What the worker knows of one rank.
struct RankEntry {
    /// Last state, as reported to the coordinator.
    report: RankReport,
    /// Asks the supervising task to stop the rank.
    stop: watch::Sender<Option<StopRequest>>,
    /// Grace period from the start instruction.
    stop_grace: Duration,
}

/// What the worker adds to every process's launch: the facts of its node.
#[derive(Debug, Clone)]
pub struct RankContext {
    /// The coordinator's `host:port`, also the rendezvous address.
    pub coordinator: String,
    /// This node's id.
    pub node_id: NodeId,
    /// This node's advertised address.
    pub node_address: String,
    /// The `cohort` executable.
    pub cohort_executable: PathBuf,
    /// Parent of every job's output directory.
    pub output_dir: PathBuf,
    /// The cluster's CA certificate file, on a TLS cluster.
    pub ca: Option<PathBuf>,
    /// This node's certificate and key files, on a TLS cluster.
    pub tls: Option<launch::TlsFiles>,
}

impl RankContext {
    /// The launch of a process at `place` on this node.
    fn launch(&self, place: RankPlace) -> launch::Launch {
        let node = NodeFacts {
            coordinator: self.coordinator.clone(),
            rendezvous: self.coordinator.clone(),
            node_id: self.node_id.clone(),
            node_address: self.node_address.clone(),
            cohort_bin: self.cohort_executable.clone(),
            output_dir: self.output_dir.join(place.job_id.as_str()),
            ca: self.ca.clone(),
            tls: self.tls.clone(),
        };
        launch::Launch { place, node }
    }
}

/// The ranks of this worker, shared by the session (which starts and stops them) and their
/// supervising tasks (which record how they end).
#[derive(Clone)]
pub struct Ranks {
    /// Every rank started since the last acknowledged report of its end.
    table: Arc<Mutex<BTreeMap<RankKey, RankEntry>>>,
    /// Bumped whenever a rank changes state, so a heartbeat goes out at once.
    changes: Arc<watch::Sender<u64>>,
    /// Output forwarding.
    shipper: LogShipper,
    /// Environment facts.
    context: Arc<RankContext>,
    /// Contains each rank's process tree.
    containment: Containment,
    /// Where each rank is recorded until nothing of it runs.
    state: Arc<StateDir>,
    /// The current boot's id, written into every record.
    boot_id: Arc<str>,
}

impl Ranks {
    /// Creates an empty table.
    pub fn new(
        shipper: LogShipper,
        context: RankContext,
        containment: Containment,
        state: Arc<StateDir>,
    ) -> Self {
        Self {
            table: Arc::default(),
            changes: Arc::new(watch::Sender::new(0)),
            shipper,
            context: Arc::new(context),
            containment,
            state,
            boot_id: procfs::boot_id().unwrap_or_default().into(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<RankKey, RankEntry>> {
        self.table
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Returns a receiver that sees every later change of any rank's state.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The state of every rank, for a heartbeat.
    pub fn reports(&self) -> Vec<RankReport> {
        self.lock()
            .values()
            .map(|entry| entry.report.clone())
            .collect()
    }

    /// Forgets ranks whose end the coordinator has acknowledged (it accepted a heartbeat that
    /// carried these reports).
    pub fn acknowledge(&self, reported: &[RankReport]) {
        let mut table = self.lock();
        for report in reported {
            if is_ended(report) {
                table.remove(&(report.job_id.clone(), report.rank, report.attempt));
            }
        }
    }

    /// Adds the reports of ranks that ended without this worker (leftovers of the previous
    /// one, killed at start), so that the next registration carries them.
    pub fn adopt(&self, reports: Vec<RankReport>) {
        let mut table = self.lock();
        for report in reports.into_iter().filter(is_ended) {
            table.insert(
                (report.job_id.clone(), report.rank, report.attempt),
                RankEntry {
                    report,
                    stop: watch::Sender::new(None),
                    stop_grace: Duration::ZERO,
                },
            );
        }
        drop(table);
        self.changes.send_modify(|version| *version += 1);
    }

    /// Number of rank processes still alive.
    pub fn running(&self) -> usize {
        self.count(RankState::Running)
    }

    fn count(&self, state: RankState) -> usize {
        self.lock()
            .values()
            .filter(|e| e.report.state == state as i32)
            .count()
    }

    /// Starts a rank unless it is already known (instructions may be repeated).
    pub fn start(&self, start: StartRank) {
        let key = key_of(&start);
        let (stop_sender, stop_receiver) = watch::channel(None);
        let stop_grace = Duration::from_millis(u64::from(start.stop_grace_ms));
        {
            let mut table = self.lock();
            if table.contains_key(&key) {
                return;
            }
            table.insert(
                key.clone(),
                RankEntry {
                    report: RankReport {
                        job_id: start.job_id.clone(),
                        rank: start.rank,
                        attempt: start.attempt,
                        state: RankState::Pending as i32,
                        ..RankReport::default()
                    },
                    stop: stop_sender,
                    stop_grace,
                },
            );
        }
        let ranks = self.clone();
        tokio::spawn(async move { ranks.supervise(start, stop_receiver).await });
    }

    /// Stops the process of a rank of a job's `attempt` on the coordinator's instruction:
    /// SIGTERM to its whole tree, SIGKILL after its grace period. Its report says it was
    /// stopped, and `reason`.
    pub fn stop(&self, job_id: &str, rank: u32, attempt: u32, reason: &str) {
        let table = self.lock();
        if let Some(entry) = table.get(&(job_id.to_owned(), rank, attempt)) {
            info!(job_id, rank, attempt, reason, "stopping rank");
            entry.stop.send_replace(Some(StopRequest {
                grace: entry.stop_grace,
                cause: StopCause::Instructed,
                detail: format!("stopped by cohort: {reason}"),
            }));
        }
    }

    /// Stops every rank for `cause` with at most `grace` between SIGTERM and SIGKILL, and waits
    /// until every rank process is gone.
    pub async fn stop_all(&self, grace: Duration, cause: StopCause) {
        let mut changes = self.subscribe();
        {
            let table = self.lock();
            for entry in table.values() {
                entry.stop.send_replace(Some(StopRequest {
                    grace: entry.stop_grace.min(grace),
                    cause,
                    detail: stop_detail(cause).to_owned(),
                }));
            }
        }
        while self.running() > 0 || self.count(RankState::Pending) > 0 {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    fn update(&self, key: &RankKey, update: impl FnOnce(&mut RankReport)) {
        if let Some(entry) = self.lock().get_mut(key) {
            update(&mut entry.report);
        }
        self.changes.send_modify(|version| *version += 1);
    }

    /// Writes a rank record off the runtime's threads (it waits for the disk).
    async fn write_record(&self, record: RankRecord) -> Result<()> {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || state.write(&record))
            .await
            .unwrap_or_else(|join| {
                Err(Error::Io {
                    context: "writing a rank record".to_owned(),
                    source: std::io::Error::other(join),
                })
            })
    }

    /// Reads the process's launch from its start instruction (refusing one that breaks the
    /// contract), records the rank, then starts its main process in its container with the
    /// launch's environment, then records its process group and start time.
    async fn launch(&self, start: &StartRank, tree: &mut RankTree) -> Result<Child> {
        let launch = self.context.launch(RankPlace::try_from(start)?);
        let mut argv = start.argv.clone();
        if argv.first().map(String::as_str) == Some(COHORT_EXECUTABLE) {
            argv[0] = self.context.cohort_executable.display().to_string();
        }
        let environment = launch.environment(&start.env);
        let working_dir = (!start.working_dir.is_empty()).then(|| Path::new(&start.working_dir));
        let mut record = RankRecord {
            job_id: start.job_id.clone(),
            rank: start.rank,
            attempt: start.attempt,
            cgroup: tree.cgroup().map(Path::to_path_buf),
            pgid: 0,
            boot_id: self.boot_id.to_string(),
            start_time: 0,
        };
        self.write_record(record.clone()).await?;
        let child = self.containment.spawn(
            &Launch {
                argv: &argv,
                env: &environment,
                working_dir,
            },
            tree,
        )?;
        record.pgid = tree.pgid();
        record.start_time = procfs::stat(record.pgid).map_or(0, |stat| stat.start_time);
        if let Err(error) = self.write_record(record).await {
            warn!(job_id = start.job_id, rank = start.rank, %error, "could not record the rank's process group");
        }
        Ok(child)
    }

    /// Reports a rank that could not start, after removing what its start left.
    async fn start_failed(&self, start: &StartRank, tree: &RankTree, error: Error) {
        warn!(job_id = start.job_id, rank = start.rank, %error, "rank failed to start");
        self.shipper
            .send(
                &start.job_id,
                LogLine {
                    rank: start.rank,
                    stream: LogStream::Stderr as i32,
                    text: format!("[cohort] {error}"),
                },
            )
            .await;
        self.shipper.flush().await;
        if tree.kill_and_remove(&self.containment).await {
            self.forget_record(start);
        }
        let detail = text::truncate(&error.to_string(), DETAIL_BYTES).into_owned();
        self.update(&key_of(start), |report| {
            report.state = RankState::StartFailed as i32;
            report.detail = detail;
            report.exited_at_unix_ms = now_ms();
        });
    }

    fn forget_record(&self, start: &StartRank) {
        if let Err(error) = self.state.remove(&start.job_id, start.rank, start.attempt) {
            warn!(job_id = start.job_id, rank = start.rank, %error, "could not remove the rank's record");
        }
    }

    /// Owns one rank process from start to reported end.
    async fn supervise(self, start: StartRank, mut stop: watch::Receiver<Option<StopRequest>>) {
        let key = key_of(&start);
        let mut tree = self
            .containment
            .tree(&start.job_id, start.rank, start.attempt);
        let mut child = match self.launch(&start, &mut tree).await {
            Ok(child) => child,
            Err(error) => return self.start_failed(&start, &tree, error).await,
        };
        let pid = tree.pgid();
        info!(
            job_id = start.job_id,
            rank = start.rank,
            pid,
            containment = self.containment.kind(),
            "rank started"
        );
        self.update(&key, |report| {
            report.state = RankState::Running as i32;
            report.pid = pid;
        });
        let forwarders = self.forward_output(&mut child, &start);
        let (status, stopped) = wait_for_exit(&mut child, &tree, &mut stop).await;
        // The end is timed here, when the process is reaped: the coordinator blames the rank
        // that ended first, and shipping the output below can take longer than a peer's
        // echo of this very failure takes to arrive.
        let exited_at = now_ms();
        self.containment.waited(pid);
        // Whatever the rank left running goes with it: no orphans, and the pipes close so the
        // forwarders reach end of input.
        let tree_gone = tree.kill_and_remove(&self.containment).await;
        let last_error_line = join_forwarders(forwarders).await;
        self.shipper.flush().await;
        if tree_gone {
            self.forget_record(&start);
        }
        let end = RankEnd::new(&status, stopped.as_ref(), &last_error_line);
        info!(
            job_id = start.job_id,
            rank = start.rank,
            pid,
            exit_code = ?end.exit_code,
            signal = ?end.signal,
            stop_cause = end.stop_cause.as_str_name(),
            "rank exited"
        );
        self.update(&key, |report| {
            report.state = RankState::Exited as i32;
            report.exit_code = end.exit_code;
            report.signal = end.signal;
            report.detail = end.detail;
            report.stop_cause = end.stop_cause as i32;
            report.exited_at_unix_ms = exited_at;
        });
    }

    /// Starts one forwarding task per output pipe of the child.
    fn forward_output(&self, child: &mut Child, start: &StartRank) -> Vec<JoinHandle<String>> {
        let pipes: [Option<(LogStream, Box<dyn AsyncRead + Send + Unpin>)>; 2] = [
            child
                .stdout
                .take()
                .map(|out| (LogStream::Stdout, Box::new(out) as _)),
            child
                .stderr
                .take()
                .map(|err| (LogStream::Stderr, Box::new(err) as _)),
        ];
        pipes
            .into_iter()
            .flatten()
            .map(|(stream, pipe)| {
                let shipper = self.shipper.clone();
                let (job_id, rank) = (start.job_id.clone(), start.rank);
                tokio::spawn(forward(shipper, job_id, rank, stream, pipe))
            })
            .collect()
    }
}

/// Whether a report is of a rank's end.
fn is_ended(report: &RankReport) -> bool {
    report.state == RankState::Exited as i32 || report.state == RankState::StartFailed as i32
}

/// The `detail` of a rank stopped for `cause` by the worker itself.
fn stop_detail(cause: StopCause) -> &'static str {
    match cause {
        StopCause::WorkerShutdown => "stopped by cohort: the worker was shut down",
        StopCause::CoordinatorLost => {
            "stopped by cohort: the worker heard nothing from the coordinator for its heartbeat deadline"
        }
        StopCause::WorkerRestarted => crate::leftovers::RESTART_DETAIL,
        StopCause::Instructed | StopCause::Unspecified => "stopped by cohort",
    }
}

/// Ships each line of `pipe` as `stream` of the rank; returns the last non-empty line of
/// stderr (empty for stdout). The kept line reuses one buffer.
async fn forward(
    shipper: LogShipper,
    job_id: String,
    rank: u32,
    stream: LogStream,
    pipe: Box<dyn AsyncRead + Send + Unpin>,
) -> String {
    let mut reader = BufReader::new(pipe);
    let (mut bytes, mut text, mut last) = (Vec::new(), String::new(), String::new());
    while let Ok(true) = process::read_bounded_line(&mut reader, &mut bytes, &mut text).await {
        if stream == LogStream::Stderr && !text.trim().is_empty() {
            last.clear();
            last.push_str(text.trim_end());
        }
        let line = LogLine {
            rank,
            stream: stream as i32,
            text: text.clone(),
        };
        shipper.send(&job_id, line).await;
    }
    last
}

/// Waits (at most [`FORWARDERS_TIMEOUT`]) for the forwarders; returns the last non-empty line of
/// stderr.
async fn join_forwarders(forwarders: Vec<JoinHandle<String>>) -> String {
    let aborts: Vec<_> = forwarders.iter().map(JoinHandle::abort_handle).collect();
    let joined = tokio::time::timeout(FORWARDERS_TIMEOUT, futures::future::join_all(forwarders));
    match joined.await {
        Ok(results) => results
            .into_iter()
            .flatten()
            .find(|line| !line.is_empty())
            .unwrap_or_default(),
        Err(_) => {
            warn!(
                timeout_s = FORWARDERS_TIMEOUT.as_secs_f64(),
                "a rank's output stayed open after its processes were killed; no longer forwarding it"
            );
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
            String::new()
        }
    }
}

/// Waits for the rank's main process to exit, carrying out a stop request if one comes: SIGTERM
/// to the whole tree, SIGKILL after the request's grace period. Returns how the process ended
/// and the stop carried out, if any.
async fn wait_for_exit(
    child: &mut Child,
    tree: &RankTree,
    stop: &mut watch::Receiver<Option<StopRequest>>,
) -> (std::io::Result<ExitStatus>, Option<StopRequest>) {
    let mut stopped: Option<StopRequest> = None;
    let mut kill_at: Option<tokio::time::Instant> = None;
    loop {
        let kill_timer = async {
            match kill_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = child.wait() => return (status, stopped),
            changed = stop.changed(), if stopped.is_none() => {
                let request = match changed {
                    Ok(()) => stop.borrow_and_update().clone(),
                    Err(_) => None,
                };
                // The table dropped the rank: stop it without grace.
                let request = request.unwrap_or(StopRequest {
                    grace: Duration::ZERO,
                    cause: StopCause::Unspecified,
                    detail: stop_detail(StopCause::Unspecified).to_owned(),
                });
                tree.signal(libc::SIGTERM);
                kill_at = Some(tokio::time::Instant::now() + request.grace);
                stopped = Some(request);
            }
            () = kill_timer => {
                warn!(pgid = tree.pgid(), "rank ignored SIGTERM; sending SIGKILL");
                tree.signal(libc::SIGKILL);
                kill_at = Some(tokio::time::Instant::now() + Duration::from_secs(3600));
            }
        }
    }
}

/// What a rank's exit report says.
#[derive(Debug, PartialEq, Eq)]
struct RankEnd {
    /// Exit code, when it exited normally.
    exit_code: Option<i32>,
    /// Signal, when a signal killed it.
    signal: Option<i32>,
    /// Why Cohort stopped it, if it did.
    stop_cause: StopCause,
    /// The stop's detail; else, when it failed, its last line of error output.
    detail: String,
}

impl RankEnd {
    /// The report of a main process that ended with `status`, after the stop `stopped` (if
    /// Cohort stopped it), whose last non-empty line of stderr was `last_error_line`.
    fn new(
        status: &std::io::Result<ExitStatus>,
        stopped: Option<&StopRequest>,
        last_error_line: &str,
    ) -> Self {
        use std::os::unix::process::ExitStatusExt;
        let (exit_code, signal, failed_detail) = match status {
            Ok(status) => (status.code(), status.signal(), last_error_line.to_owned()),
            Err(error) => (None, None, format!("waiting for the process: {error}")),
        };
        let checkpointed = exit_code
            == Some(i32::from(
                cohort_proto::launch::EXIT_STOPPED_WITH_CHECKPOINT,
            ));
        let (stop_cause, detail) = match stopped {
            // A training rank that stopped with a checkpoint says where it is.
            Some(stop) if checkpointed => (stop.cause, last_error_line.to_owned()),
            Some(stop) => (stop.cause, stop.detail.clone()),
            None if exit_code == Some(0) => (StopCause::Unspecified, String::new()),
            None => (StopCause::Unspecified, failed_detail),
        };
        Self {
            exit_code,
            signal,
            stop_cause,
            detail: text::truncate(&detail, DETAIL_BYTES).into_owned(),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use cohort_proto::v1::membership_client::MembershipClient;
    use cohort_proto::v1::membership_server::{Membership, MembershipServer};
    use cohort_proto::v1::{
        HeartbeatRequest, HeartbeatResponse, Instruction, PushLogsRequest, PushLogsResponse,
        RegisterRequest,
    };
    use std::collections::HashMap;

    use cohort_proto::JobId;
    use cohort_proto::launch::{Devices, Master, Role};
    use tonic::{Request, Response, Status};

    use super::*;

    /// A coordinator that takes every log push and nothing else; with a gate, each push waits
    /// until the gate is closed.
    #[derive(Default)]
    struct LogSink {
        gate: Option<Arc<tokio::sync::Semaphore>>,
    }

    #[tonic::async_trait]
    impl Membership for LogSink {
        type RegisterStream = tokio_stream::Empty<std::result::Result<Instruction, Status>>;

        async fn register(
            &self,
            _: Request<RegisterRequest>,
        ) -> std::result::Result<Response<Self::RegisterStream>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn heartbeat(
            &self,
            _: Request<HeartbeatRequest>,
        ) -> std::result::Result<Response<HeartbeatResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn push_logs(
            &self,
            _: Request<PushLogsRequest>,
        ) -> std::result::Result<Response<PushLogsResponse>, Status> {
            if let Some(gate) = &self.gate {
                // Never granted a permit: returns once the test closes the gate.
                let _ = gate.acquire().await;
            }
            Ok(Response::new(PushLogsResponse::default()))
        }
    }

    /// A rank table as a worker has it, shipping to a [`LogSink`], with its state directory.
    struct Fixture {
        ranks: Ranks,
        containment: Containment,
        state: Arc<StateDir>,
        scratch: tempfile::TempDir,
        _session: watch::Sender<Option<String>>,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            self.containment.release();
        }
    }

    async fn fixture(name: &str) -> Fixture {
        fixture_shipping_to(name, LogSink::default()).await
    }

    async fn fixture_shipping_to(name: &str, sink: LogSink) -> Fixture {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(MembershipServer::new(sink))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect_lazy();
        let (session, sessions) = watch::channel(Some("test-session".to_owned()));
        let channel = cohort_proto::transport::Credentials::default().wrap(
            cohort_proto::failover::Failover::over(vec![(address.to_string(), channel)], 0),
        );
        let shipper = LogShipper::start(MembershipClient::new(channel), name.to_owned(), sessions);
        let scratch = tempfile::tempdir().unwrap();
        let state = Arc::new(StateDir::open(&scratch.path().join("state")).unwrap());
        let containment = Containment::probe(&format!("{name}-{}", std::process::id()));
        let context = RankContext {
            coordinator: address.to_string(),
            node_id: NodeId::new(name).unwrap(),
            node_address: "127.0.0.1".to_owned(),
            cohort_executable: PathBuf::from("/bin/false"),
            output_dir: scratch.path().join("outputs"),
            ca: None,
            tls: None,
        };
        Fixture {
            ranks: Ranks::new(shipper, context, containment.clone(), state.clone()),
            containment,
            state,
            scratch,
            _session: session,
        }
    }

    /// Rank `rank` of a 4-rank command job running `script`, on CPU slot `rank`.
    fn shell(job_id: &str, rank: u32, script: &str) -> StartRank {
        let place = RankPlace {
            job_id: JobId::new(job_id).unwrap(),
            rank,
            world_size: 4,
            local_rank: rank,
            local_world_size: 4,
            devices: Devices::Cpu { slots: vec![rank] },
            role: Role::Rank,
            master: Some(Master {
                addr: "127.0.0.1".to_owned(),
                port: 29_500,
            }),
            spec_toml: None,
            job_token: Some(cohort_proto::Secret::new("cohort-job-test")),
            restart_count: 0,
        };
        StartRank {
            argv: vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()],
            stop_grace_ms: 5_000,
            ..StartRank::from(&place)
        }
    }

    /// Polls the table until the rank's report has `state`.
    async fn wait_for(ranks: &Ranks, job_id: &str, rank: u32, state: RankState) -> RankReport {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let found = ranks
                .reports()
                .into_iter()
                .find(|r| r.job_id == job_id && r.rank == rank && r.state == state as i32);
            if let Some(report) = found {
                return report;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "rank {rank} of {job_id} never {state:?}: {:?}",
                ranks.reports()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rank_end_is_timed_when_the_process_ends_not_when_its_output_is_shipped() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let sink = LogSink {
            gate: Some(gate.clone()),
        };
        let fixture = fixture_shipping_to("unit-timed", sink).await;
        let ranks = &fixture.ranks;
        ranks.start(shell("timed-1", 0, "echo 'error: last words' >&2; exit 3"));
        let pid =
            libc::pid_t::try_from(wait_for(ranks, "timed-1", 0, RankState::Running).await.pid)
                .expect("a pid");
        // Reaped (not even a zombie): the worker has seen the end, and its output is held.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        // SAFETY: signal 0 only checks that the process exists.
        while unsafe { libc::kill(pid, 0) } == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "rank {pid} never ended"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let reaped_by = now_ms();
        while now_ms() == reaped_by {
            tokio::task::yield_now().await;
        }
        let held = ranks.reports().into_iter().find(|r| r.job_id == "timed-1");
        assert_eq!(
            held.map(|r| r.state),
            Some(RankState::Running as i32),
            "the report waits for the output"
        );
        gate.close();
        let report = wait_for(ranks, "timed-1", 0, RankState::Exited).await;
        assert!(
            report.exited_at_unix_ms <= reaped_by,
            "timed at {} after shipping, the process was gone by {reaped_by}",
            report.exited_at_unix_ms
        );
        assert_eq!(report.exit_code, Some(3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_rank_reports_its_last_error_line() {
        let fixture = fixture("unit-failed").await;
        let ranks = &fixture.ranks;
        ranks.start(shell(
            "failing-1",
            0,
            "echo first >&2; echo 'error: the real one' >&2; echo '  ' >&2; echo out; exit 3",
        ));
        ranks.start(shell(
            "failing-1",
            1,
            "printf '%0700d\\n' 0 >&2; kill -9 $$",
        ));
        ranks.start(shell("failing-1", 2, "echo 'noise' >&2; exit 0"));
        let failed = wait_for(ranks, "failing-1", 0, RankState::Exited).await;
        assert_eq!(failed.exit_code, Some(3));
        assert_eq!(failed.detail, "error: the real one");
        assert_eq!(failed.stop_cause, StopCause::Unspecified as i32);
        let killed = wait_for(ranks, "failing-1", 1, RankState::Exited).await;
        assert_eq!(killed.signal, Some(libc::SIGKILL));
        assert!(killed.detail.len() <= DETAIL_BYTES, "{}", killed.detail);
        assert!(killed.detail.starts_with("0000"), "{}", killed.detail);
        assert!(killed.detail.contains("bytes cut"), "{}", killed.detail);
        let succeeded = wait_for(ranks, "failing-1", 2, RankState::Exited).await;
        assert_eq!(succeeded.exit_code, Some(0));
        assert_eq!(succeeded.detail, "");
        assert!(fixture.state.list().unwrap().0.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rank_that_cannot_start_reports_why() {
        let fixture = fixture("unit-start").await;
        let mut start = shell("unstartable-1", 0, "");
        start.argv = vec!["/nonexistent/cohort-test-program".to_owned()];
        fixture.ranks.start(start);
        let report = wait_for(&fixture.ranks, "unstartable-1", 0, RankState::StartFailed).await;
        assert!(
            report.detail.contains("/nonexistent/cohort-test-program"),
            "{}",
            report.detail
        );
        assert!(fixture.state.list().unwrap().0.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rank_sees_the_job_variables_under_the_launch_contract() {
        let fixture = fixture("unit-env").await;
        let dump = fixture.scratch.path().join("environment");
        let mut start = shell("env-1", 2, &format!("env > {}", dump.display()));
        start.env = HashMap::from([
            ("WANDB_PROJECT".to_owned(), "mnist".to_owned()),
            ("RANK".to_owned(), "9".to_owned()),
        ]);
        fixture.ranks.start(start.clone());
        let report = wait_for(&fixture.ranks, "env-1", 2, RankState::Exited).await;
        assert_eq!(report.exit_code, Some(0), "{}", report.detail);
        let seen: BTreeMap<String, String> = std::fs::read_to_string(&dump)
            .unwrap()
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect();
        let launch = launch::Launch::from_vars(&seen).unwrap();
        assert_eq!(launch.place, RankPlace::try_from(&start).unwrap());
        assert_eq!(launch.node.node_id.as_str(), "unit-env");
        assert_eq!(
            launch.node.output_dir,
            fixture.scratch.path().join("outputs/env-1")
        );
        assert_eq!(seen["WANDB_PROJECT"], "mnist");
        assert_eq!(seen["RANK"], "2", "the contract's value wins");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_start_instruction_that_breaks_the_contract_is_refused_naming_the_field() {
        let fixture = fixture("unit-contract").await;
        let mut start = shell("contract-1", 0, "exit 0");
        start.devices.clear();
        fixture.ranks.start(start);
        let report = wait_for(&fixture.ranks, "contract-1", 0, RankState::StartFailed).await;
        assert!(
            report
                .detail
                .starts_with("start instruction: start_rank.devices = "),
            "{}",
            report.detail
        );
        assert!(fixture.state.list().unwrap().0.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_instructed_stop_reports_its_reason_and_leaves_nothing() {
        let fixture = fixture("unit-stop").await;
        let ranks = &fixture.ranks;
        ranks.start(shell("stopped-1", 0, "sleep 600 & echo $!; wait"));
        let running = wait_for(ranks, "stopped-1", 0, RankState::Running).await;
        let (records, _) = fixture.state.list().unwrap();
        let record = records
            .iter()
            .find(|record| record.job_id == "stopped-1")
            .expect("a running rank is recorded");
        assert_eq!(record.pgid, running.pid);
        assert!(record.start_time > 0);
        assert_eq!(
            record.cgroup.is_some(),
            fixture.containment.kind() == "cgroup"
        );
        let tree = fixture.containment.tree("stopped-1", 0, 0);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while procfs::live_group_members(running.pid).len() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the child never started"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        ranks.stop("stopped-1", 0, 0, "job cancelled by the user");
        let report = wait_for(ranks, "stopped-1", 0, RankState::Exited).await;
        assert_eq!(report.signal, Some(libc::SIGTERM));
        assert_eq!(report.stop_cause, StopCause::Instructed as i32);
        assert_eq!(
            report.detail,
            "stopped by cohort: job cancelled by the user"
        );
        assert!(procfs::live_group_members(running.pid).is_empty());
        assert!(tree.gone());
        assert!(tree.cgroup().is_none_or(|cgroup| !cgroup.exists()));
        assert!(fixture.state.list().unwrap().0.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_all_reports_its_cause_and_kills_what_ignores_sigterm() {
        let fixture = fixture("unit-stop-all").await;
        let ranks = &fixture.ranks;
        ranks.start(shell("drained-1", 0, "exec sleep 600"));
        // A tree that ignores SIGTERM gets SIGKILL after the grace period.
        ranks.start(shell("drained-1", 1, "trap '' TERM; sleep 600 & wait"));
        let first = wait_for(ranks, "drained-1", 0, RankState::Running).await;
        let second = wait_for(ranks, "drained-1", 1, RankState::Running).await;
        let stopping = ranks.stop_all(Duration::from_millis(300), StopCause::WorkerShutdown);
        tokio::time::timeout(Duration::from_secs(20), stopping)
            .await
            .expect("every rank stopped");
        for (rank, pid, signal) in [
            (0, first.pid, libc::SIGTERM),
            (1, second.pid, libc::SIGKILL),
        ] {
            let report = wait_for(ranks, "drained-1", rank, RankState::Exited).await;
            assert_eq!(report.signal, Some(signal), "rank {rank}");
            assert_eq!(report.stop_cause, StopCause::WorkerShutdown as i32);
            assert_eq!(report.detail, stop_detail(StopCause::WorkerShutdown));
            assert!(procfs::live_group_members(pid).is_empty(), "rank {rank}");
        }
        assert!(fixture.state.list().unwrap().0.is_empty());
    }

    #[tokio::test]
    async fn adopted_reports_are_reported_until_acknowledged() {
        let fixture = fixture("unit-adopt").await;
        let report = RankReport {
            job_id: "leftover-1".to_owned(),
            rank: 2,
            state: RankState::Exited as i32,
            signal: Some(libc::SIGKILL),
            stop_cause: StopCause::WorkerRestarted as i32,
            ..RankReport::default()
        };
        let changes = fixture.ranks.subscribe();
        fixture.ranks.adopt(vec![report.clone()]);
        assert!(changes.has_changed().unwrap());
        assert_eq!(fixture.ranks.reports(), std::slice::from_ref(&report));
        assert_eq!(fixture.ranks.running(), 0);
        fixture.ranks.acknowledge(&[report]);
        assert!(fixture.ranks.reports().is_empty());
    }

    #[test]
    fn a_rank_end_says_who_stopped_it_or_why_it_failed() {
        use std::os::unix::process::ExitStatusExt;
        let exited = |code: i32| Ok(ExitStatus::from_raw(code << 8));
        let killed = |signal: i32| Ok(ExitStatus::from_raw(signal));
        let stop = StopRequest {
            grace: Duration::ZERO,
            cause: StopCause::CoordinatorLost,
            detail: stop_detail(StopCause::CoordinatorLost).to_owned(),
        };
        assert_eq!(
            RankEnd::new(&killed(libc::SIGTERM), Some(&stop), "Terminated"),
            RankEnd {
                exit_code: None,
                signal: Some(libc::SIGTERM),
                stop_cause: StopCause::CoordinatorLost,
                detail: stop.detail.clone(),
            }
        );
        let failed = RankEnd::new(&exited(2), None, "Traceback: boom");
        assert_eq!(failed.exit_code, Some(2));
        assert_eq!(failed.stop_cause, StopCause::Unspecified);
        assert_eq!(failed.detail, "Traceback: boom");
        assert_eq!(RankEnd::new(&exited(0), None, "warning").detail, "");
        let long = "é".repeat(400);
        let cut = RankEnd::new(&killed(libc::SIGSEGV), None, &long);
        assert!(cut.detail.len() <= DETAIL_BYTES);
        assert!(cut.detail.contains("bytes cut"), "{}", cut.detail);
        let lost = RankEnd::new(&Err(std::io::Error::other("gone")), None, "");
        assert!(lost.detail.contains("gone"), "{}", lost.detail);
    }
}
