//! Forming the ring: publish this rank's address, read everyone else's, connect to the
//! successor and accept the predecessor, with a handshake that rejects stray connections and a
//! proof of the job's secret ([`crate::auth`]) in both directions.
//!
//! Every rank connects before it accepts (the connection completes in the listener's backlog),
//! so no rank waits on another's `accept`. Each rank then (1) sends its handshake and hello
//! proof to its successor, (2) accepts its predecessor and answers its proof, (3) checks its
//! successor's answer and confirms, (4) checks its predecessor's confirmation. Step 2 needs
//! only step 1 of the predecessor, step 3 only step 2 of the successor, step 4 only step 3 of
//! the predecessor: setup cannot deadlock.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use tracing::{debug, warn};

use super::TcpRingConfig;
use super::wire::{HANDSHAKE_ACCEPTED, HANDSHAKE_FIXED_BYTES, Handshake};
use crate::LinkSecret;
use crate::auth::{ANSWER_BYTES, Acceptor, Connector, HELLO_PROOF_BYTES};
use crate::error::{Error, Result};
use crate::rendezvous::{Store, address_key};

/// Longest a single candidate connection may take to send its handshake, so that a stray
/// connection that sends nothing cannot hold up the real predecessor for long.
const CANDIDATE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The two connections of a rank in the ring, blocking, with `TCP_NODELAY` set.
pub(crate) struct RingConnections {
    /// Connection accepted from rank `rank - 1`; data arrives on it.
    pub previous: TcpStream,
    /// Connection made to rank `rank + 1`; data leaves on it.
    pub next: TcpStream,
}

/// Publishes this rank's address, waits for all others, and connects the ring.
pub(crate) fn connect_ring(
    store: &dyn Store,
    prefix: &str,
    rank: usize,
    world_size: usize,
    config: &TcpRingConfig,
) -> Result<RingConnections> {
    let started = Instant::now();
    let deadline = started + config.connect_timeout;
    let listener = TcpListener::bind(config.listen_address).map_err(|source| Error::Listen {
        address: config.listen_address.to_string(),
        source,
    })?;
    let local_address = listener.local_addr().map_err(|source| Error::Io {
        context: "read the ring listener's address".to_owned(),
        source,
    })?;
    let advertised = advertised_address(local_address, config)?;
    store.set(
        &address_key(prefix, rank),
        advertised.to_string().as_bytes(),
    )?;
    debug!(prefix, rank, %advertised, "published ring address");

    let addresses = wait_for_addresses(store, prefix, world_size, config.connect_timeout)?;
    let next_rank = (rank + 1) % world_size;
    let previous_rank = (rank + world_size - 1) % world_size;
    let handshake = Handshake {
        prefix: prefix.to_owned(),
        rank: rank as u32,
        world_size: world_size as u32,
    };
    let secret = config.secret.as_ref();
    let (next, connector) = connect_to_next(
        addresses[next_rank],
        next_rank,
        &handshake,
        secret,
        deadline,
    )?;
    let (mut previous, acceptor) =
        accept_previous(listener, previous_rank, &handshake, secret, deadline)?;
    await_acceptance(&next, next_rank, connector, deadline)?;
    // The predecessor confirms once its successor (this rank) answered, which is done: only
    // its own steps remain, so the wait is bounded by the setup deadline, not by the
    // short timeout a stray candidate gets.
    previous
        .set_read_timeout(Some(remaining(deadline)))
        .map_err(|source| Error::Io {
            context: "configure the predecessor's connection".to_owned(),
            source,
        })?;
    acceptor
        .confirm(&mut previous)
        .map_err(|detail| Error::Handshake {
            peer: previous_rank,
            detail,
        })?;
    debug!(
        prefix,
        rank,
        world_size,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "ring connected"
    );
    Ok(RingConnections { previous, next })
}

