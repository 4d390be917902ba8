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

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::rendezvous::{Store, address_key};

/// Identifies a Cohort point-to-point hello (and its version).
const HELLO_MAGIC: [u8; 8] = *b"COHP2P01";
/// Written in native byte order; a peer that reads a different value has another endianness.
const BYTE_ORDER_PROBE: u32 = 0x0102_0304;
/// Bytes of a hello before the link name: magic, probe, rank, peer, name length.
const HELLO_FIXED_BYTES: usize = 8 + 4 + 4 + 4 + 4;
/// Longest link name a hello may carry.
const MAX_NAME_BYTES: usize = 1024;
/// Longest a single candidate connection may take to send its hello, so that a stray
/// connection that sends nothing cannot hold up the real peer for long.
const CANDIDATE_HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Marks the start of every frame header.
const FRAME_MAGIC: u32 = 0xC0E5_F2F2;
/// Bytes of a frame header before its dimensions: magic, tag, number of dimensions.
const FRAME_FIXED_BYTES: usize = 4 + 8 + 4;
/// Most dimensions a message's shape may have.
pub const MAX_DIMENSIONS: usize = 8;

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
}

impl Default for PeerLinkConfig {
    fn default() -> Self {
        Self {
            listen_address: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            advertise_host: None,
            connect_timeout: Duration::from_secs(120),
            receive_timeout: Duration::from_secs(300),
            max_message_bytes: 1 << 30,
        }
    }
}

impl PeerLinkConfig {
    /// Checks every field; returns the first problem found.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("config.connect_timeout", self.connect_timeout),
            ("config.receive_timeout", self.receive_timeout),
        ] {
            if value.is_zero() {
                return Err(Error::InvalidArgument {
                    field,
                    found: format!("{value:?}"),
                    expected: "a positive duration",
                });
            }
        }
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

/// How a [`PeerLink`] failed; carried by [`Error::Link`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkFailure {
    /// The peer closed the connection or it was reset (the peer's process or link is gone).
    Disconnected,
    /// The peer made no progress for the receive timeout.
    Stalled {
        /// `"sent nothing"` (a receive waited) or `"accepted no data"` (a send waited).
        activity: &'static str,
        /// How long this rank waited.
        waited: Duration,
    },
    /// The peer sent something the protocol does not allow (another tag than expected, a bad
    /// or oversized frame).
    Protocol {
        /// What was expected and what arrived.
        detail: String,
    },
    /// An operating-system error on the connection other than a disconnection.
    Io {
        /// The operating system's error, as text.
        detail: String,
    },
    /// The message given to [`PeerLink::send`] cannot be sent (its shape does not match its
    /// values, or it is too large). The link stays usable.
    Rejected {
        /// What was expected and what was given.
        detail: String,
    },
}

impl LinkFailure {
    /// Whether the failure is the peer's doing (rather than this rank's arguments).
    pub fn blames_peer(&self) -> bool {
        !matches!(self, LinkFailure::Rejected { .. })
    }

    /// Classifies an error of a read or write on the connection.
    fn from_io(error: &io::Error, activity: &'static str, waited: Duration) -> LinkFailure {
        match error.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::WriteZero => LinkFailure::Disconnected,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                LinkFailure::Stalled { activity, waited }
            }
            _ => LinkFailure::Io {
                detail: error.to_string(),
            },
        }
    }
}

impl std::fmt::Display for LinkFailure {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkFailure::Disconnected => formatter.write_str("peer disconnected"),
            LinkFailure::Stalled { activity, waited } => {
                write!(formatter, "peer {activity} for {waited:?}")
            }
            LinkFailure::Protocol { detail } => {
                write!(formatter, "peer broke the protocol: {detail}")
            }
            LinkFailure::Io { detail } => write!(formatter, "i/o error: {detail}"),
            LinkFailure::Rejected { detail } => write!(formatter, "message not sent: {detail}"),
        }
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

/// Checks that a message can be sent: returns why not.
fn check_message(
    shape: &[usize],
    value_count: usize,
    max_message_bytes: usize,
) -> std::result::Result<(), String> {
    if shape.len() > MAX_DIMENSIONS {
        return Err(format!(
            "shape {shape:?} has {} dimensions, expected at most {MAX_DIMENSIONS}",
            shape.len()
        ));
    }
    let shape_count = shape
        .iter()
        .try_fold(1_usize, |count, &dimension| count.checked_mul(dimension));
    if shape_count != Some(value_count) {
        return Err(format!(
            "shape {shape:?} holds {} values, found {value_count} values",
            shape_count.map_or_else(|| "more than usize::MAX".to_owned(), |c| c.to_string())
        ));
    }
    let bytes = value_count.saturating_mul(4);
    if bytes > max_message_bytes {
        return Err(format!(
            "{bytes} bytes of values, expected at most {max_message_bytes} (max_message_bytes)"
        ));
    }
    Ok(())
}

