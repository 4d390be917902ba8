//! Ranks that outlived their worker: found at start from the rank records the previous worker
//! left in the state directory ([`crate::records`]), killed, and reported, before this worker
//! registers and offers its devices again.
//!
//! A killed worker's ranks lose their main process to the parent-death signal, but not the
//! processes those started (a shell's background jobs, DataLoader workers): they keep the
//! rank's devices busy. For each record of the current boot the worker kills what is left of
//! the rank (its cgroup, or else its process group, guarded against reused pids by the
//! recorded start time), waits until none of it runs, and removes the record and the cgroup.
//! Each rank of which something was killed is reported as exited by SIGKILL with
//! `STOP_CAUSE_WORKER_RESTARTED`, so the coordinator learns why its job failed. Records from an
//! earlier boot name processes that cannot exist any more; they are just removed.

use std::path::Path;

use cohort_proto::v1::{RankReport, RankState, StopCause};
use tracing::{info, warn};

use crate::containment::procfs::{self, Stat};
use crate::containment::{TREE_GONE_TIMEOUT, cgroup};
use crate::process;
use crate::records::{RankRecord, StateDir};

/// Detail of the report of a rank killed at start.
pub const RESTART_DETAIL: &str =
    "killed when the worker restarted: the rank outlived its previous worker";
/// How often a leftover is checked while waiting for it to be gone.
const POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Kills every leftover rank of the state directory's previous worker and waits until each is
/// gone (at most [`TREE_GONE_TIMEOUT`] each). Returns the reports of the ranks of which
/// something was still running.
pub async fn reclaim(state: &StateDir) -> Vec<RankReport> {
    let (records, bad) = match state.list() {
        Ok(listing) => listing,
        Err(error) => {
            warn!(%error, "could not read the rank records of the previous worker");
            return Vec::new();
        }
    };
    for bad in bad {
        warn!(path = %bad.path.display(), problem = bad.problem, "removing an unreadable rank record");
        let _ = std::fs::remove_file(&bad.path);
    }
    let boot_id = match procfs::boot_id() {
        Ok(boot_id) => boot_id,
        Err(error) => {
            warn!(%error, records = records.len(), "no boot id: leftover ranks cannot be told from processes of an earlier boot; their records are left alone");
            return Vec::new();
        }
    };
    let mut reports = Vec::new();
    for record in records {
        if record.boot_id != boot_id {
            info!(
                job_id = record.job_id,
                rank = record.rank,
                "rank record of an earlier boot: nothing of it runs"
            );
            forget(state, &record);
            continue;
        }
        if let Some(report) = reclaim_rank(state, &record).await {
            reports.push(report);
        }
    }
    reports
}

