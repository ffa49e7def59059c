//! virtio-vsock: being written (issue 3).
