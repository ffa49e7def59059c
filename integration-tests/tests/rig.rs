//! Tests of the rig itself: what a scenario script sees, and that exit
//! codes, output, timeouts and stalls come back as they should. Scripts here
//! don't boot guests, so the direct path is tested on any host.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use kiln_integration_tests::{run, start, Mode, RigError, Scenario};

/// Prints the environment contract and exits 7.
const ENV_SCRIPT: &str = r#"
echo "MODE=$KILN_RIG_MODE"
[ -x "$KILN" ] && echo KILN_OK
[ -s "$GUEST_BZIMAGE" ] && [ -s "$GUEST_VMLINUX" ] && [ -s "$GUEST_INITRD" ] && echo GUEST_OK
[ "$(pwd)" = "$WORKDIR" ] && touch "$WORKDIR/w" && echo WORKDIR_OK
echo to-stderr >&2
exit 7
"#;

fn check_env_outcome(mode: Mode, want: &str) {
    let mut s = Scenario::new(&format!("rig_env_{want}"), ENV_SCRIPT);
    s.force_mode = Some(mode);
    let out = run(&s).unwrap();
    assert_eq!(out.mode, mode);
    out.expect_exit(7)
        .expect_output("KILN_OK")
        .expect_output("GUEST_OK")
        .expect_output("WORKDIR_OK")
        .expect_output("to-stderr");
    assert_eq!(
        out.value("MODE").as_deref(),
        Some(want),
        "KILN_RIG_MODE; log {}",
        out.log.display()
    );
    assert!(
        out.log.is_file(),
        "the log {} must be kept",
        out.log.display()
    );
}

#[test]
fn nested_script_sees_the_environment_and_its_exit_code_comes_back() {
    check_env_outcome(Mode::Nested, "nested");
}

#[test]
fn direct_script_sees_the_environment_and_its_exit_code_comes_back() {
    check_env_outcome(Mode::Direct, "direct");
}

/// A nested host that prints nothing for `stall_after` is reported as
/// stalled: the rig never waits forever and never passes. Freezing the
/// nested host's heartbeat makes it silent, as a frozen kernel would be.
#[test]
fn silent_nested_host_is_reported_as_stalled() {
    let mut s = Scenario::new(
        "rig_stall",
        "kill -STOP $(cat /rig/heartbeat.pid)\nsleep 600; echo UNREACHABLE\n",
    );
    s.force_mode = Some(Mode::Nested);
    s.stall_after = Duration::from_secs(20);
    match run(&s) {
        Err(RigError::Stalled { silent_s, log }) => {
            assert_eq!(silent_s, 20);
            assert!(log.is_file(), "stall log {} must be kept", log.display());
        }
        other => panic!("a silent nested host must be reported as stalled, got {other:?}"),
    }
}

