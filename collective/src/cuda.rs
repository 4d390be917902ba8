//! Whether this build and this machine can use CUDA: the checks every GPU path makes first.
//!
//! cudarc loads the CUDA libraries when they are first used and panics when one is missing, so
//! callers ask here before touching it. The checks open the library through the dynamic loader
//! under a name cudarc itself tries, or find it already linked into the process (when candle's
//! CUDA kernels are compiled in, cudarc links the libraries instead of loading them).

use std::ffi::CStr;

use crate::error::{Error, Result};

/// A CUDA library a GPU path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaLibrary {
    /// The driver API, `libcuda.so.1`, installed with the NVIDIA driver.
    Driver,
    /// NCCL, `libnccl.so.2`, installed separately from the driver and the toolkit.
    Nccl,
}

impl CudaLibrary {
    /// The names tried, in order: names cudarc's run-time loader also tries. For NCCL that is
    /// only the unversioned `libnccl.so` (cudarc never asks for `libnccl.so.2`, so a runtime-only
    /// NCCL install without the development link would make it panic).
    fn loadable_names(self) -> &'static [&'static CStr] {
        match self {
            CudaLibrary::Driver => &[c"libcuda.so.1", c"libcuda.so"],
            CudaLibrary::Nccl => &[c"libnccl.so"],
        }
    }

    /// The soname under which the library is found when it is linked into the executable.
    fn linked_soname(self) -> &'static CStr {
        match self {
            CudaLibrary::Driver => c"libcuda.so.1",
            CudaLibrary::Nccl => c"libnccl.so.2",
        }
    }

    /// Whether cudarc can use the library in this process: the dynamic loader can open it under
    /// a name cudarc tries, or it is already linked in.
    pub fn is_present(self) -> bool {
        loadable(self.loadable_names()) || already_loaded(self.linked_soname())
    }
}

/// Whether a library with this soname is already loaded in the process (linked at build time).
fn already_loaded(soname: &CStr) -> bool {
    // SAFETY: `soname` is NUL-terminated; RTLD_NOLOAD never loads anything, it only returns a
    // handle (with a reference count we give back at once) to a library already loaded.
    unsafe {
        let handle = libc::dlopen(soname.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD);
        if handle.is_null() {
            false
        } else {
            libc::dlclose(handle);
            true
        }
    }
}

/// Whether the dynamic loader can open any of `sonames`.
fn loadable(sonames: &[&CStr]) -> bool {
    sonames.iter().any(|soname| {
        // SAFETY: `soname` is NUL-terminated; a handle that opens is closed at once, and
        // RTLD_LAZY resolves no symbol, so no library code beyond its initialisers runs.
        unsafe {
            let handle = libc::dlopen(soname.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
            if handle.is_null() {
                false
            } else {
                libc::dlclose(handle);
                true
            }
        }
    })
}

/// Succeeds when this build has CUDA support and `library` can be loaded; otherwise returns
/// [`Error::NotCompiledWithCuda`], [`Error::NoCudaDriver`] or [`Error::NoNccl`].
pub fn require(library: CudaLibrary) -> Result<()> {
    if !cfg!(feature = "cuda") {
        return Err(Error::NotCompiledWithCuda);
    }
    if !CudaLibrary::Driver.is_present() {
        return Err(Error::NoCudaDriver);
    }
    if library == CudaLibrary::Nccl && !CudaLibrary::Nccl.is_present() {
        return Err(Error::NoNccl);
    }
    Ok(())
}

/// Returns the number of CUDA devices this process can use (0 when the driver finds none).
///
/// Fails with the errors of [`require`] when the build or the machine has no CUDA driver.
pub fn device_count() -> Result<usize> {
    require(CudaLibrary::Driver)?;
    count_devices()
}

/// Asks the driver how many devices it sees.
#[cfg(feature = "cuda")]
fn count_devices() -> Result<usize> {
    use cudarc::driver::{CudaContext, DriverError, sys::CUresult};
    match CudaContext::device_count() {
        Ok(count) => Ok(usize::try_from(count).unwrap_or(0)),
        // cuInit reports a machine without GPUs (or with all of them hidden) this way.
        Err(DriverError(CUresult::CUDA_ERROR_NO_DEVICE)) => Ok(0),
        Err(error) => Err(Error::Cuda {
            operation: "count devices",
            message: error.to_string(),
        }),
    }
}

/// Never reached: [`require`] fails first in a build without CUDA.
#[cfg(not(feature = "cuda"))]
fn count_devices() -> Result<usize> {
    Err(Error::NotCompiledWithCuda)
}

/// Returns the model name of CUDA device `ordinal` ("NVIDIA H100 80GB HBM3"), for reports.
///
/// Fails with the errors of [`require`] when the build or the machine has no CUDA driver.
pub fn device_name(ordinal: usize) -> Result<String> {
    require(CudaLibrary::Driver)?;
    read_device_name(ordinal)
}

/// Asks the driver for a device's name.
#[cfg(feature = "cuda")]
fn read_device_name(ordinal: usize) -> Result<String> {
    let failed = |error: cudarc::driver::DriverError| Error::Cuda {
        operation: "read the device name",
        message: error.to_string(),
    };
    let ordinal = i32::try_from(ordinal).map_err(|_| Error::Cuda {
        operation: "read the device name",
        message: format!("device {ordinal} does not exist"),
    })?;
    cudarc::driver::result::init().map_err(failed)?;
    let device = cudarc::driver::result::device::get(ordinal).map_err(failed)?;
    cudarc::driver::result::device::get_name(device).map_err(failed)
}

/// Never reached: [`require`] fails first in a build without CUDA.
#[cfg(not(feature = "cuda"))]
fn read_device_name(_ordinal: usize) -> Result<String> {
    Err(Error::NotCompiledWithCuda)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_are_found_by_soname_and_missing_ones_are_reported_absent() {
        assert!(loadable(&[c"libc.so.6"]));
        assert!(!loadable(&[c"libcohort-no-such-library.so.1"]));
        assert!(loadable(&[c"libcohort-no-such-library.so.1", c"libc.so.6"]));
        // The C library is linked into every test binary; a library never loaded is not.
        assert!(already_loaded(c"libc.so.6"));
        assert!(!already_loaded(c"libcohort-no-such-library.so.1"));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_feature_cuda_is_a_typed_error() {
        let error = require(CudaLibrary::Driver).unwrap_err();
        assert!(matches!(error, Error::NotCompiledWithCuda), "{error}");
        assert!(error.to_string().contains("--features cuda"), "{error}");
        let error = device_count().unwrap_err();
        assert!(matches!(error, Error::NotCompiledWithCuda), "{error}");
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn with_the_feature_cuda_is_available_or_the_driver_is_reported_missing() {
        match require(CudaLibrary::Nccl) {
            Ok(()) => eprintln!("CUDA driver and NCCL found"),
            Err(Error::NoCudaDriver) => eprintln!("no CUDA driver on this machine"),
            Err(Error::NoNccl) => eprintln!("CUDA driver found, NCCL missing"),
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
}
