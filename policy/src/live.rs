//! Telemetry from the live host: topology from sysfs, memory and pressure from
//! procfs, vCPU thread schedstat. Guest-side numbers (balloon statistics,
//! device counters) arrive from each VMM over its control channel and are
//! handed in with [`LiveHost::set_guest_stats`].

use crate::host::Host;
use crate::telemetry::*;
use crate::trace::VmClass;
use crate::util::CpuSet;
use std::path::{Path, PathBuf};

fn read(path: &Path) -> Result<String, TelemetryError> {
    std::fs::read_to_string(path).map_err(|source| TelemetryError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn parse_err(path: &Path, msg: impl Into<String>) -> TelemetryError {
    TelemetryError::Parse {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// Reads the host's CPUs, last-level-cache groups and NUMA nodes from a sysfs
/// tree (normally `/sys`) and memory from `meminfo`.
pub fn read_topology(sys: &Path, meminfo: &Path) -> Result<Host, TelemetryError> {
    let online_path = sys.join("devices/system/cpu/online");
    let online =
        CpuSet::parse(&read(&online_path)?).map_err(|e| parse_err(&online_path, e.to_string()))?;
    let max = online
        .cpus()
        .last()
        .copied()
        .ok_or_else(|| parse_err(&online_path, "no CPU online"))?;
    if online.len() != max as usize + 1 {
        // Offline holes would leave CPUs with no group; the engine never places on them anyway.
        tracing::warn!("CPUs {online} online: offline CPUs are treated as absent");
    }
    let cpus = max + 1;
    let mut groups: Vec<CpuSet> = Vec::new();
    for cpu in 0..cpus {
        let set = if online.contains(cpu) {
            llc_group(sys, cpu)?
        } else {
            CpuSet::single(cpu)
        };
        if !groups.iter().any(|g| g.contains(cpu)) {
            groups.push(set);
        }
    }
    let mut nodes: Vec<CpuSet> = Vec::new();
    let node_dir = sys.join("devices/system/node");
    if let Ok(entries) = std::fs::read_dir(&node_dir) {
        let mut names: Vec<(u32, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e
                    .file_name()
                    .to_string_lossy()
                    .strip_prefix("node")?
                    .parse::<u32>()
                    .ok()?;
                Some((n, e.path()))
            })
            .collect();
        names.sort();
        for (_, p) in names {
            let path = p.join("cpulist");
            let set = CpuSet::parse(&read(&path)?).map_err(|e| parse_err(&path, e.to_string()))?;
            if !set.is_empty() {
                nodes.push(set);
            }
        }
    }
    let covered: usize = nodes.iter().map(CpuSet::len).sum();
    if nodes.is_empty() || covered != cpus as usize {
        // Kernels without NUMA support have no node directory: one node.
        nodes = vec![CpuSet::range(0, cpus)];
    }
    let mem = parse_meminfo(&read(meminfo)?).ok_or_else(|| parse_err(meminfo, "no MemTotal"))?;
    Ok(Host::new(cpus, mem.total_mib as u64, 0, groups, nodes)?)
}

/// The CPUs sharing `cpu`'s last-level cache: the highest cache index listed.
fn llc_group(sys: &Path, cpu: u32) -> Result<CpuSet, TelemetryError> {
    let cache = sys.join(format!("devices/system/cpu/cpu{cpu}/cache"));
    let mut best: Option<(u32, CpuSet)> = None;
    if let Ok(entries) = std::fs::read_dir(&cache) {
        for e in entries.filter_map(|e| e.ok()) {
            let Some(idx) = e
                .file_name()
                .to_string_lossy()
                .strip_prefix("index")
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let path = e.path().join("shared_cpu_list");
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let set = CpuSet::parse(&text).map_err(|e| parse_err(&path, e.to_string()))?;
            if best.as_ref().is_none_or(|(b, _)| idx > *b) {
                best = Some((idx, set));
            }
        }
    }
    Ok(best.map(|(_, s)| s).unwrap_or_else(|| CpuSet::single(cpu)))
}

pub struct MemInfo {
    pub total_mib: f64,
    pub available_mib: f64,
}

pub fn parse_meminfo(text: &str) -> Option<MemInfo> {
    let field = |name: &str| -> Option<f64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(':'))?;
        let kib: f64 = line[name.len() + 1..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    };
    let total_mib = field("MemTotal")?;
    let available_mib = field("MemAvailable")
        .or_else(|| field("MemFree"))
        .unwrap_or(0.0);
    Some(MemInfo {
        total_mib,
        available_mib,
    })
}

/// Parses one `/proc/pressure/*` file.
pub fn parse_psi(text: &str) -> Option<Psi> {
    let avg10 = |kind: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(kind))?;
        line.split_whitespace()
            .find_map(|f| f.strip_prefix("avg10="))?
            .parse()
            .ok()
    };
    // The "full" line is absent for CPU pressure on older kernels.
    Some(Psi {
        some_avg10: avg10("some")?,
        full_avg10: avg10("full").unwrap_or(0.0),
    })
}

