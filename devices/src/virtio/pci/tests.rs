//! The transport driven the way Linux's virtio_pci_modern drives it.

use std::sync::atomic::AtomicUsize;

use super::*;
use crate::pci::config;
use crate::pci::msix::tests::RecordingRouting;
use crate::virtio::ActivateError;

#[derive(Default)]
struct Seen {
    activations: AtomicUsize,
    resets: AtomicUsize,
    queues: Mutex<Vec<(u16, u16)>>,
    features: Mutex<u64>,
    interrupt: Mutex<Option<Arc<dyn Interrupt>>>,
}

struct FakeDevice(Arc<Seen>);

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        super::super::device_type::RNG
    }
    fn name(&self) -> &str {
        "fake0"
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256, 64]
    }
    fn features(&self) -> u64 {
        features::RING_EVENT_IDX | 1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::super::read_config_bytes(&[0xaa, 0xbb], offset, data);
    }
    fn activate(&mut self, ctx: DeviceContext) -> Result<(), ActivateError> {
        self.0.activations.fetch_add(1, Ordering::SeqCst);
        *self.0.queues.lock().unwrap() = ctx
            .queues
            .iter()
            .map(|q| (q.index, q.queue.size()))
            .collect();
        *self.0.features.lock().unwrap() = ctx.acked_features;
        *self.0.interrupt.lock().unwrap() = Some(ctx.interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        self.0.resets.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct RecordingIoEvents(Mutex<Vec<(bool, u64)>>);

impl IoEventRegistrar for RecordingIoEvents {
    fn register(&self, addr: u64, _fd: &EventFd) -> io::Result<()> {
        self.0.lock().unwrap().push((true, addr));
        Ok(())
    }
    fn unregister(&self, addr: u64, _fd: &EventFd) -> io::Result<()> {
        self.0.lock().unwrap().push((false, addr));
        Ok(())
    }
}

struct Rig {
    dev: VirtioPciDevice,
    seen: Arc<Seen>,
    routing: Arc<RecordingRouting>,
    ioevents: Arc<RecordingIoEvents>,
}

const BAR: u32 = 0xc000_0000;

fn rig() -> Rig {
    let mem =
        Arc::new(vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let seen = Arc::new(Seen::default());
    let routing = Arc::new(RecordingRouting::default());
    let ioevents = Arc::new(RecordingIoEvents::default());
    let dev = VirtioPciDevice::new(
        Box::new(FakeDevice(seen.clone())),
        mem,
        BAR,
        routing.clone(),
        ioevents.clone(),
    )
    .unwrap();
    Rig {
        dev,
        seen,
        routing,
        ioevents,
    }
}

impl Rig {
    fn w(&mut self, off: u64, v: u64, len: usize) {
        self.dev.bar_write(0, off, &v.to_le_bytes()[..len]);
    }
    fn r(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn status(&mut self) -> u8 {
        self.r(0x14, 1) as u8
    }
    /// Sets up queue 0 with rings at 0x1000.. and MSI-X vector 1.
    fn setup_queue0(&mut self, size: u16) {
        self.w(0x16, 0, 2);
        self.w(0x18, u64::from(size), 2);
        self.w(0x1a, 1, 2);
        self.w(0x20, 0x1000, 8);
        self.w(0x28, 0x2000, 4);
        self.w(0x2c, 0, 4);
        self.w(0x30, 0x3000, 8);
        self.w(0x1c, 1, 2);
    }
    fn negotiate(&mut self, features: u64) {
        self.w(0x14, u64::from(status::ACKNOWLEDGE | status::DRIVER), 1);
        self.w(0x08, 0, 4);
        self.w(0x0c, features & 0xffff_ffff, 4);
        self.w(0x08, 1, 4);
        self.w(0x0c, features >> 32, 4);
        self.w(
            0x14,
            u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
            1,
        );
    }
}

const ALL_OK: u8 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

#[test]
fn pci_identity_and_capabilities_are_what_linux_looks_for() {
    let mut r = rig();
    let mut id = [0u8; 4];
    r.dev.config_read(0, &mut id);
    assert_eq!(
        u32::from_le_bytes(id),
        0x1044_1af4,
        "vendor 1af4, device 0x1040 + type"
    );
    // Walk the capability list: four virtio caps (types 1..4) and MSI-X.
    let mut b = [0u8; 1];
    r.dev.config_read(config::CAPABILITIES_POINTER, &mut b);
    let mut at = b[0] as usize;
    let mut types = Vec::new();
    while at != 0 {
        let mut cap = [0u8; 4];
        r.dev.config_read(at, &mut cap);
        types.push(if cap[0] == 0x09 { cap[3] } else { cap[0] });
        at = cap[1] as usize;
    }
    assert_eq!(types, vec![1, 2, 3, 4, 0x11]);
    assert_eq!(r.r(0x12, 2), 2, "num_queues");
    assert_eq!(r.r(0x04, 4), features::RING_EVENT_IDX | 1);
    r.w(0x00, 1, 4);
    assert_eq!(r.r(0x04, 4), 1, "VERSION_1 in the high word");
}

#[test]
fn driver_ok_activates_with_enabled_queues_and_vectors() {
    let mut r = rig();
    r.negotiate(features::VERSION_1 | features::RING_EVENT_IDX);
    assert_ne!(r.status() & status::FEATURES_OK, 0);
    r.setup_queue0(128);
    assert_eq!(r.r(0x1a, 2), 1, "vector accepted");
    r.w(0x14, u64::from(ALL_OK), 1);
    assert_eq!(r.status(), ALL_OK);
    assert_eq!(r.seen.activations.load(Ordering::SeqCst), 1);
    assert_eq!(
        *r.seen.queues.lock().unwrap(),
        vec![(0, 128)],
        "queue 1 was not enabled"
    );
    assert_eq!(
        *r.seen.features.lock().unwrap(),
        features::VERSION_1 | features::RING_EVENT_IDX
    );

    // The device signals queue 0 -> MSI-X vector 1 fires once enabled and unmasked.
    let pci_ctl = r.dev.msix_cap + 2;
    r.dev.config_write(pci_ctl, &(1u16 << 15).to_le_bytes());
    r.w(MSIX_TABLE + 16 + 12, 0, 4);
    let irq = r.seen.interrupt.lock().unwrap().clone().unwrap();
    irq.signal_queue(0);
    assert!(r.routing.irqfds.lock().unwrap()[1].read().is_ok());
    assert_eq!(
        r.r(ISR, 1),
        1,
        "ISR shows the queue interrupt, and reading clears it"
    );
    assert_eq!(r.r(ISR, 1), 0);
    // Device config reads reach the device.
    assert_eq!(r.r(DEVICE_CONFIG, 2), 0xbbaa);
}

#[test]
fn unknown_features_are_refused_and_missing_version_1_too() {
    let mut r = rig();
    r.negotiate(features::VERSION_1 | 1 << 40);
    assert_eq!(r.status() & status::FEATURES_OK, 0);
    r.w(0x14, 0, 1);
    r.negotiate(1);
    assert_eq!(
        r.status() & status::FEATURES_OK,
        0,
        "legacy-only drivers are refused"
    );
}

#[test]
fn bad_rings_mark_the_device_broken_not_the_vmm() {
    let mut r = rig();
    r.negotiate(features::VERSION_1);
    r.setup_queue0(100); // not a power of two
    r.w(0x14, u64::from(ALL_OK), 1);
    assert_ne!(r.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(r.seen.activations.load(Ordering::SeqCst), 0);
    // Reset clears it; a good set-up then activates.
    r.w(0x14, 0, 1);
    assert_eq!(r.status(), 0);
    r.negotiate(features::VERSION_1);
    r.setup_queue0(256);
    r.w(0x20, 0xffff_0000, 8); // descriptor table outside 1 MiB of RAM
    r.w(0x14, u64::from(ALL_OK), 1);
    assert_ne!(r.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn reset_stops_the_device_and_it_can_start_again() {
    let mut r = rig();
    r.negotiate(features::VERSION_1);
    r.setup_queue0(256);
    r.w(0x14, u64::from(ALL_OK), 1);
    r.w(0x14, 0, 1);
    assert_eq!(r.seen.resets.load(Ordering::SeqCst), 1);
    assert_eq!(r.r(0x1c, 2), 0, "queues disabled after reset");
    assert_eq!(r.r(0x18, 2), 256, "queue size back to its maximum");
    r.negotiate(features::VERSION_1);
    r.setup_queue0(256);
    r.w(0x14, u64::from(ALL_OK), 1);
    assert_eq!(r.seen.activations.load(Ordering::SeqCst), 2);
}

#[test]
fn ioeventfds_follow_the_bar() {
    let mut r = rig();
    assert!(
        r.ioevents.0.lock().unwrap().is_empty(),
        "nothing registered while decoding is off"
    );
    r.dev
        .config_write(config::COMMAND, &[config::COMMAND_MEMORY as u8]);
    let notify = u64::from(BAR) + NOTIFY;
    assert_eq!(
        *r.ioevents.0.lock().unwrap(),
        vec![(true, notify), (true, notify + 4)]
    );
    r.ioevents.0.lock().unwrap().clear();
    r.dev
        .config_write(config::BAR0, &0xc800_0000u32.to_le_bytes());
    let moved = 0xc800_0000 + NOTIFY;
    assert_eq!(
        *r.ioevents.0.lock().unwrap(),
        vec![
            (false, notify),
            (false, notify + 4),
            (true, moved),
            (true, moved + 4)
        ]
    );
}

#[test]
fn notify_writes_that_reach_the_vmm_still_kick() {
    let mut r = rig();
    r.w(NOTIFY + 4, 1, 2);
    assert!(r.dev.kicks[1].read().is_ok());
    r.w(NOTIFY + 400, 1, 2); // no such queue: ignored
}

#[test]
fn arbitrary_register_traffic_never_panics() {
    let mut r = rig();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x >> 8) % BAR_SIZE;
        let len = [1usize, 2, 4, 8][(x & 3) as usize];
        if x & 4 == 0 {
            r.w(off, x >> 16, len);
        } else {
            r.r(off, len);
        }
        if x & 0xff == 0 {
            let coff = ((x >> 20) % 4096) as usize;
            r.dev
                .config_write(coff, &(x as u32).to_le_bytes()[..len.min(4)]);
        }
    }
}
