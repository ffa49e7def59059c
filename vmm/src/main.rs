//! `kiln`: the Kiln hypervisor's command-line entry point.

mod config;
mod console;
mod cpu;
mod loader;
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
#[command(name = "kiln", version, about = "Kiln: a KVM hypervisor with learned resource policies")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot one guest in the foreground, its serial console on this terminal.
    Run(RunArgs),
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
}

impl RunArgs {
    fn into_config(self) -> Result<VmConfig> {
        let memory = config::parse_memory_size(&self.memory)?;
        let console = config::parse_console(&self.console)?;
        config::validate(&self.kernel, self.initrd.as_deref(), self.cpus, memory, config::host_memory())?;
        Ok(VmConfig {
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline: self.cmdline,
            cpus: self.cpus as u8,
            memory,
            console,
            on_reboot: self.on_reboot,
        })
    }
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => args.into_config().and_then(|c| run::run(&c)).map(report_exit),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("kiln: error: {e:#}");
            ExitCode::from(exit_code::ERROR)
        }
    }
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
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}
