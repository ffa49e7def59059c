//! Drives the device through its queues in mock guest memory, against real
//! Unix sockets in a temporary directory.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::connection::BUF_ALLOC;
use super::packet::*;
use super::*;
use crate::virtio::worker::WaitMode;
use crate::virtio::{DeviceContext, Interrupt, Memory, QueueContext};

const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 32 << 20;
const RING_BASE: [u64; 3] = [0x0, 0x10000, 0x20000];
const RX_BUFS: u64 = 0x10_0000;
const RX_STRIDE: u64 = 0x2000;
const RX_BUF_LEN: u32 = 4096 + HEADER_SIZE as u32;
const TX_BUFS: u64 = 0x40_0000;
const TX_STRIDE: u64 = 0x1_1000;
const WAIT: Duration = Duration::from_secs(3);
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

// ---- Test scaffolding ----

/// A fresh directory under the system temp dir, removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new() -> TestDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "kiln-vsock-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TestDir(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
struct TestIrq {
    signals: [AtomicUsize; 3],
    needs_reset: AtomicBool,
}

impl Interrupt for TestIrq {
    fn signal_queue(&self, index: u16) {
        if let Some(s) = self.signals.get(index as usize) {
            s.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn signal_config(&self) {}
    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }
}

/// The driver's side of one split queue.
struct TestQueue {
    base: u64,
    size: u16,
    avail_idx: u16,
    used_seen: u16,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
}

impl TestQueue {
    fn new(mem: &GuestMemoryMmap, base: u64) -> TestQueue {
        let size = QUEUE_SIZE;
        // Zeroed rings, as after a driver reset.
        mem.write_slice(&vec![0u8; 0x8000], GuestAddress(base))
            .unwrap();
        TestQueue {
            base,
            size,
            avail_idx: 0,
            used_seen: 0,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
        }
    }
    fn avail(&self) -> u64 {
        self.base + 16 * u64::from(self.size)
    }
    fn used(&self) -> u64 {
        (self.avail() + 6 + 2 * u64::from(self.size) + 3) & !3
    }
    fn create_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.base as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail() as u32), Some(0));
        q.set_used_ring_address(Some(self.used() as u32), Some(0));
        q.set_ready(true);
        q
    }
    fn free_slots(&self) -> usize {
        self.free.len()
    }
    /// Publishes a chain; `addr_of` picks each descriptor's buffer from the
    /// head index. Returns the head.
    fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> u16 {
        let idxs: Vec<u16> = (0..descs.len())
            .map(|_| self.free.pop().expect("queue full"))
            .collect();
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            let next = if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT;
                idxs[i + 1]
            } else {
                0
            };
            let d = self.base + 16 * u64::from(idxs[i]);
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }
        let head = idxs[0];
        let slot = self.avail() + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail() + 2))
            .unwrap();
        self.chains.insert(head, idxs);
        head
    }
    /// Used entries since the last call, their descriptors freed.
    fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used() + 2)).unwrap();
        fence(Ordering::SeqCst);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = self.used() + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
            self.used_seen = self.used_seen.wrapping_add(1);
            let head = id as u16;
            if let Some(idxs) = self.chains.remove(&head) {
                self.free.extend(idxs);
            }
            out.push((head, len));
        }
        out
    }
}

/// A minimal vsock driver: keeps rx buffers posted, sends tx packets and
/// collects what the device delivers.
struct Guest {
    mem: Memory,
    rxq: TestQueue,
    txq: TestQueue,
    kicks: Vec<EventFd>,
    received: VecDeque<(Header, Vec<u8>)>,
    /// Used rx entries with a length of 0 (buffers the device refused).
    empty_rx: usize,
    refill: bool,
    tx_used_lens: Vec<u32>,
}

