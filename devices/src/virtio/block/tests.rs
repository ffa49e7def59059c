//! Device tests: a mock driver (split rings in a 1 MiB guest memory) submits requests to an activated device whose
//! worker serves them; the tests check the used ring, the status byte,
//! guest memory and the image file.

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::virtio::worker::WaitMode;
use crate::virtio::{Interrupt, QueueContext};

const QSIZE: u16 = 16;
const MEM_SIZE: usize = 0x10_0000;
const HDR: u64 = 0x1_0000;
const SEG: u64 = 0x1_0100;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x8_0000;
const INDIRECT: u64 = 0x9_0000;
const DISK_BYTES: usize = 1 << 20;

#[derive(Default)]
struct TestInterrupt {
    signals: AtomicUsize,
    needs_reset: AtomicBool,
}

impl Interrupt for TestInterrupt {
    fn signal_queue(&self, index: u16) {
        assert_eq!(index, 0);
        self.signals.fetch_add(1, Ordering::SeqCst);
    }
    fn signal_config(&self) {}
    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }
}

/// A file in the temp dir, removed on drop.
struct TempImage(PathBuf);

impl TempImage {
    fn new(contents: &[u8]) -> TempImage {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("kiln-blk-test-{}-{n}.img", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.write_all(contents).unwrap();
        TempImage(path)
    }
    fn read(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// A buffer: guest address, length, device-writable.
type Buf = (u64, u32, bool);

fn r(addr: u64, len: u32) -> Buf {
    (addr, len, false)
}
fn w(addr: u64, len: u32) -> Buf {
    (addr, len, true)
}

/// header + status: the shape of FLUSH and most failure cases.
fn hdr_status() -> Vec<Buf> {
    vec![r(HDR, 16), w(STATUS, 1)]
}

struct Rig {
    mem: GuestMemoryMmap,
    dev: VirtioBlock,
    irq: Arc<TestInterrupt>,
    kick: EventFd,
    /// Ring addresses, as laid out by `MockSplitQueue`.
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    /// Driver-side indexes: requests made available, completions seen.
    avail: u16,
    used: u16,
}

impl Rig {
    fn new(dev: VirtioBlock) -> Rig {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut rig = Rig {
            mem,
            dev,
            irq: Arc::new(TestInterrupt::default()),
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
            avail: 0,
            used: 0,
        };
        rig.activate(0);
        rig
    }

    fn with_image(image: &TempImage, read_only: bool) -> Rig {
        let config = BlockConfig {
            read_only,
            serial: Some("kiln-serial-0123".into()),
            ..BlockConfig::new(&image.0)
        };
        Rig::new(VirtioBlock::new(config, Placement::default()).unwrap())
    }

    /// A fresh queue over fresh (zeroed) rings. (Not `MockSplitQueue`:
    /// its used ring overlaps the end of its available ring, which breaks
    /// once more than half the entries were used.)
    fn fresh_queue(&mut self) -> Queue {
        (self.desc_table, self.avail_ring, self.used_ring) = (0, 0x1000, 0x2000);
        self.mem
            .write_slice(&[0u8; 0x3000], GuestAddress(0))
            .unwrap();
        self.avail = 0;
        self.used = 0;
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(self.desc_table as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail_ring as u32), Some(0));
        q.set_used_ring_address(Some(self.used_ring as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// What a driver does before DRIVER_OK: fresh rings, a fresh queue.
    fn activate(&mut self, acked_features: u64) {
        let queue = self.fresh_queue();
        let ctx = DeviceContext {
            mem: Arc::new(self.mem.clone()),
            queues: vec![QueueContext {
                index: 0,
                queue,
                kick: self.kick.try_clone().unwrap(),
            }],
            acked_features,
            interrupt: self.irq.clone(),
        };
        self.dev.activate(ctx).unwrap();
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    fn segment(&self, at: u64, sector: u64, sectors: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        self.mem.write_slice(&s, GuestAddress(at)).unwrap();
    }

    fn set_status(&self, v: u8) {
        self.mem.write_obj(v, GuestAddress(STATUS)).unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// Puts a chain at descriptor 0 (earlier requests are all done) and
    /// makes it available, without kicking.
    fn submit_raw(&mut self, descs: &[RawDescriptor]) {
        for (i, d) in descs.iter().enumerate() {
            self.mem
                .write_obj(*d, GuestAddress(self.desc_table + 16 * i as u64))
                .unwrap();
        }
        let slot = self.avail_ring + 4 + 2 * u64::from(self.avail % QSIZE);
        self.mem.write_obj(0u16, GuestAddress(slot)).unwrap();
        self.avail = self.avail.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem
            .write_obj(self.avail, GuestAddress(self.avail_ring + 2))
            .unwrap();
    }

    fn submit(&mut self, bufs: &[Buf]) {
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let mut flags = if writable {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i as u16 + 1))
            })
            .collect();
        self.submit_raw(&descs);
    }

    fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    /// Waits for the next used element; returns its length.
    fn wait_used(&mut self) -> u32 {
        let idx_addr = GuestAddress(self.used_ring + 2);
        let elem_addr = GuestAddress(self.used_ring + 4 + 8 * u64::from(self.used % QSIZE));
        let start = Instant::now();
        while self.mem.read_obj::<u16>(idx_addr).unwrap() == self.used {
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "request {} was never completed",
                self.used
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let id: u32 = self.mem.read_obj(elem_addr).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(elem_addr.0 + 4)).unwrap();
        assert_eq!(id, 0, "used element names the chain's head");
        self.used = self.used.wrapping_add(1);
        len
    }

    /// Submits, kicks and waits: (status, used length). The status byte is
    /// preset to 0xff so "never written" is visible.
    fn request(&mut self, bufs: &[Buf]) -> (u8, u32) {
        self.set_status(0xff);
        self.submit(bufs);
        self.kick();
        let len = self.wait_used();
        (self.status(), len)
    }

    fn fill(&self, at: u64, byte: u8, len: usize) {
        self.mem
            .write_slice(&vec![byte; len], GuestAddress(at))
            .unwrap();
    }

    fn bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const UNTOUCHED: u8 = 0xff;

fn memfd(len: u64) -> File {
    // SAFETY: plain syscall; the fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"kiln-blk-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh fd.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

// ---- configuration and construction ----

#[test]
fn config_parses_options_and_rejects_mistakes() {
    let c: BlockConfig = "path=disk.img,readonly=on,serial=abc".parse().unwrap();
    assert_eq!(c.path, Path::new("disk.img"));
    assert!(c.read_only);
    assert_eq!(c.serial.as_deref(), Some("abc"));
    assert_eq!(c.id, "", "ids are assigned by the VM config");
    let c: BlockConfig = "path=/x,id=disk1".parse().unwrap();
    assert!(!c.read_only && c.serial.is_none() && c.id == "disk1");

    use crate::virtio::options::OptionsError;
    assert_eq!(
        "readonly=on".parse::<BlockConfig>(),
        Err(OptionsError::Missing("path".into()))
    );
    assert!(matches!(
        "path=".parse::<BlockConfig>(),
        Err(OptionsError::Invalid { .. })
    ));
    assert!(matches!(
        "path=a,ro=on".parse::<BlockConfig>(),
        Err(OptionsError::Unknown { .. })
    ));
    let long = "path=a,serial=123456789012345678901"
        .parse::<BlockConfig>()
        .unwrap_err();
    assert!(long.to_string().contains("longer than 20 bytes"), "{long}");
    assert!("path=a,serial=12345678901234567890"
        .parse::<BlockConfig>()
        .is_ok());
    let no_id: BlockConfig = "path=a,id=".parse().unwrap();
    assert!(matches!(no_id.validate(), Err(BlockError::EmptyId)));
    // JSON goes through the same checks.
    let json: Result<BlockConfig, _> = serde_json_like("path", "");
    assert!(json.is_err());
}

/// `{"<key>": "<value>"}` through serde's own value deserializer, standing
/// in for JSON (kiln-devices has no JSON dependency).
fn serde_json_like(key: &str, value: &str) -> Result<BlockConfig, serde::de::value::Error> {
    use serde::de::IntoDeserializer;
    use serde::Deserialize;
    let map: std::collections::BTreeMap<String, String> =
        [(key.to_string(), value.to_string())].into();
    BlockConfig::deserialize(map.into_deserializer())
}

#[test]
fn new_reports_missing_files_directories_and_odd_sizes() {
    let missing = BlockConfig::new("/nonexistent/kiln/disk.img");
    let err = VirtioBlock::new(missing, Placement::default())
        .err()
        .unwrap();
    assert!(matches!(err, BlockError::Open { .. }), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/kiln/disk.img"),
        "{err}"
    );

    let dir = BlockConfig::new(std::env::temp_dir());
    assert!(matches!(
        VirtioBlock::new(dir, Placement::default()),
        Err(BlockError::IsDirectory(_))
    ));
    let chardev = BlockConfig::new("/dev/null");
    assert!(matches!(
        VirtioBlock::new(chardev, Placement::default()),
        Err(BlockError::NotAFile(_))
    ));

    let empty = TempImage::new(&[]);
    assert_eq!(
        VirtioBlock::new(BlockConfig::new(&empty.0), Placement::default())
            .unwrap()
            .capacity(),
        0
    );
    // 1000 bytes: one whole sector, the 488-byte tail is invisible.
    let odd = TempImage::new(&[7u8; 1000]);
    assert_eq!(
        VirtioBlock::new(BlockConfig::new(&odd.0), Placement::default())
            .unwrap()
            .capacity(),
        1
    );
}

#[test]
fn features_and_config_space_follow_the_spec_layout() {
    let image = TempImage::new(&pattern(DISK_BYTES));
    let rw = VirtioBlock::new(BlockConfig::new(&image.0), Placement::default()).unwrap();
    let f = rw.features();
    for b in [
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert!(f & (1 << b) != 0, "feature bit {b} missing");
    }
    assert!(f & (1 << VIRTIO_BLK_F_RO) == 0);
    assert!(f & features::RING_EVENT_IDX != 0 && f & features::RING_INDIRECT_DESC != 0);
    assert_eq!(rw.device_type(), device_type::BLOCK);
    assert_eq!(rw.queue_max_sizes(), vec![256]);

    let cfg = |dev: &VirtioBlock, off: u64, len: usize| {
        let mut v = vec![0u8; len];
        dev.read_config(off, &mut v);
        let mut b = [0u8; 8];
        b[..len].copy_from_slice(&v);
        u64::from_le_bytes(b)
    };
    assert_eq!(cfg(&rw, 0, 8), (DISK_BYTES / 512) as u64, "capacity");
    assert_eq!(cfg(&rw, 12, 4), 254, "seg_max");
    assert_eq!(cfg(&rw, 20, 4), 512, "blk_size");
    assert_eq!(cfg(&rw, 40, 4), 1, "max_discard_seg");
    assert_eq!(cfg(&rw, 52, 4), 1, "max_write_zeroes_seg");
    assert_eq!(cfg(&rw, 56, 1), 1, "write_zeroes_may_unmap");
    assert!(cfg(&rw, 36, 4) > 0 && cfg(&rw, 48, 4) > 0);
    assert_eq!(cfg(&rw, 1000, 4), 0, "reads past the end are zero");

    let ro = VirtioBlock::new(
        BlockConfig {
            read_only: true,
            ..BlockConfig::new(&image.0)
        },
        Placement::default(),
    )
    .unwrap();
    let f = ro.features();
    assert!(f & (1 << VIRTIO_BLK_F_RO) != 0);
    assert!(f & ((1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)) == 0);
}

// ---- requests ----

#[test]
fn read_fills_guest_buffers_from_the_image() {
    let image = TempImage::new(&pattern(DISK_BYTES));
    let mut rig = Rig::with_image(&image, false);
    rig.fill(DATA, 0xee, 8192);
    rig.header(VIRTIO_BLK_T_IN, 3);
    // Data split unevenly over two descriptors.
    let (status, len) = rig.request(&[
        r(HDR, 16),
        w(DATA, 1024),
        w(DATA + 0x1000, 512),
        w(STATUS, 1),
    ]);
    assert_eq!((status, len), (OK, 1537));
    let want = &pattern(DISK_BYTES)[3 * 512..6 * 512];
    assert_eq!(rig.bytes(DATA, 1024), want[..1024]);
    assert_eq!(rig.bytes(DATA + 0x1000, 512), want[1024..]);
    assert_eq!(
        rig.bytes(DATA + 1024, 16),
        vec![0xee; 16],
        "nothing written past the buffer"
    );
    assert!(rig.irq.signals.load(Ordering::SeqCst) >= 1);

    // Data and status in one writable descriptor.
    rig.header(VIRTIO_BLK_T_IN, 0);
    let (status, len) = rig.request(&[r(HDR, 16), w(STATUS - 512, 513)]);
    assert_eq!((status, len), (OK, 513));
    assert_eq!(rig.bytes(STATUS - 512, 512), pattern(512));
}

#[test]
fn write_stores_guest_data_in_the_image() {
    let image = TempImage::new(&pattern(DISK_BYTES));
    let mut rig = Rig::with_image(&image, false);
    rig.fill(DATA, 0x5a, 512);
    rig.fill(DATA + 0x1000, 0xa5, 512);
    rig.header(VIRTIO_BLK_T_OUT, 10);
    let (status, len) = rig.request(&[
        r(HDR, 16),
        r(DATA, 512),
        r(DATA + 0x1000, 512),
        w(STATUS, 1),
    ]);
    assert_eq!((status, len), (OK, 1));
    let file = image.read();
    assert_eq!(file.len(), DISK_BYTES);
    assert_eq!(file[10 * 512..11 * 512], [0x5a; 512]);
    assert_eq!(file[11 * 512..12 * 512], [0xa5; 512]);
    assert_eq!(file[..10 * 512], pattern(DISK_BYTES)[..10 * 512]);
    assert_eq!(file[12 * 512..], pattern(DISK_BYTES)[12 * 512..]);

    // The last sector is writable; header and data may share a descriptor.
    let last = (DISK_BYTES / 512 - 1) as u64;
    rig.header(VIRTIO_BLK_T_OUT, last);
    rig.fill(HDR + 16, 0x11, 512);
    assert_eq!(rig.request(&[r(HDR, 16 + 512), w(STATUS, 1)]), (OK, 1));
    assert_eq!(image.read()[DISK_BYTES - 512..], [0x11; 512]);
}

#[test]
fn flush_succeeds_and_data_survives() {
    let image = TempImage::new(&pattern(DISK_BYTES));
    let mut rig = Rig::with_image(&image, false);
    rig.fill(DATA, 0x42, 512);
    rig.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(rig.request(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]).0, OK);
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(rig.request(&hdr_status()), (OK, 1));
    assert_eq!(image.read()[..512], [0x42; 512]);
    // A flush with a data buffer is malformed.
    assert_eq!(
        rig.request(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]).0,
        IOERR
    );
}

#[test]
fn get_id_returns_the_serial() {
    let image = TempImage::new(&pattern(4096));
    let mut rig = Rig::with_image(&image, false);
    rig.fill(DATA, 0xee, 32);
    rig.header(VIRTIO_BLK_T_GET_ID, 0);
    let (status, len) = rig.request(&[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]);
    assert_eq!((status, len), (OK, 21));
    let mut want = b"kiln-serial-0123".to_vec();
    want.resize(20, 0);
    assert_eq!(rig.bytes(DATA, 20), want);
    assert_eq!(rig.bytes(DATA + 20, 4), [0xee; 4]);
    // A short buffer gets what fits.
    let (status, len) = rig.request(&[r(HDR, 16), w(DATA + 0x100, 4), w(STATUS, 1)]);
    assert_eq!((status, len), (OK, 5));
    assert_eq!(rig.bytes(DATA + 0x100, 4), b"kiln");
}

#[test]
fn discard_punches_a_hole_and_keeps_the_size() {
    let image = TempImage::new(&pattern(DISK_BYTES));
    let mut rig = Rig::with_image(&image, false);
    rig.header(VIRTIO_BLK_T_DISCARD, 0);
    rig.segment(SEG, 8, 16, 0);
    assert_eq!(
        rig.request(&[r(HDR, 16), r(SEG, 16), w(STATUS, 1)]),
        (OK, 1)
    );
    let file = image.read();
    assert_eq!(file.len(), DISK_BYTES);
    assert_eq!(
        file[4096..12288],
        vec![0u8; 8192][..],
        "ext4 punches 4 KiB-aligned holes"
    );
    assert_eq!(file[..4096], pattern(DISK_BYTES)[..4096]);
    assert_eq!(file[12288..], pattern(DISK_BYTES)[12288..]);
}

#[test]
fn write_zeroes_zeroes_the_range_with_and_without_unmap() {
    let image = TempImage::new(&pattern(DISK_BYTES));
    let mut rig = Rig::with_image(&image, false);
    rig.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    rig.segment(SEG, 1, 3, 0);
    assert_eq!(
        rig.request(&[r(HDR, 16), r(SEG, 16), w(STATUS, 1)]),
        (OK, 1)
    );
    rig.segment(SEG, 100, 20, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(
        rig.request(&[r(HDR, 16), r(SEG, 16), w(STATUS, 1)]),
        (OK, 1)
    );
    let file = image.read();
    let p = pattern(DISK_BYTES);
    assert_eq!(file.len(), DISK_BYTES);
    assert_eq!(file[..512], p[..512]);
    assert!(file[512..4 * 512].iter().all(|&b| b == 0));
    assert_eq!(file[4 * 512..100 * 512], p[4 * 512..100 * 512]);
    assert!(file[100 * 512..120 * 512].iter().all(|&b| b == 0));
    assert_eq!(file[120 * 512..], p[120 * 512..]);
}

#[test]
fn write_zeroes_falls_back_to_writing_zeros() {
    // tmpfs (a memfd) has no FALLOC_FL_ZERO_RANGE.
    let file = memfd(DISK_BYTES as u64);
    let mut check = file.try_clone().unwrap();
    check.write_all(&pattern(DISK_BYTES)).unwrap();
    let disk = DiskFile::from_file(file, (DISK_BYTES / 512) as u64, false);
    let mut rig = Rig::new(
        VirtioBlock::with_disk(BlockConfig::new("memfd"), disk, Placement::default()).unwrap(),
    );
    rig.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    rig.segment(SEG, 2, 300, 0);
    assert_eq!(
        rig.request(&[r(HDR, 16), r(SEG, 16), w(STATUS, 1)]),
        (OK, 1)
    );
    let mut got = vec![0u8; DISK_BYTES];
    use std::os::unix::fs::FileExt;
    check.read_exact_at(&mut got, 0).unwrap();
    assert_eq!(got[..1024], pattern(DISK_BYTES)[..1024]);
    assert!(got[1024..302 * 512].iter().all(|&b| b == 0));
    assert_eq!(got[302 * 512..], pattern(DISK_BYTES)[302 * 512..]);
}

#[test]
fn unknown_request_types_are_unsupported() {
    let image = TempImage::new(&pattern(4096));
    let mut rig = Rig::with_image(&image, false);
    for kind in [
        VIRTIO_BLK_T_SCSI_CMD,
        VIRTIO_BLK_T_SECURE_ERASE,
        VIRTIO_BLK_T_ZONE_REPORT,
        0xdead_beef,
    ] {
        rig.header(kind, 0);
        assert_eq!(rig.request(&hdr_status()), (UNSUPP, 1), "type {kind:#x}");
    }
    assert!(rig.dev.warnings.seen(warn::Problem::UnknownType));
}

#[test]
fn read_only_disk_reads_but_never_writes() {
    let image = TempImage::new(&pattern(DISK_BYTES));
    let mut rig = Rig::with_image(&image, true);
    rig.fill(DATA, 0x77, 512);
    rig.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        rig.request(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]),
        (IOERR, 1)
    );
    rig.header(VIRTIO_BLK_T_DISCARD, 0);
    rig.segment(SEG, 0, 8, 0);
    assert_eq!(
        rig.request(&[r(HDR, 16), r(SEG, 16), w(STATUS, 1)]),
        (IOERR, 1)
    );
    rig.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(
        rig.request(&[r(HDR, 16), r(SEG, 16), w(STATUS, 1)]),
        (IOERR, 1)
    );
    assert_eq!(image.read(), pattern(DISK_BYTES), "the image is unchanged");
    // Refused by the device, not by the O_RDONLY file descriptor.
    assert!(rig.dev.warnings.seen(warn::Problem::ReadOnly));
    assert!(!rig.dev.warnings.seen(warn::Problem::HostIo));

    rig.header(VIRTIO_BLK_T_IN, 1);
    assert_eq!(
        rig.request(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
        (OK, 513)
    );
    assert_eq!(rig.bytes(DATA, 512), pattern(DISK_BYTES)[512..1024]);
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(rig.request(&hdr_status()).0, OK);
}

#[test]
fn requests_work_with_event_idx_and_indirect_descriptors() {
    let image = TempImage::new(&pattern(DISK_BYTES));
    let mut rig = Rig::with_image(&image, false);
    rig.dev.reset();
    rig.activate(features::RING_EVENT_IDX | features::RING_INDIRECT_DESC);
    for sector in 0..5u64 {
        rig.header(VIRTIO_BLK_T_IN, sector);
        assert_eq!(
            rig.request(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
            (OK, 513)
        );
        assert_eq!(
            rig.bytes(DATA, 512),
            pattern(DISK_BYTES)[sector as usize * 512..][..512]
        );
    }
    // An indirect table: header, data, status.
    let table = [r(HDR, 16), w(DATA, 1024), w(STATUS, 1)];
    write_table(&rig.mem, INDIRECT, &table);
    rig.header(VIRTIO_BLK_T_IN, 2);
    rig.set_status(UNTOUCHED);
    rig.submit_raw(&[indirect_head(INDIRECT, table.len())]);
    rig.kick();
    assert_eq!(rig.wait_used(), 1025);
    assert_eq!(rig.status(), OK);
    assert_eq!(rig.bytes(DATA, 1024), pattern(DISK_BYTES)[1024..2048]);
}

/// Writes `bufs` as a linked descriptor table at `at`.
fn write_table(mem: &GuestMemoryMmap, at: u64, bufs: &[Buf]) {
    for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
        let mut flags = if writable {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        if i + 1 < bufs.len() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i as u16 + 1));
        mem.write_obj(d, GuestAddress(at + 16 * i as u64)).unwrap();
    }
}

fn indirect_head(table: u64, entries: usize) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        table,
        16 * entries as u32,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ))
}

