//! The balloon's own pressure guard: when the guest's statistics say it is
//! short of memory, the VMM deflates the balloon by itself, one step per
//! statistics interval, whether or not any daemon is there to notice.
//!
//! Pressure is any of: major faults faster than
//! [`Limits::major_faults_per_s`], swap-in faster than
//! [`Limits::swap_in_bytes_per_s`], a refused allocation (the hugetlb
//! failure count growing), or available memory below a floor
//! (max(5 % of guest RAM, 32 MiB), at most a quarter of guest RAM). A step
//! lowers the target to what the balloon holds (`min(target, actual)`)
//! minus a quarter of that or what restores the floor, whichever is larger,
//! rounded down to whole MiB. The guard never raises the target.
//!
//! The statistics come from the guest and may lie: a counter that goes
//! backwards or grows implausibly fast is a reset (new baseline, no
//! action), an available figure above guest RAM is ignored, a missing tag
//! is no evidence. Rates are measured over at least half an interval, so a
//! guest sending buffers in a burst cannot make a tiny delta look fast.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{lock, BalloonStats, Interrupt, Shared, PAGES_PER_MIB, PAGE_SIZE};

/// Why the guard deflated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PressureReason {
    MajorFaults,
    SwapIn,
    RefusedAllocations,
    LowAvailable,
}

impl PressureReason {
    fn describe(self) -> &'static str {
        match self {
            PressureReason::MajorFaults => "major faults rising fast",
            PressureReason::SwapIn => "swapping in",
            PressureReason::RefusedAllocations => "hugetlb allocations refused",
            PressureReason::LowAvailable => "available memory below the floor",
        }
    }
}

/// When the guard sees pressure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub major_faults_per_s: u64,
    pub swap_in_bytes_per_s: u64,
    pub refused_allocations_per_s: u64,
    /// Faster than this is not believed (garbage, or a counter reset).
    pub believable_major_faults_per_s: u64,
    pub believable_swap_in_bytes_per_s: u64,
    pub believable_refused_allocations_per_s: u64,
    /// The available-memory floor: this share of guest RAM (percent) ...
    pub floor_percent: u64,
    /// ... but at least this much ...
    pub floor_min_bytes: u64,
    /// ... and at most this share of guest RAM (so a small guest is not
    /// always "under the floor").
    pub floor_max_percent: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            major_faults_per_s: 100,
            swap_in_bytes_per_s: 256 << 10,
            // Any refusal is pressure.
            refused_allocations_per_s: 0,
            believable_major_faults_per_s: 1_000_000,
            believable_swap_in_bytes_per_s: 64 << 30,
            believable_refused_allocations_per_s: 1_000_000,
            floor_percent: 5,
            floor_min_bytes: 32 << 20,
            floor_max_percent: 25,
        }
    }
}

impl Limits {
    /// The available-memory floor for a guest of `ram_bytes`.
    pub fn floor_bytes(&self, ram_bytes: u64) -> u64 {
        let share = |percent: u64| (u128::from(ram_bytes) * u128::from(percent) / 100) as u64;
        share(self.floor_percent)
            .max(self.floor_min_bytes)
            .min(share(self.floor_max_percent))
    }
}

/// The balloon as the guard sees it, in 4 KiB pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalloonNow {
    pub target_pages: u64,
    /// What the driver says it holds.
    pub actual_pages: u64,
    /// Guest RAM; 0 if unknown (then the floor is not checked).
    pub ram_pages: u64,
}

/// Lower the target from `from_pages` to `to_pages`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub from_pages: u64,
    pub to_pages: u64,
    pub reason: PressureReason,
    /// The first step since the pressure started (the one to log).
    pub new_episode: bool,
}

/// The counters the rates are measured from.
#[derive(Clone, Copy, Debug)]
struct Baseline {
    at: Instant,
    major_faults: Option<u64>,
    swap_in: Option<u64>,
    refused: Option<u64>,
}

/// How one counter moved between two samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trend {
    /// Missing in either sample, backwards, or implausibly fast.
    NoEvidence,
    Calm,
    Rising,
}

fn trend(
    before: Option<u64>,
    after: Option<u64>,
    elapsed: Duration,
    limit_per_s: u64,
    believable_per_s: u64,
) -> Trend {
    let (Some(before), Some(after)) = (before, after) else {
        return Trend::NoEvidence;
    };
    let Some(delta) = after.checked_sub(before) else {
        return Trend::NoEvidence;
    };
    // delta / seconds > limit, as delta * 1000 > limit * ms, in u128.
    let ms = elapsed.as_millis().max(1);
    let per_ms_scaled = u128::from(delta) * 1000;
    if per_ms_scaled > u128::from(believable_per_s) * ms {
        Trend::NoEvidence
    } else if per_ms_scaled > u128::from(limit_per_s) * ms {
        Trend::Rising
    } else {
        Trend::Calm
    }
}

