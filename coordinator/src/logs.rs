//! Captured rank output: appended to one file per job under `<data-dir>/logs/`, so logs
//! outlive the ranks and the coordinator, and fanned out live to followers.
//!
//! File format: one line per captured line, `<rank>\t<o|e>\t<text>`. Each job's log is bounded
//! ([`crate::config::CoordinatorConfig::max_log_bytes_per_job`]); past the bound lines are
//! counted and dropped, and one marker line says so.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cohort_proto::JobId;
use cohort_proto::v1::{LogLine, LogStream};
use tokio::sync::broadcast;

use crate::error::{Error, Result};
use crate::limits::MAX_LOG_LINE_BYTES;

/// How many lines a slow follower may fall behind before it re-reads from the file.
const FOLLOW_BUFFER_LINES: usize = 4096;

/// A log line and its position in the job's log.
#[derive(Debug, Clone)]
pub struct SequencedLine {
    /// 0-based index of the line in the job's log file.
    pub seq: u64,
    /// The line.
    pub line: LogLine,
}

/// What [`LogStore::read`] returns: the lines so far, how many lines the log held, and the live
/// feed when following.
pub type LogSnapshot = (
    Vec<LogLine>,
    u64,
    Option<broadcast::Receiver<Arc<SequencedLine>>>,
);

/// The open log of one job.
struct JobLog {
    /// Append handle of the job's file.
    file: File,
    /// Bytes written so far.
    bytes: u64,
    /// Number of lines in the file; the next line's sequence number.
    lines: u64,
    /// Lines dropped because the log is full.
    dropped: u64,
    /// Live feed for followers.
    feed: broadcast::Sender<Arc<SequencedLine>>,
}

/// Every job's captured output.
pub struct LogStore {
    /// `<data-dir>/logs`.
    dir: PathBuf,
    /// Most bytes kept per job.
    max_bytes_per_job: u64,
    /// Logs opened since start.
    open: Mutex<HashMap<JobId, JobLog>>,
}