// ---- hostile chains ----

#[test]
fn chains_without_a_usable_status_byte_are_returned_unused() {
    let image = TempImage::new(&pattern(DISK_BYTES));
    let mut rig = Rig::with_image(&image, false);
    rig.header(VIRTIO_BLK_T_IN, 0);
    // Header only.
    assert_eq!(rig.request(&[r(HDR, 16)]), (UNTOUCHED, 0));
    // The "status" descriptor is device-readable.
    assert_eq!(
        rig.request(&[r(HDR, 16), w(DATA, 512), r(STATUS, 1)]),
        (UNTOUCHED, 0)
    );
    // A zero-length writable last descriptor.
    assert_eq!(rig.request(&[r(HDR, 16), w(STATUS, 0)]), (UNTOUCHED, 0));
    // The status byte outside guest memory.
    assert_eq!(
        rig.request(&[r(HDR, 16), w(DATA, 512), w(MEM_SIZE as u64 + 0x1000, 1)]),
        (UNTOUCHED, 0)
    );
    assert!(rig.dev.warnings.seen(warn::Problem::NoStatus));
    // The device keeps serving.
    assert_eq!(
        rig.request(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
        (OK, 513)
    );
    assert!(!rig.irq.needs_reset.load(Ordering::SeqCst));
}

#[test]
fn short_headers_and_wrong_directions_fail_with_ioerr() {
    let image = TempImage::new(&pattern(DISK_BYTES));
    let mut rig = Rig::with_image(&image, false);
    rig.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        rig.request(&[r(HDR, 8), w(STATUS, 1)]),
        (IOERR, 1),
        "8-byte header"
    );
    assert_eq!(rig.request(&[w(STATUS, 1)]), (IOERR, 1), "no header at all");
    // IN with a device-readable data buffer.
    assert_eq!(
        rig.request(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]),
        (IOERR, 1)
    );
    // Readable after writable.
    assert_eq!(
        rig.request(&[
            r(HDR, 16),
            w(DATA, 512),
            r(DATA + 0x1000, 512),
            w(STATUS, 1)
        ]),
        (IOERR, 1)
    );
    // OUT with a device-writable data buffer: the file is not touched.
    rig.header(VIRTIO_BLK_T_OUT, 0);
    rig.fill(DATA, 0x99, 512);
    assert_eq!(
        rig.request(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
        (IOERR, 1)
    );
    assert_eq!(
        rig.request(&[
            r(HDR, 16),
            r(DATA, 512),
            w(DATA + 0x1000, 512),
            w(STATUS, 1)
        ]),
        (IOERR, 1)
    );
    // GET_ID with readable data; DISCARD with a writable segment.
    rig.header(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(
        rig.request(&[r(HDR, 16), r(DATA, 20), w(STATUS, 1)]),
        (IOERR, 1)
    );
    rig.header(VIRTIO_BLK_T_DISCARD, 0);
    rig.segment(SEG, 0, 8, 0);
    assert_eq!(
        rig.request(&[r(HDR, 16), w(SEG, 16), w(STATUS, 1)]),
        (IOERR, 1)
    );
    assert_eq!(image.read(), pattern(DISK_BYTES));
    assert!(rig.dev.warnings.seen(warn::Problem::ShortHeader));
    assert!(rig.dev.warnings.seen(warn::Problem::WrongDirection));
}

#[test]
fn out_of_range_misaligned_and_oversized_requests_fail_with_ioerr() {
    let image = TempImage::new(&pattern(DISK_BYTES));
    let mut rig = Rig::with_image(&image, false);
    let sectors = (DISK_BYTES / 512) as u64;
    for kind in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        let dir = kind == VIRTIO_BLK_T_IN;
        let data = |len| (DATA, len, dir);
        rig.header(kind, sectors); // just past the end
        assert_eq!(rig.request(&[r(HDR, 16), data(512), w(STATUS, 1)]).0, IOERR);
        rig.header(kind, sectors - 1); // straddles the end
        assert_eq!(
            rig.request(&[r(HDR, 16), data(1024), w(STATUS, 1)]).0,
            IOERR
        );
        rig.header(kind, u64::MAX / 512 + 1); // sector * 512 overflows
        assert_eq!(rig.request(&[r(HDR, 16), data(512), w(STATUS, 1)]).0, IOERR);
        rig.header(kind, u64::MAX / 512); // offset + len overflows
        assert_eq!(
            rig.request(&[r(HDR, 16), data(1024), w(STATUS, 1)]).0,
            IOERR
        );
        rig.header(kind, 0);
        assert_eq!(
            rig.request(&[r(HDR, 16), data(100), w(STATUS, 1)]).0,
            IOERR,
            "not whole sectors"
        );
        // Larger than MAX_REQUEST_BYTES (never touches memory or file).
        let huge = vec![data(0x0800_0000); 3];
        let mut bufs = vec![r(HDR, 16)];
        bufs.extend(huge);
        bufs.push(w(STATUS, 1));
        const { assert!(3 * 0x0800_0000 > MAX_REQUEST_BYTES) };
        assert_eq!(rig.request(&bufs).0, IOERR, "oversized");
    }
    // Discard / write-zeroes beyond the end, and overflowing.
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        rig.header(kind, 0);
        rig.segment(SEG, sectors - 1, 2, 0);
        assert_eq!(
            rig.request(&[r(HDR, 16), r(SEG, 16), w(STATUS, 1)]).0,
            IOERR
        );
        rig.segment(SEG, u64::MAX, 1, 0);
        assert_eq!(
            rig.request(&[r(HDR, 16), r(SEG, 16), w(STATUS, 1)]).0,
            IOERR
        );
        rig.segment(SEG, 0, u32::MAX, 0);
        assert_eq!(
            rig.request(&[r(HDR, 16), r(SEG, 16), w(STATUS, 1)]).0,
            IOERR,
            "above max sectors"
        );
    }
    assert_eq!(image.read(), pattern(DISK_BYTES));
    for p in [
        warn::Problem::OutOfRange,
        warn::Problem::Misaligned,
        warn::Problem::TooLarge,
    ] {
        assert!(rig.dev.warnings.seen(p), "{p:?} not logged");
    }
}

