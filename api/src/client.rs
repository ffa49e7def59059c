//! A typed client of the API over the daemon's Unix socket or TCP (with a
//! bearer token, plain or TLS), used by the CLI and the tests. One HTTP/1.1 connection
//! per request: the daemon is local, and this keeps the client stateless.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{ApiError, ErrorBody};
use crate::models::{ActionResult, Event, EventType, Host, Ping};
use crate::ndjson::NdjsonReader;
use crate::spec::{VmInfo, VmList, VmSpec};

/// Where the daemon answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    /// `host:port`, with the bearer token the listener wants.
    Tcp {
        addr: String,
        token: Option<String>,
    },
    /// `host:port` over TLS; `ca_cert` is the PEM file of the CA to trust
    /// (the daemon's own certificate when it is self-signed), else the
    /// system's trusted CAs.
    Https {
        addr: String,
        token: Option<String>,
        ca_cert: Option<PathBuf>,
    },
}

impl Endpoint {
    /// The endpoint of a URL: `https://HOST:PORT` (TLS), `http://HOST:PORT`
    /// or a bare `HOST:PORT` (plain TCP). A path, query or user part is
    /// refused; `ca_cert` only goes with https.
    pub fn from_url(
        url: &str,
        token: Option<String>,
        ca_cert: Option<PathBuf>,
    ) -> Result<Endpoint, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if url.contains("://") {
            return Err(format!("{url}: only http:// and https:// URLs"));
        } else {
            (false, url)
        };
        let addr = rest.strip_suffix('/').unwrap_or(rest);
        if addr.is_empty() || addr.contains(['/', '?', '#', '@']) {
            return Err(format!(
                "{url}: give the daemon's address only, as https://HOST:PORT"
            ));
        }
        let has_port = addr.rsplit_once(':').is_some_and(|(h, p)| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (!h.starts_with('[') || h.ends_with(']'))
        });
        let addr = if has_port {
            addr.to_owned()
        } else {
            format!("{addr}:{}", if tls { 443 } else { 80 })
        };
        if tls {
            crate::tls::server_name(&addr)?;
            Ok(Endpoint::Https {
                addr,
                token,
                ca_cert,
            })
        } else if let Some(ca) = ca_cert {
            Err(format!(
                "{url}: a CA certificate ({}) is for https:// URLs only",
                ca.display()
            ))
        } else {
            Ok(Endpoint::Tcp { addr, token })
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp { addr, .. } => write!(f, "tcp {addr}"),
            Endpoint::Https { addr, .. } => write!(f, "https://{addr}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the daemon at {endpoint}: {source} (is `kiln serve` running?)")]
    Connect {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("talking to the daemon: {0}")]
    Http(#[from] hyper::Error),
    #[error("{}", .error.chain())]
    Api { status: u16, error: ApiError },
    #[error("the daemon answered {status} with an unexpected body: {body}")]
    Unexpected { status: u16, body: String },
    /// A request this client cannot send, e.g. a token with a newline.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The console's WebSocket failed.
    #[error("console connection: {0}")]
    Console(String),
    /// TLS with the daemon failed: its configuration (the CA file) or the
    /// handshake (a certificate the trusted CAs did not sign, a name it
    /// does not carry, a listener that does not speak TLS).
    #[error("TLS with the daemon at {endpoint}: {message}")]
    Tls { endpoint: String, message: String },
}

impl ClientError {
    /// The API error, when the daemon answered with one.
    pub fn api(&self) -> Option<(u16, &ApiError)> {
        match self {
            ClientError::Api { status, error } => Some((*status, error)),
            _ => None,
        }
    }
}

/// A response as it came: status, content type and body.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
    /// The TLS configuration of an `Https` endpoint, made at its first
    /// request (it reads the CA file) and shared by the clones.
    tls: Arc<OnceLock<Result<Arc<rustls::ClientConfig>, String>>>,
}

/// Percent-encodes a path segment (VM names are plain, but a user may type
/// anything).
pub(crate) fn segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parameters of `GET /v1/events`.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub since: Option<u64>,
    pub vm: Option<String>,
    pub kind: Option<EventType>,
}

