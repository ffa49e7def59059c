//! `kiln-bench-io [ROUNDS] [--runtime SECONDS] [--io-uring] [--only TEST,...]`: virtio-pci
//! block and network throughput, Kiln against QEMU (`-M microvm,pcie=on`),
//! in one (nested or direct) host, interleaved rounds, the same guest kit,
//! the same raw disk image on a tmpfs and the same tap set-up. Prints each
//! figure, then medians and Kiln/QEMU ratios as a markdown table.
//!
//! In the guest: fio on /dev/vda (direct=1, iodepth 16, libaio or
//! io_uring): sequential write and read in 1 MiB blocks, random read and
//! write in 4 KiB blocks; iperf3 TCP guest→host and host→guest against an
//! iperf3 server in the host. Each for `--runtime` seconds (default 10).
//!
//! QEMU is the pinned peer (`peer.rs`, Debian 12's 7.2), named in the output.
//!
//! `KILN_BENCH_IO_KILN_IS_QEMU=1` runs QEMU in the Kiln column too (to check
//! the benchmark itself before Kiln has the devices); the output says so.

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_integration_tests::guest_kit::host_tool;
use kiln_integration_tests::virtio_vm::HOST_PRELUDE;
use kiln_integration_tests::{run, Disk, GuestKit, PeerQemu, Scenario, VmSpec, Vmm};

const GUEST: &str = r#"
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up
n=0; while ! ping -c 1 -W 1 10.0.2.1 > /dev/null 2>&1; do n=$((n+1)); [ $n -gt 60 ] && { echo "BENCH_ERROR net: host 10.0.2.1 unreachable"; break; }; done
# want NAME: whether --only selected this test (all when empty).
want() { [ -z "$ONLY" ] && return 0; case ",$ONLY," in *",$1,"*) return 0 ;; esac; return 1; }
# fio_job NAME FIO-ARGS...: one terse line -> "BENCH NAME key=value...".
fio_job() {
  name=$1; shift
  want "$name" || return 0
  fio --name="$name" --filename=/dev/vda --direct=1 --ioengine="$ENGINE" --iodepth=16 --size=256M \
      --runtime="$RUNTIME" --time_based --output-format=terse --terse-version=3 "$@" > /tmp/fio.out 2> /tmp/fio.err
  line=$(grep '^3;' /tmp/fio.out | head -1)
  [ -n "$line" ] || { echo "BENCH_ERROR $name: $(head -c 300 /tmp/fio.err)"; return; }
  echo "$line" | awk -F';' -v n="$name" '{print "BENCH " n " read_kib_s=" $7 " read_iops=" $8 " write_kib_s=" $48 " write_iops=" $49}'
}
fio_job seq_write --rw=write --bs=1M
fio_job seq_read --rw=read --bs=1M
fio_job rand_read --rw=randread --bs=4k
fio_job rand_write --rw=randwrite --bs=4k
# iperf_run NAME ARGS...: the receiver's rate in Mbit/s.
iperf_run() {
  name=$1; shift
  want "$name" || return 0
  iperf3 -c 10.0.2.1 -t "$RUNTIME" -f m "$@" > /tmp/iperf.out 2>&1
  rate=$(awk '/receiver/ {print $(NF-2)}' /tmp/iperf.out)
  [ -n "$rate" ] && echo "BENCH $name mbit_s=$rate" || echo "BENCH_ERROR $name: $(tail -c 300 /tmp/iperf.out)"
}
iperf_run tcp_guest_to_host
iperf_run tcp_host_to_guest -R
"#;

