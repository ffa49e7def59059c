//! The agent side: accepts connections and serves requests, one thread per
//! connection. Everything a client sends is untrusted: bad frames and bad
//! requests get an `error` reply and the agent goes on serving.

pub mod exec;
pub mod files;
pub mod power;
pub mod system;
pub mod wine;

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::frame::{self, FrameError, MAX_DRAIN};
use crate::protocol::{
    ErrorCode, ExecRequest, PowerAction, Request, RequestFrame, Response, ResponseFrame,
    WindowsAppRequest, DEFAULT_CHUNK_SIZE, DEFAULT_MAX_FILE_SIZE, DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
};
use crate::transport::{Connection, Listener};
use files::{PutProgress, PutSession};
pub use power::PowerControl;
pub use wine::WineConfig;

/// Limits and optional features of one agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub max_frame: usize,
    pub max_file_size: u64,
    pub chunk_size: usize,
    /// Applied to `exec` / `run_windows_app` requests without `timeout_ms`.
    pub default_timeout: Duration,
    /// Upper bound on any requested timeout.
    pub max_timeout: Duration,
    pub max_connections: usize,
    pub power: PowerControl,
    /// `Some` in guests that can run Windows programs.
    pub wine: Option<WineConfig>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            max_frame: DEFAULT_MAX_FRAME,
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            chunk_size: DEFAULT_CHUNK_SIZE,
            default_timeout: Duration::from_secs(600),
            max_timeout: Duration::from_secs(24 * 3600),
            max_connections: 64,
            power: PowerControl::Reboot2,
            wine: None,
        }
    }
}

/// A failed request: sent to the client as an `error` reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct OpError {
    pub code: ErrorCode,
    pub message: String,
}

impl OpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> OpError {
        OpError {
            code,
            message: message.into(),
        }
    }

    /// Maps an I/O error to the closest protocol error code.
    pub fn io(what: &str, e: &io::Error) -> OpError {
        let code = match e.kind() {
            io::ErrorKind::NotFound => ErrorCode::NotFound,
            io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
            io::ErrorKind::InvalidInput => ErrorCode::BadRequest,
            _ => ErrorCode::Failed,
        };
        OpError::new(code, format!("{what}: {e}"))
    }

    fn into_response(self) -> Response {
        Response::Error {
            code: self.code,
            message: self.message,
        }
    }
}

pub struct Agent {
    config: Arc<AgentConfig>,
    connections: Arc<AtomicUsize>,
}

