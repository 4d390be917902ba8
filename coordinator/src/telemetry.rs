//! What the coordinator tells Prometheus: `/metrics` in the Prometheus text format, every name
//! prefixed `cohort_` and carrying its unit.
//!
//! Two kinds of series:
//! - **Recorded** as things happen, kept for the coordinator's life ([`Telemetry`]): the queue
//!   wait of every placed job and the time of every placement decision, as histograms.
//! - **Read** at each scrape from a [`Snapshot`] of the cluster (a fresh registry each time):
//!   jobs by state, nodes by status, heartbeat ages, devices used and free, and per rank of
//!   every running job its latest step metrics. A job's series exist while it runs and are gone
//!   from the next scrape after it ends, so their number stays bounded by what runs.

use std::collections::BTreeMap;

use cohort_proto::v1::{NodeInfo, RankMetrics};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::error::{Error, Result};

/// The job states `cohort_jobs` always lists, even at zero, so that queries see the series.
pub const JOB_STATES: [&str; 7] = [
    "queued",
    "scheduled",
    "running",
    "restarting",
    "succeeded",
    "failed",
    "cancelled",
];

/// The node statuses `cohort_nodes` always lists.
pub const NODE_STATUSES: [&str; 5] = ["ready", "disconnected", "lost", "left", "draining"];

/// Buckets of the queue-wait histogram, in seconds: a second to a day.
const QUEUE_WAIT_BUCKETS: [f64; 12] = [
    0.1,
    0.5,
    1.0,
    5.0,
    15.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4.0 * 3600.0,
    12.0 * 3600.0,
    86400.0,
];

/// Buckets of the placement-decision histogram, in seconds: 10 us to 1 s.
const SCHEDULING_BUCKETS: [f64; 10] = [1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 1.0];

/// The series recorded as things happen.
pub struct Telemetry {
    /// Holds them, for gathering.
    registry: Registry,
    /// Seconds each placed job waited in the queue.
    queue_wait: Histogram,
    /// Seconds each placement decision took.
    scheduling: Histogram,
}

impl Telemetry {
    /// Empty histograms.
    pub fn new() -> Result<Self> {
        let registry = Registry::new();
        let queue_wait = register_histogram(
            &registry,
            "cohort_queue_wait_seconds",
            "Time a job waited in the queue before it was placed (each attempt)",
            &QUEUE_WAIT_BUCKETS,
        )?;
        let scheduling = register_histogram(
            &registry,
            "cohort_scheduling_decision_seconds",
            "Time the scheduler took to decide the placements of one pass",
            &SCHEDULING_BUCKETS,
        )?;
        Ok(Self {
            registry,
            queue_wait,
            scheduling,
        })
    }

    /// Records that a job was placed after waiting `seconds` in the queue.
    pub fn observe_queue_wait(&self, seconds: f64) {
        self.queue_wait.observe(seconds.max(0.0));
    }

    /// Records that a placement decision took `seconds`.
    pub fn observe_scheduling(&self, seconds: f64) {
        self.scheduling.observe(seconds);
    }

    /// The exposition of `snapshot` and the recorded series, in the Prometheus text format.
    pub fn exposition(&self, snapshot: &Snapshot) -> Result<String> {
        let current = Registry::new();
        register_snapshot(&current, snapshot).map_err(exposition_error)?;
        let mut families = current.gather();
        families.extend(self.registry.gather());
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut text)
            .map_err(exposition_error)?;
        String::from_utf8(text).map_err(|error| exposition_error(error.to_string()))
    }
}

/// A histogram `name` with `buckets`, registered in `registry`.
fn register_histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
) -> Result<Histogram> {
    let histogram = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .map_err(exposition_error)?;
    registry
        .register(Box::new(histogram.clone()))
        .map_err(exposition_error)?;
    Ok(histogram)
}

fn exposition_error(error: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("building the metrics exposition: {error}"))
}

/// What a scrape shows of the cluster.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Jobs by state name (every job the coordinator keeps).
    pub jobs_by_state: BTreeMap<&'static str, u64>,
    /// Every node.
    pub nodes: Vec<NodeInfo>,
    /// When the snapshot was taken, Unix milliseconds.
    pub now_ms: i64,
    /// The running jobs the caller may see.
    pub running: Vec<RunningJob>,
}

