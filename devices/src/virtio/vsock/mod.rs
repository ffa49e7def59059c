//! virtio-vsock (virtio 1.2, section 5.10) bridged to host Unix sockets,
//! with Firecracker's conventions:
//!
//! - **Host to guest:** a host program connects to the Unix socket at
//!   `uds_path` and writes `CONNECT <port>\n`. The device sends the guest a
//!   REQUEST for that port from a fresh host port (counting up from
//!   2^30); when the guest accepts, the program reads `OK <host_port>\n`
//!   and from then on the socket is the stream. If nothing listens on the
//!   guest port (the guest answers RST), or the guest does not answer
//!   within 2 s, or the line is malformed or longer than 32 bytes, the
//!   device closes the program's socket.
//! - **Guest to host:** a guest connect to CID 2 (the host), port `P`
//!   makes the device connect to the Unix socket `<uds_path>_P`; if that
//!   fails, the guest gets a RST (connection refused).
//!
//! Streams are relayed both ways with virtio's credit flow control: the
//! device never sends more than the guest's free credit and stops reading
//! a host socket while the guest cannot take more, and it advertises a
//! 256 KiB buffer per connection, which bounds what it holds for a host
//! socket that does not read. Closing either side half-closes (SHUTDOWN);
//! at most [`MAX_CONNECTIONS`] connections (1024) are open at once, each
//! holding at most 256 KiB of guest data for a slow host reader.
//!
//! Modules: [`packet`] (the wire header), [`connect_line`] (the host
//! handshake), [`connection`] (one stream), [`muxer`] (the host sockets
//! and what goes to the guest next), [`worker`] (the queues).

pub mod connect_line;
pub mod connection;
pub mod muxer;
pub mod packet;
mod warn_once;
pub mod worker;

#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::options::{from_options, OptionsError};
use super::worker::{Placement, Worker, WorkerControl};
use super::{device_type, features, ActivateError, DeviceContext, VirtioDevice};
pub use muxer::{FIRST_LOCAL_PORT, MAX_CONNECTIONS};
use worker::{VsockWorker, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};

/// Size of each of the three queues (rx, tx, event).
pub const QUEUE_SIZE: u16 = 256;

/// `--vsock cid=3,uds=/tmp/kiln.vsock[,id=vsock0]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's CID: 3 or more (0-2 are reserved), below 2^32 - 1.
    #[serde(alias = "cid", deserialize_with = "guest_cid")]
    pub guest_cid: u64,
    /// The host Unix socket host programs connect to; guest connections to
    /// host port P go to `<uds_path>_P`.
    #[serde(alias = "uds", deserialize_with = "super::options::non_empty_path")]
    pub uds_path: PathBuf,
    /// The device name; `vsock0` when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
}

/// The device name when the config leaves `id` empty.
pub const DEFAULT_ID: &str = "vsock0";

fn guest_cid<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let cid = u64::deserialize(d)?;
    if !(3..u64::from(u32::MAX)).contains(&cid) {
        return Err(serde::de::Error::custom(
            "must be at least 3 and below 4294967295",
        ));
    }
    Ok(cid)
}

impl VsockConfig {
    pub fn validate(&self) -> Result<(), VsockError> {
        if self.guest_cid < 3 || self.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(self.guest_cid));
        }
        if self.uds_path.as_os_str().is_empty() {
            return Err(VsockError::EmptyPath);
        }
        Ok(())
    }
}

impl FromStr for VsockConfig {
    type Err = OptionsError;

