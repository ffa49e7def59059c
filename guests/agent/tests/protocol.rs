//! The agent protocol end to end over a Unix socket: a real agent serving in
//! this process, real clients (the typed one and raw frames for hostile input).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use kiln_agent::frame;
use kiln_agent::protocol::{
    sha256_hex, ErrorCode, ExecRequest, PutRequest, Request, RequestFrame, Response, ResponseFrame,
    WindowsAppRequest,
};
use kiln_agent::{
    Agent, AgentClient, AgentConfig, ClientError, ListenAddr, Listener, OutputStream, PowerControl,
    WindowsAppOutcome, WineConfig,
};

struct TestAgent {
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl TestAgent {
    fn start(config: AgentConfig) -> TestAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let listener = Listener::bind(&ListenAddr::Unix(socket.clone())).expect("bind unix socket");
        let agent = Arc::new(Agent::new(config));
        thread::spawn(move || agent.serve(&listener));
        TestAgent { dir, socket }
    }

    fn small() -> AgentConfig {
        AgentConfig {
            max_frame: 64 * 1024,
            max_file_size: 1 << 20,
            chunk_size: 16 * 1024,
            max_connections: 8,
            ..AgentConfig::default()
        }
    }

    fn client(&self) -> AgentClient {
        AgentClient::connect(
            &kiln_agent::ConnectAddr::Unix(self.socket.clone()),
            Some(Duration::from_secs(30)),
        )
        .expect("connect")
    }

    fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.socket).expect("connect raw");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn send_raw(s: &mut UnixStream, body: &[u8]) {
    frame::write_frame(s, body).expect("write frame");
}

fn recv_raw(s: &mut UnixStream) -> ResponseFrame {
    let body = frame::read_frame(s, 1 << 20)
        .expect("read frame")
        .expect("agent closed the connection");
    serde_json::from_slice(&body).expect("reply is valid JSON")
}

fn expect_error(r: &ResponseFrame, code: ErrorCode) {
    match &r.response {
        Response::Error { code: got, .. } => assert_eq!(*got, code, "{r:?}"),
        other => panic!("expected {code:?} error, got {other:?}"),
    }
}

fn agent_error(e: ClientError) -> ErrorCode {
    match e {
        ClientError::Agent { code, .. } => code,
        other => panic!("expected an agent error, got {other}"),
    }
}

fn ping_raw(s: &mut UnixStream, id: u64) {
    let body = serde_json::to_vec(&RequestFrame {
        id,
        request: Request::Ping,
    })
    .expect("json");
    send_raw(s, &body);
    let r = recv_raw(s);
    assert_eq!(r.id, Some(id));
    assert!(matches!(r.response, Response::Pong { .. }), "{r:?}");
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        timeout_ms: Some(20_000),
        ..Default::default()
    }
}

#[test]
fn ping_and_info_describe_the_guest() {
    let agent = TestAgent::start(TestAgent::small());
    let mut c = agent.client();
    assert_eq!(
        c.ping().expect("ping"),
        kiln_agent::protocol::PROTOCOL_VERSION
    );
    let info = c.info().expect("info");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    assert_eq!(info.kernel_release, release.trim());
    assert!(info.uptime_secs > 0.0);
    assert!(info.os_name.is_some(), "os-release should be readable here");
    assert!(info.capabilities.contains(&"exec".to_string()));
    assert!(!info.capabilities.contains(&"run_windows_app".to_string()));
}

#[test]
fn exec_passes_argv_env_cwd_stdin_and_returns_exit_code() {
    let agent = TestAgent::start(TestAgent::small());
    let mut c = agent.client();
    let mut req = sh("echo \"$KILN_T\" \"$1\"; pwd; cat; echo oops >&2; exit 3");
    req.argv.push("argzero".into());
    req.argv.push("first arg".into());
    req.env.insert("KILN_T".into(), "from-env".into());
    req.cwd = Some(agent.dir.path().to_string_lossy().into_owned());
    req.stdin = b"line from stdin\n".to_vec();
    let out = c.exec(req).expect("exec");
    let cwd = agent.dir.path().canonicalize().expect("canon");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("from-env first arg\n{}\nline from stdin\n", cwd.display())
    );
    assert_eq!(out.stderr, b"oops\n");
    assert_eq!(out.status.code, Some(3));
    assert!(!out.status.timed_out);

    let killed = c.exec(sh("kill -TERM $$")).expect("exec");
    assert_eq!(
        (killed.status.code, killed.status.signal),
        (None, Some(libc::SIGTERM))
    );

    let mut cleared = sh("echo \"[$HOME]\"");
    cleared.argv = vec!["/bin/sh".into(), "-c".into(), "echo \"[$HOME]\"".into()];
    cleared.clear_env = true;
    assert_eq!(c.exec(cleared).expect("exec").stdout, b"[]\n");
}

