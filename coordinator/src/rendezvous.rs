//! Per-job key-value store and barrier that ranks use to find each other (like torch's
//! TCPStore, served by the coordinator).
//!
//! State lives in memory only: a job's ranks rendezvous again if they restart. A job's store
//! exists from its placement ([`Rendezvous::open`]) until it ends ([`Rendezvous::drop_job`]);
//! calls for any other job are refused and create nothing. Every job's store is bounded in keys
//! and bytes, and in the waits and barriers in progress at once (each holds its request until it
//! returns): [`MAX_WAITS_PER_PROCESS`] per process of the job, at least [`MIN_WAITS_PER_JOB`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use cohort_proto::JobId;
use cohort_proto::text::excerpt;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::limits::{
    MAX_KEY_BYTES, MAX_KEYS_PER_JOB, MAX_KV_BYTES_PER_JOB, MAX_TIMEOUT_MS, MAX_VALUE_BYTES,
    MAX_WAIT_KEY_BYTES, MAX_WAIT_KEYS, MAX_WAITS_PER_PROCESS, MIN_WAITS_PER_JOB,
};

/// One job's keys, and a version counter that wakes waiters on every change.
struct JobKv {
    /// The keys and their values.
    entries: HashMap<String, Vec<u8>>,
    /// Bytes held by keys and values, checked against [`MAX_KV_BYTES_PER_JOB`].
    bytes: usize,
    /// Bumped on every write; waiters watch it.
    version: watch::Sender<u64>,
    /// Waits and barriers in progress.
    waits: usize,
    /// Most waits and barriers in progress at once.
    max_waits: usize,
}

impl JobKv {
    fn new(processes: u32) -> Self {
        let max_waits = (processes as usize)
            .saturating_mul(MAX_WAITS_PER_PROCESS)
            .max(MIN_WAITS_PER_JOB);
        Self {
            entries: HashMap::new(),
            bytes: 0,
            version: watch::Sender::new(0),
            waits: 0,
            max_waits,
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
                "rendezvous of job {job_id}: storing {} would hold {new_bytes} bytes, \
                 expected at most {MAX_KV_BYTES_PER_JOB}",
                excerpt(key)
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
    /// Stores by job; created by [`Rendezvous::open`], removed by [`Rendezvous::drop_job`].
    jobs: Mutex<HashMap<JobId, JobKv>>,
}

/// One wait or barrier in progress; ends the count when dropped.
struct WaitSlot<'a> {
    /// The stores.
    rendezvous: &'a Rendezvous,
    /// The job waited in.
    job_id: JobId,
}

impl Drop for WaitSlot<'_> {
    fn drop(&mut self) {
        let mut jobs = self.rendezvous.lock();
        if let Some(kv) = jobs.get_mut(&self.job_id) {
            kv.waits = kv.waits.saturating_sub(1);
        }
    }
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
                "rendezvous key {} holds {} bytes that are not a decimal counter",
                excerpt(key),
                value.len()
            ))
        })
}

impl Rendezvous {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, JobKv>> {
        self.jobs
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn with_job<T>(&self, job_id: &JobId, f: impl FnOnce(&mut JobKv) -> Result<T>) -> Result<T> {
        let mut jobs = self.lock();
        let kv = jobs.get_mut(job_id).ok_or_else(|| {
            Error::FailedPrecondition(format!("job {job_id} is not running: no rendezvous"))
        })?;
        f(kv)
    }

    /// Opens the store of a job that has just been placed, for its `processes` processes.
    /// Opening an open store keeps it.
    pub fn open(&self, job_id: &JobId, processes: u32) {
        self.lock()
            .entry(job_id.clone())
            .or_insert_with(|| JobKv::new(processes));
    }

    /// Number of open stores, for tests and diagnostics.
    pub fn open_jobs(&self) -> usize {
        self.lock().len()
    }