/// Encodes a frame (header and little-endian values) into `buffer`, replacing its contents.
fn encode_frame(buffer: &mut Vec<u8>, tag: u64, shape: &[usize], values: &[f32]) {
    let payload_bytes = values.len() * 4;
    buffer.clear();
    buffer.reserve(FRAME_FIXED_BYTES + 8 * (shape.len() + 1) + payload_bytes);
    buffer.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    buffer.extend_from_slice(&tag.to_le_bytes());
    buffer.extend_from_slice(&(shape.len() as u32).to_le_bytes());
    for &dimension in shape {
        buffer.extend_from_slice(&(dimension as u64).to_le_bytes());
    }
    buffer.extend_from_slice(&(payload_bytes as u64).to_le_bytes());
    if cfg!(target_endian = "little") {
        buffer.extend_from_slice(bytemuck::cast_slice(values));
    } else {
        for value in values {
            buffer.extend_from_slice(&value.to_le_bytes());
        }
    }
}

/// Decodes the fixed start of a frame header: returns its tag and number of dimensions.
fn decode_frame_start(bytes: &[u8]) -> std::result::Result<(u64, usize), String> {
    let magic = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    if magic != FRAME_MAGIC {
        return Err(format!(
            "expected a frame header starting {:02x?}, found bytes {:02x?}",
            FRAME_MAGIC.to_le_bytes(),
            &bytes[..FRAME_FIXED_BYTES]
        ));
    }
    let tag = u64::from_le_bytes(bytes[4..12].try_into().expect("8 bytes"));
    let dimensions = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    if dimensions > MAX_DIMENSIONS {
        return Err(format!(
            "frame with tag {tag:#x} has {dimensions} dimensions, expected at most \
             {MAX_DIMENSIONS}"
        ));
    }
    Ok((tag, dimensions))
}

/// Decodes the dimensions and payload length that follow the fixed start (`8 * (dims + 1)`
/// bytes); checks the length against the shape and `max_message_bytes`.
fn decode_frame_shape(
    bytes: &[u8],
    max_message_bytes: usize,
) -> std::result::Result<(Vec<usize>, usize), String> {
    let words: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|word| u64::from_le_bytes(word.try_into().expect("8 bytes")))
        .collect();
    let (&payload_bytes, dimensions) = words.split_last().ok_or("frame header is empty")?;
    if payload_bytes > max_message_bytes as u64 {
        return Err(format!(
            "frame of {payload_bytes} bytes, expected at most {max_message_bytes} \
             (max_message_bytes)"
        ));
    }
    let shape: Vec<usize> = dimensions
        .iter()
        .map(|&dimension| usize::try_from(dimension).unwrap_or(usize::MAX))
        .collect();
    let value_count = shape
        .iter()
        .try_fold(1_usize, |count, &dimension| count.checked_mul(dimension));
    if value_count.and_then(|count| count.checked_mul(4)) != Some(payload_bytes as usize) {
        return Err(format!(
            "frame of shape {shape:?} carries {payload_bytes} bytes, expected 4 per value"
        ));
    }
    Ok((shape, payload_bytes as usize))
}

/// What each end of a link says about itself when it connects.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hello {
    /// The link's name.
    name: String,
    /// The sending rank.
    rank: u32,
    /// The rank the sender expects at the other end.
    peer: u32,
}

impl Hello {
    /// Encodes the hello.
    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HELLO_FIXED_BYTES + self.name.len());
        bytes.extend_from_slice(&HELLO_MAGIC);
        bytes.extend_from_slice(&BYTE_ORDER_PROBE.to_ne_bytes());
        bytes.extend_from_slice(&self.rank.to_le_bytes());
        bytes.extend_from_slice(&self.peer.to_le_bytes());
        bytes.extend_from_slice(&(self.name.len() as u32).to_le_bytes());
        bytes.extend_from_slice(self.name.as_bytes());
        bytes
    }

    /// Reads a hello from `stream` and checks it is the one `own`'s peer must send: same
    /// name, ranks swapped. Returns what is wrong otherwise.
    fn read_answer(stream: &TcpStream, own: &Hello) -> std::result::Result<(), String> {
        let mut reader = stream;
        let mut fixed = [0_u8; HELLO_FIXED_BYTES];
        reader
            .read_exact(&mut fixed)
            .map_err(|error| match error.kind() {
                io::ErrorKind::UnexpectedEof => {
                    "the connection closed before a hello arrived (the peer refused ours or failed)"
                        .to_owned()
                }
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    "no hello arrived in time".to_owned()
                }
                _ => format!("read hello: {error}"),
            })?;
        if fixed[..8] != HELLO_MAGIC {
            return Err(format!(
                "expected hello magic {:?}, found {:?}",
                String::from_utf8_lossy(&HELLO_MAGIC),
                String::from_utf8_lossy(&fixed[..8])
            ));
        }
        let word = |index: usize| -> [u8; 4] {
            fixed[8 + 4 * index..12 + 4 * index]
                .try_into()
                .expect("4 bytes")
        };
        if u32::from_ne_bytes(word(0)) != BYTE_ORDER_PROBE {
            return Err("peer uses a different byte order".to_owned());
        }
        let name_bytes = u32::from_le_bytes(word(3)) as usize;
        if name_bytes > MAX_NAME_BYTES {
            return Err(format!(
                "link name of {name_bytes} bytes, expected at most {MAX_NAME_BYTES}"
            ));
        }
        let mut name = vec![0_u8; name_bytes];
        reader
            .read_exact(&mut name)
            .map_err(|error| format!("read hello name: {error}"))?;
        let found = Hello {
            name: String::from_utf8_lossy(&name).into_owned(),
            rank: u32::from_le_bytes(word(1)),
            peer: u32::from_le_bytes(word(2)),
        };
        if found.name != own.name || found.rank != own.peer || found.peer != own.rank {
            return Err(format!(
                "hello from link {:?} rank {} for rank {}, expected link {:?} rank {} for rank {}",
                found.name, found.rank, found.peer, own.name, own.peer, own.rank
            ));
        }
        Ok(())
    }
}

