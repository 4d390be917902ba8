//! Forming a shared-memory group: rank 0 creates the segment; every rank listens on an
//! abstract Unix socket (random name, published in the store), and every pair of ranks connects
//! and proves the job's secret ([`crate::auth`]); rank 0 then passes the segment's descriptor
//! to every other rank over its connection (`SCM_RIGHTS`), so the segment is never reachable by
//! name. The connections stay open for the group's life as the liveness signal of
//! [`super::sync`].
//!
//! Abstract sockets live in the network namespace, as the ranks of one node do, and leave no
//! file behind. As in the TCP ring, every rank connects before it accepts and the proof's steps
//! each need only earlier steps of other ranks: (1) connect to every higher rank and send the
//! introduction and hello proof, (2) accept every lower rank and answer, (3) check each higher
//! rank's answer and confirm, (4) check each lower rank's confirmation; then rank 0 sends the
//! descriptor and the others receive it.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::time::{Duration, Instant};

use rand::RngCore;
use tracing::{debug, warn};

use super::ShmConfig;
use super::segment::Segment;
use crate::auth::{ANSWER_BYTES, Acceptor, Connector, HELLO_PROOF_BYTES};
use crate::error::{Error, Result};
use crate::rendezvous::Store;

/// The introduction's first bytes.
const INTRO_MAGIC: &[u8; 8] = b"COHSHM01";
/// Longest prefix a rank accepts in an introduction.
const MAX_PREFIX_BYTES: usize = 1024;
/// Longest a candidate connection may take to introduce itself.
const CANDIDATE_TIMEOUT: Duration = Duration::from_secs(5);

/// A rank's part of a formed group.
pub(crate) struct Joined {
    pub segment: Segment,
    /// The connection to every other rank, by rank (`None` at this rank's index).
    pub peers: Vec<Option<UnixStream>>,
}

/// The key under which `rank` publishes its socket's name.
fn socket_key(prefix: &str, rank: usize) -> String {
    format!("{prefix}/shm/{rank}")
}

/// Joins the group named `prefix` as `rank` of `world_size` (at least 2).
pub(crate) fn join(
    store: &dyn Store,
    prefix: &str,
    rank: usize,
    world_size: usize,
    config: &ShmConfig,
) -> Result<Joined> {
    let started = Instant::now();
    let joining = Joining {
        prefix,
        rank,
        world_size,
        config,
        deadline: started + config.connect_timeout,
    };
    let created = if rank == 0 {
        Some(Segment::create(world_size, config.slot_bytes)?)
    } else {
        None
    };
    let listener = joining.listen(store)?;
    let names = joining.socket_names(store)?;
    // (1) Connect to every higher rank and send the introduction and hello proof.
    let connectors = joining.connect_higher(&names)?;
    // (2) Accept every lower rank and answer its proof.
    let acceptors = joining.accept_lower(&listener)?;
    // (3) Check each higher rank's answer and confirm.
    let mut peers: Vec<Option<UnixStream>> = (0..world_size).map(|_| None).collect();
    for (peer, mut stream, connector) in connectors {
        connector
            .finish(&mut stream)
            .map_err(|detail| handshake(peer, detail))?;
        peers[peer] = Some(stream);
    }
    // (4) Check each lower rank's confirmation.
    for (peer, (mut stream, acceptor)) in acceptors.into_iter().enumerate() {
        stream
            .set_read_timeout(Some(remaining(joining.deadline)))
            .map_err(|error| handshake(peer, error.to_string()))?;
        acceptor
            .confirm(&mut stream)
            .map_err(|detail| handshake(peer, detail))?;
        peers[peer] = Some(stream);
    }
    let segment = share_segment(created, &peers, world_size)?;
    debug!(
        prefix,
        rank,
        world_size,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "shared-memory group formed"
    );
    Ok(Joined { segment, peers })
}

/// One rank joining a group: what every step needs.
struct Joining<'a> {
    prefix: &'a str,
    rank: usize,
    world_size: usize,
    config: &'a ShmConfig,
    /// When setup must be done.
    deadline: Instant,
}

