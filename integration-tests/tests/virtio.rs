//! End-to-end tests of the virtio-pci devices (block, net, vsock, balloon,
//! rng, console) with the default guest and a guest kit (a script at
//! `/kiln/run` plus host tools), on hardware KVM or in the nested KVM host.
//!
//! Each check runs twice: against Kiln (`kiln run --disk/--net/...`), and
//! against QEMU with its own virtio-pci devices (`*_qemu_peer`), which
//! proves the guest side, the tools and the rig plumbing independently of
//! Kiln. The VMM command lines live in `kiln_integration_tests::virtio_vm`.
//! Checks are grouped so each scenario boots one nested host and one guest.

use std::time::Duration;

use kiln_integration_tests::guest_kit::host_tool;
use kiln_integration_tests::{run, Disk, GuestKit, Outcome, PeerQemu, Scenario, VmSpec, Vmm};

/// The scenario name for `vmm`: tests of both VMMs run in parallel.
fn name(base: &str, vmm: Vmm) -> String {
    match vmm {
        Vmm::Kiln => base.to_string(),
        Vmm::Qemu => format!("{base}_qemu_peer"),
    }
}

/// A scenario that runs `body` (host side) with `spec` started for `vmm`,
/// the kit and the tools copied in.
fn scenario(
    base: &str,
    vmm: Vmm,
    kit: &std::path::Path,
    spec: &VmSpec,
    body: &str,
    host_tools: &[&str],
) -> Scenario {
    let script = format!(
        "{}\n{}\n{body}",
        spec.host_prelude(vmm),
        spec.start(vmm, "g")
    );
    let mut s = Scenario::new(&name(base, vmm), &script);
    s.timeout = Duration::from_secs(600);
    s.files.push(kit.to_path_buf());
    for tool in host_tools {
        s.binaries.push(host_tool(tool).unwrap());
    }
    s.binaries.push(host_tool("socat").unwrap());
    if vmm == Vmm::Qemu {
        PeerQemu::ensure_cached().unwrap().add_to(&mut s);
    }
    s
}

fn kib(out: &Outcome, key: &str) -> i64 {
    out.value(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no numeric {key}= in the output\n{}\nlog {}",
                out.output,
                out.log.display()
            )
        })
}

fn expect_value(out: &Outcome, key: &str, want: &str) {
    assert_eq!(
        out.value(key).as_deref(),
        Some(want),
        "{key}\n--- output ---\n{}\n--- log {}",
        out.output,
        out.log.display()
    );
}

/// Shell: wait for the guest to power off, print `VM_EXIT`, the console
/// and the VMM's stderr.
const FINISH: &str = r#"
vm_wait $vm 240; echo VM_EXIT=$?
exec 3>&-
cat g.out; sed 's/^/VMM_ERR: /' g.err
"#;

// ---------------------------------------------------------------- block

