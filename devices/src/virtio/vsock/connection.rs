//! One vsock stream bridged to one host Unix socket: its state, the credit
//! accounting both ways, and the bytes waiting for the host to read them.
//!
//! Credit (virtio 1.2, 5.10.6.3): each side advertises `buf_alloc` (its
//! receive buffer) and `fwd_cnt` (bytes it has consumed). The sender may
//! have at most `buf_alloc - (tx_cnt - fwd_cnt)` bytes in flight. We never
//! send the guest more than its free credit, and we buffer what the guest
//! sends us (when the host socket is full) up to the `BUF_ALLOC` we
//! advertise, so the guest's credit bounds our memory.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::packet::*;

/// Receive buffer we advertise per connection: the most guest bytes we
/// hold for a host socket that does not read (the Linux default size).
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Tell the guest about freed buffer space once this much was forwarded
/// since we last told it (every packet we send carries `fwd_cnt`).
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;
/// How long a host-initiated connection waits for the guest's RESPONSE
/// (Firecracker's figure).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a closing connection waits (for the guest's RST, or for the
/// host to read what the guest sent before its SHUTDOWN) before we reset.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection's identity: our (host) port and the guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest.
    LocalInit,
    Established,
    /// A RST is queued; the connection goes once it was sent.
    Closing,
    /// Finished (guest RST, or our RST sent): remove it.
    Dead,
}

/// The result of asking a connection for one packet to the guest.
pub enum RxFill {
    Packet(usize),
    Nothing,
}

pub struct Connection {
    pub key: ConnKey,
    guest_cid: u64,
    stream: UnixStream,
    pub state: State,

    // Control packets waiting for an rx buffer.
    pending_request: bool,
    pending_response: bool,
    pending_rst: bool,
    pending_shutdown: u32,
    pending_credit_update: bool,
    pending_credit_request: bool,

    // Host -> guest.
    /// The host socket reported readable and has not returned EAGAIN since.
    host_readable: bool,
    /// The host socket returned EOF; a SHUTDOWN was queued.
    host_eof: bool,
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    credit_requested: bool,

    // Guest -> host.
    to_host: VecDeque<u8>,
    /// Bytes at the front of `to_host` that are ours (the `OK` line), not
    /// guest stream bytes: they do not count in `fwd_cnt` or the credit.
    own_bytes: usize,
    fwd_cnt: Wrapping<u32>,
    last_sent_fwd_cnt: Wrapping<u32>,
    /// SHUTDOWN flags the guest sent.
    guest_shutdown: u32,
    host_write_closed: bool,

    pub deadline: Option<Instant>,
    /// How long a closing connection may linger ([`SHUTDOWN_TIMEOUT`]).
    pub shutdown_timeout: Duration,
    /// This connection's token in the muxer's epoll.
    pub token: u64,
    /// Events currently registered in the muxer's epoll (empty: not registered).
    pub registered: EventSet,
    /// Already queued in the muxer's rx list.
    pub in_rxq: bool,
}

impl Connection {
    fn new(key: ConnKey, guest_cid: u64, stream: UnixStream, state: State) -> Connection {
        Connection {
            key,
            guest_cid,
            stream,
            state,
            pending_request: false,
            pending_response: false,
            pending_rst: false,
            pending_shutdown: 0,
            pending_credit_update: false,
            pending_credit_request: false,
            host_readable: false,
            host_eof: false,
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
            to_host: VecDeque::new(),
            own_bytes: 0,
            fwd_cnt: Wrapping(0),
            last_sent_fwd_cnt: Wrapping(0),
            guest_shutdown: 0,
            host_write_closed: false,
            deadline: None,
            shutdown_timeout: SHUTDOWN_TIMEOUT,
            token: 0,
            registered: EventSet::empty(),
            in_rxq: false,
        }
    }

    /// A host program asked to connect to guest port `key.peer_port`.
    /// It gives up at `deadline` if the guest has not answered.
    pub fn new_local(
        key: ConnKey,
        guest_cid: u64,
        stream: UnixStream,
        deadline: Instant,
    ) -> Connection {
        let mut c = Connection::new(key, guest_cid, stream, State::LocalInit);
        c.pending_request = true;
        c.deadline = Some(deadline);
        c
    }

    /// The guest connected and we reached the host socket.
    pub fn new_peer(key: ConnKey, guest_cid: u64, stream: UnixStream, hdr: &Header) -> Connection {
        let mut c = Connection::new(key, guest_cid, stream, State::Established);
        c.pending_response = true;
        c.update_peer_credit(hdr);
        c
    }

