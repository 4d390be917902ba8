//! Finding the rank that drags a job. Each training rank reports, with its metrics, the
//! compute time of every step since its last report (the step's wall time less the time it
//! waited for the gradient exchange). The coordinator compares the ranks step by step: rank
//! `r`'s time at step `s` against the median of all ranks' times at the same step (against the
//! other rank's, in a job of two), so that whatever slows the whole job at that moment cancels
//! out. A rank slower than that by [`SLOW_RATIO`] in [`SLOW_STEPS`] of its last
//! [`WINDOW_STEPS`] steps is a straggler, until at most [`WINDOW_STEPS`] - [`SLOW_STEPS`] of
//! them are slow. Ranks sharing a crowded machine's cores take turns being slow for a while,
//! two of them at once at times; a slow node is slow on nearly every step. Measured here (four
//! ranks of the demo on two cores, three runs of 1,170 steps): at most 15 of any 30 steps of a
//! rank above 1.25 times the median; a rank slowed by half (two ranks): 23 to 29 of its first
//! 30.
//!
//! In a synchronous data-parallel job every rank's step takes as long as the slowest one's, so
//! step times cannot name it; compute times can: the others spend the difference waiting.
//! Nodes keep a [`NodeScore`] of the flags their ranks got, which placement weighs.

use std::collections::{BTreeMap, VecDeque};

/// A step is slow when the rank's compute time exceeds the median by this factor.
pub const SLOW_RATIO: f64 = 1.25;
/// Steps a rank's verdict looks back over.
pub const WINDOW_STEPS: usize = 30;
/// Slow steps among the last [`WINDOW_STEPS`] that make a straggler (and normal ones that
/// clear it).
pub const SLOW_STEPS: usize = 20;
/// Most steps kept per rank while waiting for the others' times of the same steps.
pub const MAX_PENDING_STEPS: usize = 512;
/// Most step times one report may carry.
pub const MAX_REPORTED_STEPS: usize = 1024;

/// A rank's compute seconds of consecutive steps, as one report carries them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepTimes {
    /// The step of the first time.
    pub first_step: u64,
    /// Compute seconds of each step from `first_step` on.
    pub seconds: Vec<f64>,
}

/// A rank found dragging its job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Straggler {
    /// The rank.
    pub rank: u32,
    /// Its median compute time over the others' median, over its last window.
    pub slowdown: f64,
    /// The step at which it was flagged.
    pub since_step: u64,
}

/// One rank's steps and verdicts.
#[derive(Debug, Default)]
struct RankSteps {
    /// Compute seconds of the steps not judged yet, by step.
    pending: BTreeMap<u64, f64>,
    /// The last step judged.
    judged_through: u64,
    /// Whether each of the last [`WINDOW_STEPS`] judged steps was slow, with its ratio.
    recent: VecDeque<(bool, f64)>,
    /// Since when it drags the job, if it does.
    flagged: Option<Straggler>,
}

/// The straggler watch of one job's attempt.
#[derive(Debug, Default)]
pub struct StragglerWatch {
    /// The attempt the steps belong to.
    attempt: u32,
    /// By rank.
    ranks: BTreeMap<u32, RankSteps>,
}

impl StragglerWatch {
    /// Takes `rank`'s compute seconds of steps `first_step..` (`times`, of attempt `attempt`:
    /// a newer attempt starts the watch over, an older one is ignored), judges every step all
    /// reporting ranks now have, and returns the ranks this flagged.
    pub fn observe(
        &mut self,
        attempt: u32,
        rank: u32,
        first_step: u64,
        times: &[f64],
    ) -> Vec<Straggler> {
        if attempt < self.attempt {
            return Vec::new();
        }
        if attempt > self.attempt {
            *self = StragglerWatch {
                attempt,
                ..StragglerWatch::default()
            };
        }
        let steps = self.ranks.entry(rank).or_default();
        for (step, &seconds) in (first_step..).zip(times) {
            if step > steps.judged_through && seconds.is_finite() && seconds >= 0.0 {
                steps.pending.insert(step, seconds);
            }
        }
        while steps.pending.len() > MAX_PENDING_STEPS {
            steps.pending.pop_first();
        }
        self.judge_ready_steps()
    }

