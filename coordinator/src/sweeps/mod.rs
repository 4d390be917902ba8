//! Hyperparameter sweeps: the pure decisions a sweep's controller applies.
//!
//! A sweep ([`cohort_jobspec::sweep::SweepSpec`]) runs trials, each an ordinary training job
//! built from the sweep's base job. What values a trial runs with and which trial runs next
//! are decided here, apart from any store, RPC or clock, so that they can be property-tested
//! and so that a restarted coordinator reaches the same decisions from the same stored state:
//!
//! - [`search`]: the parameter values of trial `n`, a pure function of the sweep and `n`
//!   (random draws from a ChaCha stream of the sweep's seed, or the `n`-th point of a grid).
//! - [`asha`]: asynchronous successive halving, [`SearchState`], the state machine every
//!   sweep runs by (grid and random searches are its one-rung case): which trial starts or is
//!   promoted when a slot frees up, when the sweep is done, and its leaderboard.

pub mod asha;
pub mod search;

pub use asha::{Action, Outcome, Plan, SearchState, Standing, Trial, TrialStatus};
pub use search::trial_values;
