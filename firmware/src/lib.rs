//! kiln-firmware
