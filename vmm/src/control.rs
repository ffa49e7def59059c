//! The control socket's server: the [`crate::protocol`] on a Unix socket
//! (mode 0600), one thread per client, at most
//! [`MAX_CLIENTS`](crate::protocol::MAX_CLIENTS) at once. Each request is
//! carried out through the [`Vm`] handle.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::protocol::{
    build_id, encode_line, ErrorBody, ErrorCode, Hello, HelloLine, Outcome, Request, RequestLine,
    ResponseLine, WorkerPlacement, MAX_CLIENTS, MAX_LINE, VERSION,
};
use crate::vm::Vm;

/// A client idle this long is disconnected, so idle clients cannot hold
/// the slots forever; clients reconnect.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Client threads only parse JSON and call the handle.
const CLIENT_STACK: usize = 256 << 10;

/// Serves the control socket on its own thread while the VM runs; the
/// socket file is removed when this is dropped.
pub struct ControlSocket {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlSocket {
    pub fn start(path: &Path, vm: Vm) -> Result<ControlSocket> {
        remove_stale_socket(path)?;
        let listener = UnixListener::bind(path)
            .with_context(|| format!("cannot create control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict control socket {}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let active = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::Builder::new()
            .name("kiln-control".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    if stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    accept(stream, &vm, &active);
                }
            })
            .context("starting the control socket thread")?;
        Ok(ControlSocket {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

/// A socket nobody listens on is stale and replaced; anything else there
/// is not ours to remove.
fn remove_stale_socket(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let is_socket = std::fs::symlink_metadata(path)
        .map(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        })
        .unwrap_or(false);
    if !is_socket || UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "control socket {} already exists and is in use (or is not a socket)",
            path.display()
        );
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Counts a client for as long as it is served.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept(mut stream: UnixStream, vm: &Vm, active: &Arc<AtomicUsize>) {
    if active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
        active.fetch_sub(1, Ordering::SeqCst);
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = stream.write_all(
            error_line(
                None,
                ErrorCode::Busy,
                format!("{MAX_CLIENTS} clients are connected already; try again later"),
            )
            .as_bytes(),
        );
        return;
    }
    let slot = Slot(active.clone());
    let vm = vm.clone();
    let spawned = std::thread::Builder::new()
        .name("kiln-control-client".into())
        .stack_size(CLIENT_STACK)
        .spawn(move || {
            let _slot = slot;
            serve(stream, &vm);
        });
    if let Err(e) = spawned {
        tracing::warn!("control socket: cannot start a client thread: {e}");
    }
}

impl Drop for ControlSocket {
    /// Stops accepting (a connection of our own wakes the accept loop) and
    /// removes the socket file. Clients already connected finish on their
    /// own threads.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if UnixStream::connect(&self.path).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn error_line(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> String {
    encode_line(&ResponseLine {
        id,
        outcome: Outcome::Error(ErrorBody::new(code, message)),
    })
}

/// Talks to one client until it leaves, idles out or breaks the protocol
/// beyond repair (an over-long line).
fn serve(stream: UnixStream, vm: &Vm) {
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let hello = HelloLine {
        hello: Hello {
            protocol: VERSION,
            build_id: build_id(),
            pid: std::process::id(),
        },
    };
    if out.write_all(encode_line(&hello).as_bytes()).is_err() {
        return;
    }
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.len() > MAX_LINE {
            let _ = out.write_all(
                error_line(
                    None,
                    ErrorCode::LineTooLong,
                    format!("a request line is at most {MAX_LINE} bytes; closing"),
                )
                .as_bytes(),
            );
            return;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if out.write_all(answer(&line, vm).as_bytes()).is_err() {
            return;
        }
    }
}

/// The answer line for one request line.
pub fn answer(line: &[u8], vm: &Vm) -> String {
    match serde_json::from_slice::<RequestLine>(line) {
        Ok(request) => encode_line(&ResponseLine {
            id: Some(request.id),
            outcome: match execute(vm, request.request) {
                Ok(value) => Outcome::Result(value),
                Err(e) => Outcome::Error(e),
            },
        }),
        Err(e) => {
            // Answer under the request's id when at least that is readable.
            let id = serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("id").and_then(serde_json::Value::as_u64));
            error_line(id, ErrorCode::InvalidRequest, e.to_string())
        }
    }
}

/// Carries out one request.
pub fn execute(vm: &Vm, request: Request) -> Result<serde_json::Value, ErrorBody> {
    fn json<T: serde::Serialize>(value: T) -> Result<serde_json::Value, ErrorBody> {
        serde_json::to_value(value).map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))
    }
    let vm_error = |e: crate::vm::VmError| e.to_error_body();
    match request {
        Request::Status {} => json(vm.status()),
        Request::Pause {} => json(vm.pause().map_err(vm_error)?),
        Request::Resume {} => json(vm.resume().map_err(vm_error)?),
        Request::Stop {} => {
            vm.stop();
            Ok(serde_json::json!({}))
        }
        Request::SetBalloonTarget { mib } => json(vm.set_balloon_target(mib).map_err(vm_error)?),
        Request::BalloonStats {} => json(vm.balloon_stats().map_err(vm_error)?),
        Request::Workers {} => json(vm.workers()),
        Request::SetWorkerPlacement {
            device,
            cpus,
            wait,
            spin_us,
        } => json(
            vm.set_worker_placement(
                &device,
                WorkerPlacement {
                    cpus,
                    wait,
                    spin_us,
                },
            )
            .map_err(vm_error)?,
        ),
        Request::Counters {} => json(vm.counters()),
    }
}
