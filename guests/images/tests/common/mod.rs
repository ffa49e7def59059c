//! Shared helpers of the image tests: building the binaries that go into
//! images, building images, booting them in QEMU, reading screendumps.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_images::{
    build_image, default_cache_dir, BuildOptions, ImageArtifacts, ImageKind, StderrProgress,
};

pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_path_buf()
}

/// Builds the guest binaries (release) and returns (kiln-agent, clay-shell).
/// The package set is the one `scripts/test.sh` builds: another set can
/// unify dependency features differently and give different binaries,
/// whose new hashes would make every cached image stale.
pub fn guest_binaries() -> (PathBuf, PathBuf) {
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "-p",
            "kiln",
            "-p",
            "kiln-vmm",
            "-p",
            "kiln-agent",
            "-p",
            "clay-shell",
        ])
        .status()
        .expect("run cargo build for the guest binaries");
    assert!(
        status.success(),
        "building kiln-agent and clay-shell failed"
    );
    let rel = target_dir().join("release");
    (rel.join("kiln-agent"), rel.join("clay-shell"))
}

pub fn require_root_and_tools(tools: &[&str]) {
    // SAFETY: geteuid cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "image tests must run as root (mmdebstrap, chroot, mkfs with owners)"
    );
    for t in tools {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "{t} is not installed; see guests/images/README.md for the apt packages"
        );
    }
}

pub fn build(kind: ImageKind, force: bool) -> ImageArtifacts {
    let (agent, shell) = guest_binaries();
    let mut opts = BuildOptions::new(default_cache_dir(), agent);
    opts.clay_shell_binary = Some(shell);
    opts.force = force;
    let a = build_image(kind, &opts, &StderrProgress::new(false))
        .unwrap_or_else(|e| panic!("building {kind}: {e}"));
    eprint!("{}", a.summary());
    a
}

pub fn sha256_file(p: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(p).expect("open");
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).expect("read");
    kiln_images::hex(&h.finalize())
}

/// A guest running under QEMU (TCG), serial console to a file, HMP monitor
/// on a Unix socket. Killed on drop.
pub struct Qemu {
    child: Child,
    pub dir: tempfile::TempDir,
    pub serial: PathBuf,
    monitor: PathBuf,
}

impl Qemu {
    pub fn boot(a: &ImageArtifacts, memory_mib: u32, display: bool) -> Qemu {
        let dir = tempfile::tempdir().expect("tempdir");
        // The guest writes to its disk: boot a copy, never the cached image.
        let disk = dir.path().join("disk.ext4");
        let st = Command::new("cp")
            .args(["--sparse=always"])
            .arg(&a.rootfs)
            .arg(&disk)
            .status()
            .expect("cp");
        assert!(st.success());
        let serial = dir.path().join("serial.log");
        let monitor = dir.path().join("monitor.sock");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-smp", "1", "-m"])
            .arg(memory_mib.to_string())
            .arg("-kernel")
            .arg(&a.kernel)
            .arg("-initrd")
            .arg(&a.initramfs)
            .arg("-append")
            .arg(&a.cmdline)
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=raw", disk.display()))
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-monitor")
            .arg(format!("unix:{},server,nowait", monitor.display()))
            .args(["-display", "none", "-no-reboot", "-nodefaults"]);
        if display {
            cmd.args(["-device", "virtio-gpu-pci"]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qemu-system-x86_64");
        Qemu {
            child,
            dir,
            serial,
            monitor,
        }
    }

    /// The serial console so far, without terminal escape sequences
    /// (systemd colours its status lines).
    pub fn console(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(
            &std::fs::read(&self.serial).unwrap_or_default(),
        ))
    }

    /// Waits until the serial console shows every marker, or panics with
    /// the console's tail (and says so if QEMU died or the guest went quiet).
    pub fn wait_for(&mut self, markers: &[&str], timeout: Duration) {
        let start = Instant::now();
        loop {
            let text = self.console();
            if markers.iter().all(|m| text.contains(m)) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "qemu exited ({st}) before {markers:?}; console tail:\n{}",
                    tail(&text)
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "guest did not show {markers:?} within {timeout:?}; console tail:\n{}",
                    tail(&text)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    pub fn hmp(&self, command: &str) -> String {
        let mut s = UnixStream::connect(&self.monitor).expect("connect to the QEMU monitor");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        s.write_all(format!("{command}\n").as_bytes())
            .expect("send");
        std::thread::sleep(Duration::from_millis(400));
        let mut buf = vec![0u8; 65536];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Takes a screendump (PPM) and returns it decoded.
    pub fn screendump(&self) -> Option<Image> {
        let path = self.dir.path().join("screen.ppm");
        let _ = std::fs::remove_file(&path);
        self.hmp(&format!("screendump {}", path.display()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(bytes) = std::fs::read(&path) {
                if let Some(img) = Image::from_ppm(&bytes) {
                    return Some(img);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        None
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, then one final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// An RGB picture.
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Image {
    /// Binary PPM (P6, maxval 255), as QEMU's screendump writes it.
    pub fn from_ppm(bytes: &[u8]) -> Option<Image> {
        let mut fields = Vec::new();
        let mut pos = 0;
        while fields.len() < 4 {
            while pos < bytes.len() && bytes[pos].is_ascii_whitespace() {
                pos += 1;
            }
            if bytes.get(pos) == Some(&b'#') {
                while pos < bytes.len() && bytes[pos] != b'\n' {
                    pos += 1;
                }
                continue;
            }
            let start = pos;
            while pos < bytes.len() && !bytes[pos].is_ascii_whitespace() {
                pos += 1;
            }
            fields.push(
                std::str::from_utf8(bytes.get(start..pos)?)
                    .ok()?
                    .to_string(),
            );
        }
        pos += 1;
        if fields[0] != "P6" || fields[3] != "255" {
            return None;
        }
        let (width, height): (usize, usize) = (fields[1].parse().ok()?, fields[2].parse().ok()?);
        let rgb = bytes.get(pos..pos + width * height * 3)?.to_vec();
        Some(Image { width, height, rgb })
    }

    /// Pixels exactly of colour 0xRRGGBB.
    pub fn count(&self, colour: u32) -> usize {
        let [_, r, g, b] = colour.to_be_bytes();
        self.rgb.chunks_exact(3).filter(|p| p == &[r, g, b]).count()
    }

    pub fn save_png(&self, path: &Path) {
        let file = std::fs::File::create(path).expect("create png");
        let mut enc = png::Encoder::new(
            std::io::BufWriter::new(file),
            self.width as u32,
            self.height as u32,
        );
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()
            .expect("header")
            .write_image_data(&self.rgb)
            .expect("png data");
    }
}
