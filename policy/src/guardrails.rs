//! Guardrails between a model's proposal and the host. Each is a small pure
//! function (or, for rollback, a small state machine) so each can be made to
//! fire in a test. The engine applies them in order and records which fired.

use crate::decision::{DevicePlacement, VcpuPlacement};
use crate::util::CpuSet;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuardConfig {
    /// Largest balloon inflation (memory taken) per decision, share of the VM's memory.
    pub balloon_max_inflate: f64,
    /// Largest deflation (memory given back) per decision.
    pub balloon_max_deflate: f64,
    /// Changes smaller than this share of the VM's memory are not made (hysteresis).
    pub balloon_dead_band: f64,
    /// Least time between two inflations of one balloon, s. Deflations are never delayed.
    pub balloon_min_interval_s: f64,
    /// On swap-ins or an OOM kill, give back at least this share of memory at once.
    pub balloon_escape: f64,
    /// After a pressure escape, no inflation of that balloon for this long, s.
    pub balloon_escape_hold_s: f64,
    /// The balloon never leaves the guest less than what its own statistics
    /// say it needs (memory in force minus MemAvailable: working set plus
    /// caches it cannot drop) times (1 + this)...
    pub balloon_need_margin: f64,
    /// ...plus this, MiB.
    pub balloon_need_slack_mib: f64,
    /// Major faults per second above which a guest counts as short of memory
    /// (refaults of squeezed cache, swap-ins), when the host itself is not
    /// under memory pressure (host swapping shows up as guest faults too).
    pub balloon_fault_rate_per_s: f64,
    /// Host memory PSI (some, avg10, %) under which guest faults are the guest's own.
    pub balloon_host_quiet_psi: f64,
    /// After an OOM-grade event (an OOM kill, or the guest deflating its
    /// balloon on OOM) the balloon is fully deflated and not inflated for this long, s.
    pub balloon_oom_hold_s: f64,
    /// Least time between two CPU plans, s.
    pub cpu_min_interval_s: f64,
    /// Most VMs moved between NUMA nodes per plan.
    pub cpu_max_moves: usize,
    /// A node must be this far over its capacity before a VM leaves it (hysteresis).
    pub cpu_hysteresis: f64,
    /// Least time between two placements of one device's worker, s.
    pub device_min_interval_s: f64,
    /// Hard bound on CPUs burned by polling: one polling thread per this many host CPUs.
    pub cpus_per_poller: usize,
    /// A device's worker only moves for a predicted gain of at least this, µs.
    pub device_min_gain_us: f64,
    /// A feature further than this share of its training range outside it is out of distribution.
    pub ood_slack: f32,
    /// Inference slower than this falls back to the heuristic for that decision, µs.
    pub time_budget_us: f64,
    /// Before this much time has passed the heuristic decides (rollback baselines are measured), s.
    pub warmup_s: f64,
    /// Window over which guarded metrics are compared with their baseline, s.
    pub rollback_window_s: f64,
    /// A lever rolled back stays on the heuristic this long, s.
    pub rollback_cooldown_s: f64,
    /// Rollback when swap-ins exceed this % of the working set per minute...
    pub rollback_swap_pct_per_min: f64,
    /// ...or LC run-queue wait exceeds baseline x (1 + this) + 1 ms/s...
    pub rollback_wait_rel: f64,
    /// ...or I/O latency exceeds baseline x (1 + this).
    pub rollback_io_rel: f64,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            balloon_max_inflate: 0.05,
            balloon_max_deflate: 0.5,
            balloon_dead_band: 0.01,
            balloon_min_interval_s: 30.0,
            balloon_escape: 0.15,
            balloon_escape_hold_s: 1800.0,
            balloon_need_margin: 0.10,
            balloon_need_slack_mib: 64.0,
            balloon_fault_rate_per_s: 256.0,
            balloon_host_quiet_psi: 1.0,
            balloon_oom_hold_s: 7200.0,
            cpu_min_interval_s: 60.0,
            cpu_max_moves: 4,
            cpu_hysteresis: 0.1,
            device_min_interval_s: 60.0,
            device_min_gain_us: 3.0,
            cpus_per_poller: 64,
            ood_slack: 0.25,
            time_budget_us: 2000.0,
            warmup_s: 600.0,
            rollback_window_s: 600.0,
            rollback_cooldown_s: 3600.0,
            rollback_swap_pct_per_min: 1.0,
            rollback_wait_rel: 0.5,
            rollback_io_rel: 0.3,
        }
    }
}

