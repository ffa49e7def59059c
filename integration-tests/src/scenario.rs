//! Scenarios: a script, where it runs, and what came back.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::host::HostKvm;
use crate::initrd::Tree;
use crate::nested::{
    self, ALIVE_MARKER, BEGIN_MARKER, ERROR_MARKER, EXIT_MARKER, HOST_READY_MARKER,
};

#[derive(Debug, thiserror::Error)]
pub enum RigError {
    #[error("rig set-up failed: {0}")]
    Setup(String),
    #[error("the nested KVM host stalled: no console output for {silent_s} s (log: {log})")]
    Stalled { silent_s: u64, log: PathBuf },
    #[error("scenario timed out after {timeout_s} s (log: {log})")]
    TimedOut { timeout_s: u64, log: PathBuf },
    #[error("the nested host failed before the script finished: {reason} (log: {log})")]
    HostFailed { reason: String, log: PathBuf },
}

/// What a test asks the rig to run.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Names the log directory; unique per test.
    pub name: String,
    /// POSIX sh, run with `set -e` off; its exit status is reported.
    pub script: String,
    pub timeout: Duration,
    /// No console output for this long (the nested host prints a heartbeat
    /// every 15 s while the script runs) means the nested host stalled.
    pub stall_after: Duration,
    /// Host binaries to make available (with their shared libraries), at
    /// the same path.
    pub binaries: Vec<PathBuf>,
    /// Host files to make available at the same path.
    pub files: Vec<PathBuf>,
    /// Large host files (guest root disks) the script gets as block devices
    /// or files, never in RAM: `$RIG_DISK0`, `$RIG_DISK1`, ... In the nested
    /// host they are virtio disks `/dev/vda`, `/dev/vdb`, ... of its QEMU,
    /// with `snapshot=on` (writes go to a temporary overlay, the file is
    /// never changed); in direct mode, sparse copies in the work directory.
    pub disks: Vec<PathBuf>,
    /// Kernel modules the script needs on its host (e.g. `tun`,
    /// `vhost_vsock`): loaded with their dependencies in the nested host
    /// before the script starts; `modprobe`d (best effort) in direct mode.
    pub host_modules: Vec<String>,
    /// Nested host memory in MiB.
    pub nested_memory_mib: u32,
    /// Give the script this terminal (stdin/stdout) instead of capturing
    /// its output: for a person using a guest, not for assertions.
    pub interactive: bool,
    /// Run in this mode whatever the host offers. For tests of the rig
    /// itself (its direct path on a host without hardware KVM); scripts that
    /// boot guests leave it `None`.
    pub force_mode: Option<Mode>,
}

impl Scenario {
    pub fn new(name: &str, script: &str) -> Scenario {
        Scenario {
            name: name.into(),
            script: script.into(),
            timeout: Duration::from_secs(600),
            stall_after: Duration::from_secs(180),
            binaries: Vec::new(),
            files: Vec::new(),
            disks: Vec::new(),
            host_modules: Vec::new(),
            nested_memory_mib: 3072,
            interactive: false,
            force_mode: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Direct,
    Nested,
}

#[derive(Debug)]
pub struct Outcome {
    pub mode: Mode,
    pub exit_code: i32,
    /// The script's stdout and stderr.
    pub output: String,
    /// Full console log (nested) or the output file (direct).
    pub log: PathBuf,
    pub elapsed: Duration,
    /// Nested mode: from QEMU's start until KVM worked in the nested host
    /// (its boot time). `None` in direct mode.
    pub host_ready: Option<Duration>,
}

impl Outcome {
    /// Panics with the output and the log path unless `needle` was printed.
    pub fn expect_output(&self, needle: &str) -> &Self {
        assert!(
            self.output.contains(needle),
            "expected {needle:?} in the scenario output\n--- output ---\n{}\n--- full log: {}",
            self.output,
            self.log.display()
        );
        self
    }

    pub fn expect_exit(&self, code: i32) -> &Self {
        assert_eq!(
            self.exit_code,
            code,
            "scenario script exited {} (wanted {code})\n--- output ---\n{}\n--- full log: {}",
            self.exit_code,
            self.output,
            self.log.display()
        );
        self
    }

    /// The value of the first `KEY=value` line.
    pub fn value(&self, key: &str) -> Option<String> {
        let prefix = format!("{key}=");
        self.output
            .lines()
            .find_map(|l| l.trim().strip_prefix(&prefix).map(|v| v.trim().to_string()))
    }
}

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
    let dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
    };
    // Without `..` in it: scripts compare `$WORKDIR` with `pwd`, and log
    // paths printed on failure read better.
    dir.canonicalize().unwrap_or(dir)
}

