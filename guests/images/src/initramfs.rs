//! The initramfs: busybox (from the image's own busybox-static), the virtio
//! modules the root disk needs with their dependencies (from the kernel's
//! modules.dep), and an /init that loads them, waits for the root disk,
//! mounts it and switches to it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::cpio::{self, Entry};
use crate::ImageError;

/// Modules needed to reach an ext4 root on virtio-blk over virtio-pci; the
/// ones built into a kernel are skipped. Later ones depend on earlier ones
/// only through modules.dep, which decides the load order.
pub const ROOT_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "crc32c_generic",
    "ext4",
];

/// `module name → (path relative to /lib/modules/VER, dependency paths)`.
pub struct ModuleIndex {
    deps: BTreeMap<String, Vec<String>>,
    by_name: BTreeMap<String, String>,
    builtin: BTreeSet<String>,
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

impl ModuleIndex {
    pub fn parse(modules_dep: &str, modules_builtin: &str) -> ModuleIndex {
        let mut deps = BTreeMap::new();
        let mut by_name = BTreeMap::new();
        for line in modules_dep.lines() {
            let Some((module, rest)) = line.split_once(':') else {
                continue;
            };
            let module = module.trim().to_string();
            by_name.insert(module_name(&module), module.clone());
            deps.insert(module, rest.split_whitespace().map(String::from).collect());
        }
        let builtin = modules_builtin
            .lines()
            .map(|l| module_name(l.trim()))
            .collect();
        ModuleIndex {
            deps,
            by_name,
            builtin,
        }
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&name.replace('-', "_"))
    }

    /// Module files to load for `names`, dependencies first, each once.
    pub fn load_order(&self, names: &[&str]) -> Result<Vec<String>, ImageError> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for name in names {
            let key = name.replace('-', "_");
            if self.is_builtin(&key) {
                continue;
            }
            let path = self.by_name.get(&key).ok_or_else(|| {
                ImageError::Initramfs(format!(
                    "kernel module {name} is neither built in nor in modules.dep"
                ))
            })?;
            self.visit(path, &mut seen, &mut order, 0)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        path: &str,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> Result<(), ImageError> {
        if depth > 64 {
            return Err(ImageError::Initramfs(format!(
                "module dependency loop at {path}"
            )));
        }
        if !seen.insert(path.to_string()) {
            return Ok(());
        }
        // modules.dep lists the full closure, but visiting recursively also
        // gets the order right when it does not.
        for dep in self.deps.get(path).map(Vec::as_slice).unwrap_or_default() {
            self.visit(dep, seen, order, depth + 1)?;
        }
        order.push(path.to_string());
        Ok(())
    }
}

/// The /init script. `root=` (default /dev/vda) and `rootfstype=` (default
/// ext4) come from the kernel command line; `rootwait=` seconds to wait.
pub fn init_script(module_files: &[String]) -> String {
    let mut s = String::from(
        r#"#!/bin/sh
# Kiln initramfs: load virtio modules, mount the root disk, switch to it.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "kiln-initramfs: loading modules" > /dev/console
"#,
    );
    for m in module_files {
        s.push_str(&format!(
            "insmod /lib/modules/{m} || echo \"kiln-initramfs: cannot load {m}\" > /dev/console\n"
        ));
    }
    s.push_str(
        r#"root=/dev/vda
fstype=ext4
flags=rw
wait=30
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root="${arg#root=}" ;;
        rootfstype=*) fstype="${arg#rootfstype=}" ;;
        rootwait=*) wait="${arg#rootwait=}" ;;
        ro) flags=ro ;;
    esac
done
n=0
while [ ! -b "$root" ]; do
    if [ "$n" -ge $((wait * 10)) ]; then
        echo "kiln-initramfs: root device $root did not appear in ${wait}s" > /dev/console
        exec sh
    fi
    n=$((n + 1))
    sleep 0.1
done
mkdir -p /newroot
if ! mount -t "$fstype" -o "$flags" "$root" /newroot; then
    echo "kiln-initramfs: cannot mount $root ($fstype)" > /dev/console
    exec sh
fi
echo "kiln-initramfs: switching to $root" > /dev/console
umount /proc /sys
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot /sbin/init
"#,
    );
    s
}

