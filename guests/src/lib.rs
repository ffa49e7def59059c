//! Guest artifacts built from Debian packages: the default guest (Debian's
//! cloud kernel plus a busybox initramfs) and the package fetch/cache code
//! the nested test rig and the image builder share.
//!
//! Everything lands in [`cache_dir`], keyed by the concrete package
//! version, written through a temporary name and renamed, so an interrupted
//! run never leaves half an artifact and a second run does no work.

pub mod debian;
pub mod default_guest;
pub mod lock;
pub mod vmlinux;

use std::path::PathBuf;

pub use debian::{fetch_package, ExtractedPackage};
pub use default_guest::{ensure_default_guest, DefaultGuest};

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("cannot fetch Debian package {package}: {detail}")]
    Fetch { package: String, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Kernel(String),
    #[error(transparent)]
    Image(#[from] kiln_images::ImageError),
}

impl GuestError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        GuestError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Where guest artifacts are cached: `$KILN_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`. The project's scripts set
/// `KILN_CACHE_DIR` to the repository's ignored `.cache/kiln`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("kiln");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/kiln")
}

/// A stable 64-bit hash (FNV-1a) for cache keys: the same on every run and
/// machine, unlike `std`'s hasher.
pub fn stable_hash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Prints a progress line on stderr (these steps take seconds to minutes).
pub(crate) fn progress(line: &str) {
    eprintln!("kiln-guests: {line}");
}
