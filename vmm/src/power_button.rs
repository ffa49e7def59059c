//! The ACPI power button: the Generic Event Device the DSDT declares (see
//! `kiln_firmware::acpi`), on the MMIO bus with its interrupt on an irqfd.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use kiln_devices::legacy::{GedControl, GenericEventDevice};
use kiln_devices::MmioBus;
use kiln_firmware::layout;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// Creates the GED at the address and interrupt the DSDT announces and
/// returns the handle that presses the power button.
pub fn add_power_button(vm: &VmFd, mmio: &mut MmioBus) -> Result<GedControl> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).context("creating the GED irqfd")?;
    vm.register_irqfd(&irq, layout::GED_IRQ)
        .context("registering the GED irqfd")?;
    let ged = GenericEventDevice::new(layout::GED_MMIO_START, irq, layout::GED_EVENT_POWER_BUTTON);
    let control = ged.control();
    mmio.insert(
        layout::GED_MMIO_START,
        layout::GED_MMIO_SIZE,
        Arc::new(Mutex::new(ged)),
    )?;
    Ok(control)
}