/// Builds the initramfs for the kernel `kver` installed in `root`.
pub fn build(root: &Path, kver: &str, out: &Path) -> Result<u64, ImageError> {
    let moddir = root.join("lib/modules").join(kver);
    let read = |name: &str| {
        std::fs::read_to_string(moddir.join(name))
            .map_err(|e| ImageError::Initramfs(format!("{}/{name}: {e}", moddir.display())))
    };
    let index = ModuleIndex::parse(&read("modules.dep")?, &read("modules.builtin")?);
    let order = index.load_order(ROOT_MODULES)?;
    let busybox = std::fs::read(root.join("bin/busybox")).map_err(|e| {
        ImageError::Initramfs(format!(
            "busybox-static missing from the root filesystem: {e}"
        ))
    })?;

    let mut entries = vec![
        Entry::Dir {
            path: "bin".into(),
            mode: 0o755,
        },
        Entry::Dir {
            path: "dev".into(),
            mode: 0o755,
        },
        Entry::CharDev {
            path: "dev/console".into(),
            mode: 0o600,
            major: 5,
            minor: 1,
        },
        Entry::Dir {
            path: "lib".into(),
            mode: 0o755,
        },
        Entry::Dir {
            path: "lib/modules".into(),
            mode: 0o755,
        },
        Entry::Dir {
            path: "newroot".into(),
            mode: 0o755,
        },
        Entry::Dir {
            path: "proc".into(),
            mode: 0o755,
        },
        Entry::Dir {
            path: "sys".into(),
            mode: 0o755,
        },
        Entry::File {
            path: "bin/busybox".into(),
            mode: 0o755,
            data: busybox,
        },
    ];
    for applet in [
        "sh",
        "mount",
        "umount",
        "insmod",
        "switch_root",
        "sleep",
        "cat",
        "mkdir",
        "echo",
    ] {
        entries.push(Entry::Symlink {
            path: format!("bin/{applet}"),
            target: "busybox".into(),
        });
    }
    let mut dirs = BTreeSet::new();
    for m in &order {
        let mut acc = String::from("lib/modules");
        if let Some((parent, _)) = m.rsplit_once('/') {
            for part in parent.split('/') {
                acc = format!("{acc}/{part}");
                if dirs.insert(acc.clone()) {
                    entries.push(Entry::Dir {
                        path: acc.clone(),
                        mode: 0o755,
                    });
                }
            }
        }
        let data = std::fs::read(moddir.join(m))
            .map_err(|e| ImageError::Initramfs(format!("module {m}: {e}")))?;
        entries.push(Entry::File {
            path: format!("lib/modules/{m}"),
            mode: 0o644,
            data,
        });
    }
    entries.push(Entry::File {
        path: "init".into(),
        mode: 0o755,
        data: init_script(&order).into_bytes(),
    });

    let mut bytes = Vec::new();
    cpio::write_archive(&mut bytes, &entries).map_err(|e| ImageError::Initramfs(e.to_string()))?;
    std::fs::write(out, &bytes).map_err(|e| ImageError::io(out, e))?;
    Ok(bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/drivers/virtio/virtio.ko:\n\
kernel/drivers/virtio/virtio_ring.ko:\n\
kernel/drivers/virtio/virtio_pci_modern_dev.ko:\n\
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko\n\
kernel/fs/jbd2/jbd2.ko:\n\
kernel/fs/mbcache.ko:\n";

    #[test]
    fn closure_puts_dependencies_first_once_and_skips_builtins() {
        let idx = ModuleIndex::parse(DEP, "kernel/fs/ext4/ext4.ko\n");
        let order = idx
            .load_order(&["virtio_pci", "virtio-blk", "ext4"])
            .expect("order");
        assert_eq!(
            order,
            vec![
                "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_pci.ko",
                "kernel/drivers/block/virtio_blk.ko",
            ]
        );
        let idx = ModuleIndex::parse(DEP, "");
        let order = idx.load_order(&["ext4"]).expect("order");
        assert_eq!(
            order.last().map(String::as_str),
            Some("kernel/fs/ext4/ext4.ko")
        );
        assert_eq!(order.len(), 3);
        assert!(matches!(
            idx.load_order(&["nope"]),
            Err(ImageError::Initramfs(_))
        ));
    }

    #[test]
    fn init_script_loads_modules_then_switches_root() {
        let s = init_script(&["kernel/a.ko".into(), "kernel/b.ko".into()]);
        let a = s.find("insmod /lib/modules/kernel/a.ko").expect("a");
        let b = s.find("insmod /lib/modules/kernel/b.ko").expect("b");
        let sw = s
            .find("exec switch_root /newroot /sbin/init")
            .expect("switch_root");
        assert!(a < b && b < sw);
        assert!(s.starts_with("#!/bin/sh\n"));
    }
}
