//! What a rank's communication is doing, for hang diagnosis.
//!
//! A rank holds one [`Progress`]; each communicator it joins (a ring, a pipeline link, a
//! parameter-server client) takes a [`Channel`] of it, named after the communicator, and runs
//! every operation through [`Channel::run`], which numbers the operations of that channel from
//! 1 and records which one the rank entered last and which one it completed last. Nothing goes
//! over the network per operation: the rank's metrics reporter sends a [`Progress::snapshot`]
//! every few seconds, and the coordinator compares the ranks' snapshots (the ranks of a
//! collective run the same numbered operations, so a rank still at #49 while its peers sit in
//! #50 never entered it). Recording costs one uncontended lock per operation.
//!
//! [`Fault`] makes a chosen rank hang before, or inside, operation #N of its channels: fault
//! injection for tests, configured by `cohort rank` from its environment.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Most channels one rank records; later ones are not recorded (a rank joins a handful).
pub const MAX_CHANNELS: usize = 32;

/// How long an injected hang lasts: long past any hang timeout, bounded so that a forgotten
/// process still ends.
const INJECTED_HANG: Duration = Duration::from_secs(3600);

/// One rank's record of its communication. Clones share the record.
#[derive(Clone, Default)]
pub struct Progress {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    channels: Mutex<Vec<Arc<Slot>>>,
    fault: Option<Fault>,
    /// Whether nothing is recorded (benchmarks that measure what recording costs).
    disabled: bool,
}

/// One channel's record.
struct Slot {
    name: String,
    members: usize,
    state: Mutex<OperationState>,
}

/// The last operation a channel entered.
#[derive(Debug, Clone, Copy, Default)]
struct OperationState {
    entered: u64,
    completed: u64,
    operation: &'static str,
    bytes: u64,
    peer: Option<u32>,
    since_unix_ms: i64,
    /// When the operation in flight was entered.
    entered_at: Option<Instant>,
    /// Bytes of the completed operations, and the time they took, in all.
    bytes_total: u64,
    busy: Duration,
}

/// A channel's state as [`Progress::snapshot`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelProgress {
    /// The communicator's name (its rendezvous key prefix): the same on every member.
    pub channel: String,
    /// Number of the last operation entered, from 1; 0 before the first.
    pub entered: u64,
    /// Number of the last operation completed; below `entered` while one is in flight.
    pub completed: u64,
    /// Name of the last operation entered (`all_reduce`, `send`, `push`...).
    pub operation: &'static str,
    /// Bytes the last operation moves from this rank's side.
    pub bytes: u64,
    /// The rank at the other end, for point-to-point operations.
    pub peer: Option<u32>,
    /// When the last operation was entered (or completed, once it completed), Unix ms.
    pub since_unix_ms: i64,
    /// Ranks in the communicator (2 for a point-to-point link, 1 for a client of servers).
    pub members: usize,
    /// Bytes moved by the completed operations, in all.
    pub bytes_total: u64,
    /// Time the completed operations took, from entered to completed, in all.
    pub busy: Duration,
}

impl ChannelProgress {
    /// The bus bandwidth of a collective channel's operations between `earlier` and this
    /// snapshot, in bytes per second: the bytes of a ring all-reduce cross every link
    /// `2 (n - 1) / n` times (NCCL's definition, so that figures compare across group sizes).
    /// `None` when no operation completed in between or the channel is not a group.
    pub fn bus_bandwidth_since(&self, earlier: &ChannelProgress) -> Option<f64> {
        let busy = self.busy.checked_sub(earlier.busy)?.as_secs_f64();
        let bytes = self.bytes_total.checked_sub(earlier.bytes_total)?;
        if self.members < 2 || busy <= 0.0 || bytes == 0 {
            return None;
        }
        let members = self.members as f64;
        Some(bytes as f64 / busy * 2.0 * (members - 1.0) / members)
    }

