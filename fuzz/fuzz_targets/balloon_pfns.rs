//! virtio-balloon: inflate and deflate PFN lists.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_devices::virtio::balloon::fuzzing::pfns(data);
});
