//! virtio-balloon: a queue of free page reports.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_devices::virtio::balloon::fuzzing::report(data);
});
