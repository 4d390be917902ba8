//! Who may do what: a pure decision over an authenticated caller and an action.
//!
//! | caller | may |
//! |---|---|
//! | an admin | everything a user may, on every job; manage users; read the audit log |
//! | a user | submit jobs; see, follow and cancel their own; list nodes |
//! | a worker (the join token) | register, heartbeat, push logs (its session decides for which node and job) |
//! | a job (its token) | that job's rendezvous and metrics, while it runs |

use std::fmt;

use cohort_proto::{JobId, SweepId};

use crate::error::{Error, Result};

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A user, by their token.
    User {
        /// Their name.
        name: String,
        /// Whether they administer the cluster.
        admin: bool,
    },
    /// A worker daemon of this cluster, by the join token.
    Worker,
    /// A process of a job, by the job's token.
    Job(JobId),
}

impl Caller {
    /// The user's name, for a user.
    pub fn user_name(&self) -> Option<&str> {
        match self {
            Caller::User { name, .. } => Some(name),
            Caller::Worker | Caller::Job(_) => None,
        }
    }
}

impl fmt::Display for Caller {
    /// `user alice`, `a worker`, `job train-7`: how the audit log and refusals name a caller.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::User { name, .. } => write!(formatter, "user {name}"),
            Caller::Worker => formatter.write_str("a worker"),
            Caller::Job(job_id) => write!(formatter, "job {job_id}"),
        }
    }
}

/// What a caller asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    /// Submit a job.
    Submit,
    /// Read a job's record, events or logs; `owner` submitted it.
    ReadJob {
        /// The job.
        job_id: &'a JobId,
        /// Its submitter.
        owner: &'a str,
    },
    /// Cancel a job; `owner` submitted it.
    CancelJob {
        /// The job.
        job_id: &'a JobId,
        /// Its submitter.
        owner: &'a str,
    },
    /// Read a sweep and its trials; `owner` submitted it.
    ReadSweep {
        /// The sweep.
        sweep_id: &'a SweepId,
        /// Its submitter.
        owner: &'a str,
    },
    /// Cancel a sweep; `owner` submitted it.
    CancelSweep {
        /// The sweep.
        sweep_id: &'a SweepId,
        /// Its submitter.
        owner: &'a str,
    },
    /// List jobs (a user sees their own in the list).
    ListJobs,
    /// List nodes.
    ListNodes,
    /// List the scheduler's queues and who holds what in them.
    ListQueues,
    /// Read `/metrics` (a user sees their own jobs' series, and the cluster's).
    ReadMetrics,
    /// Drain a node, or take the drain back.
    DrainNode,
    /// Add, list or remove users.
    ManageUsers,
    /// Read the audit log.
    ReadAudit,
    /// Register a worker, heartbeat, push logs.
    Join,
    /// Use a job's rendezvous or report its metrics.
    UseJob {
        /// The job named in the request.
        job_id: &'a JobId,
    },
}

/// Whether `caller` may do `action`: `Ok`, or [`Error::PermissionDenied`] saying who may.
pub fn authorize(caller: &Caller, action: Action<'_>) -> Result<()> {
    let allowed = match (caller, action) {
        (Caller::User { admin: true, .. }, action) => {
            !matches!(action, Action::Join | Action::UseJob { .. })
        }
        (
            Caller::User { name, .. },
            Action::ReadJob { owner, .. }
            | Action::CancelJob { owner, .. }
            | Action::ReadSweep { owner, .. }
            | Action::CancelSweep { owner, .. },
        ) => name == owner,
        (
            Caller::User { .. },
            Action::Submit
            | Action::ListJobs
            | Action::ListNodes
            | Action::ListQueues
            | Action::ReadMetrics,
        ) => true,
        (Caller::Worker, Action::Join | Action::ListNodes) => true,
        (Caller::Job(own), Action::UseJob { job_id }) => own == job_id,
        (Caller::Job(_), Action::ListNodes) => true,
        _ => false,
    };
    if allowed {
        return Ok(());
    }
    let who_may = match action {
        Action::Submit | Action::ListJobs | Action::ListQueues | Action::ReadMetrics => "users",
        Action::ReadJob { .. }
        | Action::CancelJob { .. }
        | Action::ReadSweep { .. }
        | Action::CancelSweep { .. } => "the user who submitted it and admins",
        Action::ListNodes => "any authenticated caller",
        Action::ManageUsers | Action::ReadAudit | Action::DrainNode => "admins",
        Action::Join => "workers holding the cluster's join token",
        Action::UseJob { .. } => "the job's own processes, with its token",
    };
    Err(Error::PermissionDenied(format!(
        "{caller} may not {}: only {who_may} may",
        describe(action)
    )))
}

