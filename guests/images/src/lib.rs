//! Kiln guest image builder. `build_image` turns Debian bookworm packages
//! into the three artifacts a guest boots from: the distribution kernel, an
//! initramfs that loads the virtio modules and switches to the root disk,
//! and an ext4 root image made with `mkfs.ext4 -d` (no loop mounts). Builds
//! are cached by their inputs and their root content is recorded in a
//! manifest, so rebuilds can be compared.

pub mod command;
pub mod cpio;
pub mod customize;
pub mod ext4;
pub mod initramfs;
pub mod manifest;
pub mod progress;
pub mod recipe;
pub mod rootfs;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

pub use progress::{NoProgress, Progress, StderrProgress};
pub use recipe::ImageKind;

/// Bumped whenever the build steps change what they produce.
const BUILDER_VERSION: &str = "kiln-images-2";

/// Default timestamp for everything in the image (2025-01-01T00:00:00Z),
/// overridden by SOURCE_DATE_EPOCH.
pub const DEFAULT_EPOCH: u64 = 1_735_689_600;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot run {tool}: {message}")]
    Tool { tool: String, message: String },
    #[error("{what} failed ({status}); last output:\n{}", tail(.output))]
    CommandFailed {
        what: String,
        status: String,
        output: Vec<String>,
    },
    #[error("Debian {suite} has no package(s) {}: check the names", .packages.join(", "))]
    PackageNotFound {
        packages: Vec<String>,
        suite: String,
    },
    #[error("cannot download packages from the Debian mirror:\n{}", .details.join("\n"))]
    PackageFetch { details: Vec<String> },
    #[error("initramfs: {0}")]
    Initramfs(String),
    #[error("image set-up: {0}")]
    Customize(String),
    #[error("missing input: {0}")]
    MissingInput(&'static str),
    #[error("must run as root (mmdebstrap --mode=root, chroot, mkfs with file owners)")]
    NotRoot,
}

fn tail(lines: &[String]) -> String {
    let start = lines.len().saturating_sub(25);
    lines[start..].join("\n")
}

impl ImageError {
    pub fn io(path: &Path, source: std::io::Error) -> ImageError {
        ImageError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Artifacts go to `<cache_dir>/images/<kind>/<key>/`, .debs to `<cache_dir>/debs/`.
    pub cache_dir: PathBuf,
    /// The guest agent (`cargo build --release -p kiln-agent`).
    pub agent_binary: PathBuf,
    /// The Clay shell (`cargo build --release -p clay-shell`); needed for Clay.
    pub clay_shell_binary: Option<PathBuf>,
    pub mirror: String,
    /// Rebuild even when a finished build with the same inputs is cached.
    pub force: bool,
    /// Timestamp for the image's files (SOURCE_DATE_EPOCH).
    pub epoch: u64,
}

impl BuildOptions {
    pub fn new(cache_dir: PathBuf, agent_binary: PathBuf) -> BuildOptions {
        let epoch = std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(DEFAULT_EPOCH);
        BuildOptions {
            cache_dir,
            agent_binary,
            clay_shell_binary: None,
            mirror: rootfs::DEFAULT_MIRROR.to_string(),
            force: false,
            epoch,
        }
    }
}

/// Where Kiln keeps downloaded and built guest artifacts:
/// `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("kiln");
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
        .join(".cache/kiln")
}

/// Byte sizes of what was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSizes {
    pub kernel: u64,
    pub initramfs: u64,
    pub rootfs_image: u64,
    /// Bytes of files in the root tree (4 KiB blocks).
    pub rootfs_content: u64,
}

#[derive(Debug, Clone)]
pub struct ImageArtifacts {
    pub kind: ImageKind,
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// ext4 image for a virtio-blk disk.
    pub rootfs: PathBuf,
    /// The root tree the image was made from (for chroot checks).
    pub root_tree: PathBuf,
    pub cmdline: String,
    pub kernel_version: String,
    /// Sorted content listing of the root tree, and its SHA-256.
    pub manifest: PathBuf,
    pub manifest_sha256: String,
    /// `dpkg-query` list of installed packages and versions.
    pub packages: PathBuf,
    pub sizes: ImageSizes,
    /// True when a previous build with the same inputs was reused.
    pub cached: bool,
    pub build_seconds: u64,
}

