//! The virtio-pci modern transport (virtio 1.2, section 4.1): a PCI
//! function whose BAR 0 holds the common configuration, ISR, device
//! configuration, notification area and the MSI-X table and PBA.
//!
//! ```text
//! BAR 0 (32 KiB)   0x0000 common config     0x3000 notify (4 bytes per queue)
//!                  0x1000 ISR status        0x4000 MSI-X table
//!                  0x2000 device config     0x6000 MSI-X PBA
//! ```
//! Queue notifications go to KVM ioeventfds registered at the notify
//! addresses while the BAR is decoded; a notify write that still reaches us
//! (before registration) kicks the queue the same way.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{features, DeviceContext, Interrupt, Memory, QueueContext, VirtioDevice};
use crate::pci::config::ConfigSpace;
use crate::pci::msix::{self, MsiRouting, Msix};
use crate::pci::PciDevice;

pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE_CONFIG: u64 = 0x2000;
const DEVICE_CONFIG_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;
/// At most this many queues fit in the notify area and the MSI-X table.
pub const MAX_QUEUES: usize = 64;

const NO_VECTOR: u16 = 0xffff;

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// Registers the KVM ioeventfds of queue notifications (implemented by the
/// VMM).
pub trait IoEventRegistrar: Send + Sync {
    fn register(&self, addr: u64, fd: &EventFd) -> io::Result<()>;
    fn unregister(&self, addr: u64, fd: &EventFd) -> io::Result<()>;
}

