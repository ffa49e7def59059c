//! A VM's run directory, `<run-dir>/vms/<name>/`: the VMM's control socket,
//! its serial console log, its stderr log, the process record, the config it
//! was started with, and the exit record a VMM may leave.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use kiln_api::ExitKind;
use serde::Deserialize;

use crate::process::ProcessRecord;

#[derive(Debug, Clone)]
pub struct RunDir {
    pub dir: PathBuf,
}

/// The exit record a VMM writes as `exit.json` when it ends.
#[derive(Debug, Clone, Deserialize)]
pub struct ExitRecord {
    pub kind: ExitKind,
    #[serde(default)]
    pub message: String,
}

impl RunDir {
    pub fn new(run_root: &Path, name: &str) -> RunDir {
        RunDir {
            dir: run_root.join("vms").join(name),
        }
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
    /// The VM's vsock device socket when its spec has an agent section.
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent.vsock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The VMM's serial console socket (see `kiln_vmm::console_socket`).
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join("console.sock")
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    fn record_path(&self) -> PathBuf {
        self.dir.join("vmm.json")
    }
    /// Where the VMM writes its exit record (`kiln-vmm --exit-record`).
    pub fn exit_record(&self) -> PathBuf {
        self.dir.join("exit.json")
    }

    /// Creates the directory (mode 0700: it holds the VMM's control socket)
    /// and clears what a previous run left but its logs.
    pub fn prepare(&self) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        for stale in [
            self.control_socket(),
            self.console_socket(),
            self.agent_socket(),
            self.record_path(),
            self.exit_record(),
        ] {
            match fs::remove_file(&stale) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    pub fn write_record(&self, record: &ProcessRecord) -> io::Result<()> {
        let tmp = self.dir.join("vmm.json.tmp");
        fs::write(&tmp, serde_json::to_vec(record).expect("records serialize"))?;
        fs::rename(&tmp, self.record_path())
    }

    pub fn read_record(&self) -> Option<ProcessRecord> {
        let text = fs::read(self.record_path()).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn clear_record(&self) {
        let _ = fs::remove_file(self.record_path());
    }

    /// The exit record, if the VMM wrote one.
    pub fn read_exit(&self) -> Option<ExitRecord> {
        let text = fs::read(self.exit_record()).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The last `max` bytes of the console log (empty when there is none):
    /// of `console.log`, and before it of the rotated-out `console.log.1`.
    pub fn console_tail(&self, max: u64) -> io::Result<Vec<u8>> {
        let current = self.console_log();
        let mut buf = tail(&current, max)?;
        let missing = max - buf.len() as u64;
        if missing > 0 {
            let older = tail(&kiln_vmm::console_log::rotated_path(&current), missing)?;
            buf.splice(0..0, older);
        }
        Ok(buf)
    }

    /// Removes the directory and everything in it (the VM was deleted).
    pub fn remove(&self) -> io::Result<()> {
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The last `max` bytes of a file (empty when there is none).
fn tail(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_tail_keeps_the_end_and_prepare_clears_stale_run_files() {
        let root = tempfile::tempdir().unwrap();
        let rd = RunDir::new(root.path(), "a");
        rd.prepare().unwrap();
        assert!(rd.console_tail(10).unwrap().is_empty());
        fs::write(rd.console_log(), b"0123456789abcdef").unwrap();
        assert_eq!(rd.console_tail(4).unwrap(), b"cdef");
        assert_eq!(rd.console_tail(100).unwrap().len(), 16);
        // After a rotation the tail reaches into the older part.
        fs::write(rd.dir.join("console.log.1"), b"older-").unwrap();
        fs::write(rd.console_log(), b"newer").unwrap();
        assert_eq!(rd.console_tail(7).unwrap(), b"r-newer");
        assert_eq!(rd.console_tail(100).unwrap(), b"older-newer");
        fs::write(rd.exit_record(), br#"{"kind":"poweroff"}"#).unwrap();
        assert_eq!(rd.read_exit().unwrap().kind, ExitKind::Poweroff);
        rd.prepare().unwrap();
        assert!(rd.read_exit().is_none());
        assert!(rd.console_log().exists(), "logs survive a new run");
        rd.remove().unwrap();
        assert!(!rd.dir.exists());
    }

    #[test]
    fn the_records_kiln_vmm_writes_read_back_with_their_kind() {
        use kiln_vmm::exit_record::ExitRecord as VmmRecord;
        use kiln_vmm::ExitReason;
        let root = tempfile::tempdir().unwrap();
        let rd = RunDir::new(root.path(), "a");
        rd.prepare().unwrap();
        for (reason, kind) in [
            (ExitReason::PowerOff, ExitKind::Poweroff),
            (ExitReason::Reset, ExitKind::Reboot),
            (ExitReason::Crash("triple fault".into()), ExitKind::Crash),
            (ExitReason::HostSignal(libc::SIGTERM), ExitKind::Stopped),
            (ExitReason::Stopped, ExitKind::Stopped),
            (ExitReason::VmmError("disk".into()), ExitKind::Crash),
        ] {
            let written = VmmRecord::of_reason(&reason);
            written.write(&rd.exit_record()).unwrap();
            let read = rd.read_exit().expect("a record");
            assert_eq!(read.kind, kind, "{reason:?}");
            assert_eq!(read.message, written.message);
        }
        VmmRecord::of_error("no /dev/kvm")
            .write(&rd.exit_record())
            .unwrap();
        assert_eq!(rd.read_exit().unwrap().kind, ExitKind::Crash);
    }
}
