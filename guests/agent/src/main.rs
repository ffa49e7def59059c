//! `kiln-agent serve` runs the agent (in guests: `--listen vsock:5252`);
//! `kiln-agent call` is a small host-side client for scripts and checks.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kiln_agent::protocol::{ExecRequest, WindowsAppRequest};
use kiln_agent::{
    Agent, AgentClient, AgentConfig, ConnectAddr, ListenAddr, Listener, OutputStream, PowerControl,
    WindowsAppOutcome, WineConfig,
};

#[derive(Parser)]
#[command(
    name = "kiln-agent",
    version,
    about = "Kiln guest agent and its command-line client"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the agent protocol.
    Serve {
        /// vsock:PORT, unix:PATH or tcp:HOST:PORT (repeatable).
        #[arg(long, default_value = "vsock:5252")]
        listen: Vec<ListenAddr>,
        /// Largest accepted frame in bytes.
        #[arg(long, default_value_t = kiln_agent::protocol::DEFAULT_MAX_FRAME)]
        max_frame: usize,
        /// Largest file accepted by put or served by get, in bytes.
        #[arg(long, default_value_t = kiln_agent::protocol::DEFAULT_MAX_FILE_SIZE)]
        max_file_size: u64,
        /// Run this program with "shutdown"/"reboot" instead of calling reboot(2).
        #[arg(long)]
        power_hook: Option<PathBuf>,
        /// Enable run_windows_app with this WINEPREFIX.
        #[arg(long)]
        wine_prefix: Option<PathBuf>,
        #[arg(long, default_value = "wine")]
        wine: PathBuf,
        /// X display for GUI Windows programs.
        #[arg(long)]
        wine_display: Option<String>,
    },
    /// Talk to an agent.
    Call {
        /// vsock:CID:PORT (AF_VSOCK), vsock-uds:PATH:PORT (Kiln's vsock Unix
        /// socket, CONNECT/OK handshake), unix:PATH or tcp:HOST:PORT.
        #[arg(long)]
        to: ConnectAddr,
        /// Seconds to wait for any reply.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        #[command(subcommand)]
        op: CallOp,
    },
}

#[derive(Subcommand)]
enum CallOp {
    Ping,
    Info,
    Stats,
    /// Run a program; exits with its exit code.
    Exec {
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[arg(required = true, trailing_var_arg = true)]
        argv: Vec<String>,
    },
    Put {
        local: PathBuf,
        remote: String,
        #[arg(long, default_value = "644")]
        mode: String,
    },
    Get {
        remote: String,
        local: PathBuf,
    },
    Shutdown,
    Reboot,
    /// Run a Windows program already in the guest under Wine.
    RunWindowsApp {
        #[arg(long)]
        gui: bool,
        path: String,
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Serve {
            listen,
            max_frame,
            max_file_size,
            power_hook,
            wine_prefix,
            wine,
            wine_display,
        } => {
            let config = AgentConfig {
                max_frame,
                max_file_size,
                power: power_hook
                    .map(PowerControl::Hook)
                    .unwrap_or(PowerControl::Reboot2),
                wine: wine_prefix.map(|prefix| WineConfig {
                    wine,
                    prefix,
                    display: wine_display,
                }),
                ..AgentConfig::default()
            };
            serve(config, &listen)
        }
        Cmd::Call { to, timeout, op } => match call(&to, Duration::from_secs(timeout), op) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("kiln-agent call: {e}");
                ExitCode::from(2)
            }
        },
    }
}

fn serve(config: AgentConfig, addrs: &[ListenAddr]) -> ExitCode {
    let agent = std::sync::Arc::new(Agent::new(config));
    let mut listeners = Vec::new();
    for addr in addrs {
        match Listener::bind(addr) {
            Ok(l) => {
                tracing::info!(listener = ?l, "kiln-agent listening");
                listeners.push(l);
            }
            Err(e) => {
                eprintln!("kiln-agent: cannot listen on {addr:?}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let agent = std::sync::Arc::clone(&agent);
            std::thread::spawn(move || agent.serve(&l).map_err(|e| format!("{l:?}: {e}")))
        })
        .collect();
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("kiln-agent: listener failed: {e}");
                return ExitCode::FAILURE;
            }
            Err(_) => return ExitCode::FAILURE,
        }
    }
    ExitCode::SUCCESS
}

fn print_output(stream: OutputStream, data: &[u8]) {
    let _ = match stream {
        OutputStream::Stdout => std::io::stdout().write_all(data),
        OutputStream::Stderr => std::io::stderr().write_all(data),
    };
}

fn exit_code_of(status: &kiln_agent::protocol::ExitStatus) -> ExitCode {
    if status.timed_out {
        eprintln!(
            "kiln-agent call: program timed out after {} ms",
            status.duration_ms
        );
        return ExitCode::from(124);
    }
    match status.code {
        Some(c) => ExitCode::from(u8::try_from(c & 0xff).unwrap_or(1)),
        None => ExitCode::from(128u8.wrapping_add(status.signal.unwrap_or(0) as u8)),
    }
}

fn call(
    to: &ConnectAddr,
    timeout: Duration,
    op: CallOp,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut client = AgentClient::connect(to, Some(timeout))?;
    match op {
        CallOp::Ping => println!("pong (protocol {})", client.ping()?),
        CallOp::Info => println!("{}", serde_json::to_string_pretty(&client.info()?)?),
        CallOp::Stats => println!("{}", serde_json::to_string_pretty(&client.stats()?)?),
        CallOp::Exec { timeout_ms, argv } => {
            let status = client.exec_streaming(
                ExecRequest {
                    argv,
                    timeout_ms,
                    ..Default::default()
                },
                &mut print_output,
            )?;
            return Ok(exit_code_of(&status));
        }
        CallOp::Put {
            local,
            remote,
            mode,
        } => {
            let mode = u32::from_str_radix(&mode, 8).map_err(|e| format!("mode {mode:?}: {e}"))?;
            client.put_file(&local, &remote, mode)?;
        }
        CallOp::Get { remote, local } => {
            let mut file = std::fs::File::create(&local)?;
            let n = client.get_to(&remote, &mut file)?;
            println!("{n} bytes");
        }
        CallOp::Shutdown => client.shutdown()?,
        CallOp::Reboot => client.reboot()?,
        CallOp::RunWindowsApp { gui, path, args } => {
            match client.run_windows_app(
                WindowsAppRequest {
                    path,
                    args,
                    gui,
                    timeout_ms: None,
                },
                &mut print_output,
            )? {
                WindowsAppOutcome::Started { pid } => println!("started pid {pid}"),
                WindowsAppOutcome::Finished(out) => return Ok(exit_code_of(&out.status)),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
