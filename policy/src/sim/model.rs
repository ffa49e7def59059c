//! The physical model behind the simulator, as plain constants and formulas.
//! Each number is a modelling choice documented in policy/README.md; none is
//! a measurement of real hardware.

/// Guest page cache fills this share of the memory its working set leaves free.
pub const CACHE_FILL: f64 = 0.6;
/// Guest swap space as a share of its memory; a deficit beyond it is an OOM kill.
pub const GUEST_SWAP_SHARE: f64 = 0.10;
/// Share of swapped-out working set touched (and so swapped back in) per minute.
pub const SWAPPED_TOUCH_PER_MIN: f64 = 0.5;
/// How fast a balloon inflates or deflates, MiB per second.
pub const BALLOON_MIB_PER_S: f64 = 1024.0;
/// What one call of the guest's OOM notifier takes back from the balloon with
/// VIRTIO_BALLOON_F_DEFLATE_ON_OOM: Linux's virtio_balloon leaks
/// VIRTIO_BALLOON_OOM_NR_PAGES = 256 balloon pages of 4 KiB per call
/// (`virtio_balloon_oom_notify`; older kernels: module parameter `oom_pages`,
/// default 256), i.e. 1 MiB. This is a fact of the driver, not a choice.
pub const OOM_DEFLATE_MIB: f64 = OOM_NR_PAGES * PAGE_KIB / 1024.0;
/// `VIRTIO_BALLOON_OOM_NR_PAGES`: balloon pages leaked per OOM-notifier call.
pub const OOM_NR_PAGES: f64 = 256.0;
/// The balloon's page size (VIRTIO_BALLOON_PFN_SHIFT = 12), KiB.
pub const PAGE_KIB: f64 = 4.0;
/// A hot page cache squeezed below what the guest keeps hot is read back
/// (refaulted) at this share of the missing part per minute.
pub const REFAULT_TOUCH_PER_MIN: f64 = 0.5;

/// Wakeups per second per vCPU's worth of demand (interactive threads sleep often).
pub const WAKEUPS_PER_DEMAND: f64 = 200.0;
/// Average wait behind a running task when a wakeup finds its CPU busy, in ms.
pub const HALF_SLICE_MS: f64 = 0.75;
/// The wakeup path looks for an idle CPU within one last-level-cache domain of this many CPUs.
pub const IDLE_SEARCH_CPUS: i32 = 8;
/// Throughput lost at full load by other tenants in the same cache group.
pub const CACHE_INTERFERENCE: f64 = 0.25;
/// Throughput lost when all of a VM's memory accesses are remote.
pub const REMOTE_NUMA_PENALTY: f64 = 0.2;

/// Device service time (virtual disk on a fast NVMe), µs.
pub const IO_SERVICE_US: f64 = 60.0;
/// Worker CPU cost per request, µs.
pub const IO_CPU_US: f64 = 8.0;
/// Cost of waking a sleeping worker (eventfd, scheduler), µs.
pub const IO_WAKEUP_US: f64 = 12.0;
/// Wait for the worker's CPU when it is busy with something else, µs.
pub const IO_SCHED_DELAY_US: f64 = 40.0;
/// Extra latency when the worker and the vCPU do not share a cache group, µs.
pub const IO_CROSS_CACHE_US: f64 = 10.0;
/// Extra latency when they are on different NUMA nodes, µs.
pub const IO_CROSS_NUMA_US: f64 = 25.0;

/// Probability that a wakeup finds no idle CPU in a set whose CPUs have
/// average load `load` (each already counting only other tasks).
pub fn p_no_idle_cpu(load: f64, set_size: usize) -> f64 {
    let k = (set_size as i32).clamp(1, IDLE_SEARCH_CPUS);
    load.clamp(0.0, 1.0).powi(k)
}

/// Mean I/O latency of one request in µs, excluding the fixed service time.
pub struct IoInputs {
    pub iops: f64,
    pub poll: bool,
    /// Load of other work on the worker's CPUs (average over its set).
    pub other_load: f64,
    pub set_size: usize,
    pub same_group_prob: f64,
    pub same_node_prob: f64,
}

