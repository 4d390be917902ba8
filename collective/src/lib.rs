//! Collective communication between the ranks of a training job.
//!
//! Ranks find each other through a rendezvous [`Store`] (the coordinator's per-job key-value
//! service in a cluster, [`InMemoryStore`] in tests), then run collectives (all-reduce,
//! broadcast, all-gather, reduce-scatter, barrier) through the [`Communicator`] trait, which
//! three implementations share: [`TcpRing`], a pipelined ring over TCP, [`ShmGroup`], shared
//! memory between the ranks of one node, and [`Nccl`], NVIDIA's
//! NCCL on one GPU per rank, behind the `cuda` cargo feature (without it, the same API returns
//! [`Error::NotCompiledWithCuda`]). This crate moves and reduces flat buffers of `f32`, `bf16`
//! and `f16` and knows nothing of models.
//!
//! - [`rendezvous`]: the [`Store`] trait, [`InMemoryStore`], and key naming.
//! - [`communicator`]: the [`Communicator`] trait.
//! - [`operation`]: the [`Collective`] names used in errors and message headers.
//! - [`buffer`]: typed buffers ([`BufferMut`], [`BufferRef`], [`Element`]), [`ReduceOp`], and
//!   the `f32`-accumulating reduction kernels.
//! - [`tcp_ring`]: [`TcpRing`] and [`TcpRingConfig`]: ring setup, the non-blocking transport,
//!   and the message schedules of each collective.
//! - [`group`]: [`connect_group`], the one entry point for host communicators: it learns which
//!   node each rank is on and forms shared memory or a TCP ring ([`Transport`]).
//! - [`hierarchical`]: [`Hierarchical`], shared memory within each node and a TCP ring per
//!   local rank across nodes, for jobs with several ranks on each of several nodes.
//! - [`shm`]: [`ShmGroup`] and [`ShmConfig`]: ranks on one node through shared memory (a sealed
//!   memfd passed over authenticated Unix sockets; futex waits; a dead rank is named).
//! - [`nccl`]: [`Nccl`] and [`NcclConfig`]: NCCL setup through the store, the trait on host
//!   buffers (staged through the GPU), collectives on device buffers, and the deadline watchdog
//!   that aborts a communicator whose collective never finishes.
//! - [`p2p`]: [`PeerLink`] and [`PeerLinkConfig`]: ordered, tagged `f32` messages between two
//!   ranks (pipeline activations and gradients), sent by a writer thread so neighbours never
//!   deadlock.
//! - [`progress`]: [`Progress`], each rank's numbered record of the operations every
//!   communicator entered and completed, read by hang diagnosis; and the injected hangs of
//!   fault tests.
//! - [`bench`](mod@bench): loopback TCP throughput, all-reduce timing (TCP ring, and NCCL on
//!   device buffers) and the busbw formula, for `cohort bench allreduce`.
//! - [`cuda`]: whether this build and machine can use CUDA and NCCL, and how many devices.
//! - [`error`]: the crate's [`Error`] and [`Result`], and the failure causes errors carry
//!   ([`AbortCause`], [`LinkFailure`]).

#![warn(missing_docs)]

pub mod auth;
pub mod bench;
pub mod buffer;
pub mod communicator;
pub mod cuda;
pub mod error;
pub mod group;
pub mod hierarchical;
pub mod nccl;
pub mod operation;
pub mod p2p;
pub mod progress;
pub mod rendezvous;
pub mod shm;
pub mod tcp_ring;

pub use auth::LinkSecret;
pub use buffer::{BufferMut, BufferRef, DType, Element, ReduceOp};
pub use communicator::Communicator;
pub use error::{AbortCause, Error, LinkFailure, Result};
pub use group::{GroupConfig, Transport, connect_group};
pub use hierarchical::Hierarchical;
pub use nccl::{Nccl, NcclConfig};
pub use operation::Collective;
pub use p2p::{PeerLink, PeerLinkConfig};
pub use progress::Progress;
pub use rendezvous::{InMemoryStore, Store, address_key};
pub use shm::{ShmConfig, ShmGroup};
pub use tcp_ring::{TcpRing, TcpRingConfig};
