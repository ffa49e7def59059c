//! Deterministic trace replay on a described host. Each step applies the
//! current placements and balloon targets to the trace's demand and computes
//! what the guests would see: CPU granted and run-queue wait, swap-ins and OOM
//! kills, host memory pressure, and I/O latency. The model's formulas live in
//! [`model`]; the simulator exposes its results as the same cumulative
//! telemetry a live host produces, so the engine cannot tell them apart.

pub mod model;

use crate::decision::{Actions, DevicePlacement, IoMode, VcpuPlacement, VmState};
use crate::host::Host;
use crate::telemetry::*;
use crate::trace::{Trace, VmClass};
use crate::util::CpuSet;
use model::*;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SimError {
    #[error("action for VM index {0}, but the trace has {1} VMs")]
    NoSuchVm(usize, usize),
    #[error("VM {vm}: {msg}")]
    BadAction { vm: String, msg: String },
}

/// Everything measured during a run, summed over steps.
#[derive(Debug, Clone, Default)]
pub struct SimMetrics {
    pub steps: usize,
    pub step_s: f64,
    pub alloc_total_mib: f64,
    pub reclaimed_mib_steps: f64,
    pub ws_mib_steps: f64,
    pub oom_events: u64,
    /// Calls of the guests' OOM notifier that took memory back from a balloon
    /// (deflate-on-OOM), and the memory they took, MiB.
    pub oom_deflate_calls: u64,
    pub oom_deflate_mib: f64,
    /// Hot page cache read back after the balloon squeezed it, MiB.
    pub refault_mib: f64,
    pub guest_swap_in_mib: f64,
    pub host_swap_in_mib: f64,
    /// Run-queue wait of latency-critical vCPUs, ms per second, one per vCPU per step.
    pub lc_wait_ms: Vec<f32>,
    pub batch_work_vcpu_s: f64,
    pub batch_demand_vcpu_s: f64,
    /// (mean latency above the service time in µs, requests) per device per step.
    pub io_excess: Vec<(f32, f32)>,
    /// Per step: total guest memory in force, total working set.
    pub series_actual_mib: Vec<f32>,
    pub series_ws_mib: Vec<f32>,
}

impl SimMetrics {
    pub fn duration_min(&self) -> f64 {
        self.steps as f64 * self.step_s / 60.0
    }
    /// Mean share of allocated guest memory given back to the host, %.
    pub fn reclaimed_pct(&self) -> f64 {
        100.0 * self.reclaimed_mib_steps / (self.alloc_total_mib * self.steps.max(1) as f64)
    }
    /// Swap-ins per minute as a share of the mean working set, %.
    pub fn swap_in_pct_per_min(&self) -> f64 {
        let mean_ws = self.ws_mib_steps / self.steps.max(1) as f64;
        100.0 * (self.guest_swap_in_mib + self.host_swap_in_mib)
            / self.duration_min().max(1e-9)
            / mean_ws.max(1e-9)
    }
    pub fn lc_wait_p99_ms(&self) -> f64 {
        let mut v: Vec<f64> = self.lc_wait_ms.iter().map(|&x| x as f64).collect();
        crate::util::percentile(&mut v, 99.0)
    }
    /// Useful batch vCPU-seconds per second of trace.
    pub fn batch_throughput(&self) -> f64 {
        self.batch_work_vcpu_s / (self.steps.max(1) as f64 * self.step_s)
    }
    /// 99th percentile of per-request I/O latency, µs, treating each device-step's
    /// latency above the service time as exponential with the modelled mean.
    pub fn io_p99_us(&self) -> f64 {
        let total: f64 = self.io_excess.iter().map(|e| e.1 as f64).sum();
        if total <= 0.0 {
            return 0.0;
        }
        let tail = |x: f64| -> f64 {
            self.io_excess
                .iter()
                .map(|&(m, w)| w as f64 * (-x / (m as f64).max(1e-6)).exp())
                .sum::<f64>()
                / total
        };
        let (mut lo, mut hi) = (0.0, 1.0);
        while tail(hi) > 0.01 {
            hi *= 2.0;
        }
        for _ in 0..40 {
            let mid = 0.5 * (lo + hi);
            if tail(mid) > 0.01 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        IO_SERVICE_US + hi
    }
}

/// Per distinct CPU set in a step: how its load spreads over groups and nodes.
struct SetInfo {
    set: CpuSet,
    load: f64,
    wload: f64,
    group_dist: Vec<f64>,
    node_dist: Vec<f64>,
}

/// How the simulated devices behave.
#[derive(Debug, Clone, Copy)]
pub struct SimOptions {
    /// The balloon offers VIRTIO_BALLOON_F_DEFLATE_ON_OOM (Kiln's default):
    /// a guest about to OOM takes memory back from the balloon first.
    pub deflate_on_oom: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            deflate_on_oom: true,
        }
    }
}

