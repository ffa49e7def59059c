//! The REST API's routes (the contract is `api/openapi.yaml`), and
//! `serve()`: the Unix socket (and optional loopback TCP with a bearer
//! token) the daemon answers on.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::stream::{self, StreamExt};
use kiln_api::BalloonTarget;
use kiln_api::{
    ActionResult, ApiError, Capacity, ErrorCode, Event, EventType, Host, Ping, VmInfo, VmList,
    VmSpec,
};
use kiln_vmm::protocol::{BalloonInfo, Counters};
use serde::Deserialize;
use tokio::sync::broadcast;

use crate::actions;
use crate::http::{self as h, Failure, JsonBody, QueryArgs, Reply, VmName};
use crate::metrics::RequestMetrics;
use crate::state::Action;
use crate::vms::Manager;

/// Most of a console log `GET /v1/vms/{id}/console` returns.
pub const CONSOLE_TAIL: u64 = 1 << 20;

pub struct App {
    pub vms: Arc<Manager>,
    pub metrics: RequestMetrics,
    pub policy: Arc<crate::policy::PolicyService>,
}

type Shared = Arc<App>;

/// Every route of the API. The contract test walks this list against
/// `api/openapi.yaml` (paths and methods), so a route added here and not
/// there (or the other way round) fails it.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/ping"),
    ("GET", "/v1/host"),
    ("GET", "/v1/vms"),
    ("POST", "/v1/vms"),
    ("GET", "/v1/vms/{id}"),
    ("PUT", "/v1/vms/{id}"),
    ("DELETE", "/v1/vms/{id}"),
    ("POST", "/v1/vms/{id}/start"),
    ("POST", "/v1/vms/{id}/stop"),
    ("POST", "/v1/vms/{id}/pause"),
    ("POST", "/v1/vms/{id}/resume"),
    ("PUT", "/v1/vms/{id}/balloon"),
    ("GET", "/v1/vms/{id}/counters"),
    ("GET", "/v1/vms/{id}/console"),
    ("GET", "/v1/events"),
    ("GET", "/metrics"),
    ("GET", "/v1/vms/{id}/console/attach"),
    ("POST", "/v1/vms/{id}/shutdown"),
    ("POST", "/v1/vms/{id}/reboot"),
    ("GET", "/v1/vms/{id}/devices/{dev}/worker"),
    ("PUT", "/v1/vms/{id}/devices/{dev}/worker"),
    ("POST", "/v1/vms/{id}/exec"),
    ("POST", "/v1/vms/{id}/apps/run"),
    ("GET", "/v1/policy"),
    ("PUT", "/v1/policy"),
    ("GET", "/v1/vms/{id}/policy"),
    ("PUT", "/v1/vms/{id}/policy"),
    ("GET", "/v1/vms/{id}/policy/decisions"),
];

pub fn router(app: Shared) -> Router {
    Router::new()
        .route("/v1/ping", get(ping))
        .route("/v1/host", get(host))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{id}", get(get_vm).put(put_vm).delete(delete_vm))
        .route("/v1/vms/{id}/start", post(start_vm))
        .route("/v1/vms/{id}/stop", post(stop_vm))
        .route("/v1/vms/{id}/pause", post(pause_vm))
        .route("/v1/vms/{id}/resume", post(resume_vm))
        .route("/v1/vms/{id}/balloon", put(set_balloon))
        .route("/v1/vms/{id}/counters", get(counters))
        .route("/v1/vms/{id}/console", get(console))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .route("/v1/vms/{id}/console/attach", get(console_attach))
        .route("/v1/vms/{id}/shutdown", post(actions::shutdown_vm))
        .route("/v1/vms/{id}/reboot", post(actions::reboot_vm))
        .route(
            "/v1/vms/{id}/devices/{dev}/worker",
            get(actions::get_worker).put(actions::put_worker),
        )
        .route("/v1/vms/{id}/exec", post(crate::exec::exec))
        .route("/v1/vms/{id}/apps/run", post(crate::exec::run_app))
        .route(
            "/v1/policy",
            get(crate::policy::routes::get_policy).put(crate::policy::routes::put_policy),
        )
        .route(
            "/v1/vms/{id}/policy",
            get(crate::policy::routes::get_vm_policy).put(crate::policy::routes::put_vm_policy),
        )
        .route(
            "/v1/vms/{id}/policy/decisions",
            get(crate::policy::routes::decisions),
        )
        .fallback(h::not_found)
        .method_not_allowed_fallback(h::method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), count_request))
        .with_state(app)
}

