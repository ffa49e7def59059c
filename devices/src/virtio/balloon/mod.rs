//! virtio-balloon (virtio 1.2, section 5.5): the host asks the guest to give
//! back memory, and gets it back for real.
//!
//! - The host sets a target (`num_pages` in the configuration space) through
//!   a [`BalloonControl`]; the guest driver inflates (hands us page frame
//!   numbers it will not touch) or deflates towards it and reports `actual`.
//! - Inflated pages are dropped from the host with `madvise(MADV_DONTNEED)`
//!   (`MADV_REMOVE` for shared mappings, where DONTNEED frees nothing), so
//!   the host's RSS shrinks. Deflated pages need nothing: they fault back in,
//!   zero-filled, when the guest touches them.
//! - Statistics (`VIRTIO_BALLOON_F_STATS_VQ`, offered when
//!   `stats_interval_s > 0`): the driver keeps one buffer in the stats queue;
//!   we hold it and hand it back every interval to ask for fresh figures.
//! - Free page reporting (`VIRTIO_BALLOON_F_PAGE_REPORTING`): the guest
//!   reports ranges of free pages, which are dropped like inflated pages but
//!   stay the guest's (not counted as inflated).
//! - `deflate_on_oom` (on by default) is only the feature bit
//!   `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`: with it, the Linux driver deflates by
//!   itself when the guest runs out of memory instead of letting the OOM
//!   killer run; the device has nothing to do but accept the deflate requests.
//! - The pressure guard ([`pressure`], on by default when statistics are):
//!   the device itself lowers the target when the guest's statistics show
//!   memory pressure, so no guest depends on a daemon to get memory back.
//!
//! Not offered: `MUST_TELL_HOST` (we never need to know before the guest
//! reuses a deflated page), `FREE_PAGE_HINT` (migration only), `PAGE_POISON`.
//!
//! Queue numbering: inflateq is 0 and deflateq 1; the optional queues take
//! the next indexes, in the order statsq, free_page_vq, reporting_vq, *only
//! if their feature was negotiated* (Linux's `init_vqs` leaves the absent
//! ones out and the virtio-pci transport numbers the rest consecutively).
//! With stats and reporting negotiated, reporting is queue 3; with
//! reporting but no stats it is queue 2. [`QueueLayout`] does that mapping.
//!
//! Page frame numbers are always in 4 KiB units (`VIRTIO_BALLOON_PFN_SHIFT`),
//! whatever the host page size.
//! With host pages larger than 4 KiB only whole host pages are dropped; with
//! hugetlbfs-backed guest memory nothing can be dropped page by page (the
//! `madvise` failure is logged once and the balloon still counts).

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use self::pressure::{GuardCounters, GuardRecord, WorkerGuard};
use super::options::{from_options, OptionsError};
use super::queue::{drain_queue, Served};
use super::worker::{Placement, Worker, WorkerControl, WorkerHandler};
use super::{
    device_type, features, ActivateError, DeviceContext, Interrupt, Memory, QueueContext,
    VirtioDevice,
};

pub mod pressure;

/// Feature bits (virtio 1.2, 5.5.3).
pub mod feature {
    pub const MUST_TELL_HOST: u64 = 1 << 0;
    pub const STATS_VQ: u64 = 1 << 1;
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
    pub const FREE_PAGE_HINT: u64 = 1 << 3;
    pub const PAGE_POISON: u64 = 1 << 4;
    pub const PAGE_REPORTING: u64 = 1 << 5;
}

/// Statistic tags (virtio 1.2, 5.5.6.3).
pub mod tag {
    pub const SWAP_IN: u16 = 0;
    pub const SWAP_OUT: u16 = 1;
    pub const MAJFLT: u16 = 2;
    pub const MINFLT: u16 = 3;
    pub const MEMFREE: u16 = 4;
    pub const MEMTOT: u16 = 5;
    pub const AVAIL: u16 = 6;
    pub const CACHES: u16 = 7;
    pub const HTLB_PGALLOC: u16 = 8;
    pub const HTLB_PGFAIL: u16 = 9;
}

/// Balloon pages are 4 KiB whatever the host uses.
pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
const PAGES_PER_MIB: u64 = (1 << 20) / PAGE_SIZE;

const QUEUE_SIZE: u16 = 256;
/// PFN bytes read from one inflate/deflate chain; Linux sends 256 PFNs
/// (1 KiB) per chain, this allows 1 GiB worth and ignores the rest.
const MAX_PFN_BYTES_PER_CHAIN: usize = 1 << 20;
/// One statistic entry: le16 tag, le64 value, packed.
const STAT_ENTRY_SIZE: usize = 10;
/// Entries read from one stats buffer (Linux sends 10 to 16).
const MAX_STAT_ENTRIES: usize = 64;
/// Largest free page range accepted in one reporting descriptor (Linux
/// reports blocks of 2 to 4 MiB).
const MAX_REPORT_BYTES: u64 = 1 << 30;
/// The configuration space: num_pages, actual, free_page_hint_cmd_id,
/// poison_val (all le32).
const CONFIG_SIZE: usize = 16;
const ACTUAL_OFFSET: u64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    #[error("balloon target {mib} MiB is larger than {max_mib} MiB (guest memory)")]
    TargetTooLarge { mib: u64, max_mib: u64 },
    #[error("cannot set up the balloon: {0}")]
    Io(#[from] io::Error),
}

/// How the balloon is configured: `kiln run --balloon
/// stats=5,free_page_reporting=on,target_mib=0` (`deflate_on_oom` and
/// `pressure_guard` are on unless turned off).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BalloonConfig {
    /// Offer `DEFLATE_ON_OOM`: the guest deflates by itself under OOM.
    pub deflate_on_oom: bool,
    /// Seconds between statistics requests; 0 turns statistics off (the
    /// stats queue is not offered).
    #[serde(alias = "stats")]
    pub stats_interval_s: u32,
    /// Offer free page reporting: the guest hands back its free pages.
    pub free_page_reporting: bool,
    /// The target at boot, in MiB taken from the guest.
    #[serde(alias = "target_mib")]
    pub initial_target_mib: u64,
    /// With statistics on: the device deflates by itself when they show
    /// memory pressure (see [`pressure`]).
    pub pressure_guard: bool,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig {
            deflate_on_oom: true,
            stats_interval_s: 0,
            free_page_reporting: false,
            initial_target_mib: 0,
            pressure_guard: true,
        }
    }
}

impl FromStr for BalloonConfig {
    type Err = OptionsError;

    /// Keys: `deflate_on_oom`, `stats` (seconds), `free_page_reporting`,
    /// `target_mib`, `pressure_guard`. An empty string is the default
    /// configuration.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        from_options(s)
    }
}

/// The latest statistics the guest sent; `None` for tags it did not send.
/// Values are as the spec defines them: bytes for memory sizes, counts for
/// faults and hugetlb events, bytes for swap in/out (Linux sends pages
/// converted to bytes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    pub swap_in: Option<u64>,
    pub swap_out: Option<u64>,
    pub major_faults: Option<u64>,
    pub minor_faults: Option<u64>,
    pub free_memory: Option<u64>,
    pub total_memory: Option<u64>,
    pub available_memory: Option<u64>,
    pub disk_caches: Option<u64>,
    pub hugetlb_allocations: Option<u64>,
    pub hugetlb_failures: Option<u64>,
    /// When the device received them.
    pub received_at: SystemTime,
}

impl BalloonStats {
    fn empty(received_at: SystemTime) -> Self {
        BalloonStats {
            swap_in: None,
            swap_out: None,
            major_faults: None,
            minor_faults: None,
            free_memory: None,
            total_memory: None,
            available_memory: None,
            disk_caches: None,
            hugetlb_allocations: None,
            hugetlb_failures: None,
            received_at,
        }
    }

    /// Records one entry; false for a tag this device does not know.
    fn record(&mut self, tag: u16, value: u64) -> bool {
        let slot = match tag {
            tag::SWAP_IN => &mut self.swap_in,
            tag::SWAP_OUT => &mut self.swap_out,
            tag::MAJFLT => &mut self.major_faults,
            tag::MINFLT => &mut self.minor_faults,
            tag::MEMFREE => &mut self.free_memory,
            tag::MEMTOT => &mut self.total_memory,
            tag::AVAIL => &mut self.available_memory,
            tag::CACHES => &mut self.disk_caches,
            tag::HTLB_PGALLOC => &mut self.hugetlb_allocations,
            tag::HTLB_PGFAIL => &mut self.hugetlb_failures,
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

/// What was odd about a stats buffer (for the log).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatsOddities {
    pub unknown_tags: usize,
    /// Bytes after the last whole entry.
    pub trailing_bytes: usize,
    /// The buffer held more than [`MAX_STAT_ENTRIES`] entries.
    pub truncated: bool,
}

/// Parses a stats buffer: packed `{le16 tag, le64 val}` entries. Unknown
/// tags and a partial last entry are ignored (and reported); a tag given
/// twice keeps its last value.
pub fn parse_stats(bytes: &[u8], received_at: SystemTime) -> (BalloonStats, StatsOddities) {
    let mut stats = BalloonStats::empty(received_at);
    let mut odd = StatsOddities::default();
    let whole = bytes.len() / STAT_ENTRY_SIZE;
    odd.trailing_bytes = bytes.len() % STAT_ENTRY_SIZE;
    if whole > MAX_STAT_ENTRIES {
        odd.truncated = true;
    }
    for entry in bytes.chunks_exact(STAT_ENTRY_SIZE).take(MAX_STAT_ENTRIES) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let mut value = [0u8; 8];
        value.copy_from_slice(&entry[2..STAT_ENTRY_SIZE]);
        if !stats.record(tag, u64::from_le_bytes(value)) {
            odd.unknown_tags += 1;
        }
    }
    (stats, odd)
}

/// Fills `buf` from `src` until it is full or `src` ends; returns how many
/// bytes it read.
fn read_full(src: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        match src.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    filled
}

/// Where each balloon queue is, given the features the driver accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    pub inflate: u16,
    pub deflate: u16,
    pub stats: Option<u16>,
    pub reporting: Option<u16>,
}

