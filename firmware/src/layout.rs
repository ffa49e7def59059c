//! Guest-physical memory layout shared by the boot path, ACPI and devices.
//!
//! ```text
//! 0x0000_0500  boot GDT                  0x0000_9000  PML4
//! 0x0000_6000  PVH start info + memmap   0x0000_a000  PDPT
//! 0x0000_7000  Linux zero page           0x0000_b000  4 page directories (0-4 GiB)
//! 0x0002_0000  kernel command line       0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  RSDP and ACPI tables      0x0010_0000  kernel (high memory)
//! 0xc000_0000 .. 0xe000_0000  PCI BARs     0xe000_0000  PCI ECAM (bus 0)
//! 0xfeb0_0000 ACPI GED event register
//! 0xfec0_0000 IOAPIC, 0xfee0_0000 LAPIC (in the MMIO hole up to 4 GiB)
//! 0x1_0000_0000 ..              RAM beyond the hole
//! ```

/// Start of the boot GDT (4 entries of 8 bytes).
pub const BOOT_GDT_START: u64 = 0x500;
/// Start of the (empty) boot IDT, right after the GDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map entries, after the start info.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Room for PVH memory map entries (24 bytes each) before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = (0x7000 - 0x6040) / 24;
/// Linux boot protocol "zero page" (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Page tables for the 64-bit entry: identity map of the first 4 GiB.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we reserve room for (x86 kernels accept 2048).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Extended BIOS data area: reserved, guests expect something there.
pub const EBDA_START: u64 = 0x9fc00;
/// Legacy BIOS area where the kernel scans for the RSDP.
pub const BIOS_AREA_START: u64 = 0xe0000;
pub const BIOS_AREA_END: u64 = 0x10_0000;
/// RSDP location (inside the scanned BIOS area, 16-byte aligned).
pub const RSDP_START: u64 = 0xe0000;
/// First byte the kernel and initrd may use.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole; RAM below 4 GiB stops here.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole; RAM continues here.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Window the PCI devices' memory BARs are allocated from.
pub const PCI_MMIO_START: u64 = MMIO_HOLE_START;
pub const PCI_MMIO_SIZE: u64 = 0x2000_0000;
/// PCIe enhanced configuration space (ECAM) of bus 0, announced in MCFG.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
/// Legacy PCI configuration ports CONFIG_ADDRESS (0xcf8) and CONFIG_DATA.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
pub const PCI_CONFIG_PORT_LEN: u16 = 8;

/// The ACPI Generic Event Device (`ACPI0013`, see `acpi.rs`): a hardware-
/// reduced platform has no fixed power button, so a press reaches the guest
/// as this device's interrupt, and its `_EVT` method reads which events are
/// pending from one 32-bit register at [`GED_MMIO_START`] (reading clears
/// it). Our own choice: a free spot between the PCI ECAM and the IOAPIC, and
/// an ISA line nothing else uses (0 PIT, 1 i8042, 4 COM1, 8 RTC; PCI
/// devices use MSI-X only).
pub const GED_MMIO_START: u64 = 0xfeb0_0000;
pub const GED_MMIO_SIZE: u64 = 4;
pub const GED_IRQ: u32 = 5;
/// Bit of the GED event register for "the power button was pressed"; the
/// `_EVT` method answers it with `Notify (\_SB.PWRB, 0x80)`.
pub const GED_EVENT_POWER_BUTTON: u32 = 1 << 0;

/// IOAPIC and local APIC default addresses (fixed by the x86 platform).
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// Identity-mapped TSS and EPT pages that KVM needs on Intel, in the hole.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;

/// I/O ports of the ACPI hardware-reduced platform registers (our own choice,
/// announced to the guest in the FADT).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
pub const ACPI_RESET_PORT: u16 = 0x602;
/// Value the guest writes to [`ACPI_RESET_PORT`] to reset.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// SLP_TYP the guest writes for S5 (must match the DSDT `_S5_` package).
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;

/// Legacy devices' ports and IRQs.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
pub const I8042_IRQ: u32 = 1;
pub const CMOS_PORT: u16 = 0x70;
pub const CMOS_IRQ: u32 = 8;
/// CMOS register holding the century (announced in the FADT).
pub const CMOS_CENTURY_REGISTER: u8 = 0x32;

// The fixed boot areas must not overlap; checked when compiling.
const _: () = {
    assert!(BOOT_IDT_START + 8 <= PVH_INFO_START);
    assert!(PVH_MEMMAP_START + 24 * PVH_MEMMAP_MAX_ENTRIES as u64 <= ZERO_PAGE_START);
    assert!(ZERO_PAGE_START + 0x1000 <= PML4_START);
    assert!(PDE_START + 4 * 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(PCI_MMIO_START + PCI_MMIO_SIZE <= PCI_ECAM_START);
    assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= GED_MMIO_START);
    assert!(GED_MMIO_START + GED_MMIO_SIZE <= IOAPIC_START);
    assert!(GED_IRQ != COM1_IRQ && GED_IRQ != I8042_IRQ && GED_IRQ != CMOS_IRQ && GED_IRQ != 0);
};

/// Guest RAM ranges (start, length) for a guest of `mem_size` bytes: RAM
/// below the MMIO hole, and the rest above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, mem_size - MMIO_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, 1 << 30)]);
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), 4 << 30);
    }
}
