//! Programs in guests through the guest agent: the `agent` section of a VM
//! spec, `POST /v1/vms/{id}/exec` and `POST /v1/vms/{id}/apps/run`, their
//! buffered results and their NDJSON stream lines.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// The guest port the Kiln agent listens on (`kiln_agent::DEFAULT_VSOCK_PORT`).
pub const DEFAULT_AGENT_PORT: u32 = 5252;
/// Most of each of stdout and stderr a buffered answer holds; the rest is
/// dropped and `stdout_truncated`/`stderr_truncated` say so.
pub const OUTPUT_CAP: usize = 1 << 20;
/// The program's timeout when the request gives none.
pub const DEFAULT_TIMEOUT_S: u64 = 600;
/// The longest timeout accepted (the agent's own cap).
pub const MAX_TIMEOUT_S: u64 = 24 * 3600;
/// Largest `.exe` `apps/run` takes.
pub const UPLOAD_LIMIT: usize = 64 << 20;

/// A VM spec's `agent` section: the daemon gives the VM a vsock device whose
/// Unix socket lives in the VM's run directory, and reaches the guest
/// agent on `port` through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// The guest vsock port the agent listens on.
    #[serde(default = "default_port")]
    pub port: u32,
}

fn default_port() -> u32 {
    DEFAULT_AGENT_PORT
}

impl Default for AgentSpec {
    fn default() -> Self {
        AgentSpec {
            port: DEFAULT_AGENT_PORT,
        }
    }
}

impl AgentSpec {
    /// What is wrong with the section, if anything.
    pub fn problem(&self) -> Option<String> {
        (self.port == 0 || self.port == u32::MAX).then(|| {
            format!(
                "agent.port {} is not a usable vsock port (1 to {})",
                self.port,
                u32::MAX - 1
            )
        })
    }
}

/// The body of `POST /v1/vms/{id}/exec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program and its arguments; `argv[0]` is looked up in the guest's `PATH`.
    pub argv: Vec<String>,
    /// Added to the agent's environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The working directory in the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Text written to the program's stdin (then closed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Bytes written to stdin, base64 (standard alphabet); not with `stdin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_base64: Option<String>,
    /// The program's whole process group is killed after this many seconds
    /// (default 600, at most 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
}

/// How a program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecExit {
    /// The exit code, when the program exited.
    pub exit_code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    /// The agent killed it because its timeout elapsed.
    pub timed_out: bool,
    pub duration_ms: u64,
}

impl ExecExit {
    /// A shell's view of it: the code, 128+N after signal N, 124 after a timeout.
    pub fn shell_code(&self) -> i32 {
        if self.timed_out {
            124
        } else if let Some(code) = self.exit_code {
            code
        } else if let Some(sig) = self.signal {
            128 + sig
        } else {
            1
        }
    }
}

/// A buffered answer of `exec` or `apps/run`. Output is UTF-8 text (bytes
/// that are not UTF-8 become U+FFFD).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecResult {
    pub stdout: String,
    pub stderr: String,
    /// More than 1 MiB of stdout came; only the first MiB is here.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub duration_ms: u64,
}

impl ExecResult {
    pub fn new(stdout: Output, stderr: Output, exit: ExecExit) -> ExecResult {
        ExecResult {
            stdout: stdout.text,
            stderr: stderr.text,
            stdout_truncated: stdout.truncated,
            stderr_truncated: stderr.truncated,
            exit_code: exit.exit_code,
            signal: exit.signal,
            timed_out: exit.timed_out,
            duration_ms: exit.duration_ms,
        }
    }

    pub fn exit(&self) -> ExecExit {
        ExecExit {
            exit_code: self.exit_code,
            signal: self.signal,
            timed_out: self.timed_out,
            duration_ms: self.duration_ms,
        }
    }
}

/// One stream's output, kept up to [`OUTPUT_CAP`] bytes.
#[derive(Debug, Default)]
pub struct OutputBuffer {
    bytes: Vec<u8>,
    truncated: bool,
}

/// What an [`OutputBuffer`] kept, as text.
#[derive(Debug, Default)]
pub struct Output {
    pub text: String,
    pub truncated: bool,
}

impl OutputBuffer {
    pub fn push(&mut self, chunk: &[u8]) {
        let room = OUTPUT_CAP - self.bytes.len();
        if chunk.len() > room {
            self.truncated = true;
        }
        self.bytes
            .extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    pub fn finish(self) -> Output {
        Output {
            text: String::from_utf8_lossy(&self.bytes).into_owned(),
            truncated: self.truncated,
        }
    }
}

/// One line of a streamed answer (`?stream=true`, NDJSON): output as it
/// arrives, then exactly one `exit` or `error` line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ExecLine {
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    Exit(ExecExit),
    /// The call failed after the answer had begun (the agent's connection
    /// was lost, ...).
    Error {
        error: ApiError,
    },
}

