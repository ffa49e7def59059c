//! The description of a host the simulator (and the engine) reasons about:
//! CPUs, their last-level-cache groups and NUMA nodes, and memory. Read from
//! HOST.toml (documented in policy/README.md) or from the live host's sysfs.

use crate::util::{CpuListError, CpuSet};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot read host file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("host file is not valid TOML for a host description: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("host {what}: {source}")]
    CpuList { what: String, source: CpuListError },
    #[error("host description is inconsistent: {0}")]
    Invalid(String),
}

/// HOST.toml as written by a user.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFile {
    /// Number of logical CPUs, numbered 0..cpus.
    pub cpus: u32,
    /// Physical memory in MiB.
    pub memory_mib: u64,
    /// Memory kept for the host itself (kernel, Kiln, page cache), in MiB.
    #[serde(default)]
    pub reserved_mib: u64,
    pub numa_nodes: Vec<GroupFile>,
    pub cache_groups: Vec<GroupFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupFile {
    /// CPU list in the kernel's format, e.g. "0-7,32-39".
    pub cpus: String,
}

/// A validated host: every CPU in exactly one cache group and one NUMA node,
/// and each cache group inside one node.
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    pub cpus: u32,
    pub memory_mib: u64,
    pub reserved_mib: u64,
    pub cache_groups: Vec<CpuSet>,
    pub numa_nodes: Vec<CpuSet>,
    /// cache group index of each CPU
    pub cpu_group: Vec<usize>,
    /// NUMA node index of each CPU
    pub cpu_node: Vec<usize>,
    /// NUMA node of each cache group
    pub group_node: Vec<usize>,
}

/// Hosts larger than this are refused: the simulator keeps per-CPU arrays.
const MAX_HOST_CPUS: u32 = 4096;

