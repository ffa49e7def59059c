//! `POST /v1/vms/{id}/exec` and `POST /v1/vms/{id}/apps/run`: programs in
//! a running VM's guest, through its agent (`crate::agent`, on the
//! blocking pool). Buffered answers hold at most 1 MiB of each stream;
//! `?stream=true` answers NDJSON lines (`kiln_api::ExecLine`) as output
//! arrives, then one `exit` (or `error`) line.
//!
//! `apps/run` takes the `.exe` as the raw request body (up to 64 MiB) and
//! its arguments in the query: `?name=FILE.exe&arg=A&arg=B&timeout_s=N`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use kiln_agent::client::OutputStream;
use kiln_agent::protocol::{ExecRequest as AgentExec, ExitStatus};
use kiln_api::exec::{
    pe_problem, ExecExit, ExecLine, ExecRequest, ExecResult, OutputBuffer, Utf8Stream,
    DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S, UPLOAD_LIMIT,
};
use kiln_api::{ApiError, ErrorCode};
use serde::Deserialize;
use tokio::sync::{mpsc, Semaphore};

use crate::agent::{AgentTarget, Session, Sink};
use crate::http::{Failure, JsonBody, QueryArgs, Reply, VmName};
use crate::server::App;

/// Agent calls in flight at once (each holds a blocking-pool thread).
const MAX_CALLS: usize = 64;
static CALLS: Semaphore = Semaphore::const_new(MAX_CALLS);
/// How much of a too-large upload is read and dropped before the 413.
const UPLOAD_DRAIN: usize = UPLOAD_LIMIT + (16 << 20);
/// Stream lines buffered between the agent thread and the HTTP body.
const STREAM_LINES: usize = 16;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    #[serde(default)]
    stream: bool,
}

fn invalid(message: impl Into<String>) -> Failure {
    Failure::new(ErrorCode::InvalidRequest, message)
}

fn timeout_ms(timeout_s: Option<u64>) -> Result<u64, String> {
    match timeout_s.unwrap_or(DEFAULT_TIMEOUT_S) {
        0 => Err("timeout_s must be at least 1".into()),
        t if t > MAX_TIMEOUT_S => Err(format!("timeout_s {t} is above {MAX_TIMEOUT_S}")),
        t => Ok(t * 1000),
    }
}

/// The API request as the agent's, or what is wrong with it.
fn agent_request(req: ExecRequest) -> Result<AgentExec, Failure> {
    if req.argv.first().is_none_or(|a| a.is_empty()) {
        return Err(invalid("argv must name a program (argv[0] not empty)"));
    }
    if req.argv.iter().any(|a| a.contains('\0')) {
        return Err(invalid("argv must not contain NUL bytes"));
    }
    if let Some(bad) = req
        .env
        .keys()
        .find(|k| k.is_empty() || k.contains(['=', '\0']))
    {
        return Err(invalid(format!(
            "environment name {bad:?} is empty or has '=' or NUL in it"
        )));
    }
    let stdin = match (req.stdin, req.stdin_base64) {
        (Some(_), Some(_)) => return Err(invalid("give stdin or stdin_base64, not both")),
        (Some(text), None) => text.into_bytes(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| invalid(format!("stdin_base64 is not base64: {e}")))?,
        (None, None) => Vec::new(),
    };
    Ok(AgentExec {
        argv: req.argv,
        env: req.env,
        clear_env: false,
        cwd: req.cwd,
        stdin,
        timeout_ms: Some(timeout_ms(req.timeout_s).map_err(invalid)?),
    })
}

pub async fn exec(
    State(app): State<Arc<App>>,
    VmName(name): VmName,
    QueryArgs(q): QueryArgs<StreamQuery>,
    JsonBody(req): JsonBody<ExecRequest>,
) -> Reply<Response> {
    let req = agent_request(req)?;
    let target = app.vms.agent_target(&name).await?;
    run(target, q.stream, move |session, sink| {
        session.exec(req, sink)
    })
    .await
}

/// The query of `apps/run`.
#[derive(Debug, PartialEq)]
struct AppQuery {
    file_name: String,
    args: Vec<String>,
    timeout_ms: u64,
    stream: bool,
}

fn query_error(message: impl Into<String>) -> Failure {
    Failure::new(ErrorCode::InvalidQuery, message)
}

