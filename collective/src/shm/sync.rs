//! The epoch protocol that orders the ranks' accesses to the segment, and failure detection.
//!
//! Every collective is a sequence of epochs. In epoch `e` a rank writes only its own slot of
//! parity `e % 2`, records what it called, then *arrives* (stores `e` in its `arrived` word,
//! release) and waits until every rank has arrived at `e` (acquire); after that it may read the
//! other ranks' slots of that parity until it arrives at `e + 1`. A rank can only write the same
//! slot again in epoch `e + 2`, which it reaches after everybody arrived at `e + 1`, so after
//! everybody finished reading it: two slots per rank make every epoch one barrier, with no
//! second barrier to release the buffers.
//!
//! Waiting spins briefly (when the node has a core per rank), then yields, then sleeps on the
//! awaited rank's `arrived` word with `FUTEX_WAIT` in short slices; an arriving rank calls
//! `FUTEX_WAKE` only when someone sleeps on it. Between slices the waiter checks that the ranks
//! it waits for are alive (their end of a Unix socket closes when their process dies, their
//! `departed` word is set when their communicator is dropped), whether another rank aborted the
//! group, and whether it has waited longer than the I/O timeout, in which case it blames the
//! rank furthest behind: shared memory shows every rank's position, so the blame is exact. A
//! rank that detects a failure records it in the segment's abort word (first writer wins) and
//! wakes everyone, so every rank reports the same failed rank.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::segment::{Abort, Segment};
use crate::buffer::{DType, ReduceOp};
use crate::error::{AbortCause, Error, Result};
use crate::operation::Collective;

/// How long a waiter yields the processor before it sleeps.
const YIELD_FOR: Duration = Duration::from_micros(200);
/// Longest sleep between checks of liveness, aborts and the timeout.
const SLEEP_SLICE: Duration = Duration::from_millis(5);

/// What a rank called, recorded with every epoch so that ranks notice mismatched calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Call {
    pub collective: Collective,
    pub dtype: DType,
    pub op: Option<ReduceOp>,
    pub root: usize,
    pub len: usize,
}

impl Call {
    fn pack(self) -> [u64; 2] {
        let dtype = match self.dtype {
            DType::F32 => 1,
            DType::Bf16 => 2,
            DType::F16 => 3,
        };
        let op = match self.op {
            None => 0,
            Some(ReduceOp::Sum) => 1,
            Some(ReduceOp::Average) => 2,
        };
        let first = u64::from(self.collective.code())
            | dtype << 8
            | op << 16
            | (self.root as u64 & 0xFFFF_FFFF) << 32;
        [first, self.len as u64]
    }

    /// Describes a packed call for an error message.
    fn describe(words: [u64; 2]) -> String {
        let collective = Collective::from_code((words[0] & 0xFF) as u8)
            .map_or("an unknown collective", Collective::name);
        let dtype = match (words[0] >> 8) & 0xFF {
            1 => "f32",
            2 => "bf16",
            3 => "f16",
            _ => "unknown",
        };
        let op = match (words[0] >> 16) & 0xFF {
            1 => " (sum)",
            2 => " (average)",
            _ => "",
        };
        let root = words[0] >> 32;
        match Collective::from_code((words[0] & 0xFF) as u8) {
            Some(Collective::Barrier) => collective.to_owned(),
            Some(Collective::Broadcast) => {
                format!(
                    "{collective} of {} {dtype} elements from root {root}",
                    words[1]
                )
            }
            _ => format!("{collective}{op} of {} {dtype} elements", words[1]),
        }
    }
}

/// How long to spin before yielding: spinning only pays when every rank has a core.
pub(crate) fn default_spin(local_ranks: usize) -> Duration {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    if local_ranks <= cores {
        Duration::from_micros(50)
    } else {
        Duration::ZERO
    }
}

/// A rank's position in the epoch sequence, and what it needs to wait well.
pub(crate) struct Epochs {
    rank: usize,
    world_size: usize,
    /// The last epoch this rank arrived at.
    epoch: u32,
    spin: Duration,
    io_timeout: Duration,
    /// Connections to every other rank (by rank), open for the group's life: a peer's end
    /// closes when its process dies.
    peers: Vec<Option<UnixStream>>,
    /// What the abort word calls each rank (empty: group ranks); see `ShmConfig::rank_names`.
    rank_names: Vec<usize>,
}

impl Epochs {
    pub fn new(
        rank: usize,
        world_size: usize,
        spin: Duration,
        io_timeout: Duration,
        peers: Vec<Option<UnixStream>>,
        rank_names: Vec<usize>,
    ) -> Self {
        Self {
            rank,
            world_size,
            epoch: 0,
            spin,
            io_timeout,
            peers,
            rank_names,
        }
    }

