//! A 7-byte stand-in for the BIOS at the real-mode reset vector.
//!
//! Linux reboots by jumping to `f000:fff0` when it picks the BIOS method,
//! which it does on ACPI hardware-reduced platforms without EFI (its EFI
//! reboot falls back to BIOS). We have no BIOS, so the stub there pulses
//! the i8042 reset line, which the VMM turns into a reboot.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::I8042_COMMAND_PORT;
use crate::FirmwareError;

/// Physical address of `f000:fff0`.
pub const RESET_VECTOR: u64 = 0xffff0;

/// mov al, 0xfe; out 0x64, al; hlt; jmp -3 (back to hlt).
fn stub() -> [u8; 7] {
    [0xb0, 0xfe, 0xe6, I8042_COMMAND_PORT as u8, 0xf4, 0xeb, 0xfd]
}

pub fn write_reset_stub<M: GuestMemory>(mem: &M) -> Result<(), FirmwareError> {
    mem.write_slice(&stub(), GuestAddress(RESET_VECTOR))
        .map_err(|source| FirmwareError::Write {
            what: "reset vector stub",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn stub_fits_below_1mib_and_targets_the_i8042() {
        assert!(RESET_VECTOR + stub().len() as u64 <= 0x10_0000);
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_reset_stub(&mem).unwrap();
        let mut b = [0u8; 7];
        mem.read_slice(&mut b, GuestAddress(RESET_VECTOR)).unwrap();
        assert_eq!(&b[..4], &[0xb0, 0xfe, 0xe6, 0x64]);
    }
}
