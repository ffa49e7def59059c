//! The policy engine: learned models behind guardrails, falling back to the
//! heuristic (VPA-like balloon, pack/spread CPUs, local notify I/O) whenever a
//! model is missing, unsure, slow or has made things worse.

use crate::audit::{AuditLog, AuditRecord, Lever};
use crate::decision::{DevicePlacement, IoMode, VcpuPlacement, VmActions};
use crate::features::{
    balloon_features, cpu_features, device_features, BALLOON_FEATURES, CPU_FEATURES,
    DEVICE_FEATURES,
};
use crate::guardrails::{self as g, names, GuardConfig, RollbackMonitor};
use crate::model::{runtime, Model, ModelError};
use crate::policies::balloon::Vpa;
use crate::policies::cpu::{classes, lc_exclusive, PackSpread};
use crate::policies::device::{home_group, LocalNotify};
use crate::policies::{estimate_cpu_load, BalloonRule, CpuRule, Ctx, DeviceRule, Policy};
use crate::trace::VmClass;
use crate::util::CpuSet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Decide nothing.
    Off,
    /// Decide and log, do not act.
    Shadow,
    /// Decide, log and act.
    Active,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Shadow => "shadow",
            Mode::Active => "active",
        }
    }
}

/// The shipped models; any may be missing (its lever then runs the heuristic).
#[derive(Debug, Default)]
pub struct Models {
    pub balloon: Option<Model>,
    pub cpu: Option<Model>,
    pub device: Option<Model>,
}

/// How many times the "runtime unavailable" warning was printed (once per process).
pub static RUNTIME_WARNINGS: AtomicU32 = AtomicU32::new(0);
static RUNTIME_WARNED: AtomicBool = AtomicBool::new(false);

impl Models {
    /// Loads and checks all three models; any failure is an error.
    pub fn load_strict(dir: &Path) -> Result<Models, ModelError> {
        let load = |name: &str, feats: &[&str]| -> Result<Model, ModelError> {
            let m = Model::load(dir, name)?;
            m.schema.expect_features(feats)?;
            Ok(m)
        };
        Ok(Models {
            balloon: Some(load("balloon", &BALLOON_FEATURES)?),
            cpu: Some(load("cpu", &CPU_FEATURES)?),
            device: Some(load("device", &DEVICE_FEATURES)?),
        })
    }

    /// Loads what it can. Without ONNX Runtime it says so once per process and
    /// returns no models, so the engine runs the heuristic.
    pub fn load_or_heuristic(dir: &Path) -> Models {
        if let Err(e) = runtime() {
            if !RUNTIME_WARNED.swap(true, Ordering::SeqCst) {
                RUNTIME_WARNINGS.fetch_add(1, Ordering::SeqCst);
                tracing::warn!("{e}; the policy engine runs the heuristic policy instead of the learned models");
                eprintln!(
                    "kiln policy: {e}; running the heuristic policy instead of the learned models"
                );
            }
            return Models::default();
        }
        let load = |name: &str, feats: &[&str]| match Model::load(dir, name)
            .and_then(|m| m.schema.expect_features(feats).map(|_| m))
        {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::error!("model {name} not used: {e}; its lever runs the heuristic");
                eprintln!("kiln policy: model {name} not used: {e}; its lever runs the heuristic");
                None
            }
        };
        Models {
            balloon: load("balloon", &BALLOON_FEATURES),
            cpu: load("cpu", &CPU_FEATURES),
            device: load("device", &DEVICE_FEATURES),
        }
    }
}

/// True when the guest has taken memory back from its balloon on OOM
/// (VIRTIO_BALLOON_F_DEFLATE_ON_OOM): the memory in force is above the target
/// the host set and did not fall since the last sample (so it is not an
/// inflation still under way).
pub fn deflated_on_oom(ctx: &Ctx, v: usize) -> bool {
    let (Some(h), Some(st)) = (ctx.hist.vms.get(v), ctx.state.get(v)) else {
        return false;
    };
    let mut w = h.window(2);
    let (Some(a), b) = (w.next(), w.next()) else {
        return false;
    };
    let (prev, now) = match b {
        Some(b) => (a.actual_mib, b.actual_mib),
        None => (a.actual_mib, a.actual_mib),
    };
    now > st.balloon_target_mib + 1.0 && now >= prev
}

const LEVERS: [Lever; 3] = [Lever::Balloon, Lever::Vcpu, Lever::Device];

fn lever_index(l: Lever) -> usize {
    match l {
        Lever::Balloon => 0,
        Lever::Vcpu => 1,
        Lever::Device => 2,
    }
}

/// Only devices this busy are worth polling.
pub const POLL_MIN_IOPS: f64 = 2000.0;
/// Most requests per second one polling thread takes on (keeps its queue short).
pub const POLLER_MAX_IOPS: f64 = 40_000.0;

