//! Without a loadable ONNX Runtime the engine says so once and runs the
//! heuristic. Points the runtime at a bogus path on purpose (nextest runs each
//! test in its own process, so this cannot disturb the other tests).

use kiln_policy::audit::{AuditLog, AuditQuery, Lever};
use kiln_policy::engine::{Engine, Mode, Models, RUNTIME_WARNINGS};
use kiln_policy::eval::run_policy;
use kiln_policy::guardrails::GuardConfig;
use kiln_policy::host::Host;
use kiln_policy::model::{runtime_from, ModelError};
use kiln_policy::tracegen::{generate, GenSpec};
use std::path::Path;
use std::sync::atomic::Ordering;

#[test]
fn missing_runtime_warns_once_and_runs_the_heuristic() {
    let err = runtime_from(Path::new("/nonexistent/libonnxruntime.so.1"))
        .expect_err("bogus path must not load");
    assert!(
        matches!(err, ModelError::RuntimeUnavailable(ref m) if m.contains("/nonexistent")),
        "{err}"
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let a = Models::load_or_heuristic(&dir);
    let b = Models::load_or_heuristic(&dir);
    assert!(a.balloon.is_none() && a.cpu.is_none() && a.device.is_none() && b.balloon.is_none());
    assert_eq!(
        RUNTIME_WARNINGS.load(Ordering::SeqCst),
        1,
        "said once, not once per attempt"
    );

    let host =
        Host::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/host-32.toml")).unwrap();
    let trace = generate(&GenSpec {
        vms: 10,
        hours: 2.0,
        seed: 5,
        ..GenSpec::default()
    })
    .unwrap();
    let cfg = GuardConfig {
        warmup_s: 0.0,
        ..GuardConfig::default()
    };
    let mut engine = Engine::new(Mode::Active, cfg, a, AuditLog::new(100_000));
    let r = run_policy(&host, &trace, &mut engine).unwrap();
    assert_eq!(r.metrics.oom_events, 0);
    assert!(
        r.metrics.reclaimed_pct() > 5.0,
        "the heuristic balloon still reclaims: {}",
        r.metrics.reclaimed_pct()
    );
    assert_eq!(
        r.metrics.lc_wait_p99_ms(),
        0.0,
        "pack/spread gives LC guests exclusive CPUs"
    );
    let recs = engine.audit.query(&AuditQuery {
        lever: Some(Lever::Balloon),
        ..Default::default()
    });
    assert!(!recs.is_empty());
    assert!(recs
        .iter()
        .all(|r| r.model.is_none() && r.reason.contains("heuristic")
            || r.guardrails.iter().any(|g| g == "pressure-escape")));
}