#[test]
fn bad_discard_segments_and_flags_are_rejected() {
    let image = TempImage::new(&pattern(DISK_BYTES));
    let mut rig = Rig::with_image(&image, false);
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        rig.header(kind, 0);
        rig.segment(SEG, 0, 8, 0);
        rig.segment(SEG + 16, 16, 8, 0);
        assert_eq!(
            rig.request(&[r(HDR, 16), r(SEG, 32), w(STATUS, 1)]),
            (IOERR, 1),
            "two segments"
        );
        assert_eq!(
            rig.request(&[r(HDR, 16), r(SEG, 8), w(STATUS, 1)]),
            (IOERR, 1),
            "half a segment"
        );
        assert_eq!(rig.request(&hdr_status()), (IOERR, 1), "no segment");
        rig.segment(SEG, 0, 8, 0x4);
        assert_eq!(
            rig.request(&[r(HDR, 16), r(SEG, 16), w(STATUS, 1)]),
            (UNSUPP, 1),
            "reserved flag"
        );
    }
    rig.header(VIRTIO_BLK_T_DISCARD, 0);
    rig.segment(SEG, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(
        rig.request(&[r(HDR, 16), r(SEG, 16), w(STATUS, 1)]),
        (UNSUPP, 1),
        "unmap on a discard"
    );
    assert_eq!(image.read(), pattern(DISK_BYTES));
}

