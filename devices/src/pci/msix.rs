//! MSI-X: the vector table and pending-bit array a device exposes in a BAR,
//! and delivery through KVM (one GSI with an MSI route and an irqfd per
//! vector). Masking is done here: a masked vector's interrupt is remembered
//! in the PBA and delivered when the guest unmasks it.

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// PCI capability ID of MSI-X.
pub const CAPABILITY_ID: u8 = 0x11;
/// Bytes per table entry: address low/high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

/// An MSI message: where the interrupt write goes and what it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// One vector's path into the guest: a GSI whose route the VMM sets, and
/// the irqfd that raises it.
pub struct MsiVector {
    pub gsi: u32,
    pub irqfd: EventFd,
}

/// The VM's interrupt routing (implemented by the VMM on top of KVM).
pub trait MsiRouting: Send + Sync {
    /// A new GSI with an irqfd registered on it, not yet routed.
    fn allocate_vector(&self) -> io::Result<MsiVector>;
    /// Routes `gsi` to `message`, or removes its route (`None`).
    fn set_route(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()>;
}

#[derive(Clone, Copy, Default)]
struct Entry {
    address_lo: u32,
    address_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.address_hi) << 32 | u64::from(self.address_lo),
            data: self.data,
        }
    }
}

/// A device's MSI-X state. Shared (behind a mutex) between the transport,
/// which the guest programs, and the device's workers, which trigger.
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    vectors: Vec<MsiVector>,
    routing: Arc<dyn MsiRouting>,
    control: u16,
    route_error_logged: bool,
}

