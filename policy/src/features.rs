//! Turns cumulative telemetry into per-interval observations and the feature
//! vectors the models take. The training pipeline gets its features from the
//! same code (`kiln-policy dataset`), so training and inference cannot drift.

use crate::telemetry::{Snapshot, VmTelemetry};
use crate::trace::VmClass;
use std::collections::VecDeque;

/// What one control interval showed for one VM.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Obs {
    pub t_s: f64,
    /// Estimated working set: memory in force minus what the guest calls available.
    pub ws_mib: f64,
    pub actual_mib: f64,
    pub free_mib: f64,
    /// CPU used, in vCPUs' worth.
    pub cpu: f64,
    /// Run-queue wait per vCPU, ms per second.
    pub wait_ms: f64,
    pub swap_in_mib_per_min: f64,
    /// Major page faults per second (swap-ins and refaults of dropped cache).
    pub major_faults_per_s: f64,
    pub oom_kills: u64,
    pub iops: f64,
    pub io_latency_us: f64,
}

/// One hour of observations at 10 s; longer windows are not used by any model.
const KEEP: usize = 360;

#[derive(Debug, Clone, Default)]
pub struct VmHistory {
    prev: Option<VmTelemetry>,
    prev_t: f64,
    pub obs: VecDeque<Obs>,
    pub class: Option<VmClass>,
    pub vcpus: usize,
    pub mem_mib: f64,
}

impl VmHistory {
    pub fn last(&self) -> Option<&Obs> {
        self.obs.back()
    }

    /// The newest `n` observations, oldest first.
    pub fn window(&self, n: usize) -> impl Iterator<Item = &Obs> + Clone {
        self.obs.iter().skip(self.obs.len().saturating_sub(n))
    }
}

/// Per-VM histories, indexed like the snapshots' VMs (matched by id).
#[derive(Debug, Clone, Default)]
pub struct History {
    pub vms: Vec<VmHistory>,
    ids: Vec<String>,
    pub step_s: f64,
}

impl History {
    pub fn new() -> Self {
        History {
            step_s: 10.0,
            ..Default::default()
        }
    }

    /// Number of observations covering `seconds`.
    pub fn steps(&self, seconds: f64) -> usize {
        ((seconds / self.step_s.max(1e-3)).round() as usize).max(1)
    }

    pub fn ingest(&mut self, snap: &Snapshot) {
        if self.ids.len() != snap.vms.len()
            || self.ids.iter().zip(&snap.vms).any(|(a, b)| a != &b.id)
        {
            // VM set changed: keep histories of VMs that are still there.
            let mut vms = Vec::with_capacity(snap.vms.len());
            for vm in &snap.vms {
                let old = self
                    .ids
                    .iter()
                    .position(|i| i == &vm.id)
                    .map(|k| self.vms[k].clone());
                vms.push(old.unwrap_or_default());
            }
            self.vms = vms;
            self.ids = snap.vms.iter().map(|v| v.id.clone()).collect();
        }
        for (h, vm) in self.vms.iter_mut().zip(&snap.vms) {
            h.class = Some(vm.class);
            h.vcpus = vm.vcpus.len();
            h.mem_mib = vm.mem_mib;
            if let Some(prev) = &h.prev {
                let dt = snap.t_s - h.prev_t;
                if dt > 0.0 {
                    self.step_s = dt;
                    h.obs.push_back(observe(prev, vm, dt, snap.t_s));
                    if h.obs.len() > KEEP {
                        h.obs.pop_front();
                    }
                }
            }
            h.prev = Some(vm.clone());
            h.prev_t = snap.t_s;
        }
    }
}

