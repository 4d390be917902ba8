//! Tables, durations and progress lines for humans.

use std::fmt::Write as _;
use std::io::IsTerminal;

use cohort_proto::v1::{DeviceKind, JobInfo, JobState, NodeInfo, RankInfo, RankState};

/// Lays out rows under a header with columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<width$}  ", width = widths[i]);
            }
        }
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// Lower-case state name.
pub fn job_state(state: JobState) -> &'static str {
    match state {
        JobState::Queued => "queued",
        JobState::Scheduled => "scheduled",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::Restarting => "restarting",
        JobState::Unspecified => "unknown",
    }
}

/// Whether the job has ended.
pub fn is_final(job: &JobInfo) -> bool {
    matches!(
        job.state(),
        JobState::Succeeded | JobState::Failed | JobState::Cancelled
    )
}

fn rank_state(rank: &RankInfo) -> String {
    match rank.state() {
        RankState::Pending => "pending".to_owned(),
        RankState::Running => "running".to_owned(),
        RankState::Exited => match (rank.exit_code, rank.signal) {
            (Some(code), _) => format!("exited {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            _ => "exited".to_owned(),
        },
        RankState::Lost => "lost".to_owned(),
        RankState::StartFailed => "start failed".to_owned(),
        RankState::Unspecified => "unknown".to_owned(),
    }
}

fn device_kind(kind: i32) -> &'static str {
    match DeviceKind::try_from(kind) {
        Ok(DeviceKind::Gpu) => "gpu",
        _ => "cpu",
    }
}

/// `1h02m`, `3m05s`, `4.2s`.
pub fn duration(millis: i64) -> String {
    let seconds = millis.max(0) as f64 / 1000.0;
    if seconds < 60.0 {
        format!("{seconds:.1}s")
    } else if seconds < 3600.0 {
        format!("{}m{:02}s", (seconds / 60.0) as u64, seconds as u64 % 60)
    } else {
        format!(
            "{}h{:02}m",
            (seconds / 3600.0) as u64,
            (seconds as u64 / 60) % 60
        )
    }
}

