//! The host side of the device: the listening Unix socket, host programs
//! still sending their `CONNECT` line, and every connection, all watched
//! through one nested epoll fd (the worker waits on that fd alone, so
//! connections come and go without touching the worker's source list).
//!
//! It also decides what goes to the guest next: standalone RSTs first
//! (replies to packets we cannot use), then connections in turn, one
//! packet each, so one busy stream cannot starve the others.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connect_line::{LineBuf, LineState, MAX_LINE};
use super::connection::{ConnKey, Connection, RxFill, CONNECT_TIMEOUT, SHUTDOWN_TIMEOUT};
use super::packet::*;
use super::warn_once::WarnOnce;

/// Most connections (open streams plus host programs still sending their
/// CONNECT line) one device serves at once; past it, new host clients are
/// closed and guest REQUESTs get a RST.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most standalone RSTs waiting for rx buffers; beyond, replies to bad
/// packets are dropped (the guest is flooding us with them).
const MAX_PENDING_RSTS: usize = 1024;
/// Ports for host-initiated connections count up from here.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Bytes read from a host socket per packet at most.
const SCRATCH_SIZE: usize = MAX_PAYLOAD;

const LISTENER_TOKEN: u64 = 0;
const TIMER_TOKEN: u64 = 1;
const FIRST_DYNAMIC_TOKEN: u64 = 2;

/// Bounds on what one device keeps open.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    /// How long a host-initiated connection waits for the guest's answer.
    pub connect_timeout: Duration,
    /// How long a closing connection lingers before we reset it.
    pub shutdown_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            connect_timeout: CONNECT_TIMEOUT,
            shutdown_timeout: SHUTDOWN_TIMEOUT,
        }
    }
}

/// Opens the host socket a guest connection goes to.
pub type Connector = fn(&Path) -> io::Result<UnixStream>;

enum Source {
    Client,
    Conn(ConnKey),
}

/// A host program that connected but has not sent a full CONNECT line.
struct PendingClient {
    stream: UnixStream,
    line: LineBuf,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    connector: Connector,
    epoll: Epoll,
    listener: Option<UnixListener>,
    timer: TimerFd,
    timer_armed: bool,
    conns: HashMap<ConnKey, Connection>,
    clients: HashMap<u64, PendingClient>,
    sources: HashMap<u64, Source>,
    next_token: u64,
    rxq: VecDeque<ConnKey>,
    rsts: VecDeque<Header>,
    /// Connections with a deadline.
    timed: HashSet<ConnKey>,
    next_local_port: u32,
    max_conns: usize,
    connect_timeout: Duration,
    shutdown_timeout: Duration,
    scratch: Vec<u8>,
    warn: WarnOnce,
}

