//! The event log: every state change, crash, restart and policy decision,
//! numbered with a sequence that carries on across daemon restarts.
//!
//! Events are appended as NDJSON to `<state-dir>/events.ndjson` (one
//! `write` per event, so a killed daemon loses none the kernel has seen) and
//! the last `keep` stay in memory for `GET /v1/events?since=N`. The file is
//! rewritten with those last `keep` when it grows past twice that.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_api::{Event, EventType, VmState};
use tokio::sync::broadcast;

#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// `?since=N` asked for events that are no longer kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// The oldest sequence number still kept.
    pub oldest: u64,
}

struct Inner {
    kept: VecDeque<Event>,
    next_seq: u64,
    file: File,
    lines_in_file: usize,
}

pub struct EventLog {
    path: PathBuf,
    keep: usize,
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Event>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl EventLog {
    /// Opens the log at `path`, resuming its sequence. A line that does not
    /// parse (the tail of a write cut by a kill) is skipped.
    pub fn open(path: PathBuf, keep: usize) -> Result<EventLog, EventLogError> {
        let keep = keep.max(1);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(EventLogError::Io {
                    op: "read",
                    path,
                    source,
                })
            }
        };
        let mut kept = VecDeque::new();
        let mut lines_in_file = 0;
        for line in text.lines() {
            lines_in_file += 1;
            match serde_json::from_str::<Event>(line) {
                Ok(ev) => {
                    kept.push_back(ev);
                    if kept.len() > keep {
                        kept.pop_front();
                    }
                }
                Err(e) => {
                    tracing::warn!("{}: skipping an unreadable event line: {e}", path.display())
                }
            }
        }
        let next_seq = kept.back().map_or(1, |e| e.seq + 1);
        let file = open_append(&path)?;
        // The next event starts on a fresh line even after a torn write.
        let mut inner = Inner {
            kept,
            next_seq,
            file,
            lines_in_file,
        };
        if !text.is_empty() && !text.ends_with('\n') {
            write_line(&mut inner.file, &path, b"")?;
        }
        let (tx, _) = broadcast::channel(1024);
        Ok(EventLog {
            path,
            keep,
            inner: Mutex::new(inner),
            tx,
        })
    }

    /// Records one event and sends it to every follower.
    pub fn emit(
        &self,
        kind: EventType,
        vm: Option<&str>,
        state: Option<VmState>,
        message: impl Into<String>,
    ) -> Event {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let event = Event {
            seq: inner.next_seq,
            time_ms: now_ms(),
            kind,
            vm: vm.map(str::to_owned),
            state,
            message: message.into(),
        };
        inner.next_seq += 1;
        let line = serde_json::to_vec(&event).expect("events serialize");
        if let Err(e) = write_line(&mut inner.file, &self.path, &line) {
            // The event still reaches memory and followers; the log on disk
            // misses it, which is said once per failure.
            tracing::error!("event {} not persisted: {e}", event.seq);
        }
        inner.lines_in_file += 1;
        inner.kept.push_back(event.clone());
        if inner.kept.len() > self.keep {
            inner.kept.pop_front();
        }
        if inner.lines_in_file > 2 * self.keep {
            if let Err(e) = self.compact(&mut inner) {
                tracing::error!("compacting the event log: {e}");
            }
        }
        // No receivers is fine.
        let _ = self.tx.send(event.clone());
        event
    }

    /// The kept events after `since` (all kept events without it), and a
    /// receiver for the ones after those, taken atomically so none is
    /// missed or seen twice.
    pub fn since(
        &self,
        since: Option<u64>,
    ) -> Result<(Vec<Event>, broadcast::Receiver<Event>), Expired> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let oldest = inner.kept.front().map_or(inner.next_seq, |e| e.seq);
        if let Some(n) = since {
            if n.saturating_add(1) < oldest {
                return Err(Expired { oldest });
            }
        }
        let after = since.unwrap_or(0);
        let events = inner
            .kept
            .iter()
            .filter(|e| e.seq > after)
            .cloned()
            .collect();
        Ok((events, self.tx.subscribe()))
    }

    /// The last sequence number given out (0 before the first event).
    pub fn last_seq(&self) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next_seq
            - 1
    }

    fn compact(&self, inner: &mut Inner) -> Result<(), EventLogError> {
        let tmp = self.path.with_extension("ndjson.tmp");
        let mut text = Vec::new();
        for ev in &inner.kept {
            text.extend(serde_json::to_vec(ev).expect("events serialize"));
            text.push(b'\n');
        }
        let io = |op, source| EventLogError::Io {
            op,
            path: tmp.clone(),
            source,
        };
        let mut f = File::create(&tmp).map_err(|e| io("create", e))?;
        f.write_all(&text).map_err(|e| io("write", e))?;
        f.sync_all().map_err(|e| io("fsync", e))?;
        fs::rename(&tmp, &self.path).map_err(|e| io("rename", e))?;
        inner.file = open_append(&self.path)?;
        inner.lines_in_file = inner.kept.len();
        Ok(())
    }
}

fn open_append(path: &Path) -> Result<File, EventLogError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| EventLogError::Io {
            op: "open",
            path: path.to_owned(),
            source,
        })
}

fn write_line(file: &mut File, path: &Path, line: &[u8]) -> Result<(), EventLogError> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line);
    buf.push(b'\n');
    file.write_all(&buf).map_err(|source| EventLogError::Io {
        op: "append to",
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_survive_a_reopen_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.ndjson");
        {
            let log = EventLog::open(path.clone(), 100).unwrap();
            log.emit(EventType::DaemonStarted, None, None, "up");
            log.emit(EventType::VmDefined, Some("a"), Some(VmState::Defined), "a");
        }
        // A write cut short by a kill -9.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":3,\"ti").unwrap();
        let log = EventLog::open(path.clone(), 100).unwrap();
        assert_eq!(log.last_seq(), 2);
        let ev = log.emit(EventType::VmDeleted, Some("a"), None, "gone");
        assert_eq!(ev.seq, 3);
        let log = EventLog::open(path, 100).unwrap();
        let (events, _) = log.since(None).unwrap();
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn since_resumes_and_too_old_is_expired_after_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.ndjson");
        let log = EventLog::open(path.clone(), 3).unwrap();
        for i in 0..10 {
            log.emit(EventType::VmDefined, Some("a"), None, format!("{i}"));
        }
        let (events, _) = log.since(Some(8)).unwrap();
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [9, 10]);
        assert_eq!(log.since(Some(7)).unwrap().0.len(), 3);
        assert_eq!(log.since(Some(6)).unwrap_err(), Expired { oldest: 8 });
        assert!(log.since(None).is_ok());
        // The file was compacted but still resumes the sequence.
        let lines = fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines <= 6, "{lines} lines");
        assert_eq!(EventLog::open(path, 3).unwrap().last_seq(), 10);
    }

    #[tokio::test]
    async fn followers_get_events_emitted_after_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path().join("e"), 10).unwrap();
        log.emit(EventType::DaemonStarted, None, None, "up");
        let (old, mut rx) = log.since(Some(1)).unwrap();
        assert!(old.is_empty());
        log.emit(EventType::VmDefined, Some("b"), None, "b");
        assert_eq!(rx.recv().await.unwrap().seq, 2);
    }
}
