//! Building the nested host's initramfs: files from this host, binaries
//! with the shared libraries `ldd` finds for them.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use kiln_images::cpio::Entry;

use crate::RigError;

/// Collects cpio entries, creating parent directories once.
#[derive(Default)]
pub struct Tree {
    dirs: BTreeSet<String>,
    pub entries: Vec<Entry>,
}

impl Tree {
    pub fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.dirs.insert(path.to_string());
        self.entries.push(Entry::Dir {
            path: path.into(),
            mode: 0o755,
        });
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entries.push(Entry::File {
            path: path.into(),
            mode,
            data,
        });
    }

    /// Copies a host file to the same path.
    pub fn host_file(&mut self, host: &Path, mode: u32) -> Result<(), RigError> {
        let data = std::fs::read(host)
            .map_err(|e| RigError::Setup(format!("reading {}: {e}", host.display())))?;
        self.file(&host.to_string_lossy(), mode, data);
        Ok(())
    }

    /// Copies a host binary and every shared library it loads.
    pub fn host_binary(&mut self, host: &Path) -> Result<(), RigError> {
        self.host_file(host, 0o755)?;
        self.libraries_of(host)
    }

    /// Copies every shared library `host` (a binary or a library) loads,
    /// once each.
    pub fn libraries_of(&mut self, host: &Path) -> Result<(), RigError> {
        for lib in shared_libraries(host)? {
            if !self.dirs.contains(lib.trim_start_matches('/')) && !self.has_file(&lib) {
                self.host_file(Path::new(&lib), 0o755)?;
            }
        }
        Ok(())
    }

    fn has_file(&self, path: &str) -> bool {
        let p = path.trim_start_matches('/');
        self.entries
            .iter()
            .any(|e| matches!(e, Entry::File { path, .. } if path == p))
    }

    pub fn write(&self, out: &Path) -> Result<(), RigError> {
        let mut bytes = Vec::new();
        kiln_images::cpio::write_archive(&mut bytes, &self.entries)
            .map_err(|e| RigError::Setup(format!("building initramfs: {e}")))?;
        std::fs::write(out, bytes)
            .map_err(|e| RigError::Setup(format!("writing {}: {e}", out.display())))
    }
}

/// Absolute paths of the shared libraries `binary` needs, from `ldd`.
pub fn shared_libraries(binary: &Path) -> Result<Vec<String>, RigError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| RigError::Setup(format!("running ldd on {}: {e}", binary.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(p.to_string());
        }
    }
    Ok(libs)
}