fn observe(prev: &VmTelemetry, now: &VmTelemetry, dt: f64, t_s: f64) -> Obs {
    let sum = |f: fn(&crate::telemetry::VcpuStat) -> u64, v: &VmTelemetry| {
        v.vcpus.iter().map(f).sum::<u64>()
    };
    let cpu_ns = sum(|s| s.cpu_time_ns, now).saturating_sub(sum(|s| s.cpu_time_ns, prev));
    let wait_ns = sum(|s| s.wait_ns, now).saturating_sub(sum(|s| s.wait_ns, prev));
    let n = now.vcpus.len().max(1) as f64;
    let reqs: u64 = now
        .devices
        .iter()
        .map(|d| d.requests)
        .sum::<u64>()
        .saturating_sub(prev.devices.iter().map(|d| d.requests).sum::<u64>());
    let lat: f64 = now.devices.iter().map(|d| d.latency_sum_us).sum::<f64>()
        - prev.devices.iter().map(|d| d.latency_sum_us).sum::<f64>();
    let b = &now.balloon;
    // Guest-reported numbers are hostile input: a non-finite value stays NaN
    // so the engine's input validation sees it (f64::max would hide it).
    let ws = b.actual_mib - b.available_mib;
    Obs {
        t_s,
        ws_mib: if ws.is_finite() {
            ws.max(0.0)
        } else {
            f64::NAN
        },
        actual_mib: b.actual_mib,
        free_mib: b.free_mib,
        cpu: cpu_ns as f64 / 1e9 / dt,
        wait_ms: wait_ns as f64 / 1e6 / dt / n,
        swap_in_mib_per_min: (b.swap_in_mib - prev.balloon.swap_in_mib).max(0.0) / dt * 60.0,
        major_faults_per_s: b.major_faults.saturating_sub(prev.balloon.major_faults) as f64 / dt,
        oom_kills: b.oom_kills.saturating_sub(prev.balloon.oom_kills),
        iops: reqs as f64 / dt,
        io_latency_us: if reqs > 0 {
            (lat / reqs as f64).max(0.0)
        } else {
            0.0
        },
    }
}

fn class_flags(c: Option<VmClass>) -> [f32; 4] {
    let is = |k| if c == Some(k) { 1.0 } else { 0.0 };
    [
        is(VmClass::LatencyCritical),
        is(VmClass::Batch),
        is(VmClass::Service),
        is(VmClass::Desktop),
    ]
}

struct Stats {
    mean: f64,
    max: f64,
    min: f64,
    std: f64,
}

fn stats(it: impl Iterator<Item = f64> + Clone) -> Stats {
    let n = it.clone().count().max(1) as f64;
    let mean = it.clone().sum::<f64>() / n;
    let var = it.clone().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    Stats {
        mean,
        max: it.clone().fold(f64::MIN, f64::max),
        min: it.fold(f64::MAX, f64::min),
        std: var.sqrt(),
    }
}

/// No feature describes the balloon itself (memory in force, swap-ins): the
/// model predicts the guest's demand, which must not depend on what the
/// balloon currently allows (training data is collected with no balloon).
pub const BALLOON_FEATURES: [&str; 13] = [
    "ws_frac",
    "ws_mean_5m_rel",
    "ws_max_5m_rel",
    "ws_max_1h_rel",
    "ws_min_1h_rel",
    "ws_slope_10m",
    "cpu_frac",
    "cpu_mean_1h_frac",
    "io_log",
    "is_lc",
    "is_batch",
    "is_service",
    "is_desktop",
];

/// Balloon model inputs: working-set history relative to the current working set.
pub fn balloon_features(h: &History, v: usize) -> Option<[f32; 13]> {
    let vm = h.vms.get(v)?;
    let last = vm.last()?;
    let ws = last.ws_mib.max(1.0);
    let mem = vm.mem_mib.max(1.0);
    let vcpus = vm.vcpus.max(1) as f64;
    let w5 = stats(vm.window(h.steps(300.0)).map(|o| o.ws_mib));
    let w1h = stats(vm.window(h.steps(3600.0)).map(|o| o.ws_mib));
    let ten = h.steps(600.0);
    let first = vm.window(ten).next().map(|o| o.ws_mib).unwrap_or(ws);
    let span_min = (vm.window(ten).count().max(2) - 1) as f64 * h.step_s / 60.0;
    let slope = (last.ws_mib - first) / span_min.max(1e-3) / mem;
    let cpu1h = stats(vm.window(h.steps(3600.0)).map(|o| o.cpu));
    let f = class_flags(vm.class);
    Some([
        (last.ws_mib / mem) as f32,
        (w5.mean / ws) as f32,
        (w5.max / ws) as f32,
        (w1h.max / ws) as f32,
        (w1h.min / ws) as f32,
        slope as f32,
        (last.cpu / vcpus) as f32,
        (cpu1h.mean / vcpus) as f32,
        (last.iops.ln_1p()) as f32,
        f[0],
        f[1],
        f[2],
        f[3],
    ])
}

