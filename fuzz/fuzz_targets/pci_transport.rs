//! virtio-pci: BAR 0, MSI-X and configuration space accesses to one function.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_devices::virtio::pci_fuzzing::transport(data);
});