async fn count_request(State(app): State<Shared>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = req.method().as_str().to_owned();
    let start = Instant::now();
    let resp = next.run(req).await;
    app.metrics
        .record(&method, &route, resp.status().as_u16(), start.elapsed());
    resp
}

async fn ping() -> Json<Ping> {
    Json(Ping {
        version: env!("CARGO_PKG_VERSION").into(),
        api: "v1".into(),
    })
}

async fn host(State(app): State<Shared>) -> Json<Host> {
    let facts = crate::host::read();
    let (used, vcpus_running, vms_defined, vms_running) = app.vms.usage().await;
    Json(Host {
        capacity: Capacity {
            memory_bytes_left: facts.memory_bytes.saturating_sub(used),
            vcpus_running,
            vms_defined,
            vms_running,
        },
        cpus: facts.cpus,
        numa_nodes: facts.numa_nodes,
        memory_bytes: facts.memory_bytes,
        memory_available_bytes: facts.memory_available_bytes,
        kvm: facts.kvm,
    })
}

async fn list_vms(State(app): State<Shared>) -> Json<VmList> {
    Json(VmList {
        vms: app.vms.list().await,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateQuery {
    #[serde(default)]
    start: bool,
}

async fn create_vm(
    State(app): State<Shared>,
    QueryArgs(q): QueryArgs<CreateQuery>,
    JsonBody(spec): JsonBody<VmSpec>,
) -> Reply<(StatusCode, Json<VmInfo>)> {
    let info = app.vms.create(spec, q.start).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn get_vm(State(app): State<Shared>, VmName(name): VmName) -> Reply<Json<VmInfo>> {
    app.vms.get(&name).await.map(Json)
}

async fn put_vm(
    State(app): State<Shared>,
    VmName(name): VmName,
    JsonBody(spec): JsonBody<VmSpec>,
) -> Reply<Json<VmInfo>> {
    app.vms.replace(&name, spec).await.map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete_vm(
    State(app): State<Shared>,
    VmName(name): VmName,
    QueryArgs(q): QueryArgs<DeleteQuery>,
) -> Reply<StatusCode> {
    app.vms.delete(&name, q.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn action_result(name: &str, action: Action, info: VmInfo) -> Json<ActionResult> {
    Json(ActionResult {
        vm: name.to_owned(),
        action: action.as_str().into(),
        state: info.status.state,
        outcome: None,
    })
}

async fn start_vm(State(app): State<Shared>, VmName(name): VmName) -> Reply<Json<ActionResult>> {
    let info = app.vms.start(&name).await?;
    Ok(action_result(&name, Action::Start, info))
}

async fn stop_vm(State(app): State<Shared>, VmName(name): VmName) -> Reply<Json<ActionResult>> {
    let info = app.vms.stop(&name).await?;
    Ok(action_result(&name, Action::Stop, info))
}

async fn pause_vm(State(app): State<Shared>, VmName(name): VmName) -> Reply<Json<ActionResult>> {
    let info = app.vms.pause_or_resume(&name, Action::Pause).await?;
    Ok(action_result(&name, Action::Pause, info))
}

async fn resume_vm(State(app): State<Shared>, VmName(name): VmName) -> Reply<Json<ActionResult>> {
    let info = app.vms.pause_or_resume(&name, Action::Resume).await?;
    Ok(action_result(&name, Action::Resume, info))
}

async fn set_balloon(
    State(app): State<Shared>,
    VmName(name): VmName,
    JsonBody(target): JsonBody<BalloonTarget>,
) -> Reply<Json<BalloonInfo>> {
    let vm = app.vms.get(&name).await?;
    app.policy
        .refuse_manual(kiln_api::engine::Lever::Balloon, &name, &vm.spec.policy)?;
    app.vms
        .set_balloon(&name, target.target_mib)
        .await
        .map(Json)
}

async fn counters(State(app): State<Shared>, VmName(name): VmName) -> Reply<Json<Counters>> {
    app.vms.counters(&name).await.map(Json)
}

async fn console(State(app): State<Shared>, VmName(name): VmName) -> Reply<Response> {
    let bytes = app.vms.console(&name, CONSOLE_TAIL).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        String::from_utf8_lossy(&bytes).into_owned(),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    since: Option<u64>,
    #[serde(default = "yes")]
    follow: bool,
    vm: Option<String>,
    #[serde(rename = "type")]
    kind: Option<EventType>,
}

fn yes() -> bool {
    true
}

struct EventFilter {
    vm: Option<String>,
    kind: Option<EventType>,
}

impl EventFilter {
    fn passes(&self, e: &Event) -> bool {
        self.vm.as_ref().is_none_or(|vm| e.vm.as_ref() == Some(vm))
            && self.kind.is_none_or(|k| e.kind == k)
    }
}

fn ndjson_line(e: &Event) -> bytes::Bytes {
    let mut line = serde_json::to_vec(e).expect("events serialize");
    line.push(b'\n');
    line.into()
}

/// NDJSON: the kept events after `since`, then (with `follow`) new ones as
/// they happen. A follower too slow to keep up is ended; it resumes with
/// `?since=` the last sequence number it saw.
async fn events(
    State(app): State<Shared>,
    QueryArgs(q): QueryArgs<EventsQuery>,
) -> Reply<Response> {
    let (past, rx) = app.vms.events.since(q.since).map_err(|e| {
        Failure(ApiError::new(
            ErrorCode::EventsExpired,
            format!(
                "events after {} are no longer kept; the oldest kept is {}",
                q.since.unwrap_or(0),
                e.oldest
            ),
        ))
    })?;
    let filter = Arc::new(EventFilter {
        vm: q.vm,
        kind: q.kind,
    });
    let last_past = past.last().map_or(q.since.unwrap_or(0), |e| e.seq);
    let f = filter.clone();
    let head = stream::iter(
        past.into_iter()
            .filter(move |e| f.passes(e))
            .map(|e| Ok::<_, std::convert::Infallible>(ndjson_line(&e)))
            .collect::<Vec<_>>(),
    );
    let ndjson = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    )];
    if !q.follow {
        return Ok((ndjson, Body::from_stream(head)).into_response());
    }
    let tail = stream::unfold(
        (rx, filter, last_past),
        |(mut rx, filter, last)| async move {
            loop {
                match rx.recv().await {
                    Ok(e) if e.seq <= last || !filter.passes(&e) => continue,
                    Ok(e) => {
                        let seq = e.seq;
                        return Some((Ok(ndjson_line(&e)), (rx, filter, seq)));
                    }
                    Err(broadcast::error::RecvError::Lagged(_))
                    | Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    Ok((ndjson, Body::from_stream(head.chain(tail))).into_response())
}

/// How long one scrape waits for each running VMM's counters (asked of all
/// at once): a stuck VMM makes its VM's series absent, not the scrape slow.
const METRICS_COUNTERS_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

async fn metrics(State(app): State<Shared>) -> Response {
    let vms = app.vms.list().await;
    let asks = vms
        .iter()
        .filter(|vm| {
            matches!(
                vm.status.state,
                kiln_api::VmState::Running | kiln_api::VmState::Paused
            )
        })
        .map(|vm| {
            let name = vm.spec.name.clone();
            let app = app.clone();
            async move {
                let answer = tokio::time::timeout(METRICS_COUNTERS_WAIT, app.vms.counters(&name))
                    .await
                    .ok()
                    .and_then(Result::ok);
                (name, answer)
            }
        });
    let answers = futures_util::future::join_all(asks).await;
    let mut text = app.metrics.render(&vms);
    crate::metrics::render_counters(&mut text, &answers);
    app.policy.render_metrics(&mut text);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// The live console: a WebSocket bridged to the VMM's console socket
/// (guest output as binary frames; frames sent are typed into the guest).
async fn console_attach(
    State(app): State<Shared>,
    VmName(name): VmName,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Reply<Response> {
    let console = app.vms.console_connect(&name).await?;
    let upgrade = upgrade.map_err(|e| {
        Failure::new(
            ErrorCode::InvalidRequest,
            format!("the console attach is a WebSocket: send an upgrade request ({e})"),
        )
    })?;
    Ok(upgrade.on_upgrade(move |ws| crate::console::bridge(ws, console)))
}
