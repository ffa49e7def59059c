//! kiln-policy
