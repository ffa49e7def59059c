//! Calls into a VM's guest agent (`kiln-agent`), through the VM's vsock
//! Unix socket in its run directory. Everything here blocks: the routes run
//! it on tokio's blocking pool, never on the reactor.
//!
//! Failures are the API's error codes: an agent that cannot be reached is
//! `agent_unavailable` (503; the guest may still be booting), a connection
//! lost mid-call `agent_disconnected` (502), an agent silent for longer than
//! the call allows `agent_timeout` (504), a request the agent refuses
//! (no such program, no Wine) `agent_refused` (422).

use std::io;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kiln_agent::client::{AgentClient, ClientError, OutputStream, WindowsAppOutcome};
use kiln_agent::frame::FrameError;
use kiln_agent::protocol::{ErrorCode as AgentCode, ExecRequest, ExitStatus, WindowsAppRequest};
use kiln_agent::vsock_uds::{self, HandshakeError};
use kiln_api::{ApiError, ErrorCode};

/// How long the VMM's `OK` line and the agent's `pong` may take. Kiln's VMM
/// itself gives up on a guest that does not accept within 2 s.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much longer than the program's own timeout the agent may stay
/// silent before the call is given up (the agent kills the program at its
/// timeout and then answers `exited`).
const SLACK: Duration = Duration::from_secs(30);
/// Where uploaded programs go in the guest (one directory per call).
const APP_DIR: &str = "/tmp/kiln-apps";

/// Where a running VM's agent is reached.
#[derive(Debug, Clone)]
pub struct AgentTarget {
    pub vm: String,
    /// The VMM's vsock Unix socket.
    pub socket: PathBuf,
    pub port: u32,
}

/// An agent connection that answered `ping`.
pub struct Session {
    client: AgentClient,
    /// The same socket, to set timeouts on and to cut the call from the
    /// output callback (the agent then kills the program).
    stream: UnixStream,
    target: AgentTarget,
}

/// Takes each output chunk; false stops the call (the client went away).
pub type Sink<'a> = dyn FnMut(OutputStream, &[u8]) -> bool + 'a;

impl Session {
    /// Connects through the VMM's vsock socket and pings the agent.
    pub fn open(target: &AgentTarget) -> Result<Session, ApiError> {
        let (stream, _host_port) =
            vsock_uds::connect(&target.socket, target.port, Some(CONNECT_TIMEOUT))
                .map_err(|e| unreachable_error(target, &e))?;
        let handle = stream.try_clone().map_err(|e| {
            ApiError::new(
                ErrorCode::Internal,
                format!("cloning the agent socket of VM {:?}: {e}", target.vm),
            )
        })?;
        let mut client = AgentClient::new(Box::new(stream));
        client.ping().map_err(|e| {
            ApiError::new(
                ErrorCode::AgentUnavailable,
                format!(
                    "the guest agent of VM {:?} did not answer a ping on vsock port {}",
                    target.vm, target.port
                ),
            )
            .with_causes(vec![e.to_string()])
        })?;
        Ok(Session {
            client,
            stream: handle,
            target: target.clone(),
        })
    }

    /// A guard that cuts this session's connection when dropped (the
    /// agent then kills the program): held by the request, so a client
    /// that goes away ends its program even when it prints nothing.
    pub fn cut_on_drop(&self) -> Option<CutOnDrop> {
        self.stream.try_clone().ok().map(CutOnDrop)
    }

