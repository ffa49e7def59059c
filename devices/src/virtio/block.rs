//! virtio-block: being written (issue 3).