impl EventQuery {
    fn to_query(&self, follow: bool) -> String {
        let mut q = format!("follow={follow}");
        if let Some(s) = self.since {
            q.push_str(&format!("&since={s}"));
        }
        if let Some(vm) = &self.vm {
            q.push_str(&format!("&vm={}", segment(vm)));
        }
        if let Some(k) = self.kind {
            let name = serde_json::to_value(k).expect("event types serialize");
            q.push_str(&format!("&type={}", name.as_str().unwrap_or_default()));
        }
        q
    }
}

/// Followed events, one at a time.
pub struct EventStream {
    lines: NdjsonReader<Event>,
}

impl EventStream {
    /// The next event; None when the daemon ended the stream.
    pub async fn next(&mut self) -> Result<Option<Event>, ClientError> {
        self.lines.next().await
    }
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Client {
        Client {
            endpoint,
            tls: Arc::new(OnceLock::new()),
        }
    }

    /// A TLS connection to `addr`, checked against `ca_cert` (or the
    /// system's CAs); used by requests and the console's WebSocket alike.
    pub(crate) async fn tls_stream(
        &self,
        addr: &str,
        ca_cert: Option<&std::path::Path>,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, ClientError> {
        let config = self.tls_config(ca_cert)?;
        let tls_err = |message: String| ClientError::Tls {
            endpoint: self.endpoint.to_string(),
            message,
        };
        let name = crate::tls::server_name(addr).map_err(tls_err)?;
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect {
                endpoint: self.endpoint.to_string(),
                source,
            })?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
            .map_err(|e| tls_err(crate::tls::explain(e.to_string())))
    }

    pub(crate) fn tls_config(
        &self,
        ca_cert: Option<&std::path::Path>,
    ) -> Result<Arc<rustls::ClientConfig>, ClientError> {
        self.tls
            .get_or_init(|| crate::tls::client_config(ca_cert).map_err(|e| e.to_string()))
            .clone()
            .map_err(|message| ClientError::Tls {
                endpoint: self.endpoint.to_string(),
                message,
            })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        self.send_typed(method, path, body, "application/json")
            .await
    }

    /// `send` with a body of `content_type`.
    pub(crate) async fn send_typed(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        content_type: &str,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let connect_err = |source| ClientError::Connect {
            endpoint: self.endpoint.to_string(),
            source,
        };
        let mut req = Request::builder().method(method).uri(path);
        let sender = match &self.endpoint {
            Endpoint::Unix(p) => {
                let stream = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(connect_err)?;
                req = req.header(hyper::header::HOST, "localhost");
                handshake(stream).await?
            }
            Endpoint::Tcp { addr, token } => {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(connect_err)?;
                req = req.header(hyper::header::HOST, addr.as_str());
                if let Some(t) = token {
                    req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
                }
                handshake(stream).await?
            }
            Endpoint::Https {
                addr,
                token,
                ca_cert,
            } => {
                let stream = self.tls_stream(addr, ca_cert.as_deref()).await?;
                req = req.header(hyper::header::HOST, addr.as_str());
                if let Some(t) = token {
                    req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
                }
                handshake(stream).await?
            }
        };
        let mut sender = sender;
        let body = match body {
            Some(b) => {
                req = req.header(hyper::header::CONTENT_TYPE, content_type);
                Full::new(Bytes::from(b))
            }
            None => Full::new(Bytes::new()),
        };
        // A header value from the user (the token, the TCP address) may be
        // one HTTP cannot carry.
        let req = req
            .body(body)
            .map_err(|e| ClientError::InvalidRequest(e.to_string()))?;
        Ok(sender.send_request(req).await?)
    }

