//! The typed client's calls to the policy engine: host-wide settings, a VM's
//! own policy and its decisions.

use hyper::Method;

use crate::client::{segment, Client, ClientError};
use crate::engine::{DecisionList, Lever, PolicySettings, PolicyStatus, VmPolicy};

/// `GET /v1/vms/{id}/policy/decisions` filters.
#[derive(Debug, Clone, Default)]
pub struct DecisionQuery {
    /// Only this lever's decisions.
    pub lever: Option<Lever>,
    /// At most this many, the newest (the daemon's default when `None`).
    pub limit: Option<usize>,
}

impl Client {
    /// The settings and what the engine is doing.
    pub async fn policy(&self) -> Result<PolicyStatus, ClientError> {
        self.call(Method::GET, "/v1/policy", None).await
    }

    /// Replaces the host-wide settings; answers with the new status.
    pub async fn set_policy(&self, settings: &PolicySettings) -> Result<PolicyStatus, ClientError> {
        self.call_json(Method::PUT, "/v1/policy", settings).await
    }

    pub async fn vm_policy(&self, name: &str) -> Result<VmPolicy, ClientError> {
        self.call(Method::GET, &vm_policy_path(name), None).await
    }

    /// Replaces a VM's policy (also while it runs).
    pub async fn set_vm_policy(
        &self,
        name: &str,
        policy: &VmPolicy,
    ) -> Result<VmPolicy, ClientError> {
        self.call_json(Method::PUT, &vm_policy_path(name), policy)
            .await
    }

    /// The audit of a VM's decisions, newest last.
    pub async fn decisions(
        &self,
        name: &str,
        query: &DecisionQuery,
    ) -> Result<DecisionList, ClientError> {
        let mut q = form_urlencoded::Serializer::new(String::new());
        if let Some(lever) = query.lever {
            q.append_pair("lever", lever.as_str());
        }
        if let Some(limit) = query.limit {
            q.append_pair("limit", &limit.to_string());
        }
        let q = q.finish();
        let mut path = format!("{}/decisions", vm_policy_path(name));
        if !q.is_empty() {
            path.push('?');
            path.push_str(&q);
        }
        self.call(Method::GET, &path, None).await
    }
}

fn vm_policy_path(name: &str) -> String {
    format!("/v1/vms/{}/policy", segment(name))
}