#[test]
fn direct_script_past_its_timeout_is_killed() {
    // The marker names this test's sleep, to check it was killed too.
    let mut s = Scenario::new("rig_timeout_direct", "sleep 601 & sleep 602\n");
    s.force_mode = Some(Mode::Direct);
    s.timeout = Duration::from_secs(2);
    let started = std::time::Instant::now();
    match run(&s) {
        Err(RigError::TimedOut { timeout_s: 2, .. }) => {}
        other => panic!("a script past its timeout must be an error, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the rig must not wait for the script"
    );
    std::thread::sleep(Duration::from_millis(200));
    let left = std::process::Command::new("pgrep")
        .args(["-f", "^sleep 60[12]$"])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "the script's children outlived the timeout: pids {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

/// A quiet script is not a stall while the nested host's heartbeat goes on;
/// the heartbeat stays out of the output, and a last line without its
/// newline is kept.
#[test]
fn quiet_script_is_not_a_stall_and_output_stays_clean() {
    let mut s = Scenario::new(
        "rig_quiet",
        "printf 'first '; sleep 25; printf 'half'; sleep 5; printf ' line\\nLAST=no-newline'\n",
    );
    s.force_mode = Some(Mode::Nested);
    s.stall_after = Duration::from_secs(20);
    let out = run(&s).unwrap();
    out.expect_exit(0);
    assert_eq!(
        out.output,
        "first half line\nLAST=no-newline\n",
        "log {}",
        out.log.display()
    );
    let log = std::fs::read_to_string(&out.log).unwrap();
    assert!(
        log.contains("KILN_RIG_ALIVE"),
        "the heartbeat must show in the console log {}",
        out.log.display()
    );
}

/// `Scenario::disks`: the script reads and writes `$RIG_DISK0` and
/// `$RIG_DISK1` (nested: virtio disks of the nested QEMU with
/// `snapshot=on`; direct: copies), and the host files stay as they were.
fn check_disks(mode: Mode, name: &str) {
    let dir = kiln_integration_tests::scenario::target_dir()
        .join("tmp")
        .join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    let mut data_a = b"DISK-A-MAGIC".to_vec();
    data_a.resize(1 << 20, 0);
    std::fs::write(&a, &data_a).expect("write a");
    std::fs::write(&b, vec![0xbbu8; 2 << 20]).expect("write b");
    let script = r#"
echo "DISK0_HEAD=$(head -c 12 "$RIG_DISK0")"
echo "DISK1_SIZE=$(( $(dd if="$RIG_DISK1" bs=65536 2>/dev/null | wc -c) ))"
printf 'OVERWRITTEN!' | dd of="$RIG_DISK0" conv=notrunc,fsync 2>/dev/null
echo "DISK0_AFTER=$(head -c 12 "$RIG_DISK0")"
"#;
    let mut s = Scenario::new(name, script);
    s.force_mode = Some(mode);
    s.disks = vec![a.clone(), b.clone()];
    let out = run(&s).unwrap();
    out.expect_exit(0);
    assert_eq!(
        out.value("DISK0_HEAD").as_deref(),
        Some("DISK-A-MAGIC"),
        "{}",
        out.output
    );
    assert_eq!(
        out.value("DISK1_SIZE").as_deref(),
        Some("2097152"),
        "{}",
        out.output
    );
    assert_eq!(
        out.value("DISK0_AFTER").as_deref(),
        Some("OVERWRITTEN!"),
        "the script can write its disks: {}",
        out.output
    );
    assert_eq!(
        std::fs::read(&a).expect("read a"),
        data_a,
        "the host file must not change"
    );
}

#[test]
fn nested_script_gets_disks_as_snapshot_virtio_disks() {
    check_disks(Mode::Nested, "rig_disks_nested");
}

#[test]
fn direct_script_gets_disks_as_copies() {
    check_disks(Mode::Direct, "rig_disks_direct");
}

/// Several checks in one host: each runs in its own work directory with
/// its own exit code and output, a failing one does not stop the next,
/// and `finish` fails the test naming every failed check.
#[test]
fn direct_checks_share_one_host_and_fail_separately() {
    let mut checks = kiln_integration_tests::Checks::new("rig_checks")
        .check("first", "echo A=1; touch here; exit 3")
        .check("second", "echo B=2; [ ! -e here ] && echo OWN_DIR=yes; [ \"$(pwd)\" = \"$WORKDIR\" ] && echo WORKDIR_OK");
    checks.scenario.force_mode = Some(Mode::Direct);
    let mut results = checks.run().unwrap();
    let first = results.get("first");
    assert_eq!(first.exit_code, 3);
    assert_eq!(first.value("A").as_deref(), Some("1"));
    assert_eq!(first.value("B"), None, "output is split per check");
    let second = results.get("second");
    assert_eq!(second.exit_code, 0);
    second
        .expect_output("OWN_DIR=yes")
        .expect_output("WORKDIR_OK");
    results
        .verify("first", |o| {
            o.expect_exit(0);
        })
        .verify("second", |o| {
            o.expect_exit(0);
        });
    let finished = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| results.finish()));
    let msg = finished
        .expect_err("a failed check must fail the test")
        .downcast::<String>()
        .map(|s| *s)
        .unwrap_or_default();
    assert!(msg.starts_with("1 of 2 checks failed"), "{msg}");
    assert!(msg.contains("check first:"), "{msg}");
}

