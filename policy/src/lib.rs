//! kiln-policy: Kiln's policy engine.
//!
//! From telemetry ([`telemetry`], [`live`]) the engine ([`engine`]) decides
//! where each vCPU runs, how big each guest's balloon is and where each
//! device's I/O worker runs ([`decision`]), using small ONNX models
//! ([`model`]) behind guardrails ([`guardrails`]) that fall back to heuristics,
//! and records every decision ([`audit`]). The simulator ([`sim`]) replays
//! traces ([`trace`], [`tracegen`]) on a described host ([`host`]) to compare
//! the engine with baseline policies ([`policies`]) in [`eval`].

pub mod audit;
pub mod catalog;
pub mod cli;
pub mod dataset;
pub mod decision;
pub mod engine;
pub mod eval;
pub mod evalset;
pub mod features;
pub mod guardrails;
pub mod host;
pub mod install;
pub mod live;
pub mod model;
pub mod policies;
pub mod report;
pub mod sim;
pub mod telemetry;
pub mod trace;
pub mod tracegen;
pub mod util;