/// Kills what is left of one recorded rank; returns its report if anything was.
async fn reclaim_rank(state: &StateDir, record: &RankRecord) -> Option<RankReport> {
    let mut killed = kill_leftover(record);
    let deadline = tokio::time::Instant::now() + TREE_GONE_TIMEOUT;
    let gone = loop {
        if record
            .cgroup
            .as_deref()
            .is_none_or(|c| !cgroup::populated(c))
            && doomed(record, &procfs::all()).is_empty()
        {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(POLL).await;
        // Whatever was forked between the listing and the kill.
        killed.extend(kill_leftover(record));
    };
    killed.sort_unstable();
    killed.dedup();
    if gone {
        forget(state, record);
    } else {
        warn!(
            job_id = record.job_id,
            rank = record.rank,
            pids = ?killed,
            timeout_s = TREE_GONE_TIMEOUT.as_secs_f64(),
            "processes of a leftover rank survived SIGKILL; its record stays for the next start"
        );
    }
    if killed.is_empty() {
        info!(
            job_id = record.job_id,
            rank = record.rank,
            "nothing of a rank of the previous worker was left"
        );
        return None;
    }
    warn!(
        job_id = record.job_id,
        rank = record.rank,
        pids = ?killed,
        cgroup = ?record.cgroup,
        pgid = record.pgid,
        "killed a rank that outlived the previous worker"
    );
    Some(RankReport {
        job_id: record.job_id.clone(),
        rank: record.rank,
        state: RankState::Exited as i32,
        pid: record.pgid,
        exit_code: None,
        signal: Some(libc::SIGKILL),
        exited_at_unix_ms: crate::ranks::now_ms(),
        detail: RESTART_DETAIL.to_owned(),
        stop_cause: StopCause::WorkerRestarted as i32,
        attempt: record.attempt,
    })
}

/// Sends SIGKILL to every live process of the recorded rank; returns their pids.
fn kill_leftover(record: &RankRecord) -> Vec<u32> {
    let mut killed = Vec::new();
    if let Some(cgroup) = &record.cgroup {
        let pids = cgroup::pids(cgroup);
        if !pids.is_empty() {
            cgroup::kill(cgroup);
            killed.extend(pids);
        }
    }
    let processes = procfs::all();
    let members = doomed(record, &processes);
    let leader_is_ours = processes
        .iter()
        .any(|p| p.pid == record.pgid && p.alive() && p.start_time == record.start_time);
    if leader_is_ours {
        // The whole group at once, including what it forks meanwhile.
        process::signal_group(record.pgid, libc::SIGKILL);
    } else {
        for pid in &members {
            process::signal_process(*pid, libc::SIGKILL);
        }
    }
    killed.extend(members);
    killed
}

/// The live processes of the recorded rank's process group that are the rank's: all of them
/// while the group's leader is the recorded process (same pid and start time); none when the
/// leader is another process (the pid was reused); when the leader is gone, the members started
/// no earlier than it (a pid still in use as a group id is never handed out again, so the
/// group is the rank's).
fn doomed(record: &RankRecord, processes: &[Stat]) -> Vec<u32> {
    if record.pgid == 0 {
        return Vec::new();
    }
    let members = processes
        .iter()
        .filter(|p| p.pgrp == record.pgid && p.alive());
    match processes.iter().find(|p| p.pid == record.pgid && p.alive()) {
        Some(leader) if leader.start_time != record.start_time => Vec::new(),
        Some(_) => members.map(|p| p.pid).collect(),
        None => members
            .filter(|p| p.start_time >= record.start_time)
            .map(|p| p.pid)
            .collect(),
    }
}

/// Removes the record of a rank known to be gone, its cgroup, and the cgroup's parent (the
/// previous worker's directory) once that is empty.
fn forget(state: &StateDir, record: &RankRecord) {
    if let Some(cgroup) = &record.cgroup {
        if let Err(error) = cgroup::remove(cgroup) {
            warn!(cgroup = %cgroup.display(), %error, "could not remove a leftover rank's cgroup");
        }
        if let Some(parent) = cgroup.parent().filter(|dir| is_worker_dir(dir)) {
            // Fails, harmlessly, while it still holds other ranks' cgroups.
            let _ = std::fs::remove_dir(parent);
        }
    }
    if let Err(error) = state.remove(&record.job_id, record.rank, record.attempt) {
        warn!(%error, "could not remove a rank record");
    }
}

/// Whether `dir` is a worker's cgroup directory (`cohort-<node id>.<pid>`).
fn is_worker_dir(dir: &Path) -> bool {
    dir.file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| name.starts_with("cohort-"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use cohort_proto::env;

    use super::*;
    use crate::containment::Containment;
    use crate::process::Launch;

    fn member(pid: u32, pgrp: u32, start_time: u64) -> Stat {
        Stat {
            pid,
            state: 'S',
            ppid: 1,
            pgrp,
            start_time,
        }
    }

    fn recorded(pgid: u32, start_time: u64) -> RankRecord {
        RankRecord {
            job_id: "job-1".to_owned(),
            rank: 0,
            attempt: 0,
            cgroup: None,
            pgid,
            boot_id: String::new(),
            start_time,
        }
    }

    #[test]
    fn only_processes_of_the_recorded_group_are_doomed() {
        let record = recorded(100, 5000);
        let others = member(300, 300, 100);
        // The leader is the recorded process: its whole group goes.
        let processes = [member(100, 100, 5000), member(101, 100, 5001), others];
        assert_eq!(doomed(&record, &processes), [100, 101]);
        // The pid was reused by a process of another start time: nothing is the rank's.
        let processes = [member(100, 100, 9000), member(101, 100, 9001), others];
        assert!(doomed(&record, &processes).is_empty());
        // The leader died; the members it left started after it.
        let processes = [member(101, 100, 5001), member(102, 100, 6000), others];
        assert_eq!(doomed(&record, &processes), [101, 102]);
        // Zombies and a record of a rank that never started name nothing.
        let zombie = Stat {
            state: 'Z',
            ..member(101, 100, 5001)
        };
        assert!(doomed(&record, &[zombie]).is_empty());
        assert!(doomed(&recorded(0, 0), &[member(5, 0, 0)]).is_empty());
    }

    /// Starts a rank that backgrounds children, records it as a worker would, then "loses"
    /// the worker (nothing is killed) and reclaims: every process of it is gone, the record and
    /// cgroup removed, and the rank reported killed.
    async fn leftovers_are_killed_and_reported(containment: Containment, job_id: &str) {
        let scratch = tempfile::tempdir().unwrap();
        let state = StateDir::open(scratch.path()).unwrap();
        let argv = [
            "sh".to_owned(),
            "-c".to_owned(),
            "sleep 600 & sleep 600 & echo started; wait".to_owned(),
        ];
        let environment = HashMap::from([(env::JOB_ID.to_owned(), job_id.to_owned())]);
        let mut tree = containment.tree(job_id, 3, 0);
        let mut child = containment
            .spawn(
                &Launch {
                    argv: &argv,
                    env: &environment,
                    working_dir: None,
                },
                &mut tree,
            )
            .unwrap();
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line)
            .await
            .unwrap();
        assert_eq!(line.trim(), "started");
        let pgid = tree.pgid();
        let members: Vec<u32> = procfs::live_group_members(pgid)
            .iter()
            .map(|p| p.pid)
            .collect();
        assert_eq!(members.len(), 3, "{members:?}");
        state
            .write(&RankRecord {
                job_id: job_id.to_owned(),
                rank: 3,
                attempt: 0,
                cgroup: tree.cgroup().map(Path::to_path_buf),
                pgid,
                boot_id: procfs::boot_id().unwrap(),
                start_time: procfs::stat(pgid).unwrap().start_time,
            })
            .unwrap();
        // A record of an earlier boot is only removed.
        state
            .write(&RankRecord {
                boot_id: "an-earlier-boot".to_owned(),
                ..recorded(pgid, 0)
            })
            .unwrap();

        let reports = reclaim(&state).await;
        child.wait().await.unwrap();
        containment.waited(pgid);
        assert_eq!(reports.len(), 1, "{reports:?}");
        let report = &reports[0];
        assert_eq!((report.job_id.as_str(), report.rank), (job_id, 3));
        assert_eq!(report.state, RankState::Exited as i32);
        assert_eq!(report.signal, Some(libc::SIGKILL));
        assert_eq!(report.stop_cause, StopCause::WorkerRestarted as i32);
        assert_eq!(report.detail, RESTART_DETAIL);
        for pid in members {
            assert!(
                procfs::stat(pid).is_none_or(|p| !p.alive()),
                "{pid} survived"
            );
        }
        assert!(state.list().unwrap().0.is_empty());
        if let Some(cgroup) = tree.cgroup() {
            assert!(!cgroup.exists());
        }
        // Nothing left, nothing reported.
        assert!(reclaim(&state).await.is_empty());
        containment.release();
    }

    #[tokio::test]
    async fn leftovers_in_a_process_group_are_killed_and_reported() {
        let job = format!("leftover-group-{}", std::process::id());
        leftovers_are_killed_and_reported(Containment::process_groups(), &job).await;
    }

    #[tokio::test]
    async fn leftovers_under_the_probed_containment_are_killed_and_reported() {
        let node = format!("unit-leftovers-{}", std::process::id());
        let job = format!("leftover-probed-{}", std::process::id());
        leftovers_are_killed_and_reported(Containment::probe(&node), &job).await;
    }
}
