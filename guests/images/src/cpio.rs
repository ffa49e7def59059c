//! A deterministic "newc" cpio writer for initramfs archives: entries are
//! written in the order given, with mtime 0, owner root, and inode numbers
//! counted from 1, so the same files always give the same bytes.

use std::io::{self, Write};

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// A character device node (e.g. /dev/console) so early output works
    /// before devtmpfs is mounted.
    CharDev {
        path: String,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Writes `entries` and the trailer.
pub fn write_archive(out: &mut impl Write, entries: &[Entry]) -> io::Result<()> {
    let mut offset = 0u64;
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        let (path, mode, data, rdev): (&str, u32, &[u8], (u32, u32)) = match e {
            Entry::Dir { path, mode } => (path, S_IFDIR | (mode & 0o7777), &[], (0, 0)),
            Entry::File { path, mode, data } => (path, S_IFREG | (mode & 0o7777), data, (0, 0)),
            Entry::Symlink { path, target } => (path, S_IFLNK | 0o777, target.as_bytes(), (0, 0)),
            Entry::CharDev {
                path,
                mode,
                major,
                minor,
            } => (path, S_IFCHR | (mode & 0o7777), &[], (*major, *minor)),
        };
        let nlink = if matches!(e, Entry::Dir { .. }) { 2 } else { 1 };
        write_member(out, &mut offset, ino, mode, nlink, rdev, path, data)?;
    }
    write_member(out, &mut offset, 0, 0, 1, (0, 0), "TRAILER!!!", &[])
}

#[allow(clippy::too_many_arguments)]
fn write_member(
    out: &mut impl Write,
    offset: &mut u64,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    path: &str,
    data: &[u8],
) -> io::Result<()> {
    let name_len = path.len() + 1;
    let file_size = u32::try_from(data.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{path} too large for cpio"),
        )
    })?;
    let header = format!(
        "070701{ino:08X}{mode:08X}{uid:08X}{gid:08X}{nlink:08X}{mtime:08X}{file_size:08X}{dmaj:08X}{dmin:08X}{rmaj:08X}{rmin:08X}{name_len:08X}{check:08X}",
        uid = 0,
        gid = 0,
        mtime = 0,
        dmaj = 0,
        dmin = 0,
        rmaj = rdev.0,
        rmin = rdev.1,
        check = 0,
    );
    fn put(out: &mut impl Write, offset: &mut u64, bytes: &[u8]) -> io::Result<()> {
        out.write_all(bytes)?;
        *offset += bytes.len() as u64;
        Ok(())
    }
    fn pad(out: &mut impl Write, offset: &mut u64) -> io::Result<()> {
        let n = ((4 - (*offset % 4)) % 4) as usize;
        put(out, offset, &[0u8; 3][..n])
    }
    put(out, offset, header.as_bytes())?;
    put(out, offset, path.as_bytes())?;
    put(out, offset, &[0])?;
    pad(out, offset)?;
    put(out, offset, data)?;
    pad(out, offset)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_newc_with_alignment_and_trailer() {
        let mut out = Vec::new();
        write_archive(
            &mut out,
            &[
                Entry::Dir {
                    path: "bin".into(),
                    mode: 0o755,
                },
                Entry::File {
                    path: "init".into(),
                    mode: 0o755,
                    data: b"#!/bin/sh\n".to_vec(),
                },
                Entry::Symlink {
                    path: "bin/sh".into(),
                    target: "busybox".into(),
                },
            ],
        )
        .expect("write");
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        // Second member's header starts 4-aligned right after the first.
        let first = 110 + "bin\0".len(); // 114 → padded to 116
        assert_eq!(&out[116..122], b"070701");
        assert!(first <= 116);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("TRAILER!!!"));
        assert!(text.contains("#!/bin/sh\n"));
        // Mode of the file member: regular file, 0755.
        let init_hdr = text.find("init").expect("init name") - 110;
        assert_eq!(&text[init_hdr + 14..init_hdr + 22], "000081ED");
    }

    #[test]
    fn output_is_deterministic() {
        let entries = vec![Entry::File {
            path: "a".into(),
            mode: 0o644,
            data: vec![1, 2, 3],
        }];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        write_archive(&mut a, &entries).expect("a");
        write_archive(&mut b, &entries).expect("b");
        assert_eq!(a, b);
    }

    #[test]
    fn the_kernel_format_is_readable_by_cpio() {
        // Cross-check with GNU cpio when present (Debian package cpio).
        let Ok(cpio) = which("cpio") else {
            panic!("cpio (Debian package cpio) is needed to cross-check the archive format")
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let mut out = Vec::new();
        write_archive(
            &mut out,
            &[
                Entry::Dir {
                    path: "d".into(),
                    mode: 0o755,
                },
                Entry::File {
                    path: "d/f".into(),
                    mode: 0o600,
                    data: b"hello".to_vec(),
                },
                Entry::Symlink {
                    path: "l".into(),
                    target: "d/f".into(),
                },
            ],
        )
        .expect("write");
        let mut child = std::process::Command::new(cpio)
            .args(["-idm", "--quiet", "--no-absolute-filenames"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn cpio");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&out)
            .expect("feed");
        assert!(child.wait().expect("wait").success());
        assert_eq!(
            std::fs::read(dir.path().join("d/f")).expect("read"),
            b"hello"
        );
        assert_eq!(
            std::fs::read_link(dir.path().join("l"))
                .expect("link")
                .to_string_lossy(),
            "d/f"
        );
    }

    fn which(name: &str) -> Result<std::path::PathBuf, ()> {
        std::env::var_os("PATH")
            .and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(name))
                    .find(|p| p.is_file())
            })
            .ok_or(())
    }
}
