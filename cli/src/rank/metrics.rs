//! Forwards a rank's training metrics to the coordinator without slowing training: the training
//! thread only replaces the latest snapshot; a task on the rank's runtime sends it at most every
//! [`REPORT_INTERVAL`], and evaluations and the final figures go out at once. Every report
//! carries what the rank's communicators are doing ([`Progress`]), and one goes out every
//! [`PROGRESS_INTERVAL`] even when no step completes, so that the coordinator sees a rank
//! stuck in a collective (hang diagnosis). Each report also carries the compute time of every
//! step since the last one (straggler detection).

use cohort_proto::failover::CoordinatorConnection;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cohort_collective::Progress;
use cohort_collective::progress::ChannelProgress;
use cohort_proto::v1::rendezvous_client::RendezvousClient;
use cohort_proto::v1::{
    CheckpointWritten, CollectiveProgress, EarlyStopReport, RankMetrics, ReportMetricsRequest,
};
use cohort_trainer::{EvaluationMetrics, MetricsSink, PhaseTimings, StepMetrics};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tracing::{info, warn};

/// Least time between two step reports.
const REPORT_INTERVAL: Duration = Duration::from_millis(500);
/// Most time between two reports, steps or not.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);
/// Most step times kept for one report (while reports cannot be sent, the oldest are
/// dropped); the coordinator takes at most this many.
const MAX_REPORTED_STEPS: usize = 1024;
/// Most checkpoint events of each kind one report carries (the coordinator's bound); the rest
/// go with the next.
const MAX_EVENTS_PER_REPORT: usize = 64;

/// The compute seconds of each step since the last report.
#[derive(Debug, Default)]
struct ComputeTimes {
    seconds: Vec<f64>,
    first_step: u64,
}

impl ComputeTimes {
    /// Adds step `step`'s time.
    fn push(&mut self, step: u64, seconds: f64) {
        if self.seconds.is_empty() {
            self.first_step = step;
        }
        if self.seconds.len() == MAX_REPORTED_STEPS {
            self.seconds.remove(0);
            self.first_step += 1;
        }
        self.seconds.push(seconds);
    }

    /// Moves the times so far into `metrics`.
    fn take(&mut self, metrics: &mut RankMetrics) {
        metrics.first_timed_step = self.first_step;
        metrics.step_compute_s.clear();
        metrics.step_compute_s.append(&mut self.seconds);
    }
}