#[test]
fn exec_streams_output_while_the_program_runs() {
    let agent = TestAgent::start(TestAgent::small());
    let mut c = agent.client();
    // The program only finishes after the client has seen its first line, so
    // it can only pass if output is streamed before the exit.
    let go = agent.path("go");
    let script = format!(
        "echo first; while [ ! -e '{}' ]; do sleep 0.02; done; echo second",
        go.display()
    );
    let mut req = sh(&script);
    req.timeout_ms = Some(10_000);
    let mut seen = Vec::new();
    let status = c
        .exec_streaming(req, &mut |stream, data| {
            assert_eq!(stream, OutputStream::Stdout);
            if seen.is_empty() {
                std::fs::write(&go, b"").expect("create go file");
            }
            seen.extend_from_slice(data);
        })
        .expect("exec");
    assert!(!status.timed_out, "output was not streamed before exit");
    assert_eq!(status.code, Some(0));
    assert_eq!(seen, b"first\nsecond\n");
}

#[test]
fn exec_timeout_kills_the_whole_process_group() {
    let agent = TestAgent::start(TestAgent::small());
    let mut c = agent.client();
    let pidfile = agent.path("bg.pid");
    let mut req = sh(&format!(
        "sleep 60 & echo $! > '{}'; wait",
        pidfile.display()
    ));
    req.timeout_ms = Some(500);
    let started = Instant::now();
    let out = c.exec(req).expect("exec");
    assert!(out.status.timed_out);
    assert_eq!(out.status.signal, Some(libc::SIGKILL));
    assert!(started.elapsed() < Duration::from_secs(10));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    // The background sleep was in the same group: it must be gone (or a zombie
    // waiting for its new parent to reap it).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next())
                    .map(str::to_string)
            });
        match state.as_deref() {
            None | Some("Z") | Some("X") => break,
            Some(s) if Instant::now() > deadline => {
                panic!("background child {pid} still alive in state {s}")
            }
            _ => thread::sleep(Duration::from_millis(50)),
        }
    }
    // The connection is still usable.
    c.ping().expect("ping after timeout");
}

#[test]
fn exec_rejects_bad_requests_and_keeps_serving() {
    let agent = TestAgent::start(TestAgent::small());
    let mut c = agent.client();
    let missing = ExecRequest {
        argv: vec!["/nonexistent/kiln-program".into()],
        ..Default::default()
    };
    assert_eq!(
        agent_error(c.exec(missing).expect_err("missing program")),
        ErrorCode::NotFound
    );
    let empty = ExecRequest::default();
    assert_eq!(
        agent_error(c.exec(empty).expect_err("empty argv")),
        ErrorCode::BadRequest
    );
    let mut bad_cwd = sh("true");
    bad_cwd.cwd = Some(agent.path("no-such-dir").to_string_lossy().into_owned());
    assert_eq!(
        agent_error(c.exec(bad_cwd).expect_err("bad cwd")),
        ErrorCode::NotFound
    );
    let mut zero = sh("true");
    zero.timeout_ms = Some(0);
    assert_eq!(
        agent_error(c.exec(zero).expect_err("zero timeout")),
        ErrorCode::BadRequest
    );
    let mut bad_env = sh("true");
    bad_env.env.insert("A=B".into(), "x".into());
    assert_eq!(
        agent_error(c.exec(bad_env).expect_err("bad env")),
        ErrorCode::BadRequest
    );
    c.ping().expect("still serving");
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[test]
fn put_and_get_round_trip_in_chunks_with_mode() {
    let agent = TestAgent::start(TestAgent::small());
    let mut c = agent.client();
    let data = pattern(300 * 1024 + 17); // > 18 chunks of 16 KiB
    let remote = agent.path("sub/dir/file.bin");
    let remote_s = remote.to_string_lossy().into_owned();
    c.put_bytes(&remote_s, &data, 0o750).expect("put");
    assert_eq!(std::fs::read(&remote).expect("read back"), data);
    let mode = std::fs::metadata(&remote)
        .expect("meta")
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o750);
    assert_eq!(c.get_bytes(&remote_s).expect("get"), data);

    // Empty files work both ways; put replaces existing files.
    c.put_bytes(&remote_s, b"", 0o644).expect("put empty");
    assert_eq!(std::fs::read(&remote).expect("read"), b"");
    assert_eq!(c.get_bytes(&remote_s).expect("get empty"), b"");

    // No temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(remote.parent().expect("parent"))
        .expect("readdir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("kiln-put"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let local = agent.path("local.bin");
    std::fs::write(&local, &data[..1000]).expect("write local");
    c.put_file(&local, &agent.path("copy.bin").to_string_lossy(), 0o600)
        .expect("put_file");
    assert_eq!(
        std::fs::read(agent.path("copy.bin")).expect("read"),
        &data[..1000]
    );
}

fn put_header(id: u64, path: &Path, size: u64, sha: &str) -> Vec<u8> {
    serde_json::to_vec(&RequestFrame {
        id,
        request: Request::Put(PutRequest {
            path: path.to_string_lossy().into_owned(),
            size,
            sha256: sha.into(),
            mode: None,
            create_dirs: false,
        }),
    })
    .expect("json")
}

fn chunk(id: u64, data: &[u8]) -> Vec<u8> {
    serde_json::to_vec(&RequestFrame {
        id,
        request: Request::PutChunk {
            data: data.to_vec(),
        },
    })
    .expect("json")
}

#[test]
fn put_with_wrong_checksum_leaves_nothing_behind() {
    let agent = TestAgent::start(TestAgent::small());
    let mut s = agent.raw();
    let target = agent.path("victim");
    std::fs::write(&target, b"original").expect("write");
    let data = pattern(40_000);
    send_raw(
        &mut s,
        &put_header(
            5,
            &target,
            data.len() as u64,
            &sha256_hex(b"something else"),
        ),
    );
    assert!(matches!(
        recv_raw(&mut s).response,
        Response::PutReady { .. }
    ));
    for part in data.chunks(16 * 1024) {
        send_raw(&mut s, &chunk(5, part));
    }
    let r = recv_raw(&mut s);
    assert_eq!(r.id, Some(5));
    expect_error(&r, ErrorCode::ChecksumMismatch);
    assert_eq!(std::fs::read(&target).expect("read"), b"original");
    let names: Vec<_> = std::fs::read_dir(agent.dir.path())
        .expect("readdir")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.to_string_lossy().contains("kiln-put")),
        "{names:?}"
    );
    ping_raw(&mut s, 6);
}