/// Returns the address peers should connect to: the listener's, with the host replaced by
/// `config.advertise_host` when set.
fn advertised_address(local_address: SocketAddr, config: &TcpRingConfig) -> Result<SocketAddr> {
    match config.advertise_host {
        Some(host) => Ok(SocketAddr::new(host, local_address.port())),
        None if local_address.ip().is_unspecified() => Err(Error::InvalidArgument {
            field: "config.advertise_host",
            found: "none".to_owned(),
            expected: "an address peers can reach, since listen_address is unspecified",
        }),
        None => Ok(local_address),
    }
}

/// Waits until every rank has published its address and parses them all.
fn wait_for_addresses(
    store: &dyn Store,
    prefix: &str,
    world_size: usize,
    timeout: Duration,
) -> Result<Vec<SocketAddr>> {
    let keys: Vec<String> = (0..world_size)
        .map(|rank| address_key(prefix, rank))
        .collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let values = match store.wait(&key_refs, timeout) {
        Ok(values) => values,
        Err(Error::StoreTimeout { .. }) => {
            let mut missing_ranks = Vec::new();
            for (rank, key) in keys.iter().enumerate() {
                if store.get(key)?.is_none() {
                    missing_ranks.push(rank);
                }
            }
            return Err(Error::RanksMissing {
                prefix: prefix.to_owned(),
                missing_ranks,
                world_size,
                timeout,
            });
        }
        Err(other) => return Err(other),
    };
    values
        .iter()
        .enumerate()
        .map(|(peer, value)| {
            std::str::from_utf8(value)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or_else(|| Error::BadAddress {
                    prefix: prefix.to_owned(),
                    peer,
                    found: String::from_utf8_lossy(value).into_owned(),
                })
        })
        .collect()
}

/// Returns the time left before `deadline`, at least one millisecond (socket timeouts reject
/// zero).
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// Connects to the successor and sends the handshake and the hello proof.
fn connect_to_next(
    address: SocketAddr,
    next_rank: usize,
    handshake: &Handshake,
    secret: Option<&LinkSecret>,
    deadline: Instant,
) -> Result<(TcpStream, Connector)> {
    let connect_error = |source| Error::Connect {
        peer: next_rank,
        address: address.to_string(),
        source,
    };
    let mut stream =
        TcpStream::connect_timeout(&address, remaining(deadline)).map_err(connect_error)?;
    stream.set_nodelay(true).map_err(connect_error)?;
    stream
        .set_write_timeout(Some(remaining(deadline)))
        .map_err(connect_error)?;
    let intro = handshake.encode();
    let (connector, proof) = Connector::start(secret, &intro);
    let mut hello = intro;
    hello.extend_from_slice(&proof);
    stream.write_all(&hello).map_err(connect_error)?;
    Ok((stream, connector))
}

/// Accepts connections until one carries the predecessor's valid handshake and hello proof,
/// answers it, and returns it with the proof still to confirm. Other connections are logged
/// and closed.
fn accept_previous(
    listener: TcpListener,
    previous_rank: usize,
    own: &Handshake,
    secret: Option<&LinkSecret>,
    deadline: Instant,
) -> Result<(TcpStream, Acceptor)> {
    let poll_error = |source| Error::Io {
        context: "poll the ring listener".to_owned(),
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
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    warn!(%error, "accepting a ring connection failed");
                    break;
                }
            };
            let stream = TcpStream::from(stream);
            match check_candidate(&stream, previous_rank, own, secret, deadline) {
                Ok((acceptor, proof)) => {
                    let mut answer = Vec::with_capacity(1 + proof.len());
                    answer.push(HANDSHAKE_ACCEPTED);
                    answer.extend_from_slice(&proof);
                    let mut stream = stream;
                    stream
                        .write_all(&answer)
                        .map_err(|source| Error::Handshake {
                            peer: previous_rank,
                            detail: format!("answer the handshake: {source}"),
                        })?;
                    return Ok((stream, acceptor));
                }
                Err(reason) => {
                    warn!(
                        prefix = %own.prefix,
                        rank = own.rank,
                        %peer_address,
                        %reason,
                        "rejected a connection that is not the ring predecessor"
                    );
                    rejections.push(format!("{peer_address}: {reason}"));
                }
            }
        }
        let now = Instant::now();
        if now >= deadline {
            let mut detail = format!("rank {previous_rank} did not connect in time");
            if !rejections.is_empty() {
                detail.push_str(&format!("; rejected {}", rejections.join("; ")));
            }
            return Err(Error::Handshake {
                peer: previous_rank,
                detail,
            });
        }
        match poll.poll(&mut events, Some(deadline - now)) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => return Err(poll_error(source)),
        }
    }
}

