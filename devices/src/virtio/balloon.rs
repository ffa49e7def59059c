//! virtio-balloon: being written (issue 3).
