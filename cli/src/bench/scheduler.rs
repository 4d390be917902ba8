//! `cohort bench scheduler`: the time of one placement pass ([`placement::plan`], what the
//! coordinator's scheduler runs whenever something changes) over a simulated cluster of
//! `--nodes` nodes of `--gpus-per-node` GPUs and a queue of `--jobs` gang jobs of mixed sizes
//! (1 to 512 GPUs), priorities, queues (of different weights) and users (so the pass orders
//! them by fair share); from an empty cluster, and from a full one with and without
//! preemption. The pass is the pure decision only: building the view from the coordinator's
//! state and storing the placements are not in it.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use cohort_coordinator::placement::sharing::QueuePolicy;
use cohort_coordinator::placement::{
    self, ClusterView, NodeView, Owner, Plan, QueuedJob, RunningJob, Sharing,
};
use cohort_jobspec::DeviceKind;
use cohort_proto::{JobId, NodeId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

/// Job sizes in GPUs, with their relative frequency: most jobs are small, a few span many
/// nodes.
const SIZES: [(u32, u32); 10] = [
    (1, 30),
    (2, 15),
    (4, 15),
    (8, 15),
    (16, 8),
    (32, 6),
    (64, 5),
    (128, 3),
    (256, 2),
    (512, 1),
];
/// Queues and their weights; jobs are spread evenly over them.
const QUEUES: [(&str, f64); 4] = [
    ("default", 1.0),
    ("research", 2.0),
    ("prod", 4.0),
    ("batch", 0.5),
];
/// Users submitting jobs.
const USERS: u32 = 100;
/// Priorities, with their relative frequency.
const PRIORITIES: [(i32, u32); 4] = [(0, 50), (10, 30), (50, 15), (100, 5)];

/// What one measured pass did.
struct PassFigures {
    /// Median wall time of the pass.
    seconds: f64,
    /// Every run's time, to show the spread.
    runs: Vec<f64>,
    /// The decisions of the last run.
    plan: Plan,
}

/// Runs the benchmark.
pub fn run(nodes: u32, gpus_per_node: u32, jobs: u32, repeat: u32, seed: u64) -> Result<ExitCode> {
    anyhow::ensure!(
        nodes > 0 && gpus_per_node > 0 && jobs > 0,
        "--nodes, --gpus-per-node and --jobs must be above 0"
    );
    let repeat = repeat.max(1);
    let mut random = ChaCha8Rng::seed_from_u64(seed);
    let empty = cluster(nodes, gpus_per_node, &[]);
    let queue = queue("queued", jobs, gpus_per_node, &mut random);
    let rss_before = peak_rss_bytes();
    let capacity = u64::from(nodes) * u64::from(gpus_per_node);
    let sharing = sharing(capacity, &[], &queue);

    eprintln!("pass over an empty cluster...");
    let from_empty = measure(repeat, || placement::plan(&empty, &queue, &[], &sharing));

    // The cluster as the first pass filled it, every job on it running.
    let running = running_jobs(&from_empty.plan, &queue, &mut random);
    let full = cluster(nodes, gpus_per_node, &running);
    let next_queue = queue_of_more("waiting", jobs, gpus_per_node, &mut random, &queue);
    let sharing = self::sharing(capacity, &running, &queue);
    eprintln!("pass over the full cluster, no preemption...");
    let full_plain = measure(repeat, || {
        placement::plan(&full, &next_queue, &[], &sharing)
    });
    eprintln!("pass over the full cluster, with preemption...");
    let full_preempting = measure(repeat, || {
        placement::plan(&full, &next_queue, &running, &sharing)
    });
    let rss_after = peak_rss_bytes();

    let used: u64 = running
        .iter()
        .map(|job| job.held.iter().map(|(_, d)| d.len() as u64).sum::<u64>())
        .sum();
    let total = u64::from(nodes) * u64::from(gpus_per_node);
    let passes = [
        ("empty cluster", false, &from_empty),
        ("full cluster", false, &full_plain),
        ("full cluster", true, &full_preempting),
    ];
    let mut table = Vec::new();
    let mut rows = Vec::new();
    for (start, preemption, figures) in passes {
        let victims: usize = figures
            .plan
            .preemptions
            .iter()
            .map(|p| p.new_victims.len())
            .sum();
        table.push(vec![
            start.to_owned(),
            if preemption { "on" } else { "off" }.to_owned(),
            jobs.to_string(),
            figures.plan.assignments.len().to_string(),
            figures.plan.preemptions.len().to_string(),
            victims.to_string(),
            format!("{:.4}", figures.seconds),
        ]);
        rows.push(json!({
            "start": start,
            "preemption": preemption,
            "queued": jobs,
            "placed": figures.plan.assignments.len(),
            "preempting": figures.plan.preemptions.len(),
            "victims": victims,
            "pass_s": figures.seconds,
            "runs_s": figures.runs,
        }));
    }
    println!(
        "placement pass: {nodes} nodes x {gpus_per_node} gpus, {jobs} queued gang jobs of 1-512 gpus; \
         the full cluster has {used} of {total} gpus in use by {} running jobs (median of {repeat})",
        running.len()
    );
    print!(
        "{}",
        crate::render::table(
            &[
                "START",
                "PREEMPTION",
                "QUEUED",
                "PLACED",
                "PREEMPTING",
                "VICTIMS",
                "PASS(S)"
            ],
            &table
        )
    );
    println!(
        "peak memory {:.1} MiB ({:.1} MiB more than before the passes)",
        rss_after as f64 / (1 << 20) as f64,
        rss_after.saturating_sub(rss_before) as f64 / (1 << 20) as f64
    );
    println!(
        "{}",
        json!({
            "bench": "scheduler",
            "nodes": nodes,
            "gpus_per_node": gpus_per_node,
            "jobs": jobs,
            "seed": seed,
            "running_jobs": running.len(),
            "gpus_in_use": used,
            "peak_rss_bytes": rss_after,
            "results": rows,
        })
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `pass` `repeat` times; the median time and the last run's decisions.
fn measure(repeat: u32, pass: impl Fn() -> Plan) -> PassFigures {
    let mut runs = Vec::new();
    let mut plan = Plan::default();
    for _ in 0..repeat {
        let started = Instant::now();
        plan = pass();
        runs.push(started.elapsed().as_secs_f64());
    }
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    PassFigures {
        seconds: sorted[sorted.len() / 2],
        runs,
        plan,
    }
}

/// `nodes` nodes of `gpus` GPUs, with the devices `running` holds taken.
fn cluster(nodes: u32, gpus: u32, running: &[RunningJob]) -> ClusterView {
    let mut held: std::collections::HashMap<&NodeId, Vec<u32>> = std::collections::HashMap::new();
    for job in running {
        for (node_id, devices) in &job.held {
            held.entry(node_id).or_default().extend(devices);
        }
    }
    let nodes = (0..nodes)
        .map(|index| {
            let node_id = node_id(index);
            let busy = held.get(&node_id).cloned().unwrap_or_default();
            NodeView::new(node_id).with_devices(
                DeviceKind::Gpu,
                gpus,
                (0..gpus).filter(|device| !busy.contains(device)),
            )
        })
        .collect();
    ClusterView { nodes }
}

fn node_id(index: u32) -> NodeId {
    NodeId::new(format!("node-{index:05}")).expect("a valid node id")
}

/// `count` gang jobs named `prefix-N`, sizes and priorities drawn from [`SIZES`] and
/// [`PRIORITIES`]; a rank holds up to a node's GPUs.
fn queue(prefix: &str, count: u32, gpus_per_node: u32, random: &mut ChaCha8Rng) -> Vec<QueuedJob> {
    (0..count)
        .map(|index| {
            let gpus = pick(&SIZES, random);
            let devices_per_rank = gpus.min(gpus_per_node);
            QueuedJob {
                job_id: JobId::new(format!("{prefix}-{index}")).expect("a valid job id"),
                priority: pick(&PRIORITIES, random),
                seq: u64::from(index),
                ranks: gpus.div_ceil(devices_per_rank),
                devices_per_rank,
                device_kind: DeviceKind::Gpu,
                rank_group: 1,
                avoid_nodes: Vec::new(),
                min_ranks: 0,
                owner: Owner {
                    queue: QUEUES[index as usize % QUEUES.len()].0.to_owned(),
                    user: format!("user-{}", random.random_range(0..USERS)),
                },
            }
        })
        .collect()
}

/// A second queue, submitted after `earlier` (its sequence numbers follow).
fn queue_of_more(
    prefix: &str,
    count: u32,
    gpus_per_node: u32,
    random: &mut ChaCha8Rng,
    earlier: &[QueuedJob],
) -> Vec<QueuedJob> {
    let offset = earlier.len() as u64;
    queue(prefix, count, gpus_per_node, random)
        .into_iter()
        .map(|job| QueuedJob {
            seq: job.seq + offset,
            ..job
        })
        .collect()
}

/// The jobs a pass placed, as running jobs that may be preempted, with random ages.
fn running_jobs(plan: &Plan, queue: &[QueuedJob], random: &mut ChaCha8Rng) -> Vec<RunningJob> {
    let priorities: std::collections::HashMap<&JobId, i32> = queue
        .iter()
        .map(|job| (&job.job_id, job.priority))
        .collect();
    plan.assignments
        .iter()
        .map(|assignment| {
            let mut held: Vec<(NodeId, Vec<u32>)> = Vec::new();
            for rank in &assignment.ranks {
                match held.last_mut() {
                    Some((node_id, devices)) if *node_id == rank.node_id => {
                        devices.extend(&rank.devices);
                    }
                    _ => held.push((rank.node_id.clone(), rank.devices.clone())),
                }
            }
            RunningJob {
                job_id: assignment.job_id.clone(),
                priority: priorities.get(&assignment.job_id).copied().unwrap_or(0),
                device_kind: DeviceKind::Gpu,
                held,
                preemptible: true,
                progress_lost_ms: random.random_range(0..600_000),
                started_at_ms: random.random_range(0..86_400_000),
                stopping_for: None,
            }
        })
        .collect()
}

/// The queues (with their weights, no quotas) and what the `running` jobs of `queue` hold.
fn sharing(capacity: u64, running: &[RunningJob], queue: &[QueuedJob]) -> Sharing {
    let owners: std::collections::HashMap<&JobId, &Owner> =
        queue.iter().map(|job| (&job.job_id, &job.owner)).collect();
    let mut sharing = Sharing {
        queues: QUEUES
            .iter()
            .map(|&(name, weight)| {
                (
                    name.to_owned(),
                    QueuePolicy {
                        weight,
                        quota: None,
                    },
                )
            })
            .collect(),
        capacity: std::collections::HashMap::from([(DeviceKind::Gpu, capacity)]),
        ..Sharing::default()
    };
    for job in running {
        let held: usize = job.held.iter().map(|(_, devices)| devices.len()).sum();
        if let Some(owner) = owners.get(&job.job_id) {
            sharing.held.add(owner, DeviceKind::Gpu, held as u64);
        }
    }
    sharing
}

/// Draws a value by its relative frequency.
fn pick<T: Copy>(choices: &[(T, u32)], random: &mut ChaCha8Rng) -> T {
    let total: u32 = choices.iter().map(|(_, weight)| weight).sum();
    let mut draw = random.random_range(0..total);
    for &(value, weight) in choices {
        if draw < weight {
            return value;
        }
        draw -= weight;
    }
    choices[choices.len() - 1].0
}

/// This process's peak resident memory (`VmHWM`), in bytes; 0 where /proc is not readable.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .context("reading /proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|value| {
                    value
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map_or(0, |kib| kib * 1024)
}
