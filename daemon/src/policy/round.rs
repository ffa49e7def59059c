//! One control round, as the simulator drives a policy: telemetry into
//! the history, the engine decides for every VM, then per decision and
//! lever: off records nothing, shadow records and calls no actuator,
//! active acts (unless the lever backs off after a failure) and reads back.

use std::collections::HashMap;
use std::time::Instant;

use kiln_api::engine::{
    Decision, DecisionInput, DecisionOutcome, Lever, LeverMode, PolicySettings, PolicyWindows,
};
use kiln_policy::audit::{AuditLog, AuditQuery, AuditRecord, Lever as EngineLever};
use kiln_policy::decision::{VcpuPlacement, VmActions, VmState};
use kiln_policy::engine::{Engine, Mode, Models};
use kiln_policy::features::History;
use kiln_policy::guardrails::GuardConfig;
use kiln_policy::live::LiveHost;
use kiln_policy::policies::{Ctx, Policy};
use kiln_policy::telemetry::TelemetrySource;

use super::actuate::{self, Backoff, Ops};
use super::telemetry::{self, Sample};

/// Audit records the engine may produce in one round before the oldest go.
const AUDIT_PER_ROUND: usize = 4096;

pub fn lever_of(l: EngineLever) -> Lever {
    match l {
        EngineLever::Balloon => Lever::Balloon,
        EngineLever::Vcpu => Lever::Vcpu,
        EngineLever::Device => Lever::Worker,
    }
}

/// The mode a lever has for one VM: the host's (all_off wins), off where
/// the VM opted out.
pub fn vm_mode(
    settings: &PolicySettings,
    policy: &kiln_api::engine::VmPolicy,
    l: Lever,
) -> LeverMode {
    if policy.opted_out(l) {
        LeverMode::Off
    } else {
        settings.effective(l)
    }
}

/// The engine's guardrail settings for the daemon's windows.
pub fn guard_config(w: &PolicyWindows) -> GuardConfig {
    GuardConfig {
        warmup_s: w.model_warmup_s,
        rollback_window_s: w.rollback_window_s,
        balloon_min_interval_s: w.balloon_min_interval_s,
        ..GuardConfig::default()
    }
}

pub fn engine(models: Models, w: &PolicyWindows) -> Engine {
    Engine::new(
        Mode::Active,
        guard_config(w),
        models,
        AuditLog::new(AUDIT_PER_ROUND),
    )
    .with_name("kiln-serve")
    .with_balloon_window_s(w.balloon_window_s)
}

/// The engine and what it remembers between rounds.
pub struct Controller {
    engine: Engine,
    live: LiveHost,
    hist: History,
    windows: PolicyWindows,
    /// Builds fresh models when the windows change (the engine is rebuilt).
    reload: Box<dyn Fn() -> Models + Send>,
    backoff: HashMap<(String, Lever), Backoff>,
    /// Last vCPU plan applied per VM (its `exclusive` flags).
    applied: HashMap<String, Vec<VcpuPlacement>>,
    /// The VMs the live host watches now.
    watched: Vec<String>,
    /// The effective mode of each lever the engine was built for.
    modes: Option<[LeverMode; 3]>,
}

/// What a round produced.
#[derive(Debug, Default)]
pub struct RoundReport {
    pub decisions: Vec<Decision>,
    /// Failed actuator calls, by lever.
    pub failures: Vec<Lever>,
    /// Time the engine took (telemetry ingest, decisions, actuators), µs.
    pub engine_us: u64,
}

impl Controller {
    pub fn new(
        live: LiveHost,
        models: Models,
        windows: PolicyWindows,
        interval_s: f64,
        reload: Box<dyn Fn() -> Models + Send>,
    ) -> Controller {
        let mut hist = History::new();
        hist.step_s = interval_s;
        Controller {
            engine: engine(models, &windows),
            live,
            hist,
            windows,
            reload,
            backoff: HashMap::new(),
            applied: HashMap::new(),
            watched: Vec::new(),
            modes: None,
        }
    }

    pub fn host_cpus(&self) -> u32 {
        self.live.host().cpus
    }

