//! The raw disk image: positioned, vectored I/O on one file descriptor,
//! shared by the device and its worker (nothing here uses the file offset).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use super::config::BlockError;

/// Bytes per virtio-blk sector (fixed by the spec, independent of `blk_size`).
pub const SECTOR_SIZE: u64 = 512;

/// How many iovecs one `preadv`/`pwritev` call takes (Linux `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Zeros for the write-zeroes fallback (file systems without `ZERO_RANGE`).
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

pub(crate) struct DiskFile {
    file: File,
    sectors: u64,
    read_only: bool,
}

impl DiskFile {
    /// Opens `path` (`O_RDONLY` when `read_only`). The capacity is the size
    /// in whole 512-byte sectors: the tail of an image whose size is not a
    /// multiple of 512 is invisible to the guest.
    pub fn open(path: &Path, read_only: bool) -> Result<DiskFile, BlockError> {
        let open_err = |source: io::Error| {
            let hint = if source.kind() == io::ErrorKind::PermissionDenied && !read_only {
                " (use readonly=on for an image you may not write)"
            } else {
                ""
            };
            BlockError::Open {
                path: path.to_path_buf(),
                source,
                hint,
            }
        };
        let meta = std::fs::metadata(path).map_err(open_err)?;
        let kind = meta.file_type();
        if kind.is_dir() {
            return Err(BlockError::IsDirectory(path.to_path_buf()));
        }
        if !kind.is_file() && !kind.is_block_device() {
            return Err(BlockError::NotAFile(path.to_path_buf()));
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(open_err)?;
        // Seeking to the end also sizes block devices (their metadata says 0).
        let bytes = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_path_buf(),
                source,
            })?;
        if bytes == 0 {
            tracing::warn!(
                "disk image {} is empty: the guest sees a disk of 0 sectors",
                path.display()
            );
        } else if bytes % SECTOR_SIZE != 0 {
            tracing::warn!(
                "disk image {} is {bytes} bytes, not a multiple of {SECTOR_SIZE}: the last {} bytes are not visible to the guest",
                path.display(),
                bytes % SECTOR_SIZE
            );
        }
        Ok(DiskFile::from_file(file, bytes / SECTOR_SIZE, read_only))
    }

    /// A disk on an already open file with a given capacity (tests, fuzzing).
    pub fn from_file(file: File, sectors: u64, read_only: bool) -> DiskFile {
        DiskFile {
            file,
            sectors,
            read_only,
        }
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Reads exactly the iovecs' total length at `offset`; a short read
    /// (the file shrank underneath) is an error.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for writes for the
    /// whole call.
    pub unsafe fn read_exact_at(&self, iovecs: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.transfer(iovecs, offset, false) }
    }

    /// Writes exactly the iovecs' total length at `offset`.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for reads for the
    /// whole call.
    pub unsafe fn write_all_at(&self, iovecs: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.transfer(iovecs, offset, true) }
    }

    /// The preadv/pwritev loop: continues after partial transfers by
    /// trimming the consumed iovecs in place.
    unsafe fn transfer(
        &self,
        iovecs: &mut [libc::iovec],
        mut offset: u64,
        write: bool,
    ) -> io::Result<()> {
        let mut first = 0;
        while first < iovecs.len() {
            if iovecs[first].iov_len == 0 {
                first += 1;
                continue;
            }
            let count = (iovecs.len() - first).min(IOV_MAX) as libc::c_int;
            let off = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
            let ptr = iovecs[first..].as_ptr();
            // SAFETY: the iovecs are valid per the caller's contract; the
            // kernel checks the fd.
            let n = unsafe {
                if write {
                    libc::pwritev(self.file.as_raw_fd(), ptr, count, off)
                } else {
                    libc::preadv(self.file.as_raw_fd(), ptr, count, off)
                }
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                return Err(if write {
                    io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the disk image accepted no more data",
                    )
                } else {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the disk image ends early (truncated underneath?)",
                    )
                });
            }
            let mut done = n as usize;
            offset += done as u64;
            while done > 0 && first < iovecs.len() {
                let iov = &mut iovecs[first];
                let step = done.min(iov.iov_len);
                // SAFETY: stays within the iovec's own buffer.
                iov.iov_base = unsafe { (iov.iov_base as *mut u8).add(step) } as *mut libc::c_void;
                iov.iov_len -= step;
                done -= step;
                if iov.iov_len == 0 {
                    first += 1;
                }
            }
        }
        Ok(())
    }

    /// Makes written data durable (`fdatasync`).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates a range. Discard is a hint: a backend that cannot punch
    /// holes keeps the data and the request still succeeds.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => Ok(()),
            other => other,
        }
    }

    /// Makes a range read back as zeros. With `unmap`, the space may be
    /// deallocated (hole punch); otherwise it stays allocated
    /// (`ZERO_RANGE`). Falls back to writing zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if unmap {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Err(e) if unsupported(&e) => {}
                other => return other,
            }
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => {}
            other => return other,
        }
        let mut at = offset;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        while at < end {
            let n = (end - at).min(ZEROS.len() as u64) as usize;
            let mut iov = [libc::iovec {
                iov_base: ZEROS.as_ptr() as *mut libc::c_void,
                iov_len: n,
            }];
            // SAFETY: the iovec points into a static buffer that is only read.
            unsafe { self.write_all_at(&mut iov, at)? };
            at += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        loop {
            // SAFETY: fallocate only acts on the fd; arguments are plain values.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
            if r == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// The backend does not do this fallocate mode (tmpfs and ZERO_RANGE,
/// character devices, old file systems).
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENODEV)
    )
}
