//! Turning the bootstrapped tree into a Kiln guest: the agent and its
//! service, fstab/hostname/login, per-kind desktop or Wine set-up.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::command::{self, in_chroot};
use crate::progress::Progress;
use crate::recipe::{ImageKind, AGENT_WINE_PREFIX, CLAY_HOME, CLAY_USER, WINDOWS_APPS_DIR};
use crate::ImageError;

pub struct Inputs<'a> {
    pub agent_binary: &'a Path,
    pub clay_shell_binary: Option<&'a Path>,
}

fn write(root: &Path, rel: &str, mode: u32, text: &str) -> Result<(), ImageError> {
    let path = root.join(rel.trim_start_matches('/'));
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| ImageError::io(parent, e))?;
    }
    fs::write(&path, text).map_err(|e| ImageError::io(&path, e))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
        .map_err(|e| ImageError::io(&path, e))
}

fn install_binary(root: &Path, src: &Path, rel: &str) -> Result<(), ImageError> {
    let dst = root.join(rel.trim_start_matches('/'));
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent).map_err(|e| ImageError::io(parent, e))?;
    }
    fs::copy(src, &dst).map_err(|e| ImageError::io(src, e))?;
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))
        .map_err(|e| ImageError::io(&dst, e))
}

/// Enables a unit the way `systemctl enable` would, without running systemd.
fn enable(root: &Path, unit: &str, target: &str) -> Result<(), ImageError> {
    let dir = root
        .join("etc/systemd/system")
        .join(format!("{target}.wants"));
    fs::create_dir_all(&dir).map_err(|e| ImageError::io(&dir, e))?;
    let link = dir.join(unit);
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(format!("/etc/systemd/system/{unit}"), &link)
        .map_err(|e| ImageError::io(&link, e))
}

fn agent_unit(extra_args: &str, after: &str) -> String {
    format!(
        "[Unit]\nDescription=Kiln guest agent (vsock port 5252)\nAfter=local-fs.target {after}\n\n\
[Service]\nExecStartPre=-/sbin/modprobe vmw_vsock_virtio_transport\n\
ExecStart=/usr/local/bin/kiln-agent serve --listen vsock:5252{extra_args}\n\
Restart=always\nRestartSec=1\n\n[Install]\nWantedBy=multi-user.target\n"
    )
}

