//! Fuzz entry points for what the guest programs over PCI: the virtio-pci
//! transport (BAR 0 registers, MSI-X table, configuration space) and the
//! root bus (0xCF8/0xCFC, ECAM, BAR dispatch). The fuzz bytes are decoded
//! into a sequence of guest accesses with the widths KVM can deliver
//! (port I/O 1, 2 or 4 bytes; MMIO 1 to 8 bytes). Nothing here may panic;
//! the ioeventfd registrar also checks that registrations stay balanced.

use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::pci::{IoEventRegistrar, VirtioPciDevice, BAR_SIZE};
use super::{
    device_type, features, read_config_bytes, ActivateError, DeviceContext, Interrupt, Memory,
    VirtioDevice,
};
use crate::bus::PioDevice;
use crate::mmio::MmioDevice;
use crate::pci::config::{COMMAND, COMMAND_MEMORY};
use crate::pci::msix::{MsiMessage, MsiRouting, MsiVector};
use crate::pci::{PciDevice, PciRoot, ECAM_BUS_SIZE};

const MEM_SIZE: usize = 0x1_0000;
const BAR_ADDR: u32 = 0xc000_0000;
const ECAM_BASE: u64 = 0xe000_0000;
const WINDOW: (u64, u64) = (0xc000_0000, 0x1000_0000);
/// Enough accesses to negotiate, set up queues and poke around after.
const MAX_OPS: usize = 512;

/// Pulls little-endian fields off the fuzz bytes; `None` once they run out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[b]| b)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    /// An MMIO access width, 1..=8 bytes.
    fn mmio_len(&mut self) -> Option<usize> {
        self.u8().map(|b| 1 + usize::from(b % 8))
    }
}

/// MSI routing without KVM: every vector gets a plain eventfd.
struct Routing;

impl MsiRouting for Routing {
    fn allocate_vector(&self) -> io::Result<MsiVector> {
        Ok(MsiVector {
            gsi: 24,
            irqfd: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }
    fn set_route(&self, _gsi: u32, _message: Option<MsiMessage>) -> io::Result<()> {
        Ok(())
    }
}

/// Tracks ioeventfd addresses as KVM would: registering one twice or
/// removing one that is not there fails in KVM, so it is a transport bug.
#[derive(Default)]
struct IoEvents(Mutex<BTreeSet<u64>>);

impl IoEventRegistrar for IoEvents {
    fn register(&self, addr: u64, _fd: &EventFd) -> io::Result<()> {
        let fresh = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr);
        assert!(fresh, "ioeventfd at {addr:#x} registered twice");
        Ok(())
    }
    fn unregister(&self, addr: u64, _fd: &EventFd) -> io::Result<()> {
        let known = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&addr);
        assert!(
            known,
            "ioeventfd at {addr:#x} unregistered but never registered"
        );
        Ok(())
    }
}

/// What the device keeps from its activation, so the fuzzer can make it
/// raise interrupts through the transport.
type Activation = Arc<Mutex<Option<Arc<dyn Interrupt>>>>;

/// A device with two queues and a small writable config space, that
/// drains whatever chains the transport's queues hold on activation: a
/// queue the transport accepted must be safe for a device to use.
struct FuzzDevice {
    config: [u8; 16],
    activation: Activation,
}

