//! libvirt's side: Debian's `libvirtd` with QEMU domains, driven through
//! its own Python binding (python3-libvirt) over its Unix socket, the way
//! Kiln's side is driven over `kiln serve`'s. `scripts/bench-daemon-setup.sh`
//! installs the packages; the daemons are started here if not running.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::stats::{rss_kib, Latencies};

pub const URI: &str = "qemu:///system";

/// A domain as libvirt's defaults make it, with what `libvirtd` 9.0 needs
/// for Debian's newer QEMU (without `<acpi/>` it passes `-no-acpi`, which
/// QEMU 9+ refuses). `kind` is `qemu` (TCG) or `kvm`.
pub fn domain_xml(
    name: &str,
    kind: &str,
    boot: Option<(&str, &str, &str)>,
    serial_log: &str,
) -> String {
    let os_boot = match boot {
        Some((kernel, initrd, cmdline)) => format!(
            "<kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline>"
        ),
        None => String::new(),
    };
    let cpu = if kind == "kvm" {
        "<cpu mode='host-passthrough'/>"
    } else {
        ""
    };
    format!(
        "<domain type='{kind}'><name>{name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>\
         <features><acpi/></features>{cpu}\
         <os><type arch='x86_64' machine='pc'>hvm</type>{os_boot}</os>\
         <devices><serial type='file'><source path='{serial_log}'/></serial>\
         <memballoon model='none'/></devices></domain>"
    )
}

