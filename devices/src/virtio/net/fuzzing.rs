//! Fuzz entry points: bytes become a guest memory with one queue (its
//! descriptor table, available ring and buffer contents), then the real
//! transmit or receive path of the device's worker runs over it, with a
//! socketpair standing in for the tap. Neither may panic on any input.
//!
//! Input layout, both entry points: `[descriptors: u8][heads: u8][flags: u8]`,
//! then 16 bytes per descriptor (addr u64, len u32, flags u16, next u16,
//! little endian; addresses are taken modulo twice the memory size so about
//! half land inside it), then 2 bytes per available head; the rest fills
//! guest memory from [`DATA`]. `rx_fill` first takes
//! `[frames: u8]` and 2 bytes of length per frame, which the tap side sends
//! before the device reads.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::worker::NetWorker;
use super::{feature, Diag, Tap, MAX_PACKET_LEN};
use crate::virtio::{features, Interrupt, QueueContext};

const MEM_SIZE: usize = 0x4_0000;
const SIZE: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
/// Where fuzz bytes fill guest memory.
pub const DATA: u64 = 0x1000;

struct NoInterrupt;

impl Interrupt for NoInterrupt {
    fn signal_queue(&self, _index: u16) {}
    fn signal_config(&self) {}
    fn set_needs_reset(&self) {}
}

/// Splits `n` bytes off the front of `data`.
fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if data.len() < n {
        return None;
    }
    let (head, rest) = data.split_at(n);
    *data = rest;
    Some(head)
}

struct Setup {
    mem: Arc<GuestMemoryMmap>,
    queue: Queue,
    flags: u8,
}

/// Guest memory with one queue described by `data`.
fn build(mut data: &[u8]) -> Option<Setup> {
    let header = take(&mut data, 3)?;
    let (descriptors, heads, flags) = (
        usize::from(header[0] % (SIZE as u8 + 1)),
        header[1] % 40,
        header[2],
    );
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    for i in 0..descriptors {
        let d = take(&mut data, 16)?;
        let raw_addr = u64::from_le_bytes(d[0..8].try_into().ok()?);
        let mut desc = [0u8; 16];
        desc.copy_from_slice(d);
        desc[0..8].copy_from_slice(&(raw_addr % (2 * MEM_SIZE as u64)).to_le_bytes());
        mem.write_slice(&desc, GuestAddress(DESC + 16 * i as u64))
            .ok()?;
    }
    for i in 0..u64::from(heads) {
        let h = take(&mut data, 2)?;
        // Beyond the ring's 16 slots the index alone says "too many".
        if i < u64::from(SIZE) {
            mem.write_slice(h, GuestAddress(AVAIL + 4 + 2 * i)).ok()?;
        }
    }
    mem.write_obj(u16::from(heads), GuestAddress(AVAIL + 2))
        .ok()?;
    let n = data.len().min(MEM_SIZE - DATA as usize);
    mem.write_slice(&data[..n], GuestAddress(DATA)).ok()?;

    let mut queue = Queue::new(SIZE).ok()?;
    queue.set_size(SIZE);
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_event_idx(flags & 4 != 0);
    queue.set_ready(true);
    Some(Setup {
        mem: Arc::new(mem),
        queue,
        flags,
    })
}

