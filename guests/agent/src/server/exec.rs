//! Running a program with streamed output, stdin, and a process-group timeout.

use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use super::OpError;
use crate::protocol::{ErrorCode, ExecRequest, ExitStatus};

/// How long to keep collecting output after the program exited while
/// something it started (a background child) still holds its pipes open.
const EXIT_GRACE: Duration = Duration::from_millis(200);
const POLL: Duration = Duration::from_millis(50);

/// A piece of output as it arrives.
pub enum Output {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// Builds the `Command` for an exec request (argv, env, cwd), validating it.
pub fn command_for(req: &ExecRequest) -> Result<Command, OpError> {
    let (program, args) = req
        .argv
        .split_first()
        .ok_or_else(|| OpError::new(ErrorCode::BadRequest, "argv must not be empty"))?;
    if program.is_empty() {
        return Err(OpError::new(
            ErrorCode::BadRequest,
            "argv[0] must not be empty",
        ));
    }
    let has_nul = |s: &str| s.contains('\0');
    if req.argv.iter().any(|a| has_nul(a)) || req.env.iter().any(|(k, v)| has_nul(k) || has_nul(v))
    {
        return Err(OpError::new(
            ErrorCode::BadRequest,
            "NUL byte in argv or env",
        ));
    }
    if req.env.keys().any(|k| k.is_empty() || k.contains('=')) {
        return Err(OpError::new(
            ErrorCode::BadRequest,
            "environment names must be non-empty and contain no '='",
        ));
    }
    let mut cmd = Command::new(program);
    cmd.args(args);
    if req.clear_env {
        cmd.env_clear();
    }
    cmd.envs(&req.env);
    if let Some(cwd) = &req.cwd {
        let meta = std::fs::metadata(cwd).map_err(|e| OpError::io(&format!("cwd {cwd}"), &e))?;
        if !meta.is_dir() {
            return Err(OpError::new(
                ErrorCode::BadRequest,
                format!("cwd {cwd} is not a directory"),
            ));
        }
        cmd.current_dir(cwd);
    }
    Ok(cmd)
}

/// Runs `cmd` to completion (or until `timeout`), feeding it `stdin` and
/// handing every output chunk to `emit`. When `emit` returns false (the client
/// went away) the program's whole process group is killed.
pub fn run_streaming(
    mut cmd: Command,
    stdin: Vec<u8>,
    timeout: Duration,
    chunk_size: usize,
    emit: &mut dyn FnMut(Output) -> bool,
) -> Result<ExitStatus, OpError> {
    let started = Instant::now();
    cmd.stdin(if stdin.is_empty() {
        Stdio::null()
    } else {
        Stdio::piped()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    // Own process group, so a timeout kills everything the program started.
    .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| OpError::io("cannot start program", &e))?;

    let (tx, rx) = mpsc::channel::<Event>();
    spawn_reader(child.stdout.take(), Stream::Out, chunk_size, tx.clone());
    spawn_reader(child.stderr.take(), Stream::Err, chunk_size, tx);
    if let Some(mut pipe) = child.stdin.take() {
        // A program that exits without reading its input yields EPIPE: ignored.
        thread::spawn(move || {
            let _ = pipe.write_all(&stdin);
        });
    }

    let deadline = started + timeout;
    let mut open_streams = 2;
    let mut timed_out = false;
    let mut killed = false;
    let mut exited: Option<(std::process::ExitStatus, Instant)> = None;
    loop {
        let now = Instant::now();
        if !killed && now >= deadline {
            kill_group(&child);
            killed = true;
            timed_out = true;
        }
        let wait = deadline
            .saturating_duration_since(now)
            .clamp(Duration::from_millis(1), POLL);
        match rx.recv_timeout(wait) {
            Ok(Event::Data(stream, data)) => {
                let delivered = match stream {
                    Stream::Out => emit(Output::Stdout(data)),
                    Stream::Err => emit(Output::Stderr(data)),
                };
                if !delivered && !killed {
                    kill_group(&child);
                    killed = true;
                }
            }
            Ok(Event::Closed) => open_streams -= 1,
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {}
        }
        if exited.is_none() {
            if let Some(status) = child
                .try_wait()
                .map_err(|e| OpError::io("waiting for program", &e))?
            {
                exited = Some((status, Instant::now()));
            }
        }
        if let Some((_, at)) = exited {
            if open_streams == 0 || at.elapsed() >= EXIT_GRACE {
                break;
            }
        }
    }
    let (status, _) =
        exited.ok_or_else(|| OpError::new(ErrorCode::Failed, "program state lost"))?;
    Ok(ExitStatus {
        code: status.code(),
        signal: status.signal(),
        timed_out,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

fn kill_group(child: &Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on the process group we created for this child.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
}

#[derive(Clone, Copy)]
enum Stream {
    Out,
    Err,
}

enum Event {
    Data(Stream, Vec<u8>),
    Closed,
}

fn spawn_reader(
    pipe: Option<impl Read + Send + 'static>,
    stream: Stream,
    chunk_size: usize,
    tx: mpsc::Sender<Event>,
) {
    let Some(mut pipe) = pipe else {
        let _ = tx.send(Event::Closed);
        return;
    };
    thread::spawn(move || {
        let mut buf = vec![0u8; chunk_size.max(1)];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.send(Event::Data(stream, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = tx.send(Event::Closed);
    });
}