#[test]
fn put_limits_and_protocol_misuse_get_errors() {
    let agent = TestAgent::start(TestAgent::small());
    let mut s = agent.raw();
    let sha = sha256_hex(b"");
    // Announced size above the file limit (1 MiB here).
    send_raw(
        &mut s,
        &put_header(1, &agent.path("big"), (1 << 20) + 1, &sha),
    );
    expect_error(&recv_raw(&mut s), ErrorCode::TooLarge);
    // More data than announced.
    send_raw(
        &mut s,
        &put_header(2, &agent.path("short"), 4, &sha256_hex(b"abcd")),
    );
    assert!(matches!(
        recv_raw(&mut s).response,
        Response::PutReady { .. }
    ));
    send_raw(&mut s, &chunk(2, b"abcdef"));
    expect_error(&recv_raw(&mut s), ErrorCode::TooLarge);
    assert!(!agent.path("short").exists());
    // A chunk with no upload in progress.
    send_raw(&mut s, &chunk(3, b"x"));
    expect_error(&recv_raw(&mut s), ErrorCode::BadRequest);
    // Relative paths, bad checksums, missing parent directories.
    send_raw(&mut s, &put_header(4, Path::new("relative/path"), 1, &sha));
    expect_error(&recv_raw(&mut s), ErrorCode::BadRequest);
    send_raw(&mut s, &put_header(5, &agent.path("f"), 1, "XYZ"));
    expect_error(&recv_raw(&mut s), ErrorCode::BadRequest);
    send_raw(&mut s, &put_header(6, &agent.path("missing/f"), 1, &sha));
    expect_error(&recv_raw(&mut s), ErrorCode::NotFound);
    // An upload interrupted by another request is abandoned with an error.
    send_raw(
        &mut s,
        &put_header(7, &agent.path("partial"), 10, &sha256_hex(b"0123456789")),
    );
    assert!(matches!(
        recv_raw(&mut s).response,
        Response::PutReady { .. }
    ));
    send_raw(&mut s, &chunk(7, b"01234"));
    send_raw(
        &mut s,
        &serde_json::to_vec(&RequestFrame {
            id: 8,
            request: Request::Ping,
        })
        .expect("json"),
    );
    let abandoned = recv_raw(&mut s);
    assert_eq!(abandoned.id, Some(7));
    expect_error(&abandoned, ErrorCode::BadRequest);
    let pong = recv_raw(&mut s);
    assert_eq!(pong.id, Some(8));
    assert!(!agent.path("partial").exists());
}

