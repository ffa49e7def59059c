//! `kiln-bench-daemon [outer|nested|all] [--requests N] [--launches N] [--rounds N]`:
//! the daemon benchmark of docs/benchmarks.md, kept out of scripts/test.sh
//! (`scripts/test-slow.sh daemon` runs it). Prints figures and ratios; it
//! asserts nothing but that every measurement happened.
//!
//! - outer (this machine): API latency of `GET /v1/ping` and `GET
//!   /v1/vms/{id}` (p50/p99), `POST /v1/vms?start=true` to the VMM ready,
//!   and the daemon's memory with 0 and 10 running VMs — beside Debian's
//!   libvirtd (getLibVersion, domain info, defineXML + create of a TCG
//!   domain, libvirtd's memory with 0 and 10 running domains).
//! - nested (in the nested KVM host): from the API call to the default
//!   guest's init marker, against QEMU started with libvirt's own command
//!   line (`virsh domxml-to-native`), in interleaved rounds.

mod http;
mod kiln;
mod libvirt;
mod nested;
mod stats;

use std::path::{Path, PathBuf};

use stats::Latencies;

fn flag(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn release_binary(name: &str) -> PathBuf {
    let path = std::env::current_exe()
        .expect("own path")
        .with_file_name(name);
    if !path.is_file() {
        eprintln!(
            "kiln-bench-daemon: {} missing: cargo build --release -p kiln -p kiln-vmm",
            path.display()
        );
        std::process::exit(2);
    }
    path
}

/// The default guest from the cache (`kiln guest fetch`).
fn guest() -> (PathBuf, PathBuf) {
    let out = std::process::Command::new(release_binary("kiln"))
        .args(["guest", "fetch"])
        .output()
        .expect("kiln guest fetch");
    let text = String::from_utf8_lossy(&out.stdout);
    let find = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|p| PathBuf::from(p.trim()))
            .unwrap_or_else(|| {
                eprintln!("kiln-bench-daemon: `kiln guest fetch` printed no {prefix:?} line");
                std::process::exit(2)
            })
    };
    (find("kernel (bzImage):"), find("initramfs:"))
}

fn row(what: &str, kiln: f64, peer: f64, unit: &str, target: &str) {
    println!(
        "| {what} | {kiln:.3} {unit} | {peer:.3} {unit} | {:.2}x | {target} |",
        kiln / peer
    );
}

fn lat_rows(what: &str, k: &Latencies, p: &Latencies, target_p99: &str) {
    row(
        &format!("{what} p50"),
        k.quantile_ms(0.5),
        p.quantile_ms(0.5),
        "ms",
        "",
    );
    row(
        &format!("{what} p99"),
        k.quantile_ms(0.99),
        p.quantile_ms(0.99),
        "ms",
        target_p99,
    );
}

fn outer(args: &[String], scratch: &Path) {
    let requests = flag(args, "--requests", 2000);
    let launches = flag(args, "--launches", 20);
    let (kernel, initrd) = guest();
    eprintln!("kiln-bench-daemon: outer: {requests} requests per API call, {launches} launches, then 10 running VMs, Kiln then libvirt");
    let kiln = {
        let d = kiln::Daemon::start(
            &release_binary("kiln"),
            &release_binary("kiln-vmm"),
            &scratch.join("kiln"),
        );
        kiln::measure(&d, &kernel, &initrd, requests, launches)
    };
    let lv = libvirt::measure(&scratch.join("libvirt"), requests, launches).unwrap_or_else(|e| {
        eprintln!("kiln-bench-daemon: libvirt: {e}");
        std::process::exit(1);
    });
    println!("Outer machine: `kiln serve` over its Unix socket (HTTP/1.1 keep-alive) vs libvirtd (python3-libvirt, qemu:///system); {requests} requests each, {launches} launches");
    println!();
    println!("| measurement | Kiln | libvirt | Kiln/libvirt | target |");
    println!("| --- | --- | --- | --- | --- |");
    lat_rows(
        "ping (GET /v1/ping vs getLibVersion)",
        &kiln.ping,
        &lv.ping,
        "< 1 ms",
    );
    lat_rows(
        "show (GET /v1/vms/{id} vs virDomainGetInfo)",
        &kiln.show,
        &lv.show,
        "",
    );
    row(
        "define + start to VMM ready, p50",
        kiln.start_to_ready.quantile_ms(0.5),
        lv.start_to_ready.quantile_ms(0.5),
        "ms",
        "< 10 ms",
    );
    row(
        "define + start to VMM ready, p99",
        kiln.start_to_ready.quantile_ms(0.99),
        lv.start_to_ready.quantile_ms(0.99),
        "ms",
        "",
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    row(
        "daemon RSS, 0 running VMs",
        mib(kiln.rss_idle_kib),
        mib(lv.rss_idle_kib),
        "MiB",
        "",
    );
    row(
        "daemon RSS, 10 running VMs",
        mib(kiln.rss_10_kib),
        mib(lv.rss_10_kib),
        "MiB",
        "< 30 MiB",
    );
    println!();
}

fn nested_run(args: &[String], scratch: &Path) {
    let rounds = flag(args, "--rounds", 5);
    eprintln!("kiln-bench-daemon: nested: {rounds} interleaved rounds of kiln serve and libvirt's QEMU command line (the nested host boots first, ~1 min)");
    let n = nested::measure(rounds, scratch).unwrap_or_else(|e| {
        eprintln!("kiln-bench-daemon: nested: {e}");
        std::process::exit(1);
    });
    println!("Nested KVM host: API call (or QEMU spawn) to the default guest's {} marker, 1 vCPU, 256 MiB, bzImage, `console=ttyS0 reboot=k panic=1`; QEMU peer {}", "KILN_INIT_OK", n.peer);
    println!();
    println!(
        "| measurement | runs | Kiln (s) | QEMU, libvirt's command line (s) | Kiln/QEMU | target |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    println!(
        "| launch to init, median | {}/{} | {:.2} | {:.2} | {:.2}x | <= 0.5x |",
        n.kiln.len(),
        n.qemu.len(),
        n.kiln.quantile_ms(0.5) / 1e3,
        n.qemu.quantile_ms(0.5) / 1e3,
        n.kiln.quantile_ms(0.5) / n.qemu.quantile_ms(0.5)
    );
    println!();
    println!("libvirt's command line (from virsh domxml-to-native; /KERNEL, /INITRD and /SERIAL become the nested host's paths, and -L points at the peer's firmware): {}", n.qemu_argv.join(" "));
    if n.failures > 0 {
        eprintln!(
            "kiln-bench-daemon: {} launches did not reach the marker",
            n.failures
        );
        std::process::exit(1);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("launch-kiln") => nested::launch_kiln(&args[1..]),
        Some("launch-qemu") => nested::launch_qemu(&args[1..]),
        mode => {
            let scratch =
                std::env::temp_dir().join(format!("kiln-bench-daemon-{}", std::process::id()));
            match mode.unwrap_or("all") {
                "outer" => outer(&args, &scratch),
                "nested" => nested_run(&args, &scratch),
                "all" | "--requests" | "--launches" | "--rounds" => {
                    outer(&args, &scratch);
                    nested_run(&args, &scratch);
                }
                other => {
                    eprintln!("usage: kiln-bench-daemon [outer|nested|all] [--requests N] [--launches N] [--rounds N] (not {other:?})");
                    std::process::exit(2);
                }
            }
            let _ = std::fs::remove_dir_all(&scratch);
            0
        }
    };
    std::process::exit(code);
}
