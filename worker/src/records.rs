//! The worker's state directory and the rank records in it: what a worker that was killed
//! left behind for the next one with the same state directory.
//!
//! Before a rank's process starts, the worker writes a record of it (`<job id>.<rank>.rank`):
//! the job and rank, the rank's cgroup, the boot id, and once the process exists its process
//! group and start time. Each write is atomic (a temporary file, fsync, rename, fsync of the
//! directory), so a record is either the old or the new one, never half written. The record
//! is removed once the rank's whole process tree is known to be dead. A record found at start
//! is therefore a rank whose end nobody made sure of ([`crate::leftovers`]).
//!
//! The directory (mode 0700) is locked (`flock` on `lock`) for the worker's lifetime: a second
//! worker on the same directory would take the first one's live ranks for leftovers and kill
//! them, so it refuses to start instead.
//!
//! A record is a few `name=value` lines:
//!
//! ```text
//! job_id=train-3
//! rank=1
//! attempt=0
//! cgroup=/sys/fs/cgroup/unified/cohort-node-a.4242/train-3.1
//! pgid=5150
//! boot_id=e041a848-0344-4ea2-9f0a-2fc1ea8cb60e
//! start_time=987654
//! ```

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// File name suffix of rank records.
const RECORD_SUFFIX: &str = ".rank";
/// File the worker holds locked while it runs.
const LOCK_FILE: &str = "lock";

/// One rank as recorded in the state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankRecord {
    /// The rank's job.
    pub job_id: String,
    /// The rank.
    pub rank: u32,
    /// The job attempt the rank's process belongs to (0 in records written before restarts).
    pub attempt: u32,
    /// The rank's cgroup, under cgroup containment.
    pub cgroup: Option<PathBuf>,
    /// The rank's process group (its main process's pid); 0 while it had not started.
    pub pgid: u32,
    /// Boot id of the machine when the rank started.
    pub boot_id: String,
    /// Start time of the rank's main process, clock ticks since boot (`/proc/<pid>/stat`
    /// field 22); 0 while it had not started.
    pub start_time: u64,
}

impl RankRecord {
    /// The record's text.
    pub fn encode(&self) -> String {
        let cgroup = self
            .cgroup
            .as_ref()
            .map_or(String::new(), |path| path.display().to_string());
        format!(
            "job_id={}\nrank={}\nattempt={}\ncgroup={cgroup}\npgid={}\nboot_id={}\nstart_time={}\n",
            self.job_id, self.rank, self.attempt, self.pgid, self.boot_id, self.start_time
        )
    }

    /// Parses a record's text; says what is wrong with it otherwise.
    pub fn decode(text: &str) -> std::result::Result<Self, String> {
        let mut record = Self {
            job_id: String::new(),
            rank: 0,
            attempt: 0,
            cgroup: None,
            pgid: 0,
            boot_id: String::new(),
            start_time: 0,
        };
        let (mut has_job, mut has_rank) = (false, false);
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            let (name, value) = line
                .split_once('=')
                .ok_or_else(|| format!("line {line:?}: expected name=value"))?;
            let number = |what: &str| format!("{name} = {value:?}: expected {what}");
            match name {
                "job_id" => (record.job_id, has_job) = (value.to_owned(), true),
                "rank" => {
                    record.rank = value.parse().map_err(|_| number("a rank"))?;
                    has_rank = true;
                }
                "attempt" => record.attempt = value.parse().map_err(|_| number("an attempt"))?,
                "cgroup" => record.cgroup = (!value.is_empty()).then(|| PathBuf::from(value)),
                "pgid" => record.pgid = value.parse().map_err(|_| number("a process id"))?,
                "boot_id" => record.boot_id = value.to_owned(),
                "start_time" => {
                    record.start_time = value.parse().map_err(|_| number("clock ticks"))?;
                }
                // Fields of a later version are no reason to lose the record.
                _ => {}
            }
        }
        if !has_job || record.job_id.is_empty() || !has_rank {
            return Err("expected job_id and rank".to_owned());
        }
        Ok(record)
    }
}

