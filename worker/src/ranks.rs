//! The ranks this worker runs: starting them, watching them to the end, stopping them, and the
//! state reported to the coordinator.
//!
//! Each rank has one supervising task that owns its process: it forwards the output, waits for
//! the exit, kills whatever the rank left in its process group, ships the last lines, and only
//! then records the exit, so a reported exit always comes with a complete log.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_proto::env;
use cohort_proto::v1::{LogLine, LogStream, RankReport, RankState, StartRank};
use tokio::io::BufReader;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::logship::LogShipper;
use crate::process::{self, Launch};

/// Program name in a start instruction that stands for the worker's own `cohort` executable.
pub const COHORT_EXECUTABLE: &str = "@cohort";

/// Identifies a rank on this worker.
type RankKey = (String, u32);

/// What the worker knows of one rank.
struct RankEntry {
    /// Last state, as reported to the coordinator.
    report: RankReport,
    /// Asks the supervising task to stop the rank with this grace period.
    stop: watch::Sender<Option<Duration>>,
    /// Grace period from the start instruction.
    stop_grace: Duration,
}

/// Facts every rank's environment gets from the worker itself.
#[derive(Debug, Clone)]
pub struct RankContext {
    /// The coordinator's `host:port`, also the rendezvous address.
    pub coordinator: String,
    /// This node's id.
    pub node_id: String,
    /// This node's advertised address.
    pub node_address: String,
    /// The `cohort` executable.
    pub cohort_executable: PathBuf,
    /// Parent of every job's output directory.
    pub output_dir: PathBuf,
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
}

impl Ranks {
    /// Creates an empty table.
    pub fn new(shipper: LogShipper, context: RankContext) -> Self {
        Self {
            table: Arc::default(),
            changes: Arc::new(watch::Sender::new(0)),
            shipper,
            context: Arc::new(context),
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
            let ended = report.state == RankState::Exited as i32
                || report.state == RankState::StartFailed as i32;
            if ended {
                table.remove(&(report.job_id.clone(), report.rank));
            }
        }
    }

    /// Number of rank processes still alive.
    pub fn running(&self) -> usize {
        self.lock()
            .values()
            .filter(|e| e.report.state == RankState::Running as i32)
            .count()
    }

