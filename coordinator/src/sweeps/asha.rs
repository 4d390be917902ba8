//! Asynchronous successive halving (ASHA: Li et al., "A System for Massively Parallel
//! Hyperparameter Tuning", MLSys 2020; Ray Tune's `AsyncHyperBandScheduler`): the state
//! machine every sweep runs by. Grid and random searches are its one-rung case, in which every
//! trial runs one segment to the end.
//!
//! Rules:
//! - Trials are numbered `0, 1, ...` in the order they start and dealt to the brackets in turn
//!   (trial `n` to bracket `n mod brackets`). Each bracket has its rungs ([`Plan::brackets`]);
//!   a trial runs one segment per rung, each stopping at its rung's resource with a checkpoint
//!   the next segment resumes from, and the top rung's segment running to `max_resource`.
//! - A segment that succeeds records its value and steps at its rung ([`SearchState::record`]):
//!   below the top rung the trial is then paused, at the top it is completed. A failed segment
//!   fails the trial (restarting a failed attempt is the job's own business).
//! - [`SearchState::next`] fills every free slot (`max_concurrent_trials` less the running
//!   trials) with, first, a promotion: the rungs are visited highest first (by level, a rung's
//!   index plus its bracket's, so that equal resources are visited together; lower brackets
//!   first among equals), and at a rung with `n` results where fewer than
//!   `floor(n / reduction_factor)` trials have gone on, the best paused trial among the best
//!   `floor(n / reduction_factor)` results goes on to the next rung, provided its value is
//!   finite (a trial that reported no metric never goes on). Failing that, a new trial starts,
//!   while fewer than `max_trials` have.
//! - When nothing runs and no slot can be filled, every paused trial is stopped for good and
//!   the sweep is done. [`SearchState::cancel`] ends it at once, stopping the running trials too
//!   (their jobs are the controller's to cancel).
//!
//! ```text
//!   start ──> Running ──(segment succeeded, top rung)──> Completed
//!              │  ▲  └──(segment failed)───────────────> Failed
//!  (succeeded, │  │ promoted
//!   below top) ▼  │
//!             Paused ──(sweep done, or cancelled)──────> Stopped
//! ```
//!
//! So with 16 trials, a reduction factor of 4 and rungs at 1/16, 1/4 and all of a run `R`, at
//! most 4 trials reach `R/4` and 1 reaches `R`: the sweep costs `2.5 R` (as segments resume
//! from checkpoints), 16% of running the 16 trials to the end.

use cohort_jobspec::objective::Objective;
use cohort_jobspec::sweep::searcher::DEFAULT_REDUCTION_FACTOR;
use cohort_jobspec::sweep::{Resource, Searcher, SweepSpec};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The fixed settings of a sweep's state machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Most trials started.
    pub max_trials: u32,
    /// Most trials running at once.
    pub max_concurrent_trials: u32,
    /// What trials are ranked by.
    pub objective: Objective,
    /// A rung's best `1 / reduction_factor` go on (2 or more; less counts as 2).
    pub reduction_factor: u32,
    /// Per bracket, where the segment of each rung stops, lowest rung first; `None` runs to
    /// the end (the top rung when it is the whole run). An empty list counts as one
    /// bracket of one rung to the end.
    pub brackets: Vec<Vec<Option<Resource>>>,
}

impl Plan {
    /// The plan of `spec`: its rungs for `kind = "asha"`, one rung to the end otherwise.
    pub fn from_spec(spec: &SweepSpec) -> Self {
        let (reduction_factor, brackets) = match &spec.searcher {
            Searcher::Asha(asha) => (
                asha.reduction_factor,
                (0..asha.brackets)
                    .map(|bracket| asha.rungs(bracket))
                    .collect(),
            ),
            Searcher::Grid | Searcher::Random => (DEFAULT_REDUCTION_FACTOR, vec![vec![None]]),
        };
        Self {
            max_trials: spec.max_trials,
            max_concurrent_trials: spec.max_concurrent_trials,
            objective: spec.objective(),
            reduction_factor,
            brackets,
        }
    }

    /// Number of brackets (at least 1).
    fn bracket_count(&self) -> u32 {
        u32::try_from(self.brackets.len())
            .unwrap_or(u32::MAX)
            .max(1)
    }