/// Headroom over the predicted working-set peak the balloon leaves the guest.
pub const BALLOON_HEADROOM: f64 = 0.10;
/// Fixed slack on top, MiB (kernel buffers that never show as "available").
pub const BALLOON_SLACK_MIB: f64 = 32.0;

pub struct Engine {
    pub mode: Mode,
    pub cfg: GuardConfig,
    pub models: Models,
    pub audit: AuditLog,
    /// Interventions by guardrail name.
    pub interventions: BTreeMap<&'static str, u64>,
    name: String,
    fb_balloon: Vpa,
    fb_cpu: PackSpread,
    fb_device: LocalNotify,
    start_s: Option<f64>,
    now_s: f64,
    last_balloon_change: Vec<Option<f64>>,
    last_escape: Vec<Option<f64>>,
    last_oom: Vec<Option<f64>>,
    /// Control intervals in a row each VM has been under memory pressure.
    pressure_rounds: Vec<u32>,
    last_device_change: Vec<Option<f64>>,
    poll_cpu: Vec<Option<u32>>,
    node_of: Vec<Option<usize>>,
    last_plan_s: f64,
    plan: Option<Vec<Vec<VcpuPlacement>>>,
    load: Vec<f64>,
    monitors: [RollbackMonitor; 3],
    rolled_back_until: [f64; 3],
    /// Per lever in this round: is a model deciding?
    model_on: [bool; 3],
    /// Wall time of each (VM, lever) decision, µs.
    pub decision_us: Vec<f32>,
}

impl Engine {
    pub fn new(mode: Mode, cfg: GuardConfig, models: Models, audit: AuditLog) -> Engine {
        let w = cfg.rollback_window_s;
        let monitors = [
            RollbackMonitor::new(w, 0.0, 0.0, Some(cfg.rollback_swap_pct_per_min)),
            RollbackMonitor::new(w, cfg.rollback_wait_rel, 1.0, None),
            RollbackMonitor::new(w, cfg.rollback_io_rel, 0.0, None),
        ];
        Engine {
            mode,
            cfg,
            models,
            audit,
            interventions: BTreeMap::new(),
            name: "learned".into(),
            fb_balloon: Vpa::conservative(),
            fb_cpu: PackSpread::default(),
            fb_device: LocalNotify,
            start_s: None,
            now_s: 0.0,
            last_balloon_change: Vec::new(),
            last_escape: Vec::new(),
            last_oom: Vec::new(),
            pressure_rounds: Vec::new(),
            last_device_change: Vec::new(),
            poll_cpu: Vec::new(),
            node_of: Vec::new(),
            last_plan_s: f64::NEG_INFINITY,
            plan: None,
            load: Vec::new(),
            monitors,
            rolled_back_until: [f64::NEG_INFINITY; 3],
            model_on: [false; 3],
            decision_us: Vec::new(),
        }
    }

    pub fn with_name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    /// The heuristic balloon's working-set window, s (a target is proposed
    /// once one window has closed). The daemon sets it from its settings.
    pub fn with_balloon_window_s(mut self, window_s: f64) -> Self {
        self.fb_balloon.window_s = window_s;
        self
    }

    fn fire(&mut self, name: &'static str) {
        *self.interventions.entry(name).or_default() += 1;
    }

    fn model_for(&self, l: Lever) -> bool {
        self.model_on[lever_index(l)]
    }

    /// Feeds the guarded metrics and rolls a lever back when its metric worsened.
    fn watch_metrics(&mut self, ctx: &Ctx) {
        let hs = &ctx.hist.vms;
        let lasts: Vec<_> = hs
            .iter()
            .filter_map(|h| h.last().map(|o| (h.class, *o)))
            .collect();
        if lasts.is_empty() {
            return;
        }
        let ws: f64 = lasts.iter().map(|(_, o)| o.ws_mib).sum();
        let oom = lasts.iter().any(|(_, o)| o.oom_kills > 0)
            || (0..hs.len()).any(|v| deflated_on_oom(ctx, v));
        let swap = 100.0
            * lasts
                .iter()
                .map(|(_, o)| o.swap_in_mib_per_min)
                .sum::<f64>()
            / ws.max(1.0);
        let balloon_metric = if oom { 100.0 } else { swap };
        let lc: Vec<f64> = lasts
            .iter()
            .filter(|(c, _)| *c == Some(VmClass::LatencyCritical))
            .map(|(_, o)| o.wait_ms)
            .collect();
        let wait = lc.iter().sum::<f64>() / lc.len().max(1) as f64;
        let reqs: f64 = lasts.iter().map(|(_, o)| o.iops).sum();
        let io = lasts
            .iter()
            .map(|(_, o)| o.iops * o.io_latency_us)
            .sum::<f64>()
            / reqs.max(1e-9);
        let metrics = [balloon_metric, wait, io];
        for (k, lever) in LEVERS.iter().enumerate() {
            if !self.model_on[k] {
                self.monitors[k].baseline_sample(metrics[k]);
                continue;
            }
            if let Some(why) = self.monitors[k].model_sample(self.now_s, metrics[k]) {
                self.rolled_back_until[k] = self.now_s + self.cfg.rollback_cooldown_s;
                self.model_on[k] = false;
                self.monitors[k].reset_window();
                self.fire(names::ROLLBACK);
                let msg = format!(
                    "{lever:?} model rolled back to the heuristic for {:.0} s: {why}",
                    self.cfg.rollback_cooldown_s
                );
                tracing::warn!("{msg}");
                self.audit.record(AuditRecord {
                    t_s: self.now_s,
                    vm: "*".into(),
                    lever: *lever,
                    mode: self.mode.name().into(),
                    inputs: vec![("guarded_metric".into(), metrics[k] as f32)],
                    model: None,
                    raw_output: None,
                    action: "rollback to heuristic".into(),
                    guardrails: vec![names::ROLLBACK.into()],
                    reason: msg,
                });
            }
        }
    }