impl ImageArtifacts {
    /// A human-readable summary with sizes.
    pub fn summary(&self) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        format!(
            "Kiln guest image '{}' ({}{} s)\n  kernel     {:>9.1} MiB  {} ({})\n  initramfs  {:>9.1} MiB  {}\n  root disk  {:>9.1} MiB  {} ({:.1} MiB of files)\n  manifest   {} (sha256 {})\n  cmdline    {}\n",
            self.kind,
            if self.cached { "cached, built in " } else { "built in " },
            self.build_seconds,
            mib(self.sizes.kernel),
            self.kernel.display(),
            self.kernel_version,
            mib(self.sizes.initramfs),
            self.initramfs.display(),
            mib(self.sizes.rootfs_image),
            self.rootfs.display(),
            mib(self.sizes.rootfs_content),
            self.manifest.display(),
            self.manifest_sha256,
            self.cmdline,
        )
    }
}

/// Files whose content legitimately differs between two builds from the
/// same packages (timestamps, random ids, caches); listed without checksums.
pub const VOLATILE_PATHS: &[&str] = &[
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/var/cache/debconf/",
    "/var/lib/dpkg/info/",
    "/var/lib/systemd/",
    "/var/lib/kiln/wine/",
    "/home/clay/.wine/",
    "/etc/ssl/certs/",
    "/usr/share/fonts/",
    "/var/cache/fontconfig/",
    "/usr/lib/x86_64-linux-gnu/gdk-pixbuf",
];

fn file_sha256(path: &Path) -> Result<String, ImageError> {
    let mut f = std::fs::File::open(path).map_err(|e| ImageError::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| ImageError::io(path, e))?;
    Ok(hex(&h.finalize()))
}

fn cache_key(kind: ImageKind, opts: &BuildOptions) -> Result<String, ImageError> {
    let mut h = Sha256::new();
    h.update(BUILDER_VERSION);
    h.update(kind.name());
    h.update(kind.packages().join(","));
    h.update(&opts.mirror);
    h.update(opts.epoch.to_le_bytes());
    h.update(file_sha256(&opts.agent_binary)?);
    if kind == ImageKind::Clay {
        let shell = opts
            .clay_shell_binary
            .as_deref()
            .ok_or(ImageError::MissingInput(
                "the clay-shell binary (build it with cargo build --release -p clay-shell)",
            ))?;
        h.update(file_sha256(shell)?);
    }
    Ok(hex(&h.finalize())[..16].to_string())
}

const STEPS: usize = 7;

