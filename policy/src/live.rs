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
    /// Where cgroup v2 is mounted; None: VMs' groups are not read.
    cgroup_root: Option<PathBuf>,
}

/// The cgroup v2 mount point named in a `/proc/PID/mountinfo`.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "id parent maj:min root mountpoint opts [optional...] - fstype source superopts"
        let (head, tail) = line.split_once(" - ")?;
        if tail.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        head.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The cgroup v2 path (`0::/...`) of a `/proc/PID/cgroup`.
pub fn parse_proc_cgroup(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim)
}

/// Reads a VM's group under `root` from the pid's `/proc/PID/cgroup`.
/// None when the process has no cgroup v2 entry or its group is not there.
pub fn read_cgroup(root: &Path, proc_root: &Path, pid: u32) -> Option<CgroupStat> {
    let text = std::fs::read_to_string(proc_root.join(format!("{pid}/cgroup"))).ok()?;
    let rel = parse_proc_cgroup(&text)?;
    let dir = root.join(rel.trim_start_matches('/'));
    if !dir.is_dir() {
        return None;
    }
    let file = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    Some(CgroupStat {
        path: dir.display().to_string(),
        memory_current_mib: file("memory.current")
            .and_then(|t| t.trim().parse::<u64>().ok())
            .map(|b| b as f64 / 1048576.0),
        memory_pressure: file("memory.pressure").and_then(|t| parse_psi(&t)),
        cpu_pressure: file("cpu.pressure").and_then(|t| parse_psi(&t)),
    })
}

impl LiveHost {
    /// Reads this machine's `/sys` and `/proc`.
    pub fn open() -> Result<LiveHost, TelemetryError> {
        let live = LiveHost::open_at(Path::new("/sys"), Path::new("/proc"))?;
        let mount = std::fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|t| cgroup2_mount(&t));
        Ok(match mount {
            Some(root) => live.with_cgroup_root(root),
            None => live,
        })
    }

    /// Reads each VM's cgroup v2 group under `root` (the cgroup2 mount).
    pub fn with_cgroup_root(mut self, root: PathBuf) -> Self {
        self.cgroup_root = Some(root);
        self
    }

    pub fn open_at(sys: &Path, proc_root: &Path) -> Result<LiveHost, TelemetryError> {
        let host = read_topology(sys, &proc_root.join("meminfo"))?;
        Ok(LiveHost {
            proc_root: proc_root.to_path_buf(),
            host,
            vms: Vec::new(),
            started: std::time::Instant::now(),
            cgroup_root: None,
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
                cgroup: self
                    .cgroup_root
                    .as_deref()
                    .and_then(|root| read_cgroup(root, &self.proc_root, vm.pid)),
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

    /// A fake /sys, /proc (with a VMM's vCPU thread) and cgroup2 tree.
    #[test]
    fn samples_a_fake_vmm_with_its_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let w = |p: &str, s: &str| {
            let path = dir.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, s).unwrap();
        };
        w("sys/devices/system/cpu/online", "0-1\n");
        w(
            "proc/meminfo",
            "MemTotal: 2097152 kB\nMemAvailable: 1048576 kB\n",
        );
        for which in ["cpu", "memory", "io"] {
            w(
                &format!("proc/pressure/{which}"),
                "some avg10=0.50 avg60=0 avg300=0 total=1\n",
            );
        }
        w("proc/77/task/78/schedstat", "2000000 500000 9\n");
        w("proc/77/cgroup", "0::/kiln-vms/web\n");
        w("cg/kiln-vms/web/memory.current", "104857600\n");
        w(
            "cg/kiln-vms/web/memory.pressure",
            "some avg10=3.00 avg60=0 avg300=0 total=1\nfull avg10=1.00 avg60=0 avg300=0 total=1\n",
        );
        // No cpu.pressure: the file of a controller not enabled is absent.
        w("proc/88/cgroup", "0::/elsewhere\n");
        let mut live = LiveHost::open_at(&dir.path().join("sys"), &dir.path().join("proc"))
            .unwrap()
            .with_cgroup_root(dir.path().join("cg"));
        let vm = |id: &str, pid| WatchedVm {
            id: id.into(),
            class: VmClass::General,
            mem_mib: 512.0,
            floor_mib: 128.0,
            pid,
            vcpu_tids: if pid == 77 { vec![78] } else { vec![] },
            balloon: BalloonStats::default(),
            devices: vec![],
        };
        live.watch(vm("web", 77));
        live.watch(vm("nogroup", 88));
        let snap = live.sample().unwrap();
        assert_eq!(snap.vms[0].vcpus[0].cpu_time_ns, 2_000_000);
        assert_eq!(snap.vms[0].vcpus[0].wait_ns, 500_000);
        let cg = snap.vms[0].cgroup.as_ref().expect("web's group is read");
        assert_eq!(cg.memory_current_mib, Some(100.0));
        assert_eq!(cg.memory_pressure.unwrap().some_avg10, 3.0);
        assert_eq!(cg.memory_pressure.unwrap().full_avg10, 1.0);
        assert_eq!(cg.cpu_pressure, None);
        assert!(cg.path.ends_with("kiln-vms/web"), "{}", cg.path);
        assert_eq!(snap.vms[1].cgroup, None, "its group does not exist");
        assert_eq!(
            cgroup2_mount(
                "22 1 0:20 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                 23 1 0:21 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
            ),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount("23 1 0:21 / /x rw - cgroup cgroup rw\n"),
            None
        );
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
