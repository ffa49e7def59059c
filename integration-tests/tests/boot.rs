//! End-to-end tests of `kiln run` with the default guest (Debian's cloud
//! kernel, busybox initramfs), on hardware KVM or in the nested KVM host.

use kiln_integration_tests::{run, Checks, HostKvm, Mode, Outcome, PeerQemu, Scenario};

/// Shell snippet: run kiln with `args`, output to `out`, print its exit code.
fn kiln(args: &str) -> String {
    format!("timeout 240 \"$KILN\" run {args} > out 2>&1; echo KILN_EXIT=$?; cat out\n")
}

const BZIMAGE_POWEROFF: &str = r#"--kernel "$GUEST_BZIMAGE" --initrd "$GUEST_INITRD" --memory 256M --cmdline "console=ttyS0 reboot=k panic=1 kiln.poweroff""#;

/// Drives the guest's shell through kiln's stdin (a FIFO held open by the
/// script): two vCPUs, 512 MiB, a typed command and its answer.
const INTERACTIVE: &str = r#"
mkfifo in
"$KILN" run --kernel "$GUEST_BZIMAGE" --initrd "$GUEST_INITRD" --cpus 2 --memory 512M --cmdline "console=ttyS0 reboot=k panic=1 quiet" < in > out 2>&1 &
pid=$!
exec 3> in
wait_for() { i=0; while ! grep -q "$1" out; do i=$((i+1)); [ $i -gt 240 ] && return 1; sleep 1; done; }
wait_for KILN_SHELL_READY || echo "no shell prompt"
echo 'echo ANSWER=$((6*7)); grep -E "^(cpu cores|siblings)" /proc/cpuinfo | sort -u | tr -d "\t "' >&3
wait_for ANSWER=42 || echo "no answer"
echo 'poweroff -f' >&3
wait $pid; echo KILN_EXIT=$?
cat out
"#;

/// Reboot exits 3, `--on-reboot restart` boots again, SIGTERM stops the VM
/// with 128+15.
const REBOOT_RESTART_SIGTERM: &str = r#"
"$KILN" run --kernel "$GUEST_BZIMAGE" --initrd "$GUEST_INITRD" --memory 256M --cmdline "console=ttyS0 panic=1 quiet kiln.reboot" > r1 2>&1; echo REBOOT_EXIT=$?

mkfifo in
"$KILN" run --kernel "$GUEST_BZIMAGE" --initrd "$GUEST_INITRD" --memory 256M --cmdline "console=ttyS0 quiet" --on-reboot restart < in > r2 2>&1 &
pid=$!
exec 3> in
i=0; while ! grep -q KILN_SHELL_READY r2; do i=$((i+1)); [ $i -gt 240 ] && break; sleep 1; done
echo 'reboot -f' >&3
i=0; while [ "$(grep -c KILN_SHELL_READY r2)" -lt 2 ]; do i=$((i+1)); [ $i -gt 240 ] && break; sleep 1; done
echo 'poweroff -f' >&3
wait $pid; echo RESTART_EXIT=$?
echo BOOTS=$(grep -c KILN_INIT_OK r2)
exec 3>&-

"$KILN" run --kernel "$GUEST_BZIMAGE" --initrd "$GUEST_INITRD" --memory 256M --console file:$WORKDIR/r3 > /dev/null 2>&1 &
pid=$!
i=0; while ! grep -q KILN_SHELL_READY r3 2>/dev/null; do i=$((i+1)); [ $i -gt 240 ] && break; sleep 1; done
kill -TERM $pid; wait $pid; echo SIGTERM_EXIT=$?
cat r1 r2
"#;

/// `kiln-vmm` with a JSON spec, headless (serial console to a file), and
/// its control protocol through `kiln vmm-ctl` while the guest boots:
/// hello, status, pause (vCPU run time stops growing), resume (it grows
/// again), counters, a balloon target above guest memory (an error, the VM
/// keeps running); the guest then powers off by itself (`kiln.poweroff`).
const KILN_VMM_PROTOCOL: &str = r#"
[ -x "$KILN_VMM" ] || { echo "VMM_MISSING=$KILN_VMM (cargo build --release -p kiln-vmm)"; exit 1; }
cat > vm.json <<EOF
{"kernel": "$GUEST_BZIMAGE", "initrd": "$GUEST_INITRD", "memory_mib": 256,
 "cmdline": "console=ttyS0 reboot=k panic=1 kiln.poweroff",
 "serial": {"file": "$WORKDIR/vmm.out"}, "balloon": {}}