    /// Runs a model on one or more rows with the model-side guardrails; Err
    /// names the guardrail that sent the decision to the heuristic.
    fn infer(&mut self, l: Lever, rows: &[f32]) -> Result<Vec<f32>, &'static str> {
        let slack = self.cfg.ood_slack;
        let budget = self.cfg.time_budget_us;
        let model = match l {
            Lever::Balloon => self.models.balloon.as_mut(),
            Lever::Vcpu => self.models.cpu.as_mut(),
            Lever::Device => self.models.device.as_mut(),
        }
        .ok_or(names::MODEL_ERROR)?;
        let k = model.schema.features.len();
        for row in rows.chunks(k) {
            g::validate_inputs(row).map_err(|_| names::INPUT_INVALID)?;
            if model.schema.out_of_distribution(row, slack).is_some() {
                return Err(names::OOD);
            }
        }
        let t = Instant::now();
        let out = model.predict(rows).map_err(|e| {
            tracing::error!("{e}");
            names::MODEL_ERROR
        })?;
        if t.elapsed().as_secs_f64() * 1e6 > budget {
            return Err(names::TIME_BUDGET);
        }
        let (lo, hi) = (model.schema.output_min, model.schema.output_max);
        Ok(out
            .into_iter()
            .map(|x| if x.is_finite() { x.clamp(lo, hi) } else { lo })
            .collect())
    }

    fn model_tag(&self, l: Lever) -> Option<String> {
        let m = match l {
            Lever::Balloon => self.models.balloon.as_ref(),
            Lever::Vcpu => self.models.cpu.as_ref(),
            Lever::Device => self.models.device.as_ref(),
        }?;
        Some(format!("{}@{}", m.schema.name, m.schema.version))
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        ctx: &Ctx,
        v: usize,
        lever: Lever,
        inputs: (&[&str], &[f32]),
        model: bool,
        raw: Option<f32>,
        action: String,
        guards: Vec<&'static str>,
        reason: String,
    ) {
        self.audit.record(AuditRecord {
            t_s: ctx.snap.t_s,
            vm: ctx.snap.vms[v].id.clone(),
            lever,
            mode: self.mode.name().into(),
            inputs: inputs
                .0
                .iter()
                .zip(inputs.1)
                .map(|(n, x)| (n.to_string(), *x))
                .collect(),
            model: if model { self.model_tag(lever) } else { None },
            raw_output: raw,
            action,
            guardrails: guards.iter().map(|s| s.to_string()).collect(),
            reason,
        });
    }

    fn decide_balloon(&mut self, ctx: &Ctx, v: usize) -> Option<f64> {
        let t0 = Instant::now();
        let r = self.decide_balloon_inner(ctx, v);
        self.decision_us
            .push((t0.elapsed().as_secs_f64() * 1e6) as f32);
        r
    }

    fn decide_balloon_inner(&mut self, ctx: &Ctx, v: usize) -> Option<f64> {
        let vm = &ctx.snap.vms[v];
        // The heuristic sees every round so its history is complete when needed.
        let heuristic = self.fb_balloon.target(ctx, v);
        let o = *ctx.hist.vms.get(v)?.last()?;
        let cur = ctx.state[v].balloon_target_mib;
        let mem = vm.mem_mib;
        let mut guards: Vec<&'static str> = Vec::new();
        let mut raw = None;
        let mut from_model = false;
        let row = balloon_features(ctx.hist, v);
        let mut proposal = None;
        let mut why = String::new();
        if self.model_for(Lever::Balloon) {
            if let Some(row) = row {
                match self.infer(Lever::Balloon, &row) {
                    Ok(out) => {
                        let r = out[0] as f64;
                        raw = Some(out[0]);
                        from_model = true;
                        let peak = o.ws_mib * r;
                        proposal = Some(peak * (1.0 + BALLOON_HEADROOM) + BALLOON_SLACK_MIB);
                        why = format!(
                            "predicted 10-min working-set peak {peak:.0} MiB ({r:.3} x {:.0}), headroom {:.0}%",
                            o.ws_mib,
                            BALLOON_HEADROOM * 100.0
                        );
                    }
                    Err(guard) => {
                        self.fire(guard);
                        guards.push(guard);
                    }
                }
            }
        }
        if !from_model {
            proposal = heuristic;
            why = format!(
                "heuristic (VPA-like p90 of 5-min working-set peaks + 15%), working set {:.0} MiB",
                o.ws_mib
            );
        }
        // Pressure: swap-ins, major faults while the host has room, an OOM
        // kill, or the guest took memory back from its balloon on OOM.
        let oom_grade = o.oom_kills > 0 || deflated_on_oom(ctx, v);
        let faulting = ctx.snap.host.psi_memory.some_avg10 < self.cfg.balloon_host_quiet_psi
            && o.major_faults_per_s > self.cfg.balloon_fault_rate_per_s;
        let pressure = oom_grade || o.swap_in_mib_per_min > 0.0 || faulting;
        self.pressure_rounds[v] = if pressure {
            self.pressure_rounds[v] + 1
        } else {
            0
        };
        if pressure {
            // Never trade an OOM for reclaim: at OOM grade the guest gets all its
            // memory back; otherwise the escape doubles each interval it is still short.
            let share = if oom_grade {
                1.0
            } else {
                g::escape_share(self.cfg.balloon_escape, self.pressure_rounds[v])
            };
            let escape = (o.actual_mib.max(cur) + share * mem).min(mem);
            if oom_grade {
                self.last_oom[v] = Some(ctx.snap.t_s);
            }
            if proposal.is_none_or(|p| p < escape) {
                proposal = Some(escape);
                self.fire(names::ESCAPE);
                guards.push(names::ESCAPE);
                why = format!(
                    "guest under memory pressure ({}swapped in {:.1} MiB/min, {:.0} major faults/s): giving back {:.0}% of its memory",
                    if oom_grade { "OOM: " } else { "" },
                    o.swap_in_mib_per_min,
                    o.major_faults_per_s,
                    share * 100.0
                );
            }
        }
        let mut target = proposal?;
        let (t, hit) = g::balloon_need_bound(
            target,
            o.ws_mib,
            self.cfg.balloon_need_margin,
            self.cfg.balloon_need_slack_mib,
        );
        if hit {
            self.fire(names::GUEST_NEED);
            guards.push(names::GUEST_NEED);
        }
        target = t;
        let (t, hit) = g::balloon_bounds(target, vm.floor_mib, mem);
        if hit && (target < vm.floor_mib) {
            self.fire(names::HARD_BOUND);
            guards.push(names::HARD_BOUND);
        }
        target = t;
        let (t, hit) = g::balloon_step(
            cur,
            target,
            mem,
            self.cfg.balloon_max_inflate,
            self.cfg.balloon_max_deflate,
        );
        if hit {
            self.fire(names::MAX_STEP);
            guards.push(names::MAX_STEP);
        }
        target = t;
        let since_escape = self.last_escape[v]
            .map(|t| ctx.snap.t_s - t)
            .unwrap_or(f64::INFINITY);
        if guards.contains(&names::ESCAPE) {
            self.last_escape[v] = Some(ctx.snap.t_s);
        } else if target < cur
            && (since_escape < self.cfg.balloon_escape_hold_s
                || self.last_oom[v].is_some_and(|t| ctx.snap.t_s - t < self.cfg.balloon_oom_hold_s))
        {
            // Right after the guest ran short, do not take memory again.
            self.fire(names::MIN_INTERVAL);
            return None;
        }
        if target < cur
            && g::too_soon(
                self.last_balloon_change[v],
                ctx.snap.t_s,
                self.cfg.balloon_min_interval_s,
            )
        {
            self.fire(names::MIN_INTERVAL);
            return None;
        }
        if g::within_dead_band(cur, target, mem, self.cfg.balloon_dead_band) {
            self.fire(names::HYSTERESIS);
            return None;
        }
        self.last_balloon_change[v] = Some(ctx.snap.t_s);
        let delta = target - cur;
        let action = format!(
            "balloon {cur:.0} -> {target:.0} MiB ({}{:.0} MiB for the guest)",
            if delta >= 0.0 { "+" } else { "" },
            delta
        );
        let reason = format!("{action}: {why}");
        let feats = row.map(|r| r.to_vec()).unwrap_or_default();
        self.record(
            ctx,
            v,
            Lever::Balloon,
            (&BALLOON_FEATURES, &feats),
            from_model,
            raw,
            action,
            guards,
            reason,
        );
        Some(target)
    }

    /// Predicted CPU demand (vCPUs' worth) per VM; None for VMs without history.
    fn predict_cpu(&mut self, ctx: &Ctx) -> Vec<(f64, Option<f32>, Vec<f32>)> {
        let n = ctx.snap.vms.len();
        let mut out = Vec::with_capacity(n);
        for v in 0..n {
            let t0 = Instant::now();
            let p = self.predict_cpu_vm(ctx, v);
            self.decision_us
                .push((t0.elapsed().as_secs_f64() * 1e6) as f32);
            out.push(p);
        }
        out
    }

    fn predict_cpu_vm(&mut self, ctx: &Ctx, v: usize) -> (f64, Option<f32>, Vec<f32>) {
        {
            let Some(h) = ctx.hist.vms.get(v) else {
                return (0.0, None, Vec::new());
            };
            let w = ctx.hist.steps(300.0);
            let recent =
                h.window(w).map(|o| o.cpu).sum::<f64>() / h.window(w).count().max(1) as f64;
            let Some(row) = cpu_features(ctx.hist, v) else {
                return (recent, None, Vec::new());
            };
            if self.model_for(Lever::Vcpu) {
                match self.infer(Lever::Vcpu, &row) {
                    Ok(p) => return (p[0] as f64 * h.vcpus as f64, Some(p[0]), row.to_vec()),
                    Err(guard) => self.fire(guard),
                }
            }
            (recent, None, row.to_vec())
        }
    }

    /// Learned CPU plan: LC exclusive, every other VM on one NUMA node's shared
    /// CPUs, nodes balanced on predicted demand, few moves per plan.
    fn learned_plan(&mut self, ctx: &Ctx) -> Vec<Vec<VcpuPlacement>> {
        let host = ctx.host;
        let n = ctx.snap.vms.len();
        let preds = self.predict_cpu(ctx);
        let (lc, excl) = lc_exclusive(host, &classes(ctx));
        let polls = CpuSet::new(self.poll_cpu.iter().flatten().copied().collect());
        let shared: Vec<CpuSet> = host
            .numa_nodes
            .iter()
            .map(|s| s.minus(&excl).minus(&polls))
            .collect();
        let cap: Vec<f64> = shared.iter().map(|s| s.len() as f64 * 0.85).collect();
        let mut load = vec![0.0; shared.len()];
        let mut order: Vec<usize> = (0..n).filter(|&v| lc[v].is_none()).collect();
        order.sort_by(|&a, &b| preds[b].0.total_cmp(&preds[a].0).then(a.cmp(&b)));
        for &v in &order {
            if let Some(nd) = self.node_of[v] {
                load[nd] += preds[v].0;
            }
        }
        for &v in &order {
            if self.node_of[v].is_none() {
                let nd = (0..shared.len())
                    .max_by(|&a, &b| {
                        (cap[a] - load[a])
                            .total_cmp(&(cap[b] - load[b]))
                            .then(b.cmp(&a))
                    })
                    .unwrap_or(0);
                self.node_of[v] = Some(nd);
                load[nd] += preds[v].0;
            }
        }
        let mut moved = 0;
        while moved < self.cfg.cpu_max_moves {
            let ratio = |k: usize| load[k] / cap[k].max(1e-9);
            let Some(hot) = (0..shared.len()).max_by(|&a, &b| ratio(a).total_cmp(&ratio(b))) else {
                break;
            };
            if ratio(hot) <= 1.0 + self.cfg.cpu_hysteresis {
                break;
            }
            let Some(cold) = (0..shared.len()).min_by(|&a, &b| ratio(a).total_cmp(&ratio(b)))
            else {
                break;
            };
            let excess = load[hot] - cap[hot];
            // Move the VM whose demand best matches the excess and fits the cold node.
            let cand = order
                .iter()
                .copied()
                .filter(|&v| self.node_of[v] == Some(hot) && load[cold] + preds[v].0 <= cap[cold])
                .min_by(|&a, &b| {
                    (preds[a].0 - excess)
                        .abs()
                        .total_cmp(&(preds[b].0 - excess).abs())
                });
            let Some(v) = cand else { break };
            self.node_of[v] = Some(cold);
            load[hot] -= preds[v].0;
            load[cold] += preds[v].0;
            moved += 1;
        }
        let weight = |c: VmClass| match c {
            VmClass::LatencyCritical => 4.0,
            // Shared-pool guests compete as equals: favouring one class would
            // move throughput between classes, not create it.
            _ => 1.0,
        };
        let mut plan: Vec<Vec<VcpuPlacement>> = Vec::with_capacity(n);
        for (v, l) in lc.into_iter().enumerate() {
            let vm = &ctx.snap.vms[v];
            let p = match l {
                Some(p) => p,
                None => {
                    let nd = self.node_of[v].unwrap_or(0);
                    let set = if shared[nd].is_empty() {
                        host.all_cpus().minus(&excl)
                    } else {
                        shared[nd].clone()
                    };
                    vec![
                        VcpuPlacement {
                            cpus: set,
                            weight: weight(vm.class),
                            exclusive: false
                        };
                        vm.vcpus.len()
                    ]
                }
            };
            if ctx.state[v].vcpus != p {
                let (pred, raw, row) = &preds[v];
                let action = format!("vCPUs -> {} (weight {})", p[0].cpus, p[0].weight);
                let why = if p[0].exclusive {
                    "latency-critical: exclusive CPUs in one cache group".to_string()
                } else if raw.is_some() {
                    format!(
                        "predicted p90 demand {pred:.2} vCPUs; node {} load {:.1}/{:.1} CPUs",
                        self.node_of[v].unwrap_or(0),
                        load[self.node_of[v].unwrap_or(0)],
                        cap[self.node_of[v].unwrap_or(0)]
                    )
                } else {
                    format!("recent demand {pred:.2} vCPUs (no model prediction)")
                };
                let reason = format!("{action}: {why}");
                self.record(
                    ctx,
                    v,
                    Lever::Vcpu,
                    (&CPU_FEATURES, row),
                    raw.is_some(),
                    *raw,
                    action,
                    vec![],
                    reason,
                );
            }
            plan.push(p);
        }
        plan
    }

    fn plan_cpus(&mut self, ctx: &Ctx) -> Option<Vec<Vec<VcpuPlacement>>> {
        if ctx.snap.t_s - self.last_plan_s < self.cfg.cpu_min_interval_s {
            return None;
        }
        self.last_plan_s = ctx.snap.t_s;
        // Workers on CPUs that become exclusive are moved by decide_device in
        // this same round (that hard bound overrides its interval), so only
        // the vCPU side of exclusivity is checked here.
        let devices: Vec<Option<&DevicePlacement>> = Vec::new();
        if self.model_for(Lever::Vcpu) {
            let plan = self.learned_plan(ctx);
            match g::check_exclusive(&plan, &devices) {
                Ok(()) => return Some(plan),
                Err(e) => {
                    self.fire(names::EXCLUSIVE);
                    tracing::warn!("learned CPU plan refused: {e}; using pack/spread");
                }
            }
        }
        self.fb_cpu.plan_now(ctx).filter(|p| {
            let ok = g::check_exclusive(p, &devices).is_ok();
            if !ok {
                self.interventions
                    .entry(names::EXCLUSIVE)
                    .and_modify(|c| *c += 1)
                    .or_insert(1);
            }
            ok
        })
    }

    fn decide_device(
        &mut self,
        ctx: &Ctx,
        v: usize,
        vcpus: &[VcpuPlacement],
        plan: Option<&[Vec<VcpuPlacement>]>,
    ) -> Option<DevicePlacement> {
        let t0 = Instant::now();
        let r = self.decide_device_inner(ctx, v, vcpus, plan);
        self.decision_us
            .push((t0.elapsed().as_secs_f64() * 1e6) as f32);
        r
    }

    fn decide_device_inner(
        &mut self,
        ctx: &Ctx,
        v: usize,
        vcpus: &[VcpuPlacement],
        plan: Option<&[Vec<VcpuPlacement>]>,
    ) -> Option<DevicePlacement> {
        let host = ctx.host;
        let (_, cur) = ctx.state[v].devices.first()?.clone();
        let mut excl = Vec::new();
        for (k, st) in ctx.state.iter().enumerate() {
            let ps = plan.and_then(|p| p.get(k)).unwrap_or(&st.vcpus);
            for p in ps.iter().filter(|p| p.exclusive) {
                excl.extend_from_slice(p.cpus.cpus());
            }
        }
        let excl = CpuSet::new(excl);
        let on_exclusive = cur.cpus.intersects(&excl);
        if on_exclusive {
            self.fire(names::EXCLUSIVE);
        } else if g::too_soon(
            self.last_device_change[v],
            ctx.snap.t_s,
            self.cfg.device_min_interval_s,
        ) {
            return None;
        }
        let obs = ctx.hist.vms.get(v).and_then(|h| h.last()).copied();
        if !self.model_for(Lever::Device) || obs.is_none() {
            if obs.is_none() && !on_exclusive {
                return None;
            }
            let p = self.fb_device.place(ctx, v, vcpus, &self.load)?;
            if p == cur || p.cpus.intersects(&excl) {
                return None;
            }
            self.last_device_change[v] = Some(ctx.snap.t_s);
            self.poll_cpu[v] = None;
            let action = format!("I/O worker -> CPUs {} ({:?})", p.cpus, p.mode);
            self.record(
                ctx,
                v,
                Lever::Device,
                (&[], &[]),
                false,
                None,
                action.clone(),
                vec![],
                format!("{action}: heuristic: notify on the vCPUs' cache group"),
            );
            return Some(p);
        }
        let o = obs?;
        let pollers = CpuSet::new(
            self.poll_cpu
                .iter()
                .enumerate()
                .filter(|(k, _)| *k != v)
                .filter_map(|(_, c)| *c)
                .collect(),
        );
        let avoid = excl.union(&pollers);
        let gi = home_group(host, vcpus);
        let node = host.group_node[gi];
        let group = host.cache_groups[gi].minus(&avoid);
        let node_set = host.numa_nodes[node].minus(&avoid);
        let all = host.all_cpus().minus(&avoid);
        let mut cands: Vec<DevicePlacement> = vec![cur.clone()];
        for s in [&group, &node_set, &all] {
            if !s.is_empty() {
                cands.push(DevicePlacement {
                    cpus: s.clone(),
                    mode: IoMode::Notify,
                });
            }
        }
        // Traffic each polling thread already serves (other VMs' devices).
        let peer_iops = |c: u32| -> f64 {
            self.poll_cpu
                .iter()
                .enumerate()
                .filter(|(k, p)| *k != v && **p == Some(c))
                .map(|(k, _)| {
                    ctx.hist
                        .vms
                        .get(k)
                        .and_then(|h| h.last())
                        .map(|o| o.iops)
                        .unwrap_or(0.0)
                })
                .sum()
        };
        if o.iops >= POLL_MIN_IOPS {
            // Join a poller on this VM's NUMA node with room...
            for &c in pollers.cpus() {
                if host.cpu_node[c as usize] == node && peer_iops(c) + o.iops <= POLLER_MAX_IOPS {
                    cands.push(DevicePlacement {
                        cpus: CpuSet::single(c),
                        mode: IoMode::Poll,
                    });
                }
            }
            // ...or start one, within the budget.
            let budget = (host.cpus as usize / self.cfg.cpus_per_poller.max(1)).max(1);
            if self.poll_cpu[v].is_none() && pollers.len() < budget {
                let pool = if group.is_empty() { &node_set } else { &group };
                if let Some(c) = pool
                    .cpus()
                    .iter()
                    .copied()
                    .min_by(|a, b| self.load[*a as usize].total_cmp(&self.load[*b as usize]))
                {
                    cands.push(DevicePlacement {
                        cpus: CpuSet::single(c),
                        mode: IoMode::Poll,
                    });
                }
            }
        }
        let mut rows = Vec::with_capacity(cands.len() * DEVICE_FEATURES.len());
        for d in &cands {
            let peers = if d.mode == IoMode::Poll {
                peer_iops(d.cpus.cpus()[0])
            } else {
                0.0
            };
            rows.extend_from_slice(&placement_features(
                host,
                vcpus,
                d,
                &self.load,
                o.iops,
                d == &cur,
                peers,
            ));
        }
        let pred = match self.infer(Lever::Device, &rows) {
            Ok(p) => p,
            Err(guard) => {
                self.fire(guard);
                let p = self.fb_device.place(ctx, v, vcpus, &self.load)?;
                if p == cur {
                    return None;
                }
                self.last_device_change[v] = Some(ctx.snap.t_s);
                self.poll_cpu[v] = None;
                self.record(
                    ctx,
                    v,
                    Lever::Device,
                    (&[], &[]),
                    false,
                    None,
                    format!("I/O worker -> CPUs {} (notify)", p.cpus),
                    vec![guard],
                    "heuristic after a model guardrail".into(),
                );
                return Some(p);
            }
        };
        let best = (1..cands.len()).min_by(|&a, &b| pred[a].total_cmp(&pred[b]))?;
        let gain = (pred[0] - pred[best]) as f64;
        let cur_invalid =
            on_exclusive || (cur.mode == IoMode::Notify && cur.cpus.intersects(&avoid));
        if !cur_invalid && gain < self.cfg.device_min_gain_us {
            self.fire(names::HYSTERESIS);
            return None;
        }
        let chosen = cands[best].clone();
        if chosen == cur {
            return None;
        }
        self.poll_cpu[v] = (chosen.mode == IoMode::Poll).then(|| chosen.cpus.cpus()[0]);
        if self.poll_cpu[v].is_some() {
            // A new poller takes its CPU out of the shared pools at the next plan.
            self.last_plan_s = f64::NEG_INFINITY;
        }
        self.last_device_change[v] = Some(ctx.snap.t_s);
        let action = format!("I/O worker -> CPUs {} ({:?})", chosen.cpus, chosen.mode);
        let reason = format!("{action}: predicted latency {:.1} us above service time vs {:.1} us where it is ({:.0} IOPS)", pred[best], pred[0], o.iops);
        let k = DEVICE_FEATURES.len();
        let row = rows[best * k..(best + 1) * k].to_vec();
        self.record(
            ctx,
            v,
            Lever::Device,
            (&DEVICE_FEATURES, &row),
            true,
            Some(pred[best]),
            action,
            vec![],
            reason,
        );
        Some(chosen)
    }
}