    /// Judges, in order, every step that every rank has reported.
    fn judge_ready_steps(&mut self) -> Vec<Straggler> {
        let mut flagged = Vec::new();
        if self.ranks.len() < 2 {
            return flagged;
        }
        loop {
            // The next step every rank holds: the lowest pending step of the rank furthest
            // behind, if every rank has it.
            let Some(step) = self
                .ranks
                .values()
                .map(|steps| steps.pending.first_key_value().map(|(&step, _)| step))
                .collect::<Option<Vec<u64>>>()
                .and_then(|firsts| firsts.into_iter().max())
            else {
                return flagged;
            };
            let times: Option<Vec<(u32, f64)>> = self
                .ranks
                .iter()
                .map(|(&rank, steps)| steps.pending.get(&step).map(|&seconds| (rank, seconds)))
                .collect();
            for steps in self.ranks.values_mut() {
                // Steps some rank never reported (a report lost) are skipped by everyone.
                while steps
                    .pending
                    .first_key_value()
                    .is_some_and(|(&pending, _)| pending <= step)
                {
                    steps.pending.pop_first();
                }
                steps.judged_through = step;
            }
            let Some(times) = times else {
                continue;
            };
            let everyone = median(times.iter().map(|&(_, seconds)| seconds));
            for &(rank, seconds) in &times {
                // Two ranks: the median would be halfway between them.
                let reference = if times.len() >= 3 {
                    everyone
                } else {
                    median(
                        times
                            .iter()
                            .filter(|(other, _)| *other != rank)
                            .map(|t| t.1),
                    )
                };
                let ratio = seconds / reference.max(f64::MIN_POSITIVE);
                if let Some(steps) = self.ranks.get_mut(&rank)
                    && let Some(straggler) = steps.judge(rank, step, ratio)
                {
                    flagged.push(straggler);
                }
            }
        }
    }

    /// The ranks flagged now, by rank.
    pub fn stragglers(&self) -> Vec<Straggler> {
        self.ranks
            .values()
            .filter_map(|steps| steps.flagged)
            .collect()
    }
}

impl RankSteps {
    /// Adds the verdict on `step` (the rank's time over the others' median: `ratio`); returns
    /// the flag when it made the rank a straggler.
    fn judge(&mut self, rank: u32, step: u64, ratio: f64) -> Option<Straggler> {
        if self.recent.len() == WINDOW_STEPS {
            self.recent.pop_front();
        }
        self.recent.push_back((ratio > SLOW_RATIO, ratio));
        let slow = self.recent.iter().filter(|(slow, _)| *slow).count();
        let slowdown = median(self.recent.iter().map(|&(_, ratio)| ratio));
        match &mut self.flagged {
            Some(flag) if self.recent.len() - slow >= SLOW_STEPS => {
                self.flagged = None;
                None
            }
            Some(flag) => {
                flag.slowdown = slowdown;
                None
            }
            None if slow >= SLOW_STEPS => {
                let straggler = Straggler {
                    rank,
                    slowdown,
                    since_step: step,
                };
                self.flagged = Some(straggler);
                Some(straggler)
            }
            None => None,
        }
    }
}

/// The median of `values` (the mean of the middle two for an even count), 0 for none.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

/// How often a node's ranks were found straggling lately: each flag adds 1, and the score
/// halves every [`NodeScore::HALF_LIFE_MS`]. Placement prefers nodes with a lower score.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NodeScore {
    /// The score at `at_ms`.
    value: f64,
    /// When `value` was last brought up to date, Unix ms.
    at_ms: i64,
}

impl NodeScore {
    /// Time for a score to halve: an hour.
    pub const HALF_LIFE_MS: f64 = 3_600_000.0;

    /// The score at `now_ms`.
    pub fn value(&self, now_ms: i64) -> f64 {
        let elapsed = (now_ms - self.at_ms).max(0) as f64;
        self.value * 0.5_f64.powf(elapsed / Self::HALF_LIFE_MS)
    }

    /// Counts a straggler flag on the node at `now_ms`.
    pub fn add_flag(&mut self, now_ms: i64) {
        self.value = self.value(now_ms) + 1.0;
        self.at_ms = now_ms;
    }

