//! cgroup v2 as a container for one rank's process tree.
//!
//! The worker finds the cgroup2 mount (`/proc/self/mounts`; `/sys/fs/cgroup` on a unified
//! host, `/sys/fs/cgroup/unified` on a hybrid one) and its own cgroup (the `0::/path` line of
//! `/proc/self/cgroup`), and creates below it a directory of its own,
//! `cohort-<node id>.<worker pid>`, which holds one cgroup per rank, `<job id>.<rank>`. A rank's
//! process joins its cgroup between fork and exec (by writing `0` to `cgroup.procs`), so every
//! process it ever starts is born inside, whatever process group or session it moves to, and
//! stays inside after its parent dies. `cgroup.kill` (Linux 5.14) kills all of them at once;
//! `cgroup.events` says when none is left (`populated 0`); then the directory is removed.
//!
//! The worker's directory carries its pid so that two workers on one machine never share rank
//! cgroups, even with the same node id and job ids (two test clusters); the rank records in
//! the state directory name the full path, so a restarted worker finds the old ones anyway.

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Finds the mount point of the cgroup2 file system in the text of `/proc/self/mounts`.
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

/// Undoes the octal escapes (`\040` for a space) of a path in `/proc/self/mounts`.
fn unescape_mount_path(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = bytes.get(index + 1..index + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[index], escaped) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                index += 4;
            }
            (byte, _) => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Finds this process's cgroup v2 path (`/a/b`, relative to the cgroup2 mount) in the text of
/// `/proc/self/cgroup`: its `0::` line.
pub fn own_cgroup(cgroup_file: &str) -> Option<String> {
    cgroup_file
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|path| path.trim().to_owned())
}