    /// Any request, its response as it came (for tests of bad requests).
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        let method =
            Method::from_bytes(method.as_bytes()).map_err(|_| ClientError::Unexpected {
                status: 0,
                body: format!("bad method {method:?}"),
            })?;
        let resp = self.send(method, path, body).await?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(RawResponse {
            status,
            content_type,
            body,
        })
    }

    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let raw = self.raw(method.as_str(), path, body).await?;
        decode(raw)
    }

    pub(crate) async fn call_json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes = serde_json::to_vec(body).expect("request bodies serialize");
        self.call(method, path, Some(bytes)).await
    }

    async fn text(&self, path: &str) -> Result<String, ClientError> {
        let raw = self.raw("GET", path, None).await?;
        if raw.status >= 300 {
            return Err(api_error(raw));
        }
        Ok(String::from_utf8_lossy(&raw.body).into_owned())
    }

    pub async fn ping(&self) -> Result<Ping, ClientError> {
        self.call(Method::GET, "/v1/ping", None).await
    }

    pub async fn host(&self) -> Result<Host, ClientError> {
        self.call(Method::GET, "/v1/host", None).await
    }

    pub async fn list(&self) -> Result<Vec<VmInfo>, ClientError> {
        let list: VmList = self.call(Method::GET, "/v1/vms", None).await?;
        Ok(list.vms)
    }

    pub async fn create(&self, spec: &VmSpec, start: bool) -> Result<VmInfo, ClientError> {
        self.call_json(Method::POST, &format!("/v1/vms?start={start}"), spec)
            .await
    }

    pub async fn get(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.call(Method::GET, &format!("/v1/vms/{}", segment(name)), None)
            .await
    }

    pub async fn replace(&self, name: &str, spec: &VmSpec) -> Result<VmInfo, ClientError> {
        self.call_json(Method::PUT, &format!("/v1/vms/{}", segment(name)), spec)
            .await
    }

    pub async fn delete(&self, name: &str, force: bool) -> Result<(), ClientError> {
        let raw = self
            .raw(
                "DELETE",
                &format!("/v1/vms/{}?force={force}", segment(name)),
                None,
            )
            .await?;
        if raw.status == 204 {
            Ok(())
        } else {
            Err(api_error(raw))
        }
    }

    /// `start`, `stop`, `pause`, `resume`: the action's result.
    pub async fn action(&self, name: &str, action: &str) -> Result<ActionResult, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/vms/{}/{}", segment(name), segment(action)),
            None,
        )
        .await
    }

    /// Sets the balloon target (MiB taken from the guest).
    pub async fn set_balloon(
        &self,
        name: &str,
        target_mib: u64,
    ) -> Result<kiln_vmm::protocol::BalloonInfo, ClientError> {
        self.call_json(
            Method::PUT,
            &format!("/v1/vms/{}/balloon", segment(name)),
            &crate::models::BalloonTarget { target_mib },
        )
        .await
    }

    /// vCPU, device and balloon counters of a running VM.
    pub async fn counters(&self, name: &str) -> Result<kiln_vmm::protocol::Counters, ClientError> {
        self.call(
            Method::GET,
            &format!("/v1/vms/{}/counters", segment(name)),
            None,
        )
        .await
    }

    /// The tail of the VM's serial console log.
    pub async fn console(&self, name: &str) -> Result<String, ClientError> {
        self.text(&format!("/v1/vms/{}/console", segment(name)))
            .await
    }

    /// The kept events matching `query`, without following.
    pub async fn events(&self, query: &EventQuery) -> Result<Vec<Event>, ClientError> {
        let raw = self
            .raw(
                "GET",
                &format!("/v1/events?{}", query.to_query(false)),
                None,
            )
            .await?;
        if raw.status >= 300 {
            return Err(api_error(raw));
        }
        raw.body
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                serde_json::from_slice(l).map_err(|e| ClientError::Unexpected {
                    status: raw.status,
                    body: format!("{e}: {}", String::from_utf8_lossy(l)),
                })
            })
            .collect()
    }

    /// Follows events matching `query` as they happen.
    pub async fn follow_events(&self, query: &EventQuery) -> Result<EventStream, ClientError> {
        let resp = self
            .send(
                Method::GET,
                &format!("/v1/events?{}", query.to_query(true)),
                None,
            )
            .await?;
        if resp.status() != StatusCode::OK {
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            return Err(api_error(RawResponse {
                status,
                content_type: None,
                body,
            }));
        }
        Ok(EventStream {
            lines: NdjsonReader::new(resp.into_body()),
        })
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        self.text("/metrics").await
    }

    /// Power button, then a hard stop after `timeout_s` (the daemon's
    /// default when None); the result's `outcome` says which ended it.
    pub async fn shutdown(
        &self,
        name: &str,
        timeout_s: Option<u64>,
    ) -> Result<ActionResult, ClientError> {
        self.call(Method::POST, &timed(name, "shutdown", timeout_s), None)
            .await
    }

    /// A shutdown (forced after `timeout_s`), then a fresh VMM.
    pub async fn reboot(
        &self,
        name: &str,
        timeout_s: Option<u64>,
    ) -> Result<ActionResult, ClientError> {
        self.call(Method::POST, &timed(name, "reboot", timeout_s), None)
            .await
    }

    /// Where `device`'s I/O worker runs and how it waits.
    pub async fn worker(
        &self,
        name: &str,
        device: &str,
    ) -> Result<kiln_vmm::protocol::WorkerInfo, ClientError> {
        self.call(Method::GET, &worker_path(name, device), None)
            .await
    }

    /// Moves `device`'s I/O worker.
    pub async fn set_worker(
        &self,
        name: &str,
        device: &str,
        placement: &crate::models::WorkerPlacement,
    ) -> Result<kiln_vmm::protocol::WorkerInfo, ClientError> {
        self.call_json(Method::PUT, &worker_path(name, device), placement)
            .await
    }
}