    /// One round over the VMs that answered.
    pub fn round(
        &mut self,
        samples: &[Sample],
        settings: &PolicySettings,
        ops: &mut dyn Ops,
        now_ms: u64,
    ) -> Result<RoundReport, String> {
        let t0 = Instant::now();
        let modes = Lever::ALL.map(|l| settings.effective(l));
        let switched = self.modes.is_some_and(|m| m != modes);
        self.modes = Some(modes);
        if settings.windows != self.windows || switched {
            // The engine's timers assume its decisions took effect; after a
            // switch (shadow to active, say) it starts afresh and decides
            // again at once rather than a min-interval later.
            self.windows = settings.windows;
            self.engine = engine((self.reload)(), &self.windows);
            tracing::info!("policy modes or windows changed: the engine starts afresh");
        }
        if self.hist.vms.is_empty() {
            self.hist.step_s = settings.interval_ms as f64 / 1000.0;
        }
        let names: Vec<&str> = samples.iter().map(|s| s.target.name.as_str()).collect();
        let gone: Vec<String> = self
            .applied
            .keys()
            .filter(|n| !names.contains(&n.as_str()))
            .cloned()
            .collect();
        for n in gone {
            self.applied.remove(&n);
        }
        // Watch exactly the VMs that answered, in this round's order (the
        // snapshot's VM index is the sample's).
        for name in self.watched.drain(..) {
            self.live.unwatch(&name);
        }
        for s in samples {
            self.live.watch(telemetry::watched(s));
            self.watched.push(s.target.name.clone());
        }
        let host_cpus = self.live.host().cpus;
        let snap = self.live.sample().map_err(|e| e.to_string())?;
        self.hist.ingest(&snap);
        let state: Vec<VmState> = samples
            .iter()
            .map(|s| {
                telemetry::state(
                    s,
                    ops,
                    host_cpus,
                    self.applied.get(&s.target.name).map(Vec::as_slice),
                )
            })
            .collect();
        let host = self.live.host().clone();
        let actions: Vec<VmActions> = {
            let ctx = Ctx {
                host: &host,
                snap: &snap,
                hist: &self.hist,
                state: &state,
            };
            self.engine.begin_round(&ctx);
            (0..samples.len())
                .map(|v| self.engine.decide_vm(&ctx, v))
                .collect()
        };
        let audit = std::mem::replace(&mut self.engine.audit, AuditLog::new(AUDIT_PER_ROUND));
        let mut records: Vec<AuditRecord> = audit
            .query(&AuditQuery::default())
            .into_iter()
            .cloned()
            .collect();
        records.reverse();
        // vCPU plans first: the workers' placements were chosen against them.
        let records = {
            let mut all = heuristic_cpu_records(samples, &actions, &state, &records, snap.t_s);
            all.extend(records);
            all
        };
        let mut report = RoundReport::default();
        // Memory the engine may still hand back to guests this round.
        let mut reserve_left = snap.host.mem_available_mib - settings.host_reserve_mib as f64;
        for r in records {
            if r.vm == "*" {
                // A rollback of a model to the heuristic: logged by the engine.
                continue;
            }
            let Some(v) = samples.iter().position(|s| s.target.name == r.vm) else {
                continue;
            };
            let s = &samples[v];
            let lever = lever_of(r.lever);
            let mode = vm_mode(settings, &s.target.policy, lever);
            if mode == LeverMode::Off {
                continue;
            }
            let mut d = Decision {
                seq: 0,
                time_ms: now_ms,
                vm: r.vm.clone(),
                lever,
                mode,
                // Guest-fed inputs may be non-finite: JSON has no NaN, so
                // those are left out of the audit (the engine refused them).
                inputs: r
                    .inputs
                    .iter()
                    .filter(|(_, x)| x.is_finite())
                    .map(|(n, x)| DecisionInput {
                        name: n.clone(),
                        value: f64::from(*x),
                    })
                    .collect(),
                model: r.model.clone(),
                raw_output: r.raw_output.filter(|x| x.is_finite()).map(f64::from),
                action: r.action.clone(),
                guardrails: r.guardrails.clone(),
                reason: r.reason.clone(),
                outcome: DecisionOutcome::Shadow,
                detail: None,
            };
            if mode == LeverMode::Active {
                self.act(
                    &mut d,
                    s,
                    &actions[v],
                    &state[v],
                    &mut reserve_left,
                    host_cpus,
                    ops,
                    &mut report,
                );
            }
            report.decisions.push(d);
        }
        report.engine_us = t0.elapsed().as_micros() as u64;
        Ok(report)
    }