/// `start` returns while the script runs: the test sees its output as it
/// comes, `wait_for_output` fails when the script ends without the marker,
/// and in direct mode a forwarded port is the port itself.
#[test]
fn direct_running_scenario_shows_output_before_it_ends() {
    let mut s = Scenario::new(
        "rig_running_direct",
        "echo READY\nsleep 3\necho LATER\nexit 3\n",
    );
    s.force_mode = Some(Mode::Direct);
    s.forward_ports = vec![8080];
    let running = start(&s).unwrap();
    assert_eq!(running.host_port(8080).unwrap(), 8080);
    assert!(running.host_port(8081).is_err());
    running
        .wait_for_output("READY", Duration::from_secs(30))
        .unwrap();
    assert!(
        !running.output().contains("LATER"),
        "READY must be seen while the script still runs"
    );
    match running.wait_for_output("NEVER-PRINTED", Duration::from_secs(60)) {
        Err(RigError::OutputNotSeen { reason, .. }) => {
            assert!(reason.contains("exited 3"), "{reason}")
        }
        other => panic!("a marker the script never prints must fail, got {other:?}"),
    }
    let out = running.finish().unwrap();
    out.expect_exit(3)
        .expect_output("READY")
        .expect_output("LATER");
}

/// One HTTP/1.0 request to 127.0.0.1:`port`; the whole response.
fn http_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: rig\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}

/// The way in: busybox httpd in the nested host answers on a forwarded
/// port of 127.0.0.1 here while the scenario runs; the nested host itself
/// reaches nothing outside (`restrict=on`), not even this host's loopback.
#[test]
fn nested_service_answers_on_a_forwarded_port() {
    let outside = TcpListener::bind("127.0.0.1:0").expect("listener");
    outside.set_nonblocking(true).expect("nonblocking");
    let outside_port = outside.local_addr().expect("addr").port();
    // The CGI ends the script: the test calls it when it is done.
    let script = format!(
        r#"
mkdir -p www/cgi-bin
echo KILN-RIG-WAY-IN-BODY > www/index.html
printf '#!/bin/sh\necho Content-Type: text/plain\necho\necho bye\ntouch /tmp/work/done\n' > www/cgi-bin/done
chmod +x www/cgi-bin/done
httpd -p 8080 -h "$WORKDIR/www" || exit 1
echo "ADDR=$(ip -4 addr show dev eth0 | awk '/inet / {{print $2}}')"
echo "REACH_OUT=$(nc -w 3 10.0.2.2 {outside_port} </dev/null >/dev/null 2>&1; echo $?)"
echo SERVING
n=0; while [ ! -e /tmp/work/done ]; do n=$((n+1)); [ $n -gt 3000 ] && exit 2; sleep 0.1; done
echo FINISHED
"#
    );
    let mut s = Scenario::new("rig_way_in", &script);
    s.force_mode = Some(Mode::Nested);
    s.forward_ports = vec![8080];
    s.timeout = Duration::from_secs(420);
    let running = start(&s).unwrap();
    let port = running.host_port(8080).unwrap();
    running
        .wait_for_output("SERVING", Duration::from_secs(300))
        .unwrap();
    let page = http_get(port, "/index.html");
    let stop = http_get(port, "/cgi-bin/done");
    let out = running.finish().unwrap();
    out.expect_exit(0).expect_output("FINISHED");
    assert!(
        page.starts_with("HTTP/1.") && page.contains(" 200 "),
        "status: {page:?}"
    );
    assert!(
        page.ends_with("\r\n\r\nKILN-RIG-WAY-IN-BODY\n"),
        "body: {page:?}"
    );
    assert!(stop.ends_with("bye\n"), "the CGI: {stop:?}");
    assert_eq!(
        out.value("ADDR").as_deref(),
        Some("10.0.2.15/24"),
        "{}",
        out.output
    );
    assert_ne!(
        out.value("REACH_OUT").as_deref(),
        Some("0"),
        "the nested host must not reach this host: {}",
        out.output
    );
    assert!(
        outside.accept().is_err(),
        "a connection from the nested host reached this host's loopback"
    );
}

