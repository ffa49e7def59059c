//! Assembles one VM step by step, in the order KVM needs (Firecracker's
//! `builder.rs` is the model): KVM VM and irqchip, guest memory, kernel and
//! boot structures, legacy devices, PCI devices, vCPUs. Each step is one
//! function; [`build`] runs them and starts the vCPUs.

use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use kiln_devices::legacy::{
    AcpiPowerPorts, Cmos, LineBufferedOutput, SerialConsole, SerialOutput, I8042,
};
use kiln_devices::{MmioBus, PioBus, VmLifecycle};
use kiln_firmware::layout;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{RunningVm, SerialParts, VmShared};
use crate::config::VmConfig;
use crate::cpu::{cpuid, regs, vcpu};
use crate::loader::{self, EntryPoint};

/// Builds the VM described by `config` (ids assigned, validated) and
/// starts its vCPUs.
pub fn build(kvm: &Kvm, config: &VmConfig, serial_out: SerialOutput) -> Result<RunningVm> {
    check_capabilities(kvm)?;
    let vm = create_vm(kvm)?;
    let memory = Arc::new(create_memory(&vm, config.memory_bytes())?);
    let entry = load_guest(&memory, config)?;
    let lifecycle = Arc::new(VmLifecycle::new().context("creating the VM lifecycle eventfd")?);
    let (mut pio, serial) = attach_legacy_devices(&vm, &lifecycle, serial_out)?;
    let vm = Arc::new(vm);
    let mut mmio = MmioBus::new();
    let handles = attach_pci_devices(&vm, &memory, config, &mut pio, &mut mmio)?;
    let vcpus = create_vcpus(kvm, &vm, config.cpus, entry)?;

    let shared = Arc::new(VmShared::new(lifecycle, handles, config));
    let threads = start_vcpus(vcpus, Arc::new(pio), Arc::new(mmio), &shared)?;
    Ok(RunningVm::new(shared, serial, threads, vm, memory))
}

/// Step 1: the KVM VM with its in-kernel irqchip and PIT.
fn create_vm(kvm: &Kvm) -> Result<VmFd> {
    let vm = kvm.create_vm().context("cannot create a KVM VM")?;
    vm.set_tss_address(layout::KVM_TSS_START as usize)
        .context("KVM_SET_TSS_ADDR")?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_START)
        .context("KVM_SET_IDENTITY_MAP_ADDR")?;
    vm.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).context("KVM_CREATE_PIT2")?;
    Ok(vm)
}

/// Step 3: kernel, initrd, command line and the boot structures (zero
/// page or PVH start info, ACPI, E820, page tables, GDT).
fn load_guest(memory: &GuestMemoryMmap, config: &VmConfig) -> Result<EntryPoint> {
    let kernel = loader::load_kernel(memory, &config.kernel)?;
    tracing::info!("kernel {}: {}", config.kernel.display(), kernel.format);
    let initrd = match &config.initrd {
        Some(path) => Some(loader::load_initrd(memory, &kernel, path)?),
        None => None,
    };
    loader::write_boot_structures(
        memory,
        &kernel,
        &config.cmdline,
        initrd,
        cpu_count(config.cpus)?,
        config.memory_bytes(),
    )?;
    regs::write_boot_tables(memory)?;
    Ok(kernel.entry)
}

fn cpu_count(cpus: u32) -> Result<u8> {
    u8::try_from(cpus).with_context(|| format!("{cpus} vCPUs do not fit in the MADT"))
}

/// Step 4: serial port (COM1), i8042, CMOS and the ACPI power ports.
fn attach_legacy_devices(
    vm: &VmFd,
    lifecycle: &Arc<VmLifecycle>,
    serial_out: SerialOutput,
) -> Result<(PioBus, SerialParts)> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK)?;
    vm.register_irqfd(&serial_irq, layout::COM1_IRQ)
        .context("registering the COM1 irqfd")?;
    let rx_room = EventFd::new(libc::EFD_NONBLOCK)?;
    let flush = EventFd::new(libc::EFD_NONBLOCK)?;
    let serial_out = Box::new(LineBufferedOutput::new(serial_out, flush.try_clone()?));
    let console = Arc::new(Mutex::new(SerialConsole::new(
        serial_irq,
        rx_room.try_clone()?,
        serial_out,
    )));

    let mut bus = PioBus::new();
    bus.insert(layout::COM1_PORT, 8, console.clone())?;
    bus.insert(
        layout::I8042_DATA_PORT,
        5,
        Arc::new(Mutex::new(I8042::new(lifecycle.clone()))),
    )?;
    bus.insert(
        layout::CMOS_PORT,
        Cmos::LEN,
        Arc::new(Mutex::new(Cmos::new())),
    )?;
    bus.insert(
        layout::ACPI_SLEEP_CONTROL_PORT,
        AcpiPowerPorts::LEN,
        Arc::new(Mutex::new(AcpiPowerPorts::new(
            lifecycle.clone(),
            layout::ACPI_S5_SLEEP_TYPE,
            layout::ACPI_RESET_VALUE,
        ))),
    )?;
    Ok((
        bus,
        SerialParts {
            console,
            rx_room,
            flush,
        },
    ))
}

