//! The ext4 root image, made from the directory with `mkfs.ext4 -d` (no loop
//! mount, no mount at all).

use std::path::Path;
use std::process::Command;

use crate::command;
use crate::progress::Progress;
use crate::ImageError;

/// Fixed so the same tree gives the same filesystem identity.
pub const ROOT_UUID: &str = "6b696c6e-726f-6f74-0000-000000000001";
pub const ROOT_LABEL: &str = "kiln-root";

/// Bytes used by the tree, counting each file in whole 4 KiB blocks.
pub fn tree_usage(root: &Path) -> Result<(u64, u64), ImageError> {
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| ImageError::io(&dir, e))? {
            let entry = entry.map_err(|e| ImageError::io(&dir, e))?;
            let meta = entry
                .path()
                .symlink_metadata()
                .map_err(|e| ImageError::io(&entry.path(), e))?;
            inodes += 1;
            bytes += meta.len().div_ceil(4096) * 4096;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// Creates `image` holding `root`; sized to the content plus headroom.
pub fn make_image(root: &Path, image: &Path, progress: &dyn Progress) -> Result<u64, ImageError> {
    let (used, inodes) = tree_usage(root)?;
    // 30% + 256 MiB headroom for logs and uploads; whole MiB.
    let size_mib = (used + used * 3 / 10 + (256 << 20)).div_ceil(1 << 20);
    let inode_count = (inodes * 2).max(65_536);
    let _ = std::fs::remove_file(image);
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args([
        "-F", "-q", "-b", "4096", "-m", "0", "-L", ROOT_LABEL, "-U", ROOT_UUID,
    ])
    .arg("-N")
    .arg(inode_count.to_string())
    .arg("-E")
    .arg(format!("hash_seed={ROOT_UUID},root_owner=0:0"))
    .arg("-d")
    .arg(root)
    .arg(image)
    .arg(format!("{size_mib}M"));
    command::run(&mut cmd, "mkfs.ext4 -d", progress)?;
    Ok(size_mib << 20)
}
