//! The one-line handshake a host program sends on the device's Unix
//! socket before it talks to the guest: `CONNECT <port>\n`.

/// Longest line accepted, newline included; anything longer without a
/// newline is refused.
pub const MAX_LINE: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LineError {
    #[error("no newline within {MAX_LINE} bytes")]
    TooLong,
    #[error("expected \"CONNECT <port>\"")]
    Malformed,
}

/// Parses one complete line (with or without its trailing `\n`, an
/// optional `\r` before it) into the guest port it names.
pub fn parse(line: &[u8]) -> Result<u32, LineError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = std::str::from_utf8(line).map_err(|_| LineError::Malformed)?;
    let port = text.strip_prefix("CONNECT ").ok_or(LineError::Malformed)?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(LineError::Malformed);
    }
    port.parse::<u32>().map_err(|_| LineError::Malformed)
}

/// Collects the line as it trickles in.
#[derive(Debug, Default)]
pub struct LineBuf {
    buf: Vec<u8>,
}

/// What the collected bytes amount to so far.
#[derive(Debug, PartialEq, Eq)]
pub enum LineState {
    Incomplete,
    Port(u32),
    Error(LineError),
}

impl LineBuf {
    /// How many of the peeked bytes `peek` to consume: up to and including
    /// the first newline, or all of them if none (never past the line, so
    /// that stream data following it stays in the socket).
    pub fn take_len(&self, peek: &[u8]) -> usize {
        let room = MAX_LINE.saturating_sub(self.buf.len());
        let peek = &peek[..peek.len().min(room)];
        match peek.iter().position(|&b| b == b'\n') {
            Some(i) => i + 1,
            None => peek.len(),
        }
    }

    /// Adds consumed bytes; returns the state after them.
    pub fn push(&mut self, bytes: &[u8]) -> LineState {
        for &b in bytes {
            if self.buf.len() >= MAX_LINE {
                return LineState::Error(LineError::TooLong);
            }
            self.buf.push(b);
            if b == b'\n' {
                return match parse(&self.buf) {
                    Ok(port) => LineState::Port(port),
                    Err(e) => LineState::Error(e),
                };
            }
        }
        if self.buf.len() >= MAX_LINE {
            LineState::Error(LineError::TooLong)
        } else {
            LineState::Incomplete
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good_lines_and_rejects_bad_ones() {
        assert_eq!(parse(b"CONNECT 52\n"), Ok(52));
        assert_eq!(parse(b"CONNECT 4294967295\r\n"), Ok(u32::MAX));
        for bad in [
            &b"CONNECT\n"[..],
            b"CONNECT 4294967296\n",
            b"connect 5\n",
            b"CONNECT +5\n",
            b"CONNECT  5\n",
            b"CONNECT 5 \n",
            b"\xff\n",
        ] {
            assert_eq!(parse(bad), Err(LineError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn line_buffer_stops_at_newline_and_bounds_length() {
        let mut l = LineBuf::default();
        assert_eq!(l.take_len(b"CONN"), 4);
        assert_eq!(l.push(b"CONN"), LineState::Incomplete);
        assert_eq!(l.take_len(b"ECT 7\nextra data"), 6);
        assert_eq!(l.push(b"ECT 7\n"), LineState::Port(7));

        let mut l = LineBuf::default();
        let long = [b'A'; 40];
        let n = l.take_len(&long);
        assert_eq!(n, MAX_LINE);
        assert_eq!(l.push(&long[..n]), LineState::Error(LineError::TooLong));
    }
}