fn daemon_pid(name: &str) -> Option<u32> {
    let out = Command::new("pidof").arg(name).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// libvirtd's pid, starting virtlogd and libvirtd (daemonized) if needed.
pub fn ensure_running() -> Result<u32, String> {
    for d in ["virtlogd", "libvirtd"] {
        if daemon_pid(d).is_none() {
            let status = Command::new(d)
                .arg("-d")
                .status()
                .map_err(|e| format!("starting {d}: {e} (run scripts/bench-daemon-setup.sh)"))?;
            if !status.success() {
                return Err(format!("{d} -d failed: {status}"));
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = Command::new("virsh")
            .args(["-c", URI, "version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return daemon_pid("libvirtd").ok_or("libvirtd is not running".into());
        }
        if Instant::now() > deadline {
            return Err("libvirtd does not answer `virsh version`".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

const SCRIPT: &str = r#"
import json, sys, time, libvirt
xml_template, requests, launches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# Lookups of domains that do not exist yet are expected: no error printout.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
conn = libvirt.open("qemu:///system")
def timed(f, n):
    out = []
    for i in range(n + n // 10):
        t = time.perf_counter(); f(); d = (time.perf_counter() - t) * 1e3
        if i >= n // 10: out.append(d)
    return out
def clean(name):
    try:
        d = conn.lookupByName(name)
        if d.isActive(): d.destroy()
        d.undefine()
    except libvirt.libvirtError:
        pass
template = open(xml_template).read()
clean("show-me")
show = conn.defineXML(template.replace("@NAME@", "show-me"))
res = {"ping": timed(conn.getLibVersion, requests), "show": timed(show.info, requests)}
start = []
for i in range(launches):
    name = "launch-%d" % i; clean(name)
    t = time.perf_counter()
    d = conn.defineXML(template.replace("@NAME@", name)); d.create()
    start.append((time.perf_counter() - t) * 1e3)
    d.destroy(); d.undefine()
res["start"] = start
print(json.dumps(res)); sys.stdout.flush()
# Ten running domains for the memory reading, then wait to be told to clean up.
for i in range(10):
    name = "ten-%d" % i; clean(name)
    conn.defineXML(template.replace("@NAME@", name)).create()
print("TEN_RUNNING"); sys.stdout.flush()
sys.stdin.readline()
for n in ["show-me"] + ["ten-%d" % i for i in range(10)]: clean(n)
"#;

pub struct Outer {
    pub ping: Latencies,
    pub show: Latencies,
    pub start_to_ready: Latencies,
    pub rss_idle_kib: u64,
    pub rss_10_kib: u64,
}

pub fn measure(dir: &Path, requests: usize, launches: usize) -> Result<Outer, String> {
    use std::io::{BufRead, BufReader, Write};
    let pid = ensure_running()?;
    let rss_idle_kib = rss_kib(pid);
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let template = dir.join("domain.xml");
    let xml = domain_xml(
        "@NAME@",
        "qemu",
        None,
        &dir.join("@NAME@.log").to_string_lossy(),
    );
    std::fs::write(&template, xml).map_err(|e| e.to_string())?;
    let mut child = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(&template)
        .arg(requests.to_string())
        .arg(launches.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("/usr/bin/python3 (Debian's, which python3-libvirt installs into): {e}")
        })?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut next = || -> Result<String, String> {
        lines
            .next()
            .ok_or("the libvirt script ended early (is python3-libvirt installed?)")?
            .map_err(|e| e.to_string())
    };
    let v: serde_json::Value = serde_json::from_str(&next()?).map_err(|e| e.to_string())?;
    let ms = |k: &str| {
        Latencies::from_ms(
            v[k].as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_f64())
                .collect(),
        )
    };
    if next()? != "TEN_RUNNING" {
        return Err("unexpected output from the libvirt script".into());
    }
    std::thread::sleep(Duration::from_secs(2));
    let rss_10_kib = rss_kib(pid);
    let _ = child.stdin.take().expect("piped").write_all(b"\n");
    let _ = child.wait();
    Ok(Outer {
        ping: ms("ping"),
        show: ms("show"),
        start_to_ready: ms("start"),
        rss_idle_kib,
        rss_10_kib,
    })
}

/// QEMU's command line as libvirt would start this domain
/// (`virsh domxml-to-native qemu-argv`), made runnable on its own inside
/// the nested host: libvirt's environment, `-S` (libvirt resumes the vCPUs
/// over QMP), the QMP monitor and the master-key secret (files libvirt
/// creates at start) are left out; the machine type is the peer's generic
/// `pc` (libvirt names the versioned type of the QEMU it probed here).
pub fn native_argv(xml: &str, dir: &Path) -> Result<Vec<String>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join("native.xml");
    std::fs::write(&path, xml).map_err(|e| format!("{}: {e}", path.display()))?;
    let out = Command::new("virsh")
        .args(["-c", URI, "domxml-to-native", "qemu-argv"])
        .arg(&path)
        .output()
        .map_err(|e| format!("virsh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "virsh domxml-to-native: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let words = shell_words(&String::from_utf8_lossy(&out.stdout))?;
    let mut argv = Vec::new();
    let mut it = words
        .into_iter()
        .skip_while(|w| w.contains('=') && !w.starts_with('-'));
    let _binary = it.next();
    while let Some(w) = it.next() {
        match w.as_str() {
            "-S" => {}
            "-object" | "-chardev" | "-mon" | "-machine" => {
                let value = it.next().unwrap_or_default();
                if value.contains("masterKey0") || value.contains("charmonitor") {
                    continue;
                }
                argv.push(w.clone());
                if w == "-machine" {
                    let rest = value.split_once(',').map(|(_, r)| r).unwrap_or("");
                    argv.push(format!("pc,{rest}").trim_end_matches(',').to_string());
                } else {
                    argv.push(value);
                }
            }
            _ => argv.push(w),
        }
    }
    Ok(argv)
}

/// Splits virsh's shell-quoted output (single quotes only, as it writes).
fn shell_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(x) => cur.push(x),
                        None => return Err("unterminated quote in virsh output".into()),
                    }
                }
            }
            // A backslash-newline only continues the line; any other
            // escaped character is part of the word.
            '\\' => match chars.next() {
                Some('\n') | None => {}
                Some(x) => {
                    in_word = true;
                    cur.push(x);
                }
            },
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    #[test]
    fn shell_words_handles_virsh_quoting() {
        let w =
            super::shell_words("A=1 /usr/bin/q -name guest=x \\\n -object '{\"a\":1}' -x").unwrap();
        assert_eq!(
            w,
            [
                "A=1",
                "/usr/bin/q",
                "-name",
                "guest=x",
                "-object",
                "{\"a\":1}",
                "-x"
            ]
        );
    }
}
