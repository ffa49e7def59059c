//! Message types of the Kiln agent protocol (see `PROTOCOL.md`).
//!
//! Every message is one frame: a 4-byte big-endian length followed by that many
//! bytes of UTF-8 JSON. Requests carry a client-chosen `id` and an `op`; every
//! reply to a request carries the same `id` and a `kind`. Binary payloads
//! (stdin, output, file chunks) are base64 strings.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the protocol described here; reported by `ping` and `info`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock port the agent listens on inside every Kiln guest.
pub const DEFAULT_VSOCK_PORT: u32 = 5252;

/// Largest frame (JSON body) either side accepts by default: 1 MiB.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// Raw bytes per file chunk / output event. Base64 inflates this by 4/3, which
/// keeps every chunk frame far below [`DEFAULT_MAX_FRAME`].
pub const DEFAULT_CHUNK_SIZE: usize = 64 * 1024;

/// Largest file `put` or `get` accepts by default: 2 GiB.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 2 << 30;

/// A request as it travels on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestFrame {
    pub id: u64,
    #[serde(flatten)]
    pub request: Request,
}

/// What a client can ask of the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Liveness check; answered with [`Response::Pong`].
    Ping,
    /// OS, kernel, uptime; answered with [`Response::Info`].
    Info,
    /// Run a program; answered with `stdout`/`stderr` events then `exited`.
    Exec(ExecRequest),
    /// Start uploading a file; answered with `put_ready`, then the client sends
    /// `put_chunk` frames with the same id until `size` bytes have been sent,
    /// and the agent answers `put_done` (or `error`).
    Put(PutRequest),
    /// One piece of the file announced by the `put` with the same id.
    PutChunk {
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// Download a file; answered with `file_begin`, `file_chunk`*, `file_end`.
    Get { path: String },
    /// Memory, load and pressure figures; answered with [`Response::Stats`].
    Stats,
    /// Power the guest off (after the reply has been sent).
    Shutdown,
    /// Reboot the guest (after the reply has been sent).
    Reboot,
    /// Run a Windows program (already uploaded with `put`) under Wine.
    RunWindowsApp(WindowsAppRequest),
}

