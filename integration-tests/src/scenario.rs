//! Scenarios: a script, where it runs, and what came back.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::host::HostKvm;
use crate::initrd::Tree;
use crate::nested;
use crate::ports::{self, Forward};
use crate::qemu_release::UnpackedQemu;
use crate::running::{Limits, Running, Start};

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
    #[error("{marker:?} not in the scenario's output within {waited_s} s: {reason} (log: {log})")]
    OutputNotSeen {
        marker: String,
        waited_s: u64,
        reason: String,
        log: PathBuf,
    },
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
    /// Until the host is ready the limit is at least 180 s: its quiet
    /// kernel boot prints nothing for tens of seconds on a loaded machine.
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
    /// Kernel modules the script needs on its host (e.g. `vhost_vsock`):
    /// loaded with their dependencies in the nested host before the script
    /// starts (`tun` and `vhost_net` always are); `modprobe`d (best effort)
    /// in direct mode.
    pub host_modules: Vec<String>,
    /// TCP ports of the script's host that tools on this host reach at
    /// `127.0.0.1:<Running::host_port(port)>` while the scenario runs
    /// (start it with [`start`]). Nested: QEMU user networking with
    /// `restrict=on` (the nested host reaches nothing outside), host ports
    /// chosen free at run time, the nested host at 10.0.2.15/24 on `eth0`.
    /// Direct: the script runs here, so a port is itself.
    pub forward_ports: Vec<u16>,
    /// Nested host memory in MiB.
    pub nested_memory_mib: u32,
    /// Give the script this terminal (stdin/stdout) instead of capturing
    /// its output: for a person using a guest, not for assertions.
    pub interactive: bool,
    /// Run in this mode whatever the host offers. For tests of the rig
    /// itself (its direct path on a host without hardware KVM); scripts that
    /// boot guests leave it `None`.
    pub force_mode: Option<Mode>,
    /// The QEMU that runs the nested host: `None` is this host's
    /// `qemu-system-x86_64`; a release unpacked in the cache compares
    /// releases side by side (`kiln-rig-soak --outer`).
    pub outer_qemu: Option<UnpackedQemu>,
    /// The nested host's CPU as the outer QEMU's `-cpu`, `-smp`, `-accel`.
    pub nested_cpu: NestedCpu,
}

/// The nested host's CPU. The default is the one found stable (README.md:
/// one vCPU, single-threaded TCG); others are for `kiln-rig-soak`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NestedCpu {
    pub model: String,
    /// `-smp` value, e.g. `1` or `2,sockets=1,cores=2`.
    pub smp: String,
    /// `-accel` value, e.g. `tcg` or `tcg,thread=single`.
    pub accel: String,
}

