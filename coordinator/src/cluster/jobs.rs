//! Job operations: submission, cancellation, inspection, metrics, and job outcomes decided from
//! rank reports.

use cohort_proto::v1::JobInfo;
use cohort_proto::{JobId, NodeId};
use tracing::{info, instrument, warn};

use super::persistence::{Written, all_landed};
use super::{Cluster, JobSlot, LiveJob, State};
use crate::convert::{self, RankReport};
use crate::error::{Error, Result};
use crate::hangs::{ChannelState, CommunicationWatch};
use crate::lifecycle::JobState;
use crate::limits::{DEFAULT_LIST_PAGE, MAX_LIST_PAGE};
use crate::model::{
    JobRecord, MetricsRecord, ProcessRole, RankRecord, RankState, StopCause, now_ms,
};
use crate::placement::{self, QueuedJob};
use crate::stragglers::{StepTimes, StragglerWatch};

/// What one metrics report of a rank carries.
#[derive(Debug, Clone)]
pub struct MetricsReport {
    /// The rank's latest figures.
    pub metrics: MetricsRecord,
    /// What its communicators are doing (hang diagnosis).
    pub progress: Vec<ChannelState>,
    /// Compute times of its steps since its last report (straggler detection).
    pub step_times: StepTimes,
    /// Checkpoints it wrote or deleted, and an early stop.
    pub checkpoints: convert::CheckpointReport,
}

/// A job to submit and how.
#[derive(Debug, Clone)]
pub struct JobSubmission {
    /// The job file.
    pub spec_toml: String,
    /// Queue it even if it can never fit the cluster as it is now.
    pub wait_for_resources: bool,
    /// Who submits it.
    pub submitter: String,
    /// Start from this checkpoint of another job.
    pub resume_from: Option<crate::checkpoints::CheckpointRef>,
    /// The sweep trial it runs.
    pub trial: Option<crate::model::TrialTag>,
}

/// One page of the job listing.
pub struct JobPage {
    /// Summaries, oldest first.
    pub jobs: Vec<JobInfo>,
    /// Where the next page starts; empty after the last page.
    pub next_page_token: String,
}

/// How many job sequence numbers a coordinator reserves in the store at once: submissions take
/// them from memory, and a coordinator that stops leaves the rest of its block unused (job ids
/// then skip them).
const SEQ_BLOCK: u64 = 64;

/// Submissions between their queue-room check and their job entering memory, and the job
/// sequence numbers reserved for them.
#[derive(Default)]
pub(super) struct Submissions {
    /// The next reserved sequence number and the end of the block (exclusive).
    seqs: (u64, u64),
    /// Submissions whose record is being written, per submitter.
    pending: std::collections::HashMap<String, usize>,
}

impl Submissions {
    /// The next job sequence number, reserving a block in `store` when none is left.
    async fn next_seq(&mut self, store: &dyn crate::store::ClusterStore) -> Result<u64> {
        if self.seqs.0 >= self.seqs.1 {
            let first = store.reserve_job_seqs(SEQ_BLOCK).await?;
            self.seqs = (first, first + SEQ_BLOCK);
        }
        let seq = self.seqs.0;
        self.seqs.0 += 1;
        Ok(seq)
    }

    /// Pending submissions: all of them, and `submitter`'s.
    fn pending(&self, submitter: &str) -> (usize, usize) {
        (
            self.pending.values().sum(),
            self.pending.get(submitter).copied().unwrap_or(0),
        )
    }

    fn hold(&mut self, submitter: &str) {
        *self.pending.entry(submitter.to_owned()).or_default() += 1;
    }

    fn release(&mut self, submitter: &str) {
        if let Some(count) = self.pending.get_mut(submitter) {
            *count -= 1;
            if *count == 0 {
                self.pending.remove(submitter);
            }
        }
    }
}

impl Cluster {
    /// Refuses a job whose queue is not configured, or that asks for more devices than its
    /// queue's or a user's quota allows (it could never start).
    pub(super) fn check_quotas(&self, spec: &cohort_jobspec::JobSpec) -> Result<()> {
        let Some(queue) = self.config.queue(spec.queue()) else {
            return Err(Error::InvalidArgument(format!(
                "queue: {:?} is not a queue of this cluster (its queues: {})",
                spec.queue(),
                self.config.queue_names().join(", ")
            )));
        };
        let asked = u64::from(spec.processes()) * u64::from(spec.resources.devices_per_rank);
        let limits = [
            queue
                .quota
                .map(|quota| (quota, format!("queue {}'s quota", spec.queue()))),
            self.config
                .user_quota
                .map(|quota| (quota, "the quota of every user".to_owned())),
        ];
        for (quota, whose) in limits.into_iter().flatten() {
            if asked > quota {
                return Err(Error::Unschedulable(format!(
                    "job asks for {asked} devices, {whose} is {quota}: it could never start"
                )));
            }
        }
        Ok(())
    }

