//! The shared segment: an anonymous memory file (`memfd`) mapped by every rank of a group on
//! one node, and its layout.
//!
//! A memfd has no name in any file system, so nothing ever appears in `/dev/shm`, and the kernel
//! frees it when the last descriptor and mapping are gone: when every rank has ended, however it
//! ended (a SIGKILLed rank included). Its size is sealed, so no rank can shrink it under the
//! others (which would turn their accesses into SIGBUS).
//!
//! Layout: a [`Header`], then one [`Control`] block per rank, each on its own pair of cache lines
//! (no false sharing between the words ranks spin on), then per rank two data slots of
//! `slot_bytes` (one per epoch parity, see [`super::sync`]).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::error::{AbortCause, Error, Result};

/// Identifies a Cohort segment and its layout version.
const MAGIC: u64 = u64::from_le_bytes(*b"COHSHM01");
/// Bytes reserved for the header.
const HEADER_BYTES: usize = 128;
/// Bytes of each rank's control block: two cache lines, so the prefetcher of one rank's line
/// does not pull in another's.
const CONTROL_BYTES: usize = 128;
/// Alignment of the data slots.
const SLOT_ALIGN: usize = 64;
/// The name every group's memfd shows in `/proc/PID/maps` (`/memfd:cohort-shm (deleted)`).
pub const MEMFD_NAME: &str = "cohort-shm";

/// The segment's first bytes: what every rank checks before trusting the layout, and the
/// group's abort word.
#[repr(C)]
struct Header {
    magic: AtomicU64,
    world_size: AtomicU64,
    slot_bytes: AtomicU64,
    /// 0 while no rank has failed; otherwise [`Abort::pack`]ed.
    abort: AtomicU64,
}

/// One rank's words in the segment.
#[repr(C)]
pub(crate) struct Control {
    /// The last epoch this rank arrived at (its data for that epoch is in its slot). A futex
    /// word: waiters sleep on it.
    pub arrived: AtomicU32,
    /// How many ranks sleep (or are about to) on `arrived`; the rank only calls the kernel to
    /// wake them when this is non-zero.
    pub waiters: AtomicU32,
    /// Set when the rank's communicator is dropped: it takes part in nothing more.
    pub departed: AtomicU32,
    _pad: u32,
    /// What the rank called in the epoch of each parity (collective, type, operation, root and
    /// length; [`super::sync::Call`]), compared by every rank to find mismatched calls.
    pub call: [[AtomicU64; 2]; 2],
}

/// Why the group aborted and who said so, as stored in the header's abort word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Abort {
    pub failed_rank: usize,
    pub cause: AbortCause,
    pub reporter: usize,
}

impl Abort {
    /// Packs into a non-zero word: a set bit, the cause, and both ranks.
    fn pack(self) -> u64 {
        1 << 63
            | u64::from(self.cause.code()) << 40
            | (self.failed_rank as u64 & 0xFFFFF) << 20
            | (self.reporter as u64 & 0xFFFFF)
    }

    /// Unpacks a word written by [`Abort::pack`]; `None` for 0.
    fn unpack(word: u64) -> Option<Abort> {
        (word != 0).then(|| Abort {
            failed_rank: ((word >> 20) & 0xFFFFF) as usize,
            cause: AbortCause::from_code(((word >> 40) & 0xFF) as u32),
            reporter: (word & 0xFFFFF) as usize,
        })
    }
}

/// The total size of a segment for `world_size` ranks with slots of `slot_bytes`.
pub(crate) fn segment_bytes(world_size: usize, slot_bytes: usize) -> usize {
    HEADER_BYTES + world_size * CONTROL_BYTES + world_size * 2 * slot_bytes
}

