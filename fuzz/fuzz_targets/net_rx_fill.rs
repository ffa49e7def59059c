//! virtio-net: host frames written into guest receive buffers (mergeable or not).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_devices::virtio::net::fuzzing::rx_fill(data);
});