    /// Validates a spec, refuses it when the queue is full (in all, or for its submitter) or
    /// when it could never fit (unless `wait_for_resources`), stores it as queued and wakes the
    /// scheduler.
    ///
    /// The job enters memory only once its record is stored: a submission whose write fails
    /// is answered with the error and leaves nothing behind. No lock is held while the record
    /// is written: concurrent submissions share the writer's commits (group commit). Until
    /// its job enters memory a submission counts as pending, so the queue-room checks of the
    /// others see it; sequence numbers come from a block reserved in the store.
    #[instrument(skip(self, spec_toml))]
    pub async fn submit(
        &self,
        spec_toml: String,
        wait_for_resources: bool,
        submitter: String,
    ) -> Result<JobInfo> {
        self.submit_job(JobSubmission {
            spec_toml,
            wait_for_resources,
            submitter,
            resume_from: None,
            trial: None,
        })
        .await
    }

    /// [`Cluster::submit`] with every option: a checkpoint of another job to start from
    /// (resolved now, through that job's recorded versions, into the spec's
    /// `checkpoint.resume_from`), and the sweep trial the job runs.
    #[instrument(skip_all, fields(submitter = %submission.submitter))]
    pub async fn submit_job(&self, submission: JobSubmission) -> Result<JobInfo> {
        let JobSubmission {
            mut spec_toml,
            wait_for_resources,
            submitter,
            resume_from,
            trial,
        } = submission;
        if let Some(reference) = &resume_from {
            let path = self.resolve_checkpoint(reference).await?;
            spec_toml = cohort_jobspec::parse::with_field(
                &spec_toml,
                "checkpoint.resume_from",
                path.into(),
            )?;
        }
        let spec = cohort_jobspec::parse(&spec_toml)?;
        if resume_from.is_some() && spec.kind != cohort_jobspec::JobKind::Train {
            return Err(Error::InvalidArgument(
                "resume_from: only a kind = \"train\" job resumes from a checkpoint".to_owned(),
            ));
        }
        let mut submissions = self.submissions.lock().await;
        {
            let state = self.state.lock().await;
            self.check_queue_room(&state, &submissions, &submitter)?;
            self.check_quotas(&spec)?;
            if !wait_for_resources {
                let queued = QueuedJob {
                    job_id: JobId::new("candidate")?,
                    priority: spec.priority,
                    seq: 0,
                    ranks: spec.processes(),
                    devices_per_rank: spec.resources.devices_per_rank,
                    device_kind: spec.resources.device,
                    rank_group: spec.rank_group(),
                    avoid_nodes: Vec::new(),
                    min_ranks: 0,
                    owner: placement::Owner {
                        queue: spec.queue().to_owned(),
                        user: submitter.clone(),
                    },
                };
                let view = state.cluster_view(false);
                placement::check_could_ever_fit(&view, &queued).map_err(|why| {
                    Error::Unschedulable(format!(
                        "{why}; submit with --wait-for-resources to queue it until the cluster \
                         grows"
                    ))
                })?;
            }
        }
        let seq = submissions.next_seq(&*self.store).await?;
        let id = JobId::new(format!("{}-{seq}", spec.name))?;
        let record = JobRecord {
            id: id.clone(),
            seq,
            spec_toml,
            name: spec.name.clone(),
            kind: convert::kind_name(spec.kind).to_owned(),
            priority: spec.priority,
            ranks: spec.processes(),
            devices_per_rank: spec.resources.devices_per_rank,
            device_kind: spec.resources.device,
            wait_for_resources,
            submitter,
            state: JobState::Queued,
            reason: String::new(),
            blamed_rank: None,
            submitted_at_ms: now_ms(),
            scheduled_at_ms: None,
            started_at_ms: None,
            finished_at_ms: None,
            placement: Vec::new(),
            metrics: Default::default(),
            attempt: 0,
            max_restarts: spec.max_restarts(),
            min_ranks: spec.min_ranks().unwrap_or(0),
            attempts: Vec::new(),
            backoff: Vec::new(),
            checkpoints: Vec::new(),
            trial,
        };
        // Nothing else knows the job yet, so no other write of it can be queued before this one.
        let written = self.writes.put_job(&record);
        submissions.hold(&record.submitter);
        drop(submissions);
        let landed = written.landed().await;
        let mut submissions = self.submissions.lock().await;
        submissions.release(&record.submitter);
        landed?;
        self.logs.track(&id)?;
        info!(job_id = %id, ranks = record.ranks, priority = record.priority, "job queued");
        let job = LiveJob {
            record,
            spec,
            recovery: None,
            communication: CommunicationWatch::default(),
            stragglers: StragglerWatch::default(),
            waiting: None,
            early_stop: None,
        };
        let info = convert::job_info(&job.record);
        self.state
            .lock()
            .await
            .jobs
            .insert(seq, JobSlot::Live(Box::new(job)));
        drop(submissions);
        self.wake.notify_one();
        Ok(info)
    }