#[test]
fn descriptor_loops_and_bad_addresses_are_contained() {
    let image = TempImage::new(&pattern(DISK_BYTES));
    let mut rig = Rig::with_image(&image, false);
    rig.header(VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 0 -> ...: virtio-queue stops after the queue size.
    let looped = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(SplitDescriptor::new(
            STATUS,
            1,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            0,
        )),
    ];
    rig.set_status(UNTOUCHED);
    rig.submit_raw(&looped);
    rig.kick();
    assert_eq!(rig.wait_used(), 0);
    assert_eq!(rig.status(), UNTOUCHED);
    // `next` outside the table.
    let dangling = [RawDescriptor::from(SplitDescriptor::new(
        HDR,
        16,
        VRING_DESC_F_NEXT as u16,
        999,
    ))];
    rig.submit_raw(&dangling);
    rig.kick();
    assert_eq!(rig.wait_used(), 0);
    assert!(rig.dev.warnings.seen(warn::Problem::BrokenChain));

    // Data buffer outside guest memory, or wrapping the address space.
    assert_eq!(
        rig.request(&[r(HDR, 16), w(MEM_SIZE as u64 - 256, 512), w(STATUS, 1)]),
        (IOERR, 1)
    );
    assert_eq!(
        rig.request(&[r(HDR, 16), w(u64::MAX - 255, 512), w(STATUS, 1)]),
        (IOERR, 1)
    );
    rig.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        rig.request(&[r(HDR, 16), r(0x1_0000_0000, 512), w(STATUS, 1)]),
        (IOERR, 1)
    );
    // Header outside guest memory.
    assert_eq!(
        rig.request(&[r(0x1_0000_0000, 16), w(STATUS, 1)]),
        (IOERR, 1)
    );
    assert!(rig.dev.warnings.seen(warn::Problem::BadAddress));
    assert_eq!(image.read(), pattern(DISK_BYTES));

    // Too many descriptors (indirect table of 300 one-sector buffers).
    let mut table = vec![r(HDR, 16)];
    table.extend((0..298).map(|_| w(DATA, 512)));
    table.push(w(STATUS, 1));
    write_table(&rig.mem, INDIRECT, &table);
    rig.header(VIRTIO_BLK_T_IN, 0);
    rig.set_status(UNTOUCHED);
    rig.submit_raw(&[indirect_head(INDIRECT, table.len())]);
    rig.kick();
    assert_eq!(rig.wait_used(), 1);
    assert_eq!(rig.status(), IOERR);
    // A nested indirect descriptor breaks the chain.
    write_table(&rig.mem, INDIRECT, &[r(HDR, 16)]);
    rig.mem
        .write_obj(indirect_head(INDIRECT + 0x100, 1), GuestAddress(INDIRECT))
        .unwrap();
    rig.submit_raw(&[indirect_head(INDIRECT, 1)]);
    rig.kick();
    assert_eq!(rig.wait_used(), 0);

    // Still serving; the queue itself is fine.
    rig.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        rig.request(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
        (OK, 513)
    );
    assert!(!rig.irq.needs_reset.load(Ordering::SeqCst));
}

