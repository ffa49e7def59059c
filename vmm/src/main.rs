//! `kiln-vmm`: one VM per process, headless, for the daemon (and anyone
//! with a VM spec file). Links neither ONNX Runtime nor the image builder.
//!
//! Exit codes are `kiln run`'s: 0 power-off, 1 error, 3 reboot, 4 guest
//! crash, 5 stopped by a control request, 128+N on signal N. With
//! `--exit-record PATH` it also leaves how it ended in PATH (see
//! [`kiln_vmm::exit_record`]), for a supervisor that is not its parent.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kiln_vmm::exit_record::ExitRecord;
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
    /// Where to write the exit record (JSON: kind, message, exit code) when
    /// the VMM ends: power-off, reboot, error, host signal.
    #[arg(long, value_name = "PATH")]
    exit_record: Option<PathBuf>,
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
    let (code, record) = match result {
        Ok(reason) => (
            exit::report("kiln-vmm", &reason),
            ExitRecord::of_reason(&reason),
        ),
        Err(e) => {
            let chain = exit::error_chain(&e);
            eprintln!("kiln-vmm: error: {chain}");
            (exit::ERROR, ExitRecord::of_error(&chain))
        }
    };
    if let Some(path) = &args.exit_record {
        if let Err(e) = record.write(path) {
            eprintln!(
                "kiln-vmm: cannot write the exit record {}: {e}",
                path.display()
            );
        }
    }
    ExitCode::from(code)
}
