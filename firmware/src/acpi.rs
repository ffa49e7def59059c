//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), DSDT and MADT.
//!
//! The FADT is hardware-reduced and marks the power button as a control
//! method device, so the DSDT carries it: a power button `PWRB` (`PNP0C0C`)
//! and a Generic Event Device `GED_` (`ACPI0013`) whose interrupt runs its
//! `_EVT` method, which reads the pending events from the GED register and
//! notifies `PWRB` (the guest's ACPI button driver then reports KEY_POWER).
//!
//! The tables are laid out one after another from [`RSDP_START`] inside the
//! reserved BIOS area. Later devices (a PCI host bridge's MCFG, more DSDT
//! devices) are added through [`AcpiTables::add_table`] and
//! [`AcpiTables::add_dsdt_device`] without touching the rest.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::*;
use crate::FirmwareError;

const OEM_ID: [u8; 6] = *b"KILN  ";
const OEM_TABLE_ID: [u8; 8] = *b"KILNVM  ";
const OEM_REVISION: u32 = 1;
/// FADT IAPC_BOOT_ARCH bit: "VGA not present" (we have no VGA).
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

/// The platform's ACPI tables, ready to be written into guest memory.
pub struct AcpiTables {
    cpus: u8,
    dsdt_devices: Vec<Vec<u8>>,
    extra_tables: Vec<Vec<u8>>,
}

impl AcpiTables {
    /// Tables for `cpus` vCPUs with the devices every Kiln VM has (COM1
    /// serial, CMOS RTC, the PCI root, the GED and its power button) already
    /// declared in the DSDT.
    pub fn new(cpus: u8) -> Self {
        let mut tables = AcpiTables {
            cpus,
            dsdt_devices: Vec::new(),
            extra_tables: Vec::new(),
        };
        tables.add_dsdt_device(com1_device());
        tables.add_dsdt_device(rtc_device());
        tables.add_dsdt_device(pci_root_device());
        tables.add_dsdt_device(motherboard_resources_device());
        tables.add_dsdt_device(generic_event_device());
        tables.add_dsdt_device(power_button_device());
        let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        mcfg.add_ecam(PCI_ECAM_START, 0, 0, 0);
        tables.add_table(to_bytes(&mcfg));
        tables
    }

    /// Adds an AML `Device` (already encoded) under `\_SB`.
    pub fn add_dsdt_device(&mut self, aml_bytes: Vec<u8>) {
        self.dsdt_devices.push(aml_bytes);
    }

    /// Adds a complete table (header and checksum included), listed in the XSDT.
    pub fn add_table(&mut self, table: Vec<u8>) {
        self.extra_tables.push(table);
    }

    /// Writes all tables at [`RSDP_START`] and returns the RSDP address.
    pub fn write<M: GuestMemory>(&self, mem: &M) -> Result<u64, FirmwareError> {
        // Layout: RSDP, then DSDT, FADT, MADT, extra tables, XSDT last (it
        // needs everyone's address).
        let rsdp_len = Rsdp::len() as u64;
        let mut next = align8(RSDP_START + rsdp_len);
        let mut blobs: Vec<(u64, Vec<u8>)> = Vec::new();

        let dsdt = self.dsdt();
        let dsdt_addr = next;
        next = align8(next + dsdt.len() as u64);
        blobs.push((dsdt_addr, dsdt));

        let mut listed = Vec::new();
        let fadt = to_bytes(&fadt(dsdt_addr));
        listed.push(next);
        blobs.push((next, fadt));
        next = align8(next + blobs.last().map_or(0, |b| b.1.len() as u64));

        let madt = to_bytes(&self.madt());
        listed.push(next);
        blobs.push((next, madt));
        next = align8(next + blobs.last().map_or(0, |b| b.1.len() as u64));

        for table in &self.extra_tables {
            listed.push(next);
            blobs.push((next, table.clone()));
            next = align8(next + table.len() as u64);
        }

        let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        for addr in &listed {
            xsdt.add_entry(*addr);
        }
        let xsdt_addr = next;
        let xsdt = to_bytes(&xsdt);
        next += xsdt.len() as u64;
        blobs.push((xsdt_addr, xsdt));

        if next > BIOS_AREA_END {
            return Err(FirmwareError::AcpiTooLarge {
                needed: (next - RSDP_START) as usize,
                available: (BIOS_AREA_END - RSDP_START) as usize,
            });
        }
        blobs.push((RSDP_START, to_bytes(&Rsdp::new(OEM_ID, xsdt_addr))));

        for (addr, bytes) in blobs {
            mem.write_slice(&bytes, GuestAddress(addr))
                .map_err(|source| FirmwareError::Write {
                    what: "ACPI tables",
                    source,
                })?;
        }
        Ok(RSDP_START)
    }

