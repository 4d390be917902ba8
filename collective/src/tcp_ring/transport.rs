//! The ring's event loop: moves a collective's messages over the two connections with
//! non-blocking sockets, one thread, no allocation.
//!
//! A collective is described by a [`Plan`]: how many messages this rank sends to its successor
//! and receives from its predecessor, which received message each send waits for, and where each
//! message's bytes come from and go. The loop writes whatever may be written and reads whatever
//! has arrived until neither can progress, then waits for socket readiness; so sending,
//! receiving and reducing overlap (a chunk is forwarded as soon as it is reduced, while the next
//! one is still arriving), and a peer that stops reading cannot deadlock a rank that still has
//! to read.
//!
//! Failures: an end of stream or reset names the neighbour; no progress for the I/O timeout
//! names the rank the ring is waiting on. Ranks that have waited for a quarter of the timeout
//! send a `Starved` notice downstream naming whom they wait on, so that the blame travels along
//! the ring to the rank that actually stopped. On any failure the rank sends an `Abort` frame to
//! both neighbours, which forward it, so every rank fails fast with the same culprit.

use std::io::{IoSlice, Read};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use socket2::SockRef;
use tracing::warn;

use super::wire::{FrameHeader, FrameKind, HEADER_BYTES};
use crate::error::{AbortCause, Error, FirstFailure, Result};
use crate::operation::Collective;

/// Longest a failing rank spends completing a half-sent frame so its abort notice can follow.
const ABANDON_FLUSH_TIMEOUT: Duration = Duration::from_millis(500);

/// Poll token of the connection from the predecessor.
const PREVIOUS: Token = Token(0);
/// Poll token of the connection to the successor.
const NEXT: Token = Token(1);

/// Flags for every send: no `SIGPIPE` when a peer has gone (the error is reported instead).
#[cfg(any(target_os = "linux", target_os = "android"))]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const SEND_FLAGS: libc::c_int = 0;

/// The messages of one collective as seen by one rank.
///
/// Sends and receives each happen in index order. Receive `i` completes before
/// [`Plan::finish_recv`] is called for it, and a send starts only once its dependency has.
pub(crate) trait Plan {
    /// Number of messages this rank sends to its successor.
    fn send_count(&self) -> usize;
    /// Number of messages this rank receives from its predecessor.
    fn recv_count(&self) -> usize;
    /// The receive that must complete before send `index` may start, if any.
    fn send_dependency(&self, index: usize) -> Option<usize>;
    /// Prepares the payload of send `index` (called once, just before it starts).
    fn prepare_send(&mut self, index: usize);
    /// Returns the payload of send `index` (the same bytes on every call).
    fn send_payload(&self, index: usize) -> &[u8];
    /// Called once send `index` has been written completely.
    fn finish_send(&mut self, index: usize);
    /// Returns the payload length receive `index` must carry.
    fn recv_bytes(&self, index: usize) -> usize;
    /// Reserves storage for receive `index`; returns false if none is free yet (a later send
    /// will free some).
    fn begin_recv(&mut self, index: usize) -> bool;
    /// Returns the storage of receive `index` (`recv_bytes` long, the same on every call).
    fn recv_buffer(&mut self, index: usize) -> &mut [u8];
    /// Called once receive `index` has arrived completely (reduces it, for reductions).
    fn finish_recv(&mut self, index: usize);
}

/// Where one collective stands; lives on the stack of [`RingTransport::run`].
#[derive(Default)]
struct Progress {
    /// Next message to send.
    send_index: usize,
    /// Whether `send_header` holds the header of `send_index`.
    send_started: bool,
    /// Header of the message being sent.
    send_header: [u8; HEADER_BYTES],
    /// Bytes of the current message (header included) already written.
    send_written: usize,
    /// A `Starved` notice being written between two messages, and its bytes written so far.
    notice: Option<([u8; HEADER_BYTES], usize)>,
    /// Next message to receive.
    recv_index: usize,
    /// Whether storage for `recv_index` has been reserved.
    recv_started: bool,
    /// Header of the message being received.
    recv_header: [u8; HEADER_BYTES],
    /// Bytes of `recv_header` read so far.
    recv_header_read: usize,
    /// Payload bytes of the current message read so far.
    recv_payload_read: usize,
    /// The rank the predecessor said it is waiting on, from its latest notice.
    upstream_blame: Option<usize>,
    /// The rank named in this rank's latest notice.
    last_notice_blame: Option<usize>,
    /// Notices sent during this collective (bounded, so blame cannot circulate forever).
    notices_sent: usize,
}