    /// Starts a rank unless it is already known (instructions may be repeated).
    pub fn start(&self, start: StartRank) {
        let key = (start.job_id.clone(), start.rank);
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

    /// Stops a rank: SIGTERM to its process group, SIGKILL after its grace period.
    pub fn stop(&self, job_id: &str, rank: u32, reason: &str) {
        let table = self.lock();
        if let Some(entry) = table.get(&(job_id.to_owned(), rank)) {
            info!(job_id, rank, reason, "stopping rank");
            entry.stop.send_replace(Some(entry.stop_grace));
        }
    }

    /// Stops every rank with at most `grace` between SIGTERM and SIGKILL, and waits until every
    /// rank process is gone.
    pub async fn stop_all(&self, grace: Duration) {
        let mut changes = self.subscribe();
        {
            let table = self.lock();
            for entry in table.values() {
                entry.stop.send_replace(Some(entry.stop_grace.min(grace)));
            }
        }
        while self.running() > 0 || self.starting() > 0 {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    fn starting(&self) -> usize {
        self.lock()
            .values()
            .filter(|e| e.report.state == RankState::Pending as i32)
            .count()
    }

    fn update(&self, key: &RankKey, update: impl FnOnce(&mut RankReport)) {
        if let Some(entry) = self.lock().get_mut(key) {
            update(&mut entry.report);
        }
        self.changes.send_modify(|version| *version += 1);
    }

    fn environment(&self, start: &StartRank) -> HashMap<String, String> {
        let mut environment: HashMap<String, String> = start.env.clone();
        let context = &self.context;
        for (name, value) in [
            (env::COORDINATOR_ADDR, context.coordinator.clone()),
            (env::RENDEZVOUS_ADDR, context.coordinator.clone()),
            (env::NODE_ID, context.node_id.clone()),
            (env::NODE_ADDR, context.node_address.clone()),
            (
                env::COHORT_BIN,
                context.cohort_executable.display().to_string(),
            ),
            (
                env::OUTPUT_DIR,
                context.output_dir.join(&start.job_id).display().to_string(),
            ),
        ] {
            environment.insert(name.to_owned(), value);
        }
        environment
    }

    /// Owns one rank process from start to reported end.
    async fn supervise(self, start: StartRank, mut stop: watch::Receiver<Option<Duration>>) {
        let key = (start.job_id.clone(), start.rank);
        let job_id = start.job_id.clone();
        let mut argv = start.argv.clone();
        if argv.first().map(String::as_str) == Some(COHORT_EXECUTABLE) {
            argv[0] = self.context.cohort_executable.display().to_string();
        }
        let environment = self.environment(&start);
        let working_dir = (!start.working_dir.is_empty()).then(|| Path::new(&start.working_dir));
        let spawned = process::spawn(&Launch {
            argv: &argv,
            env: &environment,
            working_dir,
        });
        let mut child = match spawned {
            Ok(child) => child,
            Err(error) => {
                warn!(%job_id, rank = start.rank, %error, "rank failed to start");
                self.shipper
                    .send(
                        &job_id,
                        LogLine {
                            rank: start.rank,
                            stream: LogStream::Stderr as i32,
                            text: format!("[cohort] {error}"),
                        },
                    )
                    .await;
                self.shipper.flush().await;
                self.update(&key, |report| {
                    report.state = RankState::StartFailed as i32;
                    report.detail = error.to_string();
                    report.exited_at_unix_ms = now_ms();
                });
                return;
            }
        };
        let pid = child.id().unwrap_or(0);
        info!(%job_id, rank = start.rank, pid, "rank started");
        self.update(&key, |report| {
            report.state = RankState::Running as i32;
            report.pid = pid;
        });

        let readers = [
            child.stdout.take().map(|out| {
                (
                    LogStream::Stdout,
                    Box::new(out) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                )
            }),
            child.stderr.take().map(|err| {
                (
                    LogStream::Stderr,
                    Box::new(err) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                )
            }),
        ];
        let forwarders: Vec<_> = readers
            .into_iter()
            .flatten()
            .map(|(stream, pipe)| {
                let shipper = self.shipper.clone();
                let job_id = job_id.clone();
                let rank = start.rank;
                tokio::spawn(async move {
                    let mut reader = BufReader::new(pipe);
                    let (mut bytes, mut text) = (Vec::new(), String::new());
                    while let Ok(true) =
                        process::read_bounded_line(&mut reader, &mut bytes, &mut text).await
                    {
                        let line = LogLine {
                            rank,
                            stream: stream as i32,
                            text: text.clone(),
                        };
                        shipper.send(&job_id, line).await;
                    }
                })
            })
            .collect();

        let mut kill_at: Option<tokio::time::Instant> = None;
        let status = loop {
            let kill_timer = async {
                match kill_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                status = child.wait() => break status,
                changed = stop.changed(), if kill_at.is_none() => {
                    let grace = match changed {
                        Ok(()) => (*stop.borrow_and_update()).unwrap_or_default(),
                        // The table dropped the rank: stop without grace.
                        Err(_) => Duration::ZERO,
                    };
                    process::signal_group(pid, libc::SIGTERM);
                    kill_at = Some(tokio::time::Instant::now() + grace);
                }
                () = kill_timer => {
                    warn!(%job_id, rank = start.rank, pid, "rank ignored SIGTERM; sending SIGKILL");
                    process::signal_group(pid, libc::SIGKILL);
                    kill_at = Some(tokio::time::Instant::now() + Duration::from_secs(3600));
                }
            }
        };
        // Whatever the rank left running in its group goes with it: no orphans, and the pipes
        // close so the forwarders reach end of input.
        process::signal_group(pid, libc::SIGKILL);
        for forwarder in forwarders {
            let _ = forwarder.await;
        }
        self.shipper.flush().await;
        let (exit_code, signal, detail) = match &status {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt;
                (status.code(), status.signal(), String::new())
            }
            Err(error) => (None, None, format!("waiting for the process: {error}")),
        };
        info!(%job_id, rank = start.rank, pid, ?exit_code, ?signal, "rank exited");
        self.update(&key, |report| {
            report.state = RankState::Exited as i32;
            report.exit_code = exit_code;
            report.signal = signal;
            report.detail = detail;
            report.exited_at_unix_ms = now_ms();
        });
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}
