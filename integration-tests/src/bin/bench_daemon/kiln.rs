//! Kiln's side on the outer machine: a real `kiln serve` with real
//! `kiln-vmm` processes (whose guests cannot boot on this host's emulating
//! KVM, but whose processes start, answer and run).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::http::Conn;
use crate::stats::{rss_kib, Latencies};

pub struct Daemon {
    child: Child,
    dir: PathBuf,
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts `kiln serve` in `dir` and waits until it answers.
    pub fn start(kiln: &Path, vmm: &Path, dir: &Path) -> Daemon {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).expect("bench directory");
        let socket = dir.join("kiln.sock");
        let child = Command::new(kiln)
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--run-dir")
            .arg(dir.join("run"))
            .arg("--vmm-binary")
            .arg(vmm)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("daemon.log")).expect("daemon log"))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", kiln.display()));
        let d = Daemon {
            child,
            dir: dir.to_path_buf(),
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Conn::open(&d.socket)
            .and_then(|mut c| c.request("GET", "/v1/ping", None))
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "kiln serve did not answer (see {})",
                d.dir.join("daemon.log").display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn conn(&self) -> Conn {
        Conn::open(&self.socket).expect("connecting to kiln serve")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Delete what is left (stops the VMMs), then end the daemon.
        if let Ok(mut c) = Conn::open(&self.socket) {
            if let Ok(list) = c.request("GET", "/v1/vms", None) {
                for vm in list.json()["vms"].as_array().into_iter().flatten() {
                    if let Some(name) = vm["spec"]["name"].as_str() {
                        let _ = c.request("DELETE", &format!("/v1/vms/{name}?force=true"), None);
                    }
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spec(name: &str, kernel: &Path, initrd: &Path, memory_mib: u64) -> Vec<u8> {
    json!({
        "name": name,
        "machine": {"kernel": kernel, "initrd": initrd, "cpus": 1, "memory_mib": memory_mib},
    })
    .to_string()
    .into_bytes()
}

pub struct Outer {
    pub ping: Latencies,
    pub show: Latencies,
    pub start_to_ready: Latencies,
    pub rss_idle_kib: u64,
    pub rss_10_kib: u64,
}

/// Polls the VM until its VMM has answered the daemon's hello (`running`).
fn wait_running(conn: &mut Conn, name: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = conn
            .request("GET", &format!("/v1/vms/{name}"), None)
            .map_err(|e| e.to_string())?;
        match r.json()["status"]["state"].as_str() {
            Some("running") => return Ok(()),
            Some("starting") if Instant::now() < deadline => {}
            other => {
                return Err(format!(
                    "VM {name} is {other:?}: {}",
                    String::from_utf8_lossy(&r.body)
                ))
            }
        }
        std::thread::sleep(Duration::from_micros(250));
    }
}

pub fn measure(
    d: &Daemon,
    kernel: &Path,
    initrd: &Path,
    requests: usize,
    launches: usize,
) -> Outer {
    let mut c = d.conn();
    let created = c
        .request(
            "POST",
            "/v1/vms",
            Some(&spec("show-me", kernel, initrd, 256)),
        )
        .expect("create");
    assert_eq!(
        created.status,
        201,
        "{}",
        String::from_utf8_lossy(&created.body)
    );
    let mut timed = |path: &str| {
        let mut lat = Latencies::default();
        for i in 0..requests + requests / 10 {
            let t = Instant::now();
            let r = c.request("GET", path, None).expect("request");
            assert_eq!(
                r.status,
                200,
                "GET {path}: {}",
                String::from_utf8_lossy(&r.body)
            );
            // The first tenth warms up the connection and the daemon.
            if i >= requests / 10 {
                lat.push(t.elapsed());
            }
        }
        lat
    };
    let ping = timed("/v1/ping");
    let show = timed("/v1/vms/show-me");
    let rss_idle_kib = rss_kib(d.pid());

    let mut start_to_ready = Latencies::default();
    for i in 0..launches {
        let name = format!("launch-{i}");
        let body = spec(&name, kernel, initrd, 256);
        let t = Instant::now();
        let r = c
            .request("POST", "/v1/vms?start=true", Some(&body))
            .expect("create");
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        wait_running(&mut c, &name).unwrap_or_else(|e| panic!("{e}"));
        start_to_ready.push(t.elapsed());
        let r = c
            .request("DELETE", &format!("/v1/vms/{name}?force=true"), None)
            .expect("delete");
        assert!(r.status < 300, "{}", String::from_utf8_lossy(&r.body));
    }

    for i in 0..10 {
        let name = format!("ten-{i}");
        let r = c
            .request(
                "POST",
                "/v1/vms?start=true",
                Some(&spec(&name, kernel, initrd, 256)),
            )
            .expect("create");
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        wait_running(&mut c, &name).unwrap_or_else(|e| panic!("{e}"));
    }
    // Let the VMMs settle (their first counters, the daemon's watchers).
    std::thread::sleep(Duration::from_secs(2));
    let rss_10_kib = rss_kib(d.pid());
    Outer {
        ping,
        show,
        start_to_ready,
        rss_idle_kib,
        rss_10_kib,
    }
}