impl Muxer {
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        listener: Option<UnixListener>,
        connector: Connector,
        limits: Limits,
    ) -> io::Result<Muxer> {
        let epoll = Epoll::new()?;
        if let Some(l) = &listener {
            l.set_nonblocking(true)?;
            epoll.ctl(
                ControlOperation::Add,
                l.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )?;
        }
        let timer = TimerFd::new()?;
        set_nonblocking(timer.as_raw_fd())?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER_TOKEN),
        )?;
        Ok(Muxer {
            guest_cid,
            uds_path,
            connector,
            epoll,
            listener,
            timer,
            timer_armed: false,
            conns: HashMap::new(),
            clients: HashMap::new(),
            sources: HashMap::new(),
            next_token: FIRST_DYNAMIC_TOKEN,
            rxq: VecDeque::new(),
            rsts: VecDeque::new(),
            timed: HashSet::new(),
            next_local_port: FIRST_LOCAL_PORT,
            max_conns: limits.max_connections,
            connect_timeout: limits.connect_timeout,
            shutdown_timeout: limits.shutdown_timeout,
            scratch: vec![0; SCRATCH_SIZE],
            warn: WarnOnce::default(),
        })
    }

    /// The nested epoll fd: readable when a host socket needs attention.
    pub fn epoll_fd(&self) -> i32 {
        self.epoll.as_raw_fd()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len() + self.clients.len()
    }

    /// Whether something waits for an rx buffer.
    pub fn has_rx_work(&self) -> bool {
        !self.rsts.is_empty() || !self.rxq.is_empty()
    }

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(FIRST_DYNAMIC_TOKEN);
        t
    }

    // ---- Host side ----

    /// Serves whatever the nested epoll reports ready.
    pub fn handle_backend_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                self.warn.once(WarnOnce::EPOLL, || {
                    tracing::warn!("vsock: epoll wait failed: {e}")
                });
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                LISTENER_TOKEN => self.accept_clients(),
                TIMER_TOKEN => self.on_timer(),
                token => match self.sources.get(&token) {
                    Some(Source::Client) => self.on_client_readable(token),
                    Some(Source::Conn(key)) => {
                        let key = *key;
                        if let Some(c) = self.conns.get_mut(&key) {
                            c.on_host_event(ev.event_set());
                        }
                        self.sync(key);
                    }
                    None => {}
                },
            }
        }
    }

    fn accept_clients(&mut self) {
        for _ in 0..64 {
            let accepted = match &self.listener {
                Some(l) => l.accept(),
                None => return,
            };
            match accepted {
                Ok((stream, _)) => {
                    if self.conns.len() + self.clients.len() >= self.max_conns {
                        let max = self.max_conns;
                        self.warn.once(WarnOnce::LIMIT, || {
                            tracing::warn!("vsock: {max} connections open, refusing more")
                        });
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let token = self.alloc_token();
                    let ev = EpollEvent::new(EventSet::IN, token);
                    if self
                        .epoll
                        .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
                        .is_err()
                    {
                        continue;
                    }
                    self.sources.insert(token, Source::Client);
                    self.clients.insert(
                        token,
                        PendingClient {
                            stream,
                            line: LineBuf::default(),
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.warn.once(WarnOnce::ACCEPT, || {
                        tracing::warn!("vsock: accept on the Unix socket failed: {e}")
                    });
                    break;
                }
            }
        }
    }

    fn drop_client(&mut self, token: u64) {
        if let Some(c) = self.clients.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.sources.remove(&token);
    }

    /// Reads the CONNECT line without consuming anything past it: the
    /// bytes after the newline are stream data for the guest.
    fn on_client_readable(&mut self, token: u64) {
        let Some(client) = self.clients.get_mut(&token) else {
            return;
        };
        let mut peek = [0u8; MAX_LINE];
        // SAFETY: recv into a buffer we own, of its length.
        let n = unsafe {
            libc::recv(
                client.stream.as_raw_fd(),
                peek.as_mut_ptr().cast(),
                peek.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) {
                return;
            }
            return self.drop_client(token);
        }
        let n = n as usize;
        if n == 0 {
            return self.drop_client(token);
        }
        let take = client.line.take_len(&peek[..n]);
        let mut buf = [0u8; MAX_LINE];
        if client.stream.read_exact(&mut buf[..take]).is_err() {
            return self.drop_client(token);
        }
        match client.line.push(&buf[..take]) {
            LineState::Incomplete => {}
            LineState::Port(port) => self.start_local(token, port),
            LineState::Error(e) => {
                tracing::debug!("vsock: host client sent a bad CONNECT line ({e}); closing it");
                self.drop_client(token);
            }
        }
    }

    /// A host program asked for guest port `port`: send the guest a REQUEST
    /// from a fresh local port.
    fn start_local(&mut self, token: u64, port: u32) {
        let Some(client) = self.clients.remove(&token) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            client.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let Some(local_port) = self.alloc_local_port(port) else {
            self.sources.remove(&token);
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let mut conn = Connection::new_local(
            key,
            self.guest_cid,
            client.stream,
            Instant::now() + self.connect_timeout,
        );
        conn.token = token;
        conn.shutdown_timeout = self.shutdown_timeout;
        self.sources.insert(token, Source::Conn(key));
        self.conns.insert(key, conn);
        self.sync(key);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=self.conns.len() {
            let p = self.next_local_port;
            self.next_local_port = if p == u32::MAX {
                FIRST_LOCAL_PORT
            } else {
                p + 1
            };
            if !self.conns.contains_key(&ConnKey {
                local_port: p,
                peer_port,
            }) {
                return Some(p);
            }
        }
        None
    }

    fn on_timer(&mut self) {
        let _ = self.timer.wait();
        let now = Instant::now();
        let due: Vec<ConnKey> = self
            .timed
            .iter()
            .filter(|k| {
                self.conns
                    .get(k)
                    .and_then(|c| c.deadline)
                    .is_some_and(|d| d <= now)
            })
            .copied()
            .collect();
        for key in due {
            if let Some(c) = self.conns.get_mut(&key) {
                c.on_deadline();
            }
            self.sync(key);
        }
    }

    /// Brings a connection's epoll registration, rx queueing and timer in
    /// line with its state, and removes it once finished.
    fn sync(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            self.timed.remove(&key);
            return self.update_timer();
        };
        conn.refresh();
        if conn.should_remove() {
            if !conn.registered.is_empty() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    conn.stream_fd(),
                    EpollEvent::default(),
                );
            }
            self.sources.remove(&conn.token);
            self.conns.remove(&key);
            self.timed.remove(&key);
            return self.update_timer();
        }
        let want = conn.interest();
        if want != conn.registered {
            let fd = conn.stream_fd();
            let ev = EpollEvent::new(want, conn.token);
            let res = if conn.registered.is_empty() {
                self.epoll.ctl(ControlOperation::Add, fd, ev)
            } else if want.is_empty() {
                self.epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default())
            } else {
                self.epoll.ctl(ControlOperation::Modify, fd, ev)
            };
            match res {
                Ok(()) => conn.registered = want,
                Err(e) => {
                    self.warn.once(WarnOnce::EPOLL, || {
                        tracing::warn!("vsock: cannot watch a connection: {e}")
                    });
                    conn.kill();
                }
            }
        }
        if conn.has_rx_work() && !conn.in_rxq {
            conn.in_rxq = true;
            self.rxq.push_back(key);
        }
        if conn.deadline.is_some() {
            self.timed.insert(key);
        } else {
            self.timed.remove(&key);
        }
        self.update_timer();
    }

    fn update_timer(&mut self) {
        let want = !self.timed.is_empty();
        if want == self.timer_armed {
            return;
        }
        let res = if want {
            self.timer.reset(TIMER_TICK, Some(TIMER_TICK))
        } else {
            self.timer.clear()
        };
        if res.is_ok() {
            self.timer_armed = want;
        }
    }

    // ---- Guest side ----

    /// A well-formed packet from the tx queue.
    pub fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid {
            let cid = self.guest_cid;
            self.warn.once(WarnOnce::BAD_CID, || {
                tracing::warn!(
                    "vsock: guest sent a packet from CID {} (its CID is {cid}); dropped",
                    hdr.src_cid
                )
            });
            return self.reply_rst(hdr);
        }
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            return self.reply_rst(hdr);
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                OP_REQUEST => self.guest_connect(key, hdr),
                OP_RST => {}
                _ => self.reply_rst(hdr),
            }
            return;
        };
        conn.update_peer_credit(hdr);
        match hdr.op {
            OP_RESPONSE => {
                if !conn.on_response() {
                    conn.kill();
                }
            }
            OP_RST => conn.on_guest_rst(),
            OP_SHUTDOWN => conn.on_guest_shutdown(hdr.flags, Instant::now()),
            OP_RW => {
                if !conn.on_guest_data(payload) {
                    self.warn.once(WarnOnce::PROTOCOL, || {
                        tracing::warn!("vsock: guest sent data out of turn or beyond its credit; connection reset")
                    });
                    conn.kill();
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => conn.on_credit_request(),
            // A second REQUEST for a live connection, or an unknown op.
            _ => conn.kill(),
        }
        self.sync(key);
    }

    /// A tx packet whose lengths are wrong: reset whatever it belongs to.
    pub fn reject_packet(&mut self, hdr: Option<&Header>) {
        let Some(hdr) = hdr else { return };
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.src_cid == self.guest_cid && hdr.dst_cid == HOST_CID {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.kill();
                return self.sync(key);
            }
        }
        self.reply_rst(hdr);
    }

    /// Queues a RST answering `hdr` (never a RST to a RST). It comes from
    /// the address the guest sent to, so its socket recognises it.
    fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op == OP_RST {
            return;
        }
        if self.rsts.len() >= MAX_PENDING_RSTS {
            self.warn.once(WarnOnce::RST_FLOOD, || {
                tracing::warn!("vsock: too many unanswered RSTs; dropping some")
            });
            return;
        }
        self.rsts.push_back(Header {
            src_cid: hdr.dst_cid,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        });
    }

    /// The guest connects to host port `key.local_port`: reach the Unix
    /// socket `<uds_path>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, hdr: &Header) {
        if self.conns.len() + self.clients.len() >= self.max_conns {
            let max = self.max_conns;
            self.warn.once(WarnOnce::LIMIT, || {
                tracing::warn!("vsock: {max} connections open, refusing more")
            });
            return self.reply_rst(hdr);
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", key.local_port));
        match (self.connector)(Path::new(&path)) {
            Ok(stream) => {
                let mut conn = Connection::new_peer(key, self.guest_cid, stream, hdr);
                conn.token = self.alloc_token();
                conn.shutdown_timeout = self.shutdown_timeout;
                self.sources.insert(conn.token, Source::Conn(key));
                self.conns.insert(key, conn);
                self.sync(key);
            }
            Err(e) => {
                tracing::debug!("vsock: guest connect to {path:?} failed: {e}");
                self.reply_rst(hdr);
            }
        }
    }

    /// Writes the next packet for the guest into an rx buffer of `capacity`
    /// bytes (more than a header).
    pub fn fill_rx<W: Write>(&mut self, w: &mut W, capacity: usize) -> io::Result<RxFill> {
        if let Some(hdr) = self.rsts.pop_front() {
            return write_packet(w, &hdr, &[]).map(RxFill::Packet);
        }
        let now = Instant::now();
        // Each queued connection gets one look; one that has nothing after
        // all drops out until its state changes.
        for _ in 0..self.rxq.len() {
            let Some(key) = self.rxq.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rxq = false;
            let res = conn.fill_rx(w, capacity, &mut self.scratch, now);
            if res.is_err() {
                conn.kill();
            }
            self.sync(key);
            match res {
                Ok(RxFill::Nothing) => continue,
                other => return other,
            }
        }
        Ok(RxFill::Nothing)
    }
}

fn set_nonblocking(fd: i32) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Connects to a Unix stream socket without blocking: a listener whose
/// backlog is full counts as refusing (EAGAIN), rather than stalling the
/// worker.
pub fn connect_unix(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "Unix socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket creation; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_un of at least `len` bytes.
    let r = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}
