//! Sweeps as the cluster runs them: submitted, advanced on every background tick, cancelled,
//! and continued after a coordinator restart. The decisions are [`crate::sweeps`]'; this
//! module applies them.
//!
//! A trial segment is an ordinary job tagged with its sweep, trial and rung
//! ([`crate::model::TrialTag`], in the job's record). Exactly once: before a segment's job is
//! submitted, the sweep is stored with the trial running that rung (the intent); once the job
//! is stored, its id is added to the sweep. A coordinator killed between the two finds, when
//! it loads, the job by its tag and adopts it ([`Cluster::load`] calls [`adopt_tagged_jobs`]);
//! one killed before the job was stored finds a running trial without its job and submits it
//! then. So no segment runs twice and none is lost.

use std::collections::BTreeMap;

use cohort_jobspec::sweep::{Segment, SweepSpec, parse_sweep};
use cohort_proto::v1::{SweepInfo, TrialInfo};
use cohort_proto::{JobId, SweepId};
use tracing::{info, warn};

use super::{Cluster, JobSubmission};
use crate::checkpoints::{CheckpointRef, Selector};
use crate::error::{Error, Result};
use crate::lifecycle::JobState;
use crate::model::{JobRecord, SweepRecord, SweepState, TrialTag, now_ms};
use crate::sweeps::{Outcome, Plan, SearchState, TrialStatus, trial_values};

/// The sweeps the coordinator knows, with their parsed files.
#[derive(Default)]
pub(super) struct Sweeps {
    /// Every sweep by id, ended ones included (they are small: a sweep is not a job).
    by_id: BTreeMap<SweepId, LiveSweep>,
}

/// A sweep and its parsed file.
struct LiveSweep {
    record: SweepRecord,
    spec: SweepSpec,
}

impl Sweeps {
    /// The sweeps loaded from the store whose files still parse (one that does not is logged
    /// and left in the store).
    pub(super) fn load(records: Vec<SweepRecord>) -> Self {
        let mut sweeps = Self::default();
        for record in records {
            match parse_sweep(&record.spec_toml) {
                Ok(spec) => {
                    sweeps
                        .by_id
                        .insert(record.id.clone(), LiveSweep { record, spec });
                }
                Err(error) => {
                    warn!(sweep_id = %record.id, %error, "a stored sweep's file no longer parses; it is not continued");
                }
            }
        }
        sweeps
    }
}

impl Sweeps {
    /// Stores sweep `sweep_id` as it is in memory.
    pub(super) async fn store(
        &self,
        sweep_id: &SweepId,
        store: &dyn crate::store::ClusterStore,
    ) -> Result<()> {
        match self.by_id.get(sweep_id) {
            Some(sweep) => store.put_sweep(&sweep.record).await,
            None => Ok(()),
        }
    }
}

/// Adds every job in `jobs` tagged with a trial of a running sweep to that trial's jobs, where
/// the sweep does not list it yet (the coordinator stopped between storing the job and storing
/// the sweep). Returns the sweeps it changed.
pub(super) fn adopt_tagged_jobs<'a>(
    sweeps: &mut Sweeps,
    jobs: impl IntoIterator<Item = &'a JobRecord>,
) -> Vec<SweepId> {
    let mut tagged: Vec<(&TrialTag, u64, &JobId)> = jobs
        .into_iter()
        .filter_map(|job| job.trial.as_ref().map(|tag| (tag, job.seq, &job.id)))
        .collect();
    tagged.sort_by_key(|(_, seq, _)| *seq);
    let mut changed = Vec::new();
    for (tag, _, job_id) in tagged {
        let Some(sweep) = sweeps.by_id.get_mut(&tag.sweep_id) else {
            continue;
        };
        let jobs = trial_jobs_mut(&mut sweep.record, tag.trial);
        if jobs.contains(job_id) {
            continue;
        }
        if jobs.len() == tag.rung as usize {
            info!(sweep_id = %tag.sweep_id, trial = tag.trial, rung = tag.rung, %job_id, "adopting a trial's job stored before the coordinator stopped");
            jobs.push(job_id.clone());
            changed.push(tag.sweep_id.clone());
        } else {
            warn!(sweep_id = %tag.sweep_id, trial = tag.trial, rung = tag.rung, %job_id, known = jobs.len(), "a job tagged with a sweep trial does not fit its trial's jobs; left alone");
        }
    }
    changed.dedup();
    changed
}