    /// The name of group rank `rank` in the abort word.
    fn name(&self, rank: usize) -> usize {
        self.rank_names.get(rank).copied().unwrap_or(rank)
    }

    /// Records in the abort word that the larger group this one belongs to failed, blaming
    /// `failed_rank` (a name) as reported by `reporter`, unless a failure is recorded already,
    /// and wakes every rank.
    pub fn abort(&self, segment: &Segment, failed_rank: usize, cause: AbortCause, reporter: usize) {
        segment.set_abort(Abort {
            failed_rank,
            cause,
            reporter,
        });
        wake_everyone(segment, self.world_size);
    }

    /// The slot parity of the next epoch: where this rank writes before [`Epochs::arrive`].
    pub fn next_parity(&self) -> usize {
        (self.epoch.wrapping_add(1) % 2) as usize
    }

    /// Arrives at the next epoch having called `call`, waits until every rank has, and checks
    /// that they all called the same. Returns the epoch's parity: the slots now readable.
    pub fn arrive_and_wait(&mut self, segment: &Segment, call: Call) -> Result<usize> {
        let epoch = self.epoch.wrapping_add(1);
        let parity = (epoch % 2) as usize;
        let own = segment.control(self.rank);
        let words = call.pack();
        own.call[parity][0].store(words[0], Ordering::Relaxed);
        own.call[parity][1].store(words[1], Ordering::Relaxed);
        own.arrived.store(epoch, Ordering::SeqCst);
        if own.waiters.load(Ordering::SeqCst) != 0 {
            futex_wake(&own.arrived);
        }
        self.epoch = epoch;
        self.wait_for_all(segment, call.collective, epoch)?;
        for peer in (0..self.world_size).filter(|&peer| peer != self.rank) {
            let control = segment.control(peer);
            let theirs = [
                control.call[parity][0].load(Ordering::Relaxed),
                control.call[parity][1].load(Ordering::Relaxed),
            ];
            if theirs != words {
                return Err(Error::Protocol {
                    collective: call.collective,
                    peer,
                    detail: format!(
                        "it called {} while this rank called {}",
                        Call::describe(theirs),
                        Call::describe(words)
                    ),
                });
            }
        }
        Ok(parity)
    }

    /// Waits until every rank has arrived at `target`.
    fn wait_for_all(
        &mut self,
        segment: &Segment,
        collective: Collective,
        target: u32,
    ) -> Result<()> {
        let started = Instant::now();
        let mut last_change = started;
        let mut last_seen: Option<(usize, u32)> = None;
        loop {
            if let Some(abort) = segment.abort() {
                return Err(aborted(collective, abort));
            }
            // The rank furthest behind, if any is.
            let mut laggard: Option<(usize, u32)> = None;
            for peer in (0..self.world_size).filter(|&peer| peer != self.rank) {
                let control = segment.control(peer);
                let arrived = control.arrived.load(Ordering::Acquire);
                let behind = target.wrapping_sub(arrived);
                if behind == 0 || behind > u32::MAX / 2 {
                    continue;
                }
                if control.departed.load(Ordering::Acquire) != 0 {
                    return Err(self.fail(segment, collective, peer, AbortCause::Disconnected));
                }
                if laggard.is_none_or(|(_, furthest)| behind > target.wrapping_sub(furthest)) {
                    laggard = Some((peer, arrived));
                }
            }
            let Some((peer, arrived)) = laggard else {
                return Ok(());
            };
            let waited = started.elapsed();
            if waited < self.spin {
                for _ in 0..64 {
                    std::hint::spin_loop();
                }
                continue;
            }
            if waited < self.spin + YIELD_FOR {
                std::thread::yield_now();
                continue;
            }
            if let Some(dead) = self.dead_peer_behind(segment, target) {
                return Err(self.fail(segment, collective, dead, AbortCause::Disconnected));
            }
            if last_seen != Some((peer, arrived)) {
                last_seen = Some((peer, arrived));
                last_change = Instant::now();
            }
            let idle = last_change.elapsed();
            if idle >= self.io_timeout {
                let abort = segment.set_abort(Abort {
                    failed_rank: self.name(peer),
                    cause: AbortCause::Stalled,
                    reporter: self.name(self.rank),
                });
                wake_everyone(segment, self.world_size);
                return Err(if abort.reporter == self.name(self.rank) {
                    Error::PeerStalled {
                        collective,
                        peer,
                        activity: "stopped taking part",
                        waited: idle,
                    }
                } else {
                    aborted(collective, abort)
                });
            }
            let control = segment.control(peer);
            control.waiters.fetch_add(1, Ordering::SeqCst);
            if control.arrived.load(Ordering::SeqCst) == arrived && segment.abort().is_none() {
                futex_wait(
                    &control.arrived,
                    arrived,
                    SLEEP_SLICE.min(self.io_timeout - idle),
                );
            }
            control.waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// A rank that has not arrived at `target` and whose connection has closed.
    fn dead_peer_behind(&self, segment: &Segment, target: u32) -> Option<usize> {
        let mut polled: Vec<libc::pollfd> = Vec::with_capacity(self.peers.len());
        let mut ranks = Vec::with_capacity(self.peers.len());
        for (peer, stream) in self.peers.iter().enumerate() {
            let Some(stream) = stream else { continue };
            let behind = target.wrapping_sub(segment.control(peer).arrived.load(Ordering::Acquire));
            if behind != 0 && behind <= u32::MAX / 2 {
                polled.push(libc::pollfd {
                    fd: stream.as_raw_fd(),
                    events: libc::POLLIN | libc::POLLRDHUP,
                    revents: 0,
                });
                ranks.push(peer);
            }
        }
        // SAFETY: `polled` holds valid descriptors owned by `self.peers`, and its length.
        let ready = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, 0) };
        if ready <= 0 {
            return None;
        }
        // Peers never write after setup: anything readable is the end of the stream.
        polled
            .iter()
            .zip(ranks)
            .find(|(entry, _)| entry.revents != 0)
            .map(|(_, peer)| peer)
    }

