//! The host side of a VMM's userspace vsock (Kiln, Firecracker and Cloud
//! Hypervisor share the convention): the host connects to the VMM's Unix
//! socket, writes `CONNECT <guest port>\n` and gets `OK <host port>\n` once
//! the guest accepted; from then on the stream is the guest connection.
//! When nothing listens on the guest port (or the guest does not answer in
//! time), the VMM closes the socket without an `OK` line.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The `OK <port>\n` reply is short; a longer line is not the handshake.
const MAX_REPLY_LINE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("cannot connect to the VMM's vsock socket {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error(
        "nothing listens on guest port {port}, or the guest did not answer: the VMM's vsock socket {} {reply}",
        path.display()
    )]
    Refused {
        path: PathBuf,
        port: u32,
        reply: String,
    },
    #[error("vsock handshake on {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// Connects to guest `port` through the VMM's vsock Unix socket at `path`.
/// `read_timeout` bounds the wait for `OK` and stays set on the stream.
/// Returns the stream (positioned just after the `OK` line) and the host
/// port the VMM assigned.
pub fn connect(
    path: &Path,
    port: u32,
    read_timeout: Option<Duration>,
) -> Result<(UnixStream, u32), HandshakeError> {
    let mut stream = UnixStream::connect(path).map_err(|source| HandshakeError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let io_err = |source| HandshakeError::Io {
        path: path.to_path_buf(),
        source,
    };
    stream.set_read_timeout(read_timeout).map_err(io_err)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(io_err)?;
    let refused = |reply: String| HandshakeError::Refused {
        path: path.to_path_buf(),
        port,
        reply,
    };
    let line = match read_line(&mut stream) {
        Ok(Some(line)) => line,
        Ok(None) => return Err(refused("closed the connection without an OK line".into())),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            let waited = read_timeout
                .map(|d| format!(" within {:?}", d))
                .unwrap_or_default();
            return Err(refused(format!("sent no OK line{waited}")));
        }
        // A reset is how a VMM may drop a refused connection, too.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ) =>
        {
            return Err(refused(format!(
                "closed the connection without an OK line ({e})"
            )))
        }
        Err(e) => return Err(io_err(e)),
    };
    match parse_ok(&line) {
        Some(host_port) => Ok((stream, host_port)),
        None => Err(refused(format!(
            "replied {:?} instead of \"OK <port>\"",
            String::from_utf8_lossy(&line)
        ))),
    }
}

/// Reads one line byte by byte, so nothing after it (the guest's first
/// bytes) is consumed. `None`: EOF before a newline. A line longer than
/// [`MAX_REPLY_LINE`] is returned cut, without its end: it fails to parse.
fn read_line(stream: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < MAX_REPLY_LINE {
        match stream.read(&mut byte) {
            Ok(0) => return Ok(None),
            Ok(_) if byte[0] == b'\n' => return Ok(Some(line)),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(line))
}

/// `OK <port>` (a trailing CR tolerated) → the port.
pub fn parse_ok(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let port = text.strip_prefix("OK ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ok_lines() {
        assert_eq!(parse_ok(b"OK 1073741824"), Some(1073741824));
        assert_eq!(parse_ok(b"OK 7\r"), Some(7));
        for bad in [
            &b""[..],
            b"OK",
            b"OK ",
            b"OK x",
            b"OK -1",
            b"ok 5",
            b"OK 99999999999",
            b"NOPE 5",
            b"\xff",
        ] {
            assert_eq!(parse_ok(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn read_line_stops_at_the_newline_and_at_the_limit() {
        let mut input: &[u8] = b"OK 5\nagent bytes";
        assert_eq!(
            read_line(&mut input).expect("read").as_deref(),
            Some(&b"OK 5"[..])
        );
        assert_eq!(input, b"agent bytes", "must not read past the line");
        let mut eof: &[u8] = b"OK 5";
        assert_eq!(read_line(&mut eof).expect("read"), None);
        let long = vec![b'x'; 1000];
        let mut input: &[u8] = &long;
        assert_eq!(
            read_line(&mut input).expect("read").map(|l| l.len()),
            Some(MAX_REPLY_LINE)
        );
    }
}