impl Progress {
    /// Returns whether nothing of a frame is half-written, so an abort frame may be inserted.
    fn at_frame_boundary(&self) -> bool {
        let notice_clean = self.notice.is_none_or(|(_, written)| written == 0);
        notice_clean && (!self.send_started || self.send_written == 0)
    }
}

/// The ring's two connections and the machinery to drive collectives over them.
pub(crate) struct RingTransport {
    /// This rank.
    rank: usize,
    /// Number of ranks.
    world_size: usize,
    /// The predecessor, `rank - 1`.
    previous_rank: usize,
    /// The successor, `rank + 1`.
    next_rank: usize,
    /// Connection from the predecessor (non-blocking).
    previous: mio::net::TcpStream,
    /// Connection to the successor (non-blocking).
    next: mio::net::TcpStream,
    /// Readiness notifications for both connections.
    poll: Poll,
    /// Storage for `poll`'s results.
    events: Events,
    /// Longest time without progress before a collective fails.
    io_timeout: Duration,
    /// Counter of collectives run, carried in every header to catch mismatched calls.
    sequence: u32,
    /// Payload bytes of every message sent to the successor so far (headers excluded).
    payload_bytes_sent: u64,
    /// Bytes of a frame arriving backwards from the successor (only aborts travel that way).
    reverse_header: [u8; HEADER_BYTES],
    /// Bytes of `reverse_header` read so far.
    reverse_read: usize,
    /// Whether the successor closed its connection after receiving all it needed.
    next_closed: bool,
    /// An abort notice the successor sent after this rank had sent it everything for the
    /// collective in progress; that collective may still complete, the next one fails with it.
    deferred_abort: Option<FrameHeader>,
    /// The failure that broke the ring, and the rank it blamed; set once, never cleared.
    poisoned: FirstFailure,
    /// What abort notices call each ring rank (empty: ring ranks); see
    /// `TcpRingConfig::rank_names`. Notices carry names, so every part of a larger group
    /// reports the same failed rank.
    rank_names: Vec<usize>,
}

impl RingTransport {
    /// Takes over two connected blocking sockets and registers them for polling.
    pub fn new(
        rank: usize,
        world_size: usize,
        previous: TcpStream,
        next: TcpStream,
        io_timeout: Duration,
        rank_names: Vec<usize>,
    ) -> Result<Self> {
        let setup_error = |source| Error::Io {
            context: "prepare the ring connections for polling".to_owned(),
            source,
        };
        for stream in [&previous, &next] {
            stream.set_nonblocking(true).map_err(setup_error)?;
            stream.set_read_timeout(None).map_err(setup_error)?;
            stream.set_write_timeout(None).map_err(setup_error)?;
        }
        let mut previous = mio::net::TcpStream::from_std(previous);
        let mut next = mio::net::TcpStream::from_std(next);
        let poll = Poll::new().map_err(setup_error)?;
        poll.registry()
            .register(&mut previous, PREVIOUS, Interest::READABLE)
            .map_err(setup_error)?;
        poll.registry()
            .register(&mut next, NEXT, Interest::READABLE | Interest::WRITABLE)
            .map_err(setup_error)?;
        Ok(Self {
            rank,
            world_size,
            previous_rank: (rank + world_size - 1) % world_size,
            next_rank: (rank + 1) % world_size,
            previous,
            next,
            poll,
            events: Events::with_capacity(8),
            io_timeout,
            sequence: 0,
            payload_bytes_sent: 0,
            reverse_header: [0; HEADER_BYTES],
            reverse_read: 0,
            next_closed: false,
            deferred_abort: None,
            poisoned: FirstFailure::default(),
            rank_names,
        })
    }

    /// The name of ring rank `rank` in abort notices.
    fn name(&self, rank: usize) -> usize {
        self.rank_names.get(rank).copied().unwrap_or(rank)
    }

