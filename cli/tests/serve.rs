//! `kiln serve` end to end on this machine: the real daemon binary, the
//! real `kiln-vmm` (whose guests cannot boot on this host's emulating KVM,
//! but whose processes run), the typed client and the CLI.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_api::{Client, Endpoint, EventQuery, EventType, VmSpec, VmState};
use serde_json::{json, Value};

mod common;
use common::{runtime, vmm_binary, Daemon, KILN};

/// The default guest (fetched into the cache by `kiln guest fetch`): on
/// this host's emulating KVM its kernel never finishes booting, so its VMM
/// runs until it is stopped; on hardware KVM it waits at a shell.
fn default_guest() -> (PathBuf, PathBuf) {
    let g = kiln_guests::ensure_default_guest(&kiln_guests::cache_dir())
        .expect("the default guest (run `kiln guest fetch`)");
    (g.bzimage, g.initramfs)
}

/// A kernel and initrd that exist but are no kernel: kiln-vmm refuses them.
fn guest_files(dir: &Path) -> (PathBuf, PathBuf) {
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd");
    std::fs::write(&kernel, vec![0u8; 4096]).unwrap();
    std::fs::write(&initrd, vec![0u8; 4096]).unwrap();
    (kernel, initrd)
}

fn spec(name: &str, kernel: &Path, extra: Value) -> VmSpec {
    let mut v = json!({"name": name, "machine": {"kernel": kernel, "memory_mib": 64}});
    if let (Some(obj), Some(more)) = (v.as_object_mut(), extra.as_object()) {
        for (k, val) in more {
            obj.insert(k.clone(), val.clone());
        }
    }
    serde_json::from_value(v).unwrap()
}