    pub fn stream_fd(&self) -> i32 {
        self.stream.as_raw_fd()
    }

    /// How many more bytes the guest can take on this connection.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Resets the connection: only a RST goes to the guest from now on.
    pub fn kill(&mut self) {
        if matches!(self.state, State::Closing | State::Dead) {
            return;
        }
        self.state = State::Closing;
        self.pending_rst = true;
        self.to_host.clear();
        self.own_bytes = 0;
        self.deadline = None;
    }

    /// The guest reset the connection (or it was refused): gone at once.
    pub fn on_guest_rst(&mut self) {
        self.state = State::Dead;
    }

    /// The guest accepted our REQUEST. Returns false on a protocol error.
    pub fn on_response(&mut self) -> bool {
        if self.state != State::LocalInit {
            return false;
        }
        self.state = State::Established;
        self.deadline = None;
        let line = format!("OK {}\n", self.key.local_port);
        self.to_host.extend(line.as_bytes());
        self.own_bytes = line.len();
        self.flush_to_host();
        true
    }

    /// Stream bytes from the guest. Returns false on a protocol error
    /// (data before the handshake or after the guest's SHUTDOWN SEND, or
    /// more than the credit we gave).
    pub fn on_guest_data(&mut self, data: &[u8]) -> bool {
        if self.state != State::Established || self.guest_shutdown & SHUTDOWN_SEND != 0 {
            return false;
        }
        let mut rest = data;
        if self.to_host.is_empty() {
            match self.write_host(rest) {
                Ok(n) => rest = &rest[n..],
                Err(_) => {
                    self.kill();
                    return true;
                }
            }
        }
        if self.to_host.len().saturating_sub(self.own_bytes) + rest.len() > BUF_ALLOC as usize {
            return false;
        }
        self.to_host.extend(rest);
        true
    }

    pub fn on_guest_shutdown(&mut self, flags: u32, now: Instant) {
        let new = flags & SHUTDOWN_BOTH & !self.guest_shutdown;
        self.guest_shutdown |= flags & SHUTDOWN_BOTH;
        if new & SHUTDOWN_RCV != 0 {
            // The guest reads no more: stop reading, and let the host
            // writer learn it (EPIPE) instead of blocking forever.
            let _ = self.stream.shutdown(Shutdown::Read);
        }
        if self.guest_shutdown == SHUTDOWN_BOTH
            && self.deadline.is_none()
            && self.state == State::Established
        {
            self.deadline = Some(now + self.shutdown_timeout);
        }
        self.flush_to_host();
    }

    pub fn on_credit_request(&mut self) {
        self.pending_credit_update = true;
    }

    /// The deadline passed: give up and reset.
    pub fn on_deadline(&mut self) {
        self.kill();
    }

    /// The host socket is ready for what we registered.
    pub fn on_host_event(&mut self, events: EventSet) {
        let err_or_hup =
            events.intersects(EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP);
        if self.registered.contains(EventSet::IN) && (events.contains(EventSet::IN) || err_or_hup) {
            self.host_readable = true;
        }
        if self.registered.contains(EventSet::OUT) && (events.contains(EventSet::OUT) || err_or_hup)
        {
            self.flush_to_host();
        }
    }

    fn write_host(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = write_some(&mut self.stream, data)?;
        self.fwd_cnt += Wrapping(n as u32);
        Ok(n)
    }