impl Request {
    /// The `op` name, for logs and error messages.
    pub fn op_name(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Info => "info",
            Request::Exec(_) => "exec",
            Request::Put(_) => "put",
            Request::PutChunk { .. } => "put_chunk",
            Request::Get { .. } => "get",
            Request::Stats => "stats",
            Request::Shutdown => "shutdown",
            Request::Reboot => "reboot",
            Request::RunWindowsApp(_) => "run_windows_app",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Variables added to (or, with `clear_env`, making up) the environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub clear_env: bool,
    /// Working directory; the agent's own when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Bytes written to the program's stdin, which is then closed.
    #[serde(default, with = "b64")]
    pub stdin: Vec<u8>,
    /// The whole process group is killed when this elapses; the agent's
    /// default timeout applies when absent.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PutRequest {
    /// Absolute path in the guest.
    pub path: String,
    /// Exact number of bytes that will follow in `put_chunk` frames.
    pub size: u64,
    /// Lower-case hex SHA-256 of the whole content; checked before the file
    /// replaces anything at `path`.
    pub sha256: String,
    /// Permission bits of the new file (default 0o644).
    #[serde(default)]
    pub mode: Option<u32>,
    /// Create missing parent directories.
    #[serde(default)]
    pub create_dirs: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowsAppRequest {
    /// Absolute guest path of the `.exe`.
    pub path: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// GUI programs are started detached on the guest display and keep
    /// running; the reply is `windows_app_started`. Console programs are run to
    /// completion with their output streamed like `exec`.
    #[serde(default)]
    pub gui: bool,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// A reply as it travels on the wire. `id` is `null` only when the request
/// could not be parsed far enough to read its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseFrame {
    pub id: Option<u64>,
    #[serde(flatten)]
    pub response: Response,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    Pong {
        protocol_version: u32,
        agent_version: String,
    },
    Info(GuestInfo),
    Stdout {
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    Stderr {
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    Exited(ExitStatus),
    PutReady {
        chunk_size: u64,
    },
    PutDone {
        size: u64,
        sha256: String,
    },
    FileBegin {
        size: u64,
        mode: u32,
    },
    FileChunk {
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    FileEnd {
        sha256: String,
    },
    Stats(GuestStats),
    /// Shutdown or reboot accepted; the action follows shortly.
    PowerAccepted {
        action: PowerAction,
    },
    WindowsAppStarted {
        pid: u32,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerAction {
    Shutdown,
    Reboot,
}

impl PowerAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerAction::Shutdown => "shutdown",
            PowerAction::Reboot => "reboot",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame was not valid JSON or not a known request.
    BadRequest,
    /// A frame, file or field exceeded the agent's limits.
    TooLarge,
    NotFound,
    PermissionDenied,
    /// The uploaded content did not match the announced checksum.
    ChecksumMismatch,
    /// The request is valid but this guest cannot serve it (e.g. no Wine).
    Unsupported,
    /// Too many connections or a conflicting operation in progress.
    Busy,
    /// Any other failure in the guest (spawn, I/O, ...).
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code when the program exited normally.
    pub code: Option<i32>,
    /// Signal number when it was killed by a signal.
    pub signal: Option<i32>,
    /// Whether the agent killed it because its timeout elapsed.
    pub timed_out: bool,
    pub duration_ms: u64,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestInfo {
    pub protocol_version: u32,
    pub agent_version: String,
    /// `PRETTY_NAME` from os-release, e.g. "Debian GNU/Linux 12 (bookworm)".
    pub os_name: Option<String>,
    pub os_id: Option<String>,
    pub os_version_id: Option<String>,
    pub kernel_release: String,
    pub kernel_version: String,
    pub machine: String,
    pub hostname: String,
    pub uptime_secs: f64,
    /// Optional features this agent serves, e.g. "run_windows_app".
    pub capabilities: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestStats {
    /// Every `/proc/meminfo` field, in KiB as the kernel reports them.
    pub meminfo_kib: BTreeMap<String, u64>,
    pub load: LoadAverage,
    /// Pressure stall information; `None` when the kernel has PSI disabled.
    pub pressure: Option<Pressure>,
    pub uptime_secs: f64,
}

impl GuestStats {
    pub fn mem_total_bytes(&self) -> Option<u64> {
        self.meminfo_kib.get("MemTotal").map(|k| k * 1024)
    }
    pub fn mem_available_bytes(&self) -> Option<u64> {
        self.meminfo_kib.get("MemAvailable").map(|k| k * 1024)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadAverage {
    pub one: f64,
    pub five: f64,
    pub fifteen: f64,
    pub runnable: u64,
    pub tasks: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pressure {
    pub cpu: Option<PressureResource>,
    pub memory: Option<PressureResource>,
    pub io: Option<PressureResource>,
}

/// One `/proc/pressure/*` file: the `some` line and (not for cpu on older
/// kernels) the `full` line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PressureResource {
    pub some: PressureLine,
    pub full: Option<PressureLine>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PressureLine {
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    /// Total stall time in microseconds.
    pub total_us: u64,
}

/// serde adapter: `Vec<u8>` as a standard base64 string.
pub mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
    }
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// SHA-256 of `data` as lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex(&Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_shape_is_flat_with_op_tag() {
        let frame = RequestFrame {
            id: 7,
            request: Request::Exec(ExecRequest {
                argv: vec!["echo".into(), "hi".into()],
                stdin: b"in".to_vec(),
                ..Default::default()
            }),
        };
        let json = serde_json::to_value(&frame).expect("serialise");
        assert_eq!(json["id"], 7);
        assert_eq!(json["op"], "exec");
        assert_eq!(json["argv"][1], "hi");
        assert_eq!(json["stdin"], "aW4=");
        let back: RequestFrame = serde_json::from_value(json).expect("parse back");
        assert_eq!(back, frame);
    }

    #[test]
    fn minimal_requests_parse_with_defaults() {
        let f: RequestFrame =
            serde_json::from_str(r#"{"id":1,"op":"exec","argv":["true"]}"#).expect("parse");
        match f.request {
            Request::Exec(e) => {
                assert_eq!(e.argv, vec!["true"]);
                assert!(e.stdin.is_empty() && e.env.is_empty() && e.timeout_ms.is_none());
            }
            other => panic!("wrong request {other:?}"),
        }
        let f: RequestFrame = serde_json::from_str(r#"{"op":"ping","id":2}"#).expect("parse");
        assert_eq!(f.request, Request::Ping);
    }

    #[test]
    fn wrong_types_and_unknown_ops_are_rejected() {
        for bad in [
            r#"{"id":1,"op":"exec","argv":"ls"}"#,
            r#"{"id":"one","op":"ping"}"#,
            r#"{"id":1,"op":"format_disk"}"#,
            r#"{"id":1}"#,
            r#"{"id":1,"op":"put_chunk","data":"!!notbase64"}"#,
            r#"[1,2,3]"#,
        ] {
            assert!(
                serde_json::from_str::<RequestFrame>(bad).is_err(),
                "{bad} parsed"
            );
        }
    }

    #[test]
    fn error_reply_shape() {
        let r = ResponseFrame {
            id: None,
            response: Response::Error {
                code: ErrorCode::TooLarge,
                message: "x".into(),
            },
        };
        let json = serde_json::to_string(&r).expect("serialise");
        assert_eq!(
            json,
            r#"{"id":null,"kind":"error","code":"too_large","message":"x"}"#
        );
    }

    #[test]
    fn sha256_hex_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