/// Names one process of a job on this worker, in record file and cgroup names:
/// `<job id>.<rank>`, with `.a<attempt>` after it for a restarted job's later attempts.
pub fn process_name(job_id: &str, rank: u32, attempt: u32) -> String {
    match attempt {
        0 => format!("{job_id}.{rank}"),
        attempt => format!("{job_id}.{rank}.a{attempt}"),
    }
}

/// A record file that could not be read, and why.
#[derive(Debug)]
pub struct BadRecord {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub problem: String,
}

/// The session file's name in the state directory.
const SESSION_FILE: &str = "session";

/// The worker's state directory, locked for as long as this value lives.
#[derive(Debug)]
pub struct StateDir {
    /// The directory.
    path: PathBuf,
    /// The locked `lock` file; the lock goes with the descriptor, which children do not
    /// inherit (close-on-exec), so it ends exactly when the worker does.
    _lock: File,
}

impl StateDir {
    /// Creates the directory (mode 0700) if needed and locks it. Fails when another live
    /// process holds it.
    pub fn open(path: &Path) -> Result<Self> {
        let io_error = |context: String| move |source| Error::Io { context, source };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io_error(format!(
                "creating state directory {}",
                path.display()
            )))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(
            io_error(format!("securing state directory {}", path.display())),
        )?;
        let lock_path = path.join(LOCK_FILE);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error(format!("opening {}", lock_path.display())))?;
        // SAFETY: flock on a descriptor this function owns.
        let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked != 0 {
            return Err(Error::StateDirInUse(path.to_owned()));
        }
        Ok(Self {
            path: path.to_owned(),
            _lock: lock,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record_path(&self, job_id: &str, rank: u32, attempt: u32) -> PathBuf {
        let name = process_name(job_id, rank, attempt);
        self.path.join(format!("{name}{RECORD_SUFFIX}"))
    }

    /// The session id this node's worker was last issued, if it kept one.
    pub fn read_session(&self) -> Option<String> {
        std::fs::read_to_string(self.path.join(SESSION_FILE))
            .ok()
            .map(|text| text.trim().to_owned())
            .filter(|id| !id.is_empty())
    }

    /// Keeps the session id the coordinator issued, so that a restarted worker can show it
    /// is the node's own (the directory is the owner's alone).
    pub fn write_session(&self, session_id: &str) -> Result<()> {
        let path = self.path.join(SESSION_FILE);
        let temporary = self.path.join(".session.tmp");
        let written = (|| -> io::Result<()> {
            let mut file = File::create(&temporary)?;
            file.write_all(session_id.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)
        })();
        written.map_err(|source| Error::Io {
            context: format!("writing {}", path.display()),
            source,
        })
    }

    /// Writes (or replaces) a rank's record atomically and durably.
    pub fn write(&self, record: &RankRecord) -> Result<()> {
        let path = self.record_path(&record.job_id, record.rank, record.attempt);
        let temporary = self
            .path
            .join(format!(".{}.{}.tmp", record.job_id, record.rank));
        let written = (|| -> io::Result<()> {
            let mut file = File::create(&temporary)?;
            file.write_all(record.encode().as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)?;
            File::open(&self.path)?.sync_all()
        })();
        written.map_err(|source| {
            let _ = std::fs::remove_file(&temporary);
            Error::Io {
                context: format!("writing rank record {}", path.display()),
                source,
            }
        })
    }

    /// Removes a rank's record (one that is already gone is not an error).
    pub fn remove(&self, job_id: &str, rank: u32, attempt: u32) -> Result<()> {
        let path = self.record_path(job_id, rank, attempt);
        match std::fs::remove_file(&path) {
            Err(source) if source.kind() != io::ErrorKind::NotFound => Err(Error::Io {
                context: format!("removing rank record {}", path.display()),
                source,
            }),
            _ => Ok(()),
        }
    }

    /// Every record in the directory, and the files that are not valid records.
    pub fn list(&self) -> Result<(Vec<RankRecord>, Vec<BadRecord>)> {
        let entries = std::fs::read_dir(&self.path).map_err(|source| Error::Io {
            context: format!("reading state directory {}", self.path.display()),
            source,
        })?;
        let (mut records, mut bad) = (Vec::new(), Vec::new());
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.ends_with(RECORD_SUFFIX) || name.starts_with('.') {
                continue;
            }
            let decoded = std::fs::read_to_string(&path)
                .map_err(|error| error.to_string())
                .and_then(|text| RankRecord::decode(&text));
            match decoded {
                Ok(record) => records.push(record),
                Err(problem) => bad.push(BadRecord { path, problem }),
            }
        }
        records.sort_by(|a, b| (&a.job_id, a.rank).cmp(&(&b.job_id, b.rank)));
        Ok((records, bad))
    }
}

