//! virtio-rng: being written (issue 3).
