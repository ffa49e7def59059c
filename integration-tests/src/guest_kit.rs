//! Guest kits: the default guest's initramfs with an overlay appended
//! (Linux unpacks concatenated newc archives in order) that adds host
//! binaries with their shared libraries and a script at `/kiln/run`. The
//! default guest's `/init` runs that script after loading the virtio
//! modules, with the console as its stdin and stdout, prints
//! `KILN_RUN_EXIT=<status>` and powers off (`kiln.shell` on the command
//! line keeps the guest up with a shell instead).
//!
//! A scenario boots it with `--initrd <kit>` and adds the kit to
//! `Scenario::files` so it reaches the nested host.

use std::path::{Path, PathBuf};

use crate::initrd::Tree;
use crate::RigError;

/// Shell functions every kit script gets (busybox `sh`):
/// - `wait_host WORD`: reads console lines until one is `WORD` (the host
///   script writes it into the VMM's stdin);
/// - `by_serial SERIAL`: the `/dev/vdX` whose virtio-blk serial is SERIAL.
pub const GUEST_PRELUDE: &str = r#"
wait_host() { while read -r line; do [ "$line" = "$1" ] && return 0; done; echo "KIT_NO_HOST_WORD=$1"; return 1; }
by_serial() { for d in /sys/block/vd*; do [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ] && { echo "/dev/${d##*/}"; return 0; }; done; return 1; }
"#;

/// What goes into a kit.
#[derive(Clone, Debug, Default)]
pub struct GuestKit {
    /// Host binaries, copied to the same path with their shared libraries.
    pub binaries: Vec<PathBuf>,
    /// The script run as `/kiln/run` (after [`GUEST_PRELUDE`]).
    pub script: String,
}

impl GuestKit {
    pub fn new(script: &str) -> GuestKit {
        GuestKit {
            binaries: Vec::new(),
            script: script.to_string(),
        }
    }

    pub fn binary(mut self, path: impl Into<PathBuf>) -> GuestKit {
        self.binaries.push(path.into());
        self
    }

    /// Writes the default guest's initramfs plus this overlay to
    /// `target/guest-kits/<name>.cpio` and returns that path. `name` must
    /// be unique per test (tests run in parallel).
    pub fn build(&self, name: &str) -> Result<PathBuf, RigError> {
        let guest = kiln_guests::ensure_default_guest(&kiln_guests::cache_dir())
            .map_err(|e| RigError::Setup(e.to_string()))?;
        let dir = crate::scenario::target_dir().join("guest-kits");
        std::fs::create_dir_all(&dir)
            .map_err(|e| RigError::Setup(format!("creating {}: {e}", dir.display())))?;
        let out = dir.join(format!("{name}.cpio"));
        let mut bytes = std::fs::read(&guest.initramfs)
            .map_err(|e| RigError::Setup(format!("reading {}: {e}", guest.initramfs.display())))?;
        bytes.extend_from_slice(&self.overlay()?);
        std::fs::write(&out, bytes)
            .map_err(|e| RigError::Setup(format!("writing {}: {e}", out.display())))?;
        Ok(out)
    }

    /// The overlay archive alone.
    pub fn overlay(&self) -> Result<Vec<u8>, RigError> {
        let mut tree = Tree::default();
        for bin in &self.binaries {
            tree.host_binary(bin)?;
        }
        // Programs that look up users or write temporary files.
        tree.file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
        );
        tree.file("etc/group", 0o644, b"root:x:0:\n".to_vec());
        tree.dir("root");
        tree.file(
            "kiln/run",
            0o755,
            format!("{GUEST_PRELUDE}\n{}", self.script).into_bytes(),
        );
        let mut bytes = Vec::new();
        kiln_images::cpio::write_archive(&mut bytes, &tree.entries)
            .map_err(|e| RigError::Setup(format!("building the guest kit: {e}")))?;
        Ok(bytes)
    }
}

/// The path of an installed host tool (`/usr/bin/<name>` or the like), or
/// an error that names the install script.
pub fn host_tool(name: &str) -> Result<PathBuf, RigError> {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(RigError::Setup(format!(
        "{name} not found on this host: run scripts/install-deps.sh"
    )))
}