    /// Refuses a submission when the queue holds its most jobs, in all or for `submitter`.
    fn check_queue_room(
        &self,
        state: &State,
        submissions: &Submissions,
        submitter: &str,
    ) -> Result<()> {
        let (mut queued, mut theirs) = submissions.pending(submitter);
        for job in state
            .live_jobs()
            .filter(|job| job.record.state == JobState::Queued)
        {
            queued += 1;
            theirs += usize::from(job.record.submitter == submitter);
        }
        if queued >= self.config.max_queued_jobs {
            return Err(Error::ResourceExhausted(format!(
                "the queue holds {queued} jobs, the cluster's limit (--max-queued-jobs {}); \
                 submit again when some have started",
                self.config.max_queued_jobs
            )));
        }
        if theirs >= self.config.max_queued_jobs_per_submitter {
            return Err(Error::ResourceExhausted(format!(
                "submitter {submitter} has {theirs} jobs queued, the limit per submitter \
                 (--max-queued-jobs-per-submitter {}); submit again when some have started",
                self.config.max_queued_jobs_per_submitter
            )));
        }
        Ok(())
    }

    /// Returns one job: a live job from memory, a retired one read back from the store. Either
    /// is answered once every change it shows is stored (the writes queued before the read have
    /// landed), so no answer shows a state a crash could still undo.
    pub async fn job(&self, job_id: &JobId) -> Result<JobInfo> {
        let (live, stored) = {
            let state = self.state.lock().await;
            let live = match state.slot(job_id) {
                Some(JobSlot::Live(job)) => Some(job.info()),
                Some(JobSlot::Retired(_)) => None,
                None => return Err(Error::JobNotFound(job_id.to_string())),
            };
            (live, self.writes.barrier())
        };
        stored.landed().await?;
        if let Some(info) = live {
            return Ok(info);
        }
        match self.store.get_job(job_id).await? {
            Some(record) => Ok(convert::job_info(&record)),
            None => Err(Error::Store(format!(
                "job {job_id} is listed but its record is missing from the store"
            ))),
        }
    }

    /// Returns one page of job summaries, oldest first: at most `page_size` jobs (0: the
    /// default) submitted after the job `page_token` names (empty: from the first). Answered
    /// once every change it shows is stored.
    pub async fn jobs(&self, page_size: u32, page_token: &str) -> Result<JobPage> {
        let size = match page_size as usize {
            0 => DEFAULT_LIST_PAGE,
            size if size <= MAX_LIST_PAGE => size,
            size => {
                return Err(Error::InvalidArgument(format!(
                    "page_size = {size}, expected at most {MAX_LIST_PAGE}"
                )));
            }
        };
        let after = match page_token {
            "" => 0,
            token => token.parse::<u64>().map_err(|_| {
                Error::InvalidArgument(format!(
                    "page_token {}, expected a token from an earlier page",
                    cohort_proto::text::excerpt(token)
                ))
            })?,
        };
        let state = self.state.lock().await;
        let mut jobs = Vec::with_capacity(size.min(state.jobs.len()));
        let mut last = None;
        for (&seq, slot) in state.jobs.range(after.saturating_add(1)..).take(size) {
            jobs.push(match slot {
                JobSlot::Live(job) => {
                    let mut info =
                        convert::job_summary_info(&crate::model::JobSummary::of(&job.record));
                    if job.record.state == JobState::Queued
                        && let Some(waiting) = &job.waiting
                    {
                        info.waiting = waiting.to_string();
                    }
                    info
                }
                JobSlot::Retired(summary) => convert::job_summary_info(summary),
            });
            last = Some(seq);
        }
        let more = last.is_some_and(|last| state.jobs.range(last + 1..).next().is_some());
        let stored = self.writes.barrier();
        drop(state);
        stored.landed().await?;
        Ok(JobPage {
            jobs,
            next_page_token: match (more, last) {
                (true, Some(last)) => last.to_string(),
                _ => String::new(),
            },
        })
    }

