//! Runs policies over a trace in the simulator and reports the figures the
//! issue's targets are stated in.

use crate::decision::Actions;
use crate::features::History;
use crate::host::Host;
use crate::policies::{Ctx, Policy};
use crate::sim::{SimError, SimMetrics, SimOptions, Simulator};
use crate::telemetry::{TelemetryError, TelemetrySource};
use crate::trace::Trace;
use crate::util::percentile;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("policy {policy} produced an action the simulator refused: {source}")]
    Sim { policy: String, source: SimError },
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
}

#[derive(Debug, Clone)]
pub struct PolicyResult {
    pub name: String,
    pub metrics: SimMetrics,
    /// Wall time of each per-VM decision (its share of whole-host work included), µs.
    pub decision_us: Vec<f32>,
    /// Wall time of each whole round (telemetry ingest + all VMs), µs.
    pub round_us: Vec<f32>,
    pub interventions: u64,
    pub wall_s: f64,
    pub vms: usize,
}

impl PolicyResult {
    pub fn decision_p(&self, p: f64) -> f64 {
        let mut v: Vec<f64> = self.decision_us.iter().map(|&x| x as f64).collect();
        percentile(&mut v, p)
    }
    /// Share of one core the engine would use deciding once per second.
    pub fn engine_cpu_pct_at_1s(&self) -> f64 {
        let mean_us = self.round_us.iter().map(|&x| x as f64).sum::<f64>()
            / self.round_us.len().max(1) as f64;
        mean_us / 1e6 * 100.0
    }
}

pub fn run_policy(
    host: &Host,
    trace: &Trace,
    policy: &mut dyn Policy,
) -> Result<PolicyResult, EvalError> {
    run_policy_with(host, trace, policy, SimOptions::default())
}

