//! Tests against a real tap, each run inside a private network namespace
//! so nothing leaks into the host: the outer test re-runs this test binary
//! under `unshare --net`, filtered to the `inner_` tests, which are ignored
//! (and do nothing) when run any other way. If the real tap cannot be used
//! (no `/dev/net/tun`, no `unshare`, not privileged), the outer test fails
//! with the reason; it never passes silently.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::tests::{wait_until, Driver, TestInterrupt, MEM_SIZE};
use super::*;
use crate::virtio::{features, DeviceContext, VirtioDevice};

const INNER_ENV: &str = "KILN_NET_TAP_NETNS";
const INNER_PREFIX: &str = "virtio::net::tap_tests::inner_";
const INNER_TESTS: usize = 2;

#[test]
fn real_tap_tests_in_a_private_network_namespace() {
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "/dev/net/tun does not exist: the real-tap tests cannot run (modprobe tun)"
    );
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new("unshare")
        .arg("--net")
        .arg("--")
        .arg(&exe)
        .args([INNER_PREFIX, "--ignored", "--nocapture", "--test-threads=1"])
        .env(INNER_ENV, "1")
        .output()
        .expect("cannot run unshare (util-linux) for the real-tap tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "real-tap tests failed in their network namespace:\n{stdout}\n{stderr}"
    );
    let expect = format!("{INNER_TESTS} passed");
    assert!(
        stdout.contains(&expect),
        "expected {expect} inside the namespace:\n{stdout}\n{stderr}"
    );
}

/// The inner tests create taps: outside their private namespace they
/// would touch the host's network, so they refuse to run (a failure, not a
/// silent pass). nextest's default filter leaves them out.
fn require_namespace() {
    assert!(
        std::env::var_os(INNER_ENV).is_some(),
        "not run: this test only runs inside the private network namespace that real_tap_tests_in_a_private_network_namespace creates"
    );
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .expect("cannot run ip (iproute2)")
        .success()
}

fn must_ip(args: &[&str]) {
    assert!(ip(args), "ip {} failed", args.join(" "));
}

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const HOST_IP: [u8; 4] = [10, 77, 0, 1];

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn arp_reply(host_mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&host_mac);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&host_mac);
    f.extend_from_slice(&HOST_IP);
    f
}

fn udp_frame(host_mac: [u8; 6], src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&host_mac);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(&HOST_IP);
    let c = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&src_port.to_be_bytes());
    f.extend_from_slice(&dst_port.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (allowed for IPv4)
    f.extend_from_slice(payload);
    f
}

const RX_RING: u64 = 0;
const TX_RING: u64 = 0x8000;
const RX_DATA: u64 = 0x10_0000;
const TX_DATA: u64 = 0x18_0000;

/// The guest's view: frames it received (header stripped), by used order.
fn received(mem: &GuestMemoryMmap, rx: &Driver) -> Vec<(Vec<u8>, u16)> {
    rx.used()
        .into_iter()
        .map(|(head, len)| {
            assert!(
                head < 16 && len <= 2048,
                "used entry ({head}, {len}) of {:?}",
                rx.used()
            );
            let mut v = vec![0u8; len as usize];
            mem.read_slice(&mut v, GuestAddress(RX_DATA + u64::from(head) * 0x1000))
                .unwrap();
            let num_buffers = u16::from_le_bytes([v[10], v[11]]);
            (v.split_off(VNET_HDR_LEN), num_buffers)
        })
        .collect()
}