/// The guard's decision, from one statistics sample at a time.
#[derive(Debug)]
pub struct PressureGuard {
    interval: Duration,
    limits: Limits,
    baseline: Option<Baseline>,
    last_step: Option<Instant>,
    in_episode: bool,
}

impl PressureGuard {
    /// `interval` is the statistics interval: at most one step per interval.
    pub fn new(interval: Duration, limits: Limits) -> Self {
        PressureGuard {
            interval: interval.max(Duration::from_millis(1)),
            limits,
            baseline: None,
            last_step: None,
            in_episode: false,
        }
    }

    /// Someone else set the target: only pressure seen from now on counts.
    pub fn forget(&mut self) {
        self.baseline = None;
        self.in_episode = false;
    }

    /// Takes the sample `stats` received at `now`; a step if the balloon
    /// should shrink.
    pub fn observe(
        &mut self,
        stats: &BalloonStats,
        now: Instant,
        balloon: BalloonNow,
    ) -> Option<Step> {
        let Some((reason, deficit_bytes)) = self.pressure(stats, now, balloon.ram_pages) else {
            self.in_episode = false;
            return None;
        };
        if balloon.target_pages == 0 {
            // Nothing left to give back; a later inflation starts afresh.
            self.in_episode = false;
            return None;
        }
        // Stats answer the interval timer, a little late each time: 9/10
        // of an interval tells "next interval" from "same one again".
        let gap = self.interval.saturating_mul(9) / 10;
        if self
            .last_step
            .is_some_and(|last| now.saturating_duration_since(last) < gap)
        {
            return None;
        }
        let held = balloon.target_pages.min(balloon.actual_pages);
        let step = (held / 4).max(deficit_bytes.div_ceil(PAGE_SIZE)).max(1);
        let to_pages = held.saturating_sub(step) / PAGES_PER_MIB * PAGES_PER_MIB;
        self.last_step = Some(now);
        let new_episode = !self.in_episode;
        self.in_episode = true;
        Some(Step {
            from_pages: balloon.target_pages,
            to_pages,
            reason,
            new_episode,
        })
    }

    /// What pressure `stats` shows, and how far available memory is below
    /// the floor (0 if it is not). Moves the rate baseline.
    fn pressure(
        &mut self,
        stats: &BalloonStats,
        now: Instant,
        ram_pages: u64,
    ) -> Option<(PressureReason, u64)> {
        let current = Baseline {
            at: now,
            major_faults: stats.major_faults,
            swap_in: stats.swap_in,
            refused: stats.hugetlb_failures,
        };
        let mut rising = None;
        match self.baseline {
            None => self.baseline = Some(current),
            Some(before) => {
                let elapsed = now.saturating_duration_since(before.at);
                // Too soon for a rate: keep the older baseline.
                if elapsed >= self.interval / 2 {
                    let l = &self.limits;
                    let swap = trend(
                        before.swap_in,
                        current.swap_in,
                        elapsed,
                        l.swap_in_bytes_per_s,
                        l.believable_swap_in_bytes_per_s,
                    );
                    let faults = trend(
                        before.major_faults,
                        current.major_faults,
                        elapsed,
                        l.major_faults_per_s,
                        l.believable_major_faults_per_s,
                    );
                    let refused = trend(
                        before.refused,
                        current.refused,
                        elapsed,
                        l.refused_allocations_per_s,
                        l.believable_refused_allocations_per_s,
                    );
                    rising = if swap == Trend::Rising {
                        Some(PressureReason::SwapIn)
                    } else if refused == Trend::Rising {
                        Some(PressureReason::RefusedAllocations)
                    } else if faults == Trend::Rising {
                        Some(PressureReason::MajorFaults)
                    } else {
                        None
                    };
                    self.baseline = Some(current);
                }
            }
        }
        let ram_bytes = ram_pages.saturating_mul(PAGE_SIZE);
        let deficit = stats
            .available_memory
            .filter(|a| ram_bytes > 0 && *a <= ram_bytes)
            .map(|a| self.limits.floor_bytes(ram_bytes).saturating_sub(a))
            .unwrap_or(0);
        if deficit > 0 {
            Some((PressureReason::LowAvailable, deficit))
        } else {
            rising.map(|r| (r, 0))
        }
    }
}

/// What the guard has done, since the VMM started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardCounters {
    pub deflations: u64,
    pub released_mib: u64,
    pub last_reason: Option<PressureReason>,
}