impl QueueLayout {
    pub fn for_features(features: u64) -> QueueLayout {
        let mut next = 2;
        let mut take = |present: bool| {
            present.then(|| {
                next += 1;
                next - 1
            })
        };
        let stats = take(features & feature::STATS_VQ != 0);
        // FREE_PAGE_HINT is never offered, but a queue index is reserved
        // for it before reporting_vq if it ever is negotiated.
        let _free_page_hint = take(features & feature::FREE_PAGE_HINT != 0);
        let reporting = take(features & feature::PAGE_REPORTING != 0);
        QueueLayout {
            inflate: 0,
            deflate: 1,
            stats,
            reporting,
        }
    }

    fn count(&self) -> usize {
        2 + usize::from(self.stats.is_some()) + usize::from(self.reporting.is_some())
    }
}

/// State shared by the device, its worker and every [`BalloonControl`].
struct Shared {
    /// `num_pages`: the target, in 4 KiB pages.
    target_pages: AtomicU32,
    /// `actual`: what the driver says it has inflated.
    actual_pages: AtomicU32,
    /// Distinct pages currently inflated (our own count).
    inflated_pages: AtomicU64,
    /// Pages of guest RAM; 0 until the device is first activated.
    guest_ram_pages: AtomicU64,
    stats: Mutex<Option<BalloonStats>>,
    /// Set while the device is active, for config-change interrupts. Also
    /// what a target change holds, so the guard's and a client's do not
    /// cross.
    interrupt: Mutex<Option<Arc<dyn Interrupt>>>,
    /// Targets set through [`BalloonControl`]: the pressure guard starts
    /// afresh after each.
    target_changes: AtomicU64,
    guard: GuardRecord,
}

/// Changes and watches the balloon while the guest runs; cheap to clone.
#[derive(Clone)]
pub struct BalloonControl {
    shared: Arc<Shared>,
}

impl BalloonControl {
    /// Asks the guest to give back `mib` MiB in total (0 deflates the
    /// balloon completely). Rejected when larger than guest RAM (once the
    /// device has been activated and knows it) or than the 32-bit page
    /// count the device can express. Tells the driver at once if the
    /// device is active.
    pub fn set_target_mib(&self, mib: u64) -> Result<(), BalloonError> {
        let ram_pages = self.shared.guest_ram_pages.load(Ordering::Relaxed);
        let max_pages = if ram_pages == 0 {
            u64::from(u32::MAX)
        } else {
            ram_pages.min(u64::from(u32::MAX))
        };
        let pages = mib.checked_mul(PAGES_PER_MIB).filter(|p| *p <= max_pages);
        let Some(pages) = pages else {
            return Err(BalloonError::TargetTooLarge {
                mib,
                max_mib: max_pages / PAGES_PER_MIB,
            });
        };
        // Held across the store so a concurrent reset cannot leave the
        // driver unaware of a change it will never be told about.
        let interrupt = lock(&self.shared.interrupt);
        self.shared
            .target_pages
            .store(pages as u32, Ordering::SeqCst);
        self.shared.target_changes.fetch_add(1, Ordering::SeqCst);
        if let Some(interrupt) = interrupt.as_ref() {
            interrupt.signal_config();
        }
        Ok(())
    }

    pub fn target_mib(&self) -> u64 {
        self.target_pages() / PAGES_PER_MIB
    }

    pub fn target_pages(&self) -> u64 {
        u64::from(self.shared.target_pages.load(Ordering::SeqCst))
    }

    /// What the driver reports as inflated (`actual`), in MiB.
    pub fn actual_mib(&self) -> u64 {
        self.actual_pages() / PAGES_PER_MIB
    }

    pub fn actual_pages(&self) -> u64 {
        u64::from(self.shared.actual_pages.load(Ordering::SeqCst))
    }

    /// Distinct 4 KiB pages the device has taken back from the guest.
    pub fn inflated_pages(&self) -> u64 {
        self.shared.inflated_pages.load(Ordering::SeqCst)
    }

    /// The latest statistics, if the guest sent any.
    pub fn stats(&self) -> Option<BalloonStats> {
        lock(&self.shared.stats).clone()
    }

    /// What the pressure guard has done.
    pub fn guard_counters(&self) -> GuardCounters {
        self.shared.guard.snapshot()
    }
}

/// The virtio-balloon device.
pub struct VirtioBalloon {
    config: BalloonConfig,
    shared: Arc<Shared>,
    stats_period: Duration,
    worker_control: WorkerControl,
    worker: Option<Worker>,
    warned_config_write: bool,
}

impl VirtioBalloon {
    pub fn new(config: BalloonConfig) -> Result<Self, BalloonError> {
        let target = config
            .initial_target_mib
            .checked_mul(PAGES_PER_MIB)
            .and_then(|p| u32::try_from(p).ok());
        let Some(target) = target else {
            return Err(BalloonError::TargetTooLarge {
                mib: config.initial_target_mib,
                max_mib: u64::from(u32::MAX) / PAGES_PER_MIB,
            });
        };
        let shared = Arc::new(Shared {
            target_pages: AtomicU32::new(target),
            actual_pages: AtomicU32::new(0),
            inflated_pages: AtomicU64::new(0),
            guest_ram_pages: AtomicU64::new(0),
            stats: Mutex::new(None),
            interrupt: Mutex::new(None),
            target_changes: AtomicU64::new(0),
            guard: GuardRecord::default(),
        });
        Ok(VirtioBalloon {
            stats_period: Duration::from_secs(u64::from(config.stats_interval_s)),
            config,
            shared,
            worker_control: WorkerControl::new(Placement::default())?,
            worker: None,
            warned_config_write: false,
        })
    }

    pub fn control(&self) -> BalloonControl {
        BalloonControl {
            shared: self.shared.clone(),
        }
    }

    pub fn worker_control(&self) -> WorkerControl {
        self.worker_control.clone()
    }

    fn offered_features(&self) -> u64 {
        let mut f = features::RING_EVENT_IDX | features::RING_INDIRECT_DESC;
        if self.config.stats_interval_s > 0 {
            f |= feature::STATS_VQ;
        }
        if self.config.deflate_on_oom {
            f |= feature::DEFLATE_ON_OOM;
        }
        if self.config.free_page_reporting {
            f |= feature::PAGE_REPORTING;
        }
        f
    }

    fn stop(&mut self) {
        *lock(&self.shared.interrupt) = None;
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
        }
    }
}

