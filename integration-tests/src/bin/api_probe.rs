//! `kiln-api-probe`: the typed API client (`kiln_api::Client`) as a small
//! command, so nested-host scripts can drive `kiln serve` through it:
//!
//! ```text
//! kiln-api-probe SOCKET create SPEC.json [start]   # prints the VmInfo JSON
//! kiln-api-probe SOCKET get NAME
//! kiln-api-probe SOCKET list
//! ```
//!
//! An API error prints `API_ERROR=<status> <code>: <message>` and exits 1.

use std::process::ExitCode;

use kiln_api::{Client, ClientError, Endpoint, VmSpec};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match rt.block_on(run(&args)) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            match e.downcast_ref::<ClientError>().and_then(ClientError::api) {
                Some((status, err)) => {
                    println!("API_ERROR={status} {:?}: {}", err.code, err.message)
                }
                None => eprintln!("kiln-api-probe: {e}"),
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &[String]) -> Result<String, Box<dyn std::error::Error>> {
    let usage = "usage: kiln-api-probe SOCKET create SPEC.json [start] | get NAME | list";
    let [socket, verb, rest @ ..] = args else {
        return Err(usage.into());
    };
    let client = Client::new(Endpoint::Unix(socket.into()));
    Ok(match (verb.as_str(), rest) {
        ("create", [file, more @ ..]) => {
            let spec: VmSpec = serde_json::from_str(&std::fs::read_to_string(file)?)?;
            let start = more.first().is_some_and(|s| s == "start");
            serde_json::to_string(&client.create(&spec, start).await?)?
        }
        ("get", [name]) => serde_json::to_string(&client.get(name).await?)?,
        ("list", []) => serde_json::to_string(&client.list().await?)?,
        _ => return Err(usage.into()),
    })
}
