//! File upload (`put` + `put_chunk`) and download (`get`), chunked and
//! SHA-256 checked. Uploads land in a temporary file beside the target and
//! replace it only after the checksum matched.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::OpError;
use crate::protocol::{hex, ErrorCode, PutRequest, Response};

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// An upload in progress on one connection.
pub struct PutSession {
    pub id: u64,
    tmp_path: PathBuf,
    final_path: PathBuf,
    file: Option<File>,
    expected_size: u64,
    expected_sha: String,
    received: u64,
    hasher: Sha256,
    mode: u32,
    committed: bool,
}

/// What a chunk did to the session.
pub enum PutProgress {
    NeedMore,
    Done(Box<Response>),
}

fn validate_path(path: &str) -> Result<&Path, OpError> {
    if !path.starts_with('/') {
        return Err(OpError::new(
            ErrorCode::BadRequest,
            format!("path {path:?} is not absolute"),
        ));
    }
    if path.contains('\0') {
        return Err(OpError::new(ErrorCode::BadRequest, "NUL byte in path"));
    }
    Ok(Path::new(path))
}

impl PutSession {
    pub fn start(id: u64, req: &PutRequest, max_file_size: u64) -> Result<PutSession, OpError> {
        let path = validate_path(&req.path)?;
        if req.size > max_file_size {
            return Err(OpError::new(
                ErrorCode::TooLarge,
                format!(
                    "file of {} bytes exceeds the limit of {max_file_size} bytes",
                    req.size
                ),
            ));
        }
        let sha_ok = req.sha256.len() == 64
            && req
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !sha_ok {
            return Err(OpError::new(
                ErrorCode::BadRequest,
                "sha256 must be 64 lower-case hex digits",
            ));
        }
        let mode = req.mode.unwrap_or(0o644);
        if mode > 0o7777 {
            return Err(OpError::new(
                ErrorCode::BadRequest,
                format!("invalid mode {mode:o}"),
            ));
        }
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(OpError::new(ErrorCode::BadRequest, "path has no file name"));
        };
        if req.create_dirs {
            fs::create_dir_all(parent)
                .map_err(|e| OpError::io("creating parent directories", &e))?;
        }
        if path.is_dir() {
            return Err(OpError::new(
                ErrorCode::BadRequest,
                format!("{} is a directory", path.display()),
            ));
        }
        let tmp_name = format!(
            ".{}.kiln-put.{}.{}",
            name.to_string_lossy(),
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let tmp_path = parent.join(tmp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp_path)
            .map_err(|e| OpError::io(&format!("creating file in {}", parent.display()), &e))?;
        Ok(PutSession {
            id,
            tmp_path,
            final_path: path.to_path_buf(),
            file: Some(file),
            expected_size: req.size,
            expected_sha: req.sha256.clone(),
            received: 0,
            hasher: Sha256::new(),
            mode,
            committed: false,
        })
    }

    /// True for an empty upload, which completes without any chunk.
    pub fn is_complete(&self) -> bool {
        self.received == self.expected_size
    }

    /// Appends a chunk; finishes the upload once all announced bytes arrived.
    pub fn write_chunk(&mut self, data: &[u8]) -> Result<PutProgress, OpError> {
        let new_total = self.received + data.len() as u64;
        if new_total > self.expected_size {
            return Err(OpError::new(
                ErrorCode::TooLarge,
                format!("more data than the announced {} bytes", self.expected_size),
            ));
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| OpError::new(ErrorCode::Failed, "upload already finished"))?;
        file.write_all(data)
            .map_err(|e| OpError::io("writing file", &e))?;
        self.hasher.update(data);
        self.received = new_total;
        if self.is_complete() {
            self.finish().map(|r| PutProgress::Done(Box::new(r)))
        } else {
            Ok(PutProgress::NeedMore)
        }
    }

    /// Checks the checksum and moves the file into place.
    pub fn finish(&mut self) -> Result<Response, OpError> {
        let file = self
            .file
            .take()
            .ok_or_else(|| OpError::new(ErrorCode::Failed, "upload already finished"))?;
        file.sync_all()
            .map_err(|e| OpError::io("syncing file", &e))?;
        drop(file);
        let actual = hex(&std::mem::take(&mut self.hasher).finalize());
        if actual != self.expected_sha {
            return Err(OpError::new(
                ErrorCode::ChecksumMismatch,
                format!(
                    "received content has sha256 {actual}, expected {}",
                    self.expected_sha
                ),
            ));
        }
        fs::set_permissions(&self.tmp_path, Permissions::from_mode(self.mode))
            .map_err(|e| OpError::io("setting permissions", &e))?;
        fs::rename(&self.tmp_path, &self.final_path).map_err(|e| {
            OpError::io(&format!("moving file to {}", self.final_path.display()), &e)
        })?;
        self.committed = true;
        Ok(Response::PutDone {
            size: self.received,
            sha256: actual,
        })
    }
}

impl Drop for PutSession {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

/// Streams a file as `file_begin`, `file_chunk`*, `file_end` through `emit`
/// (which returns false when the client is gone).
pub fn send_file(
    path: &str,
    max_file_size: u64,
    chunk_size: usize,
    emit: &mut dyn FnMut(Response) -> bool,
) -> Result<(), OpError> {
    let path = validate_path(path)?;
    let mut file =
        File::open(path).map_err(|e| OpError::io(&format!("opening {}", path.display()), &e))?;
    let meta = file
        .metadata()
        .map_err(|e| OpError::io("reading metadata", &e))?;
    if !meta.is_file() {
        return Err(OpError::new(
            ErrorCode::BadRequest,
            format!("{} is not a regular file", path.display()),
        ));
    }
    if meta.len() > max_file_size {
        return Err(OpError::new(
            ErrorCode::TooLarge,
            format!(
                "file of {} bytes exceeds the limit of {max_file_size} bytes",
                meta.len()
            ),
        ));
    }
    if !emit(Response::FileBegin {
        size: meta.len(),
        mode: meta.permissions().mode() & 0o7777,
    }) {
        return Ok(());
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; chunk_size.max(1)];
    // A file that grows while we read is cut at the size announced above.
    let mut reader = (&mut file).take(meta.len());
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(OpError::io("reading file", &e)),
        };
        hasher.update(&buf[..n]);
        if !emit(Response::FileChunk {
            data: buf[..n].to_vec(),
        }) {
            return Ok(());
        }
    }
    emit(Response::FileEnd {
        sha256: hex(&hasher.finalize()),
    });
    Ok(())
}
