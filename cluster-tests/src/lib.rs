//! Multi-process integration tests for Cohort and the harness they share.
//!
//! The tests (under `tests/`) start real `cohort coordinator` and `cohort worker` processes on
//! 127.0.0.1 with OS-chosen ports, submit jobs through the real CLI, inject faults (SIGKILL a
//! worker or the coordinator), and wait for outcomes by polling, never by fixed sleeps.
//!
//! - [`sandbox`]: [`sandbox::Sandbox`], one cluster per test, torn down on drop.
//! - [`jobs`]: the job files the training tests submit.
//! - [`etcd`]: [`etcd::TestEtcd`], a real etcd server for tests of the etcd store.
//!
//! The tests need the `cohort` executable built first (`cargo build -p cohort-cli`, done by
//! `scripts/test.sh`), or `$COHORT_BIN` pointing at one.

pub mod etcd;
pub mod jobs;
pub mod sandbox;
