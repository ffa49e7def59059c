//! A scenario while it runs: a watcher thread follows the nested host's
//! console (or the direct script's output file), enforces the timeout and
//! the stall limit, and keeps the output where the test can wait for a
//! line while the script still runs. `scenario::run` is `start` + `finish`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::nested::{ALIVE_MARKER, BEGIN_MARKER, ERROR_MARKER, EXIT_MARKER, HOST_READY_MARKER};
use crate::ports::{self, Forward};
use crate::scenario::{Mode, Outcome, RigError};

/// The least silence counted as a stall before the nested host is ready
/// (the rig's default stall limit).
const BOOT_SILENCE_ALLOWANCE: Duration = Duration::from_secs(180);

/// A scenario started with [`crate::scenario::start`]. Dropping it without
/// [`Running::finish`] stops the nested host (or kills the direct script).
pub struct Running {
    mode: Mode,
    forwards: Vec<Forward>,
    log: PathBuf,
    shared: Arc<Shared>,
    watcher: Option<JoinHandle<()>>,
}

/// How the script ended, as the watcher saw it.
struct Ended {
    exit_code: i32,
    elapsed: Duration,
}

#[derive(Default)]
struct State {
    /// The script's output so far.
    output: String,
    host_ready: Option<Duration>,
    /// The nested host's console printed something: QEMU got past its
    /// set-up (the forwarded ports are bound).
    started: bool,
    /// QEMU could not bind a forwarded port.
    bind_failed: bool,
    end: Option<Result<Ended, RigError>>,
    /// Set by `Drop`: the watcher kills what it watches.
    abort: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn end(&self, end: Result<Ended, RigError>) {
        self.lock().end = Some(end);
        self.changed.notify_all();
    }

    fn aborted(&self) -> bool {
        self.lock().abort
    }
}

/// What happened first after QEMU was started.
pub(crate) enum Start {
    /// The console printed: the nested host is on its way.
    Started,
    /// QEMU exited because a forwarded port was taken meanwhile.
    PortTaken,
    /// QEMU exited for another reason (`finish` tells which).
    Ended,
}

/// Limits the watcher enforces.
#[derive(Clone, Copy)]
pub(crate) struct Limits {
    pub timeout: Duration,
    /// Nested only: no console output for this long is a stall.
    pub stall_after: Duration,
}

