//! Synthetic, seeded traces with documented workload shapes (policy/README.md).
//!
//! Every VM draws its parameters from its own PRNG stream derived from
//! (seed, vm index), so adding VMs never changes existing ones. Each shape has
//! two disjoint parameter ranges: `Split::Train` and `Split::Eval`, so models are
//! judged on workloads whose periods, sizes and rates they have not seen.
//! The `Shape::UNSEEN` kinds go further: they exist only for the evaluation
//! set (`evalset`), and a `Split::Train` trace that asks for one is refused.

use crate::trace::{default_floor_mib, Trace, VmClass, VmInfo};
use crate::util::Prng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// Request-serving guest: CPU and working set follow a daily cycle.
    DiurnalService,
    /// Batch guest: jobs arrive at random, run near full CPU, grow memory while running.
    BatchBurst,
    /// A service whose working set grows steadily until it is restarted.
    MemoryLeak,
    /// A desktop: mostly idle, short interactive bursts, occasional app launches.
    IdleDesktop,
    /// Latency-critical guest: steady moderate load, steady memory, heavy I/O.
    LatencyCritical,
    /// A leak that is never restarted: the working set climbs to ~90-95% of memory over a day.
    SlowLeak,
    /// Demand and working set step up sharply once, mid-trace, and stay up.
    StepUp,
    /// A steady guest that keeps most of its memory as hot page cache.
    CacheHeavy,
    /// A small idle guest: 1 vCPU, 1-2 GiB, almost no CPU.
    IdleSmall,
    /// A big latency-critical guest (4-8 vCPUs): such guests can hold a large share of the vCPUs.
    LcLarge,
    /// Unseen by training: a batch guest that allocates steadily, then frees it all, again and again.
    Sawtooth,
    /// Unseen by training: a desktop asleep at a tiny working set that wakes for long, heavy bursts.
    BimodalDesktop,
    /// Unseen by training: an I/O-heavy guest whose queue bursts to tens of thousands of IOPS.
    BurstyIo,
}

impl Shape {
    /// The shapes training traces may use (`Split::Train` refuses the others).
    pub const TRAINABLE: [Shape; 10] = [
        Shape::DiurnalService,
        Shape::BatchBurst,
        Shape::MemoryLeak,
        Shape::IdleDesktop,
        Shape::LatencyCritical,
        Shape::SlowLeak,
        Shape::StepUp,
        Shape::CacheHeavy,
        Shape::IdleSmall,
        Shape::LcLarge,
    ];
    /// Kinds kept for evaluation only: no training trace ever contains them.
    pub const UNSEEN: [Shape; 3] = [Shape::Sawtooth, Shape::BimodalDesktop, Shape::BurstyIo];

    pub fn class(self) -> VmClass {
        match self {
            Shape::DiurnalService
            | Shape::MemoryLeak
            | Shape::SlowLeak
            | Shape::StepUp
            | Shape::CacheHeavy
            | Shape::BurstyIo => VmClass::Service,
            Shape::BatchBurst | Shape::Sawtooth => VmClass::Batch,
            Shape::IdleDesktop | Shape::BimodalDesktop => VmClass::Desktop,
            Shape::LatencyCritical | Shape::LcLarge => VmClass::LatencyCritical,
            Shape::IdleSmall => VmClass::General,
        }
    }

    pub fn unseen(self) -> bool {
        Shape::UNSEEN.contains(&self)
    }