    /// The mean time of the operations completed between `earlier` and this snapshot.
    pub fn mean_latency_since(&self, earlier: &ChannelProgress) -> Option<Duration> {
        let busy = self.busy.checked_sub(earlier.busy)?;
        let operations = self.completed.checked_sub(earlier.completed)?;
        (operations > 0).then(|| busy / operations as u32)
    }
}

impl ChannelProgress {
    /// Whether an operation is in flight.
    pub fn in_flight(&self) -> bool {
        self.completed < self.entered
    }
}

/// An injected hang (tests only): this rank stops at operation `number` of any of its
/// channels, either before entering it or after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The operation's number, from 1.
    pub number: u64,
    /// Whether the rank enters the operation first (and then stops reading and writing).
    pub inside: bool,
}

impl Fault {
    /// Reads `RANK:before:N` or `RANK:in:N` as the fault of rank `rank` (`None` when it names
    /// another rank).
    pub fn parse(text: &str, rank: usize) -> Result<Option<Fault>, String> {
        let expected = || format!("{text:?}, expected RANK:before:N or RANK:in:N (N from 1)");
        let mut parts = text.trim().split(':');
        let (Some(target), Some(place), Some(number), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(expected());
        };
        let target: usize = target.parse().map_err(|_| expected())?;
        let number: u64 = number.parse().map_err(|_| expected())?;
        let inside = match place {
            "before" => false,
            "in" => true,
            _ => return Err(expected()),
        };
        if number == 0 {
            return Err(expected());
        }
        Ok((target == rank).then_some(Fault { number, inside }))
    }
}

impl Progress {
    /// A record for a rank that hangs as `fault` says (`None`: never).
    pub fn with_fault(fault: Option<Fault>) -> Self {
        Self {
            shared: Arc::new(Shared {
                channels: Mutex::default(),
                fault,
                disabled: false,
            }),
        }
    }

    /// A record that records nothing: its channels do not count their operations (what
    /// `cohort bench train --telemetry off` compares with).
    pub fn disabled() -> Self {
        Self {
            shared: Arc::new(Shared {
                channels: Mutex::default(),
                fault: None,
                disabled: true,
            }),
        }
    }

    /// Starts recording a channel named `name` (a communicator's rendezvous key prefix) of
    /// `members` ranks.
    pub fn channel(&self, name: &str, members: usize) -> Channel {
        if self.shared.disabled {
            return Channel {
                slot: None,
                fault: None,
            };
        }
        let slot = Arc::new(Slot {
            name: name.to_owned(),
            members,
            state: Mutex::default(),
        });
        let mut channels = lock(&self.shared.channels);
        if channels.len() < MAX_CHANNELS {
            channels.push(Arc::clone(&slot));
        }
        Channel {
            slot: Some(slot),
            fault: self.shared.fault,
        }
    }

    /// Every channel's state, in the order they were opened.
    pub fn snapshot(&self) -> Vec<ChannelProgress> {
        lock(&self.shared.channels)
            .iter()
            .map(|slot| {
                let state = *lock(&slot.state);
                ChannelProgress {
                    channel: slot.name.clone(),
                    entered: state.entered,
                    completed: state.completed,
                    operation: state.operation,
                    bytes: state.bytes,
                    peer: state.peer,
                    since_unix_ms: state.since_unix_ms,
                    members: slot.members,
                    bytes_total: state.bytes_total,
                    busy: state.busy,
                }
            })
            .collect()
    }
}

impl fmt::Debug for Progress {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Progress")
            .field("channels", &lock(&self.shared.channels).len())
            .field("fault", &self.shared.fault)
            .finish()
    }
}

