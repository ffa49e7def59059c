//! Device tests over mock guest memory, with a `SOCK_SEQPACKET` socketpair
//! standing in for the tap (it keeps frame boundaries like a tap does).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::virtio::worker::WaitMode;
use crate::virtio::{features, DeviceContext, Interrupt, QueueContext, VirtioDevice};

pub(super) const MEM_SIZE: usize = 0x20_0000;

#[derive(Default)]
pub(super) struct TestInterrupt {
    pub signals: [AtomicUsize; 2],
    pub needs_reset: AtomicBool,
}

impl Interrupt for TestInterrupt {
    fn signal_queue(&self, index: u16) {
        if let Some(s) = self.signals.get(usize::from(index)) {
            s.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn signal_config(&self) {}
    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }
}

pub(super) fn wait_until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The driver side of one split queue laid out at `at`: descriptor table,
/// available ring, used ring (with their event fields). Written by hand:
/// `MockSplitQueue` 0.18 places the used ring over the second half of the
/// available ring.
pub(super) struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    pub kick: EventFd,
}

/// One buffer of a chain: guest address, length, device-writable.
pub(super) type Buf = (u64, u32, bool);

pub(super) fn raw_desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

impl<'a> Driver<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, at: u64, size: u16) -> Driver<'a> {
        let desc = at;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let end = used + 6 + 8 * u64::from(size);
        mem.write_slice(&vec![0u8; (end - at) as usize], GuestAddress(at))
            .unwrap();
        Driver {
            mem,
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(self.desc);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        q
    }

    pub fn context(&self, index: u16, event_idx: bool) -> QueueContext {
        let mut queue = self.queue();
        queue.set_event_idx(event_idx);
        QueueContext {
            index,
            queue,
            kick: self.kick.try_clone().unwrap(),
        }
    }

    /// Offers a chain of `bufs`; returns its head index.
    pub fn add(&mut self, bufs: &[Buf]) -> u16 {
        let first = self.next_desc;
        let descs: Vec<[u8; 16]> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 } as u16;
                if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                raw_desc(addr, len, flags, (first + i as u16 + 1) % self.size)
            })
            .collect();
        self.add_raw(&descs)
    }

    /// Offers descriptors exactly as given (flags and next untouched), as
    /// one chain starting at the next free table slot.
    pub fn add_raw(&mut self, descs: &[[u8; 16]]) -> u16 {
        let first = self.next_desc;
        assert!(
            usize::from(first) + descs.len() <= usize::from(self.size),
            "descriptor table full"
        );
        for (i, d) in descs.iter().enumerate() {
            self.mem
                .write_slice(
                    d,
                    GuestAddress(self.desc + 16 * u64::from(first + i as u16)),
                )
                .unwrap();
        }
        self.next_desc += descs.len() as u16;
        let idx = self.avail_idx();
        self.write_u16(self.avail + 4 + 2 * u64::from(idx % self.size), first);
        self.set_avail_idx(idx.wrapping_add(1));
        first
    }

    fn read_u16(&self, at: u64) -> u16 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    fn write_u16(&self, at: u64, v: u16) {
        self.mem.write_obj(v, GuestAddress(at)).unwrap()
    }

    pub fn avail_idx(&self) -> u16 {
        self.read_u16(self.avail + 2)
    }

    pub fn set_avail_idx(&self, v: u16) {
        self.write_u16(self.avail + 2, v)
    }

    /// The table slot the next chain starts at.
    pub fn next_index(&self) -> u16 {
        self.next_desc
    }

    pub fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    pub fn used_count(&self) -> u16 {
        self.read_u16(self.used + 2)
    }

    /// Used ring entries as (head, len).
    pub fn used(&self) -> Vec<(u32, u32)> {
        (0..self.used_count())
            .map(|i| {
                let at = self.used + 4 + 8 * u64::from(i % self.size);
                let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
                (id, len)
            })
            .collect()
    }

    pub fn wait_used(&self, n: u16) {
        wait_until(&format!("{n} used buffers"), || self.used_count() >= n);
    }

    /// `avail_event` in the used ring (EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        self.read_u16(self.used + 4 + 8 * u64::from(self.size))
    }

    pub fn used_flags(&self) -> u16 {
        self.read_u16(self.used)
    }
}

