//! Tests of the rig itself: what a scenario script sees, and that exit
//! codes, output, timeouts and stalls come back as they should. Scripts here
//! don't boot guests, so the direct path is tested on any host.

use std::time::Duration;

use kiln_integration_tests::{run, Mode, RigError, Scenario};

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