impl Joining<'_> {
    /// Listens on an abstract socket with a random name and publishes the name.
    fn listen(&self, store: &dyn Store) -> Result<UnixListener> {
        let mut name = [0_u8; 16];
        rand::rng().fill_bytes(&mut name);
        let name: String = name.iter().map(|byte| format!("{byte:02x}")).collect();
        let name = format!("cohort-shm-{name}");
        let address =
            SocketAddr::from_abstract_name(name.as_bytes()).map_err(|source| Error::Io {
                context: "name the group's socket".to_owned(),
                source,
            })?;
        let listener = UnixListener::bind_addr(&address).map_err(|source| Error::Listen {
            address: format!("@{name}"),
            source,
        })?;
        listener.set_nonblocking(true).map_err(|source| Error::Io {
            context: "configure the group's socket".to_owned(),
            source,
        })?;
        store.set(&socket_key(self.prefix, self.rank), name.as_bytes())?;
        Ok(listener)
    }

    /// Every rank's socket name, by rank.
    fn socket_names(&self, store: &dyn Store) -> Result<Vec<Vec<u8>>> {
        let keys: Vec<String> = (0..self.world_size)
            .map(|peer| socket_key(self.prefix, peer))
            .collect();
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        store
            .wait(&key_refs, remaining(self.deadline))
            .map_err(|error| match error {
                Error::StoreTimeout { .. } => self.ranks_missing(
                    (0..self.world_size)
                        .filter(|&peer| store.get(&keys[peer]).ok().flatten().is_none())
                        .collect(),
                ),
                other => other,
            })
    }

    /// Connects to every higher rank and sends the introduction and hello proof.
    fn connect_higher(&self, names: &[Vec<u8>]) -> Result<Vec<(usize, UnixStream, Connector)>> {
        let own_intro = introduction(self.prefix, self.rank, self.world_size);
        let mut connectors = Vec::new();
        for (peer, name) in names.iter().enumerate().skip(self.rank + 1) {
            let address = SocketAddr::from_abstract_name(name).map_err(|source| Error::Io {
                context: format!("read rank {peer}'s socket name"),
                source,
            })?;
            let mut stream =
                UnixStream::connect_addr(&address).map_err(|source| Error::Connect {
                    peer,
                    address: format!("@{}", String::from_utf8_lossy(name)),
                    source,
                })?;
            let (connector, proof) = Connector::start(self.config.secret.as_ref(), &own_intro);
            stream
                .set_read_timeout(Some(remaining(self.deadline)))
                .and_then(|()| stream.write_all(&own_intro))
                .and_then(|()| stream.write_all(&proof))
                .map_err(|error| handshake(peer, format!("send the introduction: {error}")))?;
            connectors.push((peer, stream, connector));
        }
        Ok(connectors)
    }

    /// Accepts every lower rank (dropping strays) and answers its proof; returns them by rank.
    fn accept_lower(&self, listener: &UnixListener) -> Result<Vec<(UnixStream, Acceptor)>> {
        let (prefix, rank) = (self.prefix, self.rank);
        let mut acceptors: Vec<Option<(UnixStream, Acceptor)>> = (0..rank).map(|_| None).collect();
        while acceptors.iter().any(Option::is_none) {
            let Some(mut stream) = accept_before(listener, self.deadline)? else {
                let missing = (0..rank).filter(|&peer| acceptors[peer].is_none());
                return Err(self.ranks_missing(missing.collect()));
            };
            let secret = self.config.secret.as_ref();
            match read_introduction(&mut stream, prefix, rank, self.world_size, secret) {
                Ok((peer, acceptor, answer)) if acceptors[peer].is_none() => {
                    stream
                        .write_all(&answer)
                        .map_err(|error| handshake(peer, format!("answer the proof: {error}")))?;
                    acceptors[peer] = Some((stream, acceptor));
                }
                Ok((peer, ..)) => {
                    warn!(
                        prefix,
                        rank, peer, "refused a second connection from a rank"
                    );
                }
                Err(reason) => warn!(prefix, rank, reason, "refused a stray connection"),
            }
        }
        Ok(acceptors.into_iter().flatten().collect())
    }

    /// The error for ranks that did not show up in time.
    fn ranks_missing(&self, missing_ranks: Vec<usize>) -> Error {
        Error::RanksMissing {
            prefix: self.prefix.to_owned(),
            missing_ranks,
            world_size: self.world_size,
            timeout: self.config.connect_timeout,
        }
    }
}

/// Rank 0 (which `created` the segment) passes it to every other rank; the others receive and
/// map it.
fn share_segment(
    created: Option<Segment>,
    peers: &[Option<UnixStream>],
    world_size: usize,
) -> Result<Segment> {
    match created {
        Some(segment) => {
            for (peer, stream) in peers.iter().enumerate().skip(1) {
                let stream = stream.as_ref().expect("connected to every rank");
                send_fd(stream, segment.fd().as_raw_fd())
                    .map_err(|error| handshake(peer, format!("pass the segment: {error}")))?;
            }
            Ok(segment)
        }
        None => {
            let leader = peers[0].as_ref().expect("connected to rank 0");
            let fd = receive_fd(leader)
                .map_err(|error| handshake(0, format!("receive the segment: {error}")))?;
            Segment::open(fd, world_size)
        }
    }
}