    /// Cancels a job that has not ended: marks it cancelled and stops its ranks (SIGTERM, then
    /// SIGKILL after the job's grace period, done by the workers). Answers once the cancelled
    /// record is stored.
    #[instrument(skip(self), fields(%job_id))]
    pub async fn cancel(&self, job_id: &JobId) -> Result<JobInfo> {
        let mut writes = Vec::new();
        let mut state = self.state.lock().await;
        let ended = match state.slot(job_id) {
            None => return Err(Error::JobNotFound(job_id.to_string())),
            Some(JobSlot::Retired(summary)) => Some(summary.state),
            Some(JobSlot::Live(job)) => job.record.state.is_terminal().then_some(job.record.state),
        };
        if let Some(ended) = ended {
            return Err(Error::FailedPrecondition(format!(
                "job {job_id} already {}",
                ended.name()
            )));
        }
        self.finish_job(
            &mut state,
            job_id,
            JobState::Cancelled,
            "cancelled by user".to_owned(),
            &mut writes,
        )?;
        let live = match state.slot(job_id) {
            Some(JobSlot::Live(job)) => Some(convert::job_info(&job.record)),
            _ => None,
        };
        drop(state);
        all_landed(writes).await?;
        match live {
            Some(info) => Ok(info),
            None => self.job(job_id).await,
        }
    }

    /// Records a rank's latest metrics and tells watchers. Kept in memory and persisted with
    /// the job's next change. The report's progress goes to the job's hang watch, its step
    /// times to its straggler watch.
    pub async fn report_metrics(
        &self,
        job_id: &JobId,
        rank: u32,
        report: MetricsReport,
    ) -> Result<()> {
        let MetricsReport {
            metrics,
            progress,
            step_times,
            checkpoints,
        } = report;
        let mut state = self.state.lock().await;
        let Some(job) = state.live_mut(job_id) else {
            return Err(not_running(&state, job_id));
        };
        if rank >= job.spec.ranks() {
            return Err(Error::InvalidArgument(format!(
                "metrics.rank = {rank}, expected below the job's {} ranks",
                job.spec.ranks()
            )));
        }
        if !job.record.state.runs_attempt() {
            return Err(Error::FailedPrecondition(format!(
                "job {job_id} is {}, not running",
                job.record.state.name()
            )));
        }
        let mut flagged_nodes = Vec::new();
        {
            let attempt = job.record.attempt;
            let flagged =
                job.stragglers
                    .observe(attempt, rank, step_times.first_step, &step_times.seconds);
            for straggler in flagged {
                let node = job
                    .record
                    .placement
                    .get(straggler.rank as usize)
                    .map(|placed| placed.node_id.clone());
                warn!(
                    %job_id,
                    rank = straggler.rank,
                    node = node.as_ref().map(ToString::to_string),
                    slowdown = straggler.slowdown,
                    step = straggler.since_step,
                    "straggler: the rank computes its steps slower than the job's other ranks"
                );
                flagged_nodes.extend(node);
            }
        }
        job.record.metrics.insert(rank, metrics.clone());
        job.communication
            .observe(job.record.attempt, rank, progress, now_ms());
        if let Some(early_stop) = checkpoints.early_stop {
            job.early_stop = Some(early_stop);
        }
        // Checkpoint versions are what a later `--resume-from JOB@...` resolves through: stored
        // with the record at once (they are rare), not with the next state change.
        let versions_changed = !checkpoints.written.is_empty() || !checkpoints.deleted.is_empty();
        for mut written in checkpoints.written {
            written.attempt = job.record.attempt;
            crate::checkpoints::record(&mut job.record.checkpoints, written);
        }
        crate::checkpoints::mark_deleted(&mut job.record.checkpoints, &checkpoints.deleted);
        let stored = versions_changed.then(|| self.writes.put_job(&job.record));
        let job: &LiveJob = job;
        self.publish(job);
        let now = now_ms();
        for node_id in flagged_nodes {
            if let Some(node) = state.nodes.get_mut(&node_id) {
                node.stragglers.add_flag(now);
            }
        }
        drop(state);
        if let Some(stored) = stored {
            stored.landed().await?;
        }
        self.record_history(job_id, rank, &metrics).await
    }