    fn dsdt(&self) -> Vec<u8> {
        let mut body = Vec::new();
        // \_S5_: the SLP_TYP the guest writes to the sleep control register.
        aml::Name::new(
            "_S5_".into(),
            &aml::Package::new(vec![&ACPI_S5_SLEEP_TYPE, &0u8]),
        )
        .to_aml_bytes(&mut body);
        let devices: Vec<RawAml> = self.dsdt_devices.iter().map(|d| RawAml(d)).collect();
        let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
        aml::Scope::new("_SB_".into(), children).to_aml_bytes(&mut body);

        let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        dsdt.append_slice(&body);
        dsdt.update_checksum();
        dsdt.as_slice().to_vec()
    }

    fn madt(&self) -> MADT {
        let mut madt = MADT::new(
            OEM_ID,
            OEM_TABLE_ID,
            OEM_REVISION,
            LocalInterruptController::Address(APIC_START as u32),
        );
        for id in 0..self.cpus {
            madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
        }
        madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
        madt
    }
}

/// Hardware-reduced FADT: power off and reset through our own I/O ports,
/// no PM timer, no legacy fixed hardware.
fn fadt(dsdt_addr: u64) -> impl Aml {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.sleep_control_reg = io_port_gas(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_port_gas(ACPI_SLEEP_STATUS_PORT);
    fadt.reset_reg = io_port_gas(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.century = CMOS_CENTURY_REGISTER;
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_VGA_NOT_PRESENT.into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"KILNVMM\0").into();
    fadt.finalize()
}

fn io_port_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

fn com1_device() -> Vec<u8> {
    let mut out = Vec::new();
    aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(COM1_PORT, COM1_PORT, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, COM1_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut out);
    out
}

fn rtc_device() -> Vec<u8> {
    let mut out = Vec::new();
    aml::Device::new(
        "RTC_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00")),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::IO::new(CMOS_PORT, CMOS_PORT, 1, 2)]),
            ),
        ],
    )
    .to_aml_bytes(&mut out);
    out
}

/// The PCIe root bridge of bus 0: its configuration ports and the memory
/// window its devices' BARs live in. No `_PRT`: devices use MSI-X only.
fn pci_root_device() -> Vec<u8> {
    let mut out = Vec::new();
    let window_end = (PCI_MMIO_START + PCI_MMIO_SIZE - 1) as u32;
    aml::Device::new(
        "PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::AddressSpace::new_bus_number(0u16, 0u16),
                    &aml::IO::new(
                        PCI_CONFIG_PORT,
                        PCI_CONFIG_PORT,
                        1,
                        PCI_CONFIG_PORT_LEN as u8,
                    ),
                    &aml::AddressSpace::new_memory(
                        aml::AddressSpaceCacheable::NotCacheable,
                        true,
                        PCI_MMIO_START as u32,
                        window_end,
                        None,
                    ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut out);
    out
}

/// Motherboard resources: the ECAM window (Linux only uses an MCFG region
/// that firmware reserved) and the GED register, which the GED's own
/// `_CRS` cannot name (see [`generic_event_device`]).
fn motherboard_resources_device() -> Vec<u8> {
    let ecam = aml::Memory32Fixed::new(false, PCI_ECAM_START as u32, PCI_ECAM_SIZE as u32);
    let ged = aml::Memory32Fixed::new(true, GED_MMIO_START as u32, GED_MMIO_SIZE as u32);
    to_bytes(&aml::Device::new(
        "MRES".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::ONE),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&ecam, &ged]),
            ),
        ],
    ))
}

