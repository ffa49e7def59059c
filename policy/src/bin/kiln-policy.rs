//! Stand-alone `kiln policy`: the same subcommands the `kiln` binary embeds.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "kiln-policy",
    about = "Kiln policy engine: evaluate policies, generate traces, build datasets"
)]
struct Args {
    #[command(subcommand)]
    cmd: kiln_policy::cli::PolicyCommand,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = kiln_policy::cli::run(Args::parse().cmd) {
        eprintln!("kiln policy: {}", kiln_policy::cli::error_chain(&e));
        std::process::exit(1);
    }
}