pub fn run_policy_with(
    host: &Host,
    trace: &Trace,
    policy: &mut dyn Policy,
    opts: SimOptions,
) -> Result<PolicyResult, EvalError> {
    let started = Instant::now();
    let mut sim = Simulator::with_options(host, trace, opts);
    let mut hist = History::new();
    let n = trace.vms.len();
    let mut decision_us = Vec::with_capacity(trace.steps * n);
    let mut round_us = Vec::with_capacity(trace.steps);
    while !sim.done() {
        let snap = sim.sample()?;
        let t_round = Instant::now();
        hist.ingest(&snap);
        let mut actions = Actions::none(n);
        {
            let ctx = Ctx {
                host,
                snap: &snap,
                hist: &hist,
                state: sim.state(),
            };
            policy.begin_round(&ctx);
            let shared_us = t_round.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64;
            for (v, slot) in actions.vms.iter_mut().enumerate() {
                let t = Instant::now();
                *slot = policy.decide_vm(&ctx, v);
                decision_us.push((t.elapsed().as_secs_f64() * 1e6 + shared_us) as f32);
            }
        }
        round_us.push((t_round.elapsed().as_secs_f64() * 1e6) as f32);
        sim.apply(&actions).map_err(|source| EvalError::Sim {
            policy: policy.name().to_string(),
            source,
        })?;
        sim.advance();
    }
    if let Some(own) = policy.decision_latencies() {
        // The policy timed each (VM, lever) decision itself: finer than per VM.
        decision_us = own.to_vec();
    }
    Ok(PolicyResult {
        name: policy.name().to_string(),
        metrics: sim.metrics,
        decision_us,
        round_us,
        interventions: policy.interventions(),
        vms: n,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// The summary table, one row per policy.
pub fn table(results: &[PolicyResult]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "{:<11} {:>9} {:>5} {:>11} {:>10} {:>9} {:>8} {:>8} {:>8} {:>7} {:>6} {:>6}\n",
        "policy",
        "reclaim%",
        "OOM",
        "swapin%/min",
        "lcwait99ms",
        "batch",
        "io99us",
        "dec50us",
        "dec99us",
        "cpu%@1s",
        "guard",
        "wall_s"
    ));
    for r in results {
        let m = &r.metrics;
        s.push_str(&format!(
            "{:<11} {:>9.1} {:>5} {:>11.4} {:>10.2} {:>9.2} {:>8.1} {:>8.2} {:>8.2} {:>7.3} {:>6} {:>6.2}\n",
            r.name,
            m.reclaimed_pct(),
            m.oom_events,
            m.swap_in_pct_per_min(),
            m.lc_wait_p99_ms(),
            m.batch_throughput(),
            m.io_p99_us(),
            r.decision_p(50.0),
            r.decision_p(99.0),
            r.engine_cpu_pct_at_1s(),
            r.interventions,
            r.wall_s
        ));
    }
    s
}

/// One line per target: the learned policy's figure, its peer's, and whether it is met.
pub fn targets(results: &[PolicyResult]) -> Vec<String> {
    let get = |n: &str| results.iter().find(|r| r.name == n);
    let mut out = Vec::new();
    let Some(l) = get("learned") else {
        return out;
    };
    let lm = &l.metrics;
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let reclaim = lm.reclaimed_pct();
    out.push(format!(
        "balloon: reclaimed {reclaim:.1}% (target >= 25%): {}",
        verdict(reclaim >= 25.0)
    ));
    if let Some(m) = get("mom") {
        let mom = m.metrics.reclaimed_pct();
        if mom < 0.05 {
            out.push(format!("balloon: MOM reclaimed {mom:.2}% (host never under pressure), learned {reclaim:.1}% (target >= 1.5x): {}", verdict(reclaim >= 1.5 * mom)));
        } else {
            let r = reclaim / mom;
            out.push(format!(
                "balloon: {r:.2}x MOM's {mom:.1}% (target >= 1.5x): {}",
                verdict(r >= 1.5)
            ));
        }
    }
    out.push(format!(
        "balloon: {} OOM events (target 0): {}",
        lm.oom_events,
        verdict(lm.oom_events == 0)
    ));
    out.push(format!(
        "balloon: {} guest OOM-path entries answered by deflate-on-OOM (target 0): {}",
        lm.oom_deflate_calls,
        verdict(lm.oom_deflate_calls == 0)
    ));
    let sw = lm.swap_in_pct_per_min();
    out.push(format!(
        "balloon: swap-ins {sw:.4}% of working set per minute (target <= 0.2%): {}",
        verdict(sw <= 0.2)
    ));
    if let Some(p) = get("static-pin") {
        let (lw, pw) = (lm.lc_wait_p99_ms(), p.metrics.lc_wait_p99_ms());
        out.push(format!(
            "vcpu: LC p99 run-queue wait {lw:.2} ms/s vs static 1:1 pinning {pw:.2} (target within 5%): {}",
            verdict(lw <= pw * 1.05 + 1e-9)
        ));
        let r = lm.batch_throughput() / p.metrics.batch_throughput().max(1e-9);
        out.push(format!(
            "vcpu: batch throughput {r:.2}x static pinning (target >= 1.2x): {}",
            verdict(r >= 1.2)
        ));
    }
    if let Some(s) = get("static") {
        let (li, si) = (lm.io_p99_us(), s.metrics.io_p99_us());
        let gain = 1.0 - li / si.max(1e-9);
        out.push(format!(
            "device: I/O p99 {li:.1} us vs unplaced worker {si:.1} us, {:.1}% lower (target >= 15%): {}",
            gain * 100.0,
            verdict(gain >= 0.15)
        ));
    }
    let d99 = l.decision_p(99.0);
    out.push(format!(
        "latency: decision p99 {d99:.2} us (target < 20 us): {}",
        verdict(d99 < 20.0)
    ));
    let cpu = l.engine_cpu_pct_at_1s();
    out.push(format!(
        "latency: engine CPU {cpu:.3}% of a core at 1 s for {} VMs (target < 1%): {}",
        l.vms,
        verdict(cpu < 1.0)
    ));
    out
}

/// The figures of one policy run, as printed in the table.
fn figures(r: &PolicyResult) -> [f64; 9] {
    let m = &r.metrics;
    [
        m.reclaimed_pct(),
        m.oom_events as f64,
        m.swap_in_pct_per_min(),
        m.lc_wait_p99_ms(),
        m.batch_throughput(),
        m.io_p99_us(),
        r.decision_p(50.0),
        r.decision_p(99.0),
        r.engine_cpu_pct_at_1s(),
    ]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// Per policy, the median of each figure over several traces (`runs[trace][policy]`).
pub fn medians(runs: &[Vec<PolicyResult>]) -> Vec<(String, [f64; 9])> {
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    first
        .iter()
        .enumerate()
        .map(|(p, r)| {
            let mut out = [0.0; 9];
            for (k, slot) in out.iter_mut().enumerate() {
                *slot = median(
                    runs.iter()
                        .filter_map(|t| t.get(p))
                        .map(|r| figures(r)[k])
                        .collect(),
                );
            }
            (r.name.clone(), out)
        })
        .collect()
}

pub fn median_table(runs: &[Vec<PolicyResult>]) -> String {
    let mut s = format!(
        "{:<11} {:>9} {:>5} {:>11} {:>10} {:>9} {:>8} {:>8} {:>8} {:>7}\n",
        "policy",
        "reclaim%",
        "OOM",
        "swapin%/min",
        "lcwait99ms",
        "batch",
        "io99us",
        "dec50us",
        "dec99us",
        "cpu%@1s"
    );
    for (name, f) in medians(runs) {
        s.push_str(&format!(
            "{:<11} {:>9.1} {:>5.0} {:>11.4} {:>10.2} {:>9.2} {:>8.1} {:>8.2} {:>8.2} {:>7.3}\n",
            name, f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8]
        ));
    }
    s
}

/// The targets judged on the medians (ratios are medians of per-trace ratios).
pub fn median_targets(runs: &[Vec<PolicyResult>]) -> Vec<String> {
    let ratio = |num: &str, den: &str, k: usize| -> Option<f64> {
        let v: Vec<f64> = runs
            .iter()
            .filter_map(|t| {
                let a = t.iter().find(|r| r.name == num)?;
                let b = t.iter().find(|r| r.name == den)?;
                Some(figures(a)[k] / figures(b)[k].max(1e-9))
            })
            .collect();
        (!v.is_empty()).then(|| median(v))
    };
    let meds = medians(runs);
    let get = |n: &str| meds.iter().find(|m| m.0 == n).map(|m| m.1);
    let mut out = Vec::new();
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    if let Some(l) = get("learned") {
        out.push(format!(
            "balloon: median reclaimed {:.1}% (>= 25%): {}",
            l[0],
            verdict(l[0] >= 25.0)
        ));
        if let Some(r) = ratio("learned", "mom", 0) {
            out.push(format!(
                "balloon: median {r:.2}x MOM (>= 1.5x): {}",
                verdict(r >= 1.5)
            ));
        }
        out.push(format!(
            "balloon: median OOM events {:.0} (0): {}",
            l[1],
            verdict(l[1] == 0.0)
        ));
        out.push(format!(
            "balloon: median swap-ins {:.4}%/min (<= 0.2%): {}",
            l[2],
            verdict(l[2] <= 0.2)
        ));
        if let Some(p) = get("static-pin") {
            out.push(format!(
                "vcpu: median LC wait p99 {:.2} vs static-pin {:.2} ms/s (within 5%): {}",
                l[3],
                p[3],
                verdict(l[3] <= p[3] * 1.05)
            ));
        }
        if let Some(r) = ratio("learned", "static-pin", 4) {
            out.push(format!(
                "vcpu: median batch throughput {r:.3}x static-pin (>= 1.2x): {}",
                verdict(r >= 1.2)
            ));
        }
        if let Some(r) = ratio("learned", "static", 5) {
            out.push(format!(
                "device: median I/O p99 {:.1}% lower than unplaced (>= 15%): {}",
                (1.0 - r) * 100.0,
                verdict(r <= 0.85)
            ));
        }
        out.push(format!(
            "latency: median decision p99 {:.2} us (< 20 us): {}",
            l[7],
            verdict(l[7] < 20.0)
        ));
        out.push(format!(
            "latency: median engine CPU {:.3}% of a core at 1 s (< 1%): {}",
            l[8],
            verdict(l[8] < 1.0)
        ));
    }
    out
}