impl VirtioDevice for VirtioBalloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn name(&self) -> &str {
        "balloon0"
    }

    /// One entry per queue the offered features allow (inflate, deflate,
    /// then stats and reporting if offered). The driver numbers the
    /// optional ones by what it negotiated: see [`QueueLayout`].
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; QueueLayout::for_features(self.offered_features()).count()]
    }

    fn features(&self) -> u64 {
        self.offered_features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SIZE];
        config[0..4].copy_from_slice(
            &self
                .shared
                .target_pages
                .load(Ordering::SeqCst)
                .to_le_bytes(),
        );
        config[4..8].copy_from_slice(
            &self
                .shared
                .actual_pages
                .load(Ordering::SeqCst)
                .to_le_bytes(),
        );
        // free_page_hint_cmd_id and poison_val stay 0: features not offered.
        super::read_config_bytes(&config, offset, data);
    }

    /// Only `actual` is writable, as one 4-byte write (what Linux does).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == ACTUAL_OFFSET && data.len() == 4 {
            let actual = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.shared.actual_pages.store(actual, Ordering::SeqCst);
        } else if !self.warned_config_write {
            self.warned_config_write = true;
            tracing::warn!(
                "balloon0: ignoring a {}-byte config write at offset {offset} (only a 4-byte write of `actual` at 4 is accepted)",
                data.len()
            );
        }
    }

    fn activate(&mut self, mut ctx: DeviceContext) -> Result<(), ActivateError> {
        self.stop();
        let layout = QueueLayout::for_features(ctx.acked_features);
        let inflate = ctx
            .take_queue(layout.inflate)
            .ok_or(ActivateError::MissingQueue(layout.inflate))?;
        let deflate = ctx
            .take_queue(layout.deflate)
            .ok_or(ActivateError::MissingQueue(layout.deflate))?;
        let stats = match layout.stats {
            Some(index) => {
                let queue = ctx
                    .take_queue(index)
                    .ok_or(ActivateError::MissingQueue(index))?;
                let mut timer =
                    TimerFd::new().map_err(|e| ActivateError::Worker(io::Error::from(e)))?;
                let period = self.stats_period.max(Duration::from_millis(1));
                timer
                    .reset(period, Some(period))
                    .map_err(|e| ActivateError::Worker(io::Error::from(e)))?;
                Some(StatsQueue {
                    ctx: queue,
                    held: None,
                    timer,
                })
            }
            None => None,
        };
        let reporting = match layout.reporting {
            Some(index) => Some(
                ctx.take_queue(index)
                    .ok_or(ActivateError::MissingQueue(index))?,
            ),
            None => None,
        };
        let pages = PageBitmap::new(&ctx.mem);
        self.shared
            .guest_ram_pages
            .store(pages.total_pages(), Ordering::Relaxed);
        self.shared.inflated_pages.store(0, Ordering::SeqCst);
        let handler = BalloonWorker {
            mem: ctx.mem,
            interrupt: ctx.interrupt.clone(),
            shared: self.shared.clone(),
            inflate,
            deflate,
            stats,
            reporting,
            guard: (self.config.pressure_guard && layout.stats.is_some())
                .then(|| WorkerGuard::new(self.stats_period, &self.shared)),
            pages,
            polling: false,
            broken: false,
            warned: Warned::default(),
        };
        let worker = Worker::spawn(self.name(), handler, self.worker_control.clone())
            .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        *lock(&self.shared.interrupt) = Some(ctx.interrupt);
        Ok(())
    }

    /// Stops the worker. The guest's balloon starts empty after a reset
    /// (its driver starts over), so `actual` and the inflated count go to 0;
    /// the target and the last statistics stay.
    fn reset(&mut self) {
        self.stop();
        self.shared.actual_pages.store(0, Ordering::SeqCst);
        self.shared.inflated_pages.store(0, Ordering::SeqCst);
    }
}

impl Drop for VirtioBalloon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One bit per 4 KiB page of guest RAM, region by region: which pages are
/// inflated. Also the authority on which PFNs are guest RAM at all.
struct PageBitmap {
    regions: Vec<RegionPages>,
}

struct RegionPages {
    first_pfn: u64,
    pages: u64,
    bits: Vec<u64>,
}

impl PageBitmap {
    fn new(mem: &GuestMemoryMmap) -> PageBitmap {
        let mut regions: Vec<RegionPages> = mem
            .iter()
            .filter_map(|r| {
                let start = r.start_addr().raw_value();
                let end = start.checked_add(r.len())?;
                // Only pages wholly inside the region.
                let first_pfn = start.div_ceil(PAGE_SIZE);
                let pages = (end / PAGE_SIZE)
                    .checked_sub(first_pfn)
                    .filter(|p| *p > 0)?;
                let words = usize::try_from(pages.div_ceil(64)).ok()?;
                Some(RegionPages {
                    first_pfn,
                    pages,
                    bits: vec![0; words],
                })
            })
            .collect();
        regions.sort_by_key(|r| r.first_pfn);
        PageBitmap { regions }
    }

    fn total_pages(&self) -> u64 {
        self.regions.iter().map(|r| r.pages).sum()
    }

    /// Region, word and bit of `pfn`, if it is a page of guest RAM.
    fn position(&self, pfn: u64) -> Option<(usize, usize, u64)> {
        let at = self
            .regions
            .partition_point(|r| r.first_pfn <= pfn)
            .checked_sub(1)?;
        let region = self.regions.get(at)?;
        let offset = pfn - region.first_pfn;
        if offset >= region.pages {
            return None;
        }
        Some((
            at,
            usize::try_from(offset / 64).ok()?,
            1u64 << (offset % 64),
        ))
    }

    fn word(&mut self, pfn: u64) -> Option<(&mut u64, u64)> {
        let (region, word, bit) = self.position(pfn)?;
        Some((self.regions.get_mut(region)?.bits.get_mut(word)?, bit))
    }

    fn contains(&self, pfn: u64) -> bool {
        self.position(pfn).is_some()
    }

    /// Marks `pfn` inflated; true if it was not already.
    fn set(&mut self, pfn: u64) -> bool {
        match self.word(pfn) {
            Some((word, bit)) => {
                let was = *word & bit != 0;
                *word |= bit;
                !was
            }
            None => false,
        }
    }

    /// Marks `pfn` deflated; true if it was inflated.
    fn clear(&mut self, pfn: u64) -> bool {
        match self.word(pfn) {
            Some((word, bit)) => {
                let was = *word & bit != 0;
                *word &= !bit;
                was
            }
            None => false,
        }
    }
}

/// A guest range mapped in the host: where, and how to drop it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct HostRange {
    addr: usize,
    len: usize,
    shared: bool,
}

/// The host mapping of `[gpa, gpa + len)`, if it lies wholly inside one
/// guest memory region.
fn host_range(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Option<HostRange> {
    let last = gpa.checked_add(len.checked_sub(1)?)?;
    let region = mem.find_region(GuestAddress(gpa))?;
    let region_last = region
        .start_addr()
        .raw_value()
        .checked_add(region.len().checked_sub(1)?)?;
    if last > region_last {
        return None;
    }
    let addr = mem.get_host_address(GuestAddress(gpa)).ok()? as usize;
    let shared = region.flags() & libc::MAP_SHARED != 0;
    Some(HostRange {
        addr,
        len: usize::try_from(len).ok()?,
        shared,
    })
}

fn host_page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(4096)
}

/// Gives `range` back to the host. Only whole host pages are dropped (a
/// no-op rounding with 4 KiB host pages).
fn discard(range: HostRange) -> io::Result<()> {
    let page = host_page_size();
    let start = range.addr.checked_add(page - 1).map(|a| a & !(page - 1));
    let end = range.addr.checked_add(range.len).map(|e| e & !(page - 1));
    let (Some(start), Some(end)) = (start, end) else {
        return Ok(());
    };
    if end <= start {
        return Ok(());
    }
    // Shared mappings (memfd, vhost-user) keep their pages in the file:
    // DONTNEED would only unmap them, REMOVE frees them.
    let advice = if range.shared {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    // SAFETY: [start, end) lies inside one guest memory mapping (checked by
    // host_range); dropping its pages is what the guest asked for, and the
    // mapping itself stays valid (pages read back as zeros).
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, end - start, advice) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Contiguous host pages waiting for one `madvise`.
#[derive(Default)]
struct DiscardBatch {
    run: Option<HostRange>,
    failed: Option<io::Error>,
}

impl DiscardBatch {
    fn add(&mut self, range: HostRange) {
        if let Some(run) = self.run.as_mut() {
            if run.shared == range.shared && run.addr.checked_add(run.len) == Some(range.addr) {
                run.len += range.len;
                return;
            }
        }
        self.flush();
        self.run = Some(range);
    }

    fn flush(&mut self) {
        if let Some(run) = self.run.take() {
            if let Err(e) = discard(run) {
                self.failed.get_or_insert(e);
            }
        }
    }
}

/// What happened to a list of PFNs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PfnOutcome {
    /// PFNs whose state changed (newly inflated, or deflated).
    pub changed: u64,
    /// PFNs outside guest RAM, skipped.
    pub bad: u64,
    /// Bytes after the last whole PFN, or past the per-chain limit.
    pub ignored_bytes: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Balloon {
    Inflate,
    Deflate,
}

/// Reads le32 PFNs from `src` and inflates or deflates them. Inflated
/// pages are dropped from the host, contiguous ones in one call.
fn apply_pfns(
    src: &mut impl Read,
    mem: &GuestMemoryMmap,
    pages: &mut PageBitmap,
    op: Balloon,
) -> (PfnOutcome, Option<io::Error>) {
    let mut out = PfnOutcome::default();
    let mut batch = DiscardBatch::default();
    let mut buf = [0u8; 1024];
    let mut total = 0usize;
    loop {
        let room = buf.len().min(MAX_PFN_BYTES_PER_CHAIN - total);
        if room == 0 {
            out.ignored_bytes |= read_full(src, &mut [0u8; 1]) > 0;
            break;
        }
        // `room` is a multiple of 4: a partial PFN can only be the last bytes.
        let n = read_full(src, &mut buf[..room]);
        total += n;
        out.ignored_bytes |= n % 4 != 0;
        for raw in buf[..n].chunks_exact(4) {
            let pfn = u64::from(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]));
            match op {
                Balloon::Inflate => match host_range(mem, pfn << PAGE_SHIFT, PAGE_SIZE)
                    .filter(|_| pages.contains(pfn))
                {
                    Some(range) => {
                        if pages.set(pfn) {
                            out.changed += 1;
                        }
                        // Dropped again if already inflated: cheap, and the
                        // guest may have touched it since.
                        batch.add(range);
                    }
                    None => out.bad += 1,
                },
                Balloon::Deflate => {
                    if !pages.contains(pfn) {
                        out.bad += 1;
                    } else if pages.clear(pfn) {
                        out.changed += 1;
                    }
                }
            }
        }
        if n < room {
            break;
        }
    }
    batch.flush();
    (out, batch.failed)
}

