//! vCPU placement baselines: static 1:1 pinning and a pack/spread heuristic,
//! and the exclusive placement of latency-critical guests they share with
//! the learned policy.

use super::{CpuRule, Ctx};
use crate::decision::VcpuPlacement;
use crate::host::Host;
use crate::trace::VmClass;
use crate::util::CpuSet;

/// Pins vCPU k (counting across all VMs in order) to host CPU k mod N, once.
/// With more vCPUs than CPUs the pinning wraps around, as a static 1:1 setup
/// written for an uncommitted host does when guests are added.
#[derive(Debug, Default)]
pub struct StaticPin {
    done: bool,
}

impl CpuRule for StaticPin {
    fn name(&self) -> &'static str {
        "static-pin"
    }

    fn plan(&mut self, ctx: &Ctx) -> Option<Vec<Vec<VcpuPlacement>>> {
        if self.done {
            return None;
        }
        self.done = true;
        let n = ctx.host.cpus;
        let mut k = 0u32;
        Some(
            ctx.snap
                .vms
                .iter()
                .map(|vm| {
                    (0..vm.vcpus.len())
                        .map(|_| {
                            let p = VcpuPlacement {
                                cpus: CpuSet::single(k % n),
                                weight: 1.0,
                                exclusive: false,
                            };
                            k += 1;
                            p
                        })
                        .collect()
                })
                .collect(),
        )
    }
}

/// Gives each latency-critical VM exclusive CPUs: all of one VM's vCPUs in one
/// cache group (they share data), successive VMs in different groups (they
/// would evict each other's cache). Never hands out more than half the host;
/// latency-critical VMs beyond that run in the shared pool at weight 4.
/// Returns the per-VM placements (None for non-LC VMs) and the exclusive CPUs.
pub fn lc_exclusive(
    host: &Host,
    classes: &[(VmClass, usize)],
) -> (Vec<Option<Vec<VcpuPlacement>>>, CpuSet) {
    let mut free: Vec<Vec<u32>> = host
        .cache_groups
        .iter()
        .map(|g| g.cpus().iter().rev().copied().collect())
        .collect();
    let budget = host.cpus as usize / 2;
    let mut used = Vec::new();
    let mut out = vec![None; classes.len()];
    let mut next_group = 0usize;
    for (v, &(class, vcpus)) in classes.iter().enumerate() {
        if class != VmClass::LatencyCritical || used.len() + vcpus > budget {
            continue;
        }
        // The next group (round robin) with room for the whole VM.
        let ng = free.len();
        let Some(g) = (0..ng)
            .map(|k| (next_group + k) % ng)
            .find(|&g| free[g].len() > vcpus)
        else {
            continue;
        };
        next_group = g + 1;
        let cpus: Vec<u32> = (0..vcpus).filter_map(|_| free[g].pop()).collect();
        used.extend_from_slice(&cpus);
        out[v] = Some(
            cpus.into_iter()
                .map(|c| VcpuPlacement {
                    cpus: CpuSet::single(c),
                    weight: 1.0,
                    exclusive: true,
                })
                .collect(),
        );
    }
    (out, CpuSet::new(used))
}

pub fn classes(ctx: &Ctx) -> Vec<(VmClass, usize)> {
    ctx.snap
        .vms
        .iter()
        .map(|v| (v.class, v.vcpus.len()))
        .collect()
}

/// Pack/spread: latency-critical VMs are spread over cache groups on
/// exclusive CPUs; the others are packed, largest recent demand first, into
/// the first cache group with room (75% of its shared CPUs), so idle groups
/// stay idle and busy VMs keep their cache; a VM that fits nowhere floats over
/// the whole shared pool. Re-packed every 5 minutes from 5-minute mean use.
#[derive(Debug)]
pub struct PackSpread {
    pub repack_s: f64,
    pub fill: f64,
    last: f64,
}

impl Default for PackSpread {
    fn default() -> Self {
        PackSpread {
            repack_s: 300.0,
            fill: 0.75,
            last: f64::NEG_INFINITY,
        }
    }
}

impl PackSpread {
    pub fn reset_timer(&mut self) {
        self.last = f64::NEG_INFINITY;
    }
}

impl CpuRule for PackSpread {
    fn name(&self) -> &'static str {
        "packspread"
    }

    fn plan(&mut self, ctx: &Ctx) -> Option<Vec<Vec<VcpuPlacement>>> {
        if ctx.snap.t_s - self.last < self.repack_s {
            return None;
        }
        self.last = ctx.snap.t_s;
        let demand: Vec<f64> = (0..ctx.snap.vms.len())
            .map(|v| {
                let h = &ctx.hist.vms.get(v);
                let w = ctx.hist.steps(300.0);
                h.map(|h| {
                    h.window(w).map(|o| o.cpu).sum::<f64>() / h.window(w).count().max(1) as f64
                })
                .unwrap_or(0.0)
            })
            .collect();
        Some(pack(ctx, &demand, self.fill, |_| 1.0))
    }
}

/// Shared by pack/spread and the learned CPU rule: LC exclusive, the rest
/// packed by `demand` into cache groups, weights from `weight(class)`.
pub fn pack(
    ctx: &Ctx,
    demand: &[f64],
    fill: f64,
    weight: impl Fn(VmClass) -> f64,
) -> Vec<Vec<VcpuPlacement>> {
    let host = ctx.host;
    let (lc, exclusive) = lc_exclusive(host, &classes(ctx));
    let shared: Vec<CpuSet> = host
        .cache_groups
        .iter()
        .map(|g| g.minus(&exclusive))
        .collect();
    let pool = host.all_cpus().minus(&exclusive);
    let mut room: Vec<f64> = shared.iter().map(|s| s.len() as f64 * fill).collect();
    let mut order: Vec<usize> = (0..ctx.snap.vms.len())
        .filter(|&v| lc[v].is_none())
        .collect();
    order.sort_by(|&a, &b| demand[b].total_cmp(&demand[a]).then(a.cmp(&b)));
    let mut out: Vec<Vec<VcpuPlacement>> = lc.into_iter().map(|p| p.unwrap_or_default()).collect();
    for v in order {
        let vm = &ctx.snap.vms[v];
        let d = demand[v];
        let w = if vm.class == VmClass::LatencyCritical {
            4.0
        } else {
            weight(vm.class)
        };
        let set = match (0..shared.len()).find(|&g| room[g] >= d && !shared[g].is_empty()) {
            Some(g) => {
                room[g] -= d;
                shared[g].clone()
            }
            None => pool.clone(),
        };
        out[v] = vec![
            VcpuPlacement {
                cpus: set,
                weight: w,
                exclusive: false
            };
            vm.vcpus.len()
        ];
    }
    out
}