/// A mapped segment. Dropping it unmaps it (and closes the memfd).
pub(crate) struct Segment {
    base: NonNull<u8>,
    bytes: usize,
    world_size: usize,
    slot_bytes: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is owned by the Segment and stays valid until it drops; every word that
// several ranks touch concurrently is atomic, and the data slots are handed out only through
// the epoch protocol of `super::sync`.
unsafe impl Send for Segment {}

impl Segment {
    /// Creates a zeroed segment for `world_size` ranks, seals its size, maps it and writes the
    /// header.
    pub fn create(world_size: usize, slot_bytes: usize) -> Result<Segment> {
        let bytes = segment_bytes(world_size, slot_bytes);
        let name = std::ffi::CString::new(MEMFD_NAME).expect("no NUL in the name");
        // SAFETY: a valid C string and flags; the result is checked.
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(os_error("create the shared-memory file (memfd_create)"));
        }
        // SAFETY: `raw` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain system calls on a descriptor this function owns.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), bytes as libc::off_t) } != 0 {
            return Err(os_error("size the shared-memory file"));
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(os_error("seal the shared-memory file"));
        }
        let segment = Segment::map(fd, bytes, world_size, slot_bytes)?;
        let header = segment.header();
        header
            .world_size
            .store(world_size as u64, Ordering::Relaxed);
        header
            .slot_bytes
            .store(slot_bytes as u64, Ordering::Relaxed);
        header.magic.store(MAGIC, Ordering::Release);
        Ok(segment)
    }

    /// Maps a segment received from the group's creator, after checking that the file is
    /// sealed, large enough, and laid out for `world_size` ranks.
    pub fn open(fd: OwnedFd, world_size: usize) -> Result<Segment> {
        let invalid = |detail: String| Error::Io {
            context: "map the shared-memory segment".to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, detail),
        };
        // SAFETY: a plain system call on a descriptor this function owns.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(invalid("the file's size is not sealed".to_owned()));
        }
        let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `stat` is written by the call before it is read.
        if unsafe { libc::fstat(fd.as_raw_fd(), stat.as_mut_ptr()) } != 0 {
            return Err(os_error("read the shared-memory file's size"));
        }
        // SAFETY: fstat succeeded, so it filled `stat`.
        let file_bytes = unsafe { stat.assume_init() }.st_size as usize;
        if file_bytes < HEADER_BYTES {
            return Err(invalid(format!(
                "{file_bytes} bytes, too small for a header"
            )));
        }
        let header_only = Segment::map(fd, file_bytes, 0, 0)?;
        let header = header_only.header();
        let (magic, world, slot_bytes) = (
            header.magic.load(Ordering::Acquire),
            header.world_size.load(Ordering::Relaxed) as usize,
            header.slot_bytes.load(Ordering::Relaxed) as usize,
        );
        if magic != MAGIC || world != world_size {
            return Err(invalid(format!(
                "not a segment for {world_size} ranks (magic {magic:#x}, {world} ranks)"
            )));
        }
        if slot_bytes == 0 || file_bytes < segment_bytes(world_size, slot_bytes) {
            return Err(invalid(format!(
                "{file_bytes} bytes, too small for {world_size} ranks with {slot_bytes}-byte slots"
            )));
        }
        let mut segment = header_only;
        segment.world_size = world_size;
        segment.slot_bytes = slot_bytes;
        Ok(segment)
    }

    fn map(fd: OwnedFd, bytes: usize, world_size: usize, slot_bytes: usize) -> Result<Segment> {
        // SAFETY: a shared read-write mapping of a file this function owns, length checked
        // against the file's size by the callers.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(os_error("map the shared-memory file"));
        }
        Ok(Segment {
            base: NonNull::new(address.cast()).expect("mmap never returns null on success"),
            bytes,
            world_size,
            slot_bytes,
            fd,
        })
    }

    /// The memfd, to pass to the group's other ranks.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Bytes of each data slot.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is at least HEADER_BYTES long, page-aligned, and Header is all
        // atomics, valid for any bit pattern.
        unsafe { &*self.base.as_ptr().cast::<Header>() }
    }

    /// Rank `rank`'s control block.
    pub fn control(&self, rank: usize) -> &Control {
        assert!(rank < self.world_size);
        const { assert!(size_of::<Control>() <= CONTROL_BYTES) };
        // SAFETY: in bounds by the layout checked at creation or opening; aligned to 128; all
        // atomics, valid for any bit pattern.
        unsafe {
            &*self
                .base
                .as_ptr()
                .add(HEADER_BYTES + rank * CONTROL_BYTES)
                .cast::<Control>()
        }
    }

    /// The start of rank `rank`'s slot for epochs of `parity`: `slot_bytes` bytes, aligned
    /// to 64.
    pub fn slot(&self, rank: usize, parity: usize) -> *mut u8 {
        assert!(rank < self.world_size && parity < 2);
        let offset =
            HEADER_BYTES + self.world_size * CONTROL_BYTES + (rank * 2 + parity) * self.slot_bytes;
        debug_assert!(offset.is_multiple_of(SLOT_ALIGN) && offset + self.slot_bytes <= self.bytes);
        // SAFETY: in bounds, as above.
        unsafe { self.base.as_ptr().add(offset) }
    }

    /// The recorded abort, if any rank has aborted the group.
    pub fn abort(&self) -> Option<Abort> {
        Abort::unpack(self.header().abort.load(Ordering::Acquire))
    }

    /// Records `abort` unless another rank recorded one first; returns the one in force.
    pub fn set_abort(&self, abort: Abort) -> Abort {
        match self.header().abort.compare_exchange(
            0,
            abort.pack(),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => abort,
            Err(existing) => Abort::unpack(existing).unwrap_or(abort),
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; nothing borrows it any more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

/// The last operating-system error, with what was being done.
pub(crate) fn os_error(context: &str) -> Error {
    Error::Io {
        context: context.to_owned(),
        source: std::io::Error::last_os_error(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aborts_survive_packing() {
        for cause in [
            AbortCause::Disconnected,
            AbortCause::Stalled,
            AbortCause::ProtocolViolation,
            AbortCause::LocalFailure,
        ] {
            let abort = Abort {
                failed_rank: 15,
                cause,
                reporter: 3,
            };
            assert_ne!(abort.pack(), 0);
            assert_eq!(Abort::unpack(abort.pack()), Some(abort));
        }
        assert_eq!(Abort::unpack(0), None);
    }

    #[test]
    fn a_reopened_segment_shares_memory_and_the_first_abort_wins() {
        let created = Segment::create(3, 4096).unwrap();
        let fd = created.fd().try_clone().unwrap();
        let opened = Segment::open(fd, 3).unwrap();
        assert_eq!(opened.slot_bytes(), 4096);
        created.control(2).arrived.store(7, Ordering::Release);
        assert_eq!(opened.control(2).arrived.load(Ordering::Acquire), 7);
        // SAFETY: both slots lie in the mapping; nothing else touches them.
        unsafe { *created.slot(1, 1) = 42 };
        assert_eq!(unsafe { *opened.slot(1, 1) }, 42);

        let first = Abort {
            failed_rank: 1,
            cause: AbortCause::Stalled,
            reporter: 0,
        };
        let second = Abort {
            failed_rank: 2,
            ..first
        };
        assert_eq!(opened.set_abort(first), first);
        assert_eq!(created.set_abort(second), first);
        assert_eq!(created.abort(), Some(first));
    }

    #[test]
    fn a_segment_for_another_world_size_is_refused() {
        let created = Segment::create(2, 4096).unwrap();
        let error = Segment::open(created.fd().try_clone().unwrap(), 3)
            .err()
            .unwrap();
        assert!(
            error.to_string().contains("not a segment for 3 ranks"),
            "{error}"
        );
    }
}
