//! The VMM's control protocol, version [`VERSION`]: newline-delimited JSON
//! on a Unix socket, shared by the server ([`crate::control`]) and the
//! blocking [`Client`] (the daemon's and `kiln vmm-ctl`'s).
//!
//! ```text
//! server: {"hello":{"protocol":1,"build_id":"0.1.0+4f743d4","pid":1234}}
//! client: {"id":1,"request":{"kind":"set_balloon_target","mib":256}}
//! server: {"id":1,"result":{"target_mib":256}}
//! client: {"id":2,"request":{"kind":"set_worker_placement","device":"net9","cpus":null,"wait":"notify"}}
//! server: {"id":2,"error":{"code":"not_found","message":"no device \"net9\""}}
//! ```
//!
//! A line is at most [`MAX_LINE`] bytes. A request that does not parse
//! gets an `invalid_request` error (with `"id":null` when even the id is
//! unreadable) and the connection stays usable. At most [`MAX_CLIENTS`]
//! clients are served at once; the next one gets a `busy` error line and
//! is closed.

mod client;
mod types;

use serde::{Deserialize, Serialize};

pub use client::{Client, ClientError};
pub use types::*;

/// The protocol version in the hello; bumped on incompatible changes.
pub const VERSION: u32 = 1;
/// Longest line either side sends, newline included.
pub const MAX_LINE: usize = 64 * 1024;
/// Clients served at once.
pub const MAX_CLIENTS: usize = 8;

/// This build: the crate version, plus the git commit when the build knew it.
pub fn build_id() -> String {
    match option_env!("KILN_GIT_COMMIT") {
        Some(commit) if !commit.is_empty() => {
            format!("{}+{commit}", env!("CARGO_PKG_VERSION"))
        }
        _ => env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// The first line the server sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub protocol: u32,
    pub build_id: String,
    pub pid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloLine {
    pub hello: Hello,
}

/// One request line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestLine {
    pub id: u64,
    pub request: Request,
}

/// One answer line: `result` or `error`, for request `id` (`None` when the
/// request's id could not be read).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseLine {
    pub id: Option<u64>,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Result(serde_json::Value),
    Error(ErrorBody),
}

/// What went wrong, with a stable code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{code}: {message}")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code,
            message: message.into(),
        }
    }
}

/// Stable error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not a known request, or a value that makes no sense here
    /// (a balloon target above guest memory, a CPU this host lacks).
    InvalidRequest,
    /// No such device.
    NotFound,
    /// The VM lacks what the request needs (no balloon, no I/O worker).
    Unsupported,
    /// The line is longer than [`MAX_LINE`]; the connection is closed.
    LineTooLong,
    /// [`MAX_CLIENTS`] are connected already; the connection is closed.
    Busy,
    /// The VMM failed to do what it should have been able to do.
    Internal,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        f.write_str(&text)
    }
}

/// One line of JSON, newline-terminated.
pub fn encode_line<T: Serialize>(value: &T) -> String {
    // Serializing these types cannot fail: no maps with non-string keys.
    let mut line = serde_json::to_string(value).unwrap_or_default();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests;
