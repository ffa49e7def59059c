//! virtio-blk (virtio 1.2, section 5.2): a raw disk image as a guest disk.
//!
//! One request queue, served on the device's I/O worker. Reads and writes
//! go straight between guest memory and the file (`preadv`/`pwritev`);
//! FLUSH is `fdatasync`; DISCARD punches holes; WRITE_ZEROES uses
//! `fallocate(ZERO_RANGE)` (hole punching with the unmap flag) and falls
//! back to writing zeros. Malformed requests fail with IOERR/UNSUPP (or
//! are returned unused when there is no status byte); host I/O errors fail
//! only the request at hand.
//!
//! ```text
//! --disk path=disk.img[,readonly=on][,serial=abc][,id=disk1]
//! ```

mod chain;
mod config;
mod disk;
#[doc(hidden)]
pub mod fuzzing;
mod handler;
mod limits;
mod request;
#[cfg(test)]
mod tests;
mod warn;

use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_queue::QueueT;

pub use config::{BlockConfig, BlockError, SERIAL_LEN};
pub use disk::SECTOR_SIZE;
pub use limits::{MAX_REQUEST_BYTES, QUEUE_SIZE};

use disk::DiskFile;
use handler::BlockWorker;
use limits::*;
use warn::Warnings;

use super::worker::{Placement, Worker, WorkerControl};
use super::{device_type, features, read_config_bytes, ActivateError, DeviceContext, VirtioDevice};

/// Size of the configuration space we expose: `virtio_blk_config` up to
/// and including `write_zeroes_may_unmap` and its padding.
const CONFIG_LEN: usize = 60;

pub struct VirtioBlock {
    config: BlockConfig,
    disk: Arc<DiskFile>,
    config_space: [u8; CONFIG_LEN],
    control: WorkerControl,
    worker: Option<Worker>,
    warnings: Arc<Warnings>,
}

impl VirtioBlock {
    /// Opens the image `config.path` (read-only if `config.read_only`).
    /// Its capacity is its size in whole 512-byte sectors; a trailing
    /// partial sector is not visible to the guest. An empty image gives a
    /// disk of 0 sectors (logged as a warning).
    pub fn new(config: BlockConfig, placement: Placement) -> Result<VirtioBlock, BlockError> {
        config.validate()?;
        let disk = DiskFile::open(&config.path, config.read_only)?;
        VirtioBlock::with_disk(config, disk, placement)
    }

    pub(crate) fn with_disk(
        config: BlockConfig,
        disk: DiskFile,
        placement: Placement,
    ) -> Result<VirtioBlock, BlockError> {
        let control = WorkerControl::new(placement).map_err(BlockError::Control)?;
        let config_space = config_space(disk.sectors(), disk.read_only());
        let warnings = Arc::new(Warnings::new(&config.id));
        Ok(VirtioBlock {
            config,
            disk: Arc::new(disk),
            config_space,
            control,
            worker: None,
            warnings,
        })
    }

    /// The handle to move the I/O worker (CPUs, notify or poll) at runtime;
    /// it stays valid across resets.
    pub fn worker_control(&self) -> WorkerControl {
        self.control.clone()
    }

    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.sectors()
    }

    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }
}

/// `struct virtio_blk_config` (virtio 1.2, section 5.2.4), little endian.
fn config_space(sectors: u64, read_only: bool) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &sectors.to_le_bytes()); // capacity
    put(8, &SIZE_MAX.to_le_bytes()); // size_max
    put(12, &SEG_MAX.to_le_bytes()); // seg_max
                                     // 16: geometry (not offered)
    put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
                                                  // 24: topology (not offered); 32: writeback, 33: unused
    put(34, &1u16.to_le_bytes()); // num_queues (meaningful only with MQ)
    if !read_only {
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &1u32.to_le_bytes()); // max_discard_seg
        put(44, &DISCARD_SECTOR_ALIGNMENT.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
    }
    c
}

fn bit(b: u32) -> u64 {
    1u64 << b
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn name(&self) -> &str {
        &self.config.id
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH)
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC;
        if self.disk.read_only() {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    /// The only writable field (`writeback`) needs CONFIG_WCE, which is not
    /// offered: writes are ignored.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, mut ctx: DeviceContext) -> Result<(), ActivateError> {
        self.reset();
        let qctx = ctx.take_queue(0).ok_or(ActivateError::MissingQueue(0))?;
        let mut queue = qctx.queue;
        queue.set_event_idx(ctx.acked_features & features::RING_EVENT_IDX != 0);
        let handler = BlockWorker {
            mem: ctx.mem,
            queue,
            index: qctx.index,
            kick: qctx.kick,
            interrupt: ctx.interrupt,
            disk: self.disk.clone(),
            serial: self.config.serial_bytes(),
            warnings: self.warnings.clone(),
            polling: false,
            broken: false,
        };
        let worker = Worker::spawn(&self.config.id, handler, self.control.clone())
            .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        // Stopping joins the thread, which drops the queue and its kick.
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
        }
    }
}
