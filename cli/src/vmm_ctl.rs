//! `kiln vmm-ctl --socket PATH KIND [key=value...]`: one request of the
//! VMM control protocol, its result printed as one line of JSON.
//!
//! `key=value` pairs become the request's fields; a value that reads as
//! JSON is taken as such (`mib=256`, `cpus=[0,1]`, `cpus=null`), anything
//! else as a string (`device=net0`, `wait=poll`). `KIND` `hello` prints
//! the server's hello.
//!
//! ```text
//! kiln vmm-ctl --socket ctl.sock set_balloon_target mib=256
//! kiln vmm-ctl --socket ctl.sock set_worker_placement device=net0 'cpus=[0]' wait=poll spin_us=200
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use kiln_vmm::protocol::{Client, Request};
use serde_json::{Map, Value};

#[derive(clap::Args)]
pub struct VmmCtlArgs {
    /// The VMM's control socket.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Seconds to wait for each answer.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// status, pause, resume, stop, set_balloon_target, balloon_stats,
    /// workers, set_worker_placement, counters, or hello.
    kind: String,
    /// The request's fields, as key=value.
    fields: Vec<String>,
}

/// The request that `kind` and `fields` spell.
fn request(kind: &str, fields: &[String]) -> Result<Request> {
    let mut object = Map::new();
    object.insert("kind".into(), Value::String(kind.into()));
    for field in fields {
        let (key, text) = field
            .split_once('=')
            .with_context(|| format!("{field:?}: fields are key=value"))?;
        let value = serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.into()));
        if object.insert(key.into(), value).is_some() {
            anyhow::bail!("field {key:?} is given twice");
        }
    }
    serde_json::from_value(Value::Object(object)).context("invalid request")
}

pub fn run(args: VmmCtlArgs) -> Result<()> {
    let request = (args.kind != "hello")
        .then(|| request(&args.kind, &args.fields))
        .transpose()?;
    let mut client = Client::connect(&args.socket, Duration::from_secs(args.timeout))?;
    let value = match request {
        None => serde_json::to_value(client.hello())?,
        Some(request) => client.call(&request)?,
    };
    println!("{value}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_vmm::protocol::WaitKind;

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn fields_become_typed_requests() {
        assert_eq!(
            request("set_balloon_target", &words(&["mib=256"])).unwrap(),
            Request::SetBalloonTarget { mib: 256 }
        );
        assert_eq!(
            request(
                "set_worker_placement",
                &words(&["device=net0", "cpus=[0]", "wait=poll", "spin_us=200"])
            )
            .unwrap(),
            Request::SetWorkerPlacement {
                device: "net0".into(),
                cpus: Some(vec![0]),
                wait: WaitKind::Poll,
                spin_us: Some(200),
            }
        );
        assert_eq!(request("status", &[]).unwrap(), Request::Status {});
        for (kind, fields) in [
            ("reboot_host", vec![]),
            ("set_balloon_target", vec!["mib=lots"]),
            ("set_balloon_target", vec!["mib=1", "mib=2"]),
            ("status", vec!["verbose=1"]),
            ("status", vec!["verbose"]),
        ] {
            assert!(request(kind, &words(&fields)).is_err(), "{kind} {fields:?}");
        }
    }
}
