//! What the guest sees before its kernel runs: the guest-physical memory
//! layout, the E820 map, ACPI tables, and the Linux and PVH boot-protocol
//! structures.
//!
//! Everything here writes plain bytes into guest memory; nothing here talks
//! to KVM, so each piece can be unit-tested against a mock guest memory.

pub mod acpi;
pub mod boot;
pub mod e820;
pub mod layout;
pub mod reset_vector;

pub use e820::{E820Entry, E820Type};

/// Errors while writing firmware structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("guest memory too small: {what} needs {needed:#x} bytes at {addr:#x}")]
    NoRoom {
        what: &'static str,
        addr: u64,
        needed: u64,
    },
    #[error("failed to write {what} into guest memory: {source}")]
    Write {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("ACPI tables need {needed} bytes but only {available} are reserved for them")]
    AcpiTooLarge { needed: usize, available: usize },
}
