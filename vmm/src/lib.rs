//! Kiln's VMM as a library: one VM from a typed [`VmConfig`], assembled by
//! a builder and driven through a handle, with a typed control protocol.
//! `kiln run` (the CLI) and the per-VM `kiln-vmm` process are thin over it.

pub mod config;
mod console;
pub mod console_log;
pub mod console_socket;
mod control;
mod cpu;
mod devices;
pub mod exit;
pub mod exit_record;
mod loader;
mod power_button;
pub mod protocol;
pub mod run;
mod terminal;
pub mod vm;

pub use config::{HostLimits, OnReboot, SerialConsole, SocketConsole, VmConfig};
pub use kiln_devices::ExitReason;
pub use vm::{RunningVm, Vm, VmError};

/// Logs to stderr, filtered by `KILN_LOG` (default `warn`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
