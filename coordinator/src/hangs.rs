//! Hang diagnosis: which ranks hold up a job whose communication stopped.
//!
//! Every training rank numbers the operations of each of its communicators from 1 (the members
//! of a collective run the same numbered operations) and reports, with its metrics and every
//! few seconds even when no step completes, the last operation each communicator entered and
//! the last it completed. [`CommunicationWatch`] keeps the latest report of each rank of the
//! running attempt and when any of them last moved, on the coordinator's clock. Once an
//! operation is in flight and nothing has moved for the job's hang timeout, [`diagnose`]
//! names, per communicator, the operation the ranks wait in (the highest one entered and not
//! completed), the ranks that never entered it (missing) and those that entered it and are
//! stuck there, and the ranks that are in no communication at all. Pure: the cluster feeds it
//! reports and the time, and acts on what it returns.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::model::UnixMillis;

/// Most communicators one rank's report may hold.
pub const MAX_CHANNELS: usize = 32;
/// Longest communicator or operation name, in bytes.
pub const MAX_CHANNEL_NAME_BYTES: usize = 256;
/// Ranks named one by one in a description; the rest are counted.
const NAMED_RANKS: usize = 8;

/// One communicator of a rank, as its last report gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelState {
    /// The communicator's name, the same on every member.
    pub channel: String,
    /// Number of the last operation entered (from 1; 0 before the first).
    pub entered: u64,
    /// Number of the last operation completed.
    pub completed: u64,
    /// Name of the last operation entered.
    pub operation: String,
    /// Bytes it moves from this rank's side.
    pub bytes: u64,
    /// The rank at the other end, for point-to-point operations.
    pub peer: Option<u32>,
    /// When it was entered (or completed), on the rank's clock, Unix ms.
    pub since_ms: UnixMillis,
}

impl ChannelState {
    fn in_flight(&self) -> bool {
        self.completed < self.entered
    }
}

/// What the coordinator knows of one attempt's communication.
#[derive(Debug, Clone, Default)]
pub struct CommunicationWatch {
    /// The attempt the reports belong to.
    attempt: u32,
    /// Each rank's last report and when it arrived.
    ranks: BTreeMap<u32, (Vec<ChannelState>, UnixMillis)>,
    /// When any rank's operations last moved (an operation entered or completed).
    last_progress_ms: Option<UnixMillis>,
}

impl CommunicationWatch {
    /// Takes rank `rank`'s report of `channels` for `attempt`, arriving at `now` (a report of a
    /// newer attempt starts the watch over; one of an older attempt is ignored).
    pub fn observe(
        &mut self,
        attempt: u32,
        rank: u32,
        channels: Vec<ChannelState>,
        now: UnixMillis,
    ) {
        if attempt < self.attempt {
            return;
        }
        if attempt > self.attempt {
            *self = CommunicationWatch {
                attempt,
                ..CommunicationWatch::default()
            };
        }
        let moved = match self.ranks.get(&rank) {
            None => true,
            Some((previous, _)) => {
                previous.len() != channels.len()
                    || previous.iter().zip(&channels).any(|(before, now)| {
                        (&before.channel, before.entered, before.completed)
                            != (&now.channel, now.entered, now.completed)
                    })
            }
        };
        if moved || self.last_progress_ms.is_none() {
            self.last_progress_ms = Some(now);
        }
        self.ranks.insert(rank, (channels, now));
    }

    /// How long attempt `attempt`'s communication has been stalled at `now`: the time since
    /// anything last moved, while some operation is in flight; `None` when nothing waits (or
    /// nothing of that attempt was heard yet).
    pub fn stalled_ms(&self, attempt: u32, now: UnixMillis) -> Option<u64> {
        if attempt != self.attempt {
            return None;
        }
        let waiting = self
            .ranks
            .values()
            .any(|(channels, _)| channels.iter().any(ChannelState::in_flight));
        let last = self.last_progress_ms?;
        waiting.then(|| now.saturating_sub(last).max(0) as u64)
    }
}

/// A job whose communication stalled, and who holds it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hang {
    /// How long nothing has moved.
    pub stalled_ms: u64,
    /// Each communicator with an operation in flight.
    pub channels: Vec<StalledChannel>,
    /// Ranks in no communication (they reported, and have nothing in flight nor missed an
    /// operation above): computing, or hung outside the communicators.
    pub idle: Vec<u32>,
    /// Ranks of the attempt never heard from.
    pub silent: Vec<u32>,
}

