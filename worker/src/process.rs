//! Operating-system side of a rank's main process: spawning it in its own process group (and,
//! under cgroup containment, in its cgroup), signalling that group, and reading its output line
//! by line with a bound on line length. Containing the whole tree is
//! [`crate::containment`]'s job.

use std::collections::HashMap;
use std::ffi::CStr;
use std::path::Path;
use std::process::Stdio;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::process::{Child, Command};

use crate::error::{Error, Result};

/// Longest line forwarded; the rest of a longer line is cut.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Everything needed to start one rank process.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    /// Program and arguments.
    pub argv: &'a [String],
    /// Environment added to the worker's own.
    pub env: &'a HashMap<String, String>,
    /// Working directory; the worker's own when `None`.
    pub working_dir: Option<&'a Path>,
}

/// Starts the process in a new process group (so that stopping it reaches every process it
/// started) with piped stdout and stderr. With `cgroup_procs` (a cgroup's `cgroup.procs`), the
/// process joins that cgroup before it executes the program, so all it ever starts is born
/// inside. On Linux the process also gets SIGKILL if the worker dies.
pub fn spawn(launch: &Launch<'_>, cgroup_procs: Option<&CStr>) -> Result<Child> {
    let (program, args) = launch
        .argv
        .split_first()
        .ok_or_else(|| Error::Config("rank command is empty".to_owned()))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(launch.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    if let Some(dir) = launch.working_dir {
        command.current_dir(dir);
    }
    if let Some(procs) = cgroup_procs {
        let procs = procs.to_owned();
        // SAFETY: the hook only opens, writes and closes (async-signal-safe) on a path
        // allocated before the fork.
        unsafe {
            command.pre_exec(move || crate::containment::cgroup::enter(&procs));
        }
    }
    die_with_parent(&mut command);
    command.spawn().map_err(|source| Error::Io {
        context: format!("starting {program:?}"),
        source,
    })
}

/// Makes the child receive SIGKILL when the process that spawned it dies (Linux; elsewhere a
/// no-op). A parent that died before the child set this up makes the child exit at once.
pub fn die_with_parent(command: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        // SAFETY: prctl and getppid are async-signal-safe and touch no memory of the parent.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() as u32 != parent {
                    // The parent died between fork and prctl: no signal will come.
                    libc::_exit(137);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// SIGTERM, for callers that do not link libc.
pub const SIGTERM: i32 = libc::SIGTERM;

/// Sends `signal` to one process. A process that is already gone is not an error.
pub fn signal_process(pid: u32, signal: i32) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// Sends `signal` to every process of the group led by `pid`. A group that is already gone is
/// not an error.
pub fn signal_group(pid: u32, signal: i32) {
    let Ok(pid) = i32::try_from(pid) else {
        return;
    };
    if pid <= 0 {
        return;
    }
    // SAFETY: kill has no memory-safety preconditions; a negative pid names the process group.
    unsafe {
        libc::kill(-pid, signal);
    }
}

/// Reads one line of at most [`MAX_LINE_BYTES`] into `line` (without the newline; invalid
/// UTF-8 replaced). Returns false at end of input. The rest of an overlong line is skipped.
pub async fn read_bounded_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    bytes: &mut Vec<u8>,
    line: &mut String,
) -> std::io::Result<bool> {
    bytes.clear();
    line.clear();
    let mut saw_any = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            break;
        }
        saw_any = true;
        let (chunk, consumed, done) = match available.iter().position(|&b| b == b'\n') {
            Some(newline) => (&available[..newline], newline + 1, true),
            None => (available, available.len(), false),
        };
        let room = MAX_LINE_BYTES.saturating_sub(bytes.len());
        bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
        reader.consume(consumed);
        if done {
            break;
        }
    }
    if !saw_any {
        return Ok(false);
    }
    if bytes.last() == Some(&b'\r') {
        bytes.pop();
    }
    line.push_str(&String::from_utf8_lossy(bytes));
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_split_and_bounded() {
        let long = "x".repeat(MAX_LINE_BYTES + 100);
        let input = format!("one\r\ntwo\n{long}\nlast");
        let mut reader = tokio::io::BufReader::with_capacity(64, input.as_bytes());
        let (mut bytes, mut line) = (Vec::new(), String::new());
        let mut lines = Vec::new();
        while read_bounded_line(&mut reader, &mut bytes, &mut line)
            .await
            .unwrap()
        {
            lines.push(line.clone());
        }
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], "one");
        assert_eq!(lines[1], "two");
        assert_eq!(lines[2].len(), MAX_LINE_BYTES);
        assert_eq!(lines[3], "last");
    }

    #[tokio::test]
    async fn stopping_a_group_reaches_its_children() {
        let argv = [
            "sh".to_owned(),
            "-c".to_owned(),
            "sleep 600 & sleep 600; wait".to_owned(),
        ];
        let env = HashMap::new();
        let mut child = spawn(
            &Launch {
                argv: &argv,
                env: &env,
                working_dir: None,
            },
            None,
        )
        .unwrap();
        let pid = child.id().unwrap();
        signal_group(pid, libc::SIGKILL);
        let status = child.wait().await.unwrap();
        assert!(!status.success());
        // The background sleep was in the same group: nothing of the group remains (zombies
        // awaiting their reaper do not count).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while live_group_members(pid) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "a process of the group survived"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Counts processes of group `pgid` that are not zombies, from /proc.
    fn live_group_members(pgid: u32) -> usize {
        let mut count = 0;
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // Fields after the parenthesised command: state ppid pgrp ...
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let fields: Vec<_> = rest.split_whitespace().collect();
            if fields.len() > 2 && fields[2] == pgid.to_string() && fields[0] != "Z" {
                count += 1;
            }
        }
        count
    }

    #[test]
    fn empty_command_is_an_error() {
        let env = HashMap::new();
        let error = spawn(
            &Launch {
                argv: &[],
                env: &env,
                working_dir: None,
            },
            None,
        )
        .unwrap_err();
        assert!(error.to_string().contains("empty"));
    }
}