/// The Generic Event Device: its interrupt makes the guest run `_EVT`,
/// which reads (and so acknowledges) the pending event bits and notifies
/// the device each bit stands for. Edge-triggered, as the VMM pulses the
/// line once per event. Its `_CRS` holds interrupts only: Linux's GED
/// driver fails the whole device on any other resource ("unable to parse
/// IRQ resource"), so the register is an OperationRegion here and reserved
/// under `MRES`.
fn generic_event_device() -> Vec<u8> {
    let base = GED_MMIO_START as u32;
    let len = GED_MMIO_SIZE as u32;
    let edge_active_high = aml::Interrupt::new(true, true, false, false, GED_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&edge_active_high]);
    let region = aml::OpRegion::new("GDST".into(), aml::OpRegionSpace::SystemMemory, &base, &len);
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 32)],
    );
    // Local0 = GDAT; Local1 = Local0 & POWER_BUTTON;
    // If (Local1 == POWER_BUTTON) { Notify (\_SB.PWRB, 0x80) }
    let (gdat, pwrb) = (aml::Path::new("GDAT"), aml::Path::new("\\_SB_.PWRB"));
    let (events, power_bit) = (aml::Local(0), aml::Local(1));
    let read_events = aml::Store::new(&events, &gdat);
    let mask_power = aml::And::new(&power_bit, &events, &GED_EVENT_POWER_BUTTON);
    let is_power = aml::Equal::new(&power_bit, &GED_EVENT_POWER_BUTTON);
    let notify_power = aml::Notify::new(&pwrb, &0x80u8);
    let on_power = aml::If::new(&is_power, vec![&notify_power]);
    let evt = aml::Method::new(
        "_EVT".into(),
        1,
        true,
        vec![&read_events, &mask_power, &on_power],
    );
    to_bytes(&aml::Device::new(
        "GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
            &region,
            &field,
            &evt,
        ],
    ))
}

/// The power button as a control method device (the FADT's PWR_BUTTON
/// flag says so); the GED notifies it.
fn power_button_device() -> Vec<u8> {
    to_bytes(&aml::Device::new(
        "PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    ))
}

/// Already-encoded AML spliced into a larger object.
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.0);
    }
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

