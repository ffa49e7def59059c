//! The contract test: the daemon's routes and the bodies it really sends
//! must agree with `api/openapi.yaml`.
//!
//! - every (method, path) of the yaml is in `server::ROUTES` and the other
//!   way round, and the router answers each of them (not with its
//!   `not_found`/`method_not_allowed` fallbacks), while a path outside the
//!   list gets `not_found`;
//! - responses of real requests (successes and errors) validate against
//!   the schema the yaml declares for that operation and status.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use kiln_daemon::metrics::RequestMetrics;
use kiln_daemon::server::{self, App, ROUTES};
use kiln_daemon::vms::{Manager, SupervisorConfig};
use serde_json::{json, Value};
use tower::ServiceExt;

fn openapi() -> Value {
    serde_yaml::from_str(kiln_api::OPENAPI_YAML).expect("api/openapi.yaml parses")
}

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

fn yaml_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(method).is_some() {
                routes.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    routes
}

struct Fixture {
    _dir: tempfile::TempDir,
    kernel: std::path::PathBuf,
    router: axum::Router,
    doc: Value,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"a readable file standing in for a kernel path").unwrap();
    let manager = Manager::open(SupervisorConfig {
        state_dir: dir.path().join("state"),
        run_dir: dir.path().join("run"),
        // A VMM that cannot be started: starts give `crashed`.
        vmm_binary: dir.path().join("no-such-kiln-vmm"),
        console_log_limit: 4 << 20,
        shutdown_timeout: kiln_daemon::vms::DEFAULT_SHUTDOWN_TIMEOUT,
    })
    .await
    .unwrap();
    let policy = kiln_daemon::policy::PolicyService::open(
        &dir.path().join("state"),
        Some(&dir.path().join("no-models")),
    )
    .unwrap();
    let app = Arc::new(App {
        vms: manager,
        metrics: RequestMetrics::default(),
        policy,
    });
    Fixture {
        _dir: dir,
        kernel,
        router: server::router(app),
        doc: openapi(),
    }
}

struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

impl Fixture {
    async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> Answer {
        let body = body.map(|b| ("application/json", serde_json::to_vec(&b).unwrap()));
        self.call_raw(method, uri, body).await
    }

    /// A request with a body of any content type.
    async fn call_raw(&self, method: &str, uri: &str, body: Option<(&str, Vec<u8>)>) -> Answer {
        let req = Request::builder().method(method).uri(uri);
        let req = match body {
            Some((content_type, bytes)) => req
                .header("content-type", content_type)
                .body(Body::from(bytes)),
            None => req.body(Body::empty()),
        }
        .unwrap();
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        Answer {
            status,
            content_type,
            body,
        }
    }

    /// Calls `uri` and checks the answer against the yaml's response for
    /// (`template`, `method`, status). Returns the body as JSON (Null for
    /// text).
    async fn checked(
        &self,
        method: &str,
        template: &str,
        uri: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let body = body.map(|b| ("application/json", serde_json::to_vec(&b).unwrap()));
        self.checked_raw(method, template, uri, body).await
    }

    /// `checked` with a body of any content type.
    async fn checked_raw(
        &self,
        method: &str,
        template: &str,
        uri: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> (u16, Value) {
        let answer = self.call_raw(method, uri, body).await;
        let op = &self.doc["paths"][template][method.to_lowercase()];
        assert!(op.is_object(), "{method} {template} is not in openapi.yaml");
        let mut declared = op["responses"][answer.status.to_string()].clone();
        assert!(
            declared.is_object(),
            "{method} {uri}: status {} is not declared in openapi.yaml: {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
        if let Some(r) = declared.get("$ref").and_then(Value::as_str) {
            declared = resolve(&self.doc, r).clone();
        }
        let Some(content) = declared.get("content").and_then(Value::as_object) else {
            assert!(
                answer.body.is_empty(),
                "{method} {uri}: body where none is declared"
            );
            return (answer.status, Value::Null);
        };
        let media = answer
            .content_type
            .split(';')
            .next()
            .unwrap()
            .trim()
            .to_owned();
        let schema = &content
            .get(&media)
            .unwrap_or_else(|| panic!("{method} {uri}: content type {media:?} not declared"))
            ["schema"];
        if media != "application/json" {
            return (answer.status, Value::Null);
        }
        let value: Value = serde_json::from_slice(&answer.body).unwrap();
        validate(
            &self.doc,
            schema,
            &value,
            &format!("{method} {uri} {}", answer.status),
        );
        (answer.status, value)
    }
}

fn resolve<'a>(doc: &'a Value, reference: &str) -> &'a Value {
    let pointer = reference.strip_prefix('#').expect("local $ref");
    doc.pointer(pointer)
        .unwrap_or_else(|| panic!("dangling $ref {reference}"))
}