/// What was wrong with a free page report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReportOutcome {
    pub dropped_bytes: u64,
    /// Ranges unaligned, empty, too large or outside guest RAM: skipped.
    pub bad_ranges: u64,
}

/// Drops every range a reporting chain describes (its descriptors, in
/// either direction, are the free ranges).
fn apply_report(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> (ReportOutcome, Option<io::Error>) {
    let mut out = ReportOutcome::default();
    let mut batch = DiscardBatch::default();
    for desc in chain {
        let gpa = desc.addr().raw_value();
        let len = u64::from(desc.len());
        let sane =
            len > 0 && len <= MAX_REPORT_BYTES && gpa % PAGE_SIZE == 0 && len % PAGE_SIZE == 0;
        match host_range(mem, gpa, len).filter(|_| sane) {
            Some(range) => {
                batch.add(range);
                out.dropped_bytes += len;
            }
            None => out.bad_ranges += 1,
        }
    }
    batch.flush();
    (out, batch.failed)
}

/// Problems already logged, so a hostile guest cannot flood the log.
#[derive(Default)]
struct Warned {
    bad_pfn: bool,
    pfn_bytes: bool,
    madvise: bool,
    stats: bool,
    stats_chain: bool,
    report: bool,
    broken: bool,
}

fn warn_once(flag: &mut bool, f: impl FnOnce()) {
    if !*flag {
        *flag = true;
        f();
    }
}

struct StatsQueue {
    ctx: QueueContext,
    /// The driver's buffer, kept until we want fresh statistics.
    held: Option<u16>,
    timer: TimerFd,
}

const TOKEN_INFLATE: u64 = 0;
const TOKEN_DEFLATE: u64 = 1;
const TOKEN_STATS: u64 = 2;
const TOKEN_REPORTING: u64 = 3;
const TOKEN_TIMER: u64 = 4;

struct BalloonWorker {
    mem: Memory,
    interrupt: Arc<dyn Interrupt>,
    shared: Arc<Shared>,
    inflate: QueueContext,
    deflate: QueueContext,
    stats: Option<StatsQueue>,
    reporting: Option<QueueContext>,
    /// Present with statistics and `pressure_guard` on.
    guard: Option<WorkerGuard>,
    pages: PageBitmap,
    polling: bool,
    broken: bool,
    warned: Warned,
}

impl BalloonWorker {
    fn serve_pfns(&mut self, op: Balloon) -> Result<bool, virtio_queue::Error> {
        let mem: &GuestMemoryMmap = &self.mem;
        let pages = &mut self.pages;
        let warned = &mut self.warned;
        let shared = &self.shared;
        let qc = if op == Balloon::Inflate {
            &mut self.inflate
        } else {
            &mut self.deflate
        };
        drain_queue(qc, mem, self.polling, &*self.interrupt, |chain| {
            let mut reader = match chain.reader(mem) {
                Ok(r) => r,
                Err(e) => {
                    warn_once(&mut warned.bad_pfn, || {
                        tracing::warn!("balloon0: bad PFN buffer ({e}), skipped")
                    });
                    return Served::Used(0);
                }
            };
            let (out, failed) = apply_pfns(&mut reader, mem, pages, op);
            match op {
                Balloon::Inflate => shared
                    .inflated_pages
                    .fetch_add(out.changed, Ordering::SeqCst),
                Balloon::Deflate => shared
                    .inflated_pages
                    .fetch_sub(out.changed, Ordering::SeqCst),
            };
            if out.bad > 0 {
                warn_once(&mut warned.bad_pfn, || {
                    tracing::warn!("balloon0: {} PFN(s) outside guest RAM skipped", out.bad)
                });
            }
            if out.ignored_bytes {
                warn_once(&mut warned.pfn_bytes, || {
                    tracing::warn!("balloon0: PFN buffer with a partial entry or over {MAX_PFN_BYTES_PER_CHAIN} bytes, rest ignored")
                });
            }
            if let Some(e) = failed {
                warn_once(&mut warned.madvise, || {
                    tracing::warn!("balloon0: cannot give pages back to the host: {e}")
                });
            }
            Served::Used(0)
        })
    }

    fn serve_stats(&mut self) -> Result<bool, virtio_queue::Error> {
        let Some(sq) = self.stats.as_mut() else {
            return Ok(false);
        };
        let mem: &GuestMemoryMmap = &self.mem;
        let warned = &mut self.warned;
        let shared = &self.shared;
        let held = &mut sq.held;
        let guard = &mut self.guard;
        let interrupt = &*self.interrupt;
        drain_queue(&mut sq.ctx, mem, self.polling, interrupt, |chain| {
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(mut reader) => {
                    // One byte more than we parse, to tell a longer buffer.
                    let mut buf = [0u8; MAX_STAT_ENTRIES * STAT_ENTRY_SIZE + 1];
                    let n = read_full(&mut reader, &mut buf);
                    let (stats, odd) = parse_stats(&buf[..n], SystemTime::now());
                    if odd != StatsOddities::default() {
                        warn_once(&mut warned.stats, || {
                            tracing::warn!("balloon0: odd stats buffer: {odd:?}")
                        });
                    }
                    if let Some(guard) = guard.as_mut() {
                        guard.on_stats(shared, interrupt, &stats, Instant::now());
                    }
                    *lock(&shared.stats) = Some(stats);
                }
                Err(e) => warn_once(&mut warned.stats_chain, || {
                    tracing::warn!("balloon0: bad stats buffer: {e}")
                }),
            }
            // The driver has one buffer; should it send another, the older
            // one goes back at once.
            match held.replace(head) {
                Some(old) => Served::KeepReleasing(old),
                None => Served::Keep,
            }
        })
    }

    /// The stats interval passed: hand the buffer back to ask for more.
    fn request_stats(&mut self) -> Result<(), virtio_queue::Error> {
        let Some(sq) = self.stats.as_mut() else {
            return Ok(());
        };
        if let Some(head) = sq.held.take() {
            sq.ctx.queue.add_used(&*self.mem, head, 0)?;
            if sq.ctx.queue.needs_notification(&*self.mem)? {
                self.interrupt.signal_queue(sq.ctx.index);
            }
        }
        Ok(())
    }

    fn serve_reporting(&mut self) -> Result<bool, virtio_queue::Error> {
        let Some(qc) = self.reporting.as_mut() else {
            return Ok(false);
        };
        let mem: &GuestMemoryMmap = &self.mem;
        let warned = &mut self.warned;
        drain_queue(qc, mem, self.polling, &*self.interrupt, |chain| {
            let (out, failed) = apply_report(chain, mem);
            if out.bad_ranges > 0 {
                warn_once(&mut warned.report, || {
                    tracing::warn!(
                        "balloon0: {} bad free page range(s) skipped",
                        out.bad_ranges
                    )
                });
            }
            if let Some(e) = failed {
                warn_once(&mut warned.madvise, || {
                    tracing::warn!("balloon0: cannot give pages back to the host: {e}")
                });
            }
            Served::Used(0)
        })
    }

    fn serve(&mut self, token: u64) -> bool {
        if self.broken {
            return false;
        }
        let result = match token {
            TOKEN_INFLATE => self.serve_pfns(Balloon::Inflate),
            TOKEN_DEFLATE => self.serve_pfns(Balloon::Deflate),
            TOKEN_STATS => self.serve_stats(),
            TOKEN_REPORTING => self.serve_reporting(),
            TOKEN_TIMER => self.request_stats().map(|_| true),
            _ => Ok(false),
        };
        result.unwrap_or_else(|e| {
            self.broken = true;
            warn_once(&mut self.warned.broken, || {
                tracing::warn!("balloon0: broken queue, device needs reset: {e}")
            });
            self.interrupt.set_needs_reset();
            false
        })
    }

    fn queues(&mut self) -> impl Iterator<Item = &mut QueueContext> {
        [
            Some(&mut self.inflate),
            Some(&mut self.deflate),
            self.stats.as_mut().map(|s| &mut s.ctx),
            self.reporting.as_mut(),
        ]
        .into_iter()
        .flatten()
    }
}

impl WorkerHandler for BalloonWorker {
    fn event_sources(&self) -> Vec<(RawFd, EventSet, u64)> {
        let mut sources = vec![
            (self.inflate.kick.as_raw_fd(), EventSet::IN, TOKEN_INFLATE),
            (self.deflate.kick.as_raw_fd(), EventSet::IN, TOKEN_DEFLATE),
        ];
        if let Some(sq) = &self.stats {
            sources.push((sq.ctx.kick.as_raw_fd(), EventSet::IN, TOKEN_STATS));
            sources.push((sq.timer.as_raw_fd(), EventSet::IN, TOKEN_TIMER));
        }
        if let Some(qc) = &self.reporting {
            sources.push((qc.kick.as_raw_fd(), EventSet::IN, TOKEN_REPORTING));
        }
        sources
    }

