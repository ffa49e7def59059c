//! The TCP listener (`--listen`): plain on a loopback address, TLS
//! anywhere. The daemon accepts at most `MAX_CONNECTIONS` TCP connections
//! at a time (more wait in the kernel's backlog), runs at most
//! `MAX_HANDSHAKES` TLS handshakes at a time, each within
//! `HANDSHAKE_TIMEOUT`, and closes a connection whose request headers do
//! not arrive within `HEADER_TIMEOUT` (an idle keep-alive connection too),
//! so slow or silent clients cannot take the daemon's file descriptors,
//! memory or CPU.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// TCP connections served at a time, TLS or plain.
pub const MAX_CONNECTIONS: usize = 256;
/// TLS handshakes in flight at a time.
pub const MAX_HANDSHAKES: usize = 128;
/// The most a TLS handshake may take, waiting for a slot included.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a request's headers may take to arrive (on a kept-alive
/// connection, counted from the end of the previous response).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until the task is dropped; `tls` is the
/// server's TLS configuration, or None for plain HTTP.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<()> {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let acceptor = tls.map(TlsAcceptor::from);
    loop {
        let permit = connections
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed");
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // A connection reset before it was accepted, or out of file
                // descriptors: wait a little and go on.
                tracing::warn!("tcp accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let acceptor = acceptor.clone();
        let handshakes = handshakes.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Some(acceptor) = acceptor else {
                return connection(stream, router).await;
            };
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                let _slot = handshakes.acquire().await;
                acceptor.accept(stream).await
            })
            .await;
            match handshake {
                Ok(Ok(tls)) => connection(tls, router).await,
                Ok(Err(e)) => tracing::debug!("TLS handshake with {peer}: {e}"),
                Err(_) => tracing::debug!(
                    "TLS handshake with {peer}: not done within {HANDSHAKE_TIMEOUT:?}"
                ),
            }
        });
    }
}

/// HTTP/1.1 on one connection (with upgrades, for WebSockets).
async fn connection<S>(io: S, router: Router)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(router))
        .with_upgrades()
        .await;
    if let Err(e) = served {
        tracing::debug!("tcp connection: {e}");
    }
}
