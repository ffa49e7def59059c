//! The client's `vsock-uds:PATH:PORT` transport against a fake of Kiln's
//! userspace vsock: a Unix listener that reads `CONNECT <port>\n` and, for
//! the agent's port, answers `OK <host port>\n` and then relays bytes to a
//! real agent serving on another Unix socket. Other fakes misbehave
//! (close, reply garbage, stay silent) to check the handshake errors.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use kiln_agent::protocol::ExecRequest;
use kiln_agent::vsock_uds::HandshakeError;
use kiln_agent::{Agent, AgentClient, AgentConfig, ClientError, ConnectAddr, ListenAddr, Listener};

const AGENT_PORT: u32 = 5252;

/// What the fake VMM does after reading a client's CONNECT line.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Kiln's behaviour: `OK` and relay for [`AGENT_PORT`], close for any other port.
    Kiln,
    /// Writes this line instead of `OK ...`.
    Reply(&'static str),
    /// Reads the line and then never writes anything.
    Silent,
}

struct FakeVmm {
    dir: tempfile::TempDir,
    uds: PathBuf,
}

impl FakeVmm {
    fn start(behaviour: Behaviour) -> FakeVmm {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent_sock = dir.path().join("agent.sock");
        let listener = Listener::bind(&ListenAddr::Unix(agent_sock.clone())).expect("bind agent");
        let agent = Arc::new(Agent::new(AgentConfig::default()));
        thread::spawn(move || agent.serve(&listener));
        let uds = dir.path().join("v.sock");
        let vmm = UnixListener::bind(&uds).expect("bind fake vsock socket");
        thread::spawn(move || {
            for client in vmm.incoming().flatten() {
                let agent_sock = agent_sock.clone();
                thread::spawn(move || serve_client(client, &agent_sock, behaviour));
            }
        });
        FakeVmm { dir, uds }
    }
}

fn serve_client(client: UnixStream, agent_sock: &Path, behaviour: Behaviour) {
    let mut reader = BufReader::new(client.try_clone().expect("clone"));
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let port: Option<u32> = line
        .trim_end()
        .strip_prefix("CONNECT ")
        .and_then(|p| p.parse().ok());
    let mut client = client;
    match behaviour {
        Behaviour::Kiln if port == Some(AGENT_PORT) => {
            let agent = UnixStream::connect(agent_sock).expect("connect to the agent");
            client.write_all(b"OK 1073741824\n").expect("write OK");
            relay(reader, client, agent);
        }
        // Kiln closes the host connection when the guest resets it.
        Behaviour::Kiln => {}
        Behaviour::Reply(text) => {
            let _ = client.write_all(text.as_bytes());
        }
        Behaviour::Silent => thread::sleep(Duration::from_secs(30)),
    }
}

/// Copies both ways until either side closes. `from_client` may hold bytes
/// the client sent right after its CONNECT line.
fn relay(mut from_client: BufReader<UnixStream>, mut to_client: UnixStream, agent: UnixStream) {
    let mut agent_w = agent.try_clone().expect("clone");
    let mut agent_r = agent;
    let up = thread::spawn(move || {
        let _ = std::io::copy(&mut from_client, &mut agent_w);
        let _ = agent_w.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut agent_r, &mut to_client);
    let _ = to_client.shutdown(std::net::Shutdown::Both);
    let _ = up.join();
}

fn handshake_error(result: Result<AgentClient, ClientError>) -> String {
    match result {
        Err(e @ ClientError::VsockHandshake(HandshakeError::Refused { .. })) => e.to_string(),
        Err(e) => panic!("expected a refused handshake, got {e:?}"),
        Ok(_) => panic!("expected a refused handshake, got a connection"),
    }
}

#[test]
fn typed_client_reaches_the_agent_through_the_handshake() {
    let vmm = FakeVmm::start(Behaviour::Kiln);
    let addr: ConnectAddr = format!("vsock-uds:{}:{AGENT_PORT}", vmm.uds.display())
        .parse()
        .expect("parse");
    let mut c = AgentClient::connect(&addr, Some(Duration::from_secs(20))).expect("connect");
    assert_eq!(c.ping().expect("ping"), 1);
    let info = c.info().expect("info");
    assert!(info.capabilities.iter().any(|c| c == "exec"), "{info:?}");
    let out = c
        .exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "cat; exit 3".into()],
            stdin: b"through vsock".to_vec(),
            ..Default::default()
        })
        .expect("exec");
    assert_eq!(out.stdout, b"through vsock");
    assert_eq!(out.status.code, Some(3));
    // Larger than one relay buffer and one chunk, both ways.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let remote = vmm.dir.path().join("up.bin");
    c.put_bytes(remote.to_str().expect("utf-8 path"), &data, 0o600)
        .expect("put");
    assert_eq!(
        c.get_bytes(remote.to_str().expect("utf-8 path"))
            .expect("get"),
        data
    );

    // The convenience constructor does the same.
    let mut c = AgentClient::connect_vsock_uds(&vmm.uds, AGENT_PORT, Some(Duration::from_secs(20)))
        .expect("connect");
    assert_eq!(c.ping().expect("ping"), 1);
}

