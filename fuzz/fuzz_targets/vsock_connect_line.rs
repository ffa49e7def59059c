//! virtio-vsock: the host side's CONNECT line, whole and byte by byte.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_devices::virtio::vsock::fuzzing::connect_line(data);
});
