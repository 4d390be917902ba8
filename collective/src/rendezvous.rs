//! Rendezvous: the key-value store through which ranks find each other.
//!
//! [`Store`] mirrors the coordinator's per-job `Rendezvous` service (set, get, wait, add). The
//! `cohort` binary implements it over gRPC; [`InMemoryStore`] serves tests and ranks that live in
//! one process. Communicators namespace their keys under a prefix (see [`address_key`]) so that
//! several of them can share one store.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// A blocking key-value store shared by all ranks of a job.
///
/// Implementations must be safe to call from several threads at once. Values are opaque bytes;
/// keys are UTF-8 paths such as `dp/addr/3`.
pub trait Store: Send + Sync {
    /// Stores `value` under `key`, replacing any earlier value.
    fn set(&self, key: &str, value: &[u8]) -> Result<()>;

    /// Returns the value under `key`, or `None` when the key does not exist.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Waits until every key in `keys` exists and returns their values in the same order.
    ///
    /// Fails with [`Error::StoreTimeout`] when `timeout` passes first.
    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<Vec<Vec<u8>>>;

    /// Atomically adds `delta` to the integer stored at `key` (a missing key counts as 0) and
    /// returns the new value.
    fn add(&self, key: &str, delta: i64) -> Result<i64>;
}

/// Returns the key under which `rank` of the communicator named `prefix` publishes its address.
pub fn address_key(prefix: &str, rank: usize) -> String {
    format!("{prefix}/addr/{rank}")
}

/// A [`Store`] held in this process's memory: a map behind a mutex, with a condition variable
/// that wakes waiters whenever a key changes.
#[derive(Debug, Default)]
pub struct InMemoryStore {
    /// The stored keys and values.
    entries: Mutex<HashMap<String, Vec<u8>>>,
    /// Notified after every change to `entries`.
    changed: Condvar,
}

impl InMemoryStore {
    /// Creates an empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Locks the map, recovering it if a panicking thread poisoned the mutex (the map is never
    /// left half-updated, so its contents stay valid).
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<u8>>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Store for InMemoryStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.lock().insert(key.to_owned(), value.to_vec());
        self.changed.notify_all();
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().get(key).cloned())
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut entries = self.lock();
        loop {
            let missing: Vec<&str> = keys
                .iter()
                .copied()
                .filter(|key| !entries.contains_key(*key))
                .collect();
            if missing.is_empty() {
                return Ok(keys.iter().map(|key| entries[*key].clone()).collect());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::StoreTimeout {
                    keys: missing.into_iter().map(str::to_owned).collect(),
                    timeout,
                });
            }
            entries = self
                .changed
                .wait_timeout(entries, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let mut entries = self.lock();
        let current = match entries.get(key) {
            None => 0,
            Some(bytes) => parse_counter(key, bytes)?,
        };
        let updated = current.wrapping_add(delta);
        entries.insert(key.to_owned(), updated.to_string().into_bytes());
        drop(entries);
        self.changed.notify_all();
        Ok(updated)
    }
}

/// Parses a counter stored by [`Store::add`] (decimal text, as the coordinator stores it).
fn parse_counter(key: &str, bytes: &[u8]) -> Result<i64> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| Error::Store {
            message: format!(
                "add {key:?}: value {:?} is not a decimal integer",
                String::from_utf8_lossy(bytes)
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn set_get_and_add() {
        let store = InMemoryStore::new();
        assert_eq!(store.get("a").unwrap(), None);
        store.set("a", b"one").unwrap();
        assert_eq!(store.get("a").unwrap(), Some(b"one".to_vec()));
        assert_eq!(store.add("count", 5).unwrap(), 5);
        assert_eq!(store.add("count", -2).unwrap(), 3);
        assert_eq!(store.get("count").unwrap(), Some(b"3".to_vec()));
    }

    #[test]
    fn add_to_a_non_integer_is_an_error() {
        let store = InMemoryStore::new();
        store.set("a", b"text").unwrap();
        let error = store.add("a", 1).unwrap_err();
        assert!(
            error.to_string().contains("not a decimal integer"),
            "{error}"
        );
    }

    #[test]
    fn wait_returns_values_set_by_other_threads() {
        let store = Arc::new(InMemoryStore::new());
        let setters: Vec<_> = (0..4)
            .map(|index| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    store
                        .set(&format!("key/{index}"), index.to_string().as_bytes())
                        .unwrap()
                })
            })
            .collect();
        let values = store
            .wait(
                &["key/3", "key/0", "key/2", "key/1"],
                Duration::from_secs(60),
            )
            .unwrap();
        assert_eq!(values, [b"3", b"0", b"2", b"1"].map(|value| value.to_vec()));
        for setter in setters {
            setter.join().unwrap();
        }
    }

    #[test]
    fn wait_times_out_naming_missing_keys() {
        let store = InMemoryStore::new();
        store.set("present", b"x").unwrap();
        let started = Instant::now();
        let error = store
            .wait(&["present", "absent"], Duration::from_millis(50))
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(50));
        match error {
            Error::StoreTimeout { keys, .. } => assert_eq!(keys, ["absent"]),
            other => panic!("expected a timeout, got {other}"),
        }
    }

    #[test]
    fn address_keys_are_namespaced_by_prefix() {
        assert_eq!(address_key("job-1/dp", 3), "job-1/dp/addr/3");
    }
}
