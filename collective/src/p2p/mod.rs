//! [`PeerLink`]: an ordered, two-way stream of tagged `f32` tensors between two ranks, the
//! transport of pipeline parallelism (activations forward, their gradients back).
//!
//! The two ranks meet through the rendezvous [`Store`]: the lower rank listens and publishes its
//! address under `{name}/addr/{rank}`, the higher one connects, and both exchange a hello that
//! names the link and both ranks, so a connection meant for another link is refused.
//!
//! Sends never block on the peer: [`PeerLink::send`] copies the message into a pooled buffer
//! and queues it for a writer thread the link owns, which writes messages in order. Two
//! neighbours that send to each other before receiving therefore cannot deadlock, whatever the
//! message sizes. [`PeerLink::receive`] reads on the calling thread.
//!
//! A message on the wire is a frame: a little-endian header (magic, tag, number of dimensions,
//! each dimension, payload bytes) followed by the values as little-endian `f32`. Frames larger
//! than [`PeerLinkConfig::max_message_bytes`], or whose shape does not match their length, are
//! refused. After any failure of the connection the link is unusable: every later call reports
//! the first failure, with the peer's rank.
//!
//! - `wire`: the frame format (encoding, decoding and the checks on a message's shape and
//!   size) and [`MAX_DIMENSIONS`].
//! - `handshake`: the hello exchange, and listening for or connecting to the peer.

mod handshake;
mod wire;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::debug;

use crate::error::{Error, LinkFailure, Result};
use crate::progress::{Channel, Progress};
use crate::rendezvous::Store;
use handshake::{Hello, MAX_NAME_BYTES, connect_to_peer, listen_for_peer};
pub use wire::MAX_DIMENSIONS;
use wire::{
    FRAME_FIXED_BYTES, check_message, decode_frame_shape, decode_frame_start, encode_frame,
};

/// Settings of a [`PeerLink`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLinkConfig {
    /// Address the lower rank of the link listens on. Default `127.0.0.1:0` (loopback, any
    /// free port); use the node's address (or `0.0.0.0:0` with `advertise_host`) for ranks on
    /// several machines.
    pub listen_address: SocketAddr,
    /// Host published to the peer instead of the listener's own address. Default `None`
    /// (publish the listener's address, which must then not be unspecified).
    pub advertise_host: Option<IpAddr>,
    /// Longest wait for the peer to publish its address, connect and answer the hello.
    /// Default 120 s.
    pub connect_timeout: Duration,
    /// Longest a receive waits for a message to start, or for any further part of it once
    /// started; also the longest the writer thread waits for the peer to accept more data.
    /// Default 300 s.
    pub receive_timeout: Duration,
    /// Largest message payload (values times 4 bytes), sent or received. Default 1 GiB.
    pub max_message_bytes: usize,
    /// The job's link secret, which both ends must prove they know ([`crate::auth`]).
    /// Default `None`: the link proves nothing (in-process tests and benchmarks); Cohort's
    /// ranks always set their job's.
    pub secret: Option<crate::LinkSecret>,
    /// Where the link records its sends and receives (a channel named after the link), for
    /// hang diagnosis. Default: a record of its own, read by nobody.
    pub progress: Progress,
}

impl Default for PeerLinkConfig {
    fn default() -> Self {
        Self {
            listen_address: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            advertise_host: None,
            connect_timeout: Duration::from_secs(120),
            receive_timeout: Duration::from_secs(300),
            max_message_bytes: 1 << 30,
            secret: None,
            progress: Progress::default(),
        }
    }
}

impl PeerLinkConfig {
    /// Checks every field; returns the first problem found.
    pub fn validate(&self) -> Result<()> {
        crate::error::check_positive_durations(&[
            ("config.connect_timeout", self.connect_timeout),
            ("config.receive_timeout", self.receive_timeout),
        ])?;
        if self.max_message_bytes == 0 {
            return Err(Error::InvalidArgument {
                field: "config.max_message_bytes",
                found: "0".to_owned(),
                expected: "at least 1",
            });
        }
        Ok(())
    }
}