EOF
"$KILN_VMM" --config vm.json --control ctl.sock 2> vmm.err &
pid=$!
i=0; while [ ! -S ctl.sock ]; do i=$((i+1)); [ $i -gt 100 ] && break; sleep 0.1; done
ctl() { "$KILN" vmm-ctl --socket ctl.sock "$@" 2>&1; }
run_ns() { ctl counters | sed 's/.*"vcpus":\[{[^}]*"run_ns":\([0-9]*\).*/\1/'; }
echo "VMM_HELLO=$(ctl hello)"
echo "VMM_STATUS=$(ctl status)"
echo "VMM_PAUSE=$(ctl pause)"
p1=$(run_ns); sleep 2; p2=$(run_ns)
echo "VMM_PAUSED_RUN_NS=$p1 $p2"
echo "VMM_RESUME=$(ctl resume)"
sleep 2; r1=$(run_ns)
echo "VMM_RESUMED_RUN_NS=$r1"
echo "VMM_COUNTERS=$(ctl counters)"
echo "VMM_BALLOON_BIG=$(ctl set_balloon_target mib=4096)"
echo "VMM_BOGUS=$(ctl reboot_host)"
i=0; while kill -0 $pid 2>/dev/null; do i=$((i+1)); [ $i -gt 200 ] && { kill -9 $pid; break; }; sleep 1; done
wait $pid; echo VMM_EXIT=$?
echo VMM_INIT_OK=$(grep -c KILN_INIT_OK vmm.out)
sed 's/^/VMM_ERR: /' vmm.err
"#;