/// Names of guardrails, as they appear in the audit log and the interventions count.
pub mod names {
    pub const HARD_BOUND: &str = "hard-bound";
    pub const EXCLUSIVE: &str = "exclusive-cpu";
    pub const MAX_STEP: &str = "max-step";
    pub const HYSTERESIS: &str = "hysteresis";
    pub const MIN_INTERVAL: &str = "min-interval";
    pub const INPUT_INVALID: &str = "input-invalid";
    pub const OOD: &str = "out-of-distribution";
    pub const TIME_BUDGET: &str = "time-budget";
    pub const ROLLBACK: &str = "rollback";
    pub const ESCAPE: &str = "pressure-escape";
    pub const GUEST_NEED: &str = "guest-need";
    pub const MODEL_ERROR: &str = "model-error";
}

/// Rejects rows with NaN or infinite values.
pub fn validate_inputs(row: &[f32]) -> Result<(), String> {
    match row.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(format!("feature {i} is {}", row[i])),
        None => Ok(()),
    }
}

/// Memory never below the guest's floor nor above its size.
pub fn balloon_bounds(target: f64, floor: f64, mem: f64) -> (f64, bool) {
    let t = target.clamp(floor.min(mem), mem);
    (t, t != target)
}

/// The least memory a guest may be left with: what it needs by its own
/// statistics plus a margin. Returns (bounded target, whether it bound).
pub fn balloon_need_bound(target: f64, need: f64, margin: f64, slack: f64) -> (f64, bool) {
    let least = need * (1.0 + margin) + slack;
    if target < least {
        (least, true)
    } else {
        (target, false)
    }
}

/// How much memory a pressure escape gives back, as a share of the VM's
/// memory: the base share, doubled for each further interval in a row under
/// pressure, so a guest still short after one escape has most of its memory
/// back within two control intervals.
pub fn escape_share(base: f64, rounds_in_a_row: u32) -> f64 {
    (base * 2f64.powi(rounds_in_a_row.saturating_sub(1).min(8) as i32)).min(1.0)
}

/// Limits one decision's change: inflation (taking memory) by `max_inflate`,
/// deflation by `max_deflate`, both as shares of the VM's memory.
pub fn balloon_step(
    cur: f64,
    target: f64,
    mem: f64,
    max_inflate: f64,
    max_deflate: f64,
) -> (f64, bool) {
    let t = target.clamp(cur - max_inflate * mem, cur + max_deflate * mem);
    (t, t != target)
}

/// True when the change is too small to be worth making.
pub fn within_dead_band(cur: f64, target: f64, mem: f64, band: f64) -> bool {
    (target - cur).abs() < band * mem
}

/// True when an inflation comes too soon after the last change.
pub fn too_soon(last_change_s: Option<f64>, now_s: f64, min_interval_s: f64) -> bool {
    last_change_s.is_some_and(|t| now_s - t < min_interval_s)
}

