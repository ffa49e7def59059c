//! End-to-end tests of `kiln run` with the default guest (Debian's cloud
//! kernel, busybox initramfs), on hardware KVM or in the nested KVM host.

use std::path::PathBuf;

use kiln_integration_tests::{run, Scenario};

/// Shell snippet: run kiln with `args`, output to `out`, print its exit code.
fn kiln(args: &str) -> String {
    format!("timeout 240 \"$KILN\" run {args} > out 2>&1; echo KILN_EXIT=$?; cat out\n")
}

#[test]
fn bzimage_boots_to_init_and_poweroff_exits_0() {
    let script = kiln(
        r#"--kernel "$GUEST_BZIMAGE" --initrd "$GUEST_INITRD" --memory 256M --cmdline "console=ttyS0 reboot=k panic=1 kiln.poweroff""#,
    );
    let out = run(&Scenario::new("bzimage_boot", &script)).unwrap();
    out.expect_exit(0)
        .expect_output("KILN_INIT_OK")
        .expect_output("KILN_CPUS=1");
    assert_eq!(
        out.value("KILN_EXIT").as_deref(),
        Some("0"),
        "poweroff must exit 0; log {}",
        out.log.display()
    );
}

#[test]
fn pvh_vmlinux_boots_to_init() {
    let script = kiln(
        r#"--kernel "$GUEST_VMLINUX" --initrd "$GUEST_INITRD" --memory 256M --cmdline "console=ttyS0 reboot=k panic=1 kiln.poweroff""#,
    );
    let out = run(&Scenario::new("pvh_boot", &script)).unwrap();
    out.expect_output("KILN_INIT_OK")
        .expect_output("KILN_CPUS=1");
    assert_eq!(
        out.value("KILN_EXIT").as_deref(),
        Some("0"),
        "log {}",
        out.log.display()
    );
}

/// Drives the guest's shell through kiln's stdin (a FIFO held open by the
/// script): two vCPUs, 512 MiB, a typed command and its answer.
#[test]
fn interactive_console_sees_2_cpus_and_512m() {
    let script = r#"
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
    let out = run(&Scenario::new("interactive_console", script)).unwrap();
    out.expect_output("ANSWER=42")
        .expect_output("siblings:2")
        .expect_output("cpucores:2");
    assert_eq!(
        out.value("KILN_CPUS").as_deref(),
        Some("2"),
        "log {}",
        out.log.display()
    );
    let mem_kib: u64 = out
        .value("KILN_MEM_KB")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        (440 << 10..=512 << 10).contains(&mem_kib),
        "guest with --memory 512M reports MemTotal {mem_kib} kB; log {}",
        out.log.display()
    );
    assert_eq!(out.value("KILN_EXIT").as_deref(), Some("0"));
}

/// Reboot exits 3, `--on-reboot restart` boots again, SIGTERM stops the VM
/// with 128+15.
#[test]
fn reboot_restart_and_sigterm() {
    let script = r#"
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
    let out = run(&Scenario::new("reboot_restart_sigterm", script)).unwrap();
    let log = out.log.display().to_string();
    assert_eq!(
        out.value("REBOOT_EXIT").as_deref(),
        Some("3"),
        "guest reboot must exit 3; log {log}"
    );
    assert_eq!(out.value("RESTART_EXIT").as_deref(), Some("0"), "log {log}");
    assert_eq!(
        out.value("BOOTS").as_deref(),
        Some("2"),
        "--on-reboot restart must boot twice; log {log}"
    );
    assert_eq!(
        out.value("SIGTERM_EXIT").as_deref(),
        Some("143"),
        "SIGTERM must stop the VM with 143; log {log}"
    );
}

/// Each bad input: non-zero exit, exactly one line on stderr, no panic,
/// no hang.
#[test]
fn bad_inputs_get_one_line_errors() {
    let cases = [
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
    let mut script = String::from(
        "head -c 3000000 \"$GUEST_BZIMAGE\" > trunc\nhead -c 1000000 /dev/urandom > random\nhead -c 80000000 /dev/urandom > bigrd\n",
    );
    for (name, args) in cases {
        script.push_str(&format!(
            "timeout 60 \"$KILN\" run {args} > /dev/null 2> err_{name}; echo {name}_EXIT=$?; echo {name}_LINES=$(wc -l < err_{name}); grep -c panicked err_{name} | sed 's/^/{name}_PANICS=/'; sed 's/^/{name}_MSG: /' err_{name}\n"
        ));
    }
    let out = run(&Scenario::new("bad_inputs", &script)).unwrap();
    for (name, _) in cases {
        let log = out.log.display();
        let code: i32 = out
            .value(&format!("{name}_EXIT"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1);
        assert!(
            code != 0 && code != 124,
            "{name}: exit {code} (124 = hung); output:\n{}\nlog {log}",
            out.output
        );
        assert_eq!(
            out.value(&format!("{name}_LINES")).as_deref(),
            Some("1"),
            "{name}: stderr must be one line:\n{}\nlog {log}",
            out.output
        );
        assert_eq!(
            out.value(&format!("{name}_PANICS")).as_deref(),
            Some("0"),
            "{name} panicked; log {log}"
        );
        let msg = format!("{name}_MSG: kiln: error:");
        assert!(
            out.output.contains(&msg),
            "{name}: message must start with 'kiln: error:'\n{}",
            out.output
        );
    }
}

/// The rig itself: Debian's QEMU, inside the nested host, boots the
/// default guest with KVM. Proves nested KVM and the guest independently
/// of Kiln.
#[test]
fn rig_selftest_qemu_boots_default_guest_in_nested_host() {
    let script = r#"
timeout 300 qemu-system-x86_64 -enable-kvm -M microvm -cpu host -m 256 -nodefaults -no-user-config -nographic -serial stdio \
  -kernel "$GUEST_BZIMAGE" -initrd "$GUEST_INITRD" -append "console=ttyS0 reboot=t panic=1 kiln.poweroff" -no-reboot > out 2>&1
echo QEMU_EXIT=$?; cat out
"#;
    let mut s = Scenario::new("rig_selftest_qemu", script);
    s.binaries
        .push(PathBuf::from("/usr/bin/qemu-system-x86_64"));
    s.files.push(PathBuf::from("/usr/share/qemu/qboot.rom"));
    s.files
        .push(PathBuf::from("/usr/share/qemu/bios-microvm.bin"));
    let out = run(&s).unwrap();
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
        "rig self-test: {:?} mode, nested host ready after {:?}, whole scenario {:?}",
        out.mode, out.host_ready, out.elapsed
    );
}
