//! `kiln-boot-probe [--echo] GUEST_MIB MARKER -- CMD ARGS...`
//!
//! Starts a VMM, waits for MARKER on its stdout, and prints one line:
//! `PROBE boot_ms=<ms from spawn to marker> vmm_rss_kib=<resident KiB outside guest RAM>`.
//! Guest RAM is every mapping at least GUEST_MIB large (the VMM's RAM
//! block); everything else resident counts as the VMM's own memory. The
//! VMM is killed afterwards. A VMM that shows no marker within 180 s is
//! killed and reported as `PROBE failed`. `--echo` also copies the VMM's
//! output to stdout as it arrives (the rig's soak campaigns want the full
//! guest console on the nested host's console).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

fn vmm_rss_kib(pid: u32, guest_bytes: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = 0;
    let mut mapping_is_guest_ram = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // Mapping header: "start-end perms offset dev inode path".
            let (start, end) = first.split_once('-')?;
            let size = u64::from_str_radix(end, 16).ok()? - u64::from_str_radix(start, 16).ok()?;
            mapping_is_guest_ram = size >= guest_bytes;
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            if !mapping_is_guest_ram {
                total += rest.split_whitespace().next()?.parse::<u64>().ok()?;
            }
        }
    }
    Some(total)
}

fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    let echo = args.get(1).is_some_and(|a| a == "--echo");
    if echo {
        args.remove(1);
    }
    let Some(sep) = args.iter().position(|a| a == "--") else {
        eprintln!("usage: kiln-boot-probe [--echo] GUEST_MIB MARKER -- CMD ARGS...");
        std::process::exit(2);
    };
    let guest_mib: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(256);
    let marker = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "KILN_INIT_OK".into());
    let start = Instant::now();
    let mut child = match Command::new(&args[sep + 1])
        .args(&args[sep + 2..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kiln-boot-probe: cannot start {}: {e}", args[sep + 1]);
            std::process::exit(1);
        }
    };
    let mut stdout = child.stdout.take().expect("piped stdout");
    // Watchdog: a stuck boot must fail this run, not hang the benchmark.
    let pid = child.id() as libc::pid_t;
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(180));
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let found = loop {
        match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break false,
            Ok(n) => {
                if echo {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&buf[..n]);
                    let _ = out.flush();
                }
                // Only the new bytes (and a marker's length before them)
                // can complete the marker: a long console stays cheap.
                let from = seen.len().saturating_sub(marker.len());
                seen.extend_from_slice(&buf[..n]);
                if seen[from..]
                    .windows(marker.len())
                    .any(|w| w == marker.as_bytes())
                {
                    break true;
                }
            }
        }
    };
    let boot_ms = start.elapsed().as_millis();
    let rss = vmm_rss_kib(child.id(), guest_mib << 20);
    let _ = child.kill();
    let _ = child.wait();
    if !found {
        // What the guest printed last tells a hung boot from a slow one.
        let text = String::from_utf8_lossy(&seen);
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines[lines.len().saturating_sub(15)..] {
            eprintln!("PROBE tail: {line}");
        }
        if echo {
            println!();
        }
        println!("PROBE failed: marker {marker:?} never appeared ({} bytes of output after {boot_ms} ms)", seen.len());
        std::process::exit(1);
    }
    if echo {
        println!();
    }
    println!(
        "PROBE boot_ms={boot_ms} vmm_rss_kib={}",
        rss.map_or("?".into(), |r| r.to_string())
    );
}
