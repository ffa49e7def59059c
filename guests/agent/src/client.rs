//! The host side: a typed, blocking client for the agent protocol, used by
//! the daemon, the CLI and the tests. One request at a time per client.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::frame::{self, FrameError};
use crate::protocol::{
    hex, ErrorCode, ExecRequest, ExitStatus, GuestInfo, GuestStats, PowerAction, PutRequest,
    Request, RequestFrame, Response, ResponseFrame, WindowsAppRequest, DEFAULT_MAX_FRAME,
};
use crate::transport::{ConnectAddr, Connection, VsockStream};
use crate::vsock_uds::{self, HandshakeError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the agent at {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    /// The userspace vsock's `CONNECT`/`OK` handshake failed.
    #[error("cannot reach the agent: {0}")]
    VsockHandshake(#[from] HandshakeError),
    #[error("connection to the agent failed: {0}")]
    Frame(#[from] FrameError),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("the agent closed the connection")]
    Closed,
    #[error("the agent sent an unreadable reply: {0}")]
    BadReply(String),
    #[error("the agent refused the request ({code:?}): {message}")]
    Agent { code: ErrorCode, message: String },
    #[error("checksum mismatch: got {actual}, agent said {expected}")]
    ChecksumMismatch { expected: String, actual: String },
}

/// Which stream an output chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// Everything a finished program produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

/// Result of `run_windows_app`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowsAppOutcome {
    /// A console program ran to completion.
    Finished(ExecOutput),
    /// A GUI program was started and keeps running on the guest display.
    Started { pid: u32 },
}

pub struct AgentClient {
    conn: Box<dyn Connection>,
    next_id: u64,
    max_frame: usize,
}

impl AgentClient {
    /// Wraps an already connected stream.
    pub fn new(conn: Box<dyn Connection>) -> AgentClient {
        AgentClient {
            conn,
            next_id: 1,
            max_frame: DEFAULT_MAX_FRAME,
        }
    }

    /// Connects to `addr`; `read_timeout` bounds how long any single read may
    /// wait for the agent (None: forever).
    pub fn connect(
        addr: &ConnectAddr,
        read_timeout: Option<Duration>,
    ) -> Result<AgentClient, ClientError> {
        let describe = || format!("{addr:?}");
        let conn: Box<dyn Connection> = match addr {
            ConnectAddr::Unix(path) => {
                let s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
                    addr: describe(),
                    source,
                })?;
                s.set_read_timeout(read_timeout)?;
                Box::new(s)
            }
            ConnectAddr::Tcp(hp) => {
                let s = TcpStream::connect(hp.as_str()).map_err(|source| ClientError::Connect {
                    addr: describe(),
                    source,
                })?;
                s.set_read_timeout(read_timeout)?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            ConnectAddr::Vsock { cid, port } => {
                let s =
                    VsockStream::connect(*cid, *port).map_err(|source| ClientError::Connect {
                        addr: describe(),
                        source,
                    })?;
                s.set_read_timeout(read_timeout)?;
                Box::new(s)
            }
            ConnectAddr::VsockUds { path, port } => {
                let (s, _host_port) = vsock_uds::connect(path, *port, read_timeout)?;
                Box::new(s)
            }
        };
        Ok(AgentClient::new(conn))
    }

    /// Connects to the agent on guest `port` (normally
    /// [`crate::DEFAULT_VSOCK_PORT`]) through Kiln's vsock Unix socket
    /// (`kiln run --vsock cid=3,uds=PATH`).
    pub fn connect_vsock_uds(
        path: &Path,
        port: u32,
        read_timeout: Option<Duration>,
    ) -> Result<AgentClient, ClientError> {
        AgentClient::connect(
            &ConnectAddr::VsockUds {
                path: path.to_path_buf(),
                port,
            },
            read_timeout,
        )
    }

    pub fn connect_unix(path: &Path) -> Result<AgentClient, ClientError> {
        AgentClient::connect(&ConnectAddr::Unix(path.to_path_buf()), None)
    }

    fn send(&mut self, request: Request) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        frame::write_json(&mut self.conn, &RequestFrame { id, request })?;
        Ok(id)
    }

    /// Next reply for `id`; agent errors become `ClientError::Agent`.
    fn recv(&mut self, id: u64) -> Result<Response, ClientError> {
        loop {
            let body =
                frame::read_frame(&mut self.conn, self.max_frame)?.ok_or(ClientError::Closed)?;
            let reply: ResponseFrame =
                serde_json::from_slice(&body).map_err(|e| ClientError::BadReply(e.to_string()))?;
            match (reply.id, reply.response) {
                (Some(got), _) if got != id => {
                    // A late reply to an earlier, abandoned request: skip it.
                    tracing::debug!(got, want = id, "skipping reply for another request");
                }
                (_, Response::Error { code, message }) => {
                    return Err(ClientError::Agent { code, message })
                }
                (_, response) => return Ok(response),
            }
        }
    }

    fn unexpected(what: &str, r: &Response) -> ClientError {
        ClientError::BadReply(format!("expected {what}, got {r:?}"))
    }

    /// Returns the agent's protocol version.
    pub fn ping(&mut self) -> Result<u32, ClientError> {
        let id = self.send(Request::Ping)?;
        match self.recv(id)? {
            Response::Pong {
                protocol_version, ..
            } => Ok(protocol_version),
            r => Err(Self::unexpected("pong", &r)),
        }
    }

    pub fn info(&mut self) -> Result<GuestInfo, ClientError> {
        let id = self.send(Request::Info)?;
        match self.recv(id)? {
            Response::Info(info) => Ok(info),
            r => Err(Self::unexpected("info", &r)),
        }
    }

    pub fn stats(&mut self) -> Result<GuestStats, ClientError> {
        let id = self.send(Request::Stats)?;
        match self.recv(id)? {
            Response::Stats(s) => Ok(s),
            r => Err(Self::unexpected("stats", &r)),
        }
    }

    /// Runs a program, handing each output chunk to `on_output` as it arrives.
    pub fn exec_streaming(
        &mut self,
        req: ExecRequest,
        on_output: &mut dyn FnMut(OutputStream, &[u8]),
    ) -> Result<ExitStatus, ClientError> {
        let id = self.send(Request::Exec(req))?;
        self.collect_run(id, on_output)
    }

    /// Runs a program and returns its whole output.
    pub fn exec(&mut self, req: ExecRequest) -> Result<ExecOutput, ClientError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = self.exec_streaming(req, &mut |s, d| match s {
            OutputStream::Stdout => stdout.extend_from_slice(d),
            OutputStream::Stderr => stderr.extend_from_slice(d),
        })?;
        Ok(ExecOutput {
            stdout,
            stderr,
            status,
        })
    }

    fn collect_run(
        &mut self,
        id: u64,
        on_output: &mut dyn FnMut(OutputStream, &[u8]),
    ) -> Result<ExitStatus, ClientError> {
        loop {
            match self.recv(id)? {
                Response::Stdout { data } => on_output(OutputStream::Stdout, &data),
                Response::Stderr { data } => on_output(OutputStream::Stderr, &data),
                Response::Exited(status) => return Ok(status),
                r => return Err(Self::unexpected("output or exit", &r)),
            }
        }
    }

    /// Uploads `data` to `remote` (absolute guest path).
    pub fn put_bytes(&mut self, remote: &str, data: &[u8], mode: u32) -> Result<(), ClientError> {
        let mut reader = data;
        self.put_reader(
            remote,
            &mut reader,
            data.len() as u64,
            hex(&Sha256::digest(data)),
            mode,
        )
    }

    /// Uploads a local file (read twice: once to checksum it, once to send it).
    pub fn put_file(&mut self, local: &Path, remote: &str, mode: u32) -> Result<(), ClientError> {
        let mut file = File::open(local)?;
        let mut hasher = Sha256::new();
        let size = io::copy(&mut file, &mut hasher)?;
        let sha = hex(&hasher.finalize());
        let mut file = File::open(local)?;
        self.put_reader(remote, &mut file, size, sha, mode)
    }

    fn put_reader(
        &mut self,
        remote: &str,
        data: &mut dyn Read,
        size: u64,
        sha256: String,
        mode: u32,
    ) -> Result<(), ClientError> {
        let id = self.send(Request::Put(PutRequest {
            path: remote.to_string(),
            size,
            sha256: sha256.clone(),
            mode: Some(mode),
            create_dirs: true,
        }))?;
        let chunk_size = match self.recv(id)? {
            Response::PutReady { chunk_size } => usize::try_from(chunk_size)
                .unwrap_or(usize::MAX)
                .clamp(1, 1 << 20),
            r => return Err(Self::unexpected("put_ready", &r)),
        };
        let mut sent = 0u64;
        let mut buf = vec![0u8; chunk_size];
        while sent < size {
            let want = usize::try_from(size - sent)
                .unwrap_or(usize::MAX)
                .min(chunk_size);
            data.read_exact(&mut buf[..want])?;
            frame::write_json(
                &mut self.conn,
                &RequestFrame {
                    id,
                    request: Request::PutChunk {
                        data: buf[..want].to_vec(),
                    },
                },
            )?;
            sent += want as u64;
        }
        match self.recv(id)? {
            Response::PutDone { sha256: got, .. } if got == sha256 => Ok(()),
            Response::PutDone { sha256: got, .. } => Err(ClientError::ChecksumMismatch {
                expected: sha256,
                actual: got,
            }),
            r => Err(Self::unexpected("put_done", &r)),
        }
    }

    /// Downloads `remote` into `sink`; returns the number of bytes.
    pub fn get_to(&mut self, remote: &str, sink: &mut dyn Write) -> Result<u64, ClientError> {
        let id = self.send(Request::Get {
            path: remote.to_string(),
        })?;
        let announced = match self.recv(id)? {
            Response::FileBegin { size, .. } => size,
            r => return Err(Self::unexpected("file_begin", &r)),
        };
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        loop {
            match self.recv(id)? {
                Response::FileChunk { data } => {
                    received += data.len() as u64;
                    if received > announced {
                        return Err(ClientError::BadReply(format!(
                            "more than the announced {announced} bytes"
                        )));
                    }
                    hasher.update(&data);
                    sink.write_all(&data)?;
                }
                Response::FileEnd { sha256 } => {
                    let actual = hex(&hasher.finalize());
                    if actual != sha256 {
                        return Err(ClientError::ChecksumMismatch {
                            expected: sha256,
                            actual,
                        });
                    }
                    return Ok(received);
                }
                r => return Err(Self::unexpected("file_chunk or file_end", &r)),
            }
        }
    }

    pub fn get_bytes(&mut self, remote: &str) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        self.get_to(remote, &mut out)?;
        Ok(out)
    }

    pub fn shutdown(&mut self) -> Result<(), ClientError> {
        self.power(Request::Shutdown, PowerAction::Shutdown)
    }

    pub fn reboot(&mut self) -> Result<(), ClientError> {
        self.power(Request::Reboot, PowerAction::Reboot)
    }

    fn power(&mut self, req: Request, want: PowerAction) -> Result<(), ClientError> {
        let id = self.send(req)?;
        match self.recv(id)? {
            Response::PowerAccepted { action } if action == want => Ok(()),
            r => Err(Self::unexpected("power_accepted", &r)),
        }
    }

    /// Runs an uploaded Windows program under Wine in the guest.
    pub fn run_windows_app(
        &mut self,
        req: WindowsAppRequest,
        on_output: &mut dyn FnMut(OutputStream, &[u8]),
    ) -> Result<WindowsAppOutcome, ClientError> {
        let gui = req.gui;
        let id = self.send(Request::RunWindowsApp(req))?;
        if gui {
            return match self.recv(id)? {
                Response::WindowsAppStarted { pid } => Ok(WindowsAppOutcome::Started { pid }),
                r => Err(Self::unexpected("windows_app_started", &r)),
            };
        }
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = self.collect_run(id, &mut |s, d| {
            on_output(s, d);
            match s {
                OutputStream::Stdout => stdout.extend_from_slice(d),
                OutputStream::Stderr => stderr.extend_from_slice(d),
            }
        })?;
        Ok(WindowsAppOutcome::Finished(ExecOutput {
            stdout,
            stderr,
            status,
        }))
    }
}