/// Locks shared plain data (consistent after every call, so a poisoned lock is still usable).
fn lock<T>(shared: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Events that must reach the coordinator, unlike the latest figures, which the next report
/// replaces: checkpoints written and deleted (what `--resume-from JOB@...` resolves through)
/// and an early stop (the job's reason). Every report carries them until one that carried them
/// is answered; the coordinator takes a repeated one as the same event.
#[derive(Debug, Default)]
struct PendingEvents {
    written: Vec<CheckpointWritten>,
    deleted: Vec<u64>,
    early_stop: Option<EarlyStopReport>,
}

impl PendingEvents {
    /// Copies the events (at most [`MAX_EVENTS_PER_REPORT`] of each kind) into `metrics`.
    fn fill(&self, metrics: &mut RankMetrics) {
        metrics.checkpoints = self
            .written
            .iter()
            .take(MAX_EVENTS_PER_REPORT)
            .cloned()
            .collect();
        metrics.deleted_checkpoint_steps = self
            .deleted
            .iter()
            .take(MAX_EVENTS_PER_REPORT)
            .copied()
            .collect();
        metrics.early_stop = self.early_stop.clone();
    }

    /// Forgets the events `metrics` carried to the coordinator.
    fn delivered(&mut self, metrics: &RankMetrics) {
        self.written
            .retain(|event| !metrics.checkpoints.contains(event));
        self.deleted
            .retain(|step| !metrics.deleted_checkpoint_steps.contains(step));
        if metrics.early_stop.is_some() {
            self.early_stop = None;
        }
    }

    fn is_empty(&self) -> bool {
        self.written.is_empty() && self.deleted.is_empty() && self.early_stop.is_none()
    }
}
/// Steps at the start whose timings are left out of the medians (warm-up, allocation).
const WARMUP_STEPS: usize = 3;

/// Every step's wall time and phases, for the medians a run reports at its end; a sink of its
/// own for runs that report nothing else (`cohort bench train --telemetry off`).
#[derive(Debug, Default)]
pub struct StepTimings {
    /// Wall time of each step, seconds.
    step_times: Vec<f64>,
    /// Timings of each step.
    phases: Vec<PhaseTimings>,
}

impl StepTimings {
    /// Keeps `step`'s times.
    fn record(&mut self, step: &StepMetrics) {
        self.step_times
            .push(step.global_batch as f64 / step.samples_per_second.max(f64::MIN_POSITIVE));
        self.phases.push(step.timings);
    }

    /// Medians of the per-step figures (steps after warm-up), as named extra metrics.
    pub fn medians(&self) -> HashMap<String, f64> {
        let skip = if self.step_times.len() > WARMUP_STEPS * 2 {
            WARMUP_STEPS
        } else {
            0
        };
        let median = |mut values: Vec<f64>| -> f64 {
            if values.is_empty() {
                return 0.0;
            }
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let phase = |pick: fn(&PhaseTimings) -> Duration| {
            median(
                self.phases
                    .iter()
                    .skip(skip)
                    .map(|p| pick(p).as_secs_f64())
                    .collect(),
            )
        };
        HashMap::from([
            (
                "median_step_s".to_owned(),
                median(self.step_times.iter().skip(skip).copied().collect()),
            ),
            ("median_data_s".to_owned(), phase(|p| p.data)),
            ("median_forward_s".to_owned(), phase(|p| p.forward)),
            ("median_backward_s".to_owned(), phase(|p| p.backward)),
            ("median_optimizer_s".to_owned(), phase(|p| p.optimizer)),
            (
                "median_exposed_comm_s".to_owned(),
                phase(|p| p.exposed_communication),
            ),
        ])
    }
}

impl MetricsSink for StepTimings {
    fn on_step(&mut self, step: &StepMetrics) {
        self.record(step);
    }

    fn on_evaluation(&mut self, _evaluation: &EvaluationMetrics) {}
}

/// A [`MetricsSink`] that reports to the coordinator and keeps per-step timings for medians.
pub struct CoordinatorMetrics {
    /// Latest snapshot; the reporter task sends it when it changes.
    latest: watch::Sender<RankMetrics>,
    /// Runtime of the reporter task.
    runtime: Handle,
    /// Client of the rendezvous service (which takes metrics).
    client: RendezvousClient<CoordinatorConnection>,
    /// What the rank's communicators are doing.
    progress: Progress,
    /// Per-step compute times not reported yet, shared with the reporter task.
    compute_times: Arc<Mutex<ComputeTimes>>,
    /// Checkpoint events and an early stop not delivered yet, shared with the reporter task.
    pending: Arc<Mutex<PendingEvents>>,
    /// The job.
    job_id: String,
    /// Every step's times, for the medians.
    timings: StepTimings,
    /// How evaluations are named in the log: the split and what an example is.
    evaluation_words: (&'static str, &'static str),
}

impl CoordinatorMetrics {
    /// Starts the reporter task on `runtime`.
    pub fn start(
        runtime: Handle,
        client: RendezvousClient<CoordinatorConnection>,
        job_id: String,
        rank: u32,
        progress: Progress,
    ) -> Self {
        let (latest, mut changes) = watch::channel(RankMetrics {
            rank,
            ..RankMetrics::default()
        });
        let mut reporter = client.clone();
        let reporter_job = job_id.clone();
        let reported_progress = progress.clone();
        let compute_times = Arc::new(Mutex::new(ComputeTimes::default()));
        let reported_times = Arc::clone(&compute_times);
        let pending = Arc::new(Mutex::new(PendingEvents::default()));
        let reported_events = Arc::clone(&pending);
        runtime.spawn(async move {
            let mut previous = Vec::new();
            loop {
                // A new step, or the progress interval without one.
                if let Ok(Err(_)) = tokio::time::timeout(PROGRESS_INTERVAL, changes.changed()).await
                {
                    break;
                }
                let mut metrics = changes.borrow_and_update().clone();
                let snapshot = reported_progress.snapshot();
                communication_figures(&previous, &snapshot, &mut metrics.extra);
                metrics.collectives = collectives(&snapshot);
                previous = snapshot;
                lock(&reported_times).take(&mut metrics);
                lock(&reported_events).fill(&mut metrics);
                if send(&mut reporter, &reporter_job, &mut metrics).await {
                    lock(&reported_events).delivered(&metrics);
                }
                tokio::time::sleep(REPORT_INTERVAL).await;
            }
        });
        Self {
            latest,
            runtime,
            client,
            progress,
            compute_times,
            pending,
            job_id,
            timings: StepTimings::default(),
            evaluation_words: ("test", "examples"),
        }
    }

    /// Names evaluations as a language model's: validation loss over tokens.
    pub fn for_language_model(mut self) -> Self {
        self.evaluation_words = ("validation", "tokens");
        self
    }

    /// Medians of the per-step figures (steps after warm-up), as named extra metrics.
    pub fn medians(&self) -> HashMap<String, f64> {
        self.timings.medians()
    }

    /// Sends the final figures (with the timing medians) and waits until the coordinator has
    /// them.
    pub fn finish(&mut self) {
        let medians = self.medians();
        self.latest
            .send_modify(|metrics| metrics.extra.extend(medians));
        let mut metrics = self.latest.borrow().clone();
        metrics.collectives = collectives(&self.progress.snapshot());
        lock(&self.compute_times).take(&mut metrics);
        self.send_now(metrics);
    }

    /// Sends `metrics` with the undelivered events from the training thread and waits for the
    /// answer (for events: the coordinator should know of a checkpoint before the next one is
    /// written, and of everything before the rank exits).
    fn send_now(&mut self, mut metrics: RankMetrics) {
        lock(&self.pending).fill(&mut metrics);
        let mut client = self.client.clone();
        let job_id = self.job_id.clone();
        if self
            .runtime
            .block_on(send(&mut client, &job_id, &mut metrics))
        {
            lock(&self.pending).delivered(&metrics);
        }
        let undelivered = !lock(&self.pending).is_empty();
        if undelivered {
            warn!("checkpoint events not delivered yet; the next report carries them");
        }
    }

    /// Queues an event and sends it at once with the latest figures.
    fn report_event(&mut self, add: impl FnOnce(&mut PendingEvents)) {
        add(&mut lock(&self.pending));
        let metrics = self.latest.borrow().clone();
        self.send_now(metrics);
    }
}

/// The collectives whose bytes and time make a bus bandwidth.
const GROUP_OPERATIONS: [&str; 4] = ["all_reduce", "broadcast", "all_gather", "reduce_scatter"];

/// Adds, from the communicators' records at the previous report (`earlier`) and now (`now`),
/// the bus bandwidth of the first group's collectives (`allreduce_busbw_gbps`, 1e9 bytes/s)
/// and the mean time of a parameter-server exchange (`ps_exchange_latency_s`), when
/// operations completed in between.
fn communication_figures(
    earlier: &[ChannelProgress],
    now: &[ChannelProgress],
    extra: &mut HashMap<String, f64>,
) {
    let before = |channel: &ChannelProgress| earlier.iter().find(|e| e.channel == channel.channel);
    let bandwidth = now
        .iter()
        .filter(|channel| GROUP_OPERATIONS.contains(&channel.operation))
        .find_map(|channel| channel.bus_bandwidth_since(before(channel)?));
    if let Some(bytes_per_second) = bandwidth {
        extra.insert("allreduce_busbw_gbps".to_owned(), bytes_per_second / 1e9);
    }
    let latency = now
        .iter()
        .filter(|channel| channel.channel.starts_with("parameter-servers/"))
        .find_map(|channel| channel.mean_latency_since(before(channel)?));
    if let Some(latency) = latency {
        extra.insert("ps_exchange_latency_s".to_owned(), latency.as_secs_f64());
    }
}

/// The communicators' progress, as reported.
fn collectives(snapshot: &[ChannelProgress]) -> Vec<CollectiveProgress> {
    snapshot
        .iter()
        .cloned()
        .map(|channel| CollectiveProgress {
            channel: channel.channel,
            entered: channel.entered,
            completed: channel.completed,
            operation: channel.operation.to_owned(),
            bytes: channel.bytes,
            peer: channel.peer,
            since_unix_ms: channel.since_unix_ms,
        })
        .collect()
}

/// Sends one report; returns whether the coordinator took it.
async fn send(
    client: &mut RendezvousClient<CoordinatorConnection>,
    job_id: &str,
    metrics: &mut RankMetrics,
) -> bool {
    metrics.reported_at_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64);
    let request = ReportMetricsRequest {
        job_id: job_id.to_owned(),
        metrics: Some(metrics.clone()),
    };
    match client.report_metrics(request).await {
        Ok(_) => true,
        Err(status) => {
            warn!(%status, "could not report metrics");
            false
        }
    }
}

impl MetricsSink for CoordinatorMetrics {
    fn on_step(&mut self, step: &StepMetrics) {
        self.timings.record(step);
        let timings = &step.timings;
        let compute = timings
            .total()
            .saturating_sub(timings.exposed_communication);
        lock(&self.compute_times).push(step.step, compute.as_secs_f64());
        self.latest.send_modify(|metrics| {
            metrics.step = step.step;
            metrics.total_steps = step.total_steps;
            // 1-based, as in the per-epoch log lines.
            metrics.epoch = step.epoch as u32 + 1;
            metrics.loss = f64::from(step.loss);
            metrics.samples_per_s = step.samples_per_second;
            metrics
                .extra
                .insert("learning_rate".to_owned(), step.learning_rate);
            // Mixed precision: the loss scale (1 without fp16 scaling), skipped steps, and the
            // gradient bytes this rank exchanged in its last step.
            metrics
                .extra
                .insert("loss_scale".to_owned(), step.loss_scale);
            metrics
                .extra
                .insert("skipped_steps".to_owned(), step.skipped_steps as f64);
            metrics
                .extra
                .insert("gradient_bytes".to_owned(), step.gradient_bytes as f64);
        });
    }

    fn on_evaluation(&mut self, evaluation: &EvaluationMetrics) {
        if self.latest.borrow().rank == 0 {
            // One line per epoch in the job's log, next to the progress bar's figures.
            let (split, units) = self.evaluation_words;
            println!(
                "epoch {} step {}: {split} loss {:.4}, {split} accuracy {:.2}% ({} {units})",
                evaluation.epoch + 1,
                evaluation.step,
                evaluation.loss,
                evaluation.accuracy * 100.0,
                evaluation.examples
            );
        }
        self.latest.send_modify(|metrics| {
            metrics.eval_loss = Some(f64::from(evaluation.loss));
            metrics.eval_accuracy = Some(f64::from(evaluation.accuracy));
        });
    }

    fn on_checkpoint(&mut self, checkpoint: &cohort_trainer::CheckpointWritten) {
        let path = checkpoint.path.display();
        info!(step = checkpoint.step, %path, bytes = checkpoint.bytes, "checkpoint written");
        println!("checkpoint at step {}: {path}", checkpoint.step);
        let event = CheckpointWritten {
            step: checkpoint.step,
            epoch: checkpoint.epoch,
            path: checkpoint.path.display().to_string(),
            bytes: checkpoint.bytes,
            eval_loss: checkpoint
                .evaluation
                .as_ref()
                .map(|evaluation| f64::from(evaluation.loss)),
            eval_accuracy: checkpoint
                .evaluation
                .as_ref()
                .map(|evaluation| f64::from(evaluation.accuracy)),
        };
        self.report_event(|pending| pending.written.push(event));
    }

    fn on_checkpoint_deleted(&mut self, step: u64, path: &Path) {
        info!(step, path = %path.display(), "checkpoint deleted by retention");
        println!(
            "checkpoint of step {step} deleted (retention): {}",
            path.display()
        );
        self.report_event(|pending| pending.deleted.push(step));
    }

    fn on_early_stop(&mut self, stop: &cohort_trainer::EarlyStop) {
        let report = EarlyStopReport {
            step: stop.step,
            best_step: stop.best_step,
            best_value: stop.best_value,
            metric: stop.objective.metric.name().to_owned(),
            patience: stop.patience,
        };
        self.report_event(|pending| pending.early_stop = Some(report));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_carry_the_bus_bandwidth_and_the_server_latency_since_the_last() {
        let progress = Progress::default();
        let ring = progress.channel("data-parallel", 2);
        let servers = progress.channel("parameter-servers/rank-0", 1);
        let earlier = progress.snapshot();
        let mut extra = HashMap::new();
        communication_figures(&earlier, &earlier, &mut extra);
        assert!(extra.is_empty(), "nothing completed: {extra:?}");
        ring.run("all_reduce", 1 << 20, None, || Ok::<_, ()>(()))
            .unwrap();
        servers
            .run("push_pull", 64, None, || Ok::<_, ()>(()))
            .unwrap();
        communication_figures(&earlier, &progress.snapshot(), &mut extra);
        assert!(extra["allreduce_busbw_gbps"] > 0.0, "{extra:?}");
        assert!(extra["ps_exchange_latency_s"] >= 0.0, "{extra:?}");
    }

    #[test]
    fn checkpoint_events_ride_every_report_until_one_is_answered() {
        let checkpoint = |step| CheckpointWritten {
            step,
            path: format!("/out/step-{step}"),
            ..CheckpointWritten::default()
        };
        let mut pending = PendingEvents::default();
        pending.written.extend((0..70).map(checkpoint));
        pending.deleted.push(5);
        let mut first = RankMetrics::default();
        pending.fill(&mut first);
        assert_eq!(first.checkpoints.len(), MAX_EVENTS_PER_REPORT);
        // Not answered: the next report carries the same events.
        let mut again = RankMetrics::default();
        pending.fill(&mut again);
        assert_eq!(again.checkpoints, first.checkpoints);
        // An event added while a report was out stays for the next.
        pending.written.push(checkpoint(100));
        pending.delivered(&again);
        assert_eq!(
            pending.written.iter().map(|c| c.step).collect::<Vec<_>>(),
            [64, 65, 66, 67, 68, 69, 100]
        );
        assert!(pending.deleted.is_empty());
        pending.early_stop = Some(EarlyStopReport::default());
        let mut last = RankMetrics::default();
        pending.fill(&mut last);
        pending.delivered(&last);
        assert!(pending.is_empty());
    }

    #[test]
    fn reports_carry_every_step_time_since_the_last_once() {
        let mut times = ComputeTimes::default();
        let mut metrics = RankMetrics::default();
        for (step, seconds) in [(7, 0.010), (8, 0.011), (9, 0.5)] {
            times.push(step, seconds);
        }
        times.take(&mut metrics);
        assert_eq!(metrics.first_timed_step, 7);
        assert_eq!(metrics.step_compute_s, [0.010, 0.011, 0.5]);
        times.push(10, 0.012);
        times.take(&mut metrics);
        assert_eq!(
            (metrics.first_timed_step, metrics.step_compute_s.len()),
            (10, 1)
        );
        // Unsent, the oldest go first.
        for step in 11..11 + MAX_REPORTED_STEPS as u64 + 5 {
            times.push(step, 0.001);
        }
        times.take(&mut metrics);
        assert_eq!(metrics.step_compute_s.len(), MAX_REPORTED_STEPS);
        assert_eq!(metrics.first_timed_step, 16);
    }
}