    /// Number of rungs of bracket `bracket` (at least 1).
    fn rung_count(&self, bracket: u32) -> u32 {
        self.brackets.get(bracket as usize).map_or(1, |rungs| {
            u32::try_from(rungs.len()).unwrap_or(u32::MAX).max(1)
        })
    }

    /// Where the segment of rung `rung` of bracket `bracket` stops.
    fn stop_after(&self, bracket: u32, rung: u32) -> Option<Resource> {
        self.brackets
            .get(bracket as usize)
            .and_then(|rungs| rungs.get(rung as usize))
            .copied()
            .flatten()
    }
}

/// Where a trial stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrialStatus {
    /// A segment of it runs.
    Running,
    /// It finished a rung below the top and may be promoted.
    Paused,
    /// Not promoted, or cancelled: final.
    Stopped,
    /// It finished the top rung: final.
    Completed,
    /// A segment failed: final.
    Failed,
}

/// What a finished rung of a trial reported.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RungResult {
    /// The objective's metric at the end of the segment; `None` when the trial reported none.
    pub value: Option<f64>,
    /// Optimizer steps the segment ran.
    pub steps: u64,
}

/// One trial of the sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    /// Its number, in start order from 0.
    pub number: u32,
    /// Its bracket.
    pub bracket: u32,
    /// The rung its segment runs to, or the last it finished.
    pub rung: u32,
    /// Where it stands.
    pub status: TrialStatus,
    /// The result of each rung it finished, lowest first.
    pub results: Vec<RungResult>,
    /// Optimizer steps of its failed segment, if any.
    pub failed_steps: u64,
}

impl Trial {
    /// Its result at rung `rung`, if it finished that rung.
    pub fn result(&self, rung: u32) -> Option<&RungResult> {
        self.results.get(rung as usize)
    }

    /// Whether it finished rung `rung` and was promoted past it.
    fn promoted_from(&self, rung: u32) -> bool {
        self.rung > rung
    }
}

/// How a trial segment ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// It ran to its rung.
    Succeeded {
        /// The objective's metric at its end; `None` when the trial reported none.
        value: Option<f64>,
        /// Optimizer steps it ran.
        steps: u64,
    },
    /// It failed (after whatever restarts its job allowed).
    Failed {
        /// Optimizer steps it ran.
        steps: u64,
    },
}

/// What the controller does next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    /// Starts trial `trial` (its values: [`super::search::trial_values`]) from scratch.
    Start {
        /// The trial's number.
        trial: u32,
        /// Its bracket.
        bracket: u32,
        /// Where its first segment stops; `None`: it runs to the end.
        stop_after: Option<Resource>,
    },
    /// Runs the next segment of trial `trial`, resuming from its last checkpoint.
    Promote {
        /// The trial's number.
        trial: u32,
        /// The rung the segment runs to.
        rung: u32,
        /// Where the segment stops; `None`: it runs to the end.
        stop_after: Option<Resource>,
    },
}

/// A trial's place on the leaderboard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Standing {
    /// The trial's number.
    pub trial: u32,
    /// Its bracket.
    pub bracket: u32,
    /// The highest rung it finished, if any.
    pub rung: Option<u32>,
    /// Its value there.
    pub value: Option<f64>,
    /// Where it stands.
    pub status: TrialStatus,
}

/// The whole state of a sweep's trials: plain data, stored as is (with bincode) and replayed
/// by a new coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchState {
    /// The settings.
    plan: Plan,
    /// Every trial started, by number.
    trials: Vec<Trial>,
    /// Whether no action will come any more.
    done: bool,
    /// Whether it was cancelled.
    cancelled: bool,
}

impl SearchState {
    /// A sweep of `plan` that has started nothing.
    pub fn new(plan: Plan) -> Self {
        Self {
            plan,
            trials: Vec::new(),
            done: false,
            cancelled: false,
        }
    }

    /// The settings.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Every trial started, by number.
    pub fn trials(&self) -> &[Trial] {
        &self.trials
    }