    /// The score as placement ranks nodes by: whole flags, rounded.
    pub fn rank(&self, now_ms: i64) -> u32 {
        self.value(now_ms).round() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_scores_count_flags_and_halve_every_hour() {
        let mut score = NodeScore::default();
        assert_eq!(score.rank(0), 0);
        score.add_flag(1_000);
        score.add_flag(1_000);
        assert_eq!(score.value(1_000), 2.0);
        let hour = NodeScore::HALF_LIFE_MS as i64;
        assert!((score.value(1_000 + hour) - 1.0).abs() < 1e-9);
        assert_eq!(score.rank(1_000 + 3 * hour), 0);
        score.add_flag(1_000 + hour);
        assert!((score.value(1_000 + hour) - 2.0).abs() < 1e-9);
    }

    /// Feeds `ranks` ranks' step times in reports of `steps_per_report` steps for `reports`
    /// reports, rank `slow` (if any) taking `factor` times the others' time (10 ms a step,
    /// with `noise` relative jitter per step from a fixed sequence); returns the flags.
    fn run(
        ranks: u32,
        slow: Option<u32>,
        factor: f64,
        noise: f64,
        steps_per_report: u64,
        reports: u64,
    ) -> (StragglerWatch, Vec<Straggler>) {
        let mut watch = StragglerWatch::default();
        let mut flags = Vec::new();
        let mut jitter = 0x2545_f491_4f6c_dd1d_u64;
        for report in 0..reports {
            let first = report * steps_per_report + 1;
            for rank in 0..ranks {
                let times: Vec<f64> = (0..steps_per_report)
                    .map(|_| {
                        jitter ^= jitter << 13;
                        jitter ^= jitter >> 7;
                        jitter ^= jitter << 17;
                        let wobble = 1.0 + noise * ((jitter % 2001) as f64 / 1000.0 - 1.0);
                        0.010 * wobble * if Some(rank) == slow { factor } else { 1.0 }
                    })
                    .collect();
                flags.extend(watch.observe(0, rank, first, &times));
            }
        }
        (watch, flags)
    }

    #[test]
    fn a_rank_half_as_fast_again_is_flagged_within_thirty_steps() {
        for (ranks, steps_per_report) in [(2, 5), (4, 5), (8, 1), (2, 25), (4, 13)] {
            let (watch, flags) = run(ranks, Some(1), 1.5, 0.1, steps_per_report, 40);
            assert_eq!(flags.len(), 1, "{ranks} ranks: {flags:?}");
            assert_eq!(flags[0].rank, 1);
            assert!(flags[0].since_step <= 30, "{ranks} ranks: {flags:?}");
            assert!((flags[0].slowdown - 1.5).abs() < 0.2, "{flags:?}");
            assert_eq!(watch.stragglers().len(), 1);
        }
    }

    #[test]
    fn noisy_healthy_ranks_are_never_flagged() {
        // 20% jitter on every step of every rank over 4,000 steps.
        let (watch, flags) = run(4, None, 1.0, 0.2, 10, 400);
        assert!(flags.is_empty(), "{flags:?}");
        assert!(watch.stragglers().is_empty());
    }

    #[test]
    fn ranks_taking_turns_being_slow_for_a_dozen_steps_are_not_stragglers() {
        // What four ranks on two cores look like: every 40 steps one rank is twice as slow for
        // twelve steps.
        let mut watch = StragglerWatch::default();
        for step in 1..=1_200u64 {
            let turn = (step / 40 % 4) as u32;
            for rank in 0..4u32 {
                let slow = rank == turn && step % 40 < 12;
                let seconds = if slow { 0.02 } else { 0.01 };
                assert!(
                    watch.observe(0, rank, step, &[seconds]).is_empty(),
                    "step {step}"
                );
            }
        }
    }

    #[test]
    fn steps_are_judged_once_every_rank_has_them_and_a_recovered_rank_is_cleared() {
        let mut watch = StragglerWatch::default();
        // Rank 0 reports forty slow steps ahead of rank 1: nothing can be judged yet.
        assert!(watch.observe(0, 0, 1, &[0.02; 40]).is_empty());
        // Rank 1's steps arrive in two reports, the second overlapping the first.
        assert!(watch.observe(0, 1, 1, &[0.01; 10]).is_empty());
        let flags = watch.observe(0, 1, 5, &[0.01; 36]);
        assert_eq!(flags.len(), 1, "{flags:?}");
        assert_eq!((flags[0].rank, flags[0].since_step), (0, 20));
        assert_eq!(flags[0].slowdown, 2.0);
        // Times that are not numbers are dropped; rank 0 recovers and is cleared.
        assert!(watch.observe(0, 0, 41, &[f64::NAN]).is_empty());
        for step in 42..=70 {
            watch.observe(0, 0, step, &[0.01]);
            watch.observe(0, 1, step, &[0.01]);
        }
        assert!(watch.stragglers().is_empty());
        // An older attempt's report changes nothing; a newer attempt starts over.
        assert!(watch.observe(0, 0, 71, &[0.05; 30]).is_empty());
        watch.observe(1, 0, 1, &[0.05; 30]);
        assert!(
            watch.stragglers().is_empty(),
            "one rank alone is compared with no one"
        );
    }
}