#[test]
fn no_listener_on_the_guest_port_is_a_clear_error() {
    let vmm = FakeVmm::start(Behaviour::Kiln);
    let msg = handshake_error(AgentClient::connect_vsock_uds(
        &vmm.uds,
        5253,
        Some(Duration::from_secs(20)),
    ));
    assert!(
        msg.contains("nothing listens on guest port 5253, or the guest did not answer"),
        "{msg}"
    );
    assert!(msg.contains("without an OK line"), "{msg}");
}

#[test]
fn malformed_or_oversized_replies_are_refused() {
    for reply in ["NOPE\n", "OK\n", "OK abc\n", "OK 5", "ERROR no such port\n"] {
        let vmm = FakeVmm::start(Behaviour::Reply(reply));
        let msg = handshake_error(AgentClient::connect_vsock_uds(
            &vmm.uds,
            AGENT_PORT,
            Some(Duration::from_secs(20)),
        ));
        assert!(
            msg.contains("nothing listens on guest port 5252"),
            "{reply:?}: {msg}"
        );
    }
    let long: &'static str = Box::leak("x".repeat(100_000).into_boxed_str());
    let vmm = FakeVmm::start(Behaviour::Reply(long));
    let msg = handshake_error(AgentClient::connect_vsock_uds(
        &vmm.uds,
        AGENT_PORT,
        Some(Duration::from_secs(20)),
    ));
    assert!(msg.contains("instead of \"OK <port>\""), "{msg}");
}

#[test]
fn a_silent_vmm_times_out_instead_of_hanging() {
    let vmm = FakeVmm::start(Behaviour::Silent);
    let start = Instant::now();
    let msg = handshake_error(AgentClient::connect_vsock_uds(
        &vmm.uds,
        AGENT_PORT,
        Some(Duration::from_millis(300)),
    ));
    assert!(msg.contains("sent no OK line within"), "{msg}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn a_missing_socket_is_a_connect_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    match AgentClient::connect_vsock_uds(&dir.path().join("none.sock"), AGENT_PORT, None) {
        Err(ClientError::VsockHandshake(HandshakeError::Connect { .. })) => {}
        Err(e) => panic!("expected a connect error, got {e:?}"),
        Ok(_) => panic!("connected to nothing"),
    }
}

#[test]
fn the_cli_calls_through_vsock_uds() {
    let vmm = FakeVmm::start(Behaviour::Kiln);
    let bin = env!("CARGO_BIN_EXE_kiln-agent");
    let to = format!("vsock-uds:{}:{AGENT_PORT}", vmm.uds.display());
    let out = Command::new(bin)
        .args([
            "call",
            "--to",
            &to,
            "--timeout",
            "20",
            "exec",
            "--",
            "sh",
            "-c",
            "echo hi; exit 5",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert_eq!(out.stdout, b"hi\n");

    let to = format!("vsock-uds:{}:4444", vmm.uds.display());
    let out = Command::new(bin)
        .args(["call", "--to", &to, "--timeout", "20", "ping"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nothing listens on guest port 4444, or the guest did not answer"),
        "{stderr}"
    );
}