/// Checks the hard CPU bounds of a whole plan: no CPU is exclusive to two
/// VMs, and no other VM's vCPU or any I/O worker may use an exclusive CPU.
pub fn check_exclusive(
    plan: &[Vec<VcpuPlacement>],
    devices: &[Option<&DevicePlacement>],
) -> Result<(), String> {
    let mut owner: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for (v, vcpus) in plan.iter().enumerate() {
        for p in vcpus.iter().filter(|p| p.exclusive) {
            for &c in p.cpus.cpus() {
                if let Some(&o) = owner.get(&c) {
                    if o != v {
                        return Err(format!("CPU {c} is exclusive to VMs {o} and {v}"));
                    }
                }
                owner.insert(c, v);
            }
        }
    }
    let exclusive = CpuSet::new(owner.keys().copied().collect());
    // Exclusive means exclusive: not even the owner's other vCPUs float there.
    for (v, vcpus) in plan.iter().enumerate() {
        for p in vcpus.iter().filter(|p| !p.exclusive) {
            if let Some(&c) = p.cpus.cpus().iter().find(|&&c| owner.contains_key(&c)) {
                return Err(format!(
                    "VM {v} shares CPU {c}, which is exclusive to VM {}",
                    owner[&c]
                ));
            }
        }
    }
    for (v, d) in devices.iter().enumerate() {
        if let Some(d) = d {
            if d.cpus.intersects(&exclusive) {
                return Err(format!("I/O worker of VM {v} runs on exclusive CPUs"));
            }
        }
    }
    Ok(())
}

/// Watches a guarded metric (higher is worse). The baseline is its mean while
/// the heuristic was in charge; once a model decides, the mean over the last
/// window is compared with `baseline * (1 + rel) + abs` (or `limit` if set).
#[derive(Debug, Clone)]
pub struct RollbackMonitor {
    pub rel: f64,
    pub abs: f64,
    pub limit: Option<f64>,
    window_s: f64,
    baseline_sum: f64,
    baseline_n: u64,
    recent: VecDeque<(f64, f64)>,
}

impl RollbackMonitor {
    pub fn new(window_s: f64, rel: f64, abs: f64, limit: Option<f64>) -> Self {
        RollbackMonitor {
            rel,
            abs,
            limit,
            window_s,
            baseline_sum: 0.0,
            baseline_n: 0,
            recent: VecDeque::new(),
        }
    }

    /// Adds a sample taken while the heuristic was deciding.
    pub fn baseline_sample(&mut self, v: f64) {
        self.baseline_sum += v;
        self.baseline_n += 1;
    }

    /// Adds a sample taken after a model's decisions; returns the reason when
    /// the metric has worsened beyond the threshold.
    pub fn model_sample(&mut self, t_s: f64, v: f64) -> Option<String> {
        self.recent.push_back((t_s, v));
        while self
            .recent
            .front()
            .is_some_and(|&(t, _)| t_s - t > self.window_s)
        {
            self.recent.pop_front();
        }
        // Judge only a full window: one bad sample is noise.
        let span = self.recent.back()?.0 - self.recent.front()?.0;
        if span < self.window_s * 0.9 {
            return None;
        }
        let mean = self.recent.iter().map(|x| x.1).sum::<f64>() / self.recent.len() as f64;
        let base = if self.baseline_n > 0 {
            self.baseline_sum / self.baseline_n as f64
        } else {
            0.0
        };
        let threshold = self.limit.unwrap_or(base * (1.0 + self.rel) + self.abs);
        (mean > threshold).then(|| {
            format!(
                "mean {mean:.3} over the last {:.0} s exceeds {threshold:.3} (baseline {base:.3})",
                self.window_s
            )
        })
    }

