//! Containment of each rank's whole process tree, so that stopping a rank, a rank's end, or a
//! restarted worker leaves none of its processes behind (a shell's background jobs, a
//! DataLoader's workers).
//!
//! The worker probes once at start which containment it can use:
//!
//! - **cgroup v2** ([`cgroup`]), where the cgroup2 hierarchy is mounted and the worker may create
//!   cgroups under its own: one cgroup per rank, joined before exec. Every descendant stays in
//!   it whatever it does; `cgroup.kill` ends them all; the cgroup outlives a killed worker, so
//!   the next one can kill what it holds.
//! - **process group**, elsewhere: the rank leads its own group and is signalled through it,
//!   and the worker becomes a child subreaper, so descendants orphaned by the rank's end are
//!   re-parented to the worker rather than to init and can still be found (by their
//!   environment) and killed. The worker reaps those that die. A descendant that leaves the
//!   group and outlives the worker escapes; only cgroups close that gap.
//!
//! [`RankTree`] is one rank's tree, however it is contained: signal it, kill it, wait until it
//! is gone, remove its cgroup.
//!
//! - [`cgroup`]: finding the hierarchy, joining, killing and removing cgroups.
//! - [`procfs`]: process facts from `/proc` (group, parent, start time, environment, boot id).

pub mod cgroup;
pub mod procfs;

use std::collections::HashSet;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_proto::env;
use tokio::process::Child;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::process::{self, Launch};

/// Longest wait for a killed tree's processes to be gone.
pub const TREE_GONE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a killed tree is checked while waiting for it to be gone.
const GONE_POLL: Duration = Duration::from_millis(10);
/// How often the orphan reaper looks for dead descendants (process-group containment only).
const REAP_INTERVAL: Duration = Duration::from_secs(1);

/// How this worker contains its ranks. Cheap to clone.
#[derive(Clone)]
pub struct Containment {
    /// Shared state.
    inner: Arc<Inner>,
}

/// What every clone of a [`Containment`] shares.
struct Inner {
    /// The worker's own cgroup directory, holding one cgroup per rank; `None` for process
    /// groups.
    cgroups: Option<PathBuf>,
    /// Pids of rank processes spawned and not yet waited for. Locked while spawning, so that
    /// the orphan reaper never reaps a rank's main process, whose status belongs to its
    /// supervisor.
    leaders: Mutex<HashSet<u32>>,
}

/// One rank's process tree.
#[derive(Debug, Clone)]
pub struct RankTree {
    /// The rank's job.
    job_id: String,
    /// The rank.
    rank: u32,
    /// The rank's cgroup, under cgroup containment.
    cgroup: Option<PathBuf>,
    /// Process group of the rank (its main process's pid); 0 until it started.
    pgid: u32,
}

impl Containment {
    /// Decides the containment of this worker (node `node_id`): cgroup v2 when usable, else
    /// process groups with the worker as child subreaper. Logs which, and why.
    pub fn probe(node_id: &str) -> Self {
        match find_cgroup_dir(node_id).and_then(|dir| cgroup::probe(&dir).map(|()| dir)) {
            Ok(dir) => {
                let swept = dir
                    .parent()
                    .map(cgroup::sweep_dead_workers)
                    .unwrap_or_default();
                if !swept.is_empty() {
                    info!(directories = ?swept, "removed empty cgroups of workers that no longer run");
                }
                info!(containment = "cgroup", cgroup = %dir.display(), "rank process trees are contained in cgroups");
                Self::new(Some(dir))
            }
            Err(why) => {
                let subreaper = become_subreaper();
                warn!(
                    containment = "process-group",
                    subreaper,
                    why,
                    "cgroup v2 is not usable; rank process trees are contained by process group only"
                );
                let containment = Self::new(None);
                if subreaper {
                    containment.start_orphan_reaper();
                }
                containment
            }
        }
    }

    /// Process-group containment without becoming a subreaper (for tests, which must not
    /// change the test process).
    pub fn process_groups() -> Self {
        Self::new(None)
    }

    fn new(cgroups: Option<PathBuf>) -> Self {
        Self {
            inner: Arc::new(Inner {
                cgroups,
                leaders: Mutex::default(),
            }),
        }
    }