/// (test, key in the BENCH line, unit, scale from the raw value).
const FIGURES: &[(&str, &str, &str, f64)] = &[
    ("seq_write", "write_kib_s", "MiB/s", 1.0 / 1024.0),
    ("seq_read", "read_kib_s", "MiB/s", 1.0 / 1024.0),
    ("rand_read", "read_iops", "kIOPS", 1.0 / 1000.0),
    ("rand_write", "write_iops", "kIOPS", 1.0 / 1000.0),
    ("tcp_guest_to_host", "mbit_s", "Mbit/s", 1.0),
    ("tcp_host_to_guest", "mbit_s", "Mbit/s", 1.0),
];

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("kiln-bench-io: {msg}");
    std::process::exit(1);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(3);
    let runtime: u64 = args
        .iter()
        .position(|a| a == "--runtime")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let engine = if args.iter().any(|a| a == "--io-uring") {
        "io_uring"
    } else {
        "libaio"
    };
    let only: Vec<String> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    if let Some(bad) = only
        .iter()
        .find(|t| !FIGURES.iter().any(|f| f.0 == t.as_str()))
    {
        fail(&format!(
            "--only: unknown test {bad:?} (tests: {})",
            FIGURES.iter().map(|f| f.0).collect::<Vec<_>>().join(", ")
        ));
    }
    let kiln_is_qemu = std::env::var_os("KILN_BENCH_IO_KILN_IS_QEMU").is_some_and(|v| v == "1");
    let kiln_vmm = if kiln_is_qemu { Vmm::Qemu } else { Vmm::Kiln };

    let (fio, iperf3) = match (host_tool("fio"), host_tool("iperf3")) {
        (Ok(f), Ok(i)) => (f, i),
        (Err(e), _) | (_, Err(e)) => fail(&e.to_string()),
    };
    let guest = format!(
        "ENGINE={engine}\nRUNTIME={runtime}\nONLY={}\n{GUEST}",
        only.join(",")
    );
    let kit = GuestKit::new(&guest)
        .binary(&fio)
        .binary(&iperf3)
        .build("bench_io")
        .unwrap_or_else(|e| fail(&e.to_string()));
    let mut spec = VmSpec::new(&kit.to_string_lossy());
    spec.memory_mib = 768;
    spec.disks = vec![Disk {
        path: "$WORKDIR/disk/disk.img".into(),
        readonly: false,
        serial: "bench".into(),
    }];
    spec.tap = Some("ktap0".into());

    let mut script = format!(
        "{HOST_PRELUDE}\n\
         mkdir disk && mount -t tmpfs -o size=600m tmpfs disk\n\
         dd if=/dev/zero of=disk/disk.img bs=1M count=512 2>/dev/null\n\
         iperf3 -s -D --logfile iperf3-server.log -I iperf3.pid\n"
    );
    for round in 1..=rounds {
        for (label, vmm) in [("kiln", kiln_vmm), ("qemu", Vmm::Qemu)] {
            // The guest's console is also shown live (prefixed), so a
            // stalled nested host's log shows how far the guest got.
            script.push_str(&format!(
                "t0=$(date +%s)\n\
                 ( timeout {} {} < /dev/null 2> g.err; echo \"VMM_EXIT=$?\" ) | tee g.out | while IFS= read -r l; do echo \"guest {label} {round}: $l\"; done &\n\
                 p=$!\n\
                 tap_up ktap0\n\
                 wait $p\n\
                 rc=$(sed -n 's/^VMM_EXIT=//p' g.out)\n\
                 echo \"run {label} {round}: exit $rc, $(( $(date +%s) - t0 )) s\" >&2\n\
                 [ \"$rc\" = 0 ] || {{ echo \"RUN_FAILED {label} {round} exit $rc\"; tail -5 g.err; }}\n\
                 grep '^BENCH ' g.out | sed 's/^BENCH /RESULT {label} {round} /'\n",
                runtime * 6 + 300,
                spec.command(vmm),
            ));
        }
    }
    script.push_str("kill $(cat iperf3.pid)\numount disk\n");
    let mut s = Scenario::new("bench_io", &script);
    s.timeout = Duration::from_secs(rounds as u64 * 2 * (runtime * 6 + 300) + 300);
    s.stall_after = Duration::from_secs(240);
    s.files.push(kit.clone());
    s.binaries = vec![iperf3.clone()];
    let peer = PeerQemu::ensure_cached().unwrap_or_else(|e| fail(&e.to_string()));
    peer.add_to(&mut s);
    s.host_modules.push("tun".into());
    if kiln_is_qemu {
        eprintln!("kiln-bench-io: KILN_BENCH_IO_KILN_IS_QEMU=1: the Kiln column runs QEMU (checking the benchmark, not Kiln)");
    }
    eprintln!("kiln-bench-io: {rounds} interleaved rounds of Kiln and QEMU, fio ({engine}) and iperf3, {runtime} s each");
    // A nested host that stalls or times out still leaves its console log:
    // the rounds finished before that are reported, then the error.
    let (output, mode, log, error) = match run(&s) {
        Ok(out) => (out.output, format!("{:?}", out.mode), out.log, None),
        Err(e) => {
            let log = kiln_integration_tests::scenario::target_dir()
                .join("nested-logs/bench_io/console.log");
            (
                std::fs::read_to_string(&log).unwrap_or_default(),
                "partial".to_string(),
                log,
                Some(e),
            )
        }
    };

    // (vmm, test) -> the BENCH lines' key=value maps, one per round.
    let mut results: BTreeMap<(String, String), Vec<BTreeMap<String, f64>>> = BTreeMap::new();
    for line in output.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("RESULT") {
            if line.contains("BENCH_ERROR") || line.starts_with("RUN_FAILED") {
                eprintln!("kiln-bench-io: {line}");
            }
            continue;
        }
        let (Some(vmm), Some(round), Some(test)) = (words.next(), words.next(), words.next())
        else {
            continue;
        };
        let values: BTreeMap<String, f64> = words
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect();
        println!(
            "round {round} {vmm:4} {test:18} {}",
            values
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        results
            .entry((vmm.to_string(), test.to_string()))
            .or_default()
            .push(values);
    }
    let kiln_label = if kiln_is_qemu {
        "\"Kiln\" (QEMU, KILN_BENCH_IO_KILN_IS_QEMU=1)"
    } else {
        "Kiln"
    };
    println!();
    println!(
        "virtio-pci I/O, {} mode: 1 vCPU, {} MiB guest, raw 512 MiB image on tmpfs, tap; fio {engine} direct=1 iodepth=16, iperf3 TCP; {runtime} s each; medians of {rounds} interleaved rounds",
        mode, spec.memory_mib
    );
    println!();
    println!("QEMU peer: {}", peer.describe());
    println!();
    println!("| test | unit | runs | {kiln_label} | QEMU microvm | Kiln/QEMU |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut missing = 0;
    for (test, key, unit, scale) in FIGURES
        .iter()
        .filter(|f| only.is_empty() || only.iter().any(|t| t == f.0))
    {
        let figures = |vmm: &str| -> Vec<f64> {
            results
                .get(&(vmm.to_string(), test.to_string()))
                .map(|rs| {
                    rs.iter()
                        .filter_map(|r| r.get(*key))
                        .map(|v| v * scale)
                        .collect()
                })
                .unwrap_or_default()
        };
        let (mut k, mut q) = (figures("kiln"), figures("qemu"));
        missing += (rounds - k.len().min(rounds)) + (rounds - q.len().min(rounds));
        let (kn, qn) = (k.len(), q.len());
        let (km, qm) = (median(&mut k), median(&mut q));
        let digits = if *unit == "kIOPS" { 2 } else { 0 };
        println!(
            "| {test} | {unit} | {kn}/{qn} | {km:.digits$} | {qm:.digits$} | {:.2}x |",
            km / qm
        );
    }
    if missing > 0 {
        fail(&format!(
            "{missing} figures missing (log: {})",
            log.display()
        ));
    }
    if let Some(e) = error {
        fail(&e.to_string());
    }
}
