//! The built guest images (`guests/images`: base, wincompat, clay) booted on
//! Kiln itself, on hardware KVM or in the nested KVM host: the root disk on
//! Kiln's virtio-blk, the agent reached through Kiln's vsock
//! (`kiln-agent call --to vsock-uds:$WORKDIR/v.sock:5252`, or through the
//! daemon's `exec`/`apps/run` for wincompat).
//!
//! The images are built (or taken from the cache) with `kiln_images` first;
//! that needs root and mmdebstrap (`scripts/install-deps.sh`). Their root
//! disks are too large for the nested host's RAM, so the rig attaches them
//! as virtio disks of the nested QEMU (`Scenario::disks`, `snapshot=on`: the
//! cached image never changes) and Kiln gets `--disk path=$RIG_DISK0`.
//!
//! Default tier (part of `scripts/test.sh`): measured on 2 cores, base takes
//! ~1 min (image build 31 s warm / 56 s cold, 30 s in the rig), wincompat
//! through the daemon ~1 min with the image cached (67 s in the rig: agent
//! up 28 s after the create, apps/run 22 s; 431 s at load 6, after a 130 s
//! build), clay ~2.5 min (119 / 91 s,
//! 33 s); table in guests/images/README.md ("On Kiln, in the default
//! tier"). The wincompat test runs `kiln serve` in the nested host and
//! drives the guest through the REST API (curl) and the CLI.

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

/// Shell run in the nested host: `kiln serve` there, the wincompat VM
/// created through the REST API (curl) with an agent section, and, once its
/// agent answers, `exec` of `uname -a` (`kiln vm exec`), the console test
/// program through `POST apps/run` (curl, buffered) and `kiln app run`
/// (streamed), then a stop through the API.
const THROUGH_THE_DAEMON: &str = r#"
SOCK=$WORKDIR/kiln.sock
"$KILN" serve --socket "$SOCK" --state-dir "$WORKDIR/state" --run-dir "$WORKDIR/run" --vmm-binary "$KILN_VMM" > "$WORKDIR/serve.log" 2>&1 &
daemon=$!
show_logs() { sed 's/^/SERVE: /' "$WORKDIR/serve.log"; tail -n 80 "$WORKDIR/run/vms/win/console.log" 2>/dev/null | sed 's/^/CONSOLE: /'; sed 's/^/VMM_ERR: /' "$WORKDIR/run/vms/win/vmm.log" 2>/dev/null; }
fail() { echo "HOST_BAIL=$1"; show_logs; kill "$daemon"; exit 1; }
n=0; until [ -S "$SOCK" ]; do n=$((n+1)); [ $n -gt 300 ] && fail "the daemon's socket did not appear"; sleep 0.1; done
export KILN_SOCKET="$SOCK"
api() { curl --unix-socket "$SOCK" -sS "$@"; }
sed -i "s|@DISK@|$RIG_DISK0|" spec.json
api -o created.json -w 'CREATE_HTTP=%{http_code}\n' -X POST -H 'content-type: application/json' --data-binary @spec.json 'http://localhost/v1/vms?start=true'
echo "CREATED_JSON=$(tr -d '\n' < created.json)"
t0=$(date +%s); first=""
until "$KILN" vm exec win --timeout 20 -- true > probe.out 2>&1; do
  [ -z "$first" ] && first=$(tr -d '\n' < probe.out)
  "$KILN" vm show win > show.out 2>&1 || true
  grep -q "state *running\|state *starting" show.out || fail "the VM is not running: $(cat show.out)"
  [ $(( $(date +%s) - t0 )) -gt "$AGENT_DEADLINE" ] && fail "the agent did not answer within $AGENT_DEADLINE s: $(cat probe.out)"
  sleep 3
done
echo "AGENT_UP_S=$(( $(date +%s) - t0 ))"
echo "FIRST_REFUSAL=$first"
"$KILN" vm exec win -- uname -a > uname.out 2> uname.err; echo "UNAME_EXIT=$?"
echo "UNAME=$(cat uname.out)"; sed 's/^/UNAME_ERR: /' uname.err
w0=$(date +%s)
api -o run.json -w 'RUN_HTTP=%{http_code}\n' -X POST -H 'content-type: application/octet-stream' --data-binary @"$EXE" 'http://localhost/v1/vms/win/apps/run?name=kiln-console-test.exe&arg=hello&arg=two%20words&arg=--exit&arg=7&timeout_s=900'
echo "RUN_JSON=$(tr -d '\n' < run.json)"
echo "RUN_S=$(( $(date +%s) - w0 ))"
w0=$(date +%s)
"$KILN" app run win "$EXE" --timeout 900 hello "two words" --exit 7 > app.out 2> app.err; echo "APP_EXIT=$?"
echo "APP_S=$(( $(date +%s) - w0 ))"
tr -d '\r' < app.out | sed 's/^/APP_OUT: /'; sed 's/^/APP_ERR: /' app.err
api -o stop.json -w 'STOP_HTTP=%{http_code}\n' -X POST http://localhost/v1/vms/win/stop
echo "STOP_JSON=$(tr -d '\n' < stop.json)"
"$KILN" vm exec win -- true > after.out 2>&1; echo "AFTER_STOP_EXIT=$?"; sed 's/^/AFTER_STOP: /' after.out
kill "$daemon"; wait "$daemon"
sed 's/^/SERVE: /' "$WORKDIR/serve.log" | tail -n 20
"#;