pub fn customize(
    kind: ImageKind,
    root: &Path,
    inputs: &Inputs,
    progress: &dyn Progress,
) -> Result<(), ImageError> {
    write(
        root,
        "/etc/hostname",
        0o644,
        &format!("{}\n", kind.hostname()),
    )?;
    write(
        root,
        "/etc/hosts",
        0o644,
        &format!("127.0.0.1 localhost\n127.0.1.1 {}\n", kind.hostname()),
    )?;
    write(
        root,
        "/etc/fstab",
        0o644,
        "/dev/vda / ext4 rw,relatime,errors=remount-ro 0 1\n",
    )?;
    write(
        root,
        "/etc/modules-load.d/kiln.conf",
        0o644,
        "vmw_vsock_virtio_transport\n",
    )?;
    // Serial-console login as root without a password: these are test and
    // development guests reached through the agent, not network servers.
    let shadow = root.join("etc/shadow");
    let text = fs::read_to_string(&shadow).map_err(|e| ImageError::io(&shadow, e))?;
    let text: String = text
        .lines()
        .map(|l| match l.strip_prefix("root:") {
            Some(rest) => format!(
                "root:{}",
                rest.split_once(':')
                    .map(|(_, r)| format!(":{r}"))
                    .unwrap_or_default()
            ),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    fs::write(&shadow, text).map_err(|e| ImageError::io(&shadow, e))?;
    // No machine identity baked in: systemd makes one at first boot.
    write(root, "/etc/machine-id", 0o444, "")?;
    install_binary(root, inputs.agent_binary, "/usr/local/bin/kiln-agent")?;

    let wine_args = format!(" --wine-prefix {AGENT_WINE_PREFIX} --wine-display :0");
    match kind {
        ImageKind::Base => {
            write(
                root,
                "/etc/systemd/system/kiln-agent.service",
                0o644,
                &agent_unit("", ""),
            )?;
        }
        ImageKind::Wincompat => {
            write(
                root,
                "/etc/systemd/system/kiln-agent.service",
                0o644,
                &agent_unit(&wine_args, "kiln-xvfb.service"),
            )?;
            // The cloud kernel has no DRM: GUI programs get an X server in memory.
            write(
                root,
                "/etc/systemd/system/kiln-xvfb.service",
                0o644,
                "[Unit]\nDescription=X display :0 for Windows GUI programs\n\n[Service]\nExecStart=/usr/bin/Xvfb :0 -screen 0 1280x800x24 -nolisten tcp\nRestart=always\n\n[Install]\nWantedBy=multi-user.target\n",
            )?;
            enable(root, "kiln-xvfb.service", "multi-user.target")?;
            fs::create_dir_all(root.join(WINDOWS_APPS_DIR.trim_start_matches('/')))
                .map_err(|e| ImageError::io(root, e))?;
            make_wine_prefix(root, AGENT_WINE_PREFIX, None, progress)?;
        }
        ImageKind::Clay => {
            let shell = inputs.clay_shell_binary.ok_or(ImageError::MissingInput(
                "the clay-shell binary (build it with cargo build --release -p clay-shell)",
            ))?;
            install_binary(root, shell, "/usr/local/bin/clay-shell")?;
            write(
                root,
                "/etc/systemd/system/kiln-agent.service",
                0o644,
                &agent_unit(&wine_args, "clay-desktop.service"),
            )?;
            setup_clay_desktop(root, progress)?;
            make_wine_prefix(root, AGENT_WINE_PREFIX, None, progress)?;
            make_wine_prefix(
                root,
                &format!("{CLAY_HOME}/.wine"),
                Some(CLAY_USER),
                progress,
            )?;
        }
    }
    enable(root, "kiln-agent.service", "multi-user.target")?;
    cleanup(root)
}

fn setup_clay_desktop(root: &Path, progress: &dyn Progress) -> Result<(), ImageError> {
    let script = format!(
        "set -e; groups=video,input; getent group render >/dev/null && groups=$groups,render; \
         id {CLAY_USER} >/dev/null 2>&1 || useradd -m -d {CLAY_HOME} -u 1000 -U -G $groups -s /bin/bash {CLAY_USER}; \
         mkdir -p {CLAY_HOME}/Documents {WINDOWS_APPS_DIR}; chown -R {CLAY_USER}:{CLAY_USER} {CLAY_HOME}"
    );
    command::run(
        &mut in_chroot(root, &script),
        "creating the clay user",
        progress,
    )?;
    write(
        root,
        "/etc/clay/sway.conf",
        0o644,
        "# Clay desktop: sway with the Clay shell; software rendering (pixman).\n\
output * bg #1E2430 solid_color\n\
default_border normal 2\n\
client.focused #6AA0FF #2F3A4D #E8ECF4 #6AA0FF #6AA0FF\n\
xwayland enable\n\
bindsym Mod4+Return exec foot\n\
bindsym Mod4+Shift+q kill\n\
exec /usr/local/bin/clay-shell\n",
    )?;
    write(
        root,
        "/etc/systemd/system/clay-desktop.service",
        0o644,
        &format!(
            "[Unit]\nDescription=Clay desktop (sway + Clay shell) on the virtio-gpu display\n\
After=seatd.service systemd-user-sessions.service\nWants=seatd.service\n\n\
[Service]\nUser={CLAY_USER}\nGroup={CLAY_USER}\nSupplementaryGroups=video input\n\
RuntimeDirectory=clay\nRuntimeDirectoryMode=0700\n\
Environment=XDG_RUNTIME_DIR=/run/clay HOME={CLAY_HOME} LIBSEAT_BACKEND=seatd WLR_RENDERER=pixman WLR_NO_HARDWARE_CURSORS=1 WINEPREFIX={CLAY_HOME}/.wine\n\
WorkingDirectory={CLAY_HOME}\n\
ExecStart=/usr/bin/sway --config /etc/clay/sway.conf\nRestart=always\nRestartSec=2\n\n\
[Install]\nWantedBy=graphical.target\n"
        ),
    )?;
    enable(root, "clay-desktop.service", "graphical.target")?;
    if root.join("lib/systemd/system/seatd.service").exists()
        || root.join("usr/lib/systemd/system/seatd.service").exists()
    {
        let dir = root.join("etc/systemd/system/multi-user.target.wants");
        fs::create_dir_all(&dir).map_err(|e| ImageError::io(&dir, e))?;
        let link = dir.join("seatd.service");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink("/lib/systemd/system/seatd.service", &link)
            .map_err(|e| ImageError::io(&link, e))?;
    }
    let default = root.join("etc/systemd/system/default.target");
    let _ = fs::remove_file(&default);
    std::os::unix::fs::symlink("/lib/systemd/system/graphical.target", &default)
        .map_err(|e| ImageError::io(&default, e))
}

/// Creates a Wine prefix now, so the first program in the guest starts in
/// tens of milliseconds instead of seconds.
fn make_wine_prefix(
    root: &Path,
    prefix: &str,
    user: Option<&str>,
    progress: &dyn Progress,
) -> Result<(), ImageError> {
    let env = format!("WINEPREFIX={prefix} WINEDEBUG=-all WINEDLLOVERRIDES='mscoree=;mshtml='");
    let boot = format!("{env} wineboot --init && {env} wineserver --wait");
    let script = match user {
        None => format!("set -e; mkdir -p {prefix}; {boot}"),
        Some(u) => format!(
            "set -e; su -s /bin/sh -c \"HOME={CLAY_HOME} {}\" {u}",
            boot.replace('\'', "")
        ),
    };
    command::run(
        &mut in_chroot(root, &script),
        &format!("creating the Wine prefix {prefix}"),
        progress,
    )?;
    let system_reg = root.join(prefix.trim_start_matches('/')).join("system.reg");
    if !system_reg.is_file() {
        return Err(ImageError::Customize(format!(
            "wineboot finished but {} is missing",
            system_reg.display()
        )));
    }
    Ok(())
}

/// Removes caches, logs and state that differ between builds.
fn cleanup(root: &Path) -> Result<(), ImageError> {
    let globs: &[(&str, &str)] = &[
        ("boot", "initrd.img-"),
        ("var/lib/apt/lists", ""),
        ("var/cache/apt", ".bin"),
        ("var/log", ""),
        ("var/cache/ldconfig", "aux-cache"),
        ("tmp", ""),
    ];
    for (dir, prefix_or_suffix) in globs {
        let d = root.join(dir);
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let matches = prefix_or_suffix.is_empty()
                || name.starts_with(prefix_or_suffix)
                || name.ends_with(prefix_or_suffix);
            if !matches || name == "partial" || name == "lock" {
                continue;
            }
            let p: PathBuf = e.path();
            let res = if p.is_dir() && !p.is_symlink() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            res.map_err(|err| ImageError::io(&p, err))?;
        }
    }
    Ok(())
}
