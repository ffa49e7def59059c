//! The client side of the live console (`GET /v1/vms/{id}/console/attach`):
//! a WebSocket over the daemon's Unix socket, TCP or TLS, split into the bytes
//! typed into the guest and the guest's output.

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::client::{api_error, segment, Client, ClientError, Endpoint, RawResponse};

/// A byte stream the WebSocket runs over (Unix or TCP).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Ws = WebSocketStream<Box<dyn Io>>;

/// An attached console; [`ConsoleSession::split`] it to type and read at
/// the same time.
pub struct ConsoleSession {
    ws: Ws,
}

/// Types into the guest.
pub struct ConsoleInput {
    sink: SplitSink<Ws, Message>,
}

/// The guest's output.
pub struct ConsoleOutput {
    stream: SplitStream<Ws>,
}

fn ws_error(e: tungstenite::Error) -> ClientError {
    match e {
        // The daemon answered the upgrade with an error (not running, busy).
        tungstenite::Error::Http(resp) => {
            let status = resp.status().as_u16();
            let body = Bytes::from(resp.into_body().unwrap_or_default());
            api_error(RawResponse {
                status,
                content_type: None,
                body,
            })
        }
        other => ClientError::Console(other.to_string()),
    }
}

impl Client {
    /// Attaches to a running VM's serial console.
    pub async fn attach_console(&self, name: &str) -> Result<ConsoleSession, ClientError> {
        let path = format!("/v1/vms/{}/console/attach", segment(name));
        let connect_err = |source| ClientError::Connect {
            endpoint: self.endpoint().to_string(),
            source,
        };
        let invalid = |e: tungstenite::Error| ClientError::InvalidRequest(e.to_string());
        let (stream, request): (Box<dyn Io>, _) = match self.endpoint() {
            Endpoint::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(connect_err)?;
                let req = format!("ws://localhost{path}")
                    .into_client_request()
                    .map_err(invalid)?;
                (Box::new(s), req)
            }
            Endpoint::Tcp { addr, token } => {
                let s = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(connect_err)?;
                let mut req = format!("ws://{addr}{path}")
                    .into_client_request()
                    .map_err(invalid)?;
                bearer(&mut req, token.as_deref())?;
                (Box::new(s), req)
            }
            Endpoint::Https {
                addr,
                token,
                ca_cert,
            } => {
                let s = self.tls_stream(addr, ca_cert.as_deref()).await?;
                let mut req = format!("ws://{addr}{path}")
                    .into_client_request()
                    .map_err(invalid)?;
                bearer(&mut req, token.as_deref())?;
                (Box::new(s), req)
            }
        };
        // Over our own stream: the URL gives only the path and the Host.
        let (ws, _) = tokio_tungstenite::client_async(request, stream)
            .await
            .map_err(ws_error)?;
        Ok(ConsoleSession { ws })
    }
}

/// `Authorization: Bearer <token>` on the upgrade request.
fn bearer(
    req: &mut tungstenite::handshake::client::Request,
    token: Option<&str>,
) -> Result<(), ClientError> {
    if let Some(t) = token {
        let value = format!("Bearer {t}")
            .parse()
            .map_err(|e| ClientError::InvalidRequest(format!("token: {e}")))?;
        req.headers_mut()
            .insert(tungstenite::http::header::AUTHORIZATION, value);
    }
    Ok(())
}

impl ConsoleSession {
    pub fn split(self) -> (ConsoleInput, ConsoleOutput) {
        let (sink, stream) = self.ws.split();
        (ConsoleInput { sink }, ConsoleOutput { stream })
    }
}

impl ConsoleInput {
    /// Types `bytes` into the guest (one binary frame).
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.sink
            .send(Message::Binary(Bytes::copy_from_slice(bytes)))
            .await
            .map_err(ws_error)
    }

    /// Detaches: a close frame, then the connection ends.
    pub async fn close(&mut self) -> Result<(), ClientError> {
        match self.sink.send(Message::Close(None)).await {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed) => Ok(()),
            Err(e) => Err(ws_error(e)),
        }
    }
}

impl ConsoleOutput {
    /// The next output bytes; `None` once the console closed (the VM
    /// stopped or the daemon went away).
    pub async fn next(&mut self) -> Result<Option<Bytes>, ClientError> {
        loop {
            match self.stream.next().await {
                None => return Ok(None),
                Some(Ok(Message::Binary(b))) => return Ok(Some(b)),
                Some(Ok(Message::Text(t))) => {
                    return Ok(Some(Bytes::copy_from_slice(t.as_str().as_bytes())))
                }
                Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Ok(_)) => continue,
                Some(Err(
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                )) => return Ok(None),
                Some(Err(e)) => return Err(ws_error(e)),
            }
        }
    }
}
