//! `kiln-vmm`: one VM per process, headless, for the daemon (and anyone
//! with a VM spec file). Links neither ONNX Runtime nor the image builder.
//!
//! Exit codes are `kiln run`'s: 0 power-off, 1 error, 3 reboot, 4 guest
//! crash, 128+N on signal N.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kiln_vmm::{exit, SerialConsole, VmConfig};

#[derive(Parser)]
#[command(
    name = "kiln-vmm",
    version,
    about = "Kiln's per-VM monitor: runs one VM from a spec file"
)]
struct Args {
    /// The VM spec: JSON, or TOML when the name ends in .toml.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// The control socket (newline-delimited JSON protocol).
    #[arg(long, visible_alias = "socket", value_name = "PATH")]
    control: Option<PathBuf>,
}

fn main() -> ExitCode {
    kiln_vmm::init_logging();
    let args = Args::parse();
    let result = VmConfig::from_file(&args.config)
        .map_err(anyhow::Error::from)
        .and_then(|config| {
            if config.serial == SerialConsole::Stdio {
                tracing::info!("serial console on stdout (the spec says stdio)");
            }
            kiln_vmm::run::run(&config, args.control.as_deref())
        });
    match result {
        Ok(reason) => ExitCode::from(exit::report("kiln-vmm", &reason)),
        Err(e) => {
            eprintln!("kiln-vmm: error: {}", exit::error_chain(&e));
            ExitCode::from(exit::ERROR)
        }
    }
}
