//! A QEMU release from Debian packages, fetched by upstream version and
//! Debian revision and unpacked into the cache (never installed): the
//! binary, its firmware directories and its module directory. The rig uses it for the pinned
//! QEMU peer inside the nested host ([`crate::peer`]) and, to compare
//! releases side by side, as the outer QEMU that runs the nested host.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_guests::debian;

use crate::RigError;

/// The packages that make one QEMU release, each pinned by a version
/// prefix: the upstream version and Debian revision. The newest version the
/// archive lists under that prefix is fetched (Debian drops superseded
/// security revisions and binNMUs, so an exact pin stops being fetchable),
/// and [`UnpackedQemu::describe`] reports the exact one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QemuRelease {
    /// Short name for options and reports, e.g. `7.2`.
    pub label: &'static str,
    /// The Debian suite that ships it.
    pub suite: &'static str,
    /// `qemu-system-x86`; `qemu-system-common` is fetched at the same
    /// exact version (its TCG module must come from the same build).
    pub system: &'static str,
    pub data: &'static str,
    pub seabios: &'static str,
    pub ipxe: &'static str,
}

/// Debian 12's QEMU.
pub const BOOKWORM_7_2: QemuRelease = QemuRelease {
    label: "7.2",
    suite: "bookworm",
    system: "1:7.2+dfsg-7+",
    data: "1:7.2+dfsg-7+",
    seabios: "1.16.2-1",
    ipxe: "1.0.0+git-20190125.36a4c85-5.1",
};

/// QEMU 10.0 from Debian's `bookworm-backports` suite (its sources entry
/// comes from `scripts/install-deps.sh`).
pub const BACKPORTS_10_0: QemuRelease = QemuRelease {
    label: "10.0",
    suite: "bookworm-backports",
    system: "1:10.0.",
    data: "1:10.0.",
    seabios: "1.16.3-2~bpo12+",
    ipxe: "1.0.0+git-20190125.36a4c85-5.1",
};

pub const RELEASES: &[QemuRelease] = &[BOOKWORM_7_2, BACKPORTS_10_0];

impl QemuRelease {
    pub fn by_label(label: &str) -> Option<QemuRelease> {
        RELEASES.iter().copied().find(|r| r.label == label)
    }

    pub fn describe(&self) -> String {
        format!("qemu-system-x86 {}* ({})", self.system, self.suite)
    }
}

/// A release unpacked in the cache.
#[derive(Clone, Debug)]
pub struct UnpackedQemu {
    pub release: QemuRelease,
    /// The exact `qemu-system-x86` version fetched.
    pub version: String,
    /// `usr/bin/qemu-system-x86_64` of the unpacked package.
    pub binary: PathBuf,
    /// Passed as `-L` in this order: qemu-system-data's `usr/share/qemu`
    /// (qboot, linuxboot, kvmvapic; `bios-microvm.bin` is a link to
    /// `qboot.rom` there), seabios's `usr/share/seabios` (bios-256k, the
    /// VGA BIOSes), ipxe-qemu's `usr/lib/ipxe/qemu` (NIC option ROMs).
    pub firmware_dirs: Vec<PathBuf>,
    /// `QEMU_MODULE_DIR`: Debian builds TCG itself as a module
    /// (`accel-tcg-x86_64.so`), and a module of another build is refused.
    pub module_dir: PathBuf,
}

impl UnpackedQemu {
    /// Fetches and unpacks the release's packages (once; later calls only
    /// check the cache).
    pub fn ensure(cache: &Path, release: QemuRelease) -> Result<UnpackedQemu, RigError> {
        let setup = |e: kiln_guests::GuestError| RigError::Setup(e.to_string());
        let exact = |name: &str, version: &str| {
            debian::fetch_package_version(cache, name, version).map_err(setup)
        };
        let newest = |name: &str, prefix: &str| {
            let version = debian::newest_version_with_prefix(name, prefix).map_err(setup)?;
            exact(name, &version)
        };
        let system = newest("qemu-system-x86", release.system)?;
        let common = exact("qemu-system-common", &system.version)?;
        let data = newest("qemu-system-data", release.data)?;
        let seabios = newest("seabios", release.seabios)?;
        let ipxe = newest("ipxe-qemu", release.ipxe)?;
        let binary = system.root.join("usr/bin/qemu-system-x86_64");
        if !binary.is_file() {
            return Err(RigError::Setup(format!(
                "{} has no usr/bin/qemu-system-x86_64",
                system.root.display()
            )));
        }
        let q = UnpackedQemu {
            release,
            version: system.version.clone(),
            binary,
            firmware_dirs: vec![
                data.root.join("usr/share/qemu"),
                seabios.root.join("usr/share/seabios"),
                ipxe.root.join("usr/lib/ipxe/qemu"),
            ],
            module_dir: common.root.join("usr/lib/x86_64-linux-gnu/qemu"),
        };
        q.check_libraries()?;
        Ok(q)
    }

    /// Fails naming every shared library the binary needs that this host
    /// lacks (the rig copies the binary with the libraries `ldd` finds).
    pub fn check_libraries(&self) -> Result<(), RigError> {
        let out = Command::new("ldd")
            .arg(&self.binary)
            .output()
            .map_err(|e| RigError::Setup(format!("running ldd: {e}")))?;
        let missing: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("not found"))
            .filter_map(|l| l.split_whitespace().next().map(String::from))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(RigError::Setup(format!(
                "{} needs libraries this host lacks: {} (install their Debian packages)",
                self.describe(),
                missing.join(", ")
            )))
        }
    }

    /// The release with the exact version fetched.
    pub fn describe(&self) -> String {
        format!("qemu-system-x86 {} ({})", self.version, self.release.suite)
    }

    /// `qemu-system-x86_64` with its own firmware and modules.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        for dir in &self.firmware_dirs {
            cmd.arg("-L").arg(dir);
        }
        cmd.env("QEMU_MODULE_DIR", &self.module_dir);
        // Without an audio backend QEMU probes the default ones and loads
        // their modules; those missing from this build's module directory
        // would come from the installed QEMU's, which refuses them
        // ("Only modules from the same build can be loaded") and aborts.
        cmd.args(["-audiodev", "none,id=rig-noaudio"]);
        cmd
    }

    /// The first line of `--version`, from the binary itself.
    pub fn version_line(&self) -> Result<String, RigError> {
        let out = self
            .command()
            .arg("--version")
            .output()
            .map_err(|e| RigError::Setup(format!("running {}: {e}", self.binary.display())))?;
        let text = String::from_utf8_lossy(&out.stdout);
        match text.lines().next() {
            Some(line) if out.status.success() => Ok(line.trim().to_string()),
            _ => Err(RigError::Setup(format!(
                "{} --version failed: {}",
                self.binary.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))),
        }
    }
}
