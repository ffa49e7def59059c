//! The audit log: every decision the engine takes, with its inputs, the model
//! and its raw output, the action after guardrails and the reason in words.
//! Kept in memory (bounded) for the API to query, and optionally appended to a
//! JSON-lines file that `kiln policy audit` can query later.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Lever {
    Balloon,
    Vcpu,
    Device,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub t_s: f64,
    pub vm: String,
    pub lever: Lever,
    /// "active" decisions were carried out; "shadow" ones only logged.
    pub mode: String,
    /// (feature name, value) as given to the model or heuristic.
    pub inputs: Vec<(String, f32)>,
    /// "name@version" of the model, or None when a heuristic decided.
    pub model: Option<String>,
    pub raw_output: Option<f32>,
    /// The action after guardrails, in words ("balloon 2048 -> 1984 MiB").
    pub action: String,
    /// Guardrails that changed or overruled the decision.
    pub guardrails: Vec<String>,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct AuditQuery {
    pub vm: Option<String>,
    pub lever: Option<Lever>,
    pub since_s: Option<f64>,
    pub until_s: Option<f64>,
    /// Only decisions where a guardrail fired.
    #[serde(default)]
    pub guardrail_only: bool,
    pub limit: Option<usize>,
}

impl AuditQuery {
    pub fn matches(&self, r: &AuditRecord) -> bool {
        self.vm.as_ref().is_none_or(|v| v == &r.vm)
            && self.lever.is_none_or(|l| l == r.lever)
            && self.since_s.is_none_or(|s| r.t_s >= s)
            && self.until_s.is_none_or(|u| r.t_s <= u)
            && (!self.guardrail_only || !r.guardrails.is_empty())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("audit file {path} line {line}: {msg}")]
    Parse {
        path: String,
        line: usize,
        msg: String,
    },
}

pub struct AuditLog {
    records: VecDeque<AuditRecord>,
    capacity: usize,
    sink: Option<std::io::BufWriter<std::fs::File>>,
    sink_failed: bool,
    pub total: u64,
}

impl AuditLog {
    pub fn new(capacity: usize) -> Self {
        AuditLog {
            records: VecDeque::new(),
            capacity,
            sink: None,
            sink_failed: false,
            total: 0,
        }
    }

    /// Also append every record to `path` as JSON lines.
    pub fn with_file(mut self, path: &Path) -> Result<Self, AuditError> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| AuditError::Io {
                path: path.display().to_string(),
                source,
            })?;
        self.sink = Some(std::io::BufWriter::new(f));
        Ok(self)
    }

    pub fn record(&mut self, r: AuditRecord) {
        if let Some(sink) = &mut self.sink {
            let ok = serde_json::to_writer(&mut *sink, &r).is_ok() && sink.write_all(b"\n").is_ok();
            if !ok && !self.sink_failed {
                self.sink_failed = true;
                tracing::error!("audit file write failed; keeping records in memory only");
            }
        }
        if self.records.len() == self.capacity {
            self.records.pop_front();
        }
        if self.capacity > 0 {
            self.records.push_back(r);
        }
        self.total += 1;
    }

    pub fn flush(&mut self) {
        if let Some(s) = &mut self.sink {
            let _ = s.flush();
        }
    }

    /// Newest first.
    pub fn query(&self, q: &AuditQuery) -> Vec<&AuditRecord> {
        self.records
            .iter()
            .rev()
            .filter(|r| q.matches(r))
            .take(q.limit.unwrap_or(usize::MAX))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Reads a JSON-lines audit file and returns the matching records, newest first.
    pub fn query_file(path: &Path, q: &AuditQuery) -> Result<Vec<AuditRecord>, AuditError> {
        let f = std::fs::File::open(path).map_err(|source| AuditError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut out = Vec::new();
        for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line.map_err(|source| AuditError::Io {
                path: path.display().to_string(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let r: AuditRecord = serde_json::from_str(&line).map_err(|e| AuditError::Parse {
                path: path.display().to_string(),
                line: i + 1,
                msg: e.to_string(),
            })?;
            if q.matches(&r) {
                out.push(r);
            }
        }
        out.reverse();
        out.truncate(q.limit.unwrap_or(usize::MAX));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(t: f64, vm: &str, lever: Lever, guard: bool) -> AuditRecord {
        AuditRecord {
            t_s: t,
            vm: vm.into(),
            lever,
            mode: "active".into(),
            inputs: vec![("ws_frac".into(), 0.5)],
            model: Some("balloon@1".into()),
            raw_output: Some(1.1),
            action: "balloon 4096 -> 3900 MiB".into(),
            guardrails: if guard {
                vec!["max-step".into()]
            } else {
                vec![]
            },
            reason: "test".into(),
        }
    }

    #[test]
    fn queries_memory_and_file_alike() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::new(3).with_file(&path).unwrap();
        log.record(rec(0.0, "a", Lever::Balloon, false));
        log.record(rec(10.0, "b", Lever::Vcpu, true));
        log.record(rec(20.0, "a", Lever::Balloon, true));
        log.record(rec(30.0, "a", Lever::Device, false));
        log.flush();
        assert_eq!(log.len(), 3, "bounded");
        let q = AuditQuery {
            vm: Some("a".into()),
            ..Default::default()
        };
        let mem: Vec<f64> = log.query(&q).iter().map(|r| r.t_s).collect();
        assert_eq!(mem, vec![30.0, 20.0]);
        let file: Vec<f64> = AuditLog::query_file(&path, &q)
            .unwrap()
            .iter()
            .map(|r| r.t_s)
            .collect();
        assert_eq!(file, vec![30.0, 20.0, 0.0], "the file keeps everything");
        let g = AuditQuery {
            guardrail_only: true,
            since_s: Some(15.0),
            ..Default::default()
        };
        assert_eq!(AuditLog::query_file(&path, &g).unwrap().len(), 1);
        std::fs::write(&path, "{not json}\n").unwrap();
        assert!(matches!(
            AuditLog::query_file(&path, &q),
            Err(AuditError::Parse { line: 1, .. })
        ));
    }
}
