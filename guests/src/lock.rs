//! An exclusive file lock, so parallel test processes build each cached
//! artifact once.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::GuestError;

pub struct FileLock(#[allow(dead_code)] File); // the lock lives as long as the open file

impl FileLock {
    /// Blocks until the lock at `path` is ours; released on drop.
    pub fn acquire(path: &Path) -> Result<FileLock, GuestError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| GuestError::io(format!("creating {}", dir.display()), e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| GuestError::io(format!("opening lock {}", path.display()), e))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(GuestError::io(
                format!("locking {}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(FileLock(file))
    }
}