/// Whether `caller` sees a job submitted by `owner` in a listing.
pub fn sees_job(caller: &Caller, owner: &str) -> bool {
    match caller {
        Caller::User { admin: true, .. } => true,
        Caller::User { .. } => caller.user_name() == Some(owner),
        Caller::Worker | Caller::Job(_) => false,
    }
}

/// `cancel job train-7`: an action as a refusal names it.
fn describe(action: Action<'_>) -> String {
    match action {
        Action::Submit => "submit jobs".to_owned(),
        Action::ReadJob { job_id, .. } => format!("read job {job_id}"),
        Action::CancelJob { job_id, .. } => format!("cancel job {job_id}"),
        Action::ReadSweep { sweep_id, .. } => format!("read sweep {sweep_id}"),
        Action::CancelSweep { sweep_id, .. } => format!("cancel sweep {sweep_id}"),
        Action::ListJobs => "list jobs".to_owned(),
        Action::ListNodes => "list nodes".to_owned(),
        Action::ListQueues => "list queues".to_owned(),
        Action::ReadMetrics => "read metrics".to_owned(),
        Action::DrainNode => "drain nodes".to_owned(),
        Action::ManageUsers => "manage users".to_owned(),
        Action::ReadAudit => "read the audit log".to_owned(),
        Action::Join => "act as a worker".to_owned(),
        Action::UseJob { job_id } => format!("use job {job_id}'s rendezvous or metrics"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> Caller {
        Caller::User {
            name: name.to_owned(),
            admin: false,
        }
    }

    fn admin() -> Caller {
        Caller::User {
            name: "root".to_owned(),
            admin: true,
        }
    }

    #[test]
    fn the_table_of_who_may_do_what() {
        let job = JobId::new("job-1").unwrap();
        let other = JobId::new("job-2").unwrap();
        let read = Action::ReadJob {
            job_id: &job,
            owner: "alice",
        };
        let cancel = Action::CancelJob {
            job_id: &job,
            owner: "alice",
        };
        let use_job = Action::UseJob { job_id: &job };
        let sweep = SweepId::new("sweep-3").unwrap();
        let read_sweep = Action::ReadSweep {
            sweep_id: &sweep,
            owner: "alice",
        };
        let cancel_sweep = Action::CancelSweep {
            sweep_id: &sweep,
            owner: "alice",
        };
        let cases: Vec<(Caller, Action<'_>, bool)> = vec![
            (user("alice"), Action::Submit, true),
            (user("alice"), read_sweep, true),
            (user("alice"), cancel_sweep, true),
            (user("bob"), read_sweep, false),
            (user("bob"), cancel_sweep, false),
            (admin(), cancel_sweep, true),
            (Caller::Worker, read_sweep, false),
            (Caller::Job(job.clone()), cancel_sweep, false),
            (user("alice"), read, true),
            (user("alice"), cancel, true),
            (user("bob"), read, false),
            (user("bob"), cancel, false),
            (user("bob"), Action::ListJobs, true),
            (user("bob"), Action::ListNodes, true),
            (user("bob"), Action::ListQueues, true),
            (Caller::Worker, Action::ListQueues, false),
            (user("bob"), Action::ManageUsers, false),
            (user("bob"), Action::ReadAudit, false),
            (user("bob"), Action::DrainNode, false),
            (admin(), Action::DrainNode, true),
            (Caller::Worker, Action::DrainNode, false),
            (user("bob"), Action::Join, false),
            (user("bob"), use_job, false),
            (admin(), read, true),
            (admin(), cancel, true),
            (admin(), Action::ManageUsers, true),
            (admin(), Action::ReadAudit, true),
            (admin(), Action::Join, false),
            (admin(), use_job, false),
            (Caller::Worker, Action::Join, true),
            (Caller::Worker, Action::Submit, false),
            (Caller::Worker, read, false),
            (Caller::Worker, use_job, false),
            (Caller::Job(job.clone()), use_job, true),
            (Caller::Job(other.clone()), use_job, false),
            (Caller::Job(job.clone()), Action::Submit, false),
            (Caller::Job(job.clone()), cancel, false),
            (Caller::Job(job.clone()), Action::Join, false),
        ];
        for (caller, action, expected) in cases {
            let decided = authorize(&caller, action);
            assert_eq!(
                decided.is_ok(),
                expected,
                "{caller} {action:?}: {decided:?}"
            );
            if let Err(error) = decided {
                let message = error.to_string();
                assert!(message.starts_with(&caller.to_string()), "{message}");
                assert!(message.contains("only"), "{message}");
            }
        }
    }

    #[test]
    fn listings_show_users_their_own_jobs_and_admins_all() {
        assert!(sees_job(&user("alice"), "alice"));
        assert!(!sees_job(&user("alice"), "bob"));
        assert!(sees_job(&admin(), "bob"));
        assert!(!sees_job(&Caller::Worker, "bob"));
    }
}