impl Guest {
    fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let head = *self.rxq.free.last().unwrap();
            let addr = RX_BUFS + u64::from(head) * RX_STRIDE;
            self.rxq.add_chain(&self.mem, &[(addr, RX_BUF_LEN, true)]);
        }
        self.kick(0);
    }

    fn reap_tx(&mut self) {
        for (_, len) in self.txq.take_used(&self.mem) {
            self.tx_used_lens.push(len);
        }
    }

    /// Puts one packet on the tx queue as raw bytes (header and payload in
    /// one descriptor).
    fn send_raw(&mut self, bytes: &[u8]) {
        let deadline = Instant::now() + WAIT;
        loop {
            self.reap_tx();
            if self.txq.free_slots() > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "tx queue never drained");
            std::thread::sleep(Duration::from_micros(100));
        }
        let head = *self.txq.free.last().unwrap();
        let addr = TX_BUFS + u64::from(head) * TX_STRIDE;
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        self.txq
            .add_chain(&self.mem, &[(addr, bytes.len() as u32, false)]);
        self.kick(1);
    }

    /// Waits until the device used every tx chain.
    fn drain_tx(&mut self) {
        let deadline = Instant::now() + WAIT;
        while self.txq.free_slots() < QUEUE_SIZE as usize {
            assert!(Instant::now() < deadline, "tx chains never used");
            std::thread::sleep(Duration::from_micros(200));
            self.reap_tx();
        }
    }

    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let mut hdr = hdr;
        hdr.len = payload.len() as u32;
        let mut b = hdr.encode().to_vec();
        b.extend_from_slice(payload);
        self.send_raw(&b);
    }

    /// Sends header and payload in two descriptors, as Linux does.
    fn send_split(&mut self, hdr: Header, payload: &[u8]) {
        let mut hdr = hdr;
        hdr.len = payload.len() as u32;
        self.reap_tx();
        let head = *self.txq.free.last().unwrap();
        let addr = TX_BUFS + u64::from(head) * TX_STRIDE;
        self.mem
            .write_slice(&hdr.encode(), GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(addr + 64))
            .unwrap();
        self.txq.add_chain(
            &self.mem,
            &[
                (addr, HEADER_SIZE as u32, false),
                (addr + 64, payload.len() as u32, false),
            ],
        );
        self.kick(1);
    }

    /// Moves used rx buffers into `received`, re-posting them.
    fn collect(&mut self) {
        let used = self.rxq.take_used(&self.mem);
        let n = used.len();
        for (head, len) in used {
            if (len as usize) < HEADER_SIZE {
                self.empty_rx += 1;
                continue;
            }
            let addr = RX_BUFS + u64::from(head) * RX_STRIDE;
            let mut raw = [0u8; HEADER_SIZE];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let hdr = Header::decode(&raw);
            assert_eq!(
                hdr.len as usize,
                len as usize - HEADER_SIZE,
                "used length must match the header"
            );
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + HEADER_SIZE as u64))
                .unwrap();
            self.received.push_back((hdr, data));
        }
        if self.refill && n > 0 {
            self.post_rx(n);
        }
    }

    fn try_recv(&mut self, within: Duration) -> Option<(Header, Vec<u8>)> {
        let deadline = Instant::now() + within;
        loop {
            self.collect();
            if let Some(p) = self.received.pop_front() {
                return Some(p);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn recv(&mut self) -> (Header, Vec<u8>) {
        self.try_recv(WAIT).expect("no packet from the device")
    }

    /// The next packet that is not a credit message.
    fn recv_skip_credit(&mut self) -> (Header, Vec<u8>) {
        loop {
            let p = self.recv();
            if p.0.op != OP_CREDIT_UPDATE && p.0.op != OP_CREDIT_REQUEST {
                return p;
            }
        }
    }
}

fn pkt(op: u16, guest_port: u32, host_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 1 << 20,
        fwd_cnt: 0,
    }
}

struct Harness {
    _dir: TestDir,
    uds: PathBuf,
    dev: Vsock,
    guest: Guest,
    irq: Arc<TestIrq>,
}

impl Harness {
    fn new() -> Harness {
        Harness::with(|_| {})
    }

    fn with(tweak: impl FnOnce(&mut Vsock)) -> Harness {
        let dir = TestDir::new();
        let uds = dir.0.join("v.sock");
        let mut dev = Vsock::new(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.clone(),
            id: "vsock-test".into(),
        })
        .unwrap();
        tweak(&mut dev);
        let mem: Memory =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
        let (guest, irq) = activate(&mut dev, mem);
        Harness {
            _dir: dir,
            uds,
            dev,
            guest,
            irq,
        }
    }

    fn reactivate(&mut self) {
        let mem = self.guest.mem.clone();
        let (guest, irq) = activate(&mut self.dev, mem);
        self.guest = guest;
        self.irq = irq;
    }

    fn host_connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.uds).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    }

    /// Host connects to guest `port` and the guest accepts; returns the
    /// client and the device's host port.
    fn open_from_host(&mut self, port: u32) -> (UnixStream, u32) {
        let mut c = self.host_connect();
        c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let (req, _) = self.guest.recv();
        assert_eq!(
            (req.op, req.src_cid, req.dst_cid, req.dst_port),
            (OP_REQUEST, HOST_CID, GUEST_CID, port)
        );
        assert_eq!(req.buf_alloc, BUF_ALLOC);
        self.guest.send(pkt(OP_RESPONSE, port, req.src_port), &[]);
        let line = read_line(&mut c);
        assert_eq!(line, format!("OK {}\n", req.src_port));
        (c, req.src_port)
    }
}

