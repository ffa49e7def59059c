//! `kiln run`'s flags, turned into a [`VmConfig`]. Device flags are
//! `key=value,...` strings parsed by the device config's own serde impl
//! (kiln-devices' options deserializer): one parser per device.

use std::path::PathBuf;

use kiln_devices::virtio::options::{from_options, OptionsError};
use serde::de::DeserializeOwned;

use super::{parse_memory_mib, OnReboot, SerialConsole, SizeError, VmConfig, DEFAULT_CMDLINE};

/// Why the flags do not make a config.
#[derive(Debug, thiserror::Error)]
pub enum FlagError {
    #[error("--memory: {0}")]
    Memory(#[from] SizeError),
    #[error("invalid console {0:?}: use stdio, none, file:PATH or socket:PATH")]
    Console(String),
    #[error("{flag} {text:?}: {source}")]
    Device {
        flag: &'static str,
        text: String,
        #[source]
        source: OptionsError,
    },
    #[error("--config cannot be combined with {0} (the spec file says everything)")]
    WithConfigFile(&'static str),
    #[error("--kernel is required (or a spec file with --config)")]
    NoKernel,
    #[error(transparent)]
    Config(#[from] super::ConfigError),
}

/// The VM flags of `kiln run` (the CLI flattens these into its command).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct RunArgs {
    /// A VM spec file (JSON, or TOML when it ends in .toml) instead of the
    /// VM flags below.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Guest kernel: a bzImage or an ELF vmlinux with a PVH note (detected).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (initramfs).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: console=ttyS0 reboot=k panic=1].
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Number of vCPUs [default: 1].
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Guest memory: 512M, 2G, ... (a bare number is MiB) [default: 512M].
    #[arg(long)]
    pub memory: Option<String>,
    /// Serial console: stdio, file:PATH, socket:PATH (clients attach, e.g. socat) or none [default: stdio].
    #[arg(long)]
    pub console: Option<String>,
    /// What a guest reboot does: exit (code 3) or restart the guest [default: exit].
    #[arg(long, value_enum)]
    pub on_reboot: Option<OnReboot>,
    /// A virtio-blk disk on a raw image: path=IMG[,readonly=on][,serial=S][,id=NAME].
    /// Repeatable; the guest sees them as /dev/vda, /dev/vdb, ...
    #[arg(long = "disk", value_name = "OPTIONS")]
    pub disks: Vec<String>,
    /// A virtio-net device on a host tap: tap=NAME[,mac=52:54:00:..][,id=NAME]
    /// (created if it does not exist). Repeatable.
    #[arg(long = "net", value_name = "OPTIONS")]
    pub nets: Vec<String>,
    /// virtio-vsock bridged to host Unix sockets: cid=N,uds=PATH. A guest
    /// connection to host port P reaches the listener at PATH_P; a host
    /// client connects to PATH and writes `CONNECT P\n` to reach guest port P.
    #[arg(long, value_name = "OPTIONS")]
    pub vsock: Option<String>,
    /// A virtio console (/dev/hvc0 in the guest): file=PATH appends its
    /// output to PATH, none discards it.
    #[arg(long = "virtio-console", value_name = "OPTIONS")]
    pub virtio_console: Option<String>,
    /// A memory balloon: [stats=SECONDS][,free_page_reporting=on][,target_mib=N]
    /// [,deflate_on_oom=off][,pressure_guard=off] (both on by default; the
    /// guard needs stats).
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, default_missing_value = "")]
    pub balloon: Option<String>,
    /// A virtio-rng device fed from the host's getrandom (`--rng` or `--rng on`).
    #[arg(long, value_name = "on|off", num_args = 0..=1, default_missing_value = "on")]
    pub rng: Option<String>,
}

/// One device flag through the device config's serde impl.
fn device<T: DeserializeOwned>(flag: &'static str, text: &str) -> Result<T, FlagError> {
    from_options(text).map_err(|source| FlagError::Device {
        flag,
        text: text.into(),
        source,
    })
}

/// `stdio`, `none`, `file:PATH` or `socket:PATH` (no log).
pub fn parse_serial(text: &str) -> Result<SerialConsole, FlagError> {
    match text {
        "stdio" => Ok(SerialConsole::Stdio),
        "none" => Ok(SerialConsole::None),
        _ => match text.split_once(':') {
            Some(("file", path)) if !path.is_empty() => {
                Ok(SerialConsole::File(PathBuf::from(path)))
            }
            Some(("socket", path)) if !path.is_empty() => {
                Ok(SerialConsole::Socket(super::SocketConsole {
                    path: PathBuf::from(path),
                    log: None,
                    log_limit_bytes: crate::console_log::DEFAULT_LOG_LIMIT,
                }))
            }
            _ => Err(FlagError::Console(text.into())),
        },
    }
}

impl RunArgs {
    /// The VM these flags describe, device ids assigned (not validated:
    /// see [`VmConfig::validate`]).
    pub fn into_config(self) -> Result<VmConfig, FlagError> {
        if let Some(path) = &self.config {
            if let Some(flag) = self.vm_flag_given() {
                return Err(FlagError::WithConfigFile(flag));
            }
            return Ok(VmConfig::from_file(path)?);
        }
        let mut c = VmConfig::new(self.kernel.ok_or(FlagError::NoKernel)?);
        c.initrd = self.initrd;
        c.cmdline = self.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.into());
        c.cpus = self.cpus.unwrap_or(c.cpus);
        if let Some(m) = &self.memory {
            c.memory_mib = parse_memory_mib(m)?;
        }
        if let Some(s) = &self.console {
            c.serial = parse_serial(s)?;
        }
        c.on_reboot = self.on_reboot.unwrap_or_default();
        for text in &self.disks {
            c.disks.push(device("--disk", text)?);
        }
        for text in &self.nets {
            c.nets.push(device("--net", text)?);
        }
        c.vsock = self
            .vsock
            .as_deref()
            .map(|t| device("--vsock", t))
            .transpose()?;
        c.console = match self.virtio_console.as_deref() {
            None => None,
            // The flag's word for "a console whose output is discarded".
            Some("none") => Some(Default::default()),
            Some(t) => Some(device("--virtio-console", t)?),
        };
        c.balloon = self
            .balloon
            .as_deref()
            .map(|t| device("--balloon", t))
            .transpose()?;
        c.rng = match self.rng.as_deref() {
            None | Some("off") => None,
            Some("on") => Some(Default::default()),
            Some(t) => Some(device("--rng", t)?),
        };
        c.assign_device_ids();
        Ok(c)
    }

    /// The first VM flag given, which a spec file would contradict.
    fn vm_flag_given(&self) -> Option<&'static str> {
        let given = [
            (self.kernel.is_some(), "--kernel"),
            (self.initrd.is_some(), "--initrd"),
            (self.cmdline.is_some(), "--cmdline"),
            (self.cpus.is_some(), "--cpus"),
            (self.memory.is_some(), "--memory"),
            (self.console.is_some(), "--console"),
            (self.on_reboot.is_some(), "--on-reboot"),
            (!self.disks.is_empty(), "--disk"),
            (!self.nets.is_empty(), "--net"),
            (self.vsock.is_some(), "--vsock"),
            (self.virtio_console.is_some(), "--virtio-console"),
            (self.balloon.is_some(), "--balloon"),
            (self.rng.is_some(), "--rng"),
        ];
        given.iter().find(|(on, _)| *on).map(|(_, flag)| *flag)
    }
}