pub const CPU_FEATURES: [&str; 13] = [
    "cpu_frac",
    "cpu_mean_5m_frac",
    "cpu_max_5m_frac",
    "cpu_std_5m_frac",
    "cpu_mean_1h_frac",
    "cpu_max_1h_frac",
    "wait_ms_5m",
    "io_log",
    "vcpus",
    "is_lc",
    "is_batch",
    "is_service",
    "is_desktop",
];

/// CPU model inputs: recent CPU use per vCPU over 5-minute and 1-hour windows.
pub fn cpu_features(h: &History, v: usize) -> Option<[f32; 13]> {
    let vm = h.vms.get(v)?;
    let last = vm.last()?;
    let vcpus = vm.vcpus.max(1) as f64;
    let c5 = stats(vm.window(h.steps(300.0)).map(|o| o.cpu / vcpus));
    let c1h = stats(vm.window(h.steps(3600.0)).map(|o| o.cpu / vcpus));
    let wait5 = stats(vm.window(h.steps(300.0)).map(|o| o.wait_ms));
    let f = class_flags(vm.class);
    Some([
        (last.cpu / vcpus) as f32,
        c5.mean as f32,
        c5.max as f32,
        c5.std as f32,
        c1h.mean as f32,
        c1h.max as f32,
        wait5.mean as f32,
        last.iops.ln_1p() as f32,
        vcpus as f32,
        f[0],
        f[1],
        f[2],
        f[3],
    ])
}

pub const DEVICE_FEATURES: [&str; 7] = [
    "iops_log",
    "poll",
    "other_load",
    "set_size_log",
    "same_group",
    "same_node",
    "peer_iops_log",
];

/// Device model inputs for one candidate worker placement; `peer_iops` is the
/// traffic of other devices served by the same polling thread.
pub fn device_features(
    iops: f64,
    poll: bool,
    other_load: f64,
    set_size: usize,
    same_group: f64,
    same_node: f64,
    peer_iops: f64,
) -> [f32; 7] {
    [
        iops.ln_1p() as f32,
        if poll { 1.0 } else { 0.0 },
        other_load as f32,
        (set_size as f64).ln() as f32,
        same_group as f32,
        same_node as f32,
        peer_iops.ln_1p() as f32,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::*;

    fn snap(t: f64, cpu_ns: u64, actual: f64, avail: f64, swap_in: f64) -> Snapshot {
        Snapshot {
            t_s: t,
            host: HostTelemetry::default(),
            vms: vec![VmTelemetry {
                id: "a".into(),
                class: VmClass::Batch,
                mem_mib: 4096.0,
                floor_mib: 256.0,
                vcpus: vec![
                    VcpuStat {
                        cpu_time_ns: cpu_ns,
                        wait_ns: cpu_ns / 10,
                        timeslices: 0
                    };
                    2
                ],
                balloon: BalloonStats {
                    actual_mib: actual,
                    available_mib: avail,
                    swap_in_mib: swap_in,
                    ..Default::default()
                },
                devices: vec![],
                cgroup: None,
            }],
        }
    }

    #[test]
    fn counters_become_rates() {
        let mut h = History::new();
        h.ingest(&snap(0.0, 0, 4096.0, 3096.0, 0.0));
        assert!(h.vms[0].last().is_none(), "one sample has no interval");
        h.ingest(&snap(10.0, 5_000_000_000, 4096.0, 2096.0, 10.0));
        let o = *h.vms[0].last().unwrap();
        assert_eq!(o.cpu, 1.0, "2 vCPUs x 5 s in 10 s");
        assert_eq!(o.ws_mib, 2000.0);
        assert_eq!(o.swap_in_mib_per_min, 60.0);
        assert!(
            (o.wait_ms - 50.0).abs() < 1e-9,
            "1 s of wait per vCPU in 10 s"
        );
        let f = balloon_features(&h, 0).unwrap();
        assert!((f[0] - 2000.0 / 4096.0).abs() < 1e-6);
        assert_eq!(f[10], 1.0, "batch flag");
        assert_eq!(cpu_features(&h, 0).unwrap()[0], 0.5);
    }
}