async fn wait_for_state(client: &Client, name: &str, want: VmState) -> kiln_api::VmInfo {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = client.get(name).await.unwrap();
        if info.status.state == want {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never became {want:?}: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kill9(pid: u32) {
    // SAFETY: kill(2) with a pid and a signal.
    assert_eq!(
        unsafe { libc::kill(pid as i32, libc::SIGKILL) },
        0,
        "kill -9 {pid}"
    );
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn create_list_show_delete_through_the_cli_and_the_client() {
    let d = Daemon::start(vmm_binary(), &[]);
    let (kernel, initrd) = guest_files(d.dir.path());
    let out = d.cli(&[
        "vm",
        "create",
        "web-1",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cpus",
        "2",
        "--memory",
        "128M",
        "--label",
        "team=kiln",
        "--restart",
        "on_crash=restart",
    ]);
    assert_eq!(out.trim(), "web-1 defined");
    let table = d.cli(&["vm", "list"]);
    let row = table
        .lines()
        .find(|l| l.starts_with("web-1"))
        .expect(&table);
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells,
        ["web-1", "defined", "2", "128", "MiB", "-", "team=kiln"]
    );
    let shown: Value = serde_json::from_str(&d.cli(&["vm", "show", "web-1", "--json"])).unwrap();
    assert_eq!(shown["spec"]["machine"]["cpus"], 2);
    assert_eq!(shown["spec"]["restart"]["on_crash"], "restart");
    let rt = runtime();
    let client = d.client();
    rt.block_on(async {
        assert_eq!(client.ping().await.unwrap().api, "v1");
        let info = client.get("web-1").await.unwrap();
        assert_eq!(info.spec.machine.memory_mib, 128);
        assert_eq!(client.list().await.unwrap().len(), 1);
    });
    assert_eq!(d.cli(&["vm", "delete", "web-1"]).trim(), "web-1 deleted");
    rt.block_on(async {
        assert!(client.list().await.unwrap().is_empty());
        let err = client.get("web-1").await.unwrap_err();
        assert_eq!(
            err.api().map(|(s, e)| (s, e.code)),
            Some((404, kiln_api::ErrorCode::VmNotFound))
        );
    });
    let host: Value = serde_json::from_str(&d.cli(&["host", "info", "--json"])).unwrap();
    assert!(host["memory_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn bad_specs_get_a_4xx_with_a_reason_and_leave_nothing_behind() {
    let d = Daemon::start(vmm_binary(), &[]);
    let (kernel, _) = guest_files(d.dir.path());
    let client = d.client();
    runtime().block_on(async {
        client
            .create(&spec("taken", &kernel, json!({})), false)
            .await
            .unwrap();
        let k = kernel.to_str().unwrap();
        let host_mib = client.host().await.unwrap().memory_bytes >> 20;
        let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
            (
                "missing kernel",
                json!({"name": "a", "machine": {"kernel": "/nonexistent/vmlinuz"}})
                    .to_string()
                    .into_bytes(),
                422,
                "/nonexistent/vmlinuz",
            ),
            (
                "0 cpus",
                json!({"name": "a", "machine": {"kernel": k, "cpus": 0}})
                    .to_string()
                    .into_bytes(),
                422,
                "cpus",
            ),
            (
                "memory beyond the host",
                json!({"name": "a", "machine": {"kernel": k, "memory_mib": host_mib + 1024}})
                    .to_string()
                    .into_bytes(),
                422,
                "more than this host",
            ),
            (
                "duplicate name",
                json!({"name": "taken", "machine": {"kernel": k}})
                    .to_string()
                    .into_bytes(),
                409,
                "exists already",
            ),
            (
                "unknown field",
                json!({"name": "a", "machine": {"kernel": k}, "colour": "red"})
                    .to_string()
                    .into_bytes(),
                422,
                "colour",
            ),
            (
                "bad name",
                json!({"name": "A_b", "machine": {"kernel": k}})
                    .to_string()
                    .into_bytes(),
                422,
                "lowercase",
            ),
            (
                "daemon-owned field",
                json!({"name": "a", "machine": {"kernel": k, "serial": "stdio"}})
                    .to_string()
                    .into_bytes(),
                422,
                "serial",
            ),
            (
                "malformed JSON",
                b"{\"name\": \"a\", ".to_vec(),
                400,
                "not valid JSON",
            ),
            (
                "huge body",
                format!("{{\"name\":\"a\",\"pad\":\"{}\"}}", "x".repeat(1 << 20)).into_bytes(),
                413,
                "larger than",
            ),
        ];
        for (what, body, status, needle) in cases {
            let raw = client.raw("POST", "/v1/vms", Some(body)).await.unwrap();
            let text = String::from_utf8_lossy(&raw.body);
            assert_eq!(raw.status, status, "{what}: {text}");
            let v: Value =
                serde_json::from_slice(&raw.body).unwrap_or_else(|_| panic!("{what}: {text}"));
            assert!(text.contains(needle), "{what}: {v}");
            assert!(v["error"]["code"].is_string(), "{what}: {v}");
        }
        let names: Vec<String> = client
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.spec.name)
            .collect();
        assert_eq!(names, ["taken"]);
    });
    let files: Vec<_> = std::fs::read_dir(d.state_dir().join("vms"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files, [std::ffi::OsString::from("taken.json")]);
}

#[test]
fn a_killed_vmm_is_crashed_with_an_event_and_on_crash_restart_brings_it_back() {
    let d = Daemon::start(vmm_binary(), &[]);
    let (kernel, initrd) = default_guest();
    let client = d.client();
    runtime().block_on(async {
        let mut s = spec("svc", &kernel, json!({"restart": {"on_crash": "restart"}}));
        s.machine.initrd = Some(initrd);
        // 64 MiB is too little for this kernel (it triple-faults).
        s.machine.memory_mib = 256;
        client.create(&s, true).await.unwrap();
        let info = wait_for_state(&client, "svc", VmState::Running).await;
        let first = info.status.pid.unwrap();
        // Control requests reach the VMM: counters, balloon, pause, resume.
        let counters = client.counters("svc").await.unwrap();
        assert_eq!(counters.vcpus.len(), 1, "{counters:?}");
        // The same counters reach /metrics.
        let metrics = client.metrics().await.unwrap();
        for series in [
            "kiln_vm_counters_up{vm=\"svc\"} 1",
            "kiln_vm_vcpu_run_seconds_total{vm=\"svc\",vcpu=\"0\"}",
        ] {
            assert!(metrics.contains(series), "{series} not in\n{metrics}");
        }
        let err = client.set_balloon("svc", 4096).await.unwrap_err();
        assert_eq!(err.api().map(|(s, _)| s), Some(422), "{err}");
        assert_eq!(
            client.action("svc", "pause").await.unwrap().state,
            VmState::Paused
        );
        assert_eq!(
            client.action("svc", "resume").await.unwrap().state,
            VmState::Running
        );
        let mut events = client
            .follow_events(&EventQuery {
                vm: Some("svc".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(
            pid_alive(first),
            "the VMM ended by itself: {:?}",
            client.get("svc").await
        );
        kill9(first);
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !seen.contains(&EventType::Restarted) {
            assert!(Instant::now() < deadline, "no restart; events {seen:?}");
            let e = tokio::time::timeout(Duration::from_secs(30), events.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            seen.push(e.kind);
        }
        assert!(seen.contains(&EventType::Crashed), "{seen:?}");
        assert!(seen.contains(&EventType::PolicyDecision), "{seen:?}");
        let info = client.get("svc").await.unwrap();
        assert!(!info.status.restarts.is_empty(), "{info:?}");
        assert_eq!(info.status.restarts[0].after, kiln_api::ExitKind::Crash);
        // A stop that was asked for is not a crash and is not restarted.
        let stopped = client.action("svc", "stop").await.unwrap();
        assert_eq!(stopped.state, VmState::Shutoff);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let info = client.get("svc").await.unwrap();
        assert_eq!(info.status.state, VmState::Shutoff);
        assert_eq!(info.status.last_exit, Some(kiln_api::ExitKind::Stopped));
        // Deleting a running VM needs force, which stops its VMM first.
        client.action("svc", "start").await.unwrap();
        let pid = wait_for_state(&client, "svc", VmState::Running)
            .await
            .status
            .pid
            .unwrap();
        let err = client.delete("svc", false).await.unwrap_err();
        assert_eq!(
            err.api().map(|(s, e)| (s, e.code)),
            Some((409, kiln_api::ErrorCode::InvalidState))
        );
        client.delete("svc", true).await.unwrap();
        assert!(!pid_alive(pid), "the VMM of a force-deleted VM still runs");
        assert!(client.list().await.unwrap().is_empty());
    });
}

#[test]
fn after_a_kill_9_of_the_daemon_every_acknowledged_vm_is_there_and_running_vmms_are_readopted() {
    let mut d = Daemon::start(vmm_binary(), &[]);
    let (kernel, initrd) = default_guest();
    let rt = runtime();
    let (pid, last_seq) = rt.block_on(async {
        let client = d.client();
        for i in 0..5 {
            client
                .create(&spec(&format!("vm-{i}"), &kernel, json!({})), false)
                .await
                .unwrap();
        }
        let mut s = spec("live", &kernel, json!({}));
        s.machine.initrd = Some(initrd.clone());
        s.machine.memory_mib = 256;
        client.create(&s, true).await.unwrap();
        let info = wait_for_state(&client, "live", VmState::Running).await;
        let events = client.events(&EventQuery::default()).await.unwrap();
        (info.status.pid.unwrap(), events.last().unwrap().seq)
    });
    d.kill9();
    assert!(pid_alive(pid), "the VMM died with the daemon");
    d.spawn();
    rt.block_on(async {
        let client = d.client();
        let vms = client.list().await.unwrap();
        assert_eq!(vms.len(), 6, "{vms:?}");
        let live = client.get("live").await.unwrap();
        assert_eq!(
            (live.status.state, live.status.pid),
            (VmState::Running, Some(pid))
        );
        let events = client
            .events(&EventQuery {
                since: Some(last_seq),
                ..Default::default()
            })
            .await
            .unwrap();
        let kinds: Vec<EventType> = events.iter().map(|e| e.kind).collect();
        assert_eq!(
            events[0].seq,
            last_seq + 1,
            "sequence numbers carry on: {events:?}"
        );
        assert_eq!(kinds[..2], [EventType::DaemonStarted, EventType::Adopted]);
        // The adopted VMM is not the daemon's child; its death is still seen.
        kill9(pid);
        let info = wait_for_state(&client, "live", VmState::Crashed).await;
        let reason = info.status.reason.unwrap();
        assert!(reason.contains("without an exit record"), "{reason}");
        // Too old a `since` is 410 only when events were dropped; here none were.
        assert!(client
            .events(&EventQuery {
                since: Some(0),
                ..Default::default()
            })
            .await
            .is_ok());
    });
}

#[test]
fn tcp_needs_the_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "0123456789abcdef0123\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(
        vmm_binary(),
        &[
            "--listen",
            &addr,
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    );
    runtime().block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            assert!(Instant::now() < deadline, "no TCP listener: {}", d.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let anonymous = Client::new(Endpoint::Tcp {
            addr: addr.clone(),
            token: None,
        });
        let err = anonymous.ping().await.unwrap_err();
        assert_eq!(err.api().map(|(s, _)| s), Some(401), "{err}");
        let wrong = Client::new(Endpoint::Tcp {
            addr: addr.clone(),
            token: Some("0123456789abcdef0124".into()),
        });
        assert_eq!(
            wrong.list().await.unwrap_err().api().map(|(s, _)| s),
            Some(401)
        );
        let right = Client::new(Endpoint::Tcp {
            addr: addr.clone(),
            token: Some("0123456789abcdef0123".into()),
        });
        assert_eq!(right.ping().await.unwrap().api, "v1");
    });
}

#[test]
fn a_vmm_that_cannot_start_leaves_the_vm_crashed_not_a_5xx() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path().join("no-kiln-vmm-here"), &[]);
    let (kernel, _) = guest_files(d.dir.path());
    let client = d.client();
    runtime().block_on(async {
        client
            .create(&spec("doomed", &kernel, json!({})), false)
            .await
            .unwrap();
        let result = client.action("doomed", "start").await.unwrap();
        assert_eq!(result.state, VmState::Crashed);
        let info = client.get("doomed").await.unwrap();
        assert!(info.status.reason.unwrap().contains("no-kiln-vmm-here"));
        let crashes = client
            .events(&EventQuery {
                kind: Some(EventType::Crashed),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(crashes.len(), 1, "{crashes:?}");
        assert_eq!(crashes[0].vm.as_deref(), Some("doomed"));
    });
}

#[test]
fn the_console_attaches_through_a_websocket_for_four_clients_and_only_while_the_vm_runs() {
    let d = Daemon::start(vmm_binary(), &[]);
    let (kernel, initrd) = default_guest();
    let client = d.client();
    let rt = runtime();
    rt.block_on(async {
        client
            .create(&spec("quiet", &kernel, json!({})), false)
            .await
            .unwrap();
        // Not running: 409 before any upgrade.
        let err = client
            .attach_console("quiet")
            .await
            .err()
            .expect("attached to a defined VM");
        assert_eq!(
            err.api().map(|(s, e)| (s, e.code)),
            Some((409, kiln_api::ErrorCode::InvalidState)),
            "{err}"
        );
        let err = client.attach_console("nobody").await.err().unwrap();
        assert_eq!(err.api().map(|(s, _)| s), Some(404), "{err}");
        let mut s = spec("live", &kernel, json!({}));
        s.machine.initrd = Some(initrd);
        s.machine.memory_mib = 256;
        client.create(&s, true).await.unwrap();
        wait_for_state(&client, "live", VmState::Running).await;
        let mut sessions = Vec::new();
        for _ in 0..4 {
            let (mut input, output) = client.attach_console("live").await.unwrap().split();
            input.send(b"echo typed\n").await.unwrap();
            sessions.push((input, output));
        }
        let err = client
            .attach_console("live")
            .await
            .err()
            .expect("a 5th client attached");
        let (status, e) = err.api().expect("an API error");
        assert_eq!((status, e.code), (409, kiln_api::ErrorCode::InvalidState));
        assert!(e.message.contains("busy: 4 clients"), "{}", e.message);
        // Detach one; its slot is free again once the VMM saw it go.
        let (mut input, _output) = sessions.pop().unwrap();
        input.close().await.unwrap();
        drop(input);
        drop(_output);
        let deadline = Instant::now() + Duration::from_secs(10);
        let again = loop {
            match client.attach_console("live").await {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "the slot never came back: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        drop(again);
        drop(sessions);
        // The log read still works while the console is attached.
        client.console("live").await.unwrap();
    });
    // The CLI: piped input is typed and it detaches after it; a marker that
    // never comes is an error after --timeout; a VM that does not run is
    // refused.
    let run = |args: &[&str], stdin: &[u8]| {
        let mut child = Command::new(KILN)
            .args(args)
            .arg("--socket")
            .arg(d.socket())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, err) = run(&["vm", "console", "live", "--timeout", "20"], b"echo hi\n");
        if code == Some(0) {
            break;
        }
        // The slots of the sessions dropped above free up shortly.
        assert!(Instant::now() < deadline, "piped attach: {code:?} {err}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let start = Instant::now();
    let (code, err) = run(
        &[
            "vm",
            "console",
            "live",
            "--until",
            "NEVER_PRINTED",
            "--timeout",
            "2",
        ],
        b"",
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("did not appear"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(15));
    let (code, err) = run(&["vm", "console", "quiet"], b"");
    assert_ne!(code, Some(0));
    assert!(err.contains("quiet") && err.contains("defined"), "{err}");
    assert!(d.cli(&["vm", "console", "live", "--log"]).len() <= 1 << 20);
}

fn sigterm(pid: u32) {
    // SAFETY: kill(2) with a pid and a signal.
    assert_eq!(
        unsafe { libc::kill(pid as i32, libc::SIGTERM) },
        0,
        "kill -TERM {pid}"
    );
}

fn wait_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while pid_alive(pid) {
        assert!(Instant::now() < deadline, "pid {pid} still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The default guest with every restart policy at `restart` and an rng
/// device (whose I/O worker can be placed).
fn restarting_guest(name: &str) -> VmSpec {
    let (kernel, initrd) = default_guest();
    let mut s = spec(
        name,
        &kernel,
        json!({"restart": {"on_poweroff": "restart", "on_reboot": "restart", "on_crash": "restart"}}),
    );
    s.machine.initrd = Some(initrd);
    s.machine.memory_mib = 256;
    s.machine.rng = Some(Default::default());
    s
}

fn api_code(err: &kiln_api::ClientError) -> Option<(u16, kiln_api::ErrorCode)> {
    err.api().map(|(s, e)| (s, e.code))
}

#[test]
fn shutdown_of_a_guest_that_ignores_the_power_button_is_forced_shutoff_and_never_restarted() {
    let d = Daemon::start(vmm_binary(), &[]);
    let client = d.client();
    runtime().block_on(async {
        client.create(&restarting_guest("svc"), true).await.unwrap();
        let (kernel, _) = guest_files(d.dir.path());
        client
            .create(&spec("idle", &kernel, json!({})), false)
            .await
            .unwrap();
        wait_for_state(&client, "svc", VmState::Running).await;
        // Not running: 409 with the reason.
        for action in ["shutdown", "reboot"] {
            let err = match action {
                "shutdown" => client.shutdown("idle", Some(1)).await,
                _ => client.reboot("idle", Some(1)).await,
            }
            .unwrap_err();
            assert_eq!(
                api_code(&err),
                Some((409, kiln_api::ErrorCode::InvalidState)),
                "{err}"
            );
            assert!(err.to_string().contains("not running"), "{err}");
        }
        let err = client.shutdown("svc", Some(0)).await.unwrap_err();
        assert_eq!(api_code(&err).map(|c| c.0), Some(400), "{err}");
        let mut events = client
            .follow_events(&EventQuery {
                vm: Some("svc".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        // The guest never boots here, so nothing answers the power button:
        // the hard stop comes after the timeout.
        let shutdown = {
            let client = client.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let r = client.shutdown("svc", Some(1)).await;
                (r, started.elapsed())
            })
        };
        wait_for_state(&client, "svc", VmState::Stopping).await;
        for (what, err) in [
            ("pause", client.action("svc", "pause").await.unwrap_err()),
            ("reboot", client.reboot("svc", Some(1)).await.unwrap_err()),
            ("balloon", client.set_balloon("svc", 8).await.unwrap_err()),
        ] {
            assert_eq!(
                api_code(&err),
                Some((409, kiln_api::ErrorCode::InvalidState)),
                "{what} while stopping: {err}"
            );
        }
        let (result, took) = shutdown.await.unwrap();
        let result = result.unwrap();
        assert_eq!(result.state, VmState::Shutoff, "{result:?}");
        assert_eq!(result.outcome, Some(kiln_api::ShutdownOutcome::Forced));
        assert!(took >= Duration::from_secs(1), "{took:?}");
        let mut seen = Vec::new();
        while !seen
            .iter()
            .any(|e: &kiln_api::Event| e.kind == EventType::Shutdown)
        {
            let e = tokio::time::timeout(Duration::from_secs(10), events.next())
                .await
                .expect("a shutdown event")
                .unwrap()
                .unwrap();
            seen.push(e);
        }
        let ev = seen.last().unwrap();
        assert!(ev.message.contains("forced"), "{ev:?}");
        assert_eq!(ev.state, Some(VmState::Shutoff));
        assert!(
            seen.iter()
                .any(|e| e.kind == EventType::StateChanged && e.state == Some(VmState::Stopping)),
            "{seen:?}"
        );
        // on_*=restart everywhere, and still no restart.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let info = client.get("svc").await.unwrap();
        assert_eq!(info.status.state, VmState::Shutoff, "{info:?}");
        assert_eq!(info.status.last_exit, Some(kiln_api::ExitKind::Stopped));
        assert!(info.status.restarts.is_empty(), "{info:?}");
    });
    // The CLI says the same.
    d.cli(&["vm", "start", "svc"]);
    runtime().block_on(wait_for_state(&d.client(), "svc", VmState::Running));
    let out = d.cli(&["vm", "shutdown", "svc", "--timeout", "1"]);
    assert_eq!(out.trim(), "svc shutoff (forced)");
    // A stop while stopping ends the wait at once (forced), long before
    // the shutdown's own timeout.
    d.cli(&["vm", "start", "svc"]);
    runtime().block_on(async {
        let client = d.client();
        wait_for_state(&client, "svc", VmState::Running).await;
        let shutdown = {
            let client = client.clone();
            tokio::spawn(async move { client.shutdown("svc", Some(600)).await })
        };
        wait_for_state(&client, "svc", VmState::Stopping).await;
        let started = Instant::now();
        let stopped = client.action("svc", "stop").await.unwrap();
        assert_eq!(stopped.state, VmState::Shutoff);
        let result = tokio::time::timeout(Duration::from_secs(30), shutdown)
            .await
            .expect("the shutdown ended with the stop")
            .unwrap()
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(30));
        assert_eq!(result.outcome, Some(kiln_api::ShutdownOutcome::Forced));
        let last = client
            .events(&EventQuery {
                vm: Some("svc".into()),
                kind: Some(EventType::Shutdown),
                ..Default::default()
            })
            .await
            .unwrap();
        let msg = &last.last().unwrap().message;
        assert!(msg.contains("stopped by a request"), "{msg}");
    });
}

#[test]
fn reboot_starts_a_fresh_vmm_and_records_it_as_on_request() {
    let d = Daemon::start(vmm_binary(), &["--shutdown-timeout", "1"]);
    let client = d.client();
    runtime().block_on(async {
        client.create(&restarting_guest("rb"), true).await.unwrap();
        let first = wait_for_state(&client, "rb", VmState::Running)
            .await
            .status
            .pid
            .unwrap();
        // No timeout in the request: the daemon's --shutdown-timeout (1 s).
        let started = Instant::now();
        let result = client.reboot("rb", None).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(20));
        assert_eq!(result.outcome, Some(kiln_api::ShutdownOutcome::Forced));
        assert!(
            matches!(result.state, VmState::Starting | VmState::Running),
            "{result:?}"
        );
        let info = wait_for_state(&client, "rb", VmState::Running).await;
        let second = info.status.pid.unwrap();
        assert_ne!(first, second);
        assert!(!pid_alive(first), "the old VMM still runs");
        assert_eq!(info.status.restarts.len(), 1, "{info:?}");
        let r = &info.status.restarts[0];
        assert_eq!(r.cause, kiln_api::RestartCause::Request);
        assert_eq!(r.after, kiln_api::ExitKind::Stopped);
        let restarted = client
            .events(&EventQuery {
                vm: Some("rb".into()),
                kind: Some(EventType::Restarted),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(restarted.len(), 1, "{restarted:?}");
        assert!(restarted[0].message.contains("on request"), "{restarted:?}");
        // No second start by the policy on top of the reboot.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let info = client.get("rb").await.unwrap();
        assert_eq!(info.status.pid, Some(second), "{info:?}");
        assert_eq!(info.status.restarts.len(), 1, "{info:?}");
    });
    let out: Value =
        serde_json::from_str(&d.cli(&["vm", "reboot", "rb", "--timeout", "1", "--json"])).unwrap();
    assert_eq!(out["action"], "reboot");
    assert_eq!(out["outcome"], "forced");
    let shown = d.cli(&["vm", "show", "rb"]);
    let line = shown.lines().find(|l| l.starts_with("restarts")).unwrap();
    assert!(
        line.contains("2 (last") && line.contains("on request after stopped"),
        "{shown}"
    );
}

#[test]
fn worker_placement_shows_moves_and_refuses_bad_devices_and_cpus() {
    let d = Daemon::start(vmm_binary(), &[]);
    let client = d.client();
    runtime().block_on(async {
        client.create(&restarting_guest("wk"), true).await.unwrap();
        wait_for_state(&client, "wk", VmState::Running).await;
        let w = client.worker("wk", "rng0").await.unwrap();
        assert_eq!(w.device, "rng0");
        let placed = client
            .set_worker(
                "wk",
                "rng0",
                &kiln_api::WorkerPlacement {
                    cpus: Some(vec![0]),
                    wait: kiln_vmm::protocol::WaitKind::Poll,
                    spin_us: Some(100),
                },
            )
            .await
            .unwrap();
        assert_eq!(placed.cpus, Some(vec![0]));
        assert_eq!(placed.wait, kiln_vmm::protocol::WaitKind::Poll);
        assert_eq!(placed.spin_us, Some(100));
        assert_eq!(
            client.worker("wk", "rng0").await.unwrap().cpus,
            Some(vec![0])
        );
        let err = client.worker("wk", "net9").await.unwrap_err();
        assert_eq!(
            api_code(&err),
            Some((404, kiln_api::ErrorCode::DeviceNotFound)),
            "{err}"
        );
        assert!(err.to_string().contains("rng0"), "{err}");
        let err = client
            .set_worker(
                "wk",
                "net9",
                &kiln_api::WorkerPlacement {
                    cpus: None,
                    wait: kiln_vmm::protocol::WaitKind::Notify,
                    spin_us: None,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(
            api_code(&err),
            Some((404, kiln_api::ErrorCode::DeviceNotFound)),
            "{err}"
        );
        let err = client
            .set_worker(
                "wk",
                "rng0",
                &kiln_api::WorkerPlacement {
                    cpus: Some(vec![4095]),
                    wait: kiln_vmm::protocol::WaitKind::Notify,
                    spin_us: None,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(api_code(&err).map(|c| c.0), Some(422), "{err}");
        assert!(err.to_string().contains("4095"), "{err}");
        // The refusal changed nothing.
        assert_eq!(
            client.worker("wk", "rng0").await.unwrap().cpus,
            Some(vec![0])
        );
    });
    // The CLI: flags change only what they name.
    let out = d.cli(&["vm", "worker", "wk", "rng0", "--wait", "notify"]);
    assert!(
        out.contains("cpus 0 ") && out.contains("wait notify"),
        "{out}"
    );
    let shown: Value =
        serde_json::from_str(&d.cli(&["vm", "worker", "wk", "rng0", "--json"])).unwrap();
    assert_eq!(shown["wait"], "notify");
    assert_eq!(shown["cpus"], json!([0]));
    let out = d.cli(&["vm", "worker", "wk", "rng0", "--cpus", "any"]);
    assert!(out.contains("cpus any"), "{out}");
}

#[test]
fn a_vmm_stopped_by_sigterm_while_no_daemon_watched_is_shutoff_not_crashed() {
    let mut d = Daemon::start(vmm_binary(), &[]);
    let rt = runtime();
    let (gone, adopted) = rt.block_on(async {
        let client = d.client();
        let mut pids = Vec::new();
        for name in ["gone", "adopted"] {
            client.create(&restarting_guest(name), true).await.unwrap();
            let info = wait_for_state(&client, name, VmState::Running).await;
            pids.push(info.status.pid.unwrap());
        }
        (pids[0], pids[1])
    });
    d.kill9();
    sigterm(gone);
    wait_gone(gone);
    let record = d.dir.path().join("run/vms/gone/exit.json");
    let text = std::fs::read_to_string(&record).expect("kiln-vmm left an exit record");
    assert!(text.contains(r#""kind":"stopped""#), "{text}");
    d.spawn();
    rt.block_on(async {
        let client = d.client();
        let info = client.get("gone").await.unwrap();
        assert_eq!(info.status.state, VmState::Shutoff, "{info:?}");
        assert_eq!(info.status.last_exit, Some(kiln_api::ExitKind::Stopped));
        let reason = info.status.reason.unwrap_or_default();
        assert!(reason.contains("SIGTERM"), "{reason}");
        // The adopted one (not this daemon's child): its record says how.
        let info = client.get("adopted").await.unwrap();
        assert_eq!(info.status.state, VmState::Running, "{info:?}");
        sigterm(adopted);
        let info = wait_for_state(&client, "adopted", VmState::Shutoff).await;
        assert_eq!(info.status.last_exit, Some(kiln_api::ExitKind::Stopped));
        assert!(
            info.status.reason.unwrap_or_default().contains("SIGTERM"),
            "{:?}",
            client.get("adopted").await
        );
        // Stopped is no crash: the policy leaves both alone.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for name in ["gone", "adopted"] {
            let info = client.get(name).await.unwrap();
            assert_eq!(info.status.state, VmState::Shutoff, "{info:?}");
            assert!(info.status.restarts.is_empty(), "{info:?}");
        }
    });
}

#[test]
fn a_shutdown_under_way_when_the_daemon_dies_goes_on_after_its_restart() {
    let mut d = Daemon::start(vmm_binary(), &["--shutdown-timeout", "1"]);
    let rt = runtime();
    let pid = rt.block_on(async {
        let client = d.client();
        client.create(&restarting_guest("mid"), true).await.unwrap();
        wait_for_state(&client, "mid", VmState::Running).await;
        // A client that goes away does not leave the VM stopping forever.
        let gone = {
            let client = client.clone();
            tokio::spawn(async move { client.shutdown("mid", Some(1)).await })
        };
        wait_for_state(&client, "mid", VmState::Stopping).await;
        gone.abort();
        wait_for_state(&client, "mid", VmState::Shutoff).await;
        client.action("mid", "start").await.unwrap();
        let pid = wait_for_state(&client, "mid", VmState::Running)
            .await
            .status
            .pid
            .unwrap();
        // A long wait, cut short by the daemon's death.
        let pending = {
            let client = client.clone();
            tokio::spawn(async move { client.shutdown("mid", Some(600)).await })
        };
        wait_for_state(&client, "mid", VmState::Stopping).await;
        pending.abort();
        pid
    });
    d.kill9();
    assert!(pid_alive(pid), "the VMM died with the daemon");
    d.spawn();
    rt.block_on(async {
        let client = d.client();
        let adopted = client
            .events(&EventQuery {
                vm: Some("mid".into()),
                kind: Some(EventType::Adopted),
                ..Default::default()
            })
            .await
            .unwrap();
        let msg = &adopted.last().expect("an adopted event").message;
        assert!(msg.contains("the shutdown goes on"), "{msg}");
        // --shutdown-timeout 1 from the restart, then the hard stop; the
        // policy (on_*=restart) stays out of it.
        let info = wait_for_state(&client, "mid", VmState::Shutoff).await;
        assert_eq!(info.status.last_exit, Some(kiln_api::ExitKind::Stopped));
        assert!(!pid_alive(pid), "the VMM still runs");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let info = client.get("mid").await.unwrap();
        assert_eq!(info.status.state, VmState::Shutoff, "{info:?}");
        assert!(info.status.restarts.is_empty(), "{info:?}");
        let shutdowns = client
            .events(&EventQuery {
                vm: Some("mid".into()),
                kind: Some(EventType::Shutdown),
                ..Default::default()
            })
            .await
            .unwrap();
        let msg = &shutdowns.last().expect("a shutdown event").message;
        assert!(
            msg.contains("resumed after a daemon restart") && msg.contains("forced"),
            "{msg}"
        );
    });
}

/// Programs in guests, as far as this host goes (its guests never boot):
/// a VM without an agent section is refused with agent_not_configured; a
/// VM with one gets its vsock socket in its run directory, and since its
/// guest never boots, exec is agent_unavailable (503) within seconds, in
/// the buffered and the streamed mode and through `kiln vm exec`, while the
/// daemon keeps answering other requests; apps/run refuses a non-PE body
/// and a too-large one before looking at the VM.
#[test]
fn exec_without_a_booted_guest_is_agent_unavailable_quickly_not_a_hang() {
    let d = Daemon::start(vmm_binary(), &[]);
    let (kernel, initrd) = default_guest();
    let client = d.client();
    let argv = kiln_api::ExecRequest {
        argv: vec!["uname".into(), "-a".into()],
        ..Default::default()
    };
    runtime().block_on(async {
        let mut plain = spec("plain", &kernel, json!({}));
        plain.machine.initrd = Some(initrd.clone());
        plain.machine.memory_mib = 256;
        client.create(&plain, true).await.unwrap();
        wait_for_state(&client, "plain", VmState::Running).await;
        let err = client.exec("plain", &argv).await.unwrap_err();
        assert_eq!(
            err.api().map(|(s, e)| (s, e.code)),
            Some((409, kiln_api::ErrorCode::AgentNotConfigured)),
            "{err}"
        );

        let mut guest = spec("guest", &kernel, json!({"agent": {}}));
        guest.machine.initrd = Some(initrd);
        guest.machine.memory_mib = 256;
        client.create(&guest, true).await.unwrap();
        wait_for_state(&client, "guest", VmState::Running).await;
        let socket = d.dir.path().join("run/vms/guest/agent.vsock");
        assert!(socket.exists(), "no vsock socket at {}", socket.display());

        let started = Instant::now();
        let err = client.exec("guest", &argv).await.unwrap_err();
        let took = started.elapsed();
        let (status, e) = err.api().unwrap_or_else(|| panic!("{err}"));
        assert_eq!(
            (status, e.code),
            (503, kiln_api::ErrorCode::AgentUnavailable),
            "{err}"
        );
        assert!(
            e.message.contains("does not answer on vsock port 5252"),
            "{err}"
        );
        assert!(
            took < Duration::from_secs(15),
            "agent_unavailable took {took:?}"
        );

        // Streamed: the agent is reached before the answer begins, so the
        // same 503 — and while one call waits, the daemon answers others.
        let waiting = {
            let client = client.clone();
            let argv = argv.clone();
            tokio::spawn(async move { client.exec_stream("guest", &argv).await.err() })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let ping_started = Instant::now();
        client.ping().await.unwrap();
        client.get("guest").await.unwrap();
        assert!(
            ping_started.elapsed() < Duration::from_secs(1),
            "the daemon stalled behind an agent call: {:?}",
            ping_started.elapsed()
        );
        let err = waiting.await.unwrap().expect("the stream is refused");
        assert_eq!(err.api().map(|(s, _)| s), Some(503), "{err}");

        // apps/run checks the upload before the VM.
        let app = |exe: Vec<u8>| kiln_api::AppRun {
            file_name: "t.exe".into(),
            exe,
            args: vec!["a".into()],
            timeout_s: Some(30),
        };
        let err = client
            .run_app("guest", &app(b"#!/bin/sh\necho not a PE file\n".to_vec()))
            .await
            .unwrap_err();
        assert_eq!(
            err.api().map(|(s, e)| (s, e.code)),
            Some((422, kiln_api::ErrorCode::InvalidUpload)),
            "{err}"
        );
        let err = client
            .run_app("guest", &app(vec![b'M'; kiln_api::exec::UPLOAD_LIMIT + 1]))
            .await
            .unwrap_err();
        assert_eq!(
            err.api().map(|(s, e)| (s, e.code)),
            Some((413, kiln_api::ErrorCode::BodyTooLarge)),
            "{err}"
        );
        let mut pe = vec![0u8; 1024];
        pe[..2].copy_from_slice(b"MZ");
        pe[0x3c] = 0x80;
        pe[0x80..0x84].copy_from_slice(b"PE\0\0");
        let err = client.run_app("guest", &app(pe)).await.unwrap_err();
        assert_eq!(err.api().map(|(s, _)| s), Some(503), "{err}");
    });

    // The CLI: a clear message and a failing exit code, quickly.
    let started = Instant::now();
    let out = Command::new(KILN)
        .args(["vm", "exec", "guest", "--socket"])
        .arg(d.socket())
        .args(["--", "uname", "-a"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not answer on vsock port 5252"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    let out = Command::new(KILN)
        .args(["vm", "exec", "plain", "--socket"])
        .arg(d.socket())
        .args(["--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no agent section"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    runtime().block_on(async {
        for vm in ["plain", "guest"] {
            client.delete(vm, true).await.unwrap();
        }
    });
}