impl PackSpread {
    /// A plan regardless of its own repack timer (the engine has its own).
    pub fn plan_now(&mut self, ctx: &Ctx) -> Option<Vec<Vec<VcpuPlacement>>> {
        self.reset_timer();
        self.plan(ctx)
    }
}

impl Policy for Engine {
    fn name(&self) -> &str {
        &self.name
    }

    fn begin_round(&mut self, ctx: &Ctx) {
        if self.mode == Mode::Off {
            return;
        }
        let n = ctx.snap.vms.len();
        if self.last_balloon_change.len() != n {
            self.last_balloon_change = vec![None; n];
            self.last_escape = vec![None; n];
            self.last_oom = vec![None; n];
            self.pressure_rounds = vec![0; n];
            self.last_device_change = vec![None; n];
            self.poll_cpu = vec![None; n];
            self.node_of = vec![None; n];
        }
        self.now_s = ctx.snap.t_s;
        let start = *self.start_s.get_or_insert(ctx.snap.t_s);
        let warm = ctx.snap.t_s - start < self.cfg.warmup_s;
        self.watch_metrics(ctx);
        let present = [
            self.models.balloon.is_some(),
            self.models.cpu.is_some(),
            self.models.device.is_some(),
        ];
        for (k, on) in self.model_on.iter_mut().enumerate() {
            *on = present[k] && !warm && self.now_s >= self.rolled_back_until[k];
        }
        self.fb_balloon.begin_round(ctx);
        self.plan = self.plan_cpus(ctx);
        self.load = estimate_cpu_load(ctx, self.plan.as_deref());
    }