impl Msix {
    /// `count` vectors (1..=2048), all masked, MSI-X disabled.
    pub fn new(count: u16, routing: Arc<dyn MsiRouting>) -> io::Result<Msix> {
        let count = count.clamp(1, 2048);
        let vectors = (0..count)
            .map(|_| routing.allocate_vector())
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Msix {
            entries: vec![
                Entry {
                    control: VECTOR_MASKED,
                    ..Default::default()
                };
                count as usize
            ],
            pending: vec![false; count as usize],
            vectors,
            routing,
            control: 0,
            route_error_logged: false,
        })
    }

    pub fn count(&self) -> u16 {
        self.entries.len() as u16
    }

    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    pub fn pba_size(&self) -> u64 {
        self.entries.len().div_ceil(64) as u64 * 8
    }

    /// The capability's message control word (table size, enable, mask).
    pub fn message_control(&self) -> u16 {
        self.control | (self.count() - 1)
    }

    pub fn enabled(&self) -> bool {
        self.control & CONTROL_ENABLE != 0
    }

    /// The guest wrote the message control word.
    pub fn set_message_control(&mut self, value: u16) {
        let was_masked = self.function_masked();
        self.control = value & (CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        if self.enabled() {
            for v in 0..self.entries.len() {
                self.update_route(v);
            }
        }
        if was_masked && !self.function_masked() {
            self.deliver_pending();
        }
    }

    fn function_masked(&self) -> bool {
        !self.enabled() || self.control & CONTROL_FUNCTION_MASK != 0
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(4) {
            return;
        }
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let off = offset + 4 * i as u64;
            let Some(e) = self.entries.get((off / ENTRY_SIZE) as usize) else {
                return;
            };
            let v = match off % ENTRY_SIZE {
                0 => e.address_lo,
                4 => e.address_hi,
                8 => e.data,
                _ => e.control,
            };
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(4) {
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let off = offset + 4 * i as u64;
            let index = (off / ENTRY_SIZE) as usize;
            let Some(e) = self.entries.get_mut(index) else {
                return;
            };
            let v = u32::from_le_bytes(chunk.try_into().unwrap_or([0; 4]));
            let was_masked = e.masked();
            match off % ENTRY_SIZE {
                0 => e.address_lo = v,
                4 => e.address_hi = v,
                8 => e.data = v,
                _ => e.control = v & VECTOR_MASKED,
            }
            let now_masked = e.masked();
            self.update_route(index);
            if was_masked && !now_masked && self.pending[index] && !self.function_masked() {
                self.pending[index] = false;
                self.fire(index);
            }
        }
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let first = (offset as usize + i) * 8;
            *b = (0..8)
                .filter(|bit| self.pending.get(first + bit).copied().unwrap_or(false))
                .fold(0, |acc, bit| acc | 1 << bit);
        }
    }

    /// Raises `vector` (a device event). Returns false if it could not be
    /// delivered now (masked: left pending; out of range or MSI-X off:
    /// dropped).
    pub fn trigger(&mut self, vector: u16) -> bool {
        let v = vector as usize;
        if v >= self.entries.len() || !self.enabled() {
            return false;
        }
        if self.function_masked() || self.entries[v].masked() {
            self.pending[v] = true;
            return false;
        }
        self.fire(v);
        true
    }

    fn fire(&self, v: usize) {
        let _ = self.vectors[v].irqfd.write(1);
    }

    fn deliver_pending(&mut self) {
        for v in 0..self.entries.len() {
            if self.pending[v] && !self.entries[v].masked() {
                self.pending[v] = false;
                self.fire(v);
            }
        }
    }

    fn update_route(&mut self, v: usize) {
        let message = self.enabled().then(|| self.entries[v].message());
        if let Err(e) = self.routing.set_route(self.vectors[v].gsi, message) {
            if !self.route_error_logged {
                tracing::error!(
                    "MSI-X: cannot route vector {v} (GSI {}): {e}",
                    self.vectors[v].gsi
                );
                self.route_error_logged = true;
            }
        }
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records routes; irqfds are plain eventfds the test reads.
    #[derive(Default)]
    pub struct RecordingRouting {
        pub routes: Mutex<std::collections::BTreeMap<u32, Option<MsiMessage>>>,
        next: Mutex<u32>,
        pub irqfds: Mutex<Vec<EventFd>>,
    }

    impl MsiRouting for RecordingRouting {
        fn allocate_vector(&self) -> io::Result<MsiVector> {
            let mut n = self.next.lock().unwrap();
            let gsi = 24 + *n;
            *n += 1;
            let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
            self.irqfds.lock().unwrap().push(irqfd.try_clone()?);
            Ok(MsiVector { gsi, irqfd })
        }
        fn set_route(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()> {
            self.routes.lock().unwrap().insert(gsi, message);
            Ok(())
        }
    }

    fn fired(r: &RecordingRouting, v: usize) -> bool {
        r.irqfds.lock().unwrap()[v].read().is_ok()
    }

    #[test]
    fn masked_vectors_stay_pending_until_unmasked() {
        let routing = Arc::new(RecordingRouting::default());
        let mut m = Msix::new(2, routing.clone()).unwrap();
        assert!(!m.trigger(0), "MSI-X disabled");
        m.set_message_control(CONTROL_ENABLE);
        m.write_table(0, &0xfee0_0000u32.to_le_bytes());
        m.write_table(8, &0x41u32.to_le_bytes());
        assert!(!m.trigger(0), "entry still masked");
        let mut pba = [0u8; 1];
        m.read_pba(0, &mut pba);
        assert_eq!(pba, [1]);
        m.write_table(12, &0u32.to_le_bytes());
        assert!(
            fired(&routing, 0),
            "unmasking delivers the pending interrupt"
        );
        m.read_pba(0, &mut pba);
        assert_eq!(pba, [0]);
        assert!(m.trigger(0));
        assert!(fired(&routing, 0));
        assert_eq!(
            routing.routes.lock().unwrap()[&24],
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            })
        );
    }

    #[test]
    fn function_mask_and_bad_accesses() {
        let routing = Arc::new(RecordingRouting::default());
        let mut m = Msix::new(1, routing.clone()).unwrap();
        m.set_message_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.write_table(12, &0u32.to_le_bytes());
        assert!(!m.trigger(0));
        m.set_message_control(CONTROL_ENABLE);
        assert!(fired(&routing, 0));
        assert!(!m.trigger(5), "no such vector");
        // Odd widths and offsets past the table are ignored.
        m.write_table(2, &[1, 2]);
        m.write_table(4096, &[0; 4]);
        let mut b = [9u8; 4];
        m.read_table(4096, &mut b);
        assert_eq!(b, [0; 4]);
        assert_eq!(m.message_control() & 0x7ff, 0);
    }
}