    /// Checks that `session_id` is the live session of node `node_id` and that the node runs
    /// (or ran) a rank of `job_id`, so that only a job's own workers add to its log.
    pub async fn check_log_source(
        &self,
        node_id: &NodeId,
        session_id: &str,
        job_id: &JobId,
    ) -> Result<()> {
        let state = self.state.lock().await;
        let registered = state
            .nodes
            .get(node_id)
            .and_then(|node| node.session.as_ref())
            .is_some_and(|session| session.token.matches(session_id));
        if !registered {
            return Err(Error::UnknownSession(node_id.to_string()));
        }
        let Some(job) = state.live(job_id) else {
            return Err(not_running(&state, job_id));
        };
        if job
            .record
            .placement
            .iter()
            .any(|rank| &rank.node_id == node_id)
        {
            Ok(())
        } else {
            Err(Error::FailedPrecondition(format!(
                "node {node_id} runs no rank of job {job_id}"
            )))
        }
    }

    /// Checks that `token` is job `job_id`'s own and that the job still runs: what a job's
    /// processes show for its rendezvous and metrics. A job's token stops working when it ends.
    pub async fn check_job_token(&self, job_id: &JobId, token: Option<&str>) -> Result<()> {
        let Some(token) = token else {
            return Err(Error::Unauthenticated(format!(
                "no credentials: job {job_id}'s rendezvous and metrics take the job's token \
                 ({} in its processes' environment)",
                cohort_proto::env::JOB_TOKEN
            )));
        };
        // One look at the job gives the attempt whose token it takes and whether it runs; a
        // job that does not run is refused after the token, so that a caller without the token
        // learns nothing of which jobs exist.
        let (attempt, running) = {
            let state = self.state.lock().await;
            let attempt = state.live(job_id).map_or(0, |job| job.record.attempt);
            (attempt, running_check(&state, job_id))
        };
        if !self
            .job_tokens
            .verify_for_attempt(job_id.as_str(), attempt, token)
        {
            return Err(Error::PermissionDenied(format!(
                "the token is not job {job_id}'s (of its current attempt): only the job's own \
                 processes may use its rendezvous and metrics"
            )));
        }
        running
    }

    /// Checks that a job exists and is placed (holds its devices).
    pub async fn check_live(&self, job_id: &JobId) -> Result<()> {
        running_check(&*self.state.lock().await, job_id)
    }

    /// Applies checked rank reports of node `node_id` and decides the outcome of every job
    /// they touch: running once every rank runs, failed as soon as one rank fails, succeeded
    /// once every rank exited 0. The records to store go on `writes`.
    pub(super) fn apply_rank_reports(
        &self,
        state: &mut State,
        node_id: &NodeId,
        reports: &[RankReport],
        writes: &mut Vec<Written>,
    ) -> Result<()> {
        let mut touched: Vec<JobId> = Vec::new();
        for report in reports {
            let process = (report.job_id.as_str(), report.rank, report.attempt);
            let Some(job) = state.live_mut(&report.job_id) else {
                // Unknown, or retired: every process of it was known to be gone.
                if report.state == RankState::Running {
                    self.stop_stray_rank(state, node_id, process, false);
                }
                continue;
            };
            if report.attempt != job.record.attempt {
                // A process of an earlier attempt, which the restart knew to be gone (its node
                // was lost): stop it should it still run; its end changes nothing now.
                if report.state == RankState::Running {
                    self.stop_stray_rank(state, node_id, process, true);
                }
                continue;
            }
            let ended = !job.record.state.runs_attempt();
            let Some(rank) = job
                .record
                .placement
                .iter_mut()
                .find(|r| r.rank == report.rank && &r.node_id == node_id)
            else {
                self.stop_stray_rank(state, node_id, process, false);
                continue;
            };
            if report.state == RankState::Running && ended {
                // The attempt ended (cancel, another rank failed) and this rank still runs:
                // the stop may have been lost with a dropped stream. Ask again.
                rank.pid = report.pid;
                self.stop_stray_rank(state, node_id, process, true);
                continue;
            }
            if rank.state.is_final() || report.state == RankState::Pending {
                continue;
            }
            let changed = rank.state != report.state || rank.pid != report.pid;
            rank.state = report.state;
            rank.pid = report.pid;
            rank.exit_code = report.exit_code;
            rank.signal = report.signal;
            rank.exited_at_ms = report.exited_at_ms;
            rank.detail = report.detail.clone();
            rank.stop_cause = report.stop_cause;
            let recovered = job
                .recovery
                .as_mut()
                .is_some_and(|recovery| recovery.reported.insert(report.rank));
            if (changed || recovered) && !touched.contains(&report.job_id) {
                touched.push(report.job_id.clone());
            }
        }
        for job_id in touched {
            self.settle_job(state, &job_id, writes)?;
        }
        Ok(())
    }

