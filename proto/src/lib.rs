//! Cohort's wire protocol and shared identifiers.
//!
//! This crate depends on no other Cohort crate; every other crate depends on it.
//!
//! - [`v1`]: the generated gRPC services and messages of `proto/cohort.proto`
//!   (`JobControl` for the CLI, `Membership` for worker daemons, `Rendezvous` for ranks).
//! - [`ps_v1`]: the generated `ParameterServer` service of `proto/parameter_server.proto`
//!   (pushes, pulls, init and snapshots of one parameter shard).
//! - [`ids`]: the newtypes [`JobId`] and [`NodeId`] used instead of bare strings (ranks are
//!   `u32` on the wire and `usize` where they index; see [`ids`]).
//! - [`env`]: the names of the environment variables a rank process receives, and which of
//!   them Cohort manages.
//! - [`launch`]: the launch contract: a process's place in its job (built by the coordinator,
//!   sent in `StartRank`), its node's facts (added by the worker), and the environment both
//!   become (`to_env`, `from_env`).
//! - [`secret`]: [`Secret`], a token that never prints.
//! - [`transport`]: the bearer token on every call ([`transport::Credentials`]), and TLS
//!   ([`transport::endpoint`], [`transport::ServerTls`]).
//! - [`failover`]: [`failover::Failover`], the channel to whichever coordinator of a group
//!   leads, and the answer of one that stands by.
//! - [`text`]: bounded free text (details, reasons, log lines, error messages) and excerpts.
//! - [`codec`]: the protobuf codec of every service: a message that does not decode is the
//!   caller's mistake (`INVALID_ARGUMENT`).

pub mod codec;
pub mod env;
pub mod failover;
pub mod ids;
pub mod launch;
pub mod secret;
pub mod text;
pub mod transport;

pub use ids::{IdError, JobId, NodeId, SweepId};
pub use secret::Secret;

/// Cases each fuzz property (proptest) of the workspace runs: `PROPTEST_CASES` when set, so
/// that a long run is `PROPTEST_CASES=200000 cargo test ...`, else 2,000.
pub fn fuzz_cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(2_000)
}

/// Generated code for package `cohort.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("cohort.v1");
}

/// Generated code for package `cohort.ps.v1` (the parameter server).
#[allow(clippy::all, missing_docs)]
pub mod ps_v1 {
    tonic::include_proto!("cohort.ps.v1");
}

/// Largest gRPC message either side accepts, in bytes. Bounded so a misbehaving peer cannot make
/// the coordinator allocate without limit.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