/// The jobs of trial `trial`, made to exist.
fn trial_jobs_mut(record: &mut SweepRecord, trial: u32) -> &mut Vec<JobId> {
    let index = trial as usize;
    if record.trial_jobs.len() <= index {
        record.trial_jobs.resize_with(index + 1, Vec::new);
    }
    &mut record.trial_jobs[index]
}

impl Cluster {
    /// Validates a sweep file and stores the sweep; its first trials start on the next
    /// background tick (which this wakes).
    pub async fn submit_sweep(&self, spec_toml: String, submitter: String) -> Result<SweepInfo> {
        let spec = parse_sweep(&spec_toml)?;
        // The queue and quotas every trial job will meet: refused now rather than per trial.
        let (first, _) = spec.trial_job(
            &trial_values(&spec, 0),
            &Segment {
                name: trial_name(&spec, 0),
                stop_after: None,
                resume_from: None,
            },
        )?;
        self.check_quotas(&first)?;
        let seq = self.store.reserve_job_seqs(1).await?;
        let record = SweepRecord {
            id: SweepId::new(format!("{}-{seq}", spec.name))?,
            seq,
            spec_toml,
            name: spec.name.clone(),
            submitter,
            state: SweepState::Running,
            reason: String::new(),
            submitted_at_ms: now_ms(),
            finished_at_ms: None,
            search: SearchState::new(Plan::from_spec(&spec)),
            trial_jobs: Vec::new(),
        };
        let mut sweeps = self.sweeps.lock().await;
        self.store.put_sweep(&record).await?;
        info!(sweep_id = %record.id, searcher = spec.searcher.kind().name(), max_trials = spec.max_trials, "sweep submitted");
        let answer = sweep_info(&record, &spec, true);
        sweeps
            .by_id
            .insert(record.id.clone(), LiveSweep { record, spec });
        drop(sweeps);
        self.wake.notify_one();
        Ok(answer)
    }

    /// A sweep with its leaderboard, and its submitter (for access checks).
    pub async fn sweep(&self, sweep_id: &SweepId) -> Result<(SweepInfo, String)> {
        let sweeps = self.sweeps.lock().await;
        let sweep = sweeps
            .by_id
            .get(sweep_id)
            .ok_or_else(|| Error::SweepNotFound(sweep_id.to_string()))?;
        Ok((
            sweep_info(&sweep.record, &sweep.spec, true),
            sweep.record.submitter.clone(),
        ))
    }

    /// Every sweep's summary, oldest first.
    pub async fn sweeps(&self) -> Vec<SweepInfo> {
        let sweeps = self.sweeps.lock().await;
        let mut all: Vec<&LiveSweep> = sweeps.by_id.values().collect();
        all.sort_by_key(|sweep| sweep.record.seq);
        all.into_iter()
            .map(|sweep| sweep_info(&sweep.record, &sweep.spec, false))
            .collect()
    }

    /// Cancels a running sweep: no trial starts or resumes any more, and every running trial's
    /// job is cancelled.
    pub async fn cancel_sweep(&self, sweep_id: &SweepId) -> Result<SweepInfo> {
        let mut sweeps = self.sweeps.lock().await;
        let sweep = sweeps
            .by_id
            .get_mut(sweep_id)
            .ok_or_else(|| Error::SweepNotFound(sweep_id.to_string()))?;
        if sweep.record.state.is_terminal() {
            return Err(Error::FailedPrecondition(format!(
                "sweep {sweep_id} already {}",
                sweep.record.state.name()
            )));
        }
        let running: Vec<JobId> = running_jobs(&sweep.record);
        sweep.record.search.cancel();
        sweep.record.state = SweepState::Cancelled;
        sweep.record.reason = "cancelled by user".to_owned();
        sweep.record.finished_at_ms = Some(now_ms());
        self.store.put_sweep(&sweep.record).await?;
        info!(%sweep_id, trials = running.len(), "sweep cancelled");
        for job_id in running {
            match self.cancel(&job_id).await {
                Ok(_) | Err(Error::FailedPrecondition(_)) => {}
                Err(error) => warn!(%sweep_id, %job_id, %error, "cancelling a trial's job failed"),
            }
        }
        Ok(sweep_info(&sweep.record, &sweep.spec, true))
    }

