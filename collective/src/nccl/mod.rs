//! [`Nccl`]: a [`Communicator`](crate::Communicator) over NVIDIA's NCCL, one CUDA device per
//! rank, behind the `cuda` cargo feature.
//!
//! Rank 0 creates NCCL's unique id and publishes its 128 bytes in the rendezvous
//! [`Store`](crate::Store) under `{prefix}/nccl/unique_id`; the other ranks wait for it, and every
//! rank then joins the NCCL communicator on its device. Communicators are created non-blocking,
//! so that joining, and every collective, can be bounded by a deadline: a rank that died or
//! stopped taking part makes the others fail within the timeout instead of hanging, and the
//! failed communicator is aborted (NCCL's `ncclCommAbort`), never left spinning on the GPU.
//! (Setting `NCCL_COMM_BLOCKING=1` in the environment makes NCCL ignore the non-blocking
//! setting and these deadlines; connecting then logs a warning.)
//!
//! A healthy communicator is ended gracefully instead: every rank calls [`Nccl::close`] at the
//! end of its job (dropping does the same, logging errors instead of returning them), which
//! finalizes the NCCL communicator (`ncclCommFinalize`: in-flight sends finish, and every rank
//! on the host waits for the others before any frees what they may still read) and destroys it,
//! under the collective timeout, aborting it if that fails.
//!
//! Two ways to call it:
//!
//! - the [`Communicator`](crate::Communicator) trait, on host buffers: values are copied to a
//!   device staging buffer (kept and grown for later calls), reduced by NCCL, and copied back.
//!   Reductions run in `f32` whatever the element type, so the trait's promise (accumulate in
//!   `f32`, round once) holds exactly as for [`TcpRing`](crate::TcpRing).
//! - device methods on [`Nccl`] (`all_reduce_device`, `all_reduce_buckets`, ...), on device
//!   buffers, with no host copies: they queue the collective on the communicator's stream and
//!   return; [`Nccl::synchronize`] waits for it under the same deadline. These reduce in the
//!   element type, as NCCL does. Buffers may belong to another stream of the device (candle's):
//!   each collective is ordered after the work queued on its buffers' streams, and their later
//!   work after it.
//!
//! An NCCL communicator belongs to the thread that created it, so [`Nccl`] is neither `Send` nor
//! `Sync`: build one per rank thread.
//!
//! Without the `cuda` feature the same types and constructors exist and return
//! [`Error::NotCompiledWithCuda`]; with it, on a machine without the CUDA driver or NCCL, they
//! return [`Error::NoCudaDriver`] or [`Error::NoNccl`] (cudarc would panic; it is never reached).
//!
//! - `handle`: the raw NCCL communicator: non-blocking creation, progress of background calls,
//!   asynchronous errors and result codes, graceful close, abort.
//! - `state`: [`Nccl`] itself, what it holds, and its accessors.
//! - `setup`: joining (the unique id through the store) and closing or aborting.
//! - `device`: the collectives on device buffers.
//! - `watchdog`: queueing every collective under a deadline (ordered with its buffers' streams),
//!   waiting for it by polling its event and NCCL's asynchronous error, and aborting the
//!   communicator on any failure.
//! - `host`: the [`Communicator`](crate::Communicator) implementation on host buffers, staged
//!   through the device.
//! - `dummy`: the stand-in compiled without the `cuda` feature.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::progress::Progress;

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
mod handle;
#[cfg(feature = "cuda")]
mod host;
#[cfg(feature = "cuda")]
mod setup;
#[cfg(feature = "cuda")]
mod state;
#[cfg(feature = "cuda")]
mod watchdog;

#[cfg(not(feature = "cuda"))]
mod dummy;

#[cfg(not(feature = "cuda"))]
pub use self::dummy::{CudaStream, Nccl};
#[cfg(feature = "cuda")]
pub use self::state::Nccl;
/// The CUDA stream an [`Nccl`] communicator runs on (cudarc's).
#[cfg(feature = "cuda")]
pub use cudarc::driver::CudaStream;

/// Settings of an [`Nccl`] communicator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclConfig {
    /// Name of the communicator: its rendezvous keys live under `{prefix}/nccl/`. Must be unique
    /// per communicator for the life of the store (add a generation when re-forming one).
    /// Default `"nccl"`.
    pub prefix: String,
    /// This rank, in `0..world_size`. Default 0.
    pub rank: usize,
    /// Number of ranks, each on its own CUDA device. Default 1.
    pub world_size: usize,
    /// Ordinal of this rank's CUDA device on its machine. Default 0.
    pub device: usize,
    /// Longest wait for rank 0's unique id and for every rank to join the communicator.
    /// Default 120 s.
    pub connect_timeout: Duration,
    /// Longest one collective may take, from when this rank starts waiting for it, before the
    /// communicator is aborted and the call fails. Default 30 s.
    pub collective_timeout: Duration,
    /// Where the communicator records its collectives (a channel named after the prefix),
    /// for hang diagnosis: entered when queued, completed when seen finished. Default: a
    /// record of its own, read by nobody.
    pub progress: Progress,
}

