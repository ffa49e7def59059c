//! Device placement heuristic: the I/O worker sleeps (notify) on the shared
//! CPUs of the cache group where the VM's vCPUs run, or of their node (or the
//! host) when that group is too busy to have an idle CPU for it.

use super::{Ctx, DeviceRule};
use crate::decision::{DevicePlacement, IoMode, VcpuPlacement};
use crate::host::Host;
use crate::util::CpuSet;

/// CPUs any VM has exclusively, from what is in force.
pub fn exclusive_cpus(ctx: &Ctx) -> CpuSet {
    let mut all = Vec::new();
    for st in ctx.state {
        for p in st.vcpus.iter().filter(|p| p.exclusive) {
            all.extend_from_slice(p.cpus.cpus());
        }
    }
    CpuSet::new(all)
}

/// The cache group most of these vCPUs may run in.
pub fn home_group(host: &Host, vcpus: &[VcpuPlacement]) -> usize {
    let mut share = vec![0.0; host.cache_groups.len()];
    for p in vcpus {
        for &c in p.cpus.cpus() {
            share[host.cpu_group[c as usize]] += 1.0 / p.cpus.len() as f64;
        }
    }
    share
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|x| x.0)
        .unwrap_or(0)
}

/// A set whose chance of having no idle CPU for a woken worker exceeds this is "busy".
pub const BUSY_NO_IDLE_CPU: f64 = 0.25;

#[derive(Debug, Default)]
pub struct LocalNotify;

impl DeviceRule for LocalNotify {
    fn name(&self) -> &'static str {
        "local-notify"
    }

    fn place(
        &mut self,
        ctx: &Ctx,
        _v: usize,
        vcpus: &[VcpuPlacement],
        load: &[f64],
    ) -> Option<DevicePlacement> {
        let host = ctx.host;
        let excl = exclusive_cpus(ctx).union(&CpuSet::new(
            vcpus
                .iter()
                .filter(|p| p.exclusive)
                .flat_map(|p| p.cpus.cpus().to_vec())
                .collect(),
        ));
        // Nearest first (the vCPUs' cache group, their node, the host), but a
        // set so busy that a woken worker rarely finds an idle CPU is passed
        // over for the next wider one: waiting for a CPU costs more than distance.
        let g = home_group(host, vcpus);
        let node = host.group_node[g];
        let cands = [
            host.cache_groups[g].minus(&excl),
            host.numa_nodes[node].minus(&excl),
            host.all_cpus().minus(&excl),
        ];
        let busy = |s: &CpuSet| {
            let avg = s
                .cpus()
                .iter()
                .map(|&c| load.get(c as usize).copied().unwrap_or(0.0))
                .sum::<f64>()
                / s.len().max(1) as f64;
            avg.clamp(0.0, 1.0).powi(s.len().min(8) as i32) > BUSY_NO_IDLE_CPU
        };
        let set = cands
            .iter()
            .find(|s| !s.is_empty() && !busy(s))
            .or_else(|| cands.iter().find(|s| !s.is_empty()))
            .cloned()
            .unwrap_or_default();
        (!set.is_empty()).then_some(DevicePlacement {
            cpus: set,
            mode: IoMode::Notify,
        })
    }
}
