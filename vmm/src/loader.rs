//! Loads the guest kernel (bzImage or ELF vmlinux, told apart by content)
//! and the initrd, and writes the boot-protocol structures.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{bail, Context, Result};
use kiln_firmware::boot::{self, InitrdPlacement};
use kiln_firmware::{e820, layout};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::config::human_size;

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// 64-bit Linux boot protocol: long mode, `rsi` = zero page.
    Linux64 { rip: u64 },
    /// PVH: 32-bit protected mode, `ebx` = start info.
    Pvh { rip: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    ElfPvh,
    Elf64,
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            KernelFormat::BzImage => "bzImage (Linux boot protocol)",
            KernelFormat::ElfPvh => "ELF vmlinux (PVH entry)",
            KernelFormat::Elf64 => "ELF vmlinux (64-bit entry, no PVH note)",
        })
    }
}

pub struct LoadedKernel {
    pub format: KernelFormat,
    pub entry: EntryPoint,
    /// The bzImage setup header, for the zero page.
    header: Option<setup_header>,
    /// First byte above the kernel's image and its decompression area.
    end: u64,
}

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const HDRS_MAGIC: [u8; 4] = *b"HdrS";
/// xloadflags bit: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Boot protocol 2.12 introduced xloadflags.
const MIN_BOOT_PROTOCOL: u16 = 0x020c;

pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel> {
    let mut file =
        File::open(path).with_context(|| format!("cannot open kernel {}", path.display()))?;
    let mut magic = [0u8; 4];
    let mut hdrs = [0u8; 4];
    let len = file.metadata()?.len();
    file.read_exact(&mut magic).ok();
    if len > 0x206 {
        file.seek(SeekFrom::Start(0x202))?;
        file.read_exact(&mut hdrs).ok();
    }
    file.rewind()?;

    if magic == ELF_MAGIC {
        load_elf(mem, &mut file, path)
    } else if hdrs == HDRS_MAGIC {
        load_bzimage(mem, &mut file, path)
    } else {
        bail!(
            "{} is not a Linux kernel: neither an ELF vmlinux nor a bzImage",
            path.display()
        )
    }
}

fn load_elf(mem: &GuestMemoryMmap, file: &mut File, path: &Path) -> Result<LoadedKernel> {
    let high = GuestAddress(layout::HIGH_MEMORY_START);
    let loaded = Elf::load(mem, None, file, Some(high)).map_err(|e| {
        anyhow::anyhow!(
            "cannot load ELF kernel {}: {e} (truncated, or larger than guest memory?)",
            path.display()
        )
    })?;
    let (format, entry) = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => (
            KernelFormat::ElfPvh,
            EntryPoint::Pvh {
                rip: addr.raw_value(),
            },
        ),
        _ => {
            let rip = read_elf_entry(file)?;
            (KernelFormat::Elf64, EntryPoint::Linux64 { rip })
        }
    };
    Ok(LoadedKernel {
        format,
        entry,
        header: None,
        end: loaded.kernel_end,
    })
}

fn read_elf_entry(file: &mut File) -> Result<u64> {
    let mut entry = [0u8; 8];
    file.seek(SeekFrom::Start(0x18))?;
    file.read_exact(&mut entry)?;
    Ok(u64::from_le_bytes(entry))
}

fn load_bzimage(mem: &GuestMemoryMmap, file: &mut File, path: &Path) -> Result<LoadedKernel> {
    check_bzimage_complete(file, path)?;
    let high = GuestAddress(layout::HIGH_MEMORY_START);
    let loaded = BzImage::load(mem, Some(high), file, Some(high)).map_err(|e| {
        anyhow::anyhow!(
            "cannot load bzImage {}: {e} (truncated, or larger than guest memory?)",
            path.display()
        )
    })?;
    let Some(header) = loaded.setup_header else {
        bail!("bzImage {} has no setup header", path.display());
    };
    if header.version < MIN_BOOT_PROTOCOL || header.xloadflags & XLF_KERNEL_64 == 0 {
        bail!(
            "bzImage {} has no 64-bit entry point (boot protocol {:#x}); Kiln needs a 64-bit kernel",
            path.display(),
            { header.version }
        );
    }
    let load = loaded.kernel_load.raw_value();
    // The kernel decompresses itself in place and needs `init_size` bytes.
    let end = load
        .max(loaded.kernel_end)
        .max(load + u64::from(header.init_size));
    Ok(LoadedKernel {
        format: KernelFormat::BzImage,
        entry: EntryPoint::Linux64 {
            rip: load + BZIMAGE_64BIT_ENTRY_OFFSET,
        },
        header: Some(header),
        end,
    })
}