/// Parses `/proc/<pid>/task/<tid>/schedstat`: "cpu_ns wait_ns timeslices".
pub fn parse_schedstat(text: &str) -> Option<VcpuStat> {
    let mut it = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some(VcpuStat {
        cpu_time_ns: it.next()??,
        wait_ns: it.next()??,
        timeslices: it.next()??,
    })
}

/// A VM the live host is watching: its vCPU threads and what the VMM reported.
#[derive(Debug, Clone)]
pub struct WatchedVm {
    pub id: String,
    pub class: VmClass,
    pub mem_mib: f64,
    pub floor_mib: f64,
    pub pid: u32,
    pub vcpu_tids: Vec<u32>,
    pub balloon: BalloonStats,
    pub devices: Vec<DeviceStat>,
}

pub struct LiveHost {
    proc_root: PathBuf,
    host: Host,
    vms: Vec<WatchedVm>,
    started: std::time::Instant,
}

impl LiveHost {
    /// Reads this machine's `/sys` and `/proc`.
    pub fn open() -> Result<LiveHost, TelemetryError> {
        LiveHost::open_at(Path::new("/sys"), Path::new("/proc"))
    }

    pub fn open_at(sys: &Path, proc_root: &Path) -> Result<LiveHost, TelemetryError> {
        let host = read_topology(sys, &proc_root.join("meminfo"))?;
        Ok(LiveHost {
            proc_root: proc_root.to_path_buf(),
            host,
            vms: Vec::new(),
            started: std::time::Instant::now(),
        })
    }

    pub fn watch(&mut self, vm: WatchedVm) {
        self.vms.retain(|v| v.id != vm.id);
        self.vms.push(vm);
    }

    pub fn unwatch(&mut self, id: &str) {
        self.vms.retain(|v| v.id != id);
    }

    /// Guest-reported numbers for a VM (from its VMM); unknown ids are ignored.
    pub fn set_guest_stats(&mut self, id: &str, balloon: BalloonStats, devices: Vec<DeviceStat>) {
        if let Some(vm) = self.vms.iter_mut().find(|v| v.id == id) {
            vm.balloon = balloon;
            vm.devices = devices;
        }
    }

    fn read_psi(&self, which: &str) -> Result<Psi, TelemetryError> {
        let path = self.proc_root.join("pressure").join(which);
        parse_psi(&read(&path)?).ok_or_else(|| parse_err(&path, "no some avg10= line"))
    }
}

impl TelemetrySource for LiveHost {
    fn host(&self) -> &Host {
        &self.host
    }