fn align8(addr: u64) -> u64 {
    (addr + 7) & !7
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap<()>, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    /// Walks RSDP -> XSDT -> tables the way a guest does.
    fn tables(mem: &GuestMemoryMmap<()>) -> Vec<(String, Vec<u8>)> {
        let rsdp = read(mem, RSDP_START, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[0..20]), "RSDP v1 checksum");
        assert!(checksum_ok(&rsdp), "RSDP extended checksum");
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let hdr = read(mem, xsdt_addr, 36);
        let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
        let xsdt = read(mem, xsdt_addr, len);
        assert!(checksum_ok(&xsdt));
        let mut out = Vec::new();
        for entry in xsdt[36..].chunks(8) {
            let addr = u64::from_le_bytes(entry.try_into().unwrap());
            let hdr = read(mem, addr, 36);
            let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
            let table = read(mem, addr, len);
            assert!(checksum_ok(&table), "checksum of {:?}", &table[0..4]);
            out.push((String::from_utf8_lossy(&table[0..4]).into_owned(), table));
        }
        out
    }

    #[test]
    fn guest_finds_fadt_madt_and_dsdt() {
        let mem = mem();
        AcpiTables::new(4).write(&mem).unwrap();
        let t = tables(&mem);
        let names: Vec<&str> = t.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(names, ["FACP", "APIC", "MCFG"]);

        let fadt = &t[0].1;
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt_hdr = read(&mem, x_dsdt, 36);
        assert_eq!(&dsdt_hdr[0..4], b"DSDT");
        let len = u32::from_le_bytes(dsdt_hdr[4..8].try_into().unwrap()) as usize;
        let dsdt = read(&mem, x_dsdt, len);
        assert!(checksum_ok(&dsdt));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert!(dsdt.windows(4).any(|w| w == b"COM1"));
        assert!(dsdt.windows(4).any(|w| w == b"PCI0"));
        let mcfg = &t[2].1;
        assert_eq!(
            u64::from_le_bytes(mcfg[44..52].try_into().unwrap()),
            PCI_ECAM_START
        );
    }

    fn dsdt(mem: &GuestMemoryMmap<()>) -> Vec<u8> {
        let fadt = tables(mem).remove(0).1;
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let hdr = read(mem, x_dsdt, 36);
        let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
        read(mem, x_dsdt, len)
    }

    fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    /// The body of the AML `Device` named `name` (ExtOp 0x5b 0x82,
    /// PkgLength, name), decoded as ACPI 6.5 section 20.2.4 defines it.
    fn device_body<'a>(aml: &'a [u8], name: &[u8; 4]) -> &'a [u8] {
        let at = (0..aml.len() - 6)
            .find(|&i| {
                aml[i..i + 2] == [0x5b, 0x82] && {
                    let extra = (aml[i + 2] >> 6) as usize;
                    aml[i + 3 + extra..].starts_with(name)
                }
            })
            .unwrap_or_else(|| panic!("no Device {:?}", std::str::from_utf8(name)));
        let lead = aml[at + 2];
        let extra = (lead >> 6) as usize;
        let mut len = if extra == 0 {
            (lead & 0x3f) as usize
        } else {
            (lead & 0x0f) as usize
        };
        for k in 0..extra {
            len |= (aml[at + 3 + k] as usize) << (4 + 8 * k);
        }
        // PkgLength counts itself, not the two opcode bytes.
        &aml[at + 2 + 1 + extra + 4..at + 2 + len]
    }

    /// The bytes of the resource template named `name` (`Name (name,
    /// Buffer (size) {...})`, a buffer small enough for a 1-byte PkgLength).
    fn resource_template<'a>(aml: &'a [u8], name: &[u8; 4]) -> &'a [u8] {
        let mut pattern = vec![0x08];
        pattern.extend_from_slice(name);
        pattern.push(0x11);
        let at = find(aml, &pattern).expect("named buffer") + pattern.len();
        let pkg_len = aml[at] as usize;
        assert!(pkg_len < 0x40, "one-byte PkgLength");
        // PkgLength, then the size as BytePrefix n.
        assert_eq!(aml[at + 1], 0x0a);
        &aml[at + 3..at + pkg_len]
    }

    /// The descriptor types (large: their tag byte; small: 0x79 for the
    /// end tag, else the tag's type) in a resource template, walked by
    /// their lengths (ACPI 6.5 section 6.4).
    fn descriptors(mut bytes: &[u8]) -> Vec<u8> {
        let mut types = Vec::new();
        while let Some(&tag) = bytes.first() {
            let len = if tag & 0x80 != 0 {
                3 + u16::from_le_bytes([bytes[1], bytes[2]]) as usize
            } else {
                1 + (tag & 0x07) as usize
            };
            types.push(tag);
            bytes = &bytes[len..];
        }
        types
    }

    #[test]
    fn dsdt_has_a_generic_event_device_that_notifies_the_power_button() {
        let mem = mem();
        AcpiTables::new(1).write(&mem).unwrap();
        let dsdt = dsdt(&mem);
        let ged = device_body(&dsdt, b"GED_");

        // Name (_HID, "ACPI0013")
        assert!(find(ged, b"\x08_HID\x0dACPI0013\x00").is_some());
        // _CRS: one extended interrupt descriptor (consumer, edge, active
        // high, exclusive) and the end tag, nothing else.
        let mut irq = vec![0x89, 0x06, 0x00, 0b0011, 0x01];
        irq.extend_from_slice(&GED_IRQ.to_le_bytes());
        let crs = resource_template(ged, b"_CRS");
        assert_eq!(
            descriptors(crs),
            [0x89, 0x79],
            "_CRS holds the interrupt only"
        );
        assert!(find(crs, &irq).is_some(), "Interrupt");
        // OperationRegion (GDST, SystemMemory, base, length): the register.
        let mut region = b"\x5b\x80GDST\x00\x0c".to_vec();
        region.extend_from_slice(&(GED_MMIO_START as u32).to_le_bytes());
        region.extend_from_slice(&[0x0a, GED_MMIO_SIZE as u8]);
        assert!(find(ged, &region).is_some(), "OperationRegion");
        // Field (GDST, DWordAcc, NoLock, WriteAsZeros) { GDAT, 32 }
        assert!(find(ged, b"GDST\x43GDAT\x20").is_some(), "Field");
        // Method (_EVT, 1, Serialized) holding Notify (\_SB.PWRB, 0x80)
        let evt = find(ged, b"_EVT\x09").expect("_EVT with 1 argument, serialized");
        let notify = find(ged, b"\x86\\\x2e_SB_PWRB\x0a\x80").expect("Notify (PWRB, 0x80)");
        assert!(notify > evt);
        // The bit tested is the one the device model sets.
        assert!(find(ged, &[0x7b, 0x60, GED_EVENT_POWER_BUTTON as u8, 0x61]).is_some());

        // The register is reserved as a motherboard resource.
        let mut mem32 = vec![0x86, 0x09, 0x00, 0x01];
        mem32.extend_from_slice(&(GED_MMIO_START as u32).to_le_bytes());
        mem32.extend_from_slice(&(GED_MMIO_SIZE as u32).to_le_bytes());
        let reserved = resource_template(device_body(&dsdt, b"MRES"), b"_CRS");
        assert!(find(reserved, &mem32).is_some(), "GED register under MRES");

        let pwrb = device_body(&dsdt, b"PWRB");
        let mut hid = b"\x08_HID".to_vec();
        aml::EISAName::new("PNP0C0C").to_aml_bytes(&mut hid);
        assert!(find(pwrb, &hid).is_some(), "PWRB is a PNP0C0C power button");
    }

    #[test]
    fn madt_lists_every_cpu_and_the_ioapic() {
        let mem = mem();
        AcpiTables::new(3).write(&mem).unwrap();
        let t = tables(&mem);
        let madt = &t[1].1;
        let mut lapics = 0;
        let mut ioapics = 0;
        let mut off = 44;
        while off < madt.len() {
            match madt[off] {
                0 => lapics += 1,
                1 => ioapics += 1,
                _ => {}
            }
            off += madt[off + 1] as usize;
        }
        assert_eq!((lapics, ioapics), (3, 1));
    }

    #[test]
    fn extra_tables_are_listed_in_the_xsdt() {
        let mem = mem();
        let mut acpi = AcpiTables::new(1);
        let mut mcfg = Sdt::new(*b"TEST", 60, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        mcfg.update_checksum();
        acpi.add_table(mcfg.as_slice().to_vec());
        acpi.write(&mem).unwrap();
        let names: Vec<String> = tables(&mem).into_iter().map(|x| x.0).collect();
        assert_eq!(names, ["FACP", "APIC", "MCFG", "TEST"]);
    }

    #[test]
    fn oversized_tables_are_an_error_not_a_corruption() {
        let mem = mem();
        let mut acpi = AcpiTables::new(1);
        acpi.add_dsdt_device(vec![0; 200 * 1024]);
        assert!(matches!(
            acpi.write(&mem),
            Err(FirmwareError::AcpiTooLarge { .. })
        ));
    }
}