    /// Sends both neighbours an abort notice blaming `failed_rank` (a name) between
    /// collectives, shuts the connections down and poisons the ring; nothing if it already
    /// failed.
    pub fn abort(&mut self, failed_rank: usize, cause: AbortCause, reporter: usize) {
        if self.poisoned.is_set() {
            return;
        }
        let error = Error::Aborted {
            collective: Collective::Barrier,
            failed_rank,
            cause,
            reporter,
        };
        self.send_abort(Collective::Barrier, &error, true);
    }

    /// Returns the payload bytes of every message sent to the successor so far, headers
    /// excluded: what the collectives' schedules moved out of this rank.
    pub fn payload_bytes_sent(&self) -> u64 {
        self.payload_bytes_sent
    }

    /// Fails if an earlier collective broke the ring.
    pub fn check_usable(&self, collective: Collective) -> Result<()> {
        self.poisoned.check(collective)
    }

    /// Runs one collective to completion. On failure the ring is abandoned: the neighbours are
    /// told, the connections are shut down, and later calls fail with [`Error::Poisoned`].
    pub fn run(&mut self, collective: Collective, plan: &mut dyn Plan) -> Result<()> {
        self.check_usable(collective)?;
        self.sequence = self.sequence.wrapping_add(1);
        let mut progress = Progress::default();
        let result = self.drive(collective, plan, &mut progress);
        if let Err(error) = &result {
            self.abandon(collective, error, plan, &mut progress);
        }
        result
    }