fn timed(name: &str, action: &str, timeout_s: Option<u64>) -> String {
    let mut path = format!("/v1/vms/{}/{action}", segment(name));
    if let Some(t) = timeout_s {
        path.push_str(&format!("?timeout_s={t}"));
    }
    path
}

fn worker_path(name: &str, device: &str) -> String {
    format!(
        "/v1/vms/{}/devices/{}/worker",
        segment(name),
        segment(device)
    )
}

async fn handshake<S>(
    stream: S,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // The connection ends with the request; its error, if any, is the
        // request's too.
        let _ = conn.await;
    });
    Ok(sender)
}

pub(crate) fn api_error(raw: RawResponse) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(&raw.body) {
        Ok(b) => ClientError::Api {
            status: raw.status,
            error: b.error,
        },
        Err(_) => ClientError::Unexpected {
            status: raw.status,
            body: String::from_utf8_lossy(&raw.body).into_owned(),
        },
    }
}

pub(crate) fn decode<T: DeserializeOwned>(raw: RawResponse) -> Result<T, ClientError> {
    if !(200..300).contains(&raw.status) {
        return Err(api_error(raw));
    }
    serde_json::from_slice(&raw.body).map_err(|e| ClientError::Unexpected {
        status: raw.status,
        body: format!("{e}: {}", String::from_utf8_lossy(&raw.body)),
    })
}

#[cfg(test)]
mod url_tests {
    use super::Endpoint;

    #[test]
    fn urls_give_plain_or_tls_endpoints() {
        let tcp = |a: &str| Endpoint::Tcp {
            addr: a.into(),
            token: None,
        };
        assert_eq!(
            Endpoint::from_url("127.0.0.1:8080", None, None),
            Ok(tcp("127.0.0.1:8080"))
        );
        assert_eq!(
            Endpoint::from_url("http://localhost:8080/", None, None),
            Ok(tcp("localhost:8080"))
        );
        assert_eq!(
            Endpoint::from_url("http://localhost", None, None),
            Ok(tcp("localhost:80"))
        );
        assert_eq!(
            Endpoint::from_url(
                "https://[::1]:8443",
                Some("t".into()),
                Some("/ca.pem".into())
            ),
            Ok(Endpoint::Https {
                addr: "[::1]:8443".into(),
                token: Some("t".into()),
                ca_cert: Some("/ca.pem".into()),
            })
        );
        assert_eq!(
            Endpoint::from_url("https://kiln.example", None, None),
            Ok(Endpoint::Https {
                addr: "kiln.example:443".into(),
                token: None,
                ca_cert: None,
            })
        );
        for bad in [
            "ftp://host:1",
            "https://host:1/v1/vms",
            "https://user@host:1",
            "https://",
            "https://bad host:1",
        ] {
            assert!(Endpoint::from_url(bad, None, None).is_err(), "{bad}");
        }
        let err = Endpoint::from_url("http://host:1", None, Some("/ca.pem".into())).unwrap_err();
        assert!(err.contains("https:// URLs only"), "{err}");
    }
}
