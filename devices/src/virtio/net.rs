//! virtio-net: being written (issue 3).
