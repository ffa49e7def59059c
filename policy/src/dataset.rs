//! Training data: replays a trace in the simulator under a data-collection
//! policy and writes, per lever, the engine's own feature vectors with the
//! outcome that followed. Live telemetry recorded as snapshots can be turned
//! into the same files by the same code (the labels come from observations,
//! not from the trace).

use crate::decision::{Actions, DevicePlacement, IoMode};
use crate::engine::placement_features;
use crate::features::{
    balloon_features, cpu_features, History, Obs, BALLOON_FEATURES, CPU_FEATURES, DEVICE_FEATURES,
};
use crate::host::Host;
use crate::policies::cpu::PackSpread;
use crate::policies::device::{exclusive_cpus, home_group};
use crate::policies::{estimate_cpu_load, CpuRule, Ctx};
use crate::sim::model::IO_SERVICE_US;
use crate::sim::Simulator;
use crate::telemetry::TelemetrySource;
use crate::trace::Trace;
use crate::util::{CpuSet, Prng};
use std::io::Write;
use std::path::Path;

/// Horizon of the balloon and CPU labels, s.
pub const HORIZON_S: f64 = 600.0;

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("writing dataset: {0}")]
    Io(#[from] std::io::Error),
    #[error("simulating: {0}")]
    Sim(String),
}

pub struct DatasetSummary {
    pub balloon_rows: usize,
    pub cpu_rows: usize,
    pub device_rows: usize,
}