/// One communicator's stalled operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StalledChannel {
    /// The communicator.
    pub channel: String,
    /// The operation waited in: the highest number entered and not completed.
    pub number: u64,
    /// Its name, as the ranks inside it gave it.
    pub operation: String,
    /// Its size, as the ranks inside it gave it.
    pub bytes: u64,
    /// Members that never entered it, with the last operation they completed.
    pub missing: Vec<(u32, u64)>,
    /// Members inside it, with the peer they wait on (point-to-point operations).
    pub stuck: Vec<(u32, Option<u32>)>,
    /// How long the first of them has been inside it, by their clocks.
    pub waited_ms: u64,
}

/// Diagnoses attempt `attempt` at `now`: a [`Hang`] when an operation is in flight and nothing
/// has moved for `timeout_ms`, naming who holds it up; `None` otherwise, and while the watch
/// has heard nothing of that attempt yet. `ranks` are the attempt's training ranks (those that
/// report).
pub fn diagnose(
    watch: &CommunicationWatch,
    attempt: u32,
    now: UnixMillis,
    timeout_ms: u64,
    ranks: u32,
) -> Option<Hang> {
    let stalled_ms = watch.stalled_ms(attempt, now)?;
    if timeout_ms == 0 || stalled_ms < timeout_ms {
        return None;
    }
    let mut members: BTreeMap<&str, Vec<(u32, &ChannelState)>> = BTreeMap::new();
    for (&rank, (channels, _)) in &watch.ranks {
        for channel in channels {
            members
                .entry(channel.channel.as_str())
                .or_default()
                .push((rank, channel));
        }
    }
    let mut stalled = Vec::new();
    for (name, members) in members {
        let Some(&(_, waited)) = members
            .iter()
            .filter(|(_, channel)| channel.in_flight())
            .max_by_key(|(_, channel)| channel.entered)
        else {
            continue;
        };
        let number = waited.entered;
        let entered_at = members
            .iter()
            .filter(|(_, channel)| channel.entered >= number && channel.completed < number)
            .map(|(_, channel)| channel.since_ms)
            .min()
            .unwrap_or(now);
        stalled.push(StalledChannel {
            waited_ms: now.saturating_sub(entered_at).max(0) as u64,
            channel: name.to_owned(),
            number,
            operation: waited.operation.clone(),
            bytes: waited.bytes,
            missing: members
                .iter()
                .filter(|(_, channel)| channel.entered < number)
                .map(|&(rank, channel)| (rank, channel.completed))
                .collect(),
            stuck: members
                .iter()
                .filter(|(_, channel)| channel.entered >= number && channel.completed < number)
                .map(|&(rank, channel)| (rank, channel.peer))
                .collect(),
        });
    }
    let named = |rank: u32| {
        stalled.iter().any(|channel| {
            channel.missing.iter().any(|&(missing, _)| missing == rank)
                || channel.stuck.iter().any(|&(stuck, _)| stuck == rank)
        })
    };
    let idle = watch
        .ranks
        .keys()
        .copied()
        .filter(|&rank| !named(rank))
        .collect();
    let silent = (0..ranks)
        .filter(|rank| !watch.ranks.contains_key(rank))
        .collect();
    Some(Hang {
        stalled_ms,
        channels: stalled,
        idle,
        silent,
    })
}

impl Hang {
    /// One paragraph for the job's reason and `cohort status`: for each stalled communicator,
    /// who never entered the operation and who is stuck in it; `place` describes a rank (its
    /// node and pid).
    pub fn describe(&self, place: impl Fn(u32) -> String) -> String {
        let mut text = format!(
            "communication hang: nothing moved for {:.0} s",
            self.stalled_ms as f64 / 1000.0
        );
        for channel in &self.channels {
            let _ = write!(
                text,
                "; {} #{} on {} ({})",
                channel.operation,
                channel.number,
                channel.channel,
                bytes(channel.bytes)
            );
            if !channel.missing.is_empty() {
                let ranks = channel.missing.iter().map(|&(rank, completed)| {
                    format!("rank {rank} ({}, last completed #{completed})", place(rank))
                });
                let _ = write!(text, ": never entered by {}", listed(ranks));
            }
            if !channel.stuck.is_empty() {
                let ranks = channel.stuck.iter().map(|&(rank, peer)| match peer {
                    Some(peer) => format!("rank {rank} ({}, waiting on rank {peer})", place(rank)),
                    None => format!("rank {rank} ({})", place(rank)),
                });
                let verb = if channel.missing.is_empty() {
                    ": entered by every member and stuck in"
                } else {
                    "; entered and stuck in"
                };
                let _ = write!(
                    text,
                    "{verb} {} (for {:.1} s)",
                    listed(ranks),
                    channel.waited_ms as f64 / 1000.0
                );
            }
        }
        if !self.idle.is_empty() {
            let ranks = self
                .idle
                .iter()
                .map(|&rank| format!("rank {rank} ({})", place(rank)));
            let _ = write!(text, "; in no communication: {}", listed(ranks));
        }
        if !self.silent.is_empty() {
            let ranks = self
                .silent
                .iter()
                .map(|&rank| format!("rank {rank} ({})", place(rank)));
            let _ = write!(text, "; never reported: {}", listed(ranks));
        }
        text
    }

