//! Conversions between the coordinator's records and protocol messages. Decoding checks every
//! field of a request against [`crate::limits`] and produces domain values before anything is
//! changed, so a request is refused whole or applied whole; free text is cut with a marker
//! rather than refused. Encoding cannot fail.

use std::collections::HashSet;

use cohort_jobspec::{DeviceKind, JobKind};
use cohort_proto::text::{excerpt, truncate};
use cohort_proto::{JobId, NodeId, v1};

use crate::auth::records::{AuditEntry, UserRecord};
use crate::error::{Error, Result};
use crate::limits::{
    MAX_DETAIL_BYTES, MAX_DEVICES_PER_NODE, MAX_EXTRA_METRICS, MAX_GPU_PEERS,
    MAX_METRIC_NAME_BYTES, MAX_NAME_BYTES, MAX_RANK_REPORTS,
};
use crate::model::{
    AttemptRecord, DeviceRecord, GpuPeerRecord, JobRecord, JobSummary, MetricsRecord, NodeRecord,
    RankRecord, RankState, StopCause, UnixMillis, now_ms,
};

/// One rank's state as a worker reported it, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct RankReport {
    /// The rank's job.
    pub job_id: JobId,
    /// The rank (or parameter-server process) index.
    pub rank: u32,
    /// Its state.
    pub state: RankState,
    /// Its process id.
    pub pid: u32,
    /// Exit code, when it exited normally.
    pub exit_code: Option<i32>,
    /// Signal, when a signal ended it.
    pub signal: Option<i32>,
    /// When the worker saw it end.
    pub exited_at_ms: Option<UnixMillis>,
    /// Detail, cut to [`MAX_DETAIL_BYTES`].
    pub detail: String,
    /// Whether Cohort stopped it, and why.
    pub stop_cause: StopCause,
    /// The job attempt the process belongs to.
    pub attempt: u32,
}

/// A checked registration: the node as it registers, and its ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// The node record to store.
    pub node: NodeRecord,
    /// Every rank the worker knows of.
    pub ranks: Vec<RankReport>,
}

/// Checks a name-like field (hostname, address, device name) against [`MAX_NAME_BYTES`].
fn check_name(field: &str, value: &str) -> Result<()> {
    if value.len() > MAX_NAME_BYTES {
        return Err(Error::InvalidArgument(format!(
            "{field} of {} bytes, expected at most {MAX_NAME_BYTES}",
            value.len()
        )));
    }
    Ok(())
}

/// Decodes a registration completely: the node id, its names, its devices, its rank reports.
pub fn registration(request: &v1::RegisterRequest) -> Result<Registration> {
    let node_id = NodeId::new(request.node_id.clone())?;
    check_name("hostname", &request.hostname)?;
    check_name("address", &request.address)?;
    if request.devices.len() > MAX_DEVICES_PER_NODE {
        return Err(Error::InvalidArgument(format!(
            "{} devices, expected at most {MAX_DEVICES_PER_NODE}",
            request.devices.len()
        )));
    }
    let devices = device_records(&request.devices)?;
    Ok(Registration {
        node: NodeRecord {
            id: node_id,
            hostname: request.hostname.clone(),
            address: request.address.clone(),
            devices,
            registered_at_ms: now_ms(),
            draining: false,
        },
        ranks: rank_reports(&request.ranks)?,
    })
}

