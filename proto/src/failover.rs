//! Following the leader of a group of coordinators.
//!
//! A cluster whose state is in etcd can run two or three coordinators: one leads, the others
//! stand by and answer every call with [`standby_status`] (UNAVAILABLE, with the leader's
//! address, when they know it, in the [`STANDBY_HEADER`] metadata). Clients are given every
//! member (`--coordinator a,b,c`, [`parse_addresses`]) and talk through one [`Failover`]
//! channel, which sends each call to the member that answered last and moves on, replaying the
//! call, when that member is certainly not the one to ask:
//!
//! - it stands by: the call was not served; the next try goes to the leader it named, or the
//!   next member when it named none (an election is under way);
//! - the connection to it could not be made (refused, unreachable): the call was never sent.
//!
//! - the call only reads ([`READ_ONLY_METHODS`]) and failed in any way: replaying it changes
//!   nothing (a paused leader holds connections open without answering until the keep-alive
//!   gives up on it).
//!
//! Any other outcome is the call's: a member that fails a call that may change something and
//! may have been served (a broken connection, a timeout) is not asked again for this call,
//! since replaying it could apply it twice; the caller sees the error, and its next call goes
//! to the next member. Calls are
//! replayed whole, so every request message is buffered (coordinator requests are single
//! messages, bounded by [`crate::MAX_MESSAGE_BYTES`]).
//!
//! Waiting is bounded: a call gives up once [`FAILOVER_WAIT`] has passed, or once a whole round
//! of the members found none alive (every connection failed, nobody stands by), with the last
//! member's answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Bytes, GrpcMethod, Service, StdError, http};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use tonic::service::interceptor::InterceptedService;

use crate::transport::{CaCertificate, Credentials, TransportError, coordinator_endpoint};

/// A channel to whichever coordinator of a group leads, whose every request carries the
/// caller's token.
pub type CoordinatorConnection = InterceptedService<Failover, Credentials>;

/// Metadata a standing-by coordinator adds to its answer: the leader's address, or empty when
/// it knows of none.
pub const STANDBY_HEADER: &str = "cohort-standby";

/// Most coordinators one address list may name.
pub const MAX_COORDINATORS: usize = 16;

/// Longest a call waits for a leader while members stand by (an election takes the leader's
/// lease, a few seconds).
pub const FAILOVER_WAIT: Duration = Duration::from_secs(15);

/// First pause after a round of members without a leader; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(50);

/// Longest pause between two rounds.
const MAX_PAUSE: Duration = Duration::from_millis(500);

/// Most tries of one call, whatever the time: a bound on the loop besides [`FAILOVER_WAIT`].
const MAX_TRIES: usize = 1_000;

/// The coordinator methods that change nothing, which a failover may replay after any failure.
pub const READ_ONLY_METHODS: [&str; 9] = [
    "GetJob",
    "ListJobs",
    "WatchJob",
    "StreamLogs",
    "ListNodes",
    "ListUsers",
    "ListAudit",
    "Get",
    "Wait",
];

/// Whether the request is a call of one of [`READ_ONLY_METHODS`].
fn read_only(parts: &http::request::Parts) -> bool {
    parts
        .extensions
        .get::<GrpcMethod<'static>>()
        .is_some_and(|method| READ_ONLY_METHODS.contains(&method.method()))
}

/// Splits a comma-separated list of coordinator addresses (`host:port` or `https://host:port`),
/// trimming spaces and dropping repeats, or says what is wrong with it.
pub fn parse_addresses(list: &str) -> Result<Vec<String>, TransportError> {
    let failure = |reason: String| TransportError::Address {
        address: list.to_owned(),
        reason,
    };
    let mut addresses: Vec<String> = Vec::new();
    for address in list.split(',').map(str::trim) {
        if address.is_empty() {
            return Err(failure(
                "expected host:port addresses separated by commas, found an empty one".to_owned(),
            ));
        }
        if !addresses.iter().any(|known| known == address) {
            addresses.push(address.to_owned());
        }
    }
    if addresses.len() > MAX_COORDINATORS {
        return Err(failure(format!(
            "{} coordinators, expected at most {MAX_COORDINATORS}",
            addresses.len()
        )));
    }
    Ok(addresses)
}