pub struct Simulator<'a> {
    host: &'a Host,
    opts: SimOptions,
    /// The guest deflated its balloon on OOM and has not been given a target
    /// since: its driver does not move toward the old target again until the
    /// host writes one (a config change), as Linux's virtio_balloon behaves.
    held: Vec<bool>,
    trace: &'a Trace,
    step: usize,
    state: Vec<VmState>,
    actual: Vec<f64>,
    deficit: Vec<f64>,
    vcpu_stats: Vec<Vec<VcpuStat>>,
    balloon: Vec<BalloonStats>,
    disk: Vec<DeviceStat>,
    host_tel: HostTelemetry,
    pub metrics: SimMetrics,
}

pub const DISK: &str = "disk0";

impl<'a> Simulator<'a> {
    /// Starts every VM unpinned, balloon deflated, I/O worker unplaced.
    pub fn new(host: &'a Host, trace: &'a Trace) -> Self {
        Simulator::with_options(host, trace, SimOptions::default())
    }

    pub fn with_options(host: &'a Host, trace: &'a Trace, opts: SimOptions) -> Self {
        let all = host.all_cpus();
        let state = trace
            .vms
            .iter()
            .map(|vm| VmState {
                vcpus: vec![
                    VcpuPlacement {
                        cpus: all.clone(),
                        weight: 1.0,
                        exclusive: false
                    };
                    vm.vcpus as usize
                ],
                balloon_target_mib: vm.mem_mib,
                devices: vec![(
                    DISK.to_string(),
                    DevicePlacement {
                        cpus: all.clone(),
                        mode: IoMode::Notify,
                    },
                )],
            })
            .collect();
        let n = trace.vms.len();
        Simulator {
            host,
            opts,
            held: vec![false; n],
            trace,
            step: 0,
            state,
            actual: trace.vms.iter().map(|v| v.mem_mib).collect(),
            deficit: vec![0.0; n],
            vcpu_stats: trace
                .vms
                .iter()
                .map(|v| vec![VcpuStat::default(); v.vcpus as usize])
                .collect(),
            balloon: trace
                .vms
                .iter()
                .map(|v| BalloonStats {
                    actual_mib: v.mem_mib,
                    available_mib: v.mem_mib,
                    free_mib: v.mem_mib,
                    ..Default::default()
                })
                .collect(),
            disk: vec![
                DeviceStat {
                    name: DISK.into(),
                    ..Default::default()
                };
                n
            ],
            host_tel: HostTelemetry {
                mem_total_mib: host.memory_mib as f64,
                mem_available_mib: host.guest_memory_mib(),
                ..Default::default()
            },
            metrics: SimMetrics {
                step_s: trace.step_s,
                alloc_total_mib: trace.vms.iter().map(|v| v.mem_mib).sum(),
                ..Default::default()
            },
        }
    }

    pub fn done(&self) -> bool {
        self.step >= self.trace.steps
    }

    pub fn step_index(&self) -> usize {
        self.step
    }

    pub fn state(&self) -> &[VmState] {
        &self.state
    }

    pub fn trace(&self) -> &Trace {
        self.trace
    }

    /// Applies decisions; rejects ones no actuator could carry out.
    pub fn apply(&mut self, actions: &Actions) -> Result<(), SimError> {
        let n = self.trace.vms.len();
        for (i, a) in actions.vms.iter().enumerate() {
            if i >= n {
                return Err(SimError::NoSuchVm(i, n));
            }
            let vm = &self.trace.vms[i];
            let bad = |msg: String| SimError::BadAction {
                vm: vm.name.clone(),
                msg,
            };
            let check_set = |s: &CpuSet| -> Result<(), SimError> {
                if s.is_empty() || s.cpus().iter().any(|&c| c >= self.host.cpus) {
                    return Err(bad(format!(
                        "CPU set {s} is empty or outside the host's {} CPUs",
                        self.host.cpus
                    )));
                }
                Ok(())
            };
            if let Some(p) = &a.vcpus {
                if p.len() != vm.vcpus as usize {
                    return Err(bad(format!(
                        "{} placements for {} vCPUs",
                        p.len(),
                        vm.vcpus
                    )));
                }
                for v in p {
                    check_set(&v.cpus)?;
                    if !(v.weight > 0.0 && v.weight <= 100.0) {
                        return Err(bad(format!("weight {} outside (0, 100]", v.weight)));
                    }
                }
                self.state[i].vcpus = p.clone();
            }
            if let Some(t) = a.balloon_target_mib {
                if !(t.is_finite() && t > 0.0 && t <= vm.mem_mib) {
                    return Err(bad(format!(
                        "balloon target {t} MiB outside (0, {}]",
                        vm.mem_mib
                    )));
                }
                self.state[i].balloon_target_mib = t;
                // A target written is a config change: the driver moves toward it again.
                self.held[i] = false;
            }
            for (name, d) in &a.devices {
                check_set(&d.cpus)?;
                match self.state[i].devices.iter_mut().find(|(n, _)| n == name) {
                    Some(slot) => slot.1 = d.clone(),
                    None => return Err(bad(format!("no device {name}"))),
                }
            }
        }
        Ok(())
    }