impl Default for NcclConfig {
    fn default() -> Self {
        Self {
            prefix: "nccl".to_owned(),
            rank: 0,
            world_size: 1,
            device: 0,
            connect_timeout: Duration::from_secs(120),
            collective_timeout: Duration::from_secs(30),
            progress: Progress::default(),
        }
    }
}

impl NcclConfig {
    /// Checks every field; returns the first problem found.
    pub fn validate(&self) -> Result<()> {
        if self.prefix.is_empty() || self.prefix.len() > 1024 {
            return Err(Error::InvalidArgument {
                field: "config.prefix",
                found: format!("{:?}", self.prefix),
                expected: "1 to 1024 bytes",
            });
        }
        // NCCL counts ranks in a C int.
        if self.world_size == 0 || i32::try_from(self.world_size).is_err() {
            return Err(Error::InvalidArgument {
                field: "config.world_size",
                found: self.world_size.to_string(),
                expected: "1 to 2147483647",
            });
        }
        if self.rank >= self.world_size {
            return Err(Error::InvalidArgument {
                field: "config.rank",
                found: self.rank.to_string(),
                expected: "less than config.world_size",
            });
        }
        if i32::try_from(self.device).is_err() {
            return Err(Error::InvalidArgument {
                field: "config.device",
                found: self.device.to_string(),
                expected: "a CUDA device ordinal",
            });
        }
        crate::error::check_positive_durations(&[
            ("config.connect_timeout", self.connect_timeout),
            ("config.collective_timeout", self.collective_timeout),
        ])
    }

    /// Returns the store key under which rank 0 publishes NCCL's unique id.
    pub fn unique_id_key(&self) -> String {
        format!("{}/nccl/unique_id", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rendezvous::InMemoryStore;

    #[test]
    fn config_problems_name_the_field() {
        assert!(NcclConfig::default().validate().is_ok());
        let cases = [
            (
                NcclConfig {
                    rank: 2,
                    world_size: 2,
                    ..NcclConfig::default()
                },
                "config.rank = 2, expected less than config.world_size",
            ),
            (
                NcclConfig {
                    world_size: 0,
                    ..NcclConfig::default()
                },
                "config.world_size = 0, expected 1 to 2147483647",
            ),
            (
                NcclConfig {
                    prefix: String::new(),
                    ..NcclConfig::default()
                },
                "config.prefix = \"\", expected 1 to 1024 bytes",
            ),
            (
                NcclConfig {
                    collective_timeout: Duration::ZERO,
                    ..NcclConfig::default()
                },
                "config.collective_timeout = 0ns, expected a positive duration",
            ),
        ];
        for (config, message) in cases {
            assert_eq!(config.validate().unwrap_err().to_string(), message);
        }
        assert_eq!(NcclConfig::default().unique_id_key(), "nccl/nccl/unique_id");
    }

    /// Without the feature the build says so; with it, this machine either lacks the driver or
    /// NCCL (the typed error, not cudarc's panic) or has them, and a world of one rank forms.
    #[test]
    fn connect_reports_why_nccl_cannot_be_used_or_forms_a_world_of_one() {
        let store = InMemoryStore::new();
        let result = Nccl::connect(&store, &NcclConfig::default());
        #[cfg(not(feature = "cuda"))]
        {
            let error = result.expect_err("a build without cuda cannot connect");
            assert!(matches!(error, Error::NotCompiledWithCuda), "{error}");
        }
        #[cfg(feature = "cuda")]
        match (result, crate::cuda::require(crate::cuda::CudaLibrary::Nccl)) {
            (Err(Error::NoCudaDriver), Err(Error::NoCudaDriver))
            | (Err(Error::NoNccl), Err(Error::NoNccl)) => {}
            (Ok(mut nccl), Ok(())) => {
                use crate::Communicator;
                assert_eq!((nccl.rank(), nccl.world_size()), (0, 1));
                let mut values = vec![1.5_f32, -2.0];
                nccl.all_reduce((&mut values).into(), crate::ReduceOp::Sum)
                    .unwrap();
                assert_eq!(values, [1.5, -2.0]);
            }
            // A machine with the libraries but no usable device fails to set up, naming it.
            (Err(error @ Error::Nccl { .. }), Ok(())) => {
                assert!(error.to_string().starts_with("nccl setup"), "{error}");
            }
            (result, presence) => panic!(
                "connect returned {:?} while the presence check returned {presence:?}",
                result.err()
            ),
        }
    }

    #[test]
    fn invalid_configs_fail_before_cuda_is_touched() {
        let store = InMemoryStore::new();
        let config = NcclConfig {
            rank: 1,
            ..NcclConfig::default()
        };
        let error = Nccl::connect(&store, &config).err().unwrap();
        assert!(
            matches!(
                error,
                Error::InvalidArgument {
                    field: "config.rank",
                    ..
                }
            ),
            "{error}"
        );
    }
}