fn activate(dev: &mut Vsock, mem: Memory) -> (Guest, Arc<TestIrq>) {
    let mut queues = Vec::new();
    let mut kicks = Vec::new();
    let mut tqs = Vec::new();
    for (i, base) in RING_BASE.iter().enumerate() {
        let tq = TestQueue::new(&mem, *base);
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        queues.push(QueueContext {
            index: i as u16,
            queue: tq.create_queue(),
            kick: kick.try_clone().unwrap(),
        });
        kicks.push(kick);
        tqs.push(tq);
    }
    let irq = Arc::new(TestIrq::default());
    let ctx = DeviceContext {
        mem: mem.clone(),
        queues,
        acked_features: dev.features() | crate::virtio::features::VERSION_1,
        interrupt: irq.clone(),
    };
    dev.activate(ctx).unwrap();
    let mut it = tqs.into_iter();
    let rxq = it.next().unwrap();
    let txq = it.next().unwrap();
    let mut guest = Guest {
        mem,
        rxq,
        txq,
        kicks,
        received: VecDeque::new(),
        empty_rx: 0,
        refill: true,
        tx_used_lens: Vec::new(),
    };
    guest.post_rx(64);
    (guest, irq)
}

fn read_line(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while out.last() != Some(&b'\n') {
        match s.read(&mut b) {
            Ok(1) => out.push(b[0]),
            other => panic!(
                "no line from the device: {other:?} after {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    String::from_utf8(out).unwrap()
}

/// Whether the peer closed `s` (EOF or reset) within the read timeout;
/// bytes still in flight are skipped.
fn closed_by_peer(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

// ---- Tests ----

#[test]
fn config_parses_and_validates() {
    let c: VsockConfig = "cid=3,uds=/tmp/kiln.vsock".parse().unwrap();
    assert_eq!(
        c,
        VsockConfig {
            guest_cid: 3,
            uds_path: "/tmp/kiln.vsock".into(),
            id: String::new()
        }
    );
    let c: VsockConfig = "uds=/x,cid=42,id=v1".parse().unwrap();
    assert_eq!((c.guest_cid, c.id.as_str()), (42, "v1"));
    for bad in [
        "cid=2,uds=/x",
        "cid=4294967295,uds=/x",
        "cid=x,uds=/x",
        "uds=/x",
        "cid=3",
        "cid=3,uds=/x,port=1",
        "cid=3,uds=",
    ] {
        assert!(bad.parse::<VsockConfig>().is_err(), "{bad} must be refused");
    }
}

#[test]
fn socket_path_stale_is_replaced_live_and_non_socket_are_refused() {
    let dir = TestDir::new();
    let path = dir.0.join("s");
    drop(UnixListener::bind(&path).unwrap()); // leaves a stale socket file
    let cfg = VsockConfig {
        guest_cid: 3,
        uds_path: path.clone(),
        id: "v".into(),
    };
    let dev = Vsock::new(cfg.clone()).unwrap();
    assert!(matches!(Vsock::new(cfg.clone()), Err(VsockError::InUse(_))));
    drop(dev);
    assert!(!path.exists(), "the device removes its socket on drop");

    std::fs::write(&path, b"not a socket").unwrap();
    assert!(matches!(
        Vsock::new(cfg.clone()),
        Err(VsockError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");

    let bad = VsockConfig {
        guest_cid: 1,
        ..cfg
    };
    assert!(matches!(Vsock::new(bad), Err(VsockError::InvalidCid(1))));
}

#[test]
fn device_describes_itself() {
    let h = Harness::new();
    assert_eq!(h.dev.device_type(), 19);
    assert_eq!(h.dev.queue_max_sizes(), vec![256, 256, 256]);
    let f = h.dev.features();
    assert_eq!(
        f,
        crate::virtio::features::RING_EVENT_IDX | crate::virtio::features::RING_INDIRECT_DESC
    );
    let mut cfg = [0u8; 8];
    h.dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), GUEST_CID);
    let mut tail = [0xffu8; 4];
    h.dev.read_config(6, &mut tail);
    assert_eq!(tail, [0, 0, 0, 0]);
    let control = h.dev.worker_control();
    let deadline = Instant::now() + WAIT;
    while control.thread_id().is_none() {
        assert!(Instant::now() < deadline, "the worker thread never started");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn host_connect_handshake_echo_and_close() {
    let mut h = Harness::new();
    let (mut c, hp) = h.open_from_host(52);
    assert_eq!(hp, FIRST_LOCAL_PORT);

    c.write_all(b"hello guest").unwrap();
    let (p, data) = h.guest.recv_skip_credit();
    assert_eq!((p.op, p.src_port, p.dst_port), (OP_RW, hp, 52));
    assert_eq!(data, b"hello guest");
    h.guest.send_split(pkt(OP_RW, 52, hp), b"hello host");
    let mut buf = [0u8; 10];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");

    // A second host connection gets the next host port.
    let (_c2, hp2) = h.open_from_host(52);
    assert_eq!(hp2, FIRST_LOCAL_PORT + 1);

    // The guest closes: the host sees EOF, the guest gets its RST.
    let mut s = pkt(OP_SHUTDOWN, 52, hp);
    s.flags = SHUTDOWN_BOTH;
    h.guest.send(s, &[]);
    assert!(closed_by_peer(&mut c));
    let (rst, _) = h.guest.recv_skip_credit();
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, hp, 52));
    // fwd_cnt counts the guest's stream bytes only, not the OK line.
    assert_eq!(rst.fwd_cnt, b"hello host".len() as u32);
    assert!(!h.irq.needs_reset.load(Ordering::SeqCst));
    assert!(
        h.irq.signals[0].load(Ordering::SeqCst) > 0,
        "rx interrupts were sent"
    );
}

#[test]
fn guest_connect_to_host_socket_echo_and_half_close() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(format!("{}_1234", h.uds.display())).unwrap();
    h.guest.send(pkt(OP_REQUEST, 40000, 1234), &[]);
    let (resp, _) = h.guest.recv();
    assert_eq!(
        (
            resp.op,
            resp.src_cid,
            resp.src_port,
            resp.dst_cid,
            resp.dst_port
        ),
        (OP_RESPONSE, HOST_CID, 1234, GUEST_CID, 40000)
    );
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();

    h.guest.send(pkt(OP_RW, 40000, 1234), b"ping");
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    s.write_all(b"pong").unwrap();
    let (p, data) = h.guest.recv_skip_credit();
    assert_eq!((p.op, data.as_slice()), (OP_RW, &b"pong"[..]));

    // Host half-closes: the guest learns the host sends no more, and can
    // still send its answer.
    s.shutdown(Shutdown::Write).unwrap();
    let (sd, _) = h.guest.recv_skip_credit();
    assert_eq!((sd.op, sd.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    h.guest.send(pkt(OP_RW, 40000, 1234), b"answer");
    let mut b = [0u8; 6];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"answer");

    // Guest half-closes too, then the host's read sees EOF.
    let mut sd = pkt(OP_SHUTDOWN, 40000, 1234);
    sd.flags = SHUTDOWN_SEND;
    h.guest.send(sd, &[]);
    assert!(closed_by_peer(&mut s));
    // Guest's final close: RST from the device, and the connection is gone
    // (data for it now gets a RST).
    sd.flags = SHUTDOWN_BOTH;
    h.guest.send(sd, &[]);
    let (rst, _) = h.guest.recv_skip_credit();
    assert_eq!(rst.op, OP_RST);
    h.guest.send(pkt(OP_RW, 40000, 1234), b"late");
    let (rst, _) = h.guest.recv();
    assert_eq!((rst.op, rst.dst_port), (OP_RST, 40000));
}

#[test]
fn host_full_close_sends_full_shutdown_and_guest_rst_ends_it() {
    let mut h = Harness::new();
    let (c, hp) = h.open_from_host(7);
    drop(c);
    let (sd, _) = h.guest.recv_skip_credit();
    assert_eq!((sd.op, sd.flags), (OP_SHUTDOWN, SHUTDOWN_BOTH));
    h.guest.send(pkt(OP_RST, 7, hp), &[]);
    // Gone: a RW for it is answered with RST.
    h.guest.send(pkt(OP_RW, 7, hp), b"x");
    let (rst, _) = h.guest.recv();
    assert_eq!(rst.op, OP_RST);
}

#[test]
fn closing_connections_are_reset_when_the_other_side_lingers() {
    let mut h =
        Harness::with(|d| d.set_timeouts(Duration::from_secs(2), Duration::from_millis(200)));
    // The host closes; the guest never sends its RST.
    let (c, hp) = h.open_from_host(11);
    drop(c);
    let (sd, _) = h.guest.recv_skip_credit();
    assert_eq!((sd.op, sd.flags), (OP_SHUTDOWN, SHUTDOWN_BOTH));
    let (r, _) = h.guest.recv_skip_credit();
    assert_eq!((r.op, r.src_port), (OP_RST, hp));

    // The guest closes with data the host never reads: reset after the
    // timeout, not kept forever.
    let listener = UnixListener::bind(format!("{}_12", h.uds.display())).unwrap();
    h.guest.send(pkt(OP_REQUEST, 43000, 12), &[]);
    assert_eq!(h.guest.recv().0.op, OP_RESPONSE);
    let (_s, _) = listener.accept().unwrap();
    let big = vec![1u8; MAX_PAYLOAD];
    for _ in 0..6 {
        h.guest.send(pkt(OP_RW, 43000, 12), &big);
    }
    let mut sd = pkt(OP_SHUTDOWN, 43000, 12);
    sd.flags = SHUTDOWN_BOTH;
    let start = Instant::now();
    h.guest.send(sd, &[]);
    let (r, _) = h.guest.recv_skip_credit();
    assert_eq!((r.op, r.src_port), (OP_RST, 12));
    assert!(
        start.elapsed() >= Duration::from_millis(150),
        "reset before the timeout: data was not pending"
    );
}

#[test]
fn rst_when_nobody_listens_both_directions() {
    let mut h = Harness::new();
    // Guest to a host port without a socket.
    h.guest.send(pkt(OP_REQUEST, 40001, 999), &[]);
    let (rst, _) = h.guest.recv();
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port, rst.dst_cid),
        (OP_RST, 999, 40001, GUEST_CID)
    );

    // Host to a guest port nobody listens on: the guest answers RST and the
    // client is closed without an OK line.
    let mut c = h.host_connect();
    c.write_all(b"CONNECT 77\n").unwrap();
    let (req, _) = h.guest.recv();
    assert_eq!(req.op, OP_REQUEST);
    h.guest.send(pkt(OP_RST, 77, req.src_port), &[]);
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "no OK line after a refusal: {rest:?}");
}

#[test]
fn guest_credit_limits_what_the_device_sends() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(format!("{}_5000", h.uds.display())).unwrap();
    let mut req = pkt(OP_REQUEST, 41000, 5000);
    req.buf_alloc = 100;
    h.guest.send(req, &[]);
    assert_eq!(h.guest.recv().0.op, OP_RESPONSE);
    let (mut s, _) = listener.accept().unwrap();
    let sent: Vec<u8> = (0..350u32).map(|i| (i * 7 % 251) as u8).collect();
    s.write_all(&sent).unwrap();

    let mut got = Vec::new();
    let mut fwd = 0u32;
    while got.len() < sent.len() {
        // Take everything the device sends until it goes quiet.
        let mut window = 0usize;
        let mut asked = false;
        while let Some((p, data)) = h.guest.try_recv(Duration::from_millis(60)) {
            match p.op {
                OP_RW => {
                    window += data.len();
                    got.extend_from_slice(&data);
                }
                OP_CREDIT_REQUEST => asked = true,
                op => panic!("unexpected op {op}"),
            }
        }
        assert!(
            window <= 100,
            "device sent {window} bytes with 100 bytes of credit"
        );
        assert!(window > 0, "device sent nothing with free credit");
        if got.len() < sent.len() {
            assert!(asked, "device out of credit should ask for it");
        }
        // The guest app read it all: tell the device.
        fwd += window as u32;
        let mut up = pkt(OP_CREDIT_UPDATE, 41000, 5000);
        up.buf_alloc = 100;
        up.fwd_cnt = fwd;
        h.guest.send(up, &[]);
    }
    assert_eq!(got, sent);
}

#[test]
fn device_credit_updates_let_a_large_guest_stream_through() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(format!("{}_6000", h.uds.display())).unwrap();
    h.guest.send(pkt(OP_REQUEST, 42000, 6000), &[]);
    let (resp, _) = h.guest.recv();
    assert_eq!(
        (resp.op, resp.buf_alloc, resp.fwd_cnt),
        (OP_RESPONSE, BUF_ALLOC, 0)
    );
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let total = 3 * BUF_ALLOC as usize;
    let reader = std::thread::spawn(move || {
        let mut v = vec![0u8; total];
        s.read_exact(&mut v).unwrap();
        v
    });
    // The guest honours the device's credit: it sends only while
    // tx_cnt - fwd_cnt < buf_alloc, so it needs the device's updates.
    let (mut tx_cnt, mut peer_fwd, mut peer_alloc) = (0usize, 0usize, BUF_ALLOC as usize);
    let chunk = 16 * 1024;
    let deadline = Instant::now() + WAIT;
    while tx_cnt < total {
        h.guest.collect();
        while let Some((p, _)) = h.guest.received.pop_front() {
            assert_ne!(p.op, OP_RST, "device reset a credit-respecting stream");
            peer_fwd = p.fwd_cnt as usize;
            peer_alloc = p.buf_alloc as usize;
        }
        let free = peer_alloc - (tx_cnt - peer_fwd);
        if free >= chunk {
            let data: Vec<u8> = (tx_cnt..tx_cnt + chunk).map(|i| (i % 253) as u8).collect();
            h.guest.send(pkt(OP_RW, 42000, 6000), &data);
            tx_cnt += chunk;
        } else {
            assert!(
                Instant::now() < deadline,
                "guest starved of credit at {tx_cnt} bytes"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let v = reader.join().unwrap();
    assert!(
        v.iter().enumerate().all(|(i, &b)| b == (i % 253) as u8),
        "stream corrupted"
    );
}

#[test]
fn guest_ignoring_credit_is_reset_not_buffered_without_bound() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(format!("{}_6001", h.uds.display())).unwrap();
    h.guest.send(pkt(OP_REQUEST, 42001, 6001), &[]);
    assert_eq!(h.guest.recv().0.op, OP_RESPONSE);
    let (_s, _) = listener.accept().unwrap(); // never reads
    let chunk = vec![0x5au8; MAX_PAYLOAD];
    let mut sent = 0usize;
    let rst = loop {
        h.guest.send(pkt(OP_RW, 42001, 6001), &chunk);
        sent += chunk.len();
        if let Some((p, _)) = h.guest.try_recv(Duration::from_millis(5)) {
            if p.op == OP_RST {
                break p;
            }
        }
        assert!(sent < 64 << 20, "device kept taking data past its credit");
    };
    assert_eq!(rst.dst_port, 42001);
}

#[test]
fn hundred_concurrent_connections_keep_their_bytes() {
    let mut h = Harness::new();
    const N: usize = 100;
    let mut clients = Vec::new();
    for i in 0..N {
        let mut c = h.host_connect();
        c.write_all(format!("CONNECT {}\n", 100 + i).as_bytes())
            .unwrap();
        clients.push(c);
    }
    // Guest accepts every REQUEST; collect host ports per guest port.
    let mut host_port = HashMap::new();
    while host_port.len() < N {
        let (p, _) = h.guest.recv();
        assert_eq!(p.op, OP_REQUEST);
        host_port.insert(p.dst_port, p.src_port);
        h.guest.send(pkt(OP_RESPONSE, p.dst_port, p.src_port), &[]);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(
            read_line(c),
            format!("OK {}\n", host_port[&(100 + i as u32)])
        );
        c.write_all(format!("message from client {i:03}").as_bytes())
            .unwrap();
    }
    // The guest echoes each message back, upper-cased.
    let expected_len = "message from client 000".len();
    let mut seen: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut done = 0;
    while done < N {
        let (p, data) = h.guest.recv_skip_credit();
        assert_eq!(p.op, OP_RW);
        let buf = seen.entry(p.dst_port).or_default();
        buf.extend_from_slice(&data);
        if buf.len() == expected_len {
            done += 1;
            let echo = buf.to_ascii_uppercase();
            h.guest.send(pkt(OP_RW, p.dst_port, p.src_port), &echo);
        }
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut b = vec![0u8; expected_len];
        c.read_exact(&mut b).unwrap();
        assert_eq!(b, format!("MESSAGE FROM CLIENT {i:03}").as_bytes());
        assert_eq!(
            seen[&(100 + i as u32)],
            format!("message from client {i:03}").as_bytes()
        );
    }
}

#[test]
fn malformed_packets_get_rst_and_the_device_keeps_working() {
    let mut h = Harness::new();
    let (mut c, hp) = h.open_from_host(9);

    // Wrong source CID: dropped with a RST (not forwarded to the host).
    let mut p = pkt(OP_RW, 9, hp);
    p.src_cid = 77;
    h.guest.send(p, b"spoofed");
    let (r, _) = h.guest.recv();
    assert_eq!((r.op, r.dst_cid), (OP_RST, GUEST_CID));
    // Unknown type and unknown op for an unknown port: RST.
    let mut p = pkt(OP_REQUEST, 5, 6);
    p.type_ = 2;
    h.guest.send(p, &[]);
    assert_eq!(h.guest.recv().0.op, OP_RST);
    h.guest.send(pkt(99, 5, 6), &[]);
    assert_eq!(h.guest.recv().0.op, OP_RST);
    // Data for an unknown connection: RST.
    h.guest.send(pkt(OP_RW, 5, 6), b"who?");
    let (r, _) = h.guest.recv();
    assert_eq!((r.op, r.src_port, r.dst_port), (OP_RST, 6, 5));
    // A RST for an unknown connection: silently ignored.
    h.guest.send(pkt(OP_RST, 5, 6), &[]);
    // A packet to another CID: RST from that address.
    let mut p = pkt(OP_REQUEST, 5, 6);
    p.dst_cid = 9;
    h.guest.send(p, &[]);
    let (r, _) = h.guest.recv();
    assert_eq!((r.op, r.src_cid), (OP_RST, 9));
    // len beyond the chain and beyond 64 KiB: dropped, RST.
    let mut p = pkt(OP_RW, 5, 6);
    p.len = 1000;
    h.guest.send_raw(&p.encode());
    assert_eq!(h.guest.recv().0.op, OP_RST);
    p.len = u32::MAX;
    h.guest.send_raw(&p.encode());
    assert_eq!(h.guest.recv().0.op, OP_RST);
    // A chain shorter than a header, and one pointing outside guest memory:
    // returned with length 0.
    h.guest.send_raw(&[1, 2, 3]);
    h.guest
        .txq
        .add_chain(&h.guest.mem, &[(MEM_SIZE as u64 - 8, 64, false)]);
    h.guest.kick(1);
    h.guest.drain_tx();
    assert!(
        h.guest.tx_used_lens.iter().all(|&l| l == 0),
        "tx buffers are used with length 0"
    );
    // No further replies for those two.
    assert!(h.guest.try_recv(Duration::from_millis(30)).is_none());

    // The good connection still works, and the device never asked for a reset.
    c.write_all(b"still here").unwrap();
    let (p, data) = h.guest.recv_skip_credit();
    assert_eq!((p.op, data.as_slice()), (OP_RW, &b"still here"[..]));
    assert!(!h.irq.needs_reset.load(Ordering::SeqCst));

    // A RW beyond the chain for the live connection resets it.
    let mut p = pkt(OP_RW, 9, hp);
    p.len = 10;
    h.guest.send_raw(&p.encode());
    let (r, _) = h.guest.recv_skip_credit();
    assert_eq!((r.op, r.src_port), (OP_RST, hp));
    assert!(closed_by_peer(&mut c));
}

#[test]
fn rx_buffers_too_small_or_unmapped_are_returned_empty() {
    let mut h = Harness::new();
    h.guest.refill = false;
    // Consume the 64 good buffers with replies to unknown-connection RWs.
    for i in 0..64 {
        h.guest.send(pkt(OP_RW, 1000 + i, 1), b"x");
    }
    for _ in 0..64 {
        assert_eq!(h.guest.recv().0.op, OP_RST);
    }
    // Now a tiny buffer and an unmapped one, then a good one.
    h.guest.rxq.add_chain(&h.guest.mem, &[(RX_BUFS, 16, true)]);
    h.guest
        .rxq
        .add_chain(&h.guest.mem, &[(MEM_SIZE as u64 - 8, 4096, true)]);
    h.guest.post_rx(1);
    h.guest.send(pkt(OP_RW, 2000, 1), b"x");
    let (r, _) = h.guest.recv();
    assert_eq!((r.op, r.dst_port), (OP_RST, 2000));
    assert_eq!(h.guest.empty_rx, 2);
}

#[test]
fn malformed_connect_lines_close_the_client() {
    let mut h = Harness::new();
    for bad in [
        &b"HELLO 5\n"[..],
        b"CONNECT\n",
        b"CONNECT 99999999999\n",
        &[b'C'; 40][..],
    ] {
        let mut c = h.host_connect();
        c.write_all(bad).unwrap();
        assert!(
            closed_by_peer(&mut c),
            "{:?} must close the client",
            String::from_utf8_lossy(bad)
        );
    }
    // A line that arrives in pieces, with data right behind the newline:
    // the data is the stream's first bytes.
    let mut c = h.host_connect();
    c.write_all(b"CONN").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    c.write_all(b"ECT 3\r\nearly bytes").unwrap();
    let (req, _) = h.guest.recv();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 3));
    assert!(
        h.guest.try_recv(Duration::from_millis(20)).is_none(),
        "nothing but the REQUEST before RESPONSE"
    );
    h.guest.send(pkt(OP_RESPONSE, 3, req.src_port), &[]);
    assert_eq!(read_line(&mut c), format!("OK {}\n", req.src_port));
    let (p, data) = h.guest.recv_skip_credit();
    assert_eq!((p.op, data.as_slice()), (OP_RW, &b"early bytes"[..]));
}

