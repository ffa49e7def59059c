//! Test doubles shared by the device unit tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};

use super::Interrupt;

/// Counts every signal a device sends, per queue (up to 8 queues).
#[derive(Default)]
pub struct CountingInterrupt {
    pub queue: [AtomicUsize; 8],
    pub config: AtomicUsize,
    pub needs_reset: AtomicUsize,
}

impl Interrupt for CountingInterrupt {
    fn signal_queue(&self, index: u16) {
        if let Some(c) = self.queue.get(usize::from(index)) {
            c.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn signal_config(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }
    fn set_needs_reset(&self) {
        self.needs_reset.fetch_add(1, Ordering::SeqCst);
    }
}

/// Polls `f` until it holds; fails the test after 2 s (device workers
/// answer in microseconds, so this only trips on a real hang).
pub fn wait_until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Descriptor flags, as the u16 a descriptor holds.
pub const W: u16 = VRING_DESC_F_WRITE as u16;
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;

/// A split-ring descriptor as written into guest memory.
pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}