/// A running job's series.
#[derive(Debug, Clone)]
pub struct RunningJob {
    /// Its id.
    pub job_id: String,
    /// Who submitted it.
    pub user: String,
    /// Restarts so far (its attempt number).
    pub restarts: u32,
    /// Each rank's node, by rank.
    pub nodes: Vec<String>,
    /// Each reporting rank's latest metrics.
    pub metrics: Vec<RankMetrics>,
    /// Seconds since the job's communication last moved while some rank waits in an
    /// operation (0 when none waits): what hang diagnosis compares with the hang timeout.
    pub stalled_s: f64,
    /// The ranks that drag it ([`crate::stragglers`]).
    pub stragglers: Vec<u32>,
}

/// The step phases ranks report as extra metrics (median seconds), and the `phase` label each
/// gets in `cohort_rank_phase_seconds`.
const PHASES: [(&str, &str); 6] = [
    ("median_step_s", "step"),
    ("median_data_s", "data"),
    ("median_forward_s", "forward"),
    ("median_backward_s", "backward"),
    ("median_optimizer_s", "optimizer"),
    ("median_exposed_comm_s", "exposed_communication"),
];

/// Registers every series of `snapshot` in `registry`.
fn register_snapshot(registry: &Registry, snapshot: &Snapshot) -> prometheus::Result<()> {
    let jobs = IntGaugeVec::new(
        Opts::new("cohort_jobs", "Jobs the coordinator keeps, by state"),
        &["state"],
    )?;
    for state in JOB_STATES {
        let count = snapshot.jobs_by_state.get(state).copied().unwrap_or(0);
        jobs.with_label_values(&[state])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
    registry.register(Box::new(jobs))?;

    let nodes = IntGaugeVec::new(
        Opts::new("cohort_nodes", "Worker nodes, by status"),
        &["status"],
    )?;
    for status in NODE_STATUSES {
        let count = snapshot
            .nodes
            .iter()
            .filter(|node| node_status(node) == status)
            .count();
        nodes
            .with_label_values(&[status])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
    registry.register(Box::new(nodes))?;

    let heartbeat_age = GaugeVec::new(
        Opts::new(
            "cohort_node_heartbeat_age_seconds",
            "Seconds since each node's last heartbeat",
        ),
        &["node"],
    )?;
    let node_devices = IntGaugeVec::new(
        Opts::new("cohort_node_devices", "Devices a node offers, by use"),
        &["node", "use"],
    )?;
    let (mut used, mut total) = (0usize, 0usize);
    for node in &snapshot.nodes {
        if node.last_heartbeat_unix_ms > 0 {
            let age = (snapshot.now_ms - node.last_heartbeat_unix_ms).max(0) as f64 / 1000.0;
            heartbeat_age.with_label_values(&[&node.node_id]).set(age);
        }
        let busy = node.busy_devices.len();
        let offered = node.devices.len();
        node_devices
            .with_label_values(&[&node.node_id, "used"])
            .set(busy as i64);
        node_devices
            .with_label_values(&[&node.node_id, "free"])
            .set(offered.saturating_sub(busy) as i64);
        used += busy;
        total += offered;
    }
    registry.register(Box::new(heartbeat_age))?;
    registry.register(Box::new(node_devices))?;
    let devices = IntGaugeVec::new(
        Opts::new("cohort_devices", "Devices of the cluster's nodes, by use"),
        &["use"],
    )?;
    devices.with_label_values(&["used"]).set(used as i64);
    devices
        .with_label_values(&["free"])
        .set(total.saturating_sub(used) as i64);
    registry.register(Box::new(devices))?;

    register_ranks(registry, &snapshot.running)
}

/// Registers the per-job and per-rank series of the running jobs.
fn register_ranks(registry: &Registry, running: &[RunningJob]) -> prometheus::Result<()> {
    let labels = ["job_id", "user", "rank", "node"];
    let gauge = |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &labels);
    let step = gauge("cohort_rank_step", "The last step the rank finished")?;
    let total_steps = gauge("cohort_rank_total_steps", "The steps the rank's run takes")?;
    let epoch = gauge("cohort_rank_epoch", "The rank's current epoch, from 1")?;
    let loss = gauge("cohort_rank_loss", "Training loss of the rank's last step")?;
    let throughput = gauge(
        "cohort_rank_samples_per_second",
        "Job-wide training throughput as the rank sees it",
    )?;
    let eval_loss = gauge("cohort_rank_eval_loss", "Loss of the last evaluation")?;
    let eval_accuracy = gauge(
        "cohort_rank_eval_accuracy_ratio",
        "Accuracy of the last evaluation, 0 to 1",
    )?;
    let loss_scale = gauge(
        "cohort_rank_loss_scale",
        "Mixed precision's dynamic loss scale (1 without fp16 scaling)",
    )?;
    let skipped = gauge(
        "cohort_rank_skipped_steps",
        "Steps skipped for overflowing gradients so far",
    )?;
    let gradient_bytes = gauge(
        "cohort_rank_allreduce_bytes",
        "Gradient bytes the rank exchanges per step",
    )?;
    let bus_bandwidth = gauge(
        "cohort_rank_allreduce_bus_bandwidth_bytes_per_second",
        "Bus bandwidth of the rank's collectives since its previous report (bytes times \
         2 (n - 1) / n over their time)",
    )?;
    let server_latency = gauge(
        "cohort_rank_parameter_server_exchange_seconds",
        "Mean time of the rank's parameter-server push-and-pull since its previous report",
    )?;
    let phase = GaugeVec::new(
        Opts::new(
            "cohort_rank_phase_seconds",
            "Median seconds of each phase of the rank's step (after warm-up)",
        ),
        &["job_id", "user", "rank", "node", "phase"],
    )?;
    let straggler = gauge(
        "cohort_rank_straggler",
        "1 while the rank computes its steps markedly slower than the job's other ranks",
    )?;
    let restarts = GaugeVec::new(
        Opts::new("cohort_job_restarts", "Restarts of a running job so far"),
        &["job_id", "user"],
    )?;
    let stalled = GaugeVec::new(
        Opts::new(
            "cohort_job_communication_stalled_seconds",
            "Seconds since any rank's communication last moved while some rank waits in an \
             operation (0 when none waits); the job is called hung at its hang timeout",
        ),
        &["job_id", "user"],
    )?;
    for job in running {
        restarts
            .with_label_values(&[&job.job_id, &job.user])
            .set(f64::from(job.restarts));
        stalled
            .with_label_values(&[&job.job_id, &job.user])
            .set(job.stalled_s);
        for metrics in &job.metrics {
            let rank = metrics.rank.to_string();
            let node = job
                .nodes
                .get(metrics.rank as usize)
                .map_or("", String::as_str);
            let values = [job.job_id.as_str(), job.user.as_str(), rank.as_str(), node];
            step.with_label_values(&values).set(metrics.step as f64);
            straggler
                .with_label_values(&values)
                .set(f64::from(u8::from(job.stragglers.contains(&metrics.rank))));
            total_steps
                .with_label_values(&values)
                .set(metrics.total_steps as f64);
            epoch
                .with_label_values(&values)
                .set(f64::from(metrics.epoch));
            loss.with_label_values(&values).set(metrics.loss);
            throughput
                .with_label_values(&values)
                .set(metrics.samples_per_s);
            if let Some(value) = metrics.eval_loss {
                eval_loss.with_label_values(&values).set(value);
            }
            if let Some(value) = metrics.eval_accuracy {
                eval_accuracy.with_label_values(&values).set(value);
            }
            let extra = |name: &str, series: &GaugeVec| {
                if let Some(value) = metrics.extra.get(name) {
                    series.with_label_values(&values).set(*value);
                }
            };
            extra("loss_scale", &loss_scale);
            extra("skipped_steps", &skipped);
            extra("gradient_bytes", &gradient_bytes);
            extra("ps_exchange_latency_s", &server_latency);
            if let Some(gbps) = metrics.extra.get("allreduce_busbw_gbps") {
                bus_bandwidth.with_label_values(&values).set(gbps * 1e9);
            }
            for (name, label) in PHASES {
                if let Some(value) = metrics.extra.get(name) {
                    phase
                        .with_label_values(&[values[0], values[1], values[2], values[3], label])
                        .set(*value);
                }
            }
        }
    }
    for series in [
        step,
        total_steps,
        epoch,
        loss,
        throughput,
        eval_loss,
        eval_accuracy,
        loss_scale,
        skipped,
        gradient_bytes,
        bus_bandwidth,
        server_latency,
        phase,
        straggler,
        restarts,
        stalled,
    ] {
        registry.register(Box::new(series))?;
    }
    Ok(())
}

/// A node's status as `cohort nodes` names it, `draining` for a drained ready node.
fn node_status(node: &NodeInfo) -> &str {
    if node.draining && node.status == "ready" {
        "draining"
    } else {
        &node.status
    }
}

/// The value of one sample of an exposition (`series` with its labels, as printed).
#[cfg(test)]
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let node = |id: &str, status: &str, devices: usize, busy: usize| NodeInfo {
            node_id: id.to_owned(),
            status: status.to_owned(),
            last_heartbeat_unix_ms: 9_000,
            devices: vec![Default::default(); devices],
            busy_devices: vec![Default::default(); busy],
            ..NodeInfo::default()
        };
        let mut metrics = RankMetrics {
            rank: 1,
            step: 120,
            total_steps: 234,
            epoch: 1,
            loss: 0.42,
            samples_per_s: 5_000.0,
            eval_accuracy: Some(0.86),
            ..RankMetrics::default()
        };
        metrics.extra.insert("median_forward_s".to_owned(), 0.004);
        metrics.extra.insert("loss_scale".to_owned(), 1.0);
        metrics.extra.insert("allreduce_busbw_gbps".to_owned(), 1.5);
        Snapshot {
            jobs_by_state: BTreeMap::from([("running", 1), ("succeeded", 3)]),
            nodes: vec![node("a", "ready", 2, 1), node("b", "lost", 1, 0)],
            now_ms: 10_500,
            running: vec![RunningJob {
                job_id: "mlp-4".to_owned(),
                user: "alice".to_owned(),
                restarts: 1,
                nodes: vec!["a".to_owned(), "b".to_owned()],
                metrics: vec![metrics],
                stalled_s: 7.5,
                stragglers: vec![1],
            }],
        }
    }

    #[test]
    fn the_exposition_names_every_series_with_its_unit_and_labels() {
        let text = Telemetry::new().unwrap().exposition(&snapshot()).unwrap();
        assert_eq!(sample(&text, "cohort_jobs{state=\"succeeded\"}"), Some(3.0));
        assert_eq!(sample(&text, "cohort_jobs{state=\"queued\"}"), Some(0.0));
        assert_eq!(sample(&text, "cohort_nodes{status=\"lost\"}"), Some(1.0));
        assert_eq!(
            sample(&text, "cohort_node_heartbeat_age_seconds{node=\"a\"}"),
            Some(1.5)
        );
        assert_eq!(sample(&text, "cohort_devices{use=\"free\"}"), Some(2.0));
        let rank = "{job_id=\"mlp-4\",node=\"b\",rank=\"1\",user=\"alice\"}";
        assert_eq!(
            sample(&text, &format!("cohort_rank_loss{rank}")),
            Some(0.42)
        );
        assert_eq!(
            sample(&text, &format!("cohort_rank_step{rank}")),
            Some(120.0)
        );
        assert_eq!(
            sample(
                &text,
                "cohort_job_communication_stalled_seconds{job_id=\"mlp-4\",user=\"alice\"}"
            ),
            Some(7.5)
        );
        assert_eq!(
            sample(&text, &format!("cohort_rank_eval_accuracy_ratio{rank}")),
            Some(0.86)
        );
        assert_eq!(
            sample(
                &text,
                &format!("cohort_rank_allreduce_bus_bandwidth_bytes_per_second{rank}")
            ),
            Some(1.5e9)
        );
        assert_eq!(
            sample(
                &text,
                "cohort_rank_phase_seconds{job_id=\"mlp-4\",node=\"b\",phase=\"forward\",rank=\"1\",user=\"alice\"}"
            ),
            Some(0.004)
        );
        assert!(
            text.contains("# TYPE cohort_queue_wait_seconds histogram"),
            "{text}"
        );
        // Every name carries the prefix.
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            assert!(line.starts_with("cohort_"), "{line}");
        }
    }

    #[test]
    fn a_job_that_ended_leaves_no_series() {
        let telemetry = Telemetry::new().unwrap();
        let mut ended = snapshot();
        ended.running.clear();
        let text = telemetry.exposition(&ended).unwrap();
        assert!(!text.contains("mlp-4"), "{text}");
        telemetry.observe_queue_wait(2.0);
        let text = telemetry.exposition(&ended).unwrap();
        assert_eq!(sample(&text, "cohort_queue_wait_seconds_count"), Some(1.0));
    }
}