    /// `cid=3,uds=/tmp/kiln.vsock[,id=vsock0]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        from_options(s)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved or out of range (3 to 4294967294)")]
    InvalidCid(u64),
    #[error("the vsock Unix socket path is empty")]
    EmptyPath,
    #[error("{0} exists and is not a Unix socket; not replacing it")]
    NotASocket(PathBuf),
    #[error("{0} is in use: something listens on it")]
    InUse(PathBuf),
    #[error("cannot inspect {0}: {1}")]
    Inspect(PathBuf, #[source] io::Error),
    #[error("cannot listen on {0}: {1}")]
    Bind(PathBuf, #[source] io::Error),
    #[error("cannot create the vsock worker control: {0}")]
    Control(#[source] io::Error),
}

/// The virtio-vsock device.
pub struct Vsock {
    config: VsockConfig,
    /// Kept across resets: host programs may connect any time.
    listener: UnixListener,
    /// Device and inode of the socket file we created, to remove it on drop
    /// only if it is still ours.
    socket_file: (u64, u64),
    control: WorkerControl,
    worker: Option<Worker>,
    limits: muxer::Limits,
}

impl Vsock {
    /// Validates `config` and listens on `config.uds_path`, replacing a
    /// stale socket file there (one nothing listens on).
    pub fn new(mut config: VsockConfig) -> Result<Vsock, VsockError> {
        config.validate()?;
        if config.id.is_empty() {
            config.id = DEFAULT_ID.into();
        }
        let path = config.uds_path.clone();
        remove_stale_socket(&path)?;
        let listener = UnixListener::bind(&path).map_err(|e| VsockError::Bind(path.clone(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| VsockError::Bind(path.clone(), e))?;
        let md =
            std::fs::symlink_metadata(&path).map_err(|e| VsockError::Inspect(path.clone(), e))?;
        let control = WorkerControl::new(Placement::default()).map_err(VsockError::Control)?;
        Ok(Vsock {
            config,
            listener,
            socket_file: (md.dev(), md.ino()),
            control,
            worker: None,
            limits: muxer::Limits::default(),
        })
    }

    pub fn config(&self) -> &VsockConfig {
        &self.config
    }

    /// The handle to move this device's I/O worker at runtime.
    pub fn worker_control(&self) -> WorkerControl {
        self.control.clone()
    }

    #[cfg(test)]
    fn set_max_connections(&mut self, n: usize) {
        self.limits.max_connections = n;
    }

    #[cfg(test)]
    fn set_timeouts(&mut self, connect: std::time::Duration, shutdown: std::time::Duration) {
        self.limits.connect_timeout = connect;
        self.limits.shutdown_timeout = shutdown;
    }

    fn stop_worker(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }
}

/// Makes room for our socket: nothing there is fine, a socket nobody
/// listens on is removed, anything else is an error.
fn remove_stale_socket(path: &Path) -> Result<(), VsockError> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(VsockError::Inspect(path.into(), e)),
    };
    if !md.file_type().is_socket() {
        return Err(VsockError::NotASocket(path.into()));
    }
    match muxer::connect_unix(path) {
        Ok(_) => Err(VsockError::InUse(path.into())),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(VsockError::InUse(path.into())),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            std::fs::remove_file(path).map_err(|e| VsockError::Inspect(path.into(), e))
        }
        Err(e) => Err(VsockError::Inspect(path.into(), e)),
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn name(&self) -> &str {
        &self.config.id
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        // VIRTIO_VSOCK_F_STREAM is implied by the absence of SEQPACKET.
        features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, mut ctx: DeviceContext) -> Result<(), ActivateError> {
        self.stop_worker();
        let event_idx = ctx.acked_features & features::RING_EVENT_IDX != 0;
        let mut rx = ctx
            .take_queue(RX_QUEUE)
            .ok_or(ActivateError::MissingQueue(RX_QUEUE))?;
        let mut tx = ctx
            .take_queue(TX_QUEUE)
            .ok_or(ActivateError::MissingQueue(TX_QUEUE))?;
        let event = ctx.take_queue(EVENT_QUEUE);
        use virtio_queue::QueueT;
        rx.queue.set_event_idx(event_idx);
        tx.queue.set_event_idx(event_idx);
        let listener = self.listener.try_clone().map_err(ActivateError::Worker)?;
        let muxer = muxer::Muxer::new(
            self.config.guest_cid,
            self.config.uds_path.clone(),
            Some(listener),
            muxer::connect_unix,
            self.limits,
        )
        .map_err(ActivateError::Worker)?;
        let handler = VsockWorker::new(
            ctx.mem,
            (rx.queue, rx.kick),
            (tx.queue, tx.kick),
            event.map(|e| e.kick),
            ctx.interrupt,
            muxer,
        );
        let worker = Worker::spawn(&self.config.id, handler, self.control.clone())
            .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        // Stopping the worker drops every connection; nothing is sent.
        self.stop_worker();
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop_worker();
        let path = &self.config.uds_path;
        if let Ok(md) = std::fs::symlink_metadata(path) {
            if (md.dev(), md.ino()) == self.socket_file {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Entry points for `cargo fuzz`: they never panic.
#[doc(hidden)]
pub mod fuzzing {
    use std::cell::RefCell;
    use std::io::{self, Write};
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};

    use super::connect_line::{self, LineBuf, LineState, MAX_LINE};
    use super::connection::RxFill;
    use super::muxer::{Limits, Muxer};
    use super::packet::{read_packet, HEADER_SIZE, MAX_PAYLOAD};

    const GUEST_CID: u64 = 3;

    thread_local! {
        /// Host ends of the socket pairs fuzzed connections use.
        static PEERS: RefCell<Vec<UnixStream>> = const { RefCell::new(Vec::new()) };
    }

    /// Every guest connect "succeeds" on a socket pair whose host end we
    /// keep, so the fuzzer reaches the connection state machine.
    fn pair_connector(_: &Path) -> io::Result<UnixStream> {
        let (ours, theirs) = UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        theirs.set_nonblocking(true)?;
        PEERS.with(|p| p.borrow_mut().push(theirs));
        Ok(ours)
    }

    /// Feeds `data` as a sequence of tx packets (header, then `len` bytes of
    /// payload) to a muxer, draining what it answers after each.
    pub fn tx_packet(data: &[u8]) {
        let Ok(mut muxer) = Muxer::new(
            GUEST_CID,
            PathBuf::from("/nonexistent/kiln-fuzz"),
            None,
            pair_connector,
            Limits {
                max_connections: 16,
                ..Limits::default()
            },
        ) else {
            return;
        };
        let mut rest = data;
        let mut payload = Vec::new();
        for _ in 0..64 {
            if rest.is_empty() {
                break;
            }
            let mut reader = rest;
            match read_packet(&mut reader, rest.len(), &mut payload) {
                Ok(hdr) => {
                    muxer.handle_guest_packet(&hdr, &payload);
                    let used = HEADER_SIZE + (hdr.len as usize).min(MAX_PAYLOAD);
                    rest = &rest[used.min(rest.len())..];
                }
                Err((hdr, _)) => {
                    muxer.reject_packet(hdr.as_ref());
                    break;
                }
            }
            // Host data on every open connection, to reach the rx path.
            PEERS.with(|p| {
                for peer in p.borrow_mut().iter_mut() {
                    let _ = peer.write(&rest[..rest.len().min(64)]);
                }
            });
            muxer.handle_backend_events();
            let mut buf = Vec::with_capacity(4096);
            for _ in 0..64 {
                buf.clear();
                match muxer.fill_rx(&mut buf, 4096) {
                    Ok(RxFill::Packet(_)) => {}
                    _ => break,
                }
            }
        }
        PEERS.with(|p| p.borrow_mut().clear());
    }

    /// Parses `data` as a CONNECT line, whole and byte-chunked as it would
    /// arrive from a socket.
    pub fn connect_line(data: &[u8]) {
        let _ = connect_line::parse(data);
        let mut line = LineBuf::default();
        let mut rest = data;
        while !rest.is_empty() {
            let peek = &rest[..rest.len().min(MAX_LINE)];
            let n = line.take_len(peek).max(1).min(rest.len());
            match line.push(&rest[..n]) {
                LineState::Incomplete => rest = &rest[n..],
                _ => break,
            }
        }
    }
}