/// Step 5: the PCI root (config ports and ECAM) with every virtio device.
fn attach_pci_devices(
    vm: &Arc<VmFd>,
    memory: &Arc<GuestMemoryMmap>,
    config: &VmConfig,
    pio: &mut PioBus,
    mmio: &mut MmioBus,
) -> Result<crate::devices::DeviceHandles> {
    let (pci, handles) = crate::devices::build_pci(vm, memory, config)?;
    pio.insert(
        layout::PCI_CONFIG_PORT,
        layout::PCI_CONFIG_PORT_LEN,
        pci.clone(),
    )?;
    mmio.insert(
        layout::PCI_MMIO_START,
        layout::PCI_ECAM_START + layout::PCI_ECAM_SIZE - layout::PCI_MMIO_START,
        pci,
    )?;
    Ok(handles)
}

/// Step 6: the vCPUs with CPUID, MSRs, FPU and LAPIC; the boot vCPU gets
/// the kernel's entry point.
fn create_vcpus(kvm: &Kvm, vm: &VmFd, count: u32, entry: EntryPoint) -> Result<Vec<VcpuFd>> {
    let cpus = cpu_count(count)?;
    let mut supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_SUPPORTED_CPUID")?;
    cpuid::fill_brand_string(&mut supported, cpuid::host_brand_string());
    let mut vcpus = Vec::with_capacity(usize::from(cpus));
    for index in 0..cpus {
        let fd = vm
            .create_vcpu(u64::from(index))
            .with_context(|| format!("cannot create vCPU {index}"))?;
        let mut cpuid = supported.clone();
        cpuid::apply_topology(&mut cpuid, index, cpus);
        fd.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;
        regs::setup_msrs(&fd)?;
        regs::setup_fpu(&fd)?;
        regs::setup_lapic(&fd)?;
        // Secondary vCPUs wait in the in-kernel LAPIC for the guest's
        // INIT/SIPI; only the boot vCPU gets an entry point.
        if index == 0 {
            regs::setup_boot_vcpu(&fd, entry)?;
        }
        vcpus.push(fd);
    }
    Ok(vcpus)
}

/// Step 7: one thread per vCPU; on failure the ones started are stopped.
fn start_vcpus(
    vcpus: Vec<VcpuFd>,
    pio: Arc<PioBus>,
    mmio: Arc<MmioBus>,
    shared: &VmShared,
) -> Result<Vec<vcpu::VcpuThread>> {
    let mut threads = Vec::with_capacity(vcpus.len());
    for (index, fd) in vcpus.into_iter().enumerate() {
        match vcpu::spawn(
            index as u8,
            fd,
            pio.clone(),
            mmio.clone(),
            shared.lifecycle.clone(),
            shared.stop.clone(),
            shared.gate.clone(),
        ) {
            Ok(t) => threads.push(t),
            Err(e) => {
                vcpu::stop_all(threads, &shared.stop, &shared.gate);
                return Err(e);
            }
        }
    }
    Ok(threads)
}

fn check_capabilities(kvm: &Kvm) -> Result<()> {
    for (cap, name) in [
        (Cap::Irqchip, "in-kernel irqchip"),
        (Cap::Irqfd, "irqfd"),
        (Cap::UserMemory, "user memory regions"),
        (Cap::SetTssAddr, "TSS address"),
        (Cap::Pit2, "in-kernel PIT"),
        (Cap::ExtCpuid, "extended CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            bail!("this host's KVM lacks {name} support (KVM_CAP_{cap:?})");
        }
    }
    Ok(())
}

/// Step 2: guest RAM (anonymous, not touched until the guest uses it) and
/// registers it with KVM.
fn create_memory(vm: &VmFd, size: u64) -> Result<GuestMemoryMmap> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let memory = GuestMemoryMmap::from_ranges(&ranges).with_context(|| {
        format!(
            "cannot allocate {} of guest memory",
            crate::config::human_size(size)
        )
    })?;
    for (slot, region) in memory.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .context("guest memory region has no host mapping")?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region stays mapped for the VM's lifetime (RunningVm
        // owns it and drops the VmFd first-or-together), and regions don't
        // overlap.
        unsafe { vm.set_user_memory_region(desc) }
            .with_context(|| format!("KVM_SET_USER_MEMORY_REGION for slot {slot}"))?;
    }
    Ok(memory)
}
