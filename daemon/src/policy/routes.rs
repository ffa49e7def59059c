//! `/v1/policy`, `/v1/vms/{id}/policy` and its decisions.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use kiln_api::engine::{DecisionList, Lever, PolicySettings, PolicyStatus, VmPolicy};
use kiln_api::{ApiError, ErrorCode};
use serde::Deserialize;

use crate::http::{Failure, JsonBody, QueryArgs, Reply, VmName};
use crate::server::App;

/// Most decisions one request returns, and the default.
pub const DECISIONS_MAX: usize = 1000;
pub const DECISIONS_DEFAULT: usize = 100;

pub async fn get_policy(State(app): State<Arc<App>>) -> Json<PolicyStatus> {
    Json(app.policy.status())
}

pub async fn put_policy(
    State(app): State<Arc<App>>,
    JsonBody(settings): JsonBody<PolicySettings>,
) -> Reply<Json<PolicyStatus>> {
    let policy = Arc::clone(&app.policy);
    // The settings file is fsynced: off the async threads.
    tokio::task::spawn_blocking(move || policy.set_settings(settings))
        .await
        .map_err(|e| Failure::internal("the settings task failed", &e))?
        .map(Json)
}

pub async fn get_vm_policy(
    State(app): State<Arc<App>>,
    VmName(name): VmName,
) -> Reply<Json<VmPolicy>> {
    Ok(Json(app.vms.get(&name).await?.spec.policy))
}

pub async fn put_vm_policy(
    State(app): State<Arc<App>>,
    VmName(name): VmName,
    JsonBody(policy): JsonBody<VmPolicy>,
) -> Reply<Json<VmPolicy>> {
    app.vms.set_vm_policy(&name, policy).await.map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionsQuery {
    lever: Option<Lever>,
    limit: Option<usize>,
}

pub async fn decisions(
    State(app): State<Arc<App>>,
    VmName(name): VmName,
    QueryArgs(q): QueryArgs<DecisionsQuery>,
) -> Reply<Json<DecisionList>> {
    let limit = q.limit.unwrap_or(DECISIONS_DEFAULT);
    if !(1..=DECISIONS_MAX).contains(&limit) {
        return Err(Failure(
            ApiError::new(ErrorCode::InvalidQuery, "invalid query parameters").with_causes(vec![
                format!("limit is {limit}; it must be between 1 and {DECISIONS_MAX}"),
            ]),
        ));
    }
    app.vms.get(&name).await?;
    let policy = Arc::clone(&app.policy);
    let decisions = tokio::task::spawn_blocking(move || policy.decisions(&name, q.lever, limit))
        .await
        .map_err(|e| Failure::internal("the decisions task failed", &e))?;
    Ok(Json(DecisionList { decisions }))
}
