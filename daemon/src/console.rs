//! The live serial console: a VMM's console socket (its greeting, then the
//! raw bytes) bridged to a WebSocket, binary frames both ways.

use std::path::Path;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How long the VMM has to send its greeting.
const GREETING_WAIT: Duration = Duration::from_secs(5);
/// Longest greeting line read.
const GREETING_MAX: usize = 256;

/// Connects to a console socket and reads its greeting; an error (the
/// socket is not there, the console is busy) says why.
pub async fn connect(socket: &Path) -> Result<UnixStream, String> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("its console socket {}: {e}", socket.display()))?;
    let line = tokio::time::timeout(GREETING_WAIT, read_line(&mut stream))
        .await
        .map_err(|_| format!("its console sent no greeting within {GREETING_WAIT:?}"))?
        .map_err(|e| format!("reading its console greeting: {e}"))?;
    let expected = kiln_vmm::console_socket::attached_greeting();
    if line == expected.trim_end() {
        return Ok(stream);
    }
    Err(match line.strip_prefix("kiln-console 1 ") {
        Some(rest) => format!("console {rest}"),
        None => format!("unexpected console greeting {line:?}"),
    })
}

/// One line, byte by byte, so nothing after it is consumed.
async fn read_line(stream: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    loop {
        let b = stream.read_u8().await?;
        if b == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() >= GREETING_MAX {
            return Err(std::io::Error::other("greeting line too long"));
        }
        line.push(b);
    }
}

/// Copies console output to the WebSocket and its frames (binary or text)
/// to the console until either side ends.
pub async fn bridge(ws: WebSocket, console: UnixStream) {
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut con_rx, mut con_tx) = console.into_split();
    let output = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match con_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let frame = Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n]));
                    if ws_tx.send(frame).await.is_err() {
                        return;
                    }
                }
            }
        }
        // The VMM ended: say so to the client.
        let _ = ws_tx.send(Message::Close(None)).await;
    };
    let input = async {
        while let Some(Ok(msg)) = ws_rx.next().await {
            let data = match msg {
                Message::Binary(b) => b,
                Message::Text(t) => bytes::Bytes::copy_from_slice(t.as_str().as_bytes()),
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            if con_tx.write_all(&data).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = output => {}
        _ = input => {}
    }
}
