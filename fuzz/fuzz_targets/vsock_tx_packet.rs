//! virtio-vsock: guest tx packets through the connection muxer, with host replies.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_devices::virtio::vsock::fuzzing::tx_packet(data);
});