/// The JSON value after `KEY=` in the output.
fn json_value(out: &Outcome, key: &str) -> serde_json::Value {
    let text = out.value(key).unwrap_or_else(|| {
        panic!(
            "no {key}= line\n--- output ---\n{}\n--- log {}",
            out.output,
            out.log.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{key}: {e}: {text}"))
}

/// wincompat on Kiln, through `kiln serve` in the nested host: the VM is
/// created with an agent section through the REST API, `kiln vm exec`
/// runs `uname -a` in it, and the mingw console test program runs under
/// Wine through `POST /v1/vms/{id}/apps/run` (curl) and `kiln app run`:
/// its output and exit code 7 come back both ways; then the VM is stopped
/// through the API and exec on it is refused.
#[test]
fn wincompat_image_runs_the_console_program_through_the_daemon_api() {
    let image = image(ImageKind::Wincompat);
    let exe = windows_test_programs().join("kiln-console-test.exe");
    let spec = serde_json::json!({
        "name": "win",
        "machine": {
            "kernel": image.kernel,
            "initrd": image.initramfs,
            "cmdline": format!("console=ttyS0 reboot=k panic=1 {} {}", image.cmdline, wine_cmdline_workaround()).trim(),
            "memory_mib": 2048,
            "disks": [{"path": "@DISK@", "serial": "root"}]
        },
        "agent": {}
    });
    let script = format!(
        "cat > spec.json <<'SPEC'\n{spec}\nSPEC\nEXE=\"{}\"\nAGENT_DEADLINE=900\n{THROUGH_THE_DAEMON}",
        exe.display()
    );
    let mut s = Scenario::new("image_wincompat_through_the_daemon", &script);
    s.timeout = Duration::from_secs(2400);
    s.nested_memory_mib = 4096;
    s.binaries.push(PathBuf::from("/usr/bin/curl"));
    s.files.push(image.kernel.clone());
    s.files.push(image.initramfs.clone());
    s.files.push(exe);
    s.disks.push(image.rootfs.clone());
    let started = Instant::now();
    let out = run(&s).unwrap();
    eprintln!(
        "wincompat through the daemon: {:?} in the rig (nested host up after {:?}), agent answered {} s after the create, apps/run {} s, kiln app run {} s",
        started.elapsed(),
        out.host_ready,
        out.value("AGENT_UP_S").unwrap_or_else(|| "?".into()),
        out.value("RUN_S").unwrap_or_default(),
        out.value("APP_S").unwrap_or_default(),
    );
    out.expect_exit(0);
    expect_value(&out, "CREATE_HTTP", "201");
    let created = json_value(&out, "CREATED_JSON");
    assert_eq!(created["spec"]["agent"]["port"], 5252, "{created}");
    // exec of uname -a: the image's kernel.
    expect_value(&out, "UNAME_EXIT", "0");
    let uname = out.value("UNAME").unwrap_or_default();
    assert!(
        uname.starts_with("Linux ")
            && uname.contains(&image.kernel_version)
            && uname.contains("x86_64"),
        "uname -a: {uname:?}\n{}",
        out.output
    );
    // apps/run through curl: buffered JSON.
    expect_value(&out, "RUN_HTTP", "200");
    let run_json = json_value(&out, "RUN_JSON");
    assert_eq!(run_json["exit_code"], 7, "{run_json}");
    assert_eq!(run_json["timed_out"], false, "{run_json}");
    let stdout = run_json["stdout"]
        .as_str()
        .unwrap_or_default()
        .replace('\r', "");
    for line in [
        "Hello from the Kiln console test\n",
        "arg 1: hello\n",
        "arg 2: two words\n",
        "windows version: ",
    ] {
        assert!(stdout.contains(line), "{line:?} not in {stdout:?}");
    }
    assert!(
        format!(
            "{stdout}{}",
            run_json["stderr"].as_str().unwrap_or_default()
        )
        .contains("exiting with 7"),
        "{run_json}"
    );
    // kiln app run: streamed, the program's exit code is the CLI's.
    expect_value(&out, "APP_EXIT", "7");
    for line in [
        "APP_OUT: Hello from the Kiln console test\n",
        "APP_OUT: arg 1: hello\n",
        "APP_OUT: arg 2: two words\n",
    ] {
        out.expect_output(line);
    }
    out.expect_output("exiting with 7");
    // Stopped through the API; exec on a stopped VM is refused.
    expect_value(&out, "STOP_HTTP", "200");
    assert_eq!(json_value(&out, "STOP_JSON")["state"], "shutoff");
    assert_ne!(out.value("AFTER_STOP_EXIT").as_deref(), Some("0"));
    out.expect_output("AFTER_STOP: kiln: error: VM \"win\" is shutoff");
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