    fn handle_event(&mut self, token: u64, _events: EventSet) {
        let kick = match token {
            TOKEN_INFLATE => Some(&self.inflate.kick),
            TOKEN_DEFLATE => Some(&self.deflate.kick),
            TOKEN_STATS => self.stats.as_ref().map(|s| &s.ctx.kick),
            TOKEN_REPORTING => self.reporting.as_ref().map(|q| &q.kick),
            _ => None,
        };
        if let Some(kick) = kick {
            let _ = kick.read();
        }
        if token == TOKEN_TIMER {
            // Read even when broken, or the ready timer would spin epoll.
            if let Some(sq) = self.stats.as_mut() {
                let _ = sq.timer.wait();
            }
        }
        self.serve(token);
    }

    fn poll(&mut self) -> bool {
        let mut worked = false;
        for token in [TOKEN_INFLATE, TOKEN_DEFLATE, TOKEN_STATS, TOKEN_REPORTING] {
            worked |= self.serve(token);
        }
        worked
    }

    fn set_polling(&mut self, on: bool) -> bool {
        self.polling = on;
        let mem = self.mem.clone();
        let mut pending = false;
        for qc in self.queues() {
            if on {
                let _ = qc.queue.disable_notification(&*mem);
            } else {
                pending |= qc.queue.enable_notification(&*mem).unwrap_or(false);
            }
        }
        pending
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Entry points for `cargo fuzz`: they must never panic, whatever the bytes.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;
    use virtio_queue::Queue;
    use vm_memory::Bytes;

    /// Two regions with a hole, so PFNs can miss in every way.
    fn memory() -> Option<GuestMemoryMmap> {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x2_0000), 0x1_0000),
        ])
        .ok()
    }

    /// `data` as an inflate list, then as a deflate list.
    pub fn pfns(data: &[u8]) {
        let Some(mem) = memory() else { return };
        let mut pages = PageBitmap::new(&mem);
        let (inflated, _) = apply_pfns(&mut &data[..], &mem, &mut pages, Balloon::Inflate);
        let (deflated, _) = apply_pfns(&mut &data[..], &mem, &mut pages, Balloon::Deflate);
        assert!(inflated.changed <= pages.total_pages() && deflated.changed <= inflated.changed);
    }

    /// `data` as a stats buffer.
    pub fn stats(data: &[u8]) {
        let _ = parse_stats(data, SystemTime::UNIX_EPOCH);
    }

    /// `data` laid out as a queue (see [`queue_from_bytes`]) whose chains
    /// are free page reports.
    pub fn report(data: &[u8]) {
        let Some((mem, mut queue)) = queue_from_bytes(data) else {
            return;
        };
        while let Some(chain) = queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let _ = apply_report(chain, &mem);
            let _ = queue.add_used(&mem, head, 0);
        }
    }

    /// Base of the payload area: the fuzz bytes after the queue layout.
    pub const PAYLOAD_ADDR: u64 = 0x1000;
    const QUEUE_LEN: u16 = 16;

    /// Builds, from fuzz bytes, a guest memory (64 KiB, a hole, 64 KiB)
    /// with one split queue of 16 entries the driver filled in: byte 0 is
    /// the number of raw 16-byte descriptors that follow (addr le64, len
    /// le32, flags le16, next le16, all unchecked), then the number of
    /// available heads and those heads (le16, unchecked), then the avail
    /// index delta (may lie about how many heads there are); the remaining
    /// bytes are written at [`PAYLOAD_ADDR`]. Also used by the rng and
    /// console fuzz entries.
    pub fn queue_from_bytes(data: &[u8]) -> Option<(GuestMemoryMmap, Queue)> {
        let mem = memory()?;
        let desc_table = GuestAddress(0);
        let avail = GuestAddress(0x200);
        let used = GuestAddress(0x400);
        let mut data = data.iter().copied();
        let ndesc = data.next()? % (QUEUE_LEN as u8 + 1);
        for i in 0..u64::from(ndesc) {
            let raw: Vec<u8> = data.by_ref().take(16).collect();
            mem.write_slice(&raw, desc_table.checked_add(i * 16)?)
                .ok()?;
        }
        let nheads = data.next()? % (QUEUE_LEN as u8 + 1);
        for i in 0..u64::from(nheads) {
            let head = [data.next()?, data.next()?];
            mem.write_slice(&head, avail.checked_add(4 + i * 2)?).ok()?;
        }
        let idx = data.next().map(u16::from).unwrap_or(u16::from(nheads));
        mem.write_obj(idx.to_le(), avail.checked_add(2)?).ok()?;
        let payload: Vec<u8> = data.take(0x1_0000 - PAYLOAD_ADDR as usize).collect();
        mem.write_slice(&payload, GuestAddress(PAYLOAD_ADDR)).ok()?;
        let mut queue = Queue::new(QUEUE_LEN).ok()?;
        queue.set_size(QUEUE_LEN);
        queue.set_desc_table_address(Some(desc_table.0 as u32), Some(0));
        queue.set_avail_ring_address(Some(avail.0 as u32), Some(0));
        queue.set_used_ring_address(Some(used.0 as u32), Some(0));
        queue.set_ready(true);
        Some((mem, queue))
    }

    /// An [`Interrupt`] that does nothing, for fuzzing device workers.
    pub struct NoInterrupt;

    impl Interrupt for NoInterrupt {
        fn signal_queue(&self, _index: u16) {}
        fn signal_config(&self) {}
        fn set_needs_reset(&self) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_support::{wait_until, CountingInterrupt};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;
    use vmm_sys_util::eventfd::EventFd;

    const MIB: u64 = 1 << 20;
    /// Pages the tests balloon live from here up.
    const DATA: u64 = 4 * MIB;
    /// Buffers (PFN lists, stats) live here.
    const BUF: u64 = 0x10_0000;

    fn memory() -> Memory {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).unwrap())
    }

    fn queue_base(index: u16) -> GuestAddress {
        GuestAddress(u64::from(index) * 0x4000)
    }

    struct Rig {
        mem: Memory,
        dev: VirtioBalloon,
        irq: Arc<CountingInterrupt>,
        kicks: Vec<EventFd>,
        rings: Vec<Ring>,
    }

    /// The driver's side of a queue laid out by `MockSplitQueue` (whose
    /// accessors cannot be kept: re-creating one zeroes the rings).
    struct Ring {
        desc: GuestAddress,
        avail: GuestAddress,
        used: GuestAddress,
    }

    impl Ring {
        fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
            mem.read_obj(self.used.unchecked_add(2)).unwrap()
        }

        /// (id, len) of used entry `i`.
        fn used_elem(&self, mem: &GuestMemoryMmap, i: u64) -> (u32, u32) {
            let at = self.used.unchecked_add(4 + 8 * i);
            (
                mem.read_obj(at).unwrap(),
                mem.read_obj(at.unchecked_add(4)).unwrap(),
            )
        }

        fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
            mem.write_obj(idx, self.avail.unchecked_add(2)).unwrap();
        }

        /// Writes `descs` as one chain at descriptor `slot` and makes it available.
        fn add_chain(&self, mem: &GuestMemoryMmap, slot: u16, descs: &[RawDescriptor]) {
            for (i, d) in descs.iter().enumerate() {
                let d = SplitDescriptor::from(*d);
                let last = i + 1 == descs.len();
                let flags = if last { d.flags() } else { d.flags() | 1 };
                let next = slot + i as u16 + 1;
                let raw =
                    RawDescriptor::from(SplitDescriptor::new(d.addr().0, d.len(), flags, next));
                mem.write_obj(
                    raw,
                    self.desc.unchecked_add(16 * u64::from(slot + i as u16)),
                )
                .unwrap();
            }
            let idx: u16 = mem.read_obj(self.avail.unchecked_add(2)).unwrap();
            mem.write_obj(slot, self.avail.unchecked_add(4 + 2 * u64::from(idx % 16)))
                .unwrap();
            self.set_avail_idx(mem, idx.wrapping_add(1));
        }
    }

    impl Rig {
        fn new(config: BalloonConfig, acked: u64) -> Rig {
            Rig::with_period(config, acked, None)
        }

        fn with_period(config: BalloonConfig, acked: u64, period: Option<Duration>) -> Rig {
            let mem = memory();
            let mut dev = VirtioBalloon::new(config).unwrap();
            if let Some(p) = period {
                dev.stats_period = p;
            }
            let irq = Arc::new(CountingInterrupt::default());
            let n = QueueLayout::for_features(acked).count() as u16;
            let mut queues = Vec::new();
            let mut kicks = Vec::new();
            let mut rings = Vec::new();
            for index in 0..n {
                let mock = MockSplitQueue::create(&*mem, queue_base(index), 16);
                rings.push(Ring {
                    desc: mock.desc_table_addr(),
                    avail: mock.avail_addr(),
                    used: mock.used_addr(),
                });
                let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
                kicks.push(kick.try_clone().unwrap());
                queues.push(QueueContext {
                    index,
                    queue: mock.create_queue().unwrap(),
                    kick,
                });
            }
            let ctx = DeviceContext {
                mem: mem.clone(),
                queues,
                acked_features: acked,
                interrupt: irq.clone(),
            };
            dev.activate(ctx).unwrap();
            Rig {
                mem,
                dev,
                irq,
                kicks,
                rings,
            }
        }

        fn ring(&self, index: u16) -> &Ring {
            &self.rings[usize::from(index)]
        }

        fn used_idx(&self, index: u16) -> u16 {
            self.ring(index).used_idx(&self.mem)
        }

        /// Puts one chain in queue `index` (at descriptor `slot`) and kicks.
        fn send(&self, index: u16, slot: u16, descs: &[RawDescriptor]) {
            self.ring(index).add_chain(&self.mem, slot, descs);
            self.kicks[usize::from(index)].write(1).unwrap();
        }

        /// Sends `pfns` as one buffer at `addr` and waits for it to be used.
        fn send_pfns(&self, index: u16, slot: u16, addr: u64, pfns: &[u32]) {
            let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
            self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
            let before = self.used_idx(index);
            self.send(index, slot, &[desc(addr, bytes.len() as u32, 0)]);
            wait_until("the PFN buffer to be used", || {
                self.used_idx(index) != before
            });
        }
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn pfn(gpa: u64) -> u32 {
        (gpa >> PAGE_SHIFT) as u32
    }

    /// Resident pages of `[gpa, gpa + len)` in the host, via mincore.
    fn resident_pages(mem: &GuestMemoryMmap, gpa: u64, len: usize) -> usize {
        let host = mem.get_host_address(GuestAddress(gpa)).unwrap();
        let mut vec = vec![0u8; len.div_ceil(4096)];
        // SAFETY: the range is inside the test's guest mapping.
        let rc = unsafe { libc::mincore(host as *mut libc::c_void, len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        vec.iter().filter(|v| *v & 1 != 0).count()
    }

    #[test]
    fn config_parses_and_rejects_mistakes() {
        let c: BalloonConfig = "deflate_on_oom=on,stats=5,free_page_reporting=on"
            .parse()
            .unwrap();
        assert_eq!(
            c,
            BalloonConfig {
                deflate_on_oom: true,
                stats_interval_s: 5,
                free_page_reporting: true,
                initial_target_mib: 0,
                pressure_guard: true,
            }
        );
        let default = "".parse::<BalloonConfig>().unwrap();
        assert_eq!(default, BalloonConfig::default());
        assert!(default.deflate_on_oom && default.pressure_guard);
        let off: BalloonConfig = "deflate_on_oom=off,pressure_guard=off".parse().unwrap();
        assert!(!off.deflate_on_oom && !off.pressure_guard);
        assert_eq!(
            "target_mib=512"
                .parse::<BalloonConfig>()
                .unwrap()
                .initial_target_mib,
            512
        );
        assert!("stats=-1".parse::<BalloonConfig>().is_err());
        assert!("deflate=on".parse::<BalloonConfig>().is_err());
        assert!(VirtioBalloon::new(BalloonConfig {
            initial_target_mib: u64::MAX,
            ..Default::default()
        })
        .is_err());
    }

    #[test]
    fn features_and_queues_follow_the_config() {
        let plain = VirtioBalloon::new(BalloonConfig::default()).unwrap();
        assert_eq!(plain.features() & 0xff, feature::DEFLATE_ON_OOM);
        assert_eq!(plain.queue_max_sizes().len(), 2);
        let bare = VirtioBalloon::new("deflate_on_oom=off".parse().unwrap()).unwrap();
        assert_eq!(bare.features() & 0xff, 0);
        let all = VirtioBalloon::new(
            "deflate_on_oom,stats=1,free_page_reporting"
                .parse()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            all.features() & 0xff,
            feature::STATS_VQ | feature::DEFLATE_ON_OOM | feature::PAGE_REPORTING
        );
        assert_eq!(all.queue_max_sizes(), vec![QUEUE_SIZE; 4]);
        assert_eq!(all.device_type(), device_type::BALLOON);
    }

    #[test]
    fn queue_layout_packs_the_optional_queues() {
        let l = QueueLayout::for_features(feature::STATS_VQ | feature::PAGE_REPORTING);
        assert_eq!((l.stats, l.reporting), (Some(2), Some(3)));
        let l = QueueLayout::for_features(feature::PAGE_REPORTING);
        assert_eq!((l.stats, l.reporting), (None, Some(2)));
        let l = QueueLayout::for_features(
            feature::STATS_VQ | feature::FREE_PAGE_HINT | feature::PAGE_REPORTING,
        );
        assert_eq!((l.stats, l.reporting), (Some(2), Some(4)));
        assert_eq!(QueueLayout::for_features(0).count(), 2);
    }

    #[test]
    fn inflated_pages_are_dropped_and_read_back_as_zeros() {
        let rig = Rig::new(BalloonConfig::default(), 0);
        let pages = [DATA, DATA + PAGE_SIZE, DATA + 5 * PAGE_SIZE];
        for gpa in pages {
            rig.mem
                .write_slice(&[0xabu8; PAGE_SIZE as usize], GuestAddress(gpa))
                .unwrap();
        }
        // A page we do not inflate keeps its contents.
        rig.mem
            .write_slice(&[0xcdu8; 8], GuestAddress(DATA + 2 * PAGE_SIZE))
            .unwrap();
        rig.send_pfns(0, 0, BUF, &pages.map(pfn));
        for gpa in pages {
            let mut back = vec![1u8; PAGE_SIZE as usize];
            rig.mem.read_slice(&mut back, GuestAddress(gpa)).unwrap();
            assert!(
                back.iter().all(|b| *b == 0),
                "page {gpa:#x} still holds data"
            );
        }
        let mut kept = [0u8; 8];
        rig.mem
            .read_slice(&mut kept, GuestAddress(DATA + 2 * PAGE_SIZE))
            .unwrap();
        assert_eq!(kept, [0xcd; 8]);
        let control = rig.dev.control();
        assert_eq!(control.inflated_pages(), 3);
        wait_until("the inflate interrupt", || {
            rig.irq.queue[0].load(Ordering::SeqCst) == 1
        });
        assert_eq!(rig.ring(0).used_elem(&rig.mem, 0), (0, 0));
    }

    #[test]
    fn inflating_megabytes_shrinks_host_residency() {
        let rig = Rig::new(BalloonConfig::default(), 0);
        let len = 8 * MIB as usize;
        rig.mem
            .write_slice(&vec![0x5au8; len], GuestAddress(DATA))
            .unwrap();
        let pages = len / PAGE_SIZE as usize;
        assert_eq!(resident_pages(&rig.mem, DATA, len), pages);
        // Two chains of 1024 PFNs each.
        let pfns: Vec<u32> = (0..pages as u64)
            .map(|i| pfn(DATA + i * PAGE_SIZE))
            .collect();
        rig.send_pfns(0, 0, BUF, &pfns[..pages / 2]);
        rig.send_pfns(0, 1, BUF + 0x1_0000, &pfns[pages / 2..]);
        assert_eq!(resident_pages(&rig.mem, DATA, len), 0);
        assert_eq!(rig.dev.control().inflated_pages(), pages as u64);
        // Deflating counts down; the memory comes back on touch.
        rig.send_pfns(1, 0, BUF, &pfns[..10]);
        assert_eq!(rig.dev.control().inflated_pages(), pages as u64 - 10);
        wait_until("the deflate interrupt", || {
            rig.irq.queue[1].load(Ordering::SeqCst) == 1
        });
    }

    #[test]
    fn bad_and_duplicate_pfns_are_skipped_and_counted_once() {
        let rig = Rig::new(BalloonConfig::default(), 0);
        rig.mem.write_slice(&[7u8; 16], GuestAddress(DATA)).unwrap();
        let outside = pfn(16 * MIB);
        rig.send_pfns(
            0,
            0,
            BUF,
            &[outside, u32::MAX, pfn(DATA), pfn(DATA), outside + 1000],
        );
        assert_eq!(rig.dev.control().inflated_pages(), 1);
        let mut back = [1u8; 16];
        rig.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(
            back, [0; 16],
            "the valid PFN after bad ones is still served"
        );
        // Inflated again: still one page.
        rig.send_pfns(0, 1, BUF, &[pfn(DATA)]);
        assert_eq!(rig.dev.control().inflated_pages(), 1);
        // Deflating pages never inflated, twice, or outside RAM changes nothing wrong.
        rig.send_pfns(
            1,
            0,
            BUF,
            &[pfn(DATA), pfn(DATA), pfn(DATA + PAGE_SIZE), outside],
        );
        assert_eq!(rig.dev.control().inflated_pages(), 0);
        assert_eq!(rig.irq.needs_reset.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn pfn_parsing_handles_odd_lengths_holes_and_region_ends() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x2_0000), 0x1_0000),
        ])
        .unwrap();
        let mut pages = PageBitmap::new(&mem);
        assert_eq!(pages.total_pages(), 32);
        // 0x10 is in the hole, 0x2f the last page, 0x30 just past the end;
        // then 3 stray bytes.
        let mut bytes: Vec<u8> = [0x0fu32, 0x10, 0x20, 0x2f, 0x30]
            .iter()
            .flat_map(|p| p.to_le_bytes())
            .collect();
        bytes.extend([1, 2, 3]);
        let (out, err) = apply_pfns(&mut &bytes[..], &mem, &mut pages, Balloon::Inflate);
        assert!(err.is_none());
        assert_eq!(
            out,
            PfnOutcome {
                changed: 3,
                bad: 2,
                ignored_bytes: true
            }
        );
        // An unaligned region start: its first partial page is not RAM.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0x800), 0x2000)]).unwrap();
        let pages = PageBitmap::new(&mem);
        assert_eq!(pages.total_pages(), 1);
        assert!(!pages.contains(0) && pages.contains(1) && !pages.contains(2));
    }

    /// A source that returns a few bytes per read, like a chain of small
    /// descriptors: no PFN may be lost or misaligned at chunk boundaries.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(3).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn pfn_streams_keep_alignment_across_reads() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 * MIB as usize)]).unwrap();
        let mut pages = PageBitmap::new(&mem);
        let bytes: Vec<u8> = (0..1000u32).flat_map(|p| p.to_le_bytes()).collect();
        let (out, err) = apply_pfns(&mut Trickle(&bytes), &mem, &mut pages, Balloon::Inflate);
        assert!(err.is_none());
        assert_eq!(
            out,
            PfnOutcome {
                changed: 1000,
                bad: 0,
                ignored_bytes: false
            }
        );
        let (out, _) = apply_pfns(
            &mut Trickle(&bytes[..bytes.len() - 2]),
            &mem,
            &mut pages,
            Balloon::Deflate,
        );
        assert_eq!(
            out,
            PfnOutcome {
                changed: 999,
                bad: 0,
                ignored_bytes: true
            }
        );
    }

    #[test]
    fn pfn_lists_are_bounded_per_chain() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let mut pages = PageBitmap::new(&mem);
        let bytes = vec![0u8; MAX_PFN_BYTES_PER_CHAIN + 8];
        let (out, _) = apply_pfns(&mut &bytes[..], &mem, &mut pages, Balloon::Inflate);
        assert!(out.ignored_bytes);
        assert_eq!(out.changed, 1);
    }

    #[test]
    fn actual_is_written_by_the_driver_only_as_one_word() {
        let mut dev = VirtioBalloon::new(BalloonConfig {
            initial_target_mib: 2,
            ..Default::default()
        })
        .unwrap();
        let control = dev.control();
        let mut cfg = [0u8; 16];
        dev.read_config(0, &mut cfg);
        assert_eq!(&cfg[0..4], &512u32.to_le_bytes());
        dev.write_config(4, &1024u32.to_le_bytes());
        assert_eq!(control.actual_pages(), 1024);
        assert_eq!(control.actual_mib(), 4);
        // Partial, misplaced or oversized writes are ignored.
        dev.write_config(5, &[9, 9, 9, 9]);
        dev.write_config(4, &[9, 9]);
        dev.write_config(0, &[9; 8]);
        dev.write_config(u64::MAX, &[9; 4]);
        dev.read_config(0, &mut cfg);
        assert_eq!(&cfg[0..8], &[0, 2, 0, 0, 0, 4, 0, 0]);
        assert_eq!(&cfg[8..16], &[0; 8]);
        let mut past = [9u8; 4];
        dev.read_config(14, &mut past);
        assert_eq!(past, [0; 4]);
    }

    #[test]
    fn set_target_updates_config_and_signals_when_active() {
        let mut rig = Rig::new(BalloonConfig::default(), 0);
        let control = rig.dev.control();
        control.set_target_mib(12).unwrap();
        assert_eq!(rig.irq.config.load(Ordering::SeqCst), 1);
        assert_eq!(control.target_mib(), 12);
        let mut num_pages = [0u8; 4];
        rig.dev.read_config(0, &mut num_pages);
        assert_eq!(u32::from_le_bytes(num_pages), 12 * 256);
        // Larger than guest RAM (16 MiB): refused, nothing changes.
        assert!(matches!(
            control.set_target_mib(17),
            Err(BalloonError::TargetTooLarge { max_mib: 16, .. })
        ));
        assert!(control.set_target_mib(u64::MAX).is_err());
        assert_eq!(control.target_mib(), 12);
        assert_eq!(rig.irq.config.load(Ordering::SeqCst), 1);
        // After a reset nothing is signalled; the target is kept.
        rig.dev.reset();
        control.set_target_mib(8).unwrap();
        assert_eq!(rig.irq.config.load(Ordering::SeqCst), 1);
        assert_eq!(control.target_mib(), 8);
    }

    fn stats_bytes(entries: &[(u16, u64)]) -> Vec<u8> {
        entries
            .iter()
            .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
            .collect()
    }

    #[test]
    fn stats_parsing_keeps_known_tags_and_reports_oddities() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(7);
        let mut bytes = stats_bytes(&[
            (tag::MEMFREE, 100),
            (42, 1),
            (tag::MEMTOT, 200),
            (tag::HTLB_PGFAIL, 3),
        ]);
        bytes.extend([1, 2, 3]);
        let (s, odd) = parse_stats(&bytes, t);
        assert_eq!(
            (s.free_memory, s.total_memory, s.hugetlb_failures),
            (Some(100), Some(200), Some(3))
        );
        assert_eq!((s.swap_in, s.available_memory), (None, None));
        assert_eq!(s.received_at, t);
        assert_eq!(
            odd,
            StatsOddities {
                unknown_tags: 1,
                trailing_bytes: 3,
                truncated: false
            }
        );
        let (s, odd) = parse_stats(&[1, 2, 3], t);
        assert_eq!(s, BalloonStats::empty(t));
        assert_eq!(odd.trailing_bytes, 3);
        let all: Vec<(u16, u64)> = (0..10).map(|t| (t, u64::from(t) + 1)).collect();
        let (s, _) = parse_stats(&stats_bytes(&all), t);
        assert_eq!(
            [
                s.swap_in,
                s.swap_out,
                s.major_faults,
                s.minor_faults,
                s.free_memory,
                s.total_memory,
                s.available_memory,
                s.disk_caches,
                s.hugetlb_allocations,
                s.hugetlb_failures
            ],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10].map(Some)
        );
        let many = stats_bytes(&vec![(tag::MINFLT, 1); MAX_STAT_ENTRIES + 1]);
        assert!(parse_stats(&many, t).1.truncated);
    }

    #[test]
    fn stats_buffer_is_held_and_handed_back_every_interval() {
        let acked = feature::STATS_VQ;
        let config = BalloonConfig {
            stats_interval_s: 1,
            ..Default::default()
        };
        let rig = Rig::with_period(config, acked, Some(Duration::from_millis(30)));
        let control = rig.dev.control();
        let bytes = stats_bytes(&[(tag::MEMFREE, 1000), (tag::AVAIL, 900)]);
        rig.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
        rig.send(2, 0, &[desc(BUF, bytes.len() as u32, 0)]);
        wait_until("the first statistics", || control.stats().is_some());
        let first = control.stats().unwrap();
        assert_eq!(
            (first.free_memory, first.available_memory),
            (Some(1000), Some(900))
        );
        // The timer hands the buffer back: the driver's cue to refresh.
        wait_until("the stats request", || {
            rig.irq.queue[2].load(Ordering::SeqCst) == 1
        });
        assert_eq!(rig.used_idx(2), 1);
        // The driver answers with fresh figures, and is asked again.
        let bytes = stats_bytes(&[(tag::MEMFREE, 500), (tag::SWAP_IN, 4)]);
        rig.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
        rig.send(2, 1, &[desc(BUF, bytes.len() as u32 + 5, 0)]);
        wait_until("the second statistics", || {
            control.stats().is_some_and(|s| s.free_memory == Some(500))
        });
        let second = control.stats().unwrap();
        assert_eq!((second.swap_in, second.available_memory), (Some(4), None));
        assert!(second.received_at >= first.received_at);
        wait_until("the second stats request", || rig.used_idx(2) == 2);
        // No buffer held now: more timer ticks must not add used entries.
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(rig.used_idx(2), 2);
    }

    #[test]
    fn a_second_stats_buffer_returns_the_first() {
        let config = BalloonConfig {
            stats_interval_s: 60,
            ..Default::default()
        };
        let rig = Rig::new(config, feature::STATS_VQ);
        let bytes = stats_bytes(&[(tag::MEMTOT, 1)]);
        rig.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
        rig.send(2, 0, &[desc(BUF, 10, 0)]);
        wait_until("the first statistics", || {
            rig.dev.control().stats().is_some()
        });
        assert_eq!(rig.used_idx(2), 0, "the only buffer is held");
        rig.send(2, 1, &[desc(BUF, 10, 0)]);
        wait_until("the older buffer back", || rig.used_idx(2) == 1);
        assert_eq!(rig.ring(2).used_elem(&rig.mem, 0), (0, 0));
    }

    /// Posts the driver's one stats buffer (descriptor 0) and waits until
    /// the device hands it back: it has read the figures (and the guard
    /// has acted on them) and asks for fresh ones.
    fn post_stats(rig: &Rig, entries: &[(u16, u64)]) {
        let bytes = stats_bytes(entries);
        rig.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
        let before = rig.used_idx(2);
        rig.send(2, 0, &[desc(BUF, bytes.len() as u32, 0)]);
        wait_until("the stats buffer back", || rig.used_idx(2) != before);
    }

    fn num_pages(dev: &VirtioBalloon) -> u32 {
        let mut bytes = [0u8; 4];
        dev.read_config(0, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    /// The driver reports what it holds, as Linux does after each change.
    fn report_actual(dev: &mut VirtioBalloon, pages: u32) {
        dev.write_config(ACTUAL_OFFSET, &pages.to_le_bytes());
    }

    fn guard_rig(options: &str) -> Rig {
        let config: BalloonConfig = options.parse().unwrap();
        Rig::with_period(config, feature::STATS_VQ, Some(Duration::from_millis(30)))
    }

    #[test]
    fn the_guard_deflates_in_steps_when_the_guest_is_short_of_memory() {
        // 16 MiB of guest RAM: the floor is a quarter, 4 MiB.
        let mut rig = guard_rig("stats=1,target_mib=8");
        let control = rig.dev.control();
        report_actual(&mut rig.dev, 8 * 256);
        let low = [(tag::AVAIL, MIB), (tag::MEMTOT, 8 * MIB)];
        // 1 MiB available: the 3 MiB deficit beats a quarter of 8 MiB.
        post_stats(&rig, &low);
        assert_eq!(control.target_mib(), 5);
        assert_eq!(num_pages(&rig.dev), 5 * 256);
        assert!(rig.irq.config.load(Ordering::SeqCst) >= 1, "driver told");
        assert_eq!(
            control.guard_counters(),
            GuardCounters {
                deflations: 1,
                released_mib: 3,
                last_reason: Some(pressure::PressureReason::LowAvailable)
            }
        );
        // The pressure lasts: a step per interval (the first answer may
        // come within the same interval and be skipped) down to empty.
        let mut seen = vec![5];
        for _ in 0..20 {
            let asked = num_pages(&rig.dev);
            report_actual(&mut rig.dev, asked);
            post_stats(&rig, &low);
            let now = control.target_mib();
            if now != *seen.last().unwrap() {
                seen.push(now);
            }
        }
        assert_eq!(seen, [5, 2, 0]);
        assert_eq!(num_pages(&rig.dev), 0);
        let counters = control.guard_counters();
        assert_eq!((counters.deflations, counters.released_mib), (3, 8));
        assert_eq!(rig.irq.needs_reset.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn the_guard_leaves_a_calm_guest_alone_and_can_be_turned_off() {
        let calm = [(tag::AVAIL, 10 * MIB), (tag::MAJFLT, 5), (tag::SWAP_IN, 0)];
        let rig = guard_rig("stats=1,target_mib=8");
        for _ in 0..3 {
            post_stats(&rig, &calm);
        }
        assert_eq!(rig.dev.control().target_mib(), 8);
        let rig = guard_rig("stats=1,target_mib=8,pressure_guard=off");
        for _ in 0..3 {
            post_stats(&rig, &[(tag::AVAIL, 0)]);
        }
        assert_eq!(rig.dev.control().target_mib(), 8);
        assert_eq!(rig.dev.control().guard_counters(), GuardCounters::default());
        assert_eq!(rig.irq.config.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_target_set_after_the_guard_stepped_in_is_obeyed() {
        let mut rig = guard_rig("stats=1,target_mib=8");
        let control = rig.dev.control();
        report_actual(&mut rig.dev, 8 * 256);
        post_stats(&rig, &[(tag::AVAIL, MIB), (tag::MAJFLT, 0)]);
        assert_eq!(control.target_mib(), 5);
        // The daemon (or an operator) decides on 6 MiB.
        control.set_target_mib(6).unwrap();
        report_actual(&mut rig.dev, 6 * 256);
        // Faults far above the old baseline, but the guard forgot it: the
        // first figures after the change are only a new baseline.
        let faults = |n: u64| [(tag::AVAIL, 10 * MIB), (tag::MAJFLT, n)];
        post_stats(&rig, &faults(1000));
        assert_eq!(control.target_mib(), 6);
        assert_eq!(control.guard_counters().deflations, 1);
        // New pressure after the change: it steps in again.
        let mut n = 1000;
        for _ in 0..20 {
            n += 1000;
            post_stats(&rig, &faults(n));
            if control.target_mib() != 6 {
                break;
            }
        }
        // A quarter of 6 MiB, down to whole MiB.
        assert_eq!(control.target_mib(), 4);
        assert_eq!(
            control.guard_counters(),
            GuardCounters {
                deflations: 2,
                released_mib: 5,
                last_reason: Some(pressure::PressureReason::MajorFaults)
            }
        );
    }

    #[test]
    fn reporting_drops_free_ranges_and_survives_hostile_ones() {
        let acked = feature::STATS_VQ | feature::PAGE_REPORTING;
        let config: BalloonConfig = "stats=60,free_page_reporting".parse().unwrap();
        let rig = Rig::new(config, acked);
        let len = 2 * MIB as usize;
        rig.mem
            .write_slice(&vec![0x11u8; len], GuestAddress(DATA))
            .unwrap();
        rig.mem
            .write_slice(&[0x22u8; 4096], GuestAddress(DATA + 4 * MIB))
            .unwrap();
        let w = VRING_DESC_F_WRITE as u16;
        rig.send(
            3,
            0,
            &[
                desc(DATA, len as u32, w),
                desc(DATA + 4 * MIB + 1, 4096, w), // unaligned
                desc(DATA + 4 * MIB, 100, w),      // partial page
                desc(15 * MIB, 2 * MIB as u32, w), // runs past the end of RAM
                desc(64 * MIB, 4096, w),           // outside RAM
                desc(0, 0xffff_f000, w),           // huge
                desc(DATA + 4 * MIB, 0, w),        // empty
            ],
        );
        wait_until("the report to be used", || rig.used_idx(3) == 1);
        assert_eq!(resident_pages(&rig.mem, DATA, len), 0);
        let mut kept = [0u8; 4];
        rig.mem
            .read_slice(&mut kept, GuestAddress(DATA + 4 * MIB))
            .unwrap();
        assert_eq!(kept, [0x22; 4], "hostile ranges must not drop anything");
        assert_eq!(
            rig.dev.control().inflated_pages(),
            0,
            "reported pages stay the guest's"
        );
        wait_until("the reporting interrupt", || {
            rig.irq.queue[3].load(Ordering::SeqCst) == 1
        });
        assert_eq!(rig.irq.needs_reset.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn reporting_is_queue_two_without_stats() {
        let rig = Rig::new(
            "free_page_reporting".parse().unwrap(),
            feature::PAGE_REPORTING,
        );
        rig.mem
            .write_slice(&[0x33u8; 4096], GuestAddress(DATA))
            .unwrap();
        rig.send(2, 0, &[desc(DATA, 4096, 0)]);
        wait_until("the report to be used", || rig.used_idx(2) == 1);
        assert_eq!(resident_pages(&rig.mem, DATA, 4096), 0);
    }

    #[test]
    fn broken_queue_needs_reset_and_reset_allows_reactivation() {
        let mut rig = Rig::new(BalloonConfig::default(), 0);
        // The driver claims 100 new buffers in a 16-entry queue.
        rig.ring(0).set_avail_idx(&rig.mem, 100);
        rig.kicks[0].write(1).unwrap();
        wait_until("needs reset", || {
            rig.irq.needs_reset.load(Ordering::SeqCst) == 1
        });
        rig.dev.reset();
        assert_eq!(rig.dev.control().inflated_pages(), 0);
        assert!(rig.dev.worker.is_none());
        assert!(rig.dev.worker_control().thread_id().is_none());
    }

    #[test]
    fn a_broken_device_does_not_spin_on_its_stats_timer() {
        let config = BalloonConfig {
            stats_interval_s: 1,
            ..Default::default()
        };
        let rig = Rig::with_period(config, feature::STATS_VQ, Some(Duration::from_millis(10)));
        rig.ring(0).set_avail_idx(&rig.mem, 100);
        rig.kicks[0].write(1).unwrap();
        wait_until("needs reset", || {
            rig.irq.needs_reset.load(Ordering::SeqCst) == 1
        });
        let control = rig.dev.worker_control();
        let before = control.busy_rounds();
        std::thread::sleep(Duration::from_millis(100));
        // About one round per 10 ms tick; a timer left unread would spin.
        assert!(
            control.busy_rounds() - before < 50,
            "{} rounds in 100 ms",
            control.busy_rounds() - before
        );
    }

    #[test]
    fn poll_mode_serves_without_kicks() {
        use super::super::worker::WaitMode;
        let rig = Rig::new(BalloonConfig::default(), 0);
        rig.dev.worker_control().set_wait_mode(WaitMode::Poll {
            spin: Duration::from_secs(5),
        });
        let bytes = pfn(DATA).to_le_bytes();
        rig.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
        rig.ring(0).add_chain(&rig.mem, 0, &[desc(BUF, 4, 0)]);
        // No kick: the poller finds it.
        wait_until("the polled buffer", || rig.used_idx(0) == 1);
        assert_eq!(rig.dev.control().inflated_pages(), 1);
    }

    #[test]
    fn fuzz_entries_survive_garbage() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        for round in 0..300 {
            let len = (round * 7) % 600;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            fuzzing::pfns(&data);
            fuzzing::stats(&data);
            fuzzing::report(&data);
        }
        fuzzing::pfns(&[0xff; 4096]);
        fuzzing::report(&[]);
    }
}