#[test]
fn get_errors_for_missing_directories_and_oversized_files() {
    let agent = TestAgent::start(TestAgent::small());
    let mut c = agent.client();
    let missing = agent.path("nope").to_string_lossy().into_owned();
    assert_eq!(
        agent_error(c.get_bytes(&missing).expect_err("missing")),
        ErrorCode::NotFound
    );
    let dir = agent.dir.path().to_string_lossy().into_owned();
    assert_eq!(
        agent_error(c.get_bytes(&dir).expect_err("directory")),
        ErrorCode::BadRequest
    );
    let big = agent.path("big");
    std::fs::write(&big, pattern((1 << 20) + 1)).expect("write big");
    assert_eq!(
        agent_error(c.get_bytes(&big.to_string_lossy()).expect_err("too big")),
        ErrorCode::TooLarge
    );
    assert_eq!(
        agent_error(c.get_bytes("relative").expect_err("relative")),
        ErrorCode::BadRequest
    );
    c.ping().expect("still serving");
}

#[test]
fn stats_report_memory_load_and_pressure() {
    let agent = TestAgent::start(TestAgent::small());
    let stats = agent.client().stats().expect("stats");
    let total = stats.mem_total_bytes().expect("MemTotal");
    let avail = stats.mem_available_bytes().expect("MemAvailable");
    assert!(total > 0 && avail <= total);
    assert!(stats.load.tasks >= 1);
    let psi_present = Path::new("/proc/pressure/memory").exists();
    assert_eq!(stats.pressure.is_some(), psi_present);
}

