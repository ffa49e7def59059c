//! `kiln run` options, validated into a [`VmConfig`] before anything touches
//! KVM, so every bad input gets one clear line.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The command line used when `--cmdline` is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Smallest guest we accept: below this no stock kernel gets to init.
pub const MIN_MEMORY: u64 = 32 << 20;
/// vCPU APIC ids are announced in 8-bit MADT entries (no x2APIC yet).
pub const MAX_CPUS: u8 = 254;

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleMode {
    /// Our stdout; our stdin becomes the guest's keyboard.
    Stdio,
    /// Appended to a file; no input.
    File(PathBuf),
    /// Discarded.
    None,
}

/// What to do when the guest reboots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnReboot {
    /// Stop and exit with code 3.
    Exit,
    /// Start the guest again from its kernel.
    Restart,
}

/// The virtio devices of a VM, one config struct per device (the REST API
/// will take the same structs).
#[derive(Clone, Debug, Default)]
pub struct DeviceConfigs {
    pub disks: Vec<kiln_devices::virtio::block::BlockConfig>,
    pub nets: Vec<kiln_devices::virtio::net::NetConfig>,
    pub vsock: Option<kiln_devices::virtio::vsock::VsockConfig>,
    pub console: Option<kiln_devices::virtio::console::ConsoleConfig>,
    pub balloon: Option<kiln_devices::virtio::balloon::BalloonConfig>,
    pub rng: Option<kiln_devices::virtio::rng::RngConfig>,
}

impl DeviceConfigs {
    /// Parses the `kiln run` device flags, naming the flag in errors.
    pub fn from_flags(flags: &DeviceFlags) -> Result<DeviceConfigs> {
        fn parse<T: std::str::FromStr>(flag: &str, text: &str) -> Result<T>
        where
            T::Err: std::fmt::Display,
        {
            text.parse()
                .map_err(|e| anyhow::anyhow!("{flag} {text:?}: {e}"))
        }
        let mut d = DeviceConfigs::default();
        for (i, text) in flags.disks.iter().enumerate() {
            let mut disk: kiln_devices::virtio::block::BlockConfig = parse("--disk", text)?;
            if !text.split(',').any(|kv| kv.starts_with("id=")) {
                disk.id = format!("disk{i}");
            }
            if d.disks.iter().any(|other| other.id == disk.id) {
                bail!("--disk {text:?}: id {:?} is used by another disk", disk.id);
            }
            d.disks.push(disk);
        }
        for (i, text) in flags.nets.iter().enumerate() {
            let mut net: kiln_devices::virtio::net::NetConfig = parse("--net", text)?;
            if net.id.is_empty() {
                net.id = format!("net{i}");
            }
            d.nets.push(net);
        }
        d.vsock = flags
            .vsock
            .as_deref()
            .map(|t| parse("--vsock", t))
            .transpose()?;
        d.console = flags
            .console
            .as_deref()
            .map(|t| parse("--virtio-console", t))
            .transpose()?;
        d.balloon = flags
            .balloon
            .as_deref()
            .map(|t| parse("--balloon", t))
            .transpose()?;
        d.rng = flags
            .rng
            .as_deref()
            .map(|t| parse("--rng", t))
            .transpose()?;
        Ok(d)
    }
}

/// The raw device flags of `kiln run`.
#[derive(Clone, Debug, Default)]
pub struct DeviceFlags {
    pub disks: Vec<String>,
    pub nets: Vec<String>,
    pub vsock: Option<String>,
    pub console: Option<String>,
    pub balloon: Option<String>,
    pub rng: Option<String>,
}

#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub memory: u64,
    pub console: ConsoleMode,
    pub on_reboot: OnReboot,
    pub devices: DeviceConfigs,
    /// The VMM's control socket (balloon target, worker placement).
    pub control: Option<PathBuf>,
}

/// Parses `512M`, `2G`, `1024K`, `4096` (MiB when no suffix, as QEMU does)
/// into bytes.
pub fn parse_memory_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        bail!("invalid memory size {text:?}: expected a number with an optional K, M or G suffix (e.g. 512M, 2G)");
    }
    let n: u64 = digits
        .parse()
        .with_context(|| format!("invalid memory size {text:?}"))?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => 20,
        "K" | "KB" | "KIB" => 10,
        "G" | "GB" | "GIB" => 30,
        _ => bail!("invalid memory size {text:?}: unknown suffix {suffix:?} (use K, M or G)"),
    };
    n.checked_mul(1 << shift)
        .with_context(|| format!("memory size {text:?} is too large"))
}

