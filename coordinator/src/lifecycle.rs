//! The job lifecycle: one state machine, and the only place that decides which moves are legal.
//!
//! ```text
//! queued ──> scheduled ──> running ──> succeeded
//!   ▲ │            │            ├──────> failed
//!   │ │            │            └──────> cancelled
//!   │ │            ├──> succeeded | failed | cancelled  (ranks ended before all reported running)
//!   │ │            │            │
//!   │ │            └────────────┴──> restarting  (an attempt failed, restarts remain)
//!   │ │                                 ├──> failed | cancelled
//!   └─┼─────────────────────────────────┘  (every process of the attempt gone: the next one)
//!     └──> failed | cancelled
//! ```

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobState {
    /// Waiting for devices.
    Queued,
    /// Placed; start instructions sent, not every rank has reported running yet.
    Scheduled,
    /// Every rank has reported running.
    Running,
    /// Every rank exited 0.
    Succeeded,
    /// A rank failed, a node was lost, or the coordinator restarted under it.
    Failed,
    /// Cancelled by a user.
    Cancelled,
    /// An attempt failed and restarts remain: its processes are being stopped, then the job
    /// queues again for its next attempt.
    Restarting,
}

impl JobState {
    /// Whether the job has ended for good.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// Whether the job holds devices (its ranks are placed; a restarting job's until they
    /// are gone).
    pub fn holds_devices(self) -> bool {
        matches!(
            self,
            JobState::Scheduled | JobState::Running | JobState::Restarting
        )
    }

    /// Whether an attempt of the job is under way: its processes may use its rendezvous and
    /// report metrics.
    pub fn runs_attempt(self) -> bool {
        matches!(self, JobState::Scheduled | JobState::Running)
    }

    /// Lower-case name, as shown by the CLI.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Scheduled => "scheduled",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Restarting => "restarting",
        }
    }

    /// The protocol's enum value.
    pub fn to_proto(self) -> cohort_proto::v1::JobState {
        use cohort_proto::v1::JobState as P;
        match self {
            JobState::Queued => P::Queued,
            JobState::Scheduled => P::Scheduled,
            JobState::Running => P::Running,
            JobState::Succeeded => P::Succeeded,
            JobState::Failed => P::Failed,
            JobState::Cancelled => P::Cancelled,
            JobState::Restarting => P::Restarting,
        }
    }

    /// The state a protocol value names (`None` for an unknown or unspecified one).
    pub fn from_proto(value: i32) -> Option<JobState> {
        [
            JobState::Queued,
            JobState::Scheduled,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
            JobState::Restarting,
        ]
        .into_iter()
        .find(|state| state.to_proto() as i32 == value)
    }
}

/// Checks that a job may move from `from` to `to`; returns the new state or an
/// [`Error::IllegalTransition`] naming both.
pub fn transition(job_id: &str, from: JobState, to: JobState) -> Result<JobState> {
    use JobState::*;
    let legal = matches!(
        (from, to),
        (Queued, Scheduled | Failed | Cancelled)
            | (Scheduled, Running | Succeeded | Failed | Cancelled)
            | (Running, Succeeded | Failed | Cancelled)
            | (Scheduled | Running, Restarting)
            | (Restarting, Queued | Failed | Cancelled)
    );
    if legal {
        Ok(to)
    } else {
        Err(Error::IllegalTransition {
            job_id: job_id.to_owned(),
            from: from.name(),
            to: to.name(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobState::*;

    const ALL: [JobState; 7] = [
        Queued, Scheduled, Running, Succeeded, Failed, Cancelled, Restarting,
    ];

    #[test]
    fn protocol_values_name_their_state() {
        for state in ALL {
            assert_eq!(JobState::from_proto(state.to_proto() as i32), Some(state));
        }
        assert_eq!(JobState::from_proto(0), None, "unspecified");
        assert_eq!(JobState::from_proto(99), None);
    }

    #[test]
    fn terminal_states_never_move() {
        for from in ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in ALL {
                assert!(transition("j", from, to).is_err(), "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn happy_path_is_legal_and_skipping_running_is_not() {
        assert_eq!(transition("j", Queued, Scheduled).unwrap(), Scheduled);
        assert_eq!(transition("j", Scheduled, Running).unwrap(), Running);
        assert_eq!(transition("j", Running, Succeeded).unwrap(), Succeeded);
        assert!(transition("j", Queued, Running).is_err());
        assert!(transition("j", Queued, Succeeded).is_err());
        assert!(transition("j", Running, Queued).is_err());
        let err = transition("j-1", Succeeded, Running)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "job j-1: cannot go from succeeded to running");
    }

    #[test]
    fn only_a_placed_attempt_restarts_and_a_restart_queues_again() {
        for from in ALL {
            let legal = transition("j", from, Restarting).is_ok();
            assert_eq!(legal, matches!(from, Scheduled | Running), "{from:?}");
        }
        assert_eq!(transition("j", Restarting, Queued).unwrap(), Queued);
        assert!(transition("j", Restarting, Running).is_err());
        assert!(transition("j", Restarting, Succeeded).is_err());
        assert!(Restarting.holds_devices() && !Restarting.runs_attempt());
    }

    #[test]
    fn every_live_state_can_fail_or_be_cancelled() {
        for from in [Queued, Scheduled, Running, Restarting] {
            assert!(transition("j", from, Failed).is_ok());
            assert!(transition("j", from, Cancelled).is_ok());
        }
    }
}