    fn dist(&self, set: &CpuSet) -> (Vec<f64>, Vec<f64>) {
        let mut g = vec![0.0; self.host.cache_groups.len()];
        let mut n = vec![0.0; self.host.numa_nodes.len()];
        let w = 1.0 / set.len().max(1) as f64;
        for &c in set.cpus() {
            g[self.host.cpu_group[c as usize]] += w;
            n[self.host.cpu_node[c as usize]] += w;
        }
        (g, n)
    }

    fn set_index(&self, sets: &mut Vec<SetInfo>, set: &CpuSet) -> usize {
        if let Some(i) = sets.iter().position(|s| &s.set == set) {
            return i;
        }
        let (group_dist, node_dist) = self.dist(set);
        sets.push(SetInfo {
            set: set.clone(),
            load: 0.0,
            wload: 0.0,
            group_dist,
            node_dist,
        });
        sets.len() - 1
    }

    /// Simulates the current step and moves to the next one.
    // Index loops: several parallel per-VM arrays are read and written together.
    #[allow(clippy::needless_range_loop)]
    pub fn advance(&mut self) {
        if self.done() {
            return;
        }
        let (host, trace) = (self.host, self.trace);
        let dt = trace.step_s;
        let n = trace.vms.len();
        let s = self.step;
        let ncpu = host.cpus as usize;

        // 1. Loads per distinct CPU set: vCPU demand and I/O worker CPU use.
        let mut sets: Vec<SetInfo> = Vec::new();
        let mut vcpu_set: Vec<Vec<usize>> = Vec::with_capacity(n);
        let mut worker_set: Vec<usize> = Vec::with_capacity(n);
        let mut worker_load: Vec<f64> = Vec::with_capacity(n);
        // Devices set to poll on the same CPUs share one polling thread (as a
        // vhost-user/SPDK poller serves several queues): its CPU is counted once.
        let mut pollers: Vec<(CpuSet, f64)> = Vec::new();
        let mut poller_of: Vec<Option<usize>> = vec![None; n];
        for v in 0..n {
            let i = trace.at(s, v);
            let dv = (trace.cpu[i] / trace.vms[v].vcpus as f64).min(1.0);
            let mut idx = Vec::with_capacity(self.state[v].vcpus.len());
            for p in &self.state[v].vcpus {
                let k = self.set_index(&mut sets, &p.cpus);
                sets[k].load += dv;
                sets[k].wload += dv * p.weight;
                idx.push(k);
            }
            vcpu_set.push(idx);
            let dev = &self.state[v].devices[0].1;
            let (wl, added) = match dev.mode {
                IoMode::Poll => match pollers.iter().position(|p| p.0 == dev.cpus) {
                    Some(p) => {
                        pollers[p].1 += trace.iops[i];
                        poller_of[v] = Some(p);
                        (1.0, 0.0)
                    }
                    None => {
                        pollers.push((dev.cpus.clone(), trace.iops[i]));
                        poller_of[v] = Some(pollers.len() - 1);
                        (1.0, 1.0)
                    }
                },
                IoMode::Notify => {
                    let w = trace.iops[i] * IO_CPU_US * 1e-6;
                    (w, w)
                }
            };
            let k = self.set_index(&mut sets, &dev.cpus);
            sets[k].load += added;
            sets[k].wload += added;
            worker_set.push(k);
            worker_load.push(wl);
        }
        let mut load = vec![0.0; ncpu];
        let mut wload = vec![0.0; ncpu];
        for si in &sets {
            let share = 1.0 / si.set.len() as f64;
            for &c in si.set.cpus() {
                load[c as usize] += si.load * share;
                wload[c as usize] += si.wload * share;
            }
        }
        let mut group_load = vec![0.0; host.cache_groups.len()];
        for c in 0..ncpu {
            group_load[host.cpu_group[c]] += load[c];
        }
        let set_avg = |set: &CpuSet, v: &[f64]| {
            set.cpus().iter().map(|&c| v[c as usize]).sum::<f64>() / set.len() as f64
        };

        // 2. CPU granted, run-queue wait and efficiency per vCPU.
        for v in 0..n {
            let vm = &trace.vms[v];
            let i = trace.at(s, v);
            let dv = (trace.cpu[i] / vm.vcpus as f64).min(1.0);
            // Memory lives where most of the VM's vCPUs may run (first touch).
            let mut node_share = vec![0.0; host.numa_nodes.len()];
            for &k in &vcpu_set[v] {
                for (a, b) in node_share.iter_mut().zip(&sets[k].node_dist) {
                    *a += b / vm.vcpus as f64;
                }
            }
            let home = node_share.iter().cloned().fold(0.0, f64::max);
            let remote = 1.0 - home;
            for (j, p) in self.state[v].vcpus.iter().enumerate() {
                let set = &p.cpus;
                let size = set.len() as f64;
                let contrib = dv / size;
                let mut granted = 0.0;
                let mut other = 0.0;
                let mut cache_other = 0.0;
                for &c in set.cpus() {
                    let c = c as usize;
                    let f = if load[c] <= 1.0 {
                        1.0
                    } else {
                        (p.weight / wload[c]).min(1.0)
                    };
                    granted += contrib * f;
                    other += (load[c] - contrib).max(0.0);
                    let g = host.cpu_group[c];
                    cache_other +=
                        ((group_load[g] - contrib) / host.cache_groups[g].len() as f64).max(0.0);
                }
                other /= size;
                cache_other /= size;
                let wait_ms = (dv - granted).max(0.0) * 1000.0
                    + dv * WAKEUPS_PER_DEMAND * HALF_SLICE_MS * p_no_idle_cpu(other, set.len());
                let eff = (1.0 - CACHE_INTERFERENCE * cache_other.min(1.0))
                    * (1.0 - REMOTE_NUMA_PENALTY * remote);
                let st = &mut self.vcpu_stats[v][j];
                st.cpu_time_ns += (granted * dt * 1e9) as u64;
                st.wait_ns += (wait_ms * dt * 1e6) as u64;
                st.timeslices += (dv * WAKEUPS_PER_DEMAND * dt) as u64;
                match vm.class {
                    VmClass::LatencyCritical => self.metrics.lc_wait_ms.push(wait_ms as f32),
                    VmClass::Batch => {
                        self.metrics.batch_work_vcpu_s += granted * eff * dt;
                        self.metrics.batch_demand_vcpu_s += dv * dt;
                    }
                    _ => {}
                }
            }
        }

        // 3. Memory: balloons move toward targets; deficits swap or kill.
        let mut resident = vec![0.0; n];
        let mut actual_total = 0.0;
        let mut ws_total = 0.0;
        for v in 0..n {
            let vm = &trace.vms[v];
            let i = trace.at(s, v);
            let target = self.state[v].balloon_target_mib;
            let max_move = BALLOON_MIB_PER_S * dt;
            let mut a = self.actual[v];
            if !self.held[v] {
                a += (target - a).clamp(-max_move, max_move);
            }
            let w = trace.ws[i];
            let (given, calls, killed) = deflate_on_oom(
                a,
                vm.mem_mib,
                w,
                GUEST_SWAP_SHARE * vm.mem_mib,
                self.opts.deflate_on_oom,
            );
            if calls > 0 {
                self.held[v] = true;
                self.metrics.oom_deflate_calls += calls;
                self.metrics.oom_deflate_mib += given - a;
            }
            a = given;
            self.actual[v] = a;
            let d = (w - a).max(0.0);
            let b = &mut self.balloon[v];
            b.actual_mib = a;
            if d > 0.0 {
                resident[v] = a;
                b.free_mib = 0.0;
                b.caches_mib = 0.0;
                b.available_mib = 0.0;
                let swap_in = d * SWAPPED_TOUCH_PER_MIN * dt / 60.0;
                b.swap_in_mib += swap_in;
                b.major_faults += (swap_in * 256.0) as u64;
                self.metrics.guest_swap_in_mib += swap_in;
                if killed {
                    b.oom_kills += 1;
                    self.metrics.oom_events += 1;
                }
            } else {
                let room = a - w;
                let cache = match trace.cache[i] {
                    // A guest that keeps a hot cache fills what it can and
                    // reads back what the balloon squeezed out.
                    Some(want) => {
                        let want = want as f64;
                        let refault = (want - room).max(0.0) * REFAULT_TOUCH_PER_MIN * dt / 60.0;
                        b.major_faults += (refault * 256.0) as u64;
                        self.metrics.refault_mib += refault;
                        want.min(room)
                    }
                    None => CACHE_FILL * room,
                };
                resident[v] = w + cache;
                b.caches_mib = cache;
                b.free_mib = room - cache;
                b.available_mib = room;
            }
            b.swap_out_mib += (d - self.deficit[v]).max(0.0);
            b.minor_faults += (trace.cpu[i] * dt * 1000.0) as u64;
            self.deficit[v] = d;
            actual_total += a;
            ws_total += w;
            self.metrics.reclaimed_mib_steps += vm.mem_mib - a;
        }
        self.metrics.ws_mib_steps += ws_total;
        let res_total: f64 = resident.iter().sum();
        let overflow = (res_total - host.guest_memory_mib()).max(0.0);
        if overflow > 0.0 {
            for v in 0..n {
                let swap_in =
                    overflow * resident[v] / res_total * SWAPPED_TOUCH_PER_MIN * dt / 60.0;
                self.balloon[v].major_faults += (swap_in * 256.0) as u64;
                self.metrics.host_swap_in_mib += swap_in;
            }
        }
        self.host_tel.mem_available_mib = (host.guest_memory_mib() - res_total).max(0.0);
        self.host_tel.psi_memory = Psi {
            some_avg10: (100.0 * overflow / res_total.max(1.0) * 10.0).min(100.0),
            full_avg10: (100.0 * overflow / res_total.max(1.0) * 2.0).min(100.0),
        };
        let starved: f64 = load.iter().map(|l| (l - 1.0).max(0.0)).sum();
        self.host_tel.psi_cpu = Psi {
            some_avg10: (100.0 * starved / ncpu as f64).min(100.0),
            full_avg10: 0.0,
        };

        // 4. I/O latency by worker placement.
        for v in 0..n {
            let i = trace.at(s, v);
            let q = trace.iops[i];
            let dev = &self.state[v].devices[0].1;
            let ws = &sets[worker_set[v]];
            let mut vg = vec![0.0; host.cache_groups.len()];
            let mut vn = vec![0.0; host.numa_nodes.len()];
            for &k in &vcpu_set[v] {
                for (a, b) in vg.iter_mut().zip(&sets[k].group_dist) {
                    *a += b / vcpu_set[v].len() as f64;
                }
                for (a, b) in vn.iter_mut().zip(&sets[k].node_dist) {
                    *a += b / vcpu_set[v].len() as f64;
                }
            }
            let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
            let own = worker_load[v] / dev.cpus.len() as f64;
            let excess = io_excess_latency_us(&IoInputs {
                iops: poller_of[v].map(|p| pollers[p].1).unwrap_or(q),
                poll: dev.mode == IoMode::Poll,
                other_load: (set_avg(&dev.cpus, &load) - own).max(0.0),
                set_size: dev.cpus.len(),
                same_group_prob: dot(&vg, &ws.group_dist),
                same_node_prob: dot(&vn, &ws.node_dist),
            });
            let reqs = q * dt;
            let d = &mut self.disk[v];
            d.requests += reqs as u64;
            d.latency_sum_us += reqs * (IO_SERVICE_US + excess);
            d.p99_us = IO_SERVICE_US + excess * 100f64.ln();
            if reqs > 0.0 {
                self.metrics.io_excess.push((excess as f32, reqs as f32));
            }
        }

        self.metrics.series_actual_mib.push(actual_total as f32);
        self.metrics.series_ws_mib.push(ws_total as f32);
        self.metrics.steps += 1;
        self.step += 1;
    }
}

impl TelemetrySource for Simulator<'_> {
    fn host(&self) -> &Host {
        self.host
    }

    /// Counters as of the end of the last simulated step.
    fn sample(&mut self) -> Result<Snapshot, TelemetryError> {
        let vms = self
            .trace
            .vms
            .iter()
            .enumerate()
            .map(|(v, vm)| VmTelemetry {
                id: vm.name.clone(),
                class: vm.class,
                mem_mib: vm.mem_mib,
                floor_mib: vm.floor_mib,
                vcpus: self.vcpu_stats[v].clone(),
                balloon: self.balloon[v],
                devices: vec![self.disk[v].clone()],
                cgroup: None,
            })
            .collect();
        Ok(Snapshot {
            t_s: self.trace.time(self.step),
            host: self.host_tel,
            vms,
        })
    }
}

#[cfg(test)]
mod tests;
