//! HTTP plumbing shared by every route: the error response, a JSON body
//! extractor with a size cap and the API's error codes, query and path
//! extractors that answer in the same error shape.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_api::{ApiError, ErrorBody, ErrorCode};
use serde::de::DeserializeOwned;

/// Largest request body accepted (a VM spec is a few KiB).
pub const BODY_LIMIT: usize = 256 * 1024;
/// How much of a too-large body is read and dropped before the 413, so a
/// client that sends it whole can still read the answer; past this the
/// connection is cut.
const DRAIN_LIMIT: usize = 16 << 20;

/// An error answered in the API's error shape.
#[derive(Debug)]
pub struct Failure(pub ApiError);

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure(e)
    }
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure(ApiError::new(code, message))
    }

    /// A fault of the daemon itself, with its cause chain.
    pub fn internal(what: &str, err: &dyn std::error::Error) -> Self {
        let mut causes = vec![err.to_string()];
        let mut source = err.source();
        while let Some(s) = source {
            causes.push(s.to_string());
            source = s.source();
        }
        tracing::error!("{what}: {}", causes.join(": "));
        Failure(ApiError::new(ErrorCode::Internal, what).with_causes(causes))
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(ErrorBody { error: self.0 })).into_response()
    }
}

pub type Reply<T> = Result<T, Failure>;

/// A JSON body parsed into `T`: a syntax error is `malformed_json` (400), a
/// body that parses but does not fit `T` (unknown field, wrong type) is
/// `invalid_request` (422), over `BODY_LIMIT` is `body_too_large` (413).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = Failure;

    async fn from_request(req: Request, _: &S) -> Result<Self, Failure> {
        use http_body_util::BodyExt;
        let mut body = req.into_body();
        let mut bytes = Vec::new();
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                Failure::new(
                    ErrorCode::MalformedJson,
                    format!("reading the request body: {e}"),
                )
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            seen = seen.saturating_add(data.len());
            if seen <= BODY_LIMIT {
                bytes.extend_from_slice(&data);
            } else if seen > DRAIN_LIMIT {
                break;
            }
        }
        if seen > BODY_LIMIT {
            return Err(Failure::new(
                ErrorCode::BodyTooLarge,
                format!("the request body is larger than {BODY_LIMIT} bytes"),
            ));
        }
        parse_json(&Bytes::from(bytes)).map(JsonBody)
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, Failure> {
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        let code = match e.classify() {
            Category::Data => ErrorCode::InvalidRequest,
            Category::Syntax | Category::Eof | Category::Io => ErrorCode::MalformedJson,
        };
        let message = match code {
            ErrorCode::MalformedJson => "the request body is not valid JSON",
            _ => "the request body does not match the schema",
        };
        Failure(ApiError::new(code, message).with_causes(vec![e.to_string()]))
    })
}

/// Query parameters parsed into `T`, refused as `invalid_query` (400).
pub struct QueryArgs<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryArgs<T> {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Failure> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| QueryArgs(q.0))
            .map_err(|e| {
                Failure(
                    ApiError::new(ErrorCode::InvalidQuery, "invalid query parameters")
                        .with_causes(vec![e.body_text()]),
                )
            })
    }
}

/// The `{id}` of a VM route. A name no VM can have is `vm_not_found`.
pub struct VmName(pub String);

impl<S: Send + Sync> FromRequestParts<S> for VmName {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Failure> {
        let axum::extract::Path(name) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|e| Failure::new(ErrorCode::NotFound, e.body_text()))?;
        if kiln_api::policy::name_problem(&name).is_some() {
            return Err(Failure(ApiError::vm_not_found(&name)));
        }
        Ok(VmName(name))
    }
}

/// Longest device id `{dev}` may be (the VMM's ids are short).
const MAX_DEVICE_ID: usize = 64;

/// The `{id}` and `{dev}` of a device route. A VM name no VM can have is
/// `vm_not_found`; a device id no device can have is `device_not_found`.
pub struct DeviceRef {
    pub vm: String,
    pub device: String,
}

impl<S: Send + Sync> FromRequestParts<S> for DeviceRef {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Failure> {
        let axum::extract::Path((vm, device)) =
            axum::extract::Path::<(String, String)>::from_request_parts(parts, state)
                .await
                .map_err(|e| Failure::new(ErrorCode::NotFound, e.body_text()))?;
        if kiln_api::policy::name_problem(&vm).is_some() {
            return Err(Failure(ApiError::vm_not_found(&vm)));
        }
        if let Some(why) = device_id_problem(&device) {
            return Err(Failure::new(
                ErrorCode::DeviceNotFound,
                format!("VM {vm:?} has no device {device:?}: {why}"),
            ));
        }
        Ok(DeviceRef { vm, device })
    }
}

/// Why `id` cannot name a device, if it cannot.
fn device_id_problem(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        Some("a device id is not empty")
    } else if id.len() > MAX_DEVICE_ID {
        Some("device ids are at most 64 bytes")
    } else if id.chars().any(char::is_control) {
        Some("device ids have no control characters")
    } else {
        None
    }
}

/// Answers a route that does not exist.
pub async fn not_found() -> Failure {
    Failure::new(ErrorCode::NotFound, "no such route")
}

/// Answers a method a route does not have.
pub async fn method_not_allowed() -> Failure {
    Failure::new(
        ErrorCode::MethodNotAllowed,
        "this route does not take that method",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_no_device_can_have_are_refused_before_the_vmm() {
        assert_eq!(device_id_problem("net0"), None);
        assert_eq!(device_id_problem("disk-data_1"), None);
        assert!(device_id_problem("").is_some());
        assert!(device_id_problem(&"x".repeat(65)).is_some());
        assert!(device_id_problem("a\nb").is_some());
    }
}
