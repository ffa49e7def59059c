//! Image builds end to end. The builds themselves are the slow tier
//! (`#[ignore]`, run with `cargo nextest run -p kiln-images --run-ignored
//! ignored-only`): they download Debian packages and take minutes (see
//! README). The fetch-failure check is quick and runs by default.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kiln_agent::protocol::WindowsAppRequest;
use kiln_agent::{AgentClient, ConnectAddr, WindowsAppOutcome};
use kiln_images::{build_image, BuildOptions, ImageError, ImageKind, NoProgress};

#[test]
fn unreachable_mirror_is_a_clear_package_fetch_error() {
    require_root_and_tools(&["mmdebstrap"]);
    let cache = tempfile::tempdir().expect("tempdir");
    let agent = cache.path().join("agent");
    std::fs::write(&agent, b"#!/bin/sh\n").expect("write");
    let mut opts = BuildOptions::new(cache.path().to_path_buf(), agent);
    // Port 9 (discard) on loopback: nothing listens, apt gets "connection refused".
    opts.mirror = "http://127.0.0.1:9/debian".into();
    match build_image(ImageKind::Base, &opts, &NoProgress) {
        Err(ImageError::PackageFetch { details }) => {
            assert!(
                details.iter().any(|d| d.contains("127.0.0.1:9")),
                "{details:?}"
            );
        }
        other => panic!("expected a package fetch error, got {other:?}"),
    }
    // Nothing half-built is left in the cache.
    let kind_dir = cache.path().join("images/base");
    let left: Vec<_> = std::fs::read_dir(&kind_dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

/// systemd colours unit names on the console; the boot markers must match
/// the text without its escape sequences.
#[test]
fn console_text_loses_terminal_colours() {
    let raw = "[\u{1b}[0;32m  OK  \u{1b}[0m] Started \u{1b}[0;1;39mkiln-agent.service\u{1b}[0m - Kiln guest agent.";
    assert_eq!(
        strip_ansi(raw),
        "[  OK  ] Started kiln-agent.service - Kiln guest agent."
    );
    assert_eq!(strip_ansi("plain \u{1b}[Kline"), "plain line");
}

#[test]
#[ignore = "slow tier: builds the base image twice from Debian packages (~1-2 min) and boots it in QEMU TCG (~1-2 min)"]
fn base_image_is_reproducible_and_boots_to_the_agent() {
    require_root_and_tools(&["mmdebstrap", "mkfs.ext4", "qemu-system-x86_64", "cpio"]);
    let first = build(ImageKind::Base, false);
    let second = build(ImageKind::Base, true);
    assert!(!second.cached);
    assert_eq!(
        first.manifest_sha256,
        second.manifest_sha256,
        "root content differs between two builds: diff {} {}",
        first.manifest.display(),
        second.manifest.display()
    );
    assert_eq!(sha256_file(&first.kernel), sha256_file(&second.kernel));
    assert_eq!(
        sha256_file(&first.initramfs),
        sha256_file(&second.initramfs),
        "initramfs is not byte-reproducible"
    );
    let third = build(ImageKind::Base, false);
    assert!(
        third.cached,
        "an unchanged rebuild must come from the cache"
    );

    // The initramfs holds busybox, /init and the virtio modules.
    let out = Command::new("cpio")
        .args(["-t", "--quiet", "-F"])
        .arg(&second.initramfs)
        .output()
        .expect("cpio -t");
    let listing = String::from_utf8_lossy(&out.stdout);
    for needed in ["init", "bin/busybox", "virtio_pci.ko", "virtio_blk.ko"] {
        assert!(
            listing.contains(needed),
            "initramfs lacks {needed}:\n{listing}"
        );
    }

    let mut vm = Qemu::boot(&second, 1024, false);
    vm.wait_for(
        &[
            "kiln-initramfs: switching to /dev/vda",
            "Started kiln-agent.service",
            "kiln-base login:",
        ],
        Duration::from_secs(600),
    );
}

/// Runs the image's own agent inside an `unshare` chroot of the built
/// wincompat tree (an overlay, so the cached tree is not changed) and drives
/// it over a Unix socket: upload the Windows test programs, run them under
/// Wine, check their output and exit codes.
#[test]
#[ignore = "slow tier: builds the wincompat image from Debian packages (~2-5 min, ~2.3 GB)"]
fn wincompat_runs_windows_programs_under_wine_in_a_chroot() {
    require_root_and_tools(&[
        "mmdebstrap",
        "mkfs.ext4",
        "unshare",
        "x86_64-w64-mingw32-gcc",
    ]);
    let image = build(ImageKind::Wincompat, false);
    let work = tempfile::tempdir().expect("tempdir");
    let exes = work.path().join("exes");
    let st = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../windows-tests/build.sh"))
        .arg(&exes)
        .status()
        .expect("build windows tests");
    assert!(st.success(), "building the Windows test programs failed");

    let share = work.path().join("share");
    std::fs::create_dir_all(&share).expect("mkdir");
    let _agent = ChrootAgent::start(&image.root_tree, work.path(), &share);
    let sock = share.join("agent.sock");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "the agent in the chroot never opened its socket"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut c = AgentClient::connect(&ConnectAddr::Unix(sock), Some(Duration::from_secs(300)))
        .expect("connect");
    let info = c.info().expect("info");
    assert_eq!(
        info.os_name.as_deref(),
        Some("Debian GNU/Linux 12 (bookworm)")
    );
    assert!(
        info.capabilities.iter().any(|c| c == "run_windows_app"),
        "{info:?}"
    );

    c.put_file(
        &exes.join("kiln-console-test.exe"),
        "/opt/windows-apps/kiln-console-test.exe",
        0o755,
    )
    .expect("upload console exe");
    let req = WindowsAppRequest {
        path: "/opt/windows-apps/kiln-console-test.exe".into(),
        args: vec![
            "hello".into(),
            "two words".into(),
            "--exit".into(),
            "7".into(),
        ],
        gui: false,
        timeout_ms: Some(120_000),
    };
    let started = Instant::now();
    let WindowsAppOutcome::Finished(out) = c
        .run_windows_app(req, &mut |_, _| {})
        .expect("run console exe")
    else {
        panic!("console run expected")
    };
    eprintln!("console program under Wine took {:?}", started.elapsed());
    // The Windows C runtime writes text-mode output: CR LF line ends.
    let stdout = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
    assert!(
        stdout.starts_with(
            "Hello from the Kiln console test\narg 1: hello\narg 2: two words\nwindows version: "
        ),
        "unexpected output: {stdout:?} / stderr {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("exiting with 7"));
    assert_eq!(out.status.code, Some(7));
    assert!(!out.status.timed_out);

    // The GUI program draws its window on the X display (:0, Xvfb here).
    c.put_file(
        &exes.join("kiln-gui-test.exe"),
        "/opt/windows-apps/kiln-gui-test.exe",
        0o755,
    )
    .expect("upload gui exe");
    let gui = WindowsAppRequest {
        path: "/opt/windows-apps/kiln-gui-test.exe".into(),
        args: vec!["--exit-after".into(), "2000".into()],
        gui: false,
        timeout_ms: Some(120_000),
    };
    let WindowsAppOutcome::Finished(out) = c
        .run_windows_app(gui.clone(), &mut |_, _| {})
        .expect("run gui exe")
    else {
        panic!()
    };
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "painted",
        "GUI program did not paint its window"
    );
    assert_eq!(out.status.code, Some(0));
    let detached = c
        .run_windows_app(WindowsAppRequest { gui: true, ..gui }, &mut |_, _| {})
        .expect("start gui exe");
    assert!(matches!(detached, WindowsAppOutcome::Started { pid } if pid > 0));
}

/// The image's agent (and an Xvfb display) in an `unshare` chroot of an
/// overlay of the tree; `share` is bind-mounted at /mnt for the socket.
struct ChrootAgent(Child);

impl ChrootAgent {
    fn start(tree: &Path, work: &Path, share: &Path) -> ChrootAgent {
        for d in ["upper", "work", "merged"] {
            std::fs::create_dir_all(work.join(d)).expect("mkdir");
        }
        let script = r#"set -e; R="$1"; W="$2"; S="$3"
mount --make-rprivate /
mount -t overlay overlay -o "lowerdir=$R,upperdir=$W/upper,workdir=$W/work" "$W/merged"
M="$W/merged"
mount -t proc proc "$M/proc"
mount -t tmpfs -o mode=755 dev "$M/dev"
for d in null zero full random urandom tty; do touch "$M/dev/$d"; mount --bind "/dev/$d" "$M/dev/$d"; done
mkdir -p "$M/dev/shm"; mount -t tmpfs shm "$M/dev/shm"
mount -t tmpfs -o mode=1777 tmp "$M/tmp"
mount --bind "$S" "$M/mnt"
exec chroot "$M" /bin/sh -c '(Xvfb :0 -screen 0 1024x768x24 -nolisten tcp >/dev/null 2>&1 &); exec /usr/local/bin/kiln-agent serve --listen unix:/mnt/agent.sock --wine-prefix /var/lib/kiln/wine --wine-display :0 --power-hook /bin/true'
"#;
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount-proc",
                "sh",
                "-c",
                script,
                "chroot-agent",
            ])
            .arg(tree)
            .arg(work)
            .arg(share)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .spawn()
            .expect("start unshare");
        ChrootAgent(child)
    }
}

