//! A job's checkpoint versions as the cluster serves them: listed for `cohort checkpoints`, and
//! resolved for a submission that resumes from another job's checkpoint (`JOB@best`,
//! `JOB@latest`, `JOB@step-N`). The decisions are [`crate::checkpoints`]'.

use cohort_jobspec::objective::Objective;
use cohort_proto::JobId;

use super::{Cluster, JobSlot};
use crate::checkpoints::{self, CheckpointRef};
use crate::error::{Error, Result};
use crate::model::{CheckpointVersion, JobRecord};

impl Cluster {
    /// The record of a job, live or retired, once every change to it is stored.
    pub(super) async fn job_record(&self, job_id: &JobId) -> Result<JobRecord> {
        let (live, stored) = {
            let state = self.state.lock().await;
            let live = match state.slot(job_id) {
                Some(JobSlot::Live(job)) => Some(job.record.clone()),
                Some(JobSlot::Retired(_)) => None,
                None => return Err(Error::JobNotFound(job_id.to_string())),
            };
            (live, self.writes.barrier())
        };
        stored.landed().await?;
        if let Some(record) = live {
            return Ok(record);
        }
        self.store.get_job(job_id).await?.ok_or_else(|| {
            Error::Store(format!(
                "job {job_id} is listed but its record is missing from the store"
            ))
        })
    }

    /// A job's checkpoint versions, oldest first, and the objective its best is chosen by.
    pub async fn checkpoints(&self, job_id: &JobId) -> Result<(Vec<CheckpointVersion>, Objective)> {
        let record = self.job_record(job_id).await?;
        let objective = objective_of(&record);
        Ok((record.checkpoints, objective))
    }

    /// The directory `reference` names: one of its job's recorded checkpoints still on disk.
    pub(super) async fn resolve_checkpoint(&self, reference: &CheckpointRef) -> Result<String> {
        let record = self.job_record(&reference.job_id).await?;
        let objective = objective_of(&record);
        checkpoints::resolve(reference, &record.checkpoints, objective)
            .map(|version| version.path.clone())
    }
}

/// The objective a job ranks its checkpoints by (its spec's; the default for a spec that no
/// longer parses, which a stored record cannot have been submitted with).
fn objective_of(record: &JobRecord) -> Objective {
    cohort_jobspec::parse(&record.spec_toml)
        .map(|spec| spec.objective())
        .unwrap_or_default()
}
