//! The raw NCCL communicator: created non-blocking, polled for the progress of calls NCCL
//! finishes in the background and for asynchronous errors, and ended either gracefully
//! ([`RawComm::close`]: finalize, then destroy) or by [`RawComm::abort`], which dropping does.
//!
//! Every NCCL result is read through [`classify`]: success, in progress, or an error. cudarc's
//! `result()` returns `Ok(NcclStatus::NumResults)` for code 8, which the bindings it was built
//! with (NCCL 2.24) name `ncclNumResults`, but NCCL 2.30 returns code 8 as `ncclTimeout`; so any
//! code but success and in-progress is an error here.
//!
//! cudarc's safe `Comm` is not used: it keeps its `ncclComm_t` private, so neither
//! `ncclCommGetAsyncError` nor a checked abort can reach it, and its `Drop` `expect`s the abort
//! to succeed (a panic on the very path that handles failures). [`RawComm`] owns the handle
//! instead and calls cudarc's `result`/`sys` functions on it. Holding a raw pointer, it is
//! neither `Send` nor `Sync`, which is what NCCL requires of a communicator.

use std::ffi::{CStr, c_char};
use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use cudarc::nccl::result::{self, NcclError, NcclStatus};
use cudarc::nccl::sys;
use tracing::warn;

/// Oldest NCCL release with non-blocking communicators (`ncclCommInitRankConfig`, and calls that
/// return `ncclInProgress`): 2.14.0, in NCCL's version encoding.
const OLDEST_SUPPORTED_VERSION: i32 = 21_400;

/// The NCCL version whose `ncclConfig_t` layout cudarc's bindings carry (the workspace's
/// `nccl-02024` feature: 2.24), in NCCL's encoding. NCCL copies no more of the struct than its
/// `size` says, and reads only the fields this version knew.
const CONFIG_VERSION: u32 = 22_400;

/// `NCCL_CONFIG_UNDEF_INT`: "use NCCL's default" for an integer field of `ncclConfig_t`.
const UNDEFINED_INT: i32 = i32::MIN;

/// `ncclConfig_t::magic` as `NCCL_CONFIG_INITIALIZER` sets it.
const CONFIG_MAGIC: u32 = 0xcafe_beef;

/// Fails unless the loaded NCCL supports what this module uses (calling a symbol the library
/// lacks would make cudarc panic).
pub(super) fn check_version() -> Result<(), String> {
    let mut version: i32 = 0;
    // SAFETY: `version` is valid for writes for the whole call.
    let status = unsafe { sys::ncclGetVersion(&mut version) }.result();
    if let Err(error) = classify(status) {
        return Err(format!("ncclGetVersion failed: {}", describe_code(&error)));
    }
    if version < OLDEST_SUPPORTED_VERSION {
        return Err(format!(
            "NCCL version code {version} is too old, expected 2.14 ({OLDEST_SUPPORTED_VERSION}) \
             or newer"
        ));
    }
    Ok(())
}

/// Creates a new unique id (rank 0's job) and returns its bytes.
pub(super) fn new_unique_id() -> Result<[u8; 128], String> {
    let mut id = MaybeUninit::<sys::ncclUniqueId>::uninit();
    // SAFETY: `id` is valid for writes of one `ncclUniqueId` for the whole call.
    let status = unsafe { sys::ncclGetUniqueId(id.as_mut_ptr()) }.result();
    if let Err(error) = classify(status) {
        return Err(format!("ncclGetUniqueId failed: {}", describe_code(&error)));
    }
    // SAFETY: NCCL wrote the whole id: the call succeeded (an error, including a code cudarc
    // would have read as success, returned above).
    let id = unsafe { id.assume_init() };
    // `c_char` is `i8` or `u8` depending on the platform; the bytes are opaque either way.
    Ok(id.internal.map(|byte| byte as u8))
}

/// Reads an NCCL call's result: done, still running in the background (calls on a
/// non-blocking communicator), or failed. Every code other than `ncclSuccess` and
/// `ncclInProgress` is an error, including the `Ok(NcclStatus::NumResults)` cudarc makes of code
/// 8, which NCCL 2.30 and later return for `ncclTimeout`.
pub(super) fn classify(status: Result<NcclStatus, NcclError>) -> Result<Progress, NcclError> {
    match status {
        Ok(NcclStatus::Success) => Ok(Progress::Ready),
        Ok(NcclStatus::InProgress) => Ok(Progress::Pending),
        Ok(NcclStatus::NumResults) => Err(NcclError(sys::ncclResult_t::ncclNumResults)),
        Err(error) => Err(error),
    }
}

