//! The MMIO bus: maps guest-physical address ranges to devices. Devices see
//! absolute addresses, so one device (the PCI root) can serve a range that
//! holds both its configuration window (ECAM) and its devices' BARs.

use std::sync::{Arc, Mutex};

/// A device reachable through MMIO exits.
pub trait MmioDevice: Send {
    fn read(&mut self, addr: u64, data: &mut [u8]);
    fn write(&mut self, addr: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MmioBusError {
    #[error("MMIO range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("MMIO range {base:#x}+{len:#x} is empty or wraps")]
    BadRange { base: u64, len: u64 },
}

struct Range {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn MmioDevice>>,
}

/// Built while the VM is assembled, then shared read-only by the vCPUs.
#[derive(Default)]
pub struct MmioBus {
    ranges: Vec<Range>, // sorted by base, non-overlapping
}

impl MmioBus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn MmioDevice>>,
    ) -> Result<(), MmioBusError> {
        let Some(end) = base.checked_add(len).filter(|_| len > 0) else {
            return Err(MmioBusError::BadRange { base, len });
        };
        if self
            .ranges
            .iter()
            .any(|r| base < r.base + r.len && r.base < end)
        {
            return Err(MmioBusError::Overlap { base, len });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<&Range> {
        let idx = self
            .ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        let r = &self.ranges[idx];
        (addr - r.base < r.len).then_some(r)
    }

    /// Reads at `addr`; unclaimed addresses read as all-ones. Returns
    /// whether a device answered.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some(r) => {
                r.device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(addr, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes at `addr`; writes to unclaimed addresses are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some(r) => {
                r.device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(addr, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl MmioDevice for Echo {
        fn read(&mut self, addr: u64, data: &mut [u8]) {
            data.fill(addr as u8);
        }
        fn write(&mut self, addr: u64, data: &[u8]) {
            self.0.push((addr, data.to_vec()));
        }
    }

    #[test]
    fn routes_absolute_addresses_and_floats_high_elsewhere() {
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut bus = MmioBus::new();
        bus.insert(0x1000, 0x100, dev.clone()).unwrap();
        let mut b = [0u8; 2];
        assert!(bus.read(0x1010, &mut b));
        assert_eq!(b, [0x10, 0x10]);
        assert!(!bus.read(0x1100, &mut b));
        assert_eq!(b, [0xff, 0xff]);
        assert!(bus.write(0x10ff, &[1]));
        assert_eq!(dev.lock().unwrap().0, vec![(0x10ff, vec![1])]);
        assert_eq!(
            bus.insert(0x10f0, 0x20, dev.clone()),
            Err(MmioBusError::Overlap {
                base: 0x10f0,
                len: 0x20
            })
        );
        assert_eq!(
            bus.insert(u64::MAX, 2, dev),
            Err(MmioBusError::BadRange {
                base: u64::MAX,
                len: 2
            })
        );
    }
}
