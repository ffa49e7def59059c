//! `kiln-rig-soak`: a stability and boot-time campaign for the nested rig.
//!
//! Boots nested hosts one after another, each launching the default guest
//! with Kiln several times with its full console (no `quiet`) copied to the
//! nested host's console, and times each boot to `KILN_INIT_OK` with
//! `kiln-boot-probe`. A nested host that prints nothing for `--stall-after`
//! is the rig's `Stalled`; the launch it was in counts as stalled. Prints
//! one line per launch and a summary. Options (defaults in brackets):
//!
//! - `--outer system|7.2|10.0`: the outer QEMU, this host's or a release
//!   unpacked in the cache (`qemu_release`) [system]
//! - `--cpu MODEL`, `--smp SMP`, `--accel ACCEL`: the nested host's CPU
//!   [EPYC-Rome,+svm,+npt / 1 / tcg]
//! - `--hosts N` [4], `--launches M` per host [10], `--min-launches L`:
//!   boot more hosts (up to `--max-hosts`, default 2N) until L launches
//!   were attempted [N*M]
//! - `--kernel pvh|bzimage|both` (both alternates) [both]
//! - `--guest-cpus C` [1], `--guest-mib MIB` [256]
//! - `--stall-after S` [180, the rig's default]
//! - `--give-up-after K`: stop once K hosts stalled or died [never]
//! - `--label NAME`: names the log directories
//!   `target/nested-logs/soak_<NAME>_<host>` [from the options]

use std::time::{Duration, Instant};

use kiln_integration_tests::qemu_release::{QemuRelease, UnpackedQemu};
use kiln_integration_tests::{run, NestedCpu, RigError, Scenario};

const CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
const MARKER: &str = "KILN_INIT_OK";

struct Options {
    outer: String,
    cpu: NestedCpu,
    hosts: usize,
    launches: usize,
    min_launches: usize,
    max_hosts: usize,
    kernel: String,
    guest_cpus: u32,
    guest_mib: u32,
    stall_after: u64,
    give_up_after: Option<usize>,
    label: String,
}

fn fail(msg: &str) -> ! {
    eprintln!("kiln-rig-soak: {msg}");
    std::process::exit(2);
}

fn parse() -> Options {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Options {
        outer: "system".into(),
        cpu: NestedCpu::default(),
        hosts: 4,
        launches: 10,
        min_launches: 0,
        max_hosts: 0,
        kernel: "both".into(),
        guest_cpus: 1,
        guest_mib: 256,
        stall_after: 180,
        give_up_after: None,
        label: String::new(),
    };
    let mut i = 0;
    while i < args.len() {
        let value = args
            .get(i + 1)
            .cloned()
            .unwrap_or_else(|| fail(&format!("{} needs a value", args[i])));
        let number = |v: &str| -> usize {
            v.parse()
                .unwrap_or_else(|_| fail(&format!("{}: not a number: {v}", args[i])))
        };
        match args[i].as_str() {
            "--outer" => o.outer = value,
            "--cpu" => o.cpu.model = value,
            "--smp" => o.cpu.smp = value,
            "--accel" => o.cpu.accel = value,
            "--hosts" => o.hosts = number(&value),
            "--launches" => o.launches = number(&value),
            "--min-launches" => o.min_launches = number(&value),
            "--max-hosts" => o.max_hosts = number(&value),
            "--kernel" => o.kernel = value,
            "--guest-cpus" => o.guest_cpus = number(&value) as u32,
            "--guest-mib" => o.guest_mib = number(&value) as u32,
            "--stall-after" => o.stall_after = number(&value) as u64,
            "--give-up-after" => o.give_up_after = Some(number(&value)),
            "--label" => o.label = value,
            other => fail(&format!("unknown option {other} (see the source's header)")),
        }
        i += 2;
    }
    if !["pvh", "bzimage", "both"].contains(&o.kernel.as_str()) {
        fail("--kernel: pvh, bzimage or both");
    }
    if o.hosts == 0 || o.launches == 0 {
        fail("--hosts and --launches must be at least 1");
    }
    if o.max_hosts == 0 {
        o.max_hosts = o.hosts * 2;
    }
    if o.label.is_empty() {
        o.label = format!("{}_smp{}", o.outer, o.cpu.smp)
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
    }
    o
}

/// The kernel of launch `n` (0-based).
fn kernel_of(kind: &str, n: usize) -> &'static str {
    match kind {
        "pvh" => "pvh",
        "bzimage" => "bzimage",
        _ if n.is_multiple_of(2) => "pvh",
        _ => "bzimage",
    }
}

