//! A small blocking client: connect, read the hello, one request at a time.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::{
    encode_line, BalloonInfo, Counters, ErrorBody, Hello, HelloLine, Outcome, Request, RequestLine,
    ResponseLine, Status, WaitKind, WorkerInfo, MAX_LINE, VERSION,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the VMM closed the connection")]
    Closed,
    #[error("the VMM sent a line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("the VMM sent something unexpected: {0}")]
    Protocol(String),
    #[error("the VMM speaks protocol {got}, this client {VERSION}")]
    Version { got: u32 },
    /// The VMM answered with an error.
    #[error("{0}")]
    Vmm(ErrorBody),
}

/// One connection to a VMM's control socket.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    hello: Hello,
    next_id: u64,
}

impl Client {
    /// Connects and reads the hello. The server refuses a client beyond
    /// its limit with an error line, returned here as [`ClientError::Vmm`].
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut client = Client {
            reader: BufReader::new(stream),
            writer,
            hello: Hello {
                protocol: 0,
                build_id: String::new(),
                pid: 0,
            },
            next_id: 1,
        };
        let line = client.read_line()?;
        if let Ok(hello) = serde_json::from_str::<HelloLine>(&line) {
            if hello.hello.protocol != VERSION {
                return Err(ClientError::Version {
                    got: hello.hello.protocol,
                });
            }
            client.hello = hello.hello;
            return Ok(client);
        }
        match serde_json::from_str::<ResponseLine>(&line) {
            Ok(ResponseLine {
                outcome: Outcome::Error(e),
                ..
            }) => Err(ClientError::Vmm(e)),
            _ => Err(ClientError::Protocol(format!(
                "expected a hello, got {line}"
            ))),
        }
    }

    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    fn read_line(&mut self) -> Result<String, ClientError> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut line)?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        if n > MAX_LINE {
            return Err(ClientError::LineTooLong);
        }
        Ok(line)
    }

    /// Sends `request` and returns its result as JSON.
    pub fn call(&mut self, request: &Request) -> Result<serde_json::Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let line = encode_line(&RequestLine {
            id,
            request: request.clone(),
        });
        self.writer.write_all(line.as_bytes())?;
        let answer = self.read_line()?;
        let response: ResponseLine = serde_json::from_str(&answer)
            .map_err(|e| ClientError::Protocol(format!("{e}: {}", answer.trim())))?;
        if response.id != Some(id) {
            return Err(ClientError::Protocol(format!(
                "answer for request {:?}, expected {id}",
                response.id
            )));
        }
        match response.outcome {
            Outcome::Result(value) => Ok(value),
            Outcome::Error(e) => Err(ClientError::Vmm(e)),
        }
    }

    fn typed<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T, ClientError> {
        let value = self.call(request)?;
        serde_json::from_value(value).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub fn status(&mut self) -> Result<Status, ClientError> {
        self.typed(&Request::Status {})
    }

    pub fn pause(&mut self) -> Result<Status, ClientError> {
        self.typed(&Request::Pause {})
    }

    pub fn resume(&mut self) -> Result<Status, ClientError> {
        self.typed(&Request::Resume {})
    }

    pub fn stop(&mut self) -> Result<(), ClientError> {
        self.call(&Request::Stop {}).map(|_| ())
    }

    pub fn set_balloon_target(&mut self, mib: u64) -> Result<BalloonInfo, ClientError> {
        self.typed(&Request::SetBalloonTarget { mib })
    }

    pub fn balloon_stats(&mut self) -> Result<BalloonInfo, ClientError> {
        self.typed(&Request::BalloonStats {})
    }

    pub fn workers(&mut self) -> Result<Vec<WorkerInfo>, ClientError> {
        self.typed(&Request::Workers {})
    }

    pub fn set_worker_placement(
        &mut self,
        device: &str,
        cpus: Option<Vec<usize>>,
        wait: WaitKind,
        spin_us: Option<u64>,
    ) -> Result<WorkerInfo, ClientError> {
        self.typed(&Request::SetWorkerPlacement {
            device: device.into(),
            cpus,
            wait,
            spin_us,
        })
    }

    pub fn counters(&mut self) -> Result<Counters, ClientError> {
        self.typed(&Request::Counters {})
    }
}
