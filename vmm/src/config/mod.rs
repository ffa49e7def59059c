//! [`VmConfig`]: one VM, as `kiln run` flags, a JSON/TOML spec file and
//! (later) the REST API all describe it. Checked by
//! [`VmConfig::validate`] before anything touches KVM, so every bad input
//! gets one clear line.

pub mod flags;
mod size;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use kiln_devices::virtio::balloon::BalloonConfig;
use kiln_devices::virtio::block::BlockConfig;
use kiln_devices::virtio::console::ConsoleConfig;
use kiln_devices::virtio::net::NetConfig;
use kiln_devices::virtio::rng::RngConfig;
use kiln_devices::virtio::vsock::VsockConfig;
use serde::{Deserialize, Serialize};

pub use size::{human_size, parse_memory_mib, SizeError};

/// The command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Smallest guest we accept: below this no stock kernel gets to init.
pub const MIN_MEMORY_MIB: u64 = 32;
/// vCPU APIC ids are announced in 8-bit MADT entries (no x2APIC yet).
pub const MAX_CPUS: u32 = 254;

/// Where the guest's serial console (COM1) goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SerialConsole {
    /// The VMM's stdout; its stdin becomes the guest's keyboard.
    #[default]
    Stdio,
    /// Appended to a file; no input.
    File(PathBuf),
    /// Served on a Unix socket (clients read the output, the oldest one
    /// types) and written to a size-capped log: how the daemon runs VMs.
    Socket(SocketConsole),
    /// Discarded.
    None,
}

/// The serial console on a Unix socket, with a capped log
/// ([`crate::console_socket`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketConsole {
    pub path: PathBuf,
    /// The log file; at `log_limit_bytes` it is renamed to `<log>.1` and
    /// started again, so at most twice the limit is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
    #[serde(default = "default_log_limit")]
    pub log_limit_bytes: u64,
}

fn default_log_limit() -> u64 {
    crate::console_log::DEFAULT_LOG_LIMIT
}

/// What to do when the guest reboots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnReboot {
    /// Stop and exit with code 3.
    #[default]
    Exit,
    /// Start the guest again from its kernel.
    Restart,
}

/// One VM. Memory is in MiB; device configs are kiln-devices' own types.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// A bzImage or an ELF vmlinux with a PVH note (told apart by content).
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    #[serde(default)]
    pub serial: SerialConsole,
    #[serde(default)]
    pub on_reboot: OnReboot,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<BlockConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// A virtio console (`/dev/hvc0` in the guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<ConsoleConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngConfig>,
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.into()
}
fn default_cpus() -> u32 {
    1
}
fn default_memory_mib() -> u64 {
    512
}

/// What this host allows; `None` where it could not be found out (that
/// limit is then not checked).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostLimits {
    /// KVM's `KVM_CAP_MAX_VCPUS`.
    pub max_vcpus: Option<u32>,
    /// Total RAM, from /proc/meminfo.
    pub memory_mib: Option<u64>,
}

impl HostLimits {
    /// This host's RAM; the vCPU limit is filled in by who opens KVM.
    pub fn of_this_host() -> HostLimits {
        HostLimits {
            max_vcpus: None,
            memory_mib: host_memory_mib(),
        }
    }
}

