//! virtio-console: a transmit queue (guest output).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_devices::virtio::console::fuzzing::tx(data);
});
