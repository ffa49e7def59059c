//! The built guest images (`guests/images`: base, wincompat, clay) booted on
//! Kiln itself, on hardware KVM or in the nested KVM host: the root disk on
//! Kiln's virtio-blk, the agent reached through Kiln's vsock
//! (`kiln-agent call --to vsock-uds:$WORKDIR/v.sock:5252`).
//!
//! The images are built (or taken from the cache) with `kiln_images` first;
//! that needs root and mmdebstrap (`scripts/install-deps.sh`). Their root
//! disks are too large for the nested host's RAM, so the rig attaches them
//! as virtio disks of the nested QEMU (`Scenario::disks`, `snapshot=on`: the
//! cached image never changes) and Kiln gets `--disk path=$RIG_DISK0`.
//!
//! Default tier (part of `scripts/test.sh`): measured on 2 cores, base takes
//! ~1 min (image build 31 s warm / 56 s cold, 30 s in the rig), wincompat
//! ~2.5 min (85 / 94 s, 52 s), clay ~2.5 min (119 / 91 s, 33 s); table in
//! guests/images/README.md ("On Kiln, in the default tier").

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_images::{
    build_image, default_cache_dir, BuildOptions, ImageArtifacts, ImageKind, StderrProgress,
};
use kiln_integration_tests::scenario::target_dir;
use kiln_integration_tests::{run, Disk, HostKvm, Outcome, Scenario, VmSpec, Vmm};

