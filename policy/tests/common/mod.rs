//! Shared by the integration tests that need ONNX Runtime and the models.
#![allow(dead_code)]

use kiln_policy::audit::AuditLog;
use kiln_policy::engine::{Engine, Mode, Models};
use kiln_policy::guardrails::GuardConfig;
use kiln_policy::host::Host;
use std::path::PathBuf;

pub fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models")
}

pub fn examples(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

/// Loads ONNX Runtime (ORT_DYLIB_PATH, an installed Kiln's, or the one
/// `policy/training/setup.sh` fetched) or fails the test saying how to get it.
pub fn require_runtime() {
    if let Err(e) = kiln_policy::model::runtime() {
        panic!("this test needs ONNX Runtime: {e}. Run `policy/training/setup.sh` first");
    }
}

pub fn models() -> Models {
    require_runtime();
    Models::load_strict(&models_dir()).unwrap_or_else(|e| panic!("committed models must load: {e}"))
}

pub fn engine(cfg: GuardConfig) -> Engine {
    Engine::new(Mode::Active, cfg, models(), AuditLog::new(1_000_000))
}

pub fn host32() -> Host {
    Host::load(&examples("host-32.toml")).expect("examples/host-32.toml")
}
