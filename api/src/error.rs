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
}

impl ErrorCode {
    /// The HTTP status this code is sent with.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::MalformedJson | ErrorCode::InvalidQuery => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::VmNotFound | ErrorCode::NotFound | ErrorCode::DeviceNotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::NameTaken | ErrorCode::InvalidState => 409,
            ErrorCode::EventsExpired => 410,
            ErrorCode::BodyTooLarge => 413,
            ErrorCode::InvalidRequest | ErrorCode::VmmRefused => 422,
            ErrorCode::Internal => 500,
        }
    }

    /// Every code, for the contract test and the docs.
    pub const ALL: [ErrorCode; 14] = [
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
    ];
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
    fn only_internal_faults_are_5xx() {
        for code in ErrorCode::ALL {
            let status = code.status();
            assert!((400..600).contains(&status));
            assert_eq!(status >= 500, code == ErrorCode::Internal, "{code:?}");
        }
    }
}