fn encode(line: &LogLine) -> String {
    let stream = if line.stream == LogStream::Stderr as i32 {
        'e'
    } else {
        'o'
    };
    format!("{}\t{}\t{}\n", line.rank, stream, line.text)
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

/// Cuts a line to [`MAX_LOG_LINE_BYTES`] at a character boundary and removes line breaks.
fn sanitize(text: &str) -> String {
    let mut end = text.len().min(MAX_LOG_LINE_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].replace(['\n', '\r'], " ")
}

impl LogStore {
    /// Opens (creating) the log directory.
    pub fn open(dir: PathBuf, max_bytes_per_job: u64) -> Result<Self> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating log directory {}", dir.display()), e))?;
        Ok(Self {
            dir,
            max_bytes_per_job,
            open: Mutex::new(HashMap::new()),
        })
    }

    fn path(&self, job_id: &JobId) -> PathBuf {
        self.dir.join(format!("{job_id}.log"))
    }

    fn with_log<T>(&self, job_id: &JobId, f: impl FnOnce(&mut JobLog) -> Result<T>) -> Result<T> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if !open.contains_key(job_id) {
            let path = self.path(job_id);
            let (bytes, lines) = match File::open(&path) {
                Ok(file) => {
                    let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
                    let lines = BufReader::new(file).lines().count() as u64;
                    (bytes, lines)
                }
                Err(_) => (0, 0),
            };
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| Error::io(format!("opening log {}", path.display()), e))?;
            let (feed, _) = broadcast::channel(FOLLOW_BUFFER_LINES);
            open.insert(
                job_id.clone(),
                JobLog {
                    file,
                    bytes,
                    lines,
                    dropped: 0,
                    feed,
                },
            );
        }
        let log = open.get_mut(job_id).expect("inserted above");
        f(log)
    }

    /// Appends lines to a job's log and hands them to its followers.
    pub fn append(&self, job_id: &JobId, lines: &[LogLine]) -> Result<()> {
        let max_bytes = self.max_bytes_per_job;
        self.with_log(job_id, |log| {
            let mut buffer = String::new();
            let mut accepted = Vec::with_capacity(lines.len());
            for line in lines {
                let line = LogLine {
                    text: sanitize(&line.text),
                    ..line.clone()
                };
                let encoded = encode(&line);
                if log.bytes + (buffer.len() + encoded.len()) as u64 > max_bytes {
                    if log.dropped == 0 {
                        let marker = LogLine {
                            rank: line.rank,
                            stream: LogStream::Stderr as i32,
                            text: format!(
                                "[cohort] log of job {job_id} reached {max_bytes} bytes; later lines are dropped"
                            ),
                        };
                        buffer.push_str(&encode(&marker));
                        accepted.push(marker);
                    }
                    log.dropped += 1;
                    continue;
                }
                buffer.push_str(&encoded);
                accepted.push(line);
            }
            log.file
                .write_all(buffer.as_bytes())
                .map_err(|e| Error::io(format!("appending to log of job {job_id}"), e))?;
            log.bytes += buffer.len() as u64;
            for line in accepted {
                let sequenced = Arc::new(SequencedLine {
                    seq: log.lines,
                    line,
                });
                log.lines += 1;
                // No follower is not an error.
                let _ = log.feed.send(sequenced);
            }
            Ok(())
        })
    }

    /// Returns the job's lines so far (those of `rank` only, when given) and, when `follow`,
    /// a feed of later lines. Lines of the feed whose `seq` is below the returned count were
    /// already returned and must be skipped.
    pub fn read(&self, job_id: &JobId, rank: Option<u32>, follow: bool) -> Result<LogSnapshot> {
        // Subscribe before reading so that no line falls between the file and the feed.
        let feed = if follow {
            Some(self.with_log(job_id, |log| Ok(log.feed.subscribe()))?)
        } else {
            None
        };
        let path = self.path(job_id);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Vec::new(), 0, feed));
            }
            Err(e) => return Err(Error::io(format!("reading log {}", path.display()), e)),
        };
        let mut lines = Vec::new();
        let mut count = 0u64;
        for text in BufReader::new(file).lines() {
            let text = text.map_err(|e| Error::io(format!("reading log {}", path.display()), e))?;
            count += 1;
            if let Some(line) = decode(&text)
                && rank.is_none_or(|rank| rank == line.rank)
            {
                lines.push(line);
            }
        }
        Ok((lines, count, feed))
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

    #[test]
    fn lines_round_trip_and_filter_by_rank() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path().to_owned(), 1 << 20).unwrap();
        let job = JobId::new("j-1").unwrap();
        store
            .append(&job, &[line(0, "hello\tworld"), line(1, "b\nc")])
            .unwrap();
        let (all, count, _) = store.read(&job, None, false).unwrap();
        assert_eq!(count, 2);
        assert_eq!(all[0].text, "hello\tworld");
        assert_eq!(all[1].text, "b c");
        let (rank1, _, _) = store.read(&job, Some(1), false).unwrap();
        assert_eq!(rank1.len(), 1);
        assert_eq!(rank1[0].rank, 1);
    }

    #[test]
    fn logs_survive_reopening_and_keep_sequence_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let job = JobId::new("j-1").unwrap();
        LogStore::open(dir.path().to_owned(), 1 << 20)
            .unwrap()
            .append(&job, &[line(0, "a"), line(0, "b")])
            .unwrap();
        let store = LogStore::open(dir.path().to_owned(), 1 << 20).unwrap();
        let (_, count, feed) = store.read(&job, None, true).unwrap();
        assert_eq!(count, 2);
        store.append(&job, &[line(0, "c")]).unwrap();
        let next = feed.unwrap().try_recv().unwrap();
        assert_eq!((next.seq, next.line.text.as_str()), (2, "c"));
    }

    #[test]
    fn log_is_bounded_with_one_marker() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path().to_owned(), 64).unwrap();
        let job = JobId::new("j-1").unwrap();
        let many: Vec<_> = (0..100).map(|i| line(0, &format!("line {i}"))).collect();
        store.append(&job, &many).unwrap();
        let (lines, _, _) = store.read(&job, None, false).unwrap();
        let markers = lines.iter().filter(|l| l.text.contains("dropped")).count();
        assert_eq!(markers, 1);
        assert!(lines.len() < 20, "{} lines kept", lines.len());
    }

    #[test]
    fn overlong_lines_are_cut_at_a_char_boundary() {
        let text = "é".repeat(MAX_LOG_LINE_BYTES);
        let cut = sanitize(&text);
        assert!(cut.len() <= MAX_LOG_LINE_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
