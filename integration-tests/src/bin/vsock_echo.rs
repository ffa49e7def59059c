//! `kiln-vsock-echo CID PORT CONNECTIONS`: opens CONNECTIONS vsock
//! connections to CID:PORT at once (one thread each), sends `echo-<i>` on
//! each, half-closes, and checks the echo server sends exactly that back.
//! `kiln-vsock-echo --uds PATH PORT CONNECTIONS` does the same from the
//! host through a VMM's vsock Unix socket (Firecracker's convention:
//! `CONNECT <PORT>\n`, answered `OK <host port>\n`).
//! Prints `VSOCK_ECHO_FAIL <i>: <reason>` per failed connection and
//! `VSOCK_ECHO_OK=<n>`; exits 0 only if all of them worked.
//!
//! Runs in a guest kit. Unlike socat it sets the vsock connect timeout
//! (SO_VM_SOCKETS_CONNECT_TIMEOUT) to 30 s: the kernel's 2 s default is too
//! short for a hundred connects at once under nested emulation.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

/// `SO_VM_SOCKETS_CONNECT_TIMEOUT` (the `_OLD` variant: a `timeval`).
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;

fn connect(cid: u32, port: u32) -> std::io::Result<std::net::TcpStream> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 30,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a pointer to a live timeval and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::AF_VSOCK,
            SO_VM_SOCKETS_CONNECT_TIMEOUT,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid start.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: connect(2) with a pointer to a live sockaddr_vm and its size.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // A stream socket: TcpStream's read/write/shutdown are plain syscalls
    // that work on any connected stream socket.
    Ok(std::net::TcpStream::from(owned))
}

/// Where to connect: a guest CID over AF_VSOCK, or a VMM's Unix socket.
#[derive(Clone)]
enum Target {
    Vsock(u32),
    Uds(String),
}

/// The Unix socket handshake: `CONNECT <port>\n`, then one line that must
/// start with `OK `, read byte by byte so no echoed data is consumed.
fn connect_uds(path: &str, port: u32) -> Result<std::os::unix::net::UnixStream, String> {
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .map_err(|e| format!("connect {path}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("write CONNECT: {e}"))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            Ok(_) => {
                return Err(format!(
                    "closed during the handshake after {:?}",
                    String::from_utf8_lossy(&line)
                ))
            }
            Err(e) => return Err(format!("reading the handshake: {e}")),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(format!(
            "handshake answer {:?}",
            String::from_utf8_lossy(&line)
        ));
    }
    Ok(s)
}

fn echo_once(target: &Target, port: u32, i: usize) -> Result<(), String> {
    match target {
        Target::Vsock(cid) => {
            let s = connect(*cid, port).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(60)))
                .map_err(|e| e.to_string())?;
            exchange(s, i, |s| s.shutdown(std::net::Shutdown::Write))
        }
        Target::Uds(path) => exchange(connect_uds(path, port)?, i, |s| {
            s.shutdown(std::net::Shutdown::Write)
        }),
    }
}

/// Sends the message, half-closes, reads the echo to EOF.
fn exchange<S: Read + Write>(
    mut s: S,
    i: usize,
    half_close: impl Fn(&S) -> std::io::Result<()>,
) -> Result<(), String> {
    let msg = format!("echo-{i}\n");
    s.write_all(msg.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    half_close(&s).map_err(|e| format!("shutdown: {e}"))?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).map_err(|e| format!("read: {e}"))?;
    if back == msg.as_bytes() {
        Ok(())
    } else {
        Err(format!(
            "sent {msg:?}, got {:?}",
            String::from_utf8_lossy(&back)
        ))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let parsed = match words[..] {
        ["--uds", path, port, n] => port
            .parse()
            .ok()
            .zip(n.parse().ok())
            .map(|pn| (Target::Uds(path.to_string()), pn)),
        [cid, port, n] => cid
            .parse()
            .ok()
            .zip(port.parse().ok().zip(n.parse().ok()))
            .map(|(c, pn)| (Target::Vsock(c), pn)),
        _ => None,
    };
    let Some((target, (port, n))) = parsed else {
        eprintln!("usage: kiln-vsock-echo CID PORT CONNECTIONS | kiln-vsock-echo --uds PATH PORT CONNECTIONS");
        std::process::exit(2);
    };
    let n: u32 = n;
    let threads: Vec<_> = (0..n as usize)
        .map(|i| {
            let target = target.clone();
            std::thread::spawn(move || (i, echo_once(&target, port, i)))
        })
        .collect();
    let mut ok = 0;
    for t in threads {
        match t.join() {
            Ok((_, Ok(()))) => ok += 1,
            Ok((i, Err(e))) => println!("VSOCK_ECHO_FAIL {i}: {e}"),
            Err(_) => println!("VSOCK_ECHO_FAIL: a thread panicked"),
        }
    }
    println!("VSOCK_ECHO_OK={ok}");
    std::process::exit(if ok == n { 0 } else { 1 });
}
