//! `kiln-bench-boot [RUNS]`: boot time to the guest's init marker and VMM
//! memory outside guest RAM, Kiln against QEMU `-M microvm`, side by side
//! in one (nested or direct) host, interleaved runs, medians and ratios.
//! `--pvh` boots the uncompressed ELF vmlinux (PVH entry) instead of the
//! bzImage, with both VMMs. QEMU is the pinned peer (`peer.rs`, Debian 12's
//! 7.2), named in the output. `--quick` is one run of each VMM with the
//! plain command line: the figure-printing run in `scripts/test.sh`.

use std::time::Duration;

use kiln_integration_tests::{run, PeerQemu, RigError, Scenario};

const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
const BLACKLIST: &str = "initcall_blacklist=cmos_init";

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pvh = args.iter().any(|a| a == "--pvh");
    let quick = args.iter().any(|a| a == "--quick");
    let runs: usize = if quick {
        1
    } else {
        args.iter().find_map(|a| a.parse().ok()).unwrap_or(5)
    };
    let labels: &[&str] = if quick {
        &["plain"]
    } else {
        &["plain", "blacklist"]
    };
    let kernel_var = if pvh {
        "$GUEST_VMLINUX"
    } else {
        "$GUEST_BZIMAGE"
    };
    let probe = std::env::current_exe()
        .expect("own path")
        .with_file_name("kiln-boot-probe");
    let probe_path = probe.to_string_lossy();
    let mut script = String::new();
    for i in 0..runs {
        for &label in labels {
            let extra = if label == "blacklist" { BLACKLIST } else { "" };
            let cmdline = format!("{BASE_CMDLINE} {extra}").trim().to_string();
            script.push_str(&format!(
                "echo \"kiln {label} $({probe_path} 256 KILN_INIT_OK -- \"$KILN\" run --kernel \"{kernel_var}\" --initrd \"$GUEST_INITRD\" --cpus 1 --memory 256M --cmdline '{cmdline}')\"\n\
                 echo \"qemu {label} $({probe_path} 256 KILN_INIT_OK -- \"$PEER_QEMU\" -L \"$PEER_QEMU_FIRMWARE\" -enable-kvm -M microvm -cpu host -smp 1 -m 256 -nodefaults -no-user-config -nographic -serial stdio -kernel \"{kernel_var}\" -initrd \"$GUEST_INITRD\" -append '{cmdline}')\"\n"
            ));
        }
        script.push_str(&format!("echo run {} of {runs} done >&2\n", i + 1));
    }
    let mut s = Scenario::new(if pvh { "bench_boot_pvh" } else { "bench_boot" }, &script);
    s.timeout = Duration::from_secs(3000);
    s.binaries = vec![probe.clone()];
    let peer = PeerQemu::ensure_cached().unwrap_or_else(|e| {
        eprintln!("kiln-bench-boot: {e}");
        std::process::exit(1);
    });
    peer.add_to(&mut s);
    eprintln!("kiln-bench-boot: {runs} interleaved runs each of Kiln and QEMU microvm, plain and with {BLACKLIST}");
    // A frozen nested host (RigError::Stalled) is retried once, as nextest
    // retries the nested tests; it is reported as FLAKY. Any other failure,
    // or a second freeze, fails the run.
    let out = match run(&s) {
        Ok(o) => o,
        Err(RigError::Stalled { silent_s, log }) => {
            eprintln!("kiln-bench-boot: FLAKY: the nested host froze (no output for {silent_s} s, log: {}); retrying once", log.display());
            run(&s).unwrap_or_else(|e| {
                eprintln!("kiln-bench-boot: {e}");
                std::process::exit(1);
            })
        }
        Err(e) => {
            eprintln!("kiln-bench-boot: {e}");
            std::process::exit(1);
        }
    };
    let mut failures = 0;
    let mut rows = Vec::new();
    for &label in labels {
        let mut stats = |vmm: &str| {
            let (mut ms, mut kib) = (Vec::new(), Vec::new());
            for line in out
                .output
                .lines()
                .filter(|l| l.starts_with(&format!("{vmm} {label} ")))
            {
                let field = |k: &str| {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix(k))
                        .and_then(|v| v.parse::<f64>().ok())
                };
                match (field("boot_ms="), field("vmm_rss_kib=")) {
                    (Some(t), Some(r)) => {
                        ms.push(t);
                        kib.push(r);
                    }
                    _ => failures += 1,
                }
            }
            (ms.len(), median(&mut ms), median(&mut kib))
        };
        let kiln = stats("kiln");
        let qemu = stats("qemu");
        rows.push((label, kiln, qemu));
    }
    let kernel = if pvh { "PVH vmlinux" } else { "bzImage" };
    println!("Boot to KILN_INIT_OK (1 vCPU, 256 MiB, Debian cloud kernel {kernel} + busybox initramfs), {:?} mode, medians", out.mode);
    println!();
    println!("QEMU peer: {}", peer.describe());
    println!();
    println!("| command line | runs | Kiln boot (s) | QEMU microvm boot (s) | Kiln/QEMU | Kiln VMM RSS (MiB) | QEMU VMM RSS (MiB) |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (label, k, q) in &rows {
        let cmd = if *label == "plain" {
            BASE_CMDLINE.to_string()
        } else {
            format!("{BASE_CMDLINE} {BLACKLIST}")
        };
        println!(
            "| `{cmd}` | {}/{} | {:.2} | {:.2} | {:.2}x | {:.1} | {:.1} |",
            k.0,
            q.0,
            k.1 / 1000.0,
            q.1 / 1000.0,
            k.1 / q.1,
            k.2 / 1024.0,
            q.2 / 1024.0
        );
    }
    if failures > 0 {
        eprintln!(
            "kiln-bench-boot: {failures} runs failed to reach the marker (log: {})",
            out.log.display()
        );
        std::process::exit(1);
    }
}