impl Agent {
    pub fn new(config: AgentConfig) -> Agent {
        Agent {
            config: Arc::new(config),
            connections: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Accepts and serves clients until accepting fails persistently.
    pub fn serve(&self, listener: &Listener) -> io::Result<()> {
        let mut consecutive_errors = 0u32;
        loop {
            let (conn, peer) = match listener.accept() {
                Ok(c) => {
                    consecutive_errors = 0;
                    c
                }
                Err(e) => {
                    // EMFILE and friends are transient: back off, keep serving.
                    consecutive_errors += 1;
                    tracing::warn!(error = %e, "accept failed");
                    if consecutive_errors > 1000 {
                        return Err(e);
                    }
                    thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            self.spawn_connection(conn, peer);
        }
    }

    fn spawn_connection(&self, mut conn: Box<dyn Connection>, peer: String) {
        let active = self.connections.fetch_add(1, Ordering::SeqCst) + 1;
        let guard = ConnectionSlot(Arc::clone(&self.connections));
        if active > self.config.max_connections {
            let reply = ResponseFrame {
                id: None,
                response: OpError::new(ErrorCode::Busy, "too many connections").into_response(),
            };
            let _ = frame::write_json(&mut conn, &reply);
            tracing::warn!(%peer, "refused connection: too many clients");
            return;
        }
        let config = Arc::clone(&self.config);
        let spawned = thread::Builder::new()
            .name("agent-conn".into())
            .spawn(move || {
                let _guard = guard;
                tracing::debug!(%peer, "client connected");
                match Session::new(&config, conn).run() {
                    Ok(()) => tracing::debug!(%peer, "client disconnected"),
                    Err(e) => tracing::info!(%peer, error = %e, "connection closed"),
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start connection thread");
        }
    }
}

/// Decrements the connection count when a connection ends, however it ends.
struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One client connection.
pub struct Session<'a> {
    cfg: &'a AgentConfig,
    conn: Box<dyn Connection>,
    put: Option<PutSession>,
}

impl<'a> Session<'a> {
    pub fn new(cfg: &'a AgentConfig, conn: Box<dyn Connection>) -> Session<'a> {
        Session {
            cfg,
            conn,
            put: None,
        }
    }

    /// Serves requests until the client closes the connection (`Ok`) or the
    /// connection becomes unusable (`Err`).
    pub fn run(mut self) -> Result<(), FrameError> {
        loop {
            let body = match frame::read_frame(&mut self.conn, self.cfg.max_frame) {
                Ok(Some(body)) => body,
                Ok(None) => return Ok(()),
                Err(FrameError::TooLarge { len, max }) => {
                    let msg = format!("frame of {len} bytes exceeds the limit of {max} bytes");
                    self.send(None, OpError::new(ErrorCode::TooLarge, msg).into_response())?;
                    if len > MAX_DRAIN {
                        self.conn.shutdown_both();
                        return Err(FrameError::TooLarge { len, max });
                    }
                    frame::discard(&mut self.conn, len)?;
                    continue;
                }
                Err(FrameError::Empty) => {
                    self.send(
                        None,
                        OpError::new(ErrorCode::BadRequest, "empty frame").into_response(),
                    )?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match serde_json::from_slice::<RequestFrame>(&body) {
                Ok(req) => self.dispatch(req.id, req.request)?,
                Err(e) => {
                    let id = best_effort_id(&body);
                    tracing::debug!(error = %e, "malformed request");
                    self.send(
                        id,
                        OpError::new(ErrorCode::BadRequest, format!("malformed request: {e}"))
                            .into_response(),
                    )?;
                }
            }
        }
    }

    fn send(&mut self, id: Option<u64>, response: Response) -> Result<(), FrameError> {
        frame::write_json(&mut self.conn, &ResponseFrame { id, response })
    }

    fn reply(&mut self, id: u64, result: Result<Response, OpError>) -> Result<(), FrameError> {
        let response = result.unwrap_or_else(OpError::into_response);
        self.send(Some(id), response)
    }

    fn dispatch(&mut self, id: u64, request: Request) -> Result<(), FrameError> {
        // Any request other than the next chunk ends a pending upload.
        if !matches!(request, Request::PutChunk { .. }) {
            if let Some(put) = self.put.take() {
                let put_id = put.id;
                drop(put); // removes the partial file
                let msg = format!(
                    "upload abandoned: {} arrived before all data",
                    request.op_name()
                );
                self.send(
                    Some(put_id),
                    OpError::new(ErrorCode::BadRequest, msg).into_response(),
                )?;
            }
        }
        match request {
            Request::Ping => self.reply(
                id,
                Ok(Response::Pong {
                    protocol_version: PROTOCOL_VERSION,
                    agent_version: env!("CARGO_PKG_VERSION").to_string(),
                }),
            ),
            Request::Info => {
                let caps = self.capabilities();
                self.reply(id, system::guest_info(caps).map(Response::Info))
            }
            Request::Stats => self.reply(id, system::guest_stats().map(Response::Stats)),
            Request::Exec(req) => self.exec(id, req),
            Request::Put(req) => self.put_start(id, &req),
            Request::PutChunk { data } => self.put_chunk(id, &data),
            Request::Get { path } => self.get(id, &path),
            Request::Shutdown => self.power(id, PowerAction::Shutdown),
            Request::Reboot => self.power(id, PowerAction::Reboot),
            Request::RunWindowsApp(req) => self.run_windows_app(id, req),
        }
    }

    fn capabilities(&self) -> Vec<String> {
        let mut caps: Vec<String> = ["exec", "files", "stats", "power"]
            .into_iter()
            .map(String::from)
            .collect();
        if self.cfg.wine.is_some() {
            caps.push("run_windows_app".into());
        }
        caps
    }

    fn timeout(&self, requested_ms: Option<u64>) -> Result<Duration, OpError> {
        match requested_ms {
            None => Ok(self.cfg.default_timeout),
            Some(0) => Err(OpError::new(
                ErrorCode::BadRequest,
                "timeout_ms must be positive",
            )),
            Some(ms) => Ok(Duration::from_millis(ms).min(self.cfg.max_timeout)),
        }
    }

    /// Runs a prepared command, streaming its output as replies to `id`.
    fn stream_command(
        &mut self,
        id: u64,
        cmd: std::process::Command,
        stdin: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), FrameError> {
        let chunk = self.cfg.chunk_size;
        let mut write_error: Option<FrameError> = None;
        let conn = &mut self.conn;
        let mut emit = |out: exec::Output| {
            let response = match out {
                exec::Output::Stdout(data) => Response::Stdout { data },
                exec::Output::Stderr(data) => Response::Stderr { data },
            };
            match frame::write_json(
                conn,
                &ResponseFrame {
                    id: Some(id),
                    response,
                },
            ) {
                Ok(()) => true,
                Err(e) => {
                    write_error = Some(e);
                    false
                }
            }
        };
        let result = exec::run_streaming(cmd, stdin, timeout, chunk, &mut emit);
        if let Some(e) = write_error {
            return Err(e);
        }
        self.reply(id, result.map(Response::Exited))
    }

    fn exec(&mut self, id: u64, req: ExecRequest) -> Result<(), FrameError> {
        let prepared = self
            .timeout(req.timeout_ms)
            .and_then(|t| exec::command_for(&req).map(|cmd| (cmd, t)));
        match prepared {
            Ok((cmd, timeout)) => self.stream_command(id, cmd, req.stdin, timeout),
            Err(e) => self.reply(id, Err(e)),
        }
    }

    fn run_windows_app(&mut self, id: u64, req: WindowsAppRequest) -> Result<(), FrameError> {
        let Some(wine_cfg) = self.cfg.wine.clone() else {
            return self.reply(
                id,
                Err(OpError::new(
                    ErrorCode::Unsupported,
                    "this guest has no Wine (not a Windows-compatibility image)",
                )),
            );
        };
        let prepared = self
            .timeout(req.timeout_ms)
            .and_then(|t| wine::command_for(&wine_cfg, &req).map(|cmd| (cmd, t)));
        match prepared {
            Ok((cmd, _)) if req.gui => {
                let started =
                    wine::start_detached(cmd).map(|pid| Response::WindowsAppStarted { pid });
                self.reply(id, started)
            }
            Ok((cmd, timeout)) => self.stream_command(id, cmd, Vec::new(), timeout),
            Err(e) => self.reply(id, Err(e)),
        }
    }

    fn put_start(&mut self, id: u64, req: &crate::protocol::PutRequest) -> Result<(), FrameError> {
        let mut session = match PutSession::start(id, req, self.cfg.max_file_size) {
            Ok(s) => s,
            Err(e) => return self.reply(id, Err(e)),
        };
        self.send(
            Some(id),
            Response::PutReady {
                chunk_size: self.cfg.chunk_size as u64,
            },
        )?;
        if session.is_complete() {
            let done = session.finish();
            drop(session);
            return self.reply(id, done);
        }
        self.put = Some(session);
        Ok(())
    }

    fn put_chunk(&mut self, id: u64, data: &[u8]) -> Result<(), FrameError> {
        let Some(mut session) = self.put.take() else {
            return self.reply(
                id,
                Err(OpError::new(
                    ErrorCode::BadRequest,
                    "put_chunk without a put in progress",
                )),
            );
        };
        if session.id != id {
            let msg = format!(
                "put_chunk for id {id} while the upload in progress has id {}",
                session.id
            );
            let session_id = session.id;
            drop(session); // removes the partial file
                           // The pending upload is abandoned too: both ids learn about it.
            self.send(
                Some(session_id),
                OpError::new(ErrorCode::BadRequest, msg.clone()).into_response(),
            )?;
            return self.reply(id, Err(OpError::new(ErrorCode::BadRequest, msg)));
        }
        match session.write_chunk(data) {
            Ok(PutProgress::NeedMore) => {
                self.put = Some(session);
                Ok(())
            }
            Ok(PutProgress::Done(resp)) => self.reply(id, Ok(*resp)),
            Err(e) => {
                // Remove the partial file before the client hears about it.
                drop(session);
                self.reply(id, Err(e))
            }
        }
    }

    fn get(&mut self, id: u64, path: &str) -> Result<(), FrameError> {
        let (max, chunk) = (self.cfg.max_file_size, self.cfg.chunk_size);
        let mut write_error = None;
        let conn = &mut self.conn;
        let mut emit = |response: Response| match frame::write_json(
            conn,
            &ResponseFrame {
                id: Some(id),
                response,
            },
        ) {
            Ok(()) => true,
            Err(e) => {
                write_error = Some(e);
                false
            }
        };
        let result = files::send_file(path, max, chunk, &mut emit);
        if let Some(e) = write_error {
            return Err(e);
        }
        match result {
            Ok(()) => Ok(()),
            Err(e) => self.reply(id, Err(e)),
        }
    }

    fn power(&mut self, id: u64, action: PowerAction) -> Result<(), FrameError> {
        if let Err(e) = self.cfg.power.check() {
            return self.reply(id, Err(e));
        }
        self.reply(id, Ok(Response::PowerAccepted { action }))?;
        tracing::info!(action = action.as_str(), "power action requested");
        self.cfg.power.schedule(action);
        Ok(())
    }
}

/// The `id` of a request that failed to parse, if it is a JSON object with a
/// numeric id, so the error reply can still be matched by the client.
fn best_effort_id(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("id")?
        .as_u64()
}
