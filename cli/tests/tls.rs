//! `kiln serve --listen` with TLS, end to end: a real daemon with a
//! certificate made here (rcgen), the typed client and the CLI over
//! https://, and the starts it refuses.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{fd_count, make_pki, runtime, serve_refused, Daemon, Pki, KILN};
use kiln_api::{Client, ClientError, Endpoint};

const TOKEN: &str = "0123456789abcdef0123";

fn token_file(dir: &Path) -> PathBuf {
    let path = dir.join("token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    path
}

fn tls_daemon(keys: &tempfile::TempDir, pki: &Pki) -> Daemon {
    let token = token_file(keys.path());
    Daemon::start(
        keys.path().join("no-kiln-vmm"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            token.to_str().unwrap(),
            "--tls-cert",
            pki.cert.to_str().unwrap(),
            "--tls-key",
            pki.key.to_str().unwrap(),
        ],
    )
}

fn https(addr: &str, token: Option<&str>, ca: Option<&Path>) -> Client {
    Client::new(Endpoint::Https {
        addr: addr.to_owned(),
        token: token.map(str::to_owned),
        ca_cert: ca.map(Path::to_owned),
    })
}

fn spec(name: &str, kernel: &Path) -> kiln_api::VmSpec {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "machine": {"kernel": kernel, "memory_mib": 64}
    }))
    .unwrap()
}

#[test]
fn tls_requests_need_the_token_and_a_certificate_the_client_trusts() {
    let keys = tempfile::tempdir().unwrap();
    let pki = make_pki(keys.path(), "a");
    let other = make_pki(keys.path(), "b");
    let d = tls_daemon(&keys, &pki);
    let addr = d.tcp_addr();
    assert!(d.log().contains("(TLS)"), "{}", d.log());
    let kernel = keys.path().join("vmlinuz");
    std::fs::write(&kernel, vec![0u8; 4096]).unwrap();
    runtime().block_on(async {
        let right = https(&addr, Some(TOKEN), Some(&pki.ca));
        assert_eq!(right.ping().await.unwrap().api, "v1");
        right
            .create(&spec("over-tls", &kernel), false)
            .await
            .unwrap();
        let names: Vec<String> = right
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.spec.name)
            .collect();
        assert_eq!(names, ["over-tls"]);
        // The certificate's DNS name works too.
        let port = addr.rsplit_once(':').unwrap().1;
        let by_name = https(&format!("localhost:{port}"), Some(TOKEN), Some(&pki.ca));
        assert_eq!(by_name.get("over-tls").await.unwrap().spec.name, "over-tls");

        for (what, token) in [
            ("no token", None),
            ("a wrong token", Some("0123456789abcdef0124")),
        ] {
            let err = https(&addr, token, Some(&pki.ca)).list().await.unwrap_err();
            assert_eq!(
                err.api().map(|(s, e)| (s, e.code)),
                Some((401, kiln_api::ErrorCode::Unauthorized)),
                "{what}: {err}"
            );
        }

        // A CA that did not sign the daemon's certificate: no request is sent.
        let err = https(&addr, Some(TOKEN), Some(&other.ca))
            .ping()
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Tls { message, .. } if message.contains("UnknownIssuer")),
            "{err:?}"
        );
        // Trusting the daemon's certificate itself is not trusting its CA.
        let err = https(&addr, Some(TOKEN), Some(&pki.cert))
            .ping()
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");

        // Plain HTTP to the TLS port gets no HTTP answer.
        let plain = Client::new(Endpoint::Tcp {
            addr: addr.clone(),
            token: Some(TOKEN.into()),
        });
        let err = plain.ping().await.unwrap_err();
        assert!(err.api().is_none(), "plain HTTP was answered: {err}");
        assert!(
            !matches!(err, ClientError::Connect { .. }),
            "the port is not listening at all: {err}"
        );
    });
    let mut raw = std::net::TcpStream::connect(&addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    raw.write_all(
        b"GET /v1/ping HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer 0123456789abcdef0123\r\n\r\n",
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP got an HTTP answer: {:?}",
        String::from_utf8_lossy(&answer)
    );

    // The CLI: --url https:// with --ca-cert, or KILN_CA_CERT.
    let cli = |extra: &[&str], env_ca: Option<&Path>| {
        let mut cmd = Command::new(KILN);
        cmd.args([
            "vm",
            "list",
            "--url",
            &format!("https://{addr}"),
            "--token",
            TOKEN,
        ]);
        cmd.args(extra).env_remove("KILN_CA_CERT");
        if let Some(ca) = env_ca {
            cmd.env("KILN_CA_CERT", ca);
        }
        cmd.output().unwrap()
    };
    let out = cli(&["--ca-cert", pki.ca.to_str().unwrap()], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("over-tls"));
    let out = cli(&[], Some(&pki.ca));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("over-tls"));
    // Without the CA the system's CAs do not know the daemon's certificate.
    let out = cli(&[], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("TLS"), "{stderr}");
    let out = cli(&["--ca-cert", other.ca.to_str().unwrap()], None);
    assert!(!out.status.success());
}

