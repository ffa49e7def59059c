//! `--net tap=NAME[,mac=52:54:00:12:34:56][,id=net0]`: which tap the device
//! uses and what the guest sees.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::virtio::options::{from_options, OptionsError};

/// Longest interface name Linux accepts (IFNAMSIZ minus the NUL).
pub const MAX_IFNAME_LEN: usize = 15;

/// How a virtio-net device is backed.
///
/// `tap` names a host tap interface. If it exists (e.g. made persistent
/// with `ip tuntap add NAME mode tap`), Kiln attaches to it; otherwise Kiln
/// creates it. A tap Kiln created is not persistent: it disappears when
/// the VMM exits. Kiln never configures addresses or brings the link up;
/// the host does that with `ip` (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Host tap interface name (at most 15 bytes).
    #[serde(deserialize_with = "ifname")]
    pub tap: String,
    /// The guest's MAC address; derived from the tap name when absent.
    #[serde(default, with = "mac_serde", skip_serializing_if = "Option::is_none")]
    pub mac: Option<[u8; 6]>,
    /// Device name for logs and the worker thread; the tap name when empty.
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "device_id"
    )]
    pub id: String,
}

fn ifname<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    check_ifname(&name).map_err(serde::de::Error::custom)?;
    Ok(name)
}

fn device_id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let id = String::deserialize(d)?;
    if id.contains(char::is_whitespace) {
        return Err(serde::de::Error::custom("must not contain whitespace"));
    }
    Ok(id)
}

impl NetConfig {
    pub fn new(tap: &str) -> NetConfig {
        NetConfig {
            tap: tap.to_string(),
            mac: None,
            id: String::new(),
        }
    }

    /// The MAC the guest gets: the configured one or one derived from the
    /// tap name.
    pub fn guest_mac(&self) -> [u8; 6] {
        self.mac.unwrap_or_else(|| mac_from_name(&self.tap))
    }

    /// The device's name: `id`, or the tap name when `id` is empty.
    pub fn device_name(&self) -> &str {
        if self.id.is_empty() {
            &self.tap
        } else {
            &self.id
        }
    }
}

impl FromStr for NetConfig {
    type Err = OptionsError;

    /// `tap=NAME[,mac=52:54:00:12:34:56][,id=net0]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        from_options(s)
    }
}

/// Checks `name` the way the kernel's `dev_valid_name` does, and rejects
/// `%` (a name template would make the kernel pick a different name).
pub fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the interface name is empty".into());
    }
    if name.len() > MAX_IFNAME_LEN {
        return Err(format!(
            "the interface name is {} bytes, Linux allows at most {MAX_IFNAME_LEN}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err("the interface name must not be . or ..".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, '/' | ':' | '%' | '\0') || c.is_whitespace())
    {
        return Err(format!("the interface name must not contain {c:?}"));
    }
    Ok(())
}

/// Parses `52:54:00:12:34:56`; multicast and all-zero addresses are
/// refused because a NIC cannot have them.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts
            .next()
            .ok_or("expected six bytes like 52:54:00:12:34:56")?;
        if part.len() != 2 {
            return Err("expected six two-digit hex bytes like 52:54:00:12:34:56".into());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| format!("{part:?} is not a hex byte"))?;
    }
    if parts.next().is_some() {
        return Err("expected six bytes like 52:54:00:12:34:56".into());
    }
    if mac[0] & 1 != 0 {
        return Err("multicast address (lowest bit of the first byte set)".into());
    }
    if mac == [0; 6] {
        return Err("all-zero address".into());
    }
    Ok(mac)
}

/// A stable MAC for a tap name: FNV-1a of the name, with the locally
/// administered bit set and the multicast bit clear, so the same `--net`
/// gives the guest the same address on every run.
pub fn mac_from_name(name: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

/// `52:54:00:12:34:56`.
pub struct MacDisplay(pub [u8; 6]);

impl fmt::Display for MacDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// MACs travel as `"52:54:00:12:34:56"` strings in JSON, not byte arrays.
mod mac_serde {
    use super::*;

    pub fn serialize<S: Serializer>(mac: &Option<[u8; 6]>, s: S) -> Result<S::Ok, S::Error> {
        match mac {
            Some(m) => s.serialize_str(&MacDisplay(*m).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 6]>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| parse_mac(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tap_mac_and_id() {
        let c: NetConfig = "tap=kiln0,mac=52:54:00:12:34:56".parse().unwrap();
        assert_eq!(c.tap, "kiln0");
        assert_eq!(c.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(c.guest_mac(), [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(c.device_name(), "kiln0");
        let c: NetConfig = "tap=kiln1,id=net1".parse().unwrap();
        assert_eq!((c.mac, c.device_name()), (None, "net1"));
    }

    #[test]
    fn rejects_bad_configs_clearly() {
        assert_eq!(
            "mac=52:54:00:12:34:56".parse::<NetConfig>(),
            Err(OptionsError::Missing("tap".into()))
        );
        let long = "tap=abcdefghijklmnop"
            .parse::<NetConfig>()
            .unwrap_err()
            .to_string();
        assert!(
            long.contains("16 bytes") && long.contains("at most 15"),
            "{long}"
        );
        for bad in ["tap=a/b", "tap=a b", "tap=..", "tap=kiln%d", "tap=a:1"] {
            assert!(
                matches!(bad.parse::<NetConfig>(), Err(OptionsError::Invalid { .. })),
                "{bad}"
            );
        }
        for bad in [
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "5254:00:12:34:56",
            "zz:54:00:12:34:56",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
        ] {
            let e = format!("tap=t,mac={bad}").parse::<NetConfig>();
            assert!(
                matches!(e, Err(OptionsError::Invalid { .. })),
                "{bad}: {e:?}"
            );
        }
        assert!(matches!(
            "tap=t,maq=1".parse::<NetConfig>(),
            Err(OptionsError::Unknown { .. })
        ));
    }

    #[test]
    fn derived_mac_is_stable_unicast_and_local() {
        let a = mac_from_name("kiln0");
        assert_eq!(a, mac_from_name("kiln0"));
        assert_ne!(a, mac_from_name("kiln1"));
        for name in ["kiln0", "kiln1", "tap0", "x", "a-very-long-nam"] {
            let m = mac_from_name(name);
            assert_eq!(m[0] & 1, 0, "unicast");
            assert_eq!(m[0] & 2, 2, "locally administered");
            assert!(parse_mac(&MacDisplay(m).to_string()).is_ok());
        }
    }
}
