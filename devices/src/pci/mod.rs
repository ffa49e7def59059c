//! PCI: one root bus (bus 0) behind a host bridge, reached through the
//! legacy configuration ports (0xCF8/0xCFC) and through ECAM, with devices'
//! memory BARs dispatched from MMIO exits.

pub mod config;
pub mod msix;

use crate::bus::PioDevice;
use crate::mmio::MmioDevice;

/// A function on the root bus.
pub trait PciDevice: Send {
    /// Reads `data.len()` bytes of configuration space at `offset`
    /// (0..4096; beyond the standard 256 bytes reads as zeros).
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// Memory BARs the device decodes now: (index, address, size).
    fn decoded_bars(&self) -> Vec<(u8, u64, u64)>;
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);
}

/// Slots on bus 0 (device numbers 0..32, function 0 only).
pub const SLOTS: usize = 32;
/// ECAM bytes per bus: 32 devices x 8 functions x 4 KiB.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("no free PCI slot left on bus 0")]
    NoSlot,
    #[error("no room left for a {size:#x}-byte BAR in the PCI MMIO window")]
    NoBarSpace { size: u64 },
}

/// The root bus: host bridge at 00.0, devices in the following slots, the
/// configuration mechanisms, and BAR address allocation in the MMIO window.
pub struct PciRoot {
    slots: Vec<Option<Box<dyn PciDevice>>>,
    /// Last value written to 0xCF8.
    config_address: u32,
    ecam_base: u64,
    bar_window: vm_allocator::AddressAllocator,
}

impl PciRoot {
    /// A root bus whose ECAM lives at `ecam_base` and whose BARs are
    /// allocated from `[window_start, window_start + window_size)`.
    pub fn new(ecam_base: u64, window_start: u64, window_size: u64) -> Self {
        let mut slots: Vec<Option<Box<dyn PciDevice>>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Box::new(HostBridge::new()));
        PciRoot {
            slots,
            config_address: 0,
            ecam_base,
            bar_window: vm_allocator::AddressAllocator::new(window_start, window_size)
                .expect("the PCI window is a valid, non-empty range"),
        }
    }

    /// Reserves an address for a BAR of `size` bytes (aligned to its size,
    /// as PCI requires).
    pub fn allocate_bar(&mut self, size: u64) -> Result<u64, PciError> {
        self.bar_window
            .allocate(size, size, vm_allocator::AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(|_| PciError::NoBarSpace { size })
    }

    /// Puts `device` in the next free slot and returns its device number.
    pub fn add_device(&mut self, device: Box<dyn PciDevice>) -> Result<u8, PciError> {
        let slot = self
            .slots
            .iter()
            .position(|s| s.is_none())
            .ok_or(PciError::NoSlot)?;
        self.slots[slot] = Some(device);
        Ok(slot as u8)
    }

    /// The next slot `add_device` will use.
    pub fn next_slot(&self) -> Option<u8> {
        self.slots.iter().position(|s| s.is_none()).map(|s| s as u8)
    }

    fn function(&mut self, bus: u8, device: u8, function: u8) -> Option<&mut Box<dyn PciDevice>> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get_mut(device as usize)?.as_mut()
    }

    fn config_read(&mut self, bus: u8, device: u8, function: u8, offset: usize, data: &mut [u8]) {
        match self.function(bus, device, function) {
            Some(dev) => dev.config_read(offset, data),
            // No function: vendor ID 0xffff tells the OS the slot is empty.
            None => data.fill(0xff),
        }
    }

    fn config_write(&mut self, bus: u8, device: u8, function: u8, offset: usize, data: &[u8]) {
        if let Some(dev) = self.function(bus, device, function) {
            dev.config_write(offset, data);
        }
    }

    /// Decodes an ECAM address into (bus, device, function, register).
    fn ecam_decode(&self, addr: u64) -> Option<(u8, u8, u8, usize)> {
        let off = addr.checked_sub(self.ecam_base)?;
        if off >= ECAM_BUS_SIZE {
            return None;
        }
        Some((
            (off >> 20) as u8,
            ((off >> 15) & 0x1f) as u8,
            ((off >> 12) & 0x7) as u8,
            (off & 0xfff) as usize,
        ))
    }

    fn bar_at(&mut self, addr: u64) -> Option<(&mut Box<dyn PciDevice>, u8, u64)> {
        for dev in self.slots.iter_mut().flatten() {
            let hit = dev
                .decoded_bars()
                .into_iter()
                .find(|&(_, base, size)| addr >= base && addr - base < size);
            if let Some((bar, base, _)) = hit {
                return Some((dev, bar, addr - base));
            }
        }
        None
    }

    fn type1_target(&self, port_offset: u16) -> Option<(u8, u8, u8, usize)> {
        let a = self.config_address;
        if a & (1 << 31) == 0 {
            return None;
        }
        let reg = (a & 0xfc) as usize + usize::from(port_offset - 4);
        Some((
            ((a >> 16) & 0xff) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            reg,
        ))
    }
}

/// Ports 0xCF8..0xCFF: CONFIG_ADDRESS (32-bit) and CONFIG_DATA.
impl PioDevice for PciRoot {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.config_address.to_le_bytes()),
            4..=7 => match self.type1_target(offset) {
                Some((b, d, f, reg)) => self.config_read(b, d, f, reg, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.config_address = u32::from_le_bytes(data.try_into().unwrap_or([0; 4]));
            }
            4..=7 => {
                if let Some((b, d, f, reg)) = self.type1_target(offset) {
                    self.config_write(b, d, f, reg, data);
                }
            }
            _ => {}
        }
    }
}

