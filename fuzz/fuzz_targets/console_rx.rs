//! virtio-console: a receive queue filled with host input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_devices::virtio::console::fuzzing::rx(data);
});
