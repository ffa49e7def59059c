use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use kiln_devices::virtio::balloon::VirtioBalloon;
use kiln_devices::virtio::worker::WorkerControl;

use super::*;
use crate::config::VmConfig;
use crate::control::{answer, ControlSocket};
use crate::devices::DeviceHandles;
use crate::vm::Vm;

/// A VM handle with disk0 (a worker), balloon0 (a worker and a balloon)
/// and 512 MiB, without KVM behind it.
fn vm() -> Vm {
    let mut config: VmConfig = serde_json::from_str(
        r#"{"kernel":"/k","memory_mib":512,"disks":[{"path":"/d"}],"balloon":{}}"#,
    )
    .unwrap();
    config.assign_device_ids();
    let mut h = DeviceHandles::default();
    h.workers.push((
        "disk0".into(),
        WorkerControl::new(Default::default()).unwrap(),
    ));
    let b = VirtioBalloon::new(Default::default()).unwrap();
    h.balloon = Some(b.control());
    h.workers.push(("balloon0".into(), b.worker_control()));
    Vm::without_vcpus(&config, h)
}

fn ask(vm: &Vm, line: &str) -> ResponseLine {
    serde_json::from_str(&answer(line.as_bytes(), vm)).unwrap()
}

fn error_of(r: ResponseLine) -> ErrorBody {
    match r.outcome {
        Outcome::Error(e) => e,
        Outcome::Result(v) => panic!("expected an error, got {v}"),
    }
}

#[test]
fn requests_round_trip_in_their_documented_shape() {
    let line = r#"{"id":7,"request":{"kind":"set_balloon_target","mib":256}}"#;
    let parsed: RequestLine = serde_json::from_str(line).unwrap();
    assert_eq!(
        parsed,
        RequestLine {
            id: 7,
            request: Request::SetBalloonTarget { mib: 256 }
        }
    );
    assert_eq!(encode_line(&parsed), format!("{line}\n"));
    for request in [
        Request::Status {},
        Request::Pause {},
        Request::Resume {},
        Request::Stop {},
        Request::BalloonStats {},
        Request::Workers {},
        Request::Counters {},
        Request::SetWorkerPlacement {
            device: "net0".into(),
            cpus: Some(vec![0, 1]),
            wait: WaitKind::Poll,
            spin_us: Some(200),
        },
    ] {
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(
            serde_json::from_str::<Request>(&text).unwrap(),
            request,
            "{text}"
        );
    }
    let err = ResponseLine {
        id: None,
        outcome: Outcome::Error(ErrorBody::new(ErrorCode::NotFound, "no device")),
    };
    let text = serde_json::to_string(&err).unwrap();
    assert_eq!(
        text,
        r#"{"id":null,"error":{"code":"not_found","message":"no device"}}"#
    );
    assert_eq!(serde_json::from_str::<ResponseLine>(&text).unwrap(), err);
}

