//! `[fault_tolerance]`: what the coordinator does when an attempt of the job fails.
//!
//! A failed attempt (a rank that fails, a node that is lost, a coordinator restart its ranks do
//! not survive) is restarted while restarts remain: every process of the attempt is stopped,
//! the gang is placed again (away from the node that failed, for a back-off period) and started
//! under the next attempt number. A `train` job resumes from the latest checkpoint in its output
//! directory; a command job sees `COHORT_RESTART_COUNT` and can do the same.

use serde::{Deserialize, Serialize};

use crate::problems::Problems;

/// Most restarts a job may ask for.
pub const MAX_RESTARTS: u32 = 100;
/// Restarts of a `train` job when its spec says nothing: it resumes from its checkpoints.
pub const DEFAULT_TRAIN_RESTARTS: u32 = 3;
/// Restarts of a `command` job when its spec says nothing: a script may not resume, so it is
/// not run again unless asked.
pub const DEFAULT_COMMAND_RESTARTS: u32 = 0;
/// Seconds a `train` job's communication may stand still, with an operation in flight, before
/// the coordinator calls it a hang, when its spec says nothing.
pub const DEFAULT_HANG_TIMEOUT_S: u32 = 60;
/// Longest hang timeout a job may ask for: a day.
pub const MAX_HANG_TIMEOUT_S: u32 = 86_400;

/// `[fault_tolerance]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultToleranceSpec {
    /// How often a failed attempt is restarted before the job fails for good, 0 to
    /// [`MAX_RESTARTS`]. Default [`DEFAULT_TRAIN_RESTARTS`] for `train` jobs,
    /// [`DEFAULT_COMMAND_RESTARTS`] for `command` jobs.
    pub max_restarts: Option<u32>,
    /// Elastic world size, for data-parallel `train` jobs (`comm = "allreduce"`, image
    /// models): a restart that cannot place every rank starts with as many as fit, down to this
    /// many, keeping the global batch (each rank's share grows), and the job grows back to its
    /// full size through a checkpoint once the devices are back. 1 to the job's ranks. Default:
    /// absent, every attempt runs whole.
    pub min_ranks: Option<u32>,
    /// Seconds a training job's communication may stand still (some rank inside a collective,
    /// a pipeline receive or a parameter-server call, and no rank's operations moving) before
    /// the coordinator calls it a hang: it names the ranks that never entered the operation and
    /// those stuck in it, and fails the attempt (restarted while restarts remain). 0 turns the
    /// diagnosis off; at most [`MAX_HANG_TIMEOUT_S`]. Default [`DEFAULT_HANG_TIMEOUT_S`].
    /// The ranks' own communication timeouts are set past it, so the diagnosis comes first.
    pub hang_timeout_s: Option<u32>,
}

impl FaultToleranceSpec {
    /// Adds the section's problems to `problems`, for a job of `ranks` ranks; `elastic` says
    /// whether the job can change its world size (or why not).
    pub fn validate(&self, ranks: u32, elastic: Result<(), &str>, problems: &mut Problems) {
        if let Some(restarts) = self.max_restarts {
            problems.check_range("fault_tolerance.max_restarts", restarts, 0, MAX_RESTARTS);
        }
        if let Some(timeout) = self.hang_timeout_s {
            problems.check_range(
                "fault_tolerance.hang_timeout_s",
                timeout,
                0,
                MAX_HANG_TIMEOUT_S,
            );
        }
        if let Some(min_ranks) = self.min_ranks {
            match elastic {
                Err(why) => problems.push("fault_tolerance.min_ranks", why),
                Ok(()) => problems.check_range("fault_tolerance.min_ranks", min_ranks, 1, ranks),
            }
        }
    }
}

#[cfg(test)]
mod tests {

    fn parse(text: &str) -> Result<crate::JobSpec, String> {
        crate::parse(text).map_err(|error| error.to_string())
    }

    const COMMAND: &str = "version = 1\nkind = \"command\"\n[command]\nprogram = \"true\"\n";
    const TRAIN: &str = "version = 1\nkind = \"train\"\n";

    #[test]
    fn train_jobs_restart_three_times_and_command_jobs_never_unless_asked() {
        assert_eq!(parse(TRAIN).unwrap().max_restarts(), 3);
        assert_eq!(parse(COMMAND).unwrap().max_restarts(), 0);
        let asked = format!("{COMMAND}[fault_tolerance]\nmax_restarts = 2\n");
        assert_eq!(parse(&asked).unwrap().max_restarts(), 2);
        let none = format!("{TRAIN}[fault_tolerance]\nmax_restarts = 0\n");
        assert_eq!(parse(&none).unwrap().max_restarts(), 0);
    }

    #[test]
    fn the_fewest_ranks_are_checked_against_the_job_and_its_kind() {
        let data_parallel = |extra: &str| {
            parse(&format!(
                "{TRAIN}[parallel]\ndata = 4\n[fault_tolerance]\n{extra}\n"
            ))
        };
        let spec = data_parallel("min_ranks = 2").unwrap();
        assert_eq!(spec.min_ranks(), Some(2));
        for (extra, expected) in [
            (
                "min_ranks = 5",
                "fault_tolerance.min_ranks: 5, expected 1 to 4",
            ),
            (
                "min_ranks = 0",
                "fault_tolerance.min_ranks: 0, expected 1 to 4",
            ),
        ] {
            let error = data_parallel(extra).unwrap_err();
            assert!(error.contains(expected), "{error}");
        }
        let command = parse(&format!("{COMMAND}[fault_tolerance]\nmin_ranks = 1\n")).unwrap_err();
        assert!(
            command.contains("fault_tolerance.min_ranks: only for data-parallel train jobs"),
            "{command}"
        );
        let servers = parse(&format!(
            "{TRAIN}[parallel]\ndata = 2\ncomm = \"ps\"\n[fault_tolerance]\nmin_ranks = 1\n"
        ))
        .unwrap_err();
        assert!(servers.contains("fault_tolerance.min_ranks"), "{servers}");
    }

    #[test]
    fn hang_timeouts_default_to_a_minute_and_are_bounded() {
        assert_eq!(parse(TRAIN).unwrap().hang_timeout_s(), 60);
        let off = format!("{TRAIN}[fault_tolerance]\nhang_timeout_s = 0\n");
        assert_eq!(parse(&off).unwrap().hang_timeout_s(), 0);
        let error = parse(&format!(
            "{TRAIN}[fault_tolerance]\nhang_timeout_s = 86401\n"
        ))
        .unwrap_err();
        assert!(
            error.contains("fault_tolerance.hang_timeout_s: 86401, expected 0 to 86400"),
            "{error}"
        );
    }

    #[test]
    fn restarts_are_bounded_and_unknown_fields_are_named() {
        let error = parse(&format!("{TRAIN}[fault_tolerance]\nmax_restarts = 101\n")).unwrap_err();
        assert!(
            error.contains("fault_tolerance.max_restarts: 101, expected 0 to 100"),
            "{error}"
        );
        let error = parse(&format!("{TRAIN}[fault_tolerance]\nmax_restarts = -1\n")).unwrap_err();
        assert!(error.contains("fault_tolerance.max_restarts"), "{error}");
        let error = parse(&format!("{TRAIN}[fault_tolerance]\nretries = 1\n")).unwrap_err();
        assert!(error.contains("fault_tolerance"), "{error}");
        assert!(error.contains("retries"), "{error}");
    }
}