/// Validates `value` against `schema`, resolving `#/components/...` in the
/// yaml.
fn validate(doc: &Value, schema: &Value, value: &Value, what: &str) {
    let mut root = schema.clone();
    let mut components = doc["components"].clone();
    nullable_to_json_schema(&mut components);
    root.as_object_mut()
        .expect("schemas are objects")
        .insert("components".into(), components);
    let validator = jsonschema::validator_for(&root).expect("the yaml's schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{what}: {value}\ndoes not match the yaml: {errors:#?}"
    );
}

/// OpenAPI 3.0's `nullable: true` is JSON Schema's `type: [T, "null"]`.
fn nullable_to_json_schema(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if map.remove("nullable") == Some(Value::Bool(true)) {
                if let Some(Value::String(t)) = map.get("type").cloned() {
                    map.insert("type".into(), json!([t, "null"]));
                }
            }
            map.values_mut().for_each(nullable_to_json_schema);
        }
        Value::Array(items) => items.iter_mut().for_each(nullable_to_json_schema),
        _ => {}
    }
}

fn concrete(template: &str) -> String {
    template.replace("{id}", "web-1").replace("{dev}", "rng0")
}

#[test]
fn the_yaml_lists_exactly_the_servers_routes() {
    let yaml = yaml_routes(&openapi());
    let server: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let only_yaml: Vec<_> = yaml.difference(&server).collect();
    let only_server: Vec<_> = server.difference(&yaml).collect();
    assert!(
        only_yaml.is_empty() && only_server.is_empty(),
        "routes in openapi.yaml only: {only_yaml:?}; in the server only: {only_server:?}"
    );
}