#[test]
fn host_connect_times_out_when_the_guest_never_answers() {
    let mut h =
        Harness::with(|d| d.set_timeouts(Duration::from_millis(300), Duration::from_secs(2)));
    let mut c = h.host_connect();
    c.write_all(b"CONNECT 8\n").unwrap();
    let (req, _) = h.guest.recv();
    assert_eq!(req.op, OP_REQUEST);
    let start = Instant::now();
    assert!(closed_by_peer(&mut c));
    assert!(start.elapsed() >= Duration::from_millis(250));
    // And the guest is told the request is withdrawn.
    let (r, _) = h.guest.recv();
    assert_eq!((r.op, r.src_port), (OP_RST, req.src_port));
}

#[test]
fn connection_limit_refuses_extra_connections() {
    let mut h = Harness::with(|d| d.set_max_connections(2));
    let _a = h.open_from_host(1);
    let listener = UnixListener::bind(format!("{}_77", h.uds.display())).unwrap();
    h.guest.send(pkt(OP_REQUEST, 500, 77), &[]);
    assert_eq!(h.guest.recv().0.op, OP_RESPONSE);
    let _s = listener.accept().unwrap();
    // Third: the guest is refused, and so is a host client.
    h.guest.send(pkt(OP_REQUEST, 501, 77), &[]);
    assert_eq!(h.guest.recv().0.op, OP_RST);
    let mut c = h.host_connect();
    assert!(closed_by_peer(&mut c));
}

