//! The way in: TCP ports of the nested host forwarded to 127.0.0.1 of this
//! host through QEMU's user networking, so tools here (curl, a browser, a
//! VNC client) reach a service inside as a user's tools would.
//!
//! `restrict=on` cuts the nested host off from everything else: it reaches
//! neither this host nor any network; only the forwarded connections come in.

use std::net::{Ipv4Addr, TcpListener};

use crate::RigError;

/// The nested host's address on QEMU's user network, and its gateway.
pub const NESTED_ADDRESS: &str = "10.0.2.15/24";
pub const NESTED_GATEWAY: &str = "10.0.2.2";

/// One forwarded port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forward {
    pub guest: u16,
    pub host: u16,
}

/// Free ports on 127.0.0.1, one per guest port. The kernel picks each
/// (bind to port 0); they are released when this returns, so another
/// program may take one before QEMU binds it: QEMU then fails with "Could
/// not set up host forwarding rule" and the rig retries with new ports.
pub fn pick(guest_ports: &[u16]) -> Result<Vec<Forward>, RigError> {
    let mut seen = Vec::new();
    for &g in guest_ports {
        if g == 0 {
            return Err(RigError::Setup("forward_ports: port 0".into()));
        }
        if seen.contains(&g) {
            return Err(RigError::Setup(format!("forward_ports: {g} given twice")));
        }
        seen.push(g);
    }
    // All listeners stay open until every port is chosen, so no port is
    // handed out twice.
    let mut held = Vec::new();
    for &guest in guest_ports {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| RigError::Setup(format!("finding a free port on 127.0.0.1: {e}")))?;
        let host = listener
            .local_addr()
            .map_err(|e| RigError::Setup(format!("reading a bound port: {e}")))?
            .port();
        held.push((Forward { guest, host }, listener));
    }
    Ok(held.into_iter().map(|(f, _)| f).collect())
}

/// QEMU arguments for the nested host's network: none at all without
/// forwards (`-nic none` also drops QEMU's default NIC, whose user network
/// would not be restricted), else one restricted user network with the
/// forwards and a virtio-net NIC (no option ROM: the kernel is loaded
/// directly).
pub fn qemu_args(forwards: &[Forward]) -> Vec<String> {
    if forwards.is_empty() {
        return vec!["-nic".into(), "none".into()];
    }
    let mut netdev = String::from("user,id=rigway,restrict=on");
    for f in forwards {
        netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{}-:{}", f.host, f.guest));
    }
    vec![
        "-netdev".into(),
        netdev,
        "-device".into(),
        "virtio-net-pci,netdev=rigway,romfile=".into(),
    ]
}

/// Whether a line QEMU printed says a forwarded port could not be bound.
pub fn is_bind_failure(qemu_line: &str) -> bool {
    qemu_line.contains("host forwarding rule")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picked_ports_are_distinct_and_free_on_loopback() {
        let f = pick(&[80, 8080, 5900]).unwrap();
        assert_eq!(
            f.iter().map(|f| f.guest).collect::<Vec<_>>(),
            [80, 8080, 5900]
        );
        let mut hosts: Vec<u16> = f.iter().map(|f| f.host).collect();
        hosts.sort();
        hosts.dedup();
        assert_eq!(hosts.len(), 3);
        for f in &f {
            TcpListener::bind((Ipv4Addr::LOCALHOST, f.host)).expect("port released");
        }
    }

    #[test]
    fn duplicate_or_zero_guest_ports_are_refused() {
        assert!(pick(&[80, 80]).is_err());
        assert!(pick(&[0]).is_err());
    }

    #[test]
    fn qemu_7_2_s_message_for_a_taken_port_is_recognised() {
        // Printed by qemu-system-x86_64 7.2 when the host port is in use.
        assert!(is_bind_failure(
            "qemu-system-x86_64: -netdev user,id=n,restrict=on,hostfwd=tcp:127.0.0.1:42835-:80: \
             Could not set up host forwarding rule 'tcp:127.0.0.1:42835-:80'"
        ));
        assert!(!is_bind_failure(
            "qemu-system-x86_64: warning: TCG doesn't support requested feature"
        ));
    }

    #[test]
    fn qemu_gets_a_restricted_loopback_only_network() {
        let args = qemu_args(&[Forward {
            guest: 80,
            host: 40001,
        }]);
        assert_eq!(args[0], "-netdev");
        assert_eq!(
            args[1],
            "user,id=rigway,restrict=on,hostfwd=tcp:127.0.0.1:40001-:80"
        );
        assert_eq!(qemu_args(&[]), ["-nic", "none"]);
    }
}
