//! `run_windows_app`: a Windows program run under Wine, either to completion
//! (console programs, output streamed) or detached on the guest display (GUI).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;

use super::OpError;
use crate::protocol::{ErrorCode, WindowsAppRequest};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WineConfig {
    /// The `wine` launcher (Debian: /usr/bin/wine from the `wine` package).
    pub wine: PathBuf,
    /// WINEPREFIX made at image build time.
    pub prefix: PathBuf,
    /// X display for GUI programs (Xwayland or Xvfb), e.g. ":0".
    pub display: Option<String>,
}

/// The command running `req` under Wine (stdio is left to the caller).
pub fn command_for(cfg: &WineConfig, req: &WindowsAppRequest) -> Result<Command, OpError> {
    if !req.path.starts_with('/') || req.path.contains('\0') {
        return Err(OpError::new(
            ErrorCode::BadRequest,
            "path must be absolute, without NUL bytes",
        ));
    }
    if req.args.iter().any(|a| a.contains('\0')) {
        return Err(OpError::new(ErrorCode::BadRequest, "NUL byte in args"));
    }
    let exe = Path::new(&req.path);
    let meta =
        std::fs::metadata(exe).map_err(|e| OpError::io(&format!("program {}", req.path), &e))?;
    if !meta.is_file() {
        return Err(OpError::new(
            ErrorCode::BadRequest,
            format!("{} is not a file", req.path),
        ));
    }
    let mut cmd = Command::new(&cfg.wine);
    cmd.arg(exe)
        .args(&req.args)
        .env("WINEPREFIX", &cfg.prefix)
        // Wine's own diagnostics would mix with the program's stderr.
        .env("WINEDEBUG", "-all")
        // No Mono/Gecko installer dialogs: the image ships neither.
        .env("WINEDLLOVERRIDES", "mscoree=;mshtml=");
    if let Some(parent) = exe.parent() {
        cmd.current_dir(parent);
    }
    match &cfg.display {
        Some(d) => {
            cmd.env("DISPLAY", d);
        }
        None => {
            cmd.env_remove("DISPLAY");
        }
    }
    Ok(cmd)
}

/// Starts a GUI program detached from the agent; returns its pid. A thread
/// reaps it when it exits so no zombie is left behind.
pub fn start_detached(mut cmd: Command) -> Result<u32, OpError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| OpError::io("cannot start wine", &e))?;
    let pid = child.id();
    thread::spawn(move || match child.wait() {
        Ok(st) => tracing::info!(pid, %st, "windows app exited"),
        Err(e) => tracing::warn!(pid, error = %e, "waiting for windows app"),
    });
    Ok(pid)
}