    fn decide_vm(&mut self, ctx: &Ctx, v: usize) -> VmActions {
        if self.mode == Mode::Off {
            return VmActions::default();
        }
        let balloon_target_mib = self.decide_balloon(ctx, v);
        let plan = self.plan.take();
        let vcpus = plan.as_ref().and_then(|p| p.get(v).cloned());
        let in_force = vcpus.clone().unwrap_or_else(|| ctx.state[v].vcpus.clone());
        let device = self.decide_device(ctx, v, &in_force, plan.as_deref());
        self.plan = plan;
        let devices = match (device, ctx.state[v].devices.first()) {
            (Some(d), Some((name, _))) => vec![(name.clone(), d)],
            _ => Vec::new(),
        };
        match self.mode {
            Mode::Active => VmActions {
                vcpus,
                balloon_target_mib,
                devices,
            },
            _ => VmActions::default(),
        }
    }

    fn intervention_breakdown(&self) -> Option<String> {
        let parts: Vec<String> = self
            .interventions
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        Some(if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        })
    }

    fn decision_latencies(&self) -> Option<&[f32]> {
        Some(&self.decision_us)
    }

    fn interventions(&self) -> u64 {
        self.interventions
            .iter()
            .filter(|(k, _)| **k != names::HYSTERESIS)
            .map(|(_, v)| v)
            .sum()
    }
}