impl Default for NestedCpu {
    fn default() -> NestedCpu {
        NestedCpu {
            model: nested::QEMU_CPU.into(),
            smp: "1".into(),
            accel: "tcg".into(),
        }
    }
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
            forward_ports: Vec::new(),
            nested_memory_mib: 3072,
            interactive: false,
            force_mode: None,
            outer_qemu: None,
            nested_cpu: NestedCpu::default(),
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

/// The per-VM `kiln-vmm` binary built next to `kiln` (it may be absent:
/// scripts that need `$KILN_VMM` check for it).
pub fn kiln_vmm_binary(kiln: &Path) -> PathBuf {
    kiln.with_file_name("kiln-vmm")
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

/// Runs `scenario` on hardware KVM or in the nested host, to its end.
pub fn run(scenario: &Scenario) -> Result<Outcome, RigError> {
    start(scenario)?.finish()
}

/// Starts `scenario` and returns while it runs, so the test can talk to
/// its services (`Scenario::forward_ports`); [`Running::finish`] waits for
/// the end. Nested: returns once QEMU is up (its forwarded ports bound).
pub fn start(scenario: &Scenario) -> Result<Running, RigError> {
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
        Mode::Direct => start_direct(scenario, &kiln, &guest, &logs),
        Mode::Nested => start_nested(scenario, &kiln, &guest, &cache, &logs),
    }
}

fn start_direct(
    scenario: &Scenario,
    kiln: &Path,
    guest: &kiln_guests::DefaultGuest,
    logs: &Path,
) -> Result<Running, RigError> {
    // The script runs on this host: its ports are this host's.
    let mut forwards = Vec::new();
    for &port in &scenario.forward_ports {
        if forwards.iter().any(|f: &Forward| f.guest == port) {
            return Err(RigError::Setup(format!(
                "forward_ports: {port} given twice"
            )));
        }
        forwards.push(Forward {
            guest: port,
            host: port,
        });
    }
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
    let log = logs.join("output.log");
    if scenario.interactive {
        let child = direct_command(scenario, kiln, guest, &work, &disks)
            .spawn()
            .map_err(|e| RigError::Setup(format!("starting sh: {e}")))?;
        return Running::process(child, Mode::Direct, forwards, log, None, false, None);
    }
    let out = std::fs::File::create(&log).map_err(|e| RigError::Setup(e.to_string()))?;
    let err = out
        .try_clone()
        .map_err(|e| RigError::Setup(e.to_string()))?;
    // Its own process group, so a timeout kills the script's children too.
    let child = direct_command(scenario, kiln, guest, &work, &disks)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| RigError::Setup(format!("starting sh: {e}")))?;
    Running::process(
        child,
        Mode::Direct,
        forwards,
        log,
        Some(scenario.timeout),
        true,
        None,
    )
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
        .env("KILN_VMM", kiln_vmm_binary(kiln))
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
    let mut cmd = match &scenario.outer_qemu {
        Some(unpacked) => unpacked.command(),
        None => Command::new(qemu),
    };
    let cpu = &scenario.nested_cpu;
    cmd.args(["-accel", &cpu.accel, "-cpu", &cpu.model, "-smp", &cpu.smp]);
    cmd.args(["-nographic", "-no-reboot", "-m"])
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

fn start_nested(
    scenario: &Scenario,
    kiln: &Path,
    guest: &kiln_guests::DefaultGuest,
    cache: &Path,
    logs: &Path,
) -> Result<Running, RigError> {
    let qemu = match &scenario.outer_qemu {
        Some(unpacked) => Some(unpacked.binary.clone()),
        None => which("qemu-system-x86_64"),
    };
    let qemu = qemu.ok_or_else(|| {
        RigError::Setup("qemu-system-x86_64 not found: install Debian's qemu-system-x86 (the test command does)".into())
    })?;
    eprintln!(
        "kiln-rig: {}: outer QEMU {} ({}), -accel {} -cpu {} -smp {}",
        scenario.name,
        qemu.display(),
        scenario
            .outer_qemu
            .as_ref()
            .map_or("this host's".to_string(), |q| q.describe()),
        scenario.nested_cpu.accel,
        scenario.nested_cpu.model,
        scenario.nested_cpu.smp
    );
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
    // The per-VM process, when it was built next to kiln ($KILN_VMM).
    let kiln_vmm = kiln_vmm_binary(kiln);
    if kiln_vmm.is_file() {
        let data = std::fs::read(&kiln_vmm)
            .map_err(|e| RigError::Setup(format!("reading {}: {e}", kiln_vmm.display())))?;
        tree.file("usr/bin/kiln-vmm", 0o755, data);
    }
    crate::policy_files::add(&mut tree)?;
    for bin in &scenario.binaries {
        tree.host_binary(bin)?;
    }
    for file in &scenario.files {
        tree.host_file(file, 0o644)?;
    }
    let mut wanted_modules = scenario.host_modules.clone();
    let mut want = |m: &str| {
        if !wanted_modules.iter().any(|w| w == m) {
            wanted_modules.push(m.into());
        }
    };
    // Taps and vhost-net for the script's VMMs, always.
    nested::DEFAULT_MODULES.iter().for_each(|m| want(m));
    if !scenario.disks.is_empty() {
        if scenario.disks.len() > 26 {
            return Err(RigError::Setup("more than 26 disks".into()));
        }
        ["virtio_pci", "virtio_blk"].iter().for_each(|m| want(m));
    }
    if !scenario.forward_ports.is_empty() {
        ["virtio_pci", "virtio_net"].iter().for_each(|m| want(m));
        // Tells /init to configure eth0 (ports::NESTED_ADDRESS).
        tree.file(
            nested::NETWORK_FLAG,
            0o644,
            format!("{} {}\n", ports::NESTED_ADDRESS, ports::NESTED_GATEWAY).into_bytes(),
        );
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

    let log = logs.join("console.log");
    if scenario.interactive {
        // QEMU puts this terminal in raw mode; Ctrl-A X leaves QEMU.
        let forwards = ports::pick(&scenario.forward_ports)?;
        let child = qemu_command(&qemu, scenario, &host, &initrd)
            .args(ports::qemu_args(&forwards))
            .spawn()
            .map_err(|e| RigError::Setup(format!("starting QEMU: {e}")))?;
        return Running::process(
            child,
            Mode::Nested,
            forwards,
            log,
            None,
            false,
            Some(initrd),
        );
    }
    let limits = Limits {
        timeout: scenario.timeout,
        stall_after: scenario.stall_after,
    };
    // A free port may be taken between choosing it and QEMU binding it:
    // then QEMU exits at once, and new ports are chosen.
    const ATTEMPTS: u32 = 3;
    let mut attempt = 1;
    loop {
        let forwards = ports::pick(&scenario.forward_ports)?;
        let mut qemu_cmd = qemu_command(&qemu, scenario, &host, &initrd);
        qemu_cmd.args(ports::qemu_args(&forwards));
        let running = Running::nested(
            qemu_cmd,
            &scenario.name,
            forwards,
            log.clone(),
            limits,
            initrd.clone(),
        )?;
        match running.wait_started() {
            Start::PortTaken if attempt < ATTEMPTS => {
                eprintln!(
                    "kiln-rig: {}: a forwarded port was taken before QEMU bound it; new ports",
                    scenario.name
                );
                attempt += 1;
            }
            Start::Started | Start::PortTaken | Start::Ended => return Ok(running),
        }
    }
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