    /// The rank to blame, for the restart's back-off: the first that never entered a stalled
    /// operation, else the first silent one; `None` when every rank entered (no one to pick).
    pub fn blamed_rank(&self) -> Option<u32> {
        self.channels
            .iter()
            .flat_map(|channel| channel.missing.iter().map(|&(rank, _)| rank))
            .chain(self.silent.iter().copied())
            .min()
    }
}

/// `items` joined by commas, at most [`NAMED_RANKS`] of them, then how many more.
fn listed(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    let mut text = items
        .iter()
        .take(NAMED_RANKS)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > NAMED_RANKS {
        let _ = write!(text, " and {} more", items.len() - NAMED_RANKS);
    }
    text
}

/// A byte count for people (`64.0 MiB`).
fn bytes(count: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = count as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{count} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(name: &str, entered: u64, completed: u64, operation: &str) -> ChannelState {
        ChannelState {
            channel: name.to_owned(),
            entered,
            completed,
            operation: operation.to_owned(),
            bytes: 4 << 20,
            peer: None,
            since_ms: 0,
        }
    }

    fn place(rank: u32) -> String {
        format!("node n{rank}, pid {}", 100 + rank)
    }

    /// Four ranks of a ring; rank 2 never enters all-reduce #50, the others sit in it.
    fn ring_with_a_missing_rank(now: UnixMillis) -> CommunicationWatch {
        let mut watch = CommunicationWatch::default();
        for rank in 0..4 {
            watch.observe(
                0,
                rank,
                vec![channel("data-parallel", 49, 49, "all_reduce")],
                0,
            );
        }
        for rank in [0, 1, 3] {
            watch.observe(
                0,
                rank,
                vec![channel("data-parallel", 50, 49, "all_reduce")],
                now,
            );
        }
        watch
    }

    #[test]
    fn a_rank_that_never_entered_is_missing_and_the_others_are_stuck() {
        let watch = ring_with_a_missing_rank(1_000);
        assert_eq!(diagnose(&watch, 0, 60_999, 60_000, 4), None);
        let hang = diagnose(&watch, 0, 61_000, 60_000, 4).unwrap();
        assert_eq!(hang.stalled_ms, 60_000);
        assert_eq!(
            hang.channels,
            vec![StalledChannel {
                channel: "data-parallel".to_owned(),
                number: 50,
                operation: "all_reduce".to_owned(),
                bytes: 4 << 20,
                missing: vec![(2, 49)],
                stuck: vec![(0, None), (1, None), (3, None)],
                waited_ms: 61_000,
            }]
        );
        assert!(hang.idle.is_empty() && hang.silent.is_empty());
        assert_eq!(hang.blamed_rank(), Some(2));
        let text = hang.describe(place);
        assert_eq!(
            text,
            "communication hang: nothing moved for 60 s; all_reduce #50 on data-parallel \
             (4.0 MiB): never entered by rank 2 (node n2, pid 102, last completed #49); entered \
             and stuck in rank 0 (node n0, pid 100), rank 1 (node n1, pid 101), rank 3 (node \
             n3, pid 103) (for 61.0 s)"
        );
    }

    #[test]
    fn a_rank_that_entered_and_stalls_is_stuck_not_missing() {
        let mut watch = CommunicationWatch::default();
        for rank in 0..4 {
            watch.observe(3, rank, vec![channel("ring", 50, 49, "all_reduce")], 500);
        }
        assert_eq!(diagnose(&watch, 2, 10_500, 10_000, 4), None);
        let hang = diagnose(&watch, 3, 10_500, 10_000, 4).unwrap();
        assert_eq!(hang.channels[0].missing, vec![]);
        assert_eq!(hang.channels[0].stuck.len(), 4);
        assert_eq!(hang.blamed_rank(), None);
        assert!(
            hang.describe(place)
                .contains("entered by every member and stuck in rank 0"),
            "{}",
            hang.describe(place)
        );
    }

    #[test]
    fn progress_resets_the_clock_and_a_quiet_job_is_no_hang() {
        let mut watch = ring_with_a_missing_rank(1_000);
        // Rank 2 finally enters: the ranks moved.
        watch.observe(
            0,
            2,
            vec![channel("data-parallel", 50, 49, "all_reduce")],
            50_000,
        );
        assert_eq!(diagnose(&watch, 0, 100_000, 60_000, 4), None);
        assert!(diagnose(&watch, 0, 110_000, 60_000, 4).is_some());
        // Reports that repeat the same position do not count as progress.
        for rank in 0..4 {
            watch.observe(
                0,
                rank,
                vec![channel("data-parallel", 50, 49, "all_reduce")],
                109_000,
            );
        }
        assert!(diagnose(&watch, 0, 110_000, 60_000, 4).is_some());
        // Nothing in flight: computing for a long time is not a communication hang.
        let mut quiet = CommunicationWatch::default();
        for rank in 0..4 {
            quiet.observe(0, rank, vec![channel("ring", 7, 7, "barrier")], 0);
        }
        assert_eq!(quiet.stalled_ms(0, 1_000_000), None);
        assert_eq!(diagnose(&quiet, 0, 1_000_000, 60_000, 4), None);
        // A timeout of 0 turns diagnosis off.
        let watch = ring_with_a_missing_rank(1_000);
        assert_eq!(diagnose(&watch, 0, 1_000_000, 0, 4), None);
    }

    #[test]
    fn a_new_attempt_starts_over_and_an_old_one_is_ignored() {
        let mut watch = ring_with_a_missing_rank(1_000);
        watch.observe(
            1,
            0,
            vec![channel("data-parallel", 1, 0, "broadcast")],
            70_000,
        );
        // Until the new attempt reports, the old one's stall is no hang of it.
        let fresh = ring_with_a_missing_rank(1_000);
        assert_eq!(diagnose(&fresh, 1, 130_000, 60_000, 2), None);
        let hang = diagnose(&watch, 1, 130_000, 60_000, 2).unwrap();
        assert_eq!(hang.channels[0].stuck, vec![(0, None)]);
        assert_eq!(hang.silent, vec![1]);
        watch.observe(
            0,
            1,
            vec![channel("data-parallel", 99, 99, "all_reduce")],
            71_000,
        );
        assert_eq!(
            diagnose(&watch, 1, 130_000, 60_000, 2).unwrap().silent,
            vec![1]
        );
    }

    #[test]
    fn point_to_point_and_idle_ranks_are_told_apart() {
        let mut watch = CommunicationWatch::default();
        let mut receive = channel("pipe/s1", 8, 7, "receive");
        receive.peer = Some(2);
        watch.observe(0, 3, vec![receive], 0);
        watch.observe(0, 2, vec![channel("pipe/s1", 7, 7, "send")], 0);
        watch.observe(0, 0, vec![channel("pipe/s0", 9, 9, "send")], 0);
        let hang = diagnose(&watch, 0, 5_000, 5_000, 5).unwrap();
        assert_eq!(hang.channels.len(), 1);
        assert_eq!(hang.channels[0].missing, vec![(2, 7)]);
        assert_eq!(hang.channels[0].stuck, vec![(3, Some(2))]);
        assert_eq!(hang.idle, vec![0]);
        assert_eq!(hang.silent, vec![1, 4]);
        let text = hang.describe(place);
        assert!(
            text.contains("rank 3 (node n3, pid 103, waiting on rank 2)"),
            "{text}"
        );
        assert!(text.contains("in no communication: rank 0"), "{text}");
        assert!(
            text.contains("never reported: rank 1 (node n1, pid 101), rank 4"),
            "{text}"
        );
    }

    #[test]
    fn long_rank_lists_are_cut_and_sizes_read_well() {
        let mut watch = CommunicationWatch::default();
        for rank in 0..100 {
            watch.observe(0, rank, vec![channel("ring", 2, 1, "all_reduce")], 0);
        }
        let text = diagnose(&watch, 0, 60_000, 60_000, 100)
            .unwrap()
            .describe(place);
        assert!(text.ends_with("and 92 more (for 60.0 s)"), "{text}");
        assert!(
            text.len() < crate::limits::MAX_REASON_BYTES,
            "{}",
            text.len()
        );
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(64 << 20), "64.0 MiB");
    }
}