/// The answer of a coordinator that stands by: UNAVAILABLE, naming the leader (`None`: no
/// leader is known, an election is under way) in the message and in [`STANDBY_HEADER`].
pub fn standby_status(leader: Option<&str>) -> Status {
    let message = match leader {
        Some(leader) => format!("this coordinator stands by; the leader is {leader}"),
        None => "this coordinator stands by and no leader is elected yet; try again in a few \
                 seconds"
            .to_owned(),
    };
    let mut status = Status::unavailable(message);
    let value = MetadataValue::try_from(leader.unwrap_or_default())
        .unwrap_or_else(|_| MetadataValue::from_static(""));
    status.metadata_mut().insert(STANDBY_HEADER, value);
    status
}

/// Whether `headers` are a standing-by coordinator's answer, and if so the leader it named.
fn standby_answer(headers: &http::HeaderMap) -> Option<Option<String>> {
    let value = headers.get(STANDBY_HEADER)?;
    Some(
        value
            .to_str()
            .ok()
            .filter(|leader| !leader.is_empty())
            .map(str::to_owned),
    )
}

/// Whether `error` says the connection could not be made, so the request was never sent.
fn never_connected(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
                    | std::io::ErrorKind::AddrNotAvailable
            )
        {
            return true;
        }
        if error.to_string().starts_with("tcp connect error") {
            return true;
        }
        cause = error.source();
    }
    false
}

/// One coordinator of the group.
struct Member {
    /// Its address as the client was given it.
    address: String,
    /// A channel to it (connected lazily, reconnecting by itself).
    channel: Channel,
}

/// A channel to whichever coordinator of a group leads (see the module doc). Clones share the
/// members and which one answered last.
#[derive(Clone)]
pub struct Failover {
    /// Every member, in the order given.
    members: Arc<[Member]>,
    /// The member to try first: the one that answered last.
    current: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Failover {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Failover")
            .field("addresses", &self.addresses())
            .field("current", &self.current_address())
            .finish()
    }
}

impl Failover {
    /// A failover channel over the coordinators of `list` (see [`parse_addresses`]), each
    /// reached through [`coordinator_endpoint`] with `ca` and then `configure`, connected on
    /// first use.
    pub fn lazy(
        list: &str,
        ca: Option<&CaCertificate>,
        configure: impl Fn(Endpoint) -> Endpoint,
    ) -> Result<Self, TransportError> {
        let members = parse_addresses(list)?
            .into_iter()
            .map(|address| {
                let channel = configure(coordinator_endpoint(&address, ca)?).connect_lazy();
                Ok((address, channel))
            })
            .collect::<Result<Vec<_>, TransportError>>()?;
        Ok(Self::over(members, 0))
    }

    /// A failover channel over `members` (address and channel), trying `first` first.
    pub fn over(members: Vec<(String, Channel)>, first: usize) -> Self {
        assert!(!members.is_empty(), "a failover channel needs a member");
        let first = first.min(members.len() - 1);
        Self {
            members: members
                .into_iter()
                .map(|(address, channel)| Member { address, channel })
                .collect(),
            current: Arc::new(AtomicUsize::new(first)),
        }
    }

    /// Every member's address, in the order given.
    pub fn addresses(&self) -> Vec<&str> {
        self.members
            .iter()
            .map(|member| member.address.as_str())
            .collect()
    }

    /// The address of the member the next call goes to first.
    pub fn current_address(&self) -> &str {
        &self.members[self.current()].address
    }

    fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.members.len()
    }

    /// The member after `index`, in a ring.
    fn after(&self, index: usize) -> usize {
        (index + 1) % self.members.len()
    }

    /// Makes the next call start at the member after `index`, unless another call already
    /// moved on from it.
    fn move_past(&self, index: usize) {
        let _ = self.current.compare_exchange(
            index,
            self.after(index),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Sends `request`, following standing-by members to the leader (see the module doc).
    ///
    /// Tries go in rounds: every member at most once per round, a named leader first unless it
    /// was tried already in this round, else the next member not tried. A round that ends
    /// without a leader pauses before the next; one in which nobody stood by ends the call.
    async fn send(self, request: http::Request<Body>) -> Result<http::Response<Body>, StdError> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await?.to_bytes();
        let started = tokio::time::Instant::now();
        let count = self.members.len();
        let mut index = self.current();
        let mut pause = FIRST_PAUSE;
        let mut tried = vec![false; count];
        // Whether some member of the current round stands by (a leader is being elected).
        let mut someone_stands_by = false;
        for _ in 0..MAX_TRIES {
            tried[index] = true;
            let mut channel = self.members[index].channel.clone();
            let outcome = async {
                std::future::poll_fn(|context| channel.poll_ready(context)).await?;
                channel.call(replay(&parts, body.clone())).await
            }
            .await;
            let named = match &outcome {
                Ok(response) => match standby_answer(response.headers()) {
                    None => {
                        self.current.store(index, Ordering::Relaxed);
                        return outcome.map_err(Into::into);
                    }
                    Some(leader) => {
                        someone_stands_by = true;
                        leader.and_then(|leader| {
                            self.members
                                .iter()
                                .position(|member| member.address == leader)
                        })
                    }
                },
                Err(error) if count > 1 && (never_connected(error) || read_only(&parts)) => None,
                Err(_) => {
                    if count > 1 {
                        self.move_past(index);
                    }
                    return outcome.map_err(Into::into);
                }
            };
            let untried = |from: usize| {
                (1..=count)
                    .map(|step| (from + step) % count)
                    .find(|&member| !tried[member])
            };
            let next = named
                .filter(|&leader| !tried[leader])
                .or_else(|| untried(index));
            index = match next {
                Some(next) => next,
                None => {
                    // A round without a leader.
                    if !someone_stands_by || started.elapsed() >= FAILOVER_WAIT {
                        self.move_past(index);
                        return outcome.map_err(Into::into);
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_PAUSE);
                    tried.fill(false);
                    someone_stands_by = false;
                    named.unwrap_or_else(|| self.after(index))
                }
            };
        }
        Err(format!(
            "no coordinator of {} answered as the leader after {MAX_TRIES} tries",
            self.addresses().join(",")
        )
        .into())
    }
}

/// A copy of a buffered request, to send (again).
fn replay(parts: &http::request::Parts, body: Bytes) -> http::Request<Body> {
    let mut request = http::Request::new(Body::new(Full::new(body)));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    *request.extensions_mut() = parts.extensions.clone();
    request
}

impl Service<http::Request<Body>> for Failover {
    type Response = http::Response<Body>;
    type Error = StdError;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // Each call readies the member it goes to.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(self.clone().send(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_list_is_split_trimmed_and_deduplicated() {
        assert_eq!(
            parse_addresses("a:1, b:2,a:1 ,https://c:3").unwrap(),
            ["a:1", "b:2", "https://c:3"]
        );
        assert_eq!(parse_addresses("a:1").unwrap(), ["a:1"]);
        for bad in ["", "a:1,", ",a:1", "a:1,,b:2"] {
            let error = parse_addresses(bad).unwrap_err().to_string();
            assert!(error.contains("empty one"), "{bad:?}: {error}");
        }
        let many = (0..=MAX_COORDINATORS)
            .map(|port| format!("h:{}", port + 1))
            .collect::<Vec<_>>()
            .join(",");
        let error = parse_addresses(&many).unwrap_err().to_string();
        assert!(error.contains("at most 16"), "{error}");
    }

    #[test]
    fn a_standby_answer_names_the_leader_in_its_metadata_and_message() {
        let status = standby_status(Some("10.0.0.2:7077"));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("10.0.0.2:7077"));
        let response: http::Response<Body> = status.into_http();
        assert_eq!(
            standby_answer(response.headers()),
            Some(Some("10.0.0.2:7077".to_owned()))
        );
        let response: http::Response<Body> = standby_status(None).into_http();
        assert_eq!(standby_answer(response.headers()), Some(None));
        let response: http::Response<Body> = Status::unavailable("down").into_http();
        assert_eq!(standby_answer(response.headers()), None);
    }

    #[test]
    fn a_refused_connection_counts_as_never_sent_and_a_reset_does_not() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let wrapped: StdError = Box::new(refused);
        assert!(never_connected(wrapped.as_ref()));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(!never_connected(&reset));
    }
}
