//! `kiln`: the Kiln hypervisor's command-line entry point.

mod config;
mod console;
mod control;
mod cpu;
mod devices;
mod loader;
mod power_button;
mod run;
mod terminal;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use kiln_devices::ExitReason;

use config::{OnReboot, VmConfig};

/// Exit codes of `kiln run` (documented in the README).
mod exit_code {
    pub const POWER_OFF: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const REBOOT: u8 = 3;
    pub const GUEST_CRASH: u8 = 4;
}

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln: a KVM hypervisor with learned resource policies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot one guest in the foreground, its serial console on this terminal.
    Run(RunArgs),
    /// Guest artifacts built from Debian packages.
    #[command(subcommand)]
    Guest(GuestCommand),
    /// The policy engine: simulate, evaluate and train placement policies.
    #[command(subcommand)]
    Policy(kiln_policy::cli::PolicyCommand),
}

#[derive(Subcommand)]
enum GuestCommand {
    /// Fetch and build the default guest (Debian cloud kernel + busybox
    /// initramfs) into the cache; prints the paths.
    Fetch,
    /// Build a guest image: base, clay or wincompat.
    Build(GuestBuildArgs),
}

#[derive(clap::Args)]
struct GuestBuildArgs {
    /// base, clay or wincompat.
    kind: kiln_images::ImageKind,
    /// The guest agent binary to install (default: kiln-agent next to kiln).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// The Clay shell binary (clay image; default: clay-shell next to kiln).
    #[arg(long)]
    clay_shell: Option<PathBuf>,
    /// Rebuild even if cached.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest kernel: a bzImage or an ELF vmlinux with a PVH note (detected).
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk (initramfs).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = config::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest memory: 512M, 2G, ... (a bare number is MiB).
    #[arg(long, default_value = "512M")]
    memory: String,
    /// Serial console: stdio, file:PATH or none.
    #[arg(long, default_value = "stdio")]
    console: String,
    /// What a guest reboot does: exit (code 3) or restart the guest.
    #[arg(long, value_enum, default_value_t = OnReboot::Exit)]
    on_reboot: OnReboot,
    /// A virtio-blk disk on a raw image: path=IMG[,readonly=on][,serial=S][,id=NAME].
    /// Repeatable; the guest sees them as /dev/vda, /dev/vdb, ...
    #[arg(long = "disk", value_name = "OPTIONS")]
    disks: Vec<String>,
    /// A virtio-net device on a host tap: tap=NAME[,mac=52:54:00:..]
    /// (created if it does not exist). Repeatable.
    #[arg(long = "net", value_name = "OPTIONS")]
    nets: Vec<String>,
    /// virtio-vsock bridged to host Unix sockets: cid=N,uds=PATH. A guest
    /// connection to host port P reaches the listener at PATH_P; a host
    /// client connects to PATH and writes `CONNECT P\n` to reach guest port P.
    #[arg(long, value_name = "OPTIONS")]
    vsock: Option<String>,
    /// A virtio console (/dev/hvc0 in the guest): file=PATH appends its
    /// output to PATH, none discards it.
    #[arg(long = "virtio-console", value_name = "OPTIONS")]
    virtio_console: Option<String>,
    /// A memory balloon: [deflate_on_oom=on][,stats=SECONDS][,free_page_reporting=on][,target_mib=N].
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, default_missing_value = "")]
    balloon: Option<String>,
    /// A virtio-rng device fed from the host's getrandom.
    #[arg(long, value_name = "on", num_args = 0..=1, default_missing_value = "on")]
    rng: Option<String>,
    /// The VMM's control socket: a Unix socket taking line commands
    /// (`balloon MIB`, `balloon-stats`, `workers`, `worker NAME ...`, `status`).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

impl RunArgs {
    fn into_config(self) -> Result<VmConfig> {
        let memory = config::parse_memory_size(&self.memory)?;
        let console = config::parse_console(&self.console)?;
        let flags = config::DeviceFlags {
            disks: self.disks,
            nets: self.nets,
            vsock: self.vsock,
            console: self.virtio_console,
            balloon: self.balloon,
            rng: self.rng,
        };
        let devices = config::DeviceConfigs::from_flags(&flags)?;
        config::validate(
            &self.kernel,
            self.initrd.as_deref(),
            self.cpus,
            memory,
            config::host_memory(),
        )?;
        Ok(VmConfig {
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline: self.cmdline,
            cpus: self.cpus as u8,
            memory,
            console,
            on_reboot: self.on_reboot,
            devices,
            control: self.control,
        })
    }
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => args
            .into_config()
            .and_then(|c| run::run(&c))
            .map(report_exit),
        Command::Guest(GuestCommand::Fetch) => guest_fetch().map(|_| 0),
        Command::Guest(GuestCommand::Build(args)) => guest_build(args).map(|_| 0),
        Command::Policy(cmd) => kiln_policy::cli::run(cmd).map(|_| 0),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Each cause once: device errors often repeat their source.
            eprintln!("kiln: error: {}", kiln_policy::cli::error_chain(&e));
            ExitCode::from(exit_code::ERROR)
        }
    }
}

fn guest_fetch() -> Result<()> {
    let cache = kiln_guests::cache_dir();
    let g = kiln_guests::ensure_default_guest(&cache)?;
    println!("kernel (bzImage): {}", g.bzimage.display());
    println!("kernel (vmlinux, PVH): {}", g.vmlinux.display());
    println!("initramfs: {}", g.initramfs.display());
    println!("kernel version: {}", g.kernel_version);
    Ok(())
}

/// A helper binary installed next to `kiln` (cargo builds them together).
fn sibling_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::current_exe().ok()?.with_file_name(name);
    path.is_file().then_some(path)
}

fn guest_build(args: GuestBuildArgs) -> Result<()> {
    let agent = args.agent.or_else(|| sibling_binary("kiln-agent")).ok_or_else(|| {
        anyhow::anyhow!("no guest agent binary: pass --agent PATH or build it with `cargo build --release -p kiln-agent`")
    })?;
    let mut opts = kiln_images::BuildOptions::new(kiln_guests::cache_dir(), agent);
    opts.clay_shell_binary = args.clay_shell.or_else(|| sibling_binary("clay-shell"));
    opts.force = args.force;
    let built = kiln_images::build_image(args.kind, &opts, &kiln_images::StderrProgress::new(true))
        .map_err(|e| anyhow::anyhow!("building the {} image failed: {e}", args.kind))?;
    print!("{}", built.summary());
    Ok(())
}

fn report_exit(reason: ExitReason) -> u8 {
    match reason {
        ExitReason::PowerOff => exit_code::POWER_OFF,
        ExitReason::Reset => {
            eprintln!("kiln: guest rebooted");
            exit_code::REBOOT
        }
        ExitReason::Crash(report) => {
            eprintln!("kiln: guest crashed: {report}");
            exit_code::GUEST_CRASH
        }
        ExitReason::HostSignal(signo) => 128u8.saturating_add(signo as u8),
        ExitReason::VmmError(text) => {
            eprintln!("kiln: error: {text}");
            exit_code::ERROR
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