/// The kiln binary under test: `$KILN_BIN`, else `target/release/kiln`.
pub fn kiln_binary() -> Result<PathBuf, RigError> {
    let path = std::env::var_os("KILN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("release/kiln"));
    if !path.is_file() {
        return Err(RigError::Setup(format!(
            "kiln binary {} not found: run `cargo build --release -p kiln` first (or set KILN_BIN)",
            path.display()
        )));
    }
    Ok(path)
}

/// Runs `scenario` on hardware KVM or in the nested host.
pub fn run(scenario: &Scenario) -> Result<Outcome, RigError> {
    let host = HostKvm::detect();
    eprintln!("kiln-rig: {}: {}", scenario.name, host.describe());
    let logs = target_dir().join("nested-logs").join(&scenario.name);
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs)
        .map_err(|e| RigError::Setup(format!("creating {}: {e}", logs.display())))?;
    let cache = kiln_guests::cache_dir();
    let guest =
        kiln_guests::ensure_default_guest(&cache).map_err(|e| RigError::Setup(e.to_string()))?;
    let kiln = kiln_binary()?;
    let mode = scenario.force_mode.unwrap_or(match host {
        HostKvm::Hardware => Mode::Direct,
        HostKvm::Emulating | HostKvm::None => Mode::Nested,
    });
    if scenario.force_mode.is_some() {
        eprintln!(
            "kiln-rig: {}: {mode:?} mode forced by the scenario",
            scenario.name
        );
    }
    match mode {
        Mode::Direct => run_direct(scenario, &kiln, &guest, &logs),
        Mode::Nested => run_nested(scenario, &kiln, &guest, &cache, &logs),
    }
}

fn run_direct(
    scenario: &Scenario,
    kiln: &Path,
    guest: &kiln_guests::DefaultGuest,
    logs: &Path,
) -> Result<Outcome, RigError> {
    let work = logs.join("work");
    std::fs::create_dir_all(&work).map_err(|e| RigError::Setup(e.to_string()))?;
    // The guest writes to its disks: give it copies (sparse, or reflinks
    // where the file system has them), never the originals.
    let mut disks = Vec::new();
    for (i, disk) in scenario.disks.iter().enumerate() {
        let copy = work.join(format!("disk{i}.img"));
        let copied = Command::new("cp")
            .args(["--sparse=always", "--reflink=auto"])
            .arg(disk)
            .arg(&copy)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !copied {
            return Err(RigError::Setup(format!(
                "copying disk {} to {}",
                disk.display(),
                copy.display()
            )));
        }
        disks.push(copy);
    }
    for m in &scenario.host_modules {
        let loaded = Command::new("modprobe")
            .arg(m)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !loaded {
            eprintln!(
                "kiln-rig: {}: modprobe {m} failed; the script may not find what it needs",
                scenario.name
            );
        }
    }
    if scenario.interactive {
        let start = Instant::now();
        let status = direct_command(scenario, kiln, guest, &work, &disks)
            .status()
            .map_err(|e| RigError::Setup(format!("starting sh: {e}")))?;
        let log = logs.join("output.log");
        return Ok(Outcome {
            mode: Mode::Direct,
            exit_code: status.code().unwrap_or(-1),
            output: String::new(),
            log,
            elapsed: start.elapsed(),
            host_ready: None,
        });
    }
    let log = logs.join("output.log");
    let out = std::fs::File::create(&log).map_err(|e| RigError::Setup(e.to_string()))?;
    let err = out
        .try_clone()
        .map_err(|e| RigError::Setup(e.to_string()))?;
    let start = Instant::now();
    // Its own process group, so a timeout kills the script's children too.
    let mut child = direct_command(scenario, kiln, guest, &work, &disks)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| RigError::Setup(format!("starting sh: {e}")))?;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| RigError::Setup(e.to_string()))?
        {
            break status;
        }
        if start.elapsed() > scenario.timeout {
            // SAFETY: kill(2) on the process group we created for the script.
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = child.wait();
            return Err(RigError::TimedOut {
                timeout_s: scenario.timeout.as_secs(),
                log,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    Ok(Outcome {
        mode: Mode::Direct,
        exit_code: status.code().unwrap_or(-1),
        output,
        log,
        elapsed: start.elapsed(),
        host_ready: None,
    })
}

/// The script as a shell command with the rig's environment, on this host.
fn direct_command(
    scenario: &Scenario,
    kiln: &Path,
    guest: &kiln_guests::DefaultGuest,
    work: &Path,
    disks: &[PathBuf],
) -> Command {
    let mut cmd = Command::new("sh");
    for (i, disk) in disks.iter().enumerate() {
        cmd.env(format!("RIG_DISK{i}"), disk);
    }
    cmd.arg("-c")
        .arg(&scenario.script)
        .current_dir(work)
        .env("KILN", kiln)
        .env("GUEST_BZIMAGE", &guest.bzimage)
        .env("GUEST_VMLINUX", &guest.vmlinux)
        .env("GUEST_INITRD", &guest.initramfs)
        .env("WORKDIR", work)
        .env("KILN_RIG_MODE", "direct");
    cmd
}

/// QEMU running the nested KVM host with `initrd`, console on stdio.
fn qemu_command(
    qemu: &Path,
    scenario: &Scenario,
    host: &nested::NestedHost,
    initrd: &Path,
) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-accel",
        "tcg",
        "-cpu",
        nested::QEMU_CPU,
        "-smp",
        "1",
        "-nographic",
        "-no-reboot",
        "-m",
    ])
    .arg(scenario.nested_memory_mib.to_string())
    .arg("-kernel")
    .arg(&host.kernel)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", "console=ttyS0 quiet loglevel=1 panic=-1"]);
    for disk in &scenario.disks {
        // QEMU's -drive splits on commas; a comma in a path is doubled.
        let path = disk.display().to_string().replace(',', ",,");
        cmd.arg("-drive")
            .arg(format!("file={path},if=virtio,format=raw,snapshot=on"));
    }
    cmd
}