/// Each bad input: non-zero exit, exactly one line on stderr, no panic,
/// no hang.
const BAD_INPUTS: [(&str, &str); 6] = [
    ("missing_kernel", r#"--kernel /nonexistent/bzImage"#),
    ("truncated_kernel", r#"--kernel trunc"#),
    ("random_kernel", r#"--kernel random"#),
    (
        "initrd_too_big",
        r#"--kernel "$GUEST_BZIMAGE" --initrd bigrd --memory 64M"#,
    ),
    ("zero_cpus", r#"--kernel "$GUEST_BZIMAGE" --cpus 0"#),
    ("one_mib", r#"--kernel "$GUEST_BZIMAGE" --memory 1"#),
];

fn bad_inputs_script() -> String {
    let mut script = String::from(
        "head -c 3000000 \"$GUEST_BZIMAGE\" > trunc\nhead -c 1000000 /dev/urandom > random\nhead -c 80000000 /dev/urandom > bigrd\n",
    );
    for (name, args) in BAD_INPUTS {
        script.push_str(&format!(
            "timeout 60 \"$KILN\" run {args} > /dev/null 2> err_{name}; echo {name}_EXIT=$?; echo {name}_LINES=$(wc -l < err_{name}); grep -c panicked err_{name} | sed 's/^/{name}_PANICS=/'; sed 's/^/{name}_MSG: /' err_{name}\n"
        ));
    }
    script
}

fn expect_value(out: &Outcome, key: &str, want: &str, why: &str) {
    assert_eq!(
        out.value(key).as_deref(),
        Some(want),
        "{why}\n--- output ---\n{}\n--- log {}",
        out.output,
        out.log.display()
    );
}

/// `kiln run`'s boot paths and lifecycle, in one nested-host boot: bzImage
/// and PVH boots that power off with exit 0; 2 vCPUs and 512 MiB seen
/// through a typed shell session; reboot, restart and SIGTERM; six bad
/// inputs each with a one-line error; `kiln-vmm` and its control protocol.
#[test]
fn kiln_run_boots_lifecycle_and_bad_inputs() {
    let mut results = Checks::new("kiln_run_boot")
        .check("bzimage", &kiln(BZIMAGE_POWEROFF))
        .check(
            "pvh",
            &kiln(&BZIMAGE_POWEROFF.replace("$GUEST_BZIMAGE", "$GUEST_VMLINUX")),
        )
        .check("interactive", INTERACTIVE)
        .check("reboot_restart_sigterm", REBOOT_RESTART_SIGTERM)
        .check("bad_inputs", &bad_inputs_script())
        .check("kiln_vmm_protocol", KILN_VMM_PROTOCOL)
        .run()
        .unwrap();
    for kernel in ["bzimage", "pvh"] {
        results.verify(kernel, |out| {
            out.expect_exit(0)
                .expect_output("KILN_INIT_OK")
                .expect_output("KILN_CPUS=1");
            expect_value(out, "KILN_EXIT", "0", "poweroff must exit 0");
        });
    }
    results.verify("interactive", |out| {
        out.expect_output("ANSWER=42")
            .expect_output("siblings:2")
            .expect_output("cpucores:2");
        expect_value(out, "KILN_CPUS", "2", "--cpus 2");
        let mem_kib: u64 = out
            .value("KILN_MEM_KB")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(
            (440 << 10..=512 << 10).contains(&mem_kib),
            "guest with --memory 512M reports MemTotal {mem_kib} kB; log {}",
            out.log.display()
        );
        expect_value(out, "KILN_EXIT", "0", "poweroff must exit 0");
    });
    results.verify("reboot_restart_sigterm", |out| {
        expect_value(out, "REBOOT_EXIT", "3", "guest reboot must exit 3");
        expect_value(out, "RESTART_EXIT", "0", "poweroff after a restart exits 0");
        expect_value(out, "BOOTS", "2", "--on-reboot restart must boot twice");
        expect_value(
            out,
            "SIGTERM_EXIT",
            "143",
            "SIGTERM must stop the VM with 143",
        );
    });
    results.verify("bad_inputs", |out| {
        for (name, _) in BAD_INPUTS {
            let code: i32 = out
                .value(&format!("{name}_EXIT"))
                .and_then(|v| v.parse().ok())
                .unwrap_or(-1);
            assert!(
                code != 0 && code != 124,
                "{name}: exit {code} (124 = hung); output:\n{}",
                out.output
            );
            expect_value(
                out,
                &format!("{name}_LINES"),
                "1",
                &format!("{name}: stderr must be one line"),
            );
            expect_value(
                out,
                &format!("{name}_PANICS"),
                "0",
                &format!("{name} panicked"),
            );
            assert!(
                out.output.contains(&format!("{name}_MSG: kiln: error:")),
                "{name}: message must start with 'kiln: error:'\n{}",
                out.output
            );
        }
    });
    results.verify("kiln_vmm_protocol", verify_kiln_vmm_protocol);
    eprintln!(
        "kiln run checks: {:?} mode, nested host ready after {:?}, all checks {:?}",
        results.outcome.mode, results.outcome.host_ready, results.outcome.elapsed
    );
    results.finish();
}

fn verify_kiln_vmm_protocol(out: &Outcome) {
    let value = |key: &str| out.value(key).unwrap_or_default();
    let hello = value("VMM_HELLO");
    assert!(
        hello.contains(r#""build_id":"0.1.0"#) && hello.contains(r#""protocol":1"#),
        "hello: {hello:?}\n{}",
        out.output
    );
    let status = value("VMM_STATUS");
    assert!(
        status.contains(r#""state":"running""#) && status.contains(r#""id":"balloon0""#),
        "status: {status:?}\n{}",
        out.output
    );
    let pause = value("VMM_PAUSE");
    assert!(pause.contains(r#""state":"paused""#), "pause: {pause:?}");
    let paused: Vec<u64> = value("VMM_PAUSED_RUN_NS")
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    assert!(
        paused.len() == 2 && paused[0] > 0 && paused[0] == paused[1],
        "a paused vCPU must not run: run_ns {paused:?} 2 s apart\n{}",
        out.output
    );
    assert!(value("VMM_RESUME").contains(r#""state":"running""#));
    let resumed: u64 = value("VMM_RESUMED_RUN_NS").parse().unwrap_or(0);
    assert!(
        resumed > paused[1],
        "a resumed vCPU runs again: run_ns {} then {resumed}\n{}",
        paused[1],
        out.output
    );
    let counters = value("VMM_COUNTERS");
    assert!(
        counters.contains(r#""wait_ns":"#) && counters.contains(r#""id":"balloon0""#),
        "counters: {counters:?}"
    );
    let big = value("VMM_BALLOON_BIG");
    assert!(
        big.starts_with("kiln: error: invalid_request: balloon target 4096 MiB must be below the guest's memory (256 MiB)"),
        "balloon above memory: {big:?}"
    );
    let bogus = value("VMM_BOGUS");
    assert!(
        bogus.starts_with("kiln: error: invalid request"),
        "unknown kind: {bogus:?}"
    );
    expect_value(
        out,
        "VMM_EXIT",
        "0",
        "kiln-vmm exits 0 when the guest powers off",
    );
    expect_value(out, "VMM_INIT_OK", "1", "the guest booted (console file)");
}

/// The direct path with a real guest: on hardware KVM the rig runs Kiln on
/// this host, no nested host in between. These build machines have only an
/// emulating KVM, so it is ignored here; on a machine with VT-x/AMD-V run it
/// with `scripts/test-slow.sh hardware`.
#[test]
#[ignore = "needs hardware KVM (VT-x/AMD-V): boots a guest directly on the host; these build machines have only kvm_pvm"]
fn guest_boots_directly_on_hardware_kvm() {
    let host = HostKvm::detect();
    assert_eq!(
        host,
        HostKvm::Hardware,
        "not run: this test needs hardware KVM, and this host has {}",
        host.describe()
    );
    let out = run(&Scenario::new("hardware_kvm_boot", &kiln(BZIMAGE_POWEROFF))).unwrap();
    assert_eq!(
        out.mode,
        Mode::Direct,
        "hardware KVM must run guests directly"
    );
    out.expect_exit(0).expect_output("KILN_INIT_OK");
    expect_value(&out, "KILN_EXIT", "0", "poweroff must exit 0");
}

/// The rig itself: the pinned QEMU peer (Debian 12's 7.2, `peer.rs`),
/// inside the nested host, boots the default guest with KVM. Proves nested
/// KVM, the peer's libraries and firmware, and the guest independently of
/// Kiln.
#[test]
fn rig_selftest_qemu_boots_default_guest_in_nested_host() {
    let script = r#"
timeout 300 "$PEER_QEMU" -L "$PEER_QEMU_FIRMWARE" -enable-kvm -M microvm -cpu host -m 256 -nodefaults -no-user-config -nographic -serial stdio \
  -kernel "$GUEST_BZIMAGE" -initrd "$GUEST_INITRD" -append "console=ttyS0 reboot=t panic=1 kiln.poweroff" -no-reboot > out 2>&1
echo QEMU_EXIT=$?; cat out
"#;
    let mut s = Scenario::new("rig_selftest_qemu", script);
    let peer = PeerQemu::ensure_cached().unwrap();
    peer.add_to(&mut s);
    let out = run(&s).unwrap();
    let version = out.value("PEER_QEMU_VERSION").unwrap_or_default();
    assert!(
        version.contains("QEMU emulator version 7.2"),
        "the peer must be the pinned 7.2, it says {version:?}; log {}",
        out.log.display()
    );
    out.expect_exit(0)
        .expect_output("KILN_INIT_OK")
        .expect_output("KILN_CPUS=1")
        .expect_output("KILN_MEM_KB=");
    assert_eq!(
        out.value("QEMU_EXIT").as_deref(),
        Some("0"),
        "log {}",
        out.log.display()
    );
    eprintln!(
        "rig self-test: {:?} mode, peer {version}, nested host ready after {:?}, whole scenario {:?}",
        out.mode, out.host_ready, out.elapsed
    );
}