/// The nested host's root is a tmpfs (so `pivot_root` works, here with
/// util-linux's `unshare` and `pivot_root`), cgroup v2 limits set in a
/// child group hold (pids.max stops the 5th fork, memory.max OOM-kills a
/// 128 MiB allocation, cpu.max is accepted), and `/dev/net/tun` and
/// `/dev/vhost-net` open.
#[test]
fn nested_host_has_a_real_root_cgroups_and_net_devices() {
    let script = r#"
echo "MOUNTS=$(awk '{print $2 ":" $3}' /proc/mounts | tr '\n' ' ')"
/usr/bin/unshare -m /bin/sh -c '
  b=/bin/busybox
  mkdir /tmp/pr && mount -t tmpfs pr /tmp/pr && mkdir /tmp/pr/old /tmp/pr/bin &&
  cp $b /tmp/pr/bin/ && echo in-the-new-root > /tmp/pr/marker && cd /tmp/pr &&
  /usr/sbin/pivot_root . old && echo "PIVOT=$($b cat /marker)" && $b umount -l /old &&
  echo "OLD_ENTRIES=$($b ls /old | $b wc -l)"'
echo "PIVOT_EXIT=$?"
echo "SUBTREE=$(cat /sys/fs/cgroup/cgroup.subtree_control)"
cg=/sys/fs/cgroup/rig-limits
mkdir $cg && echo 5 > $cg/pids.max && echo 32M > $cg/memory.max || exit 1
echo "50000 100000" > $cg/cpu.max && echo "CPU_MAX=$(cat $cg/cpu.max)"
echo 'echo $$ > "$1/cgroup.procs"' > forker.sh
echo 'n=0; while [ $n -lt 20 ]; do sleep 60 & n=$((n+1)); echo $n > "$2"; done' >> forker.sh
sh forker.sh $cg "$WORKDIR/forked" 2>/dev/null
echo "FORKED=$(cat forked)"
echo "PIDS_EVENTS=$(cat $cg/pids.events)"
kill $(cat $cg/cgroup.procs) 2>/dev/null
sleep 1
echo 20 > $cg/pids.max
sh -c "echo \$\$ > $cg/cgroup.procs; exec dd if=/dev/zero of=/dev/null bs=128M count=1" 2>/dev/null
echo "DD_EXIT=$?"
echo "OOM_KILLS=$(awk '$1 == "oom_kill" {print $2}' $cg/memory.events)"
( exec 3<>/dev/net/tun ) && echo TUN=open
( exec 3<>/dev/vhost-net ) && echo VHOST_NET=open
"#;
    let mut s = Scenario::new("rig_root_cgroups", script);
    s.force_mode = Some(Mode::Nested);
    s.binaries = vec!["/usr/bin/unshare".into(), "/usr/sbin/pivot_root".into()];
    s.timeout = Duration::from_secs(300);
    let out = run(&s).unwrap();
    out.expect_exit(0);
    let value = |k: &str| out.value(k).unwrap_or_default();
    let mounts = value("MOUNTS");
    for m in [
        "/:tmpfs",
        "/tmp:tmpfs",
        "/dev/pts:devpts",
        "/dev/shm:tmpfs",
        "/sys/fs/cgroup:cgroup2",
    ] {
        assert!(
            mounts.split(' ').any(|x| x == m),
            "{m} not mounted: {mounts}"
        );
    }
    assert_eq!(value("PIVOT"), "in-the-new-root", "{}", out.output);
    assert_eq!(value("OLD_ENTRIES"), "0", "{}", out.output);
    assert_eq!(value("PIVOT_EXIT"), "0", "{}", out.output);
    let subtree = value("SUBTREE");
    for c in ["cpu", "memory", "pids"] {
        assert!(
            subtree.split(' ').any(|x| x == c),
            "{c} not delegated: {subtree}"
        );
    }
    assert_eq!(value("CPU_MAX"), "50000 100000", "{}", out.output);
    assert_eq!(
        value("FORKED"),
        "4",
        "pids.max=5: the shell and 4 children; {}",
        out.output
    );
    assert_ne!(value("PIDS_EVENTS"), "max 0", "{}", out.output);
    assert_eq!(
        value("DD_EXIT"),
        "137",
        "killed by the OOM killer; {}",
        out.output
    );
    assert_eq!(value("OOM_KILLS"), "1", "{}", out.output);
    out.expect_output("TUN=open")
        .expect_output("VHOST_NET=open");
}
