//! The typed client's calls into guests: `exec` and `apps/run`, buffered or
//! streamed (NDJSON lines as output arrives).

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};

use crate::client::{api_error, decode, segment, Client, ClientError, RawResponse};
use crate::exec::{ExecLine, ExecRequest, ExecResult};
use crate::ndjson::NdjsonReader;

/// A Windows program to run with `apps/run`.
#[derive(Debug, Clone)]
pub struct AppRun {
    /// The file name the program gets in the guest (`app.exe` when empty).
    pub file_name: String,
    /// The `.exe` itself.
    pub exe: Vec<u8>,
    pub args: Vec<String>,
    pub timeout_s: Option<u64>,
}

impl AppRun {
    fn query(&self, stream: bool) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        if !self.file_name.is_empty() {
            q.append_pair("name", &self.file_name);
        }
        for a in &self.args {
            q.append_pair("arg", a);
        }
        if let Some(t) = self.timeout_s {
            q.append_pair("timeout_s", &t.to_string());
        }
        if stream {
            q.append_pair("stream", "true");
        }
        q.finish()
    }
}

/// The lines of a streamed answer, one at a time.
pub struct ExecStream {
    lines: NdjsonReader<ExecLine>,
    done: bool,
}

impl ExecStream {
    /// The next line; None after the `exit` or `error` line, or when the
    /// daemon ended the answer.
    pub async fn next(&mut self) -> Result<Option<ExecLine>, ClientError> {
        if self.done {
            return Ok(None);
        }
        let line = self.lines.next().await?;
        self.done = matches!(
            line,
            None | Some(ExecLine::Exit(_) | ExecLine::Error { .. })
        );
        Ok(line)
    }
}

impl Client {
    /// Runs a program in the VM's guest through its agent; the whole output.
    pub async fn exec(&self, name: &str, req: &ExecRequest) -> Result<ExecResult, ClientError> {
        let body = serde_json::to_vec(req).expect("requests serialize");
        let path = format!("/v1/vms/{}/exec", segment(name));
        self.buffered(&path, body, "application/json").await
    }

    /// Runs a program, its output streamed as it arrives.
    pub async fn exec_stream(
        &self,
        name: &str,
        req: &ExecRequest,
    ) -> Result<ExecStream, ClientError> {
        let body = serde_json::to_vec(req).expect("requests serialize");
        let path = format!("/v1/vms/{}/exec?stream=true", segment(name));
        self.streamed(&path, body, "application/json").await
    }

    /// Uploads a Windows program and runs it under Wine in the guest.
    pub async fn run_app(&self, name: &str, app: &AppRun) -> Result<ExecResult, ClientError> {
        let path = format!("/v1/vms/{}/apps/run?{}", segment(name), app.query(false));
        self.buffered(&path, app.exe.clone(), "application/octet-stream")
            .await
    }

    /// `run_app`, its output streamed as it arrives.
    pub async fn run_app_stream(
        &self,
        name: &str,
        app: &AppRun,
    ) -> Result<ExecStream, ClientError> {
        let path = format!("/v1/vms/{}/apps/run?{}", segment(name), app.query(true));
        self.streamed(&path, app.exe.clone(), "application/octet-stream")
            .await
    }

    async fn buffered(
        &self,
        path: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<ExecResult, ClientError> {
        let resp = self
            .send_typed(Method::POST, path, Some(body), content_type)
            .await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        decode(RawResponse {
            status,
            content_type: None,
            body,
        })
    }

    async fn streamed(
        &self,
        path: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<ExecStream, ClientError> {
        let resp = self
            .send_typed(Method::POST, path, Some(body), content_type)
            .await?;
        if resp.status() != StatusCode::OK {
            let status = resp.status().as_u16();
            let body: Bytes = resp.into_body().collect().await?.to_bytes();
            return Err(api_error(RawResponse {
                status,
                content_type: None,
                body,
            }));
        }
        Ok(ExecStream {
            lines: NdjsonReader::new(resp.into_body()),
            done: false,
        })
    }
}