/// The introduction rank `from` sends: magic, ranks, and the group's prefix.
fn introduction(prefix: &str, from: usize, world_size: usize) -> Vec<u8> {
    let mut intro = Vec::with_capacity(20 + prefix.len());
    intro.extend_from_slice(INTRO_MAGIC);
    intro.extend_from_slice(&(from as u32).to_le_bytes());
    intro.extend_from_slice(&(world_size as u32).to_le_bytes());
    intro.extend_from_slice(&(prefix.len() as u32).to_le_bytes());
    intro.extend_from_slice(prefix.as_bytes());
    intro
}

/// Reads and checks a candidate's introduction and hello proof; returns its rank, the pending
/// proof and the answer to send, or why the candidate is not a lower rank of this group.
fn read_introduction(
    stream: &mut UnixStream,
    prefix: &str,
    rank: usize,
    world_size: usize,
    secret: Option<&crate::LinkSecret>,
) -> Result<(usize, Acceptor, [u8; ANSWER_BYTES]), String> {
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(CANDIDATE_TIMEOUT)))
        .map_err(|error| error.to_string())?;
    let mut fixed = [0_u8; 20];
    stream
        .read_exact(&mut fixed)
        .map_err(|error| format!("read the introduction: {error}"))?;
    let word =
        |at: usize| u32::from_le_bytes(fixed[at..at + 4].try_into().expect("4 bytes")) as usize;
    let (from, world, prefix_bytes) = (word(8), word(12), word(16));
    if &fixed[..8] != INTRO_MAGIC || prefix_bytes > MAX_PREFIX_BYTES {
        return Err("not a shared-memory group introduction".to_owned());
    }
    let mut their_prefix = vec![0_u8; prefix_bytes];
    stream
        .read_exact(&mut their_prefix)
        .map_err(|error| format!("read the introduction: {error}"))?;
    if their_prefix != prefix.as_bytes() || world != world_size || from >= rank {
        return Err(format!(
            "introduced as rank {from} of {world} in group {:?}, expected a rank below {rank} of \
             {world_size} in {prefix:?}",
            String::from_utf8_lossy(&their_prefix)
        ));
    }
    let mut hello = [0_u8; HELLO_PROOF_BYTES];
    stream
        .read_exact(&mut hello)
        .map_err(|error| format!("read the proof: {error}"))?;
    let (acceptor, answer) =
        Acceptor::answer(secret, &introduction(prefix, from, world_size), &hello)?;
    Ok((from, acceptor, answer))
}

/// Accepts the next connection, or returns `None` once `deadline` passes.
fn accept_before(listener: &UnixListener, deadline: Instant) -> Result<Option<UnixStream>> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => return Ok(Some(stream)),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(Error::Io {
                    context: "accept a connection on the group's socket".to_owned(),
                    source,
                });
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let mut polled = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for a descriptor the listener owns.
        unsafe { libc::poll(&mut polled, 1, millis) };
    }
}

/// Sends descriptor `fd` with one byte of data.
fn send_fd(stream: &UnixStream, fd: RawFd) -> io::Result<()> {
    let byte = [1_u8];
    let mut iov = libc::iovec {
        iov_base: byte.as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = [0_u64; 8];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    assert!(space <= size_of_val(&control));
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = space as _;
    // SAFETY: the control buffer is large enough for one descriptor's header and data.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&message);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<RawFd>(), fd);
    }
    // SAFETY: a valid socket and message.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &message, libc::MSG_NOSIGNAL) };
    match sent {
        1 => Ok(()),
        -1 => Err(io::Error::last_os_error()),
        _ => Err(io::Error::new(io::ErrorKind::WriteZero, "short send")),
    }
}

/// Receives a descriptor sent by [`send_fd`] (within the stream's read timeout).
fn receive_fd(stream: &UnixStream) -> io::Result<OwnedFd> {
    let mut byte = [0_u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0_u64; 8];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = size_of_val(&control) as _;
    // SAFETY: a valid socket and message.
    let received =
        unsafe { libc::recvmsg(stream.as_raw_fd(), &mut message, libc::MSG_CMSG_CLOEXEC) };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    if received == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    // SAFETY: the kernel filled the control buffer; CMSG_FIRSTHDR checks its length.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&message);
        if header.is_null()
            || (*header).cmsg_level != libc::SOL_SOCKET
            || (*header).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no descriptor came with the message",
            ));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(header).cast::<RawFd>());
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn handshake(peer: usize, detail: String) -> Error {
    Error::Handshake { peer, detail }
}

fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}
