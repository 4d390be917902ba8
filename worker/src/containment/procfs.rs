//! What `/proc` says about processes: parent, process group, state and start time (from
//! `/proc/<pid>/stat`), the environment a process started with, and the boot id that tells one
//! boot of the machine from the next.

use std::io;

/// Where the kernel publishes the id of the current boot.
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The fields of `/proc/<pid>/stat` the worker uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Process id.
    pub pid: u32,
    /// State letter (`R`, `S`, `D`, `Z`...).
    pub state: char,
    /// Parent's process id.
    pub ppid: u32,
    /// Process group id.
    pub pgrp: u32,
    /// Start time in clock ticks since boot (field 22): with the pid, it names one process
    /// for the whole boot, where a pid alone may be reused.
    pub start_time: u64,
}

impl Stat {
    /// Whether the process still runs (exists and is not a zombie awaiting its reaper).
    pub fn alive(&self) -> bool {
        self.state != 'Z'
    }
}

/// Parses the text of `/proc/<pid>/stat`. The command name (field 2) may hold spaces and
/// parentheses, so the fields are counted from its last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let (head, rest) = text.rsplit_once(')')?;
    let pid = head.split_once('(')?.0.trim().parse().ok()?;
    // `rest` starts at field 3 (state): field N is at index N - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        pid,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// Reads one process's stat; `None` when it is gone (or unreadable).
pub fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Every process visible in `/proc` now, with its stat (processes that vanish while being read
/// are left out).
pub fn all() -> Vec<Stat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat)
        .collect()
}

/// Live (non-zombie) processes of process group `pgid`.
pub fn live_group_members(pgid: u32) -> Vec<Stat> {
    all()
        .into_iter()
        .filter(|process| process.pgrp == pgid && process.alive())
        .collect()
}

/// Whether the environment process `pid` started with holds every `NAME=value` entry of
/// `entries`. False when it cannot be read.
pub fn environment_has(pid: u32, entries: &[&str]) -> bool {
    let Ok(environment) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    entries.iter().all(|wanted| {
        environment
            .split(|&byte| byte == 0)
            .any(|entry| entry == wanted.as_bytes())
    })
}

/// The id of the current boot: records written before a reboot name processes that cannot
/// exist any more.
pub fn boot_id() -> io::Result<String> {
    Ok(std::fs::read_to_string(BOOT_ID_PATH)?.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let text = "4242 (a (weird) name) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 \
                    1 0 987654 1000 100 18446744073709551615";
        let stat = parse_stat(text).unwrap();
        assert_eq!(
            stat,
            Stat {
                pid: 4242,
                state: 'S',
                ppid: 17,
                pgrp: 4242,
                start_time: 987654,
            }
        );
        assert!(stat.alive());
        assert!(parse_stat("12 (cut short) S 1").is_none());
    }

    #[test]
    fn this_process_is_seen_with_its_environment() {
        let me = stat(std::process::id()).unwrap();
        assert_eq!(me.pid, std::process::id());
        assert!(me.alive());
        assert!(me.start_time > 0);
        assert!(all().iter().any(|process| process.pid == me.pid));
        let path = std::env::var("PATH").unwrap_or_default();
        assert!(environment_has(
            std::process::id(),
            &[&format!("PATH={path}")]
        ));
        assert!(!environment_has(
            std::process::id(),
            &["COHORT_TEST_NOT_SET=really"]
        ));
        assert_eq!(boot_id().unwrap().len(), 36);
    }
}
