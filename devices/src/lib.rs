//! Kiln's device models.
//!
//! Devices are plain state machines behind small traits: the VMM's vCPU
//! threads call them on port I/O exits, and the event loop feeds them host
//! input. Guest-controlled accesses (any port, any width, any value) must
//! never panic: unknown registers read as all-ones and writes are ignored.

pub mod bus;
pub mod legacy;
pub mod lifecycle;
pub mod mmio;
pub mod pci;
pub mod virtio;

pub use bus::{BusError, PioBus, PioDevice};
pub use lifecycle::{ExitReason, VmLifecycle};
pub use mmio::{MmioBus, MmioBusError, MmioDevice};