fn script(o: &Options, probe: &str) -> String {
    let mut sh = String::new();
    for n in 0..o.launches {
        let kernel = kernel_of(&o.kernel, n);
        let var = if kernel == "pvh" {
            "$GUEST_VMLINUX"
        } else {
            "$GUEST_BZIMAGE"
        };
        sh.push_str(&format!(
            "echo \"SOAK_LAUNCH {n} {kernel}\"\n\
             '{probe}' --echo {mib} {MARKER} -- \"$KILN\" run --kernel \"{var}\" --initrd \"$GUEST_INITRD\" --cpus {cpus} --memory {mib}M --cmdline '{CMDLINE}'\n\
             echo \"SOAK_DONE {n} $?\"\n",
            mib = o.guest_mib,
            cpus = o.guest_cpus,
        ));
    }
    sh
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum LaunchResult {
    Ok(u64),
    NoMarker,
    Stalled,
    HostDied,
}

struct Launch {
    host: usize,
    n: usize,
    kernel: String,
    result: LaunchResult,
}

/// Launches in a host's console text; an unfinished last launch gets
/// `unfinished` (the host stalled or died during it).
fn launches(host: usize, text: &str, unfinished: LaunchResult) -> Vec<Launch> {
    let mut out: Vec<Launch> = Vec::new();
    let mut open: Option<Launch> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("SOAK_LAUNCH ") {
            let mut w = rest.split_whitespace();
            let n = w.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            open = Some(Launch {
                host,
                n,
                kernel: w.next().unwrap_or("?").to_string(),
                result: unfinished,
            });
        } else if let Some(rest) = line.strip_prefix("PROBE boot_ms=") {
            if let (Some(l), Some(ms)) = (
                open.as_mut(),
                rest.split_whitespace().next().and_then(|v| v.parse().ok()),
            ) {
                l.result = LaunchResult::Ok(ms);
            }
        } else if line.starts_with("PROBE failed") {
            if let Some(l) = open.as_mut() {
                l.result = LaunchResult::NoMarker;
            }
        } else if line.starts_with("SOAK_DONE ") {
            if let Some(l) = open.take() {
                out.push(l);
            }
        }
    }
    out.extend(open);
    out
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)] as f64 / 1000.0
}

/// One outer QEMU of the campaign: its name, the unpacked release (`None`:
/// this host's) and its version line.
struct Outer {
    name: String,
    qemu: Option<UnpackedQemu>,
    version: String,
}

fn outer(name: &str) -> Outer {
    let qemu = if name == "system" {
        None
    } else {
        let release = QemuRelease::by_label(name)
            .unwrap_or_else(|| fail(&format!("--outer: system, 7.2 or 10.0, not {name}")));
        Some(
            UnpackedQemu::ensure(&kiln_guests::cache_dir(), release)
                .unwrap_or_else(|e| fail(&e.to_string())),
        )
    };
    let version = match &qemu {
        Some(q) => q.version_line().unwrap_or_else(|e| fail(&e.to_string())),
        None => std::process::Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .ok()
            .and_then(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| fail("qemu-system-x86_64 --version failed")),
    };
    Outer {
        name: name.to_string(),
        qemu,
        version,
    }
}

/// What one outer QEMU's hosts did.
#[derive(Default)]
struct Tally {
    launches: Vec<Launch>,
    hosts: usize,
    stalled_hosts: usize,
    died_hosts: usize,
    host_ready_ms: Vec<u64>,
}

