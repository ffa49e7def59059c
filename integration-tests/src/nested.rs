//! The nested KVM host: Debian's standard kernel with `kvm_amd`, booted by
//! QEMU in TCG mode with an emulated EPYC CPU that has SVM and nested
//! paging. One vCPU: with two, the nested host froze about once in a dozen
//! launches (DESIGN.md).

use std::path::{Path, PathBuf};

use kiln_guests::{debian, DefaultGuest};

use crate::initrd::Tree;
use crate::RigError;

pub const HOST_KERNEL_PACKAGE: &str = "linux-image-amd64";
pub const QEMU_CPU: &str = "EPYC-Rome,+svm,+npt";
/// Modules for KVM on AMD, in load order (DESIGN.md).
const KVM_MODULES: &[&str] = &[
    "kernel/virt/lib/irqbypass.ko",
    "kernel/drivers/crypto/ccp/ccp.ko",
    "kernel/arch/x86/kvm/kvm.ko",
    "kernel/arch/x86/kvm/kvm-amd.ko",
];

/// Paths of the default guest inside the nested host.
pub const GUEST_DIR: &str = "/guest";

pub const BEGIN_MARKER: &str = "KILN_RIG_SCRIPT_BEGIN";
pub const EXIT_MARKER: &str = "KILN_RIG_SCRIPT_EXIT=";
pub const ERROR_MARKER: &str = "KILN_RIG_ERROR=";
/// Printed every 15 s by the nested host while the script runs.
pub const ALIVE_MARKER: &str = "KILN_RIG_ALIVE";
/// Printed once KVM works in the nested host, before the script starts.
pub const HOST_READY_MARKER: &str = "KILN_RIG_HOST_READY";

/// Modules the nested host always loads (with their dependencies), so
/// scripts find `/dev/net/tun` and `/dev/vhost-net`.
pub const DEFAULT_MODULES: &[&str] = &["tun", "vhost_net"];

/// In the initramfs when the scenario forwards ports: "ADDRESS GATEWAY"
/// for `eth0`.
pub const NETWORK_FLAG: &str = "rig/network";

