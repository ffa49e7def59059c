//! Legacy PC devices every Kiln VM has: COM1, the i8042 reset line, the
//! CMOS RTC, the ACPI hardware-reduced power/reset registers, and the ACPI
//! Generic Event Device behind the power button.

pub mod cmos;
pub mod console_output;
pub mod ged;
pub mod i8042;
pub mod power;
pub mod serial;

pub use cmos::Cmos;
pub use console_output::LineBufferedOutput;
pub use ged::{GedControl, GenericEventDevice};
pub use i8042::I8042;
pub use power::AcpiPowerPorts;
pub use serial::{SerialConsole, SerialOutput};

use vmm_sys_util::eventfd::EventFd;

/// Raises an interrupt by writing an eventfd registered as a KVM irqfd.
pub struct IrqLine(pub EventFd);

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