/// Two handles are equal when they share one record.
impl PartialEq for Progress {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl Eq for Progress {}

/// One communicator's numbered operations.
pub struct Channel {
    /// `None` for a channel of a disabled record.
    slot: Option<Arc<Slot>>,
    fault: Option<Fault>,
}

impl Channel {
    /// Runs `body` as the channel's next operation, `operation` moving `bytes` (with `peer`,
    /// for point-to-point operations): recorded as entered before and completed after it,
    /// unless it fails (the communicator is then unusable, and the operation stays in flight).
    pub fn run<T, E>(
        &self,
        operation: &'static str,
        bytes: usize,
        peer: Option<usize>,
        body: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let entered = self.enter(operation, bytes, peer);
        let result = body();
        self.complete(entered, &result);
        result
    }

    /// Records the start of the channel's next operation (what [`Channel::run`] does before
    /// its body, for callers whose body borrows what holds the channel); pass the result to
    /// [`Channel::complete`].
    pub fn enter(&self, operation: &'static str, bytes: usize, peer: Option<usize>) -> Entered {
        let Some(slot) = &self.slot else {
            return Entered(0);
        };
        let mut state = lock(&slot.state);
        let number = state.entered + 1;
        let fault = self.fault.filter(|fault| fault.number == number);
        if fault.is_some_and(|fault| !fault.inside) {
            drop(state);
            hang(&slot.name, number);
            state = lock(&slot.state);
        }
        {
            *state = OperationState {
                entered: number,
                completed: state.completed,
                operation,
                bytes: bytes as u64,
                peer: peer.map(|peer| peer as u32),
                since_unix_ms: now_unix_ms(),
                entered_at: Some(Instant::now()),
                bytes_total: state.bytes_total,
                busy: state.busy,
            };
        }
        drop(state);
        if fault.is_some() {
            hang(&slot.name, number);
        }
        Entered(number)
    }

    /// Records the end of operation `entered`: completed when `result` is a success.
    pub fn complete<T, E>(&self, entered: Entered, result: &Result<T, E>) {
        if result.is_ok() {
            self.finish(entered);
        }
    }

