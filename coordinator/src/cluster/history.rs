//! Each job's metric curves ([`MetricHistory`]): a point per metrics report, kept in memory
//! while the job runs, written to the store at most every [`FLUSH_INTERVAL`], when the job ends
//! (through the write queue, just before its final record) and when the coordinator stops, and read
//! back from the store for a job it no longer holds, or after a restart before the job's next
//! point. A crash loses at most the last interval's points of a running job.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use cohort_proto::JobId;
use tracing::warn;

use super::Cluster;
use crate::error::{Error, Result};
use crate::model::{MetricHistory, MetricPoint, MetricsRecord};

/// Most time between a point's report and its write to the store.
pub(super) const FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// The curves in memory.
#[derive(Default)]
pub(super) struct Histories {
    /// By job: its curves, and whether they changed since they were last written.
    entries: Mutex<HashMap<JobId, (MetricHistory, bool)>>,
}

impl Histories {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, (MetricHistory, bool)>> {
        self.entries.lock().expect("histories lock")
    }
}

/// The point a metrics report adds.
fn point(metrics: &MetricsRecord) -> MetricPoint {
    MetricPoint {
        step: metrics.step,
        epoch: metrics.epoch,
        loss: metrics.loss,
        samples_per_s: metrics.samples_per_s,
        eval_loss: metrics.eval_loss,
        eval_accuracy: metrics.eval_accuracy,
        at_ms: metrics.reported_at_ms,
    }
}

impl Histories {
    /// Job `job_id`'s curves as they are, marked written: for the write that follows its final
    /// record.
    pub(super) fn take_final(&self, job_id: &JobId) -> Option<MetricHistory> {
        let mut entries = self.lock();
        let (curves, dirty) = entries.get_mut(job_id)?;
        *dirty = false;
        Some(curves.clone())
    }
}

impl Cluster {
    /// Adds `rank`'s report to job `job_id`'s curves (reading the stored curves first, when
    /// the coordinator does not hold them yet: after a restart they continue).
    pub(super) async fn record_history(
        &self,
        job_id: &JobId,
        rank: u32,
        metrics: &MetricsRecord,
    ) -> Result<()> {
        let held = self.histories.lock().contains_key(job_id);
        let stored = if held {
            None
        } else {
            self.store.get_job_metrics(job_id).await?
        };
        let mut entries = self.histories.lock();
        let (curves, dirty) = entries
            .entry(job_id.clone())
            .or_insert_with(|| (stored.unwrap_or_default(), false));
        curves.record(rank, point(metrics));
        *dirty = true;
        Ok(())
    }

    /// Writes every job's curves that changed since they were last written, then lets go of
    /// those of jobs that no longer run.
    pub(super) async fn flush_histories(&self) -> Result<()> {
        let changed: Vec<(JobId, MetricHistory)> = self
            .histories
            .lock()
            .iter_mut()
            .filter(|(_, (_, dirty))| *dirty)
            .map(|(job_id, (curves, dirty))| {
                *dirty = false;
                (job_id.clone(), curves.clone())
            })
            .collect();
        let mut first_failure = None;
        for (job_id, curves) in changed {
            if let Err(error) = self.store.put_job_metrics(&job_id, &curves).await {
                warn!(%job_id, %error, "could not store the job's metric curves; retrying");
                if let Some((_, dirty)) = self.histories.lock().get_mut(&job_id) {
                    *dirty = true;
                }
                first_failure.get_or_insert(error);
            }
        }
        let state = self.state.lock().await;
        self.histories
            .lock()
            .retain(|job_id, (_, dirty)| *dirty || state.live(job_id).is_some());
        first_failure.map_or(Ok(()), Err)
    }

    /// Job `job_id`'s curves (only `rank`'s when given): from memory while the coordinator
    /// holds them, else from the store; empty for a job that reported nothing.
    pub async fn job_metrics(&self, job_id: &JobId, rank: Option<u32>) -> Result<MetricHistory> {
        let held = self
            .histories
            .lock()
            .get(job_id)
            .map(|(curves, _)| curves.clone());
        let mut curves = match held {
            Some(curves) => curves,
            None => {
                if self.state.lock().await.slot(job_id).is_none() {
                    return Err(Error::JobNotFound(job_id.to_string()));
                }
                self.store
                    .get_job_metrics(job_id)
                    .await?
                    .unwrap_or_default()
            }
        };
        if let Some(rank) = rank {
            curves.ranks.retain(|&number, _| number == rank);
        }
        Ok(curves)
    }
}