pub fn io_excess_latency_us(x: &IoInputs) -> f64 {
    let other = x.other_load.clamp(0.0, 1.0);
    let dispatch = if x.poll {
        // A poller shares its CPU by time slices with whatever else runs there.
        other * IO_SCHED_DELAY_US
    } else {
        IO_WAKEUP_US + p_no_idle_cpu(other, x.set_size) * IO_SCHED_DELAY_US
    };
    let capacity = (1.0 - other).max(0.1);
    let util = (x.iops * IO_CPU_US * 1e-6 / capacity).min(0.95);
    let queue = IO_CPU_US * util / (1.0 - util);
    let locality =
        (1.0 - x.same_group_prob) * IO_CROSS_CACHE_US + (1.0 - x.same_node_prob) * IO_CROSS_NUMA_US;
    dispatch + queue + locality
}

/// The guest's memory after its OOM notifier has run as often as the
/// allocation path needs: each call takes [`OOM_DEFLATE_MIB`] back from the
/// balloon (never more than is in it). Returns (memory the guest has now,
/// notifier calls, OOM kill). The kernel calls the notifier only once reclaim,
/// swap included, has failed, so only the deficit beyond the guest's swap
/// counts; the OOM killer runs only when the notifier freed nothing, i.e. the
/// balloon is empty, or always when the feature is off.
pub fn deflate_on_oom(
    actual_mib: f64,
    mem_mib: f64,
    ws_mib: f64,
    swap_mib: f64,
    enabled: bool,
) -> (f64, u64, bool) {
    let short = ws_mib - actual_mib - swap_mib;
    if short <= 0.0 {
        return (actual_mib, 0, false);
    }
    if !enabled {
        return (actual_mib, 0, true);
    }
    let in_balloon = (mem_mib - actual_mib).max(0.0);
    let calls_needed = (short / OOM_DEFLATE_MIB).ceil();
    let calls_possible = (in_balloon / OOM_DEFLATE_MIB).ceil();
    let calls = calls_needed.min(calls_possible);
    let given = (calls * OOM_DEFLATE_MIB).min(in_balloon);
    // One more allocation failure with an empty balloon reaches the OOM killer.
    let killed = calls_needed > calls_possible;
    (actual_mib + given, calls as u64, killed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deflate_on_oom_gives_back_1_mib_per_call_before_any_kill() {
        assert_eq!(OOM_DEFLATE_MIB, 1.0, "256 pages of 4 KiB");
        // 4096 MiB guest, balloon holds 2048 MiB, working set 2300 + 100 MiB swap:
        // 152 MiB short -> 152 notifier calls, no kill.
        assert_eq!(
            deflate_on_oom(2048.0, 4096.0, 2300.0, 100.0, true),
            (2200.0, 152, false)
        );
        // Within swap: the notifier is never called.
        assert_eq!(
            deflate_on_oom(2048.0, 4096.0, 2100.0, 100.0, true),
            (2048.0, 0, false)
        );
        // Short more than the balloon holds: it empties, then the OOM killer runs.
        assert_eq!(
            deflate_on_oom(3996.0, 4096.0, 4500.0, 100.0, true),
            (4096.0, 100, true)
        );
        // A fraction of a call's worth left in the balloon still comes back.
        assert_eq!(
            deflate_on_oom(4095.5, 4096.0, 4300.0, 100.0, true),
            (4096.0, 1, true)
        );
        // Feature off: the OOM killer, balloon untouched.
        assert_eq!(
            deflate_on_oom(2048.0, 4096.0, 2300.0, 100.0, false),
            (2048.0, 0, true)
        );
        // Empty balloon: nothing to give.
        assert_eq!(
            deflate_on_oom(4096.0, 4096.0, 4300.0, 100.0, true),
            (4096.0, 0, true)
        );
    }

    #[test]
    fn io_latency_moves_the_right_way() {
        let base = IoInputs {
            iops: 2000.0,
            poll: false,
            other_load: 0.3,
            set_size: 8,
            same_group_prob: 1.0,
            same_node_prob: 1.0,
        };
        let l0 = io_excess_latency_us(&base);
        assert!(
            io_excess_latency_us(&IoInputs {
                same_group_prob: 0.0,
                ..base
            }) > l0
        );
        assert!(
            io_excess_latency_us(&IoInputs {
                same_node_prob: 0.0,
                ..base
            }) > l0
        );
        assert!(
            io_excess_latency_us(&IoInputs {
                other_load: 0.9,
                ..base
            }) > l0
        );
        assert!(
            io_excess_latency_us(&IoInputs {
                poll: true,
                other_load: 0.0,
                ..base
            }) < l0
        );
    }
}