    /// Runs `req` (its `timeout_ms` set), handing output to `sink`.
    pub fn exec(&mut self, req: ExecRequest, sink: &mut Sink) -> Result<ExitStatus, ApiError> {
        let wait = call_wait(req.timeout_ms);
        self.set_wait(wait)?;
        let stream = &self.stream;
        let mut cut = false;
        let result = self.client.exec_streaming(req, &mut |s, d| {
            if !cut && !sink(s, d) {
                cut = true;
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        });
        result.map_err(|e| call_error(&self.target, "exec", wait, e))
    }

    /// Uploads `exe` as `file_name` into a fresh directory in the guest,
    /// runs it under Wine (a console program: to its end), and removes the
    /// directory again.
    pub fn run_windows_app(
        &mut self,
        exe: &[u8],
        file_name: &str,
        args: Vec<String>,
        timeout_ms: u64,
        sink: &mut Sink,
    ) -> Result<ExitStatus, ApiError> {
        static CALLS: AtomicU64 = AtomicU64::new(0);
        let dir = format!(
            "{APP_DIR}/{}-{}",
            std::process::id(),
            CALLS.fetch_add(1, Ordering::Relaxed)
        );
        let path = format!("{dir}/{file_name}");
        // The upload: at least a minute, and time for 1 MiB/s.
        let upload_wait = Duration::from_secs(60 + (exe.len() as u64 >> 20));
        self.set_wait(upload_wait)?;
        self.client
            .put_bytes(&path, exe, 0o755)
            .map_err(|e| call_error(&self.target, "uploading the program", upload_wait, e))?;
        let wait = call_wait(Some(timeout_ms));
        self.set_wait(wait)?;
        let stream = &self.stream;
        let mut cut = false;
        let result = self.client.run_windows_app(
            WindowsAppRequest {
                path,
                args,
                gui: false,
                timeout_ms: Some(timeout_ms),
            },
            &mut |s, d| {
                if !cut && !sink(s, d) {
                    cut = true;
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                }
            },
        );
        let outcome = result.map_err(|e| call_error(&self.target, "run_windows_app", wait, e));
        if !cut && !matches!(&outcome, Err(e) if e.code == ErrorCode::AgentDisconnected) {
            self.remove_dir(&dir);
        }
        match outcome? {
            WindowsAppOutcome::Finished(out) => Ok(out.status),
            WindowsAppOutcome::Started { pid } => Err(ApiError::new(
                ErrorCode::AgentDisconnected,
                format!("the agent started a console program as a GUI one (pid {pid})"),
            )),
        }
    }

    /// Best effort: the guest's /tmp is its own business after this.
    fn remove_dir(&mut self, dir: &str) {
        let req = ExecRequest {
            argv: vec!["rm".into(), "-rf".into(), dir.into()],
            env: Default::default(),
            clear_env: false,
            cwd: None,
            stdin: Vec::new(),
            timeout_ms: Some(30_000),
        };
        if self.set_wait(call_wait(req.timeout_ms)).is_ok() {
            if let Err(e) = self.client.exec(req) {
                tracing::warn!("VM {}: removing {dir} in the guest: {e}", self.target.vm);
            }
        }
    }

    fn set_wait(&self, wait: Duration) -> Result<(), ApiError> {
        self.stream.set_read_timeout(Some(wait)).map_err(|e| {
            ApiError::new(
                ErrorCode::Internal,
                format!("setting a timeout on the agent socket: {e}"),
            )
        })
    }
}

/// Shuts the agent connection down when dropped (harmless once the call
/// has ended).
pub struct CutOnDrop(UnixStream);

impl Drop for CutOnDrop {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// How long a call may wait for the agent's next reply.
fn call_wait(timeout_ms: Option<u64>) -> Duration {
    Duration::from_millis(timeout_ms.unwrap_or(600_000)).saturating_add(SLACK)
}

fn unreachable_error(target: &AgentTarget, e: &HandshakeError) -> ApiError {
    let message = match e {
        HandshakeError::Connect { .. } => format!(
            "cannot reach the guest agent of VM {:?}: its VMM's vsock socket does not answer",
            target.vm
        ),
        HandshakeError::Refused { .. } => format!(
            "the guest agent of VM {:?} does not answer on vsock port {} (the guest may \
             still be booting, or runs no agent on that port)",
            target.vm, target.port
        ),
        HandshakeError::Io { .. } => format!(
            "the vsock handshake with the guest of VM {:?} failed",
            target.vm
        ),
    };
    ApiError::new(ErrorCode::AgentUnavailable, message).with_causes(vec![e.to_string()])
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The API error for a call that failed after the agent had answered.
fn call_error(target: &AgentTarget, what: &str, wait: Duration, e: ClientError) -> ApiError {
    let vm = &target.vm;
    let cause = vec![e.to_string()];
    let (code, message) = match &e {
        ClientError::Frame(FrameError::Io(io)) | ClientError::Io(io) if is_timeout(io) => (
            ErrorCode::AgentTimeout,
            format!("{what}: the guest agent of VM {vm:?} sent nothing for {wait:?}"),
        ),
        ClientError::Agent {
            code: AgentCode::Busy,
            ..
        } => (
            ErrorCode::AgentUnavailable,
            format!("{what}: the guest agent of VM {vm:?} is busy"),
        ),
        ClientError::Agent { code, message } => {
            return ApiError::new(
                ErrorCode::AgentRefused,
                format!("{what}: the guest agent of VM {vm:?} refused: {message}"),
            )
            .with_causes(vec![format!("agent error code {code:?}")]);
        }
        ClientError::Frame(FrameError::Io(_))
        | ClientError::Io(_)
        | ClientError::Frame(FrameError::Truncated { .. })
        | ClientError::Closed => (
            ErrorCode::AgentDisconnected,
            format!("{what}: the connection to the guest agent of VM {vm:?} was lost"),
        ),
        ClientError::Frame(_)
        | ClientError::BadReply(_)
        | ClientError::ChecksumMismatch { .. }
        | ClientError::Connect { .. }
        | ClientError::VsockHandshake(_) => (
            ErrorCode::AgentDisconnected,
            format!(
                "{what}: the guest agent of VM {vm:?} broke the protocol; the connection was dropped"
            ),
        ),
    };
    ApiError::new(code, message).with_causes(cause)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> AgentTarget {
        AgentTarget {
            vm: "w".into(),
            socket: "/nonexistent/agent.vsock".into(),
            port: 5252,
        }
    }

    #[test]
    fn a_missing_socket_is_agent_unavailable() {
        let e = Session::open(&target()).err().unwrap();
        assert_eq!(e.code, ErrorCode::AgentUnavailable);
        assert!(e.causes[0].contains("/nonexistent/agent.vsock"), "{e:?}");
    }

    #[test]
    fn call_failures_get_their_codes() {
        let t = target();
        let wait = Duration::from_secs(1);
        let code = |e| call_error(&t, "exec", wait, e).code;
        assert_eq!(
            code(ClientError::Io(io::ErrorKind::WouldBlock.into())),
            ErrorCode::AgentTimeout
        );
        assert_eq!(code(ClientError::Closed), ErrorCode::AgentDisconnected);
        assert_eq!(
            code(ClientError::Frame(FrameError::Io(
                io::ErrorKind::ConnectionReset.into()
            ))),
            ErrorCode::AgentDisconnected
        );
        assert_eq!(
            code(ClientError::Agent {
                code: AgentCode::NotFound,
                message: "no such program".into()
            }),
            ErrorCode::AgentRefused
        );
        assert_eq!(
            code(ClientError::BadReply("junk".into())),
            ErrorCode::AgentDisconnected
        );
    }
}