fn parse_app_query(raw: Option<&str>) -> Result<AppQuery, Failure> {
    let mut q = AppQuery {
        file_name: "app.exe".into(),
        args: Vec::new(),
        timeout_ms: 0,
        stream: false,
    };
    let mut timeout_s = None;
    let mut seen = BTreeMap::new();
    for (key, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        let count = seen.entry(key.to_string()).or_insert(0u32);
        *count += 1;
        if key != "arg" && *count > 1 {
            return Err(query_error(format!("{key} is given more than once")));
        }
        match &*key {
            "arg" => q.args.push(value.into_owned()),
            "name" => q.file_name = value.into_owned(),
            "timeout_s" => {
                timeout_s = Some(value.parse::<u64>().map_err(|_| {
                    query_error(format!("timeout_s {value:?} is not a whole number"))
                })?)
            }
            "stream" => {
                q.stream = match &*value {
                    "true" => true,
                    "false" => false,
                    other => return Err(query_error(format!("stream {other:?}: true or false"))),
                }
            }
            other => {
                return Err(query_error(format!(
                    "unknown query parameter {other:?} (name, arg, timeout_s, stream)"
                )))
            }
        }
    }
    let name_ok = q.file_name.len() <= 64
        && q.file_name.to_ascii_lowercase().ends_with(".exe")
        && q.file_name.len() > 4
        && !q.file_name.starts_with('.')
        && q.file_name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !name_ok {
        return Err(query_error(format!(
            "name {:?}: a file name ending in .exe, at most 64 letters, digits, '.', '_' or '-'",
            q.file_name
        )));
    }
    if q.args.iter().any(|a| a.contains('\0')) {
        return Err(query_error("arguments must not contain NUL bytes"));
    }
    q.timeout_ms = timeout_ms(timeout_s).map_err(query_error)?;
    Ok(q)
}

/// The body, up to `UPLOAD_LIMIT`; a larger one is read on (to
/// `UPLOAD_DRAIN`) and dropped, so the client reads its 413.
async fn read_upload(body: Body) -> Result<Vec<u8>, Failure> {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| invalid(format!("reading the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen <= UPLOAD_LIMIT {
            bytes.extend_from_slice(&data);
        } else {
            bytes = Vec::new();
            if seen > UPLOAD_DRAIN {
                break;
            }
        }
    }
    if seen > UPLOAD_LIMIT {
        return Err(Failure::new(
            ErrorCode::BodyTooLarge,
            format!("the upload is larger than {UPLOAD_LIMIT} bytes"),
        ));
    }
    Ok(bytes)
}

pub async fn run_app(
    State(app): State<Arc<App>>,
    VmName(name): VmName,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Reply<Response> {
    let q = parse_app_query(raw.as_deref())?;
    let exe = read_upload(body).await?;
    if let Some(why) = pe_problem(&exe) {
        return Err(Failure(
            ApiError::new(
                ErrorCode::InvalidUpload,
                "the upload is not a Windows executable (PE file)",
            )
            .with_causes(vec![why]),
        ));
    }
    let target = app.vms.agent_target(&name).await?;
    run(target, q.stream, move |session, sink| {
        session.run_windows_app(&exe, &q.file_name, q.args, q.timeout_ms, sink)
    })
    .await
}

/// Opens a session (its failure is the request's error), then runs `call`
/// on the blocking pool: buffered, or streamed as NDJSON.
async fn run<F>(target: AgentTarget, stream: bool, call: F) -> Reply<Response>
where
    F: FnOnce(&mut Session, &mut Sink) -> Result<ExitStatus, ApiError> + Send + 'static,
{
    let permit = CALLS.try_acquire().map_err(|_| {
        Failure::new(
            ErrorCode::AgentUnavailable,
            format!("{MAX_CALLS} guest agent calls are in flight already; try again"),
        )
    })?;
    let opened = tokio::task::spawn_blocking(move || Session::open(&target))
        .await
        .map_err(|e| Failure::internal("the agent connection task failed", &e))?;
    let mut session = opened?;
    // Dropped with this future (the client went away) or with the body.
    let cut = session.cut_on_drop();
    if !stream {
        let (status, out, err) = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let (mut out, mut err) = (OutputBuffer::default(), OutputBuffer::default());
            let status = call(&mut session, &mut |s, d| {
                match s {
                    OutputStream::Stdout => out.push(d),
                    OutputStream::Stderr => err.push(d),
                }
                true
            });
            (status, out, err)
        })
        .await
        .map_err(|e| Failure::internal("the agent call task failed", &e))?;
        drop(cut);
        let exit = exit_of(status?);
        return Ok(Json(ExecResult::new(out.finish(), err.finish(), exit)).into_response());
    }
    let (tx, rx) = mpsc::channel::<bytes::Bytes>(STREAM_LINES);
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let (mut out, mut err) = (Utf8Stream::default(), Utf8Stream::default());
        let send = |line: ExecLine| tx.blocking_send(ndjson(&line)).is_ok();
        let status = call(&mut session, &mut |s, d| {
            let line = match s {
                OutputStream::Stdout => ExecLine::Stdout { data: out.push(d) },
                OutputStream::Stderr => ExecLine::Stderr { data: err.push(d) },
            };
            match &line {
                ExecLine::Stdout { data } | ExecLine::Stderr { data } if data.is_empty() => true,
                _ => send(line),
            }
        });
        for (rest, stdout) in [(out.finish(), true), (err.finish(), false)] {
            if !rest.is_empty() {
                let data = rest;
                send(if stdout {
                    ExecLine::Stdout { data }
                } else {
                    ExecLine::Stderr { data }
                });
            }
        }
        send(match status {
            Ok(s) => ExecLine::Exit(exit_of(s)),
            Err(error) => ExecLine::Error { error },
        });
    });
    let body = futures_util::stream::unfold((rx, cut), |(mut rx, cut)| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<_, std::convert::Infallible>(line), (rx, cut)))
    });
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        Body::from_stream(body),
    )
        .into_response())
}