impl VirtioDevice for FuzzDevice {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }
    fn name(&self) -> &str {
        "fuzz0"
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256, 16]
    }
    fn features(&self) -> u64 {
        features::RING_EVENT_IDX | features::RING_INDIRECT_DESC | 1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            if let Some(slot) = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config.get_mut(o))
            {
                *slot = b;
            }
        }
    }
    fn activate(&mut self, mut ctx: DeviceContext) -> Result<(), ActivateError> {
        use virtio_queue::QueueT;
        for q in &mut ctx.queues {
            for _ in 0..4 {
                let Some(chain) = q.queue.pop_descriptor_chain(&*ctx.mem) else {
                    break;
                };
                let head = chain.head_index();
                let len = chain.count() as u32;
                let _ = q.queue.add_used(&*ctx.mem, head, len);
            }
            let _ = q.queue.needs_notification(&*ctx.mem);
        }
        *self.activation.lock().unwrap_or_else(|e| e.into_inner()) = Some(ctx.interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        *self.activation.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

fn transport_device(bar_addr: u32) -> Option<(VirtioPciDevice, Memory, Activation)> {
    let mem: Memory = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?);
    let activation = Activation::default();
    let device = FuzzDevice {
        config: [0; 16],
        activation: activation.clone(),
    };
    let dev = VirtioPciDevice::new(
        Box::new(device),
        mem.clone(),
        bar_addr,
        Arc::new(Routing),
        Arc::new(IoEvents::default()),
    )
    .ok()?;
    Some((dev, mem, activation))
}

/// Common configuration registers at their architectural widths, so the
/// fuzzer reaches feature negotiation and queue set-up quickly.
const COMMON_REGS: [(u64, usize); 22] = [
    (0x00, 4),
    (0x04, 4),
    (0x08, 4),
    (0x0c, 4),
    (0x10, 2),
    (0x12, 2),
    (0x14, 1),
    (0x15, 1),
    (0x16, 2),
    (0x18, 2),
    (0x1a, 2),
    (0x1c, 2),
    (0x1e, 2),
    (0x20, 8),
    (0x20, 4),
    (0x24, 4),
    (0x28, 8),
    (0x28, 4),
    (0x2c, 4),
    (0x30, 8),
    (0x30, 4),
    (0x34, 4),
];

/// `data` as guest accesses to one virtio-pci function (BAR 0, the MSI-X
/// table and PBA, configuration space), plus guest memory writes (so
/// queues can hold chains when the driver sets DRIVER_OK) and device
/// interrupts (so MSI-X masking and pending bits are exercised).
pub fn transport(data: &[u8]) {
    let _ = drive_transport(data);
}

/// Runs [`transport`]'s accesses; returns the function and what its device
/// kept from its activation (for tests: dropping the function resets it).
fn drive_transport(data: &[u8]) -> Option<(VirtioPciDevice, Activation)> {
    let (mut dev, mem, activation) = transport_device(BAR_ADDR)?;
    let mut input = Input(data);
    for _ in 0..MAX_OPS {
        if transport_op(&mut dev, &mem, &activation, &mut input).is_none() {
            break;
        }
    }
    Some((dev, activation))
}

fn transport_op(
    dev: &mut VirtioPciDevice,
    mem: &Memory,
    activation: &Activation,
    input: &mut Input,
) -> Option<()> {
    let mut buf = [0u8; 8];
    match input.u8()? % 10 {
        0 => {
            let (bar, offset, len) = (input.u8()? % 2, u64::from(input.u16()?), input.mmio_len()?);
            dev.bar_read(bar, offset, &mut buf[..len]);
        }
        1 => {
            let (bar, offset, len) = (input.u8()? % 2, u64::from(input.u16()?), input.mmio_len()?);
            dev.bar_write(bar, offset, &input.u64()?.to_le_bytes()[..len]);
        }
        2 => {
            let (offset, len) = (usize::from(input.u16()? % 0x1000), input.mmio_len()?);
            dev.config_read(offset, &mut buf[..len]);
        }
        3 => {
            let (offset, len) = (usize::from(input.u16()? % 0x1000), input.mmio_len()?);
            dev.config_write(offset, &input.u64()?.to_le_bytes()[..len]);
        }
        4 => {
            let (offset, len) = COMMON_REGS[usize::from(input.u8()?) % COMMON_REGS.len()];
            dev.bar_write(0, offset, &input.u64()?.to_le_bytes()[..len]);
        }
        5 => {
            // What a driver does up to FEATURES_OK, with fuzzed features.
            let features = input.u64()? | features::VERSION_1;
            dev.bar_write(0, 0x14, &[3]);
            dev.bar_write(0, 0x08, &0u32.to_le_bytes());
            dev.bar_write(0, 0x0c, &(features as u32).to_le_bytes());
            dev.bar_write(0, 0x08, &1u32.to_le_bytes());
            dev.bar_write(0, 0x0c, &((features >> 32) as u32).to_le_bytes());
            dev.bar_write(0, 0x14, &[0xb]);
        }
        6 => {
            // MSI-X table entry (16 bytes each) or MSI-X capability control.
            let (entry, field) = (u64::from(input.u8()? % 4), u64::from(input.u8()? % 4));
            dev.bar_write(
                0,
                0x4000 + entry * 16 + field * 4,
                &input.u32()?.to_le_bytes(),
            );
        }
        7 => {
            let command = COMMAND_MEMORY | u16::from(input.u8()?);
            dev.config_write(COMMAND, &command.to_le_bytes());
        }
        8 => {
            let addr = u64::from(input.u16()?);
            let _ = mem.write_slice(&input.u64()?.to_le_bytes(), GuestAddress(addr));
        }
        _ => {
            let what = input.u8()?;
            let interrupt = activation.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(interrupt) = interrupt {
                match what % 4 {
                    0 | 1 => interrupt.signal_queue(u16::from(what >> 2)),
                    2 => interrupt.signal_config(),
                    _ => interrupt.set_needs_reset(),
                }
            }
        }
    }
    Some(())
}

/// `data` as guest accesses to the root bus holding one virtio-pci
/// function: CONFIG_ADDRESS/CONFIG_DATA port I/O, ECAM and BAR MMIO
/// anywhere around the windows (the BAR can be moved by the guest).
pub fn root(data: &[u8]) {
    let mut root = PciRoot::new(ECAM_BASE, WINDOW.0, WINDOW.1);
    let Ok(bar) = root.allocate_bar(BAR_SIZE) else {
        return;
    };
    let Ok(bar) = u32::try_from(bar) else { return };
    let Some((dev, _mem, _activation)) = transport_device(bar) else {
        return;
    };
    if root.add_device(Box::new(dev)).is_err() {
        return;
    }
    let mut input = Input(data);
    for _ in 0..MAX_OPS {
        if root_op(&mut root, &mut input).is_none() {
            break;
        }
    }
}

fn root_op(root: &mut PciRoot, input: &mut Input) -> Option<()> {
    let mut buf = [0u8; 8];
    let kind = input.u8()?;
    match kind % 6 {
        0 | 1 => {
            let port = u16::from(input.u8()? % 8);
            let len = [1, 2, 4][usize::from(input.u8()? % 3)];
            if kind % 6 == 0 {
                PioDevice::read(root, port, &mut buf[..len]);
            } else {
                PioDevice::write(root, port, &input.u32()?.to_le_bytes()[..len]);
            }
        }
        2 => {
            // CONFIG_ADDRESS for one of the first slots, enabled.
            let (slot, reg) = (u32::from(input.u8()? % 4), u32::from(input.u8()?));
            PioDevice::write(root, 0, &(0x8000_0000 | slot << 11 | reg).to_le_bytes());
        }
        3 | 4 => {
            let addr = match input.u8()? % 3 {
                0 => ECAM_BASE + u64::from(input.u32()?) % (2 * ECAM_BUS_SIZE),
                1 => WINDOW.0 + u64::from(input.u32()?) % (2 * BAR_SIZE),
                _ => input.u64()?,
            };
            let len = input.mmio_len()?;
            if kind % 6 == 3 {
                MmioDevice::read(root, addr, &mut buf[..len]);
            } else {
                MmioDevice::write(root, addr, &input.u64()?.to_le_bytes()[..len]);
            }
        }
        _ => {
            // Memory decoding on for slot 1 (the virtio function) via ECAM.
            let value = COMMAND_MEMORY | u16::from(input.u8()?);
            MmioDevice::write(
                root,
                ECAM_BASE + (1 << 15) + COMMAND as u64,
                &value.to_le_bytes(),
            );
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_entry_points_survive_a_driver_like_sequence() {
        // negotiate, memory decoding on, queue 0 at 0x1000/0x2000/0x3000
        // enabled, DRIVER_OK, then a queue interrupt.
        let mut ops = vec![5u8];
        ops.extend_from_slice(&0u64.to_le_bytes());
        ops.extend_from_slice(&[7, 0]);
        for (reg, value) in [
            (8u8, 0u64),
            (9, 16),
            (13, 0x1000),
            (16, 0x2000),
            (19, 0x3000),
            (11, 1),
            (6, 0xf),
        ] {
            ops.push(4);
            ops.push(reg);
            ops.extend_from_slice(&value.to_le_bytes());
        }
        ops.extend_from_slice(&[9, 0]);
        let (_dev, activation) = drive_transport(&ops).unwrap();
        assert!(
            activation.lock().unwrap().is_some(),
            "the decoded driver sequence activates the device"
        );
        root(&ops);
        transport(&[]);
        root(&[0xff; 64]);
    }
}