    /// Short name used in VM names and in `--mix name=weight`.
    pub fn short(self) -> &'static str {
        match self {
            Shape::DiurnalService => "svc",
            Shape::BatchBurst => "batch",
            Shape::MemoryLeak => "leak",
            Shape::IdleDesktop => "desk",
            Shape::LatencyCritical => "lc",
            Shape::SlowLeak => "slowleak",
            Shape::StepUp => "stepup",
            Shape::CacheHeavy => "cache",
            Shape::IdleSmall => "tiny",
            Shape::LcLarge => "lcbig",
            Shape::Sawtooth => "saw",
            Shape::BimodalDesktop => "bimodal",
            Shape::BurstyIo => "burstio",
        }
    }

    pub fn from_short(s: &str) -> Option<Shape> {
        Shape::TRAINABLE
            .iter()
            .chain(Shape::UNSEEN.iter())
            .copied()
            .find(|k| k.short() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Split {
    Train,
    Eval,
}

#[derive(Debug, Clone)]
pub struct GenSpec {
    pub vms: usize,
    pub hours: f64,
    pub step_s: f64,
    pub seed: u64,
    pub split: Split,
    /// Relative weight of each shape in the mix; shapes not listed get none.
    pub mix: Vec<(Shape, f64)>,
}

impl Default for GenSpec {
    fn default() -> Self {
        GenSpec {
            vms: 50,
            hours: 24.0,
            step_s: 10.0,
            seed: 1,
            split: Split::Eval,
            mix: DEFAULT_MIX.to_vec(),
        }
    }
}

/// The mix of a mixed workstation/server host (see README): 14 service, 10
/// batch, 8 leaking, 12 desktop, 6 latency-critical guests per 50.
pub const DEFAULT_MIX: [(Shape, f64); 5] = [
    (Shape::DiurnalService, 14.0),
    (Shape::BatchBurst, 10.0),
    (Shape::MemoryLeak, 8.0),
    (Shape::IdleDesktop, 12.0),
    (Shape::LatencyCritical, 6.0),
];

/// The default mix widened with the five kinds (slow leak, step up,
/// cache-heavy, small idle and large latency-critical guests): what the
/// guardrails are validated on (`bench --mix wide`) and what the next training
/// run should use. Never contains a `Shape::UNSEEN` kind.
pub const WIDE_MIX: [(Shape, f64); 10] = [
    (Shape::DiurnalService, 8.0),
    (Shape::BatchBurst, 6.0),
    (Shape::MemoryLeak, 4.0),
    (Shape::IdleDesktop, 6.0),
    (Shape::LatencyCritical, 4.0),
    (Shape::SlowLeak, 4.0),
    (Shape::StepUp, 4.0),
    (Shape::CacheHeavy, 4.0),
    (Shape::IdleSmall, 8.0),
    (Shape::LcLarge, 2.0),
];

/// Parses `svc=14,batch=10,...` (names from [`Shape::short`]).
pub fn parse_mix(s: &str) -> Result<Vec<(Shape, f64)>, GenError> {
    match s.trim() {
        "default" => return Ok(DEFAULT_MIX.to_vec()),
        "wide" => return Ok(WIDE_MIX.to_vec()),
        _ => {}
    }
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (name, w) = p
                .split_once('=')
                .ok_or_else(|| GenError::Invalid(format!("mix entry {p:?} is not name=weight")))?;
            let shape = Shape::from_short(name.trim())
                .ok_or_else(|| GenError::Invalid(format!("unknown shape {name:?} in mix")))?;
            let w: f64 = w
                .trim()
                .parse()
                .map_err(|_| GenError::Invalid(format!("weight {w:?} is not a number")))?;
            Ok((shape, w))
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum GenError {
    #[error("trace generator: {0}")]
    Invalid(String),
}

/// Picks `lo..hi` from one of two disjoint halves of a range depending on the split.
fn split_range(rng: &mut Prng, split: Split, lo: f64, mid: f64, hi: f64) -> f64 {
    match split {
        Split::Train => rng.range(lo, mid),
        Split::Eval => rng.range(mid, hi),
    }
}

/// Smooth AR(1) noise, so per-step values wander rather than jump.
struct Wander {
    x: f64,
    keep: f64,
    scale: f64,
}

impl Wander {
    fn new(keep: f64, scale: f64) -> Self {
        Wander {
            x: 0.0,
            keep,
            scale,
        }
    }
    fn next(&mut self, rng: &mut Prng) -> f64 {
        self.x = self.keep * self.x + (1.0 - self.keep * self.keep).sqrt() * rng.normal();
        self.x * self.scale
    }
}

const DAY_S: f64 = 86_400.0;

pub fn generate(spec: &GenSpec) -> Result<Trace, GenError> {
    if spec.vms == 0 || spec.vms > 5000 {
        return Err(GenError::Invalid(format!(
            "vms = {} must be 1..=5000",
            spec.vms
        )));
    }
    if !(spec.step_s >= 1.0 && spec.hours > 0.0 && spec.hours <= 24.0 * 14.0) {
        return Err(GenError::Invalid(
            "need step_s >= 1 and 0 < hours <= 336".into(),
        ));
    }
    let total: f64 = spec.mix.iter().map(|m| m.1).sum();
    if total.is_nan() || total <= 0.0 || spec.mix.iter().any(|m| m.1.is_nan() || m.1 < 0.0) {
        return Err(GenError::Invalid(
            "mix weights must be non-negative with a positive sum".into(),
        ));
    }
    if spec.split == Split::Train {
        if let Some((k, _)) = spec.mix.iter().find(|m| m.0.unseen() && m.1 > 0.0) {
            return Err(GenError::Invalid(format!(
                "shape {} is kept for evaluation only; a training trace may not contain it",
                k.short()
            )));
        }
    }
    let steps = ((spec.hours * 3600.0) / spec.step_s).round().max(1.0) as usize;
    let n = spec.vms;
    let shapes = assign_shapes(n, &spec.mix);
    let mut trace = Trace {
        step_s: spec.step_s,
        start_s: 0.0,
        vms: Vec::with_capacity(n),
        steps,
        cpu: vec![0.0; steps * n],
        ws: vec![0.0; steps * n],
        iops: vec![0.0; steps * n],
        cache: vec![None; steps * n],
    };
    for (v, shape) in shapes.into_iter().enumerate() {
        let mut rng = Prng::new(
            spec.seed
                .wrapping_mul(0x1000_0001)
                .wrapping_add(v as u64 * 7919 + 1),
        );
        let series = gen_vm(shape, spec.split, steps, spec.step_s, &mut rng);
        trace.vms.push(VmInfo {
            name: format!("{}-{v:02}", shape.short()),
            vcpus: series.vcpus,
            mem_mib: series.mem_mib,
            class: shape.class(),
            floor_mib: default_floor_mib(series.mem_mib),
        });
        for s in 0..steps {
            let i = s * n + v;
            trace.cpu[i] = series.cpu[s];
            trace.ws[i] = series.ws[s];
            trace.iops[i] = series.iops[s];
            trace.cache[i] = series.cache.as_ref().map(|c| c[s] as f32);
        }
    }
    Ok(trace)
}

/// Largest-remainder apportionment so a mix of 50 VMs is exactly reproducible.
fn assign_shapes(n: usize, mix: &[(Shape, f64)]) -> Vec<Shape> {
    let total: f64 = mix.iter().map(|m| m.1).sum();
    let quotas: Vec<f64> = mix.iter().map(|m| m.1 / total * n as f64).collect();
    let mut counts: Vec<usize> = quotas.iter().map(|q| q.floor() as usize).collect();
    let mut order: Vec<usize> = (0..mix.len()).collect();
    order.sort_by(|&a, &b| {
        (quotas[b] - quotas[b].floor()).total_cmp(&(quotas[a] - quotas[a].floor()))
    });
    let mut missing = n - counts.iter().sum::<usize>();
    for &k in order.iter().cycle() {
        if missing == 0 {
            break;
        }
        counts[k] += 1;
        missing -= 1;
    }
    // Interleave shapes so VM names do not cluster by kind.
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        for (k, c) in counts.iter_mut().enumerate() {
            if *c > 0 {
                *c -= 1;
                out.push(mix[k].0);
            }
        }
    }
    out
}

struct Series {
    vcpus: u32,
    mem_mib: f64,
    cpu: Vec<f64>,
    ws: Vec<f64>,
    iops: Vec<f64>,
    cache: Option<Vec<f64>>,
}

fn gen_vm(shape: Shape, split: Split, steps: usize, dt: f64, rng: &mut Prng) -> Series {
    let pick =
        |rng: &mut Prng, options: &[f64]| options[rng.int(0, options.len() as u64 - 1) as usize];
    let (vcpus, mem_mib) = match shape {
        Shape::DiurnalService => (pick(rng, &[2.0, 4.0]), pick(rng, &[4096.0, 8192.0])),
        Shape::BatchBurst => (pick(rng, &[4.0, 6.0]), pick(rng, &[8192.0, 12288.0])),
        Shape::MemoryLeak => (2.0, pick(rng, &[4096.0, 6144.0])),
        Shape::IdleDesktop => (pick(rng, &[2.0, 4.0]), pick(rng, &[4096.0, 8192.0])),
        Shape::LatencyCritical => (2.0, pick(rng, &[4096.0, 8192.0])),
        Shape::SlowLeak => (2.0, pick(rng, &[4096.0, 6144.0, 8192.0])),
        Shape::StepUp => (pick(rng, &[2.0, 4.0]), pick(rng, &[4096.0, 8192.0])),
        Shape::CacheHeavy => (pick(rng, &[2.0, 4.0]), pick(rng, &[8192.0, 16384.0])),
        Shape::IdleSmall => (1.0, pick(rng, &[1024.0, 2048.0])),
        Shape::LcLarge => (pick(rng, &[4.0, 8.0]), pick(rng, &[8192.0, 16384.0])),
        Shape::Sawtooth => (pick(rng, &[4.0, 8.0]), pick(rng, &[8192.0, 16384.0])),
        Shape::BimodalDesktop => (pick(rng, &[2.0, 4.0]), pick(rng, &[4096.0, 8192.0])),
        Shape::BurstyIo => (pick(rng, &[2.0, 4.0]), pick(rng, &[4096.0, 8192.0])),
    };
    let mut cache_series: Option<Vec<f64>> = None;
    let total_s = steps as f64 * dt;
    let mut cpu = vec![0.0; steps];
    let mut ws = vec![0.0; steps];
    let mut iops = vec![0.0; steps];
    let phase = rng.range(0.0, DAY_S);
    let day =
        |t: f64, phase: f64| 0.5 + 0.5 * (2.0 * std::f64::consts::PI * (t - phase) / DAY_S).sin();
    match shape {
        Shape::DiurnalService => {
            let base = split_range(rng, split, 0.05, 0.12, 0.2) * vcpus;
            let amp = split_range(rng, split, 0.2, 0.35, 0.5) * vcpus;
            let ws_base = split_range(rng, split, 0.2, 0.3, 0.4) * mem_mib;
            let ws_amp = split_range(rng, split, 0.1, 0.2, 0.3) * mem_mib;
            let io_per_cpu = rng.range(100.0, 400.0);
            let mut n1 = Wander::new(0.95, 0.06 * vcpus);
            let mut n2 = Wander::new(0.995, 0.02 * mem_mib);
            for s in 0..steps {
                let t = s as f64 * dt;
                let d = day(t, phase);
                cpu[s] = base + amp * d + n1.next(rng);
                // Caches warm up behind load: the working set lags by an hour.
                ws[s] = ws_base + ws_amp * day(t - 3600.0, phase) + n2.next(rng);
                iops[s] = io_per_cpu * cpu[s].max(0.0) * rng.range(0.8, 1.2);
            }
        }
        Shape::BatchBurst => {
            let mean_gap_s = split_range(rng, split, 1800.0, 3600.0, 7200.0);
            let job_len_s = (split_range(rng, split, 1200.0, 2700.0, 5400.0), 0.5);
            let ws_idle = rng.range(0.08, 0.15) * mem_mib;
            let ws_job = split_range(rng, split, 0.4, 0.55, 0.7) * mem_mib;
            let ramp_s = split_range(rng, split, 60.0, 240.0, 600.0);
            let mut remaining = 0.0;
            let mut idle_left = rng.range(0.0, mean_gap_s);
            let mut level = ws_idle;
            let mut n1 = Wander::new(0.9, 0.05 * vcpus);
            for s in 0..steps {
                if remaining > 0.0 {
                    remaining -= dt;
                    cpu[s] = (0.9 * vcpus + n1.next(rng)).min(vcpus);
                    level += (ws_job - level).max(0.0) * (dt / ramp_s).min(1.0);
                    iops[s] = rng.range(200.0, 800.0);
                } else {
                    idle_left -= dt;
                    if idle_left <= 0.0 {
                        remaining = job_len_s.0 * rng.range(1.0 - job_len_s.1, 1.0 + job_len_s.1);
                        idle_left = -mean_gap_s * rng.unit().max(1e-9).ln();
                    }
                    cpu[s] = 0.03 * vcpus;
                    // Memory is freed when the job ends, the page cache lingers.
                    level = (level - 0.02 * mem_mib * dt / 10.0).max(ws_idle);
                    iops[s] = rng.range(0.0, 20.0);
                }
                ws[s] = level;
            }
        }
        Shape::MemoryLeak => {
            let base = rng.range(0.15, 0.25) * mem_mib;
            let leak_per_h = split_range(rng, split, 0.03, 0.06, 0.1) * mem_mib;
            let restart_at = rng.range(0.75, 0.85) * mem_mib;
            let mut level = rng.range(base, restart_at);
            let mut n1 = Wander::new(0.95, 0.05 * vcpus);
            for s in 0..steps {
                level += leak_per_h * dt / 3600.0;
                if level > restart_at {
                    level = base;
                }
                cpu[s] = 0.15 * vcpus + n1.next(rng);
                ws[s] = level;
                iops[s] = rng.range(20.0, 80.0);
            }
        }
        Shape::IdleDesktop => {
            let ws_base = split_range(rng, split, 0.15, 0.22, 0.3) * mem_mib;
            let app_ws = split_range(rng, split, 0.05, 0.1, 0.15) * mem_mib;
            let burst_p = split_range(rng, split, 0.002, 0.005, 0.01);
            let mut burst_left = 0.0;
            let mut apps: f64 = 0.0;
            for s in 0..steps {
                if burst_left > 0.0 {
                    burst_left -= dt;
                    cpu[s] = rng.range(0.5, 1.0) * vcpus;
                    iops[s] = rng.range(50.0, 300.0);
                } else {
                    if rng.chance(burst_p) {
                        burst_left = rng.range(30.0, 300.0);
                        // An app launch adds to the working set; closing one frees it.
                        if rng.chance(0.5) && apps < 4.0 {
                            apps += 1.0;
                        } else if apps > 0.0 {
                            apps -= 1.0;
                        }
                    }
                    cpu[s] = rng.range(0.01, 0.05) * vcpus;
                    iops[s] = rng.range(0.0, 10.0);
                }
                ws[s] = ws_base + apps * app_ws;
            }
        }
        Shape::LatencyCritical => {
            let load = split_range(rng, split, 0.25, 0.35, 0.5) * vcpus;
            let ws_level = split_range(rng, split, 0.45, 0.55, 0.65) * mem_mib;
            let io = split_range(rng, split, 2000.0, 4000.0, 8000.0);
            let mut n1 = Wander::new(0.9, 0.05 * vcpus);
            let mut n2 = Wander::new(0.99, 0.01 * mem_mib);
            for s in 0..steps {
                let d = day(s as f64 * dt, phase);
                cpu[s] = load * (0.7 + 0.6 * d) + n1.next(rng);
                ws[s] = ws_level + n2.next(rng);
                iops[s] = io * (0.6 + 0.8 * d) * rng.range(0.9, 1.1);
            }
        }
        Shape::SlowLeak => {
            // Climbs from a small base to its peak over roughly a day and is never restarted.
            let base = rng.range(0.12, 0.2) * mem_mib;
            let peak = split_range(rng, split, 0.84, 0.9, 0.96) * mem_mib;
            let rise_s = split_range(rng, split, 14.0, 20.0, 26.0) * 3600.0;
            let head_start = rng.range(0.0, 0.15) * rise_s;
            let mut n1 = Wander::new(0.95, 0.04 * vcpus);
            let mut n2 = Wander::new(0.99, 0.005 * mem_mib);
            for s in 0..steps {
                let t = s as f64 * dt + head_start;
                cpu[s] = 0.12 * vcpus + n1.next(rng);
                ws[s] = base + (peak - base) * (t / rise_s).min(1.0) + n2.next(rng);
                iops[s] = rng.range(20.0, 120.0);
            }
        }
        Shape::StepUp => {
            // One sharp, lasting step in demand and working set part way through.
            let at_s = split_range(rng, split, 0.25, 0.4, 0.6) * total_s;
            let rise_s = rng.range(30.0, 120.0);
            let (cpu0, ws0) = (
                rng.range(0.08, 0.18) * vcpus,
                rng.range(0.12, 0.22) * mem_mib,
            );
            let cpu1 = split_range(rng, split, 0.5, 0.7, 0.9) * vcpus;
            let ws1 = split_range(rng, split, 0.45, 0.6, 0.8) * mem_mib;
            let io_per_cpu = rng.range(100.0, 400.0);
            let mut n1 = Wander::new(0.95, 0.05 * vcpus);
            let mut n2 = Wander::new(0.99, 0.01 * mem_mib);
            for s in 0..steps {
                let t = s as f64 * dt;
                let f = ((t - at_s) / rise_s).clamp(0.0, 1.0);
                cpu[s] = cpu0 + (cpu1 - cpu0) * f + n1.next(rng);
                ws[s] = ws0 + (ws1 - ws0) * f + n2.next(rng);
                iops[s] = io_per_cpu * cpu[s].max(0.0) * rng.range(0.8, 1.2);
            }
        }
        Shape::CacheHeavy => {
            // A file or database server: small anonymous working set, most memory hot cache.
            let ws_level = rng.range(0.06, 0.1) * mem_mib;
            let cache_level = split_range(rng, split, 0.65, 0.76, 0.86) * mem_mib;
            let mut n1 = Wander::new(0.95, 0.03 * vcpus);
            let mut n2 = Wander::new(0.995, 0.01 * mem_mib);
            let mut cache = vec![0.0; steps];
            for s in 0..steps {
                cpu[s] = 0.1 * vcpus + n1.next(rng);
                ws[s] = ws_level;
                cache[s] = (cache_level + n2.next(rng)).clamp(0.0, 0.95 * mem_mib - ws_level);
                iops[s] = rng.range(200.0, 1000.0);
            }
            cache_series = Some(cache);
        }
        Shape::IdleSmall => {
            let ws_level = split_range(rng, split, 0.28, 0.33, 0.38) * mem_mib;
            let mut n2 = Wander::new(0.99, 0.01 * mem_mib);
            for s in 0..steps {
                cpu[s] = rng.range(0.005, 0.03) * vcpus;
                ws[s] = ws_level + n2.next(rng);
                iops[s] = rng.range(0.0, 5.0);
            }
        }
        Shape::LcLarge => {
            let load = split_range(rng, split, 0.2, 0.3, 0.45) * vcpus;
            let ws_level = split_range(rng, split, 0.4, 0.5, 0.6) * mem_mib;
            let io = split_range(rng, split, 1000.0, 2500.0, 5000.0);
            let mut n1 = Wander::new(0.9, 0.05 * vcpus);
            let mut n2 = Wander::new(0.99, 0.01 * mem_mib);
            for s in 0..steps {
                let d = day(s as f64 * dt, phase);
                cpu[s] = load * (0.7 + 0.6 * d) + n1.next(rng);
                ws[s] = ws_level + n2.next(rng);
                iops[s] = io * (0.6 + 0.8 * d) * rng.range(0.9, 1.1);
            }
        }
        Shape::Sawtooth => {
            // Allocates at a steady rate while it computes, then frees everything at once.
            let low = rng.range(0.08, 0.12) * mem_mib;
            let high = rng.range(0.6, 0.8) * mem_mib;
            let climb_s = rng.range(600.0, 1800.0);
            let pause_s = rng.range(120.0, 1200.0);
            let mut t_in = rng.range(0.0, climb_s + pause_s);
            let mut n1 = Wander::new(0.9, 0.04 * vcpus);
            for s in 0..steps {
                t_in += dt;
                if t_in >= climb_s + pause_s {
                    t_in = 0.0;
                }
                if t_in < climb_s {
                    cpu[s] = (0.92 * vcpus + n1.next(rng)).min(vcpus);
                    ws[s] = low + (high - low) * t_in / climb_s;
                    iops[s] = rng.range(100.0, 600.0);
                } else {
                    cpu[s] = 0.04 * vcpus;
                    ws[s] = low;
                    iops[s] = rng.range(0.0, 20.0);
                }
            }
        }
        Shape::BimodalDesktop => {
            // Asleep with a tiny working set; wakes for long bursts that load most of it.
            let sleep_ws = rng.range(0.07, 0.12) * mem_mib;
            let wake_ws = rng.range(0.5, 0.7) * mem_mib;
            let mean_gap_s = rng.range(3600.0, 3.0 * 3600.0);
            let ramp_s = rng.range(20.0, 60.0);
            let mut idle_left = rng.range(0.0, mean_gap_s);
            let mut awake_left = 0.0;
            let mut awake_for = 0.0;
            for s in 0..steps {
                if awake_left > 0.0 {
                    awake_left -= dt;
                    awake_for += dt;
                    let f = (awake_for / ramp_s).min(1.0);
                    cpu[s] = rng.range(0.5, 1.0) * vcpus;
                    ws[s] = sleep_ws + (wake_ws - sleep_ws) * f;
                    iops[s] = rng.range(100.0, 500.0);
                } else {
                    idle_left -= dt;
                    if idle_left <= 0.0 {
                        awake_left = rng.range(600.0, 2400.0);
                        awake_for = 0.0;
                        idle_left = -mean_gap_s * rng.unit().max(1e-9).ln();
                    }
                    cpu[s] = rng.range(0.005, 0.02) * vcpus;
                    ws[s] = sleep_ws;
                    iops[s] = rng.range(0.0, 5.0);
                }
            }
        }
        Shape::BurstyIo => {
            // Steady I/O with queue bursts of 15-40k IOPS lasting seconds to minutes.
            let base_io = rng.range(300.0, 1500.0);
            let burst_p = rng.range(0.005, 0.02);
            let ws_level = rng.range(0.25, 0.35) * mem_mib;
            let mut burst_left = 0.0;
            let mut burst_io = 0.0;
            let mut n1 = Wander::new(0.9, 0.04 * vcpus);
            let mut n2 = Wander::new(0.99, 0.01 * mem_mib);
            for s in 0..steps {
                if burst_left <= 0.0 && rng.chance(burst_p) {
                    burst_left = rng.range(10.0, 120.0);
                    burst_io = rng.range(15_000.0, 40_000.0);
                }
                let io = if burst_left > 0.0 {
                    burst_left -= dt;
                    burst_io
                } else {
                    base_io
                };
                iops[s] = io * rng.range(0.9, 1.1);
                cpu[s] = 0.2 * vcpus + io * 20e-6 + n1.next(rng);
                ws[s] = ws_level + n2.next(rng);
            }
        }
    }
    for s in 0..steps {
        cpu[s] = cpu[s].clamp(0.0, vcpus);
        ws[s] = ws[s].clamp(64.0, mem_mib * 0.95);
        iops[s] = iops[s].max(0.0);
    }
    Series {
        vcpus: vcpus as u32,
        mem_mib,
        cpu,
        ws,
        iops,
        cache: cache_series,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_trace_other_seed_differs() {
        let spec = GenSpec {
            vms: 10,
            hours: 2.0,
            ..GenSpec::default()
        };
        let a = generate(&spec).unwrap();
        assert_eq!(a, generate(&spec).unwrap());
        let b = generate(&GenSpec {
            seed: 2,
            ..spec.clone()
        })
        .unwrap();
        assert_ne!(a.ws, b.ws);
        assert_eq!(a.steps, 720);
    }

    #[test]
    fn mix_is_apportioned_exactly() {
        let shapes = assign_shapes(50, &DEFAULT_MIX);
        let count = |s| shapes.iter().filter(|x| **x == s).count();
        assert_eq!(
            count(Shape::LatencyCritical)
                + count(Shape::BatchBurst)
                + count(Shape::DiurnalService)
                + count(Shape::IdleDesktop)
                + count(Shape::MemoryLeak),
            50
        );
        assert_eq!(count(Shape::DiurnalService), 14);
        assert_eq!(count(Shape::LatencyCritical), 6);
    }

    #[test]
    fn values_stay_within_the_vm() {
        let t = generate(&GenSpec {
            vms: 25,
            hours: 6.0,
            split: Split::Train,
            ..GenSpec::default()
        })
        .unwrap();
        for s in 0..t.steps {
            for (v, vm) in t.vms.iter().enumerate() {
                let i = t.at(s, v);
                assert!(t.cpu[i] >= 0.0 && t.cpu[i] <= vm.vcpus as f64);
                assert!(t.ws[i] > 0.0 && t.ws[i] < vm.mem_mib);
            }
        }
    }

    fn one(shape: Shape, seed: u64, hours: f64) -> Trace {
        generate(&GenSpec {
            vms: 1,
            hours,
            seed,
            mix: vec![(shape, 1.0)],
            ..GenSpec::default()
        })
        .unwrap()
    }

    #[test]
    fn new_shapes_behave_as_documented() {
        for seed in 1..4 {
            let t = one(Shape::SlowLeak, seed, 24.0);
            let mem = t.vms[0].mem_mib;
            assert!(t.ws[0] < 0.4 * mem, "starts small");
            assert!(*t.ws.last().unwrap() > 0.85 * mem, "climbs to ~90-95%");
            assert!(
                t.ws.windows(360).all(|w| w[359] > w[0] - 0.05 * mem),
                "never restarts"
            );

            let t = one(Shape::StepUp, seed, 24.0);
            let (first, last) = (t.ws[0], *t.ws.last().unwrap());
            assert!(last > 2.0 * first, "steps up: {first} -> {last}");
            let jump = t.ws.windows(13).map(|w| w[12] - w[0]).fold(0.0, f64::max);
            assert!(
                jump > 0.2 * t.vms[0].mem_mib,
                "sharply: {jump} within 2 minutes"
            );

            let t = one(Shape::CacheHeavy, seed, 2.0);
            let mem = t.vms[0].mem_mib;
            assert!(t
                .cache
                .iter()
                .all(|c| c.is_some_and(|c| c as f64 > 0.7 * mem)));
            assert!(t
                .ws
                .iter()
                .zip(&t.cache)
                .all(|(w, c)| w + c.unwrap() as f64 <= 0.96 * mem));

            let t = one(Shape::IdleSmall, seed, 2.0);
            assert_eq!(t.vms[0].vcpus, 1);
            assert!(t.cpu.iter().all(|&c| c < 0.05));

            let t = one(Shape::Sawtooth, seed, 6.0);
            let drops = t.ws.windows(2).filter(|w| w[1] < w[0] * 0.5).count();
            assert!(
                drops >= 3,
                "frees its memory at once, again and again: {drops}"
            );

            let t = one(Shape::BurstyIo, seed, 6.0);
            assert!(t.iops.iter().any(|&q| q > 14_000.0));
            let lc = one(Shape::LcLarge, seed, 1.0);
            assert!(lc.vms[0].vcpus >= 4 && lc.vms[0].class == VmClass::LatencyCritical);
        }
        let t = one(Shape::BimodalDesktop, 7, 24.0);
        let mem = t.vms[0].mem_mib;
        assert!(t.ws.iter().any(|&w| w > 0.45 * mem) && t.ws.iter().any(|&w| w < 0.13 * mem));
    }

    #[test]
    fn mix_parses_names_and_refuses_unknown_ones() {
        let m = parse_mix("svc=14, saw=2").unwrap();
        assert_eq!(
            m,
            vec![(Shape::DiurnalService, 14.0), (Shape::Sawtooth, 2.0)]
        );
        assert!(parse_mix("gpu=1").is_err());
        assert!(parse_mix("svc").is_err());
        assert_eq!(parse_mix("wide").unwrap(), WIDE_MIX.to_vec());
        assert!(WIDE_MIX.iter().all(|m| !m.0.unseen()));
    }

    #[test]
    fn rejects_silly_specs() {
        assert!(generate(&GenSpec {
            vms: 0,
            ..GenSpec::default()
        })
        .is_err());
        assert!(generate(&GenSpec {
            mix: vec![(Shape::BatchBurst, 0.0)],
            ..GenSpec::default()
        })
        .is_err());
        assert!(generate(&GenSpec {
            step_s: 0.0,
            ..GenSpec::default()
        })
        .is_err());
    }
}