impl Drop for ChrootAgent {
    fn drop(&mut self) {
        // unshare --kill-child takes the whole PID namespace down with it.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots the Clay image with a virtio-gpu display and checks a screendump
/// for the compositor's background and the Clay shell's intent bar.
#[test]
#[ignore = "slow tier: builds the Clay image (~3-6 min, ~2.6 GB) and boots it in QEMU TCG (~3-6 min)"]
fn clay_image_shows_the_clay_shell_on_the_display() {
    require_root_and_tools(&["mmdebstrap", "mkfs.ext4", "qemu-system-x86_64"]);
    let image = build(ImageKind::Clay, false);
    let mut vm = Qemu::boot(&image, 2048, true);
    vm.wait_for(
        &["kiln-initramfs: switching to /dev/vda"],
        Duration::from_secs(300),
    );
    let artifact = target_dir().join("tmp").join("clay-screendump.png");
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        if let Some(img) = vm.screendump() {
            let background = img.count(0x1E2430);
            let accent = img.count(0x6AA0FF);
            let bar = img.count(0x2F3A4D);
            if background > 10_000 && accent > 500 && bar > 5_000 {
                img.save_png(&artifact);
                eprintln!("Clay shell visible ({background} background, {accent} accent, {bar} bar pixels); screenshot {}", artifact.display());
                ask_for_memory_and_check_the_answer(&vm);
                return;
            }
            if Instant::now() > deadline {
                img.save_png(&artifact);
                panic!(
                    "Clay shell not on the display after 15 min ({background}/{accent}/{bar} pixels); last screenshot {}; console tail:\n{}",
                    artifact.display(),
                    tail(&vm.console())
                );
            }
        } else if Instant::now() > deadline {
            panic!(
                "no screendump from QEMU; console tail:\n{}",
                tail(&vm.console())
            );
        }
        std::thread::sleep(Duration::from_secs(10));
    }
}

/// Types "memory" + Enter on the guest keyboard; the shell must answer in
/// its success colour (0x8FD694) below the intent bar.
fn ask_for_memory_and_check_the_answer(vm: &Qemu) {
    for key in ["m", "e", "m", "o", "r", "y", "ret"] {
        vm.hmp(&format!("sendkey {key}"));
    }
    let artifact = target_dir().join("tmp").join("clay-screendump-answer.png");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let img = vm.screendump().expect("screendump");
        let good = img.count(0x8FD694);
        if good > 100 {
            img.save_png(&artifact);
            eprintln!(
                "Clay answered the typed request ({good} result pixels); screenshot {}",
                artifact.display()
            );
            return;
        }
        if Instant::now() > deadline {
            img.save_png(&artifact);
            panic!(
                "no answer from the Clay shell after typing a request; screenshot {}",
                artifact.display()
            );
        }
        std::thread::sleep(Duration::from_secs(5));
    }
}
