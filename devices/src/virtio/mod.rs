//! Virtio devices and what they share.
//!
//! A device model implements [`VirtioDevice`]: it describes itself (type,
//! features, queue sizes, configuration space) and, once the driver set
//! `DRIVER_OK`, gets a [`DeviceContext`] with guest memory, its enabled
//! queues, their kick eventfds and an [`Interrupt`] to signal the driver.
//! From then on the device serves its queues on its own I/O worker thread
//! ([`worker`]), never on a vCPU thread. The transport (virtio-pci) owns
//! everything else: feature negotiation, queue set-up, status, MSI-X.
//!
//! Everything a device reads from a queue is guest-controlled: devices
//! bounds-check it, fail that request (or mark themselves broken with
//! [`Interrupt::set_needs_reset`]) and log once; nothing here may panic on
//! guest input.

pub mod balloon;
pub mod block;
pub mod console;
pub mod net;
pub mod options;
pub mod pci;
#[doc(hidden)]
pub mod pci_fuzzing;
pub(crate) mod queue;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_support;
pub mod vsock;
pub mod worker;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Guest memory as devices see it: shared with the vCPUs and every worker.
pub type Memory = Arc<vm_memory::GuestMemoryMmap>;

/// Virtio device IDs (virtio 1.2, section 5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
    pub const BALLOON: u32 = 5;
    pub const VSOCK: u32 = 19;
}

/// Feature bits every transport offers (virtio 1.2, section 6).
pub mod features {
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// How a device reaches the driver. Shared by the transport and the
/// device's worker threads.
pub trait Interrupt: Send + Sync {
    /// Tells the driver that queue `index` has new used buffers.
    fn signal_queue(&self, index: u16);
    /// Tells the driver the device configuration changed.
    fn signal_config(&self);
    /// Marks the device broken (`DEVICE_NEEDS_RESET`) and tells the driver.
    /// The device stops serving until the driver resets it.
    fn set_needs_reset(&self);
}

/// One queue the driver enabled, handed to the device on activation.
pub struct QueueContext {
    /// The queue's index within the device.
    pub index: u16,
    pub queue: virtio_queue::Queue,
    /// Written by KVM (ioeventfd) when the driver notifies this queue.
    pub kick: EventFd,
}

/// What a device gets when the driver sets `DRIVER_OK`.
pub struct DeviceContext {
    pub mem: Memory,
    /// The enabled queues, in index order. Queues the driver left disabled
    /// are absent.
    pub queues: Vec<QueueContext>,
    /// Features the driver accepted (device and transport bits).
    pub acked_features: u64,
    pub interrupt: Arc<dyn Interrupt>,
}

impl DeviceContext {
    /// Takes queue `index` out of the context, if the driver enabled it.
    pub fn take_queue(&mut self, index: u16) -> Option<QueueContext> {
        let at = self.queues.iter().position(|q| q.index == index)?;
        Some(self.queues.remove(at))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver did not enable required queue {0}")]
    MissingQueue(u16),
    #[error("cannot start the device's I/O worker: {0}")]
    Worker(#[source] std::io::Error),
    #[error("{0}")]
    Backend(String),
}

/// A virtio device model, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID ([`device_type`]).
    fn device_type(&self) -> u32;
    /// Short name for logs and thread names: `blk0`, `net0`, ...
    fn name(&self) -> &str;
    /// The largest size of each of the device's queues, in index order.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Device feature bits offered to the driver; the transport adds
    /// [`features::VERSION_1`].
    fn features(&self) -> u64;
    /// Reads the device configuration space. Reads past its end return
    /// zeros.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space; most devices ignore writes.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set `DRIVER_OK`: start serving the queues.
    fn activate(&mut self, ctx: DeviceContext) -> Result<(), ActivateError>;
    /// The driver reset the device: stop the workers and drop the queues,
    /// so that it can be activated again.
    fn reset(&mut self);
}

/// Copies `data.len()` bytes of `config` at `offset` into `data`, zeros
/// where `config` ends: the common read_config of devices whose
/// configuration is a byte array.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [9u8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