    /// Carries out an active decision (or says why not) and reads it back.
    #[allow(clippy::too_many_arguments)]
    fn act(
        &mut self,
        d: &mut Decision,
        s: &Sample,
        a: &VmActions,
        st: &VmState,
        reserve_left: &mut f64,
        host_cpus: u32,
        ops: &mut dyn Ops,
        report: &mut RoundReport,
    ) {
        let now = Instant::now();
        let key = (s.target.name.clone(), d.lever);
        if self.backoff.get(&key).is_some_and(|b| b.waiting(now)) {
            d.outcome = DecisionOutcome::BackingOff;
            d.detail = Some(format!(
                "not tried: the {} lever failed for this VM {} time(s) and waits",
                d.lever.as_str(),
                self.backoff[&key].failures()
            ));
            return;
        }
        let result = match d.lever {
            Lever::Balloon => match a.balloon_target_mib {
                Some(target) => {
                    let cur = st.balloon_target_mib;
                    let mut keep = target;
                    if keep > cur {
                        // Deflating hands host memory to the guest: never
                        // past what leaves the host its reserve.
                        let give = (keep - cur).min(reserve_left.max(0.0));
                        if give < keep - cur {
                            d.guardrails.push("host-reserve".into());
                            d.action = format!(
                                "{} (cut to +{give:.0} MiB: the host keeps its reserve)",
                                d.action
                            );
                        }
                        keep = cur + give;
                        *reserve_left -= give;
                    }
                    let taken = (s.target.memory_mib as f64 - keep).round().max(0.0) as u64;
                    actuate::balloon(ops, &s.target.control, taken)
                }
                None => Err("the engine recorded a balloon decision without a target".into()),
            },
            Lever::Vcpu => match &a.vcpus {
                Some(p) => {
                    let r = actuate::vcpus(
                        ops,
                        &telemetry::vcpu_tids(s),
                        p,
                        s.target.cgroup.as_deref(),
                    );
                    if r.is_ok() {
                        self.applied.insert(s.target.name.clone(), p.clone());
                    }
                    r
                }
                None => Err("the engine recorded a vCPU decision without a plan".into()),
            },
            Lever::Worker => match a.devices.first() {
                Some((device, p)) => actuate::worker(ops, &s.target.control, device, p, host_cpus),
                None => Err("the engine recorded a worker decision without a placement".into()),
            },
        };
        match result {
            Ok(()) => {
                d.outcome = DecisionOutcome::Applied;
                self.backoff.remove(&key);
            }
            Err(why) => {
                let (wait, first) = self.backoff.entry(key).or_default().failed(now);
                if first {
                    tracing::warn!(
                        "VM {}: the {} actuator failed: {why}; that lever waits {} s (doubling to 10 min) for this VM",
                        d.vm,
                        d.lever.as_str(),
                        wait.as_secs()
                    );
                }
                d.outcome = DecisionOutcome::Failed;
                d.detail = Some(format!("{why}; next try in {} s", wait.as_secs()));
                report.failures.push(d.lever);
            }
        }
    }
}