const BLOCK_GUEST: &str = r#"
rw=$(by_serial rw); ro=$(by_serial ro); full=$(by_serial full)
echo "BLK_DEVS=$rw,$ro,$full"
head -c 67108864 /dev/urandom > /tmp/data
echo "GUEST_SHA=$(sha256sum /tmp/data | cut -d' ' -f1)"
dd if=/tmp/data of="$rw" bs=1M oflag=direct conv=fsync 2>/dev/null; echo "RW_DD=$?"
rm /tmp/data
echo "GUEST_READBACK_SHA=$(dd if="$rw" bs=1M count=64 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo "RO_FLAG=$(cat /sys/block/${ro#/dev/}/ro)"
dd if=/dev/zero of="$ro" bs=4096 count=4 oflag=direct conv=fsync 2>/tmp/ro.err; echo "RO_DD=$?"; sed 's/^/RO_ERR: /' /tmp/ro.err
dd if=/dev/urandom of="$full" bs=1M count=24 oflag=direct 2>/tmp/full.err; echo "FULL_DD=$?"; sed 's/^/FULL_ERR: /' /tmp/full.err
echo "FULL_KERNEL_IO_ERRORS=$(dmesg | grep -c 'I/O error')"
echo BLOCK_ERRORS_DONE
wait_host still-there && echo GUEST_STILL_ANSWERS=yes
echo "FULL_READ_AFTER=$(dd if="$full" bs=4096 count=1 iflag=direct 2>/dev/null | wc -c)"
"#;

const BLOCK_HOST: &str = r#"
wait_for BLOCK_ERRORS_DONE g.out 300 || bail "wait_for BLOCK_ERRORS_DONE"
echo "VM_RUNNING_AFTER_ERRORS=$(kill -0 $vm 2>/dev/null && echo yes || echo no)"
say still-there
"#;

const BLOCK_HOST_AFTER: &str = r#"
echo "HOST_SHA=$(head -c 67108864 rw.img | sha256sum | cut -d' ' -f1)"
sha256sum -c ro.sha >/dev/null 2>&1 && echo RO_UNCHANGED=yes || echo RO_UNCHANGED=no
umount full
"#;

fn block(vmm: Vmm) {
    let kit = GuestKit::new(BLOCK_GUEST)
        .build(&name("block", vmm))
        .unwrap();
    let mut spec = VmSpec::new(&kit.to_string_lossy());
    spec.memory_mib = 384;
    spec.disks = vec![
        Disk {
            path: "$WORKDIR/rw.img".into(),
            readonly: false,
            serial: "rw".into(),
        },
        Disk {
            path: "$WORKDIR/ro.img".into(),
            readonly: true,
            serial: "ro".into(),
        },
        Disk {
            path: "$WORKDIR/full/disk.img".into(),
            readonly: false,
            serial: "full".into(),
        },
    ];
    // The images exist before the VMM starts: a setup part ahead of start.
    let setup = r#"
truncate -s 128M rw.img
head -c 8388608 /dev/urandom > ro.img; sha256sum ro.img > ro.sha
mkdir full && mount -t tmpfs -o size=4m tmpfs full && truncate -s 64M full/disk.img
"#;
    let body = format!("{BLOCK_HOST}\n{FINISH}\n{BLOCK_HOST_AFTER}");
    let mut s = scenario("block", vmm, &kit, &spec, &body, &[]);
    s.script = format!("{setup}\n{}", s.script);
    let out = run(&s).unwrap();
    out.expect_exit(0);
    expect_value(&out, "VM_RUNNING_AFTER_ERRORS", "yes");
    expect_value(&out, "GUEST_STILL_ANSWERS", "yes");
    expect_value(&out, "VM_EXIT", "0");
    expect_value(&out, "RW_DD", "0");
    let guest_sha = out.value("GUEST_SHA").unwrap_or_default();
    assert_eq!(guest_sha.len(), 64, "guest sha256\n{}", out.output);
    expect_value(&out, "GUEST_READBACK_SHA", &guest_sha);
    expect_value(&out, "HOST_SHA", &guest_sha);
    expect_value(&out, "RO_FLAG", "1");
    assert_ne!(
        out.value("RO_DD").as_deref(),
        Some("0"),
        "a write to the read-only disk succeeded\n{}",
        out.output
    );
    expect_value(&out, "RO_UNCHANGED", "yes");
    assert_ne!(
        out.value("FULL_DD").as_deref(),
        Some("0"),
        "writing 24 MiB to a disk on a 4 MiB filesystem succeeded\n{}",
        out.output
    );
    assert!(
        kib(&out, "FULL_KERNEL_IO_ERRORS") > 0,
        "the guest kernel logged no I/O error\n{}",
        out.output
    );
    expect_value(&out, "FULL_READ_AFTER", "4096");
    eprintln!("block ({}): {:?}", vmm.name(), out.elapsed);
}

/// 64 MiB written through virtio-blk match on the host; a read-only disk
/// refuses writes and stays unchanged; a disk on a full filesystem gives
/// the guest I/O errors while the VMM keeps running and exits 0.
#[test]
fn block_write_readonly_and_full_backing_file() {
    block(Vmm::Kiln);
}

#[test]
fn block_write_readonly_and_full_backing_file_qemu_peer() {
    block(Vmm::Qemu);
}

// ---------------------------------------------------------------- net

const NET_GUEST: &str = r#"
ip link set lo up
ip addr add $NET.15/24 dev eth0 && ip link set eth0 up
ping -c 3 -w 30 $NET.1 > /tmp/ping 2>&1; echo "GUEST_PING=$?"
echo NET_UP
head -c 104857600 /dev/urandom > /tmp/d
echo "GUEST_SEND_SHA=$(sha256sum /tmp/d | cut -d' ' -f1)"
wait_host send
socat -t 30 -T 60 -u OPEN:/tmp/d TCP:$NET.1:7000; echo "GUEST_SENT=$?"
rm /tmp/d
socat -T 60 -u TCP-LISTEN:7001,reuseaddr OPEN:/tmp/r,creat,trunc & l=$!
sleep 1; echo NET_LISTENING
wait $l
echo "GUEST_RECV_SHA=$(sha256sum /tmp/r | cut -d' ' -f1)"
"#;

const NET_HOST: &str = r#"
tap_up $TAP || bail "tap_up $TAP"
wait_for NET_UP g.out 120 || bail "wait_for NET_UP"
ping -c 3 -w 30 $NET.15 > ping.out 2>&1; echo "HOST_PING=$?"
socat -T 60 -u TCP-LISTEN:7000,reuseaddr OPEN:from_guest,creat,trunc & l=$!
sleep 0.5
wait_for GUEST_SEND_SHA g.out 300 || bail "wait_for GUEST_SEND_SHA"
t0=$(date +%s); say send
vm_wait $l 300 || bail "guest-to-host transfer"
echo "GUEST_TO_HOST_S=$(( $(date +%s) - t0 ))"
echo "HOST_RECV_SHA=$(sha256sum from_guest | cut -d' ' -f1)"
rm from_guest
head -c 104857600 /dev/urandom > to_guest
echo "HOST_SEND_SHA=$(sha256sum to_guest | cut -d' ' -f1)"
wait_for NET_LISTENING g.out 120 || bail "wait_for NET_LISTENING"
t0=$(date +%s)
socat -t 30 -T 60 -u OPEN:to_guest TCP:$NET.15:7001; echo "HOST_SENT=$?"
echo "HOST_TO_GUEST_S=$(( $(date +%s) - t0 ))"
"#;

/// Kiln only: the host-to-guest transfer runs with net0's I/O worker moved
/// at run time to CPU 0 in poll mode, through the control socket.
const KILN_NET_PLACEMENT: &str = r#"
echo "CTL_PLACE=$(vm_ctl set_worker_placement device=net0 'cpus=[0]' wait=poll spin_us=200)"
echo "CTL_BAD_CPU=$(vm_ctl set_worker_placement device=net0 'cpus=[4096]' wait=notify)"
net0=$(vm_ctl workers | tr '{' '\n' | grep '"device":"net0"')
tid=$(echo "$net0" | sed 's/.*"tid":\([0-9]*\).*/\1/')
echo "WORKER_CPUS=$(awk '/^Cpus_allowed_list/ {print $2}' /proc/$vm/task/$tid/status)"
echo "WORKER_WAIT=$(echo "$net0" | sed 's/.*"wait":"\([a-z]*\)".*/\1/')"
echo "WORKER_SPIN_US=$(echo "$net0" | sed 's/.*"spin_us":\([0-9]*\).*/\1/')"
"#;

fn net(vmm: Vmm) {
    let socat = host_tool("socat").unwrap();
    // Different taps and subnets, so both tests can run at once on one
    // host (direct mode); Kiln's is the documented 10.0.2.0/24.
    let (tap, net) = match vmm {
        Vmm::Kiln => ("ktap0", "10.0.2"),
        Vmm::Qemu => ("qtap0", "10.0.3"),
    };
    let kit = GuestKit::new(&format!("NET={net}\n{NET_GUEST}"))
        .binary(socat)
        .build(&name("net", vmm))
        .unwrap();
    let mut spec = VmSpec::new(&kit.to_string_lossy());
    spec.memory_mib = 512;
    spec.tap = Some(tap.into());
    let mut host = NET_HOST.to_string();
    if vmm == Vmm::Kiln {
        spec.control = Some("$WORKDIR/ctl.sock".into());
        host = host.replace(
            "head -c 104857600 /dev/urandom > to_guest",
            &format!("{KILN_NET_PLACEMENT}\nhead -c 104857600 /dev/urandom > to_guest"),
        );
    }
    let body = format!("NET={net}\nTAP={tap}\n{host}\n{FINISH}");
    let mut s = scenario("net", vmm, &kit, &spec, &body, &[]);
    s.host_modules.push("tun".into());
    let out = run(&s).unwrap();
    out.expect_exit(0);
    expect_value(&out, "GUEST_PING", "0");
    expect_value(&out, "HOST_PING", "0");
    expect_value(&out, "GUEST_SENT", "0");
    expect_value(&out, "HOST_SENT", "0");
    let up = out.value("GUEST_SEND_SHA").unwrap_or_default();
    assert_eq!(up.len(), 64, "{}", out.output);
    expect_value(&out, "HOST_RECV_SHA", &up);
    let down = out.value("HOST_SEND_SHA").unwrap_or_default();
    assert_eq!(down.len(), 64, "{}", out.output);
    expect_value(&out, "GUEST_RECV_SHA", &down);
    expect_value(&out, "VM_EXIT", "0");
    if vmm == Vmm::Kiln {
        let place = out.value("CTL_PLACE").unwrap_or_default();
        assert!(
            place.contains(r#""device":"net0""#) && place.contains(r#""cpus":[0]"#),
            "set_worker_placement answered {place:?}\n{}",
            out.output
        );
        let bad = out.value("CTL_BAD_CPU").unwrap_or_default();
        assert!(
            bad.starts_with("kiln: error: invalid_request: CPU 4096 is not available"),
            "a CPU the host lacks must be refused: {bad:?}"
        );
        expect_value(&out, "WORKER_CPUS", "0");
        expect_value(&out, "WORKER_WAIT", "poll");
        expect_value(&out, "WORKER_SPIN_US", "200");
    }
    eprintln!(
        "net ({}): {:?}; 100 MiB guest->host {} s, host->guest {} s",
        vmm.name(),
        out.elapsed,
        out.value("GUEST_TO_HOST_S").unwrap_or_default(),
        out.value("HOST_TO_GUEST_S").unwrap_or_default()
    );
}

/// Guest and host ping each other over virtio-net on a tap, and 100 MiB
/// of random data cross each way over TCP with matching sha256.
#[test]
fn net_ping_and_100m_tcp_each_way() {
    net(Vmm::Kiln);
}

#[test]
fn net_ping_and_100m_tcp_each_way_qemu_peer() {
    net(Vmm::Qemu);
}

// ---------------------------------------------------------------- vsock

const VSOCK_GUEST: &str = r#"
socat VSOCK-LISTEN:5000,fork,reuseaddr,backlog=256 PIPE & echo_srv=$!
sleep 1
echo VSOCK_READY
wait_host host-listening
echo "G2H_ECHO=$(echo guest-hello | socat -t 20 -T 60 - VSOCK-CONNECT:2:6000)"
t0=$(date +%s)
"$VSOCK_ECHO" 2 6000 $G2H_N > /tmp/echo.out 2>&1
echo "G2H_CONCURRENT_OK=$(sed -n 's/^VSOCK_ECHO_OK=//p' /tmp/echo.out)"
echo "G2H_CONCURRENT_S=$(( $(date +%s) - t0 ))"
grep -m 3 VSOCK_ECHO_FAIL /tmp/echo.out | sed 's/^/G2H_/'
wait_host done
"#;

const VSOCK_HOST: &str = r#"
wait_for VSOCK_READY g.out 120 || bail "wait_for VSOCK_READY"
echo "H2G_ECHO=$(echo host-hello | vsock_connect 5000)"
vsock_echo_many 5000 100 > h2g.out 2>&1
echo "H2G_CONCURRENT_OK=$(sed -n 's/^VSOCK_ECHO_OK=//p' h2g.out)"
grep -m 3 VSOCK_ECHO_FAIL h2g.out | sed 's/^/H2G_/'
socat $(vsock_listen_addr 6000) PIPE & lst=$!
sleep 0.5
say host-listening
wait_for G2H_CONCURRENT_OK g.out 300 || bail "wait_for G2H_CONCURRENT_OK"
say done
"#;

/// Concurrent guest-to-host connections, opened at once by
/// `kiln-vsock-echo` (it sets a 30 s connect timeout; socat leaves the
/// kernel's 2 s, too short for 100 connects under nested emulation).
const G2H_CONNECTIONS: u32 = 100;

fn vsock(vmm: Vmm) {
    let socat = host_tool("socat").unwrap();
    let echo = env!("CARGO_BIN_EXE_kiln-vsock-echo");
    let guest = format!("G2H_N={G2H_CONNECTIONS}\nVSOCK_ECHO={echo}\n{VSOCK_GUEST}");
    let kit = GuestKit::new(&guest)
        .binary(socat)
        .binary(echo)
        .build(&name("vsock", vmm))
        .unwrap();
    let mut spec = VmSpec::new(&kit.to_string_lossy());
    spec.memory_mib = 512;
    spec.vsock_uds = Some("$WORKDIR/v.sock".into());
    let body = format!("VSOCK_ECHO={echo}\n{VSOCK_HOST}\n{FINISH}\nkill $lst 2>/dev/null");
    let mut s = scenario("vsock", vmm, &kit, &spec, &body, &[]);
    s.binaries.push(echo.into());
    if vmm == Vmm::Qemu {
        s.host_modules.push("vhost_vsock".into());
    }
    let out = run(&s).unwrap();
    out.expect_exit(0);
    expect_value(&out, "H2G_ECHO", "host-hello");
    expect_value(&out, "G2H_ECHO", "guest-hello");
    expect_value(&out, "H2G_CONCURRENT_OK", "100");
    expect_value(&out, "G2H_CONCURRENT_OK", &G2H_CONNECTIONS.to_string());
    expect_value(&out, "VM_EXIT", "0");
    eprintln!("vsock ({}): {:?}", vmm.name(), out.elapsed);
}

/// Echo over vsock host→guest (Unix socket + `CONNECT`) and guest→host
/// (CID 2 to the `uds_PORT` listener) with socat, then 100 concurrent
/// connections each way (kiln-vsock-echo), every answer checked.
#[test]
fn vsock_echo_both_ways_and_100_connections() {
    vsock(Vmm::Kiln);
}

#[test]
fn vsock_echo_both_ways_and_100_connections_qemu_peer() {
    vsock(Vmm::Qemu);
}

// ---------------------------------------------------------------- balloon

const BALLOON_GUEST: &str = r#"
mem() { awk -v k="$1:" '$1 == k {print $2}' /proc/meminfo; }
# avail_below KIB SECONDS / avail_above KIB SECONDS: wait for MemAvailable to cross KIB.
avail_below() { n=$2; while [ "$(mem MemAvailable)" -ge "$1" ]; do n=$((n-1)); [ $n -le 0 ] && return 1; sleep 1; done; }
avail_above() { n=$2; while [ "$(mem MemAvailable)" -le "$1" ]; do n=$((n-1)); [ $n -le 0 ] && return 1; sleep 1; done; }
mkdir -p /mnt/t && mount -t tmpfs -o size=460m tmpfs /mnt/t
dd if=/dev/zero of=/mnt/t/fill bs=1M count=320 2>/dev/null; echo "TOUCH_DD=$?"
echo BALLOON_TOUCHED
wait_host free
rm /mnt/t/fill
sleep 2
freed=$(mem MemAvailable)
echo "GUEST_FREED_AVAIL_KB=$freed"
echo "GUEST_FREED_TOTAL_KB=$(mem MemTotal)"
echo BALLOON_FREED
avail_below $((freed - 230 * 1024)) 120 || echo GUEST_INFLATE_TIMEOUT=1
# The second guest (no free page reporting) only measures what inflating gives back.
case " $(cat /proc/cmdline) " in *" kiln.rss_only "*) sleep 2; echo BALLOON_INFLATED; wait_host measured; exit 0 ;; esac
sleep 2
echo "GUEST_INFLATED_AVAIL_KB=$(mem MemAvailable)"
echo "GUEST_INFLATED_TOTAL_KB=$(mem MemTotal)"
echo BALLOON_INFLATED
wait_host meminfo
echo "GUEST_STATS_MEMFREE_KB=$(mem MemFree)"
wait_host deflating
avail_above $((freed - 32 * 1024)) 120 || echo GUEST_DEFLATE_TIMEOUT=1
echo "GUEST_DEFLATED_AVAIL_KB=$(mem MemAvailable)"
echo BALLOON_DEFLATED
wait_host inflating-again
avail_below $((freed - 230 * 1024)) 120 || echo GUEST_REINFLATE_TIMEOUT=1
echo "GUEST_REINFLATED_AVAIL_KB=$(mem MemAvailable)"
# More than is left outside the balloon: succeeds only by deflating on OOM.
dd if=/dev/zero of=/mnt/t/big bs=1M count=400 2>/tmp/dd.err; echo "OOM_DD=$?"; sed 's/^/OOM_DD_ERR: /' /tmp/dd.err
echo "OOM_FILE_MIB=$(( $(stat -c %s /mnt/t/big) / 1048576 ))"
echo "GUEST_AFTER_OOM_AVAIL_KB=$(mem MemAvailable)"
"#;

const BALLOON_HOST: &str = r#"
wait_for BALLOON_TOUCHED g.out 180 || bail "wait_for BALLOON_TOUCHED"
echo "RSS_TOUCHED_KB=$(rss_kib $vm)"
say free
wait_for BALLOON_FREED g.out 60 || bail "wait_for BALLOON_FREED"
echo "RSS_FREED_KB=$(rss_kib $vm)"
echo "CTL_INFLATE=$(vm_ctl set_balloon_target mib=256)"
wait_for BALLOON_INFLATED g.out 180 || bail "wait_for BALLOON_INFLATED"
sleep 2
echo "RSS_INFLATED_KB=$(rss_kib $vm)"
echo "CTL_STATS=$(vm_ctl balloon_stats)"
say meminfo
wait_for GUEST_STATS_MEMFREE_KB g.out 30 || bail "wait_for GUEST_STATS_MEMFREE_KB"
echo "CTL_STATUS=$(vm_ctl status | head -1)"
echo "CTL_DEFLATE=$(vm_ctl set_balloon_target mib=0)"
say deflating
wait_for BALLOON_DEFLATED g.out 180 || bail "wait_for BALLOON_DEFLATED"
echo "CTL_REINFLATE=$(vm_ctl set_balloon_target mib=256)"
say inflating-again
"#;

/// A second guest without free page reporting, so freed memory stays in
/// the VMM's RSS until the balloon takes it.
const BALLOON_RSS_HOST: &str = r#"
wait_for BALLOON_TOUCHED r.out 180 || bail "wait_for BALLOON_TOUCHED (second guest)"
say free
wait_for BALLOON_FREED r.out 60 || bail "wait_for BALLOON_FREED (second guest)"
sleep 3
echo "RSS2_FREED_KB=$(rss_kib $vm)"
echo "CTL2_INFLATE=$(vm_ctl set_balloon_target mib=256)"
wait_for BALLOON_INFLATED r.out 180 || bail "wait_for BALLOON_INFLATED (second guest)"
echo "RSS2_INFLATED_KB=$(rss_kib $vm)"
say measured
vm_wait $vm 120; echo VM2_EXIT=$?
exec 3>&-
grep -E '^(GUEST_INFLATE_TIMEOUT|KILN_RUN_EXIT)' r.out | sed 's/^/VM2_/'; sed 's/^/VMM2_ERR: /' r.err
"#;

/// The number after `"key":` in a line of JSON.
fn json_number(json: &str, key: &str) -> Option<i64> {
    let rest = &json[json.find(&format!("\"{key}\":"))? + key.len() + 3..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// `key` holds a set_balloon_target answer for `mib`.
fn expect_target(out: &Outcome, key: &str, mib: i64) {
    let answer = out.value(key).unwrap_or_default();
    assert_eq!(
        json_number(&answer, "target_mib"),
        Some(mib),
        "{key}: set_balloon_target answered {answer:?}\n{}",
        out.output
    );
}

fn balloon(vmm: Vmm) {
    let kit = GuestKit::new(BALLOON_GUEST)
        .build(&name("balloon", vmm))
        .unwrap();
    let mut spec = VmSpec::new(&kit.to_string_lossy());
    spec.memory_mib = 512;
    spec.balloon = true;
    spec.control = Some("$WORKDIR/ctl.sock".into());
    let mut rss_only = spec.clone();
    rss_only.balloon_free_page_reporting = false;
    rss_only.cmdline_extra.push_str(" kiln.rss_only");
    rss_only.control = Some("$WORKDIR/ctl2.sock".into());
    let body = format!(
        "{BALLOON_HOST}\n{FINISH}\nVM_CTL=\"$WORKDIR/ctl2.sock\"\n{}\n{BALLOON_RSS_HOST}",
        rss_only.start(vmm, "r")
    );
    let s = scenario("balloon", vmm, &kit, &spec, &body, &[]);
    let out = run(&s).unwrap();
    out.expect_exit(0);
    let log = out.log.display().to_string();
    expect_value(&out, "TOUCH_DD", "0");
    expect_target(&out, "CTL_INFLATE", 256);
    expect_target(&out, "CTL_DEFLATE", 0);
    expect_target(&out, "CTL_REINFLATE", 256);
    for timeout in [
        "GUEST_INFLATE_TIMEOUT",
        "GUEST_DEFLATE_TIMEOUT",
        "GUEST_REINFLATE_TIMEOUT",
    ] {
        assert!(
            out.value(timeout).is_none(),
            "{timeout}: the guest never saw the balloon change\n{}\nlog {log}",
            out.output
        );
    }
    // With free page reporting, freeing already returns memory: measured
    // from the peak. The second guest has none: inflating alone must do it.
    let (touched, inflated) = (kib(&out, "RSS_TOUCHED_KB"), kib(&out, "RSS_INFLATED_KB"));
    assert!(
        touched - inflated >= 230 * 1024,
        "VMM RSS went from {touched} kB (guest memory touched) to {inflated} kB (balloon at 256 MiB): less than 230 MiB given back\n{}\nlog {log}",
        out.output
    );
    expect_target(&out, "CTL2_INFLATE", 256);
    expect_value(&out, "VM2_KILN_RUN_EXIT", "0");
    expect_value(&out, "VM2_EXIT", "0");
    assert!(
        out.value("VM2_GUEST_INFLATE_TIMEOUT").is_none(),
        "the second guest never saw the balloon inflate\n{}\nlog {log}",
        out.output
    );
    let (freed2, inflated2) = (kib(&out, "RSS2_FREED_KB"), kib(&out, "RSS2_INFLATED_KB"));
    assert!(
        freed2 - inflated2 >= 230 * 1024,
        "without free page reporting, inflating to 256 MiB took VMM RSS from {freed2} kB to {inflated2} kB: less than 230 MiB given back\n{}\nlog {log}",
        out.output
    );
    let (freed_avail, inflated_avail) = (
        kib(&out, "GUEST_FREED_AVAIL_KB"),
        kib(&out, "GUEST_INFLATED_AVAIL_KB"),
    );
    assert!(
        freed_avail - inflated_avail >= 230 * 1024,
        "guest MemAvailable {freed_avail} → {inflated_avail} kB\n{}",
        out.output
    );
    assert!(
        kib(&out, "GUEST_DEFLATED_AVAIL_KB") >= freed_avail - 32 * 1024,
        "deflating gave the memory back\n{}",
        out.output
    );
    // The balloon's stats (bytes) agree with the guest's MemFree.
    let stats = out.value("CTL_STATS").unwrap_or_default();
    let free_bytes: i64 = json_number(&stats, "free_memory")
        .unwrap_or_else(|| panic!("balloon_stats without free_memory: {stats:?}\nlog {log}"));
    let guest_free = kib(&out, "GUEST_STATS_MEMFREE_KB");
    assert!(
        (free_bytes / 1024 - guest_free).abs() <= 32 * 1024,
        "balloon_stats free_memory={free_bytes} B, guest MemFree {guest_free} kB\nlog {log}"
    );
    expect_value(&out, "OOM_DD", "0");
    expect_value(&out, "OOM_FILE_MIB", "400");
    expect_value(&out, "VM_EXIT", "0");
    eprintln!(
        "balloon ({}): {:?}; RSS touched {touched} kB, freed {} kB, inflated {inflated} kB; without page reporting freed {freed2} kB, inflated {inflated2} kB",
        vmm.name(),
        out.elapsed,
        out.value("RSS_FREED_KB").unwrap_or_default()
    );
}

/// A 512 MiB guest touches and frees memory; inflating the balloon to
/// 256 MiB over the control socket gives >= 230 MiB of the VMM's RSS back
/// (from the peak with free page reporting on; from the freed state in a
/// second guest without it) and takes it from the guest; deflating returns
/// it; the stats match the guest's MemFree; with deflate-on-oom an
/// allocation bigger than what is left succeeds.
#[test]
fn balloon_inflate_deflate_stats_and_deflate_on_oom() {
    balloon(Vmm::Kiln);
}

#[test]
fn balloon_inflate_deflate_stats_and_deflate_on_oom_qemu_peer() {
    balloon(Vmm::Qemu);
}

// ---------------------------------------------------------------- rng, console, drivers

const RNG_CONSOLE_GUEST: &str = r#"
echo "VIRTIO_DRIVERS=$(ls /sys/bus/virtio/drivers | tr '\n' ' ')"
lsmod | sed 's/^/LSMOD: /'
echo "RNG_CURRENT=$(cat /sys/class/misc/hw_random/rng_current)"
echo "RNG_BYTES=$(dd if=/dev/hwrng bs=4096 count=1 2>/dev/null | wc -c)"
a=$(dd if=/dev/hwrng bs=4096 count=1 2>/dev/null | sha256sum); b=$(dd if=/dev/hwrng bs=4096 count=1 2>/dev/null | sha256sum)
[ "$a" != "$b" ] && echo RNG_DIFFERS=yes
echo "HVC_MARKER_$(cat /proc/sys/kernel/random/boot_id | cut -c1-8)_KILN" > /dev/hvc0; echo "HVC_WRITE=$?"
"#;

fn rng_console(vmm: Vmm) {
    let kit = GuestKit::new(RNG_CONSOLE_GUEST)
        .build(&name("rng_console", vmm))
        .unwrap();
    let mut spec = VmSpec::new(&kit.to_string_lossy());
    spec.rng = true;
    spec.virtio_console = Some("$WORKDIR/hvc0.txt".into());
    let body = format!("{FINISH}\necho \"HOST_HVC_LINE=$(grep HVC_MARKER_ hvc0.txt)\"");
    let out = run(&scenario("rng_console", vmm, &kit, &spec, &body, &[])).unwrap();
    out.expect_exit(0);
    let current = out.value("RNG_CURRENT").unwrap_or_default();
    assert!(
        current.starts_with("virtio_rng"),
        "rng_current is {current:?}\n{}",
        out.output
    );
    expect_value(&out, "RNG_BYTES", "4096");
    expect_value(&out, "RNG_DIFFERS", "yes");
    expect_value(&out, "HVC_WRITE", "0");
    let marker = out.value("HOST_HVC_LINE").unwrap_or_default();
    assert!(
        marker.starts_with("HVC_MARKER_") && marker.ends_with("_KILN"),
        "marker not in the console file: {marker:?}\n{}",
        out.output
    );
    let drivers = out.value("VIRTIO_DRIVERS").unwrap_or_default();
    for d in [
        "virtio_blk",
        "virtio_net",
        "virtio_console",
        "virtio_balloon",
        "virtio_rng",
        "vmw_vsock_virtio_transport",
    ] {
        assert!(
            drivers.contains(d),
            "driver {d} not registered in the guest: {drivers}\n{}",
            out.output
        );
    }
    expect_value(&out, "VM_EXIT", "0");
    eprintln!("rng_console ({}): {:?}", vmm.name(), out.elapsed);
}

/// The guest reads 4 KiB from /dev/hwrng backed by virtio-rng, and a line
/// it writes to /dev/hvc0 lands in the virtio-console file; every virtio
/// driver of the default guest is registered.
#[test]
fn rng_and_virtio_console() {
    rng_console(Vmm::Kiln);
}

#[test]
fn rng_and_virtio_console_qemu_peer() {
    rng_console(Vmm::Qemu);
}