#[test]
fn silent_clients_are_cut_and_cannot_take_the_daemons_descriptors() {
    let keys = tempfile::tempdir().unwrap();
    let pki = make_pki(keys.path(), "a");
    let d = tls_daemon(&keys, &pki);
    let addr = d.tcp_addr();
    let pid = d.pid();
    let baseline = fd_count(pid);
    // More silent connections than the daemon serves at a time: the rest
    // wait in the kernel's backlog, not in the daemon.
    let silent: Vec<std::net::TcpStream> = (0..kiln_daemon::tcp::MAX_CONNECTIONS + 100)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = fd_count(pid);
    assert!(
        during <= baseline + kiln_daemon::tcp::MAX_CONNECTIONS + 8,
        "{during} descriptors with silent clients, {baseline} before"
    );
    // Each accepted silent client is cut after the handshake timeout.
    let started = Instant::now();
    let mut silent = silent;
    let mut first = silent.remove(0);
    drop(silent);
    first
        .set_read_timeout(Some(kiln_daemon::tcp::HANDSHAKE_TIMEOUT * 2))
        .unwrap();
    let mut buf = [0u8; 16];
    let n = first
        .read(&mut buf)
        .expect("the daemon cut the silent client");
    assert_eq!(n, 0);
    let waited = started.elapsed();
    assert!(
        waited >= kiln_daemon::tcp::HANDSHAKE_TIMEOUT - Duration::from_secs(2),
        "cut after {waited:?}"
    );
    // The rest are dropped here; a real client is served again.
    runtime().block_on(async {
        let client = https(&addr, Some(TOKEN), Some(&pki.ca));
        let deadline = Instant::now() + kiln_daemon::tcp::HANDSHAKE_TIMEOUT * 3;
        loop {
            match tokio::time::timeout(Duration::from_secs(15), client.ping()).await {
                Ok(Ok(p)) => break assert_eq!(p.api, "v1"),
                other => assert!(Instant::now() < deadline, "not served again: {other:?}"),
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    while fd_count(pid) > baseline + 4 {
        assert!(
            Instant::now() < deadline,
            "{} descriptors after the silent clients left, {baseline} before",
            fd_count(pid)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn starts_that_would_be_unsafe_or_cannot_work_are_refused_with_the_reason() {
    let keys = tempfile::tempdir().unwrap();
    let dir = keys.path();
    let pki = make_pki(dir, "a");
    let other = make_pki(dir, "b");
    let token = token_file(dir);
    let token = token.to_str().unwrap();
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = dir.join("missing.pem");
    let (cert, key) = (pki.cert.to_str().unwrap(), pki.key.to_str().unwrap());
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "a non-loopback address without TLS",
            vec!["--listen", "0.0.0.0:0", "--token-file", token],
            "not a loopback address",
        ),
        (
            "a missing certificate file",
            vec![
                "--listen",
                "127.0.0.1:0",
                "--token-file",
                token,
                "--tls-cert",
                missing.to_str().unwrap(),
                "--tls-key",
                key,
            ],
            "missing.pem",
        ),
        (
            "a certificate file without a certificate",
            vec![
                "--listen",
                "127.0.0.1:0",
                "--token-file",
                token,
                "--tls-cert",
                garbage.to_str().unwrap(),
                "--tls-key",
                key,
            ],
            "garbage.pem",
        ),
        (
            "a key file without a key",
            vec![
                "--listen",
                "127.0.0.1:0",
                "--token-file",
                token,
                "--tls-cert",
                cert,
                "--tls-key",
                cert,
            ],
            "no private key",
        ),
        (
            "a key of another certificate",
            vec![
                "--listen",
                "127.0.0.1:0",
                "--token-file",
                token,
                "--tls-cert",
                cert,
                "--tls-key",
                other.key.to_str().unwrap(),
            ],
            "does not go with the certificate",
        ),
        (
            "a certificate without its key",
            vec![
                "--listen",
                "127.0.0.1:0",
                "--token-file",
                token,
                "--tls-cert",
                cert,
            ],
            "--tls-key",
        ),
        (
            "TLS without a TCP listener",
            vec!["--tls-cert", cert, "--tls-key", key],
            "--listen",
        ),
        (
            "TCP without a token",
            vec![
                "--listen",
                "127.0.0.1:0",
                "--tls-cert",
                cert,
                "--tls-key",
                key,
            ],
            "--token-file",
        ),
    ];
    for (what, args, needle) in cases {
        let (status, stderr) = serve_refused(dir, &args);
        assert!(!status.success(), "{what}: started");
        assert!(stderr.contains(needle), "{what}: {stderr}");
        assert!(
            !dir.join("refused.sock").exists(),
            "{what}: bound the socket"
        );
    }
    // With TLS, a non-loopback address is fine.
    let d = Daemon::start(
        dir.join("no-kiln-vmm"),
        &[
            "--listen",
            "0.0.0.0:0",
            "--token-file",
            token,
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ],
    );
    let port = d.tcp_addr().rsplit_once(':').unwrap().1.to_owned();
    runtime().block_on(async {
        let client = https(&format!("127.0.0.1:{port}"), Some(TOKEN), Some(&pki.ca));
        assert_eq!(client.ping().await.unwrap().api, "v1");
        // An address the certificate does not name.
        let err = https(&format!("127.0.0.2:{port}"), Some(TOKEN), Some(&pki.ca))
            .ping()
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Tls { message, .. } if message.contains("not valid for name")),
            "{err:?}"
        );
    });
}

#[test]
fn on_plain_loopback_tcp_a_client_that_sends_no_headers_is_cut() {
    let keys = tempfile::tempdir().unwrap();
    let token = token_file(keys.path());
    let d = Daemon::start(
        keys.path().join("no-kiln-vmm"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            token.to_str().unwrap(),
        ],
    );
    let addr = d.tcp_addr();
    assert!(d.log().contains("plain, loopback"), "{}", d.log());
    let timeout = kiln_daemon::tcp::HEADER_TIMEOUT;
    // One that sends nothing, one that stops in the middle of its headers,
    // one kept alive after a request.
    let silent = std::net::TcpStream::connect(&addr).unwrap();
    let mut partial = std::net::TcpStream::connect(&addr).unwrap();
    partial
        .write_all(b"GET /v1/ping HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut idle = std::net::TcpStream::connect(&addr).unwrap();
    idle.write_all(
        format!("GET /v1/ping HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let started = Instant::now();
    for (what, mut conn) in [("silent", silent), ("partial", partial), ("idle", idle)] {
        conn.set_read_timeout(Some(timeout * 2)).unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got)
            .unwrap_or_else(|e| panic!("{what}: not cut within {:?}: {e}", timeout * 2));
        let text = String::from_utf8_lossy(&got);
        if what == "idle" {
            assert!(text.starts_with("HTTP/1.1 200"), "{what}: {text}");
        } else {
            assert!(!text.contains(" 200 "), "{what}: {text}");
        }
    }
    let waited = started.elapsed();
    assert!(
        waited >= timeout - Duration::from_secs(1),
        "cut after {waited:?}, before the header timeout"
    );
}