/// Shell run before the scenario's script in the nested host: waits for
/// the virtio disks and exports `RIG_DISK<i>`.
fn nested_disk_prelude(count: usize) -> String {
    let mut sh = String::new();
    for i in 0..count {
        let dev = format!("/dev/vd{}", (b'a' + i as u8) as char);
        sh.push_str(&format!(
            "_n=0; while [ ! -b {dev} ]; do _n=$((_n+1)); [ $_n -gt 300 ] && {{ echo \"RIG_DISK_MISSING={dev}\"; exit 1; }}; sleep 0.1; done\nexport RIG_DISK{i}={dev}\n"
        ));
    }
    sh
}

fn run_nested(
    scenario: &Scenario,
    kiln: &Path,
    guest: &kiln_guests::DefaultGuest,
    cache: &Path,
    logs: &Path,
) -> Result<Outcome, RigError> {
    let qemu = which("qemu-system-x86_64").ok_or_else(|| {
        RigError::Setup("qemu-system-x86_64 not found: install Debian's qemu-system-x86 (the test command does)".into())
    })?;
    for disk in &scenario.disks {
        if !disk.is_file() {
            return Err(RigError::Setup(format!(
                "disk {} not found",
                disk.display()
            )));
        }
    }
    let host = nested::prepare(cache, guest)?;

    // Per-scenario part, appended to the shared base (Linux unpacks
    // concatenated newc archives in order).
    let mut tree = Tree::default();
    tree.dir("usr/bin");
    let kiln_data = std::fs::read(kiln)
        .map_err(|e| RigError::Setup(format!("reading {}: {e}", kiln.display())))?;
    tree.file("usr/bin/kiln", 0o755, kiln_data);
    for lib in crate::initrd::shared_libraries(kiln)? {
        tree.host_file(Path::new(&lib), 0o755)?;
    }
    for bin in &scenario.binaries {
        tree.host_binary(bin)?;
    }
    for file in &scenario.files {
        tree.host_file(file, 0o644)?;
    }
    let mut wanted_modules = scenario.host_modules.clone();
    if !scenario.disks.is_empty() {
        if scenario.disks.len() > 26 {
            return Err(RigError::Setup("more than 26 disks".into()));
        }
        for m in ["virtio_pci", "virtio_blk"] {
            if !wanted_modules.iter().any(|w| w == m) {
                wanted_modules.push(m.into());
            }
        }
    }
    let modules = host.module_files(&wanted_modules)?;
    let mut names = Vec::new();
    for (name, data) in modules {
        tree.file(&format!("rig/modules/{name}"), 0o644, data);
        names.push(name);
    }
    tree.file(
        "rig/extra-modules",
        0o644,
        names
            .iter()
            .map(|n| format!("{n}\n"))
            .collect::<String>()
            .into_bytes(),
    );
    let script = nested_disk_prelude(scenario.disks.len()) + &scenario.script;
    tree.file("rig/script.sh", 0o755, script.into_bytes());
    if scenario.interactive {
        tree.file("rig/interactive", 0o644, Vec::new());
    }
    let extra = logs.join("scenario.cpio");
    tree.write(&extra)?;
    let initrd = logs.join("initrd.cpio");
    concat(&[&host.base_initrd, &extra], &initrd)?;

    if scenario.interactive {
        return run_nested_interactive(&qemu, scenario, &host, &initrd, logs);
    }
    let log = logs.join("console.log");
    let mut log_file = std::fs::File::create(&log).map_err(|e| RigError::Setup(e.to_string()))?;
    let start = Instant::now();
    let mut child = qemu_command(&qemu, scenario, &host, &initrd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| RigError::Setup(format!("starting QEMU: {e}")))?;

    let (tx, rx) = mpsc::channel::<String>();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            while reader
                .read_until(b'\n', &mut buf)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                let line = String::from_utf8_lossy(&buf).replace('\r', "");
                buf.clear();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);

    let mut output = String::new();
    let mut in_script = false;
    let mut exit_code = None;
    let mut host_error = None;
    let mut host_ready = None;
    let mut partial = String::new();
    let mut last_output = Instant::now();
    let failure = loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => {
                last_output = Instant::now();
                let _ = log_file.write_all(line.as_bytes());
                // A heartbeat may land in the middle of a script's line:
                // keep the part before it for the line's continuation.
                let line = std::mem::take(&mut partial) + &line;
                if let Some(before) = line.trim_end().strip_suffix(ALIVE_MARKER) {
                    partial = before.to_string();
                    continue;
                }
                let trimmed = line.trim_end();
                if let Some((before, code)) = trimmed.split_once(EXIT_MARKER).filter(|_| in_script)
                {
                    // The script's last line may lack its newline.
                    if !before.is_empty() {
                        output.push_str(before);
                        output.push('\n');
                    }
                    exit_code = code.trim().parse::<i32>().ok();
                    in_script = false;
                } else if !in_script && host_ready.is_none() && trimmed.ends_with(HOST_READY_MARKER)
                {
                    host_ready = Some(start.elapsed());
                } else if trimmed.ends_with(BEGIN_MARKER) {
                    in_script = true;
                } else if in_script {
                    output.push_str(&line);
                } else if let Some(e) = trimmed.strip_prefix(ERROR_MARKER) {
                    host_error.get_or_insert(e.to_string());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break None,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if start.elapsed() > scenario.timeout {
                    break Some(RigError::TimedOut {
                        timeout_s: scenario.timeout.as_secs(),
                        log: log.clone(),
                    });
                }
                if last_output.elapsed() > scenario.stall_after {
                    break Some(RigError::Stalled {
                        silent_s: scenario.stall_after.as_secs(),
                        log: log.clone(),
                    });
                }
            }
        }
    };
    if failure.is_some() {
        let _ = child.kill();
    }
    let _ = child.wait();
    if let Some(err) = failure {
        return Err(err);
    }
    let Some(exit_code) = exit_code else {
        let reason =
            host_error.unwrap_or_else(|| "QEMU exited without the script's exit marker".into());
        return Err(RigError::HostFailed { reason, log });
    };
    // The combined initrd is large and rebuilt each time; keep it only
    // when the scenario failed, for reproduction.
    if exit_code == 0 {
        let _ = std::fs::remove_file(&initrd);
    }
    Ok(Outcome {
        mode: Mode::Nested,
        exit_code,
        output,
        log,
        elapsed: start.elapsed(),
        host_ready,
    })
}

