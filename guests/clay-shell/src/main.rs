//! `clay-shell`: opens the Clay window on the Wayland display.
//! `clay-shell --parse TEXT` prints the intent TEXT maps to (JSON), and
//! `clay-shell --do TEXT` carries it out and prints the result, for scripts.

use std::process::ExitCode;

use clay_shell::actions::{self, ActionContext};
use clay_shell::{app, intent, render, shell::Shell};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--parse") => {
            let text = args[1..].join(" ");
            match serde_json::to_string(&intent::parse(&text)) {
                Ok(json) => {
                    println!("{json}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("clay-shell: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("--do") => {
            let text = args[1..].join(" ");
            let mut outcome = actions::perform(&intent::parse(&text), &ActionContext::from_env());
            println!("{}", outcome.summary);
            for line in &outcome.details {
                println!("  {line}");
            }
            if let Some(rx) = outcome.follow_up.take() {
                if let Ok(later) = rx.recv() {
                    println!("{}", later.summary);
                    for line in &later.details {
                        println!("  {line}");
                    }
                    outcome.ok = later.ok;
                }
            }
            if outcome.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Some("--help") | Some("-h") => {
            println!("usage: clay-shell [--parse TEXT | --do TEXT]");
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("clay-shell: unknown argument {other:?} (try --help)");
            ExitCode::from(2)
        }
        None => {
            let font = match render::load_font() {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("clay-shell: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match app::run(
                Shell::new(ActionContext::from_env())
                    .with_llm(clay_shell::llm::LlmConfig::from_env()),
                font,
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("clay-shell: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
