//! The evaluation set: traces built from workload shapes and mixes that no
//! training trace uses, fixed by seed and checked by SHA-256 so that nobody
//! tunes against a set that silently changed. Its three `Shape::UNSEEN` kinds
//! never appear in training (the generator refuses them with `Split::Train`);
//! the other kinds appear here with their evaluation parameter ranges.
//!
//! Each trace runs on two hosts: a roomy one (96 CPUs, 512 GiB: idle CPUs and
//! spare memory) and an overcommitted one (the 64-CPU topology with guest
//! memory sized to 1/1.4 of the trace's allocation).

use crate::eval::PolicyResult;
use crate::host::Host;
use crate::trace::Trace;
use crate::tracegen::{generate, GenError, GenSpec, Shape, Split};
use sha2::{Digest, Sha256};

/// Name of this version of the set; a new version gets a new name, never new contents.
pub const SET_NAME: &str = "unseen-v1";

/// Memory overcommitment of the overcommitted host: allocation / guest memory.
pub const OVERCOMMIT: f64 = 1.4;

pub struct EvalTrace {
    pub name: &'static str,
    pub seed: u64,
    /// VMs per shape (weights that apportion exactly).
    pub mix: &'static [(Shape, f64)],
    /// SHA-256 of the CSV `Trace::write` produces for it.
    pub sha256: &'static str,
}

/// SHA-256 of the first hour of each trace, generated on its own
/// (`hours = 1`), so a unit test can check the generator quickly.
pub const FIRST_HOUR_SHA256: [&str; 4] = [
    "eac67930e8425b2cd270099e56db0a7bc349e1c1b25bed425534f0d2e7bbb9f6",
    "107c8e908dea321459878b64ee26a4e39d073fbc8ae3f781fe1febc929c53b7a",
    "712fe9b28fd85c7fd393670619ffe9bfa6e3d9eb11e0895eff3e674f6507384b",
    "3dcf12175d722fd204243372919991d6c95e17f9c96adf1e229aea9e55d3cc94",
];

impl EvalTrace {
    pub fn vms(&self) -> usize {
        self.mix.iter().map(|m| m.1 as usize).sum()
    }

    pub fn spec(&self) -> GenSpec {
        GenSpec {
            vms: self.vms(),
            hours: 24.0,
            step_s: 10.0,
            seed: self.seed,
            split: Split::Eval,
            mix: self.mix.to_vec(),
        }
    }

    pub fn generate(&self) -> Result<Trace, GenError> {
        generate(&self.spec())
    }

    pub fn generate_first_hour(&self) -> Result<Trace, GenError> {
        generate(&GenSpec {
            hours: 1.0,
            ..self.spec()
        })
    }
}

use Shape::*;

pub const TRACES: [EvalTrace; 4] = [
    EvalTrace {
        name: "mixed",
        seed: 5001,
        mix: &[
            (DiurnalService, 4.0),
            (BatchBurst, 4.0),
            (MemoryLeak, 3.0),
            (IdleDesktop, 4.0),
            (LatencyCritical, 3.0),
            (SlowLeak, 3.0),
            (StepUp, 3.0),
            (CacheHeavy, 3.0),
            (IdleSmall, 6.0),
            (LcLarge, 2.0),
            (Sawtooth, 3.0),
            (BimodalDesktop, 3.0),
            (BurstyIo, 3.0),
        ],
        sha256: "0774697ef887fd593ee95e1dc8aedb24859ad754cf3fd93dbca75e37bb40ba83",
    },
    EvalTrace {
        name: "lc-heavy",
        seed: 5002,
        mix: &[
            (LcLarge, 6.0),
            (LatencyCritical, 6.0),
            (BatchBurst, 6.0),
            (Sawtooth, 3.0),
            (DiurnalService, 4.0),
            (StepUp, 2.0),
            (BurstyIo, 3.0),
            (IdleSmall, 4.0),
        ],
        sha256: "4fdaa7ee4d60280b01ea6aaea9f5b08238a31e67df30d916ba01a27c79d8ddce",
    },
    EvalTrace {
        name: "memory",
        seed: 5003,
        mix: &[
            (SlowLeak, 8.0),
            (StepUp, 8.0),
            (CacheHeavy, 8.0),
            (Sawtooth, 6.0),
            (BimodalDesktop, 6.0),
            (MemoryLeak, 4.0),
            (DiurnalService, 4.0),
        ],
        sha256: "d697e1ed5b43d872fd764b6bfad7329bbc8b7d75f2f650987a5afe729e6fedf6",
    },
    EvalTrace {
        name: "idle-many",
        seed: 5004,
        mix: &[
            (IdleSmall, 30.0),
            (BimodalDesktop, 8.0),
            (BurstyIo, 6.0),
            (BatchBurst, 4.0),
            (IdleDesktop, 6.0),
            (LatencyCritical, 2.0),
        ],
        sha256: "64ccf333323e10c078fa3d14db64dc0db48d93f0d7cb2baf21422d3ce793f9aa",
    },
];

