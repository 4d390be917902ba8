//! How a rank's host allocator treats tensor buffers.
//!
//! candle allocates every intermediate tensor afresh and frees it when the last handle drops, so
//! a training step of the benchmark MLP allocates and frees tens of megabytes in buffers of up to
//! a few megabytes. glibc's defaults hand buffers above its mmap threshold to `mmap` and give
//! the top of the heap back to the kernel past its trim threshold, so most of those buffers are
//! fresh pages that fault in, zeroed by the kernel, on first write: about 5,000 page faults and a
//! third of the backward pass per step (measured with `perf stat -e page-faults`). Raising both
//! thresholds keeps freed buffers in the heap for the next step, as PyTorch's caching allocator
//! does. The price is that a rank keeps its peak heap (its largest step's tensors) until it
//! exits.

/// Buffers up to this size come from the heap: glibc's largest mmap threshold on 64-bit
/// targets (larger values are refused).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_BYTES: libc::c_int = 32 << 20;
/// Free memory at the top of the heap kept for reuse rather than given back to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD_BYTES: libc::c_int = 256 << 20;

/// Makes the process's allocator keep freed tensor buffers for reuse (see the module doc).
/// Process-wide: a rank calls it once at start, before its first step. Returns whether the
/// allocator took the setting (always false where the C library is not glibc, where there is
/// nothing to set).
pub fn keep_freed_buffers() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator parameters; these are in glibc's accepted range.
        let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) };
        // SAFETY: as above.
        let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) };
        mmap == 1 && trim == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_thresholds() {
        assert!(super::keep_freed_buffers());
    }
}