fn socketpair() -> Option<(OwnedFd, OwnedFd)> {
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
    if r != 0 {
        return None;
    }
    // SAFETY: both fds are new and ours.
    Some(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A worker whose queue `which` is the fuzzed one and the other is empty.
fn worker(setup: Setup, rx_side: bool, ours: OwnedFd, acked: u64) -> Option<NetWorker> {
    let idle = || -> Option<QueueContext> {
        // An empty, never-ready queue elsewhere in memory.
        Some(QueueContext {
            index: 0,
            queue: Queue::new(SIZE).ok()?,
            kick: EventFd::new(libc::EFD_NONBLOCK).ok()?,
        })
    };
    let fuzzed = QueueContext {
        index: 0,
        queue: setup.queue,
        kick: EventFd::new(libc::EFD_NONBLOCK).ok()?,
    };
    let (rx, tx) = if rx_side {
        (fuzzed, idle()?)
    } else {
        (idle()?, fuzzed)
    };
    Some(NetWorker::new(
        setup.mem,
        rx,
        tx,
        Arc::new(Tap::from_packet_fd(ours, "fuzz")),
        Arc::new(NoInterrupt),
        Arc::new(Diag::new("fuzz")),
        acked | features::VERSION_1,
    ))
}

/// Transmit path: the chains `data` describes are gathered and sent.
pub fn tx_chain(data: &[u8]) {
    let Some(setup) = build(data) else { return };
    let Some((ours, _peer)) = socketpair() else {
        return;
    };
    let acked = if setup.flags & 1 != 0 {
        feature::CSUM | feature::HOST_TSO4
    } else {
        0
    };
    if let Some(mut w) = worker(setup, false, ours, acked) {
        w.run_tx_once();
    }
}

/// Receive path: frames of the lengths `data` gives arrive from the tap
/// and are filled into the chains `data` describes. Flags: bit 0
/// MRG_RXBUF, bit 1 GUEST_CSUM, bit 2 EVENT_IDX.
pub fn rx_fill(mut data: &[u8]) {
    let Some(count) = take(&mut data, 1) else {
        return;
    };
    let mut lengths = Vec::new();
    for _ in 0..count[0] % 4 {
        let Some(l) = take(&mut data, 2) else { return };
        lengths.push(usize::from(u16::from_le_bytes([l[0], l[1]])).min(MAX_PACKET_LEN));
    }
    let Some(setup) = build(data) else { return };
    let Some((ours, peer)) = socketpair() else {
        return;
    };
    let mut acked = 0;
    if setup.flags & 1 != 0 {
        acked |= feature::MRG_RXBUF;
    }
    if setup.flags & 2 != 0 {
        acked |= feature::GUEST_CSUM;
    }
    for (i, len) in lengths.into_iter().enumerate() {
        let frame: Vec<u8> = (0..len).map(|b| (b as u8) ^ (i as u8)).collect();
        // SAFETY: sends from a valid buffer; a full socket just drops it.
        unsafe {
            libc::send(
                std::os::fd::AsRawFd::as_raw_fd(&peer),
                frame.as_ptr().cast(),
                frame.len(),
                0,
            )
        };
    }
    if let Some(mut w) = worker(setup, true, ours, acked) {
        w.run_rx_once();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cheap deterministic generator, so the smoke run is reproducible.
    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn fuzz_entry_points_survive_random_and_edge_inputs() {
        for seed in 0..300u64 {
            let len = (seed as usize * 37) % 700;
            let data = bytes(seed, len);
            tx_chain(&data);
            rx_fill(&data);
        }
        for data in [
            &[][..],
            &[0xff; 3][..],
            &[16, 39, 0xff][..],
            &[3, 0xff, 0xff, 16, 30, 7][..],
        ] {
            tx_chain(data);
            rx_fill(data);
        }
    }

    #[test]
    fn a_valid_fuzz_input_sends_a_frame() {
        // One readable descriptor of 60 bytes at DATA, head 0.
        let mut data = vec![1, 1, 0];
        data.extend_from_slice(&DATA.to_le_bytes());
        data.extend_from_slice(&60u32.to_le_bytes());
        data.extend_from_slice(&[0, 0, 0, 0]);
        data.extend_from_slice(&[0, 0]);
        data.extend_from_slice(&[0xab; 60]);
        let setup = build(&data).expect("valid input builds");
        let (ours, peer) = socketpair().unwrap();
        let mut w = worker(setup, false, ours, 0).unwrap();
        w.run_tx_once();
        let mut buf = [0u8; 100];
        // SAFETY: receives into a valid buffer.
        let n = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&peer),
                buf.as_mut_ptr().cast(),
                100,
                0,
            )
        };
        assert_eq!(n, 60);
        assert_eq!(&buf[..60], &[0xab; 60][..]);
    }
}