/// The nested host with this terminal as its serial console: QEMU puts the
/// terminal in raw mode; Ctrl-A X leaves QEMU.
fn run_nested_interactive(
    qemu: &Path,
    scenario: &Scenario,
    host: &nested::NestedHost,
    initrd: &Path,
    logs: &Path,
) -> Result<Outcome, RigError> {
    let start = Instant::now();
    let status = qemu_command(qemu, scenario, host, initrd)
        .status()
        .map_err(|e| RigError::Setup(format!("starting QEMU: {e}")))?;
    let _ = std::fs::remove_file(initrd);
    Ok(Outcome {
        mode: Mode::Nested,
        exit_code: status.code().unwrap_or(-1),
        output: String::new(),
        log: logs.join("console.log"),
        elapsed: start.elapsed(),
        host_ready: None,
    })
}

fn concat(parts: &[&Path], out: &Path) -> Result<(), RigError> {
    let mut file = std::fs::File::create(out)
        .map_err(|e| RigError::Setup(format!("creating {}: {e}", out.display())))?;
    for part in parts {
        let mut src = std::fs::File::open(part)
            .map_err(|e| RigError::Setup(format!("opening {}: {e}", part.display())))?;
        std::io::copy(&mut src, &mut file)
            .map_err(|e| RigError::Setup(format!("writing {}: {e}", out.display())))?;
    }
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}
