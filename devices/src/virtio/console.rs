//! virtio-console: being written (issue 3).