    /// `cgroup` or `process-group`, for logs.
    pub fn kind(&self) -> &'static str {
        if self.inner.cgroups.is_some() {
            "cgroup"
        } else {
            "process-group"
        }
    }

    /// The tree rank `rank` of `job_id`'s `attempt` will have (its cgroup not created yet).
    pub fn tree(&self, job_id: &str, rank: u32, attempt: u32) -> RankTree {
        RankTree {
            job_id: job_id.to_owned(),
            rank,
            cgroup: self
                .inner
                .cgroups
                .as_ref()
                .map(|dir| dir.join(crate::records::process_name(job_id, rank, attempt))),
            pgid: 0,
        }
    }

    /// Creates the tree's container (its cgroup) and starts the rank's main process in it, in
    /// a process group of its own; records the group in `tree`.
    pub fn spawn(&self, launch: &Launch<'_>, tree: &mut RankTree) -> Result<Child> {
        let procs: Option<CString> = match &tree.cgroup {
            Some(cgroup) => {
                let io_error = |source| Error::Io {
                    context: format!("creating the rank's cgroup {}", cgroup.display()),
                    source,
                };
                match std::fs::create_dir(cgroup) {
                    Err(error) if error.kind() != std::io::ErrorKind::AlreadyExists => {
                        return Err(io_error(error));
                    }
                    _ => {}
                }
                Some(cgroup::procs_path(cgroup).map_err(io_error)?)
            }
            None => None,
        };
        let mut leaders = lock(&self.inner.leaders);
        let child = process::spawn(launch, procs.as_deref())?;
        let pid = child.id().unwrap_or(0);
        leaders.insert(pid);
        tree.pgid = pid;
        Ok(child)
    }

    /// Notes that the main process `pid` was waited for.
    pub fn waited(&self, pid: u32) {
        lock(&self.inner.leaders).remove(&pid);
    }

    /// Removes the worker's cgroup directory (on shutdown, once every rank is gone). A
    /// directory still holding rank cgroups stays.
    pub fn release(&self) {
        if let Some(dir) = &self.inner.cgroups
            && let Err(error) = cgroup::remove(dir)
        {
            warn!(cgroup = %dir.display(), %error, "could not remove the worker's cgroup");
        }
    }

    /// Reaps, every [`REAP_INTERVAL`], descendants re-parented to this (subreaper) worker that
    /// died, on a thread of its own.
    fn start_orphan_reaper(&self) {
        let containment = self.clone();
        let started = std::thread::Builder::new()
            .name("cohort-reaper".to_owned())
            .spawn(move || {
                loop {
                    containment.reap_orphans();
                    std::thread::sleep(REAP_INTERVAL);
                }
            });
        if let Err(error) = started {
            warn!(%error, "could not start the orphan reaper");
        }
    }

    /// Reaps dead children of the worker that are not rank main processes.
    fn reap_orphans(&self) {
        let me = std::process::id();
        let leaders = lock(&self.inner.leaders);
        for orphan in procfs::all() {
            if orphan.ppid == me && !orphan.alive() && !leaders.contains(&orphan.pid) {
                let mut status = 0;
                // SAFETY: waits without blocking for one dead child that no one else waits for.
                unsafe {
                    libc::waitpid(orphan.pid as i32, &mut status, libc::WNOHANG);
                }
            }
        }
    }

    /// Kills the live children of the worker, other than rank main processes, that carry the
    /// environment of `tree`'s rank: its descendants that left its process group and were
    /// re-parented to the worker. Process-group containment only (cgroups need no search).
    fn kill_escaped(&self, tree: &RankTree) {
        let me = std::process::id();
        let job = format!("{}={}", env::JOB_ID, tree.job_id);
        let rank = format!("{}={}", env::RANK, tree.rank);
        let leaders = lock(&self.inner.leaders);
        for orphan in procfs::all() {
            let escaped = orphan.ppid == me
                && orphan.alive()
                && orphan.pgrp != tree.pgid
                && !leaders.contains(&orphan.pid)
                && procfs::environment_has(orphan.pid, &[&job, &rank]);
            if escaped {
                warn!(job_id = %tree.job_id, rank = tree.rank, pid = orphan.pid, "killing a process that left its rank's process group");
                process::signal_process(orphan.pid, libc::SIGKILL);
                if orphan.pgrp == orphan.pid {
                    process::signal_group(orphan.pid, libc::SIGKILL);
                }
            }
        }
        drop(leaders);
        self.reap_orphans();
    }
}

