//! Captured rank output: appended to one file per job under `<data-dir>/logs/`, so logs
//! outlive the ranks and the coordinator, and fanned out live to followers.
//!
//! File format: one line per captured line, `<rank>\t<o|e>\t<text>`. Each job's log is bounded
//! ([`crate::config::CoordinatorConfig::max_log_bytes_per_job`]); past the bound lines are
//! counted and dropped, and one marker line says so. Lines longer than
//! [`MAX_LOG_LINE_BYTES`] are cut with a marker.
//!
//! Nothing is held per job for long: a file is opened for one append or one read and closed
//! again, so the coordinator's open files do not grow with the number of jobs. A job that can
//! still produce output (one that is not retired, see [`crate::cluster`]) has a small entry
//! with its size and line count, and a live feed only while someone follows it; the entry goes
//! when the job is retired ([`LogStore::close`]). Lines that arrive later (a rank of an ended
//! job shipping its last output) are still appended, straight to the file.
//! The directory is 0700 and the files 0600: rank output may hold anything the job printed.
//!
//! [`fold`] folds a log across ranks for reading (`cohort logs --collapse`).

pub mod fold;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cohort_proto::JobId;
use cohort_proto::text::truncate;
use cohort_proto::v1::{LogLine, LogStream};
use tokio::sync::{broadcast, mpsc};
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::limits::MAX_LOG_LINE_BYTES;

/// How many lines a slow follower may fall behind before lines are skipped for it.
const FOLLOW_BUFFER_LINES: usize = 4096;
/// Start of the marker line written when a job's log is full.
const FULL_MARKER: &str = "[cohort] log of job ";

/// A log line and its position in the job's log.
#[derive(Debug, Clone)]
pub struct SequencedLine {
    /// 0-based index of the line in the job's log file.
    pub seq: u64,
    /// The line.
    pub line: LogLine,
}

/// The live feed of a followed job's log.
pub type LogFeed = broadcast::Receiver<Arc<SequencedLine>>;

/// The bookkeeping of one job whose ranks may still write.
#[derive(Default)]
struct OpenLog {
    /// Bytes in the file.
    bytes: u64,
    /// Lines in the file; the next line's sequence number.
    lines: u64,
    /// Whether the log reached its bound (the marker is written).
    full: bool,
    /// Live feed, while someone follows the job.
    feed: Option<broadcast::Sender<Arc<SequencedLine>>>,
}

/// Every job's captured output.
pub struct LogStore {
    /// `<data-dir>/logs`.
    dir: PathBuf,
    /// Most bytes kept per job.
    max_bytes_per_job: u64,
    /// Jobs whose ranks may still write, by job.
    open: Mutex<HashMap<JobId, OpenLog>>,
}

fn encode(line: &LogLine, buffer: &mut String) {
    use std::fmt::Write as _;
    let stream = if line.stream == LogStream::Stderr as i32 {
        'e'
    } else {
        'o'
    };
    let _ = writeln!(buffer, "{}\t{}\t{}", line.rank, stream, line.text);
}

fn decode(text: &str) -> Option<LogLine> {
    let mut parts = text.splitn(3, '\t');
    let rank = parts.next()?.parse().ok()?;
    let stream = match parts.next()? {
        "e" => LogStream::Stderr,
        _ => LogStream::Stdout,
    };
    Some(LogLine {
        rank,
        stream: stream as i32,
        text: parts.next().unwrap_or_default().to_owned(),
    })
}

/// Cuts a line to [`MAX_LOG_LINE_BYTES`] with a marker and turns line breaks into spaces.
fn sanitize(text: &str) -> String {
    truncate(text, MAX_LOG_LINE_BYTES).replace(['\n', '\r'], " ")
}

/// Opens a job's log for appending, creating it private to the coordinator.
fn open_for_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("opening log {}", path.display()), e))
}

/// Reads what an existing log holds: its bytes, its lines, and whether it ends full.
fn inspect(path: &Path) -> Result<OpenLog> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(OpenLog::default()),
        Err(e) => return Err(Error::io(format!("reading log {}", path.display()), e)),
    };
    let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reader = BufReader::new(file);
    let mut lines = 0u64;
    let mut last = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io(format!("reading log {}", path.display()), e))?;
        if read == 0 {
            break;
        }
        lines += 1;
        std::mem::swap(&mut last, &mut line);
    }
    let full = decode(String::from_utf8_lossy(&last).trim_end())
        .is_some_and(|line| line.text.starts_with(FULL_MARKER));
    Ok(OpenLog {
        bytes,
        lines,
        full,
        feed: None,
    })
}

/// Whether the file's last line is the "log is full" marker, reading only its tail.
fn ends_full(path: &Path) -> bool {
    let Ok(mut file) = File::open(path) else {
        return false;
    };
    let length = file.metadata().map(|m| m.len()).unwrap_or(0);
    let tail = length.min(1024);
    if file.seek(SeekFrom::Start(length - tail)).is_err() {
        return false;
    }
    let mut text = Vec::new();
    if file.read_to_end(&mut text).is_err() {
        return false;
    }
    let text = String::from_utf8_lossy(&text);
    text.trim_end()
        .rsplit('\n')
        .next()
        .and_then(decode)
        .is_some_and(|line| line.text.starts_with(FULL_MARKER))
}

