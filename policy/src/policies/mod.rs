//! Policies: the baselines (static, oVirt MOM, VPA-like, pack/spread), the
//! heuristic the engine falls back to, and the plumbing they share. A policy
//! is a balloon rule, a CPU rule and a device rule; any may be absent (that
//! lever is then left as the VM started: deflated, unpinned, unplaced).

pub mod balloon;
pub mod cpu;
pub mod device;

use crate::decision::{DevicePlacement, VcpuPlacement, VmActions, VmState};
use crate::features::History;
use crate::host::Host;
use crate::telemetry::Snapshot;

/// What a policy sees each round.
pub struct Ctx<'a> {
    pub host: &'a Host,
    pub snap: &'a Snapshot,
    pub hist: &'a History,
    /// What is in force now, indexed like `snap.vms`.
    pub state: &'a [VmState],
}

pub trait Policy {
    fn name(&self) -> &str;
    /// Whole-host work for this round (e.g. a CPU plan).
    fn begin_round(&mut self, _ctx: &Ctx) {}
    /// Decides for VM `v`.
    fn decide_vm(&mut self, ctx: &Ctx, v: usize) -> VmActions;
    /// Wall time of each decision, µs, when the policy measures it itself.
    fn decision_latencies(&self) -> Option<&[f32]> {
        None
    }
    /// Interventions by guardrail, in words.
    fn intervention_breakdown(&self) -> Option<String> {
        None
    }
    /// Guardrail interventions so far (only the engine has guardrails).
    fn interventions(&self) -> u64 {
        0
    }
}

pub trait BalloonRule {
    fn name(&self) -> &'static str;
    fn begin_round(&mut self, _ctx: &Ctx) {}
    /// New balloon target in MiB (memory the guest keeps), or None to leave it.
    fn target(&mut self, ctx: &Ctx, v: usize) -> Option<f64>;
}

pub trait CpuRule {
    fn name(&self) -> &'static str;
    /// A placement for every vCPU of every VM, or None to leave them.
    fn plan(&mut self, ctx: &Ctx) -> Option<Vec<Vec<VcpuPlacement>>>;
}

pub trait DeviceRule {
    fn name(&self) -> &'static str;
    fn place(
        &mut self,
        ctx: &Ctx,
        v: usize,
        vcpus: &[VcpuPlacement],
        load: &[f64],
    ) -> Option<DevicePlacement>;
}

/// A policy assembled from one rule per lever.
pub struct Composite {
    pub name: String,
    pub balloon: Option<Box<dyn BalloonRule>>,
    pub cpu: Option<Box<dyn CpuRule>>,
    pub device: Option<Box<dyn DeviceRule>>,
    plan: Option<Vec<Vec<VcpuPlacement>>>,
    load: Vec<f64>,
}

impl Composite {
    pub fn new(
        name: &str,
        balloon: Option<Box<dyn BalloonRule>>,
        cpu: Option<Box<dyn CpuRule>>,
        device: Option<Box<dyn DeviceRule>>,
    ) -> Self {
        Composite {
            name: name.into(),
            balloon,
            cpu,
            device,
            plan: None,
            load: Vec::new(),
        }
    }
}

impl Policy for Composite {
    fn name(&self) -> &str {
        &self.name
    }

    fn begin_round(&mut self, ctx: &Ctx) {
        if let Some(b) = &mut self.balloon {
            b.begin_round(ctx);
        }
        self.plan = self.cpu.as_mut().and_then(|c| c.plan(ctx));
        if self.device.is_some() {
            self.load = estimate_cpu_load(ctx, self.plan.as_deref());
        }
    }

    fn decide_vm(&mut self, ctx: &Ctx, v: usize) -> VmActions {
        let vcpus = self.plan.as_ref().and_then(|p| p.get(v).cloned());
        let balloon_target_mib = self.balloon.as_mut().and_then(|b| b.target(ctx, v));
        let in_force = vcpus.as_deref().unwrap_or(&ctx.state[v].vcpus);
        let devices = match &mut self.device {
            Some(d) => match ctx.state[v].devices.first() {
                Some((name, _)) => d
                    .place(ctx, v, in_force, &self.load)
                    .map(|p| vec![(name.clone(), p)])
                    .unwrap_or_default(),
                None => Vec::new(),
            },
            None => Vec::new(),
        };
        VmActions {
            vcpus,
            balloon_target_mib,
            devices,
        }
    }
}

/// Expected load of each host CPU given each VM's last observed CPU use spread
/// over its (planned or current) vCPU sets, plus I/O workers.
pub fn estimate_cpu_load(ctx: &Ctx, plan: Option<&[Vec<VcpuPlacement>]>) -> Vec<f64> {
    let mut load = vec![0.0; ctx.host.cpus as usize];
    let mut pollers: Vec<&crate::util::CpuSet> = Vec::new();
    for (v, st) in ctx.state.iter().enumerate() {
        let obs = ctx.hist.vms.get(v).and_then(|h| h.last());
        let cpu = obs.map(|o| o.cpu).unwrap_or(0.0);
        let placements = plan.and_then(|p| p.get(v)).unwrap_or(&st.vcpus);
        let per_vcpu = cpu / placements.len().max(1) as f64;
        for p in placements {
            let share = per_vcpu / p.cpus.len().max(1) as f64;
            for &c in p.cpus.cpus() {
                if let Some(l) = load.get_mut(c as usize) {
                    *l += share;
                }
            }
        }
        for (_, d) in &st.devices {
            let w = match d.mode {
                crate::decision::IoMode::Poll if pollers.contains(&&d.cpus) => 0.0,
                crate::decision::IoMode::Poll => {
                    pollers.push(&d.cpus);
                    1.0
                }
                crate::decision::IoMode::Notify => {
                    obs.map(|o| o.iops).unwrap_or(0.0) * crate::sim::model::IO_CPU_US * 1e-6
                }
            };
            for &c in d.cpus.cpus() {
                if let Some(l) = load.get_mut(c as usize) {
                    *l += w / d.cpus.len() as f64;
                }
            }
        }
    }
    load
}

/// The policies `kiln policy eval --policies` knows, besides `learned`.
pub const BASELINES: [&str; 6] = [
    "static",
    "static-pin",
    "mom",
    "vpa",
    "packspread",
    "heuristic",
];

pub fn baseline(name: &str) -> Option<Composite> {
    use balloon::{Mom, Vpa};
    use cpu::{PackSpread, StaticPin};
    Some(match name {
        "static" => Composite::new(name, None, None, None),
        "static-pin" => Composite::new(name, None, Some(Box::new(StaticPin::default())), None),
        "mom" => Composite::new(name, Some(Box::new(Mom::default())), None, None),
        "vpa" => Composite::new(name, Some(Box::new(Vpa::default())), None, None),
        "packspread" => Composite::new(name, None, Some(Box::new(PackSpread::default())), None),
        "heuristic" => heuristic(),
        _ => return None,
    })
}

/// What the engine runs when a model is unavailable or overruled.
pub fn heuristic() -> Composite {
    Composite::new(
        "heuristic",
        Some(Box::new(balloon::Vpa::conservative())),
        Some(Box::new(cpu::PackSpread::default())),
        Some(Box::new(device::LocalNotify)),
    )
}
