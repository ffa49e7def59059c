//! virtio-blk: a queue of requests (header, data, status) served against a small image.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_devices::virtio::block::fuzzing::request(data);
});
