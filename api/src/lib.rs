//! Kiln's REST API shared by the daemon (`kiln serve`), the CLI and the
//! tests: the typed models of `api/openapi.yaml`, the one error shape, VM
//! spec validation and a typed client over a Unix socket or TCP.

pub mod error;
pub mod models;
pub mod policy;

pub use error::{ApiError, ErrorBody, ErrorCode};
pub use models::*;
pub use policy::{RestartAction, RestartPolicy};
