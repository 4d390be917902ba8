//! The hello handshake that opens a [`PeerLink`](super::PeerLink), and the two ways of
//! reaching the peer.
//!
//! The lower rank binds, publishes its address under `{name}/addr/{rank}` in the rendezvous
//! [`Store`] and accepts connections until one sends the peer's hello ([`listen_for_peer`]);
//! the higher rank waits for that address, connects and sends its own ([`connect_to_peer`]).
//! Each hello names the link and both ranks and carries a byte-order probe, so a connection
//! meant for another link, or from a machine of another endianness, is refused; the
//! connecting side's hello is followed by the proof of the job's secret ([`crate::auth`]),
//! which the listener answers and the connector confirms.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use tracing::{debug, warn};

use super::PeerLinkConfig;
use crate::auth::{ANSWER_BYTES, Acceptor, Connector, HELLO_PROOF_BYTES};
use crate::error::{Error, Result};
use crate::rendezvous::{Store, address_key};

/// Identifies a Cohort point-to-point hello (and its version).
/// Version 2: the hello is followed by the proof of the job's secret.
const HELLO_MAGIC: [u8; 8] = *b"COHP2P02";
/// Written in native byte order; a peer that reads a different value has another endianness.
const BYTE_ORDER_PROBE: u32 = 0x0102_0304;
/// Bytes of a hello before the link name: magic, probe, rank, peer, name length.
const HELLO_FIXED_BYTES: usize = 8 + 4 + 4 + 4 + 4;
/// Longest link name a hello may carry.
pub(super) const MAX_NAME_BYTES: usize = 1024;
/// Longest a single candidate connection may take to send its hello, so that a stray
/// connection that sends nothing cannot hold up the real peer for long.
const CANDIDATE_HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// What each end of a link says about itself when it connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Hello {
    /// The link's name.
    pub(super) name: String,
    /// The sending rank.
    pub(super) rank: u32,
    /// The rank the sender expects at the other end.
    pub(super) peer: u32,
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
pub(super) fn listen_for_peer(
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
                .and_then(|()| Hello::read_answer(&stream, own))
                .and_then(|()| read_hello_proof(&stream, own, config));
            match checked {
                Ok((acceptor, proof)) => {
                    let mut answer = own.encode();
                    answer.extend_from_slice(&proof);
                    let failure = |detail: String| Error::Handshake {
                        peer,
                        detail: format!("link {:?}: {detail}", own.name),
                    };
                    let mut stream = stream;
                    stream
                        .write_all(&answer)
                        .map_err(|source| failure(format!("answer the hello: {source}")))?;
                    stream
                        .set_read_timeout(Some(remaining(deadline)))
                        .map_err(|source| failure(format!("configure socket: {source}")))?;
                    acceptor.confirm(&mut stream).map_err(failure)?;
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

/// Reads the proof that follows a candidate's valid hello and answers it; returns why the
/// candidate is not the job's otherwise.
fn read_hello_proof(
    stream: &TcpStream,
    own: &Hello,
    config: &PeerLinkConfig,
) -> std::result::Result<(Acceptor, [u8; ANSWER_BYTES]), String> {
    let mut proof = [0_u8; HELLO_PROOF_BYTES];
    let mut reader = stream;
    reader
        .read_exact(&mut proof)
        .map_err(|error| format!("read the proof of the job's secret: {error}"))?;
    // The candidate's hello, as it sent it: the same name, the ranks swapped.
    let theirs = Hello {
        name: own.name.clone(),
        rank: own.peer,
        peer: own.rank,
    };
    Acceptor::answer(config.secret.as_ref(), &theirs.encode(), &proof)
}

/// The higher rank's side: waits for the peer's address, connects, sends the hello and its
/// proof, checks the answer and confirms.
pub(super) fn connect_to_peer(
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
    let intro = own.encode();
    let (connector, proof) = Connector::start(config.secret.as_ref(), &intro);
    let mut hello = intro;
    hello.extend_from_slice(&proof);
    let mut writer = &stream;
    writer.write_all(&hello).map_err(connect_error)?;
    let failure = |detail: String| Error::Handshake {
        peer,
        detail: format!("link {:?}: {detail}", own.name),
    };
    Hello::read_answer(&stream, own).map_err(failure)?;
    let mut stream = stream;
    connector.finish(&mut stream).map_err(failure)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::p2p::PeerLink;
    use crate::rendezvous::InMemoryStore;

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
    fn a_link_forms_only_between_holders_of_the_same_secret() {
        let store = InMemoryStore::new();
        let config = |token: &str| PeerLinkConfig {
            connect_timeout: Duration::from_secs(2),
            secret: Some(crate::LinkSecret::derive(token)),
            ..PeerLinkConfig::default()
        };
        let (job, other) = (config("cohort-job-a"), config("cohort-job-b"));
        std::thread::scope(|scope| {
            let higher = scope.spawn(|| PeerLink::connect(&store, "same", 1, 0, &job));
            PeerLink::connect(&store, "same", 0, 1, &job).unwrap();
            higher.join().unwrap().unwrap();
        });
        std::thread::scope(|scope| {
            let higher = scope.spawn(|| PeerLink::connect(&store, "mixed", 1, 0, &other));
            let lower = PeerLink::connect(&store, "mixed", 0, 1, &job).unwrap_err();
            assert!(lower.to_string().contains("secret"), "{lower}");
            let higher = higher.join().unwrap().unwrap_err();
            assert_eq!(higher.failed_rank(), Some(0));
        });
    }
}