    /// Advances every running sweep: records the trials whose jobs ended, starts or promotes
    /// trials as slots free up, and ends the sweeps that are done. Run by the background loop.
    pub(super) async fn advance_sweeps(&self) -> Result<()> {
        let mut sweeps = self.sweeps.lock().await;
        for sweep in sweeps.by_id.values_mut() {
            if sweep.record.state.is_terminal() {
                continue;
            }
            if let Err(error) = self.advance(sweep).await {
                warn!(sweep_id = %sweep.record.id, %error, "advancing a sweep failed; retried on the next tick");
            }
        }
        Ok(())
    }

    /// One step of one sweep; stores it whenever it changed.
    async fn advance(&self, sweep: &mut LiveSweep) -> Result<()> {
        let mut changed = self.collect_outcomes(sweep).await?;
        let actions = sweep.record.search.next();
        if !actions.is_empty() {
            // The intent first: a restarted coordinator submits what was decided here.
            self.store.put_sweep(&sweep.record).await?;
            changed = false;
        }
        // Segments decided earlier whose job was never stored (a crash, a store error).
        changed |= self.submit_missing_segments(sweep).await?;
        let search = &sweep.record.search;
        if search.is_done() && search.running() == 0 {
            let objective = search.plan().objective;
            let reported = search
                .trials()
                .iter()
                .any(|trial| trial.results.iter().any(|r| r.value.is_some()));
            sweep.record.state = if reported {
                SweepState::Succeeded
            } else {
                SweepState::Failed
            };
            if !reported {
                sweep.record.reason = format!("no trial reported {}", objective.metric);
            }
            sweep.record.finished_at_ms = Some(now_ms());
            info!(sweep_id = %sweep.record.id, state = sweep.record.state.name(), steps = search.total_steps(), "sweep ended");
            changed = true;
        }
        if changed {
            self.store.put_sweep(&sweep.record).await?;
        }
        Ok(())
    }

    /// Records the outcome of every running trial whose segment's job has ended; returns
    /// whether any was recorded.
    async fn collect_outcomes(&self, sweep: &mut LiveSweep) -> Result<bool> {
        let objective = sweep.record.search.plan().objective;
        let running: Vec<(u32, u32, u64)> = sweep
            .record
            .search
            .trials()
            .iter()
            .filter(|trial| trial.status == TrialStatus::Running)
            .map(|trial| {
                let earlier = trial.results.iter().map(|result| result.steps).sum();
                (trial.number, trial.rung, earlier)
            })
            .collect();
        let mut changed = false;
        for (trial, rung, earlier_steps) in running {
            let Some(job_id) = segment_job(&sweep.record, trial, rung) else {
                continue;
            };
            let job = self.job_record(&job_id).await?;
            if !job.state.is_terminal() {
                continue;
            }
            let final_step = job.metrics.values().map(|m| m.step).max().unwrap_or(0);
            let steps = final_step.saturating_sub(earlier_steps);
            let outcome = if job.state == JobState::Succeeded {
                let value = job
                    .metrics
                    .values()
                    .find_map(|metrics| metrics.evaluation(objective.metric))
                    .filter(|value| value.is_finite());
                Outcome::Succeeded { value, steps }
            } else {
                warn!(sweep_id = %sweep.record.id, trial, rung, %job_id, reason = %job.reason, "a trial's job did not succeed; the trial failed");
                Outcome::Failed { steps }
            };
            sweep.record.search.record(trial, rung, outcome)?;
            changed = true;
        }
        Ok(changed)
    }

    /// Submits the job of every running trial segment that has none; returns whether any
    /// changed the sweep.
    async fn submit_missing_segments(&self, sweep: &mut LiveSweep) -> Result<bool> {
        let missing: Vec<(u32, u32, Option<cohort_jobspec::sweep::Resource>)> = sweep
            .record
            .search
            .trials()
            .iter()
            .filter(|trial| trial.status == TrialStatus::Running)
            .filter(|trial| segment_job(&sweep.record, trial.number, trial.rung).is_none())
            .map(|trial| {
                let plan = sweep.record.search.plan();
                let stop_after = plan
                    .brackets
                    .get(trial.bracket as usize)
                    .and_then(|rungs| rungs.get(trial.rung as usize))
                    .copied()
                    .flatten();
                (trial.number, trial.rung, stop_after)
            })
            .collect();
        let mut changed = false;
        for (trial, rung, stop_after) in missing {
            match self.submit_segment(sweep, trial, rung, stop_after).await {
                Ok(job_id) => {
                    info!(sweep_id = %sweep.record.id, trial, rung, %job_id, "trial segment submitted");
                    trial_jobs_mut(&mut sweep.record, trial).push(job_id);
                }
                // The store may come back: the segment is submitted on a later tick.
                Err(error @ Error::Store(_)) => return Err(error),
                Err(error) => {
                    warn!(sweep_id = %sweep.record.id, trial, rung, %error, "a trial's job could not be submitted; the trial failed");
                    sweep
                        .record
                        .search
                        .record(trial, rung, Outcome::Failed { steps: 0 })?;
                    sweep.record.reason = format!("trial {trial}: {error}");
                }
            }
            changed = true;
        }
        Ok(changed)
    }

