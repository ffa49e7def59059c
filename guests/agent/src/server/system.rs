//! `info` and `stats`: what the guest is and how loaded it is, from /proc.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::fs;

use super::OpError;
use crate::protocol::{
    ErrorCode, GuestInfo, GuestStats, LoadAverage, Pressure, PressureLine, PressureResource,
    PROTOCOL_VERSION,
};

pub fn guest_info(capabilities: Vec<String>) -> Result<GuestInfo, OpError> {
    let os = fs::read_to_string("/etc/os-release")
        .or_else(|_| fs::read_to_string("/usr/lib/os-release"))
        .map(|text| parse_os_release(&text))
        .unwrap_or_default();
    let uts = uname()?;
    Ok(GuestInfo {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        os_name: os.get("PRETTY_NAME").cloned(),
        os_id: os.get("ID").cloned(),
        os_version_id: os.get("VERSION_ID").cloned(),
        kernel_release: uts.release,
        kernel_version: uts.version,
        machine: uts.machine,
        hostname: uts.nodename,
        uptime_secs: uptime_secs()?,
        capabilities,
    })
}

pub fn guest_stats() -> Result<GuestStats, OpError> {
    let meminfo = read_proc("/proc/meminfo")?;
    let loadavg = read_proc("/proc/loadavg")?;
    let load = parse_loadavg(&loadavg)
        .ok_or_else(|| OpError::new(ErrorCode::Failed, "unexpected /proc/loadavg format"))?;
    Ok(GuestStats {
        meminfo_kib: parse_meminfo(&meminfo),
        load,
        pressure: read_pressure(),
        uptime_secs: uptime_secs()?,
    })
}

fn read_proc(path: &str) -> Result<String, OpError> {
    fs::read_to_string(path).map_err(|e| OpError::io(&format!("reading {path}"), &e))
}

fn uptime_secs() -> Result<f64, OpError> {
    let text = read_proc("/proc/uptime")?;
    text.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| OpError::new(ErrorCode::Failed, "unexpected /proc/uptime format"))
}

/// `KEY=value` lines; values may be double- or single-quoted.
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

/// `Name:   1234 kB` lines → name → KiB (HugePages_* counts are kept as-is).
pub fn parse_meminfo(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let value = rest.split_whitespace().next()?.parse().ok()?;
            Some((name.trim().to_string(), value))
        })
        .collect()
}

/// `0.00 0.01 0.05 1/123 4567`.
pub fn parse_loadavg(text: &str) -> Option<LoadAverage> {
    let mut it = text.split_whitespace();
    let one = it.next()?.parse().ok()?;
    let five = it.next()?.parse().ok()?;
    let fifteen = it.next()?.parse().ok()?;
    let (runnable, tasks) = it.next()?.split_once('/')?;
    Some(LoadAverage {
        one,
        five,
        fifteen,
        runnable: runnable.parse().ok()?,
        tasks: tasks.parse().ok()?,
    })
}

/// One /proc/pressure file: `some avg10=0.00 avg60=0.00 avg300=0.00 total=0`.
pub fn parse_pressure(text: &str) -> Option<PressureResource> {
    let mut some = None;
    let mut full = None;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let which = it.next()?;
        let mut fields = BTreeMap::new();
        for kv in it {
            let (k, v) = kv.split_once('=')?;
            fields.insert(k, v);
        }
        let parsed = PressureLine {
            avg10: fields.get("avg10")?.parse().ok()?,
            avg60: fields.get("avg60")?.parse().ok()?,
            avg300: fields.get("avg300")?.parse().ok()?,
            total_us: fields.get("total")?.parse().ok()?,
        };
        match which {
            "some" => some = Some(parsed),
            "full" => full = Some(parsed),
            _ => {}
        }
    }
    Some(PressureResource { some: some?, full })
}

fn read_pressure() -> Option<Pressure> {
    let one = |name: &str| {
        fs::read_to_string(format!("/proc/pressure/{name}"))
            .ok()
            .and_then(|t| parse_pressure(&t))
    };
    let p = Pressure {
        cpu: one("cpu"),
        memory: one("memory"),
        io: one("io"),
    };
    if p.cpu.is_none() && p.memory.is_none() && p.io.is_none() {
        None
    } else {
        Some(p)
    }
}

struct Uts {
    release: String,
    version: String,
    machine: String,
    nodename: String,
}

fn uname() -> Result<Uts, OpError> {
    // SAFETY: utsname is plain old data; uname(2) fills it.
    let mut buf: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: buf is a valid, writable utsname.
    if unsafe { libc::uname(&mut buf) } != 0 {
        return Err(OpError::io("uname", &std::io::Error::last_os_error()));
    }
    let field = |f: &[libc::c_char]| {
        // SAFETY: the kernel NUL-terminates every utsname field.
        unsafe { CStr::from_ptr(f.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    Ok(Uts {
        release: field(&buf.release),
        version: field(&buf.version),
        machine: field(&buf.machine),
        nodename: field(&buf.nodename),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_quotes_and_comments() {
        let m = parse_os_release(
            "# c\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID='12'\n",
        );
        assert_eq!(m["PRETTY_NAME"], "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(m["ID"], "debian");
        assert_eq!(m["VERSION_ID"], "12");
    }

    #[test]
    fn meminfo_and_loadavg() {
        let m = parse_meminfo(
            "MemTotal:       16384 kB\nMemAvailable:    8192 kB\nHugePages_Total:       0\nbogus\n",
        );
        assert_eq!(m["MemTotal"], 16384);
        assert_eq!(m["MemAvailable"], 8192);
        assert_eq!(m["HugePages_Total"], 0);
        assert_eq!(m.len(), 3);
        let l = parse_loadavg("0.50 0.25 0.10 2/345 6789\n").expect("loadavg");
        assert_eq!((l.one, l.runnable, l.tasks), (0.5, 2, 345));
        assert!(parse_loadavg("garbage").is_none());
    }

    #[test]
    fn pressure_some_and_full() {
        let p = parse_pressure(
            "some avg10=1.50 avg60=0.20 avg300=0.00 total=12345\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=7\n",
        )
        .expect("pressure");
        assert_eq!(p.some.avg10, 1.5);
        assert_eq!(p.some.total_us, 12345);
        assert_eq!(p.full.map(|f| f.total_us), Some(7));
        assert!(parse_pressure("some avg10=x").is_none());
    }

    #[test]
    fn live_info_and_stats_read_this_machine() {
        let info = guest_info(vec![]).expect("info");
        assert!(!info.kernel_release.is_empty());
        assert!(info.uptime_secs > 0.0);
        let stats = guest_stats().expect("stats");
        assert!(stats.mem_total_bytes().unwrap_or(0) > 0);
    }
}