#[derive(Clone, Copy)]
struct QueueRegs {
    max_size: u16,
    size: u16,
    enabled: bool,
    vector: u16,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        QueueRegs {
            max_size,
            size: max_size,
            enabled: false,
            vector: NO_VECTOR,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// What a device's workers share with the transport to reach the driver.
struct Signals {
    msix: Arc<Mutex<Msix>>,
    /// Vector per queue and for configuration changes, fixed at activation.
    queue_vectors: Vec<u16>,
    config_vector: u16,
    isr: AtomicU8,
    config_generation: AtomicU8,
    needs_reset: AtomicBool,
}

impl Signals {
    fn raise(&self, vector: u16) {
        if vector != NO_VECTOR {
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .trigger(vector);
        }
    }
}

struct SharedSignals(Arc<Signals>);

impl Interrupt for SharedSignals {
    fn signal_queue(&self, index: u16) {
        self.0.isr.fetch_or(1, Ordering::SeqCst);
        if let Some(&v) = self.0.queue_vectors.get(index as usize) {
            self.0.raise(v);
        }
    }

    fn signal_config(&self) {
        self.0.config_generation.fetch_add(1, Ordering::SeqCst);
        self.0.isr.fetch_or(2, Ordering::SeqCst);
        self.0.raise(self.0.config_vector);
    }

    fn set_needs_reset(&self) {
        if !self.0.needs_reset.swap(true, Ordering::SeqCst) {
            self.signal_config();
        }
    }
}

pub struct VirtioPciDevice {
    name: String,
    config: ConfigSpace,
    msix_cap: usize,
    device: Box<dyn VirtioDevice>,
    mem: Memory,
    msix: Arc<Mutex<Msix>>,
    ioevents: Arc<dyn IoEventRegistrar>,
    /// Where the notify ioeventfds are registered now (BAR 0's address).
    registered_at: Option<u64>,
    kicks: Vec<EventFd>,
    queues: Vec<QueueRegs>,
    signals: Arc<Signals>,
    offered: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    config_vector: u16,
    active: bool,
    warned: bool,
}

impl VirtioPciDevice {
    /// Wraps `device` in a PCI function whose BAR 0 is at `bar_addr`
    /// (allocated by the caller, aligned to [`BAR_SIZE`]).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Memory,
        bar_addr: u32,
        routing: Arc<dyn MsiRouting>,
        ioevents: Arc<dyn IoEventRegistrar>,
    ) -> io::Result<Self> {
        let sizes = device.queue_max_sizes();
        if sizes.is_empty() || sizes.len() > MAX_QUEUES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} has {} queues", device.name(), sizes.len()),
            ));
        }
        let num_vectors = sizes.len() as u16 + 1;
        let msix = Arc::new(Mutex::new(Msix::new(num_vectors, routing)?));
        let kicks = sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        let device_type = device.device_type();
        let mut config = ConfigSpace::new(
            0x1af4,
            0x1040 + device_type as u16,
            class_code(device_type),
            1,
            0x1af4,
            0x40 + device_type as u16,
        );
        config.add_memory_bar(0, BAR_SIZE, bar_addr);
        add_virtio_cap(&mut config, 1, COMMON, COMMON_LEN, None);
        add_virtio_cap(
            &mut config,
            2,
            NOTIFY,
            (sizes.len() as u32 * NOTIFY_MULTIPLIER) as u64,
            Some(NOTIFY_MULTIPLIER),
        );
        add_virtio_cap(&mut config, 3, ISR, 1, None);
        add_virtio_cap(&mut config, 4, DEVICE_CONFIG, DEVICE_CONFIG_LEN, None);
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(num_vectors - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(MSIX_TABLE as u32).to_le_bytes()); // BIR 0
        body[6..10].copy_from_slice(&(MSIX_PBA as u32).to_le_bytes());
        // Only the enable and function-mask bits of message control are writable.
        let msix_cap = config.add_capability(
            msix::CAPABILITY_ID,
            &body,
            &[0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0],
        );
        let offered = device.features() | features::VERSION_1;
        let signals = Arc::new(Signals {
            msix: msix.clone(),
            queue_vectors: Vec::new(),
            config_vector: NO_VECTOR,
            isr: AtomicU8::new(0),
            config_generation: AtomicU8::new(0),
            needs_reset: AtomicBool::new(false),
        });
        Ok(VirtioPciDevice {
            name: device.name().to_string(),
            config,
            msix_cap,
            queues: sizes.iter().map(|&s| QueueRegs::new(s)).collect(),
            device,
            mem,
            msix,
            ioevents,
            registered_at: None,
            kicks,
            signals,
            offered,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            config_vector: NO_VECTOR,
            active: false,
            warned: false,
        })
    }

    fn warn_once(&mut self, what: &str) {
        if !self.warned {
            tracing::warn!(
                "{}: {what} (further driver errors on this device are not logged)",
                self.name
            );
            self.warned = true;
        }
    }

    fn device_status(&self) -> u8 {
        let broken = if self.signals.needs_reset.load(Ordering::SeqCst) {
            status::DEVICE_NEEDS_RESET
        } else {
            0
        };
        self.status | broken
    }

    fn selected(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let q = self.queues.get(self.queue_select as usize).copied();
        let value: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => self.offered & 0xffff_ffff,
                1 => self.offered >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(self.config_vector),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.device_status()),
            (0x15, 1) => u64::from(self.signals.config_generation.load(Ordering::SeqCst)),
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => q.map_or(0, |q| u64::from(q.size)),
            (0x1a, 2) => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
            (0x1c, 2) => q.map_or(0, |q| u64::from(q.enabled)),
            (0x1e, 2) => u64::from(self.queue_select),
            (0x20, 4) | (0x20, 8) => q.map_or(0, |q| q.desc),
            (0x24, 4) => q.map_or(0, |q| q.desc >> 32),
            (0x28, 4) | (0x28, 8) => q.map_or(0, |q| q.driver),
            (0x2c, 4) => q.map_or(0, |q| q.driver >> 32),
            (0x30, 4) | (0x30, 8) => q.map_or(0, |q| q.device),
            (0x34, 4) => q.map_or(0, |q| q.device >> 32),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 8];
        let n = data.len().min(8);
        raw[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(raw);
        // Queue set-up is frozen once the driver is running.
        let queue_locked = self.status & status::DRIVER_OK != 0;
        // One MSI-X vector per queue plus one for configuration changes.
        let vectors = self.queues.len() as u16 + 1;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v as u32,
            (0x08, 4) => self.driver_feature_select = v as u32,
            (0x0c, 4) if self.status & status::FEATURES_OK == 0 => match self.driver_feature_select
            {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | v << 32,
                _ => {}
            },
            (0x10, 2) => {
                self.config_vector = if (v as u16) < vectors {
                    v as u16
                } else {
                    NO_VECTOR
                }
            }
            (0x14, 1) => self.write_status(v as u8),
            (0x16, 2) => self.queue_select = v as u16,
            (0x18, 2) if !queue_locked => {
                if let Some(q) = self.selected() {
                    q.size = v as u16;
                }
            }
            (0x1a, 2) => {
                if let Some(q) = self.selected() {
                    q.vector = if (v as u16) < vectors {
                        v as u16
                    } else {
                        NO_VECTOR
                    };
                }
            }
            (0x1c, 2) if !queue_locked => {
                if let Some(q) = self.selected() {
                    q.enabled = v & 1 == 1;
                }
            }
            (0x20, 4 | 8) | (0x24, 4) | (0x28, 4 | 8) | (0x2c, 4) | (0x30, 4 | 8) | (0x34, 4)
                if !queue_locked =>
            {
                if let Some(q) = self.selected() {
                    let field = match offset & !7 {
                        0x20 => &mut q.desc,
                        0x28 => &mut q.driver,
                        _ => &mut q.device,
                    };
                    *field = match (offset % 8, data.len()) {
                        (0, 8) => v,
                        (0, _) => (*field & !0xffff_ffff) | v,
                        _ => (*field & 0xffff_ffff) | v << 32,
                    };
                }
            }
            _ => self.warn_once(&format!(
                "ignored write of {} bytes at common config offset {offset:#x}",
                data.len()
            )),
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = value;
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let unknown = self.driver_features & !self.offered;
            if unknown != 0 || self.driver_features & features::VERSION_1 == 0 {
                self.warn_once(&format!(
                    "driver features {:#x} refused (offered {:#x})",
                    self.driver_features, self.offered
                ));
                new &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 && !self.active {
            if new & status::FEATURES_OK == 0 {
                self.warn_once("DRIVER_OK without FEATURES_OK");
                self.signals.needs_reset.store(true, Ordering::SeqCst);
            } else {
                self.activate();
            }
        }
        self.status = new;
    }

    fn activate(&mut self) {
        let mut queues = Vec::new();
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        for (index, regs) in self.queues.iter().enumerate() {
            if !regs.enabled {
                continue;
            }
            match build_queue(regs, event_idx, &self.mem) {
                Ok(queue) => match self.kicks[index].try_clone() {
                    Ok(kick) => queues.push(QueueContext {
                        index: index as u16,
                        queue,
                        kick,
                    }),
                    Err(e) => {
                        return self
                            .fail_activation(&format!("cannot clone queue {index}'s eventfd: {e}"))
                    }
                },
                Err(why) => return self.fail_activation(&format!("queue {index}: {why}")),
            }
        }
        // Fresh signals with this activation's vectors, so no worker of a
        // previous activation can signal with stale ones.
        self.signals = Arc::new(Signals {
            msix: self.msix.clone(),
            queue_vectors: self.queues.iter().map(|q| q.vector).collect(),
            config_vector: self.config_vector,
            isr: AtomicU8::new(0),
            config_generation: AtomicU8::new(self.signals.config_generation.load(Ordering::SeqCst)),
            needs_reset: AtomicBool::new(false),
        });
        let ctx = DeviceContext {
            mem: self.mem.clone(),
            queues,
            acked_features: self.driver_features,
            interrupt: Arc::new(SharedSignals(self.signals.clone())),
        };
        match self.device.activate(ctx) {
            Ok(()) => {
                self.active = true;
                tracing::debug!(
                    "{}: activated with features {:#x}",
                    self.name,
                    self.driver_features
                );
            }
            Err(e) => self.fail_activation(&e.to_string()),
        }
    }

    fn fail_activation(&mut self, why: &str) {
        tracing::warn!("{}: cannot activate: {why}", self.name);
        self.signals.needs_reset.store(true, Ordering::SeqCst);
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        for k in &self.kicks {
            let _ = k.read();
        }
        self.signals.needs_reset.store(false, Ordering::SeqCst);
        self.signals.isr.store(0, Ordering::SeqCst);
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.config_vector = NO_VECTOR;
        self.status = 0;
    }

    /// Keeps the notify ioeventfds where BAR 0 is decoded now.
    fn sync_ioevents(&mut self) {
        let want = self.config.decoded_bars().first().map(|&(_, addr, _)| addr);
        if want == self.registered_at {
            return;
        }
        if let Some(old) = self.registered_at.take() {
            for (i, k) in self.kicks.iter().enumerate() {
                let _ = self
                    .ioevents
                    .unregister(old + NOTIFY + i as u64 * u64::from(NOTIFY_MULTIPLIER), k);
            }
        }
        if let Some(base) = want {
            for (i, k) in self.kicks.iter().enumerate() {
                let addr = base + NOTIFY + i as u64 * u64::from(NOTIFY_MULTIPLIER);
                if let Err(e) = self.ioevents.register(addr, k) {
                    // Notifications still work through MMIO exits, slower.
                    tracing::warn!("{}: cannot register ioeventfd at {addr:#x}: {e}", self.name);
                }
            }
            self.registered_at = Some(base);
        }
    }
}