    pub fn reset_window(&mut self) {
        self.recent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(cpus: &[u32], exclusive: bool) -> VcpuPlacement {
        VcpuPlacement {
            cpus: CpuSet::new(cpus.to_vec()),
            weight: 1.0,
            exclusive,
        }
    }

    #[test]
    fn hard_bound_keeps_memory_above_the_floor() {
        assert_eq!(balloon_bounds(100.0, 512.0, 4096.0), (512.0, true));
        assert_eq!(balloon_bounds(9000.0, 512.0, 4096.0), (4096.0, true));
        assert_eq!(balloon_bounds(2000.0, 512.0, 4096.0), (2000.0, false));
    }

    #[test]
    fn need_bound_and_escalating_escape_fire() {
        // Needs 2000 MiB: never below 2000 * 1.1 + 64.
        assert_eq!(
            balloon_need_bound(1500.0, 2000.0, 0.1, 64.0),
            (2264.0, true)
        );
        assert_eq!(
            balloon_need_bound(3000.0, 2000.0, 0.1, 64.0),
            (3000.0, false)
        );
        assert_eq!(escape_share(0.15, 1), 0.15);
        assert_eq!(escape_share(0.15, 2), 0.30);
        assert_eq!(escape_share(0.15, 3), 0.60);
        assert_eq!(escape_share(0.15, 9), 1.0);
    }

    #[test]
    fn max_step_limits_inflation_more_than_deflation() {
        assert_eq!(
            balloon_step(4096.0, 1000.0, 4096.0, 0.05, 0.5),
            (4096.0 - 204.8, true)
        );
        assert_eq!(
            balloon_step(1000.0, 4096.0, 4096.0, 0.05, 0.5),
            (3048.0, true)
        );
        assert_eq!(
            balloon_step(2000.0, 1950.0, 4096.0, 0.05, 0.5),
            (1950.0, false)
        );
    }

    #[test]
    fn hysteresis_and_min_interval_fire() {
        assert!(within_dead_band(2000.0, 2030.0, 4096.0, 0.01));
        assert!(!within_dead_band(2000.0, 2100.0, 4096.0, 0.01));
        assert!(too_soon(Some(100.0), 110.0, 30.0));
        assert!(!too_soon(Some(100.0), 140.0, 30.0));
        assert!(!too_soon(None, 0.0, 30.0));
    }

    #[test]
    fn input_validation_rejects_nan() {
        assert!(validate_inputs(&[0.1, f32::NAN]).is_err());
        assert!(validate_inputs(&[0.1, f32::INFINITY]).is_err());
        assert!(validate_inputs(&[0.1, 2.0]).is_ok());
    }

    #[test]
    fn two_vms_never_share_an_exclusive_cpu() {
        let ok = vec![
            vec![p(&[0], true)],
            vec![p(&[1], true)],
            vec![p(&[2, 3], false)],
        ];
        assert!(check_exclusive(&ok, &[]).is_ok());
        let clash = vec![vec![p(&[0], true)], vec![p(&[0], true)]];
        assert!(check_exclusive(&clash, &[])
            .unwrap_err()
            .contains("exclusive to VMs 0 and 1"));
        let intrude = vec![vec![p(&[0], true)], vec![p(&[0, 1], false)]];
        assert!(check_exclusive(&intrude, &[]).is_err());
        let worker = DevicePlacement {
            cpus: CpuSet::single(0),
            mode: crate::decision::IoMode::Poll,
        };
        assert!(check_exclusive(&ok, &[None, Some(&worker)])
            .unwrap_err()
            .contains("I/O worker"));
    }

    #[test]
    fn rollback_fires_when_the_metric_worsens_over_a_full_window() {
        let mut m = RollbackMonitor::new(60.0, 0.5, 1.0, None);
        for _ in 0..10 {
            m.baseline_sample(2.0);
        }
        // threshold = 2 * 1.5 + 1 = 4
        for t in 0..7 {
            assert!(
                m.model_sample(t as f64 * 10.0, 3.0).is_none(),
                "within threshold"
            );
        }
        m.reset_window();
        assert!(
            m.model_sample(100.0, 9.0).is_none(),
            "one sample is not a window"
        );
        let mut fired = None;
        for t in 1..8 {
            fired = fired.or(m.model_sample(100.0 + t as f64 * 10.0, 9.0));
        }
        assert!(fired.unwrap().contains("exceeds 4.000"));
        let mut hard = RollbackMonitor::new(20.0, 0.0, 0.0, Some(0.2));
        hard.model_sample(0.0, 0.5);
        assert!(hard.model_sample(20.0, 0.5).is_some(), "absolute limit");
    }
}