/// Reads and checks a candidate's handshake and hello proof; returns the proof's acceptor and
/// answer, or why it is not the predecessor.
fn check_candidate(
    stream: &TcpStream,
    previous_rank: usize,
    own: &Handshake,
    secret: Option<&LinkSecret>,
    deadline: Instant,
) -> Result<(Acceptor, [u8; ANSWER_BYTES]), String> {
    let setup = || -> std::io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(remaining(deadline).min(CANDIDATE_HANDSHAKE_TIMEOUT)))?;
        stream.set_write_timeout(Some(remaining(deadline)))
    };
    setup().map_err(|error| format!("configure socket: {error}"))?;
    let mut reader = stream;
    let mut fixed = [0_u8; HANDSHAKE_FIXED_BYTES];
    reader
        .read_exact(&mut fixed)
        .map_err(|error| format!("read handshake: {error}"))?;
    let (mut handshake, prefix_bytes) = Handshake::decode_fixed(&fixed)?;
    let mut prefix = vec![0_u8; prefix_bytes];
    reader
        .read_exact(&mut prefix)
        .map_err(|error| format!("read handshake prefix: {error}"))?;
    handshake.prefix = String::from_utf8_lossy(&prefix).into_owned();
    if handshake.prefix != own.prefix {
        return Err(format!(
            "prefix {:?}, expected {:?}",
            handshake.prefix, own.prefix
        ));
    }
    if handshake.world_size != own.world_size {
        return Err(format!(
            "world size {}, expected {}",
            handshake.world_size, own.world_size
        ));
    }
    if handshake.rank as usize != previous_rank {
        return Err(format!("rank {}, expected {previous_rank}", handshake.rank));
    }
    let mut proof = [0_u8; HELLO_PROOF_BYTES];
    reader
        .read_exact(&mut proof)
        .map_err(|error| format!("read the proof of the job's secret: {error}"))?;
    Acceptor::answer(secret, &handshake.encode(), &proof)
}

/// Waits for the successor to accept this rank's handshake, checks its proof and confirms.
fn await_acceptance(
    next: &TcpStream,
    next_rank: usize,
    connector: Connector,
    deadline: Instant,
) -> Result<()> {
    let handshake_error = |detail: String| Error::Handshake {
        peer: next_rank,
        detail,
    };
    next.set_read_timeout(Some(remaining(deadline)))
        .map_err(|error| handshake_error(format!("configure socket: {error}")))?;
    let mut answer = [0_u8; 1];
    let mut reader = next;
    match reader.read(&mut answer) {
        Ok(1) if answer[0] == HANDSHAKE_ACCEPTED => {
            let mut stream = next;
            connector.finish(&mut stream).map_err(handshake_error)
        }
        Ok(1) => Err(handshake_error(format!(
            "expected acceptance byte {HANDSHAKE_ACCEPTED:#04x}, found {:#04x}",
            answer[0]
        ))),
        Ok(_) => Err(handshake_error(format!(
            "rank {next_rank} closed the connection without accepting it (it rejected the \
             handshake or failed)"
        ))),
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(handshake_error(format!(
                "rank {next_rank} did not accept the connection in time"
            )))
        }
        Err(error) => Err(handshake_error(format!("read acceptance: {error}"))),
    }
}
