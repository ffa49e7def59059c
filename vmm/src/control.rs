//! The VMM's control socket: line commands on a Unix socket, answered with
//! one line starting `ok` or `error:`. The daemon (and tests) use it to
//! change a running guest's balloon target and its devices' I/O worker
//! placement, and to press its ACPI power button.
//!
//! ```text
//! status                         ok running devices=net0,balloon0,rng0
//! balloon 256                    ok
//! balloon-stats                  ok target_mib=256 actual_mib=256 inflated_mib=256 memfree=... (bytes)
//! workers                        ok net0:tid=123,cpus=any,wait=notify blk0:...
//! worker blk0 cpus=0,1 wait=poll:50   ok
//! worker blk0 cpus=any wait=notify    ok
//! power-button                   ok   (the guest decides what to do)
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use kiln_devices::virtio::worker::{Placement, WaitMode};

use crate::devices::DeviceHandles;

const MAX_LINE: usize = 4096;

/// Serves the control socket on its own thread while the VM runs; the
/// socket file is removed when this is dropped.
pub struct ControlSocket {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlSocket {
    pub fn start(path: &Path, handles: DeviceHandles) -> Result<ControlSocket> {
        if path.exists() {
            // A socket nobody listens on is stale; anything else is not ours.
            let stale = std::fs::symlink_metadata(path)
                .map(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                })
                .unwrap_or(false)
                && UnixStream::connect(path).is_err();
            if !stale {
                anyhow::bail!(
                    "control socket {} already exists and is in use (or is not a socket)",
                    path.display()
                );
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("cannot create control socket {}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kiln-control".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    if stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    let handles = handles.clone();
                    // One thread per client, so a slow client does not block others.
                    let _ = std::thread::Builder::new()
                        .name("kiln-control-client".into())
                        .spawn(move || serve(stream, &handles));
                }
            })
            .context("starting the control socket thread")?;
        Ok(ControlSocket {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlSocket {
    /// Stops accepting (a connection of our own wakes the accept loop) and
    /// removes the socket file. Clients already connected finish on their
    /// own threads.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if UnixStream::connect(&self.path).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(stream: UnixStream, handles: &DeviceHandles) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(300)));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream).take(1 << 20);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = if line.len() > MAX_LINE {
            "error: command too long".to_string()
        } else {
            match execute(line.trim(), handles) {
                Ok(text) => format!("ok{}{text}", if text.is_empty() { "" } else { " " }),
                Err(e) => format!("error: {e:#}"),
            }
        };
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}

/// Runs one command; the text after `ok` on success.
pub fn execute(line: &str, handles: &DeviceHandles) -> Result<String> {
    let mut words = line.split_whitespace();
    match words.next() {
        Some("status") => {
            let names: Vec<&str> = handles.workers.iter().map(|(n, _)| n.as_str()).collect();
            Ok(format!("running devices={}", names.join(",")))
        }
        Some("balloon") => {
            let balloon = handles
                .balloon
                .as_ref()
                .context("this VM has no balloon (start it with --balloon)")?;
            let mib: u64 = words
                .next()
                .context("usage: balloon <target MiB>")?
                .parse()
                .context("the target must be a number of MiB")?;
            balloon.set_target_mib(mib)?;
            Ok(String::new())
        }
        Some("balloon-stats") => {
            let balloon = handles
                .balloon
                .as_ref()
                .context("this VM has no balloon (start it with --balloon)")?;
            let mut text = format!(
                "target_mib={} actual_mib={} inflated_mib={}",
                balloon.target_mib(),
                balloon.actual_mib(),
                (balloon.inflated_pages() * 4096) >> 20
            );
            if let Some(stats) = balloon.stats() {
                text.push(' ');
                text.push_str(&stats_line(&stats));
            }
            Ok(text)
        }
        Some("workers") => Ok(handles
            .workers
            .iter()
            .map(|(name, w)| {
                let p = w.placement();
                let cpus = p.cpus.map_or("any".to_string(), |c| {
                    c.iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join("+")
                });
                let wait = match p.wait {
                    WaitMode::Notify => "notify".to_string(),
                    WaitMode::Poll { spin } => format!("poll:{}", spin.as_micros()),
                };
                let tid = w.thread_id().map_or("-".into(), |t| t.to_string());
                format!(
                    "{name}:tid={tid},cpus={cpus},wait={wait},busy={}",
                    w.busy_rounds()
                )
            })
            .collect::<Vec<_>>()
            .join(" ")),
        Some("worker") => {
            let name = words
                .next()
                .context("usage: worker <device> [cpus=0,1|any] [wait=notify|poll:<µs>]")?;
            let (_, control) = handles
                .workers
                .iter()
                .find(|(n, _)| n == name)
                .with_context(|| format!("no device {name:?}"))?;
            let mut placement: Placement = control.placement();
            for word in words {
                match word.split_once('=') {
                    Some(("cpus", "any")) => placement.cpus = None,
                    Some(("cpus", list)) => {
                        let cpus = list
                            .split(',')
                            .map(|c| c.parse::<usize>())
                            .collect::<Result<Vec<_>, _>>()
                            .context("cpus must be a list of CPU numbers or any")?;
                        placement.cpus = Some(cpus);
                    }
                    Some(("wait", "notify")) => placement.wait = WaitMode::Notify,
                    Some(("wait", poll)) if poll.starts_with("poll") => {
                        let us: u64 = poll
                            .strip_prefix("poll:")
                            .map_or(Ok(50), |v| v.parse())
                            .context("wait=poll:<microseconds>")?;
                        placement.wait = WaitMode::Poll {
                            spin: Duration::from_micros(us),
                        };
                    }
                    _ => anyhow::bail!(
                        "unknown setting {word:?}: use cpus=... or wait=notify|poll:<µs>"
                    ),
                }
            }
            control.set_placement(placement);
            // The worker applies it on its next wake-up, which is now.
            std::thread::sleep(Duration::from_millis(20));
            match control.last_error() {
                Some(e) => anyhow::bail!("{name}: {e}"),
                None => Ok(String::new()),
            }
        }
        Some("power-button") => {
            if let Some(extra) = words.next() {
                anyhow::bail!("power-button takes no arguments, got {extra:?}");
            }
            handles
                .power_button
                .as_ref()
                .context("this VM has no power button")?
                .press_power_button()
                .context("raising the power button interrupt")?;
            Ok(String::new())
        }
        Some(other) => anyhow::bail!(
            "unknown command {other:?} (status, balloon, balloon-stats, workers, worker, power-button)"
        ),
        None => anyhow::bail!("empty command"),
    }
}

/// The guest's latest statistics as `key=value` pairs (sizes in bytes),
/// with the seconds since the guest sent them.
fn stats_line(s: &kiln_devices::virtio::balloon::BalloonStats) -> String {
    let fields = [
        ("swap_in", s.swap_in),
        ("swap_out", s.swap_out),
        ("major_faults", s.major_faults),
        ("minor_faults", s.minor_faults),
        ("free_memory", s.free_memory),
        ("total_memory", s.total_memory),
        ("available_memory", s.available_memory),
        ("disk_caches", s.disk_caches),
        ("hugetlb_allocations", s.hugetlb_allocations),
        ("hugetlb_failures", s.hugetlb_failures),
    ];
    let mut out: Vec<String> = fields
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
        .collect();
    if let Ok(age) = s.received_at.elapsed() {
        out.push(format!("age_s={}", age.as_secs()));
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_devices::virtio::balloon::VirtioBalloon;
    use kiln_devices::virtio::worker::WorkerControl;

    fn handles(with_balloon: bool) -> DeviceHandles {
        let mut h = DeviceHandles::default();
        h.workers.push((
            "disk0".into(),
            WorkerControl::new(Placement::default()).unwrap(),
        ));
        if with_balloon {
            let b = VirtioBalloon::new("stats=1".parse().unwrap()).unwrap();
            h.balloon = Some(b.control());
        }
        h
    }

    fn err(line: &str, h: &DeviceHandles) -> String {
        format!("{:#}", execute(line, h).unwrap_err())
    }

    #[test]
    fn balloon_commands() {
        let h = handles(true);
        assert_eq!(execute("balloon 64", &h).unwrap(), "");
        assert!(execute("balloon-stats", &h)
            .unwrap()
            .starts_with("target_mib=64 actual_mib=0"));
        assert!(err("balloon lots", &h).contains("number of MiB"));
        assert!(err("balloon", &handles(false)).contains("no balloon"));
    }

    #[test]
    fn worker_placement_is_changed_and_validated() {
        let h = handles(false);
        execute("worker disk0 cpus=0,1 wait=poll:25", &h).unwrap();
        let p = h.workers[0].1.placement();
        assert_eq!(p.cpus, Some(vec![0, 1]));
        assert_eq!(
            p.wait,
            WaitMode::Poll {
                spin: Duration::from_micros(25)
            }
        );
        execute("worker disk0 cpus=any wait=notify", &h).unwrap();
        assert_eq!(h.workers[0].1.placement(), Placement::default());
        assert!(execute("workers", &h)
            .unwrap()
            .starts_with("disk0:tid=-,cpus=any,wait=notify"));
        assert!(err("worker net9 cpus=0", &h).contains("no device"));
        assert!(err("worker disk0 cpus=x", &h).contains("CPU numbers"));
        assert!(err("worker disk0 speed=11", &h).contains("unknown setting"));
    }

    #[test]
    fn power_button_presses_the_ged() {
        use kiln_devices::legacy::GenericEventDevice;
        use kiln_devices::MmioDevice;
        let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ged = GenericEventDevice::new(0x1000, irq.try_clone().unwrap(), 1);
        let mut h = handles(false);
        h.power_button = Some(ged.control());
        assert_eq!(execute("power-button", &h).unwrap(), "");
        assert_eq!(irq.read().unwrap(), 1);
        let mut reg = [0u8; 4];
        ged.read(0x1000, &mut reg);
        assert_eq!(reg, [1, 0, 0, 0]);
        assert!(err("power-button now", &h).contains("no arguments"));
        assert!(err("power-button", &handles(false)).contains("no power button"));
    }

    #[test]
    fn unknown_and_empty_commands_are_errors() {
        let h = handles(false);
        assert!(err("reboot-host", &h).contains("unknown command"));
        assert!(err("", &h).contains("empty"));
        assert_eq!(execute("status", &h).unwrap(), "running devices=disk0");
    }

    #[test]
    fn socket_answers_lines_and_goes_away_on_drop() {
        let dir = std::env::temp_dir().join(format!("kiln-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl");
        let sock = ControlSocket::start(&path, handles(true)).unwrap();
        assert!(
            ControlSocket::start(&path, handles(true)).is_err(),
            "a live socket is not replaced"
        );
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"balloon 32\nnonsense\n").unwrap();
        let mut r = BufReader::new(c);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, "ok\n");
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("error: unknown command"));
        drop(sock);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