/// The `cgroup.procs` path of `cgroup` as a C string, made before a fork so that the child
/// allocates nothing.
pub fn procs_path(cgroup: &Path) -> io::Result<CString> {
    CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cgroup path holds a NUL"))
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs`.
///
/// Async-signal-safe (open, write, close; no allocation), for the child between fork and exec.
pub fn enter(procs: &CStr) -> io::Result<()> {
    // SAFETY: `procs` is a valid NUL-terminated path; the buffer passed to write is a static
    // one-byte string; the descriptor is closed on every path after it was opened.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        let error = (written != 1).then(io::Error::last_os_error);
        libc::close(fd);
        match error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// Checks that cgroups can contain ranks here: creates `dir` (the worker's directory), a test
/// cgroup in it, moves a forked child into that cgroup, and checks that `cgroup.kill` exists.
/// Returns why not, in words, when any step fails (and removes what it created).
pub fn probe(dir: &Path) -> Result<(), String> {
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(format!("creating {}: {error}", dir.display())),
    }
    let test = dir.join("probe");
    let outcome = probe_in(&test);
    let _ = std::fs::remove_dir(&test);
    if outcome.is_err() {
        let _ = std::fs::remove_dir(dir);
    }
    outcome
}

fn probe_in(test: &Path) -> Result<(), String> {
    match std::fs::create_dir(test) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(format!("creating {}: {error}", test.display())),
    }
    if !test.join("cgroup.kill").exists() {
        return Err("no cgroup.kill (needs Linux 5.14 or later)".to_owned());
    }
    let procs = procs_path(test).map_err(|error| error.to_string())?;
    // SAFETY: the child only calls async-signal-safe functions (open, write, close, _exit)
    // on memory prepared before the fork, then exits without returning.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        let code = if enter(&procs).is_ok() { 0 } else { 1 };
        // SAFETY: _exit ends the child at once, running nothing of the parent's.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked; `status` is a valid out-pointer.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    let entered = waited == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !entered {
        return Err(format!(
            "a process could not be moved into {}",
            test.display()
        ));
    }
    Ok(())
}

/// Processes in `cgroup` now (none when it does not exist).
pub fn pids(cgroup: &Path) -> Vec<u32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .map(|text| {
            text.lines()
                .filter_map(|pid| pid.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Sends `signal` to every process in `cgroup`.
pub fn signal(cgroup: &Path, signal: i32) {
    for pid in pids(cgroup) {
        crate::process::signal_process(pid, signal);
    }
}

/// Kills every process in `cgroup` with `cgroup.kill`, or, should that fail, SIGKILL to each
/// process listed. A cgroup that does not exist has nothing to kill.
pub fn kill(cgroup: &Path) {
    match std::fs::write(cgroup.join("cgroup.kill"), "1") {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(_) => signal(cgroup, libc::SIGKILL),
    }
}

/// Whether any process is left in `cgroup` or below it (`populated 1` in `cgroup.events`).
/// A cgroup that does not exist is empty.
pub fn populated(cgroup: &Path) -> bool {
    match std::fs::read_to_string(cgroup.join("cgroup.events")) {
        Ok(events) => parse_populated(&events).unwrap_or(true),
        Err(error) if error.kind() == io::ErrorKind::NotFound => false,
        // Unreadable: trust the process list instead.
        Err(_) => !pids(cgroup).is_empty(),
    }
}

/// The `populated` value of the text of `cgroup.events`.
fn parse_populated(events: &str) -> Option<bool> {
    events.lines().find_map(|line| match line.trim() {
        "populated 0" => Some(false),
        "populated 1" => Some(true),
        _ => None,
    })
}

/// Removes an empty cgroup. One that is already gone is not an error.
pub fn remove(cgroup: &Path) -> io::Result<()> {
    match std::fs::remove_dir(cgroup) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// Removes the empty cgroup directories of workers that no longer run (`cohort-<node
/// id>.<pid>` under `parent`, whose pid is gone): a worker killed with nothing left running
/// leaves its directory and empty rank cgroups behind. Populated cgroups stay (removing them
/// fails), for the records of a restarted worker to reclaim; a live worker's directory stays.
/// Returns the directories removed.
pub fn sweep_dead_workers(parent: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix("cohort-"))
            .and_then(|rest| rest.rsplit_once('.'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = entry.path();
        if let Ok(ranks) = std::fs::read_dir(&dir) {
            for rank in ranks.flatten().filter(|rank| rank.path().is_dir()) {
                let _ = std::fs::remove_dir(rank.path());
            }
        }
        if std::fs::remove_dir(&dir).is_ok() {
            removed.push(dir);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_in_hybrid_and_unified_layouts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let escaped = "none /mnt/my\\040cgroups cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount(escaped),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
        assert_eq!(
            cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
    }

    #[test]
    fn the_own_cgroup_is_the_unified_line() {
        let text = "9:name=systemd:/user.slice\n4:memory:/x\n0::/user.slice/session-2.scope\n";
        assert_eq!(
            own_cgroup(text).as_deref(),
            Some("/user.slice/session-2.scope")
        );
        assert_eq!(own_cgroup("0::/\n").as_deref(), Some("/"));
        assert_eq!(own_cgroup("4:memory:/x\n"), None);
    }

    #[test]
    fn only_empty_directories_of_dead_workers_are_swept() {
        let scratch = tempfile::tempdir().unwrap();
        // Beyond any pid_max (2^22): a worker that cannot be alive.
        let dead = scratch.path().join("cohort-node-a.99999999");
        let busy = scratch.path().join("cohort-node-b.99999998");
        let live = scratch
            .path()
            .join(format!("cohort-node-a.{}", std::process::id()));
        let unrelated = scratch.path().join("system.slice");
        for dir in [
            &dead.join("job-1.0"),
            &busy.join("job-2.0"),
            &live,
            &unrelated,
        ] {
            std::fs::create_dir_all(dir).unwrap();
        }
        // A rank cgroup that still holds something cannot be removed.
        std::fs::write(busy.join("job-2.0/cgroup.procs"), "4242\n").unwrap();
        assert_eq!(
            sweep_dead_workers(scratch.path()),
            std::slice::from_ref(&dead)
        );
        assert!(!dead.exists());
        assert!(busy.join("job-2.0").exists() && live.exists() && unrelated.exists());
    }

    #[test]
    fn events_say_whether_the_cgroup_is_populated() {
        assert_eq!(parse_populated("populated 1\nfrozen 0\n"), Some(true));
        assert_eq!(parse_populated("populated 0\nfrozen 0\n"), Some(false));
        assert_eq!(parse_populated("frozen 0\n"), None);
        let missing = Path::new("/nonexistent/cohort-test-cgroup");
        assert!(!populated(missing));
        assert!(pids(missing).is_empty());
        assert!(remove(missing).is_ok());
    }
}