    /// Records that `peer` failed (unless another rank recorded a failure first), wakes every
    /// rank, and returns this rank's error.
    fn fail(
        &self,
        segment: &Segment,
        collective: Collective,
        peer: usize,
        cause: AbortCause,
    ) -> Error {
        let abort = segment.set_abort(Abort {
            failed_rank: self.name(peer),
            cause,
            reporter: self.name(self.rank),
        });
        wake_everyone(segment, self.world_size);
        if abort.reporter == self.name(self.rank) && abort.failed_rank == self.name(peer) {
            Error::PeerDisconnected { collective, peer }
        } else {
            aborted(collective, abort)
        }
    }

    /// Starts the epoch count at `epoch` (tests of the counters' wrap-around; every rank must
    /// call it before any collective).
    #[cfg(test)]
    pub fn start_at(&mut self, segment: &Segment, epoch: u32) {
        self.epoch = epoch;
        segment
            .control(self.rank)
            .arrived
            .store(epoch, Ordering::SeqCst);
    }

    /// Marks this rank as gone and wakes anyone waiting for it.
    pub fn depart(&self, segment: &Segment) {
        let own = segment.control(self.rank);
        own.departed.store(1, Ordering::SeqCst);
        futex_wake(&own.arrived);
    }
}

/// The error of a rank that learns of a failure from the abort word.
fn aborted(collective: Collective, abort: Abort) -> Error {
    Error::Aborted {
        collective,
        failed_rank: abort.failed_rank,
        cause: abort.cause,
        reporter: abort.reporter,
    }
}

/// Wakes every rank sleeping on any rank's `arrived` word.
fn wake_everyone(segment: &Segment, world_size: usize) {
    for rank in 0..world_size {
        futex_wake(&segment.control(rank).arrived);
    }
}

/// Sleeps while `word` holds `expected`, for at most `timeout` (or until woken).
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: a shared (not process-private) futex on a live, aligned word of the mapping; the
    // kernel compares the value itself, so no wake-up between the check and the sleep is lost.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &timeout as *const libc::timespec,
            std::ptr::null::<u32>(),
            0,
        );
    }
}

/// Wakes everyone sleeping on `word`.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: as in `futex_wait`.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatched_calls_are_described() {
        let reduce = Call {
            collective: Collective::AllReduce,
            dtype: DType::F32,
            op: Some(ReduceOp::Sum),
            root: 0,
            len: 7,
        };
        assert_eq!(
            Call::describe(reduce.pack()),
            "all_reduce (sum) of 7 f32 elements"
        );
        let broadcast = Call {
            collective: Collective::Broadcast,
            dtype: DType::Bf16,
            op: None,
            root: 3,
            len: 9,
        };
        assert_eq!(
            Call::describe(broadcast.pack()),
            "broadcast of 9 bf16 elements from root 3"
        );
        assert_ne!(reduce.pack(), Call { len: 8, ..reduce }.pack());
    }
}