#[tokio::test]
async fn the_router_serves_every_listed_route_and_nothing_else() {
    let f = fixture().await;
    for (method, template) in ROUTES {
        // Followed events never end: ask for a one-shot read.
        let uri = if *template == "/v1/events" {
            "/v1/events?follow=false".to_owned()
        } else {
            concrete(template)
        };
        let a = f.call(method, &uri, None).await;
        let code = serde_json::from_slice::<Value>(&a.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
        assert!(
            !matches!(
                code.as_deref(),
                Some("not_found") | Some("method_not_allowed")
            ),
            "{method} {uri}: the router has no such route ({code:?})"
        );
    }
    for (method, uri) in [
        ("GET", "/v1/nothing"),
        ("GET", "/v2/ping"),
        ("PATCH", "/v1/vms"),
    ] {
        let a = f.call(method, uri, None).await;
        let v: Value = serde_json::from_slice(&a.body).unwrap();
        assert!(
            matches!(
                v["error"]["code"].as_str(),
                Some("not_found") | Some("method_not_allowed")
            ),
            "{method} {uri}: {v}"
        );
    }
}

#[tokio::test]
async fn real_responses_match_the_yaml_schemas() {
    let f = fixture().await;
    let kernel = f.kernel.to_str().unwrap();
    let spec = json!({
        "name": "web-1",
        "machine": {"kernel": kernel, "cpus": 1, "memory_mib": 64,
                    "balloon": {"stats_interval_s": 5}, "rng": {}},
        "restart": {"on_crash": "stop"},
        "labels": {"team": "kiln"}
    });
    let (s, _) = f.checked("GET", "/v1/ping", "/v1/ping", None).await;
    assert_eq!(s, 200);
    let (s, host) = f.checked("GET", "/v1/host", "/v1/host", None).await;
    assert_eq!(s, 200);
    assert!(!host["cpus"].as_array().unwrap().is_empty());
    let (s, created) = f
        .checked("POST", "/v1/vms", "/v1/vms", Some(spec.clone()))
        .await;
    assert_eq!(s, 201);
    assert_eq!(created["status"]["state"], "defined");
    // Errors: duplicate, malformed, unknown field, invalid values, too large.
    let (s, v) = f
        .checked("POST", "/v1/vms", "/v1/vms", Some(spec.clone()))
        .await;
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("name_taken")));
    let bad = f.call("POST", "/v1/vms", None).await;
    assert_eq!(bad.status, 400, "{}", String::from_utf8_lossy(&bad.body));
    let mut unknown = spec.clone();
    unknown["machine"]["colour"] = json!("red");
    unknown["name"] = json!("web-2");
    let (s, v) = f.checked("POST", "/v1/vms", "/v1/vms", Some(unknown)).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (422, Some("invalid_request"))
    );
    let mut zero = spec.clone();
    zero["name"] = json!("web-3");
    zero["machine"]["cpus"] = json!(0);
    let (s, v) = f.checked("POST", "/v1/vms", "/v1/vms", Some(zero)).await;
    assert_eq!(s, 422, "{v}");
    let mut huge = spec.clone();
    huge["labels"]["pad"] = json!("x".repeat(300_000));
    let (s, v) = f.checked("POST", "/v1/vms", "/v1/vms", Some(huge)).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );
    // Reads.
    let (s, list) = f.checked("GET", "/v1/vms", "/v1/vms", None).await;
    assert_eq!((s, list["vms"].as_array().unwrap().len()), (200, 1));
    let (s, _) = f
        .checked("GET", "/v1/vms/{id}", "/v1/vms/web-1", None)
        .await;
    assert_eq!(s, 200);
    let (s, v) = f.checked("GET", "/v1/vms/{id}", "/v1/vms/nope", None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("vm_not_found"))
    );
    // A start whose VMM cannot run: 200, crashed, with a reason.
    let (s, v) = f
        .checked("POST", "/v1/vms/{id}/start", "/v1/vms/web-1/start", None)
        .await;
    assert_eq!((s, v["state"].as_str()), (200, Some("crashed")), "{v}");
    let (_, v) = f
        .checked("GET", "/v1/vms/{id}", "/v1/vms/web-1", None)
        .await;
    assert_eq!(v["status"]["last_exit"], "crash");
    let (s, v) = f
        .checked("POST", "/v1/vms/{id}/stop", "/v1/vms/web-1/stop", None)
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("invalid_state"))
    );
    // Control requests need a running VMM.
    for (method, template, uri, body) in [
        ("POST", "/v1/vms/{id}/pause", "/v1/vms/web-1/pause", None),
        ("POST", "/v1/vms/{id}/resume", "/v1/vms/web-1/resume", None),
        (
            "PUT",
            "/v1/vms/{id}/balloon",
            "/v1/vms/web-1/balloon",
            Some(json!({"target_mib": 8})),
        ),
        (
            "GET",
            "/v1/vms/{id}/counters",
            "/v1/vms/web-1/counters",
            None,
        ),
        (
            "GET",
            "/v1/vms/{id}/console/attach",
            "/v1/vms/web-1/console/attach",
            None,
        ),
    ] {
        let (s, v) = f.checked(method, template, uri, body).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (409, Some("invalid_state")),
            "{uri}"
        );
    }
    let (s, _) = f
        .checked(
            "PUT",
            "/v1/vms/{id}/balloon",
            "/v1/vms/web-1/balloon",
            Some(json!({"mib": 8})),
        )
        .await;
    assert_eq!(s, 422);
    // Shutdown, reboot and worker placement need a running VMM too.
    for (method, template, uri, body) in [
        (
            "POST",
            "/v1/vms/{id}/shutdown",
            "/v1/vms/web-1/shutdown",
            None,
        ),
        (
            "POST",
            "/v1/vms/{id}/reboot",
            "/v1/vms/web-1/reboot?timeout_s=1",
            None,
        ),
        (
            "GET",
            "/v1/vms/{id}/devices/{dev}/worker",
            "/v1/vms/web-1/devices/rng0/worker",
            None,
        ),
        (
            "PUT",
            "/v1/vms/{id}/devices/{dev}/worker",
            "/v1/vms/web-1/devices/rng0/worker",
            Some(json!({"cpus": [0], "wait": "poll", "spin_us": 100})),
        ),
    ] {
        let (s, v) = f.checked(method, template, uri, body).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (409, Some("invalid_state")),
            "{uri}"
        );
    }
    for (uri, status) in [
        ("/v1/vms/web-1/shutdown?timeout_s=0", 400),
        ("/v1/vms/web-1/shutdown?timeout_s=601", 400),
        ("/v1/vms/web-1/shutdown?timeout=5", 400),
        ("/v1/vms/nope/shutdown?timeout_s=5", 404),
    ] {
        let (s, v) = f.checked("POST", "/v1/vms/{id}/shutdown", uri, None).await;
        assert_eq!(s, status, "{uri}: {v}");
    }
    for (body, code) in [
        (json!({"cpus": [], "wait": "notify"}), "invalid_request"),
        (json!({"wait": "notify", "spin_us": 5}), "invalid_request"),
        (json!({"wait": "sometimes"}), "invalid_request"),
    ] {
        let (s, v) = f
            .checked(
                "PUT",
                "/v1/vms/{id}/devices/{dev}/worker",
                "/v1/vms/web-1/devices/rng0/worker",
                Some(body.clone()),
            )
            .await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (422, Some(code)),
            "{body}"
        );
    }
    let (s, v) = f
        .checked(
            "GET",
            "/v1/vms/{id}/devices/{dev}/worker",
            &format!("/v1/vms/web-1/devices/{}/worker", "x".repeat(65)),
            None,
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("device_not_found"))
    );
    // Replace, console, events, metrics.
    let mut replaced = spec.clone();
    replaced["machine"]["cpus"] = json!(2);
    let (s, v) = f
        .checked("PUT", "/v1/vms/{id}", "/v1/vms/web-1", Some(replaced))
        .await;
    assert_eq!((s, v["spec"]["machine"]["cpus"].as_u64()), (200, Some(2)));
    let (s, _) = f
        .checked("GET", "/v1/vms/{id}/console", "/v1/vms/web-1/console", None)
        .await;
    assert_eq!(s, 200);
    let events = f.call("GET", "/v1/events?follow=false", None).await;
    assert_eq!(events.status, 200);
    assert!(events.content_type.starts_with("application/x-ndjson"));
    let event_schema = json!({"$ref": "#/components/schemas/Event"});
    let mut kinds = BTreeSet::new();
    for line in events.body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let ev: Value = serde_json::from_slice(line).unwrap();
        validate(&f.doc, &event_schema, &ev, "an event line");
        kinds.insert(ev["type"].as_str().unwrap().to_owned());
    }
    for k in [
        "daemon_started",
        "vm_defined",
        "crashed",
        "state_changed",
        "policy_decision",
        "vm_updated",
    ] {
        assert!(kinds.contains(k), "no {k} event among {kinds:?}");
    }
    let (s, v) = f
        .checked("GET", "/v1/events", "/v1/events?follow=maybe", None)
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("invalid_query"))
    );
    let (s, _) = f.checked("GET", "/metrics", "/metrics", None).await;
    assert_eq!(s, 200);
    // Delete, then it is gone.
    let (s, _) = f
        .checked("DELETE", "/v1/vms/{id}", "/v1/vms/web-1", None)
        .await;
    assert_eq!(s, 204);
    let (s, _) = f
        .checked("DELETE", "/v1/vms/{id}", "/v1/vms/web-1", None)
        .await;
    assert_eq!(s, 404);
}