/// Returns the time left before `deadline`, at least one millisecond (socket timeouts reject
/// zero).
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// The lower rank's side: binds, publishes the address, and accepts connections until one
/// carries the peer's hello, which it answers.
fn listen_for_peer(
    store: &dyn Store,
    own: &Hello,
    config: &PeerLinkConfig,
    deadline: Instant,
) -> Result<TcpStream> {
    let peer = own.peer as usize;
    let listener = TcpListener::bind(config.listen_address).map_err(|source| Error::Listen {
        address: config.listen_address.to_string(),
        source,
    })?;
    let local_address = listener.local_addr().map_err(|source| Error::Io {
        context: format!("read the address of link {:?}'s listener", own.name),
        source,
    })?;
    let advertised = match config.advertise_host {
        Some(host) => SocketAddr::new(host, local_address.port()),
        None if local_address.ip().is_unspecified() => {
            return Err(Error::InvalidArgument {
                field: "config.advertise_host",
                found: "none".to_owned(),
                expected: "an address the peer can reach, since listen_address is unspecified",
            });
        }
        None => local_address,
    };
    store.set(
        &address_key(&own.name, own.rank as usize),
        advertised.to_string().as_bytes(),
    )?;
    debug!(name = %own.name, rank = own.rank, peer, %advertised, "published link address");

    let poll_error = |source| Error::Io {
        context: format!("poll link {:?}'s listener", own.name),
        source,
    };
    listener.set_nonblocking(true).map_err(poll_error)?;
    let mut listener = mio::net::TcpListener::from_std(listener);
    let mut poll = Poll::new().map_err(poll_error)?;
    poll.registry()
        .register(&mut listener, Token(0), Interest::READABLE)
        .map_err(poll_error)?;
    let mut events = Events::with_capacity(4);
    let mut rejections: Vec<String> = Vec::new();
    loop {
        loop {
            let (stream, peer_address) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    warn!(%error, name = %own.name, "accepting a link connection failed");
                    break;
                }
            };
            let stream = TcpStream::from(stream);
            let checked = stream
                .set_nonblocking(false)
                .and_then(|()| {
                    stream.set_read_timeout(Some(remaining(deadline).min(CANDIDATE_HELLO_TIMEOUT)))
                })
                .and_then(|()| stream.set_write_timeout(Some(remaining(deadline))))
                .map_err(|error| format!("configure socket: {error}"))
                .and_then(|()| Hello::read_answer(&stream, own));
            match checked {
                Ok(()) => {
                    let mut writer = &stream;
                    writer
                        .write_all(&own.encode())
                        .map_err(|source| Error::Handshake {
                            peer,
                            detail: format!("answer the hello of link {:?}: {source}", own.name),
                        })?;
                    return Ok(stream);
                }
                Err(reason) => {
                    warn!(
                        name = %own.name,
                        rank = own.rank,
                        %peer_address,
                        %reason,
                        "rejected a connection that is not the link's peer"
                    );
                    rejections.push(format!("{peer_address}: {reason}"));
                }
            }
        }
        let now = Instant::now();
        if now >= deadline {
            let mut detail = format!(
                "rank {peer} did not connect to link {:?} within {:?}",
                own.name, config.connect_timeout
            );
            if !rejections.is_empty() {
                detail.push_str(&format!("; rejected {}", rejections.join("; ")));
            }
            return Err(Error::Handshake { peer, detail });
        }
        match poll.poll(&mut events, Some(deadline - now)) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(poll_error(source)),
        }
    }
}