/// Returns the bindings' name of a result code as NCCL wrote it, or `None` for a code they do
/// not know (one a newer NCCL added).
fn known_code(raw: u32) -> Option<sys::ncclResult_t> {
    use sys::ncclResult_t as Code;
    Some(match raw {
        0 => Code::ncclSuccess,
        1 => Code::ncclUnhandledCudaError,
        2 => Code::ncclSystemError,
        3 => Code::ncclInternalError,
        4 => Code::ncclInvalidArgument,
        5 => Code::ncclInvalidUsage,
        6 => Code::ncclRemoteError,
        7 => Code::ncclInProgress,
        8 => Code::ncclNumResults,
        _ => return None,
    })
}

/// Names a result code without asking the library: its name in the bindings, or for code 8
/// (`ncclNumResults` in the 2.24 bindings, never returned by NCCL 2.24) what it means from NCCL
/// 2.30 on.
fn code_name(code: sys::ncclResult_t) -> String {
    match code {
        sys::ncclResult_t::ncclNumResults => format!(
            "NCCL returned result code {} (ncclTimeout in NCCL 2.30 and later)",
            code as u32
        ),
        code => format!("{code:?}"),
    }
}

/// Returns the value of `NCCL_COMM_BLOCKING` when it makes NCCL create communicators blocking,
/// which overrides the non-blocking config [`RawComm::join`] asks for: joining, collectives and
/// finalizing then block inside NCCL, out of reach of every deadline. The caller warns.
pub(super) fn blocking_forced_by_environment() -> Option<String> {
    let value = std::env::var_os("NCCL_COMM_BLOCKING")?;
    let value = value.to_string_lossy().into_owned();
    forces_blocking(&value).then_some(value)
}

/// Whether NCCL reads `value` of `NCCL_COMM_BLOCKING` as a request for blocking communicators.
/// NCCL parses the variable as an integer (`strtoll`, ignoring what follows the digits) and
/// ignores it when empty or not a number; any number but 0 asks for blocking (1 is the only
/// valid one, but a wrong one is no less a problem to warn about).
fn forces_blocking(value: &str) -> bool {
    let digits = value.trim_start().trim_start_matches(['+', '-']);
    let (radix, digits) = match digits.strip_prefix("0x").or(digits.strip_prefix("0X")) {
        Some(hex) => (16, hex),
        None => (10, digits),
    };
    let number: String = digits.chars().take_while(|c| c.is_digit(radix)).collect();
    !number.is_empty() && number.chars().any(|digit| digit != '0')
}

/// Returns NCCL's name and description of an error code (`ncclSystemError: unhandled system
/// error`).
pub(super) fn describe_code(error: &NcclError) -> String {
    // SAFETY: ncclGetErrorString returns a pointer to a static NUL-terminated string for any
    // code (an "unknown" text for codes it does not know), or null, which `c_text` handles.
    let text = unsafe { c_text(sys::ncclGetErrorString(error.0)) };
    match text {
        Some(text) if !text.is_empty() => format!("{}: {text}", code_name(error.0)),
        _ => code_name(error.0),
    }
}

