//! What goes into each kind of image.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageKind {
    /// Plain Debian with the agent; cloud kernel.
    Base,
    /// Wayland desktop (sway) with the Clay shell, Xwayland and Wine; standard kernel (virtio-gpu).
    Clay,
    /// Debian + Wine with a prefix made at build time, Xvfb, the agent; cloud kernel.
    Wincompat,
}

impl ImageKind {
    pub const ALL: [ImageKind; 3] = [ImageKind::Base, ImageKind::Clay, ImageKind::Wincompat];

    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Base => "base",
            ImageKind::Clay => "clay",
            ImageKind::Wincompat => "wincompat",
        }
    }

    /// The Debian kernel meta-package.
    pub fn kernel_package(self) -> &'static str {
        match self {
            ImageKind::Clay => "linux-image-amd64",
            ImageKind::Base | ImageKind::Wincompat => "linux-image-cloud-amd64",
        }
    }

    /// Every package installed on top of Debian's minbase variant.
    pub fn packages(self) -> Vec<&'static str> {
        let mut p = vec![
            self.kernel_package(),
            "systemd-sysv",
            "udev",
            "kmod",
            "busybox-static",
            "procps",
            "iproute2",
            "e2fsprogs",
        ];
        match self {
            ImageKind::Base => {}
            ImageKind::Wincompat => p.extend(["wine", "wine64", "xvfb", "xauth"]),
            ImageKind::Clay => p.extend([
                "sway",
                "seatd",
                "xwayland",
                "foot",
                "fonts-dejavu-core",
                "libxkbcommon0",
                "wine",
                "wine64",
            ]),
        }
        p
    }

    pub fn hostname(self) -> String {
        format!("kiln-{}", self.name())
    }

    /// Kernel command line that boots this image from a virtio-blk root.
    pub fn cmdline(self) -> &'static str {
        match self {
            ImageKind::Clay => "console=ttyS0 root=/dev/vda rw rootwait=30 quiet",
            _ => "console=ttyS0 root=/dev/vda rw rootwait=30",
        }
    }
}

impl fmt::Display for ImageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ImageKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "base" => Ok(ImageKind::Base),
            "clay" => Ok(ImageKind::Clay),
            "wincompat" => Ok(ImageKind::Wincompat),
            other => Err(format!(
                "unknown image kind {other:?} (expected base, clay or wincompat)"
            )),
        }
    }
}

/// Where the Wine prefix lives in images with Wine (owned by root, used by the agent).
pub const AGENT_WINE_PREFIX: &str = "/var/lib/kiln/wine";
/// The Clay desktop user's home and Wine prefix.
pub const CLAY_USER: &str = "clay";
pub const CLAY_HOME: &str = "/home/clay";
/// Folder for Windows programs put into the guest.
pub const WINDOWS_APPS_DIR: &str = "/opt/windows-apps";
