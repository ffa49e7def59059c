//! Where the agent listens and how a client connects: virtio-vsock inside
//! guests, Unix sockets and TCP on the host (for tests and local use).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A listening address, as given on the agent's command line:
/// `vsock:PORT`, `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Vsock { port: u32 },
    Unix(PathBuf),
    Tcp(String),
}

/// A peer address for clients: `vsock:CID:PORT`, `vsock-uds:PATH:PORT`,
/// `unix:PATH`, `tcp:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectAddr {
    /// `AF_VSOCK` in the host kernel (QEMU's vhost-vsock).
    Vsock {
        cid: u32,
        port: u32,
    },
    /// Guest `port` through a userspace vsock's Unix socket `path` (Kiln's
    /// `--vsock cid=3,uds=PATH`): the `CONNECT`/`OK` handshake, see
    /// [`crate::vsock_uds`].
    VsockUds {
        path: PathBuf,
        port: u32,
    },
    Unix(PathBuf),
    Tcp(String),
}

#[derive(Debug, thiserror::Error)]
#[error("invalid address {input:?}: {reason}")]
pub struct AddrError {
    input: String,
    reason: &'static str,
}

fn addr_err(input: &str, reason: &'static str) -> AddrError {
    AddrError {
        input: input.to_string(),
        reason,
    }
}

impl FromStr for ListenAddr {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Self, AddrError> {
        if let Some(port) = s.strip_prefix("vsock:") {
            let port = port
                .parse()
                .map_err(|_| addr_err(s, "vsock port must be a number"))?;
            Ok(ListenAddr::Vsock { port })
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(addr_err(s, "empty socket path"));
            }
            Ok(ListenAddr::Unix(PathBuf::from(path)))
        } else if let Some(hp) = s.strip_prefix("tcp:") {
            Ok(ListenAddr::Tcp(hp.to_string()))
        } else {
            Err(addr_err(
                s,
                "expected vsock:PORT, unix:PATH or tcp:HOST:PORT",
            ))
        }
    }
}

impl FromStr for ConnectAddr {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Self, AddrError> {
        if let Some(rest) = s.strip_prefix("vsock-uds:") {
            // The path may hold colons; the port is after the last one.
            let (path, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| addr_err(s, "expected vsock-uds:PATH:PORT"))?;
            if path.is_empty() {
                return Err(addr_err(s, "empty socket path"));
            }
            let port = port
                .parse()
                .map_err(|_| addr_err(s, "port must be a number"))?;
            Ok(ConnectAddr::VsockUds {
                path: PathBuf::from(path),
                port,
            })
        } else if let Some(rest) = s.strip_prefix("vsock:") {
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| addr_err(s, "expected vsock:CID:PORT"))?;
            let cid = cid
                .parse()
                .map_err(|_| addr_err(s, "CID must be a number"))?;
            let port = port
                .parse()
                .map_err(|_| addr_err(s, "port must be a number"))?;
            Ok(ConnectAddr::Vsock { cid, port })
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(addr_err(s, "empty socket path"));
            }
            Ok(ConnectAddr::Unix(PathBuf::from(path)))
        } else if let Some(hp) = s.strip_prefix("tcp:") {
            Ok(ConnectAddr::Tcp(hp.to_string()))
        } else {
            Err(addr_err(
                s,
                "expected vsock:CID:PORT, vsock-uds:PATH:PORT, unix:PATH or tcp:HOST:PORT",
            ))
        }
    }
}

/// A connected byte stream of any transport.
pub trait Connection: Read + Write + Send {
    /// Best-effort: unblocks a peer waiting on us by closing both directions.
    fn shutdown_both(&self);
}

