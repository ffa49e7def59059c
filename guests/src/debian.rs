//! Debian packages by name: `apt-get download`, metapackages resolved to
//! the concrete package they depend on, contents unpacked with `dpkg-deb`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::lock::FileLock;
use crate::{progress, GuestError};

/// A package unpacked in the cache.
#[derive(Clone, Debug)]
pub struct ExtractedPackage {
    /// The concrete package name, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub name: String,
    pub version: String,
    /// Root of the unpacked file tree.
    pub root: PathBuf,
}

fn run(cmd: &mut Command, package: &str) -> Result<String, GuestError> {
    let out = cmd.output().map_err(|e| GuestError::Fetch {
        package: package.into(),
        detail: format!("cannot run {:?}: {e}", cmd.get_program()),
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no error text");
        return Err(GuestError::Fetch {
            package: package.into(),
            detail: last.trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `look` at apt's lists; when it finds nothing, refresh them once (a
/// fresh machine has none, a new suite needs them) and look again.
fn look_in_apt_lists<T>(
    package: &str,
    missing: &str,
    look: impl Fn() -> Result<Option<T>, GuestError>,
) -> Result<Option<T>, GuestError> {
    if let Some(found) = look()? {
        return Ok(Some(found));
    }
    progress(&format!("{missing}; running apt-get update"));
    run(Command::new("apt-get").args(["update", "-qq"]), package)?;
    look()
}

/// The candidate version apt would install.
fn candidate_version(package: &str) -> Result<String, GuestError> {
    look_in_apt_lists(package, "apt does not know the package yet", || {
        let policy = run(Command::new("apt-cache").args(["policy", package]), package)?;
        Ok(policy
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate:"))
            .map(|v| v.trim().to_string())
            .filter(|v| v != "(none)"))
    })?
    .ok_or_else(|| GuestError::Fetch {
        package: package.into(),
        detail: "no installable version in the apt sources".into(),
    })
}

/// Checks that apt's lists carry `name` at `version`, so a missing
/// version fails with a clear reason.
fn ensure_version_known(name: &str, version: &str) -> Result<(), GuestError> {
    let missing = format!("apt does not list {name} {version}");
    look_in_apt_lists(name, &missing, || {
        let policy = run(Command::new("apt-cache").args(["policy", name]), name)?;
        // Version table lines: " *** 1:7.2+dfsg-7 500" or "     1:7.2+dfsg-7 500".
        Ok(policy
            .lines()
            .any(|l| l.trim_start_matches([' ', '*']).split_whitespace().next() == Some(version))
            .then_some(()))
    })?
    .ok_or_else(|| GuestError::Fetch {
        package: name.into(),
        detail: format!(
            "version {version} is not in the apt sources (a backports version needs its suite in \
             /etc/apt/sources.list.d: scripts/install-deps.sh adds bookworm-backports; a \
             superseded version is gone from the archive and the pin must move)"
        ),
    })
}

/// The newest version of `name` that apt's lists carry and that starts
/// with `prefix` (refreshing the lists once on a fresh machine). Debian
/// replaces a stable package's revision with each security or point
/// release, so an exact version is gone from the archive within months; a
/// pin on the upstream version and Debian revision (`1:7.2+dfsg-7`) stays
/// fetchable, and callers report the exact version they got.
pub fn newest_version_with_prefix(name: &str, prefix: &str) -> Result<String, GuestError> {
    let missing = format!("apt lists no {name} {prefix}*");
    look_in_apt_lists(name, &missing, || {
        let madison = run(Command::new("apt-cache").args(["madison", name]), name)?;
        let mut newest: Option<String> = None;
        for version in listed_versions(&madison).filter(|v| v.starts_with(prefix)) {
            let newer = match &newest {
                None => true,
                Some(best) => Command::new("dpkg")
                    .args(["--compare-versions", version, "gt", best])
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false),
            };
            if newer {
                newest = Some(version.to_string());
            }
        }
        Ok(newest)
    })?
    .ok_or_else(|| GuestError::Fetch {
        package: name.into(),
        detail: format!(
            "no version {prefix}* in the apt sources (a backports version needs its suite in \
             /etc/apt/sources.list.d: scripts/install-deps.sh adds bookworm-backports)"
        ),
    })
}

/// Versions in `apt-cache madison` output:
/// ` qemu-system-x86 | 1:7.2+dfsg-7+deb12u18+b2 | http://... Packages`.
fn listed_versions(madison: &str) -> impl Iterator<Item = &str> {
    madison
        .lines()
        .filter_map(|l| l.split('|').nth(1))
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// For a kernel metapackage, the versioned package it depends on.
fn concrete_name(package: &str) -> Result<String, GuestError> {
    if !package.starts_with("linux-image-") || package.starts_with("linux-image-6") {
        return Ok(package.to_string());
    }
    // Asked first so that a machine with empty package lists gets its
    // `apt-get update` before `apt-cache depends` (which fails outright).
    candidate_version(package)?;
    let deps = run(
        Command::new("apt-cache").args(["depends", "--important", package]),
        package,
    )?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(|d| d.trim().to_string())
        .find(|d| d.starts_with("linux-image-"))
        .ok_or_else(|| GuestError::Fetch {
            package: package.into(),
            detail: "metapackage has no linux-image dependency".into(),
        })
}

/// Downloads and unpacks `package` (or, for a kernel metapackage, the
/// kernel it points to) under `cache/debs/`. Idempotent.
pub fn fetch_package(cache: &Path, package: &str) -> Result<ExtractedPackage, GuestError> {
    let name = concrete_name(package)?;
    let version = candidate_version(&name)?;
    fetch_package_version(cache, &name, &version)
}

/// Downloads and unpacks exactly `name`=`version` (any suite in the apt
/// sources, e.g. a pinned bookworm version or a backports one), whatever
/// apt's candidate is. Idempotent. When the archive no longer carries that
/// version, the error says so in apt's words.
pub fn fetch_package_version(
    cache: &Path,
    name: &str,
    version: &str,
) -> Result<ExtractedPackage, GuestError> {
    let (name, version) = (name.to_string(), version.to_string());
    let key = format!("{name}_{}", version.replace([':', '/'], "_"));
    let debs = cache.join("debs");
    let root = debs.join(&key);
    let _lock = FileLock::acquire(&debs.join(format!("{key}.lock")))?;
    if root.is_dir() {
        return Ok(ExtractedPackage {
            name,
            version,
            root,
        });
    }
    ensure_version_known(&name, &version)?;
    let tmp = debs.join(format!("{key}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)
        .map_err(|e| GuestError::io(format!("creating {}", tmp.display()), e))?;
    progress(&format!("fetching {name} {version}"));
    run(
        Command::new("apt-get")
            .args(["download", "-qq", &format!("{name}={version}")])
            .current_dir(&tmp),
        &name,
    )?;
    let deb = std::fs::read_dir(&tmp)
        .map_err(|e| GuestError::io(format!("reading {}", tmp.display()), e))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| GuestError::Fetch {
            package: name.clone(),
            detail: "apt-get download produced no .deb".into(),
        })?;
    let size = std::fs::metadata(&deb).map(|m| m.len()).unwrap_or(0);
    progress(&format!(
        "unpacking {} ({} MiB)",
        deb.file_name().unwrap_or_default().to_string_lossy(),
        size >> 20
    ));
    let tree = tmp.join("root");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree),
        &name,
    )?;
    std::fs::rename(&tree, &root)
        .map_err(|e| GuestError::io(format!("moving {} into place", root.display()), e))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(ExtractedPackage {
        name,
        version,
        root,
    })
}

/// The one file under `dir` whose name starts with `prefix`.
pub fn find_one(dir: &Path, prefix: &str) -> Result<PathBuf, GuestError> {
    std::fs::read_dir(dir)
        .map_err(|e| GuestError::io(format!("reading {}", dir.display()), e))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .ok_or_else(|| GuestError::Kernel(format!("no {prefix}* in {}", dir.display())))
}

/// Packages ship no `modules.dep` (depmod runs at install time), so build
/// one for the unpacked tree from each module's `.modinfo` `depends=`
/// field (direct dependencies; readers follow them recursively).
pub fn ensure_modules_dep(root: &Path, kernel_version: &str) -> Result<(), GuestError> {
    let dir = root.join("lib/modules").join(kernel_version);
    let dep_file = dir.join("modules.dep");
    if dep_file.is_file() {
        return Ok(());
    }
    let mut modules = Vec::new();
    collect_modules(&dir, &dir.join("kernel"), &mut modules)?;
    let by_name: std::collections::BTreeMap<String, String> = modules
        .iter()
        .map(|(rel, _)| (module_name(rel), rel.clone()))
        .collect();
    let mut text = String::new();
    for (rel, depends) in &modules {
        let deps: Vec<&str> = depends
            .iter()
            .filter_map(|d| by_name.get(&d.replace('-', "_")).map(String::as_str))
            .collect();
        text.push_str(&format!("{rel}: {}\n", deps.join(" ")));
    }
    crate::default_guest::write_atomic(&dep_file, text.as_bytes())
}

fn module_name(rel: &str) -> String {
    let file = rel.rsplit('/').next().unwrap_or(rel);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

fn collect_modules(
    base: &Path,
    dir: &Path,
    out: &mut Vec<(String, Vec<String>)>,
) -> Result<(), GuestError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| GuestError::io(format!("reading {}", dir.display()), e))?;
    let mut paths: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            collect_modules(base, &path, out)?;
        } else if path.extension().is_some_and(|x| x == "ko") {
            let data = std::fs::read(&path)
                .map_err(|e| GuestError::io(format!("reading {}", path.display()), e))?;
            let rel = path
                .strip_prefix(base)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            out.push((rel, modinfo_depends(&data)));
        }
    }
    Ok(())
}

/// The `depends=a,b` entry of a module's `.modinfo` strings.
pub fn modinfo_depends(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = module.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = &module[at + KEY.len()..];
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_depends_parses_the_list() {
        let m = b"junk\0license=GPL\0depends=virtio,virtio_ring\0vermagic=6.1\0";
        assert_eq!(modinfo_depends(m), ["virtio", "virtio_ring"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
        assert!(modinfo_depends(b"nothing here").is_empty());
    }

    #[test]
    fn madison_lines_give_their_versions() {
        let m = " qemu-system-x86 | 1:7.2+dfsg-7+deb12u18+b2 | http://deb.debian.org/debian bookworm/main amd64 Packages\n qemu-system-x86 | 1:7.2+dfsg-7+deb12u15 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages\n\n";
        let v: Vec<&str> = listed_versions(m).collect();
        assert_eq!(v, ["1:7.2+dfsg-7+deb12u18+b2", "1:7.2+dfsg-7+deb12u15"]);
    }
}