#[test]
fn results_and_typed_errors() {
    let vm = vm();
    let r = ask(&vm, r#"{"id":1,"request":{"kind":"status"}}"#);
    assert_eq!(r.id, Some(1));
    let Outcome::Result(status) = r.outcome else {
        panic!()
    };
    let status: Status = serde_json::from_value(status).unwrap();
    assert_eq!(status.state, RunState::Running);
    assert_eq!(
        status
            .devices
            .iter()
            .map(|d| d.id.as_str())
            .collect::<Vec<_>>(),
        ["disk0", "balloon0"]
    );

    let r = ask(
        &vm,
        r#"{"id":2,"request":{"kind":"set_balloon_target","mib":64}}"#,
    );
    let Outcome::Result(b) = r.outcome else {
        panic!("{r:?}")
    };
    assert_eq!(b["target_mib"], 64);
    assert_eq!(
        (&b["guard_deflations"], &b["guard_released_mib"]),
        (&0.into(), &0.into())
    );
    assert!(b.get("last_guard_reason").is_none());
    for (mib, needle) in [(512, "below the guest's memory (512 MiB)"), (4096, "below")] {
        let e = error_of(ask(
            &vm,
            &format!(r#"{{"id":3,"request":{{"kind":"set_balloon_target","mib":{mib}}}}}"#),
        ));
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.contains(needle), "{e}");
    }

    let place = |device: &str, cpus: &str| {
        ask(
            &vm,
            &format!(
                r#"{{"id":4,"request":{{"kind":"set_worker_placement","device":"{device}","cpus":{cpus},"wait":"poll","spin_us":25}}}}"#
            ),
        )
    };
    let e = error_of(place("net9", "null"));
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = error_of(place("disk0", "[100000]"));
    assert_eq!(e.code, ErrorCode::InvalidRequest);
    assert!(e.message.contains("CPU 100000 is not available"), "{e}");
    let e = error_of(place("disk0", "[]"));
    assert_eq!(e.code, ErrorCode::InvalidRequest);
    let cpu = kiln_devices::virtio::worker::current_affinity().unwrap()[0];
    let Outcome::Result(w) = place("disk0", &format!("[{cpu}]")).outcome else {
        panic!()
    };
    let w: WorkerInfo = serde_json::from_value(w).unwrap();
    assert_eq!(
        (w.cpus, w.wait, w.spin_us),
        (Some(vec![cpu]), WaitKind::Poll, Some(25))
    );

    let e = error_of(ask(
        &vm,
        r#"{"id":5,"request":{"kind":"set_worker_placement","device":"disk0","wait":"notify","spin_us":5}}"#,
    ));
    assert!(e.message.contains("only for wait=poll"), "{e}");
}

#[test]
fn devices_without_a_worker_or_balloon_are_unsupported() {
    let mut config = VmConfig::new("/k");
    config.rng = Some(Default::default());
    let vm = Vm::without_vcpus(&config, DeviceHandles::default());
    let e = error_of(ask(&vm, r#"{"id":1,"request":{"kind":"balloon_stats"}}"#));
    assert_eq!(e.code, ErrorCode::Unsupported);
    let e = error_of(ask(
        &vm,
        r#"{"id":1,"request":{"kind":"set_worker_placement","device":"rng0","wait":"notify"}}"#,
    ));
    assert_eq!(e.code, ErrorCode::Unsupported);
    assert!(e.message.contains("no I/O worker"), "{e}");
}

#[test]
fn the_power_button_is_pressed_through_the_protocol() {
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let ged = kiln_devices::legacy::GenericEventDevice::new(0x1000, irq.try_clone().unwrap(), 1);
    let handles = DeviceHandles {
        power_button: Some(ged.control()),
        ..Default::default()
    };
    let vm = Vm::without_vcpus(&VmConfig::new("/k"), handles);
    let r = ask(&vm, r#"{"id":7,"request":{"kind":"power_button"}}"#);
    assert!(matches!(r.outcome, Outcome::Result(_)), "{r:?}");
    assert_eq!(
        irq.read().unwrap(),
        1,
        "the press reached the interrupt line"
    );

    let without = Vm::without_vcpus(&VmConfig::new("/k"), DeviceHandles::default());
    let e = error_of(ask(
        &without,
        r#"{"id":8,"request":{"kind":"power_button"}}"#,
    ));
    assert_eq!(e.code, ErrorCode::Unsupported);
}

#[test]
fn garbage_gets_an_error_under_the_readable_id() {
    let vm = vm();
    for (line, id) in [
        ("not json", None),
        (r#"{"id":9,"request":{"kind":"reboot_host"}}"#, Some(9)),
        (
            r#"{"id":9,"request":{"kind":"set_balloon_target"}}"#,
            Some(9),
        ),
        (
            r#"{"id":9,"request":{"kind":"set_balloon_target","mib":-1}}"#,
            Some(9),
        ),
        (r#"{"id":9,"request":{"kind":"status"},"extra":1}"#, Some(9)),
        (
            r#"{"id":9,"request":{"kind":"status","verbose":1}}"#,
            Some(9),
        ),
        (r#"{"id":"x","request":{"kind":"status"}}"#, None),
        ("[1,2,3]", None),
    ] {
        let r = ask(&vm, line);
        assert_eq!(r.id, id, "{line}");
        assert_eq!(error_of(r).code, ErrorCode::InvalidRequest, "{line}");
    }
}

fn socket_path(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-proto-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("ctl")
}

#[test]
fn client_and_server_talk_and_the_vm_outlives_bad_clients() {
    let path = socket_path("talk");
    let vm = vm();
    let server = ControlSocket::start(&path, vm.clone()).unwrap();
    assert!(
        ControlSocket::start(&path, vm.clone()).is_err(),
        "a live socket is not replaced"
    );
    let mut client = Client::connect(&path, Duration::from_secs(5)).unwrap();
    assert_eq!(client.hello().protocol, VERSION);
    assert_eq!(client.hello().pid, std::process::id());
    assert!(client
        .hello()
        .build_id
        .starts_with(env!("CARGO_PKG_VERSION")));
    assert_eq!(client.status().unwrap().state, RunState::Running);
    assert_eq!(client.set_balloon_target(32).unwrap().target_mib, 32);
    match client.set_balloon_target(100_000) {
        Err(ClientError::Vmm(e)) => assert_eq!(e.code, ErrorCode::InvalidRequest),
        other => panic!("{other:?}"),
    }
    assert_eq!(client.workers().unwrap().len(), 2);
    assert_eq!(client.counters().unwrap().devices.len(), 2);

    // Garbage, then a valid request on the same connection.
    let mut raw = UnixStream::connect(&path).unwrap();
    let mut lines = BufReader::new(raw.try_clone().unwrap());
    let mut line = String::new();
    lines.read_line(&mut line).unwrap();
    assert!(line.starts_with(r#"{"hello":{"protocol":1,"#), "{line}");
    raw.write_all(b"\x00\xffgarbage\n{\"id\":3,\"request\":{\"kind\":\"status\"}}\n")
        .unwrap();
    line.clear();
    lines.read_line(&mut line).unwrap();
    assert!(line.contains("invalid_request"), "{line}");
    line.clear();
    lines.read_line(&mut line).unwrap();
    assert!(line.starts_with(r#"{"id":3,"result":"#), "{line}");

    // An over-long line: an error, then the connection is closed.
    raw.write_all(&vec![b'x'; MAX_LINE + 10]).unwrap();
    line.clear();
    lines.read_line(&mut line).unwrap();
    assert!(line.contains("line_too_long"), "{line}");
    line.clear();
    assert_eq!(lines.read_line(&mut line).unwrap(), 0);

    // The first client still works.
    assert_eq!(client.status().unwrap().state, RunState::Running);
    drop(server);
    assert!(!path.exists());
}

#[test]
fn clients_beyond_the_limit_get_busy_and_are_closed() {
    let path = socket_path("bound");
    let _server = ControlSocket::start(&path, vm()).unwrap();
    let clients: Vec<Client> = (0..MAX_CLIENTS)
        .map(|_| Client::connect(&path, Duration::from_secs(5)).unwrap())
        .collect();
    match Client::connect(&path, Duration::from_secs(5)) {
        Err(ClientError::Vmm(e)) => assert_eq!(e.code, ErrorCode::Busy, "{e}"),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("client {} was accepted", MAX_CLIENTS + 1),
    }
    // A slot frees up when a client leaves.
    drop(clients);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match Client::connect(&path, Duration::from_secs(5)) {
            Ok(mut c) => {
                c.status().unwrap();
                break;
            }
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("no slot freed: {e}"),
        }
    }
}

#[test]
fn stop_request_ends_the_vm() {
    let vm = vm();
    let r = ask(&vm, r#"{"id":1,"request":{"kind":"stop"}}"#);
    assert!(matches!(r.outcome, Outcome::Result(_)));
    assert_eq!(vm.exit_reason(), Some(kiln_devices::ExitReason::Stopped));
    let e = error_of(ask(&vm, r#"{"id":2,"request":{"kind":"pause"}}"#));
    assert!(e.message.contains("stopping"), "{e}");
}

#[test]
fn balloon_info_with_and_without_the_guard_fields_parses() {
    // What a VMM from before the pressure guard sends.
    let old: BalloonInfo =
        serde_json::from_str(r#"{"target_mib":64,"actual_mib":60,"inflated_mib":60}"#).unwrap();
    assert_eq!((old.guard_deflations, old.guard_released_mib), (0, 0));
    assert_eq!(old.last_guard_reason, None);
    let new: BalloonInfo = serde_json::from_str(
        r#"{"target_mib":16,"actual_mib":20,"inflated_mib":20,"guard_deflations":3,"guard_released_mib":48,"last_guard_reason":"low_available"}"#,
    )
    .unwrap();
    assert_eq!((new.guard_deflations, new.guard_released_mib), (3, 48));
    assert_eq!(
        new.last_guard_reason,
        Some(kiln_devices::virtio::balloon::pressure::PressureReason::LowAvailable)
    );
    assert_eq!(
        serde_json::from_str::<BalloonInfo>(&serde_json::to_string(&new).unwrap()).unwrap(),
        new
    );
}
