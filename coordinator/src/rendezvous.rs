//! Per-job key-value store and barrier that ranks use to find each other (like torch's
//! TCPStore, served by the coordinator).
//!
//! State lives in memory only: a job's ranks rendezvous again if they restart, and the store of
//! a job is dropped when the job ends. Every job's store is bounded in keys and bytes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use cohort_proto::JobId;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::limits::{
    MAX_KEY_BYTES, MAX_KEYS_PER_JOB, MAX_KV_BYTES_PER_JOB, MAX_TIMEOUT_MS, MAX_VALUE_BYTES,
    MAX_WAIT_KEYS,
};

/// One job's keys, and a version counter that wakes waiters on every change.
struct JobKv {
    /// The keys and their values.
    entries: HashMap<String, Vec<u8>>,
    /// Bytes held by keys and values, checked against [`MAX_KV_BYTES_PER_JOB`].
    bytes: usize,
    /// Bumped on every write; waiters watch it.
    version: watch::Sender<u64>,
}

impl JobKv {
    fn new() -> Self {
        Self {
            entries: HashMap::new(),
            bytes: 0,
            version: watch::Sender::new(0),
        }
    }

    fn insert(&mut self, job_id: &JobId, key: &str, value: Vec<u8>) -> Result<()> {
        let old_bytes = self.entries.get(key).map_or(0, |old| key.len() + old.len());
        let new_bytes = self.bytes - old_bytes + key.len() + value.len();
        if old_bytes == 0 && self.entries.len() >= MAX_KEYS_PER_JOB {
            return Err(Error::ResourceExhausted(format!(
                "rendezvous of job {job_id}: {MAX_KEYS_PER_JOB} keys already stored, the limit"
            )));
        }
        if new_bytes > MAX_KV_BYTES_PER_JOB {
            return Err(Error::ResourceExhausted(format!(
                "rendezvous of job {job_id}: storing {key:?} would hold {new_bytes} bytes, \
                 expected at most {MAX_KV_BYTES_PER_JOB}"
            )));
        }
        self.bytes = new_bytes;
        self.entries.insert(key.to_owned(), value);
        self.version.send_modify(|version| *version += 1);
        Ok(())
    }
}

/// The key-value stores of every live job.
#[derive(Default)]
pub struct Rendezvous {
    /// Stores by job; created on first use, removed by [`Rendezvous::drop_job`].
    jobs: Mutex<HashMap<JobId, JobKv>>,
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(Error::InvalidArgument(format!(
            "rendezvous key of {} bytes, expected 1 to {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(())
}

fn check_timeout(timeout_ms: u32) -> Result<Duration> {
    if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
        return Err(Error::InvalidArgument(format!(
            "timeout_ms = {timeout_ms}, expected 1 to {MAX_TIMEOUT_MS}"
        )));
    }
    Ok(Duration::from_millis(u64::from(timeout_ms)))
}

/// Reads a counter: decimal text, as torch's TCPStore keeps it, so `cohort kv get` shows it.
fn decode_counter(key: &str, value: &[u8]) -> Result<i64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "rendezvous key {key:?} holds {} bytes that are not a decimal counter",
                value.len()
            ))
        })
}

impl Rendezvous {
    fn with_job<T>(&self, job_id: &JobId, f: impl FnOnce(&mut JobKv) -> Result<T>) -> Result<T> {
        let mut jobs = self
            .jobs
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        f(jobs.entry(job_id.clone()).or_insert_with(JobKv::new))
    }