/// The guard's counters in the device's shared state.
#[derive(Debug, Default)]
pub(super) struct GuardRecord {
    deflations: AtomicU64,
    released_pages: AtomicU64,
    last_reason: Mutex<Option<PressureReason>>,
}

impl GuardRecord {
    pub(super) fn snapshot(&self) -> GuardCounters {
        GuardCounters {
            deflations: self.deflations.load(Ordering::Relaxed),
            released_mib: self.released_pages.load(Ordering::Relaxed) / PAGES_PER_MIB,
            last_reason: *lock(&self.last_reason),
        }
    }
}

/// The guard as the balloon worker runs it, on every statistics buffer.
pub(super) struct WorkerGuard {
    guard: PressureGuard,
    /// `Shared::target_changes` when the guard last looked.
    seen_changes: u64,
}

impl WorkerGuard {
    pub(super) fn new(interval: Duration, shared: &Shared) -> Self {
        WorkerGuard {
            guard: PressureGuard::new(interval, Limits::default()),
            seen_changes: shared.target_changes.load(Ordering::SeqCst),
        }
    }

    /// Feeds one sample; lowers the target and tells the driver if the
    /// guard says so, unless the target was set meanwhile.
    pub(super) fn on_stats(
        &mut self,
        shared: &Shared,
        interrupt: &dyn Interrupt,
        stats: &BalloonStats,
        now: Instant,
    ) {
        let changes = shared.target_changes.load(Ordering::SeqCst);
        if changes != self.seen_changes {
            self.seen_changes = changes;
            self.guard.forget();
        }
        let balloon = BalloonNow {
            target_pages: u64::from(shared.target_pages.load(Ordering::SeqCst)),
            actual_pages: u64::from(shared.actual_pages.load(Ordering::SeqCst)),
            ram_pages: shared.guest_ram_pages.load(Ordering::Relaxed),
        };
        let Some(step) = self.guard.observe(stats, now, balloon) else {
            return;
        };
        let (Ok(from), Ok(to)) = (u32::try_from(step.from_pages), u32::try_from(step.to_pages))
        else {
            return;
        };
        {
            // The lock `set_target_mib` holds: a target set meanwhile wins.
            let _serial = lock(&shared.interrupt);
            if shared.target_changes.load(Ordering::SeqCst) != changes
                || shared
                    .target_pages
                    .compare_exchange(from, to, Ordering::SeqCst, Ordering::SeqCst)
                    .is_err()
            {
                return;
            }
            interrupt.signal_config();
        }
        let record = &shared.guard;
        record.deflations.fetch_add(1, Ordering::Relaxed);
        record
            .released_pages
            .fetch_add(step.from_pages - step.to_pages, Ordering::Relaxed);
        *lock(&record.last_reason) = Some(step.reason);
        if step.new_episode {
            tracing::warn!(
                "balloon0: guest memory pressure ({}): the VMM deflates the balloon from {} to {} MiB, and further while it lasts (not logged)",
                step.reason.describe(),
                step.from_pages / PAGES_PER_MIB,
                step.to_pages / PAGES_PER_MIB,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    const MIB: u64 = 1 << 20;
    const SECOND: Duration = Duration::from_secs(1);
    /// A 1 GiB guest: the floor is max(51.2 MiB, 32 MiB).
    const RAM_PAGES: u64 = 1024 * PAGES_PER_MIB;

    fn stats(
        major_faults: Option<u64>,
        swap_in: Option<u64>,
        available: Option<u64>,
    ) -> BalloonStats {
        let mut s = BalloonStats::empty(SystemTime::UNIX_EPOCH);
        s.major_faults = major_faults;
        s.swap_in = swap_in;
        s.available_memory = available;
        s
    }

    fn calm() -> BalloonStats {
        stats(Some(1000), Some(0), Some(600 * MIB))
    }

    fn balloon(target_mib: u64) -> BalloonNow {
        BalloonNow {
            target_pages: target_mib * PAGES_PER_MIB,
            actual_pages: target_mib * PAGES_PER_MIB,
            ram_pages: RAM_PAGES,
        }
    }

    fn guard() -> (PressureGuard, Instant) {
        (
            PressureGuard::new(SECOND, Limits::default()),
            Instant::now(),
        )
    }

    fn mib(pages: u64) -> u64 {
        pages / PAGES_PER_MIB
    }

    #[test]
    fn the_floor_is_five_percent_at_least_32_mib_at_most_a_quarter() {
        let l = Limits::default();
        assert_eq!(l.floor_bytes(1024 * MIB), 1024 * MIB / 20);
        assert_eq!(l.floor_bytes(256 * MIB), 32 * MIB);
        assert_eq!(l.floor_bytes(64 * MIB), 16 * MIB);
        assert_eq!(l.floor_bytes(0), 0);
        assert!(l.floor_bytes(u64::MAX) > 0, "no overflow");
    }

    #[test]
    fn no_pressure_means_no_step() {
        let (mut g, t0) = guard();
        for i in 0..10u32 {
            let s = stats(Some(1000 + u64::from(i) * 10), Some(4096), Some(600 * MIB));
            assert_eq!(g.observe(&s, t0 + SECOND * i, balloon(512)), None);
        }
    }

    #[test]
    fn low_available_steps_by_the_deficit_or_a_quarter() {
        let (mut g, t0) = guard();
        // 1 MiB available, floor 51.2 MiB: the deficit (50.2 MiB) is more
        // than a quarter of 128 MiB, so it decides; down to whole MiB.
        let low = stats(None, None, Some(MIB));
        let step = g.observe(&low, t0, balloon(128)).unwrap();
        assert_eq!(step.reason, PressureReason::LowAvailable);
        assert!(step.new_episode);
        assert_eq!((mib(step.from_pages), mib(step.to_pages)), (128, 77));
        // Just under the floor: the quarter decides.
        let (mut g, t0) = guard();
        let near = stats(None, None, Some(50 * MIB));
        let step = g.observe(&near, t0, balloon(400)).unwrap();
        assert_eq!(mib(step.to_pages), 300);
    }

    #[test]
    fn major_faults_and_swap_in_are_rates_over_at_least_half_an_interval() {
        let (mut g, t0) = guard();
        assert_eq!(
            g.observe(&stats(Some(0), None, None), t0, balloon(400)),
            None
        );
        // 100 faults in 0.3 s is fast, but 0.3 s is too short to judge.
        let burst = stats(Some(100), None, None);
        assert_eq!(g.observe(&burst, t0 + SECOND * 3 / 10, balloon(400)), None);
        // From the same baseline, 1 s later: 300/s.
        let step = g.observe(&stats(Some(300), None, None), t0 + SECOND, balloon(400));
        assert_eq!(
            step.map(|s| (s.reason, mib(s.to_pages))),
            Some((PressureReason::MajorFaults, 300))
        );
        // 50 faults/s is calm; swap-in of 1 MiB/s is pressure.
        let (mut g, t0) = guard();
        g.observe(&stats(Some(0), Some(0), None), t0, balloon(400));
        let quiet = stats(Some(50), Some(0), None);
        assert_eq!(g.observe(&quiet, t0 + SECOND, balloon(400)), None);
        let swapping = stats(Some(100), Some(MIB), None);
        let step = g.observe(&swapping, t0 + SECOND * 2, balloon(400)).unwrap();
        assert_eq!(step.reason, PressureReason::SwapIn);
        // One refused hugetlb allocation is pressure; none is not.
        let (mut g, t0) = guard();
        let refused = |n: u64| {
            let mut s = calm();
            s.hugetlb_failures = Some(n);
            s
        };
        assert_eq!(g.observe(&refused(3), t0, balloon(400)), None);
        assert_eq!(g.observe(&refused(3), t0 + SECOND, balloon(400)), None);
        let step = g
            .observe(&refused(4), t0 + SECOND * 2, balloon(400))
            .unwrap();
        assert_eq!(step.reason, PressureReason::RefusedAllocations);
    }

    #[test]
    fn repeated_pressure_steps_once_per_interval_down_to_zero() {
        let (mut g, t0) = guard();
        let low = stats(None, None, Some(40 * MIB));
        let mut target = balloon(64);
        let mut targets = Vec::new();
        let mut episodes = 0;
        // Samples every quarter interval: only one in four may step.
        for i in 0..40u32 {
            if let Some(step) = g.observe(&low, t0 + SECOND * i / 4, target) {
                assert!(step.to_pages < step.from_pages, "never inflates");
                assert_eq!(step.from_pages, target.target_pages);
                episodes += usize::from(step.new_episode);
                target = balloon(mib(step.to_pages));
                targets.push((i, mib(step.to_pages)));
            }
        }
        // A quarter (16, then 12 MiB) while that is more than the deficit
        // (11.2 MiB), then the deficit; whole MiB.
        assert_eq!(targets, vec![(0, 48), (4, 36), (8, 24), (12, 12), (16, 0)]);
        assert_eq!(episodes, 1, "one episode, logged once");
        assert_eq!(target.target_pages, 0);
    }

    #[test]
    fn a_step_starts_from_what_the_balloon_holds() {
        let (mut g, t0) = guard();
        // The driver has inflated 100 of the 400 MiB asked for.
        let now = BalloonNow {
            actual_pages: 100 * PAGES_PER_MIB,
            ..balloon(400)
        };
        let step = g
            .observe(&stats(None, None, Some(50 * MIB)), t0, now)
            .unwrap();
        assert_eq!((mib(step.from_pages), mib(step.to_pages)), (400, 75));
        // Asked for some, none inflated yet, and short of memory: all of it.
        let (mut g, t0) = guard();
        let none = BalloonNow {
            actual_pages: 0,
            ..balloon(400)
        };
        let step = g.observe(&stats(None, None, Some(MIB)), t0, none).unwrap();
        assert_eq!(step.to_pages, 0);
    }

    #[test]
    fn an_empty_balloon_or_missing_stats_do_nothing() {
        let (mut g, t0) = guard();
        let low = stats(None, None, Some(MIB));
        assert_eq!(g.observe(&low, t0, balloon(0)), None);
        let nothing = stats(None, None, None);
        for i in 0..5u32 {
            assert_eq!(g.observe(&nothing, t0 + SECOND * i, balloon(512)), None);
        }
        // Guest RAM not known yet: no floor to check.
        let unknown = BalloonNow {
            ram_pages: 0,
            ..balloon(512)
        };
        assert_eq!(g.observe(&low, t0 + SECOND * 6, unknown), None);
    }

    #[test]
    fn counter_resets_and_garbage_are_no_evidence() {
        let (mut g, t0) = guard();
        let at = |i: u32| t0 + SECOND * i;
        assert_eq!(
            g.observe(
                &stats(Some(1_000_000), Some(8 * MIB), None),
                at(0),
                balloon(512)
            ),
            None
        );
        // Backwards (a guest reboot, or a lie): a new baseline, no step.
        assert_eq!(
            g.observe(&stats(Some(10), Some(0), None), at(1), balloon(512)),
            None
        );
        // Calm after the reset: still nothing.
        assert_eq!(
            g.observe(&stats(Some(20), Some(0), None), at(2), balloon(512)),
            None
        );
        // Jumps no guest can do: not believed.
        let huge = stats(Some(u64::MAX), Some(u64::MAX), None);
        assert_eq!(g.observe(&huge, at(3), balloon(512)), None);
        assert_eq!(
            g.observe(&stats(Some(0), Some(0), None), at(4), balloon(512)),
            None
        );
        // Available above guest RAM is not believed either; u64::MAX
        // everywhere neither panics nor acts.
        let over = stats(None, None, Some(2048 * MIB));
        assert_eq!(g.observe(&over, at(5), balloon(512)), None);
        let mut max = stats(Some(u64::MAX), Some(u64::MAX), Some(u64::MAX));
        max.hugetlb_failures = Some(u64::MAX);
        let mut all_max = balloon(512);
        all_max.ram_pages = u64::MAX;
        all_max.target_pages = u64::MAX;
        all_max.actual_pages = u64::MAX;
        for i in 6..10 {
            let step = g.observe(&max, at(i), all_max);
            assert!(step.is_none_or(|s| s.to_pages < s.from_pages));
        }
        // Time going backwards (it cannot with Instant, but no panic).
        let _ = g.observe(&stats(None, None, Some(MIB)), t0, balloon(512));
    }

    #[test]
    fn pressure_ending_ends_the_episode() {
        let (mut g, t0) = guard();
        let low = stats(None, None, Some(MIB));
        assert!(g.observe(&low, t0, balloon(512)).unwrap().new_episode);
        assert!(
            !g.observe(&low, t0 + SECOND, balloon(300))
                .unwrap()
                .new_episode
        );
        assert_eq!(g.observe(&calm(), t0 + SECOND * 2, balloon(200)), None);
        assert!(
            g.observe(&low, t0 + SECOND * 3, balloon(200))
                .unwrap()
                .new_episode
        );
    }

    #[test]
    fn forgetting_needs_fresh_rates_after_a_target_change() {
        let (mut g, t0) = guard();
        g.observe(&stats(Some(0), None, None), t0, balloon(400));
        g.forget();
        // Compared with the forgotten baseline this would be 1000/s.
        assert_eq!(
            g.observe(&stats(Some(1000), None, None), t0 + SECOND, balloon(400)),
            None
        );
        // Measured from the new baseline it is pressure again.
        let step = g.observe(
            &stats(Some(2000), None, None),
            t0 + SECOND * 2,
            balloon(400),
        );
        assert_eq!(step.map(|s| s.reason), Some(PressureReason::MajorFaults));
    }
}