/// Why a config cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot open {what} {}: {source}", path.display())]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {} is not a regular file", path.display())]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("{what} {} is empty", path.display())]
    Empty { what: &'static str, path: PathBuf },
    #[error("cpus must be at least 1")]
    NoCpus,
    #[error("cpus {0} is more than the {MAX_CPUS} vCPUs Kiln supports")]
    TooManyCpus(u32),
    #[error("cpus {cpus} is more than this host's KVM allows ({max})")]
    TooManyCpusForKvm { cpus: u32, max: u32 },
    #[error("memory {} is too small: a guest needs at least {MIN_MEMORY_MIB} MiB", human_size(.0 << 20))]
    TooLittleMemory(u64),
    #[error("memory {} is more than this host's {} of RAM", human_size(.mib << 20), human_size(.host_mib << 20))]
    TooMuchMemory { mib: u64, host_mib: u64 },
    #[error("memory {} cannot be addressed", human_size(.0.saturating_mul(1 << 20)))]
    MemoryOverflow(u64),
    #[error("the balloon's target_mib {target} must be below the guest's memory ({memory} MiB)")]
    BalloonTargetTooLarge { target: u64, memory: u64 },
    #[error("the console log limit {0} bytes is below the 4096 bytes allowed")]
    ConsoleLogLimit(u64),
    #[error("device id {0:?} is used by two devices")]
    DuplicateId(String),
    #[error("device id {0:?} must not be empty or contain whitespace")]
    BadId(String),
    #[error("disk {}: {source}", path.display())]
    Disk {
        path: PathBuf,
        #[source]
        source: kiln_devices::virtio::block::BlockError,
    },
    #[error("vsock: {0}")]
    Vsock(#[source] kiln_devices::virtio::vsock::VsockError),
    #[error("cannot read VM config {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM config {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
}

/// Spec files by extension: `.toml` is TOML, anything else JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecFormat {
    Json,
    Toml,
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> VmConfig {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: default_cmdline(),
            cpus: default_cpus(),
            memory_mib: default_memory_mib(),
            serial: SerialConsole::default(),
            on_reboot: OnReboot::default(),
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            console: None,
            balloon: None,
            rng: None,
        }
    }

    /// Parses a spec in `format`; device ids are assigned.
    pub fn parse(text: &str, format: SpecFormat) -> Result<VmConfig, String> {
        let mut config: VmConfig = match format {
            SpecFormat::Json => serde_json::from_str(text).map_err(|e| e.to_string())?,
            SpecFormat::Toml => toml::from_str(text).map_err(|e| e.to_string())?,
        };
        config.assign_device_ids();
        Ok(config)
    }

    /// Reads a spec file (`.toml` or JSON).
    pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.into(),
            source,
        })?;
        let format = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => SpecFormat::Toml,
            _ => SpecFormat::Json,
        };
        VmConfig::parse(&text, format).map_err(|message| ConfigError::Parse {
            path: path.into(),
            message: message.trim().replace('\n', " "),
        })
    }

    /// Guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib.saturating_mul(1 << 20)
    }

    /// Gives every device without an id its default one: `disk0`, `disk1`,
    /// ... and `net0`, `net1`, ... by position, `vsock0`. The only place
    /// ids are decided; console0, balloon0 and rng0 are fixed (one each).
    pub fn assign_device_ids(&mut self) {
        for (i, disk) in self.disks.iter_mut().enumerate() {
            if disk.id.is_empty() {
                disk.id = format!("disk{i}");
            }
        }
        for (i, net) in self.nets.iter_mut().enumerate() {
            if net.id.is_empty() {
                net.id = format!("net{i}");
            }
        }
        if let Some(v) = &mut self.vsock {
            if v.id.is_empty() {
                v.id = kiln_devices::virtio::vsock::DEFAULT_ID.into();
            }
        }
    }

    /// Every device's id, in the order the devices are created (PCI slot
    /// order). Assign ids first.
    pub fn device_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = Vec::new();
        ids.extend(self.disks.iter().map(|d| d.id.clone()));
        ids.extend(self.nets.iter().map(|n| n.device_name().to_string()));
        ids.extend(self.vsock.iter().map(|v| v.id.clone()));
        ids.extend(self.console.iter().map(|_| "console0".to_string()));
        ids.extend(self.balloon.iter().map(|_| "balloon0".to_string()));
        ids.extend(self.rng.iter().map(|_| "rng0".to_string()));
        ids
    }

    /// Checks what can be checked without KVM: files readable, sizes sane,
    /// device ids unique, device settings consistent with the VM.
    pub fn validate(&self, host: &HostLimits) -> Result<(), ConfigError> {
        check_readable_file(&self.kernel, "kernel")?;
        if let Some(initrd) = &self.initrd {
            check_readable_file(initrd, "initrd")?;
        }
        if self.cpus == 0 {
            return Err(ConfigError::NoCpus);
        }
        if self.cpus > MAX_CPUS {
            return Err(ConfigError::TooManyCpus(self.cpus));
        }
        if let Some(max) = host.max_vcpus {
            if self.cpus > max {
                return Err(ConfigError::TooManyCpusForKvm {
                    cpus: self.cpus,
                    max,
                });
            }
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::TooLittleMemory(self.memory_mib));
        }
        if self.memory_mib.checked_mul(1 << 20).is_none() {
            return Err(ConfigError::MemoryOverflow(self.memory_mib));
        }
        if let Some(host_mib) = host.memory_mib {
            if self.memory_mib > host_mib {
                return Err(ConfigError::TooMuchMemory {
                    mib: self.memory_mib,
                    host_mib,
                });
            }
        }
        for disk in &self.disks {
            disk.validate().map_err(|source| ConfigError::Disk {
                path: disk.path.clone(),
                source,
            })?;
            check_readable(&disk.path, "disk image")?;
        }
        if let Some(v) = &self.vsock {
            v.validate().map_err(ConfigError::Vsock)?;
        }
        if let Some(b) = &self.balloon {
            if b.initial_target_mib >= self.memory_mib {
                return Err(ConfigError::BalloonTargetTooLarge {
                    target: b.initial_target_mib,
                    memory: self.memory_mib,
                });
            }
        }
        if let SerialConsole::Socket(s) = &self.serial {
            if s.log_limit_bytes < crate::console_log::MIN_LOG_LIMIT {
                return Err(ConfigError::ConsoleLogLimit(s.log_limit_bytes));
            }
        }
        let mut seen = BTreeSet::new();
        for id in self.device_ids() {
            if id.is_empty() || id.contains(char::is_whitespace) {
                return Err(ConfigError::BadId(id));
            }
            if !seen.insert(id.clone()) {
                return Err(ConfigError::DuplicateId(id));
            }
        }
        Ok(())
    }
}

fn check_readable(path: &Path, what: &'static str) -> Result<std::fs::Metadata, ConfigError> {
    let open = |source| ConfigError::Open {
        what,
        path: path.into(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(open)?;
    std::fs::File::open(path).map_err(open)?;
    Ok(meta)
}

fn check_readable_file(path: &Path, what: &'static str) -> Result<(), ConfigError> {
    let meta = check_readable(path, what)?;
    if !meta.is_file() {
        return Err(ConfigError::NotAFile {
            what,
            path: path.into(),
        });
    }
    if meta.len() == 0 {
        return Err(ConfigError::Empty {
            what,
            path: path.into(),
        });
    }
    Ok(())
}

/// Total RAM of this host from /proc/meminfo, if readable.
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib >> 10)
}

#[cfg(test)]
mod tests;
