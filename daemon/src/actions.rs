//! Routes of the lifecycle actions that wait for the guest (shutdown,
//! reboot) and of worker placement (`/v1/vms/{id}/devices/{dev}/worker`).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use kiln_api::{ActionResult, ShutdownOutcome, VmInfo, WorkerPlacement};
use kiln_vmm::protocol::WorkerInfo;
use serde::Deserialize;

use crate::http::{DeviceRef, JsonBody, QueryArgs, Reply, VmName};
use crate::server::App;
use crate::state::Action;
use crate::vms::shutdown_timeout;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownQuery {
    /// Seconds to wait for the guest before the hard stop (1..=600).
    timeout_s: Option<u64>,
}

fn result(name: &str, action: Action, info: VmInfo, outcome: ShutdownOutcome) -> ActionResult {
    ActionResult {
        vm: name.to_owned(),
        action: action.as_str().into(),
        state: info.status.state,
        outcome: Some(outcome),
    }
}

pub async fn shutdown_vm(
    State(app): State<Arc<App>>,
    VmName(name): VmName,
    QueryArgs(q): QueryArgs<ShutdownQuery>,
) -> Reply<Json<ActionResult>> {
    let timeout = shutdown_timeout(q.timeout_s, app.vms.default_shutdown_timeout())?;
    let (info, outcome) = app.vms.shutdown(&name, timeout).await?;
    Ok(Json(result(&name, Action::Shutdown, info, outcome)))
}

pub async fn reboot_vm(
    State(app): State<Arc<App>>,
    VmName(name): VmName,
    QueryArgs(q): QueryArgs<ShutdownQuery>,
) -> Reply<Json<ActionResult>> {
    let timeout = shutdown_timeout(q.timeout_s, app.vms.default_shutdown_timeout())?;
    let (info, outcome) = app.vms.reboot(&name, timeout).await?;
    Ok(Json(result(&name, Action::Reboot, info, outcome)))
}

pub async fn get_worker(State(app): State<Arc<App>>, dev: DeviceRef) -> Reply<Json<WorkerInfo>> {
    app.vms.worker(&dev.vm, &dev.device).await.map(Json)
}

pub async fn put_worker(
    State(app): State<Arc<App>>,
    dev: DeviceRef,
    JsonBody(placement): JsonBody<WorkerPlacement>,
) -> Reply<Json<WorkerInfo>> {
    let vm = app.vms.get(&dev.vm).await?;
    app.policy
        .refuse_manual(kiln_api::engine::Lever::Worker, &dev.vm, &vm.spec.policy)?;
    app.vms
        .set_worker(&dev.vm, &dev.device, placement)
        .await
        .map(Json)
}