/// The engine audits the vCPU plans of its model, not those of its
/// pack/spread fallback: a fallback plan that moves a VM's vCPUs gets its
/// record here, in the same shape.
fn heuristic_cpu_records(
    samples: &[Sample],
    actions: &[VmActions],
    state: &[VmState],
    records: &[AuditRecord],
    t_s: f64,
) -> Vec<AuditRecord> {
    let same = |a: &[VcpuPlacement], b: &[VcpuPlacement]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.cpus == y.cpus && (x.weight - y.weight).abs() < 1e-9)
    };
    let mut out = Vec::new();
    for (v, s) in samples.iter().enumerate() {
        let Some(plan) = actions[v].vcpus.as_deref() else {
            continue;
        };
        let audited = records
            .iter()
            .any(|r| r.vm == s.target.name && r.lever == EngineLever::Vcpu);
        if audited || plan.is_empty() || same(plan, &state[v].vcpus) {
            continue;
        }
        let cpus: Vec<String> = plan.iter().map(|p| p.cpus.to_string()).collect();
        let action = format!("vCPUs -> {} (weight {})", cpus.join(" | "), plan[0].weight);
        let why = if plan[0].exclusive {
            "latency-critical: exclusive CPUs in one cache group"
        } else {
            "heuristic pack/spread: packed by recent demand into a cache group with room"
        };
        out.push(AuditRecord {
            t_s,
            vm: s.target.name.clone(),
            lever: EngineLever::Vcpu,
            mode: "active".into(),
            inputs: vec![],
            model: None,
            raw_output: None,
            reason: format!("{action}: {why}"),
            action,
            guardrails: vec![],
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::actuate::tests::Recording;
    use crate::policy::telemetry::Target;
    use kiln_api::engine::{VmClassHint, VmPolicy};

    /// A 2-CPU host with one shared L3 (like this machine) and one VMM
    /// (pid 77) whose vCPU thread is tid 78.
    fn fake_host(dir: &std::path::Path) -> LiveHost {
        let w = |p: &str, s: &str| {
            let path = dir.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, s).unwrap();
        };
        w("sys/devices/system/cpu/online", "0-1\n");
        for c in 0..2 {
            w(
                &format!("sys/devices/system/cpu/cpu{c}/cache/index3/shared_cpu_list"),
                "0-1\n",
            );
        }
        w(
            "proc/meminfo",
            "MemTotal: 4194304 kB\nMemAvailable: 2097152 kB\n",
        );
        for which in ["cpu", "memory", "io"] {
            w(
                &format!("proc/pressure/{which}"),
                "some avg10=0.00 avg60=0 avg300=0 total=0\n",
            );
        }
        w("proc/77/task/78/schedstat", "1000 10 1\n");
        LiveHost::open_at(&dir.join("sys"), &dir.join("proc")).unwrap()
    }

    fn sample(policy: VmPolicy) -> Sample {
        Sample {
            target: Target {
                name: "lc".into(),
                pid: 77,
                memory_mib: 512,
                policy,
                control: "/nonexistent/control.sock".into(),
                cgroup: None,
            },
            counters: serde_json::from_value(serde_json::json!({
                "vcpus": [{"index": 0, "tid": 78, "run_ns": 1000, "wait_ns": 10}],
                "devices": [{"id": "rng0", "busy_rounds": 0}],
            }))
            .unwrap(),
            workers: vec![serde_json::from_value(serde_json::json!({
                "device": "rng0", "tid": 79, "cpus": null, "wait": "notify", "busy_rounds": 0}))
            .unwrap()],
        }
    }

    fn lc() -> VmPolicy {
        VmPolicy {
            class: VmClassHint::LatencyCritical,
            ..Default::default()
        }
    }

    fn settings(mode: LeverMode) -> PolicySettings {
        let mut s = PolicySettings::default();
        s.levers.balloon = mode;
        s.levers.vcpu = mode;
        s.levers.worker = mode;
        s
    }

    fn controller(dir: &std::path::Path) -> Controller {
        Controller::new(
            fake_host(dir),
            Models::default(),
            PolicyWindows::default(),
            1.0,
            Box::new(Models::default),
        )
    }

    fn levers(r: &RoundReport) -> Vec<(Lever, DecisionOutcome)> {
        r.decisions.iter().map(|d| (d.lever, d.outcome)).collect()
    }

    #[test]
    fn a_shadow_round_records_decisions_and_calls_no_actuator() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = controller(dir.path());
        let mut ops = Recording::default();
        let r = c
            .round(&[sample(lc())], &settings(LeverMode::Shadow), &mut ops, 1)
            .unwrap();
        assert_eq!(
            levers(&r),
            [
                (Lever::Vcpu, DecisionOutcome::Shadow),
                (Lever::Worker, DecisionOutcome::Shadow)
            ],
            "{:#?}",
            r.decisions
        );
        assert!(
            r.decisions[0].action.contains("vCPUs -> 0"),
            "{}",
            r.decisions[0].action
        );
        assert!(ops.writes.is_empty(), "shadow called {:?}", ops.writes);
        assert!(r.failures.is_empty());
    }

    #[test]
    fn an_active_round_acts_and_reads_back_and_opt_out_and_off_record_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = controller(dir.path());
        let mut ops = Recording {
            workers: sample(lc()).workers,
            ..Default::default()
        };
        let r = c
            .round(&[sample(lc())], &settings(LeverMode::Active), &mut ops, 1)
            .unwrap();
        assert_eq!(
            levers(&r),
            [
                (Lever::Vcpu, DecisionOutcome::Applied),
                (Lever::Worker, DecisionOutcome::Applied)
            ],
            "{:#?}",
            r.decisions
        );
        assert_eq!(ops.affinity[&78], [0], "the LC vCPU is pinned alone");
        assert_eq!(
            ops.workers[0].cpus,
            Some(vec![1]),
            "its worker moves off it"
        );
        // Opted out of vcpu, worker off: nothing recorded, nothing called.
        let mut c = controller(dir.path());
        let mut ops = Recording::default();
        let mut p = lc();
        p.opt_out = vec![Lever::Vcpu];
        let mut s = settings(LeverMode::Active);
        s.levers.worker = LeverMode::Off;
        let r = c.round(&[sample(p)], &s, &mut ops, 1).unwrap();
        assert!(r.decisions.is_empty(), "{:#?}", r.decisions);
        assert!(ops.writes.is_empty(), "{:?}", ops.writes);
    }

    #[test]
    fn a_read_back_that_disagrees_is_failed_and_the_lever_backs_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = controller(dir.path());
        let mut ops = Recording {
            lie: true,
            workers: sample(lc()).workers,
            ..Default::default()
        };
        let r = c
            .round(&[sample(lc())], &settings(LeverMode::Active), &mut ops, 1)
            .unwrap();
        assert_eq!(
            levers(&r),
            [
                (Lever::Vcpu, DecisionOutcome::Failed),
                (Lever::Worker, DecisionOutcome::Failed)
            ]
        );
        assert_eq!(r.failures, [Lever::Vcpu, Lever::Worker]);
        let detail = r.decisions[0].detail.as_deref().unwrap();
        assert!(
            detail.contains("read back") && detail.contains("30 s"),
            "{detail}"
        );
        assert!(c.backoff[&("lc".to_string(), Lever::Vcpu)].waiting(Instant::now()));
    }
}
