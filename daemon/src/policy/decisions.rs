//! The audit of the engine's decisions: the last 256 of each VM in memory
//! for the API, every one appended to `<state-dir>/policy/decisions.ndjson`
//! (one write per line; rotated to `decisions.ndjson.1` past a few MiB).
//! Sequence numbers carry on from the files after a restart.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use kiln_api::engine::{Decision, Lever};

/// Decisions kept in memory per VM.
pub const KEEP_PER_VM: usize = 256;
/// The file is rotated to `.1` past this size.
pub const ROTATE_BYTES: u64 = 4 << 20;

pub struct DecisionLog {
    path: PathBuf,
    file: File,
    size: u64,
    rotate_at: u64,
    next_seq: u64,
    by_vm: BTreeMap<String, VecDeque<Decision>>,
    write_failed: bool,
}

fn rotated(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// The decisions of one file that parse (a torn last line is skipped).
fn read_file(path: &Path) -> io::Result<Vec<Decision>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Decision>(l).ok())
        .collect())
}

impl DecisionLog {
    /// Opens the log at `path`, resuming its sequence and memory from it
    /// and its rotated predecessor.
    pub fn open(path: PathBuf, rotate_at: u64) -> io::Result<DecisionLog> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut by_vm: BTreeMap<String, VecDeque<Decision>> = BTreeMap::new();
        let mut last_seq = 0;
        for p in [rotated(&path), path.clone()] {
            for d in read_file(&p)? {
                last_seq = last_seq.max(d.seq);
                let q = by_vm.entry(d.vm.clone()).or_default();
                q.push_back(d);
                if q.len() > KEEP_PER_VM {
                    q.pop_front();
                }
            }
        }
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        if size > 0 {
            // A torn write leaves no newline: start the next line fresh.
            let text = fs::read(&path)?;
            if text.last() != Some(&b'\n') {
                file.write_all(b"\n")?;
            }
        }
        Ok(DecisionLog {
            size: file.metadata()?.len(),
            path,
            file,
            rotate_at,
            next_seq: last_seq + 1,
            by_vm,
            write_failed: false,
        })
    }

    /// Numbers the decision, keeps it and appends it to the file.
    pub fn push(&mut self, mut d: Decision) -> Decision {
        d.seq = self.next_seq;
        self.next_seq += 1;
        if let Err(e) = self.append(&d) {
            if !self.write_failed {
                tracing::error!(
                    "{}: decision not written ({e}); kept in memory only until a write works",
                    self.path.display()
                );
            }
            self.write_failed = true;
        } else {
            self.write_failed = false;
        }
        let q = self.by_vm.entry(d.vm.clone()).or_default();
        q.push_back(d.clone());
        if q.len() > KEEP_PER_VM {
            q.pop_front();
        }
        d
    }

    fn append(&mut self, d: &Decision) -> io::Result<()> {
        if self.size >= self.rotate_at {
            fs::rename(&self.path, rotated(&self.path))?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.size = 0;
        }
        let mut line = serde_json::to_vec(d).expect("decisions serialize");
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    /// The newest `limit` decisions of `vm` (of one lever, if given),
    /// newest last. Past what memory keeps they are read from the files.
    pub fn query(&self, vm: &str, lever: Option<Lever>, limit: usize) -> Vec<Decision> {
        let keep = |d: &&Decision| lever.is_none_or(|l| d.lever == l);
        let mem = self.by_vm.get(vm);
        let mut out: Vec<Decision> = mem
            .map(|q| q.iter().rev().filter(keep).take(limit).cloned().collect())
            .unwrap_or_default();
        let memory_full = mem.is_some_and(|q| q.len() >= KEEP_PER_VM);
        if out.len() < limit && memory_full {
            let mut all = Vec::new();
            for p in [rotated(&self.path), self.path.clone()] {
                match read_file(&p) {
                    Ok(ds) => all.extend(ds.into_iter().filter(|d| d.vm == vm)),
                    Err(e) => tracing::warn!("{}: {e}", p.display()),
                }
            }
            out = all.iter().rev().filter(keep).take(limit).cloned().collect();
        }
        out.reverse();
        out
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api::engine::{DecisionOutcome, LeverMode};

    fn decision(vm: &str, lever: Lever) -> Decision {
        Decision {
            seq: 0,
            time_ms: 1,
            vm: vm.into(),
            lever,
            mode: LeverMode::Shadow,
            inputs: vec![],
            model: None,
            raw_output: None,
            action: "balloon 512 -> 480 MiB".into(),
            guardrails: vec![],
            reason: "test".into(),
            outcome: DecisionOutcome::Shadow,
            detail: None,
        }
    }

    #[test]
    fn seq_carries_on_after_a_restart_and_memory_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy/decisions.ndjson");
        let mut log = DecisionLog::open(path.clone(), ROTATE_BYTES).unwrap();
        for _ in 0..(KEEP_PER_VM + 10) {
            log.push(decision("a", Lever::Balloon));
        }
        log.push(decision("b", Lever::Vcpu));
        log.push(decision("a", Lever::Worker));
        assert_eq!(log.by_vm["a"].len(), KEEP_PER_VM, "bounded");
        let last = log.query("a", None, 2);
        assert_eq!(last.len(), 2);
        assert!(last[0].seq < last[1].seq, "newest last");
        assert_eq!(last[1].lever, Lever::Worker);
        assert_eq!(log.query("a", Some(Lever::Worker), 100).len(), 1);
        // More than memory holds comes from the file.
        assert_eq!(log.query("a", None, 1000).len(), KEEP_PER_VM + 11);
        assert!(log.query("nobody", None, 10).is_empty());
        let next = log.next_seq();
        // A torn line (a kill in the middle of a write) is skipped.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":99999,\"ti").unwrap();
        drop(log);
        let mut log = DecisionLog::open(path.clone(), ROTATE_BYTES).unwrap();
        assert_eq!(log.next_seq(), next);
        let d = log.push(decision("b", Lever::Vcpu));
        assert_eq!(d.seq, next);
        assert_eq!(log.query("b", None, 10).len(), 2);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("\n"), "{text}");
    }

    #[test]
    fn the_file_rotates_and_both_halves_are_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.ndjson");
        let mut log = DecisionLog::open(path.clone(), 2000).unwrap();
        for _ in 0..40 {
            log.push(decision("a", Lever::Balloon));
        }
        assert!(rotated(&path).exists(), "rotated");
        assert!(fs::metadata(&path).unwrap().len() < 2000 + 400);
        drop(log);
        let log = DecisionLog::open(path, 2000).unwrap();
        let kept = log.query("a", None, 1000);
        assert!(kept.len() >= 10 && kept.len() <= 40, "{}", kept.len());
        assert_eq!(log.next_seq(), 41);
    }
}