/// Decodes a worker's rank reports completely: bounded in number, valid job ids, known states,
/// no rank reported twice; details cut to [`MAX_DETAIL_BYTES`].
pub fn rank_reports(reports: &[v1::RankReport]) -> Result<Vec<RankReport>> {
    if reports.len() > MAX_RANK_REPORTS {
        return Err(Error::InvalidArgument(format!(
            "{} rank reports, expected at most {MAX_RANK_REPORTS}",
            reports.len()
        )));
    }
    let mut seen = HashSet::with_capacity(reports.len());
    let mut checked = Vec::with_capacity(reports.len());
    for (index, report) in reports.iter().enumerate() {
        let job_id = JobId::new(report.job_id.clone())
            .map_err(|error| Error::InvalidArgument(format!("ranks[{index}].job_id: {error}")))?;
        if !seen.insert((job_id.clone(), report.rank)) {
            return Err(Error::InvalidArgument(format!(
                "ranks[{index}]: rank {} of job {job_id} reported twice",
                report.rank
            )));
        }
        let state = match v1::RankState::try_from(report.state) {
            Ok(v1::RankState::Unspecified) | Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "ranks[{index}].state = {}, expected pending, running, exited, lost or start_failed",
                    report.state
                )));
            }
            Ok(state) => rank_state(state),
        };
        let stop_cause = match v1::StopCause::try_from(report.stop_cause) {
            Ok(cause) => stop_cause(cause),
            Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "ranks[{index}].stop_cause = {}, not a known stop cause",
                    report.stop_cause
                )));
            }
        };
        checked.push(RankReport {
            job_id,
            rank: report.rank,
            state,
            pid: report.pid,
            exit_code: report.exit_code,
            signal: report.signal,
            exited_at_ms: (report.exited_at_unix_ms > 0).then_some(report.exited_at_unix_ms),
            detail: truncate(&report.detail, MAX_DETAIL_BYTES).into_owned(),
            stop_cause,
            attempt: report.attempt,
        });
    }
    Ok(checked)
}

fn stop_cause(cause: v1::StopCause) -> StopCause {
    match cause {
        v1::StopCause::Unspecified => StopCause::None,
        v1::StopCause::Instructed => StopCause::Instructed,
        v1::StopCause::WorkerShutdown => StopCause::WorkerShutdown,
        v1::StopCause::CoordinatorLost => StopCause::CoordinatorLost,
        v1::StopCause::WorkerRestarted => StopCause::WorkerRestarted,
    }
}

fn stop_cause_to_proto(cause: StopCause) -> v1::StopCause {
    match cause {
        StopCause::None => v1::StopCause::Unspecified,
        StopCause::Instructed => v1::StopCause::Instructed,
        StopCause::WorkerShutdown => v1::StopCause::WorkerShutdown,
        StopCause::CoordinatorLost => v1::StopCause::CoordinatorLost,
        StopCause::WorkerRestarted => v1::StopCause::WorkerRestarted,
    }
}

/// The spec's job kind as shown to users.
pub fn kind_name(kind: JobKind) -> &'static str {
    match kind {
        JobKind::Command => "command",
        JobKind::Train => "train",
    }
}

/// The device kind as used in `COHORT_DEVICES` and the CLI (`cpu`, `gpu`).
pub fn device_kind_name(kind: DeviceKind) -> &'static str {
    match kind {
        DeviceKind::Cpu => "cpu",
        DeviceKind::Gpu => "gpu",
    }
}

/// The protocol's device kind.
pub fn device_kind_to_proto(kind: DeviceKind) -> v1::DeviceKind {
    match kind {
        DeviceKind::Cpu => v1::DeviceKind::Cpu,
        DeviceKind::Gpu => v1::DeviceKind::Gpu,
    }
}

fn device_kind_from_proto(kind: i32) -> Result<DeviceKind> {
    match v1::DeviceKind::try_from(kind) {
        Ok(v1::DeviceKind::Cpu) => Ok(DeviceKind::Cpu),
        Ok(v1::DeviceKind::Gpu) => Ok(DeviceKind::Gpu),
        _ => Err(Error::InvalidArgument(format!(
            "device kind {kind}, expected cpu or gpu"
        ))),
    }
}

/// The coordinator's view of a reported rank state.
pub fn rank_state(state: v1::RankState) -> RankState {
    match state {
        v1::RankState::Running => RankState::Running,
        v1::RankState::Exited => RankState::Exited,
        v1::RankState::Lost => RankState::Lost,
        v1::RankState::StartFailed => RankState::StartFailed,
        v1::RankState::Pending | v1::RankState::Unspecified => RankState::Pending,
    }
}

