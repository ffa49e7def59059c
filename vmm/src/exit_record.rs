//! The exit record `kiln-vmm --exit-record PATH` leaves when it ends, so a
//! supervisor that is not its parent (a daemon that re-adopted it after a
//! restart) learns how it ended: `{"kind":"poweroff","message":"...",
//! "exit_code":0}`. Written atomically (a temporary file in the same
//! directory, fsynced, then renamed over PATH): a reader sees a whole
//! record or none. No record means the VMM died without a word (SIGKILL,
//! a crash of the VMM itself).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use kiln_devices::ExitReason;
use serde::{Deserialize, Serialize};

use crate::exit;

/// How the VM ended, in the wire names the daemon's `ExitKind` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitKind {
    /// The guest powered off.
    Poweroff,
    /// The guest rebooted (and the VMM exits on reboot).
    Reboot,
    /// The guest crashed, or the VMM failed.
    Crash,
    /// Stopped from outside: a control request or a host signal.
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub kind: ExitKind,
    pub message: String,
    /// The process's exit code (see [`crate::exit`]).
    pub exit_code: u8,
}

impl ExitRecord {
    /// The record of a VM that ended with `reason`.
    pub fn of_reason(reason: &ExitReason) -> ExitRecord {
        let (kind, message) = match reason {
            ExitReason::PowerOff => (ExitKind::Poweroff, "the guest powered off".to_owned()),
            ExitReason::Reset => (ExitKind::Reboot, "the guest rebooted".to_owned()),
            ExitReason::Crash(report) => (ExitKind::Crash, format!("the guest crashed: {report}")),
            ExitReason::HostSignal(signo) => (
                ExitKind::Stopped,
                format!("stopped by signal {} ({signo})", signal_name(*signo)),
            ),
            ExitReason::Stopped => (ExitKind::Stopped, "stopped by a control request".to_owned()),
            ExitReason::VmmError(text) => (ExitKind::Crash, format!("VMM error: {text}")),
        };
        ExitRecord {
            kind,
            message,
            exit_code: exit::code(reason),
        }
    }

    /// The record of a VMM that failed before or outside the VM's run
    /// (bad spec, no /dev/kvm, a device that cannot be set up).
    pub fn of_error(error: &str) -> ExitRecord {
        ExitRecord {
            kind: ExitKind::Crash,
            message: format!("kiln-vmm: error: {error}"),
            exit_code: exit::ERROR,
        }
    }

    /// Writes the record atomically to `path`.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let tmp = tmp_path(path);
        let result = (|| {
            let mut f = fs::File::create(&tmp)?;
            let mut text = serde_json::to_vec(self).map_err(io::Error::other)?;
            text.push(b'\n');
            f.write_all(&text)?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// `PATH.tmp.PID` next to `path` (same file system, so the rename is atomic).
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    path.with_file_name(name)
}

fn signal_name(signo: i32) -> &'static str {
    match signo {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGQUIT => "SIGQUIT",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_end_has_its_kind_and_exit_code() {
        let cases = [
            (ExitReason::PowerOff, ExitKind::Poweroff, exit::POWER_OFF),
            (ExitReason::Reset, ExitKind::Reboot, exit::REBOOT),
            (
                ExitReason::Crash("triple fault".into()),
                ExitKind::Crash,
                exit::GUEST_CRASH,
            ),
            (
                ExitReason::HostSignal(libc::SIGTERM),
                ExitKind::Stopped,
                128 + libc::SIGTERM as u8,
            ),
            (ExitReason::Stopped, ExitKind::Stopped, exit::STOPPED),
            (
                ExitReason::VmmError("disk I/O".into()),
                ExitKind::Crash,
                exit::ERROR,
            ),
        ];
        for (reason, kind, code) in cases {
            let r = ExitRecord::of_reason(&reason);
            assert_eq!((r.kind, r.exit_code), (kind, code), "{reason:?}");
        }
        assert!(ExitRecord::of_reason(&ExitReason::HostSignal(15))
            .message
            .contains("SIGTERM"));
        assert!(
            ExitRecord::of_reason(&ExitReason::Crash("triple fault".into()))
                .message
                .contains("triple fault")
        );
        let e = ExitRecord::of_error("cannot open /dev/kvm");
        assert_eq!((e.kind, e.exit_code), (ExitKind::Crash, exit::ERROR));
    }

    #[test]
    fn the_record_replaces_the_file_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exit.json");
        fs::write(&path, b"old").unwrap();
        let r = ExitRecord::of_reason(&ExitReason::PowerOff);
        r.write(&path).unwrap();
        let back: ExitRecord = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, r);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(r#"{"kind":"poweroff""#), "{text}");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("exit.json")]);
        // A directory that does not exist: an error, nothing left behind.
        assert!(r.write(&dir.path().join("gone/exit.json")).is_err());
    }
}
