//! `kiln`: the Kiln hypervisor's command-line entry point, thin over the
//! `kiln_vmm` library (`kiln run`), kiln-images (`kiln guest`) and
//! kiln-policy (`kiln policy`), the daemon (`kiln serve`, kiln-daemon) and
//! the CLI over its REST API (`kiln vm`, `kiln host`, kiln-api).

mod api_cli;
mod console_attach;
mod exec_cli;
mod policy_cli;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use kiln_vmm::{config::flags::RunArgs, exit};

mod vmm_ctl;

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
    Run(RunCommand),
    /// Guest artifacts built from Debian packages.
    #[command(subcommand)]
    Guest(GuestCommand),
    /// The policy engine: the daemon's live engine (status, set, vm,
    /// decisions) and the offline tools (simulate, evaluate, train).
    #[command(subcommand)]
    Policy(policy_cli::PolicyCommand),
    /// The host daemon: the REST API on a Unix socket, one kiln-vmm per VM.
    Serve(kiln_daemon::ServeArgs),
    /// VMs of the daemon (through its REST API).
    Vm {
        #[command(flatten)]
        api: api_cli::ApiArgs,
        #[command(subcommand)]
        command: api_cli::VmCommand,
    },
    /// The host as the daemon sees it.
    Host {
        #[command(flatten)]
        api: api_cli::ApiArgs,
        #[command(subcommand)]
        command: api_cli::HostCommand,
    },
    /// Windows programs in a VM's guest (through the daemon and its agent).
    App {
        #[command(flatten)]
        api: api_cli::ApiArgs,
        #[command(subcommand)]
        command: exec_cli::AppCommand,
    },
    /// One request to a VMM's control socket (`kiln run --control`,
    /// `kiln-vmm --control`); prints the JSON result.
    VmmCtl(vmm_ctl::VmmCtlArgs),
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
struct RunCommand {
    #[command(flatten)]
    vm: RunArgs,
    /// The VMM's control socket: newline-delimited JSON requests (see
    /// `kiln vmm-ctl`).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

impl RunCommand {
    fn run(self) -> Result<u8> {
        let config = self.vm.into_config()?;
        let reason = kiln_vmm::run::run(&config, self.control.as_deref())?;
        Ok(exit::report("kiln", &reason))
    }
}

fn main() -> ExitCode {
    kiln_vmm::init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => args.run(),
        Command::Guest(GuestCommand::Fetch) => guest_fetch().map(|_| 0),
        Command::Guest(GuestCommand::Build(args)) => guest_build(args).map(|_| 0),
        Command::Policy(cmd) => policy_cli::run(cmd).map(|_| 0),
        Command::Serve(args) => serve(args).map(|_| 0),
        Command::Vm {
            api,
            command: api_cli::VmCommand::Exec(args),
        } => exec_cli::exec(&api, args),
        Command::Vm { api, command } => api_cli::vm(&api, command).map(|_| 0),
        Command::App { api, command } => exec_cli::app(&api, command),
        Command::Host { api, command } => api_cli::host(&api, command).map(|_| 0),
        Command::VmmCtl(args) => vmm_ctl::run(args).map(|_| 0),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Each cause once: device errors often repeat their source.
            eprintln!("kiln: error: {}", exit::error_chain(&e));
            ExitCode::from(exit::ERROR)
        }
    }
}

fn serve(args: kiln_daemon::ServeArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(kiln_daemon::serve(args))
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
