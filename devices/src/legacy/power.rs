//! ACPI hardware-reduced sleep control, sleep status and reset registers,
//! at the ports the FADT announces (see `kiln_firmware::layout`).

use std::sync::Arc;

use crate::lifecycle::{ExitReason, VmLifecycle};
use crate::PioDevice;

/// SLP_EN bit and SLP_TYP field of the sleep control register (ACPI 6.5,
/// 4.8.3.7).
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// Three consecutive byte ports: sleep control, sleep status, reset.
pub struct AcpiPowerPorts {
    lifecycle: Arc<VmLifecycle>,
    s5_sleep_type: u8,
    reset_value: u8,
}

impl AcpiPowerPorts {
    pub const LEN: u16 = 3;

    pub fn new(lifecycle: Arc<VmLifecycle>, s5_sleep_type: u8, reset_value: u8) -> Self {
        AcpiPowerPorts {
            lifecycle,
            s5_sleep_type,
            reset_value,
        }
    }
}

impl PioDevice for AcpiPowerPorts {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        // Sleep status reads 0 (never woken); other registers float.
        data.fill(if offset == 1 { 0 } else { 0xff });
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 if value & SLP_EN != 0 => {
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if sleep_type == self.s5_sleep_type {
                    self.lifecycle.request_exit(ExitReason::PowerOff);
                } else {
                    // S1-S4 are not offered in the DSDT; a guest asking for
                    // them gets nothing, as on hardware without them.
                    tracing::debug!("guest requested unsupported sleep type {sleep_type}");
                }
            }
            2 if value == self.reset_value => self.lifecycle.request_exit(ExitReason::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports() -> (AcpiPowerPorts, Arc<VmLifecycle>) {
        let l = Arc::new(VmLifecycle::new().unwrap());
        (AcpiPowerPorts::new(l.clone(), 5, 1), l)
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut p, l) = ports();
        p.write(0, &[5 << 2]); // no SLP_EN
        assert!(!l.is_stopping());
        p.write(0, &[(3 << 2) | SLP_EN]); // S3: not offered
        assert!(!l.is_stopping());
        p.write(0, &[(5 << 2) | SLP_EN]);
        assert_eq!(l.exit_reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn reset_register_resets() {
        let (mut p, l) = ports();
        p.write(2, &[0x7]);
        assert!(!l.is_stopping());
        p.write(2, &[1]);
        assert_eq!(l.exit_reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn status_reads_zero_and_empty_writes_are_ignored() {
        let (mut p, l) = ports();
        let mut b = [0xaa; 2];
        p.read(1, &mut b);
        assert_eq!(b, [0, 0]);
        p.write(0, &[]);
        assert!(!l.is_stopping());
    }
}