    /// Decides a live job's state from its ranks' states, enqueues its record on `writes`, and
    /// retires the job once it has ended and every process of it is gone.
    pub(super) fn settle_job(
        &self,
        state: &mut State,
        job_id: &JobId,
        writes: &mut Vec<Written>,
    ) -> Result<()> {
        let Some(job) = state.live_mut(job_id) else {
            return Ok(());
        };
        let ranks = job.spec.ranks();
        if job.record.state.is_terminal() {
            // Ranks of an ended job still report their end: keep the record current, and let
            // the earliest rank failure stay the reason (the root cause, not its echoes in the
            // ranks that lost a peer).
            if let (Some(blamed), Some(earliest)) = (
                job.record.blamed_rank,
                earliest_failure(&job.record.placement, ranks),
            ) && earliest.rank != blamed
            {
                job.record.reason = failure_reason(earliest, ranks);
                job.record.blamed_rank = Some(earliest.rank);
                let node = earliest.node_id.clone();
                if let Some(ended) = job.record.attempts.last_mut() {
                    ended.reason = job.record.reason.clone();
                    ended.failed_node = Some(node);
                }
            }
            writes.push(self.writes.put_job(&job.record));
            self.retire_if_done(state, job_id);
            return Ok(());
        }
        if job.record.state == JobState::Restarting {
            // The failed attempt's processes report their ends; once all are gone the next
            // attempt queues.
            if !self.requeue_if_stopped(state, job_id, writes)?
                && let Some(job) = state.live(job_id)
            {
                writes.push(self.writes.put_job(&job.record));
            }
            return Ok(());
        }
        let placement = &job.record.placement;
        if let Some(failed) = earliest_failure(placement, ranks) {
            let reason = failure_reason(failed, ranks);
            let node = failed.node_id.clone();
            let input_error = i32::from(cohort_proto::launch::EXIT_INPUT_ERROR);
            let retryable = failed.exit_code != Some(input_error);
            job.record.blamed_rank = Some(failed.rank);
            return self.fail_attempt(state, job_id, (reason, retryable), Some(node), writes);
        }
        // The job is done when its training ranks are; its parameter servers are then stopped.
        if placement
            .iter()
            .filter(|r| ProcessRole::of(r.rank, ranks) == ProcessRole::Rank)
            .all(|r| r.succeeded())
        {
            let reason = job.early_stop.clone().unwrap_or_default();
            return self.finish_job(state, job_id, JobState::Succeeded, reason, writes);
        }
        let all_started = placement
            .iter()
            .all(|r| r.state == RankState::Running || r.succeeded());
        if job.record.state == JobState::Scheduled && all_started {
            job.record.state =
                crate::lifecycle::transition(job_id.as_str(), job.record.state, JobState::Running)?;
            job.record.started_at_ms = Some(now_ms());
            info!(%job_id, "job running");
        }
        if job
            .recovery
            .as_ref()
            .is_some_and(|recovery| recovery.reported.len() == placement.len())
        {
            info!(%job_id, "every rank re-reported after the coordinator restarted");
            job.recovery = None;
        }
        writes.push(self.writes.put_job(&job.record));
        Ok(())
    }
}

/// Whether an attempt of the job runs (its processes may use its rendezvous), or why not.
fn running_check(state: &State, job_id: &JobId) -> Result<()> {
    match state.live(job_id) {
        Some(job) if job.record.state.runs_attempt() => Ok(()),
        Some(job) => Err(Error::FailedPrecondition(format!(
            "job {job_id} is {}, not running",
            job.record.state.name()
        ))),
        None => Err(not_running(state, job_id)),
    }
}

/// Why a job is not live: unknown, or retired (ended, every process gone).
fn not_running(state: &State, job_id: &JobId) -> Error {
    match state.slot(job_id) {
        None => Error::JobNotFound(job_id.to_string()),
        Some(JobSlot::Retired(summary)) => Error::FailedPrecondition(format!(
            "job {job_id} is {}, not running",
            summary.state.name()
        )),
        Some(JobSlot::Live(job)) => {
            warn!(%job_id, "asked why a live job is not live");
            Error::FailedPrecondition(format!("job {job_id} is {}", job.record.state.name()))
        }
    }
}

