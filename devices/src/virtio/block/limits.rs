//! What the device offers the driver and refuses beyond it.

/// The one request queue's largest size.
pub const QUEUE_SIZE: u16 = 256;

/// Data buffers per request (`seg_max`): a chain of this many plus header
/// and status still fits a queue of [`QUEUE_SIZE`] without indirect
/// descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// Largest buffer per descriptor the driver should use (`size_max`);
/// offered so that a conforming driver never exceeds [`MAX_REQUEST_BYTES`].
pub const SIZE_MAX: u32 = 1 << 20;

/// Descriptors a chain may have; longer chains fail with IOERR.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;

/// Largest IN/OUT data per request: `seg_max` x `size_max` (254 MiB).
/// Larger requests fail with IOERR. The data is transferred straight
/// between guest memory and the file, so this bounds a request's duration,
/// not an allocation. (Linux by default sends at most `max_sectors_kb`,
/// 1.25-4 MiB, per request.)
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;

/// Largest DISCARD / WRITE_ZEROES per request, in 512-byte sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 21;

/// Discard granularity hint, in sectors: 4 KiB, the usual host file
/// system block (smaller discards only zero, they free nothing).
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