fn exit_of(s: ExitStatus) -> ExecExit {
    ExecExit {
        exit_code: s.code,
        signal: s.signal,
        timed_out: s.timed_out,
        duration_ms: s.duration_ms,
    }
}

fn ndjson(line: &ExecLine) -> bytes::Bytes {
    let mut v = serde_json::to_vec(line).expect("lines serialize");
    v.push(b'\n');
    v.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_queries_take_repeated_args_and_refuse_the_rest() {
        let q = parse_app_query(Some(
            "name=hello.exe&arg=a&arg=two%20words&timeout_s=5&stream=true",
        ))
        .unwrap_or_else(|e| panic!("{:?}", e.0));
        assert_eq!(
            q,
            AppQuery {
                file_name: "hello.exe".into(),
                args: vec!["a".into(), "two words".into()],
                timeout_ms: 5000,
                stream: true,
            }
        );
        let d = parse_app_query(None).unwrap_or_else(|e| panic!("{:?}", e.0));
        assert_eq!(d.file_name, "app.exe");
        assert_eq!(d.timeout_ms, DEFAULT_TIMEOUT_S * 1000);
        for bad in [
            "name=../x.exe",
            "name=x.sh",
            "name=.exe",
            "timeout_s=0",
            "timeout_s=soon",
            "stream=yes",
            "colour=red",
            "name=a.exe&name=b.exe",
            "arg=%00",
        ] {
            let e = parse_app_query(Some(bad))
                .err()
                .unwrap_or_else(|| panic!("{bad}"));
            assert_eq!(e.0.code, ErrorCode::InvalidQuery, "{bad}");
        }
    }

    #[test]
    fn exec_requests_are_checked_before_the_agent_sees_them() {
        let ok = |v: serde_json::Value| agent_request(serde_json::from_value(v).unwrap());
        let r = ok(serde_json::json!({"argv": ["cat"], "stdin_base64": "aGk=", "timeout_s": 2}))
            .unwrap_or_else(|e| panic!("{:?}", e.0));
        assert_eq!((r.stdin.as_slice(), r.timeout_ms), (&b"hi"[..], Some(2000)));
        for bad in [
            serde_json::json!({"argv": []}),
            serde_json::json!({"argv": [""]}),
            serde_json::json!({"argv": ["x"], "stdin": "a", "stdin_base64": "YQ=="}),
            serde_json::json!({"argv": ["x"], "stdin_base64": "!!"}),
            serde_json::json!({"argv": ["x"], "env": {"A=B": "1"}}),
            serde_json::json!({"argv": ["x"], "timeout_s": 0}),
            serde_json::json!({"argv": ["x"], "timeout_s": 100000}),
        ] {
            let e = ok(bad.clone()).err().unwrap_or_else(|| panic!("{bad}"));
            assert_eq!(e.0.code, ErrorCode::InvalidRequest, "{bad}");
        }
    }
}