fn main() {
    let o = parse();
    let probe = std::env::current_exe()
        .unwrap_or_else(|e| fail(&format!("own path: {e}")))
        .with_file_name("kiln-boot-probe");
    if !probe.is_file() {
        fail(&format!(
            "{} not found: cargo build --release -p kiln-integration-tests",
            probe.display()
        ));
    }
    // Several outer QEMUs take turns host by host, so a busy machine
    // slows them alike.
    let outers: Vec<Outer> = o.outer.split(',').map(outer).collect();
    for q in &outers {
        println!("soak {}: outer {} [{}]", o.label, q.name, q.version);
    }
    println!(
        "soak {}: -accel {} -cpu {} -smp {}, {} launches per host, {} hosts per outer QEMU (at least {} launches, at most {} hosts), kernel {}, guest {} vCPU {} MiB, stall after {} s",
        o.label, o.cpu.accel, o.cpu.model, o.cpu.smp, o.launches, o.hosts, o.min_launches, o.max_hosts, o.kernel, o.guest_cpus, o.guest_mib, o.stall_after
    );
    let script = script(&o, &probe.to_string_lossy());
    let started = Instant::now();
    let mut tallies: Vec<Tally> = outers.iter().map(|_| Tally::default()).collect();
    let want = o.min_launches.max(o.hosts * o.launches);
    let mut gave_up = vec![false; outers.len()];
    let mut round = 0;
    loop {
        round += 1;
        let mut ran_any = false;
        for (i, q) in outers.iter().enumerate() {
            let t = &mut tallies[i];
            let more = t.hosts < o.hosts || t.launches.len() < want;
            if gave_up[i] || t.hosts >= o.max_hosts || !more {
                continue;
            }
            ran_any = true;
            t.hosts += 1;
            let host = t.hosts;
            let mut s = Scenario::new(&format!("soak_{}_{}_{host}", o.label, q.name), &script);
            s.binaries.push(probe.clone());
            s.outer_qemu = q.qemu.clone();
            s.nested_cpu = o.cpu.clone();
            s.stall_after = Duration::from_secs(o.stall_after);
            s.timeout = Duration::from_secs(o.launches as u64 * 200 + 180);
            let t0 = Instant::now();
            let (text, unfinished, status) = match run(&s) {
                Ok(out) => {
                    if let Some(r) = out.host_ready {
                        t.host_ready_ms.push(r.as_millis() as u64);
                    }
                    let status = format!("script exit {}", out.exit_code);
                    (out.output, LaunchResult::HostDied, status)
                }
                Err(e) => {
                    let (log, unfinished) = match &e {
                        RigError::Stalled { log, .. } => {
                            t.stalled_hosts += 1;
                            (log.clone(), LaunchResult::Stalled)
                        }
                        RigError::TimedOut { log, .. }
                        | RigError::HostFailed { log, .. }
                        | RigError::OutputNotSeen { log, .. } => {
                            t.died_hosts += 1;
                            (log.clone(), LaunchResult::HostDied)
                        }
                        RigError::Setup(msg) => fail(msg),
                    };
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    (text, unfinished, e.to_string())
                }
            };
            let mine = launches(host, &text, unfinished);
            for l in &mine {
                let what = match l.result {
                    LaunchResult::Ok(ms) => format!("ok boot_ms={ms}"),
                    LaunchResult::NoMarker => "no-marker".into(),
                    LaunchResult::Stalled => "STALLED".into(),
                    LaunchResult::HostDied => "HOST-DIED".into(),
                };
                println!(
                    "launch outer={} host={} n={} kernel={} {what}",
                    q.name, l.host, l.n, l.kernel
                );
            }
            println!(
                "host outer={} {host}: {} launches, {status}, {:.0} s",
                q.name,
                mine.len(),
                t0.elapsed().as_secs_f64()
            );
            if mine.is_empty() && unfinished == LaunchResult::HostDied {
                println!(
                    "giving up on {}: host {host} never started a launch (see its log)",
                    q.name
                );
                gave_up[i] = true;
            }
            t.launches.extend(mine);
            if o.give_up_after
                .is_some_and(|k| t.stalled_hosts + t.died_hosts >= k)
            {
                println!(
                    "giving up on {}: {} hosts stalled or died",
                    q.name,
                    t.stalled_hosts + t.died_hosts
                );
                gave_up[i] = true;
            }
        }
        if !ran_any {
            break;
        }
        eprintln!(
            "kiln-rig-soak: round {round} done after {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    println!();
    for (q, t) in outers.iter().zip(&tallies) {
        summary(&format!("{} {}", o.label, q.name), t);
    }
    println!("WALL {}: {:.0} s", o.label, started.elapsed().as_secs_f64());
}

fn summary(label: &str, t: &Tally) {
    let all = &t.launches;
    let count = |want: LaunchResult| all.iter().filter(|l| l.result == want).count();
    let stalls = count(LaunchResult::Stalled);
    let died = count(LaunchResult::HostDied);
    let no_marker = count(LaunchResult::NoMarker);
    println!(
        "SUMMARY {label}: launches {} ok {} stalled {stalls} no-marker {no_marker} host-died {died}; hosts {} stalled {} died {}",
        all.len(),
        all.len() - stalls - died - no_marker,
        t.hosts,
        t.stalled_hosts,
        t.died_hosts,
    );
    for kernel in ["pvh", "bzimage"] {
        let mut ms: Vec<u64> = all
            .iter()
            .filter(|l| l.kernel == kernel)
            .filter_map(|l| match l.result {
                LaunchResult::Ok(ms) => Some(ms),
                _ => None,
            })
            .collect();
        if ms.is_empty() {
            continue;
        }
        ms.sort_unstable();
        println!(
            "BOOT {label} {kernel}: n={} median {:.2} s p90 {:.2} s min {:.2} s max {:.2} s",
            ms.len(),
            percentile(&ms, 0.5),
            percentile(&ms, 0.9),
            percentile(&ms, 0.0),
            percentile(&ms, 1.0)
        );
    }
    let mut ready = t.host_ready_ms.clone();
    ready.sort_unstable();
    if !ready.is_empty() {
        println!(
            "HOST_READY {label}: n={} median {:.1} s",
            ready.len(),
            percentile(&ready, 0.5)
        );
    }
}