/// The roomy host (policy/examples/host-96-roomy.toml).
pub fn roomy_host() -> Host {
    Host::from_toml(include_str!("../examples/host-96-roomy.toml"))
        .expect("the bundled roomy host description is valid")
}

/// The 64-CPU topology (policy/examples/host-64.toml) with guest memory
/// 1/[`OVERCOMMIT`] of the trace's allocation.
pub fn overcommitted_host(trace: &Trace) -> Host {
    let mut h = Host::from_toml(include_str!("../examples/host-64.toml"))
        .expect("the bundled 64-CPU host description is valid");
    let alloc: f64 = trace.vms.iter().map(|v| v.mem_mib).sum();
    h.memory_mib = h.reserved_mib + (alloc / OVERCOMMIT).floor() as u64;
    h
}

/// SHA-256 (hex) of the trace as `Trace::write` writes it.
pub fn trace_sha256(trace: &Trace) -> String {
    struct HashWriter(Sha256);
    impl std::io::Write for HashWriter {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.update(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = HashWriter(Sha256::new());
    trace
        .write(&mut w)
        .expect("hashing a trace cannot fail to write");
    w.0.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Generates every trace and compares it with its recorded hash.
pub fn check() -> Result<Vec<(&'static str, Trace)>, String> {
    let mut out = Vec::new();
    for t in &TRACES {
        let trace = t.generate().map_err(|e| e.to_string())?;
        let h = trace_sha256(&trace);
        if h != t.sha256 {
            return Err(format!(
                "evaluation trace {} (seed {}) hashes to {h}, not the recorded {}: the \
                 generator changed the evaluation set; make a new set, do not edit this one",
                t.name, t.seed, t.sha256
            ));
        }
        out.push((t.name, trace));
    }
    Ok(out)
}

/// One target judged for one engine on one run.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub target: &'static str,
    pub figure: String,
    pub met: bool,
}

/// The targets for `engine` among `results` (which must hold
/// static, static-pin and mom for the relative ones).
pub fn judge(results: &[PolicyResult], engine: &str) -> Vec<Verdict> {
    let get = |n: &str| results.iter().find(|r| r.name == n);
    let Some(e) = get(engine) else {
        return Vec::new();
    };
    let m = &e.metrics;
    let mut out = vec![
        Verdict {
            target: "OOM kills = 0",
            figure: format!("{}", m.oom_events),
            met: m.oom_events == 0,
        },
        // With deflate-on-OOM a guest the balloon squeezed too far still
        // enters its OOM path (and stalls there) before the notifier frees
        // memory: the engine must not rely on that either.
        Verdict {
            target: "guest OOM-path entries = 0",
            figure: format!("{}", m.oom_deflate_calls),
            met: m.oom_deflate_calls == 0,
        },
    ];
    let reclaim = m.reclaimed_pct();
    out.push(Verdict {
        target: "reclaim >= 25%",
        figure: format!("{reclaim:.1}%"),
        met: reclaim >= 25.0,
    });
    let sw = m.swap_in_pct_per_min();
    out.push(Verdict {
        target: "swap-ins <= 0.2%/min",
        figure: format!("{sw:.3}%"),
        met: sw <= 0.2,
    });
    if let Some(mom) = get("mom") {
        let mr = mom.metrics.reclaimed_pct();
        out.push(if mr < 0.05 {
            Verdict {
                target: ">= 1.5x MOM",
                figure: format!("MOM {mr:.2}%"),
                met: reclaim >= 1.5 * mr,
            }
        } else {
            let r = reclaim / mr;
            Verdict {
                target: ">= 1.5x MOM",
                figure: format!("{r:.2}x"),
                met: r >= 1.5,
            }
        });
    }
    if let Some(p) = get("static-pin") {
        let r = m.batch_throughput() / p.metrics.batch_throughput().max(1e-9);
        out.push(Verdict {
            target: "batch >= 1.2x pin",
            figure: format!("{r:.2}x"),
            met: r >= 1.2,
        });
        let (lw, pw) = (m.lc_wait_p99_ms(), p.metrics.lc_wait_p99_ms());
        out.push(Verdict {
            target: "LC p99 wait <= pin +5%",
            figure: format!("{lw:.2} vs {pw:.2} ms/s"),
            met: lw <= pw * 1.05 + 1e-9,
        });
    }
    if let Some(s) = get("static") {
        let gain = 1.0 - m.io_p99_us() / s.metrics.io_p99_us().max(1e-9);
        out.push(Verdict {
            target: "I/O p99 >= 15% lower",
            figure: format!("{:.1}%", gain * 100.0),
            met: gain >= 0.15,
        });
    }
    let d99 = e.decision_p(99.0);
    out.push(Verdict {
        target: "decision p99 < 20 us",
        figure: format!("{d99:.2} us"),
        met: d99 < 20.0,
    });
    out
}

/// A run's name (trace / host) and its verdicts.
pub type Run = (String, Vec<Verdict>);

/// A markdown table: one row per run, one column per target, misses in bold.
pub fn verdict_table(runs: &[Run]) -> String {
    let Some((_, first)) = runs.iter().find(|r| !r.1.is_empty()) else {
        return String::new();
    };
    let mut s = String::from("| run |");
    for v in first {
        s.push_str(&format!(" {} |", v.target));
    }
    s.push_str("\n|---|");
    s.push_str(&"---|".repeat(first.len()));
    s.push('\n');
    for (name, vs) in runs {
        s.push_str(&format!("| {name} |"));
        for v in vs {
            if v.met {
                s.push_str(&format!(" {} |", v.figure));
            } else {
                s.push_str(&format!(" **{} MISSED** |", v.figure));
            }
        }
        s.push('\n');
    }
    let met: usize = runs
        .iter()
        .map(|r| r.1.iter().filter(|v| v.met).count())
        .sum();
    let all: usize = runs.iter().map(|r| r.1.len()).sum();
    s.push_str(&format!("\n{met} of {all} (run, target) pairs met.\n"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unseen_kind_is_in_the_set_and_none_can_be_trained_on() {
        for k in Shape::UNSEEN {
            assert!(
                TRACES.iter().any(|t| t.mix.iter().any(|m| m.0 == k)),
                "{k:?} missing from the evaluation set"
            );
            let spec = GenSpec {
                vms: 2,
                hours: 1.0,
                split: Split::Train,
                mix: vec![(Shape::DiurnalService, 1.0), (k, 1.0)],
                ..GenSpec::default()
            };
            assert!(generate(&spec)
                .unwrap_err()
                .to_string()
                .contains("evaluation only"));
        }
    }

    #[test]
    fn the_generator_still_makes_the_committed_set() {
        for (t, want) in TRACES.iter().zip(FIRST_HOUR_SHA256) {
            let got = trace_sha256(&t.generate_first_hour().unwrap());
            assert_eq!(
                got, want,
                "first hour of {}: the evaluation set changed",
                t.name
            );
        }
    }

    #[test]
    fn the_overcommitted_host_is_overcommitted() {
        let t = GenSpec {
            vms: 8,
            hours: 0.1,
            mix: TRACES[0].mix.to_vec(),
            ..GenSpec::default()
        };
        let trace = generate(&t).unwrap();
        let h = overcommitted_host(&trace);
        let alloc: f64 = trace.vms.iter().map(|v| v.mem_mib).sum();
        assert!(alloc / h.guest_memory_mib() >= 1.3);
        assert!(alloc < roomy_host().guest_memory_mib());
    }
}