/// UTF-8 text from a byte stream cut at arbitrary points: a character split
/// across two chunks comes out whole with the second one.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// The text of `chunk` (after what was held back), holding back an
    /// incomplete character at its end.
    pub fn push(&mut self, chunk: &[u8]) -> String {
        self.pending.extend_from_slice(chunk);
        let keep = incomplete_tail(&self.pending);
        let split = self.pending.len() - keep;
        let text = String::from_utf8_lossy(&self.pending[..split]).into_owned();
        self.pending.drain(..split);
        text
    }

    /// Whatever was held back (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// Length of an incomplete (but so far valid) UTF-8 sequence at the end.
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=3.min(bytes.len()) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back
        }
        let need = match b {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0,
        };
        return if need > back { back } else { 0 };
    }
    0
}

/// Whether `data` is a PE image: `MZ`, and at the offset `e_lfanew` (at
/// 0x3c) names, the signature `PE\0\0` followed by a COFF header.
pub fn pe_problem(data: &[u8]) -> Option<String> {
    if data.len() < 0x40 || &data[..2] != b"MZ" {
        return Some("it does not start with an MZ (DOS) header".into());
    }
    let e_lfanew = u32::from_le_bytes([data[0x3c], data[0x3d], data[0x3e], data[0x3f]]) as usize;
    // The signature and the 20-byte COFF file header must fit.
    match e_lfanew.checked_add(24) {
        Some(end) if end <= data.len() => {}
        _ => {
            return Some(format!(
                "its PE header offset {e_lfanew:#x} is beyond the file's {} bytes",
                data.len()
            ))
        }
    }
    if &data[e_lfanew..e_lfanew + 4] != b"PE\0\0" {
        return Some(format!("no PE signature at offset {e_lfanew:#x}"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_characters_come_out_whole() {
        let text = "añ€😀z";
        let bytes = text.as_bytes();
        for cut in 0..=bytes.len() {
            let mut s = Utf8Stream::default();
            let mut out = s.push(&bytes[..cut]);
            out.push_str(&s.push(&bytes[cut..]));
            out.push_str(&s.finish());
            assert_eq!(out, text, "cut at {cut}");
        }
        let mut s = Utf8Stream::default();
        assert_eq!(s.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(s.push(b"\xe2\x82"), "");
        assert_eq!(s.finish(), "\u{fffd}");
    }

    fn pe(offset: u32, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[..2].copy_from_slice(b"MZ");
        v[0x3c..0x40].copy_from_slice(&offset.to_le_bytes());
        if (offset as usize) + 4 <= len {
            v[offset as usize..offset as usize + 4].copy_from_slice(b"PE\0\0");
        }
        v
    }

    #[test]
    fn pe_files_are_told_from_others() {
        assert_eq!(pe_problem(&pe(0x80, 512)), None);
        assert!(pe_problem(b"#!/bin/sh\necho hi\n").is_some());
        assert!(pe_problem(&[]).is_some());
        assert!(pe_problem(&pe(0x80, 0x90)).is_some(), "COFF header cut");
        assert!(pe_problem(&pe(u32::MAX, 512)).is_some());
        let mut not_pe = pe(0x80, 512);
        not_pe[0x80] = b'N';
        assert!(pe_problem(&not_pe).unwrap().contains("no PE signature"));
    }

    #[test]
    fn buffers_keep_the_first_mib_and_say_they_cut() {
        let mut b = OutputBuffer::default();
        b.push(&vec![b'a'; OUTPUT_CAP - 1]);
        b.push(b"bc");
        let out = b.finish();
        assert_eq!(out.text.len(), OUTPUT_CAP);
        assert!(out.text.ends_with('b'));
        assert!(out.truncated);
        let mut small = OutputBuffer::default();
        small.push(b"hi");
        assert!(!small.finish().truncated);
    }

    #[test]
    fn exit_codes_read_like_a_shell() {
        let e = |exit_code, signal, timed_out| ExecExit {
            exit_code,
            signal,
            timed_out,
            duration_ms: 1,
        };
        assert_eq!(e(Some(7), None, false).shell_code(), 7);
        assert_eq!(e(None, Some(9), false).shell_code(), 137);
        assert_eq!(e(None, Some(9), true).shell_code(), 124);
    }

    #[test]
    fn lines_have_the_documented_shape() {
        let exit = ExecLine::Exit(ExecExit {
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            duration_ms: 3,
        });
        assert_eq!(
            serde_json::to_value(&exit).unwrap(),
            serde_json::json!({"type":"exit","exit_code":0,"signal":null,"timed_out":false,"duration_ms":3})
        );
        let out = ExecLine::Stdout { data: "hi".into() };
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            r#"{"type":"stdout","data":"hi"}"#
        );
    }
}
