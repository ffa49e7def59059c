//! virtio-rng: a queue of entropy requests.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_devices::virtio::rng::fuzzing::request(data);
});