pub fn parse_console(text: &str) -> Result<ConsoleMode> {
    match text {
        "stdio" => Ok(ConsoleMode::Stdio),
        "none" => Ok(ConsoleMode::None),
        _ => match text.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(ConsoleMode::File(PathBuf::from(path))),
            _ => bail!("invalid console {text:?}: use stdio, none or file:PATH"),
        },
    }
}

/// Checks what can be checked without KVM: files exist and are readable,
/// sizes are sane.
pub fn validate(
    kernel: &Path,
    initrd: Option<&Path>,
    cpus: u32,
    memory: u64,
    host_memory: Option<u64>,
) -> Result<()> {
    check_readable_file(kernel, "kernel")?;
    if let Some(initrd) = initrd {
        check_readable_file(initrd, "initrd")?;
    }
    if cpus == 0 {
        bail!("--cpus must be at least 1");
    }
    if cpus > u32::from(MAX_CPUS) {
        bail!("--cpus {cpus} is more than the {MAX_CPUS} vCPUs Kiln supports");
    }
    if memory < MIN_MEMORY {
        bail!(
            "--memory {} is too small: a guest needs at least {} MiB",
            human_size(memory),
            MIN_MEMORY >> 20
        );
    }
    if let Some(host) = host_memory {
        if memory > host {
            bail!(
                "--memory {} is more than this host's {} of RAM",
                human_size(memory),
                human_size(host)
            );
        }
    }
    Ok(())
}

fn check_readable_file(path: &Path, what: &str) -> Result<()> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot open {what} {}", path.display()))?;
    if !meta.is_file() {
        bail!("{what} {} is not a regular file", path.display());
    }
    if meta.len() == 0 {
        bail!("{what} {} is empty", path.display());
    }
    std::fs::File::open(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    Ok(())
}

/// Total RAM of this host from /proc/meminfo, if readable.
pub fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `1536 MiB`, `2 GiB`, `12 KiB`, `7 bytes`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{} {name}", bytes / unit);
        }
    }
    for (unit, name) in UNITS {
        if bytes >= unit {
            return format!("{:.1} {name}", bytes as f64 / unit as f64);
        }
    }
    format!("{bytes} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_memory_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_memory_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_memory_size("1024K").unwrap(), 1 << 20);
        assert_eq!(parse_memory_size("256").unwrap(), 256 << 20);
        assert_eq!(parse_memory_size("1").unwrap(), 1 << 20);
        for bad in ["", "M", "12X", "-5M", "1.5G", "99999999999999999999G"] {
            assert!(parse_memory_size(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn consoles() {
        assert_eq!(parse_console("stdio").unwrap(), ConsoleMode::Stdio);
        assert_eq!(parse_console("none").unwrap(), ConsoleMode::None);
        assert_eq!(
            parse_console("file:/tmp/x").unwrap(),
            ConsoleMode::File("/tmp/x".into())
        );
        assert!(parse_console("file:").is_err());
        assert!(parse_console("tcp:1").is_err());
    }

    #[test]
    fn validation_messages_name_the_problem() {
        let dir = std::env::temp_dir().join(format!("kiln-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("k");
        std::fs::write(&kernel, b"x").unwrap();
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();

        let err = |r: Result<()>| format!("{:#}", r.unwrap_err());
        assert!(err(validate(&dir.join("nope"), None, 1, 64 << 20, None))
            .contains("cannot open kernel"));
        assert!(err(validate(&empty, None, 1, 64 << 20, None)).contains("is empty"));
        assert!(
            err(validate(&kernel, None, 0, 64 << 20, None)).contains("--cpus must be at least 1")
        );
        assert!(err(validate(&kernel, None, 255, 64 << 20, None)).contains("254"));
        assert!(err(validate(&kernel, None, 1, 1 << 20, None)).contains("too small"));
        assert!(
            err(validate(&kernel, None, 1, 8 << 30, Some(4 << 30))).contains("more than this host")
        );
        assert!(
            err(validate(&kernel, Some(&dir), 1, 64 << 20, None)).contains("not a regular file")
        );
        validate(&kernel, None, 2, 512 << 20, Some(4 << 30)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sizes_print_for_humans() {
        assert_eq!(human_size(512 << 20), "512 MiB");
        assert_eq!(human_size(3 << 30), "3 GiB");
        assert_eq!(human_size(1536 << 10), "1536 KiB");
        assert_eq!(human_size((1536 << 10) + 1), "1.5 MiB");
        assert_eq!(human_size(7), "7 bytes");
    }
}