/// The failure that ended the job, of a job with `ranks` training ranks: the failed process
/// that ended first (ties by index), preferring root causes over the processes Cohort itself
/// stopped because of them. A parameter server fails by ending at all: it serves until stopped.
pub(super) fn earliest_failure(placement: &[RankRecord], ranks: u32) -> Option<&RankRecord> {
    let failed: Vec<&RankRecord> = placement
        .iter()
        .filter(|rank| {
            rank.state.is_final()
                && (!rank.succeeded() || ProcessRole::of(rank.rank, ranks) != ProcessRole::Rank)
        })
        .collect();
    let first_end = failed
        .iter()
        .filter(|rank| rank.stop_cause != StopCause::Instructed)
        .filter_map(|rank| rank.exited_at_ms)
        .min();
    // A process killed by a signal Cohort did not send (the OOM killer, an operator, a crash)
    // did not end because a peer went away: its peers' ends, noticed a moment later but
    // possibly reaped sooner on a busier node, are echoes of it.
    let killed_first = |rank: &RankRecord| {
        rank.stop_cause == StopCause::None
            && rank.signal.is_some()
            && rank
                .exited_at_ms
                .zip(first_end)
                .is_some_and(|(at, first)| at <= first.saturating_add(ROOT_CAUSE_WINDOW_MS))
    };
    failed.into_iter().min_by_key(|rank| {
        (
            rank.stop_cause == StopCause::Instructed,
            !killed_first(rank),
            rank.exited_at_ms.unwrap_or(i64::MAX),
            rank.rank,
        )
    })
}

/// How long after the first failure of an attempt a process killed by a foreign signal is still
/// taken for its root cause, before processes that exited on their own (as a rank does when
/// its peer disconnects). Workers on different nodes reap and report their processes with
/// delays of this order.
const ROOT_CAUSE_WINDOW_MS: i64 = 2_000;

