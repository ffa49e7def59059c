//! PCI root bus: 0xCF8/0xCFC, ECAM and BAR accesses around one virtio-pci function.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_devices::virtio::pci_fuzzing::root(data);
});