pub(super) fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills the two fds we pass.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both fds are new and ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

pub(super) fn send(fd: &OwnedFd, data: &[u8]) {
    // SAFETY: sends from a valid buffer.
    let n = unsafe { libc::send(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), 0) };
    assert_eq!(
        n,
        data.len() as isize,
        "send: {}",
        std::io::Error::last_os_error()
    );
}

/// Receives one frame, waiting up to 2 s.
pub(super) fn recv(fd: &OwnedFd) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_PACKET_LEN + 100];
    let start = Instant::now();
    loop {
        // SAFETY: receives into a valid buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            buf.truncate(n as usize);
            return buf;
        }
        assert!(start.elapsed() < Duration::from_secs(2), "no frame arrived");
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub(super) fn nothing_to_recv(fd: &OwnedFd) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: peeks into a valid buffer.
    unsafe { libc::recv(fd.as_raw_fd(), b.as_mut_ptr().cast(), 1, libc::MSG_PEEK) < 0 }
}

const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x8000;
/// Guest buffers start here.
const DATA: u64 = 0x10_0000;

struct Rig {
    mem: Arc<GuestMemoryMmap>,
    dev: VirtioNet,
    peer: OwnedFd,
    irq: Arc<TestInterrupt>,
}

fn rig() -> Rig {
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
    let (ours, peer) = seqpacket_pair();
    let config: NetConfig = "tap=test0,mac=52:54:00:12:34:56".parse().unwrap();
    let dev = VirtioNet::with_tap(&config, Tap::from_packet_fd(ours, "test0")).unwrap();
    Rig {
        mem,
        dev,
        peer,
        irq: Arc::new(TestInterrupt::default()),
    }
}

impl Rig {
    fn activate(&mut self, rx: &Driver, tx: &Driver, acked: u64, event_idx: bool) {
        let ctx = DeviceContext {
            mem: self.mem.clone(),
            queues: vec![
                rx.context(RX_QUEUE, event_idx),
                tx.context(TX_QUEUE, event_idx),
            ],
            acked_features: acked | features::VERSION_1,
            interrupt: self.irq.clone(),
        };
        self.dev.activate(ctx).unwrap();
    }
}

fn write_mem(mem: &GuestMemoryMmap, at: u64, data: &[u8]) {
    mem.write_slice(data, GuestAddress(at)).unwrap();
}

fn read_mem(mem: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(at)).unwrap();
    v
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// A packet as the tap would hand it over: header (flags, gso none) then
/// the frame.
fn packet(flags: u8, frame: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; VNET_HDR_LEN];
    p[0] = flags;
    p.extend_from_slice(frame);
    p
}

#[test]
fn offers_the_features_and_config_space() {
    let r = rig();
    let f = r.dev.features();
    for bit in [
        feature::CSUM,
        feature::GUEST_CSUM,
        feature::MAC,
        feature::GUEST_TSO4,
        feature::GUEST_TSO6,
        feature::HOST_TSO4,
        feature::HOST_TSO6,
        feature::MRG_RXBUF,
        feature::STATUS,
        features::RING_EVENT_IDX,
        features::RING_INDIRECT_DESC,
    ] {
        assert_ne!(f & bit, 0, "feature bit {bit:#x} missing");
    }
    assert_eq!(f & (1 << 17), 0, "no control queue");
    assert_eq!(r.dev.device_type(), crate::virtio::device_type::NET);
    assert_eq!(r.dev.queue_max_sizes(), vec![256, 256]);
    let mut cfg = [0xffu8; 10];
    r.dev.read_config(0, &mut cfg);
    assert_eq!(
        cfg,
        [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 0, 0],
        "mac, status=LINK_UP, zeros past the end"
    );
    let mut one = [0u8; 2];
    r.dev.read_config(6, &mut one);
    assert_eq!(u16::from_le_bytes(one), 1);
}

