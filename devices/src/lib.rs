//! kiln-devices