// ---- host failures ----

#[test]
fn host_enospc_fails_the_request_and_the_device_keeps_running() {
    let full = File::options()
        .read(true)
        .write(true)
        .open("/dev/full")
        .unwrap();
    let disk = DiskFile::from_file(full, 2048, false);
    let mut rig = Rig::new(
        VirtioBlock::with_disk(BlockConfig::new("/dev/full"), disk, Placement::default()).unwrap(),
    );
    rig.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        rig.request(&[r(HDR, 16), r(DATA, 4096), w(STATUS, 1)]),
        (IOERR, 1)
    );
    assert!(rig.dev.warnings.seen(warn::Problem::HostIo));
    rig.fill(DATA, 0xee, 512);
    rig.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        rig.request(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
        (OK, 513)
    );
    assert_eq!(
        rig.bytes(DATA, 512),
        vec![0u8; 512],
        "/dev/full reads zeros"
    );
    assert!(!rig.irq.needs_reset.load(Ordering::SeqCst));
}

#[test]
fn image_truncated_underneath_fails_reads_past_its_new_end() {
    let image = TempImage::new(&pattern(DISK_BYTES));
    let mut rig = Rig::with_image(&image, false);
    File::options()
        .write(true)
        .open(&image.0)
        .unwrap()
        .set_len(4096)
        .unwrap();
    rig.header(VIRTIO_BLK_T_IN, 16);
    assert_eq!(
        rig.request(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
        (IOERR, 1)
    );
    rig.header(VIRTIO_BLK_T_IN, 7);
    assert_eq!(
        rig.request(&[r(HDR, 16), w(DATA, 1024), w(STATUS, 1)]),
        (IOERR, 1),
        "short read"
    );
    rig.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        rig.request(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
        (OK, 513)
    );
}

#[test]
fn broken_used_ring_marks_the_device_needing_reset() {
    let image = TempImage::new(&pattern(4096));
    let mut rig = Rig::with_image(&image, false);
    rig.dev.reset();
    let mut queue = rig.fresh_queue();
    // Used ring outside guest memory.
    queue.set_used_ring_address(Some(0xfff0_0000), Some(0));
    let ctx = DeviceContext {
        mem: Arc::new(rig.mem.clone()),
        queues: vec![QueueContext {
            index: 0,
            queue,
            kick: rig.kick.try_clone().unwrap(),
        }],
        acked_features: 0,
        interrupt: rig.irq.clone(),
    };
    rig.dev.activate(ctx).unwrap();
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    rig.submit(&hdr_status());
    rig.kick();
    let start = Instant::now();
    while !rig.irq.needs_reset.load(Ordering::SeqCst) {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "needs_reset never set"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ---- lifecycle and worker ----

#[test]
fn reset_stops_the_worker_and_the_device_activates_again() {
    let image = TempImage::new(&pattern(DISK_BYTES));
    let mut rig = Rig::with_image(&image, false);
    let control = rig.dev.worker_control();
    rig.header(VIRTIO_BLK_T_IN, 1);
    assert_eq!(rig.request(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]).0, OK);
    let first = control.thread_id();
    assert!(first.is_some());
    rig.dev.reset();
    assert!(!rig.dev.is_active());
    assert_eq!(control.thread_id(), None, "the worker stopped");
    // Nothing is served while reset.
    rig.set_status(UNTOUCHED);
    rig.submit(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    rig.kick();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(rig.status(), UNTOUCHED);

    rig.activate(0);
    assert!(rig.dev.is_active());
    rig.header(VIRTIO_BLK_T_IN, 2);
    assert_eq!(
        rig.request(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
        (OK, 513)
    );
    assert_eq!(rig.bytes(DATA, 512), pattern(DISK_BYTES)[1024..1536]);
    assert!(control.thread_id().is_some());
    // Activating twice without a reset restarts cleanly too.
    rig.activate(0);
    assert_eq!(rig.request(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]).0, OK);
}

#[test]
fn activate_without_the_queue_fails() {
    let image = TempImage::new(&pattern(4096));
    let mut dev = VirtioBlock::new(BlockConfig::new(&image.0), Placement::default()).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let ctx = DeviceContext {
        mem: Arc::new(mem),
        queues: vec![],
        acked_features: 0,
        interrupt: Arc::new(TestInterrupt::default()),
    };
    assert!(matches!(
        dev.activate(ctx),
        Err(crate::virtio::ActivateError::MissingQueue(0))
    ));
}

#[test]
fn poll_mode_serves_requests_without_kicks() {
    let image = TempImage::new(&pattern(DISK_BYTES));
    let mut rig = Rig::with_image(&image, false);
    let control = rig.dev.worker_control();
    control.set_wait_mode(WaitMode::Poll {
        spin: Duration::from_secs(5),
    });
    // No kicks below: only polling can find these requests.
    for sector in 0..3u64 {
        rig.header(VIRTIO_BLK_T_IN, sector);
        rig.set_status(UNTOUCHED);
        rig.submit(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
        assert_eq!(rig.wait_used(), 513, "served without a kick");
        assert_eq!(rig.status(), OK);
    }
    // Poll mode suppresses notifications: NO_NOTIFY set in the used ring.
    let flags: u16 = rig.mem.read_obj(GuestAddress(rig.used_ring)).unwrap();
    assert_eq!(flags, 1);
    // Back to notify mode: notifications on again, kicks work.
    control.set_wait_mode(WaitMode::Notify);
    let start = Instant::now();
    while rig
        .mem
        .read_obj::<u16>(GuestAddress(rig.used_ring))
        .unwrap()
        != 0
    {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "notifications never re-enabled"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    rig.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        rig.request(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
        (OK, 513)
    );
}

// ---- fuzz entry point ----

#[test]
fn fuzz_entry_point_survives_random_and_crafted_inputs() {
    // A valid IN request: 3 descriptors (header at 0x1000, data, status).
    let mut input = vec![3u8];
    for (addr, len, flags, next) in [
        (0x1000u32, 16u32, 1u16, 1u16),
        (0x2000, 512, 3, 2),
        (0x3000, 1, 2, 0),
    ] {
        input.extend(addr.to_le_bytes());
        input.extend(len.to_le_bytes());
        input.extend(flags.to_le_bytes());
        input.extend(next.to_le_bytes());
    }
    input.extend(VIRTIO_BLK_T_IN.to_le_bytes());
    input.extend([0u8; 12]);
    fuzzing::request(&input);
    fuzzing::request(&[]);
    // xorshift: deterministic garbage, mutating the valid input too.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..3000 {
        let mut data = if i % 2 == 0 {
            input.clone()
        } else {
            vec![0u8; (next() % 300) as usize]
        };
        let flips = 1 + next() % 8;
        for _ in 0..flips {
            if data.is_empty() {
                break;
            }
            let at = (next() % data.len() as u64) as usize;
            data[at] = next() as u8;
        }
        if i % 2 == 1 {
            for b in data.iter_mut() {
                *b = next() as u8;
            }
        }
        fuzzing::request(&data);
    }
}
