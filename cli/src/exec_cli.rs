//! `kiln vm exec NAME -- CMD ARGS...` and `kiln app run NAME FILE.exe
//! [ARGS]`: programs in a VM's guest through the daemon and the guest
//! agent. Output is printed as it arrives (the API's `?stream=true`); with
//! `--json` the buffered result is printed instead. Either way the exit
//! code is the program's (124 after its timeout, 128+N after signal N).

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use kiln_api::{AppRun, ExecExit, ExecLine, ExecRequest, ExecResult, ExecStream};

use crate::api_cli::ApiArgs;

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// The VM (its spec needs an agent section: `kiln vm create --agent`).
    pub name: String,
    /// Seconds until the program's whole process group is killed.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// An environment variable KEY=VALUE for the program. Repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The program's working directory in the guest.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Send this command's stdin to the program (read to its end first).
    #[arg(long)]
    pub stdin: bool,
    /// The program and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub argv: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum AppCommand {
    /// Upload a Windows console program and run it under Wine in the VM's
    /// guest (the Windows-compatibility image).
    Run(AppRunArgs),
}

#[derive(clap::Args, Debug)]
pub struct AppRunArgs {
    pub name: String,
    /// The .exe (a PE file, at most 64 MiB).
    pub file: PathBuf,
    /// Its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// Seconds until the program is killed.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: want KEY=VALUE"))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The exit code this command ends with for the program's `exit`.
fn code(exit: &ExecExit) -> u8 {
    (exit.shell_code() & 0xff) as u8
}

pub fn exec(api: &ApiArgs, args: ExecArgs) -> Result<u8> {
    let mut stdin = None;
    if args.stdin {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading stdin")?;
        stdin = Some(buf);
    }
    let req = ExecRequest {
        argv: args.argv,
        env: args.env.into_iter().collect(),
        cwd: args.cwd,
        stdin: None,
        stdin_base64: stdin.map(|b| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(b)
        }),
        timeout_s: args.timeout,
    };
    let client = api.client()?;
    runtime()?.block_on(async move {
        if api.json {
            return print_result(client.exec(&args.name, &req).await?);
        }
        print_stream(client.exec_stream(&args.name, &req).await?).await
    })
}

pub fn app(api: &ApiArgs, cmd: AppCommand) -> Result<u8> {
    let AppCommand::Run(args) = cmd;
    let exe =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let file_name = args
        .file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let app = AppRun {
        file_name,
        exe,
        args: args.args,
        timeout_s: args.timeout,
    };
    let client = api.client()?;
    runtime()?.block_on(async move {
        if api.json {
            return print_result(client.run_app(&args.name, &app).await?);
        }
        print_stream(client.run_app_stream(&args.name, &app).await?).await
    })
}

fn print_result(r: ExecResult) -> Result<u8> {
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(code(&r.exit()))
}

async fn print_stream(mut stream: ExecStream) -> Result<u8> {
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    while let Some(line) = stream.next().await? {
        match line {
            ExecLine::Stdout { data } => {
                out.write_all(data.as_bytes())?;
                out.flush()?;
            }
            ExecLine::Stderr { data } => {
                err.write_all(data.as_bytes())?;
                err.flush()?;
            }
            ExecLine::Exit(exit) => {
                if exit.timed_out {
                    eprintln!("kiln: the program was killed after its timeout");
                }
                return Ok(code(&exit));
            }
            ExecLine::Error { error } => bail!("{}", error.chain()),
        }
    }
    bail!("the daemon ended the answer before the program's exit")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(subcommand)]
        c: C,
    }
    #[derive(clap::Subcommand)]
    enum C {
        Create(Box<crate::api_cli::CreateArgs>),
        Exec(ExecArgs),
        #[command(subcommand)]
        App(AppCommand),
    }

    #[test]
    fn exec_takes_the_command_after_the_dashes_and_app_run_its_arguments() {
        let T { c: C::Exec(e) } =
            T::parse_from(["t", "exec", "w", "--env", "A=1", "--", "sh", "-c", "exit 3"])
        else {
            panic!()
        };
        assert_eq!(e.argv, ["sh", "-c", "exit 3"]);
        assert_eq!(e.env, [("A".to_string(), "1".to_string())]);
        let T {
            c: C::App(AppCommand::Run(a)),
        } = T::parse_from(["t", "app", "run", "w", "x.exe", "hello", "--exit", "7"])
        else {
            panic!()
        };
        assert_eq!(a.args, ["hello", "--exit", "7"]);
        assert!(
            T::try_parse_from(["t", "exec", "w"]).is_err(),
            "a command is required"
        );
    }
}