/// Writes balloon.csv, cpu.csv and device.csv into `out` (appending when `append`).
pub fn write_dataset(
    host: &Host,
    trace: &Trace,
    out: &Path,
    seed: u64,
    every: usize,
    append: bool,
) -> Result<DatasetSummary, DatasetError> {
    let mut sim = Simulator::new(host, trace);
    let mut hist = History::new();
    let mut rng = Prng::new(seed);
    let mut packer = PackSpread::default();
    let n = trace.vms.len();
    let every = every.max(1);
    // Per VM: (step, features) awaiting labels; and the full observation series.
    let mut balloon_rows: Vec<Vec<(usize, [f32; 13])>> = vec![Vec::new(); n];
    let mut cpu_rows: Vec<Vec<(usize, [f32; 13])>> = vec![Vec::new(); n];
    let mut series: Vec<Vec<Obs>> = vec![Vec::new(); n];
    let mut device_pending: Vec<Option<[f32; 7]>> = vec![None; n];
    let mut device_out: Vec<([f32; 7], f32)> = Vec::new();
    let mut poll_cpu: Vec<Option<u32>> = vec![None; n];
    let mut step = 0usize;
    while !sim.done() {
        let snap = sim.sample().map_err(|e| DatasetError::Sim(e.to_string()))?;
        hist.ingest(&snap);
        let mut actions = Actions::none(n);
        {
            let ctx = Ctx {
                host,
                snap: &snap,
                hist: &hist,
                state: sim.state(),
            };
            for v in 0..n {
                if let Some(o) = hist.vms[v].last() {
                    series[v].push(*o);
                    // The device row decided last step gets the latency it produced.
                    if let Some(f) = device_pending[v].take() {
                        if o.iops > 0.0 {
                            device_out.push((f, (o.io_latency_us - IO_SERVICE_US).max(0.0) as f32));
                        }
                    }
                }
            }
            let plan = packer.plan(&ctx);
            let load = estimate_cpu_load(&ctx, plan.as_deref());
            let excl = exclusive_cpus(&ctx);
            for v in 0..n {
                let pos = series[v].len();
                if pos > 0 && step.is_multiple_of(every) {
                    if let Some(f) = balloon_features(&hist, v) {
                        balloon_rows[v].push((pos - 1, f));
                    }
                    if let Some(f) = cpu_features(&hist, v) {
                        cpu_rows[v].push((pos - 1, f));
                    }
                }
                let vcpus = plan
                    .as_ref()
                    .map(|p| p[v].clone())
                    .unwrap_or_else(|| ctx.state[v].vcpus.clone());
                let cur = ctx.state[v].devices[0].1.clone();
                let iops = hist.vms[v].last().map(|o| o.iops).unwrap_or(0.0);
                // Explore: every minute on average, move the worker to a random candidate.
                let mut chosen = cur.clone();
                if rng.chance(0.15) {
                    let gi = home_group(host, &vcpus);
                    let node = host.group_node[gi];
                    let avoid = excl.union(&CpuSet::new(
                        poll_cpu
                            .iter()
                            .enumerate()
                            .filter(|(k, _)| *k != v)
                            .filter_map(|(_, c)| *c)
                            .collect(),
                    ));
                    let options = [
                        host.cache_groups[gi].minus(&avoid),
                        host.numa_nodes[node].minus(&avoid),
                        host.all_cpus().minus(&avoid),
                        host.cache_groups[rng.int(0, host.cache_groups.len() as u64 - 1) as usize]
                            .minus(&avoid),
                    ];
                    let pollers: Vec<u32> = {
                        let mut p: Vec<u32> = poll_cpu
                            .iter()
                            .enumerate()
                            .filter(|(k, _)| *k != v)
                            .filter_map(|(_, c)| *c)
                            .collect();
                        p.sort_unstable();
                        p.dedup();
                        p
                    };
                    let k = rng.int(0, options.len() as u64 + 1) as usize;
                    if k < options.len() && !options[k].is_empty() {
                        chosen = DevicePlacement {
                            cpus: options[k].clone(),
                            mode: IoMode::Notify,
                        };
                        poll_cpu[v] = None;
                    } else if k == options.len() && !pollers.is_empty() {
                        // Join an existing polling thread.
                        let c = pollers[rng.int(0, pollers.len() as u64 - 1) as usize];
                        chosen = DevicePlacement {
                            cpus: CpuSet::single(c),
                            mode: IoMode::Poll,
                        };
                        poll_cpu[v] = Some(c);
                    } else if pollers.len() < (host.cpus as usize / 16).max(1) {
                        let pool = &options[0];
                        if let Some(c) = pool
                            .cpus()
                            .iter()
                            .copied()
                            .min_by(|a, b| load[*a as usize].total_cmp(&load[*b as usize]))
                        {
                            chosen = DevicePlacement {
                                cpus: CpuSet::single(c),
                                mode: IoMode::Poll,
                            };
                            poll_cpu[v] = Some(c);
                        }
                    }
                    if chosen != cur {
                        actions.vms[v].devices =
                            vec![(ctx.state[v].devices[0].0.clone(), chosen.clone())];
                    }
                }
                let peers: f64 = match (chosen.mode, poll_cpu[v]) {
                    (IoMode::Poll, Some(c)) => (0..n)
                        .filter(|&k| k != v && poll_cpu[k] == Some(c))
                        .map(|k| hist.vms[k].last().map(|o| o.iops).unwrap_or(0.0))
                        .sum(),
                    _ => 0.0,
                };
                device_pending[v] = Some(placement_features(
                    host,
                    &vcpus,
                    &chosen,
                    &load,
                    iops,
                    chosen == cur,
                    peers,
                ));
            }
            // As the engine does, pollers' CPUs leave the shared vCPU pools.
            let polls = CpuSet::new(poll_cpu.iter().flatten().copied().collect());
            let plan = plan.unwrap_or_else(|| ctx.state.iter().map(|s| s.vcpus.clone()).collect());
            for (v, a) in actions.vms.iter_mut().enumerate() {
                let placed: Vec<_> = plan[v]
                    .iter()
                    .map(|p| {
                        let mut p = p.clone();
                        let rest = p.cpus.minus(&polls);
                        if !p.exclusive && !rest.is_empty() {
                            p.cpus = rest;
                        }
                        p
                    })
                    .collect();
                a.vcpus = Some(placed);
            }
        }
        sim.apply(&actions)
            .map_err(|e| DatasetError::Sim(e.to_string()))?;
        sim.advance();
        step += 1;
    }
    let horizon = ((HORIZON_S / trace.step_s).round() as usize).max(1);
    std::fs::create_dir_all(out)?;
    let open = |name: &str,
                header: &[&str],
                label: &str|
     -> Result<(std::io::BufWriter<std::fs::File>, bool), DatasetError> {
        let path = out.join(name);
        let exists = append && path.exists();
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&path)?;
        let mut w = std::io::BufWriter::new(f);
        if !exists {
            writeln!(w, "{},{label}", header.join(","))?;
        }
        Ok((w, exists))
    };
    let fmt = |f: &[f32]| {
        f.iter()
            .map(|x| format!("{x:.5}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut summary = DatasetSummary {
        balloon_rows: 0,
        cpu_rows: 0,
        device_rows: 0,
    };
    let (mut bw, _) = open("balloon.csv", &BALLOON_FEATURES, "peak_ratio")?;
    let (mut cw, _) = open("cpu.csv", &CPU_FEATURES, "p90_next")?;
    for v in 0..n {
        let s = &series[v];
        let vcpus = trace.vms[v].vcpus as f64;
        for (pos, f) in &balloon_rows[v] {
            if pos + horizon < s.len() {
                let now = s[*pos].ws_mib.max(1.0);
                let peak = s[pos + 1..=pos + horizon]
                    .iter()
                    .map(|o| o.ws_mib)
                    .fold(0.0, f64::max);
                writeln!(bw, "{},{:.5}", fmt(f), peak / now)?;
                summary.balloon_rows += 1;
            }
        }
        for (pos, f) in &cpu_rows[v] {
            if pos + horizon < s.len() {
                let mut next: Vec<f64> = s[pos + 1..=pos + horizon]
                    .iter()
                    .map(|o| o.cpu / vcpus)
                    .collect();
                writeln!(
                    cw,
                    "{},{:.5}",
                    fmt(f),
                    crate::util::percentile(&mut next, 90.0)
                )?;
                summary.cpu_rows += 1;
            }
        }
    }
    let (mut dw, _) = open("device.csv", &DEVICE_FEATURES, "excess_us")?;
    for (i, (f, y)) in device_out.iter().enumerate() {
        if i % every == 0 {
            writeln!(dw, "{},{y:.3}", fmt(f))?;
            summary.device_rows += 1;
        }
    }
    bw.flush()?;
    cw.flush()?;
    dw.flush()?;
    Ok(summary)
}
