//! Reading a streamed answer of newline-delimited JSON (`/v1/events?follow`,
//! exec and apps/run with `?stream=true`) one typed line at a time.

use std::marker::PhantomData;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::de::DeserializeOwned;

use crate::client::ClientError;

/// The longest line taken from the daemon; a longer one is an error, not
/// an ever-growing buffer.
pub const MAX_LINE: usize = 16 << 20;

pub struct NdjsonReader<T> {
    body: Incoming,
    buf: Vec<u8>,
    _line: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> NdjsonReader<T> {
    pub fn new(body: Incoming) -> Self {
        NdjsonReader {
            body,
            buf: Vec::new(),
            _line: PhantomData,
        }
    }

    /// The next line; None when the daemon ended the answer.
    pub async fn next(&mut self) -> Result<Option<T>, ClientError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return parse_line(&line).map(Some);
            }
            if self.buf.len() > MAX_LINE {
                return Err(ClientError::Unexpected {
                    status: 200,
                    body: format!("a streamed line is longer than {MAX_LINE} bytes"),
                });
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

fn parse_line<T: DeserializeOwned>(line: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(line).map_err(|e| ClientError::Unexpected {
        status: 200,
        body: format!("{e}: {}", String::from_utf8_lossy(line)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Event;

    #[test]
    fn a_line_that_is_not_the_type_names_itself() {
        let err = parse_line::<Event>(b"{\"seq\":1}\n").unwrap_err();
        assert!(err.to_string().contains("{\"seq\":1}"), "{err}");
    }
}