    /// Stores `value` under `key`.
    pub fn set(&self, job_id: &JobId, key: &str, value: Vec<u8>) -> Result<()> {
        check_key(key)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(Error::InvalidArgument(format!(
                "rendezvous value of {} bytes, expected at most {MAX_VALUE_BYTES}",
                value.len()
            )));
        }
        self.with_job(job_id, |kv| kv.insert(job_id, key, value))
    }

    /// Returns the value under `key`, if any.
    pub fn get(&self, job_id: &JobId, key: &str) -> Result<Option<Vec<u8>>> {
        check_key(key)?;
        self.with_job(job_id, |kv| Ok(kv.entries.get(key).cloned()))
    }

    /// Adds `delta` to the counter under `key` (missing counts as 0) and returns the new value.
    /// Counters are stored as decimal text.
    pub fn add(&self, job_id: &JobId, key: &str, delta: i64) -> Result<i64> {
        check_key(key)?;
        self.with_job(job_id, |kv| {
            let current = match kv.entries.get(key) {
                Some(value) => decode_counter(key, value)?,
                None => 0,
            };
            let updated = current.checked_add(delta).ok_or_else(|| {
                Error::InvalidArgument(format!("rendezvous counter {key:?} would overflow"))
            })?;
            kv.insert(job_id, key, updated.to_string().into_bytes())?;
            Ok(updated)
        })
    }

    /// Waits until every key exists, then returns their values in order; fails after
    /// `timeout_ms` naming the keys still missing.
    pub async fn wait(
        &self,
        job_id: &JobId,
        keys: &[String],
        timeout_ms: u32,
    ) -> Result<Vec<Vec<u8>>> {
        if keys.is_empty() || keys.len() > MAX_WAIT_KEYS {
            return Err(Error::InvalidArgument(format!(
                "wait for {} keys, expected 1 to {MAX_WAIT_KEYS}",
                keys.len()
            )));
        }
        for key in keys {
            check_key(key)?;
        }
        let timeout = check_timeout(timeout_ms)?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.with_job(job_id, |kv| Ok(kv.version.subscribe()))?;
        loop {
            changes.borrow_and_update();
            let found = self.with_job(job_id, |kv| {
                Ok(keys
                    .iter()
                    .map(|key| kv.entries.get(key).cloned())
                    .collect::<Option<Vec<_>>>())
            })?;
            if let Some(values) = found {
                return Ok(values);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => {
                    return Err(Error::FailedPrecondition(format!(
                        "rendezvous of job {job_id} was closed: the job ended"
                    )));
                }
                Err(_) => {
                    let missing = self.with_job(job_id, |kv| {
                        Ok(keys
                            .iter()
                            .filter(|key| !kv.entries.contains_key(*key))
                            .cloned()
                            .collect::<Vec<_>>())
                    })?;
                    return Err(Error::Timeout(format!(
                        "rendezvous of job {job_id}: keys {missing:?} still missing after {timeout_ms} ms"
                    )));
                }
            }
        }
    }

    /// Returns once `world_size` ranks have entered barrier `name`. A barrier may be used
    /// repeatedly: each round of `world_size` arrivals releases its own waiters.
    pub async fn barrier(
        &self,
        job_id: &JobId,
        name: &str,
        rank: u32,
        world_size: u32,
        timeout_ms: u32,
    ) -> Result<()> {
        if world_size == 0 || rank >= world_size {
            return Err(Error::InvalidArgument(format!(
                "barrier {name:?}: rank {rank} of world size {world_size}, expected rank < world size"
            )));
        }
        let counter_key = format!("__barrier/{name}");
        check_key(&counter_key)?;
        let timeout = check_timeout(timeout_ms)?;
        let arrivals = self.add(job_id, &counter_key, 1)?;
        let round = (arrivals - 1) / i64::from(world_size);
        let release_at = (round + 1) * i64::from(world_size);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.with_job(job_id, |kv| Ok(kv.version.subscribe()))?;
        loop {
            changes.borrow_and_update();
            let arrived = self.with_job(job_id, |kv| match kv.entries.get(&counter_key) {
                Some(value) => decode_counter(&counter_key, value),
                None => Ok(0),
            })?;
            if arrived >= release_at {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => {
                    return Err(Error::FailedPrecondition(format!(
                        "barrier {name:?} of job {job_id} was closed: the job ended"
                    )));
                }
                Err(_) => {
                    let waiting = arrived - round * i64::from(world_size);
                    return Err(Error::Timeout(format!(
                        "barrier {name:?} of job {job_id}: {waiting} of {world_size} ranks arrived within {timeout_ms} ms"
                    )));
                }
            }
        }
    }

    /// Forgets a job's store; its pending waits fail with "the job ended".
    pub fn drop_job(&self, job_id: &JobId) {
        let mut jobs = self
            .jobs
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        jobs.remove(job_id);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn job() -> JobId {
        JobId::new("j-1").unwrap()
    }

    #[tokio::test]
    async fn set_get_add_round_trip() {
        let kv = Rendezvous::default();
        assert_eq!(kv.get(&job(), "a").unwrap(), None);
        kv.set(&job(), "a", b"x".to_vec()).unwrap();
        assert_eq!(kv.get(&job(), "a").unwrap(), Some(b"x".to_vec()));
        assert_eq!(kv.add(&job(), "n", 5).unwrap(), 5);
        assert_eq!(kv.add(&job(), "n", -2).unwrap(), 3);
        assert!(kv.add(&job(), "a", 1).is_err(), "a is not a counter");
        let other = JobId::new("j-2").unwrap();
        assert_eq!(kv.get(&other, "a").unwrap(), None, "jobs are isolated");
    }

    #[tokio::test]
    async fn wait_returns_when_keys_arrive_and_times_out_naming_missing_keys() {
        let kv = Arc::new(Rendezvous::default());
        let waiter = {
            let kv = kv.clone();
            tokio::spawn(async move {
                kv.wait(&job(), &["a".to_owned(), "b".to_owned()], 10_000)
                    .await
            })
        };
        kv.set(&job(), "a", b"1".to_vec()).unwrap();
        kv.set(&job(), "b", b"2".to_vec()).unwrap();
        assert_eq!(
            waiter.await.unwrap().unwrap(),
            vec![b"1".to_vec(), b"2".to_vec()]
        );
        let error = kv
            .wait(&job(), &["a".to_owned(), "zz".to_owned()], 20)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("\"zz\"") && !error.contains("\"a\""),
            "{error}"
        );
    }

    #[tokio::test]
    async fn barrier_releases_each_round_together() {
        let kv = Arc::new(Rendezvous::default());
        for _round in 0..3 {
            let tasks: Vec<_> = (0..4)
                .map(|rank| {
                    let kv = kv.clone();
                    tokio::spawn(async move { kv.barrier(&job(), "b", rank, 4, 10_000).await })
                })
                .collect();
            for task in tasks {
                task.await.unwrap().unwrap();
            }
        }
        let error = kv.barrier(&job(), "b", 0, 4, 20).await.unwrap_err();
        assert!(error.to_string().contains("1 of 4 ranks"), "{error}");
    }

    #[tokio::test]
    async fn bounds_are_enforced() {
        let kv = Rendezvous::default();
        assert!(kv.set(&job(), "", vec![]).is_err());
        assert!(
            kv.set(&job(), &"k".repeat(MAX_KEY_BYTES + 1), vec![])
                .is_err()
        );
        assert!(kv.set(&job(), "k", vec![0; MAX_VALUE_BYTES + 1]).is_err());
        assert!(kv.wait(&job(), &[], 10).await.is_err());
        assert!(kv.wait(&job(), &["k".to_owned()], 0).await.is_err());
        assert!(kv.barrier(&job(), "b", 4, 4, 10).await.is_err());
    }

    #[tokio::test]
    async fn dropping_a_job_ends_its_waits() {
        let kv = Arc::new(Rendezvous::default());
        let waiter = {
            let kv = kv.clone();
            tokio::spawn(async move { kv.wait(&job(), &["never".to_owned()], 60_000).await })
        };
        // Whether the waiter has parked yet or not, a drop after it subscribed closes its
        // channel; keep dropping until it has seen one.
        while !waiter.is_finished() {
            kv.drop_job(&job());
            tokio::task::yield_now().await;
        }
        let error = waiter.await.unwrap().unwrap_err().to_string();
        assert!(error.contains("the job ended"), "{error}");
    }
}