impl RankTree {
    /// The rank's cgroup, under cgroup containment.
    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_deref()
    }

    /// The rank's process group (0 before it started).
    pub fn pgid(&self) -> u32 {
        self.pgid
    }

    /// Sends `signal` to every process of the tree (SIGTERM on stop).
    pub fn signal(&self, signal: i32) {
        match &self.cgroup {
            Some(cgroup) => cgroup::signal(cgroup, signal),
            None => process::signal_group(self.pgid, signal),
        }
    }

    /// Kills every process of the tree.
    pub fn kill(&self, containment: &Containment) {
        match &self.cgroup {
            Some(cgroup) => cgroup::kill(cgroup),
            None => {
                process::signal_group(self.pgid, libc::SIGKILL);
                containment.kill_escaped(self);
            }
        }
    }

    /// Whether no process of the tree runs any more.
    pub fn gone(&self) -> bool {
        match &self.cgroup {
            Some(cgroup) => !cgroup::populated(cgroup),
            None => self.pgid == 0 || procfs::live_group_members(self.pgid).is_empty(),
        }
    }

    /// Waits (at most `timeout`) until no process of the tree runs; returns whether none does.
    pub async fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.gone() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(GONE_POLL).await;
        }
    }

    /// Kills the tree, waits until it is gone, and removes its cgroup. Returns whether the
    /// tree is known to be gone; if not, the cgroup stays (with a warning).
    pub async fn kill_and_remove(&self, containment: &Containment) -> bool {
        self.kill(containment);
        let gone = self.wait_gone(TREE_GONE_TIMEOUT).await;
        if !gone {
            warn!(
                job_id = %self.job_id,
                rank = self.rank,
                pgid = self.pgid,
                timeout_s = TREE_GONE_TIMEOUT.as_secs_f64(),
                "processes of the rank survived SIGKILL"
            );
            return false;
        }
        if let Some(cgroup) = &self.cgroup
            && let Err(error) = cgroup::remove(cgroup)
        {
            warn!(cgroup = %cgroup.display(), %error, "could not remove the rank's cgroup");
        }
        true
    }
}

/// The worker's cgroup directory for node `node_id`: `cohort-<node id>.<pid>` under the
/// worker's own cgroup in the cgroup2 hierarchy. Says why there is none.
fn find_cgroup_dir(node_id: &str) -> std::result::Result<PathBuf, String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|error| format!("reading /proc/self/mounts: {error}"))?;
    let mount = cgroup::cgroup2_mount(&mounts).ok_or("no cgroup2 file system is mounted")?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|error| format!("reading /proc/self/cgroup: {error}"))?;
    let own = cgroup::own_cgroup(&own).ok_or("/proc/self/cgroup has no cgroup v2 (0::) line")?;
    Ok(mount
        .join(own.trim_start_matches('/'))
        .join(format!("cohort-{node_id}.{}", std::process::id())))
}