/// Builds (or reuses from the cache) the image `kind`.
pub fn build_image(
    kind: ImageKind,
    opts: &BuildOptions,
    progress: &dyn Progress,
) -> Result<ImageArtifacts, ImageError> {
    let started = Instant::now();
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ImageError::NotRoot);
    }
    if !opts.agent_binary.is_file() {
        return Err(ImageError::MissingInput(
            "the kiln-agent binary (build it with cargo build --release -p kiln-agent)",
        ));
    }
    let key = cache_key(kind, opts)?;
    let dir = opts.cache_dir.join("images").join(kind.name()).join(&key);
    let done_marker = dir.join("complete");
    if done_marker.is_file() && !opts.force {
        progress.step(
            STEPS,
            STEPS,
            &format!("{kind}: using cached build {}", dir.display()),
        );
        return load_artifacts(kind, &dir, true);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| ImageError::io(&dir, e))?;
    match build_into(kind, opts, &dir, started, progress) {
        Ok(a) => Ok(a),
        Err(e) => {
            // A failed build leaves nothing half-made in the cache.
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

fn build_into(
    kind: ImageKind,
    opts: &BuildOptions,
    dir: &Path,
    started: Instant,
    progress: &dyn Progress,
) -> Result<ImageArtifacts, ImageError> {
    let dir = dir.to_path_buf();
    let done_marker = dir.join("complete");
    let root = dir.join("root");

    progress.step(
        1,
        STEPS,
        &format!(
            "{kind}: installing Debian {} packages with mmdebstrap ({})",
            rootfs::SUITE,
            kind.packages().join(" ")
        ),
    );
    rootfs::bootstrap(
        kind,
        &root,
        &opts.cache_dir.join("debs"),
        &opts.mirror,
        opts.epoch,
        progress,
    )?;

    progress.step(
        2,
        STEPS,
        &format!("{kind}: installing the agent and configuring the guest"),
    );
    let inputs = customize::Inputs {
        agent_binary: &opts.agent_binary,
        clay_shell_binary: opts.clay_shell_binary.as_deref(),
    };
    customize::customize(kind, &root, &inputs, progress)?;

    progress.step(3, STEPS, &format!("{kind}: extracting the kernel"));
    let (kver, vmlinuz) = find_kernel(&root)?;
    let kernel = dir.join("vmlinuz");
    std::fs::copy(&vmlinuz, &kernel).map_err(|e| ImageError::io(&vmlinuz, e))?;

    progress.step(
        4,
        STEPS,
        &format!("{kind}: building the initramfs (busybox + virtio modules for {kver})"),
    );
    initramfs::build(&root, &kver, &dir.join("initramfs.cpio"))?;

    progress.step(
        5,
        STEPS,
        &format!("{kind}: recording packages and content manifest"),
    );
    let packages = dir.join("packages.txt");
    let listing = command::run(
        &mut command::in_chroot(&root, "dpkg-query -W -f '${Package} ${Version}\\n' | sort"),
        "listing packages",
        progress,
    )?;
    std::fs::write(&packages, listing.join("\n") + "\n")
        .map_err(|e| ImageError::io(&packages, e))?;
    manifest::clamp_mtimes(&root, opts.epoch)?;
    keep_wine_prefixes_current(&root)?;
    let manifest_sha = manifest::write_manifest(&root, &dir.join("manifest.txt"), VOLATILE_PATHS)?;
    std::fs::write(dir.join("manifest.sha256"), format!("{manifest_sha}\n"))
        .map_err(|e| ImageError::io(&dir, e))?;

    progress.step(
        6,
        STEPS,
        &format!("{kind}: making the ext4 root disk with mkfs.ext4 -d"),
    );
    ext4::make_image(&root, &dir.join("rootfs.ext4"), progress)?;

    let meta = format!(
        "kernel_version={kver}\ncmdline={}\nbuild_seconds={}\n",
        kind.cmdline(),
        started.elapsed().as_secs()
    );
    std::fs::write(dir.join("build.txt"), meta).map_err(|e| ImageError::io(&dir, e))?;
    std::fs::write(&done_marker, b"").map_err(|e| ImageError::io(&done_marker, e))?;
    progress.step(STEPS, STEPS, &format!("{kind}: done"));
    load_artifacts(kind, &dir, false)
}

/// Wine re-runs its (seconds-long) prefix update when wine.inf's mtime differs
/// from the one recorded in the prefix; clamping timestamps changed it, so
/// record the clamped value.
fn keep_wine_prefixes_current(root: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::MetadataExt;
    let inf = root.join("usr/share/wine/wine.inf");
    let Ok(meta) = std::fs::metadata(&inf) else {
        return Ok(());
    };
    for prefix in [
        recipe::AGENT_WINE_PREFIX.to_string(),
        format!("{}/.wine", recipe::CLAY_HOME),
    ] {
        let stamp = root
            .join(prefix.trim_start_matches('/'))
            .join(".update-timestamp");
        if stamp.is_file() {
            std::fs::write(&stamp, format!("{}\n", meta.mtime()))
                .map_err(|e| ImageError::io(&stamp, e))?;
        }
    }
    Ok(())
}

fn find_kernel(root: &Path) -> Result<(String, PathBuf), ImageError> {
    let boot = root.join("boot");
    let mut found: Vec<_> = std::fs::read_dir(&boot)
        .map_err(|e| ImageError::io(&boot, e))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("vmlinuz-")
                .map(|v| (v.to_string(), e.path()))
        })
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(ImageError::Customize("no kernel in /boot".into())),
        _ => Err(ImageError::Customize(format!(
            "more than one kernel in /boot: {found:?}"
        ))),
    }
}

fn load_artifacts(kind: ImageKind, dir: &Path, cached: bool) -> Result<ImageArtifacts, ImageError> {
    let meta_path = dir.join("build.txt");
    let meta = std::fs::read_to_string(&meta_path).map_err(|e| ImageError::io(&meta_path, e))?;
    let field = |k: &str| {
        meta.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .unwrap_or_default()
            .to_string()
    };
    let size = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.len())
            .map_err(|e| ImageError::io(p, e))
    };
    let root_tree = dir.join("root");
    let (content, _) = ext4::tree_usage(&root_tree)?;
    let manifest_sha =
        std::fs::read_to_string(dir.join("manifest.sha256")).map_err(|e| ImageError::io(dir, e))?;
    let a = ImageArtifacts {
        kind,
        dir: dir.to_path_buf(),
        kernel: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.cpio"),
        rootfs: dir.join("rootfs.ext4"),
        root_tree,
        cmdline: field("cmdline"),
        kernel_version: field("kernel_version"),
        manifest: dir.join("manifest.txt"),
        manifest_sha256: manifest_sha.trim().to_string(),
        packages: dir.join("packages.txt"),
        sizes: ImageSizes {
            kernel: size(&dir.join("vmlinuz"))?,
            initramfs: size(&dir.join("initramfs.cpio"))?,
            rootfs_image: size(&dir.join("rootfs.ext4"))?,
            rootfs_content: content,
        },
        cached,
        build_seconds: field("build_seconds").parse().unwrap_or(0),
    };
    Ok(a)
}