fn build_queue(regs: &QueueRegs, event_idx: bool, mem: &Memory) -> Result<Queue, String> {
    let mut q = Queue::new(regs.max_size).map_err(|e| format!("{e:?}"))?;
    q.try_set_size(regs.size)
        .map_err(|_| format!("invalid size {} (max {})", regs.size, regs.max_size))?;
    q.try_set_desc_table_address(GuestAddress(regs.desc))
        .map_err(|_| "misaligned descriptor table".to_string())?;
    q.try_set_avail_ring_address(GuestAddress(regs.driver))
        .map_err(|_| "misaligned driver area".to_string())?;
    q.try_set_used_ring_address(GuestAddress(regs.device))
        .map_err(|_| "misaligned device area".to_string())?;
    q.set_event_idx(event_idx);
    q.set_ready(true);
    if !q.is_valid(&**mem) {
        return Err("rings outside guest memory".into());
    }
    Ok(q)
}

fn add_virtio_cap(
    config: &mut ConfigSpace,
    cfg_type: u8,
    offset: u64,
    length: u64,
    multiplier: Option<u32>,
) {
    // struct virtio_pci_cap after cap_vndr/cap_next: cap_len, cfg_type,
    // bar, id, padding[2], offset, length (+ notify_off_multiplier).
    let len = if multiplier.is_some() { 20u8 } else { 16 };
    let mut body = vec![len, cfg_type, 0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(m) = multiplier {
        body.extend_from_slice(&m.to_le_bytes());
    }
    config.add_capability(0x09, &body, &[]);
}

/// PCI class codes for each device type (what `lspci` shows).
fn class_code(device_type: u32) -> u32 {
    match device_type {
        super::device_type::NET => 0x02_00_00,
        super::device_type::BLOCK => 0x01_80_00,
        super::device_type::CONSOLE => 0x07_80_00,
        _ => 0x00_ff_00,
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
        // The live MSI-X message control word.
        let ctl = self.msix_cap + 2;
        if offset < ctl + 2 && ctl < offset + data.len() {
            let word = self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .message_control()
                .to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                if let Some(k) = (offset + i).checked_sub(ctl).filter(|k| *k < 2) {
                    *b = word[k];
                }
            }
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let ctl = self.msix_cap + 2;
        if offset < ctl + 2 && ctl < offset + data.len() {
            let word = self.config.u16_at(ctl);
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_message_control(word);
        }
        self.sync_ioevents();
    }

    fn decoded_bars(&self) -> Vec<(u8, u64, u64)> {
        self.config.decoded_bars()
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON + COMMON_LEN => self.read_common(o - COMMON, data),
            ISR => {
                // Reading clears it (virtio 1.2, 4.1.4.5).
                if let Some(b) = data.first_mut() {
                    *b = self.signals.isr.swap(0, Ordering::SeqCst);
                }
            }
            o if (DEVICE_CONFIG..DEVICE_CONFIG + DEVICE_CONFIG_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CONFIG, data)
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_table(o - MSIX_TABLE, data),
            o if (MSIX_PBA..BAR_SIZE).contains(&o) => self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_pba(o - MSIX_PBA, data),
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON + COMMON_LEN => self.write_common(o - COMMON, data),
            o if (DEVICE_CONFIG..DEVICE_CONFIG + DEVICE_CONFIG_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CONFIG, data)
            }
            o if (NOTIFY..MSIX_TABLE).contains(&o) => {
                let queue = ((o - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(k) = self.kicks.get(queue) {
                    let _ = k.write(1);
                }
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_table(o - MSIX_TABLE, data),
            _ => {}
        }
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
        }
    }
}

#[cfg(test)]
mod tests;