    /// Submits the job of trial `trial` up to rung `rung`: from scratch at rung 0, else
    /// resuming from the checkpoint its previous segment ended with.
    async fn submit_segment(
        &self,
        sweep: &LiveSweep,
        trial: u32,
        rung: u32,
        stop_after: Option<cohort_jobspec::sweep::Resource>,
    ) -> Result<JobId> {
        let resume_from = match rung.checked_sub(1) {
            None => None,
            Some(previous) => {
                let job_id = segment_job(&sweep.record, trial, previous).ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "trial {trial} has no job for rung {previous} to resume from"
                    ))
                })?;
                let reference = CheckpointRef {
                    job_id,
                    selector: Selector::Latest,
                };
                Some(self.resolve_checkpoint(&reference).await?)
            }
        };
        let segment = Segment {
            name: trial_name(&sweep.spec, trial),
            stop_after,
            resume_from,
        };
        let (_, spec_toml) = sweep
            .spec
            .trial_job(&trial_values(&sweep.spec, trial), &segment)?;
        let job = self
            .submit_job(JobSubmission {
                spec_toml,
                wait_for_resources: true,
                submitter: sweep.record.submitter.clone(),
                resume_from: None,
                trial: Some(TrialTag {
                    sweep_id: sweep.record.id.clone(),
                    trial,
                    rung,
                }),
            })
            .await?;
        Ok(JobId::new(job.job_id)?)
    }
}

/// The job name of trial `trial`'s segments: the sweep's name and the trial number.
fn trial_name(spec: &SweepSpec, trial: u32) -> String {
    format!("{}-t{trial}", spec.name)
}

/// The job that runs (or ran) trial `trial` up to rung `rung`.
fn segment_job(record: &SweepRecord, trial: u32, rung: u32) -> Option<JobId> {
    record
        .trial_jobs
        .get(trial as usize)
        .and_then(|jobs| jobs.get(rung as usize))
        .cloned()
}

/// The jobs of the trials that run now.
fn running_jobs(record: &SweepRecord) -> Vec<JobId> {
    record
        .search
        .trials()
        .iter()
        .filter(|trial| trial.status == TrialStatus::Running)
        .filter_map(|trial| segment_job(record, trial.number, trial.rung))
        .collect()
}

/// The protocol's view of a sweep; with `trials`, its leaderboard (best first).
fn sweep_info(record: &SweepRecord, spec: &SweepSpec, trials: bool) -> SweepInfo {
    let objective = record.search.plan().objective;
    let by_number = record.search.trials();
    let leaderboard = if trials {
        record
            .search
            .leaderboard()
            .into_iter()
            .filter_map(|standing| by_number.get(standing.trial as usize))
            .map(|trial| TrialInfo {
                trial: trial.number,
                parameters: trial_values(spec, trial.number)
                    .into_iter()
                    .map(|(path, value)| (path, value.to_string()))
                    .collect(),
                metric: trial.results.last().and_then(|result| result.value),
                rung: trial.rung,
                steps: trial
                    .results
                    .iter()
                    .map(|result| result.steps)
                    .sum::<u64>()
                    .saturating_add(trial.failed_steps),
                state: trial_state(trial.status).to_owned(),
                job_ids: record
                    .trial_jobs
                    .get(trial.number as usize)
                    .map(|jobs| jobs.iter().map(ToString::to_string).collect())
                    .unwrap_or_default(),
            })
            .collect()
    } else {
        Vec::new()
    };
    SweepInfo {
        sweep_id: record.id.to_string(),
        name: record.name.clone(),
        state: record.state.name().to_owned(),
        reason: record.reason.clone(),
        searcher: spec.searcher.kind().name().to_owned(),
        metric: objective.metric.name().to_owned(),
        mode: objective.mode.name().to_owned(),
        max_trials: spec.max_trials,
        max_concurrent_trials: spec.max_concurrent_trials,
        submitter: record.submitter.clone(),
        submitted_at_unix_ms: record.submitted_at_ms,
        finished_at_unix_ms: record.finished_at_ms.unwrap_or(0),
        steps_used: record.search.total_steps(),
        trials: leaderboard,
        spec_toml: if trials {
            record.spec_toml.clone()
        } else {
            String::new()
        },
    }
}

