//! In the nested KVM host (where guests boot): time from the API call to the
//! guest's init marker, `kiln serve` against QEMU started with libvirt's own
//! command line for the same guest. The two launchers below run inside the
//! nested host as `kiln-bench-daemon launch-kiln|launch-qemu`, each timing
//! its VMM the same way: from just before the launch to the marker in the
//! serial log, polled every 2 ms.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_integration_tests::{run, PeerQemu, RigError, Scenario};

use crate::http::Conn;
use crate::libvirt;
use crate::stats::Latencies;

const MARKER: &str = "KILN_INIT_OK";
const CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Waits until `log` holds the marker; false on timeout.
fn wait_marker(log: &Path, started: Instant) -> bool {
    let mut seen = Vec::new();
    let mut file = None;
    while started.elapsed() < BOOT_TIMEOUT {
        if file.is_none() {
            file = std::fs::File::open(log).ok();
        }
        if let Some(f) = file.as_mut() {
            let mut chunk = Vec::new();
            let _ = f.read_to_end(&mut chunk);
            seen.extend_from_slice(&chunk);
            if seen.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()) {
                return true;
            }
            // Keep only a tail that could hold a split marker.
            let keep = seen.len().saturating_sub(MARKER.len());
            seen.drain(..keep);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// `launch-kiln SOCKET RUN_DIR NAME KERNEL INITRD`
pub fn launch_kiln(args: &[String]) -> i32 {
    let [socket, run_dir, name, kernel, initrd] = args else {
        eprintln!("usage: launch-kiln SOCKET RUN_DIR NAME KERNEL INITRD");
        return 2;
    };
    let mut c = match Conn::open(Path::new(socket)) {
        Ok(c) => c,
        Err(e) => {
            println!("failed=connect:{e}");
            return 1;
        }
    };
    let mut body = serde_json::json!({
        "name": name,
        "machine": {"kernel": kernel, "initrd": initrd, "cpus": 1, "memory_mib": 256, "cmdline": CMDLINE},
    });
    body["restart"] =
        serde_json::json!({"on_poweroff": "stop", "on_reboot": "stop", "on_crash": "stop"});
    let log = Path::new(run_dir)
        .join("vms")
        .join(name)
        .join("console.log");
    let t = Instant::now();
    match c.request(
        "POST",
        "/v1/vms?start=true",
        Some(body.to_string().as_bytes()),
    ) {
        Ok(r) if r.status == 201 => {}
        Ok(r) => {
            println!("failed=status:{}", r.status);
            eprintln!("{}", String::from_utf8_lossy(&r.body));
            return 1;
        }
        Err(e) => {
            println!("failed=post:{e}");
            return 1;
        }
    }
    let ok = wait_marker(&log, t);
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let _ = c.request("DELETE", &format!("/v1/vms/{name}?force=true"), None);
    if ok {
        println!("launch_ms={ms:.1}");
        0
    } else {
        println!("failed=no-marker");
        1
    }
}

/// `launch-qemu SERIAL_LOG -- QEMU ARGS...`
pub fn launch_qemu(args: &[String]) -> i32 {
    let (Some(log), Some("--"), Some(program)) =
        (args.first(), args.get(1).map(String::as_str), args.get(2))
    else {
        eprintln!("usage: launch-qemu SERIAL_LOG -- QEMU ARGS...");
        return 2;
    };
    let _ = std::fs::remove_file(log);
    let t = Instant::now();
    let mut child = match Command::new(program)
        .args(&args[3..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            println!("failed=spawn:{e}");
            return 1;
        }
    };
    let ok = wait_marker(Path::new(log), t);
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let _ = child.kill();
    let _ = child.wait();
    if ok {
        println!("launch_ms={ms:.1}");
        0
    } else {
        println!("failed=no-marker");
        1
    }
}

fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

pub struct Nested {
    pub kiln: Latencies,
    pub qemu: Latencies,
    pub qemu_argv: Vec<String>,
    pub failures: usize,
    pub peer: String,
}

pub fn measure(rounds: usize, scratch: &Path) -> Result<Nested, String> {
    // libvirt's command line for a KVM domain booting the default guest;
    // the placeholders become the nested host's paths in the script.
    let xml = libvirt::domain_xml(
        "launch",
        "kvm",
        Some(("/KERNEL", "/INITRD", CMDLINE)),
        "/SERIAL",
    );
    let argv = libvirt::native_argv(&xml, scratch)?;
    let shell_argv: Vec<String> = argv
        .iter()
        .map(|w| {
            quote(w)
                .replace("/KERNEL", "'\"$GUEST_BZIMAGE\"'")
                .replace("/INITRD", "'\"$GUEST_INITRD\"'")
                .replace("/SERIAL", "'\"$log\"'")
        })
        .collect();
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let me_q = quote(&me.to_string_lossy());
    let mut script = String::from(
        "d=/tmp/kiln-bench; rm -rf $d; mkdir -p $d\n\
         \"$KILN\" serve --socket $d/kiln.sock --state-dir $d/state --run-dir $d/run --vmm-binary \"$KILN_VMM\" 2>$d/daemon.log &\n\
         i=0; while [ ! -S $d/kiln.sock ]; do i=$((i+1)); [ $i -gt 200 ] && break; sleep 0.1; done\n",
    );
    for i in 0..rounds {
        script.push_str(&format!(
            "echo \"kiln $({me_q} launch-kiln $d/kiln.sock $d/run vm{i} \"$GUEST_BZIMAGE\" \"$GUEST_INITRD\")\"\n\
             log=$d/qemu{i}.log; echo \"qemu $({me_q} launch-qemu $log -- \"$PEER_QEMU\" -L \"$PEER_QEMU_FIRMWARE\" -L @SEABIOS_DIR@ {})\"\n\
             echo round {} of {rounds} done >&2\n",
            shell_argv.join(" "),
            i + 1
        ));
    }
    let mut s = Scenario::new("bench_daemon", &script);
    s.timeout = Duration::from_secs(600 + 300 * rounds as u64);
    s.binaries = vec![me.clone()];
    let peer = PeerQemu::ensure_cached().map_err(|e| e.to_string())?;
    peer.add_to(&mut s);
    // libvirt's `pc` machine boots through SeaBIOS and linuxboot, which the
    // rig's microvm peer does not ship: add them, and SeaBIOS's directory
    // as a second -L.
    let dirs = &peer.qemu.firmware_dirs;
    let (data, seabios) = (&dirs[0], &dirs[1]);
    s.files.extend([
        data.join("linuxboot_dma.bin"),
        data.join("kvmvapic.bin"),
        seabios.join("bios-256k.bin"),
    ]);
    s.script = s
        .script
        .replace("@SEABIOS_DIR@", &quote(&seabios.to_string_lossy()));
    let out = match run(&s) {
        Ok(o) => o,
        Err(RigError::Stalled { silent_s, log }) => {
            eprintln!("kiln-bench-daemon: FLAKY: the nested host froze (no output for {silent_s} s, log: {}); retrying once", log.display());
            run(&s).map_err(|e| e.to_string())?
        }
        Err(e) => return Err(e.to_string()),
    };
    let mut failures = 0;
    let mut pick = |who: &str| {
        let mut ms = Vec::new();
        for line in out
            .output
            .lines()
            .filter(|l| l.starts_with(&format!("{who} ")))
        {
            match line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("launch_ms="))
            {
                Some(v) if v.parse::<f64>().is_ok() => ms.push(v.parse().unwrap_or(0.0)),
                _ => {
                    eprintln!("kiln-bench-daemon: {line}");
                    failures += 1;
                }
            }
        }
        Latencies::from_ms(ms)
    };
    let kiln = pick("kiln");
    let qemu = pick("qemu");
    Ok(Nested {
        kiln,
        qemu,
        qemu_argv: argv,
        failures,
        peer: peer.describe(),
    })
}
