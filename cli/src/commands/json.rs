//! JSON views of jobs and nodes for `--output json`.

use cohort_proto::v1::{DeviceKind, JobInfo, NodeInfo, RankState};
use serde_json::{Value, json};

use crate::render;

fn kind(kind: i32) -> &'static str {
    match DeviceKind::try_from(kind) {
        Ok(DeviceKind::Gpu) => "gpu",
        _ => "cpu",
    }
}

fn rank_state(state: RankState) -> &'static str {
    match state {
        RankState::Pending => "pending",
        RankState::Running => "running",
        RankState::Exited => "exited",
        RankState::Lost => "lost",
        RankState::StartFailed => "start_failed",
        RankState::Unspecified => "unknown",
    }
}

fn optional_ms(ms: i64) -> Value {
    if ms > 0 { json!(ms) } else { Value::Null }
}

/// A job as JSON.
pub fn job(job: &JobInfo) -> Value {
    json!({
        "job_id": job.job_id,
        "name": job.name,
        "kind": job.kind,
        "state": render::job_state(job.state()),
        "reason": job.reason,
        "waiting": job.waiting,
        "trial": job.trial.as_ref().map(|trial| json!({
            "sweep_id": trial.sweep_id,
            "trial": trial.trial,
            "rung": trial.rung,
        })),
        "failed_rank": job.failed_rank,
        "stragglers": job.stragglers.iter().map(|straggler| json!({
            "rank": straggler.rank,
            "node_id": straggler.node_id,
            "slowdown": straggler.slowdown,
            "since_step": straggler.since_step,
        })).collect::<Vec<_>>(),
        "priority": job.priority,
        "submitter": job.submitter,
        "ranks": job.ranks,
        "devices_per_rank": job.devices_per_rank,
        "device": kind(job.device_kind),
        "submitted_at_unix_ms": job.submitted_at_unix_ms,
        "scheduled_at_unix_ms": optional_ms(job.scheduled_at_unix_ms),
        "started_at_unix_ms": optional_ms(job.started_at_unix_ms),
        "finished_at_unix_ms": optional_ms(job.finished_at_unix_ms),
        "restarts": job.attempt,
        "max_restarts": job.max_restarts,
        // Numbered from 1, as `cohort status` shows them; the last is the job's end once it
        // ended.
        "attempts": job.attempts.iter().map(|attempt| json!({
            "number": attempt.attempt + 1,
            "nodes": attempt.nodes,
            "started_at_unix_ms": optional_ms(attempt.started_at_unix_ms),
            "ended_at_unix_ms": attempt.ended_at_unix_ms,
            "reason": attempt.reason,
            "planned": attempt.planned,
            "preempted_by": (!attempt.preempted_by.is_empty()).then_some(&attempt.preempted_by),
        })).collect::<Vec<_>>(),
        "placement": job.rank_info.iter().map(|rank| json!({
            "rank": rank.rank,
            "node_id": rank.node_id,
            "local_rank": rank.local_rank,
            "devices": rank.devices.iter().map(|d| format!("{}:{}", kind(d.kind), d.index)).collect::<Vec<_>>(),
            "state": rank_state(rank.state()),
            "pid": rank.pid,
            "exit_code": rank.exit_code,
            "signal": rank.signal,
            "exited_at_unix_ms": optional_ms(rank.exited_at_unix_ms),
            "detail": rank.detail,
        })).collect::<Vec<_>>(),
        "metrics": job.metrics.iter().map(|m| json!({
            "rank": m.rank,
            "step": m.step,
            "total_steps": m.total_steps,
            "epoch": m.epoch,
            "loss": m.loss,
            "samples_per_s": m.samples_per_s,
            "eval_loss": m.eval_loss,
            "eval_accuracy": m.eval_accuracy,
            "extra": m.extra,
        })).collect::<Vec<_>>(),
    })
}

/// A node as JSON.
pub fn node(node: &NodeInfo) -> Value {
    json!({
        "node_id": node.node_id,
        "hostname": node.hostname,
        "address": node.address,
        "status": node.status,
        "last_heartbeat_unix_ms": node.last_heartbeat_unix_ms,
        "running_ranks": node.running_ranks,
        "straggler_score": node.straggler_score,
        "devices": node.devices.iter().map(|d| json!({
            "kind": kind(d.kind),
            "index": d.index,
            "name": d.name,
            "memory_total_bytes": d.memory_total_bytes,
            "memory_free_bytes": d.memory_free_bytes,
            "compute_capability": d.compute_capability,
            "pci_bus_id": d.pci_bus_id,
            "peers": d.peers.iter().map(|p| json!({
                "index": p.index,
                "access": p.access,
                "native_atomics": p.native_atomics,
                "performance_rank": p.performance_rank,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "draining": node.draining,
        "busy_devices": node.busy_devices.iter().map(|d| format!("{}:{}", kind(d.kind), d.index)).collect::<Vec<_>>(),
    })
}

/// The scheduler's queues as JSON.
pub fn queues(queues: &cohort_proto::v1::ListQueuesResponse) -> Value {
    json!({
        "user_quota": queues.user_quota,
        "cluster_cpu": queues.cluster_cpu,
        "cluster_gpu": queues.cluster_gpu,
        "queues": queues.queues.iter().map(|queue| json!({
            "name": queue.name,
            "configured": queue.configured,
            "weight": queue.weight,
            "quota": queue.quota,
            "held_cpu": queue.held_cpu,
            "held_gpu": queue.held_gpu,
            "share": queue.share,
            "running_jobs": queue.running_jobs,
            "queued_jobs": queue.queued_jobs,
            "users": queue.users.iter().map(|user| json!({
                "user": user.user,
                "held_cpu": user.held_cpu,
                "held_gpu": user.held_gpu,
                "share": user.share,
                "running_jobs": user.running_jobs,
                "queued_jobs": user.queued_jobs,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}
