//! MSI routing and ioeventfds on top of KVM, for the PCI devices.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so it is rebuilt from the
//! default irqchip routes (what KVM_CREATE_IRQCHIP set up: GSIs 0-15 on the
//! PICs, 0-23 on the IOAPIC; the serial port's irqfd uses them) plus one
//! MSI route per programmed vector.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kiln_devices::pci::msix::{MsiMessage, MsiRouting, MsiVector};
use kiln_devices::virtio::pci::IoEventRegistrar;
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

/// GSIs below this belong to the IOAPIC pins.
const FIRST_MSI_GSI: u32 = 24;

pub struct KvmInterrupts {
    vm: Arc<VmFd>,
    state: Mutex<RoutingState>,
}

struct RoutingState {
    next_gsi: u32,
    msi: BTreeMap<u32, MsiMessage>,
}

impl KvmInterrupts {
    pub fn new(vm: Arc<VmFd>) -> Self {
        KvmInterrupts {
            vm,
            state: Mutex::new(RoutingState {
                next_gsi: FIRST_MSI_GSI,
                msi: BTreeMap::new(),
            }),
        }
    }

    fn apply(&self, state: &RoutingState) -> io::Result<()> {
        let mut entries = Vec::with_capacity(40 + state.msi.len());
        for gsi in 0..16u32 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(irqchip_route(gsi, chip, gsi % 8));
        }
        for gsi in 0..FIRST_MSI_GSI {
            entries.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (&gsi, msg) in &state.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = msg.address as u32;
            e.u.msi.address_hi = (msg.address >> 32) as u32;
            e.u.msi.data = msg.data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries).map_err(|e| {
            io::Error::other(format!(
                "too many interrupt routes ({}): {e:?}",
                entries.len()
            ))
        })?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = irqchip;
    e.u.irqchip.pin = pin;
    e
}

impl MsiRouting for KvmInterrupts {
    fn allocate_vector(&self) -> io::Result<MsiVector> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let gsi = state.next_gsi;
        state.next_gsi += 1;
        let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
        self.vm
            .register_irqfd(&irqfd, gsi)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        Ok(MsiVector { gsi, irqfd })
    }

    fn set_route(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let changed = match message {
            Some(m) => state.msi.insert(gsi, m) != Some(m),
            None => state.msi.remove(&gsi).is_some(),
        };
        if changed {
            self.apply(&state)?;
        }
        Ok(())
    }
}

impl IoEventRegistrar for KvmInterrupts {
    fn register(&self, addr: u64, fd: &EventFd) -> io::Result<()> {
        self.vm
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn unregister(&self, addr: u64, fd: &EventFd) -> io::Result<()> {
        self.vm
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}
