//! The GPUs of this node, read through the CUDA driver API (cudarc, loaded at run time).
//!
//! Built without the `cuda` feature, [`GpuInventory::detect`] returns
//! [`Error::NotCompiledWithCuda`]; built with it on a machine without a driver, it returns
//! [`Error::NoCudaDriver`]. Either way the worker still starts and offers its CPU slots.
//!
//! Each GPU's entry also lists its direct paths to the node's other GPUs (peer access, native
//! atomics, the driver's performance rank), which tells NVLink-connected pairs from PCIe ones.

use cohort_proto::v1::Device;
#[cfg(feature = "cuda")]
use cohort_proto::v1::GpuPeer;

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
        Ok(Self {
            devices: select(detect_all()?, only)?,
        })
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

/// The GPUs of `all` named by `only` (all of them when `None`), in the order named, with peer
/// paths to GPUs left out of the offer removed; naming a GPU that does not exist is an error.
fn select(all: Vec<Device>, only: Option<&[u32]>) -> Result<Vec<Device>> {
    let mut devices: Vec<Device> = match only {
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
    // Paths to GPUs this worker does not offer mean nothing to the scheduler.
    let offered: Vec<u32> = devices.iter().map(|device| device.index).collect();
    for device in &mut devices {
        device.peers.retain(|peer| offered.contains(&peer.index));
    }
    Ok(devices)
}

#[cfg(not(feature = "cuda"))]
fn detect_all() -> Result<Vec<Device>> {
    Err(Error::NotCompiledWithCuda)
}

#[cfg(feature = "cuda")]
fn detect_all() -> Result<Vec<Device>> {
    use cudarc::driver::{result, sys};

    if !driver_library_present() {
        return Err(Error::NoCudaDriver);
    }
    let driver =
        |what: &str, error: result::DriverError| Error::Devices(format!("{what}: {error}"));
    result::init().map_err(|e| driver("initialising the CUDA driver", e))?;
    let count = result::device::get_count().map_err(|e| driver("counting GPUs", e))?;
    let handles = (0..count)
        .map(|ordinal| result::device::get(ordinal).map_err(|e| driver("opening a GPU", e)))
        .collect::<Result<Vec<_>>>()?;
    let mut devices = Vec::with_capacity(handles.len());
    for (ordinal, &device) in handles.iter().enumerate() {
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
            peers: peers(&handles, ordinal),
        });
    }
    Ok(devices)
}

/// Whether the dynamic loader can open the CUDA driver library. cudarc panics on first use when
/// it is missing, so the loader is asked first; asking it directly works however cudarc was
/// built (loaded at run time, or linked when candle's kernels are compiled in). The worker does
/// not link `cohort-collective`, whose `cuda` module makes the same check for ranks.
#[cfg(feature = "cuda")]
fn driver_library_present() -> bool {
    [c"libcuda.so.1", c"libcuda.so"].iter().any(|soname| {
        // SAFETY: `soname` is NUL-terminated; a handle that opens is closed at once, and
        // RTLD_LAZY resolves no symbol.
        unsafe {
            let handle = libc::dlopen(soname.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
            let present = !handle.is_null();
            if present {
                libc::dlclose(handle);
            }
            present
        }
    })
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

/// How GPU `ordinal` reaches each other GPU of `handles` directly. A pair the driver cannot
/// describe is left out rather than failing the inventory.
#[cfg(feature = "cuda")]
fn peers(handles: &[cudarc::driver::sys::CUdevice], ordinal: usize) -> Vec<GpuPeer> {
    use cudarc::driver::sys::{self, CUdevice_P2PAttribute};

    let source = handles[ordinal];
    let attribute = |attribute: CUdevice_P2PAttribute, destination| {
        let mut value: std::ffi::c_int = 0;
        // SAFETY: both handles came from cuDeviceGet and `value` outlives the call.
        let status =
            unsafe { sys::cuDeviceGetP2PAttribute(&mut value, attribute, source, destination) };
        (status == sys::CUresult::CUDA_SUCCESS).then_some(value)
    };
    handles
        .iter()
        .enumerate()
        .filter(|&(index, _)| index != ordinal)
        .filter_map(|(index, &destination)| {
            Some(GpuPeer {
                index: index as u32,
                access: attribute(
                    CUdevice_P2PAttribute::CU_DEVICE_P2P_ATTRIBUTE_ACCESS_SUPPORTED,
                    destination,
                )? != 0,
                native_atomics: attribute(
                    CUdevice_P2PAttribute::CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED,
                    destination,
                )? != 0,
                performance_rank: attribute(
                    CUdevice_P2PAttribute::CU_DEVICE_P2P_ATTRIBUTE_PERFORMANCE_RANK,
                    destination,
                )?,
            })
        })
        .collect()
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
    use cohort_proto::v1::GpuPeer;

    /// A node of `count` GPUs, each with a peer path to every other.
    fn node_of(count: u32) -> Vec<Device> {
        (0..count)
            .map(|index| Device {
                kind: cohort_proto::v1::DeviceKind::Gpu as i32,
                index,
                name: "test gpu".to_owned(),
                peers: (0..count)
                    .filter(|&other| other != index)
                    .map(|other| GpuPeer {
                        index: other,
                        access: true,
                        native_atomics: other % 2 == 0,
                        performance_rank: 0,
                    })
                    .collect(),
                ..Device::default()
            })
            .collect()
    }

    #[test]
    fn selecting_gpus_keeps_only_paths_between_offered_ones() {
        let selected = select(node_of(4), Some(&[3, 1])).unwrap();
        let indices: Vec<u32> = selected.iter().map(|device| device.index).collect();
        assert_eq!(indices, [3, 1]);
        let peers_of = |device: &Device| device.peers.iter().map(|p| p.index).collect::<Vec<_>>();
        assert_eq!(peers_of(&selected[0]), [1]);
        assert_eq!(peers_of(&selected[1]), [3]);
        assert_eq!(select(node_of(4), None).unwrap()[0].peers.len(), 3);
    }

    #[test]
    fn selecting_a_gpu_the_node_lacks_names_it() {
        let error = select(node_of(2), Some(&[0, 5])).unwrap_err();
        assert_eq!(error.to_string().matches("--gpus 5").count(), 1, "{error}");
        assert!(error.to_string().contains("2 GPU(s)"), "{error}");
    }

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
