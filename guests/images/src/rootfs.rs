//! The root filesystem tree: mmdebstrap from Debian bookworm into a
//! directory (no loop mounts), with downloaded .debs kept in the cache.

use std::path::Path;
use std::process::Command;

use crate::command;
use crate::progress::Progress;
use crate::recipe::ImageKind;
use crate::ImageError;

pub const SUITE: &str = "bookworm";
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// Runs mmdebstrap for `kind` into `root` (which must not exist yet).
pub fn bootstrap(
    kind: ImageKind,
    root: &Path,
    debs: &Path,
    mirror: &str,
    epoch: u64,
    progress: &dyn Progress,
) -> Result<(), ImageError> {
    std::fs::create_dir_all(debs).map_err(|e| ImageError::io(debs, e))?;
    let debs_s = debs.to_string_lossy();
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--mode=root", "--variant=minbase", "--format=directory", "--verbose"])
        .arg(format!("--include={}", kind.packages().join(",")))
        // Keep conffiles we pre-seed; never prompt.
        .args(["--dpkgopt=force-confold", "--dpkgopt=force-confdef"])
        .arg("--aptopt=Acquire::Retries \"3\"")
        // No initramfs-tools run for every kernel: Kiln builds its own initramfs.
        .arg("--setup-hook=mkdir -p \"$1/etc/initramfs-tools\" && printf 'update_initramfs=no\\n' > \"$1/etc/initramfs-tools/update-initramfs.conf\"")
        // Reuse and refill the .deb cache.
        .arg(format!("--setup-hook=mkdir -p \"$1/var/cache/apt/archives\" && find '{debs_s}' -maxdepth 1 -name '*.deb' -exec cp -t \"$1/var/cache/apt/archives/\" {{}} +"))
        .arg(format!("--customize-hook=find \"$1/var/cache/apt/archives\" -maxdepth 1 -name '*.deb' -exec cp -n -t '{debs_s}' {{}} + ; rm -f \"$1\"/var/cache/apt/archives/*.deb"))
        .args(["--skip=download/empty", "--skip=essential/unlink"])
        .arg(SUITE)
        .arg(root)
        .arg(mirror)
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .env("LC_ALL", "C.UTF-8");
    match command::run(&mut cmd, "mmdebstrap", progress) {
        Ok(_) => Ok(()),
        Err(ImageError::CommandFailed { output, status, .. }) => {
            Err(classify_failure(&output, status))
        }
        Err(e) => Err(e),
    }
}

/// Turns mmdebstrap/apt output into a clear error: which package could not
/// be found or fetched, when apt says so.
pub fn classify_failure(output: &[String], status: String) -> ImageError {
    let mut missing = Vec::new();
    let mut fetch = Vec::new();
    for line in output {
        if let Some(rest) = line.split("Unable to locate package ").nth(1) {
            missing.push(rest.trim().to_string());
        } else if line.contains("has no installation candidate") {
            if let Some(pkg) = line
                .split('\'')
                .nth(1)
                .or_else(|| line.split_whitespace().nth(2))
            {
                missing.push(pkg.trim_matches('\'').to_string());
            }
        } else if line.contains("Failed to fetch")
            || line.contains("Could not resolve")
            || line.contains("Unable to connect")
            || line.contains("Temporary failure resolving")
        {
            fetch.push(line.trim().to_string());
        }
    }
    if !missing.is_empty() {
        return ImageError::PackageNotFound {
            packages: missing,
            suite: SUITE.into(),
        };
    }
    if !fetch.is_empty() {
        return ImageError::PackageFetch { details: fetch };
    }
    ImageError::CommandFailed {
        what: "mmdebstrap".into(),
        status,
        output: output.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_unfetchable_packages_are_named() {
        let out = vec![
            "E: Unable to locate package wine-nonexistent".to_string(),
            "E: other".to_string(),
        ];
        match classify_failure(&out, "exit 1".into()) {
            ImageError::PackageNotFound { packages, .. } => {
                assert_eq!(packages, vec!["wine-nonexistent"])
            }
            e => panic!("{e}"),
        }
        let out = vec!["E: Failed to fetch http://deb.debian.org/debian/pool/main/w/wine/wine_8.0.deb  Could not connect".to_string()];
        assert!(matches!(
            classify_failure(&out, "exit 1".into()),
            ImageError::PackageFetch { .. }
        ));
        let out = vec!["E: Package 'foo' has no installation candidate".to_string()];
        match classify_failure(&out, "exit 1".into()) {
            ImageError::PackageNotFound { packages, .. } => assert_eq!(packages, vec!["foo"]),
            e => panic!("{e}"),
        }
        assert!(matches!(
            classify_failure(&["boom".into()], "exit 2".into()),
            ImageError::CommandFailed { .. }
        ));
    }
}
