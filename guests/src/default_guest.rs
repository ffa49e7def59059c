//! The default guest: Debian's cloud kernel (bzImage, and the vmlinux
//! inside it for PVH) and a busybox initramfs that loads the virtio
//! modules.
//!
//! The `/init` contract (tests and the boot benchmark rely on it):
//! 1. prints `KILN_INIT_OK` first thing;
//! 2. mounts proc/sys/devtmpfs, loads the virtio modules and the ACPI
//!    power button's (`button`, `evdev`), and starts busybox `acpid` on
//!    the input devices: a power button press (the VMM's GED, see
//!    `kiln_firmware::acpi`) prints `KILN_POWER_BUTTON` and powers off;
//! 3. prints `KILN_CPUS=<online CPUs>` and `KILN_MEM_KB=<MemTotal>`;
//! 4. if `/kiln/run` exists (a guest kit appended to the initramfs, see
//!    `kiln_integration_tests::guest_kit`), runs it with `sh`, its output
//!    and stdin on the console, prints `KILN_RUN_EXIT=<status>` and powers
//!    off, unless `kiln.shell` is on the command line (then goes on to 5);
//! 5. `kiln.poweroff` on the command line powers off, `kiln.reboot`
//!    reboots; otherwise prints `KILN_SHELL_READY` and runs a shell on the
//!    console, powering off when it exits.

use std::path::{Path, PathBuf};

use kiln_images::cpio::{write_archive, Entry};
use kiln_images::initramfs::ModuleIndex;

use crate::debian::{fetch_package, find_one};
use crate::lock::FileLock;
use crate::{progress, vmlinux, GuestError};

pub const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

/// Virtio drivers the initramfs loads (with their dependencies).
pub const VIRTIO_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_balloon",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
];

/// The ACPI power button driver (it turns the GED's `Notify (PWRB, 0x80)`
/// into a KEY_POWER input event) and the input event device acpid reads.
pub const POWER_BUTTON_MODULES: &[&str] = &["button", "evdev"];

/// What busybox acpid runs on KEY_POWER: it maps that key to the action
/// `PWRF/00000080` under its config directory (`/etc/acpi`). Its own output
/// goes to acpid's log, so the marker is written to the console.
const POWER_BUTTON_HANDLER: &str = "#!/bin/sh
echo KILN_POWER_BUTTON > /dev/console
poweroff -f
";

#[derive(Clone, Debug)]
pub struct DefaultGuest {
    pub bzimage: PathBuf,
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    pub kernel_version: String,
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox echo KILN_INIT_OK
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/kiln-modules); do insmod "/lib/modules/$m" 2>/dev/null; done
acpid -l /dev/null
echo "KILN_CPUS=$(grep -c ^processor /proc/cpuinfo)"
echo "KILN_MEM_KB=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
if [ -e /kiln/run ]; then
  sh /kiln/run
  echo "KILN_RUN_EXIT=$?"
  case " $(cat /proc/cmdline) " in
    *" kiln.shell "*) ;;
    *) poweroff -f ;;
  esac
fi
case " $(cat /proc/cmdline) " in
  *" kiln.poweroff "*) poweroff -f ;;
  *" kiln.reboot "*) reboot -f ;;
esac
echo KILN_SHELL_READY
setsid cttyhack sh -l
poweroff -f
"#;

/// Fetches and builds the default guest if it isn't cached yet.
pub fn ensure_default_guest(cache: &Path) -> Result<DefaultGuest, GuestError> {
    let kernel = fetch_package(cache, KERNEL_PACKAGE)?;
    let busybox = fetch_package(cache, BUSYBOX_PACKAGE)?;
    let vmlinuz = find_one(&kernel.root.join("boot"), "vmlinuz-")?;
    let kernel_version = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_string();

    // The key covers the packages and this file's recipe (/init and the
    // module list), so editing either rebuilds instead of reusing a stale
    // initramfs.
    let recipe = crate::stable_hash(
        format!("{INIT}\0{POWER_BUTTON_HANDLER}\0{}", modules().join(",")).as_bytes(),
    );
    let key =
        format!("{}_{}_{recipe:016x}", kernel.version, busybox.version).replace([':', '/'], "_");
    let dir = cache.join("default-guest").join(&key);
    let guest = DefaultGuest {
        bzimage: dir.join("bzImage"),
        vmlinux: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.cpio"),
        kernel_version: kernel_version.clone(),
    };
    let _lock = FileLock::acquire(&cache.join("default-guest").join(format!("{key}.lock")))?;
    if guest.initramfs.is_file() && guest.vmlinux.is_file() && guest.bzimage.is_file() {
        return Ok(guest);
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| GuestError::io(format!("creating {}", dir.display()), e))?;

    let bz = std::fs::read(&vmlinuz)
        .map_err(|e| GuestError::io(format!("reading {}", vmlinuz.display()), e))?;
    progress("extracting vmlinux (PVH entry) from the bzImage");
    let elf = vmlinux::extract(&bz)?;
    if !vmlinux::has_pvh_note(&elf) {
        return Err(GuestError::Kernel(format!(
            "{} has no PVH entry note",
            vmlinuz.display()
        )));
    }
    write_atomic(&guest.vmlinux, &elf)?;
    write_atomic(&guest.bzimage, &bz)?;

    progress("building the busybox initramfs");
    let modules = kernel.root.join("lib/modules").join(&kernel_version);
    crate::debian::ensure_modules_dep(&kernel.root, &kernel_version)?;
    let cpio = initramfs(&busybox.root.join("bin/busybox"), &modules)?;
    write_atomic(&guest.initramfs, &cpio)?;
    progress(&format!(
        "default guest ready: kernel {kernel_version} ({} MiB), initramfs {} KiB",
        bz.len() >> 20,
        cpio.len() >> 10
    ));
    Ok(guest)
}