/// exec and apps/run without a running guest: every refusal in the error
/// shape the yaml declares (the guest-side answers are tested in the
/// nested rig, images_on_kiln.rs).
#[tokio::test]
async fn exec_and_apps_run_refusals_match_the_yaml() {
    let f = fixture().await;
    let kernel = f.kernel.to_str().unwrap();
    for (name, agent) in [("plain", None), ("agented", Some(json!({"port": 5252})))] {
        let mut spec = json!({"name": name, "machine": {"kernel": kernel, "memory_mib": 64}});
        if let Some(a) = agent {
            spec["agent"] = a;
        }
        let (s, v) = f.checked("POST", "/v1/vms", "/v1/vms", Some(spec)).await;
        assert_eq!(s, 201, "{v}");
    }
    let exec = "/v1/vms/{id}/exec";
    let run = "/v1/vms/{id}/apps/run";
    let argv = json!({"argv": ["uname", "-a"]});
    let code = |v: &Value| v["error"]["code"].as_str().map(str::to_owned);
    let (s, v) = f
        .checked("POST", exec, "/v1/vms/plain/exec", Some(argv.clone()))
        .await;
    assert_eq!(
        (s, code(&v).as_deref()),
        (409, Some("agent_not_configured"))
    );
    let (s, v) = f
        .checked(
            "POST",
            exec,
            "/v1/vms/agented/exec?stream=true",
            Some(argv.clone()),
        )
        .await;
    assert_eq!(
        (s, code(&v).as_deref()),
        (409, Some("invalid_state")),
        "{v}"
    );
    let (s, v) = f
        .checked("POST", exec, "/v1/vms/ghost/exec", Some(argv.clone()))
        .await;
    assert_eq!((s, code(&v).as_deref()), (404, Some("vm_not_found")));
    for bad in [
        json!({"argv": []}),
        json!({"argv": ["x"], "timeout_s": 0}),
        json!({"cmd": "x"}),
    ] {
        let (s, v) = f
            .checked("POST", exec, "/v1/vms/agented/exec", Some(bad))
            .await;
        assert_eq!(
            (s, code(&v).as_deref()),
            (422, Some("invalid_request")),
            "{v}"
        );
    }
    let (s, v) = f
        .checked_raw(
            "POST",
            exec,
            "/v1/vms/agented/exec",
            Some(("application/json", b"{".to_vec())),
        )
        .await;
    assert_eq!((s, code(&v).as_deref()), (400, Some("malformed_json")));
    let (s, v) = f
        .checked(
            "POST",
            exec,
            "/v1/vms/agented/exec?stream=maybe",
            Some(argv),
        )
        .await;
    assert_eq!((s, code(&v).as_deref()), (400, Some("invalid_query")));
    // apps/run: the body is checked first, then the VM.
    let octets = |b: Vec<u8>| Some(("application/octet-stream", b));
    let (s, v) = f
        .checked_raw(
            "POST",
            run,
            "/v1/vms/agented/apps/run",
            octets(b"#!/bin/sh\n".to_vec()),
        )
        .await;
    assert_eq!(
        (s, code(&v).as_deref()),
        (422, Some("invalid_upload")),
        "{v}"
    );
    let (s, v) = f
        .checked_raw(
            "POST",
            run,
            "/v1/vms/agented/apps/run",
            octets(vec![b'M'; kiln_api::exec::UPLOAD_LIMIT + 1]),
        )
        .await;
    assert_eq!((s, code(&v).as_deref()), (413, Some("body_too_large")));
    let mut pe = vec![0u8; 512];
    pe[..2].copy_from_slice(b"MZ");
    pe[0x3c] = 0x80;
    pe[0x80..0x84].copy_from_slice(b"PE\0\0");
    let (s, v) = f
        .checked_raw(
            "POST",
            run,
            "/v1/vms/agented/apps/run?name=../x.exe",
            octets(pe.clone()),
        )
        .await;
    assert_eq!((s, code(&v).as_deref()), (400, Some("invalid_query")));
    let (s, v) = f
        .checked_raw(
            "POST",
            run,
            "/v1/vms/agented/apps/run?name=t.exe&arg=a&arg=b%20c&stream=true",
            octets(pe.clone()),
        )
        .await;
    assert_eq!(
        (s, code(&v).as_deref()),
        (409, Some("invalid_state")),
        "{v}"
    );
    let (s, v) = f
        .checked_raw("POST", run, "/v1/vms/plain/apps/run", octets(pe))
        .await;
    assert_eq!(
        (s, code(&v).as_deref()),
        (409, Some("agent_not_configured"))
    );
    // The agent section is part of the spec as stored.
    let (_, v) = f
        .checked("GET", "/v1/vms/{id}", "/v1/vms/agented", None)
        .await;
    assert_eq!(v["spec"]["agent"]["port"], 5252);
}

