//! Whether this build and this machine can use CUDA: the checks every GPU path makes first.
//!
//! cudarc loads the CUDA libraries when they are first used and panics when one is missing, so
//! callers ask here before touching it. The checks open the library by its soname through the
//! dynamic loader, which works however cudarc itself was built (loaded at run time by default,
//! linked when candle's CUDA kernels are compiled in).

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
    /// The sonames tried, in order.
    fn sonames(self) -> &'static [&'static CStr] {
        match self {
            CudaLibrary::Driver => &[c"libcuda.so.1", c"libcuda.so"],
            CudaLibrary::Nccl => &[c"libnccl.so.2", c"libnccl.so"],
        }
    }

    /// Whether the dynamic loader can open the library on this machine.
    pub fn is_present(self) -> bool {
        loadable(self.sonames())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_are_found_by_soname_and_missing_ones_are_reported_absent() {
        assert!(loadable(&[c"libc.so.6"]));
        assert!(!loadable(&[c"libcohort-no-such-library.so.1"]));
        assert!(loadable(&[c"libcohort-no-such-library.so.1", c"libc.so.6"]));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_feature_cuda_is_a_typed_error() {
        let error = require(CudaLibrary::Driver).unwrap_err();
        assert!(matches!(error, Error::NotCompiledWithCuda), "{error}");
        assert!(error.to_string().contains("--features cuda"), "{error}");
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
