//! Balloon baselines: oVirt MOM's balloon rules and a Kubernetes-VPA-like
//! percentile recommender.

use super::{BalloonRule, Ctx};

/// oVirt MOM's `balloon.rules`: shrink guests only while the host has under
/// 20% free memory, grow them back otherwise; steps of at most 5% of the
/// current size, and changes under 0.25% are not worth making.
#[derive(Debug, Clone)]
pub struct Mom {
    pub pressure_threshold: f64,
    pub pressure_critical: f64,
    pub min_guest_free_percent: f64,
    pub max_balloon_change_percent: f64,
    pub min_balloon_change_percent: f64,
    /// Samples averaged by MOM's StatAvg.
    pub stat_window: usize,
    host_free_percent: f64,
}

impl Default for Mom {
    fn default() -> Self {
        Mom {
            pressure_threshold: 0.20,
            pressure_critical: 0.05,
            min_guest_free_percent: 0.20,
            max_balloon_change_percent: 0.05,
            min_balloon_change_percent: 0.0025,
            stat_window: 10,
            host_free_percent: 1.0,
        }
    }
}

impl Mom {
    fn change_big_enough(&self, cur: f64, new: f64) -> bool {
        (new - cur).abs() > self.min_balloon_change_percent * cur
    }
}

impl BalloonRule for Mom {
    fn name(&self) -> &'static str {
        "mom"
    }

    fn begin_round(&mut self, ctx: &Ctx) {
        let h = &ctx.snap.host;
        self.host_free_percent = if h.mem_total_mib > 0.0 {
            h.mem_available_mib / h.mem_total_mib
        } else {
            1.0
        };
    }

    fn target(&mut self, ctx: &Ctx, v: usize) -> Option<f64> {
        let vm = &ctx.snap.vms[v];
        let hist = ctx.hist.vms.get(v)?;
        let n = hist.window(self.stat_window).count();
        if n == 0 {
            return None;
        }
        let avg = |f: fn(&crate::features::Obs) -> f64| {
            hist.window(self.stat_window).map(f).sum::<f64>() / n as f64
        };
        let cur = hist.last()?.actual_mib;
        let used = avg(|o| o.actual_mib) - avg(|o| o.free_mib);
        let max = vm.mem_mib;
        let hf = self.host_free_percent;
        if hf < self.pressure_threshold {
            let guest_free_percent = if hf <= self.pressure_critical {
                -0.05 + hf
            } else {
                self.min_guest_free_percent * (hf / self.pressure_threshold)
            };
            let balloon_min = vm.floor_mib.max(used + guest_free_percent * cur);
            let size = (cur * (1.0 - self.max_balloon_change_percent)).max(balloon_min);
            (size <= cur && self.change_big_enough(cur, size)).then_some(size.min(max))
        } else {
            if cur >= max {
                return None;
            }
            let balloon_min = used + self.min_guest_free_percent * cur;
            let size = (cur * (1.0 + self.max_balloon_change_percent))
                .min(max)
                .max(balloon_min);
            self.change_big_enough(cur, size).then_some(size.min(max))
        }
    }
}

/// Like the Kubernetes Vertical Pod Autoscaler's memory recommender: peaks of
/// the working set over 5-minute windows go into a sample set whose weights
/// double every 24 h (newer counts more); the target is the weighted 90th
/// percentile plus a 15% safety margin, applied only when the memory in force
/// leaves [p50, p95] (+ margin), as VPA's updater only evicts outside its
/// bounds. A swap-in or OOM kill adds a sample 20% above the memory in force
/// (VPA's OOM bump).
#[derive(Debug, Clone)]
pub struct Vpa {
    pub window_s: f64,
    pub half_life_s: f64,
    pub margin: f64,
    /// Percentile of the samples the target is set to.
    pub target_p: f64,
    pub min_mib: f64,
    samples: Vec<Vec<(f64, f64)>>,
    window_peak: Vec<f64>,
    window_start: Vec<f64>,
    /// (p50, p90, p95) of each VM's samples, recomputed when a sample arrives.
    cached: Vec<Option<(f64, f64, f64)>>,
}

impl Default for Vpa {
    fn default() -> Self {
        Vpa {
            window_s: 300.0,
            half_life_s: 86_400.0,
            margin: 0.15,
            target_p: 0.90,
            min_mib: 250.0,
            samples: Vec::new(),
            window_peak: Vec::new(),
            window_start: Vec::new(),
            cached: Vec::new(),
        }
    }
}

/// Weighted percentiles `ps` (ascending) of `samples` (value, weight).
fn weighted_percentiles<const N: usize>(samples: &[(f64, f64)], ps: [f64; N]) -> [f64; N] {
    let mut s: Vec<(f64, f64)> = samples.to_vec();
    s.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = s.iter().map(|x| x.1).sum();
    let mut out = [s.last().map(|x| x.0).unwrap_or(0.0); N];
    let mut k = 0;
    let mut acc = 0.0;
    for (v, w) in &s {
        acc += w;
        while k < N && acc >= ps[k] * total {
            out[k] = *v;
            k += 1;
        }
    }
    out
}

impl Vpa {
    /// The engine's fallback: the same recommender, sized for safety rather
    /// than packing (p98 of peaks, 30% margin), since it takes over exactly
    /// when a model was unsure or made things worse.
    pub fn conservative() -> Self {
        Vpa {
            margin: 0.30,
            target_p: 0.98,
            ..Vpa::default()
        }
    }
}

impl BalloonRule for Vpa {
    fn name(&self) -> &'static str {
        "vpa"
    }

    fn begin_round(&mut self, ctx: &Ctx) {
        let n = ctx.snap.vms.len();
        if self.samples.len() != n {
            self.samples = vec![Vec::new(); n];
            self.window_peak = vec![0.0; n];
            self.window_start = vec![ctx.snap.t_s; n];
            self.cached = vec![None; n];
        }
    }

    fn target(&mut self, ctx: &Ctx, v: usize) -> Option<f64> {
        let vm = &ctx.snap.vms[v];
        let o = *ctx.hist.vms.get(v)?.last()?;
        let t = ctx.snap.t_s;
        let weight = (t / self.half_life_s).exp2();
        self.window_peak[v] = self.window_peak[v].max(o.ws_mib);
        let before = self.samples[v].len();
        if o.swap_in_mib_per_min > 0.0 || o.oom_kills > 0 {
            self.samples[v].push((o.actual_mib * 1.2, weight));
        }
        if t - self.window_start[v] >= self.window_s {
            self.samples[v].push((self.window_peak[v], weight));
            self.window_peak[v] = 0.0;
            self.window_start[v] = t;
        }
        if self.samples[v].len() != before {
            let tp = self.target_p.clamp(0.5, 1.0);
            let [p50, pt, p95] = weighted_percentiles(&self.samples[v], [0.5, tp.min(0.95), 0.95]);
            let pt = if tp > 0.95 {
                weighted_percentiles(&self.samples[v], [tp])[0]
            } else {
                pt
            };
            self.cached[v] = Some((p50, pt, p95.max(pt)));
        }
        let (p50, p90, p95) = self.cached[v]?;
        let m = 1.0 + self.margin;
        let clamp = |x: f64| x.max(self.min_mib).max(vm.floor_mib).min(vm.mem_mib);
        let target = clamp(p90 * m);
        let lower = clamp(p50 * m);
        let upper = clamp(p95 * m);
        let cur = ctx.state[v].balloon_target_mib;
        (cur < lower || cur > upper).then_some(target)
    }
}