fn rank_state_to_proto(state: RankState) -> v1::RankState {
    match state {
        RankState::Pending => v1::RankState::Pending,
        RankState::Running => v1::RankState::Running,
        RankState::Exited => v1::RankState::Exited,
        RankState::Lost => v1::RankState::Lost,
        RankState::StartFailed => v1::RankState::StartFailed,
    }
}

/// Decodes and checks a node's devices: known kinds, no index registered twice.
pub fn device_records(devices: &[v1::Device]) -> Result<Vec<DeviceRecord>> {
    let mut records: Vec<DeviceRecord> = Vec::with_capacity(devices.len());
    for device in devices {
        let kind = device_kind_from_proto(device.kind)?;
        for (name, value) in [
            ("device name", &device.name),
            ("compute capability", &device.compute_capability),
            ("pci bus id", &device.pci_bus_id),
        ] {
            check_name(name, value)?;
        }
        if records
            .iter()
            .any(|r| r.kind == kind && r.index == device.index)
        {
            return Err(Error::InvalidArgument(format!(
                "device {}:{} registered twice",
                device_kind_name(kind),
                device.index
            )));
        }
        records.push(DeviceRecord {
            kind,
            index: device.index,
            name: device.name.clone(),
            memory_total_bytes: device.memory_total_bytes,
            memory_free_bytes: device.memory_free_bytes,
            compute_capability: device.compute_capability.clone(),
            pci_bus_id: device.pci_bus_id.clone(),
            peers: gpu_peer_records(kind, device)?,
        });
    }
    for record in &records {
        if let Some(peer) = record.peers.iter().find(|peer| {
            !records
                .iter()
                .any(|other| other.kind == DeviceKind::Gpu && other.index == peer.index)
        }) {
            return Err(Error::InvalidArgument(format!(
                "gpu:{} reports a peer path to gpu:{}, which the node does not offer",
                record.index, peer.index
            )));
        }
    }
    Ok(records)
}

/// Decodes and checks a GPU's peer paths: bounded, none to itself, none twice, none on a CPU
/// slot.
fn gpu_peer_records(kind: DeviceKind, device: &v1::Device) -> Result<Vec<GpuPeerRecord>> {
    let name = format!("{}:{}", device_kind_name(kind), device.index);
    if kind != DeviceKind::Gpu && !device.peers.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{name} reports GPU peer paths, expected none for a CPU slot"
        )));
    }
    if device.peers.len() > MAX_GPU_PEERS {
        return Err(Error::InvalidArgument(format!(
            "{name} reports {} peer paths, expected at most {MAX_GPU_PEERS}",
            device.peers.len()
        )));
    }
    let mut records: Vec<GpuPeerRecord> = Vec::with_capacity(device.peers.len());
    for peer in &device.peers {
        if peer.index == device.index || records.iter().any(|r| r.index == peer.index) {
            return Err(Error::InvalidArgument(format!(
                "{name} reports a peer path to gpu:{} {}",
                peer.index,
                if peer.index == device.index {
                    "(itself)"
                } else {
                    "twice"
                }
            )));
        }
        records.push(GpuPeerRecord {
            index: peer.index,
            access: peer.access,
            native_atomics: peer.native_atomics,
            performance_rank: peer.performance_rank,
        });
    }
    Ok(records)
}

/// A straggler of `record`'s job on the wire, with its node.
pub fn straggler_info(
    record: &JobRecord,
    straggler: &crate::stragglers::Straggler,
) -> v1::StragglerInfo {
    v1::StragglerInfo {
        rank: straggler.rank,
        node_id: record
            .placement
            .get(straggler.rank as usize)
            .map(|placed| placed.node_id.to_string())
            .unwrap_or_default(),
        slowdown: straggler.slowdown,
        since_step: straggler.since_step,
    }
}