#[test]
fn reset_closes_connections_and_reactivation_works() {
    let mut h = Harness::new();
    let (mut c, _) = h.open_from_host(52);
    h.dev.reset();
    assert!(closed_by_peer(&mut c));
    assert!(h.dev.worker_control().thread_id().is_none());
    assert!(
        h.guest.try_recv(Duration::from_millis(20)).is_none(),
        "nothing is sent on reset"
    );

    h.reactivate();
    let (mut c, hp) = h.open_from_host(52);
    c.write_all(b"again").unwrap();
    let (p, data) = h.guest.recv_skip_credit();
    assert_eq!(
        (p.op, p.src_port, data.as_slice()),
        (OP_RW, hp, &b"again"[..])
    );
}

#[test]
fn poll_mode_serves_traffic() {
    let mut h = Harness::new();
    let control = h.dev.worker_control();
    control.set_wait_mode(WaitMode::Poll {
        spin: Duration::from_millis(50),
    });
    let mut clients = Vec::new();
    for round in 0..3 {
        let (mut c, hp) = h.open_from_host(60 + round);
        c.write_all(b"polled").unwrap();
        let (p, data) = h.guest.recv_skip_credit();
        assert_eq!((p.op, data.as_slice()), (OP_RW, &b"polled"[..]));
        h.guest.send(pkt(OP_RW, 60 + round, hp), b"back");
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"back");
        clients.push(c);
        // Let the poller go idle and back to sleep between rounds.
        std::thread::sleep(Duration::from_millis(80));
    }
    control.set_wait_mode(WaitMode::Notify);
}

#[test]
fn fuzz_entry_points_survive_garbage() {
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..300 {
        let len = (next() % 300) as usize;
        let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        fuzzing::tx_packet(&data);
        fuzzing::connect_line(&data);
    }
    // Structured sequences: open, data, credit, shutdown, junk.
    let mut seq = Vec::new();
    for op in [
        OP_REQUEST,
        OP_RW,
        OP_CREDIT_REQUEST,
        OP_SHUTDOWN,
        OP_RESPONSE,
        OP_RW,
        OP_REQUEST,
        0,
        OP_RST,
    ] {
        let mut p = pkt(op, 10, 20);
        p.flags = 3;
        let payload: &[u8] = if op == OP_RW { b"data" } else { &[] };
        p.len = payload.len() as u32;
        seq.extend_from_slice(&p.encode());
        seq.extend_from_slice(payload);
    }
    fuzzing::tx_packet(&seq);
    fuzzing::connect_line(b"CONNECT 1\nCONNECT 2\n");
}
