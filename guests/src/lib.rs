//! kiln-guests