/// The nested host's init, in two stages. The initramfs is the kernel's
/// rootfs, which cannot be unmounted, so `pivot_root` (containers, some
/// sandboxes) fails on it. Stage 1 mounts a tmpfs, bind-mounts the
/// initramfs's top-level directories into it (copying its ~80 MB cost
/// seconds of boot under TCG; binds cost nothing and double no memory),
/// gives it its own `/tmp`, and makes it the root as busybox
/// `switch_root` does (move it onto `/`, chroot), but without emptying the
/// initramfs, whose files the binds still show. Stage 2 sets the host up
/// and runs the script.
const INIT: &str = r#"#!/bin/busybox sh
if [ "$1" != --rig-root ]; then
  # Few programs here: each start costs under TCG (mkdir, echo, [ are
  # shell built-ins; the binds are one mount -a).
  b=/bin/busybox
  die() { echo "KILN_RIG_ERROR=$*"; $b poweroff -f; }
  mkdir /newroot && $b mount -t tmpfs -o mode=0755 root /newroot || die "mounting the tmpfs root failed"
  : > /rig-fstab
  for e in /*; do
    case "$e" in
      /newroot|/rig-fstab) ;;
      /dev|/proc|/sys|/tmp) mkdir "/newroot$e" ;;
      *) if [ -L "$e" ]; then
           $b cp -a "$e" /newroot/ || die "copying $e into the tmpfs root failed"
           continue
         fi
         if [ -d "$e" ]; then mkdir "/newroot$e"; else : > "/newroot$e"; fi
         echo "$e /newroot$e none bind 0 0" >> /rig-fstab ;;
    esac
  done
  echo "tmp /newroot/tmp tmpfs mode=1777 0 0" >> /rig-fstab
  $b mount -a -T /rig-fstab || die "binding the initramfs into the tmpfs root failed"
  for e in /tmp/* /tmp/.[!.]*; do
    [ -e "$e" ] || [ -L "$e" ] || continue
    $b mv "$e" /newroot/tmp/ || die "moving $e to the new /tmp failed"
  done
  cd /newroot && $b mount -o move . / || die "moving the tmpfs root onto / failed"
  exec $b chroot . /init --rig-root
fi
/bin/busybox --install -s /bin
die() { echo "KILN_RIG_ERROR=$*"; poweroff -f; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts || die "mounting /dev/pts failed"
mount -t tmpfs -o mode=1777 shm /dev/shm || die "mounting /dev/shm failed"
# cgroup v2 with cpu, memory and pids delegated to child groups.
mount -t cgroup2 cgroup2 /sys/fs/cgroup || die "mounting cgroup2 failed"
echo "+cpu +memory +pids" > /sys/fs/cgroup/cgroup.subtree_control || die "enabling the cpu, memory and pids cgroup controllers failed"
for m in $(cat /rig/kvm-modules); do insmod "/rig/modules/$m" || echo "KILN_RIG_ERROR=insmod $m failed"; done
# The default modules (tun, vhost_net) and those a scenario asked for
# (Scenario::host_modules), dependencies first.
for m in $(cat /rig/extra-modules 2>/dev/null); do insmod "/rig/modules/$m" || echo "KILN_RIG_ERROR=insmod $m failed"; done
if [ ! -e /dev/kvm ]; then echo "KILN_RIG_ERROR=no /dev/kvm in the nested host"; poweroff -f; fi
npt=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null)
if [ "$npt" != Y ] && [ "$npt" != 1 ]; then echo "KILN_RIG_ERROR=kvm_amd runs without nested paging (npt=$npt)"; poweroff -f; fi
ip link set lo up
if [ -e /rig/network ]; then
  # The way in (Scenario::forward_ports): QEMU's restricted user network.
  read -r addr gw < /rig/network
  n=0; while [ ! -e /sys/class/net/eth0 ]; do n=$((n+1)); [ $n -gt 100 ] && die "no eth0 for the forwarded ports"; sleep 0.1; done
  ip addr add "$addr" dev eth0 && ip link set eth0 up && ip route add default via "$gw" || die "configuring eth0 failed"
fi
echo KILN_RIG_HOST_READY
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
export KILN=/usr/bin/kiln KILN_VMM=/usr/bin/kiln-vmm GUEST_BZIMAGE=/guest/bzImage GUEST_VMLINUX=/guest/vmlinux GUEST_INITRD=/guest/initramfs.cpio
export WORKDIR=/tmp/work KILN_RIG_MODE=nested HOME=/root
mkdir -p "$WORKDIR" /root && cd "$WORKDIR"
if [ -e /rig/interactive ]; then
  # A controlling terminal, so Ctrl-C reaches the script's programs.
  setsid cttyhack sh /rig/script.sh
  poweroff -f
fi
# A heartbeat, so the rig tells a frozen nested host (no heartbeat) from a
# script that is merely quiet (the scenario's timeout covers that).
( while sleep 15; do echo KILN_RIG_ALIVE; done ) &
echo $! > /rig/heartbeat.pid
echo KILN_RIG_SCRIPT_BEGIN
sh /rig/script.sh < /dev/null 2>&1
echo "KILN_RIG_SCRIPT_EXIT=$?"
poweroff -f
"#;

/// The nested host's kernel and the initramfs part shared by all
/// scenarios (busybox, KVM modules, the default guest, /init).
pub struct NestedHost {
    pub kernel: PathBuf,
    pub base_initrd: PathBuf,
    /// `lib/modules/<version>` of the nested host's kernel (with modules.dep).
    pub modules: PathBuf,
}

impl NestedHost {
    /// The module files for `names` (and their dependencies) in load
    /// order, as (file name, contents); modules built into the kernel are
    /// left out.
    pub fn module_files(&self, names: &[String]) -> Result<Vec<(String, Vec<u8>)>, RigError> {
        let dep = std::fs::read_to_string(self.modules.join("modules.dep"))
            .map_err(|e| RigError::Setup(format!("reading the nested host's modules.dep: {e}")))?;
        let builtin =
            std::fs::read_to_string(self.modules.join("modules.builtin")).unwrap_or_default();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let order = kiln_images::initramfs::ModuleIndex::parse(&dep, &builtin)
            .load_order(&names)
            .map_err(|e| RigError::Setup(format!("nested host modules: {e}")))?;
        order
            .iter()
            .map(|rel| {
                Ok((
                    rel.rsplit('/').next().unwrap_or(rel).to_string(),
                    read(&self.modules.join(rel))?,
                ))
            })
            .collect()
    }
}

pub fn prepare(cache: &Path, guest: &DefaultGuest) -> Result<NestedHost, RigError> {
    let pkg = debian::fetch_package(cache, HOST_KERNEL_PACKAGE)
        .map_err(|e| RigError::Setup(e.to_string()))?;
    let kernel = debian::find_one(&pkg.root.join("boot"), "vmlinuz-")
        .map_err(|e| RigError::Setup(e.to_string()))?;
    let version = kernel
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    let busybox = debian::fetch_package(cache, kiln_guests::default_guest::BUSYBOX_PACKAGE)
        .map_err(|e| RigError::Setup(e.to_string()))?;

    let guest_key = guest
        .initramfs
        .parent()
        .and_then(|p| p.file_name())
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    // The key covers everything baked into the base initramfs, /init too.
    let dir = cache.join("rig").join(format!(
        "{}__{guest_key}__init-{:016x}",
        pkg.version.replace([':', '/'], "_"),
        kiln_guests::stable_hash(INIT.as_bytes())
    ));
    let base_initrd = dir.join("base.cpio");
    std::fs::create_dir_all(&dir)
        .map_err(|e| RigError::Setup(format!("creating {}: {e}", dir.display())))?;
    let modules = pkg.root.join("lib/modules").join(&version);
    let _lock = kiln_guests::lock::FileLock::acquire(&dir.join("lock"))
        .map_err(|e| RigError::Setup(e.to_string()))?;
    debian::ensure_modules_dep(&pkg.root, &version).map_err(|e| RigError::Setup(e.to_string()))?;
    if base_initrd.is_file() {
        return Ok(NestedHost {
            kernel,
            base_initrd,
            modules,
        });
    }
    eprintln!("kiln-rig: building the nested host's initramfs (once per kernel/guest version)");
    let mut tree = Tree::default();
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "root",
        "usr/bin",
        "usr/local/bin",
        "rig/modules",
    ] {
        tree.dir(d);
    }
    tree.entries.push(kiln_images::cpio::Entry::CharDev {
        path: "dev/console".into(),
        mode: 0o600,
        major: 5,
        minor: 1,
    });
    tree.file(
        "bin/busybox",
        0o755,
        read(&busybox.root.join("bin/busybox"))?,
    );
    tree.file("init", 0o755, INIT.as_bytes().to_vec());
    let mut names = Vec::new();
    for m in KVM_MODULES {
        let name = m.rsplit('/').next().unwrap_or(m);
        tree.file(
            &format!("rig/modules/{name}"),
            0o644,
            read(&modules.join(m))?,
        );
        names.push(name);
    }
    tree.file(
        "rig/kvm-modules",
        0o644,
        (names.join("\n") + "\n").into_bytes(),
    );
    tree.file("guest/bzImage", 0o644, read(&guest.bzimage)?);
    tree.file("guest/vmlinux", 0o644, read(&guest.vmlinux)?);
    tree.file("guest/initramfs.cpio", 0o644, read(&guest.initramfs)?);
    let tmp = dir.join("base.cpio.tmp");
    tree.write(&tmp)?;
    std::fs::rename(&tmp, &base_initrd)
        .map_err(|e| RigError::Setup(format!("renaming {}: {e}", tmp.display())))?;
    Ok(NestedHost {
        kernel,
        base_initrd,
        modules,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, RigError> {
    std::fs::read(path).map_err(|e| RigError::Setup(format!("reading {}: {e}", path.display())))
}
