//! The `kiln-agent` binary itself: `serve` on a Unix socket, `call` against
//! it, and the vsock listener the guests use.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kiln-agent");

struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(args: &[&str]) -> Served {
    let child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start kiln-agent serve");
    Served(child)
}

fn call(sock: &str, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["call", "--to", sock, "--timeout", "20"])
        .args(args)
        .output()
        .expect("run kiln-agent call")
}

#[test]
fn serve_and_call_over_a_unix_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_path = dir.path().join("a.sock");
    let addr = format!("unix:{}", sock_path.display());
    let _agent = serve(&["--listen", &addr]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock_path.exists() {
        assert!(Instant::now() < deadline, "agent never created its socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = call(&addr, &["ping"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pong (protocol 1)\n");

    let out = call(
        &addr,
        &["exec", "--", "sh", "-c", "echo out; echo err >&2; exit 7"],
    );
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");

    let out = call(&addr, &["exec", "--timeout-ms", "200", "--", "sleep", "30"]);
    assert_eq!(out.status.code(), Some(124), "{out:?}");

    let local = dir.path().join("src.txt");
    std::fs::write(&local, b"payload").expect("write");
    let remote = dir.path().join("dst/copied.txt");
    let out = call(
        &addr,
        &[
            "put",
            local.to_str().expect("utf8"),
            remote.to_str().expect("utf8"),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&remote).expect("read"), b"payload");
    let back = dir.path().join("back.txt");
    let out = call(
        &addr,
        &[
            "get",
            remote.to_str().expect("utf8"),
            back.to_str().expect("utf8"),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&back).expect("read"), b"payload");

    let out = call(&addr, &["info"]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info is JSON");
    assert_eq!(info["protocol_version"], 1);

    // Errors from the agent reach the caller as a failure with a message.
    let out = call(
        &addr,
        &["get", "/nonexistent/kiln", back.to_str().expect("utf8")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NotFound"),
        "{out:?}"
    );
}

#[test]
fn unreachable_agent_is_a_clear_error() {
    let out = call("unix:/nonexistent/kiln-agent.sock", &["ping"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{out:?}"
    );
}

/// Guests listen with AF_VSOCK; this machine's kernel has the vsock core, so
/// binding and listening are checked here (connecting needs a VM, see the
/// image boot tests). Fails, with the reason, on kernels without AF_VSOCK.
#[test]
fn vsock_listener_binds_and_listens() {
    let l = kiln_agent::transport::VsockListener::bind(45_252)
        .expect("AF_VSOCK listen failed: this kernel lacks vsock support (modprobe vsock)");
    assert_eq!(l.port(), 45_252);
}
