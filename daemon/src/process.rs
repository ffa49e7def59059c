//! VMM processes as the kernel sees them: spawning one in its own session
//! (and cgroup), the record that identifies it across daemon restarts
//! (pid + start time from /proc/PID/stat), and a pidfd to learn of its exit
//! whether or not it is the daemon's child.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

/// What identifies a running VMM, written to its run directory as `vmm.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    /// Field 22 of /proc/PID/stat (clock ticks since boot): a reused pid
    /// has another start time.
    pub start_time: u64,
    /// The VMM binary that was started.
    pub binary: PathBuf,
    /// The daemon version that started it.
    pub daemon_version: String,
}

/// A process's start time, from /proc/PID/stat.
pub fn start_time(pid: u32) -> io::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_time(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable /proc/PID/stat"))
}

/// The comm field may hold spaces and parentheses: fields are counted after
/// the last ')'.
fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ')' come fields 3 (state) onwards; start time is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// A pidfd, readable once the process has exited.
pub struct PidFd {
    fd: AsyncFd<OwnedFd>,
}

impl PidFd {
    pub fn open(pid: u32) -> io::Result<PidFd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just gave us this fd; nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        // SAFETY: the OwnedFd stays open and unchanged inside the AsyncFd.
        let fd =
            unsafe { AsyncFd::register(owned) }.map_err(|e| io::Error::other(e.to_string()))?;
        Ok(PidFd { fd })
    }

    /// Waits until the process has exited.
    pub async fn exited(&self) -> io::Result<()> {
        let _ready = self.fd.readable().await?;
        Ok(())
    }

    /// Reaps the process if it is our child; its wait status, or None when
    /// it is not our child (a re-adopted VMM).
    pub fn reap(&self) -> Option<WaitStatus> {
        // SAFETY: zeroed siginfo_t is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: P_PIDFD with our pidfd; info is a valid pointer.
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.fd.get_ref().as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        if r != 0 {
            return None;
        }
        // SAFETY: waitid filled info for CLD_* codes.
        let (code, status) = unsafe { (info.si_code, info.si_status()) };
        match code {
            libc::CLD_EXITED => Some(WaitStatus::Exited(status)),
            libc::CLD_KILLED | libc::CLD_DUMPED => Some(WaitStatus::Signaled(status)),
            _ => None,
        }
    }

    /// Sends a signal through the pidfd (never hits a reused pid).
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal with our pidfd, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.get_ref().as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    Exited(i32),
    Signaled(i32),
}

/// Where VMMs get their cgroups: a `kiln-vms` group under the daemon's own
/// cgroup v2 group, when that is mounted and writable (delegated).
#[derive(Debug, Clone)]
pub struct Cgroups {
    parent: Option<PathBuf>,
}

impl Cgroups {
    /// Finds the daemon's cgroup v2 group; says in the log when VMMs will
    /// not get their own groups, and why.
    pub fn detect() -> Cgroups {
        let parent = (|| {
            let root = Path::new("/sys/fs/cgroup");
            if !root.join("cgroup.controllers").exists() {
                return Err("cgroup v2 is not mounted at /sys/fs/cgroup".to_owned());
            }
            let own = fs::read_to_string("/proc/self/cgroup")
                .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
            let rel = own
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .ok_or("no cgroup v2 entry in /proc/self/cgroup")?;
            let group = root.join(rel.trim_start_matches('/')).join("kiln-vms");
            fs::create_dir_all(&group)
                .map_err(|e| format!("cannot create {}: {e}", group.display()))?;
            Ok(group)
        })();
        match parent {
            Ok(group) => {
                tracing::info!("VMMs get cgroups under {}", group.display());
                Cgroups {
                    parent: Some(group),
                }
            }
            Err(why) => {
                tracing::warn!("VMMs run without their own cgroups: {why}");
                Cgroups { parent: None }
            }
        }
    }

    /// The `cgroup.procs` of `name`'s group, opened for the child to join;
    /// None (logged) when there is no group for it.
    fn procs_file(&self, name: &str) -> Option<File> {
        let group = self.parent.as_ref()?.join(name);
        let opened = fs::create_dir_all(&group).and_then(|()| {
            fs::OpenOptions::new()
                .write(true)
                .open(group.join("cgroup.procs"))
        });
        match opened {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!("VM {name}: no cgroup of its own ({}): {e}", group.display());
                None
            }
        }
    }

    /// `name`'s own group, when it has one.
    pub fn group(&self, name: &str) -> Option<PathBuf> {
        let group = self.parent.as_ref()?.join(name);
        group.is_dir().then_some(group)
    }

    /// Removes `name`'s (empty) group after its VMM ended.
    pub fn remove(&self, name: &str) {
        if let Some(parent) = &self.parent {
            let _ = fs::remove_dir(parent.join(name));
        }
    }
}

/// Starts `command` in its own session (and `name`'s cgroup when there is
/// one), stdout and stderr appended to `log`. Returns its pid.
pub fn spawn(mut command: Command, log: &Path, cgroups: &Cgroups, name: &str) -> io::Result<u32> {
    let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let procs = cgroups.procs_file(name);
    let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
    command
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: between fork and exec only async-signal-safe calls: setsid and
    // write(2) on an fd opened before the fork.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = procs_fd {
                // "0" moves the writing process; a refusal leaves it in the
                // daemon's group, which the parent logs below.
                let _ = libc::write(fd, b"0".as_ptr().cast(), 1);
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    // Dropping a std Child neither kills nor reaps it: the pidfd does that.
    Ok(child.id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_odd_comm_names() {
        let stat =
            "1234 (a) b (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
        assert!(start_time(std::process::id()).unwrap() > 0);
    }

    #[tokio::test]
    async fn pidfd_sees_the_exit_and_the_status_of_a_child_in_its_own_session() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "read pid comm state ppid pgrp sid rest < /proc/$$/stat; echo sid=$sid; exit 7",
        ]);
        let pid = spawn(cmd, &log, &Cgroups { parent: None }, "t").unwrap();
        let pidfd = PidFd::open(pid).unwrap();
        pidfd.exited().await.unwrap();
        assert_eq!(pidfd.reap(), Some(WaitStatus::Exited(7)));
        let text = fs::read_to_string(&log).unwrap();
        // Its own session: the session id is its own pid.
        assert_eq!(text.trim(), format!("sid={pid}"));
    }

    #[tokio::test]
    async fn a_signal_through_the_pidfd_ends_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let pid = spawn(cmd, &dir.path().join("log"), &Cgroups { parent: None }, "t").unwrap();
        let pidfd = PidFd::open(pid).unwrap();
        pidfd.signal(libc::SIGKILL).unwrap();
        pidfd.exited().await.unwrap();
        assert_eq!(pidfd.reap(), Some(WaitStatus::Signaled(libc::SIGKILL)));
    }
}
