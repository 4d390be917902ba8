//! Multi-process integration tests for Cohort and the harness they share.
//!
//! The tests (under `tests/`) start real `cohort coordinator` and `cohort worker` processes on
//! 127.0.0.1 with OS-chosen ports (or, in `tests/multi_host.rs`, on separate network hosts:
//! one network namespace each, on a subnet that exists only inside them), submit jobs through
//! the real CLI, inject faults (SIGKILL a worker or the coordinator, cut a host off), and wait
//! for outcomes by polling, never by fixed sleeps. The multi-host tests need root; elsewhere
//! they say why and skip, and under `CI=true` they fail instead.
//!
//! - [`sandbox`]: [`sandbox::Sandbox`], one cluster per test, torn down on drop.
//! - [`jobs`]: the job files the training tests submit.
//! - [`etcd`]: [`etcd::TestEtcd`], a real etcd server for tests of the etcd store.
//! - [`prometheus`]: [`prometheus::TestPrometheus`], a real Prometheus server scraping a
//!   coordinator.
//! - [`chromium`]: [`chromium::Chromium`], headless Chromium loading the web dashboard.
//! - [`external`]: what those harnesses of real components share.
//! - [`network`]: [`network::TestNetwork`], separate network hosts (namespaces) for one test.
//!
//! The tests need the `cohort` executable built first (`cargo build -p cohort-cli`, done by
//! `scripts/test.sh`), or `$COHORT_BIN` pointing at one.

pub mod chromium;
pub mod etcd;
pub mod external;
pub mod jobs;
pub mod network;
pub mod prometheus;
pub mod sandbox;