/// Device model inputs for worker placement `d` of a VM whose vCPUs are
/// `vcpus`, given estimated CPU loads (which include the worker in force when
/// `in_force`, so its own load is taken out). `peer_iops`: traffic of other
/// devices on the same polling thread.
pub fn placement_features(
    host: &crate::host::Host,
    vcpus: &[VcpuPlacement],
    d: &DevicePlacement,
    load: &[f64],
    iops: f64,
    in_force: bool,
    peer_iops: f64,
) -> [f32; 7] {
    let mut vg = vec![0.0; host.cache_groups.len()];
    let mut vn = vec![0.0; host.numa_nodes.len()];
    for p in vcpus {
        for &c in p.cpus.cpus() {
            vg[host.cpu_group[c as usize]] += 1.0 / (p.cpus.len() * vcpus.len()) as f64;
            vn[host.cpu_node[c as usize]] += 1.0 / (p.cpus.len() * vcpus.len()) as f64;
        }
    }
    let size = d.cpus.len().max(1) as f64;
    let mut other = d
        .cpus
        .cpus()
        .iter()
        .map(|&c| load.get(c as usize).copied().unwrap_or(0.0))
        .sum::<f64>()
        / size;
    if d.mode == IoMode::Poll {
        // A polling thread's CPU is taken out of the shared vCPU pools (the
        // engine re-plans as soon as a poller appears), so nothing else runs there.
        other = 0.0;
    } else if in_force {
        let own = if d.mode == IoMode::Poll {
            1.0
        } else {
            iops * crate::sim::model::IO_CPU_US * 1e-6
        };
        other -= own / size;
    }
    let (mut sg, mut sn) = (0.0, 0.0);
    for &c in d.cpus.cpus() {
        sg += vg[host.cpu_group[c as usize]] / size;
        sn += vn[host.cpu_node[c as usize]] / size;
    }
    device_features(
        iops,
        d.mode == IoMode::Poll,
        other.max(0.0),
        d.cpus.len(),
        sg,
        sn,
        peer_iops,
    )
}
