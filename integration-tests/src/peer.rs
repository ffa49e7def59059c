//! The QEMU peer: the QEMU that runs *inside* the nested host (or on a
//! hardware-KVM host) next to Kiln in the `*_qemu_peer` tests, the rig
//! self-test and the benchmarks. It is a fixed release, Debian 12's QEMU
//! 7.2 (upstream 7.2, Debian revision `7.2+dfsg-7`, [`PEER_RELEASE`]) fetched
//! into the cache, whatever QEMU the machine has installed, so peer figures
//! stay comparable when the outer QEMU changes. Only Debian's security
//! revision of that release may move (the archive keeps just the newest);
//! every figure names the exact version it ran.
//!
//! Scripts run it as `"$PEER_QEMU" -L "$PEER_QEMU_FIRMWARE" ...`
//! ([`PeerQemu::add_to`] sets both and copies the binary, its shared
//! libraries and the microvm firmware in).

use std::path::{Path, PathBuf};

use crate::qemu_release::{QemuRelease, UnpackedQemu, BOOKWORM_7_2};
use crate::{RigError, Scenario};

pub const PEER_RELEASE: QemuRelease = BOOKWORM_7_2;

/// What `-M microvm` with `-kernel` loads from the firmware directory.
const MICROVM_FIRMWARE: &[&str] = &["qboot.rom", "bios-microvm.bin", "linuxboot_dma.bin"];

/// Shell prefix of a peer command line.
pub const PEER_COMMAND: &str = "\"$PEER_QEMU\" -L \"$PEER_QEMU_FIRMWARE\"";

#[derive(Clone, Debug)]
pub struct PeerQemu {
    pub qemu: UnpackedQemu,
}

impl PeerQemu {
    /// Fetches the pinned release into `cache` (once) and says which it is
    /// on stderr.
    pub fn ensure(cache: &Path) -> Result<PeerQemu, RigError> {
        let qemu = UnpackedQemu::ensure(cache, PEER_RELEASE)?;
        let peer = PeerQemu { qemu };
        for file in peer.firmware_files() {
            if !file.is_file() {
                return Err(RigError::Setup(format!(
                    "the peer's firmware {} is missing",
                    file.display()
                )));
            }
        }
        eprintln!("kiln-rig: QEMU peer: {}", peer.describe());
        Ok(peer)
    }

    /// `ensure` with the rig's cache directory.
    pub fn ensure_cached() -> Result<PeerQemu, RigError> {
        PeerQemu::ensure(&kiln_guests::cache_dir())
    }

    pub fn describe(&self) -> String {
        format!(
            "{} (pinned to {})",
            self.qemu.describe(),
            PEER_RELEASE.describe()
        )
    }

    pub fn binary(&self) -> &Path {
        &self.qemu.binary
    }

    /// qemu-system-data's directory: all microvm needs.
    pub fn firmware_dir(&self) -> &Path {
        &self.qemu.firmware_dirs[0]
    }

    pub fn firmware_files(&self) -> Vec<PathBuf> {
        MICROVM_FIRMWARE
            .iter()
            .map(|f| self.firmware_dir().join(f))
            .collect()
    }

    /// Shell lines that set `PEER_QEMU`/`PEER_QEMU_FIRMWARE` and print
    /// `PEER_QEMU_VERSION=` from the binary itself (so the output shows
    /// it runs where the script runs).
    pub fn shell_env(&self) -> String {
        format!(
            "PEER_QEMU='{}'\nPEER_QEMU_FIRMWARE='{}'\necho \"PEER_QEMU_VERSION=$(\"$PEER_QEMU\" --version | head -n 1) [{}]\"\n",
            self.binary().display(),
            self.firmware_dir().display(),
            self.qemu.version
        )
    }

    /// Puts the peer into `scenario`: binary (with its libraries),
    /// firmware, and [`Self::shell_env`] before the script.
    pub fn add_to(&self, scenario: &mut Scenario) {
        scenario.binaries.push(self.binary().to_path_buf());
        scenario.files.extend(self.firmware_files());
        scenario.script = format!("{}{}", self.shell_env(), scenario.script);
    }
}