impl Host {
    pub fn load(path: &Path) -> Result<Host, HostError> {
        let text = std::fs::read_to_string(path).map_err(|source| HostError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Host::from_toml(&text)
    }

    pub fn from_toml(text: &str) -> Result<Host, HostError> {
        let file: HostFile = toml::from_str(text)?;
        Host::from_file(&file)
    }

    pub fn from_file(file: &HostFile) -> Result<Host, HostError> {
        let parse = |what: &str, i: usize, g: &GroupFile| {
            CpuSet::parse(&g.cpus).map_err(|source| HostError::CpuList {
                what: format!("{what} {i}"),
                source,
            })
        };
        let groups: Vec<CpuSet> = file
            .cache_groups
            .iter()
            .enumerate()
            .map(|(i, g)| parse("cache group", i, g))
            .collect::<Result<_, _>>()?;
        let nodes: Vec<CpuSet> = file
            .numa_nodes
            .iter()
            .enumerate()
            .map(|(i, g)| parse("NUMA node", i, g))
            .collect::<Result<_, _>>()?;
        Host::new(file.cpus, file.memory_mib, file.reserved_mib, groups, nodes)
    }

    pub fn new(
        cpus: u32,
        memory_mib: u64,
        reserved_mib: u64,
        cache_groups: Vec<CpuSet>,
        numa_nodes: Vec<CpuSet>,
    ) -> Result<Host, HostError> {
        let invalid = |m: String| Err(HostError::Invalid(m));
        if cpus == 0 || cpus > MAX_HOST_CPUS {
            return invalid(format!("cpus = {cpus}, must be 1..={MAX_HOST_CPUS}"));
        }
        if memory_mib == 0 || reserved_mib >= memory_mib {
            return invalid(format!(
                "memory_mib = {memory_mib} must be positive and above reserved_mib = {reserved_mib}"
            ));
        }
        let assign = |sets: &[CpuSet], what: &str| -> Result<Vec<usize>, HostError> {
            let mut owner = vec![usize::MAX; cpus as usize];
            for (i, set) in sets.iter().enumerate() {
                if set.is_empty() {
                    return Err(HostError::Invalid(format!("{what} {i} has no CPUs")));
                }
                for &c in set.cpus() {
                    let slot = owner.get_mut(c as usize).ok_or_else(|| {
                        HostError::Invalid(format!("{what} {i} names CPU {c}, host has {cpus}"))
                    })?;
                    if *slot != usize::MAX {
                        return Err(HostError::Invalid(format!("CPU {c} is in two {what}s")));
                    }
                    *slot = i;
                }
            }
            if let Some(c) = owner.iter().position(|&o| o == usize::MAX) {
                return Err(HostError::Invalid(format!("CPU {c} is in no {what}")));
            }
            Ok(owner)
        };
        let cpu_group = assign(&cache_groups, "cache group")?;
        let cpu_node = assign(&numa_nodes, "NUMA node")?;
        let mut group_node = Vec::with_capacity(cache_groups.len());
        for (i, g) in cache_groups.iter().enumerate() {
            let node = cpu_node[g.cpus()[0] as usize];
            if g.cpus().iter().any(|&c| cpu_node[c as usize] != node) {
                return invalid(format!("cache group {i} spans NUMA nodes"));
            }
            group_node.push(node);
        }
        Ok(Host {
            cpus,
            memory_mib,
            reserved_mib,
            cache_groups,
            numa_nodes,
            cpu_group,
            cpu_node,
            group_node,
        })
    }

    /// Memory guests may use in total.
    pub fn guest_memory_mib(&self) -> f64 {
        (self.memory_mib - self.reserved_mib) as f64
    }

    pub fn all_cpus(&self) -> CpuSet {
        CpuSet::range(0, self.cpus)
    }

    pub fn to_toml(&self) -> String {
        let file = HostFile {
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            reserved_mib: self.reserved_mib,
            numa_nodes: self
                .numa_nodes
                .iter()
                .map(|s| GroupFile {
                    cpus: s.to_string(),
                })
                .collect(),
            cache_groups: self
                .cache_groups
                .iter()
                .map(|s| GroupFile {
                    cpus: s.to_string(),
                })
                .collect(),
        };
        // Serialising plain structs of strings and integers cannot fail.
        toml::to_string(&file).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_NODES: &str = r#"
cpus = 8
memory_mib = 16384
reserved_mib = 1024
[[numa_nodes]]
cpus = "0-3"
[[numa_nodes]]
cpus = "4-7"
[[cache_groups]]
cpus = "0-3"
[[cache_groups]]
cpus = "4-5"
[[cache_groups]]
cpus = "6,7"
"#;

    #[test]
    fn parses_a_two_node_host() {
        let h = Host::from_toml(TWO_NODES).unwrap();
        assert_eq!(h.cpu_group, vec![0, 0, 0, 0, 1, 1, 2, 2]);
        assert_eq!(h.group_node, vec![0, 1, 1]);
        assert_eq!(h.guest_memory_mib(), 15360.0);
        let again = Host::from_toml(&h.to_toml()).unwrap();
        assert_eq!(again, h);
    }

    #[test]
    fn rejects_inconsistent_hosts() {
        let spans = TWO_NODES
            .replace(
                "[[cache_groups]]\ncpus = \"0-3\"",
                "[[cache_groups]]\ncpus = \"0-2\"",
            )
            .replace("cpus = \"4-5\"", "cpus = \"3-5\"");
        assert!(
            matches!(Host::from_toml(&spans), Err(HostError::Invalid(m)) if m.contains("spans NUMA"))
        );
        let missing = TWO_NODES.replace("cpus = \"6,7\"", "cpus = \"6\"");
        assert!(
            matches!(Host::from_toml(&missing), Err(HostError::Invalid(m)) if m.contains("CPU 7 is in no"))
        );
        let outside = TWO_NODES.replace("cpus = \"6,7\"", "cpus = \"6-9\"");
        assert!(Host::from_toml(&outside).is_err());
        assert!(Host::from_toml("cpus = 'x'").is_err());
        let typo = format!("{TWO_NODES}\nmemroy = 3\n");
        assert!(Host::from_toml(&typo).is_err());
    }
}