/// A job's metric curves on the wire.
pub fn job_metrics_response(curves: &crate::model::MetricHistory) -> v1::JobMetricsResponse {
    v1::JobMetricsResponse {
        ranks: curves
            .ranks
            .iter()
            .map(|(&rank, points)| v1::RankCurve {
                rank,
                points: points
                    .iter()
                    .map(|point| v1::MetricPoint {
                        step: point.step,
                        epoch: point.epoch,
                        loss: point.loss,
                        samples_per_s: point.samples_per_s,
                        eval_loss: point.eval_loss,
                        eval_accuracy: point.eval_accuracy,
                        reported_at_unix_ms: point.at_ms,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// A job's latest metrics, one entry per reporting rank.
pub fn rank_metrics(record: &JobRecord) -> Vec<v1::RankMetrics> {
    record
        .metrics
        .iter()
        .map(|(&rank, m)| v1::RankMetrics {
            rank,
            step: m.step,
            total_steps: m.total_steps,
            epoch: m.epoch,
            loss: m.loss,
            samples_per_s: m.samples_per_s,
            eval_loss: m.eval_loss,
            eval_accuracy: m.eval_accuracy,
            extra: m.extra.clone().into_iter().collect(),
            reported_at_unix_ms: m.reported_at_ms,
            // Progress and step times are for hang and straggler diagnosis, which name what
            // matters.
            collectives: Vec::new(),
            step_compute_s: Vec::new(),
            first_timed_step: 0,
            // Checkpoints are listed by ListCheckpoints, an early stop is the job's reason.
            checkpoints: Vec::new(),
            deleted_checkpoint_steps: Vec::new(),
            early_stop: None,
        })
        .collect()
}

/// Checks and converts a rank's step times (straggler detection).
pub fn step_times(metrics: &v1::RankMetrics) -> Result<crate::stragglers::StepTimes> {
    use crate::stragglers::MAX_REPORTED_STEPS;
    if metrics.step_compute_s.len() > MAX_REPORTED_STEPS {
        return Err(Error::InvalidArgument(format!(
            "step_compute_s: {} values, expected at most {MAX_REPORTED_STEPS}",
            metrics.step_compute_s.len()
        )));
    }
    Ok(crate::stragglers::StepTimes {
        first_step: metrics.first_timed_step,
        seconds: metrics.step_compute_s.clone(),
    })
}

/// What a rank's report says of its checkpoints and of an early stop.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckpointReport {
    /// Checkpoints it wrote since its last report (attempt 0 until the cluster sets it).
    pub written: Vec<crate::model::CheckpointVersion>,
    /// Steps of checkpoints its retention deleted.
    pub deleted: Vec<u64>,
    /// Why the run stopped early, as the job's reason says it.
    pub early_stop: Option<String>,
}

/// Checks and converts a rank's report of its checkpoints and early stop: bounded counts and
/// paths, finite metrics.
pub fn checkpoint_report(metrics: &v1::RankMetrics) -> Result<CheckpointReport> {
    use crate::limits::MAX_CHECKPOINTS_PER_REPORT;
    use cohort_jobspec::job::MAX_STRING_LEN;
    for (field, count) in [
        ("checkpoints", metrics.checkpoints.len()),
        (
            "deleted_checkpoint_steps",
            metrics.deleted_checkpoint_steps.len(),
        ),
    ] {
        if count > MAX_CHECKPOINTS_PER_REPORT {
            return Err(Error::InvalidArgument(format!(
                "{field}: {count} entries, expected at most {MAX_CHECKPOINTS_PER_REPORT}"
            )));
        }
    }
    let now = crate::model::now_ms();
    let written = metrics
        .checkpoints
        .iter()
        .map(|checkpoint| {
            if checkpoint.path.is_empty() || checkpoint.path.len() > MAX_STRING_LEN {
                return Err(Error::InvalidArgument(format!(
                    "checkpoints.path: {} bytes, expected 1 to {MAX_STRING_LEN}",
                    checkpoint.path.len()
                )));
            }
            for (field, value) in [
                ("eval_loss", checkpoint.eval_loss),
                ("eval_accuracy", checkpoint.eval_accuracy),
            ] {
                if value.is_some_and(|value| value.is_nan()) {
                    return Err(Error::InvalidArgument(format!(
                        "checkpoints.{field}: NaN, expected a number"
                    )));
                }
            }
            Ok(crate::model::CheckpointVersion {
                step: checkpoint.step,
                epoch: checkpoint.epoch,
                attempt: 0,
                path: checkpoint.path.clone(),
                bytes: checkpoint.bytes,
                eval_loss: checkpoint.eval_loss,
                eval_accuracy: checkpoint.eval_accuracy,
                written_at_ms: now,
                deleted: false,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let early_stop = match &metrics.early_stop {
        None => None,
        Some(stop) => {
            let metric = match stop.metric.as_str() {
                "eval_loss" | "eval_accuracy" => stop.metric.as_str(),
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "early_stop.metric: {}, expected eval_loss or eval_accuracy",
                        excerpt(other)
                    )));
                }
            };
            Some(format!(
                "early stopped at step {}: {metric} did not improve on {:.4} (step {}) for {} \
                 evaluations",
                stop.step, stop.best_value, stop.best_step, stop.patience
            ))
        }
    };
    Ok(CheckpointReport {
        written,
        deleted: metrics.deleted_checkpoint_steps.clone(),
        early_stop,
    })
}

/// The protocol's view of a job's checkpoint versions, the best one by `objective` marked.
pub fn checkpoint_infos(
    versions: &[crate::model::CheckpointVersion],
    objective: cohort_jobspec::objective::Objective,
) -> Vec<v1::CheckpointInfo> {
    let best = crate::checkpoints::best(versions, objective);
    versions
        .iter()
        .enumerate()
        .map(|(index, version)| v1::CheckpointInfo {
            step: version.step,
            epoch: version.epoch,
            attempt: version.attempt,
            path: version.path.clone(),
            bytes: version.bytes,
            eval_loss: version.eval_loss,
            eval_accuracy: version.eval_accuracy,
            written_at_unix_ms: version.written_at_ms,
            state: if version.deleted {
                "deleted"
            } else {
                "complete"
            }
            .to_owned(),
            best: best == Some(index),
        })
        .collect()
}

/// Checks and converts a rank's report of its communicators.
pub fn collective_progress(
    progress: &[v1::CollectiveProgress],
) -> Result<Vec<crate::hangs::ChannelState>> {
    use crate::hangs::{MAX_CHANNEL_NAME_BYTES, MAX_CHANNELS};
    if progress.len() > MAX_CHANNELS {
        return Err(Error::InvalidArgument(format!(
            "{} collectives, expected at most {MAX_CHANNELS}",
            progress.len()
        )));
    }
    progress
        .iter()
        .map(|channel| {
            for (field, text) in [
                ("collectives.channel", &channel.channel),
                ("collectives.operation", &channel.operation),
            ] {
                if text.len() > MAX_CHANNEL_NAME_BYTES {
                    return Err(Error::InvalidArgument(format!(
                        "{field} {}, expected at most {MAX_CHANNEL_NAME_BYTES} bytes",
                        excerpt(text)
                    )));
                }
            }
            if channel.completed > channel.entered {
                return Err(Error::InvalidArgument(format!(
                    "collectives.completed = {}, expected at most entered = {}",
                    channel.completed, channel.entered
                )));
            }
            Ok(crate::hangs::ChannelState {
                channel: channel.channel.clone(),
                entered: channel.entered,
                completed: channel.completed,
                operation: channel.operation.clone(),
                bytes: channel.bytes,
                peer: channel.peer,
                since_ms: channel.since_unix_ms,
            })
        })
        .collect()
}

/// Decodes and checks a metrics report.
pub fn metrics_record(metrics: &v1::RankMetrics) -> Result<MetricsRecord> {
    if metrics.extra.len() > MAX_EXTRA_METRICS {
        return Err(Error::InvalidArgument(format!(
            "{} extra metrics, expected at most {MAX_EXTRA_METRICS}",
            metrics.extra.len()
        )));
    }
    if let Some(name) = metrics
        .extra
        .keys()
        .find(|name| name.is_empty() || name.len() > MAX_METRIC_NAME_BYTES)
    {
        return Err(Error::InvalidArgument(format!(
            "metric name {}, expected 1 to {MAX_METRIC_NAME_BYTES} bytes",
            excerpt(name)
        )));
    }
    Ok(MetricsRecord {
        step: metrics.step,
        total_steps: metrics.total_steps,
        epoch: metrics.epoch,
        loss: metrics.loss,
        samples_per_s: metrics.samples_per_s,
        eval_loss: metrics.eval_loss,
        eval_accuracy: metrics.eval_accuracy,
        extra: metrics.extra.clone().into_iter().collect(),
        reported_at_ms: crate::model::now_ms(),
    })
}

fn rank_info(record: &JobRecord, rank: &RankRecord) -> v1::RankInfo {
    v1::RankInfo {
        rank: rank.rank,
        node_id: rank.node_id.to_string(),
        local_rank: rank.local_rank,
        devices: rank
            .devices
            .iter()
            .map(|&index| v1::DeviceRef {
                kind: device_kind_to_proto(record.device_kind) as i32,
                index,
            })
            .collect(),
        state: rank_state_to_proto(rank.state) as i32,
        pid: rank.pid,
        exit_code: rank.exit_code,
        signal: rank.signal,
        exited_at_unix_ms: rank.exited_at_ms.unwrap_or(0),
        detail: rank.detail.clone(),
        stop_cause: stop_cause_to_proto(rank.stop_cause) as i32,
    }
}

/// The protocol's view of a job.
pub fn job_info(record: &JobRecord) -> v1::JobInfo {
    v1::JobInfo {
        job_id: record.id.to_string(),
        name: record.name.clone(),
        state: record.state.to_proto() as i32,
        reason: record.reason.clone(),
        priority: record.priority,
        ranks: record.ranks,
        devices_per_rank: record.devices_per_rank,
        device_kind: device_kind_to_proto(record.device_kind) as i32,
        submitted_at_unix_ms: record.submitted_at_ms,
        scheduled_at_unix_ms: record.scheduled_at_ms.unwrap_or(0),
        started_at_unix_ms: record.started_at_ms.unwrap_or(0),
        finished_at_unix_ms: record.finished_at_ms.unwrap_or(0),
        rank_info: record
            .placement
            .iter()
            .map(|rank| rank_info(record, rank))
            .collect(),
        metrics: rank_metrics(record),
        spec_toml: record.spec_toml.clone(),
        kind: record.kind.clone(),
        submitter: record.submitter.clone(),
        attempt: record.attempt,
        max_restarts: record.max_restarts,
        attempts: record.attempts.iter().map(attempt_info).collect(),
        failed_rank: record.blamed_rank,
        // Live only: the cluster adds them for a running job, and why a queued job waits.
        stragglers: Vec::new(),
        waiting: String::new(),
        trial: record.trial.as_ref().map(|tag| v1::TrialTag {
            sweep_id: tag.sweep_id.to_string(),
            trial: tag.trial,
            rung: tag.rung,
        }),
    }
}

/// The protocol's view of an ended attempt.
fn attempt_info(attempt: &AttemptRecord) -> v1::AttemptInfo {
    v1::AttemptInfo {
        attempt: attempt.attempt,
        nodes: attempt.nodes.iter().map(ToString::to_string).collect(),
        started_at_unix_ms: attempt.started_at_ms.unwrap_or(0),
        ended_at_unix_ms: attempt.ended_at_ms,
        reason: attempt.reason.clone(),
        planned: attempt.planned,
        preempted_by: attempt
            .preempted_by
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
    }
}

/// The protocol's view of a job in a listing: no spec, placement or metrics.
pub fn job_summary_info(summary: &JobSummary) -> v1::JobInfo {
    v1::JobInfo {
        job_id: summary.id.to_string(),
        name: summary.name.clone(),
        state: summary.state.to_proto() as i32,
        reason: summary.reason.clone(),
        priority: summary.priority,
        ranks: summary.ranks,
        devices_per_rank: summary.devices_per_rank,
        device_kind: device_kind_to_proto(summary.device_kind) as i32,
        submitted_at_unix_ms: summary.submitted_at_ms,
        scheduled_at_unix_ms: summary.scheduled_at_ms.unwrap_or(0),
        started_at_unix_ms: summary.started_at_ms.unwrap_or(0),
        finished_at_unix_ms: summary.finished_at_ms.unwrap_or(0),
        kind: summary.kind.clone(),
        submitter: summary.submitter.clone(),
        attempt: summary.attempt,
        ..v1::JobInfo::default()
    }
}

/// The protocol's view of a node.
pub fn node_info(
    record: &NodeRecord,
    status: &str,
    last_heartbeat_ms: i64,
    busy: &[(DeviceKind, u32)],
    running_ranks: u32,
    straggler_score: f64,
) -> v1::NodeInfo {
    v1::NodeInfo {
        node_id: record.id.to_string(),
        hostname: record.hostname.clone(),
        address: record.address.clone(),
        devices: record
            .devices
            .iter()
            .map(|d| v1::Device {
                kind: device_kind_to_proto(d.kind) as i32,
                index: d.index,
                name: d.name.clone(),
                memory_total_bytes: d.memory_total_bytes,
                memory_free_bytes: d.memory_free_bytes,
                compute_capability: d.compute_capability.clone(),
                pci_bus_id: d.pci_bus_id.clone(),
                peers: d
                    .peers
                    .iter()
                    .map(|peer| v1::GpuPeer {
                        index: peer.index,
                        access: peer.access,
                        native_atomics: peer.native_atomics,
                        performance_rank: peer.performance_rank,
                    })
                    .collect(),
            })
            .collect(),
        status: status.to_owned(),
        last_heartbeat_unix_ms: last_heartbeat_ms,
        busy_devices: busy
            .iter()
            .map(|&(kind, index)| v1::DeviceRef {
                kind: device_kind_to_proto(kind) as i32,
                index,
            })
            .collect(),
        running_ranks,
        draining: record.draining,
        straggler_score,
    }
}

/// A user as `ListUsers` shows them (never their token's hash).
pub fn user_info(user: &UserRecord) -> v1::UserInfo {
    v1::UserInfo {
        name: user.name.clone(),
        admin: user.admin,
        created_at_unix_ms: user.created_at_ms,
        created_by: user.created_by.clone(),
    }
}

/// An audit entry as `ListAudit` shows it.
pub fn audit_record(entry: &AuditEntry) -> v1::AuditRecord {
    v1::AuditRecord {
        seq: entry.seq,
        at_unix_ms: entry.at_ms,
        actor: entry.actor.clone(),
        action: entry.action.clone(),
        target: entry.target.clone(),
        outcome: entry.outcome.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reports_are_bounded_and_consistent() {
        let channel = |entered: u64, completed: u64| v1::CollectiveProgress {
            channel: "data-parallel".to_owned(),
            entered,
            completed,
            operation: "all_reduce".to_owned(),
            bytes: 8,
            peer: None,
            since_unix_ms: 5,
        };
        let states = collective_progress(&[channel(3, 2)]).unwrap();
        assert_eq!((states[0].entered, states[0].completed), (3, 2));
        let error = collective_progress(&[channel(2, 3)]).unwrap_err();
        assert!(
            error.to_string().contains("collectives.completed = 3"),
            "{error}"
        );
        let many = vec![channel(1, 1); crate::hangs::MAX_CHANNELS + 1];
        assert!(collective_progress(&many).is_err());
        let mut long = channel(1, 1);
        long.operation = "x".repeat(crate::hangs::MAX_CHANNEL_NAME_BYTES + 1);
        let error = collective_progress(&[long]).unwrap_err();
        assert!(
            error.to_string().contains("collectives.operation"),
            "{error}"
        );
    }

    fn gpu(index: u32, peers: &[u32]) -> v1::Device {
        v1::Device {
            kind: v1::DeviceKind::Gpu as i32,
            index,
            name: "NVIDIA H100".to_owned(),
            peers: peers
                .iter()
                .map(|&peer| v1::GpuPeer {
                    index: peer,
                    access: true,
                    native_atomics: true,
                    performance_rank: 1,
                })
                .collect(),
            ..v1::Device::default()
        }
    }

    fn report(job_id: &str, rank: u32, detail: &str) -> v1::RankReport {
        v1::RankReport {
            job_id: job_id.to_owned(),
            rank,
            state: v1::RankState::Exited as i32,
            exit_code: Some(1),
            detail: detail.to_owned(),
            ..v1::RankReport::default()
        }
    }

    #[test]
    fn rank_reports_are_checked_whole_and_details_cut_with_a_marker() {
        let huge = "x".repeat(5 * 1024 * 1024);
        let checked = rank_reports(&[report("j-1", 0, &huge), report("j-1", 1, "")]).unwrap();
        assert!(checked[0].detail.len() <= MAX_DETAIL_BYTES);
        assert!(
            checked[0].detail.ends_with("bytes cut]"),
            "{}",
            checked[0].detail
        );
        let cases = [
            (
                vec![report("j-1", 0, ""), report("bad id", 1, "")],
                "ranks[1].job_id",
            ),
            (
                vec![report("j-1", 0, ""), report("j-1", 0, "")],
                "reported twice",
            ),
        ];
        for (reports, expected) in cases {
            let error = rank_reports(&reports).unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
        let mut unknown = report("j-1", 0, "");
        unknown.state = 99;
        assert!(rank_reports(&[unknown]).is_err());
        let mut cause = report("j-1", 0, "");
        cause.stop_cause = 77;
        assert!(rank_reports(&[cause]).is_err());
    }

    #[test]
    fn gpu_peer_paths_are_kept() {
        let records = device_records(&[gpu(0, &[1]), gpu(1, &[0])]).unwrap();
        assert_eq!(
            records[0].peers,
            [GpuPeerRecord {
                index: 1,
                access: true,
                native_atomics: true,
                performance_rank: 1
            }]
        );
        assert_eq!(records[1].peers[0].index, 0);
    }

    #[test]
    fn bad_gpu_peer_paths_are_refused_naming_the_device() {
        let cases: [(Vec<v1::Device>, &str); 4] = [
            (
                vec![gpu(0, &[0])],
                "gpu:0 reports a peer path to gpu:0 (itself)",
            ),
            (
                vec![gpu(0, &[1, 1]), gpu(1, &[])],
                "gpu:0 reports a peer path to gpu:1 twice",
            ),
            (
                vec![gpu(0, &[7])],
                "gpu:0 reports a peer path to gpu:7, which the node",
            ),
            (
                vec![gpu(0, &(1..=MAX_GPU_PEERS as u32 + 1).collect::<Vec<_>>())],
                "expected at most 64",
            ),
        ];
        for (devices, expected) in cases {
            let error = device_records(&devices).unwrap_err().to_string();
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        }
        let mut cpu = gpu(0, &[1]);
        cpu.kind = v1::DeviceKind::Cpu as i32;
        let error = device_records(&[cpu, gpu(1, &[])]).unwrap_err().to_string();
        assert!(error.contains("expected none for a CPU slot"), "{error}");
    }
}