/// Makes the worker a child subreaper; returns whether that worked.
fn become_subreaper() -> bool {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER only sets a flag of this process.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0 }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Starts `sh -c script` as rank 0 of `job_id` under `containment`.
    fn start(containment: &Containment, job_id: &str, script: &str) -> (RankTree, Child) {
        let argv = ["sh".to_owned(), "-c".to_owned(), script.to_owned()];
        let env = HashMap::from([
            (env::JOB_ID.to_owned(), job_id.to_owned()),
            (env::RANK.to_owned(), "0".to_owned()),
        ]);
        let mut tree = containment.tree(job_id, 0, 0);
        let child = containment
            .spawn(
                &Launch {
                    argv: &argv,
                    env: &env,
                    working_dir: None,
                },
                &mut tree,
            )
            .unwrap();
        (tree, child)
    }

    /// Polls until `count` processes of the test's job run; returns their pids.
    async fn wait_for_processes(job_id: &str, count: usize) -> Vec<u32> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let job = format!("{}={job_id}", env::JOB_ID);
            let pids: Vec<u32> = procfs::all()
                .into_iter()
                .filter(|p| p.alive() && procfs::environment_has(p.pid, &[&job]))
                .map(|p| p.pid)
                .collect();
            if pids.len() >= count {
                return pids;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "found only {pids:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A shell whose main process is killed alone leaves its background children running;
    /// killing the tree ends them too, whichever containment `containment` is.
    async fn a_tree_outliving_its_main_process_is_killed(containment: Containment, job: &str) {
        let (tree, mut child) = start(&containment, job, "sleep 600 & sleep 600 & wait");
        let pids = wait_for_processes(job, 3).await;
        let leader = child.id().unwrap();
        process::signal_process(leader, libc::SIGKILL);
        child.wait().await.unwrap();
        containment.waited(leader);
        assert!(!tree.gone(), "the background sleeps outlive the shell");
        assert!(tree.kill_and_remove(&containment).await);
        for pid in pids {
            assert!(
                procfs::stat(pid).is_none_or(|stat| !stat.alive()),
                "{pid} survived"
            );
        }
        if let Some(cgroup) = tree.cgroup() {
            assert!(!cgroup.exists());
        }
    }

    #[tokio::test]
    async fn process_group_containment_kills_the_whole_tree() {
        let job = format!("containment-group-{}", std::process::id());
        a_tree_outliving_its_main_process_is_killed(Containment::process_groups(), &job).await;
    }

    #[tokio::test]
    async fn probed_containment_kills_the_whole_tree() {
        let node = format!("unit-{}", std::process::id());
        let containment = Containment::probe(&node);
        eprintln!("containment here: {}", containment.kind());
        let job = format!("containment-probed-{}", std::process::id());
        a_tree_outliving_its_main_process_is_killed(containment.clone(), &job).await;
        containment.release();
        if let Ok(dir) = find_cgroup_dir(&node) {
            assert!(!dir.exists(), "{} is left", dir.display());
        }
    }

    /// Under process-group containment, a descendant that left the rank's group and was
    /// re-parented to the (subreaper) worker is found by its environment, killed and reaped.
    #[tokio::test]
    async fn a_subreaper_kills_and_reaps_descendants_that_left_the_group() {
        // The test process becomes a subreaper and reaps orphans: only where it runs alone
        // (nextest's process per test), or it could reap another test's child.
        if std::env::var("NEXTEST_EXECUTION_MODE").as_deref() != Ok("process-per-test") {
            eprintln!("skipped: needs a process of its own (cargo nextest)");
            return;
        }
        assert!(become_subreaper());
        let containment = Containment::process_groups();
        let job = format!("containment-escaped-{}", std::process::id());
        let (tree, mut child) = start(&containment, &job, "setsid sleep 600 & echo; exit 0");
        child.wait().await.unwrap();
        containment.waited(tree.pgid());
        let me = std::process::id();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let escaped = loop {
            let adopted = wait_for_processes(&job, 1).await.into_iter().find(|&pid| {
                procfs::stat(pid).is_some_and(|stat| stat.ppid == me && stat.pgrp == pid)
            });
            if let Some(pid) = adopted {
                break pid;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the sleep never left the group"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(tree.gone(), "nothing is left in the rank's own group");
        tree.kill(&containment);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        // Killed and reaped: not even a zombie remains.
        while procfs::stat(escaped).is_some() {
            assert!(tokio::time::Instant::now() < deadline, "{escaped} survived");
            tokio::time::sleep(Duration::from_millis(10)).await;
            containment.reap_orphans();
        }
    }

    #[tokio::test]
    async fn a_cgroup_holds_processes_that_leave_the_group() {
        let node = format!("unit-setsid-{}", std::process::id());
        let containment = Containment::probe(&node);
        if containment.kind() != "cgroup" {
            eprintln!("skipped: cgroup v2 is not usable here");
            return;
        }
        let job = format!("containment-setsid-{}", std::process::id());
        let (tree, mut child) = start(&containment, &job, "setsid sleep 600 & wait");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let pids = loop {
            let pids = wait_for_processes(&job, 2).await;
            let escaped = pids
                .iter()
                .any(|&pid| procfs::stat(pid).is_some_and(|stat| stat.pgrp != tree.pgid()));
            if escaped {
                break pids;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "setsid never left the group"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(tree.kill_and_remove(&containment).await);
        child.wait().await.unwrap();
        for pid in pids {
            assert!(
                procfs::stat(pid).is_none_or(|stat| !stat.alive()),
                "{pid} survived"
            );
        }
        containment.release();
    }
}
