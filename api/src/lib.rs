//! Kiln's REST API shared by the daemon (`kiln serve`), the CLI and the
//! tests: the typed models of `api/openapi.yaml`, the one error shape, VM
//! spec validation and a typed client over a Unix socket or TCP (plain or
//! TLS).

pub mod client;
pub mod client_exec;
pub mod client_policy;
pub mod console;
pub mod engine;
pub mod error;
pub mod exec;
pub mod models;
pub mod ndjson;
pub mod policy;
pub mod spec;
pub mod tls;

pub use client::{Client, ClientError, Endpoint, EventQuery};
pub use client_exec::{AppRun, ExecStream};
pub use client_policy::DecisionQuery;
pub use console::{ConsoleInput, ConsoleOutput, ConsoleSession};
pub use engine::{
    Decision, DecisionInput, DecisionList, DecisionOutcome, Lever, LeverMode, LeverModes,
    ModelStatus, PolicySettings, PolicyStatus, PolicyWindows, VmClassHint, VmPolicy,
};
pub use error::{ApiError, ErrorBody, ErrorCode};
pub use exec::{AgentSpec, ExecExit, ExecLine, ExecRequest, ExecResult};
pub use models::*;
pub use policy::{RestartAction, RestartPolicy};
pub use spec::{VmInfo, VmList, VmSpec};

/// The OpenAPI contract, as shipped (the daemon serves routes it lists).
pub const OPENAPI_YAML: &str = include_str!("../openapi.yaml");