/// The release binary `name` from the workspace (the test command builds
/// them: `cargo build --release -p kiln -p kiln-vmm -p kiln-agent [-p clay-shell]`).
fn release_binary(name: &str, package: &str) -> PathBuf {
    let path = target_dir().join("release").join(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --release -p {package}` first",
        path.display()
    );
    path
}

/// Builds `kind` (or reuses the cached build) with the workspace's agent.
/// Builds are serialised across test processes: they share the .deb cache.
fn image(kind: ImageKind) -> ImageArtifacts {
    // SAFETY: geteuid cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "building guest images needs root (mmdebstrap, chroot, file owners)"
    );
    let cache = default_cache_dir();
    let _lock = kiln_guests::lock::FileLock::acquire(&cache.join("images/build.lock"))
        .expect("image build lock");
    let mut opts = BuildOptions::new(cache, release_binary("kiln-agent", "kiln-agent"));
    if kind == ImageKind::Clay {
        opts.clay_shell_binary = Some(release_binary("clay-shell", "clay-shell"));
    }
    let started = Instant::now();
    let a = build_image(kind, &opts, &StderrProgress::new(false))
        .unwrap_or_else(|e| panic!("building the {kind} image: {e}"));
    eprint!("{}", a.summary());
    eprintln!(
        "{kind} image ready in {:?} ({})",
        started.elapsed(),
        if a.cached { "cached" } else { "built" }
    );
    a
}

/// What a test checks in the booted guest, as host-side shell (the agent
/// is up when it runs; `$AGENT` is `kiln-agent call --to vsock-uds:...`).
struct Boot<'a> {
    name: &'a str,
    image: &'a ImageArtifacts,
    memory_mib: u32,
    nested_memory_mib: u32,
    /// Seconds from Kiln's start until the agent must answer.
    agent_deadline_s: u32,
    checks: String,
    /// Appended to the image's kernel command line.
    cmdline_extra: &'a str,
    files: Vec<PathBuf>,
    timeout: Duration,
}

/// Shell: poll the agent with `ping` until it answers (or the VM dies, or
/// the deadline passes), then print `info`.
const WAIT_FOR_AGENT: &str = r#"
t0=$(date +%s)
until $AGENT --timeout 20 ping > ping.out 2>&1; do
  kill -0 $vm 2>/dev/null || bail "kiln exited before the agent answered: $(cat ping.out)"
  [ $(( $(date +%s) - t0 )) -gt "$AGENT_DEADLINE" ] && bail "the agent did not answer within $AGENT_DEADLINE s: $(cat ping.out)"
  sleep 3
done
echo "AGENT_UP_S=$(( $(date +%s) - t0 ))"
$AGENT info > info.json; echo "INFO_EXIT=$?"
sed 's/^/INFO: /' info.json
"#;

/// Shell: power off through the agent and wait for Kiln to exit.
const SHUT_DOWN: &str = r#"
$AGENT shutdown; echo "SHUTDOWN_CALL=$?"
vm_wait $vm 300; echo "VM_EXIT=$?"
exec 3>&-
sed 's/^/CONSOLE: /' "$VM_OUT" | tail -n 60; sed 's/^/VMM_ERR: /' "$VM_ERR"
"#;

fn boot_on_kiln(b: Boot) -> Outcome {
    let agent = release_binary("kiln-agent", "kiln-agent");
    let mut spec = VmSpec::new(&b.image.initramfs.to_string_lossy());
    spec.kernel = b.image.kernel.to_string_lossy().into_owned();
    spec.memory_mib = b.memory_mib;
    spec.cmdline_extra = format!("{} {}", b.image.cmdline, b.cmdline_extra)
        .trim()
        .to_string();
    spec.disks = vec![Disk {
        path: "$RIG_DISK0".into(),
        readonly: false,
        serial: "root".into(),
    }];
    spec.vsock_uds = Some("$WORKDIR/v.sock".into());
    let script = format!(
        "{}\nAGENT=\"{} call --to vsock-uds:$WORKDIR/v.sock:5252\"\nAGENT_DEADLINE={}\n{}\n{WAIT_FOR_AGENT}\n{}\n{SHUT_DOWN}",
        spec.host_prelude(Vmm::Kiln),
        agent.display(),
        b.agent_deadline_s,
        spec.start(Vmm::Kiln, "$WORKDIR/g"),
        b.checks
    );
    let mut s = Scenario::new(b.name, &script);
    s.timeout = b.timeout;
    s.nested_memory_mib = b.nested_memory_mib;
    s.binaries.push(agent);
    s.files.push(b.image.kernel.clone());
    s.files.push(b.image.initramfs.clone());
    s.files.extend(b.files);
    s.disks.push(b.image.rootfs.clone());
    let started = Instant::now();
    let out = run(&s).unwrap();
    eprintln!(
        "{}: {:?} in the rig (nested host up after {:?}), agent answered {} s after kiln started",
        b.name,
        started.elapsed(),
        out.host_ready,
        out.value("AGENT_UP_S").unwrap_or_else(|| "?".into())
    );
    out
}

fn expect_value(out: &Outcome, key: &str, want: &str) {
    assert_eq!(
        out.value(key).as_deref(),
        Some(want),
        "{key}\n--- output ---\n{}\n--- log {}",
        out.output,
        out.log.display()
    );
}

/// The common checks: the agent's `info` describes the image's Debian and
/// kernel, and `shutdown` through the agent powers the guest off (Kiln exits 0).
fn expect_booted_and_powered_off(out: &Outcome, image: &ImageArtifacts) {
    out.expect_exit(0);
    expect_value(out, "INFO_EXIT", "0");
    out.expect_output("\"os_name\": \"Debian GNU/Linux 12 (bookworm)\"");
    out.expect_output(&format!("\"kernel_release\": \"{}\"", image.kernel_version));
    expect_value(out, "SHUTDOWN_CALL", "0");
    expect_value(out, "VM_EXIT", "0");
}

/// base on Kiln: boot from the ext4 root disk on virtio-blk, the agent
/// answers through Kiln's vsock, an `exec` round trip (stdout, exit code,
/// the root device), then power-off through the agent.
#[test]
fn base_image_boots_on_kiln_and_its_agent_answers_over_vsock() {
    let image = image(ImageKind::Base);
    let checks = r#"
$AGENT exec -- sh -c 'echo "EXEC_ANSWER=$((6*7))"; echo "EXEC_ROOT=$(awk "\$2 == \"/\" {print \$1}" /proc/mounts)"; echo "EXEC_HOSTNAME=$(hostname)"; exit 3'
echo "EXEC_EXIT=$?"
"#;
    let out = boot_on_kiln(Boot {
        name: "image_base_on_kiln",
        image: &image,
        memory_mib: 1024,
        nested_memory_mib: 3072,
        agent_deadline_s: 600,
        checks: checks.into(),
        cmdline_extra: "",
        files: Vec::new(),
        timeout: Duration::from_secs(1200),
    });
    expect_booted_and_powered_off(&out, &image);
    expect_value(&out, "EXEC_ANSWER", "42");
    expect_value(&out, "EXEC_ROOT", "/dev/vda");
    expect_value(&out, "EXEC_HOSTNAME", "kiln-base");
    expect_value(&out, "EXEC_EXIT", "3");
}

/// The Windows test programs, built with mingw by their build script.
fn windows_test_programs() -> PathBuf {
    let dir = target_dir()
        .join("tmp")
        .join("images-on-kiln-windows-tests");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guests/windows-tests/build.sh");
    let st = Command::new(&script)
        .arg(&dir)
        .status()
        .expect("run guests/windows-tests/build.sh");
    assert!(
        st.success(),
        "building the Windows test programs failed (needs gcc-mingw-w64-x86-64)"
    );
    dir
}

/// Under the nested rig the guest's user code runs in QEMU's TCG, whose
/// IRETQ at CPL 3 reads the stack as a supervisor access: with SMAP on,
/// Wine's context restore (`iretq` in user mode) faults and the guest
/// kernel kills the program (Oops "supervisor read access in user mode").
/// Real CPUs do not do that, so only the nested rig boots without SMAP
/// (`clearcpuid=smap`; the 6.1 kernel no longer has `nosmap`).
fn wine_cmdline_workaround() -> &'static str {
    match HostKvm::detect() {
        HostKvm::Hardware => "",
        HostKvm::Emulating | HostKvm::None => "clearcpuid=smap",
    }
}

/// wincompat on Kiln: the agent answers through Kiln's vsock, the console
/// test program is uploaded with `put` and run under Wine with
/// `run-windows-app`: its output and exit code 7 come back.
#[test]
fn wincompat_image_runs_the_console_program_on_kiln() {
    let image = image(ImageKind::Wincompat);
    let exe = windows_test_programs().join("kiln-console-test.exe");
    let checks = format!(
        r#"
$AGENT put "{exe}" /opt/windows-apps/kiln-console-test.exe --mode 755; echo "PUT_EXIT=$?"
w0=$(date +%s)
$AGENT --timeout 900 run-windows-app -- /opt/windows-apps/kiln-console-test.exe hello "two words" --exit 7 > wout 2> werr
win_exit=$?
echo "WIN_EXIT=$win_exit"
echo "WIN_RUN_S=$(( $(date +%s) - w0 ))"
tr -d '\r' < wout | sed 's/^/WIN_OUT: /'; tr -d '\r' < werr | sed 's/^/WIN_ERR: /'
if [ "$win_exit" != 7 ]; then
  $AGENT exec -- sh -c 'dmesg | tail -n 40; free -m' 2>&1 | sed 's/^/GUEST_DIAG: /'
  $AGENT --timeout 900 exec -- sh -c 'cd /opt/windows-apps && WINEPREFIX=/var/lib/kiln/wine WINEDEBUG=+process,+module,+loaddll wine kiln-console-test.exe a > /tmp/w.log 2>&1; echo "rc=$?"; tail -n 80 /tmp/w.log; grep -m1 flags /proc/cpuinfo; dmesg | tail -n 20' 2>&1 | sed 's/^/GUEST_WINE: /'
fi
"#,
        exe = exe.display()
    );
    let out = boot_on_kiln(Boot {
        name: "image_wincompat_on_kiln",
        image: &image,
        memory_mib: 2048,
        nested_memory_mib: 4096,
        agent_deadline_s: 900,
        checks,
        cmdline_extra: wine_cmdline_workaround(),
        files: vec![exe],
        timeout: Duration::from_secs(2400),
    });
    expect_booted_and_powered_off(&out, &image);
    out.expect_output("\"run_windows_app\"");
    expect_value(&out, "PUT_EXIT", "0");
    for line in [
        "WIN_OUT: Hello from the Kiln console test\n",
        "WIN_OUT: arg 1: hello\n",
        "WIN_OUT: arg 2: two words\n",
        "WIN_OUT: windows version: ",
    ] {
        out.expect_output(line);
    }
    out.expect_output("exiting with 7");
    expect_value(&out, "WIN_EXIT", "7");
    eprintln!(
        "console program under Wine on Kiln: {} s",
        out.value("WIN_RUN_S").unwrap_or_default()
    );
}

/// clay on Kiln: boots, the agent answers through Kiln's vsock. The
/// display is NOT checked: Kiln has no virtio-gpu device yet, so sway has
/// no screen here (the QEMU slow-tier test in guests/images checks it).
#[test]
fn clay_image_boots_on_kiln_and_its_agent_answers_display_not_checked() {
    let image = image(ImageKind::Clay);
    let checks = r#"
echo "DISPLAY_NOT_CHECKED=Kiln has no virtio-gpu device yet; the Clay desktop's display is checked only under QEMU"
$AGENT exec -- sh -c 'echo "GPU_DEVICES=$(ls /sys/class/drm 2>/dev/null | grep -c card)"'
"#;
    let out = boot_on_kiln(Boot {
        name: "image_clay_on_kiln",
        image: &image,
        memory_mib: 2048,
        nested_memory_mib: 4096,
        agent_deadline_s: 1200,
        checks: checks.into(),
        cmdline_extra: "",
        files: Vec::new(),
        timeout: Duration::from_secs(2400),
    });
    expect_booted_and_powered_off(&out, &image);
    expect_value(&out, "GPU_DEVICES", "0");
    eprintln!("clay on Kiln: booted and the agent answered; the display was NOT checked (Kiln has no virtio-gpu device)");
}
