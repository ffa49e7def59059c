//! The host side of virtio-net: a Linux tap interface opened through
//! `/dev/net/tun`, with the virtio-net header on every frame
//! (`IFF_VNET_HDR`), so checksum and segmentation offloads pass straight
//! between the guest and the host stack.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::config::check_ifname;
use super::VNET_HDR_LEN;

const TUN_PATH: &str = "/dev/net/tun";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "{TUN_PATH} does not exist or has no driver ({0}): load the tun module (modprobe tun)"
    )]
    NoTunDevice(#[source] io::Error),
    #[error(
        "permission denied for tap {name:?}: creating or attaching a tap needs CAP_NET_ADMIN \
         (run as root), or create a persistent tap owned by this user first: \
         sudo ip tuntap add {name} mode tap user $USER"
    )]
    PermissionDenied { name: String },
    #[error("invalid tap name {name:?}: {why}")]
    InvalidName { name: String, why: String },
    #[error(
        "tap {name:?} is busy: another process is attached to it (a tap serves one VMM at a time)"
    )]
    Busy { name: String },
    #[error("interface {name:?} exists but is not a single-queue tap; choose another name")]
    NotATap { name: String },
    #[error("cannot open {TUN_PATH}: {0}")]
    Open(#[source] io::Error),
    #[error("tap {name:?}: {op} failed: {source}")]
    Ioctl {
        name: String,
        op: &'static str,
        source: io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags member of
/// the union, padded to the kernel's 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A tap interface (or, in tests, any packet socket standing in for one).
/// The fd is non-blocking; every read returns one frame, every write sends
/// one.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    /// False for a stand-in (socketpair) without the tun ioctls.
    is_tap: bool,
}

impl Tap {
    /// Attaches to tap `name`, creating it if it does not exist (a tap
    /// created here is not persistent: it goes away with the fd).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        check_ifname(name).map_err(|why| TapError::InvalidName {
            name: name.into(),
            why,
        })?;
        let path = CString::new(TUN_PATH).map_err(|e| TapError::Open(io::Error::other(e)))?;
        // SAFETY: a plain open of a NUL-terminated path.
        let raw = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => TapError::NoTunDevice(e),
                Some(libc::EACCES | libc::EPERM) => {
                    TapError::PermissionDenied { name: name.into() }
                }
                _ => TapError::Open(e),
            });
        }
        // SAFETY: `raw` is a freshly opened fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => {
                    TapError::PermissionDenied { name: name.into() }
                }
                Some(libc::EBUSY) => TapError::Busy { name: name.into() },
                Some(libc::EINVAL) => TapError::NotATap { name: name.into() },
                _ => TapError::Ioctl {
                    name: name.into(),
                    op: "TUNSETIFF",
                    source: e,
                },
            });
        }
        let tap = Tap {
            fd,
            name: name.into(),
            is_tap: true,
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(tap.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(tap.ioctl_error("TUNSETVNETHDRSZ"));
        }
        tap.set_offload(0).map_err(|source| TapError::Ioctl {
            name: name.into(),
            op: "TUNSETOFFLOAD",
            source,
        })?;
        Ok(tap)
    }

    /// A stand-in backend for tests and fuzzing: any fd that keeps frame
    /// boundaries (e.g. one end of a `SOCK_SEQPACKET` socketpair). It should
    /// be non-blocking.
    pub fn from_packet_fd(fd: OwnedFd, name: &str) -> Tap {
        Tap {
            fd,
            name: name.into(),
            is_tap: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn ioctl_error(&self, op: &'static str) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            op,
            source: io::Error::last_os_error(),
        }
    }

    /// Tells the kernel which offloads the guest accepts on receive
    /// (`TUN_F_*`): frames the tap hands us then only use those.
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        if !self.is_tap {
            return Ok(());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame (virtio-net header first); `WouldBlock` when none
    /// is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Sends one frame gathered from `iov` (virtio-net header first).
    ///
    /// # Safety
    /// Every iovec must point to memory readable for its length for the
    /// duration of the call.
    pub unsafe fn write_frame(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iov.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        loop {
            // SAFETY: the caller guarantees the iovecs are readable.
            let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), count) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Offload flags for the tap from the guest's accepted virtio-net
/// features. The kernel refuses segmentation offloads without checksum
/// offload, and so does the virtio spec.
pub fn offload_flags(acked: u64) -> libc::c_uint {
    use super::feature::*;
    if acked & GUEST_CSUM == 0 {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if acked & GUEST_TSO4 != 0 {
        flags |= libc::TUN_F_TSO4;
    }
    if acked & GUEST_TSO6 != 0 {
        flags |= libc::TUN_F_TSO6;
    }
    flags
}