impl Running {
    /// The 127.0.0.1 port on this host that reaches `guest_port` of the
    /// nested host (`Scenario::forward_ports`). In direct mode the script
    /// runs on this host, so it is `guest_port` itself.
    pub fn host_port(&self, guest_port: u16) -> Result<u16, RigError> {
        self.forwards
            .iter()
            .find(|f| f.guest == guest_port)
            .map(|f| f.host)
            .ok_or_else(|| {
                RigError::Setup(format!(
                    "port {guest_port} is not in the scenario's forward_ports"
                ))
            })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The console log (nested) or the output file (direct).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The script's output so far.
    pub fn output(&self) -> String {
        self.shared.lock().output.clone()
    }

    /// Waits until the script has printed `marker` (e.g. a line it prints
    /// once its service listens). Fails if the scenario ends first or
    /// `timeout` passes; the scenario's own timeout and stall detection go
    /// on meanwhile.
    pub fn wait_for_output(&self, marker: &str, timeout: Duration) -> Result<(), RigError> {
        let deadline = Instant::now() + timeout;
        let mut searched = 0;
        let mut state = self.shared.lock();
        loop {
            if state.output[searched..].contains(marker) {
                return Ok(());
            }
            // Later output may complete a marker that began here.
            searched = state.output.len().saturating_sub(marker.len());
            while !state.output.is_char_boundary(searched) {
                searched -= 1;
            }
            let reason = match &state.end {
                Some(Ok(end)) => Some(format!("the script exited {} first", end.exit_code)),
                Some(Err(e)) => Some(e.to_string()),
                None if Instant::now() >= deadline => Some("the scenario still runs".into()),
                None => None,
            };
            if let Some(reason) = reason {
                return Err(RigError::OutputNotSeen {
                    marker: marker.into(),
                    waited_s: timeout.as_secs(),
                    reason,
                    log: self.log.clone(),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for the script to end and returns what came back.
    pub fn finish(mut self) -> Result<Outcome, RigError> {
        if let Some(watcher) = self.watcher.take() {
            let _ = watcher.join();
        }
        let mut state = self.shared.lock();
        let end = state.end.take().unwrap_or_else(|| {
            Err(RigError::Setup(
                "the rig's watcher thread ended without a result".into(),
            ))
        })?;
        Ok(Outcome {
            mode: self.mode,
            exit_code: end.exit_code,
            output: std::mem::take(&mut state.output),
            log: self.log.clone(),
            elapsed: end.elapsed,
            host_ready: state.host_ready,
        })
    }

    /// Blocks until the console printed or QEMU exited.
    pub(crate) fn wait_started(&self) -> Start {
        let mut state = self.shared.lock();
        loop {
            if state.started {
                return Start::Started;
            }
            if state.end.is_some() {
                return if state.bind_failed {
                    Start::PortTaken
                } else {
                    Start::Ended
                };
            }
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Starts QEMU (console on its stdout) and watches the nested host's
    /// console. `initrd` is removed when the script exits 0 (it is large
    /// and rebuilt each time; kept on failure, for reproduction).
    pub(crate) fn nested(
        mut qemu: Command,
        name: &str,
        forwards: Vec<Forward>,
        log: PathBuf,
        limits: Limits,
        initrd: PathBuf,
    ) -> Result<Running, RigError> {
        let log_file = File::create(&log)
            .map_err(|e| RigError::Setup(format!("creating {}: {e}", log.display())))?;
        let start = Instant::now();
        let mut child = qemu
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| RigError::Setup(format!("starting QEMU: {e}")))?;
        let lines = read_lines(&mut child);
        let shared = Arc::new(Shared::default());
        let watcher = {
            let shared = shared.clone();
            let log = log.clone();
            let name = name.to_string();
            std::thread::spawn(move || {
                let watch = Watch {
                    name: &name,
                    log: &log,
                    limits,
                    start,
                };
                let end = watch_console(&mut child, &lines, log_file, &shared, &watch);
                if matches!(end, Ok(Ended { exit_code: 0, .. })) {
                    let _ = std::fs::remove_file(&initrd);
                }
                shared.end(end);
            })
        };
        Ok(Running {
            mode: Mode::Nested,
            forwards,
            log,
            shared,
            watcher: Some(watcher),
        })
    }

    /// Watches a started process: the direct script (its output goes to
    /// `log`, followed while it runs) or an interactive session (no
    /// output kept). `timeout` kills its process group.
    pub(crate) fn process(
        child: Child,
        mode: Mode,
        forwards: Vec<Forward>,
        log: PathBuf,
        timeout: Option<Duration>,
        follow_log: bool,
        remove_after: Option<PathBuf>,
    ) -> Result<Running, RigError> {
        let tail = if follow_log {
            Some(
                File::open(&log)
                    .map_err(|e| RigError::Setup(format!("opening {}: {e}", log.display())))?,
            )
        } else {
            None
        };
        let shared = Arc::new(Shared::default());
        shared.lock().started = true;
        let watcher = {
            let shared = shared.clone();
            let log = log.clone();
            std::thread::spawn(move || {
                let end = watch_process(child, tail, &shared, timeout, &log);
                if let Some(path) = remove_after {
                    let _ = std::fs::remove_file(path);
                }
                shared.end(end);
            })
        };
        Ok(Running {
            mode,
            forwards,
            log,
            shared,
            watcher: Some(watcher),
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.take() {
            self.shared.lock().abort = true;
            let _ = watcher.join();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stream {
    Console,
    QemuErrors,
}

/// Lines of QEMU's stdout (the nested host's console) and stderr (QEMU's
/// own messages), from two reader threads.
fn read_lines(child: &mut Child) -> mpsc::Receiver<(Stream, String)> {
    let (tx, rx) = mpsc::channel();
    let streams: [(Stream, Option<Box<dyn Read + Send>>); 2] = [
        (
            Stream::Console,
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ),
        (
            Stream::QemuErrors,
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ),
    ];
    for (kind, stream) in streams {
        let Some(stream) = stream else { continue };
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            while reader
                .read_until(b'\n', &mut buf)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                let line = String::from_utf8_lossy(&buf).replace('\r', "");
                buf.clear();
                if tx.send((kind, line)).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

/// The rig's markers in the nested host's console.
#[derive(Default)]
struct Console {
    in_script: bool,
    /// A script line cut by a heartbeat, waiting for its continuation.
    partial: String,
    exit_code: Option<i32>,
    host_error: Option<String>,
    host_ready: bool,
}

impl Console {
    /// Takes one console line; script output goes to `output`. Returns
    /// whether this line said the nested host is ready.
    fn feed(&mut self, line: &str, output: &mut String) -> bool {
        // A heartbeat may land in the middle of a script's line: keep the
        // part before it for the line's continuation.
        let line = std::mem::take(&mut self.partial) + line;
        if let Some(before) = line.trim_end().strip_suffix(ALIVE_MARKER) {
            self.partial = before.to_string();
            return false;
        }
        let trimmed = line.trim_end();
        if let Some((before, code)) = trimmed.split_once(EXIT_MARKER).filter(|_| self.in_script) {
            // The script's last line may lack its newline.
            if !before.is_empty() {
                output.push_str(before);
                output.push('\n');
            }
            self.exit_code = code.trim().parse::<i32>().ok();
            self.in_script = false;
        } else if !self.in_script && !self.host_ready && trimmed.ends_with(HOST_READY_MARKER) {
            self.host_ready = true;
            return true;
        } else if trimmed.ends_with(BEGIN_MARKER) {
            self.in_script = true;
        } else if self.in_script {
            output.push_str(&line);
        } else if let Some(e) = trimmed.strip_prefix(ERROR_MARKER) {
            self.host_error.get_or_insert(e.to_string());
        } else if trimmed.contains("Kernel panic") {
            self.host_error.get_or_insert(trimmed.to_string());
        }
        false
    }
}

/// What the console watcher needs to know about its scenario.
struct Watch<'a> {
    name: &'a str,
    log: &'a Path,
    limits: Limits,
    start: Instant,
}

fn watch_console(
    child: &mut Child,
    lines: &mpsc::Receiver<(Stream, String)>,
    mut log_file: File,
    shared: &Shared,
    watch: &Watch,
) -> Result<Ended, RigError> {
    let Watch {
        name,
        log,
        limits,
        start,
    } = *watch;
    let mut console = Console::default();
    let mut qemu_said: Option<String> = None;
    let mut last_output = Instant::now();
    let failure = loop {
        match lines.recv_timeout(Duration::from_millis(500)) {
            Ok((stream, line)) => {
                last_output = Instant::now();
                let _ = log_file.write_all(line.as_bytes());
                let mut state = shared.lock();
                if stream == Stream::QemuErrors {
                    state.bind_failed |= ports::is_bind_failure(&line);
                    if qemu_said.is_none() && !line.contains("warning") {
                        qemu_said = Some(line.trim().to_string());
                    }
                } else {
                    state.started = true;
                    if console.feed(&line, &mut state.output) {
                        let ready = start.elapsed();
                        state.host_ready = Some(ready);
                        eprintln!(
                            "kiln-rig: {name}: nested host ready after {:.1} s",
                            ready.as_secs_f64()
                        );
                    }
                }
                drop(state);
                shared.changed.notify_all();
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break None,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        // Checked after every line too: a chatty script must not outrun
        // its timeout.
        if shared.aborted() {
            break Some(RigError::Setup("the test stopped the scenario".into()));
        }
        if start.elapsed() > limits.timeout {
            break Some(RigError::TimedOut {
                timeout_s: limits.timeout.as_secs(),
                log: log.to_path_buf(),
            });
        }
        // The nested kernel boots with `quiet loglevel=1`: it prints
        // nothing between the BIOS banner and init's first heartbeat, which
        // took over 20 s at load 8. A scenario's short stall limit (for
        // its script) starts counting once the host is ready.
        let host_ready = shared.lock().host_ready.is_some();
        let stall_after = if host_ready {
            limits.stall_after
        } else {
            limits.stall_after.max(BOOT_SILENCE_ALLOWANCE)
        };
        if last_output.elapsed() > stall_after {
            break Some(RigError::Stalled {
                silent_s: stall_after.as_secs(),
                log: log.to_path_buf(),
            });
        }
    };
    if failure.is_some() {
        let _ = child.kill();
    }
    let _ = child.wait();
    if let Some(err) = failure {
        return Err(err);
    }
    let Some(exit_code) = console.exit_code else {
        let mut reason = console
            .host_error
            .unwrap_or_else(|| "QEMU exited without the script's exit marker".into());
        if let Some(q) = qemu_said {
            reason.push_str(&format!("; QEMU said: {q}"));
        }
        return Err(RigError::HostFailed {
            reason,
            log: log.to_path_buf(),
        });
    };
    Ok(Ended {
        exit_code,
        elapsed: start.elapsed(),
    })
}

fn watch_process(
    mut child: Child,
    mut tail: Option<File>,
    shared: &Shared,
    timeout: Option<Duration>,
    log: &Path,
) -> Result<Ended, RigError> {
    let start = Instant::now();
    let mut bytes = Vec::new();
    let mut follow = |tail: &mut Option<File>| {
        if let Some(file) = tail {
            if file.read_to_end(&mut bytes).unwrap_or(0) > 0 {
                shared.lock().output = String::from_utf8_lossy(&bytes).into_owned();
                shared.changed.notify_all();
            }
        }
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(RigError::Setup(format!("waiting for the script: {e}"))),
        }
        let timed_out = timeout.is_some_and(|t| start.elapsed() > t);
        if timed_out || shared.aborted() {
            // SAFETY: kill(2) on the process group the rig created for
            // the direct script; for an interactive session (not a group
            // leader) there is no such group and this does nothing.
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = child.kill();
            let _ = child.wait();
            return Err(match timeout.filter(|_| timed_out) {
                Some(t) => RigError::TimedOut {
                    timeout_s: t.as_secs(),
                    log: log.to_path_buf(),
                },
                None => RigError::Setup("the test stopped the scenario".into()),
            });
        }
        follow(&mut tail);
        std::thread::sleep(Duration::from_millis(50));
    };
    follow(&mut tail);
    Ok(Ended {
        exit_code: status.code().unwrap_or(-1),
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(lines: &[&str]) -> (Console, String, usize) {
        let mut console = Console::default();
        let mut output = String::new();
        let mut ready = 0;
        for l in lines {
            ready += console.feed(l, &mut output) as usize;
        }
        (console, output, ready)
    }

    #[test]
    fn script_output_is_what_lies_between_the_markers_without_heartbeats() {
        let (c, out, ready) = feed_all(&[
            "boot noise\n",
            "KILN_RIG_HOST_READY\n",
            "KILN_RIG_SCRIPT_BEGIN\n",
            "first KILN_RIG_ALIVE\n",
            "half line\n",
            "lastKILN_RIG_SCRIPT_EXIT=3\n",
            "after\n",
        ]);
        assert_eq!(ready, 1);
        assert_eq!(out, "first half line\nlast\n");
        assert_eq!(c.exit_code, Some(3));
    }

    #[test]
    fn host_errors_and_panics_outside_the_script_are_kept() {
        let (c, _, _) = feed_all(&["KILN_RIG_ERROR=no /dev/kvm\n"]);
        assert_eq!(c.host_error.as_deref(), Some("no /dev/kvm"));
        let (c, _, _) = feed_all(&["[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n"]);
        assert!(c.host_error.unwrap().contains("Attempted to kill init"));
    }
}