impl LogStore {
    /// Opens (creating) the log directory, private to the coordinator (0700).
    pub fn open(dir: PathBuf, max_bytes_per_job: u64) -> Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::io(format!("creating log directory {}", dir.display()), e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("restricting log directory {}", dir.display()), e))?;
        Ok(Self {
            dir,
            max_bytes_per_job,
            open: Mutex::new(HashMap::new()),
        })
    }

    fn path(&self, job_id: &JobId) -> PathBuf {
        self.dir.join(format!("{job_id}.log"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, OpenLog>> {
        self.open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Starts the bookkeeping of a job whose ranks may write: a new job, or one found live
    /// after a restart (whose file is read once to count its lines).
    pub fn track(&self, job_id: &JobId) -> Result<()> {
        if self.lock().contains_key(job_id) {
            return Ok(());
        }
        let log = inspect(&self.path(job_id))?;
        self.lock().entry(job_id.clone()).or_insert(log);
        Ok(())
    }

    /// Ends the bookkeeping of a retired job; its followers' feeds close.
    pub fn close(&self, job_id: &JobId) {
        self.lock().remove(job_id);
    }

    /// Number of jobs tracked, for tests and diagnostics.
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    /// Appends lines to a job's log and hands them to its followers.
    pub fn append(&self, job_id: &JobId, lines: &[LogLine]) -> Result<()> {
        let path = self.path(job_id);
        let mut open = self.lock();
        let mut untracked = None;
        let log = match open.get_mut(job_id) {
            Some(log) => log,
            None => {
                // A retired job: its last lines still count, nobody follows it.
                let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
                let full = bytes > 0 && ends_full(&path);
                untracked.insert(OpenLog {
                    bytes,
                    full,
                    ..OpenLog::default()
                })
            }
        };
        let mut buffer = String::new();
        let mut accepted = Vec::with_capacity(lines.len());
        let mut dropped = 0usize;
        for line in lines {
            if log.full {
                dropped += 1;
                continue;
            }
            let line = LogLine {
                text: sanitize(&line.text),
                ..line.clone()
            };
            let before = buffer.len();
            encode(&line, &mut buffer);
            if log.bytes + buffer.len() as u64 > self.max_bytes_per_job {
                buffer.truncate(before);
                let marker = LogLine {
                    rank: line.rank,
                    stream: LogStream::Stderr as i32,
                    text: format!(
                        "{FULL_MARKER}{job_id} reached {} bytes; later lines are dropped",
                        self.max_bytes_per_job
                    ),
                };
                encode(&marker, &mut buffer);
                accepted.push(marker);
                log.full = true;
                dropped += 1;
                continue;
            }
            accepted.push(line);
        }
        if !buffer.is_empty() {
            open_for_append(&path)?
                .write_all(buffer.as_bytes())
                .map_err(|e| Error::io(format!("appending to log of job {job_id}"), e))?;
            log.bytes += buffer.len() as u64;
        }
        if dropped > 0 {
            debug!(%job_id, dropped, "log is full; lines dropped");
        }
        for line in accepted {
            let sequenced = Arc::new(SequencedLine {
                seq: log.lines,
                line,
            });
            log.lines += 1;
            if let Some(feed) = &log.feed {
                if feed.receiver_count() == 0 {
                    log.feed = None;
                } else {
                    // A follower that left between the check and the send is not an error.
                    let _ = feed.send(sequenced);
                }
            }
        }
        Ok(())
    }

    /// Subscribes to the live feed of a job whose ranks may still write; `None` for a retired
    /// (or unknown) job, whose log is complete. Subscribe before reading the file, so that no
    /// line falls between the two; lines of the feed whose `seq` is below the number of lines
    /// read from the file were already read.
    pub fn follow(&self, job_id: &JobId) -> Option<LogFeed> {
        let mut open = self.lock();
        let log = open.get_mut(job_id)?;
        let feed = log
            .feed
            .get_or_insert_with(|| broadcast::channel(FOLLOW_BUFFER_LINES).0);
        Some(feed.subscribe())
    }

    /// Streams the job's lines so far (those of `rank` only, when given) into `sender` from a
    /// blocking thread, reading the file a line at a time, and returns how many lines the
    /// file held. A last line without its newline (an append in progress) is left to the feed.
    pub async fn stream_file(
        &self,
        job_id: &JobId,
        rank: Option<u32>,
        sender: mpsc::Sender<std::result::Result<LogLine, tonic::Status>>,
    ) -> Result<u64> {
        let path = self.path(job_id);
        let job_id = job_id.clone();
        let reading = tokio::task::spawn_blocking(move || -> Result<u64> {
            let file = match File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                Err(e) => return Err(Error::io(format!("reading log {}", path.display()), e)),
            };
            let mut reader = BufReader::new(file);
            let mut count = 0u64;
            let mut bytes = Vec::new();
            loop {
                bytes.clear();
                let read = reader
                    .read_until(b'\n', &mut bytes)
                    .map_err(|e| Error::io(format!("reading log {}", path.display()), e))?;
                if read == 0 || bytes.last() != Some(&b'\n') {
                    return Ok(count);
                }
                count += 1;
                let text = String::from_utf8_lossy(&bytes[..bytes.len() - 1]);
                if let Some(line) = decode(&text)
                    && rank.is_none_or(|rank| rank == line.rank)
                    && sender.blocking_send(Ok(line)).is_err()
                {
                    // The reader went away.
                    return Ok(count);
                }
            }
        });
        reading.await.unwrap_or_else(|error| {
            warn!(%job_id, %error, "log reader failed");
            Err(Error::FailedPrecondition(format!(
                "reading the log of job {job_id} failed"
            )))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(rank: u32, text: &str) -> LogLine {
        LogLine {
            rank,
            stream: LogStream::Stdout as i32,
            text: text.to_owned(),
        }
    }

    async fn read_all(store: &LogStore, job: &JobId, rank: Option<u32>) -> (Vec<LogLine>, u64) {
        let (sender, mut receiver) = mpsc::channel(1 << 16);
        let count = store.stream_file(job, rank, sender).await.unwrap();
        let mut lines = Vec::new();
        while let Ok(Ok(line)) = receiver.try_recv() {
            lines.push(line);
        }
        (lines, count)
    }

    #[tokio::test]
    async fn lines_round_trip_and_filter_by_rank() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path().to_owned(), 1 << 20).unwrap();
        let job = JobId::new("j-1").unwrap();
        store
            .append(&job, &[line(0, "hello\tworld"), line(1, "b\nc")])
            .unwrap();
        let (all, count) = read_all(&store, &job, None).await;
        assert_eq!(count, 2);
        assert_eq!(all[0].text, "hello\tworld");
        assert_eq!(all[1].text, "b c");
        let (rank1, _) = read_all(&store, &job, Some(1)).await;
        assert_eq!(rank1.len(), 1);
        assert_eq!(rank1[0].rank, 1);
    }

    #[tokio::test]
    async fn tracked_logs_survive_reopening_and_keep_sequence_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let job = JobId::new("j-1").unwrap();
        LogStore::open(dir.path().to_owned(), 1 << 20)
            .unwrap()
            .append(&job, &[line(0, "a"), line(0, "b")])
            .unwrap();
        let store = LogStore::open(dir.path().to_owned(), 1 << 20).unwrap();
        store.track(&job).unwrap();
        let mut feed = store.follow(&job).unwrap();
        let (_, count) = read_all(&store, &job, None).await;
        assert_eq!(count, 2);
        store.append(&job, &[line(0, "c")]).unwrap();
        let next = feed.try_recv().unwrap();
        assert_eq!((next.seq, next.line.text.as_str()), (2, "c"));
    }

    #[tokio::test]
    async fn a_retired_job_has_no_feed_and_still_takes_its_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path().to_owned(), 1 << 20).unwrap();
        let job = JobId::new("j-1").unwrap();
        store.track(&job).unwrap();
        let feed = store.follow(&job).unwrap();
        store.append(&job, &[line(0, "a")]).unwrap();
        store.close(&job);
        assert_eq!(store.tracked(), 0);
        assert!(store.follow(&job).is_none());
        store.append(&job, &[line(0, "late")]).unwrap();
        let (lines, _) = read_all(&store, &job, None).await;
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].text, "late");
        drop(feed);
    }

    #[tokio::test]
    async fn log_is_bounded_with_one_marker_also_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path().to_owned(), 64).unwrap();
        let job = JobId::new("j-1").unwrap();
        let many: Vec<_> = (0..100).map(|i| line(0, &format!("line {i}"))).collect();
        store.append(&job, &many).unwrap();
        // Untracked appends (a retired job) and a restart's tracking both see the marker.
        store.append(&job, &many).unwrap();
        store.track(&job).unwrap();
        store.append(&job, &many).unwrap();
        let (lines, _) = read_all(&store, &job, None).await;
        let markers = lines.iter().filter(|l| l.text.contains("dropped")).count();
        assert_eq!(markers, 1, "{lines:?}");
        assert!(lines.len() < 20, "{} lines kept", lines.len());
    }

    #[test]
    fn overlong_lines_are_cut_at_a_char_boundary_with_a_marker() {
        let text = "é".repeat(MAX_LOG_LINE_BYTES);
        let cut = sanitize(&text);
        assert!(cut.len() <= MAX_LOG_LINE_BYTES);
        assert!(cut.ends_with("bytes cut]"), "{}", &cut[cut.len() - 40..]);
    }

    #[test]
    fn files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        let store = LogStore::open(logs.clone(), 1 << 20).unwrap();
        let job = JobId::new("j-1").unwrap();
        store.append(&job, &[line(0, "secret")]).unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&logs), 0o700);
        assert_eq!(mode(&logs.join("j-1.log")), 0o600);
    }
}