    /// Records that operation `entered` completed (for operations that complete after the
    /// call that queued them returned, such as NCCL's).
    pub fn finish(&self, entered: Entered) {
        let Some(slot) = &self.slot else {
            return;
        };
        let mut state = lock(&slot.state);
        if entered.0 <= state.completed {
            return;
        }
        state.completed = entered.0;
        state.since_unix_ms = now_unix_ms();
        if entered.0 == state.entered
            && let Some(started) = state.entered_at.take()
        {
            state.busy += started.elapsed();
            state.bytes_total += state.bytes;
        }
    }
}

/// An operation [`Channel::enter`] recorded, to be passed to [`Channel::complete`].
#[derive(Debug)]
#[must_use = "pass it to Channel::complete"]
pub struct Entered(u64);

/// The injected hang of operation `number` of channel `name`.
fn hang(name: &str, number: u64) {
    tracing::warn!(
        channel = name,
        operation = number,
        "injected fault: hanging at this operation"
    );
    std::thread::sleep(INJECTED_HANG);
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The state is plain data, consistent after every assignment.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_numbered_per_channel_and_failures_stay_in_flight() {
        let progress = Progress::default();
        let ring = progress.channel("ring", 4);
        let link = progress.channel("link", 2);
        for _ in 0..3 {
            ring.run("all_reduce", 64, None, || Ok::<_, ()>(()))
                .unwrap();
        }
        link.run("send", 8, Some(3), || Ok::<_, ()>(())).unwrap();
        ring.run("broadcast", 16, None, || Err::<(), _>("peer gone"))
            .unwrap_err();
        let snapshot = progress.snapshot();
        assert_eq!(snapshot.len(), 2);
        let ring = &snapshot[0];
        assert_eq!(
            (ring.channel.as_str(), ring.entered, ring.completed),
            ("ring", 4, 3)
        );
        assert_eq!(
            (ring.operation, ring.bytes, ring.peer),
            ("broadcast", 16, None)
        );
        assert!(ring.in_flight());
        let link = &snapshot[1];
        assert_eq!((link.entered, link.completed, link.peer), (1, 1, Some(3)));
        assert!(!link.in_flight());
        assert!(link.since_unix_ms > 0);
    }

    #[test]
    fn completed_operations_give_bus_bandwidth_and_latency() {
        let progress = Progress::default();
        let ring = progress.channel("ring", 4);
        let before = progress.snapshot()[0].clone();
        for _ in 0..2 {
            ring.run("all_reduce", 1 << 20, None, || {
                std::thread::sleep(Duration::from_millis(5));
                Ok::<_, ()>(())
            })
            .unwrap();
        }
        let after = &progress.snapshot()[0];
        assert_eq!(after.bytes_total, 2 << 20);
        assert!(after.busy >= Duration::from_millis(10), "{after:?}");
        // 2 MiB in at least 10 ms, times 2 (4 - 1) / 4.
        let bandwidth = after.bus_bandwidth_since(&before).unwrap();
        assert!(
            bandwidth > 0.0 && bandwidth <= 1.5 * (2 << 20) as f64 / 0.010,
            "{bandwidth}"
        );
        let latency = after.mean_latency_since(&before).unwrap();
        assert!(latency >= Duration::from_millis(5), "{latency:?}");
        assert_eq!(
            after.bus_bandwidth_since(after),
            None,
            "nothing completed in between"
        );
        let client = progress.channel("servers", 1);
        client
            .run("push_pull", 8, None, || Ok::<_, ()>(()))
            .unwrap();
        let servers = &progress.snapshot()[1];
        assert_eq!(servers.bus_bandwidth_since(&before), None, "not a group");
    }

    #[test]
    fn a_disabled_record_records_nothing() {
        let progress = Progress::disabled();
        let ring = progress.channel("ring", 2);
        ring.run("all_reduce", 8, None, || Ok::<_, ()>(())).unwrap();
        assert!(progress.snapshot().is_empty());
    }

    #[test]
    fn channels_past_the_bound_are_not_recorded() {
        let progress = Progress::default();
        let channels: Vec<_> = (0..MAX_CHANNELS + 5)
            .map(|index| progress.channel(&format!("c{index}"), 2))
            .collect();
        assert_eq!(channels.len(), MAX_CHANNELS + 5);
        assert_eq!(progress.snapshot().len(), MAX_CHANNELS);
    }

    #[test]
    fn faults_name_a_rank_a_place_and_an_operation() {
        assert_eq!(
            Fault::parse("2:before:50", 2),
            Ok(Some(Fault {
                number: 50,
                inside: false
            }))
        );
        assert_eq!(
            Fault::parse("2:in:7", 2),
            Ok(Some(Fault {
                number: 7,
                inside: true
            }))
        );
        assert_eq!(Fault::parse("2:in:7", 1), Ok(None));
        for bad in [
            "",
            "2",
            "2:before",
            "x:in:1",
            "2:after:3",
            "2:in:0",
            "2:in:1:1",
        ] {
            let error = Fault::parse(bad, 2).unwrap_err();
            assert!(error.contains("expected RANK:before:N"), "{bad}: {error}");
        }
    }

    #[test]
    fn a_rank_hangs_before_the_named_operation_and_its_snapshot_shows_where() {
        let progress = Progress::with_fault(Some(Fault {
            number: 3,
            inside: true,
        }));
        let ring = progress.channel("ring", 4);
        let watcher = progress.clone();
        // The hang lasts an hour: run it on a thread the test leaves behind, and poll the
        // snapshot until the rank sits inside operation 3.
        std::thread::spawn(move || {
            for _ in 0..3 {
                ring.run("all_reduce", 4, None, || Ok::<_, ()>(())).unwrap();
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let snapshot = watcher.snapshot();
            if snapshot[0].entered == 3 {
                assert_eq!(snapshot[0].completed, 2);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{snapshot:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