#[test]
#[ignore = "runs inside a private network namespace, started by real_tap_tests_in_a_private_network_namespace"]
fn inner_guest_and_host_talk_over_the_tap() {
    require_namespace();
    let mut dev =
        VirtioNet::new("tap=kt0,mac=52:54:00:00:00:02".parse().unwrap()).expect("create tap kt0");
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/kt0/disable_ipv6", "1");
    must_ip(&["addr", "add", "10.77.0.1/24", "dev", "kt0"]);
    must_ip(&["link", "set", "kt0", "up"]);

    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
    let mut rx = Driver::new(&mem, RX_RING, 16);
    let mut tx = Driver::new(&mem, TX_RING, 16);
    for i in 0..16 {
        assert_eq!(rx.add(&[(RX_DATA + i * 0x1000, 2048, true)]), i as u16);
    }
    let irq = Arc::new(TestInterrupt::default());
    let acked = feature::MRG_RXBUF
        | feature::CSUM
        | feature::GUEST_CSUM
        | feature::GUEST_TSO4
        | feature::GUEST_TSO6
        | feature::HOST_TSO4
        | features::VERSION_1;
    dev.activate(DeviceContext {
        mem: mem.clone(),
        queues: vec![rx.context(RX_QUEUE, false), tx.context(TX_QUEUE, false)],
        acked_features: acked,
        interrupt: irq.clone(),
    })
    .expect("activate");

    // The host talks to the guest's address: the kernel first asks who
    // has it, and the device hands that ARP request to the guest.
    let host = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::from(HOST_IP), 7777))
        .expect("bind on kt0's address");
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.send_to(
        b"ping-from-host",
        SocketAddrV4::new(Ipv4Addr::from(GUEST_IP), 9),
    )
    .expect("send to the guest");
    let find_arp = || {
        received(&mem, &rx).into_iter().find(|(f, _)| {
            f.len() >= 42
                && f[12..14] == [0x08, 0x06]
                && f[20..22] == [0, 1]
                && f[38..42] == GUEST_IP
        })
    };
    wait_until("the kernel's ARP request in the guest", || {
        find_arp().is_some()
    });
    let (arp, num_buffers) = find_arp().unwrap();
    assert_eq!(num_buffers, 1);
    assert_eq!(&arp[0..6], &[0xff; 6], "broadcast");
    let host_mac: [u8; 6] = arp[6..12].try_into().unwrap();

    // The guest answers; the kernel then releases the queued datagram.
    let mut next_tx = TX_DATA;
    let mut transmit = |frame: &[u8], tx: &mut Driver| {
        mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(next_tx))
            .unwrap();
        mem.write_slice(frame, GuestAddress(next_tx + 0x100))
            .unwrap();
        tx.add(&[
            (next_tx, VNET_HDR_LEN as u32, false),
            (next_tx + 0x100, frame.len() as u32, false),
        ]);
        tx.kick();
        next_tx += 0x1000;
    };
    transmit(&arp_reply(host_mac), &mut tx);
    let find_udp = || {
        received(&mem, &rx).into_iter().find(|(f, _)| {
            f.len() >= 42
                && f[12..14] == [0x08, 0x00]
                && f[23] == 17
                && f[30..34] == GUEST_IP
                && f[36..38] == 9u16.to_be_bytes()
        })
    };
    wait_until(
        "the host's datagram in the guest after the guest's ARP reply",
        || find_udp().is_some(),
    );
    let (udp, _) = find_udp().unwrap();
    assert_eq!(&udp[0..6], &GUEST_MAC);
    assert_eq!(&udp[42..], b"ping-from-host");

    // A datagram the guest builds arrives on the host socket.
    transmit(
        &udp_frame(host_mac, 5555, 7777, b"hello-from-guest"),
        &mut tx,
    );
    let mut buf = [0u8; 64];
    let (n, from) = host
        .recv_from(&mut buf)
        .expect("the guest's datagram on the host");
    assert_eq!(&buf[..n], b"hello-from-guest");
    assert_eq!(from.to_string(), "10.77.0.2:5555");

    tx.wait_used(2);
    assert_eq!(tx.used(), vec![(0, 0), (2, 0)]);
    let s = dev.stats();
    assert_eq!((s.tx_frames, s.tx_dropped, s.bad_chains), (2, 0, 0));
    assert!(s.rx_frames >= 2);
    assert!(irq.signals[0].load(std::sync::atomic::Ordering::SeqCst) > 0);
    dev.reset();
}

#[test]
#[ignore = "runs inside a private network namespace, started by real_tap_tests_in_a_private_network_namespace"]
fn inner_tap_errors_and_lifetime() {
    require_namespace();
    let first = Tap::open("kbusy0").expect("create kbusy0");
    assert!(ip(&["link", "show", "kbusy0"]));
    let busy = Tap::open("kbusy0").unwrap_err();
    assert!(matches!(busy, TapError::Busy { .. }), "{busy}");
    assert!(busy.to_string().contains("busy"), "{busy}");
    drop(first);
    assert!(
        !ip(&["link", "show", "kbusy0"]),
        "a tap Kiln created disappears with it"
    );

    let not_tap = Tap::open("lo").unwrap_err();
    assert!(matches!(not_tap, TapError::NotATap { .. }), "{not_tap}");
    let long = VirtioNet::new(NetConfig::new("sixteen-bytes-xx"))
        .err()
        .expect("long name refused");
    assert!(
        matches!(long, NetError::Tap(TapError::InvalidName { .. })),
        "{long}"
    );

    // A persistent tap made by the host is attached to and left in place.
    must_ip(&["tuntap", "add", "kpers0", "mode", "tap"]);
    let dev = VirtioNet::new(NetConfig::new("kpers0")).expect("attach to kpers0");
    assert_eq!(dev.tap_name(), "kpers0");
    assert_eq!(dev.mac(), mac_from_name("kpers0"));
    drop(dev);
    assert!(ip(&["link", "show", "kpers0"]), "a persistent tap stays");
    must_ip(&["link", "del", "kpers0"]);
}