#[test]
fn every_error_code_is_in_the_yaml_enum() {
    let doc = openapi();
    let listed: BTreeSet<String> = doc["components"]["schemas"]["Error"]["properties"]["code"]
        ["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let ours: BTreeSet<String> = kiln_api::ErrorCode::ALL
        .iter()
        .map(|c| {
            serde_json::to_value(c)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(listed, ours);
    let states: Vec<Value> = kiln_api::VmState::ALL.iter().map(|s| json!(s)).collect();
    assert_eq!(
        doc["components"]["schemas"]["VmState"]["enum"],
        json!(states)
    );
    let types: Vec<Value> = kiln_api::EventType::ALL.iter().map(|s| json!(s)).collect();
    assert_eq!(
        doc["components"]["schemas"]["EventType"]["enum"],
        json!(types)
    );
}

#[tokio::test]
async fn policy_routes_match_the_yaml_and_refuse_hostile_input() {
    let f = fixture().await;
    let kernel = f.kernel.to_str().unwrap();
    let spec = json!({"name": "pol", "machine": {"kernel": kernel, "memory_mib": 256, "rng": {}}});
    let (s, _) = f.checked("POST", "/v1/vms", "/v1/vms", Some(spec)).await;
    assert_eq!(s, 201);
    // Host-wide settings: the defaults, every lever off.
    let (s, st) = f.checked("GET", "/v1/policy", "/v1/policy", None).await;
    assert_eq!(s, 200);
    assert_eq!(st["effective"]["balloon"], "off");
    let (s, st) = f
        .checked(
            "PUT",
            "/v1/policy",
            "/v1/policy",
            Some(json!({"levers": {"worker": "active", "vcpu": "shadow"}, "interval_ms": 500})),
        )
        .await;
    assert_eq!(s, 200, "{st}");
    assert_eq!(st["effective"]["worker"], "active");
    assert_eq!(st["settings"]["interval_ms"], 500);
    for (body, code, status) in [
        (json!({"levrs": {}}), "invalid_request", 422),
        (json!({"levers": {"balloon": "on"}}), "invalid_request", 422),
        (json!({"interval_ms": 5}), "invalid_request", 422),
        (json!({"interval_ms": 600_000}), "invalid_request", 422),
        (
            json!({"host_reserve_mib": u64::MAX}),
            "invalid_request",
            422,
        ),
        (
            json!({"windows": {"balloon_window_s": 0.5}}),
            "invalid_request",
            422,
        ),
    ] {
        let (s, v) = f
            .checked("PUT", "/v1/policy", "/v1/policy", Some(body.clone()))
            .await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {v}"
        );
    }
    let (s, v) = f
        .checked(
            "PUT",
            "/v1/policy",
            "/v1/policy",
            Some(json!({"interval_ms": 1})),
        )
        .await;
    assert_eq!(s, 422);
    assert!(
        v["error"]["causes"][0]
            .as_str()
            .unwrap()
            .contains("interval_ms"),
        "{v}"
    );
    let (s, v) = f
        .checked_raw(
            "PUT",
            "/v1/policy",
            "/v1/policy",
            Some(("application/json", b"{\"levers\":".to_vec())),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("malformed_json"))
    );
    // A refused PUT changed nothing.
    let (_, st) = f.checked("GET", "/v1/policy", "/v1/policy", None).await;
    assert_eq!(st["settings"]["interval_ms"], 500);
    // A VM's policy.
    let t = "/v1/vms/{id}/policy";
    let (s, p) = f.checked("GET", t, "/v1/vms/pol/policy", None).await;
    assert_eq!((s, p["class"].as_str()), (200, Some("general")));
    let (s, p) = f
        .checked(
            "PUT",
            t,
            "/v1/vms/pol/policy",
            Some(json!({"class": "latency_critical", "memory_floor_mib": 128, "opt_out": ["balloon"]})),
        )
        .await;
    assert_eq!(s, 200, "{p}");
    let (_, vm) = f.checked("GET", "/v1/vms/{id}", "/v1/vms/pol", None).await;
    assert_eq!(
        vm["spec"]["policy"]["class"], "latency_critical",
        "in the definition"
    );
    for body in [
        json!({"memory_floor_mib": 256}),
        json!({"opt_out": ["disk"]}),
        json!({"opt_out": ["vcpu", "vcpu"]}),
        json!({"klass": "batch"}),
    ] {
        let (s, v) = f
            .checked("PUT", t, "/v1/vms/pol/policy", Some(body.clone()))
            .await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (422, Some("invalid_request")),
            "{body}: {v}"
        );
    }
    let (s, v) = f.checked("GET", t, "/v1/vms/nope/policy", None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("vm_not_found"))
    );
    let (s, _) = f
        .checked("PUT", t, "/v1/vms/nope/policy", Some(json!({})))
        .await;
    assert_eq!(s, 404);
    // Decisions.
    let t = "/v1/vms/{id}/policy/decisions";
    let (s, v) = f
        .checked(
            "GET",
            t,
            "/v1/vms/pol/policy/decisions?lever=worker&limit=5",
            None,
        )
        .await;
    assert_eq!((s, v["decisions"].as_array().map(Vec::len)), (200, Some(0)));
    for q in [
        "limit=0",
        "limit=1001",
        "limit=99999999999999999999",
        "lever=disk",
        "colour=red",
    ] {
        let (s, v) = f
            .checked("GET", t, &format!("/v1/vms/pol/policy/decisions?{q}"), None)
            .await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (400, Some("invalid_query")),
            "{q}: {v}"
        );
    }
    let (s, _) = f
        .checked("GET", t, "/v1/vms/nope/policy/decisions", None)
        .await;
    assert_eq!(s, 404);
    // A manual worker change while the worker lever is active: 409 naming it.
    let (s, v) = f
        .checked(
            "PUT",
            "/v1/vms/{id}/devices/{dev}/worker",
            "/v1/vms/pol/devices/rng0/worker",
            Some(json!({"cpus": [0], "wait": "notify"})),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("policy_active")),
        "{v}"
    );
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("worker") && msg.contains("opt_out"), "{msg}");
    // The balloon lever is off (and opted out): not the engine's.
    let (s, v) = f
        .checked(
            "PUT",
            "/v1/vms/{id}/balloon",
            "/v1/vms/pol/balloon",
            Some(json!({"target_mib": 16})),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("invalid_state")),
        "{v}"
    );
    // Counters in /metrics.
    let text = String::from_utf8(f.call("GET", "/metrics", None).await.body).unwrap();
    for name in [
        "kiln_policy_rounds_total ",
        "kiln_policy_decisions_total{lever=\"worker\",outcome=\"applied\"} 0",
        "kiln_policy_actuator_failures_total{lever=\"vcpu\"} 0",
        "kiln_policy_vmm_skipped_total 0",
        "kiln_policy_round_seconds_count ",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
}
