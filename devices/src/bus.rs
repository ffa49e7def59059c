//! The port I/O bus: maps port ranges to devices.

use std::sync::{Arc, Mutex};

/// A device reachable through x86 port I/O.
pub trait PioDevice: Send {
    /// Fills `data` with the value read at `offset` from the device's base.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Handles a write of `data` at `offset` from the device's base.
    fn write(&mut self, offset: u16, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("port range {base:#x}+{len} overlaps an existing device")]
    Overlap { base: u16, len: u16 },
    #[error("port range {base:#x}+{len} is empty or wraps past 0xffff")]
    BadRange { base: u16, len: u16 },
}

struct Range {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

/// Port I/O bus. Built once while the VM is assembled, then shared
/// read-only by the vCPU threads.
#[derive(Default)]
pub struct PioBus {
    ranges: Vec<Range>, // sorted by base, non-overlapping
}

impl PioBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `len` ports starting at `base` to `device`.
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), BusError> {
        let end = u32::from(base) + u32::from(len);
        if len == 0 || end > 0x1_0000 {
            return Err(BusError::BadRange { base, len });
        }
        let overlaps = self.ranges.iter().any(|r| {
            let r_end = u32::from(r.base) + u32::from(r.len);
            u32::from(base) < r_end && u32::from(r.base) < end
        });
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<&Range> {
        let idx = self
            .ranges
            .partition_point(|r| r.base <= port)
            .checked_sub(1)?;
        let r = &self.ranges[idx];
        (port - r.base < r.len).then_some(r)
    }

    /// Reads from `port`. Unclaimed ports read as all-ones, as on real
    /// hardware with nothing driving the bus. Returns whether a device
    /// answered.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some(r) => {
                lock(&r.device).read(port - r.base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to `port`; writes to unclaimed ports are dropped.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
            Some(r) => {
                lock(&r.device).write(port - r.base, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device even if another vCPU thread panicked while holding it:
/// device state stays usable, and a panic is already reported elsewhere.
fn lock(device: &Mutex<dyn PioDevice>) -> std::sync::MutexGuard<'_, dyn PioDevice + 'static> {
    match device.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Scratch {
        last_write: Vec<(u16, Vec<u8>)>,
    }

    impl PioDevice for Scratch {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.last_write.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_offset_within_range() {
        let dev = Arc::new(Mutex::new(Scratch::default()));
        let mut bus = PioBus::new();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(dev.lock().unwrap().last_write, vec![(0, vec![0x41])]);
    }

    #[test]
    fn unclaimed_ports_float_high() {
        let bus = PioBus::new();
        let mut b = [0u8; 4];
        assert!(!bus.read(0xcf8, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.write(0x80, &[1]));
    }

    #[test]
    fn rejects_overlaps_and_wrapping_ranges() {
        let dev = Arc::new(Mutex::new(Scratch::default()));
        let mut bus = PioBus::new();
        bus.insert(0x60, 5, dev.clone()).unwrap();
        assert_eq!(
            bus.insert(0x64, 2, dev.clone()),
            Err(BusError::Overlap { base: 0x64, len: 2 })
        );
        assert_eq!(
            bus.insert(0xfff0, 0x20, dev.clone()),
            Err(BusError::BadRange {
                base: 0xfff0,
                len: 0x20
            })
        );
        assert_eq!(
            bus.insert(0x10, 0, dev.clone()),
            Err(BusError::BadRange { base: 0x10, len: 0 })
        );
        bus.insert(0x65, 1, dev).unwrap();
        let mut b = [0u8; 1];
        assert!(!bus.read(0x5f, &mut b));
        assert!(bus.read(0x65, &mut b));
        assert!(!bus.read(0x66, &mut b));
    }
}