/// The higher rank's side: waits for the peer's address, connects, sends the hello and checks
/// the answer.
fn connect_to_peer(
    store: &dyn Store,
    own: &Hello,
    config: &PeerLinkConfig,
    deadline: Instant,
) -> Result<TcpStream> {
    let peer = own.peer as usize;
    let key = address_key(&own.name, peer);
    let published = match store.wait(&[key.as_str()], config.connect_timeout) {
        Ok(mut values) => values.pop().unwrap_or_default(),
        Err(Error::StoreTimeout { .. }) => {
            return Err(Error::Handshake {
                peer,
                detail: format!(
                    "rank {peer} did not publish an address for link {:?} within {:?}",
                    own.name, config.connect_timeout
                ),
            });
        }
        Err(other) => return Err(other),
    };
    let address: SocketAddr = std::str::from_utf8(&published)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| Error::BadAddress {
            prefix: own.name.clone(),
            peer,
            found: String::from_utf8_lossy(&published).into_owned(),
        })?;
    let connect_error = |source| Error::Connect {
        peer,
        address: address.to_string(),
        source,
    };
    let stream =
        TcpStream::connect_timeout(&address, remaining(deadline)).map_err(connect_error)?;
    stream
        .set_write_timeout(Some(remaining(deadline)))
        .map_err(connect_error)?;
    stream
        .set_read_timeout(Some(remaining(deadline)))
        .map_err(connect_error)?;
    let mut writer = &stream;
    writer.write_all(&own.encode()).map_err(connect_error)?;
    Hello::read_answer(&stream, own).map_err(|detail| Error::Handshake {
        peer,
        detail: format!("link {:?}: {detail}", own.name),
    })?;
    Ok(stream)
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
    fn a_shape_that_does_not_match_the_values_is_refused() {
        assert_eq!(
            check_message(&[2, 3], 5, 1024),
            Err("shape [2, 3] holds 6 values, found 5 values".to_owned())
        );
        assert!(check_message(&[1; 9], 1, 1024).is_err());
        assert!(check_message(&[usize::MAX, 2], 0, 1024).is_err());
        assert_eq!(check_message(&[], 1, 4), Ok(()));
    }

    #[test]
    fn frames_round_trip_and_bad_headers_are_refused() {
        let mut buffer = Vec::new();
        encode_frame(&mut buffer, 0xAB, &[2, 3], &[1.5; 6]);
        let (tag, dimensions) = decode_frame_start(&buffer[..FRAME_FIXED_BYTES]).unwrap();
        assert_eq!((tag, dimensions), (0xAB, 2));
        let rest = &buffer[FRAME_FIXED_BYTES..FRAME_FIXED_BYTES + 24];
        assert_eq!(decode_frame_shape(rest, 1024), Ok((vec![2, 3], 24)));
        assert_eq!(buffer.len(), FRAME_FIXED_BYTES + 24 + 24);

        // Garbage, too many dimensions, a length that disagrees with the shape, a shape whose
        // size overflows: all errors, never panics.
        assert!(decode_frame_start(&[0xff; FRAME_FIXED_BYTES]).is_err());
        let mut many = buffer[..FRAME_FIXED_BYTES].to_vec();
        many[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            decode_frame_start(&many)
                .unwrap_err()
                .contains("dimensions")
        );
        let words = |values: &[u64]| -> Vec<u8> {
            values
                .iter()
                .flat_map(|value| value.to_le_bytes())
                .collect()
        };
        let error = decode_frame_shape(&words(&[2, 3, 20]), 1024).unwrap_err();
        assert_eq!(
            error,
            "frame of shape [2, 3] carries 20 bytes, expected 4 per value"
        );
        assert!(decode_frame_shape(&words(&[u64::MAX, u64::MAX, 16]), 1024).is_err());
        assert!(decode_frame_shape(&words(&[u64::MAX]), 1024).is_err());
    }

    #[test]
    fn a_connection_for_another_link_is_refused() {
        let store = InMemoryStore::new();
        let quick = PeerLinkConfig {
            connect_timeout: Duration::from_millis(300),
            ..PeerLinkConfig::default()
        };
        // Rank 1 thinks the link joins it to rank 0; rank 0 thinks its peer is rank 2.
        std::thread::scope(|scope| {
            let higher = scope.spawn(|| PeerLink::connect(&store, "mixed", 1, 0, &quick));
            let lower = PeerLink::connect(&store, "mixed", 0, 2, &quick).unwrap_err();
            assert_eq!(lower.failed_rank(), Some(2));
            assert!(lower.to_string().contains("rank 1 for rank 0"), "{lower}");
            let higher = higher.join().unwrap().unwrap_err();
            assert_eq!(higher.failed_rank(), Some(0));
        });
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
