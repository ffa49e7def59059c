//! A serial console log capped in size: `console.log` grows to the limit,
//! is then renamed to `console.log.1` (replacing the older one) and started
//! again, so a guest that prints forever uses at most twice the limit.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The default cap of one log file.
pub const DEFAULT_LOG_LIMIT: u64 = 4 << 20;
/// Smallest cap accepted: below this a boot does not fit in two files.
pub const MIN_LOG_LIMIT: u64 = 4096;

/// The rotated-out older part of `path`: `path` with `.1` appended.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

pub struct CappedLog {
    path: PathBuf,
    file: File,
    /// Bytes in the current file.
    size: u64,
    limit: u64,
    error_logged: bool,
}

impl CappedLog {
    /// Opens (appends to) `path`; a file already at the limit is rotated
    /// first, so a guest that restarts does not grow it either.
    pub fn open(path: &Path, limit: u64) -> io::Result<CappedLog> {
        let limit = limit.max(MIN_LOG_LIMIT);
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        let mut log = CappedLog {
            path: path.to_path_buf(),
            file,
            size,
            limit,
            error_logged: false,
        };
        if log.size >= log.limit {
            log.rotate()?;
        }
        Ok(log)
    }

    fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(&self.path, rotated_path(&self.path))?;
        self.file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }

    fn write_capped(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.size >= self.limit {
                self.rotate()?;
            }
            let room = (self.limit - self.size) as usize;
            let (now, rest) = data.split_at(data.len().min(room));
            self.file.write_all(now)?;
            self.size += now.len() as u64;
            data = rest;
        }
        Ok(())
    }

    /// Appends `data`, rotating as needed. An I/O error (a full disk) is
    /// reported once and the bytes are dropped: the guest keeps running.
    pub fn append(&mut self, data: &[u8]) {
        if let Err(e) = self.write_capped(data) {
            if !self.error_logged {
                tracing::warn!(
                    "console log {}: {e}; output not logged until it works again",
                    self.path.display()
                );
                self.error_logged = true;
            }
        } else {
            self.error_logged = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_rotates_at_its_limit_and_never_holds_more_than_two_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = CappedLog::open(&path, MIN_LOG_LIMIT).unwrap();
        let line = [b'x'; 100];
        for _ in 0..1000 {
            log.append(&line);
        }
        let current = std::fs::metadata(&path).unwrap().len();
        let older = std::fs::metadata(rotated_path(&path)).unwrap().len();
        assert!(current <= MIN_LOG_LIMIT, "{current}");
        assert_eq!(older, MIN_LOG_LIMIT);
        // 100 000 bytes went in; the two files keep the last ones.
        assert_eq!((100_000 - current) % MIN_LOG_LIMIT, 0);
        let entries = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(entries, 2, "console.log and console.log.1 only");
    }

    #[test]
    fn one_write_larger_than_the_limit_keeps_its_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = CappedLog::open(&path, MIN_LOG_LIMIT).unwrap();
        let data: Vec<u8> = (0..3 * MIN_LOG_LIMIT + 10).map(|i| i as u8).collect();
        log.append(&data);
        let current = std::fs::read(&path).unwrap();
        let older = std::fs::read(rotated_path(&path)).unwrap();
        assert_eq!(current, &data[data.len() - 10..]);
        assert_eq!(older.len() as u64, MIN_LOG_LIMIT);
        let joined = [older, current].concat();
        assert_eq!(joined, &data[data.len() - joined.len()..]);
    }

    #[test]
    fn a_full_log_from_a_previous_run_is_rotated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, vec![b'a'; MIN_LOG_LIMIT as usize]).unwrap();
        let mut log = CappedLog::open(&path, MIN_LOG_LIMIT).unwrap();
        log.append(b"new boot\n");
        assert_eq!(std::fs::read(&path).unwrap(), b"new boot\n");
        assert_eq!(
            std::fs::metadata(rotated_path(&path)).unwrap().len(),
            MIN_LOG_LIMIT
        );
        // A partly filled one is appended to.
        let mut log = CappedLog::open(&path, MIN_LOG_LIMIT).unwrap();
        log.append(b"more\n");
        assert_eq!(std::fs::read(&path).unwrap(), b"new boot\nmore\n");
    }
}