/// Removes a state directory that holds no rank record (only its lock file), for a caller
/// that made one for a worker that has exited. A directory with records stays: its ranks are
/// not known to be gone.
pub fn remove_if_unused(path: &Path) -> io::Result<()> {
    let only_lock = std::fs::read_dir(path)?
        .flatten()
        .all(|entry| entry.file_name() == LOCK_FILE);
    if only_lock {
        let _ = std::fs::remove_file(path.join(LOCK_FILE));
        std::fs::remove_dir(path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(job_id: &str, rank: u32, cgroup: Option<&str>) -> RankRecord {
        RankRecord {
            job_id: job_id.to_owned(),
            rank,
            attempt: 0,
            cgroup: cgroup.map(PathBuf::from),
            pgid: 5150,
            boot_id: "e041a848-0344-4ea2-9f0a-2fc1ea8cb60e".to_owned(),
            start_time: 987654,
        }
    }

    #[test]
    fn a_record_survives_encoding() {
        for original in [
            record("train-3", 1, Some("/sys/fs/cgroup/cohort-n.1/train-3.1")),
            record("a.b-7", 0, None),
        ] {
            assert_eq!(RankRecord::decode(&original.encode()).unwrap(), original);
        }
        let later_version = format!("{}extra=1\n", record("j-1", 2, None).encode());
        assert_eq!(
            RankRecord::decode(&later_version).unwrap(),
            record("j-1", 2, None)
        );
        assert!(RankRecord::decode("rank=1\n").is_err());
        assert!(RankRecord::decode("job_id=j-1\nrank=one\n").is_err());
        assert!(RankRecord::decode("garbage").is_err());
    }

    #[test]
    fn records_are_written_listed_and_removed() {
        let scratch = tempfile::tempdir().unwrap();
        let path = scratch.path().join("nested/worker-n");
        let state = StateDir::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let first = record("job-1", 0, Some("/cg/job-1.0"));
        state.write(&first).unwrap();
        let mut updated = record("job-1", 1, None);
        state.write(&updated).unwrap();
        updated.pgid = 6000;
        state.write(&updated).unwrap();
        std::fs::write(path.join("broken.0.rank"), "nonsense").unwrap();
        let (records, bad) = state.list().unwrap();
        assert_eq!(records, [first, updated]);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].problem.contains("name=value"), "{:?}", bad[0]);

        state.remove("job-1", 0, 0).unwrap();
        state.remove("job-1", 0, 0).unwrap();
        state.remove("job-1", 1, 0).unwrap();
        std::fs::remove_file(path.join("broken.0.rank")).unwrap();
        assert!(state.list().unwrap().0.is_empty());
        let leftovers: Vec<_> = std::fs::read_dir(&path).unwrap().flatten().collect();
        assert_eq!(leftovers.len(), 1, "only the lock file: {leftovers:?}");
        drop(state);
        remove_if_unused(&path).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn a_state_directory_has_one_worker_at_a_time() {
        let scratch = tempfile::tempdir().unwrap();
        let first = StateDir::open(scratch.path()).unwrap();
        let error = StateDir::open(scratch.path()).unwrap_err();
        assert!(error.to_string().contains("in use"), "{error}");
        drop(first);
        StateDir::open(scratch.path()).unwrap();
    }
}
