//! Fuzz entry point: one request from arbitrary bytes, against a 64 KiB
//! in-memory disk (a memfd). Must never panic.
//!
//! Input layout:
//! - byte 0: bits 0-4 the number of descriptors (at most 16), bit 5 a
//!   read-only disk, bit 6 EVENT_IDX;
//! - per descriptor 12 bytes: addr u32, len u32, flags u16, next u16 (LE),
//!   written to a 16-entry descriptor table at guest address 0; the chain
//!   starts at descriptor 0;
//! - the rest is copied to guest memory at 0x1000 (headers, payloads,
//!   indirect tables).
//!
//! Guest memory is two adjacent regions, `[0, 0x8000)` and
//! `[0x8000, 0x10000)`, so buffers can straddle a region boundary.

use std::fs::File;
use std::os::fd::FromRawFd;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::disk::DiskFile;
use super::request::{self, RequestContext};
use super::warn::Warnings;

const QUEUE_LEN: u16 = 16;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;
const DATA: u64 = 0x1000;
const MEM_END: u64 = 0x10000;
const DISK_BYTES: u64 = 64 * 1024;

/// Runs the request parser and executor on `data`.
pub fn request(data: &[u8]) {
    let _ = run(data);
}

fn run(data: &[u8]) -> Option<()> {
    let (&control, rest) = data.split_first()?;
    let count = usize::from(control & 0x1f).min(usize::from(QUEUE_LEN));
    let read_only = control & 0x20 != 0;
    let event_idx = control & 0x40 != 0;
    let table_bytes = count * 12;
    let (table, payload) = rest.split_at(table_bytes.min(rest.len()));

    let half = (MEM_END / 2) as usize;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), half),
        (GuestAddress(MEM_END / 2), half),
    ])
    .ok()?;
    for (i, d) in table.chunks_exact(12).enumerate() {
        let addr = u64::from(u32::from_le_bytes([d[0], d[1], d[2], d[3]]));
        let at = GuestAddress(DESC_TABLE + 16 * i as u64);
        mem.write_obj(addr.to_le(), at).ok()?;
        mem.write_slice(&d[4..12], GuestAddress(at.0 + 8)).ok()?;
    }
    let room = (MEM_END - DATA) as usize;
    mem.write_slice(&payload[..payload.len().min(room)], GuestAddress(DATA))
        .ok()?;
    // One available entry: descriptor 0.
    mem.write_obj(0u16, GuestAddress(AVAIL_RING)).ok()?;
    mem.write_obj(1u16.to_le(), GuestAddress(AVAIL_RING + 2))
        .ok()?;
    mem.write_obj(0u16, GuestAddress(AVAIL_RING + 4)).ok()?;

    let mut queue = Queue::new(QUEUE_LEN).ok()?;
    queue.set_size(QUEUE_LEN);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);

    let disk = memfd_disk(read_only)?;
    let warnings = Warnings::new("fuzz");
    let serial = [b'f'; super::SERIAL_LEN];
    let ctx = RequestContext {
        mem: &mem,
        disk: &disk,
        serial: &serial,
        warnings: &warnings,
    };
    while let Some(chain) = queue.pop_descriptor_chain(&mem) {
        let head = chain.head_index();
        let len = request::serve(&ctx, chain);
        queue.add_used(&mem, head, len).ok()?;
    }
    let _ = queue.needs_notification(&mem);
    Some(())
}

fn memfd_disk(read_only: bool) -> Option<DiskFile> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(c"kiln-blk-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(DISK_BYTES).ok()?;
    Some(DiskFile::from_file(
        file,
        DISK_BYTES / super::SECTOR_SIZE,
        read_only,
    ))
}