/// ECAM and device BARs, by absolute guest address.
impl MmioDevice for PciRoot {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        if let Some((b, d, f, reg)) = self.ecam_decode(addr) {
            return self.config_read(b, d, f, reg, data);
        }
        match self.bar_at(addr) {
            Some((dev, bar, offset)) => dev.bar_read(bar, offset, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, addr: u64, data: &[u8]) {
        if let Some((b, d, f, reg)) = self.ecam_decode(addr) {
            return self.config_write(b, d, f, reg, data);
        }
        if let Some((dev, bar, offset)) = self.bar_at(addr) {
            dev.bar_write(bar, offset, data);
        }
    }
}

/// The host bridge at 00.0: identity only.
struct HostBridge {
    config: config::ConfigSpace,
}

impl HostBridge {
    fn new() -> Self {
        // Red Hat's PCIe host bridge ID (as QEMU's q35/GPEX use): a class
        // 06/00 function that every OS treats as a plain host bridge.
        HostBridge {
            config: config::ConfigSpace::new(0x1b36, 0x0008, 0x060000, 0, 0x1af4, 0x1100),
        }
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn decoded_bars(&self) -> Vec<(u8, u64, u64)> {
        Vec::new()
    }
    fn bar_read(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const ECAM: u64 = 0xe000_0000;

    struct BarDevice {
        config: config::ConfigSpace,
        last: Option<(u8, u64, Vec<u8>)>,
    }

    impl PciDevice for BarDevice {
        fn config_read(&mut self, offset: usize, data: &mut [u8]) {
            self.config.read(offset, data);
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn decoded_bars(&self) -> Vec<(u8, u64, u64)> {
            self.config.decoded_bars()
        }
        fn bar_read(&mut self, _bar: u8, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
            self.last = Some((bar, offset, data.to_vec()));
        }
    }

    fn root_with_device() -> PciRoot {
        let mut root = PciRoot::new(ECAM, 0xc000_0000, 0x2000_0000);
        let addr = root.allocate_bar(0x1000).unwrap();
        let mut config = config::ConfigSpace::new(0x1af4, 0x1044, 0xff00, 1, 0x1af4, 0x40);
        config.add_memory_bar(0, 0x1000, addr as u32);
        assert_eq!(
            root.add_device(Box::new(BarDevice { config, last: None }))
                .unwrap(),
            1
        );
        root
    }

    fn type1_read32(root: &mut PciRoot, dev: u32, reg: u32) -> u32 {
        PioDevice::write(root, 0, &(0x8000_0000 | dev << 11 | reg).to_le_bytes());
        let mut b = [0u8; 4];
        PioDevice::read(root, 4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn both_config_mechanisms_see_the_same_functions() {
        let mut root = root_with_device();
        assert_eq!(type1_read32(&mut root, 0, 0), 0x0008_1b36);
        assert_eq!(type1_read32(&mut root, 1, 0), 0x1044_1af4);
        assert_eq!(type1_read32(&mut root, 2, 0), 0xffff_ffff, "empty slot");
        let mut b = [0u8; 2];
        MmioDevice::read(&mut root, ECAM + (1 << 15) + 2, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x1044);
        MmioDevice::read(&mut root, ECAM + (1 << 15) + (1 << 12), &mut b);
        assert_eq!(b, [0xff, 0xff], "function 1 does not exist");
    }

    #[test]
    fn bars_are_reached_once_memory_decoding_is_on() {
        let mut root = root_with_device();
        let mut b = [0u8; 1];
        MmioDevice::read(&mut root, 0xc000_0010, &mut b);
        assert_eq!(b, [0xff], "decoding off");
        MmioDevice::write(
            &mut root,
            ECAM + (1 << 15) + config::COMMAND as u64,
            &[config::COMMAND_MEMORY as u8],
        );
        MmioDevice::read(&mut root, 0xc000_0010, &mut b);
        assert_eq!(b, [0x10]);
        // The OS moves the BAR: the old address stops answering.
        MmioDevice::write(
            &mut root,
            ECAM + (1 << 15) + 0x10,
            &0xc010_0000u32.to_le_bytes(),
        );
        MmioDevice::read(&mut root, 0xc000_0010, &mut b);
        assert_eq!(b, [0xff]);
        MmioDevice::write(&mut root, 0xc010_0004, &[7]);
        MmioDevice::read(&mut root, 0xc010_0004, &mut b);
        assert_eq!(b, [4]);
    }

    #[test]
    fn odd_port_accesses_are_harmless() {
        let mut root = root_with_device();
        PioDevice::write(&mut root, 1, &[0xff]);
        PioDevice::write(&mut root, 0, &[0x80, 0, 0]);
        let mut b = [0u8; 1];
        PioDevice::read(&mut root, 2, &mut b);
        assert_eq!(b, [0xff]);
        // Disabled CONFIG_ADDRESS: data reads float.
        PioDevice::write(&mut root, 0, &0u32.to_le_bytes());
        let mut w = [0u8; 4];
        PioDevice::read(&mut root, 4, &mut w);
        assert_eq!(w, [0xff; 4]);
        // Past the 4 KiB config space.
        PioDevice::write(&mut root, 0, &(0x8000_08fcu32).to_le_bytes());
        PioDevice::read(&mut root, 7, &mut b);
    }
}