/// A Unix time in milliseconds as UTC, `2026-12-04 03:00:06Z`; `-` for none.
pub fn timestamp(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".to_owned();
    }
    let seconds = unix_ms / 1000;
    let (days, of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Days to a civil date (Howard Hinnant's algorithm, proleptic Gregorian calendar).
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// How long the job has run (or ran), or waited while queued.
fn elapsed(job: &JobInfo) -> String {
    let start = if job.started_at_unix_ms > 0 {
        job.started_at_unix_ms
    } else {
        job.submitted_at_unix_ms
    };
    let end = if job.finished_at_unix_ms > 0 {
        job.finished_at_unix_ms
    } else {
        now_ms()
    };
    duration(end - start)
}

/// The scheduler's queues, each followed by its users.
pub fn queues_table(queues: &cohort_proto::v1::ListQueuesResponse) -> String {
    let held = |cpu: u64, gpu: u64| match (cpu, gpu) {
        (0, 0) => "-".to_owned(),
        (cpu, 0) => format!("{cpu} cpu"),
        (0, gpu) => format!("{gpu} gpu"),
        (cpu, gpu) => format!("{cpu} cpu, {gpu} gpu"),
    };
    let mut rows = Vec::new();
    for queue in &queues.queues {
        rows.push(vec![
            if queue.configured {
                queue.name.clone()
            } else {
                format!("{} (not configured)", queue.name)
            },
            "".to_owned(),
            format!("{}", queue.weight),
            queue
                .quota
                .map_or("-".to_owned(), |quota| quota.to_string()),
            held(queue.held_cpu, queue.held_gpu),
            format!("{:.3}", queue.share),
            queue.running_jobs.to_string(),
            queue.queued_jobs.to_string(),
        ]);
        for user in &queue.users {
            rows.push(vec![
                "".to_owned(),
                user.user.clone(),
                "".to_owned(),
                queues
                    .user_quota
                    .map_or("-".to_owned(), |quota| quota.to_string()),
                held(user.held_cpu, user.held_gpu),
                format!("{:.3}", user.share),
                user.running_jobs.to_string(),
                user.queued_jobs.to_string(),
            ]);
        }
    }
    let mut out = format!(
        "cluster: {} (share: the largest fraction of the cluster's devices of a kind held, over \
         the queue's weight; a user's share counts every queue)\n",
        held(queues.cluster_cpu, queues.cluster_gpu)
    );
    out.push_str(&table(
        &[
            "QUEUE", "USER", "WEIGHT", "QUOTA", "HELD", "SHARE", "RUNNING", "WAITING",
        ],
        &rows,
    ));
    out
}

/// The job list.
pub fn jobs_table(jobs: &[JobInfo]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|job| {
            vec![
                job.job_id.clone(),
                job.kind.clone(),
                job_state(job.state()).to_owned(),
                format!(
                    "{}x{} {}",
                    job.ranks,
                    job.devices_per_rank,
                    device_kind(job.device_kind)
                ),
                job.priority.to_string(),
                elapsed(job),
                match (job.reason.is_empty(), job.waiting.is_empty()) {
                    (_, true) => job.reason.clone(),
                    (true, false) => job.waiting.clone(),
                    (false, false) => format!("{}; {}", job.reason, job.waiting),
                },
            ]
        })
        .collect();
    table(
        &[
            "JOB", "KIND", "STATE", "RANKS", "PRIORITY", "TIME", "REASON",
        ],
        &rows,
    )
}

/// One job in detail: state, reason, placement and per-rank state, latest metrics.
pub fn job_detail(job: &JobInfo) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "job:       {}", job.job_id);
    let _ = writeln!(out, "kind:      {}", job.kind);
    let _ = writeln!(out, "state:     {}", job_state(job.state()));
    if !job.reason.is_empty() {
        let _ = writeln!(out, "reason:    {}", job.reason);
    }
    if let Some(trial) = &job.trial {
        let _ = writeln!(
            out,
            "trial:     {} of sweep {}, rung {}",
            trial.trial, trial.sweep_id, trial.rung
        );
    }
    if !job.waiting.is_empty() {
        let _ = writeln!(out, "waiting:   {}", job.waiting);
    }
    for straggler in &job.stragglers {
        let _ = writeln!(
            out,
            "straggler: rank {} on node {} computes its steps {:.2}x as long as the other \
             ranks' median (since step {})",
            straggler.rank, straggler.node_id, straggler.slowdown, straggler.since_step
        );
    }
    // Parameter servers of a `comm = "ps"` job are placed after its training ranks.
    let training_ranks = cohort_jobspec::parse(&job.spec_toml)
        .map_or(job.ranks, |spec| spec.ranks())
        .min(job.ranks);
    let servers = job.ranks - training_ranks;
    let processes = if servers > 0 {
        format!("{training_ranks} ranks + {servers} parameter servers")
    } else {
        format!("{} ranks", job.ranks)
    };
    let _ = writeln!(
        out,
        "resources: {processes} x {} {} device(s), priority {}",
        job.devices_per_rank,
        device_kind(job.device_kind),
        job.priority
    );
    let _ = writeln!(out, "time:      {}", elapsed(job));
    if !job.submitter.is_empty() {
        let _ = writeln!(out, "submitter: {}", job.submitter);
    }
    if job.max_restarts > 0 || job.attempt > 0 {
        // The attempts before the current one (an ended job's list holds its last one too).
        let earlier = || job.attempts.iter().filter(|a| a.attempt < job.attempt);
        let planned = earlier().filter(|a| a.planned).count();
        let used = earlier().filter(|a| !a.planned).count();
        let preempted = earlier().filter(|a| !a.preempted_by.is_empty()).count();
        let moved = match (planned, preempted) {
            (0, _) => String::new(),
            (n, 0) => format!(", {n} planned: drains, growing back"),
            (n, p) => format!(", {n} planned, {p} of them preemptions"),
        };
        let _ = writeln!(
            out,
            "attempt:   {} ({used} of {} restarts after failures used{moved})",
            job.attempt + 1,
            job.max_restarts,
        );
    }
    if !job.attempts.is_empty() {
        out.push('\n');
        out.push_str(&attempts_table(job));
    }
    if !job.rank_info.is_empty() {
        let rows: Vec<Vec<String>> = job
            .rank_info
            .iter()
            .map(|rank| {
                let devices = rank
                    .devices
                    .iter()
                    .map(|d| format!("{}:{}", device_kind(d.kind), d.index))
                    .collect::<Vec<_>>()
                    .join(",");
                let label = match rank.rank.checked_sub(training_ranks) {
                    None => rank.rank.to_string(),
                    Some(shard) => format!("{} (ps shard {shard})", rank.rank),
                };
                vec![
                    label,
                    rank.node_id.clone(),
                    devices,
                    rank_state(rank),
                    if rank.pid > 0 {
                        rank.pid.to_string()
                    } else {
                        "-".to_owned()
                    },
                    rank.detail.clone(),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &["RANK", "NODE", "DEVICES", "STATE", "PID", "DETAIL"],
            &rows,
        ));
    }
    if !job.metrics.is_empty() {
        let rows: Vec<Vec<String>> = job
            .metrics
            .iter()
            .map(|m| {
                vec![
                    m.rank.to_string(),
                    m.epoch.to_string(),
                    format!("{}/{}", m.step, m.total_steps),
                    format!("{:.4}", m.loss),
                    format!("{:.0}", m.samples_per_s),
                    m.eval_loss.map_or("-".to_owned(), |l| format!("{l:.4}")),
                    m.eval_accuracy
                        .map_or("-".to_owned(), |a| format!("{:.2}%", a * 100.0)),
                    m.extra
                        .iter()
                        .collect::<std::collections::BTreeMap<_, _>>()
                        .into_iter()
                        .map(|(name, value)| format!("{name}={}", figure(*value)))
                        .collect::<Vec<_>>()
                        .join(" "),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &[
                "RANK",
                "EPOCH",
                "STEP",
                "LOSS",
                "SAMPLES/S",
                "EVAL LOSS",
                "EVAL ACC",
                "EXTRA",
            ],
            &rows,
        ));
    }
    out
}

/// Every ended attempt of a job: its number, nodes, start, length and why it ended.
fn attempts_table(job: &JobInfo) -> String {
    let rows: Vec<Vec<String>> = job
        .attempts
        .iter()
        .map(|attempt| {
            let nodes = if attempt.nodes.is_empty() {
                "-".to_owned()
            } else {
                attempt.nodes.join(",")
            };
            let (started, ran) = if attempt.started_at_unix_ms > 0 {
                (
                    timestamp(attempt.started_at_unix_ms),
                    duration(attempt.ended_at_unix_ms - attempt.started_at_unix_ms),
                )
            } else {
                ("never fully".to_owned(), "-".to_owned())
            };
            let reason = match (attempt.reason.is_empty(), attempt.planned) {
                (true, _) => "succeeded".to_owned(),
                (false, true) => format!("{} (planned: no restart used)", attempt.reason),
                (false, false) => attempt.reason.clone(),
            };
            vec![
                (attempt.attempt + 1).to_string(),
                nodes,
                started,
                ran,
                reason,
            ]
        })
        .collect();
    table(
        &["ATTEMPT", "NODES", "STARTED", "RAN", "ENDED BECAUSE"],
        &rows,
    )
}

/// A figure with at most four decimals, in scientific notation when very small or very large.
fn figure(value: f64) -> String {
    let magnitude = value.abs();
    if value == 0.0 || (1e-3..1e6).contains(&magnitude) {
        format!("{:.4}", value)
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned()
    } else {
        format!("{value:.3e}")
    }
}

/// The node list.
pub fn nodes_table(nodes: &[NodeInfo]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|node| {
            let count = |kind: DeviceKind| {
                node.devices
                    .iter()
                    .filter(|d| d.kind == kind as i32)
                    .count()
            };
            let busy = |kind: DeviceKind| {
                node.busy_devices
                    .iter()
                    .filter(|d| d.kind == kind as i32)
                    .count()
            };
            let gpus = count(DeviceKind::Gpu);
            let gpu_names = node
                .devices
                .iter()
                .filter(|d| d.kind == DeviceKind::Gpu as i32)
                .map(|d| d.name.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
                .join(",");
            vec![
                node.node_id.clone(),
                if node.draining {
                    format!("{} (draining)", node.status)
                } else {
                    node.status.clone()
                },
                node.address.clone(),
                format!("{}/{}", busy(DeviceKind::Cpu), count(DeviceKind::Cpu)),
                if gpus == 0 {
                    "-".to_owned()
                } else {
                    format!("{}/{} {gpu_names}", busy(DeviceKind::Gpu), gpus)
                },
                node.running_ranks.to_string(),
                format!("{:.1}", node.straggler_score),
            ]
        })
        .collect();
    let mut text = table(
        &[
            "NODE",
            "STATUS",
            "ADDRESS",
            "CPU BUSY",
            "GPU BUSY",
            "RANKS",
            "STRAGGLER SCORE",
        ],
        &rows,
    );
    let gpus: Vec<Vec<String>> = nodes
        .iter()
        .flat_map(|node| {
            node.devices
                .iter()
                .filter(|device| device.kind == DeviceKind::Gpu as i32)
                .map(|device| gpu_row(node, device))
        })
        .collect();
    if !gpus.is_empty() {
        text.push('\n');
        text.push_str(&table(
            &[
                "NODE",
                "GPU",
                "NAME",
                "FREE/TOTAL GIB",
                "CC",
                "PCI BUS",
                "PEERS",
            ],
            &gpus,
        ));
    }
    text
}

/// One GPU's line in the node list: memory, compute capability, bus, and its direct paths to
/// the node's other GPUs (`1:p2p+atomics` is typically NVLink, `1:p2p` PCIe, `1:-` staged
/// through the host; `/rank` is the driver's relative performance rank when not 0).
fn gpu_row(node: &NodeInfo, device: &cohort_proto::v1::Device) -> Vec<String> {
    const GIB: f64 = (1u64 << 30) as f64;
    let peers: Vec<String> = device
        .peers
        .iter()
        .map(|peer| {
            let path = match (peer.access, peer.native_atomics) {
                (false, _) => "-",
                (true, false) => "p2p",
                (true, true) => "p2p+atomics",
            };
            match peer.performance_rank {
                0 => format!("{}:{path}", peer.index),
                rank => format!("{}:{path}/{rank}", peer.index),
            }
        })
        .collect();
    vec![
        node.node_id.clone(),
        device.index.to_string(),
        device.name.clone(),
        format!(
            "{:.1}/{:.1}",
            device.memory_free_bytes as f64 / GIB,
            device.memory_total_bytes as f64 / GIB
        ),
        device.compute_capability.clone(),
        device.pci_bus_id.clone(),
        if peers.is_empty() {
            "-".to_owned()
        } else {
            peers.join(" ")
        },
    ]
}

/// Renders progress of a job being watched: a state line on every state change, and for
/// training jobs a progress line (step, epoch, loss, throughput, ETA), redrawn in place on a
/// terminal.
pub struct Progress {
    /// Last state printed.
    last_state: Option<JobState>,
    /// Whether stderr is a terminal (redraw in place) or a file (one line per update).
    terminal: bool,
    /// Last progress line printed, to avoid repeating it.
    last_line: String,
    /// When the last progress line went to a non-terminal, to print one every few seconds.
    last_printed: Option<std::time::Instant>,
    /// Evaluation accuracy last printed, so that every evaluation gets a line.
    last_accuracy: Option<f64>,
}

/// Least time between two progress lines when stderr is not a terminal.
const FILE_PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

impl Progress {
    /// A progress renderer writing to stderr.
    pub fn new() -> Self {
        Self {
            last_state: None,
            terminal: std::io::stderr().is_terminal(),
            last_line: String::new(),
            last_printed: None,
            last_accuracy: None,
        }
    }

    /// Shows one job snapshot.
    pub fn show(&mut self, job: &JobInfo) {
        let state = job.state();
        if self.last_state != Some(state) {
            if self.terminal && !self.last_line.is_empty() {
                eprintln!();
            }
            let mut line = format!("{}: {}", job.job_id, job_state(state));
            if !job.reason.is_empty() {
                let _ = write!(line, " ({})", job.reason);
            }
            eprintln!("{line}");
            self.last_state = Some(state);
            self.last_line.clear();
        }
        let Some(line) = progress_line(job) else {
            return;
        };
        if line == self.last_line {
            return;
        }
        if self.terminal {
            eprint!("\r\x1b[2K{line}");
        } else {
            // A log file gets a line every few seconds, on every evaluation, and at the end.
            let accuracy = job
                .metrics
                .iter()
                .find(|m| m.rank == 0)
                .and_then(|m| m.eval_accuracy);
            let due = self
                .last_printed
                .is_none_or(|at| at.elapsed() >= FILE_PROGRESS_INTERVAL);
            if !(due || accuracy != self.last_accuracy || is_final(job)) {
                return;
            }
            eprintln!("{line}");
            self.last_printed = Some(std::time::Instant::now());
            self.last_accuracy = accuracy;
        }
        self.last_line = line;
    }

    /// Ends the in-place line, if any.
    pub fn finish(&mut self) {
        if self.terminal && !self.last_line.is_empty() {
            eprintln!();
        }
    }
}

/// The progress bar line of a training job, from rank 0's latest metrics.
fn progress_line(job: &JobInfo) -> Option<String> {
    let metrics = job.metrics.iter().find(|m| m.rank == 0)?;
    let mut line = String::new();
    if metrics.total_steps > 0 {
        let fraction = (metrics.step as f64 / metrics.total_steps as f64).clamp(0.0, 1.0);
        let filled = (fraction * 24.0).round() as usize;
        let _ = write!(
            line,
            "[{}{}] {:>3.0}% ",
            "#".repeat(filled),
            ".".repeat(24 - filled),
            fraction * 100.0
        );
    }
    let _ = write!(
        line,
        "step {}/{} epoch {} loss {:.4} {:.0} samples/s",
        metrics.step, metrics.total_steps, metrics.epoch, metrics.loss, metrics.samples_per_s
    );
    if let Some(accuracy) = metrics.eval_accuracy {
        let _ = write!(line, " eval acc {:.2}%", accuracy * 100.0);
    }
    if metrics.total_steps > metrics.step && job.started_at_unix_ms > 0 && metrics.step > 0 {
        let spent = (metrics.reported_at_unix_ms - job.started_at_unix_ms).max(0) as f64;
        let remaining = spent / metrics.step as f64 * (metrics.total_steps - metrics.step) as f64;
        let _ = write!(line, " eta {}", duration(remaining as i64));
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_match_gnu_date() {
        // References: `date -u -d @1796353206` and `date -u -d @951782400`.
        assert_eq!(timestamp(1_796_353_206_087), "2026-12-04 03:00:06Z");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29 00:00:00Z");
        assert_eq!(timestamp(0), "-");
    }

    #[test]
    fn table_pads_columns() {
        let text = table(
            &["A", "B"],
            &[
                vec!["long cell".into(), "x".into()],
                vec!["s".into(), "y".into()],
            ],
        );
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines[0], "A          B");
        assert_eq!(lines[1], "long cell  x");
        assert_eq!(lines[2], "s          y");
    }

    #[test]
    fn figures_keep_at_most_four_decimals() {
        assert_eq!(figure(0.031354235), "0.0314");
        assert_eq!(figure(3.933991521765101e-9), "3.934e-9");
        assert_eq!(figure(2.0), "2");
        assert_eq!(figure(0.0), "0");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(4_200), "4.2s");
        assert_eq!(duration(185_000), "3m05s");
        assert_eq!(duration(3_720_000), "1h02m");
        assert_eq!(duration(-5), "0.0s");
    }

    #[test]
    fn parameter_servers_are_labelled_by_shard() {
        let spec = "version = 1\nkind = \"train\"\n[parallel]\ndata = 2\ncomm = \"ps\"\n\
                    ps_shards = 1\n";
        let job = JobInfo {
            job_id: "ps-1".to_owned(),
            spec_toml: spec.to_owned(),
            ranks: 3,
            rank_info: (0..3)
                .map(|rank| cohort_proto::v1::RankInfo {
                    rank,
                    node_id: "n".to_owned(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let text = job_detail(&job);
        assert!(
            text.contains("resources: 2 ranks + 1 parameter servers x"),
            "{text}"
        );
        assert!(text.contains("\n2 (ps shard 0)  n"), "{text}");
        assert!(text.contains("\n1               n"), "{text}");
    }

    #[test]
    fn gpu_nodes_list_each_gpu_with_its_peer_paths() {
        use cohort_proto::v1::{Device, GpuPeer};
        let gpu = |index: u32, peer: GpuPeer| Device {
            kind: DeviceKind::Gpu as i32,
            index,
            name: "NVIDIA H100 80GB HBM3".to_owned(),
            memory_total_bytes: 80 << 30,
            memory_free_bytes: 79 << 30,
            compute_capability: "9.0".to_owned(),
            pci_bus_id: format!("0000:{:02x}:00.0", 0x19 + index),
            peers: vec![peer],
        };
        let node = NodeInfo {
            node_id: "gpu-node".to_owned(),
            devices: vec![
                gpu(
                    0,
                    GpuPeer {
                        index: 1,
                        access: true,
                        native_atomics: true,
                        performance_rank: 0,
                    },
                ),
                gpu(
                    1,
                    GpuPeer {
                        index: 0,
                        access: true,
                        native_atomics: false,
                        performance_rank: 2,
                    },
                ),
            ],
            ..Default::default()
        };
        let text = nodes_table(&[node]);
        let gpu_lines: Vec<&str> = text.lines().filter(|l| l.contains("0000:")).collect();
        assert_eq!(gpu_lines.len(), 2, "{text}");
        assert!(
            gpu_lines[0].contains("79.0/80.0") && gpu_lines[0].contains("9.0"),
            "{text}"
        );
        assert!(gpu_lines[0].ends_with("1:p2p+atomics"), "{text}");
        assert!(gpu_lines[1].ends_with("0:p2p/2"), "{text}");
        assert!(text.contains("0000:1a:00.0"), "{text}");
        assert!(!nodes_table(&[NodeInfo::default()]).contains("PEERS"));
    }
}
