//! Where a rank computes: the host CPU or one CUDA device, and opening candle's device for it.
//!
//! On a GPU rank only the passes move to the device, as ZeRO-Offload does: the f32 master
//! parameters and the optimizer state stay in host memory, a working copy of the model on the
//! device (in the compute format) runs the forward and backward passes and is refreshed from
//! the masters after every update, and the gradients come back to the host buffer the
//! communicator and the optimizer use. So every communicator, the optimizer and checkpoints
//! work unchanged, and a GPU rank and CPU ranks can train in one job.
//!
//! Three builds answer a request for a CUDA device differently, all without touching CUDA when
//! it cannot be used: without the `cuda` feature the request fails with the collective's
//! "not compiled with CUDA" error; with `cuda` but without `candle-cuda` (candle's kernels, which
//! need the CUDA toolkit to build) it fails with [`TrainerError::NoCandleCudaKernels`]; with
//! `candle-cuda` the driver's presence is checked first (cudarc panics when it is missing), then
//! candle opens the device.

use std::fmt;

use candle_core::Device;

use crate::error::{Result, TrainerError};

/// The device a rank's forward and backward passes run on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ComputeDevice {
    /// The host CPU (candle's CPU backend). The default.
    #[default]
    Cpu,
    /// A CUDA device.
    Cuda {
        /// Index of the device among those `CUDA_VISIBLE_DEVICES` makes visible to the process.
        ordinal: usize,
    },
}

impl ComputeDevice {
    /// Whether the passes run on the host.
    pub fn is_cpu(self) -> bool {
        self == ComputeDevice::Cpu
    }

    /// Opens candle's device for this one. Every tensor of a run must be created on the one
    /// [`Device`] this returns: candle tells two openings of the same GPU apart.
    pub fn open(self) -> Result<Device> {
        match self {
            ComputeDevice::Cpu => Ok(Device::Cpu),
            ComputeDevice::Cuda { ordinal } => open_cuda(ordinal),
        }
    }
}

impl fmt::Display for ComputeDevice {
    /// Writes `cpu` or `cuda:N`.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ComputeDevice::Cpu => formatter.write_str("cpu"),
            ComputeDevice::Cuda { ordinal } => write!(formatter, "cuda:{ordinal}"),
        }
    }
}

/// Opens CUDA device `ordinal` with candle's kernels, after checking that the driver loads.
#[cfg(feature = "candle-cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    use cohort_collective::cuda::{CudaLibrary, require};
    require(CudaLibrary::Driver).map_err(|reason| TrainerError::NoCuda { ordinal, reason })?;
    Device::new_cuda(ordinal).map_err(|reason| TrainerError::CudaDevice { ordinal, reason })
}

/// Without candle's kernels there is nothing to compute with on the GPU, whatever the machine
/// has: the build is the cause, so the driver is not even looked for.
#[cfg(all(feature = "cuda", not(feature = "candle-cuda")))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Err(TrainerError::NoCandleCudaKernels { ordinal })
}

/// Without CUDA support at all: the collective's typed error says how to rebuild.
#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Err(TrainerError::NoCuda {
        ordinal,
        reason: cohort_collective::Error::NotCompiledWithCuda,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_opens_everywhere_and_devices_print_as_users_write_them() {
        assert!(ComputeDevice::Cpu.open().unwrap().is_cpu());
        assert!(ComputeDevice::default().is_cpu());
        assert!(!ComputeDevice::Cuda { ordinal: 0 }.is_cpu());
        assert_eq!(ComputeDevice::Cpu.to_string(), "cpu");
        assert_eq!(ComputeDevice::Cuda { ordinal: 3 }.to_string(), "cuda:3");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_a_gpu_is_the_not_compiled_with_cuda_error() {
        let error = ComputeDevice::Cuda { ordinal: 1 }.open().unwrap_err();
        assert!(
            matches!(
                error,
                TrainerError::NoCuda {
                    ordinal: 1,
                    reason: cohort_collective::Error::NotCompiledWithCuda
                }
            ),
            "{error}"
        );
        let message = error.to_string();
        assert!(
            message.starts_with("cuda device 1: ") && message.contains("--features cuda"),
            "{message}"
        );
    }

    #[cfg(all(feature = "cuda", not(feature = "candle-cuda")))]
    #[test]
    fn without_candle_kernels_a_gpu_is_the_rebuild_with_candle_cuda_error() {
        let error = ComputeDevice::Cuda { ordinal: 0 }.open().unwrap_err();
        assert!(
            matches!(error, TrainerError::NoCandleCudaKernels { ordinal: 0 }),
            "{error}"
        );
        let message = error.to_string();
        assert!(
            message.contains("without candle's CUDA kernels")
                && message.contains("--features candle-cuda"),
            "{message}"
        );
    }

    #[cfg(feature = "candle-cuda")]
    #[test]
    fn with_candle_kernels_a_gpu_opens_or_the_reason_is_typed() {
        let device = ComputeDevice::Cuda { ordinal: 0 };
        match device.open() {
            Ok(device) => assert!(device.is_cuda()),
            Err(TrainerError::NoCuda {
                reason: cohort_collective::Error::NoCudaDriver,
                ..
            }) => eprintln!("no CUDA driver on this machine"),
            Err(TrainerError::CudaDevice { reason, .. }) => {
                eprintln!("the CUDA driver refused device 0: {reason}")
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
}