/// What the link hands its writer thread.
enum Outgoing {
    /// An encoded frame to write; the buffer goes back to the pool afterwards.
    Frame(Vec<u8>),
    /// Answered once every frame queued before it has been written.
    Flush(Sender<()>),
}

/// The first failure of a link, shared by the link and its writer thread.
type FailureSlot = Arc<Mutex<Option<LinkFailure>>>;

/// Records `failure` unless an earlier one is recorded; returns the one that stands.
fn record_failure(slot: &FailureSlot, failure: LinkFailure) -> LinkFailure {
    let mut guard = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    guard.get_or_insert(failure).clone()
}

/// An ordered, two-way connection between this rank and one peer, carrying tagged `f32`
/// messages with their shapes.
///
/// Built by both ranks with [`PeerLink::connect`]. Messages arrive in the order they were sent.
/// Dropping the link closes the queue: the writer thread still sends what was queued, then
/// closes the connection, which the peer sees as a disconnection on its next receive. Call
/// [`PeerLink::flush`] before a process exits to be sure queued messages left.
pub struct PeerLink {
    /// The link's name (its store key prefix).
    name: String,
    /// This rank.
    rank: usize,
    /// The rank at the other end.
    peer: usize,
    /// The connection; receives read from it on the calling thread.
    stream: TcpStream,
    /// Frames and flush requests for the writer thread.
    queue: Sender<Outgoing>,
    /// Buffers the writer thread has finished with, reused by later sends.
    spare_buffers: Receiver<Vec<u8>>,
    /// The first failure, recorded by either side of the link.
    failure: FailureSlot,
    /// Largest payload sent or accepted.
    max_message_bytes: usize,
    /// Header bytes of the message being received (reused).
    header: Vec<u8>,
    /// Where the link's sends and receives are recorded.
    channel: Channel,
}

