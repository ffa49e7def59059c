//! A content manifest of the root tree (path, type, mode, owner, size,
//! SHA-256 or link target), and the timestamp clamp that makes trees built
//! at different times compare equal.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::ImageError;

/// Writes one sorted line per file under `root`; returns the SHA-256 of the
/// whole manifest. Files whose content is expected to differ per build are
/// listed without a checksum (`volatile`).
pub fn write_manifest(root: &Path, out: &Path, volatile: &[&str]) -> Result<String, ImageError> {
    let mut lines = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| ImageError::io(&dir, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| ImageError::io(&dir, e))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let rel = format!(
                "/{}",
                path.strip_prefix(root).unwrap_or(&path).to_string_lossy()
            );
            let meta = path
                .symlink_metadata()
                .map_err(|e| ImageError::io(&path, e))?;
            let mode = meta.permissions().mode() & 0o7777;
            let owner = format!("{}:{}", meta.uid(), meta.gid());
            let ft = meta.file_type();
            let line = if ft.is_symlink() {
                let target = std::fs::read_link(&path).map_err(|e| ImageError::io(&path, e))?;
                format!("{rel} link {owner} -> {}", target.to_string_lossy())
            } else if ft.is_dir() {
                stack.push(path.clone());
                format!("{rel} dir {mode:04o} {owner}")
            } else if ft.is_file() {
                if volatile.iter().any(|v| rel.starts_with(v)) {
                    format!("{rel} file {mode:04o} {owner} volatile")
                } else {
                    let mut f = std::fs::File::open(&path).map_err(|e| ImageError::io(&path, e))?;
                    let mut h = Sha256::new();
                    std::io::copy(&mut f, &mut h).map_err(|e| ImageError::io(&path, e))?;
                    format!(
                        "{rel} file {mode:04o} {owner} {} {}",
                        meta.len(),
                        crate::hex(&h.finalize())
                    )
                }
            } else {
                format!("{rel} special {mode:04o} {owner} {:x}", meta.rdev())
            };
            lines.push(line);
        }
    }
    lines.sort();
    let text = lines.join("\n") + "\n";
    let mut f = std::fs::File::create(out).map_err(|e| ImageError::io(out, e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| ImageError::io(out, e))?;
    Ok(crate::hex(&Sha256::digest(text.as_bytes())))
}

/// Sets every timestamp newer than `epoch` to `epoch` (symlinks included).
pub fn clamp_mtimes(root: &Path, epoch: u64) -> Result<(), ImageError> {
    let mut stack = vec![root.to_path_buf()];
    let ts = libc::timespec {
        tv_sec: epoch as libc::time_t,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| ImageError::io(&dir, e))? {
            let entry = entry.map_err(|e| ImageError::io(&dir, e))?;
            let path = entry.path();
            let meta = path
                .symlink_metadata()
                .map_err(|e| ImageError::io(&path, e))?;
            if meta.is_dir() {
                stack.push(path.clone());
            }
            // Only times after the epoch move; older ones (from packages) stay.
            let keep = libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            };
            let atime = if meta.atime() as u64 > epoch {
                ts
            } else {
                keep
            };
            let mtime = if meta.mtime() as u64 > epoch {
                ts
            } else {
                keep
            };
            if meta.atime() as u64 > epoch || meta.mtime() as u64 > epoch {
                set_times(&path, &[atime, mtime])?;
            }
        }
    }
    set_times(root, &times)
}

fn set_times(path: &Path, times: &[libc::timespec; 2]) -> Result<(), ImageError> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        ImageError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other("NUL in path"),
        }
    })?;
    // SAFETY: valid C string and a two-element timespec array.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(ImageError::io(path, std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn manifest_is_sorted_and_tracks_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        std::fs::write(root.join("etc/a"), b"1").expect("write");
        std::fs::write(root.join("etc/machine-id"), b"random").expect("write");
        std::os::unix::fs::symlink("a", root.join("etc/b")).expect("symlink");
        let m1 = write_manifest(&root, &dir.path().join("m1"), &["/etc/machine-id"]).expect("m1");
        std::fs::write(root.join("etc/machine-id"), b"other").expect("write");
        let m2 = write_manifest(&root, &dir.path().join("m2"), &["/etc/machine-id"]).expect("m2");
        assert_eq!(m1, m2, "volatile files must not change the manifest");
        std::fs::write(root.join("etc/a"), b"2").expect("write");
        let m3 = write_manifest(&root, &dir.path().join("m3"), &["/etc/machine-id"]).expect("m3");
        assert_ne!(m1, m3);
        let text = std::fs::read_to_string(dir.path().join("m3")).expect("read");
        assert!(text.contains("/etc/b link") && text.contains("-> a"));
    }

    #[test]
    fn clamp_sets_newer_times_to_the_epoch() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("f"), b"x").expect("write");
        std::fs::write(dir.path().join("old"), b"x").expect("write");
        let old = [libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 0,
        }; 2];
        set_times(&dir.path().join("old"), &old).expect("age");
        // Touch the old file's atime only: its mtime must survive the clamp.
        let _ = std::fs::read(dir.path().join("old"));
        clamp_mtimes(dir.path(), 1_700_000_000).expect("clamp");
        let m = std::fs::metadata(dir.path().join("f")).expect("meta");
        assert_eq!(m.mtime(), 1_700_000_000);
        let o = std::fs::metadata(dir.path().join("old")).expect("meta");
        assert_eq!(o.mtime(), 1_000_000_000);
        assert!(o.atime() <= 1_700_000_000);
    }
}
