//! kiln-integration-tests
