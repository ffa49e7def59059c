//! TRACE.csv: one row per VM per time step (documented in policy/README.md).
//! Parsed into dense per-step arrays so the simulator can replay it quickly.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot open trace {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("trace CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("trace header lacks required column {0:?}")]
    MissingColumn(&'static str),
    #[error("trace line {line}: {msg}")]
    Row { line: u64, msg: String },
    #[error("trace is inconsistent: {0}")]
    Invalid(String),
    #[error("cannot write trace: {0}")]
    Write(#[from] std::io::Error),
}

/// What kind of guest a VM is; decides which metrics and guardrails apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmClass {
    /// Its vCPUs' run-queue wait is what users notice; gets exclusive CPUs.
    LatencyCritical,
    /// Throughput matters, latency does not.
    Batch,
    /// Request-serving guest with a daily cycle.
    Service,
    /// Interactive desktop, mostly idle.
    Desktop,
    General,
}

impl VmClass {
    pub fn parse(s: &str) -> Option<VmClass> {
        Some(match s.trim() {
            "latency-critical" | "lc" => VmClass::LatencyCritical,
            "batch" => VmClass::Batch,
            "service" => VmClass::Service,
            "desktop" => VmClass::Desktop,
            "general" | "" => VmClass::General,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            VmClass::LatencyCritical => "latency-critical",
            VmClass::Batch => "batch",
            VmClass::Service => "service",
            VmClass::Desktop => "desktop",
            VmClass::General => "general",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub vcpus: u32,
    /// Memory the guest was started with (the balloon's maximum).
    pub mem_mib: f64,
    pub class: VmClass,
    /// The guest's memory never goes below this (a hard guardrail bound).
    pub floor_mib: f64,
}

/// Default floor when the trace gives none: enough for a small Linux guest.
pub fn default_floor_mib(mem_mib: f64) -> f64 {
    (256.0 + 0.05 * mem_mib).min(mem_mib)
}

/// A trace in dense form: `cpu[step * vms + vm]` and so on.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub step_s: f64,
    pub start_s: f64,
    pub vms: Vec<VmInfo>,
    pub steps: usize,
    /// CPU demand in vCPUs' worth.
    pub cpu: Vec<f64>,
    /// Working set in MiB.
    pub ws: Vec<f64>,
    /// I/O requests per second.
    pub iops: Vec<f64>,
    /// Page cache the guest keeps hot, MiB (optional `cache_mib` column): it is
    /// droppable, but dropping it costs refaults. None = not given (the
    /// simulator's default cache model applies).
    pub cache: Vec<Option<f32>>,
}

/// Limits on what a trace file may ask of us (hostile input).
const MAX_VMS: usize = 10_000;
const MAX_CELLS: usize = 20_000_000;
const MAX_VCPUS: u32 = 1024;

impl Trace {
    pub fn at(&self, step: usize, vm: usize) -> usize {
        step * self.vms.len() + vm
    }

    pub fn time(&self, step: usize) -> f64 {
        self.start_s + step as f64 * self.step_s
    }

    pub fn load(path: &Path) -> Result<Trace, TraceError> {
        let f = std::fs::File::open(path).map_err(|source| TraceError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Trace::read(std::io::BufReader::new(f))
    }

    pub fn read<R: Read>(reader: R) -> Result<Trace, TraceError> {
        let mut rdr = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .comment(Some(b'#'))
            .from_reader(reader);
        let headers = rdr.headers()?.clone();
        let col = |name: &'static str| {
            headers
                .iter()
                .position(|h| h == name)
                .ok_or(TraceError::MissingColumn(name))
        };
        let (c_t, c_vm, c_vcpus, c_mem) = (col("t_s")?, col("vm")?, col("vcpus")?, col("mem_mib")?);
        let (c_cpu, c_ws, c_io) = (col("cpu_demand")?, col("ws_mib")?, col("io_iops")?);
        let c_class = col("class").ok();
        let c_floor = col("floor_mib").ok();
        let c_cache = col("cache_mib").ok();

        struct Row {
            t: f64,
            vm: usize,
            cpu: f64,
            ws: f64,
            io: f64,
            cache: Option<f32>,
        }
        let mut vm_index: HashMap<String, usize> = HashMap::new();
        let mut vms: Vec<VmInfo> = Vec::new();
        let mut rows = Vec::new();
        for rec in rdr.records() {
            let rec = rec?;
            let line = rec.position().map(|p| p.line()).unwrap_or(0);
            let err = |msg: String| TraceError::Row { line, msg };
            let field = |i: usize| rec.get(i).unwrap_or("");
            let num = |i: usize, name: &str| -> Result<f64, TraceError> {
                let v: f64 = field(i)
                    .parse()
                    .map_err(|_| err(format!("{name} = {:?} is not a number", field(i))))?;
                if !v.is_finite() || v < 0.0 {
                    return Err(err(format!("{name} = {v} must be finite and not negative")));
                }
                Ok(v)
            };
            let name = field(c_vm);
            if name.is_empty() {
                return Err(err("empty vm name".into()));
            }
            let vcpus = num(c_vcpus, "vcpus")?;
            if vcpus < 1.0 || vcpus > MAX_VCPUS as f64 || vcpus.fract() != 0.0 {
                return Err(err(format!(
                    "vcpus = {vcpus} must be an integer in 1..={MAX_VCPUS}"
                )));
            }
            let mem = num(c_mem, "mem_mib")?;
            if mem < 64.0 {
                return Err(err(format!("mem_mib = {mem} is below 64")));
            }
            let class = match c_class {
                Some(i) => VmClass::parse(field(i))
                    .ok_or_else(|| err(format!("unknown class {:?}", field(i))))?,
                None => VmClass::General,
            };
            let floor = match c_floor {
                Some(i) if !field(i).is_empty() => num(i, "floor_mib")?.min(mem),
                _ => default_floor_mib(mem),
            };
            let info = VmInfo {
                name: name.to_string(),
                vcpus: vcpus as u32,
                mem_mib: mem,
                class,
                floor_mib: floor,
            };
            let vm = match vm_index.get(name) {
                Some(&i) => {
                    if vms[i] != info {
                        return Err(err(format!(
                            "vm {name} changes vcpus, mem_mib, class or floor_mib mid-trace"
                        )));
                    }
                    i
                }
                None => {
                    if vms.len() >= MAX_VMS {
                        return Err(err(format!("more than {MAX_VMS} VMs")));
                    }
                    vm_index.insert(name.to_string(), vms.len());
                    vms.push(info);
                    vms.len() - 1
                }
            };
            let cpu = num(c_cpu, "cpu_demand")?;
            if cpu > vcpus {
                return Err(err(format!("cpu_demand = {cpu} exceeds vcpus = {vcpus}")));
            }
            rows.push(Row {
                t: num(c_t, "t_s")?,
                vm,
                cpu,
                ws: num(c_ws, "ws_mib")?,
                io: num(c_io, "io_iops")?,
                cache: match c_cache {
                    Some(i) if !field(i).is_empty() => Some(num(i, "cache_mib")?.min(mem) as f32),
                    _ => None,
                },
            });
            if rows.len() > MAX_CELLS {
                return Err(TraceError::Invalid(format!("more than {MAX_CELLS} rows")));
            }
        }
        if rows.is_empty() {
            return Err(TraceError::Invalid("no rows".into()));
        }
        let mut times: Vec<f64> = rows.iter().map(|r| r.t).collect();
        times.sort_unstable_by(|a, b| a.total_cmp(b));
        times.dedup();
        let start_s = times[0];
        let step_s = if times.len() > 1 {
            times[1] - times[0]
        } else {
            10.0
        };
        for (i, w) in times.windows(2).enumerate() {
            if ((w[1] - w[0]) - step_s).abs() > 1e-6 * step_s.max(1.0) {
                return Err(TraceError::Invalid(format!(
                    "time steps must be evenly spaced: step {i} is {} s, the first is {step_s} s",
                    w[1] - w[0]
                )));
            }
        }
        let steps = times.len();
        let n = vms.len();
        let mut seen = vec![false; steps * n];
        let mut trace = Trace {
            step_s,
            start_s,
            vms,
            steps,
            cpu: vec![0.0; steps * n],
            ws: vec![0.0; steps * n],
            iops: vec![0.0; steps * n],
            cache: vec![None; steps * n],
        };
        for r in rows {
            let step = ((r.t - start_s) / step_s).round() as usize;
            let i = trace.at(step, r.vm);
            if seen[i] {
                return Err(TraceError::Invalid(format!(
                    "vm {} appears twice at t_s = {}",
                    trace.vms[r.vm].name, r.t
                )));
            }
            seen[i] = true;
            trace.cpu[i] = r.cpu;
            trace.ws[i] = r.ws;
            trace.iops[i] = r.io;
            trace.cache[i] = r.cache;
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(TraceError::Invalid(format!(
                "vm {} has no row at t_s = {} (every VM needs a row at every step)",
                trace.vms[i % n].name,
                trace.time(i / n)
            )));
        }
        Ok(trace)
    }

    pub fn write<W: Write>(&self, w: W) -> Result<(), TraceError> {
        let mut out = std::io::BufWriter::new(w);
        writeln!(
            out,
            "t_s,vm,vcpus,mem_mib,cpu_demand,ws_mib,io_iops,class,floor_mib,cache_mib"
        )?;
        for s in 0..self.steps {
            for (v, vm) in self.vms.iter().enumerate() {
                let i = self.at(s, v);
                write!(
                    out,
                    "{},{},{},{},{:.3},{:.1},{:.1},{},{},",
                    self.time(s),
                    vm.name,
                    vm.vcpus,
                    vm.mem_mib,
                    self.cpu[i],
                    self.ws[i],
                    self.iops[i],
                    vm.class.name(),
                    vm.floor_mib
                )?;
                match self.cache[i] {
                    None => writeln!(out)?,
                    Some(c) => writeln!(out, "{c:.1}")?,
                }
            }
        }
        out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = "t_s,vm,vcpus,mem_mib,cpu_demand,ws_mib,io_iops,class\n\
        0,a,2,2048,0.5,900,100,latency-critical\n\
        0,b,4,4096,3.0,2000,0,batch\n\
        10,b,4,4096,3.5,2100,5,batch\n\
        10,a,2,2048,0.6,950,120,latency-critical\n";

    #[test]
    fn reads_a_hand_written_trace() {
        let t = Trace::read(SMALL.as_bytes()).unwrap();
        assert_eq!(t.steps, 2);
        assert_eq!(t.step_s, 10.0);
        assert_eq!(t.vms[1].class, VmClass::Batch);
        assert_eq!(t.cpu[t.at(1, 1)], 3.5);
        assert_eq!(t.ws[t.at(1, 0)], 950.0);
        let mut buf = Vec::new();
        t.write(&mut buf).unwrap();
        assert_eq!(Trace::read(buf.as_slice()).unwrap(), t);
    }

    #[test]
    fn minimal_columns_are_enough() {
        let t = Trace::read(
            "t_s,vm,vcpus,mem_mib,cpu_demand,ws_mib,io_iops\n0,x,1,512,0.1,100,0\n".as_bytes(),
        )
        .unwrap();
        assert_eq!(t.vms[0].class, VmClass::General);
        assert_eq!(t.vms[0].floor_mib, default_floor_mib(512.0));
    }

    #[test]
    fn rejects_bad_traces_with_a_reason() {
        let cases = [
            (SMALL.replace("0.5,900", "NaN,900"), "cpu_demand"),
            (SMALL.replace("3.5,2100", "5.0,2100"), "exceeds vcpus"),
            (SMALL.replace("10,a,2,2048", "10,a,3,2048"), "changes vcpus"),
            (
                SMALL.replace("10,a,2,2048,0.6", "25,a,2,2048,0.6"),
                "evenly spaced",
            ),
            (SMALL.replace("io_iops,class", "iops,class"), "io_iops"),
            (SMALL.replace(",batch\n10", ",gpu\n10"), "unknown class"),
            (
                SMALL.replace(
                    "0,b,4,4096,3.0,2000,0,batch",
                    "0,a,2,2048,0.5,900,100,latency-critical",
                ),
                "twice",
            ),
            (
                format!("{SMALL}20,a,2,2048,0.6,950,120,latency-critical\n"),
                "no row",
            ),
            (SMALL.replace("900,100", "-900,100"), "not negative"),
        ];
        for (text, want) in cases {
            let e = Trace::read(text.as_bytes()).expect_err(want).to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
    }
}
