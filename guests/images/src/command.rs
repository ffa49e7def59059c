//! Running the external tools an image build needs, with their output
//! streamed to the progress reporter and kept for error messages.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;

use crate::progress::Progress;
use crate::ImageError;

/// Lines of output kept for the error message of a failed command.
const KEEP_LINES: usize = 400;

/// Runs `cmd`, streams its stdout and stderr to `progress`, returns the
/// output lines (most recent `KEEP_LINES`) on success.
pub fn run(
    cmd: &mut Command,
    what: &str,
    progress: &dyn Progress,
) -> Result<Vec<String>, ImageError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ImageError::Tool {
            tool: program.clone(),
            message: format!("cannot start it ({e}); is it installed?"),
        })?;
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        readers.push(thread::spawn(move || forward(out, &tx)));
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        readers.push(thread::spawn(move || forward(err, &tx)));
    }
    drop(tx);
    for line in rx {
        progress.detail(&line);
        if let Ok(mut l) = lines.lock() {
            l.push(line);
            if l.len() > KEEP_LINES {
                l.remove(0);
            }
        }
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child.wait().map_err(|e| ImageError::Tool {
        tool: program.clone(),
        message: e.to_string(),
    })?;
    let lines = lines.lock().map(|l| l.clone()).unwrap_or_default();
    if status.success() {
        Ok(lines)
    } else {
        Err(ImageError::CommandFailed {
            what: what.to_string(),
            status: status.to_string(),
            output: lines,
        })
    }
}

fn forward(pipe: impl std::io::Read, tx: &std::sync::mpsc::Sender<String>) {
    for line in BufReader::new(pipe).lines() {
        match line {
            Ok(l) => {
                if tx.send(l).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// A command run inside `root` with `chroot`, in new mount and PID
/// namespaces (`unshare`) with its own /proc, /dev and /tmp, so nothing on the
/// host changes and no process outlives it.
pub fn in_chroot(root: &Path, script: &str) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--pid", "--fork", "--kill-child", "--mount-proc"])
        .arg("sh")
        .arg("-c")
        .arg(
            "set -e; r=\"$1\"; shift; \
             mount --make-rprivate /; \
             mount -t proc proc \"$r/proc\"; \
             mount -t tmpfs -o mode=755 dev \"$r/dev\"; \
             for d in null zero full random urandom tty; do touch \"$r/dev/$d\"; mount --bind \"/dev/$d\" \"$r/dev/$d\"; done; \
             mkdir -p \"$r/dev/pts\" \"$r/dev/shm\"; mount -t tmpfs shm \"$r/dev/shm\"; \
             mount -t tmpfs -o mode=1777 tmp \"$r/tmp\"; \
             exec chroot \"$r\" /bin/sh -c \"$1\"",
        )
        .arg("kiln-chroot")
        .arg(root)
        .arg(script)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8");
    cmd
}
