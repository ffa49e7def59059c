//! Optional fallback for requests the rules do not understand: an
//! OpenAI-compatible chat endpoint rewrites the request into one of the
//! phrasings the rule-based parser knows, and the parser decides what runs.
//! The model therefore cannot trigger anything a typed request could not.
//! Off unless `CLAY_LLM_URL` is set; plain `http://` only (a local server).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::intent::{self, Intent};

/// Largest reply read from the endpoint.
const MAX_REPLY: u64 = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmConfig {
    /// Base URL, e.g. `http://127.0.0.1:8080/v1`.
    pub base_url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("only http:// endpoints are supported, got {0:?}")]
    Scheme(String),
    #[error("cannot reach {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("I/O with the endpoint: {0}")]
    Io(#[from] std::io::Error),
    #[error("the endpoint answered HTTP {0}")]
    Status(u16),
    #[error("unreadable reply: {0}")]
    Reply(String),
}

impl LlmConfig {
    /// Reads `CLAY_LLM_URL`, `CLAY_LLM_MODEL` (default "default") and
    /// `CLAY_LLM_API_KEY`; `None` when no URL is set (the default).
    pub fn from_env() -> Option<LlmConfig> {
        let base_url = std::env::var("CLAY_LLM_URL")
            .ok()
            .filter(|u| !u.is_empty())?;
        Some(LlmConfig {
            base_url,
            model: std::env::var("CLAY_LLM_MODEL").unwrap_or_else(|_| "default".into()),
            api_key: std::env::var("CLAY_LLM_API_KEY").ok(),
            timeout: Duration::from_secs(30),
        })
    }
}

const SYSTEM_PROMPT: &str = "You turn a desktop user's request into exactly one of these commands, \
and reply with the command only: 'open a terminal', 'how much memory is free', \
'how much disk space is left', 'is the cpu busy', 'uptime', 'what time is it', \
'list files in <directory>', 'run <program>.exe [arguments]', 'open <program> [arguments]', 'help'. \
If none fits, reply 'unknown'.";

/// Asks the endpoint to rephrase `request`, then parses the rephrasing.
pub fn interpret(cfg: &LlmConfig, request: &str) -> Result<Intent, LlmError> {
    let body = serde_json::json!({
        "model": cfg.model,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": request},
        ],
    })
    .to_string();
    let reply = post_json(cfg, "/chat/completions", &body)?;
    let value: serde_json::Value =
        serde_json::from_str(&reply).map_err(|e| LlmError::Reply(e.to_string()))?;
    let text = value
        .pointer("/choices/0/message/content")
        .and_then(|c| c.as_str())
        .ok_or_else(|| LlmError::Reply("no choices[0].message.content".into()))?;
    let line = text
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .trim_matches(|c| c == '\'' || c == '"' || c == '`');
    Ok(match intent::parse(line) {
        // The model's own "unknown" (or nonsense) stays unknown, with the user's words.
        Intent::Unknown { .. } | Intent::Empty => Intent::Unknown {
            text: request.to_string(),
        },
        other => other,
    })
}