/// Copies a C string NCCL returned, or `None` for null.
///
/// # Safety
/// `text` must be null or point to a NUL-terminated string that stays valid during the call.
unsafe fn c_text(text: *const c_char) -> Option<String> {
    if text.is_null() {
        return None;
    }
    // SAFETY: non-null, NUL-terminated and valid, as the caller promises.
    Some(
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Pauses between polls: a few yields first (collectives on one machine often finish within
/// microseconds), then sleeps growing to 100 µs (so that a wait overshoots a collective's end by
/// no more than that, while a long one costs a few thousand cheap polls a second). This is the
/// watchdog's polling interval, not a wait standing in for synchronisation: completion is
/// decided by the CUDA event or the communicator state polled between pauses.
#[derive(Debug, Default)]
pub(super) struct Backoff {
    /// Pauses taken so far.
    pauses: u32,
}

impl Backoff {
    /// Yields this many times before sleeping.
    const YIELDS: u32 = 64;
    /// Longest sleep between polls.
    const LONGEST_SLEEP: Duration = Duration::from_micros(100);

    /// Gives the processor away until the next poll.
    pub(super) fn pause(&mut self) {
        self.pauses = self.pauses.saturating_add(1);
        if self.pauses <= Self::YIELDS {
            std::thread::yield_now();
            return;
        }
        let doublings = (self.pauses - Self::YIELDS).min(8);
        let sleep = Duration::from_micros(8 << doublings).min(Self::LONGEST_SLEEP);
        std::thread::sleep(sleep);
    }
}

/// The state of a communicator after a call NCCL may finish in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Progress {
    /// Everything asked of it so far is done (queued on the stream, for collectives).
    Ready,
    /// NCCL is still working on the last call.
    Pending,
}

/// An NCCL communicator handle. A healthy one is ended with [`RawComm::close`]; one that failed
/// with [`RawComm::abort`], which dropping it does too (it is dropped unclosed only on failure
/// paths, such as a join that did not complete).
#[derive(Debug)]
pub(super) struct RawComm {
    /// The handle; null once closed or aborted.
    handle: sys::ncclComm_t,
}

impl RawComm {
    /// Joins the communicator identified by `unique_id` as `rank` of `world_size`, on the CUDA
    /// device current on this thread, waiting until every rank has joined or `deadline` passes.
    ///
    /// The caller must have made the device's context current (NCCL picks the device with
    /// `cudaGetDevice`) and checked the NCCL version with [`check_version`].
    pub(super) fn join(
        unique_id: &[u8; 128],
        rank: usize,
        world_size: usize,
        deadline: Instant,
    ) -> Result<RawComm, String> {
        let (Ok(rank), Ok(world_size)) = (i32::try_from(rank), i32::try_from(world_size)) else {
            return Err(format!(
                "rank {rank} of {world_size} does not fit NCCL's int"
            ));
        };
        let unique_id = sys::ncclUniqueId {
            internal: unique_id.map(|byte| byte as c_char),
        };
        let mut config = non_blocking_config();
        let mut handle: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `handle` and `config` are valid for writes and reads for the whole call (NCCL
        // copies the config before returning); the config is initialised as
        // NCCL_CONFIG_INITIALIZER would, with `size` the size of the struct passed.
        let status = unsafe {
            result::comm_init_rank_config(&mut handle, world_size, unique_id, rank, &mut config)
        };
        // NCCL sets the handle (to null on early failures) whatever the status; once it is not
        // null, `RawComm` owns it and aborts it (by dropping) on every failure path below.
        let comm = (!handle.is_null()).then_some(RawComm { handle });
        match (classify(status), comm) {
            (Err(error), _) => Err(format!(
                "ncclCommInitRankConfig failed: {}",
                describe_code(&error)
            )),
            (Ok(_), None) => Err("ncclCommInitRankConfig returned no communicator".to_owned()),
            (Ok(_), Some(comm)) => {
                comm.wait_until_ready(deadline)
                    .map_err(|failure| match failure {
                        WaitFailure::Error(message) => message,
                        WaitFailure::Deadline(waited) => format!(
                            "not every rank joined within {waited:?} (a rank did not start, or \
                         picked another device or unique id)"
                        ),
                    })?;
                Ok(comm)
            }
        }
    }

    /// Returns the handle, for calls on it.
    pub(super) fn as_ptr(&self) -> sys::ncclComm_t {
        self.handle
    }

    /// Returns whether NCCL is done with the calls made so far, or the error it reports for
    /// this communicator (a failed background call, or a failure of a running collective that
    /// NCCL detected, such as a network error).
    pub(super) fn progress(&self) -> Result<Progress, String> {
        // Read as the plain integer NCCL writes: `ncclResult_t` is `repr(u32)`, and a code the
        // bindings lack would be an invalid value of the enum, but is a valid `u32`.
        let mut state: u32 = 0;
        let state_pointer = (&mut state as *mut u32).cast::<sys::ncclResult_t>();
        // SAFETY: the handle is a live communicator owned by `self`; `state_pointer` is valid for
        // writes of a `u32`, which has the size and alignment of the `repr(u32)` enum.
        let queried = unsafe { sys::ncclCommGetAsyncError(self.handle, state_pointer) }.result();
        if let Err(error) = classify(queried) {
            return Err(format!(
                "ncclCommGetAsyncError failed: {}",
                self.describe(&error)
            ));
        }
        match known_code(state) {
            Some(sys::ncclResult_t::ncclSuccess) => Ok(Progress::Ready),
            Some(sys::ncclResult_t::ncclInProgress) => Ok(Progress::Pending),
            Some(code) => Err(self.describe(&NcclError(code))),
            None => Err(match self.last_error() {
                Some(last) => format!("NCCL returned result code {state} ({last})"),
                None => format!("NCCL returned result code {state}"),
            }),
        }
    }

    /// Finishes a call on this communicator: returns its error if it failed, or waits until
    /// NCCL has finished it in the background (for collectives: queued them on the stream).
    pub(super) fn settle(
        &self,
        call: &str,
        status: Result<NcclStatus, NcclError>,
        deadline: Instant,
    ) -> Result<(), String> {
        if let Err(error) = classify(status) {
            return Err(format!("{call} failed: {}", self.describe(&error)));
        }
        self.wait_until_ready(deadline)
            .map_err(|failure| match failure {
                WaitFailure::Error(message) => message,
                WaitFailure::Deadline(waited) => format!(
                    "{call} was not queued within {waited:?} (connecting to the other ranks \
                     stalled: a rank stopped, died, or called a different collective)"
                ),
            })
    }

    /// Ends a healthy communicator gracefully: `ncclCommFinalize`, which flushes what is still
    /// in flight (NCCL's proxies finish sending) and waits until every rank of this communicator
    /// on this host has finalized too, so that none still reads this rank's buffers over NVLink
    /// or PCIe; then, once the communicator state says finalizing is done, `ncclCommDestroy`,
    /// which then frees only local resources.
    ///
    /// Finalizing is polled until `deadline`: if it fails or does not finish by then (a peer
    /// died, or never closes), the communicator is aborted and the error returned. The caller
    /// must have made the device's context current and let its queued collectives finish.
    pub(super) fn close(mut self, deadline: Instant) -> Result<(), String> {
        // SAFETY: the handle is a live communicator owned by `self`, finalized at most once
        // (`self` is consumed).
        let finalized = classify(unsafe { sys::ncclCommFinalize(self.handle) }.result());
        let finished = match finalized {
            Err(error) => Err(format!(
                "ncclCommFinalize failed: {}",
                self.describe(&error)
            )),
            Ok(_) => self
                .wait_until_ready(deadline)
                .map_err(|failure| match failure {
                    WaitFailure::Error(message) => format!("finalizing failed: {message}"),
                    WaitFailure::Deadline(waited) => format!(
                        "finalizing did not finish within {waited:?} (a rank of this host did not \
                     close its communicator, or a peer stopped taking part)"
                    ),
                }),
        };
        if let Err(message) = finished {
            self.abort();
            return Err(format!("{message}; the communicator was aborted"));
        }
        let handle = self.release();
        // SAFETY: `handle` is live and finalized (its state is success); it was released from
        // `self`, so nothing uses or aborts it after this call.
        let destroyed = classify(unsafe { sys::ncclCommDestroy(handle) }.result());
        // Aborting after a failed destroy could free the communicator twice: it is left as is
        // (at worst leaked, at the end of a job).
        destroyed
            .map(drop)
            .map_err(|error| format!("ncclCommDestroy failed: {}", describe_code(&error)))
    }

    /// Aborts the communicator: stops its kernels still running and frees it, without waiting
    /// for other ranks. A failure to abort is only logged: there is nothing more to do.
    pub(super) fn abort(mut self) {
        abort_handle(self.release());
    }

    /// Hands the handle to the caller, leaving `self` with nothing to end on drop.
    fn release(&mut self) -> sys::ncclComm_t {
        std::mem::replace(&mut self.handle, std::ptr::null_mut())
    }

    /// Polls the communicator state until it is ready, fails, or `deadline` passes.
    fn wait_until_ready(&self, deadline: Instant) -> Result<(), WaitFailure> {
        let started = Instant::now();
        let mut backoff = Backoff::default();
        loop {
            match self.progress() {
                Ok(Progress::Ready) => return Ok(()),
                Ok(Progress::Pending) => {}
                Err(message) => return Err(WaitFailure::Error(message)),
            }
            if Instant::now() >= deadline {
                return Err(WaitFailure::Deadline(started.elapsed()));
            }
            backoff.pause();
        }
    }

    /// Describes an error code with NCCL's description of this communicator's last error.
    fn describe(&self, error: &NcclError) -> String {
        match self.last_error() {
            Some(last) => format!("{} ({last})", describe_code(error)),
            None => describe_code(error),
        }
    }

    /// Returns NCCL's description of the last error on this communicator, if it has one.
    fn last_error(&self) -> Option<String> {
        // SAFETY: the handle is live; ncclGetLastError returns null or a NUL-terminated string
        // owned by NCCL that stays valid until the next NCCL call on this thread, and it is
        // copied before any.
        let last = unsafe { c_text(sys::ncclGetLastError(self.handle)) };
        last.filter(|last| !last.is_empty())
    }
}

impl Drop for RawComm {
    /// Aborts a communicator neither closed nor aborted: dropped on a failure path.
    fn drop(&mut self) {
        if !self.handle.is_null() {
            abort_handle(self.release());
        }
    }
}

/// Aborts a communicator (see [`RawComm::abort`]).
fn abort_handle(handle: sys::ncclComm_t) {
    // SAFETY: the caller passes a live handle it owned and released; it is never used after.
    let aborted = classify(unsafe { sys::ncclCommAbort(handle) }.result());
    if let Err(error) = aborted {
        warn!(error = %describe_code(&error), "ncclCommAbort failed");
    }
}

/// Why polling a communicator stopped without it becoming ready.
enum WaitFailure {
    /// NCCL reported an error.
    Error(String),
    /// The deadline passed after waiting this long.
    Deadline(Duration),
}

/// Returns `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: calls return at once, and the
/// communicator state says when NCCL has finished them.
fn non_blocking_config() -> sys::ncclConfig_t {
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: CONFIG_MAGIC,
        version: CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: UNDEFINED_INT,
        minCTAs: UNDEFINED_INT,
        maxCTAs: UNDEFINED_INT,
        netName: std::ptr::null(),
        splitShare: UNDEFINED_INT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_is_nccls_initializer_but_non_blocking() {
        let config = non_blocking_config();
        assert_eq!(config.magic, 0xcafe_beef);
        assert_eq!(config.blocking, 0);
        assert_eq!(config.minCTAs, i32::MIN);
        // size, magic, version, 4 ints, a pointer and an int, padded to the pointer's alignment.
        assert_eq!(config.size, 48);
    }

    #[test]
    fn only_success_and_in_progress_are_not_errors() {
        use sys::ncclResult_t as Code;
        assert_eq!(classify(Ok(NcclStatus::Success)), Ok(Progress::Ready));
        assert_eq!(classify(Ok(NcclStatus::InProgress)), Ok(Progress::Pending));
        // Code 8 is ncclTimeout from NCCL 2.30 on; cudarc reads it as `Ok(NumResults)`.
        assert_eq!(
            classify(Ok(NcclStatus::NumResults)),
            Err(NcclError(Code::ncclNumResults))
        );
        assert_eq!(
            classify(Err(NcclError(Code::ncclRemoteError))),
            Err(NcclError(Code::ncclRemoteError))
        );
        assert_eq!(
            code_name(Code::ncclNumResults),
            "NCCL returned result code 8 (ncclTimeout in NCCL 2.30 and later)"
        );
        assert_eq!(code_name(Code::ncclSystemError), "ncclSystemError");
    }

    #[test]
    fn raw_codes_map_to_the_bindings_or_to_none() {
        for raw in 0..=8 {
            assert_eq!(known_code(raw).map(|code| code as u32), Some(raw));
        }
        assert_eq!(known_code(9), None);
        assert_eq!(known_code(u32::MAX), None);
    }

    #[test]
    fn nccl_comm_blocking_is_read_as_nccl_reads_it() {
        for value in ["1", " 1", "0x1", "2", "1abc", "-1", "01"] {
            assert!(forces_blocking(value), "{value:?}");
        }
        for value in ["0", "", "  ", "no", "0x0", "00", "x1"] {
            assert!(!forces_blocking(value), "{value:?}");
        }
    }

    #[test]
    fn backoff_sleeps_briefly() {
        let mut backoff = Backoff::default();
        for _ in 0..Backoff::YIELDS + 3 {
            backoff.pause();
        }
        let started = Instant::now();
        backoff.pause();
        assert!(started.elapsed() < Duration::from_millis(500));
    }
}