    /// Writes buffered guest bytes to the host socket; on the guest's
    /// SHUTDOWN, closes the host's read side once everything is out.
    pub fn flush_to_host(&mut self) {
        if self.state != State::Established {
            return;
        }
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match write_some(&mut self.stream, front) {
                Ok(0) => return,
                Ok(n) => {
                    self.to_host.drain(..n);
                    let own = n.min(self.own_bytes);
                    self.own_bytes -= own;
                    self.fwd_cnt += Wrapping((n - own) as u32);
                }
                Err(_) => {
                    self.kill();
                    return;
                }
            }
        }
        if self.guest_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_closed {
            self.host_write_closed = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.guest_shutdown == SHUTDOWN_BOTH {
            // The guest closed and everything it sent was delivered:
            // finish with the RST it waits for.
            self.kill();
        }
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && self.guest_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    fn credit_update_due(&self) -> bool {
        (self.fwd_cnt - self.last_sent_fwd_cnt).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// Re-derives what follows from the current state: a CREDIT_REQUEST when
    /// host data waits for guest credit, the RST when a close completed.
    pub fn refresh(&mut self) {
        if self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && self.guest_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() == 0
            && !self.credit_requested
        {
            self.credit_requested = true;
            self.pending_credit_request = true;
        }
        if self.state == State::Established && self.credit_update_due() {
            self.pending_credit_update = true;
        }
    }

    pub fn should_remove(&self) -> bool {
        self.state == State::Dead
    }

    /// The epoll events this connection needs now.
    pub fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.state != State::Established {
            return set;
        }
        if !self.host_readable
            && !self.host_eof
            && self.guest_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
        {
            set |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    pub fn has_rx_work(&self) -> bool {
        if self.state == State::Dead {
            return false;
        }
        self.pending_rst
            || self.pending_request
            || self.pending_response
            || self.pending_shutdown != 0
            || self.pending_credit_update
            || self.pending_credit_request
            || self.can_send_data()
    }

    fn header(&mut self, op: u16, flags: u32, len: usize) -> Header {
        self.last_sent_fwd_cnt = self.fwd_cnt;
        self.pending_credit_update = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: len as u32,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    fn control<W: Write>(&mut self, w: &mut W, op: u16, flags: u32) -> io::Result<RxFill> {
        let hdr = self.header(op, flags, 0);
        write_packet(w, &hdr, &[]).map(RxFill::Packet)
    }

    /// Writes the next packet for the guest into an rx buffer of
    /// `capacity` bytes (at least a header), reading host data through
    /// `scratch`. Packets go in protocol order: RST, REQUEST/RESPONSE,
    /// data, SHUTDOWN (after the data), credit messages.
    pub fn fill_rx<W: Write>(
        &mut self,
        w: &mut W,
        capacity: usize,
        scratch: &mut [u8],
        now: Instant,
    ) -> io::Result<RxFill> {
        if self.pending_rst {
            self.pending_rst = false;
            self.state = State::Dead;
            return self.control(w, OP_RST, 0);
        }
        if self.state == State::Dead || self.state == State::Closing {
            return Ok(RxFill::Nothing);
        }
        if self.pending_request {
            self.pending_request = false;
            return self.control(w, OP_REQUEST, 0);
        }
        if self.pending_response {
            self.pending_response = false;
            return self.control(w, OP_RESPONSE, 0);
        }
        if self.can_send_data() {
            let max = capacity
                .saturating_sub(HEADER_SIZE)
                .min(self.peer_credit() as usize)
                .min(scratch.len());
            if max > 0 {
                match self.stream.read(&mut scratch[..max]) {
                    Ok(0) => {
                        self.host_eof = true;
                        // The host closed entirely (not just its write side):
                        // the guest gets a full SHUTDOWN, and we wait for its RST.
                        self.pending_shutdown = if peer_hung_up(&self.stream) {
                            self.deadline = Some(now + self.shutdown_timeout);
                            SHUTDOWN_BOTH
                        } else {
                            SHUTDOWN_SEND
                        };
                    }
                    Ok(n) => {
                        let hdr = self.header(OP_RW, 0, n);
                        let used = write_packet(w, &hdr, &scratch[..n])?;
                        self.tx_cnt += Wrapping(n as u32);
                        return Ok(RxFill::Packet(used));
                    }
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::Interrupted =>
                    {
                        self.host_readable = false;
                    }
                    Err(_) => {
                        self.state = State::Dead;
                        return self.control(w, OP_RST, 0);
                    }
                }
            }
        }
        if self.pending_shutdown != 0 {
            let flags = std::mem::take(&mut self.pending_shutdown);
            return self.control(w, OP_SHUTDOWN, flags);
        }
        if self.pending_credit_update {
            return self.control(w, OP_CREDIT_UPDATE, 0);
        }
        if self.pending_credit_request {
            self.pending_credit_request = false;
            return self.control(w, OP_CREDIT_REQUEST, 0);
        }
        Ok(RxFill::Nothing)
    }
}

/// Writes as much of `data` as the socket takes now (0 when it is full).
/// `send` with MSG_NOSIGNAL: a host peer that went away is an EPIPE for
/// this connection, never a SIGPIPE for the VMM.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        let rest = &data[done..];
        // SAFETY: sends from a live buffer of the given length.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => break,
                io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        done += n as usize;
    }
    Ok(done)
}

/// Whether the peer of a Unix stream closed both directions (POLLHUP),
/// as opposed to only shutting down its write side.
fn peer_hung_up(stream: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & libc::POLLHUP != 0
}