    /// Counts one more wait of the job, refusing it past the job's bound.
    fn begin_wait(&self, job_id: &JobId) -> Result<WaitSlot<'_>> {
        self.with_job(job_id, |kv| {
            if kv.waits >= kv.max_waits {
                return Err(Error::ResourceExhausted(format!(
                    "rendezvous of job {job_id}: {} waits and barriers already in progress, the limit",
                    kv.max_waits
                )));
            }
            kv.waits += 1;
            Ok(())
        })?;
        Ok(WaitSlot {
            rendezvous: self,
            job_id: job_id.clone(),
        })
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
                Error::InvalidArgument(format!(
                    "rendezvous counter {} would overflow",
                    excerpt(key)
                ))
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
        let key_bytes: usize = keys.iter().map(String::len).sum();
        if key_bytes > MAX_WAIT_KEY_BYTES {
            return Err(Error::InvalidArgument(format!(
                "wait for keys of {key_bytes} bytes in all, expected at most {MAX_WAIT_KEY_BYTES}"
            )));
        }
        let timeout = check_timeout(timeout_ms)?;
        let _slot = self.begin_wait(job_id)?;
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
                    let named = missing
                        .iter()
                        .take(8)
                        .map(|key| excerpt(key))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let more = missing.len().saturating_sub(8);
                    let more = if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    };
                    return Err(Error::Timeout(format!(
                        "rendezvous of job {job_id}: keys {named}{more} still missing after {timeout_ms} ms"
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
        let name_text = excerpt(name);
        if world_size == 0 || rank >= world_size {
            return Err(Error::InvalidArgument(format!(
                "barrier {name_text}: rank {rank} of world size {world_size}, expected rank < world size"
            )));
        }
        let counter_key = format!("__barrier/{name}");
        check_key(&counter_key)?;
        let timeout = check_timeout(timeout_ms)?;
        let _slot = self.begin_wait(job_id)?;
        let arrivals = self.add(job_id, &counter_key, 1)?;
        let round = (arrivals - 1) / i64::from(world_size);
        // A job may have set the counter near the largest value: the next round's end is then
        // past what a counter holds, and the barrier can never release.
        let release_at = (round + 1)
            .checked_mul(i64::from(world_size))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "barrier {name_text}: its counter is at {arrivals}, too large for another round"
                ))
            })?;
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
                        "barrier {name_text} of job {job_id} was closed: the job ended"
                    )));
                }
                Err(_) => {
                    let waiting = arrived - round * i64::from(world_size);
                    return Err(Error::Timeout(format!(
                        "barrier {name_text} of job {job_id}: {waiting} of {world_size} ranks arrived within {timeout_ms} ms"
                    )));
                }
            }
        }
    }

    /// Forgets a job's store; its pending waits fail with "the job ended".
    pub fn drop_job(&self, job_id: &JobId) {
        self.lock().remove(job_id);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn job() -> JobId {
        JobId::new("j-1").unwrap()
    }

    /// A rendezvous with the store of `job()` open for a job of 4 processes.
    fn open() -> Rendezvous {
        let kv = Rendezvous::default();
        kv.open(&job(), 4);
        kv
    }

    #[tokio::test]
    async fn set_get_add_round_trip() {
        let kv = open();
        assert_eq!(kv.get(&job(), "a").unwrap(), None);
        kv.set(&job(), "a", b"x".to_vec()).unwrap();
        assert_eq!(kv.get(&job(), "a").unwrap(), Some(b"x".to_vec()));
        assert_eq!(kv.add(&job(), "n", 5).unwrap(), 5);
        assert_eq!(kv.add(&job(), "n", -2).unwrap(), 3);
        assert!(kv.add(&job(), "a", 1).is_err(), "a is not a counter");
        let other = JobId::new("j-2").unwrap();
        kv.open(&other, 1);
        assert_eq!(kv.get(&other, "a").unwrap(), None, "jobs are isolated");
    }

    #[tokio::test]
    async fn wait_returns_when_keys_arrive_and_times_out_naming_missing_keys() {
        let kv = Arc::new(open());
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
        let kv = Arc::new(open());
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
        let kv = open();
        assert!(kv.set(&job(), "", vec![]).is_err());
        assert!(
            kv.set(&job(), &"k".repeat(MAX_KEY_BYTES + 1), vec![])
                .is_err()
        );
        assert!(kv.set(&job(), "k", vec![0; MAX_VALUE_BYTES + 1]).is_err());
        assert!(kv.wait(&job(), &[], 10).await.is_err());
        assert!(kv.wait(&job(), &["k".to_owned()], 0).await.is_err());
        assert!(kv.barrier(&job(), "b", 4, 4, 10).await.is_err());
        let wide: Vec<String> = (0..200).map(|i| format!("{i:0>400}")).collect();
        let error = kv.wait(&job(), &wide, 10).await.unwrap_err().to_string();
        assert!(error.contains("expected at most 65536"), "{error}");
    }

    #[tokio::test]
    async fn a_job_that_is_not_open_has_no_store_and_gets_none() {
        let kv = Rendezvous::default();
        let error = kv.set(&job(), "a", vec![1]).unwrap_err().to_string();
        assert!(error.contains("not running"), "{error}");
        assert!(kv.get(&job(), "a").is_err());
        assert!(kv.wait(&job(), &["a".to_owned()], 10).await.is_err());
        assert_eq!(kv.open_jobs(), 0, "a refused call created a store");
        kv.open(&job(), 1);
        kv.drop_job(&job());
        assert!(
            kv.get(&job(), "a").is_err(),
            "a dropped job's store is gone"
        );
        assert_eq!(kv.open_jobs(), 0);
    }

    #[tokio::test]
    async fn concurrent_waits_are_bounded_per_job_and_released_when_they_end() {
        let kv = Arc::new(Rendezvous::default());
        kv.open(&job(), 1);
        let limit = MIN_WAITS_PER_JOB;
        let waiters: Vec<_> = (0..limit)
            .map(|i| {
                let kv = kv.clone();
                tokio::spawn(async move { kv.wait(&job(), &[format!("k{i}")], 60_000).await })
            })
            .collect();
        while kv.with_job(&job(), |kv| Ok(kv.waits)).unwrap() < limit {
            tokio::task::yield_now().await;
        }
        let refused = kv.wait(&job(), &["x".to_owned()], 1).await.unwrap_err();
        assert!(
            matches!(&refused, Error::ResourceExhausted(message) if message.contains("already in progress")),
            "{refused}"
        );
        for i in 0..limit {
            kv.set(&job(), &format!("k{i}"), vec![1]).unwrap();
        }
        for waiter in waiters {
            waiter.await.unwrap().unwrap();
        }
        // Every slot was given back.
        kv.set(&job(), "x", vec![1]).unwrap();
        assert_eq!(
            kv.wait(&job(), &["x".to_owned()], 10).await.unwrap(),
            vec![vec![1]]
        );
    }

    #[tokio::test]
    async fn dropping_a_job_ends_its_waits() {
        let kv = Arc::new(open());
        let waiter = {
            let kv = kv.clone();
            tokio::spawn(async move { kv.wait(&job(), &["never".to_owned()], 60_000).await })
        };
        // Once the waiter holds its slot it has subscribed: the drop closes its channel.
        while kv.with_job(&job(), |kv| Ok(kv.waits)).unwrap() == 0 {
            tokio::task::yield_now().await;
        }
        kv.drop_job(&job());
        let error = waiter.await.unwrap().unwrap_err().to_string();
        assert!(error.contains("the job ended"), "{error}");
    }
}