#[test]
fn offload_follows_the_guest_features() {
    use super::tap::offload_flags;
    assert_eq!(offload_flags(0), 0);
    assert_eq!(
        offload_flags(feature::GUEST_TSO4),
        0,
        "no TSO without checksum offload"
    );
    assert_eq!(offload_flags(feature::GUEST_CSUM), libc::TUN_F_CSUM);
    assert_eq!(
        offload_flags(feature::GUEST_CSUM | feature::GUEST_TSO4 | feature::GUEST_TSO6),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
}

#[test]
fn transmitted_frame_reaches_the_tap_with_its_header() {
    let mut r = rig();
    let mem = r.mem.clone();
    let rx = Driver::new(&mem, RX_RING, 16);
    let mut tx = Driver::new(&mem, TX_RING, 16);
    r.activate(&rx, &tx, feature::CSUM, false);
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[0] = 1; // NEEDS_CSUM, passed through for the kernel
    hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
    let frame = pattern(60, 3);
    write_mem(&r.mem, DATA, &hdr);
    write_mem(&r.mem, DATA + 0x1000, &frame);
    let head = tx.add(&[(DATA, 12, false), (DATA + 0x1000, 60, false)]);
    tx.kick();
    let got = recv(&r.peer);
    assert_eq!(&got[..12], &hdr);
    assert_eq!(&got[12..], &frame[..]);
    tx.wait_used(1);
    assert_eq!(tx.used(), vec![(u32::from(head), 0)]);
    wait_until("the tx interrupt", || {
        r.irq.signals[1].load(Ordering::SeqCst) == 1
    });
    let s = r.dev.stats();
    assert_eq!((s.tx_frames, s.tx_bytes, s.tx_dropped), (1, 60, 0));
}

#[test]
fn hostile_transmit_chains_are_dropped_and_the_device_keeps_going() {
    let mut r = rig();
    let mem = r.mem.clone();
    let rx = Driver::new(&mem, RX_RING, 16);
    let mut tx = Driver::new(&mem, TX_RING, 16);
    r.activate(&rx, &tx, 0, false);
    write_mem(&r.mem, DATA, &packet(0, &pattern(50, 1)));
    let writable = tx.add(&[(DATA, 12, false), (DATA + 12, 50, true)]);
    let short = tx.add(&[(DATA, 5, false)]);
    let too_long = tx.add(&[
        (DATA, 12, false),
        (DATA + 0x1000, (MAX_FRAME_LEN + 1) as u32, false),
    ]);
    let at = tx.next_index();
    let looped = tx.add_raw(&[raw_desc(DATA, 12, VRING_DESC_F_NEXT as u16, at)]);
    let past_table = tx.add_raw(&[raw_desc(DATA, 12, VRING_DESC_F_NEXT as u16, 200)]);
    let outside = tx.add(&[(DATA, 12, false), (MEM_SIZE as u64 + 0x1000, 50, false)]);
    let good = tx.add(&[(DATA, 62, false)]);
    tx.kick();
    let got = recv(&r.peer);
    assert_eq!(
        got,
        packet(0, &pattern(50, 1)),
        "only the good frame reaches the tap"
    );
    tx.wait_used(7);
    let heads: Vec<u32> = [writable, short, too_long, looped, past_table, outside, good]
        .iter()
        .map(|h| u32::from(*h))
        .collect();
    assert_eq!(tx.used(), heads.iter().map(|h| (*h, 0)).collect::<Vec<_>>());
    assert!(nothing_to_recv(&r.peer));
    for p in [
        Problem::TxWritableDescriptor,
        Problem::TxTooShort,
        Problem::TxTooLong,
        Problem::TxBrokenChain,
        Problem::TxBadAddress,
    ] {
        assert!(r.dev.diag().was_reported(p), "{p:?} not reported");
    }
    let s = r.dev.stats();
    assert_eq!((s.tx_frames, s.tx_dropped, s.bad_chains), (1, 6, 5));
    assert!(!r.irq.needs_reset.load(Ordering::SeqCst));

    // Still serving afterwards.
    let again = tx.add(&[(DATA, 62, false)]);
    tx.kick();
    assert_eq!(recv(&r.peer).len(), 62);
    tx.wait_used(8);
    assert_eq!(tx.used()[7], (u32::from(again), 0));
}

#[test]
fn a_64k_tso_frame_is_sent_whole() {
    let mut r = rig();
    let mem = r.mem.clone();
    let rx = Driver::new(&mem, RX_RING, 16);
    let mut tx = Driver::new(&mem, TX_RING, 16);
    r.activate(&rx, &tx, feature::CSUM | feature::HOST_TSO4, false);
    let frame = pattern(MAX_FRAME_LEN, 9);
    write_mem(&r.mem, DATA, &packet(0, &frame));
    tx.add(&[
        (DATA, 12, false),
        (DATA + 12, 40000, false),
        (DATA + 40012, (MAX_FRAME_LEN - 40000) as u32, false),
    ]);
    tx.kick();
    let got = recv(&r.peer);
    assert_eq!(got.len(), MAX_PACKET_LEN);
    assert!(got[12..] == frame[..]);
}

#[test]
fn received_frame_spans_mergeable_buffers() {
    let mut r = rig();
    let mem = r.mem.clone();
    let mut rx = Driver::new(&mem, RX_RING, 16);
    let tx = Driver::new(&mem, TX_RING, 16);
    let heads: Vec<u16> = (0..4)
        .map(|i| rx.add(&[(DATA + i * 0x1000, 1024, true)]))
        .collect();
    r.activate(&rx, &tx, feature::MRG_RXBUF | feature::GUEST_CSUM, false);
    let frame = pattern(3000, 5);
    send(&r.peer, &packet(2, &frame)); // DATA_VALID kept with GUEST_CSUM
    rx.wait_used(3);
    let used = rx.used();
    assert_eq!(
        used,
        vec![
            (heads[0].into(), 1024),
            (heads[1].into(), 1024),
            (heads[2].into(), 3012 - 2048)
        ]
    );
    let first = read_mem(&r.mem, DATA, 1024);
    assert_eq!(first[0], 2, "header flags passed through");
    assert_eq!(u16::from_le_bytes([first[10], first[11]]), 3, "num_buffers");
    let mut got = first[12..].to_vec();
    got.extend(read_mem(&r.mem, DATA + 0x1000, 1024));
    got.extend(read_mem(&r.mem, DATA + 0x2000, 3012 - 2048));
    assert!(got == frame);
    wait_until("the rx interrupt", || {
        r.irq.signals[0].load(Ordering::SeqCst) >= 1
    });

    // The fourth buffer takes the next small frame alone.
    send(&r.peer, &packet(0, &pattern(100, 6)));
    rx.wait_used(4);
    assert_eq!(rx.used()[3], (heads[3].into(), 112));
    let b = read_mem(&r.mem, DATA + 0x3000, 12);
    assert_eq!(u16::from_le_bytes([b[10], b[11]]), 1);
    assert_eq!(r.dev.stats().rx_frames, 2);
}

#[test]
fn without_mergeable_buffers_one_chain_holds_the_frame() {
    let mut r = rig();
    let mem = r.mem.clone();
    let mut rx = Driver::new(&mem, RX_RING, 16);
    let tx = Driver::new(&mem, TX_RING, 16);
    let head = rx.add(&[(DATA, 12, true), (DATA + 0x1000, 2000, true)]);
    r.activate(&rx, &tx, 0, false);
    let frame = pattern(1500, 7);
    let mut p = packet(2, &frame);
    p[10] = 9; // garbage where num_buffers goes
    send(&r.peer, &p);
    rx.wait_used(1);
    assert_eq!(rx.used(), vec![(head.into(), 1512)]);
    let hdr = read_mem(&r.mem, DATA, 12);
    assert_eq!(hdr[0], 0, "flags cleared without GUEST_CSUM");
    assert_eq!(
        u16::from_le_bytes([hdr[10], hdr[11]]),
        1,
        "num_buffers is 1"
    );
    assert!(read_mem(&r.mem, DATA + 0x1000, 1500) == frame);
}

#[test]
fn without_mergeable_buffers_a_too_small_chain_drops_only_that_frame() {
    let mut r = rig();
    let mem = r.mem.clone();
    let mut rx = Driver::new(&mem, RX_RING, 16);
    let tx = Driver::new(&mem, TX_RING, 16);
    let small = rx.add(&[(DATA, 100, true)]);
    let big = rx.add(&[(DATA + 0x1000, 4096, true)]);
    r.activate(&rx, &tx, 0, false);
    send(&r.peer, &packet(0, &pattern(1000, 1)));
    send(&r.peer, &packet(0, &pattern(50, 2)));
    rx.wait_used(2);
    assert_eq!(rx.used(), vec![(small.into(), 0), (big.into(), 62)]);
    assert!(read_mem(&r.mem, DATA + 0x1000 + 12, 50) == pattern(50, 2));
    let s = r.dev.stats();
    assert_eq!((s.rx_frames, s.rx_dropped), (1, 1));
    assert!(r.dev.diag().was_reported(Problem::RxBufferTooSmall));
}

#[test]
fn receive_waits_for_buffers_and_resumes_on_the_kick() {
    let mut r = rig();
    let mem = r.mem.clone();
    let mut rx = Driver::new(&mem, RX_RING, 16);
    let tx = Driver::new(&mem, TX_RING, 16);
    r.activate(&rx, &tx, feature::MRG_RXBUF, true);
    let control = r.dev.worker_control();
    wait_until("the worker", || control.thread_id().is_some());
    let rounds = control.busy_rounds();
    for seed in 0..3 {
        send(&r.peer, &packet(0, &pattern(500, seed)));
    }
    wait_until("the worker to see the tap", || {
        control.busy_rounds() > rounds
    });
    let blocked = control.busy_rounds();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        control.busy_rounds(),
        blocked,
        "a worker waiting for buffers must sleep, not spin on the tap"
    );
    assert_eq!(rx.used_count(), 0);
    assert_eq!(rx.avail_event(), 0, "asks to be kicked for the next buffer");

    // One buffer: the first frame goes in, the others keep waiting.
    let h0 = rx.add(&[(DATA, 2048, true)]);
    rx.kick();
    rx.wait_used(1);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(rx.used(), vec![(h0.into(), 512)]);
    assert_eq!(rx.avail_event(), 1);

    let h1 = rx.add(&[(DATA + 0x1000, 2048, true)]);
    let h2 = rx.add(&[(DATA + 0x2000, 2048, true)]);
    rx.kick();
    rx.wait_used(3);
    assert_eq!(
        rx.used(),
        vec![(h0.into(), 512), (h1.into(), 512), (h2.into(), 512)]
    );
    for (i, at) in [DATA, DATA + 0x1000, DATA + 0x2000].into_iter().enumerate() {
        assert!(
            read_mem(&r.mem, at + 12, 500) == pattern(500, i as u8),
            "frame {i} in order, none lost"
        );
    }
    assert_eq!(r.dev.stats().rx_dropped, 0);
}