fn post_json(cfg: &LlmConfig, path: &str, body: &str) -> Result<String, LlmError> {
    let rest = cfg
        .base_url
        .strip_prefix("http://")
        .ok_or_else(|| LlmError::Scheme(cfg.base_url.clone()))?;
    let (host_port, base_path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let addr_text = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:80")
    };
    let addr = addr_text
        .to_socket_addrs()
        .map_err(|e| LlmError::Connect(addr_text.clone(), e))?
        .next()
        .ok_or_else(|| LlmError::Connect(addr_text.clone(), std::io::Error::other("no address")))?;
    let mut stream = TcpStream::connect_timeout(&addr, cfg.timeout)
        .map_err(|e| LlmError::Connect(addr_text.clone(), e))?;
    stream.set_read_timeout(Some(cfg.timeout))?;
    stream.set_write_timeout(Some(cfg.timeout))?;
    let auth = cfg
        .api_key
        .as_deref()
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST {base_path}{path} HTTP/1.1\r\nHost: {host_port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(stream.take(MAX_REPLY));
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| LlmError::Reply(format!("bad status line {status_line:?}")))?;
    let mut chunked = false;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    let mut raw = Vec::new();
    reader.read_to_end(&mut raw)?;
    if !(200..300).contains(&status) {
        return Err(LlmError::Status(status));
    }
    let body = if chunked { dechunk(&raw)? } else { raw };
    String::from_utf8(body).map_err(|e| LlmError::Reply(e.to_string()))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, LlmError> {
    let mut out = Vec::new();
    loop {
        let pos = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| LlmError::Reply("bad chunk".into()))?;
        let size_text =
            std::str::from_utf8(&data[..pos]).map_err(|e| LlmError::Reply(e.to_string()))?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| LlmError::Reply(format!("chunk size: {e}")))?;
        data = &data[pos + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data
            .get(..size)
            .ok_or_else(|| LlmError::Reply("truncated chunk".into()))?;
        out.extend_from_slice(chunk);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A one-shot HTTP server on loopback answering with `reply_content` as
    /// the model's message; returns its base URL and the request it saw.
    fn serve_once(
        status: u16,
        reply_content: &str,
        chunked: bool,
    ) -> (String, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/v1", listener.local_addr().expect("addr"));
        let body = serde_json::json!({"choices": [{"message": {"role": "assistant", "content": reply_content}}]}).to_string();
        let handle = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut buf = vec![0u8; 65536];
            let mut seen = Vec::new();
            // Read headers and the announced body.
            loop {
                let n = s.read(&mut buf).expect("read");
                seen.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&seen).into_owned();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if seen.len() >= end + 4 + len {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            let response = if chunked {
                let (a, b) = body.split_at(body.len() / 2);
                format!("HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n", a.len(), b.len())
            } else {
                format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            };
            s.write_all(response.as_bytes()).expect("write");
            String::from_utf8_lossy(&seen).into_owned()
        });
        (url, handle)
    }

    fn cfg(url: String) -> LlmConfig {
        LlmConfig {
            base_url: url,
            model: "test-model".into(),
            api_key: Some("k".into()),
            timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn rephrasing_is_parsed_by_the_rules() {
        let (url, server) = serve_once(200, "'how much memory is free'", false);
        let intent =
            interpret(&cfg(url), "am I running out of room for programs?").expect("interpret");
        assert_eq!(intent, Intent::MemoryFree);
        let seen = server.join().expect("server");
        assert!(
            seen.starts_with("POST /v1/chat/completions HTTP/1.1"),
            "{seen}"
        );
        assert!(
            seen.contains("Authorization: Bearer k") && seen.contains("\"model\":\"test-model\"")
        );

        let (url, _s) = serve_once(200, "run notepad.exe", true);
        assert_eq!(
            interpret(&cfg(url), "I need to write a note").expect("interpret"),
            Intent::RunWindowsApp {
                exe: "notepad.exe".into(),
                args: vec![]
            }
        );
    }

    #[test]
    fn unknown_replies_errors_and_bad_urls() {
        let (url, _s) = serve_once(200, "unknown", false);
        assert_eq!(
            interpret(&cfg(url), "sing").expect("interpret"),
            Intent::Unknown {
                text: "sing".into()
            }
        );
        let (url, _s) = serve_once(500, "x", false);
        assert!(matches!(
            interpret(&cfg(url), "x"),
            Err(LlmError::Status(500))
        ));
        assert!(matches!(
            interpret(&cfg("https://example.invalid/v1".into()), "x"),
            Err(LlmError::Scheme(_))
        ));
        assert!(matches!(
            interpret(&cfg("http://127.0.0.1:9/v1".into()), "x"),
            Err(LlmError::Connect(..))
        ));
    }
}
