//! One virtio-blk request (virtio 1.2, section 5.2.6): checked against the
//! chain's layout and the disk, then executed.
//!
//! Layout the device accepts, per type (R = device-readable, W = writable):
//! - IN: R header; W data (multiple of 512), status
//! - OUT: R header, data (multiple of 512); W status
//! - FLUSH: R header; W status
//! - GET_ID: R header; W id (up to 20 bytes used), status
//! - DISCARD, WRITE_ZEROES: R header, one 16-byte segment; W status
//!
//! Anything else that still has a status byte gets IOERR (or UNSUPP for
//! unknown types and flags) and never reaches the file.

use std::io;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::GuestMemoryMmap;

use super::chain::{self, ChainFault, Layout, Segments};
use super::disk::{DiskFile, SECTOR_SIZE};
use super::limits::{
    MAX_DESCRIPTORS, MAX_DISCARD_SECTORS, MAX_REQUEST_BYTES, MAX_WRITE_ZEROES_SECTORS,
};
use super::warn::{Problem, Warnings};

const HEADER_LEN: u64 = 16;
const SEGMENT_LEN: u64 = 16;

/// Everything a request needs besides its chain.
pub(crate) struct RequestContext<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub disk: &'a DiskFile,
    pub serial: &'a [u8; super::config::SERIAL_LEN],
    pub warnings: &'a Warnings,
}

/// Why a request failed, as the driver will see it.
#[derive(Debug)]
enum Failure {
    /// `VIRTIO_BLK_S_IOERR`.
    IoErr(Problem),
    /// `VIRTIO_BLK_S_UNSUPP`.
    Unsupp(Problem),
    /// The backing file failed: `VIRTIO_BLK_S_IOERR`.
    Host(io::Error),
}

/// Serves one chain; returns the used length (bytes written into the
/// chain's device-writable part, status included), 0 when there was no
/// status byte to write.
pub(crate) fn serve<M>(ctx: &RequestContext<'_>, chain: virtio_queue::DescriptorChain<M>) -> u32
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let layout = match chain::walk(chain, MAX_DESCRIPTORS) {
        Ok(layout) => layout,
        Err(ChainFault::Broken) => {
            ctx.warnings.warn(Problem::BrokenChain, "");
            return 0;
        }
        Err(ChainFault::NoStatus) => {
            ctx.warnings.warn(Problem::NoStatus, "");
            return 0;
        }
    };
    let (status, written) = match execute(ctx, &layout) {
        Ok(written) => (VIRTIO_BLK_S_OK, written),
        Err(Failure::IoErr(p)) => {
            ctx.warnings.warn(p, "");
            (VIRTIO_BLK_S_IOERR, 0)
        }
        Err(Failure::Unsupp(p)) => {
            ctx.warnings.warn(p, "");
            (VIRTIO_BLK_S_UNSUPP, 0)
        }
        Err(Failure::Host(e)) => {
            ctx.warnings.warn(Problem::HostIo, &e.to_string());
            (VIRTIO_BLK_S_IOERR, 0)
        }
    };
    if !chain::write_status(ctx.mem, layout.status, status as u8) {
        ctx.warnings
            .warn(Problem::NoStatus, "status byte outside guest memory");
        return 0;
    }
    written.saturating_add(1)
}

/// The request header (`struct virtio_blk_req` up to the data).
struct Header {
    kind: u32,
    sector: u64,
}

fn execute(ctx: &RequestContext<'_>, layout: &Layout) -> Result<u32, Failure> {
    if layout.flaws.too_many_descriptors {
        return Err(Failure::IoErr(Problem::TooManyDescriptors));
    }
    if layout.flaws.readable_after_writable {
        return Err(Failure::IoErr(Problem::WrongDirection));
    }
    let (header, payload) = layout
        .readable
        .split_front(HEADER_LEN)
        .ok_or(Failure::IoErr(Problem::ShortHeader))?;
    let mut raw = [0u8; HEADER_LEN as usize];
    header
        .read_exact(ctx.mem, &mut raw)
        .map_err(|_| Failure::IoErr(Problem::BadAddress))?;
    let header = Header {
        kind: u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]),
        sector: u64::from_le_bytes([
            raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
        ]),
    };
    match header.kind {
        VIRTIO_BLK_T_IN => {
            if !payload.is_empty() {
                return Err(Failure::IoErr(Problem::WrongDirection));
            }
            read(ctx, header.sector, &layout.writable)
        }
        VIRTIO_BLK_T_OUT => {
            // A zero-length write is harmless: allow it like a zero-length read.
            if !layout.writable.is_empty() {
                return Err(Failure::IoErr(Problem::WrongDirection));
            }
            refuse_if_read_only(ctx)?;
            write(ctx, header.sector, &payload).map(|()| 0)
        }
        VIRTIO_BLK_T_FLUSH => {
            if !payload.is_empty() || !layout.writable.is_empty() {
                return Err(Failure::IoErr(Problem::WrongDirection));
            }
            ctx.disk.flush().map_err(Failure::Host)?;
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            if !payload.is_empty() {
                return Err(Failure::IoErr(Problem::WrongDirection));
            }
            let n = layout
                .writable
                .write_prefix(ctx.mem, ctx.serial)
                .map_err(|_| Failure::IoErr(Problem::BadAddress))?;
            Ok(n as u32)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if !layout.writable.is_empty() {
                return Err(Failure::IoErr(Problem::WrongDirection));
            }
            refuse_if_read_only(ctx)?;
            discard_or_zero(ctx, header.kind == VIRTIO_BLK_T_DISCARD, &payload).map(|()| 0)
        }
        _ => Err(Failure::Unsupp(Problem::UnknownType)),
    }
}