#[test]
fn hostile_receive_chains_are_returned_empty() {
    let mut r = rig();
    let mem = r.mem.clone();
    let mut rx = Driver::new(&mem, RX_RING, 16);
    let tx = Driver::new(&mem, TX_RING, 16);
    let readable = rx.add(&[(DATA, 2048, false)]);
    let mixed = rx.add(&[(DATA, 12, true), (DATA + 12, 2048, false)]);
    let outside = rx.add(&[(MEM_SIZE as u64 - 16, 2048, true)]);
    let at = rx.next_index();
    let looped = rx.add_raw(&[raw_desc(
        DATA,
        2048,
        (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
        at,
    )]);
    let tiny = rx.add(&[(DATA, 4, true)]);
    let good = rx.add(&[(DATA + 0x4000, 2048, true)]);
    r.activate(&rx, &tx, feature::MRG_RXBUF, false);
    send(&r.peer, &packet(0, &pattern(300, 4)));
    rx.wait_used(6);
    let expect: Vec<(u32, u32)> = [readable, mixed, outside, looped, tiny]
        .iter()
        .map(|h| (u32::from(*h), 0))
        .collect();
    assert_eq!(rx.used()[..5], expect[..]);
    assert_eq!(rx.used()[5], (good.into(), 312));
    assert!(read_mem(&r.mem, DATA + 0x4000 + 12, 300) == pattern(300, 4));
    for p in [
        Problem::RxReadableDescriptor,
        Problem::RxBadAddress,
        Problem::RxBrokenChain,
        Problem::RxBufferTooSmall,
    ] {
        assert!(r.dev.diag().was_reported(p), "{p:?} not reported");
    }
    assert_eq!(
        r.dev.stats().bad_chains,
        4,
        "the tiny buffer counts as too small, not malformed"
    );
    assert!(!r.irq.needs_reset.load(Ordering::SeqCst));
}

#[test]
fn a_frame_larger_than_the_whole_ring_is_dropped_and_the_next_one_fits() {
    let mut r = rig();
    let mem = r.mem.clone();
    let mut rx = Driver::new(&mem, RX_RING, 2);
    let tx = Driver::new(&mem, TX_RING, 16);
    let a = rx.add(&[(DATA, 200, true)]);
    let b = rx.add(&[(DATA + 0x1000, 200, true)]);
    r.activate(&rx, &tx, feature::MRG_RXBUF, false);
    send(&r.peer, &packet(0, &pattern(1000, 1)));
    send(&r.peer, &packet(0, &pattern(300, 2)));
    rx.wait_used(2);
    assert_eq!(rx.used(), vec![(a.into(), 200), (b.into(), 112)]);
    let s = r.dev.stats();
    assert_eq!((s.rx_frames, s.rx_dropped), (1, 1));
    assert!(r.dev.diag().was_reported(Problem::RxRingTooSmall));
}

#[test]
fn reset_stops_the_worker_and_the_device_can_be_activated_again() {
    let mut r = rig();
    let mem = r.mem.clone();
    let control = r.dev.worker_control();
    for round in 0..2u8 {
        // A fresh driver (rings zeroed) as after a guest reset.
        let rx = Driver::new(&mem, RX_RING, 16);
        let mut tx = Driver::new(&mem, TX_RING, 16);
        r.activate(&rx, &tx, 0, false);
        wait_until("the worker", || control.thread_id().is_some());
        write_mem(&r.mem, DATA, &packet(0, &pattern(40, round)));
        tx.add(&[(DATA, 52, false)]);
        tx.kick();
        assert_eq!(recv(&r.peer), packet(0, &pattern(40, round)));
        r.dev.reset();
        assert_eq!(control.thread_id(), None, "reset stops the worker");
    }
    assert_eq!(r.dev.stats().tx_frames, 2);
}

#[test]
fn poll_mode_serves_without_kicks_and_suppresses_them() {
    let mut r = rig();
    let mem = r.mem.clone();
    let mut rx = Driver::new(&mem, RX_RING, 16);
    let mut tx = Driver::new(&mem, TX_RING, 16);
    r.activate(&rx, &tx, feature::MRG_RXBUF, false);
    let control = r.dev.worker_control();
    control.set_wait_mode(WaitMode::Poll {
        spin: Duration::from_secs(5),
    });
    wait_until("notifications suppressed", || {
        tx.used_flags() == 1 && rx.used_flags() == 1
    });
    write_mem(&r.mem, DATA, &packet(0, &pattern(80, 3)));
    tx.add(&[(DATA, 92, false)]);
    assert_eq!(recv(&r.peer).len(), 92, "sent without a kick");
    send(&r.peer, &packet(0, &pattern(70, 1)));
    std::thread::sleep(Duration::from_millis(10));
    let h = rx.add(&[(DATA + 0x1000, 1024, true)]);
    rx.wait_used(1);
    assert_eq!(rx.used(), vec![(h.into(), 82)]);
    control.set_wait_mode(WaitMode::Notify);
    wait_until("notifications back on", || {
        tx.used_flags() == 0 && rx.used_flags() == 0
    });
}

#[test]
fn a_broken_ring_asks_for_a_reset() {
    let mut r = rig();
    let mem = r.mem.clone();
    let rx = Driver::new(&mem, RX_RING, 16);
    let tx = Driver::new(&mem, TX_RING, 16);
    r.activate(&rx, &tx, 0, false);
    tx.set_avail_idx(100); // more chains than the queue holds
    tx.kick();
    wait_until("needs reset", || r.irq.needs_reset.load(Ordering::SeqCst));
    assert!(r.dev.diag().was_reported(Problem::QueueBroken));
}

#[test]
fn activation_needs_both_queues() {
    let mut r = rig();
    let mem = r.mem.clone();
    let rx = Driver::new(&mem, RX_RING, 16);
    let ctx = DeviceContext {
        mem: r.mem.clone(),
        queues: vec![rx.context(RX_QUEUE, false)],
        acked_features: features::VERSION_1,
        interrupt: r.irq.clone(),
    };
    assert!(matches!(
        r.dev.activate(ctx),
        Err(crate::virtio::ActivateError::MissingQueue(1))
    ));
}
