//! The ACPI Generic Event Device (GED, `ACPI0013`): one 32-bit register of
//! pending event bits, and an interrupt. The host sets a bit and pulses the
//! interrupt; the guest's `_EVT` method (in the DSDT, see
//! `kiln_firmware::acpi`) reads the register, which acknowledges the bits it
//! returned, and notifies the device each bit stands for. The power button
//! is the only event so far.
//!
//! Every guest access is answered: a read that starts at the register
//! returns (and clears) the pending bits it covers, anything else reads 0;
//! writes are ignored.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::MmioDevice;

/// State the device model and its host-side handles share.
struct Events {
    pending: AtomicU32,
    /// An irqfd: each write is one edge on the GED's (edge-triggered) line.
    irq: EventFd,
    power_button: u32,
}

/// The register block, on the MMIO bus at `base`.
pub struct GenericEventDevice {
    base: u64,
    events: Arc<Events>,
}

/// The host's side: raises events while the guest runs.
#[derive(Clone)]
pub struct GedControl {
    events: Arc<Events>,
}

impl GenericEventDevice {
    /// The register at `base` (absolute, as the MMIO bus passes addresses),
    /// raising `irq`; `power_button` is the event bit the DSDT's `_EVT`
    /// treats as a power button press.
    pub fn new(base: u64, irq: EventFd, power_button: u32) -> Self {
        GenericEventDevice {
            base,
            events: Arc::new(Events {
                pending: AtomicU32::new(0),
                irq,
                power_button,
            }),
        }
    }

    pub fn control(&self) -> GedControl {
        GedControl {
            events: self.events.clone(),
        }
    }
}

impl GedControl {
    /// Marks a power button press pending and interrupts the guest. Presses
    /// before the guest reads the register merge into one, as on hardware.
    pub fn press_power_button(&self) -> io::Result<()> {
        self.events
            .pending
            .fetch_or(self.events.power_button, Ordering::SeqCst);
        self.events.irq.write(1)
    }
}

impl MmioDevice for GenericEventDevice {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        data.fill(0);
        if addr != self.base || data.is_empty() {
            return;
        }
        // Only the bits this read returns are acknowledged, so a narrow
        // read never loses an event it did not show.
        let mask = match data.len() {
            n if n >= 4 => u32::MAX,
            n => (1u32 << (8 * n)) - 1,
        };
        let taken = self.events.pending.fetch_and(!mask, Ordering::SeqCst) & mask;
        for (byte, value) in data.iter_mut().zip(taken.to_le_bytes()) {
            *byte = value;
        }
    }

    fn write(&mut self, addr: u64, data: &[u8]) {
        tracing::debug!(
            "guest wrote {} byte(s) to the read-only GED register at {addr:#x}",
            data.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0xfeb0_0000;
    const POWER: u32 = 1;

    fn ged() -> (GenericEventDevice, GedControl, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = GenericEventDevice::new(BASE, irq.try_clone().unwrap(), POWER);
        let control = dev.control();
        (dev, control, irq)
    }

    fn read(dev: &mut GenericEventDevice, addr: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0xaa; len];
        dev.read(addr, &mut data);
        data
    }

    #[test]
    fn press_raises_the_interrupt_and_one_read_acknowledges_it() {
        let (mut dev, control, irq) = ged();
        assert!(irq.read().is_err(), "no interrupt before a press");
        assert_eq!(read(&mut dev, BASE, 4), [0, 0, 0, 0]);

        control.press_power_button().unwrap();
        assert_eq!(irq.read().unwrap(), 1, "one edge per press");
        assert_eq!(read(&mut dev, BASE, 4), [1, 0, 0, 0]);
        assert_eq!(
            read(&mut dev, BASE, 4),
            [0, 0, 0, 0],
            "reading acknowledged it"
        );
    }

    #[test]
    fn presses_before_the_read_merge_and_each_pulses_the_line() {
        let (mut dev, control, irq) = ged();
        control.press_power_button().unwrap();
        control.clone().press_power_button().unwrap();
        assert_eq!(irq.read().unwrap(), 2);
        assert_eq!(read(&mut dev, BASE, 4), [1, 0, 0, 0]);
        assert_eq!(read(&mut dev, BASE, 4), [0, 0, 0, 0]);
    }

    #[test]
    fn reads_elsewhere_answer_zero_without_acknowledging() {
        let (mut dev, control, _irq) = ged();
        control.press_power_button().unwrap();
        for (addr, len) in [
            (BASE + 1, 1),
            (BASE + 2, 2),
            (BASE + 3, 8),
            (BASE + 0xfff, 4),
        ] {
            assert_eq!(read(&mut dev, addr, len), vec![0; len], "{addr:#x}+{len}");
        }
        // An address below the base (a bus bug or a wrap) is just another
        // offset, never a panic.
        assert_eq!(read(&mut dev, 0, 4), [0; 4]);
        assert_eq!(read(&mut dev, u64::MAX, 1), [0]);
        assert_eq!(read(&mut dev, BASE, 0), Vec::<u8>::new());
        assert_eq!(read(&mut dev, BASE, 4), [1, 0, 0, 0], "still pending");
    }

    #[test]
    fn every_width_at_the_register_reads_the_pending_bits_it_covers() {
        let (mut dev, control, _irq) = ged();
        control.press_power_button().unwrap();
        assert_eq!(read(&mut dev, BASE, 1), [1]);
        control.press_power_button().unwrap();
        assert_eq!(read(&mut dev, BASE, 2), [1, 0]);
        control.press_power_button().unwrap();
        assert_eq!(read(&mut dev, BASE, 8), [1, 0, 0, 0, 0, 0, 0, 0]);
        control.press_power_button().unwrap();
        assert_eq!(read(&mut dev, BASE, 64), {
            let mut v = vec![0; 64];
            v[0] = 1;
            v
        });
        assert_eq!(read(&mut dev, BASE, 4), [0; 4]);
    }

    #[test]
    fn a_narrow_read_leaves_higher_bits_pending() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = GenericEventDevice::new(BASE, irq, 1 << 9);
        dev.control().press_power_button().unwrap();
        assert_eq!(read(&mut dev, BASE, 1), [0], "bit 9 is not in byte 0");
        assert_eq!(read(&mut dev, BASE, 2), [0, 2]);
        assert_eq!(read(&mut dev, BASE, 2), [0, 0]);
    }

    /// The whole space a vCPU can produce around the register (KVM MMIO
    /// exits carry 1 to 8 bytes): every offset and width, read and write,
    /// interleaved with presses. Nothing panics, and the press is seen by
    /// exactly the reads that start at the register.
    #[test]
    fn every_offset_and_width_is_answered() {
        let (mut dev, control, _irq) = ged();
        for offset in 0..16u64 {
            for len in 0..=8usize {
                control.press_power_button().unwrap();
                dev.write(BASE + offset, &vec![0xff; len]);
                let got = read(&mut dev, BASE + offset, len);
                let mut want = vec![0; len];
                if offset == 0 && len > 0 {
                    want[0] = 1;
                }
                assert_eq!(got, want, "offset {offset} width {len}");
                read(&mut dev, BASE, 4);
            }
        }
    }

    #[test]
    fn writes_change_nothing() {
        let (mut dev, control, _irq) = ged();
        control.press_power_button().unwrap();
        for (addr, data) in [
            (BASE, &[0u8; 4][..]),
            (BASE, &[0xff; 8][..]),
            (BASE + 1, &[1][..]),
            (u64::MAX, &[][..]),
        ] {
            dev.write(addr, data);
        }
        assert_eq!(read(&mut dev, BASE, 4), [1, 0, 0, 0]);
    }
}
