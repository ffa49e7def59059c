//! Boot-protocol structures: the Linux "zero page" for bzImage kernels and
//! the PVH `hvm_start_info` for ELF kernels with a PVH entry note.

use linux_loader::loader::bootparam::{boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::e820::{E820Entry, E820Type};
use crate::layout::*;
use crate::FirmwareError;

/// Where the initrd ended up in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`].
pub fn write_cmdline<M: GuestMemory>(
    mem: &M,
    cmdline: &str,
    max_len: usize,
) -> Result<(), FirmwareError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(FirmwareError::CmdlineNul);
    }
    let max = max_len.min(CMDLINE_MAX_SIZE - 1);
    if cmdline.len() > max {
        return Err(FirmwareError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|source| FirmwareError::Write {
            what: "command line",
            source,
        })
}

// Linux boot protocol constants (Documentation/arch/x86/boot.rst).
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const LOADFLAG_CAN_USE_HEAP: u8 = 1 << 7;
const E820_MAX_ZERO_PAGE_ENTRIES: usize = 128;

/// Fills and writes the zero page for a bzImage kernel whose setup header the
/// loader returned.
pub fn write_zero_page<M: GuestMemory>(
    mem: &M,
    header: &setup_header,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    e820: &[E820Entry],
    rsdp_addr: u64,
) -> Result<(), FirmwareError> {
    let mut params = boot_params {
        hdr: *header,
        ..Default::default()
    };
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.loadflags |= LOADFLAG_CAN_USE_HEAP;
    // The heap ends just below the zero page's own setup area.
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
        params.ext_ramdisk_image = (initrd.addr >> 32) as u32;
        params.ext_ramdisk_size = (initrd.size >> 32) as u32;
    }
    params.acpi_rsdp_addr = rsdp_addr;
    if e820.len() > E820_MAX_ZERO_PAGE_ENTRIES {
        return Err(FirmwareError::NoRoom {
            what: "E820 table",
            addr: ZERO_PAGE_START,
            needed: e820.len() as u64,
        });
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        slot.addr = entry.addr;
        slot.size = entry.size;
        slot.r#type = entry.kind as u32;
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|source| FirmwareError::Write {
            what: "zero page",
            source,
        })
}

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const HVM_START_INFO_SIZE: usize = 56;
const HVM_MEMMAP_ENTRY_SIZE: usize = 24;

/// Writes the PVH start info, its memory map and module list (the initrd).
pub fn write_pvh_start_info<M: GuestMemory>(
    mem: &M,
    initrd: Option<InitrdPlacement>,
    e820: &[E820Entry],
    rsdp_addr: u64,
) -> Result<(), FirmwareError> {
    if e820.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(FirmwareError::NoRoom {
            what: "PVH memory map",
            addr: PVH_MEMMAP_START,
            needed: e820.len() as u64,
        });
    }
    let mut memmap = Vec::with_capacity(e820.len() * HVM_MEMMAP_ENTRY_SIZE);
    for entry in e820 {
        memmap.extend_from_slice(&entry.addr.to_le_bytes());
        memmap.extend_from_slice(&entry.size.to_le_bytes());
        let kind = match entry.kind {
            E820Type::Ram => 1u32,
            E820Type::Reserved => 2u32,
        };
        memmap.extend_from_slice(&kind.to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    let memmap_end = PVH_MEMMAP_START + memmap.len() as u64;
    // The module list (one entry: the initrd) follows the memory map.
    let modlist_addr = (memmap_end + 7) & !7;
    let nr_modules = u32::from(initrd.is_some());

    let mut info = Vec::with_capacity(HVM_START_INFO_SIZE);
    info.extend_from_slice(&XEN_HVM_START_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version 1: has memmap fields
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&nr_modules.to_le_bytes());
    info.extend_from_slice(&(if initrd.is_some() { modlist_addr } else { 0 }).to_le_bytes());
    info.extend_from_slice(&CMDLINE_START.to_le_bytes());
    info.extend_from_slice(&rsdp_addr.to_le_bytes());
    info.extend_from_slice(&PVH_MEMMAP_START.to_le_bytes());
    info.extend_from_slice(&(e820.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    debug_assert_eq!(info.len(), HVM_START_INFO_SIZE);

    let write = |bytes: &[u8], addr: u64, what: &'static str| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| FirmwareError::Write { what, source })
    };
    write(&info, PVH_INFO_START, "PVH start info")?;
    write(&memmap, PVH_MEMMAP_START, "PVH memory map")?;
    if let Some(initrd) = initrd {
        let mut module = Vec::with_capacity(32);
        module.extend_from_slice(&initrd.addr.to_le_bytes());
        module.extend_from_slice(&initrd.size.to_le_bytes());
        module.extend_from_slice(&0u64.to_le_bytes()); // no module cmdline
        module.extend_from_slice(&0u64.to_le_bytes());
        if modlist_addr + module.len() as u64 > ZERO_PAGE_START {
            return Err(FirmwareError::NoRoom {
                what: "PVH module list",
                addr: modlist_addr,
                needed: module.len() as u64,
            });
        }
        write(&module, modlist_addr, "PVH module list")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e820::memory_map;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn cmdline_is_nul_terminated_and_bounded() {
        let m = mem();
        write_cmdline(&m, "console=ttyS0", 2048).unwrap();
        let mut buf = [0u8; 14];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        let long = "x".repeat(2049);
        assert!(matches!(
            write_cmdline(&m, &long, 2048),
            Err(FirmwareError::CmdlineTooLong {
                len: 2049,
                max: 2048
            })
        ));
        assert!(matches!(
            write_cmdline(&m, "a\0b", 2048),
            Err(FirmwareError::CmdlineNul)
        ));
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_e820() {
        let m = mem();
        let e820 = memory_map(64 << 20);
        let initrd = InitrdPlacement {
            addr: 0x300_0000,
            size: 0x12345,
        };
        write_zero_page(
            &m,
            &setup_header::default(),
            13,
            Some(initrd),
            &e820,
            RSDP_START,
        )
        .unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x12345);
        assert_eq!(p.e820_entries as usize, e820.len());
        assert_eq!({ p.e820_table[3].addr }, HIGH_MEMORY_START);
        assert_eq!({ p.acpi_rsdp_addr }, RSDP_START);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
    }

    #[test]
    fn pvh_start_info_points_at_memmap_and_initrd() {
        let m = mem();
        let e820 = memory_map(64 << 20);
        let initrd = InitrdPlacement {
            addr: 0x300_0000,
            size: 4096,
        };
        write_pvh_start_info(&m, Some(initrd), &e820, RSDP_START).unwrap();
        let magic: u32 = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(magic, XEN_HVM_START_MAGIC);
        let nr_modules: u32 = m.read_obj(GuestAddress(PVH_INFO_START + 12)).unwrap();
        let modlist: u64 = m.read_obj(GuestAddress(PVH_INFO_START + 16)).unwrap();
        let entries: u32 = m.read_obj(GuestAddress(PVH_INFO_START + 48)).unwrap();
        assert_eq!(nr_modules, 1);
        assert_eq!(entries as usize, e820.len());
        let mod_addr: u64 = m.read_obj(GuestAddress(modlist)).unwrap();
        assert_eq!(mod_addr, 0x300_0000);
        let first_type: u32 = m.read_obj(GuestAddress(PVH_MEMMAP_START + 16)).unwrap();
        assert_eq!(first_type, 1);
    }
}