    /// The event loop.
    fn drive(
        &mut self,
        collective: Collective,
        plan: &mut dyn Plan,
        progress: &mut Progress,
    ) -> Result<()> {
        if let Some(header) = &self.deferred_abort {
            return Err(abort_error(collective, header));
        }
        if self.next_closed && plan.send_count() > 0 {
            return Err(Error::PeerDisconnected {
                collective,
                peer: self.next_rank,
            });
        }
        let mut last_progress = Instant::now();
        loop {
            let sent = self.pump_sends(collective, plan, progress)?;
            let received = self.pump_receives(collective, plan, progress)?;
            if progress.send_index == plan.send_count() && progress.recv_index == plan.recv_count()
            {
                return Ok(());
            }
            if sent || received {
                last_progress = Instant::now();
                continue;
            }
            let waited = last_progress.elapsed();
            if waited >= self.io_timeout {
                return Err(self.stall_error(collective, plan, progress, waited));
            }
            let mut wait = self.io_timeout - waited;
            let notice_after = self.io_timeout / 4;
            let starved = progress.recv_index < plan.recv_count() && progress.recv_started;
            if starved && progress.at_frame_boundary() && progress.notice.is_none() {
                if waited >= notice_after {
                    if self.queue_notice(collective, progress) {
                        continue;
                    }
                } else {
                    wait = wait.min(notice_after - waited);
                }
            }
            match self.poll.poll(&mut self.events, Some(wait)) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(Error::Io {
                        context: format!("{collective}: poll the ring connections"),
                        source,
                    });
                }
            }
            let next_signalled = self.events.iter().any(|event| {
                event.token() == NEXT
                    && (event.is_readable() || event.is_read_closed() || event.is_error())
            });
            if next_signalled {
                let sends_done = progress.send_index == plan.send_count();
                self.read_reverse(collective, sends_done)?;
            }
        }
    }

    /// Writes as much as possible; returns whether any message bytes were written.
    fn pump_sends(
        &mut self,
        collective: Collective,
        plan: &mut dyn Plan,
        progress: &mut Progress,
    ) -> Result<bool> {
        let mut progressed = false;
        loop {
            if let Some((notice, written)) = &mut progress.notice {
                match self.send(collective, &[IoSlice::new(&notice[*written..])])? {
                    None => return Ok(progressed),
                    Some(count) => *written += count,
                }
                if *written == HEADER_BYTES {
                    progress.notice = None;
                }
                continue;
            }
            let index = progress.send_index;
            if index == plan.send_count() {
                return Ok(progressed);
            }
            if !progress.send_started {
                if let Some(dependency) = plan.send_dependency(index)
                    && dependency >= progress.recv_index
                {
                    return Ok(progressed);
                }
                plan.prepare_send(index);
                progress.send_header = FrameHeader {
                    kind: FrameKind::Data,
                    collective,
                    sequence: self.sequence,
                    index: index as u32,
                    payload_bytes: plan.send_payload(index).len() as u32,
                }
                .encode();
                progress.send_started = true;
                progress.send_written = 0;
            }
            let payload = plan.send_payload(index);
            let written = progress.send_written;
            let outcome = if written < HEADER_BYTES {
                let slices = [
                    IoSlice::new(&progress.send_header[written..]),
                    IoSlice::new(payload),
                ];
                self.send(collective, &slices)?
            } else {
                self.send(
                    collective,
                    &[IoSlice::new(&payload[written - HEADER_BYTES..])],
                )?
            };
            let Some(count) = outcome else {
                return Ok(progressed);
            };
            progressed = true;
            progress.send_written += count;
            if progress.send_written == HEADER_BYTES + payload.len() {
                self.payload_bytes_sent += payload.len() as u64;
                plan.finish_send(index);
                progress.send_index += 1;
                progress.send_started = false;
            }
        }
    }

    /// Writes to the successor; returns `None` when its buffer is full.
    fn send(&mut self, collective: Collective, slices: &[IoSlice<'_>]) -> Result<Option<usize>> {
        loop {
            match SockRef::from(&self.next).send_vectored_with_flags(slices, SEND_FLAGS) {
                Ok(0) => {
                    return Err(Error::PeerDisconnected {
                        collective,
                        peer: self.next_rank,
                    });
                }
                Ok(count) => return Ok(Some(count)),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => {
                    // A successor that failed first has usually sent an abort notice before
                    // closing; report the culprit it names rather than the successor.
                    self.read_reverse(collective, false)?;
                    return Err(self.io_error(collective, self.next_rank, error));
                }
            }
        }
    }

    /// Reads as much as possible; returns whether any message bytes were read.
    fn pump_receives(
        &mut self,
        collective: Collective,
        plan: &mut dyn Plan,
        progress: &mut Progress,
    ) -> Result<bool> {
        let mut progressed = false;
        loop {
            let index = progress.recv_index;
            if index == plan.recv_count() {
                return Ok(progressed);
            }
            if !progress.recv_started {
                if !plan.begin_recv(index) {
                    return Ok(progressed);
                }
                progress.recv_started = true;
                progress.recv_header_read = 0;
                progress.recv_payload_read = 0;
            }
            let expected = plan.recv_bytes(index);
            if progress.recv_header_read < HEADER_BYTES {
                let start = progress.recv_header_read;
                let Some(count) = self.receive(collective, |previous| {
                    previous.read(&mut progress.recv_header[start..])
                })?
                else {
                    return Ok(progressed);
                };
                progress.recv_header_read += count;
                if progress.recv_header_read < HEADER_BYTES {
                    continue;
                }
                let header = FrameHeader::decode(&progress.recv_header).map_err(|detail| {
                    Error::Protocol {
                        collective,
                        peer: self.previous_rank,
                        detail,
                    }
                })?;
                match header.kind {
                    FrameKind::Abort => return Err(abort_error(collective, &header)),
                    FrameKind::Starved => {
                        if header.sequence == self.sequence {
                            progress.upstream_blame = Some(header.index as usize);
                        }
                        progress.recv_header_read = 0;
                        continue;
                    }
                    FrameKind::Data => {
                        self.check_data_header(collective, &header, index, expected)?;
                        progressed = true;
                    }
                }
            }
            if progress.recv_payload_read < expected {
                let start = progress.recv_payload_read;
                let buffer = &mut plan.recv_buffer(index)[start..expected];
                let Some(count) = self.receive(collective, |previous| previous.read(buffer))?
                else {
                    return Ok(progressed);
                };
                progressed = true;
                progress.recv_payload_read += count;
            }
            if progress.recv_payload_read == expected {
                plan.finish_recv(index);
                progress.recv_index += 1;
                progress.recv_started = false;
            }
        }
    }

    /// Runs one read on the predecessor's connection; returns `None` when nothing is available.
    fn receive(
        &mut self,
        collective: Collective,
        mut read: impl FnMut(&mut &mio::net::TcpStream) -> std::io::Result<usize>,
    ) -> Result<Option<usize>> {
        loop {
            match read(&mut &self.previous) {
                Ok(0) => {
                    return Err(Error::PeerDisconnected {
                        collective,
                        peer: self.previous_rank,
                    });
                }
                Ok(count) => return Ok(Some(count)),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(self.io_error(collective, self.previous_rank, error)),
            }
        }
    }

    /// Checks that a data header is the message this rank expects next.
    fn check_data_header(
        &self,
        collective: Collective,
        header: &FrameHeader,
        index: usize,
        expected_bytes: usize,
    ) -> Result<()> {
        let matches = header.collective == collective
            && header.sequence == self.sequence
            && header.index as usize == index
            && header.payload_bytes as usize == expected_bytes;
        if matches {
            return Ok(());
        }
        Err(Error::Protocol {
            collective,
            peer: self.previous_rank,
            detail: format!(
                "expected message {index} of {collective} call #{} with {expected_bytes} bytes, \
                 found message {} of {} call #{} with {} bytes (ranks called different \
                 collectives or passed different lengths)",
                self.sequence,
                header.index,
                header.collective,
                header.sequence,
                header.payload_bytes
            ),
        })
    }

    /// Reads frames sent backwards by the successor: abort notices, or the end of its stream.
    /// When this rank has already sent everything the collective needs, neither fails it.
    fn read_reverse(&mut self, collective: Collective, sends_done: bool) -> Result<()> {
        if self.next_closed || self.deferred_abort.is_some() {
            return Ok(());
        }
        loop {
            match (&self.next).read(&mut self.reverse_header[self.reverse_read..]) {
                Ok(0) if sends_done => {
                    // The successor has everything it needs from this rank and has gone away;
                    // only a later collective that must send to it fails.
                    self.next_closed = true;
                    return Ok(());
                }
                Ok(0) => {
                    return Err(Error::PeerDisconnected {
                        collective,
                        peer: self.next_rank,
                    });
                }
                Ok(count) => {
                    self.reverse_read += count;
                    if self.reverse_read < HEADER_BYTES {
                        continue;
                    }
                    self.reverse_read = 0;
                    let header = FrameHeader::decode(&self.reverse_header).map_err(|detail| {
                        Error::Protocol {
                            collective,
                            peer: self.next_rank,
                            detail,
                        }
                    })?;
                    if header.kind == FrameKind::Abort {
                        if sends_done {
                            self.deferred_abort = Some(header);
                            return Ok(());
                        }
                        return Err(abort_error(collective, &header));
                    }
                    return Err(Error::Protocol {
                        collective,
                        peer: self.next_rank,
                        detail: format!("unexpected {:?} frame sent backwards", header.kind),
                    });
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(self.io_error(collective, self.next_rank, error)),
            }
        }
    }

    /// Queues a `Starved` notice naming the rank this one waits on, if that is news to the
    /// successor; returns whether one was queued.
    fn queue_notice(&mut self, collective: Collective, progress: &mut Progress) -> bool {
        let blame = progress.upstream_blame.unwrap_or(self.previous_rank);
        if progress.last_notice_blame == Some(blame) || progress.notices_sent >= self.world_size {
            return false;
        }
        progress.last_notice_blame = Some(blame);
        progress.notices_sent += 1;
        let header = FrameHeader {
            kind: FrameKind::Starved,
            collective,
            sequence: self.sequence,
            index: blame as u32,
            payload_bytes: 0,
        };
        progress.notice = Some((header.encode(), 0));
        true
    }

    /// Builds the error for a collective that made no progress for the I/O timeout. The rank
    /// blamed is, in order of preference: the one the predecessor's notices name (the end of
    /// a chain of waiting ranks), the successor if it stopped reading, or the predecessor.
    fn stall_error(
        &self,
        collective: Collective,
        plan: &dyn Plan,
        progress: &Progress,
        waited: Duration,
    ) -> Error {
        let send_blocked = progress.send_index < plan.send_count() && progress.send_started;
        let (peer, activity) = match progress.upstream_blame {
            Some(blamed) => (blamed, "stopped taking part"),
            None if send_blocked => (self.next_rank, "accepted no data"),
            None => (self.previous_rank, "sent nothing"),
        };
        Error::PeerStalled {
            collective,
            peer,
            activity,
            waited,
        }
    }

    /// Classifies an I/O error on the connection with `peer`.
    fn io_error(&self, collective: Collective, peer: usize, error: std::io::Error) -> Error {
        use std::io::ErrorKind;
        match error.kind() {
            ErrorKind::BrokenPipe
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::UnexpectedEof
            | ErrorKind::NotConnected => Error::PeerDisconnected { collective, peer },
            _ => Error::PeerIo {
                collective,
                peer,
                source: error,
            },
        }
    }

    /// Tells both neighbours the ring is broken, shuts the connections down, and remembers
    /// the failure.
    fn abandon(
        &mut self,
        collective: Collective,
        error: &Error,
        plan: &dyn Plan,
        progress: &mut Progress,
    ) {
        warn!(
            rank = self.rank,
            %collective,
            failed_rank = error.failed_rank(),
            %error,
            "collective failed; abandoning the ring"
        );
        let at_frame_boundary = !self.next_closed && self.finish_partial_frame(plan, progress);
        self.send_abort(collective, error, at_frame_boundary);
    }

    /// Sends the abort notice of `error` (forwarding an abort as it came, naming the failed
    /// and reporting ranks otherwise) to the predecessor, and to the successor when its stream
    /// is at a frame boundary; shuts both connections down and remembers the failure.
    fn send_abort(&mut self, collective: Collective, error: &Error, to_successor: bool) {
        let (failed_rank, reporter, cause) = match error {
            Error::Aborted {
                failed_rank,
                reporter,
                cause,
                ..
            } => (*failed_rank, *reporter, *cause),
            other => (
                self.name(other.failed_rank().unwrap_or(self.rank)),
                self.name(self.rank),
                other.abort_cause(),
            ),
        };
        let abort = FrameHeader {
            kind: FrameKind::Abort,
            collective,
            sequence: reporter as u32,
            index: failed_rank as u32,
            payload_bytes: cause.code(),
        }
        .encode();
        // Best effort: a full buffer or a dead peer just means the notice is not delivered, and
        // the neighbour falls back to blaming this rank.
        if to_successor && !self.next_closed {
            let _ = SockRef::from(&self.next).send_with_flags(&abort, SEND_FLAGS);
        }
        let _ = SockRef::from(&self.previous).send_with_flags(&abort, SEND_FLAGS);
        let _ = self.next.shutdown(Shutdown::Write);
        let _ = self.previous.shutdown(Shutdown::Write);
        self.poisoned.record(error);
    }

    /// Completes a half-written frame to the successor, so that an abort frame can follow it
    /// (the successor is reading that frame and would otherwise see only the connection end).
    /// Gives up after [`ABANDON_FLUSH_TIMEOUT`]; returns whether the stream is at a frame
    /// boundary.
    fn finish_partial_frame(&mut self, plan: &dyn Plan, progress: &mut Progress) -> bool {
        if progress.notice.is_some_and(|(_, written)| written == 0) {
            progress.notice = None;
        }
        let deadline = Instant::now() + ABANDON_FLUSH_TIMEOUT;
        loop {
            let result = if let Some((notice, written)) = &mut progress.notice {
                let result = SockRef::from(&self.next)
                    .send_with_flags(&notice[*written..], SEND_FLAGS)
                    .map(|count| *written += count);
                if *written == HEADER_BYTES {
                    progress.notice = None;
                }
                result
            } else if progress.send_started && progress.send_written > 0 {
                let payload = plan.send_payload(progress.send_index);
                let written = progress.send_written;
                let result = if written < HEADER_BYTES {
                    let slices = [
                        IoSlice::new(&progress.send_header[written..]),
                        IoSlice::new(payload),
                    ];
                    SockRef::from(&self.next).send_vectored_with_flags(&slices, SEND_FLAGS)
                } else {
                    SockRef::from(&self.next)
                        .send_with_flags(&payload[written - HEADER_BYTES..], SEND_FLAGS)
                };
                let result = result.map(|count| progress.send_written += count);
                if progress.send_written == HEADER_BYTES + payload.len() {
                    progress.send_started = false;
                }
                result
            } else {
                return true;
            };
            match result {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    let now = Instant::now();
                    if now >= deadline {
                        return false;
                    }
                    let _ = self.poll.poll(&mut self.events, Some(deadline - now));
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }
}

/// Turns a received abort frame into the error it reports.
fn abort_error(collective: Collective, header: &FrameHeader) -> Error {
    Error::Aborted {
        collective,
        failed_rank: header.index as usize,
        cause: AbortCause::from_code(header.payload_bytes),
        reporter: header.sequence as usize,
    }
}