#[test]
fn malformed_frames_get_error_replies_and_the_connection_survives() {
    let agent = TestAgent::start(TestAgent::small());
    let mut s = agent.raw();
    let cases: &[(&[u8], Option<u64>)] = &[
        (b"this is not json", None),
        (b"\xff\xfe\x00garbage", None),
        (br#"{"id":41,"op":"exec","argv":"not-a-list"}"#, Some(41)),
        (br#"{"id":42,"op":"reformat_disk"}"#, Some(42)),
        (br#"{"id":43}"#, Some(43)),
        (br#"{"id":"x","op":"ping"}"#, None),
        (br#"[1,2,3]"#, None),
        (br#"{"id":44,"op":"put_chunk","data":"%%%"}"#, Some(44)),
        (br#"{"id":45,"op":"get","path":7}"#, Some(45)),
    ];
    for (body, id) in cases {
        send_raw(&mut s, body);
        let r = recv_raw(&mut s);
        assert_eq!(r.id, *id, "for {:?}", String::from_utf8_lossy(body));
        expect_error(&r, ErrorCode::BadRequest);
    }
    // An empty frame.
    s.write_all(&0u32.to_be_bytes()).expect("write");
    expect_error(&recv_raw(&mut s), ErrorCode::BadRequest);
    ping_raw(&mut s, 50);
}

#[test]
fn oversized_frames_are_refused() {
    let agent = TestAgent::start(TestAgent::small());
    // Slightly too large: drained, the same connection keeps working.
    let mut s = agent.raw();
    let body = vec![b' '; 64 * 1024 + 1];
    send_raw(&mut s, &body);
    let r = recv_raw(&mut s);
    assert_eq!(r.id, None);
    expect_error(&r, ErrorCode::TooLarge);
    ping_raw(&mut s, 1);

    // Absurdly large (4 GiB announced): error reply, then the connection is
    // closed; other clients are still served.
    let mut s = agent.raw();
    s.write_all(&u32::MAX.to_be_bytes()).expect("write");
    expect_error(&recv_raw(&mut s), ErrorCode::TooLarge);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    agent.client().ping().expect("other clients still served");
}

#[test]
fn truncated_frames_and_vanishing_clients_do_not_stop_the_agent() {
    let agent = TestAgent::start(TestAgent::small());
    {
        let mut s = agent.raw();
        s.write_all(&[0, 0]).expect("half a header");
    }
    {
        let mut s = agent.raw();
        s.write_all(&100u32.to_be_bytes()).expect("header");
        s.write_all(b"{\"id\":1,").expect("part of the body");
    }
    {
        // A client that disappears while its program is producing output.
        let mut s = agent.raw();
        let req = RequestFrame {
            id: 1,
            request: Request::Exec(sh("yes kiln | head -c 5000000")),
        };
        send_raw(&mut s, &serde_json::to_vec(&req).expect("json"));
        let _ = recv_raw(&mut s);
    }
    let mut c = agent.client();
    c.ping().expect("agent still serving");
    assert_eq!(c.exec(sh("echo ok")).expect("exec").stdout, b"ok\n");
}

#[test]
fn connections_beyond_the_limit_are_told_busy() {
    let mut cfg = TestAgent::small();
    cfg.max_connections = 2;
    let agent = TestAgent::start(cfg);
    let mut a = agent.client();
    let mut b = agent.client();
    a.ping().expect("a");
    b.ping().expect("b");
    let mut third = agent.raw();
    let r = recv_raw(&mut third);
    expect_error(&r, ErrorCode::Busy);
    drop(a);
    // The freed slot is reusable once the agent noticed the close.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = agent.client();
        match c.ping() {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("slot never freed: {e}"),
        }
    }
}

#[test]
fn shutdown_and_reboot_run_the_configured_hook() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = dir.path().join("actions");
    let hook = dir.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\necho \"$1\" >> '{}'\n", record.display()),
    )
    .expect("hook");
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let agent = TestAgent::start(AgentConfig {
        power: PowerControl::Hook(hook),
        ..TestAgent::small()
    });
    let mut c = agent.client();
    c.shutdown().expect("shutdown accepted");
    c.reboot().expect("reboot accepted");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&record).unwrap_or_default();
        let mut lines: Vec<_> = text.lines().collect();
        lines.sort_unstable();
        if lines == ["reboot", "shutdown"] {
            break;
        }
        assert!(Instant::now() < deadline, "hook record: {text:?}");
        thread::sleep(Duration::from_millis(50));
    }

    let broken = TestAgent::start(AgentConfig {
        power: PowerControl::Hook(dir.path().join("missing-hook")),
        ..TestAgent::small()
    });
    assert_eq!(
        agent_error(broken.client().shutdown().expect_err("no hook")),
        ErrorCode::Failed
    );
}

#[test]
fn run_windows_app_is_unsupported_without_wine() {
    let agent = TestAgent::start(TestAgent::small());
    let err = agent
        .client()
        .run_windows_app(
            WindowsAppRequest {
                path: "/x.exe".into(),
                ..Default::default()
            },
            &mut |_, _| {},
        )
        .expect_err("no wine");
    assert_eq!(agent_error(err), ErrorCode::Unsupported);
}

/// Checks the Wine invocation (launcher, prefix, arguments, environment) with
/// a launcher script that reports what it was given; running real Windows
/// programs under Wine is checked in the built image (guests/images tests).
#[test]
fn run_windows_app_invokes_the_wine_launcher_with_prefix_and_args() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = dir.path().join("wine");
    std::fs::write(
        &launcher,
        "#!/bin/sh\necho \"prefix=$WINEPREFIX debug=$WINEDEBUG display=${DISPLAY:-none}\"\nfor a in \"$@\"; do echo \"arg=$a\"; done\necho to-stderr >&2\nexit 42\n",
    )
    .expect("launcher");
    std::fs::set_permissions(&launcher, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let exe = dir.path().join("hello.exe");
    std::fs::write(&exe, b"MZ").expect("exe");
    let prefix = dir.path().join("prefix");
    let agent = TestAgent::start(AgentConfig {
        wine: Some(WineConfig {
            wine: launcher,
            prefix: prefix.clone(),
            display: None,
        }),
        ..TestAgent::small()
    });
    let mut c = agent.client();
    assert!(c
        .info()
        .expect("info")
        .capabilities
        .contains(&"run_windows_app".to_string()));
    let req = WindowsAppRequest {
        path: exe.to_string_lossy().into_owned(),
        args: vec!["one".into(), "two words".into()],
        gui: false,
        timeout_ms: Some(10_000),
    };
    let outcome = c.run_windows_app(req.clone(), &mut |_, _| {}).expect("run");
    let WindowsAppOutcome::Finished(out) = outcome else {
        panic!("console run expected")
    };
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "prefix={} debug=-all display=none\narg={}\narg=one\narg=two words\n",
            prefix.display(),
            exe.display()
        )
    );
    assert_eq!(out.stderr, b"to-stderr\n");
    assert_eq!(out.status.code, Some(42));

    let started = c
        .run_windows_app(WindowsAppRequest { gui: true, ..req }, &mut |_, _| {})
        .expect("gui");
    assert!(matches!(started, WindowsAppOutcome::Started { pid } if pid > 0));

    let missing = WindowsAppRequest {
        path: dir.path().join("nope.exe").to_string_lossy().into_owned(),
        ..Default::default()
    };
    assert_eq!(
        agent_error(
            c.run_windows_app(missing, &mut |_, _| {})
                .expect_err("missing")
        ),
        ErrorCode::NotFound
    );
}
