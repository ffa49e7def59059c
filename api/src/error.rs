//! The one error shape of the API: `{"error":{"code","message","causes"}}`.
//!
//! Codes are stable strings that clients may match on; each maps to one HTTP
//! status. A 5xx code exists only for faults of the daemon itself.

use serde::{Deserialize, Serialize};

/// A stable error code. The wire form is the snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not JSON (syntax error, truncated, wrong content).
    MalformedJson,
    /// The body is JSON but not a valid request (unknown field, wrong type,
    /// a value out of range, a file that does not exist).
    InvalidRequest,
    /// A query parameter is not valid.
    InvalidQuery,
    /// The request needs a bearer token (TCP listener).
    Unauthorized,
    /// No VM has that name.
    VmNotFound,
    /// No such route.
    NotFound,
    /// The VM has no device with that id.
    DeviceNotFound,
    /// The route exists, the method does not.
    MethodNotAllowed,
    /// A VM with that name exists already.
    NameTaken,
    /// The VM's state does not allow the request (delete or replace a running
    /// VM, pause a stopped one, ...).
    InvalidState,
    /// The VMM refused a request (a balloon target above the guest's memory, ...).
    VmmRefused,
    /// The body is larger than the cap.
    BodyTooLarge,
    /// `?since=N` is older than the oldest event kept.
    EventsExpired,
    /// A fault of the daemon itself (I/O on its state directory, a bug).
    Internal,
    /// The VM's spec has no `agent` section, so the daemon has no way to
    /// reach a guest agent.
    AgentNotConfigured,
    /// The guest agent does not answer (the guest is still booting, has no
    /// agent, or nothing listens on the agent's port).
    AgentUnavailable,
    /// The connection to the guest agent was lost in the middle of a call.
    AgentDisconnected,
    /// The guest agent sent nothing for longer than the call allows.
    AgentTimeout,
    /// The guest agent refused the request (no such program, a bad working
    /// directory, no Wine in this guest, ...).
    AgentRefused,
    /// An uploaded file is not what the route takes (not a PE executable).
    InvalidUpload,
    /// The policy engine drives that lever for this VM (its mode is
    /// `active` and the VM has not opted out): a manual change would be
    /// undone at the next round. The message names the lever.
    PolicyActive,
}

impl ErrorCode {
    /// The HTTP status this code is sent with.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::MalformedJson | ErrorCode::InvalidQuery => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::VmNotFound | ErrorCode::NotFound | ErrorCode::DeviceNotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::NameTaken
            | ErrorCode::InvalidState
            | ErrorCode::AgentNotConfigured
            | ErrorCode::PolicyActive => 409,
            ErrorCode::EventsExpired => 410,
            ErrorCode::BodyTooLarge => 413,
            ErrorCode::InvalidRequest
            | ErrorCode::VmmRefused
            | ErrorCode::AgentRefused
            | ErrorCode::InvalidUpload => 422,
            ErrorCode::Internal => 500,
            ErrorCode::AgentDisconnected => 502,
            ErrorCode::AgentUnavailable => 503,
            ErrorCode::AgentTimeout => 504,
        }
    }

    /// Every code, for the contract test and the docs.
    pub const ALL: [ErrorCode; 21] = [
        ErrorCode::MalformedJson,
        ErrorCode::InvalidRequest,
        ErrorCode::InvalidQuery,
        ErrorCode::Unauthorized,
        ErrorCode::VmNotFound,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::NameTaken,
        ErrorCode::InvalidState,
        ErrorCode::VmmRefused,
        ErrorCode::BodyTooLarge,
        ErrorCode::EventsExpired,
        ErrorCode::Internal,
        ErrorCode::DeviceNotFound,
        ErrorCode::AgentNotConfigured,
        ErrorCode::AgentUnavailable,
        ErrorCode::AgentDisconnected,
        ErrorCode::AgentTimeout,
        ErrorCode::AgentRefused,
        ErrorCode::InvalidUpload,
        ErrorCode::PolicyActive,
    ];

    /// A gateway error: the guest agent behind the daemon failed, not the
    /// daemon itself (502, 503, 504).
    pub fn is_agent_fault(self) -> bool {
        matches!(
            self,
            ErrorCode::AgentUnavailable | ErrorCode::AgentDisconnected | ErrorCode::AgentTimeout
        )
    }
}

/// An API error: what went wrong, and the chain of causes below it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{message} ({code:?})")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default)]
    pub causes: Vec<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            causes: Vec::new(),
        }
    }

    pub fn with_causes(mut self, causes: Vec<String>) -> Self {
        self.causes = causes;
        self
    }

    pub fn vm_not_found(name: &str) -> Self {
        ApiError::new(ErrorCode::VmNotFound, format!("no VM named {name:?}"))
    }

    /// The message and every cause, for one line of CLI output.
    pub fn chain(&self) -> String {
        let mut line = self.message.clone();
        for cause in &self.causes {
            line.push_str(": ");
            line.push_str(cause);
        }
        line
    }
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: ApiError,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_is_the_documented_shape() {
        let e = ApiError::new(ErrorCode::NameTaken, "VM \"a\" exists")
            .with_causes(vec!["defined at 12:00".into()]);
        let json = serde_json::to_value(ErrorBody { error: e }).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {"code": "name_taken", "message": "VM \"a\" exists", "causes": ["defined at 12:00"]}})
        );
    }

    #[test]
    fn only_internal_and_guest_agent_faults_are_5xx() {
        for code in ErrorCode::ALL {
            let status = code.status();
            assert!((400..600).contains(&status));
            assert_eq!(
                status >= 500,
                code == ErrorCode::Internal || code.is_agent_fault(),
                "{code:?}"
            );
        }
        assert_eq!(ErrorCode::AgentUnavailable.status(), 503);
    }
}