fn refuse_if_read_only(ctx: &RequestContext<'_>) -> Result<(), Failure> {
    if ctx.disk.read_only() {
        Err(Failure::IoErr(Problem::ReadOnly))
    } else {
        Ok(())
    }
}

/// The byte offset of `len` bytes at `sector`, if they lie within the disk.
fn disk_range(disk: &DiskFile, sector: u64, len: u64) -> Result<u64, Failure> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(Failure::IoErr(Problem::OutOfRange))?;
    let end = offset
        .checked_add(len)
        .ok_or(Failure::IoErr(Problem::OutOfRange))?;
    if end > disk.sectors().saturating_mul(SECTOR_SIZE) {
        return Err(Failure::IoErr(Problem::OutOfRange));
    }
    Ok(offset)
}

/// Checks an IN/OUT data length: whole sectors, at most the request limit.
fn data_len(data: &Segments) -> Result<u64, Failure> {
    let len = data.total_len();
    if len > MAX_REQUEST_BYTES {
        return Err(Failure::IoErr(Problem::TooLarge));
    }
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(Failure::IoErr(Problem::Misaligned));
    }
    Ok(len)
}

fn read(ctx: &RequestContext<'_>, sector: u64, data: &Segments) -> Result<u32, Failure> {
    let len = data_len(data)?;
    let offset = disk_range(ctx.disk, sector, len)?;
    let mut iovecs = data
        .iovecs(ctx.mem, true)
        .map_err(|_| Failure::IoErr(Problem::BadAddress))?;
    // SAFETY: the iovecs point into guest memory, which stays mapped while
    // `ctx.mem` is borrowed; the guest may race on it, which only garbles
    // its own data.
    unsafe { ctx.disk.read_exact_at(&mut iovecs, offset) }.map_err(Failure::Host)?;
    // len <= MAX_REQUEST_BYTES < 4 GiB.
    Ok(len as u32)
}

fn write(ctx: &RequestContext<'_>, sector: u64, data: &Segments) -> Result<(), Failure> {
    let len = data_len(data)?;
    let offset = disk_range(ctx.disk, sector, len)?;
    let mut iovecs = data
        .iovecs(ctx.mem, false)
        .map_err(|_| Failure::IoErr(Problem::BadAddress))?;
    // SAFETY: as in `read`; the kernel only reads these buffers.
    unsafe { ctx.disk.write_all_at(&mut iovecs, offset) }.map_err(Failure::Host)
}

/// DISCARD and WRITE_ZEROES: exactly one `virtio_blk_discard_write_zeroes`
/// segment (`max_discard_seg` = `max_write_zeroes_seg` = 1).
fn discard_or_zero(
    ctx: &RequestContext<'_>,
    discard: bool,
    payload: &Segments,
) -> Result<(), Failure> {
    let len = payload.total_len();
    if len != SEGMENT_LEN {
        // None, a partial one, or more than max_*_seg.
        return Err(Failure::IoErr(Problem::BadSegments));
    }
    let mut raw = [0u8; SEGMENT_LEN as usize];
    payload
        .read_exact(ctx.mem, &mut raw)
        .map_err(|_| Failure::IoErr(Problem::BadAddress))?;
    let sector = u64::from_le_bytes([
        raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
    ]);
    let sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
    let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
    // The spec: UNSUPP for unknown flags, and for unmap on a discard.
    let allowed = if discard {
        0
    } else {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    };
    if flags & !allowed != 0 {
        return Err(Failure::Unsupp(Problem::BadFlags));
    }
    let max = if discard {
        MAX_DISCARD_SECTORS
    } else {
        MAX_WRITE_ZEROES_SECTORS
    };
    if sectors > max {
        return Err(Failure::IoErr(Problem::TooLarge));
    }
    let bytes = u64::from(sectors) * SECTOR_SIZE;
    let offset = disk_range(ctx.disk, sector, bytes)?;
    if bytes == 0 {
        return Ok(());
    }
    let result = if discard {
        ctx.disk.discard(offset, bytes)
    } else {
        ctx.disk.write_zeroes(
            offset,
            bytes,
            flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        )
    };
    result.map_err(Failure::Host)
}
