//! A type-0 PCI configuration space: identity registers, the command
//! register, 32-bit memory BARs with sizing, and a capability list.
//!
//! Writes are applied byte by byte through a write mask, so any access
//! width at any offset is safe and read-only registers stay read-only.

/// Standard register offsets.
pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION: usize = 0x08;
pub const CLASS_CODE: usize = 0x09;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;

pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
pub const STATUS_CAPABILITIES: u16 = 1 << 4;

/// Standard configuration space size; the PCIe extended space above it
/// reads as zeros.
pub const CONFIG_SIZE: usize = 256;
/// Extended (ECAM) configuration space size per function.
pub const EXTENDED_CONFIG_SIZE: usize = 4096;
const NUM_BARS: usize = 6;
/// First capability goes here, after the type-0 header.
const FIRST_CAPABILITY: usize = 0x40;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    pub index: u8,
    /// Power of two, at least 16.
    pub size: u64,
}

pub struct ConfigSpace {
    regs: [u8; CONFIG_SIZE],
    writable: [u8; CONFIG_SIZE],
    bars: [Option<Bar>; NUM_BARS],
    next_capability: usize,
    last_capability: Option<usize>,
}

impl ConfigSpace {
    pub fn new(
        vendor: u16,
        device: u16,
        class_code: u32,
        revision: u8,
        subsystem_vendor: u16,
        subsystem: u16,
    ) -> Self {
        let mut c = ConfigSpace {
            regs: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
            bars: [None; NUM_BARS],
            next_capability: FIRST_CAPABILITY,
            last_capability: None,
        };
        c.set_u16(VENDOR_ID, vendor);
        c.set_u16(DEVICE_ID, device);
        c.regs[REVISION] = revision;
        c.regs[CLASS_CODE..CLASS_CODE + 3].copy_from_slice(&class_code.to_le_bytes()[..3]);
        c.set_u16(SUBSYSTEM_VENDOR_ID, subsystem_vendor);
        c.set_u16(SUBSYSTEM_ID, subsystem);
        let cmd_mask = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        c.writable[COMMAND..COMMAND + 2].copy_from_slice(&cmd_mask.to_le_bytes());
        // Interrupt line is scratch space for the OS.
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }

    /// Declares 32-bit memory BAR `index` of `size` bytes (a power of two)
    /// at `addr` (aligned to `size`), as firmware would have assigned it.
    pub fn add_memory_bar(&mut self, index: u8, size: u64, addr: u32) {
        let i = index as usize;
        assert!(i < NUM_BARS && size.is_power_of_two() && (16..=1 << 31).contains(&size));
        assert_eq!(
            u64::from(addr) % size,
            0,
            "BAR address must be aligned to its size"
        );
        self.bars[i] = Some(Bar { index, size });
        self.set_u32(BAR0 + 4 * i, addr);
    }

    /// Appends a capability (its ID first, then the body after the next
    /// pointer byte) and returns its offset. `writable` gives the write mask
    /// of the body bytes (same length as `body`, or empty for read-only).
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> usize {
        let at = self.next_capability;
        let len = 2 + body.len();
        assert!(
            at + len <= CONFIG_SIZE,
            "capabilities overflow the configuration space"
        );
        self.regs[at] = id;
        self.regs[at + 1] = 0;
        self.regs[at + 2..at + len].copy_from_slice(body);
        if !writable.is_empty() {
            self.writable[at + 2..at + len].copy_from_slice(writable);
        }
        match self.last_capability {
            Some(prev) => self.regs[prev + 1] = at as u8,
            None => {
                self.regs[CAPABILITIES_POINTER] = at as u8;
                let status = self.u16_at(STATUS) | STATUS_CAPABILITIES;
                self.set_u16(STATUS, status);
            }
        }
        self.last_capability = Some(at);
        self.next_capability = (at + len + 3) & !3;
        at
    }

    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.regs.get(offset + i).copied().unwrap_or(0);
        }
    }

    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let at = offset + i;
            if at >= CONFIG_SIZE {
                break;
            }
            if let Some(bar) = bar_index(at).and_then(|n| self.bars[n]) {
                self.regs[at] = b;
                let reg = BAR0 + 4 * bar.index as usize;
                // Sizing: the address bits below the size read back as zero.
                let value = self.u32_at(reg) & !(bar.size as u32 - 1);
                self.set_u32(reg, value);
                continue;
            }
            let mask = self.writable[at];
            self.regs[at] = (self.regs[at] & !mask) | (b & mask);
        }
    }

    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    /// BARs the device decodes now (memory decoding on, address set), as
    /// (index, address, size).
    pub fn decoded_bars(&self) -> Vec<(u8, u64, u64)> {
        if self.command() & COMMAND_MEMORY == 0 {
            return Vec::new();
        }
        self.bars
            .iter()
            .flatten()
            .filter_map(|bar| {
                let addr = u64::from(self.u32_at(BAR0 + 4 * bar.index as usize) & !0xf);
                (addr != 0).then_some((bar.index, addr, bar.size))
            })
            .collect()
    }

    pub fn u16_at(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.regs[at], self.regs[at + 1]])
    }

    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.regs[at..at + 4].try_into().unwrap_or([0; 4]))
    }

    /// Sets a register directly (device-side, ignoring the write mask).
    pub fn set_u16(&mut self, at: usize, v: u16) {
        self.regs[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    pub fn set_u32(&mut self, at: usize, v: u32) {
        self.regs[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
}

fn bar_index(at: usize) -> Option<usize> {
    (BAR0..BAR0 + 4 * NUM_BARS)
        .contains(&at)
        .then(|| (at - BAR0) / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        let mut c = ConfigSpace::new(0x1af4, 0x1042, 0x018000, 1, 0x1af4, 0x40);
        c.add_memory_bar(0, 0x4000, 0xc000_0000);
        c
    }

    fn read32(c: &ConfigSpace, at: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(at, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = space();
        c.write(0, &[0xff; 4]);
        assert_eq!(read32(&c, 0), 0x1042_1af4);
        assert_eq!(read32(&c, 8) >> 8, 0x018000);
    }

    #[test]
    fn bar_sizing_reads_back_the_size_and_restores() {
        let mut c = space();
        c.write(BAR0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(read32(&c, BAR0), !(0x4000 - 1));
        c.write(BAR0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(read32(&c, BAR0), 0xd000_0000);
        // Unimplemented BARs stay zero.
        c.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(read32(&c, BAR0 + 4), 0);
    }

    #[test]
    fn bars_decode_only_with_memory_enabled() {
        let mut c = space();
        assert!(c.decoded_bars().is_empty());
        c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(c.decoded_bars(), vec![(0, 0xc000_0000, 0x4000)]);
    }

    #[test]
    fn capabilities_chain_and_odd_accesses_are_safe() {
        let mut c = space();
        let a = c.add_capability(0x09, &[1, 2, 3], &[]);
        let b = c.add_capability(0x11, &[0, 0], &[0xff, 0]);
        assert_eq!(c.regs[CAPABILITIES_POINTER] as usize, a);
        assert_eq!(c.regs[a + 1] as usize, b);
        assert_ne!(c.u16_at(STATUS) & STATUS_CAPABILITIES, 0);
        c.write(b + 2, &[0xab, 0xcd]);
        assert_eq!(c.regs[b + 2..b + 4], [0xab, 0]);
        // Accesses at the very end or beyond never panic.
        let mut big = [0u8; 8];
        c.read(252, &mut big);
        c.write(254, &[1; 8]);
        c.read(5000, &mut big);
        assert_eq!(big, [0; 8]);
    }
}