impl std::fmt::Debug for PeerLink {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PeerLink")
            .field("name", &self.name)
            .field("rank", &self.rank)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl PeerLink {
    /// Connects rank `rank` and rank `peer` (both call this with swapped arguments) under the
    /// store key prefix `name`, which must be unique per link for the life of the store (for
    /// example `pipe-d0-t1-s2`): the lower rank binds `config.listen_address` and publishes it
    /// under `{name}/addr/{rank}`, the higher rank connects, and a hello exchange checks that
    /// both agree on the name and the ranks. Fails within `config.connect_timeout` naming the
    /// peer.
    pub fn connect(
        store: &dyn Store,
        name: &str,
        rank: usize,
        peer: usize,
        config: &PeerLinkConfig,
    ) -> Result<PeerLink> {
        config.validate()?;
        if rank == peer {
            return Err(Error::InvalidArgument {
                field: "peer",
                found: peer.to_string(),
                expected: "a rank other than this one",
            });
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(Error::InvalidArgument {
                field: "name",
                found: format!("{} bytes", name.len()),
                expected: "at most 1024 bytes",
            });
        }
        let hello = Hello {
            name: name.to_owned(),
            rank: rank as u32,
            peer: peer as u32,
        };
        let deadline = Instant::now() + config.connect_timeout;
        let stream = if rank < peer {
            listen_for_peer(store, &hello, config, deadline)?
        } else {
            connect_to_peer(store, &hello, config, deadline)?
        };
        let setup_error = |source| Error::Io {
            context: format!("configure link {name:?} with rank {peer}"),
            source,
        };
        stream.set_nodelay(true).map_err(setup_error)?;
        stream
            .set_read_timeout(Some(config.receive_timeout))
            .map_err(setup_error)?;
        stream
            .set_write_timeout(Some(config.receive_timeout))
            .map_err(setup_error)?;
        let writer_stream = stream.try_clone().map_err(setup_error)?;
        let (queue, outgoing) = mpsc::channel();
        let (returned_buffers, spare_buffers) = mpsc::channel();
        let failure = FailureSlot::default();
        let writer = Writer {
            stream: writer_stream,
            outgoing,
            returned_buffers,
            failure: Arc::clone(&failure),
            receive_timeout: config.receive_timeout,
        };
        std::thread::Builder::new()
            .name(format!("p2p-{rank}-to-{peer}"))
            .spawn(move || writer.run())
            .map_err(|source| Error::Io {
                context: format!("start the writer thread of link {name:?}"),
                source,
            })?;
        debug!(name, rank, peer, "peer link connected");
        Ok(PeerLink {
            name: name.to_owned(),
            rank,
            peer,
            stream,
            queue,
            spare_buffers,
            failure,
            max_message_bytes: config.max_message_bytes,
            header: Vec::with_capacity(FRAME_FIXED_BYTES + 8 * (MAX_DIMENSIONS + 1)),
            channel: config.progress.channel(name, 2),
        })
    }

    /// Returns the rank at the other end of the link.
    pub fn peer(&self) -> usize {
        self.peer
    }

    /// Returns this rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Returns the link's name (its store key prefix).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Queues a message (`tag`, `shape`, `values`) for sending and returns at once; the link's
    /// writer thread sends messages in order. `values` is copied once, into a buffer reused
    /// from earlier sends. A failure of an earlier send is reported by the next call.
    ///
    /// Fails with [`LinkFailure::Rejected`] (the link stays usable) when `shape` has more than
    /// [`MAX_DIMENSIONS`] dimensions, does not hold `values.len()` values, or the payload
    /// exceeds `max_message_bytes`.
    pub fn send(&mut self, tag: u64, shape: &[usize], values: &[f32]) -> Result<()> {
        let entered = self
            .channel
            .enter("send", std::mem::size_of_val(values), Some(self.peer));
        let result = self.queue_frame(tag, shape, values);
        self.channel.complete(entered, &result);
        result
    }

    /// [`PeerLink::send`], unrecorded.
    fn queue_frame(&mut self, tag: u64, shape: &[usize], values: &[f32]) -> Result<()> {
        self.check_failure()?;
        if let Err(detail) = check_message(shape, values.len(), self.max_message_bytes) {
            return Err(self.error(LinkFailure::Rejected { detail }));
        }
        let mut buffer = self.spare_buffers.try_recv().unwrap_or_default();
        encode_frame(&mut buffer, tag, shape, values);
        if self.queue.send(Outgoing::Frame(buffer)).is_err() {
            return Err(self.writer_stopped());
        }
        Ok(())
    }

    /// Waits until every message queued so far has been handed to the operating system, or
    /// reports the failure that stopped it.
    pub fn flush(&mut self) -> Result<()> {
        self.check_failure()?;
        let (reply, answered) = mpsc::channel();
        if self.queue.send(Outgoing::Flush(reply)).is_err() || answered.recv().is_err() {
            return Err(self.writer_stopped());
        }
        Ok(())
    }

    /// Waits for the next message (messages arrive in send order), checks that its tag is
    /// `tag`, fills `values` with its values (resized to fit, its capacity reused) and returns
    /// its shape.
    ///
    /// Fails naming the peer when the peer disconnects, sends nothing for `receive_timeout`,
    /// or sends a message with another tag or a bad frame; the link is unusable afterwards.
    pub fn receive(&mut self, tag: u64, values: &mut Vec<f32>) -> Result<Vec<usize>> {
        // The size is known only once the message arrives: recorded as the buffer's.
        let entered = self.channel.enter(
            "receive",
            std::mem::size_of_val(values.as_slice()),
            Some(self.peer),
        );
        let result = self.read_message(tag, values);
        self.channel.complete(entered, &result);
        result
    }

    /// [`PeerLink::receive`], unrecorded.
    fn read_message(&mut self, tag: u64, values: &mut Vec<f32>) -> Result<Vec<usize>> {
        self.check_failure()?;
        match self.read_frame(tag, values) {
            Ok(shape) => Ok(shape),
            Err(failure) => {
                let failure = record_failure(&self.failure, failure);
                // Closing both directions tells the peer at once instead of at its timeout.
                let _ = self.stream.shutdown(Shutdown::Both);
                Err(self.error(failure))
            }
        }
    }

    /// Reads one frame with tag `tag` into `values`.
    fn read_frame(
        &mut self,
        tag: u64,
        values: &mut Vec<f32>,
    ) -> std::result::Result<Vec<usize>, LinkFailure> {
        let started = Instant::now();
        let mut stream = &self.stream;
        let mut read = |buffer: &mut [u8]| {
            stream
                .read_exact(buffer)
                .map_err(|error| LinkFailure::from_io(&error, "sent nothing", started.elapsed()))
        };
        self.header.resize(FRAME_FIXED_BYTES, 0);
        read(&mut self.header)?;
        let (found_tag, dimensions) =
            decode_frame_start(&self.header).map_err(|detail| LinkFailure::Protocol { detail })?;
        if found_tag != tag {
            return Err(LinkFailure::Protocol {
                detail: format!("expected a message with tag {tag:#x}, found tag {found_tag:#x}"),
            });
        }
        self.header.resize(8 * (dimensions + 1), 0);
        read(&mut self.header)?;
        let (shape, payload_bytes) = decode_frame_shape(&self.header, self.max_message_bytes)
            .map_err(|detail| LinkFailure::Protocol { detail })?;
        // Truncating first zero-fills only what grows; every value is overwritten below.
        values.truncate(payload_bytes / 4);
        values.resize(payload_bytes / 4, 0.0);
        read(bytemuck::cast_slice_mut(values.as_mut_slice()))?;
        if cfg!(target_endian = "big") {
            for value in values.iter_mut() {
                *value = f32::from_bits(u32::from_le(value.to_bits()));
            }
        }
        Ok(shape)
    }

    /// Returns the recorded failure as an error, if there is one.
    fn check_failure(&self) -> Result<()> {
        let recorded = self
            .failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        match recorded {
            Some(failure) => Err(self.error(failure)),
            None => Ok(()),
        }
    }

    /// The error for a writer thread that no longer takes messages: its recorded failure.
    fn writer_stopped(&self) -> Error {
        let failure = record_failure(
            &self.failure,
            LinkFailure::Io {
                detail: "the link's writer thread stopped".to_owned(),
            },
        );
        self.error(failure)
    }

    /// Wraps `failure` in an error naming the link and the peer.
    fn error(&self, failure: LinkFailure) -> Error {
        Error::Link {
            link: self.name.clone(),
            peer: self.peer,
            failure,
        }
    }
}

/// The thread that writes a link's frames in order.
struct Writer {
    /// The write half (a clone of the link's socket).
    stream: TcpStream,
    /// Frames and flush requests, in order; closed when the link is dropped.
    outgoing: Receiver<Outgoing>,
    /// Where written buffers go back for reuse.
    returned_buffers: Sender<Vec<u8>>,
    /// The link's first failure.
    failure: FailureSlot,
    /// The socket's write timeout, reported when a write times out.
    receive_timeout: Duration,
}

impl Writer {
    /// Writes frames until the link is dropped or a write fails; a failure is recorded and
    /// the connection shut down, so the link's next call and the peer both see it.
    fn run(mut self) {
        for message in &self.outgoing {
            match message {
                Outgoing::Frame(buffer) => {
                    if let Err(error) = self.stream.write_all(&buffer) {
                        record_failure(
                            &self.failure,
                            LinkFailure::from_io(&error, "accepted no data", self.receive_timeout),
                        );
                        let _ = self.stream.shutdown(Shutdown::Both);
                        return;
                    }
                    // The link may be gone already; then the buffer is simply freed.
                    let _ = self.returned_buffers.send(buffer);
                }
                Outgoing::Flush(reply) => {
                    let _ = reply.send(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rendezvous::InMemoryStore;

    /// Connects both ends of a link named `name` between ranks 0 and 1 on two threads.
    fn pair(
        store: &InMemoryStore,
        name: &str,
        low: &PeerLinkConfig,
        high: &PeerLinkConfig,
    ) -> (PeerLink, PeerLink) {
        std::thread::scope(|scope| {
            let higher = scope.spawn(|| PeerLink::connect(store, name, 1, 0, high).unwrap());
            let lower = PeerLink::connect(store, name, 0, 1, low).unwrap();
            (lower, higher.join().unwrap())
        })
    }

    /// A deterministic message of `count` values that differs per `seed`.
    fn message(count: usize, seed: u32) -> Vec<f32> {
        (0..count)
            .map(|index| (index as u32 ^ seed.wrapping_mul(2_654_435_761)) as f32 * 0.5)
            .collect()
    }

    #[test]
    fn messages_round_trip_in_both_directions_at_once() {
        let store = InMemoryStore::new();
        let config = PeerLinkConfig::default();
        let (mut lower, mut higher) = pair(&store, "round-trip", &config, &config);
        assert_eq!((lower.peer(), higher.peer()), (1, 0));
        // 16 MiB each way, sent by both sides before either receives: far more than the
        // sockets buffer, so this deadlocks unless sends are queued.
        let big = 4 << 20;
        let shapes: [&[usize]; 4] = [&[1024, big / 1024], &[3, 5], &[], &[0, 7]];
        std::thread::scope(|scope| {
            for (link, side) in [(&mut lower, 0_u32), (&mut higher, 1_u32)] {
                scope.spawn(move || {
                    for (index, shape) in shapes.iter().enumerate() {
                        let count = shape.iter().product();
                        let tag = 100 * u64::from(side) + index as u64;
                        link.send(tag, shape, &message(count, tag as u32)).unwrap();
                    }
                    let mut values = Vec::new();
                    for (index, shape) in shapes.iter().enumerate() {
                        let tag = 100 * u64::from(1 - side) + index as u64;
                        let received = link.receive(tag, &mut values).unwrap();
                        assert_eq!(received, *shape);
                        assert!(values == message(shape.iter().product(), tag as u32));
                    }
                    link.flush().unwrap();
                });
            }
        });
    }

    #[test]
    fn sends_and_receives_are_recorded_with_the_peer() {
        let store = InMemoryStore::new();
        let (low, high) = (Progress::default(), Progress::default());
        let config = |progress: &Progress| PeerLinkConfig {
            progress: progress.clone(),
            ..PeerLinkConfig::default()
        };
        let (mut lower, mut higher) = pair(&store, "recorded", &config(&low), &config(&high));
        lower.send(1, &[3], &[1.0, 2.0, 3.0]).unwrap();
        lower.send(2, &[1], &[4.0]).unwrap();
        let mut values = Vec::new();
        higher.receive(1, &mut values).unwrap();
        let sent = &low.snapshot()[0];
        assert_eq!(sent.channel, "recorded");
        assert_eq!(
            (sent.entered, sent.completed, sent.operation),
            (2, 2, "send")
        );
        assert_eq!((sent.bytes, sent.peer), (4, Some(1)));
        let received = &high.snapshot()[0];
        assert_eq!(
            (received.entered, received.completed, received.operation),
            (1, 1, "receive")
        );
        assert_eq!(received.peer, Some(0));
        // A receive that fails stays in flight: the diagnosis sees where the rank stopped.
        drop(lower);
        higher.receive(9, &mut values).unwrap_err();
        let failed = &high.snapshot()[0];
        assert_eq!((failed.entered, failed.completed), (2, 1));
    }

    #[test]
    fn a_tag_mismatch_names_both_tags_and_the_peer() {
        let store = InMemoryStore::new();
        let config = PeerLinkConfig::default();
        let (mut lower, mut higher) = pair(&store, "tags", &config, &config);
        lower.send(7, &[2], &[1.0, 2.0]).unwrap();
        let error = higher.receive(8, &mut Vec::new()).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("expected a message with tag 0x8, found tag 0x7"),
            "{text}"
        );
        assert!(text.contains("peer rank 0"), "{text}");
        assert_eq!(error.failed_rank(), Some(0));
        // The link is unusable afterwards, and says why.
        let again = higher.send(1, &[], &[0.0]).unwrap_err();
        assert!(again.to_string().contains("found tag 0x7"), "{again}");
    }

    #[test]
    fn a_dropped_peer_is_named_not_waited_for() {
        let store = InMemoryStore::new();
        let config = PeerLinkConfig::default();
        let (lower, mut higher) = pair(&store, "drop", &config, &config);
        drop(lower);
        let started = Instant::now();
        let error = higher.receive(0, &mut Vec::new()).unwrap_err();
        assert!(started.elapsed() < config.receive_timeout);
        match &error {
            Error::Link {
                link,
                peer,
                failure,
            } => {
                assert_eq!((link.as_str(), *peer), ("drop", 0));
                assert_eq!(*failure, LinkFailure::Disconnected);
            }
            other => panic!("expected a link failure, found {other}"),
        }
        assert_eq!(
            error.to_string(),
            "link \"drop\" with peer rank 0: peer disconnected"
        );
    }

    #[test]
    fn messages_queued_before_a_drop_still_arrive() {
        let store = InMemoryStore::new();
        let config = PeerLinkConfig::default();
        let (mut lower, mut higher) = pair(&store, "drain", &config, &config);
        lower.send(1, &[3], &[1.0, 2.0, 3.0]).unwrap();
        drop(lower);
        let mut values = Vec::new();
        assert_eq!(higher.receive(1, &mut values).unwrap(), [3]);
        assert_eq!(values, [1.0, 2.0, 3.0]);
        let error = higher.receive(2, &mut values).unwrap_err();
        assert!(error.to_string().ends_with("peer disconnected"), "{error}");
    }

    #[test]
    fn a_silent_peer_times_out_naming_it() {
        let store = InMemoryStore::new();
        let quick = PeerLinkConfig {
            receive_timeout: Duration::from_millis(50),
            ..PeerLinkConfig::default()
        };
        let (_lower, mut higher) = pair(&store, "silent", &PeerLinkConfig::default(), &quick);
        let error = higher.receive(0, &mut Vec::new()).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("link \"silent\" with peer rank 0: peer sent nothing"),
            "{error}"
        );
    }

    #[test]
    fn oversized_messages_are_refused_on_both_sides() {
        let store = InMemoryStore::new();
        let small = PeerLinkConfig {
            max_message_bytes: 64,
            ..PeerLinkConfig::default()
        };
        let (mut lower, mut higher) = pair(&store, "size", &small, &PeerLinkConfig::default());
        // The sender refuses what exceeds its own limit, and stays usable.
        let error = lower.send(1, &[17], &[0.0; 17]).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("68 bytes of values, expected at most 64"),
            "{error}"
        );
        assert_eq!(error.failed_rank(), None);
        lower.send(1, &[16], &[0.5; 16]).unwrap();
        let mut values = Vec::new();
        assert_eq!(higher.receive(1, &mut values).unwrap(), [16]);
        // The receiver refuses a frame beyond its limit even when the sender allowed it.
        higher.send(2, &[4, 5], &[0.0; 20]).unwrap();
        let error = lower.receive(2, &mut values).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("frame of 80 bytes, expected at most 64"),
            "{error}"
        );
        assert_eq!(error.failed_rank(), Some(1));
    }

    #[test]
    fn connecting_to_oneself_is_an_argument_error() {
        let store = InMemoryStore::new();
        let error =
            PeerLink::connect(&store, "self", 3, 3, &PeerLinkConfig::default()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "peer = 3, expected a rank other than this one"
        );
    }
}