/// A truncated bzImage would load and then crash in the decompressor;
/// the header says how long the image must be (`syssize`, protocol 2.04+).
fn check_bzimage_complete(file: &mut File, path: &Path) -> Result<()> {
    let mut hdr = [0u8; 0x20];
    file.seek(SeekFrom::Start(0x1f1))?;
    file.read_exact(&mut hdr).with_context(|| {
        format!(
            "kernel {} is truncated inside its boot header",
            path.display()
        )
    })?;
    file.rewind()?;
    let setup_sects = match hdr[0] {
        0 => 4,
        n => u64::from(n),
    };
    // syssize: 32-bit count of 16-byte paragraphs at offset 0x1f4.
    let syssize = u64::from(u32::from_le_bytes([hdr[3], hdr[4], hdr[5], hdr[6]]));
    let expected = (setup_sects + 1) * 512 + syssize * 16;
    let actual = file.metadata()?.len();
    if actual < expected {
        bail!(
            "kernel {} is truncated: {actual} bytes, its header says at least {expected}",
            path.display()
        );
    }
    Ok(())
}

/// Loads the initrd as high as possible below 4 GiB (and below the kernel's
/// `initrd_addr_max`), above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<InitrdPlacement> {
    let mut file =
        File::open(path).with_context(|| format!("cannot open initrd {}", path.display()))?;
    let size = file.metadata()?.len();
    let low_ram_end = mem
        .iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|end| *end <= layout::MMIO_HOLE_START)
        .max()
        .unwrap_or(0);
    let addr_max = kernel
        .header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(u64::from(u32::MAX));
    let top = low_ram_end.min(addr_max + 1);
    let page = 4096;
    let too_big = || {
        anyhow::anyhow!(
            "initrd {} ({}) does not fit in guest memory ({}) next to the kernel; use a larger --memory",
            path.display(),
            human_size(size),
            human_size(mem.iter().map(|r| r.len()).sum()),
        )
    };
    let start = top.checked_sub(size).ok_or_else(too_big)? & !(page - 1);
    if start < kernel.end.max(layout::HIGH_MEMORY_START) {
        return Err(too_big());
    }
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, size as usize)
        .with_context(|| format!("cannot read initrd {}", path.display()))?;
    Ok(InitrdPlacement { addr: start, size })
}

/// Writes the command line, ACPI tables and the protocol's boot structure.
pub fn write_boot_structures(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &str,
    initrd: Option<InitrdPlacement>,
    cpus: u8,
    mem_size: u64,
) -> Result<()> {
    let max_cmdline = kernel
        .header
        .map(|h| h.cmdline_size as usize)
        .filter(|s| *s != 0)
        .unwrap_or(2048);
    boot::write_cmdline(mem, cmdline, max_cmdline)?;
    let rsdp = kiln_firmware::acpi::AcpiTables::new(cpus).write(mem)?;
    kiln_firmware::reset_vector::write_reset_stub(mem)?;
    let map = e820::memory_map(mem_size);
    match kernel.entry {
        EntryPoint::Linux64 { .. } => {
            let header = kernel.header.unwrap_or_default();
            boot::write_zero_page(mem, &header, cmdline.len(), initrd, &map, rsdp)?;
        }
        EntryPoint::Pvh { .. } => boot::write_pvh_start_info(mem, initrd, &map, rsdp)?,
    }
    Ok(())
}
