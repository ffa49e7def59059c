//! A real `kiln serve` for the CLI crate's tests (serve, TLS, load):
//! the daemon binary from target with temporary state and run directories.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kiln_api::{Client, Endpoint};

pub const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// kiln-vmm next to the kiln binary, (re)built here: `cargo test -p kiln`
/// does not build other packages' binaries, and a stale one would speak
/// an older protocol.
pub fn vmm_binary() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let path = Path::new(KILN).with_file_name("kiln-vmm");
    BUILT.call_once(|| {
        let release = Path::new(KILN)
            .parent()
            .is_some_and(|d| d.ends_with("release"));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "kiln-vmm", "--bin", "kiln-vmm"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo to build kiln-vmm");
        assert!(status.success(), "building kiln-vmm failed");
    });
    assert!(path.is_file(), "{} missing after the build", path.display());
    path
}

/// A daemon in a temporary directory, killed (SIGKILL) when dropped.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    vmm: PathBuf,
    extra: Vec<String>,
}

impl Daemon {
    pub fn start(vmm: PathBuf, extra: &[&str]) -> Daemon {
        let mut d = Daemon {
            dir: tempfile::tempdir().unwrap(),
            child: None,
            vmm,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.spawn();
        d
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("kiln.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("serve.log")
    }

    /// Starts `kiln serve` on the same directories and waits until its
    /// Unix socket answers (its TCP listener is bound before that).
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(KILN)
            .arg("serve")
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--vmm-binary")
            .arg(&self.vmm)
            .args(&self.extra)
            .env("KILN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the daemon ended ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not come up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon runs").id()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The TCP address the latest start said it listens on (`--listen
    /// 127.0.0.1:0` picks a free port).
    pub fn tcp_addr(&self) -> String {
        let log = self.log();
        let line = log
            .lines()
            .rev()
            .find_map(|l| l.split_once("listening on tcp ").map(|(_, rest)| rest))
            .unwrap_or_else(|| panic!("no TCP listener in the log: {log}"));
        line.split_whitespace().next().unwrap().to_owned()
    }

    pub fn client(&self) -> Client {
        Client::new(Endpoint::Unix(self.socket()))
    }

    /// `kiln ARGS --socket S`: its stdout, or the test fails with stderr.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(KILN)
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kiln {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `kiln serve ARGS` in `dir` that must end by itself (a refused start):
/// its exit status and stderr. Killed after 20 s if it does not.
pub fn serve_refused(dir: &Path, args: &[&str]) -> (ExitStatus, String) {
    let mut child = Command::new(KILN)
        .arg("serve")
        .arg("--socket")
        .arg(dir.join("refused.sock"))
        .arg("--state-dir")
        .arg(dir.join("refused-state"))
        .arg("--run-dir")
        .arg(dir.join("refused-run"))
        .arg("--vmm-binary")
        .arg(dir.join("no-kiln-vmm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kiln serve {args:?} was not refused: it still runs after 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// How many file descriptors `pid` has open.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The processes whose parent is `pid`, with their names.
pub fn children_of(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split at ')'.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map_or("", |(_, c)| c).to_owned();
        let ppid = tail
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push((child, comm));
        }
    }
    out
}

/// A CA, and a daemon certificate it signed for 127.0.0.1 and localhost,
/// as PEM files in `dir`.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn make_ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    (params.self_signed(&key).unwrap(), key)
}

pub fn make_pki(dir: &Path, tag: &str) -> Pki {
    let (ca, ca_key) = make_ca(&format!("kiln test CA {tag}"));
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kiln serve");
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let pki = Pki {
        ca: dir.join(format!("ca-{tag}.pem")),
        cert: dir.join(format!("cert-{tag}.pem")),
        key: dir.join(format!("key-{tag}.pem")),
    };
    std::fs::write(&pki.ca, ca.pem()).unwrap();
    std::fs::write(&pki.cert, cert.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    pki
}
