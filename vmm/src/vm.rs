//! Assembles one VM step by step: KVM VM and irqchip, guest memory, kernel
//! and boot structures, devices, vCPUs. Then runs it until it stops.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use kiln_devices::legacy::{AcpiPowerPorts, Cmos, LineBufferedOutput, SerialConsole, I8042};
use kiln_devices::{MmioBus, PioBus, VmLifecycle};
use kiln_firmware::layout;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::cpu::{cpuid, regs, vcpu};
use crate::loader;

/// A VM whose vCPUs are running.
pub struct RunningVm {
    pub lifecycle: Arc<VmLifecycle>,
    pub serial: Arc<Mutex<SerialConsole>>,
    /// Fires when the guest drained the serial receive FIFO.
    pub serial_rx_room: EventFd,
    /// Fires when console output holds a partial line to flush.
    pub serial_flush: EventFd,
    /// Runtime handles of the virtio devices (balloon target, I/O worker
    /// placement), for the control socket.
    pub handles: crate::devices::DeviceHandles,
    threads: Vec<vcpu::VcpuThread>,
    stop: Arc<AtomicBool>,
    // Kept alive for as long as the vCPUs run; the PCI root (inside the
    // buses) owns the devices.
    _vm: Arc<VmFd>,
    _memory: Arc<GuestMemoryMmap>,
}

impl RunningVm {
    /// Stops every vCPU thread; the VM's resources are freed on drop.
    pub fn stop(mut self) {
        vcpu::stop_all(std::mem::take(&mut self.threads), &self.stop);
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush();
    }
}

/// Builds the VM described by `config` and starts its vCPUs.
pub fn start(
    kvm: &Kvm,
    config: &VmConfig,
    serial_out: kiln_devices::legacy::SerialOutput,
) -> Result<RunningVm> {
    check_capabilities(kvm)?;
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

    let memory = Arc::new(create_memory(&vm, config.memory_bytes())?);

    let kernel = loader::load_kernel(&memory, &config.kernel)?;
    tracing::info!("kernel {}: {}", config.kernel.display(), kernel.format);
    let initrd = match &config.initrd {
        Some(path) => Some(loader::load_initrd(&memory, &kernel, path)?),
        None => None,
    };
    loader::write_boot_structures(
        &memory,
        &kernel,
        &config.cmdline,
        initrd,
        config.cpus as u8,
        config.memory_bytes(),
    )?;
    regs::write_boot_tables(&memory)?;

    let lifecycle = Arc::new(VmLifecycle::new().context("creating the VM lifecycle eventfd")?);
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK)?;
    vm.register_irqfd(&serial_irq, layout::COM1_IRQ)
        .context("registering the COM1 irqfd")?;
    let serial_rx_room = EventFd::new(libc::EFD_NONBLOCK)?;
    let serial_flush = EventFd::new(libc::EFD_NONBLOCK)?;
    let serial_out = Box::new(LineBufferedOutput::new(
        serial_out,
        serial_flush.try_clone()?,
    ));
    let serial = Arc::new(Mutex::new(SerialConsole::new(
        serial_irq,
        serial_rx_room.try_clone()?,
        serial_out,
    )));

    let mut bus = PioBus::new();
    bus.insert(layout::COM1_PORT, 8, serial.clone())?;
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
    let vm = Arc::new(vm);
    let mut mmio = MmioBus::new();
    let (pci, handles) = crate::devices::build_pci(&vm, &memory, config)?;
    bus.insert(
        layout::PCI_CONFIG_PORT,
        layout::PCI_CONFIG_PORT_LEN,
        pci.clone(),
    )?;
    mmio.insert(
        layout::PCI_MMIO_START,
        layout::PCI_ECAM_START + layout::PCI_ECAM_SIZE - layout::PCI_MMIO_START,
        pci,
    )?;
    let bus = Arc::new(bus);
    let mmio = Arc::new(mmio);

    let mut supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_SUPPORTED_CPUID")?;
    cpuid::fill_brand_string(&mut supported, cpuid::host_brand_string());
    let cpus = config.cpus as u8;
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
            regs::setup_boot_vcpu(&fd, kernel.entry)?;
        }
        vcpus.push(fd);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::with_capacity(vcpus.len());
    for (index, fd) in vcpus.into_iter().enumerate() {
        match vcpu::spawn(
            index as u8,
            fd,
            bus.clone(),
            mmio.clone(),
            lifecycle.clone(),
            stop.clone(),
        ) {
            Ok(t) => threads.push(t),
            Err(e) => {
                vcpu::stop_all(threads, &stop);
                return Err(e);
            }
        }
    }

    Ok(RunningVm {
        lifecycle,
        serial,
        serial_rx_room,
        serial_flush,
        handles,
        threads,
        stop,
        _vm: vm,
        _memory: memory,
    })
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

/// Allocates guest RAM (anonymous, not touched until the guest uses it) and
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
