//! Length-prefixed framing: a 4-byte big-endian length, then the JSON body.

use std::io::{self, Read, Write};

use serde::Serialize;

/// Frames whose announced length is above the limit but at most this many
/// bytes are read and thrown away so the connection stays usable; beyond it
/// the connection is closed after the error reply (draining gigabytes from a
/// hostile peer is not worth it).
pub const MAX_DRAIN: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("I/O error on the connection: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed inside a frame ({got} of {expected} bytes)")]
    Truncated { expected: u64, got: u64 },
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("could not encode message: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Reads one frame. `Ok(None)` means the peer closed the connection cleanly
/// between frames.
pub fn read_frame(r: &mut impl Read, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; 4];
    let got = read_full(r, &mut header)?;
    if got == 0 {
        return Ok(None);
    }
    if got < header.len() {
        return Err(FrameError::Truncated {
            expected: 4,
            got: got as u64,
        });
    }
    let len = u64::from(u32::from_be_bytes(header));
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max as u64 {
        return Err(FrameError::TooLarge { len, max });
    }
    // len <= max fits in usize because max is a usize.
    let mut body = vec![0u8; len as usize];
    let got = read_full(r, &mut body)?;
    if got < body.len() {
        return Err(FrameError::Truncated {
            expected: len,
            got: got as u64,
        });
    }
    Ok(Some(body))
}

/// Reads and drops `len` bytes (the body of a frame that was too large).
pub fn discard(r: &mut impl Read, len: u64) -> Result<(), FrameError> {
    let copied = io::copy(&mut r.take(len), &mut io::sink())?;
    if copied < len {
        return Err(FrameError::Truncated {
            expected: len,
            got: copied,
        });
    }
    Ok(())
}

/// Writes `body` as one frame with a single write call where possible.
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> Result<(), FrameError> {
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge {
        len: body.len() as u64,
        max: u32::MAX as usize,
    })?;
    let mut buf = Vec::with_capacity(body.len() + 4);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Serialises `msg` as JSON and writes it as one frame.
pub fn write_json(w: &mut impl Write, msg: &impl Serialize) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    write_frame(w, &body)
}

/// Like `read_exact`, but reports how much was read before EOF instead of
/// failing, so callers can tell a clean close from a truncated frame.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn round_trip_and_clean_eof() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b"hello").expect("write");
        write_frame(&mut wire, b"{}").expect("write");
        let mut r = Cursor::new(wire);
        assert_eq!(
            read_frame(&mut r, 100).expect("read"),
            Some(b"hello".to_vec())
        );
        assert_eq!(read_frame(&mut r, 100).expect("read"), Some(b"{}".to_vec()));
        assert_eq!(read_frame(&mut r, 100).expect("read"), None);
    }

    #[test]
    fn truncated_header_and_body_are_errors() {
        let mut r = Cursor::new(vec![0u8, 0]);
        assert!(matches!(
            read_frame(&mut r, 100),
            Err(FrameError::Truncated { .. })
        ));
        let mut r = Cursor::new(vec![0u8, 0, 0, 10, b'a', b'b']);
        assert!(matches!(
            read_frame(&mut r, 100),
            Err(FrameError::Truncated {
                expected: 10,
                got: 2
            })
        ));
    }

    #[test]
    fn oversized_and_empty_frames_are_rejected_before_allocation() {
        let mut r = Cursor::new(u32::MAX.to_be_bytes().to_vec());
        assert!(matches!(
            read_frame(&mut r, 1024),
            Err(FrameError::TooLarge { len, max: 1024 }) if len == u64::from(u32::MAX)
        ));
        let mut r = Cursor::new(vec![0u8; 4]);
        assert!(matches!(read_frame(&mut r, 1024), Err(FrameError::Empty)));
    }
}
