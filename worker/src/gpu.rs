//! The GPUs of this node, read through the CUDA driver API (cudarc, loaded at run time).
//!
//! Built without the `cuda` feature, [`GpuInventory::detect`] returns
//! [`Error::NotCompiledWithCuda`]; built with it on a machine without a driver, it returns
//! [`Error::NoCudaDriver`]. Either way the worker still starts and offers its CPU slots.

use cohort_proto::v1::Device;

use crate::devices::DeviceInventory;
use crate::error::{Error, Result};

/// GPUs offered to the scheduler, indexed as the driver numbers them.
#[derive(Debug, Clone, Default)]
pub struct GpuInventory {
    /// One entry per offered GPU.
    devices: Vec<Device>,
}

impl DeviceInventory for GpuInventory {
    fn devices(&self) -> Vec<Device> {
        self.devices.clone()
    }
}

impl GpuInventory {
    /// Reads every GPU the driver reports, or only those in `only` (the worker's `--gpus`),
    /// failing when one of those does not exist.
    pub fn detect(only: Option<&[u32]>) -> Result<Self> {
        let all = detect_all()?;
        let devices = match only {
            None => all,
            Some(wanted) => wanted
                .iter()
                .map(|&index| {
                    all.iter()
                        .find(|device| device.index == index)
                        .cloned()
                        .ok_or_else(|| {
                            Error::Config(format!(
                                "--gpus {index}: this node has {} GPU(s)",
                                all.len()
                            ))
                        })
                })
                .collect::<Result<_>>()?,
        };
        Ok(Self { devices })
    }

    /// Number of GPUs offered.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether no GPU is offered.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

#[cfg(not(feature = "cuda"))]
fn detect_all() -> Result<Vec<Device>> {
    Err(Error::NotCompiledWithCuda)
}

#[cfg(feature = "cuda")]
fn detect_all() -> Result<Vec<Device>> {
    use cudarc::driver::{result, sys};

    // SAFETY: only probes whether the library can be opened.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::NoCudaDriver);
    }
    let driver =
        |what: &str, error: result::DriverError| Error::Devices(format!("{what}: {error}"));
    result::init().map_err(|e| driver("initialising the CUDA driver", e))?;
    let count = result::device::get_count().map_err(|e| driver("counting GPUs", e))?;
    let mut devices = Vec::with_capacity(count.max(0) as usize);
    for ordinal in 0..count {
        let device = result::device::get(ordinal).map_err(|e| driver("opening a GPU", e))?;
        let name =
            result::device::get_name(device).map_err(|e| driver("reading a GPU's name", e))?;
        // SAFETY: `device` was returned by `get` above.
        let (total, major, minor) = unsafe {
            (
                result::device::total_mem(device).map_err(|e| driver("reading GPU memory", e))?,
                result::device::get_attribute(
                    device,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                )
                .map_err(|e| driver("reading compute capability", e))?,
                result::device::get_attribute(
                    device,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                )
                .map_err(|e| driver("reading compute capability", e))?,
            )
        };
        devices.push(Device {
            kind: cohort_proto::v1::DeviceKind::Gpu as i32,
            index: ordinal as u32,
            name,
            memory_total_bytes: total as u64,
            memory_free_bytes: free_memory(device).unwrap_or(0),
            compute_capability: format!("{major}.{minor}"),
            pci_bus_id: pci_bus_id(device).unwrap_or_default(),
        });
    }
    Ok(devices)
}

/// Free memory of a GPU, read inside its primary context (retained and released again).
#[cfg(feature = "cuda")]
fn free_memory(device: cudarc::driver::sys::CUdevice) -> Option<u64> {
    use cudarc::driver::result;

    // SAFETY: `device` is valid; the primary context is retained for the duration of the
    // query, made current on this thread only, and released afterwards.
    unsafe {
        let context = result::primary_ctx::retain(device).ok()?;
        let free = result::ctx::set_current(context)
            .ok()
            .and_then(|()| result::mem_get_info().ok())
            .map(|(free, _total)| free as u64);
        let _ = result::primary_ctx::release(device);
        free
    }
}

/// PCI bus id of a GPU, e.g. `0000:19:00.0`.
#[cfg(feature = "cuda")]
fn pci_bus_id(device: cudarc::driver::sys::CUdevice) -> Option<String> {
    let mut buffer = [0 as std::ffi::c_char; 32];
    // SAFETY: the buffer is as long as the length passed; the driver writes a NUL-terminated
    // string into it.
    let status = unsafe {
        cudarc::driver::sys::cuDeviceGetPCIBusId(buffer.as_mut_ptr(), buffer.len() as i32, device)
    };
    if status != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        return None;
    }
    // SAFETY: the driver NUL-terminated the string within the buffer.
    let text = unsafe { std::ffi::CStr::from_ptr(buffer.as_ptr()) };
    Some(text.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_feature_gpus_are_a_typed_error() {
        let error = GpuInventory::detect(None).unwrap_err();
        assert!(matches!(error, Error::NotCompiledWithCuda), "{error}");
        assert!(error.to_string().contains("--features cuda"));
    }

    /// Runs in CI with `--features cuda` on a machine without a GPU; on a GPU machine it checks
    /// the inventory instead.
    #[cfg(feature = "cuda")]
    #[test]
    fn with_the_feature_gpus_are_found_or_the_driver_is_reported_missing() {
        match GpuInventory::detect(None) {
            Ok(inventory) => {
                eprintln!("found {} GPU(s)", inventory.len());
                for device in inventory.devices() {
                    assert!(!device.name.is_empty());
                    assert!(device.memory_total_bytes > 0);
                    assert!(device.compute_capability.contains('.'));
                }
            }
            Err(Error::NoCudaDriver) => {
                eprintln!("skipping the GPU checks: no CUDA driver on this machine");
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
}
