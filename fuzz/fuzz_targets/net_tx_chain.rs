//! virtio-net: transmit chains (virtio-net header and frame) sent to a socketpair tap.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_devices::virtio::net::fuzzing::tx_chain(data);
});
