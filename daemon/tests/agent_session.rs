//! The daemon's agent sessions (`kiln_daemon::agent`) against the real
//! guest agent, `kiln_agent::Agent`, serving in this process. Guests do not
//! boot on this machine, so the VMM's side of Kiln's vsock convention is
//! played by a relay: a Unix listener that reads `CONNECT <port>\n`, answers
//! `OK <host port>\n` for the agent's port (closes for others, as Kiln's
//! VMM does), then copies bytes both ways to the agent's Unix socket. The
//! guest end to end (Kiln's vsock, kiln serve, Wine) is
//! integration-tests/tests/images_on_kiln.rs.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use kiln_agent::client::OutputStream;
use kiln_agent::protocol::ExecRequest;
use kiln_agent::{Agent, AgentConfig, ListenAddr, Listener};
use kiln_api::ErrorCode;
use kiln_daemon::agent::{AgentTarget, Session};

const PORT: u32 = 5252;

struct Relay {
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

fn start() -> Relay {
    let dir = tempfile::tempdir().unwrap();
    let agent_sock = dir.path().join("agent.sock");
    let listener = Listener::bind(&ListenAddr::Unix(agent_sock.clone())).unwrap();
    let agent = Arc::new(Agent::new(AgentConfig::default()));
    thread::spawn(move || agent.serve(&listener));
    let socket = dir.path().join("agent.vsock");
    let vmm = UnixListener::bind(&socket).unwrap();
    thread::spawn(move || {
        for client in vmm.incoming().flatten() {
            let agent_sock = agent_sock.clone();
            thread::spawn(move || relay(client, &agent_sock));
        }
    });
    Relay { _dir: dir, socket }
}

fn relay(client: UnixStream, agent_sock: &Path) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || line.trim() != format!("CONNECT {PORT}") {
        return; // nothing listens on that port: close without OK
    }
    let Ok(agent) = UnixStream::connect(agent_sock) else {
        return;
    };
    let mut to_client = client.try_clone().unwrap();
    to_client.write_all(b"OK 1073741824\n").unwrap();
    let mut from_agent = agent.try_clone().unwrap();
    let mut to_agent = agent;
    let up = thread::spawn(move || {
        let _ = std::io::copy(&mut reader, &mut to_agent);
        let _ = to_agent.shutdown(std::net::Shutdown::Both);
    });
    let _ = std::io::copy(&mut from_agent, &mut to_client);
    let _ = to_client.shutdown(std::net::Shutdown::Both);
    let _ = up.join();
}

fn target(relay: &Relay, port: u32) -> AgentTarget {
    AgentTarget {
        vm: "w".into(),
        socket: relay.socket.clone(),
        port,
    }
}

fn sh(script: &str, timeout_ms: u64) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: [("GREETING".to_string(), "hi".to_string())].into(),
        clear_env: false,
        cwd: Some("/".into()),
        stdin: b"from stdin".to_vec(),
        timeout_ms: Some(timeout_ms),
    }
}

#[test]
fn exec_streams_output_and_the_exit_code_through_the_vsock_convention() {
    let relay = start();
    let mut session = Session::open(&target(&relay, PORT)).expect("session");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = session
        .exec(
            sh("echo $GREETING; cat; pwd; echo oops >&2; exit 7", 10_000),
            &mut |s, d| {
                match s {
                    OutputStream::Stdout => out.extend_from_slice(d),
                    OutputStream::Stderr => err.extend_from_slice(d),
                }
                true
            },
        )
        .unwrap();
    assert_eq!(status.code, Some(7));
    assert_eq!(String::from_utf8_lossy(&out), "hi\nfrom stdin/\n");
    assert_eq!(String::from_utf8_lossy(&err), "oops\n");
    // The same session takes another call; a missing program is refused.
    let e = session
        .exec(
            ExecRequest {
                argv: vec!["/no/such/program".into()],
                ..sh("", 1000)
            },
            &mut |_, _| true,
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::AgentRefused, "{e:?}");
    // No Wine configured: run_windows_app is refused, not a 5xx.
    let e = session
        .run_windows_app(b"MZ", "t.exe", vec![], 5000, &mut |_, _| true)
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::AgentRefused, "{e:?}");
}

#[test]
fn a_program_timeout_is_an_exit_not_an_error() {
    let relay = start();
    let mut session = Session::open(&target(&relay, PORT)).unwrap();
    let status = session.exec(sh("sleep 30", 300), &mut |_, _| true).unwrap();
    assert!(status.timed_out, "{status:?}");
}

/// The agent notices a client that went away when it next writes output
/// (a program silent after the cut runs on to its own timeout: a
/// limitation of the agent, see docs/api.md).
#[test]
fn a_sink_that_stops_cuts_the_call_and_the_agent_kills_the_program() {
    let relay = start();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("still-running");
    let mut session = Session::open(&target(&relay, PORT)).unwrap();
    let script = format!(
        "echo started; sleep 2; echo more; sleep 1; touch {}; sleep 30",
        marker.display()
    );
    let started = Instant::now();
    let e = session
        .exec(sh(&script, 60_000), &mut |_, _| false)
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "{e:?}");
    assert_eq!(e.code, ErrorCode::AgentDisconnected, "{e:?}");
    thread::sleep(Duration::from_secs(4));
    assert!(!marker.exists(), "the program ran on after the cut");
}

#[test]
fn a_cut_on_drop_guard_ends_a_silent_program() {
    let relay = start();
    let mut session = Session::open(&target(&relay, PORT)).unwrap();
    let guard = session.cut_on_drop().unwrap();
    let call = thread::spawn(move || session.exec(sh("sleep 5", 60_000), &mut |_, _| true));
    thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    drop(guard);
    let e = call.join().unwrap().unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(e.code, ErrorCode::AgentDisconnected, "{e:?}");
}

#[test]
fn nothing_on_the_port_is_agent_unavailable() {
    let relay = start();
    let e = Session::open(&target(&relay, 1234)).err().unwrap();
    assert_eq!(e.code, ErrorCode::AgentUnavailable);
    assert!(
        e.message.contains("does not answer on vsock port 1234"),
        "{e:?}"
    );
}