/// A trial status's name in output.
fn trial_state(status: TrialStatus) -> &'static str {
    match status {
        TrialStatus::Running => "running",
        TrialStatus::Paused => "paused",
        TrialStatus::Stopped => "stopped",
        TrialStatus::Completed => "completed",
        TrialStatus::Failed => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SWEEP: &str = "version = 1\nname = \"lr\"\n[sweep]\nmax_trials = 4\n\
        max_concurrent_trials = 2\n[sweep.parameters]\n\
        \"optimizer.lr\" = { loguniform = [1e-4, 1e-1] }\n[job]\nversion = 1\nkind = \"train\"\n";

    /// A running sweep whose first two trials were decided (their intent stored) and whose
    /// first trial's job is known.
    fn decided_sweep() -> SweepRecord {
        let spec = parse_sweep(SWEEP).unwrap();
        let mut search = SearchState::new(Plan::from_spec(&spec));
        assert_eq!(search.next().len(), 2);
        SweepRecord {
            id: SweepId::new("lr-1").unwrap(),
            seq: 1,
            spec_toml: SWEEP.to_owned(),
            name: "lr".to_owned(),
            submitter: "alice".to_owned(),
            state: SweepState::Running,
            reason: String::new(),
            submitted_at_ms: 0,
            finished_at_ms: None,
            search,
            trial_jobs: vec![vec![JobId::new("lr-t0-2").unwrap()]],
        }
    }

    fn tagged_job(id: &str, seq: u64, sweep: &str, trial: u32, rung: u32) -> JobRecord {
        let mut job = crate::store::conformance::sample_job(seq);
        job.id = JobId::new(id).unwrap();
        job.trial = Some(TrialTag {
            sweep_id: SweepId::new(sweep).unwrap(),
            trial,
            rung,
        });
        job
    }

    #[test]
    fn a_segment_stored_before_a_crash_is_adopted_once_and_misfits_are_left_alone() {
        let mut sweeps = Sweeps::load(vec![decided_sweep()]);
        let jobs = [
            // Known already.
            tagged_job("lr-t0-2", 2, "lr-1", 0, 0),
            // Stored just before the crash: trial 1's first segment.
            tagged_job("lr-t1-3", 3, "lr-1", 1, 0),
            // A rung the trial has not reached: not its next segment.
            tagged_job("lr-t0-4", 4, "lr-1", 0, 3),
            // Another sweep's, and an untagged job.
            tagged_job("other-t0-5", 5, "other-9", 0, 0),
            crate::store::conformance::sample_job(6),
        ];
        let changed = adopt_tagged_jobs(&mut sweeps, &jobs);
        assert_eq!(changed, [SweepId::new("lr-1").unwrap()]);
        // Adopting again changes nothing: the segment is not submitted a second time.
        assert!(adopt_tagged_jobs(&mut sweeps, &jobs).is_empty());
        let record = &sweeps.by_id[&SweepId::new("lr-1").unwrap()].record;
        let ids = |trial: usize| -> Vec<&str> {
            record.trial_jobs[trial].iter().map(JobId::as_str).collect()
        };
        assert_eq!(ids(0), ["lr-t0-2"]);
        assert_eq!(ids(1), ["lr-t1-3"]);
        assert_eq!(segment_job(record, 1, 0).unwrap().as_str(), "lr-t1-3");
        assert!(segment_job(record, 1, 1).is_none());
    }

    #[test]
    fn a_sweep_whose_file_no_longer_parses_is_not_loaded() {
        let mut broken = decided_sweep();
        broken.id = SweepId::new("lr-2").unwrap();
        broken.spec_toml = "version = 2".to_owned();
        let sweeps = Sweeps::load(vec![broken, decided_sweep()]);
        let loaded: Vec<&str> = sweeps.by_id.keys().map(SweepId::as_str).collect();
        assert_eq!(loaded, ["lr-1"]);
    }
}