/// The reason a failed process gives its job, naming the cause: `rank 2 on node n1 exited with
/// code 3: error: ...`, `node n1 left: its worker was shut down and stopped rank 2`.
pub(super) fn failure_reason(rank: &RankRecord, ranks: u32) -> String {
    let process = ProcessRole::of(rank.rank, ranks).describe(rank.rank);
    let node = &rank.node_id;
    match rank.stop_cause {
        StopCause::WorkerShutdown => {
            format!("node {node} left: its worker was shut down and stopped {process}")
        }
        StopCause::CoordinatorLost => format!(
            "node {node} lost the coordinator: its worker heard nothing for the heartbeat \
             deadline and stopped {process}"
        ),
        StopCause::WorkerRestarted => format!(
            "the worker of node {node} died and restarted: {process} had outlived it and was \
             killed"
        ),
        StopCause::Instructed | StopCause::None => {
            format!("{process} on node {node} {}", rank.describe_end())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(
        rank: u32,
        state: RankState,
        exit_code: Option<i32>,
        exited_at_ms: Option<i64>,
    ) -> RankRecord {
        RankRecord {
            rank,
            node_id: NodeId::new(format!("node-{rank}")).unwrap(),
            local_rank: 0,
            devices: vec![0],
            state,
            pid: 100 + rank,
            exit_code,
            signal: None,
            exited_at_ms,
            detail: String::new(),
            stop_cause: StopCause::None,
        }
    }

    #[test]
    fn the_rank_that_failed_first_is_blamed() {
        let placement = vec![
            rank(0, RankState::Running, None, None),
            rank(1, RankState::Exited, Some(1), Some(2_000)),
            rank(2, RankState::Exited, Some(0), Some(500)),
            rank(3, RankState::Exited, Some(3), Some(1_000)),
        ];
        let blamed = earliest_failure(&placement, 4).unwrap();
        assert_eq!(
            blamed.rank, 3,
            "rank 2 succeeded; rank 3 failed before rank 1"
        );
        assert_eq!(
            failure_reason(blamed, 4),
            "rank 3 on node node-3 exited with code 3"
        );
    }

    #[test]
    fn a_rank_killed_from_outside_is_blamed_over_peers_that_exited_a_moment_before() {
        let killed = |rank_number, at| RankRecord {
            signal: Some(9),
            ..rank(rank_number, RankState::Exited, None, Some(at))
        };
        // Rank 1 lost its peer and exited 1; the worker of rank 2's node reaped it later.
        let placement = vec![
            rank(0, RankState::Exited, Some(1), Some(1_300)),
            rank(1, RankState::Exited, Some(1), Some(1_000)),
            killed(2, 1_200),
        ];
        assert_eq!(earliest_failure(&placement, 3).unwrap().rank, 2);
        // Killed long after the first failure: an echo of it, not its cause.
        let placement = vec![
            rank(1, RankState::Exited, Some(1), Some(1_000)),
            killed(2, 1_000 + ROOT_CAUSE_WINDOW_MS + 1),
        ];
        assert_eq!(earliest_failure(&placement, 3).unwrap().rank, 1);
        // Stopped by Cohort: never the cause.
        let stopped = RankRecord {
            stop_cause: StopCause::Instructed,
            ..killed(2, 900)
        };
        let placement = vec![rank(1, RankState::Exited, Some(1), Some(1_000)), stopped];
        assert_eq!(earliest_failure(&placement, 3).unwrap().rank, 1);
    }

    #[test]
    fn no_failure_when_every_rank_ran_or_succeeded() {
        let placement = vec![
            rank(0, RankState::Running, None, None),
            rank(1, RankState::Exited, Some(0), Some(10)),
        ];
        assert!(earliest_failure(&placement, 4).is_none());
    }

    #[test]
    fn a_lost_rank_without_exit_time_is_blamed_after_timed_failures() {
        let placement = vec![
            rank(0, RankState::Lost, None, None),
            rank(1, RankState::Exited, Some(9), Some(10)),
        ];
        assert_eq!(earliest_failure(&placement, 4).unwrap().rank, 1);
    }

    #[test]
    fn a_parameter_server_that_ends_at_all_is_blamed_by_shard() {
        // Two ranks, then the servers of shards 0 and 1 (processes 2 and 3).
        let placement = vec![
            rank(0, RankState::Running, None, None),
            rank(1, RankState::Exited, Some(1), Some(2_000)),
            rank(2, RankState::Running, None, None),
            rank(3, RankState::Exited, Some(0), Some(1_000)),
        ];
        let blamed = earliest_failure(&placement, 2).unwrap();
        assert_eq!(
            blamed.rank, 3,
            "a server exiting 0 mid-job is still a failure"
        );
        assert_eq!(
            failure_reason(blamed, 2),
            "parameter server shard 1 (process 3) on node node-3 exited with code 0"
        );
    }
}

#[cfg(test)]
mod queue_tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::CoordinatorConfig;
    use crate::store::embedded::EmbeddedStore;

    const SPEC: &str =
        "version = 1\nname = \"q\"\nkind = \"command\"\n[command]\nprogram = \"true\"\n";

    #[tokio::test]
    async fn the_queue_is_bounded_in_all_and_per_submitter() {
        let data_dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(data_dir.path()).unwrap());
        let config = CoordinatorConfig {
            data_dir: data_dir.path().to_owned(),
            max_queued_jobs: 3,
            max_queued_jobs_per_submitter: 2,
            ..CoordinatorConfig::default()
        };
        let cluster = Cluster::load(config, store).await.unwrap();
        let submit = |who: &str| cluster.submit(SPEC.to_owned(), true, who.to_owned());
        submit("alice").await.unwrap();
        submit("alice").await.unwrap();
        let error = submit("alice").await.unwrap_err();
        assert!(
            matches!(&error, Error::ResourceExhausted(message) if message.contains("submitter alice has 2 jobs queued")),
            "{error}"
        );
        submit("bob").await.unwrap();
        let error = submit("carol").await.unwrap_err();
        assert!(
            matches!(&error, Error::ResourceExhausted(message) if message.contains("the queue holds 3 jobs")),
            "{error}"
        );
        // A cancelled job leaves the queue and makes room.
        let first = cluster.jobs(0, "").await.unwrap().jobs[0].job_id.clone();
        cluster.cancel(&JobId::new(first).unwrap()).await.unwrap();
        submit("carol").await.unwrap();
        assert_eq!(cluster.jobs(0, "").await.unwrap().jobs.len(), 4);
    }

    #[tokio::test]
    async fn listing_pages_through_every_job_in_submission_order() {
        let data_dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(data_dir.path()).unwrap());
        let config = CoordinatorConfig {
            data_dir: data_dir.path().to_owned(),
            ..CoordinatorConfig::default()
        };
        let cluster = Cluster::load(config, store).await.unwrap();
        for _ in 0..7 {
            cluster
                .submit(SPEC.to_owned(), true, "me".to_owned())
                .await
                .unwrap();
        }
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = cluster.jobs(3, &token).await.unwrap();
            assert!(page.jobs.len() <= 3);
            assert!(page.jobs.iter().all(|job| job.spec_toml.is_empty()));
            seen.extend(page.jobs.into_iter().map(|job| job.job_id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let expected: Vec<_> = (1..=7).map(|seq| format!("q-{seq}")).collect();
        assert_eq!(seen, expected);
        assert!(cluster.jobs(5000, "").await.is_err());
        assert!(cluster.jobs(0, "not a token").await.is_err());
    }
}