    fn sample(&mut self) -> Result<Snapshot, TelemetryError> {
        let meminfo_path = self.proc_root.join("meminfo");
        let mem = parse_meminfo(&read(&meminfo_path)?)
            .ok_or_else(|| parse_err(&meminfo_path, "no MemTotal"))?;
        let host = HostTelemetry {
            mem_total_mib: mem.total_mib,
            mem_available_mib: mem.available_mib,
            psi_cpu: self.read_psi("cpu")?,
            psi_memory: self.read_psi("memory")?,
            psi_io: self.read_psi("io")?,
        };
        let mut vms = Vec::with_capacity(self.vms.len());
        for vm in &self.vms {
            let mut vcpus = Vec::with_capacity(vm.vcpu_tids.len());
            for tid in &vm.vcpu_tids {
                let path = self
                    .proc_root
                    .join(format!("{}/task/{tid}/schedstat", vm.pid));
                vcpus.push(
                    parse_schedstat(&read(&path)?)
                        .ok_or_else(|| parse_err(&path, "expected three counters"))?,
                );
            }
            vms.push(VmTelemetry {
                id: vm.id.clone(),
                class: vm.class,
                mem_mib: vm.mem_mib,
                floor_mib: vm.floor_mib,
                vcpus,
                balloon: vm.balloon,
                devices: vm.devices.clone(),
            });
        }
        Ok(Snapshot {
            t_s: self.started.elapsed().as_secs_f64(),
            host,
            vms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers_handle_kernel_formats() {
        let psi = parse_psi("some avg10=1.50 avg60=0.20 avg300=0.00 total=5\nfull avg10=0.25 avg60=0 avg300=0 total=1\n").unwrap();
        assert_eq!((psi.some_avg10, psi.full_avg10), (1.5, 0.25));
        assert!(parse_psi("garbage").is_none());
        let s = parse_schedstat("123 456 7\n").unwrap();
        assert_eq!((s.cpu_time_ns, s.wait_ns, s.timeslices), (123, 456, 7));
        assert!(parse_schedstat("1 2").is_none());
        let m = parse_meminfo("MemTotal:       2048 kB\nMemFree: 10 kB\nMemAvailable:   1024 kB\n")
            .unwrap();
        assert_eq!((m.total_mib, m.available_mib), (2.0, 1.0));
    }

    /// Reads this machine's real sysfs/procfs, including our own thread's schedstat.
    #[test]
    fn reads_this_machine() {
        let mut live = LiveHost::open().expect("this machine's /sys and /proc must be readable");
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1) as u32;
        assert!(
            live.host().cpus >= n,
            "sysfs lists {} CPUs, the scheduler offers {n}",
            live.host().cpus
        );
        assert!(live.host().memory_mib > 256);
        let pid = std::process::id();
        // Burn some CPU on this thread so its schedstat is non-zero.
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        // SAFETY: gettid has no preconditions.
        let main_tid = unsafe { libc_gettid() };
        live.watch(WatchedVm {
            id: "self".into(),
            class: VmClass::General,
            mem_mib: 1024.0,
            floor_mib: 256.0,
            pid,
            vcpu_tids: vec![main_tid],
            balloon: BalloonStats::default(),
            devices: vec![],
        });
        let snap = live.sample().expect("sample of this process");
        assert!(
            snap.host.mem_total_mib > snap.host.mem_available_mib
                && snap.host.mem_available_mib > 0.0
        );
        assert!(snap.vms[0].vcpus[0].cpu_time_ns > 0);
        assert!(snap.host.psi_memory.some_avg10 >= 0.0);
    }

    unsafe fn libc_gettid() -> u32 {
        extern "C" {
            fn gettid() -> i32;
        }
        gettid() as u32
    }

    #[test]
    fn reads_a_fixture_sysfs_with_two_cache_groups() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let w = |p: &str, s: &str| {
            let path = sys.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, s).unwrap();
        };
        w("devices/system/cpu/online", "0-3\n");
        for c in 0..4 {
            w(
                &format!("devices/system/cpu/cpu{c}/cache/index0/shared_cpu_list"),
                &format!("{c}\n"),
            );
            w(
                &format!("devices/system/cpu/cpu{c}/cache/index3/shared_cpu_list"),
                if c < 2 { "0-1\n" } else { "2-3\n" },
            );
        }
        w("devices/system/node/node0/cpulist", "0-1\n");
        w("devices/system/node/node1/cpulist", "2-3\n");
        let meminfo = dir.path().join("meminfo");
        std::fs::write(&meminfo, "MemTotal: 4194304 kB\nMemAvailable: 1048576 kB\n").unwrap();
        let host = read_topology(&sys, &meminfo).unwrap();
        assert_eq!(host.cache_groups.len(), 2);
        assert_eq!(host.numa_nodes.len(), 2);
        assert_eq!(host.memory_mib, 4096);
        assert_eq!(host.cpu_node, vec![0, 0, 1, 1]);
    }
}