    /// Whether the sweep is over: nothing runs and no action will come.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Whether the sweep was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled
    }

    /// Number of trials started.
    pub fn started(&self) -> u32 {
        u32::try_from(self.trials.len()).unwrap_or(u32::MAX)
    }

    /// Number of trials running.
    pub fn running(&self) -> u32 {
        let running = self
            .trials
            .iter()
            .filter(|trial| trial.status == TrialStatus::Running)
            .count();
        u32::try_from(running).unwrap_or(u32::MAX)
    }

    /// Optimizer steps run by every segment so far, failed ones included.
    pub fn total_steps(&self) -> u64 {
        self.trials
            .iter()
            .flat_map(|trial| {
                let rungs = trial.results.iter().map(|result| result.steps);
                rungs.chain([trial.failed_steps])
            })
            .fold(0, u64::saturating_add)
    }

    /// Records how the segment of trial `trial` up to rung `rung` ended. Refused (and nothing
    /// changed) when no such trial runs that rung: a report for an unknown trial, a stale or
    /// repeated one, or one that came after a cancel.
    pub fn record(&mut self, trial: u32, rung: u32, outcome: Outcome) -> Result<()> {
        let started = self.trials.len();
        let Some(entry) = self.trials.get_mut(trial as usize) else {
            return Err(Error::FailedPrecondition(format!(
                "sweep trial {trial}: no such trial ({started} started)"
            )));
        };
        if entry.status != TrialStatus::Running || entry.rung != rung {
            return Err(Error::FailedPrecondition(format!(
                "sweep trial {trial}: a result for rung {rung}, expected none: it is {:?} at \
                 rung {}",
                entry.status, entry.rung
            )));
        }
        match outcome {
            Outcome::Succeeded { value, steps } => {
                entry.results.push(RungResult { value, steps });
                let top = rung.saturating_add(1) >= self.plan.rung_count(entry.bracket);
                entry.status = if top {
                    TrialStatus::Completed
                } else {
                    TrialStatus::Paused
                };
            }
            Outcome::Failed { steps } => {
                entry.failed_steps = entry.failed_steps.saturating_add(steps);
                entry.status = TrialStatus::Failed;
            }
        }
        Ok(())
    }

    /// Decides what runs in each free slot, marking those trials running (see the module's
    /// rules); ends the sweep when nothing runs and nothing can.
    #[expect(
        clippy::should_implement_trait,
        reason = "not an iterator: a batch of actions, and an empty one does not end the sweep"
    )]
    pub fn next(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.done {
            return actions;
        }
        let mut running = self.running();
        while running < self.plan.max_concurrent_trials {
            if let Some((index, from)) = self.promotion() {
                let rung = from + 1;
                let Some(trial) = self.trials.get_mut(index) else {
                    break;
                };
                trial.rung = rung;
                trial.status = TrialStatus::Running;
                let (number, bracket) = (trial.number, trial.bracket);
                actions.push(Action::Promote {
                    trial: number,
                    rung,
                    stop_after: self.plan.stop_after(bracket, rung),
                });
            } else if self.started() < self.plan.max_trials {
                let number = self.started();
                let bracket = number % self.plan.bracket_count();
                self.trials.push(Trial {
                    number,
                    bracket,
                    rung: 0,
                    status: TrialStatus::Running,
                    results: Vec::new(),
                    failed_steps: 0,
                });
                actions.push(Action::Start {
                    trial: number,
                    bracket,
                    stop_after: self.plan.stop_after(bracket, 0),
                });
            } else {
                break;
            }
            running += 1;
        }
        if actions.is_empty() && running == 0 {
            self.stop_all();
        }
        actions
    }

    /// Ends the sweep now: every running or paused trial is stopped, and no action comes any
    /// more.
    pub fn cancel(&mut self) {
        self.cancelled = true;
        self.stop_all();
    }

    /// Stops every running or paused trial and ends the sweep.
    fn stop_all(&mut self) {
        for trial in &mut self.trials {
            if matches!(trial.status, TrialStatus::Running | TrialStatus::Paused) {
                trial.status = TrialStatus::Stopped;
            }
        }
        self.done = true;
    }

    /// The trial to promote next and the rung it finished, if any (see the module's rules).
    fn promotion(&self) -> Option<(usize, u32)> {
        let mut rungs: Vec<(u32, u32)> = (0..self.plan.bracket_count())
            .flat_map(|bracket| {
                let below_top = self.plan.rung_count(bracket) - 1;
                (0..below_top).map(move |rung| (bracket, rung))
            })
            .collect();
        rungs.sort_by_key(|&(bracket, rung)| (std::cmp::Reverse(bracket + rung), bracket));
        rungs
            .into_iter()
            .find_map(|(bracket, rung)| self.promotion_at(bracket, rung).map(|index| (index, rung)))
    }

    /// The index of the trial to promote from rung `rung` of bracket `bracket`, if any.
    fn promotion_at(&self, bracket: u32, rung: u32) -> Option<usize> {
        let mut finished: Vec<(usize, &Trial, f64)> = self
            .trials
            .iter()
            .enumerate()
            .filter(|(_, trial)| trial.bracket == bracket)
            .filter_map(|(index, trial)| {
                let value = trial.result(rung)?.value.unwrap_or(f64::NAN);
                Some((index, trial, value))
            })
            .collect();
        let quota = finished.len() / self.plan.reduction_factor.max(2) as usize;
        let promoted = finished
            .iter()
            .filter(|(_, trial, _)| trial.promoted_from(rung))
            .count();
        if promoted >= quota {
            return None;
        }
        finished.sort_by(|a, b| {
            self.plan
                .objective
                .best_first(a.2, b.2)
                .then(a.1.number.cmp(&b.1.number))
        });
        finished
            .iter()
            .take(quota)
            .find(|(_, trial, value)| {
                trial.status == TrialStatus::Paused && trial.rung == rung && value.is_finite()
            })
            .map(|(index, _, _)| *index)
    }

    /// Every trial, best first: those that finished higher rungs (by level, a rung's index
    /// plus its bracket's) before the others, then by value (a missing or non-finite one
    /// last), then by number; trials that finished no rung at the end.
    pub fn leaderboard(&self) -> Vec<Standing> {
        let mut standings: Vec<Standing> = self
            .trials
            .iter()
            .map(|trial| {
                let last = trial.results.len().checked_sub(1);
                let rung = last.and_then(|rung| u32::try_from(rung).ok());
                Standing {
                    trial: trial.number,
                    bracket: trial.bracket,
                    rung,
                    value: trial.results.last().and_then(|result| result.value),
                    status: trial.status,
                }
            })
            .collect();
        let level = |standing: &Standing| standing.rung.map(|rung| rung + standing.bracket);
        standings.sort_by(|a, b| {
            level(b).cmp(&level(a)).then_with(|| {
                let value = |standing: &Standing| standing.value.unwrap_or(f64::NAN);
                self.plan
                    .objective
                    .best_first(value(a), value(b))
                    .then(a.trial.cmp(&b.trial))
            })
        });
        standings
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use cohort_jobspec::objective::{Metric, Mode};
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;

    use super::*;

    fn epochs(epochs: f64) -> Option<Resource> {
        Some(Resource::Epochs(epochs))
    }

    /// One bracket of `rungs`, highest accuracy first.
    fn plan(
        max_trials: u32,
        concurrent: u32,
        reduction_factor: u32,
        rungs: Vec<Option<Resource>>,
    ) -> Plan {
        Plan {
            max_trials,
            max_concurrent_trials: concurrent,
            objective: Objective::natural(Metric::EvalAccuracy),
            reduction_factor,
            brackets: vec![rungs],
        }
    }

    fn succeed(state: &mut SearchState, trial: u32, rung: u32, value: f64) {
        let outcome = Outcome::Succeeded {
            value: Some(value),
            steps: 10,
        };
        state.record(trial, rung, outcome).unwrap();
    }

    fn start(trial: u32) -> Action {
        Action::Start {
            trial,
            bracket: 0,
            stop_after: epochs(1.0),
        }
    }

    #[test]
    fn a_scripted_sweep_promotes_the_best_of_each_rung() {
        let mut state = SearchState::new(plan(4, 2, 2, vec![epochs(1.0), None]));
        assert_eq!(state.next(), [start(0), start(1)]);
        assert_eq!(state.next(), [], "both slots are taken");
        succeed(&mut state, 0, 0, 0.5);
        // One result at rung 0: floor(1 / 2) = 0 may go on.
        assert_eq!(state.next(), [start(2)]);
        succeed(&mut state, 1, 0, 0.7);
        // Two: the best of them, trial 1, goes on, to the end.
        let promote_1 = Action::Promote {
            trial: 1,
            rung: 1,
            stop_after: None,
        };
        assert_eq!(state.next(), [promote_1]);
        succeed(&mut state, 2, 0, 0.6);
        // Three: still one may go on, and one has.
        assert_eq!(state.next(), [start(3)]);
        succeed(&mut state, 3, 0, 0.9);
        // Four: two may go on; trial 3 is the best not yet promoted.
        assert_eq!(
            state.next(),
            [Action::Promote {
                trial: 3,
                rung: 1,
                stop_after: None
            }]
        );
        succeed(&mut state, 1, 1, 0.75);
        // Trials 0 and 2 are not among the best two; every trial has started.
        assert_eq!(state.next(), []);
        assert!(!state.is_done(), "trial 3 still runs");
        assert_eq!(state.trials()[0].status, TrialStatus::Paused);
        succeed(&mut state, 3, 1, 0.95);
        assert_eq!(state.next(), []);
        assert!(state.is_done());
        let statuses: Vec<TrialStatus> = state.trials().iter().map(|trial| trial.status).collect();
        use TrialStatus::{Completed, Stopped};
        assert_eq!(statuses, [Stopped, Completed, Stopped, Completed]);
        let order: Vec<(u32, Option<u32>)> = state
            .leaderboard()
            .iter()
            .map(|s| (s.trial, s.rung))
            .collect();
        assert_eq!(
            order,
            [(3, Some(1)), (1, Some(1)), (2, Some(0)), (0, Some(0))]
        );
        assert_eq!(state.total_steps(), 60);
        assert_eq!(state.next(), [], "a finished sweep does nothing");
    }

    #[test]
    fn higher_rungs_go_first_and_a_missing_metric_never_goes_on() {
        let rungs = vec![epochs(1.0), epochs(2.0), None];
        let mut state = SearchState::new(Plan {
            objective: Objective::new(Metric::EvalLoss, Some(Mode::Min)),
            ..plan(6, 6, 2, rungs)
        });
        assert_eq!(state.next().len(), 6);
        let no_metric = Outcome::Succeeded {
            value: None,
            steps: 10,
        };
        state.record(0, 0, no_metric).unwrap();
        state.record(1, 0, no_metric).unwrap();
        // Two results, one may go on, but neither has a metric.
        assert_eq!(state.next(), []);
        succeed(&mut state, 2, 0, 0.3);
        succeed(&mut state, 3, 0, 0.2);
        // Four results, two may go on: the lowest losses.
        let promoted = state.next();
        assert_eq!(
            promoted,
            [
                Action::Promote {
                    trial: 3,
                    rung: 1,
                    stop_after: epochs(2.0)
                },
                Action::Promote {
                    trial: 2,
                    rung: 1,
                    stop_after: epochs(2.0)
                },
            ]
        );
        succeed(&mut state, 3, 1, 0.1);
        succeed(&mut state, 2, 1, 0.15);
        succeed(&mut state, 4, 0, 0.05);
        succeed(&mut state, 5, 0, 0.01);
        // Free slots: rung 1 (two results, one may go on) is served before rung 0 (six
        // results, three may go on, two have: trial 5 is the best of the rest).
        assert_eq!(
            state.next(),
            [
                Action::Promote {
                    trial: 3,
                    rung: 2,
                    stop_after: None
                },
                Action::Promote {
                    trial: 5,
                    rung: 1,
                    stop_after: epochs(2.0)
                },
            ]
        );
        state.record(5, 1, Outcome::Failed { steps: 4 }).unwrap();
        assert_eq!(state.trials()[5].status, TrialStatus::Failed);
        assert_eq!(
            state.total_steps(),
            8 * 10 + 4,
            "eight rungs finished, one failed"
        );
    }

    #[test]
    fn reports_that_match_no_running_segment_are_refused() {
        let mut state = SearchState::new(plan(2, 1, 2, vec![epochs(1.0), None]));
        state.next();
        let ok = Outcome::Succeeded {
            value: Some(0.5),
            steps: 1,
        };
        for (trial, rung) in [(7, 0), (0, 1)] {
            let error = state.record(trial, rung, ok).unwrap_err().to_string();
            assert!(
                error.starts_with(&format!("sweep trial {trial}: ")),
                "{error}"
            );
        }
        state.record(0, 0, ok).unwrap();
        let error = state.record(0, 0, ok).unwrap_err().to_string();
        assert!(error.contains("it is Paused at rung 0"), "{error}");
        assert_eq!(state.trials()[0].results.len(), 1, "nothing changed");
    }

    #[test]
    fn random_and_grid_sweeps_run_each_trial_once_to_the_end() {
        let text = "version = 1\n[sweep]\nmax_trials = 5\nmax_concurrent_trials = 2\n\
                    [sweep.parameters]\noptimizer.lr = { uniform = [0.01, 0.1] }\n\
                    [job]\nversion = 1\nkind = \"train\"\n[job.model]\nkind = \"mlp\"\n\
                    [job.data]\ndataset = \"fashion-mnist\"\n";
        let spec = cohort_jobspec::sweep::parse_sweep(text).unwrap();
        let mut state = SearchState::new(Plan::from_spec(&spec));
        let mut started = Vec::new();
        while !state.is_done() {
            for action in state.next() {
                let Action::Start {
                    trial,
                    bracket: 0,
                    stop_after: None,
                } = action
                else {
                    panic!("{action:?}");
                };
                started.push(trial);
            }
            let running = state
                .trials()
                .iter()
                .find(|t| t.status == TrialStatus::Running)
                .map(|trial| trial.number);
            if let Some(trial) = running {
                succeed(&mut state, trial, 0, f64::from(trial));
            }
        }
        assert_eq!(started, [0, 1, 2, 3, 4]);
        assert!(
            state
                .trials()
                .iter()
                .all(|trial| trial.status == TrialStatus::Completed)
        );
        assert_eq!(state.leaderboard()[0].trial, 4);
    }

    #[test]
    fn cancel_stops_every_trial_and_refuses_late_reports() {
        let mut state = SearchState::new(plan(8, 2, 2, vec![epochs(1.0), None]));
        state.next();
        succeed(&mut state, 0, 0, 0.5);
        state.cancel();
        assert!(state.is_done() && state.is_cancelled());
        assert!(
            state
                .trials()
                .iter()
                .all(|trial| trial.status == TrialStatus::Stopped)
        );
        assert_eq!(state.next(), []);
        assert!(state.record(1, 0, Outcome::Failed { steps: 0 }).is_err());
    }

    #[test]
    fn the_state_round_trips_through_bincode() {
        let mut state = SearchState::new(plan(8, 3, 2, vec![Some(Resource::Steps(50)), None]));
        state.next();
        succeed(&mut state, 0, 0, 0.5);
        state
            .record(
                1,
                0,
                Outcome::Succeeded {
                    value: None,
                    steps: 3,
                },
            )
            .unwrap();
        state.next();
        let bytes = bincode::serde::encode_to_vec(&state, bincode::config::standard()).unwrap();
        let (decoded, _): (SearchState, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(decoded, state);
    }

    /// A small deterministic generator for the drivers (splitmix64).
    struct Dice(u64);

    impl Dice {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, count: u64) -> u64 {
            self.next() % count.max(1)
        }
    }

    /// Drives `state` to its end: takes its actions, then finishes one running segment chosen
    /// at random (failing one in `failures`, reporting no metric one in 10), checking the
    /// rules after every step. `steps(bracket, rung)` is what a segment runs.
    fn drive(
        mut state: SearchState,
        seed: u64,
        failures: u64,
        steps: impl Fn(u32, u32) -> u64,
    ) -> Result<SearchState, TestCaseError> {
        let mut dice = Dice(seed);
        let mut promotions = BTreeSet::new();
        for _ in 0..100_000 {
            let before = state.clone();
            let actions = state.next();
            check_actions(&before, &actions, &mut promotions)?;
            check_invariants(&state)?;
            if state.is_done() {
                return Ok(state);
            }
            let running: Vec<&Trial> = state
                .trials()
                .iter()
                .filter(|trial| trial.status == TrialStatus::Running)
                .collect();
            prop_assert!(!running.is_empty(), "not done, yet nothing runs");
            let trial = running[dice.below(running.len() as u64) as usize];
            let (number, rung, full) = (trial.number, trial.rung, steps(trial.bracket, trial.rung));
            let outcome = if dice.below(failures) == 0 {
                Outcome::Failed {
                    steps: dice.below(full + 1),
                }
            } else {
                let value = (dice.below(10) != 0).then(|| dice.below(1000) as f64 / 1000.0);
                Outcome::Succeeded { value, steps: full }
            };
            prop_assert!(state.record(number, rung, outcome).is_ok());
        }
        Err(TestCaseError::fail(
            "the sweep did not end in 100,000 steps",
        ))
    }

    /// Checks `actions`, taken from the state `before`: starts in order and within
    /// `max_trials`, each promotion of a paused trial one rung up, never twice.
    fn check_actions(
        before: &SearchState,
        actions: &[Action],
        promotions: &mut BTreeSet<(u32, u32)>,
    ) -> Result<(), TestCaseError> {
        let plan = before.plan();
        let mut next_trial = before.started();
        for action in actions {
            match *action {
                Action::Start {
                    trial,
                    bracket,
                    stop_after,
                } => {
                    prop_assert_eq!(trial, next_trial);
                    prop_assert!(trial < plan.max_trials);
                    prop_assert_eq!(bracket, trial % plan.bracket_count());
                    prop_assert_eq!(stop_after, plan.stop_after(bracket, 0));
                    next_trial += 1;
                }
                Action::Promote {
                    trial,
                    rung,
                    stop_after,
                } => {
                    let was = &before.trials()[trial as usize];
                    prop_assert_eq!(was.status, TrialStatus::Paused);
                    prop_assert_eq!(was.rung + 1, rung);
                    prop_assert!(rung < plan.rung_count(was.bracket), "promoted past the top");
                    prop_assert_eq!(stop_after, plan.stop_after(was.bracket, rung));
                    prop_assert!(promotions.insert((trial, rung)), "promoted twice");
                }
            }
        }
        Ok(())
    }

    /// Checks what holds after every step: concurrency and trial limits, and at every rung no
    /// more trials gone on than `floor(results / reduction_factor)`; once done, nothing left
    /// running or paused.
    fn check_invariants(state: &SearchState) -> Result<(), TestCaseError> {
        let plan = state.plan();
        prop_assert!(state.running() <= plan.max_concurrent_trials);
        prop_assert!(state.started() <= plan.max_trials);
        for bracket in 0..plan.bracket_count() {
            for rung in 0..plan.rung_count(bracket) {
                let in_bracket = || state.trials().iter().filter(|t| t.bracket == bracket);
                let results = in_bracket().filter(|t| t.result(rung).is_some()).count();
                let promoted = in_bracket().filter(|t| t.promoted_from(rung)).count();
                prop_assert!(promoted <= results / plan.reduction_factor as usize);
            }
        }
        if state.is_done() {
            prop_assert_eq!(state.started(), plan.max_trials);
            prop_assert!(
                state.trials().iter().all(|trial| !matches!(
                    trial.status,
                    TrialStatus::Running | TrialStatus::Paused
                ))
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cohort_proto::fuzz_cases().min(512)))]

        #[test]
        fn every_sweep_ends_within_its_limits(
            max_trials in 1u32..40,
            concurrent in 1u32..8,
            reduction_factor in 2u32..5,
            rung_count in 1usize..5,
            brackets in 1usize..5,
            minimise in any::<bool>(),
            failures in 2u64..20,
            seed in any::<u64>(),
        ) {
            let mode = if minimise { Mode::Min } else { Mode::Max };
            let plan = Plan {
                max_trials,
                max_concurrent_trials: concurrent,
                objective: Objective::new(Metric::EvalLoss, Some(mode)),
                reduction_factor,
                brackets: (0..brackets.min(rung_count))
                    .map(|bracket| {
                        let mut rungs: Vec<Option<Resource>> = (bracket + 1..rung_count)
                            .map(|rung| Some(Resource::Steps(10 * rung as u64)))
                            .collect();
                        rungs.push(None);
                        rungs
                    })
                    .collect(),
            };
            drive(SearchState::new(plan), seed, failures, |_, _| 10)?;
        }

        #[test]
        fn sixteen_trials_cost_at_most_a_sixth_of_running_them_all(
            concurrent in 1u32..=16,
            failures in 2u64..50,
            seed in any::<u64>(),
        ) {
            // Rungs at R/16, R/4 and R of a run R of 16 epochs of 100 steps.
            let rungs = vec![epochs(1.0), epochs(4.0), None];
            let segment_steps = [100, 300, 1200];
            let state = SearchState::new(plan(16, concurrent, 4, rungs));
            let state = drive(state, seed, failures, |_, rung| segment_steps[rung as usize])?;
            let whole_runs = 16 * 1600;
            prop_assert!(
                state.total_steps() * 100 <= whole_runs * 16,
                "{} steps of {}", state.total_steps(), whole_runs
            );
        }
    }
}