impl Connection for UnixStream {
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Connection for TcpStream {
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Connection for VsockStream {
    fn shutdown_both(&self) {
        // SAFETY: shutdown(2) on a socket fd we own; no memory is passed.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// A bound listener of any transport.
pub enum Listener {
    Vsock(VsockListener),
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `addr`. A stale Unix socket file at the path is replaced.
    pub fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        match addr {
            ListenAddr::Vsock { port } => Ok(Listener::Vsock(VsockListener::bind(*port)?)),
            ListenAddr::Unix(path) => {
                remove_stale_socket(path)?;
                Ok(Listener::Unix(UnixListener::bind(path)?, path.clone()))
            }
            ListenAddr::Tcp(hp) => Ok(Listener::Tcp(TcpListener::bind(hp.as_str())?)),
        }
    }

    /// Waits for the next client; returns it with a description for logs.
    pub fn accept(&self) -> io::Result<(Box<dyn Connection>, String)> {
        match self {
            Listener::Vsock(l) => {
                let (s, cid, port) = l.accept()?;
                Ok((Box::new(s), format!("vsock:{cid}:{port}")))
            }
            Listener::Unix(l, path) => {
                let (s, _) = l.accept()?;
                Ok((Box::new(s), format!("unix:{}", path.display())))
            }
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                Ok((Box::new(s), format!("tcp:{peer}")))
            }
        }
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listener::Vsock(l) => write!(f, "vsock:{}", l.port),
            Listener::Unix(_, p) => write!(f, "unix:{}", p.display()),
            Listener::Tcp(l) => write!(f, "tcp:{:?}", l.local_addr().ok()),
        }
    }
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// `AF_VSOCK` stream socket (std has no vsock support).
pub struct VsockStream {
    fd: OwnedFd,
}

pub struct VsockListener {
    fd: OwnedFd,
    port: u32,
}

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the returned fd is checked and then owned.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr_vm(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

const SOCKADDR_VM_LEN: libc::socklen_t =
    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

impl VsockListener {
    /// Listens on `port` for any CID (the host reaches the guest as CID 2 → guest CID).
    pub fn bind(port: u32) -> io::Result<VsockListener> {
        let fd = vsock_socket()?;
        let addr = sockaddr_vm(libc::VMADDR_CID_ANY, port);
        // SAFETY: addr is a valid sockaddr_vm of the stated length.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                SOCKADDR_VM_LEN,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen(2) on our own socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 64) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(VsockListener { fd, port })
    }

    pub fn port(&self) -> u32 {
        self.port
    }

    /// Returns the stream and the peer's CID and port.
    pub fn accept(&self) -> io::Result<(VsockStream, u32, u32)> {
        loop {
            let mut addr = sockaddr_vm(0, 0);
            let mut len = SOCKADDR_VM_LEN;
            // SAFETY: addr/len describe a writable sockaddr_vm buffer.
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    (&mut addr as *mut libc::sockaddr_vm).cast(),
                    &mut len,
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            // SAFETY: accept4 returned a fresh descriptor we now own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            return Ok((VsockStream { fd }, addr.svm_cid, addr.svm_port));
        }
    }
}

impl VsockStream {
    /// Connects to `port` on the VM (or host, CID 2) with context id `cid`.
    pub fn connect(cid: u32, port: u32) -> io::Result<VsockStream> {
        let fd = vsock_socket()?;
        let addr = sockaddr_vm(cid, port);
        loop {
            // SAFETY: addr is a valid sockaddr_vm of the stated length.
            let rc = unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_vm).cast(),
                    SOCKADDR_VM_LEN,
                )
            };
            if rc == 0 {
                return Ok(VsockStream { fd });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Sets `SO_RCVTIMEO` so a silent peer cannot block a reader forever.
    pub fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        let tv = match timeout {
            Some(d) => libc::timeval {
                tv_sec: d.as_secs() as libc::time_t,
                tv_usec: d.subsec_micros() as libc::suseconds_t,
            },
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        // SAFETY: setsockopt with a valid timeval of the stated size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is a valid writable buffer of buf.len() bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: buf is a valid readable buffer; MSG_NOSIGNAL avoids SIGPIPE.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_and_connect_addresses() {
        assert_eq!(
            "vsock:5252".parse::<ListenAddr>().expect("parse"),
            ListenAddr::Vsock { port: 5252 }
        );
        assert_eq!(
            "unix:/run/a.sock".parse::<ListenAddr>().expect("parse"),
            ListenAddr::Unix("/run/a.sock".into())
        );
        assert_eq!(
            "vsock:3:5252".parse::<ConnectAddr>().expect("parse"),
            ConnectAddr::Vsock { cid: 3, port: 5252 }
        );
        for bad in ["vsock:x", "unix:", "udp:1", ""] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
        assert_eq!(
            "vsock-uds:/tmp/a:b/v.sock:5252"
                .parse::<ConnectAddr>()
                .expect("parse"),
            ConnectAddr::VsockUds {
                path: "/tmp/a:b/v.sock".into(),
                port: 5252
            }
        );
        for bad in [
            "vsock:3",
            "vsock:a:1",
            "unix:",
            "ftp:x",
            "vsock-uds:/v.sock",
            "vsock-uds::5252",
            "vsock-uds:/v.sock:x",
        ] {
            assert!(bad.parse::<ConnectAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn unix_listener_refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("not-a-socket");
        std::fs::write(&path, b"data").expect("write");
        let err = Listener::bind(&ListenAddr::Unix(path.clone())).expect_err("must refuse");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).expect("still there"), b"data");
    }
}
