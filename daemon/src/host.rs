//! What the host has, read from sysfs and procfs: CPUs with their cache and
//! NUMA topology, memory, and which kind of KVM `/dev/kvm` is.

use std::fs;
use std::path::Path;

use kiln_api::{CpuCache, HostCpu, KvmMode};

/// The host's CPUs, memory and KVM, without the capacity (which depends on
/// the VMs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    pub cpus: Vec<HostCpu>,
    pub numa_nodes: Vec<u32>,
    pub memory_bytes: u64,
    pub memory_available_bytes: u64,
    pub kvm: KvmMode,
}

/// Reads the live host (`/sys`, `/proc`, `/dev/kvm`).
pub fn read() -> HostFacts {
    let (memory_bytes, memory_available_bytes) =
        meminfo(&fs::read_to_string("/proc/meminfo").unwrap_or_default());
    let sys = Path::new("/sys/devices/system");
    HostFacts {
        cpus: cpus(&sys.join("cpu"), &sys.join("node")),
        numa_nodes: numa_nodes(&sys.join("node")),
        memory_bytes,
        memory_available_bytes,
        kvm: kvm_mode(
            Path::new("/dev/kvm").exists(),
            Path::new("/sys/module/kvm_pvm").exists(),
            &fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
        ),
    }
}

/// Total memory of the host in bytes (MemTotal), 0 when unknown.
pub fn memory_bytes() -> u64 {
    meminfo(&fs::read_to_string("/proc/meminfo").unwrap_or_default()).0
}

/// (MemTotal, MemAvailable) in bytes.
fn meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

fn kvm_mode(dev_kvm: bool, kvm_pvm: bool, cpuinfo: &str) -> KvmMode {
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    match (dev_kvm, kvm_pvm, hw) {
        (false, _, _) => KvmMode::None,
        (true, false, true) => KvmMode::Hardware,
        _ => KvmMode::Emulating,
    }
}

/// A sysfs CPU list: `0-3,8,10-11`. Malformed parts are skipped.
fn cpu_list(text: &str) -> Vec<u32> {
    let mut ids = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                    // Bounded: a sysfs list never spans more than the kernel's NR_CPUS.
                    ids.extend(a..=b.min(a.saturating_add(65536)));
                }
            }
            None => ids.extend(part.parse::<u32>().ok()),
        }
    }
    ids
}

fn read_u32(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `32K`, `1024K`, `8M` → KiB.
fn cache_size_kib(text: &str) -> Option<u64> {
    let t = text.trim();
    let (num, mult) = match t.chars().last()? {
        'K' => (&t[..t.len() - 1], 1),
        'M' => (&t[..t.len() - 1], 1024),
        'G' => (&t[..t.len() - 1], 1024 * 1024),
        _ => (t, 1),
    };
    num.parse::<u64>().ok().map(|n| n * mult)
}

fn numa_nodes(node_dir: &Path) -> Vec<u32> {
    fs::read_to_string(node_dir.join("online"))
        .map(|t| cpu_list(&t))
        .unwrap_or_default()
}

fn cpus(cpu_dir: &Path, node_dir: &Path) -> Vec<HostCpu> {
    let online = fs::read_to_string(cpu_dir.join("online"))
        .map(|t| cpu_list(&t))
        .unwrap_or_default();
    let nodes: Vec<(u32, Vec<u32>)> = numa_nodes(node_dir)
        .into_iter()
        .map(|n| {
            let list = fs::read_to_string(node_dir.join(format!("node{n}/cpulist")))
                .map(|t| cpu_list(&t))
                .unwrap_or_default();
            (n, list)
        })
        .collect();
    online
        .into_iter()
        .map(|id| {
            let dir = cpu_dir.join(format!("cpu{id}"));
            HostCpu {
                id,
                core: read_u32(&dir.join("topology/core_id")).unwrap_or(id),
                package: read_u32(&dir.join("topology/physical_package_id")).unwrap_or(0),
                numa_node: nodes
                    .iter()
                    .find(|(_, list)| list.contains(&id))
                    .map(|(n, _)| *n),
                caches: caches(&dir.join("cache")),
            }
        })
        .collect()
}

fn caches(cache_dir: &Path) -> Vec<CpuCache> {
    let mut caches = Vec::new();
    for i in 0.. {
        let dir = cache_dir.join(format!("index{i}"));
        if !dir.is_dir() {
            break;
        }
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap_or_default();
        let (Some(level), Some(size_kib)) =
            (read_u32(&dir.join("level")), cache_size_kib(&read("size")))
        else {
            continue;
        };
        caches.push(CpuCache {
            level,
            kind: read("type").trim().to_lowercase(),
            size_kib,
            shared_with: cpu_list(&read("shared_cpu_list")),
        });
    }
    caches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_ranges_and_skip_garbage() {
        assert_eq!(cpu_list("0-3,8,10-11\n"), [0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(cpu_list("x,2,5-"), [2]);
        assert!(cpu_list("").is_empty());
    }

    #[test]
    fn cache_sizes_and_meminfo() {
        assert_eq!(cache_size_kib("32K\n"), Some(32));
        assert_eq!(cache_size_kib("8M"), Some(8192));
        assert_eq!(cache_size_kib("M"), None);
        let (total, avail) = meminfo("MemTotal:  1000 kB\nMemFree: 5 kB\nMemAvailable: 600 kB\n");
        assert_eq!((total, avail), (1_024_000, 614_400));
    }

    #[test]
    fn kvm_mode_tells_hardware_from_pvm() {
        let svm = "flags\t: fpu svm lm\n";
        assert_eq!(kvm_mode(true, false, svm), KvmMode::Hardware);
        assert_eq!(kvm_mode(true, true, svm), KvmMode::Emulating);
        assert_eq!(
            kvm_mode(true, false, "flags : fpu lm\n"),
            KvmMode::Emulating
        );
        assert_eq!(kvm_mode(false, false, svm), KvmMode::None);
    }

    #[test]
    fn this_host_has_cpus_with_caches_and_memory() {
        let facts = read();
        assert!(!facts.cpus.is_empty());
        assert!(facts.memory_bytes > 0);
        assert!(facts.memory_available_bytes <= facts.memory_bytes);
        // This machine's sysfs lists caches (a VM's may not): at least one.
        assert!(facts.cpus.iter().any(|c| !c.caches.is_empty()), "{facts:?}");
    }
}