/// Every module the initramfs loads, by name.
fn modules() -> Vec<&'static str> {
    [VIRTIO_MODULES, POWER_BUTTON_MODULES].concat()
}

fn read(path: &Path) -> Result<Vec<u8>, GuestError> {
    std::fs::read(path).map_err(|e| GuestError::io(format!("reading {}", path.display()), e))
}

fn initramfs(busybox: &Path, modules_dir: &Path) -> Result<Vec<u8>, GuestError> {
    let dep = String::from_utf8_lossy(&read(&modules_dir.join("modules.dep"))?).into_owned();
    let builtin = std::fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    let order = ModuleIndex::parse(&dep, &builtin).load_order(&modules())?;

    let dir = |path: &str| Entry::Dir {
        path: path.into(),
        mode: 0o755,
    };
    let mut entries = vec![
        dir("bin"),
        dir("dev"),
        Entry::CharDev {
            path: "dev/console".into(),
            mode: 0o600,
            major: 5,
            minor: 1,
        },
        dir("etc"),
        dir("lib"),
        dir("lib/modules"),
        dir("proc"),
        dir("sys"),
        dir("tmp"),
        Entry::File {
            path: "bin/busybox".into(),
            mode: 0o755,
            data: read(busybox)?,
        },
        Entry::File {
            path: "init".into(),
            mode: 0o755,
            data: INIT.as_bytes().to_vec(),
        },
        dir("etc/acpi"),
        dir("etc/acpi/PWRF"),
        Entry::File {
            path: "etc/acpi/PWRF/00000080".into(),
            mode: 0o755,
            data: POWER_BUTTON_HANDLER.as_bytes().to_vec(),
        },
        Entry::File {
            path: "etc/kiln-modules".into(),
            mode: 0o644,
            data: (order.join("\n") + "\n").into_bytes(),
        },
    ];
    let mut made = std::collections::BTreeSet::new();
    for module in &order {
        let mut parent = String::from("lib/modules");
        for part in module
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map(|x| x.1)
            .unwrap_or_default()
        {
            parent = format!("{parent}/{part}");
            if made.insert(parent.clone()) {
                entries.push(dir(&parent));
            }
        }
        entries.push(Entry::File {
            path: format!("lib/modules/{module}"),
            mode: 0o644,
            data: read(&modules_dir.join(module))?,
        });
    }
    let mut out = Vec::new();
    write_archive(&mut out, &entries).map_err(|e| GuestError::io("writing the initramfs", e))?;
    Ok(out)
}

pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), GuestError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)
        .map_err(|e| GuestError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| GuestError::io(format!("renaming {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_prints_marker_before_anything_else() {
        let first_command = INIT.lines().nth(1).unwrap();
        assert_eq!(first_command, "/bin/busybox echo KILN_INIT_OK");
        for needle in [
            "KILN_CPUS=",
            "KILN_MEM_KB=",
            "/kiln/run",
            "KILN_RUN_EXIT=",
            "kiln.shell",
            "kiln.poweroff",
            "kiln.reboot",
            "KILN_SHELL_READY",
        ] {
            assert!(INIT.contains(needle), "{needle}");
        }
    }

    /// acpid must be listening before the init reports it is ready (the
    /// control protocol's `power_button` is pressed after that), and after
    /// the modules that create its input device are loaded.
    #[test]
    fn acpid_starts_after_the_modules_and_before_the_guest_is_ready() {
        let line = |needle: &str| {
            INIT.lines()
                .position(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("{needle} not in /init"))
        };
        assert!(line("kiln-modules") < line("acpid"));
        assert!(line("acpid") < line("/kiln/run"));
        assert!(line("acpid") < line("echo KILN_SHELL_READY"));
        assert!(POWER_BUTTON_HANDLER.starts_with("#!/bin/sh\n"));
        assert!(POWER_BUTTON_HANDLER.contains("KILN_POWER_BUTTON"));
        assert!(POWER_BUTTON_HANDLER.contains("poweroff -f"));
        assert!(modules().contains(&"button") && modules().contains(&"evdev"));
    }

    /// Fetches real packages (needs apt and the Debian mirror): the whole
    /// default guest, built twice to check the cache.
    #[test]
    fn default_guest_builds_and_is_cached() {
        let cache = crate::cache_dir();
        let g = ensure_default_guest(&cache).expect("default guest must build (needs apt access)");
        let elf = std::fs::read(&g.vmlinux).unwrap();
        let entry =
            vmlinux::pvh_entry(&elf).expect("Debian's kernel carries XEN_ELFNOTE_PHYS32_ENTRY");
        // The 32-bit entry lies in the kernel's physical load range (16 MiB up).
        assert!(
            (0x0100_0000..0x4000_0000).contains(&entry),
            "PVH entry {entry:#x}"
        );
        let cpio = std::fs::read(&g.initramfs).unwrap();
        assert!(cpio.windows(11).any(|w| w == b"virtio_pci."));
        let t0 = std::time::Instant::now();
        let again = ensure_default_guest(&cache).unwrap();
        assert_eq!(again.initramfs, g.initramfs);
        assert!(t0.elapsed().as_secs() < 20, "cached call must not rebuild");
    }
}
