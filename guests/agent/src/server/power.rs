//! `shutdown` / `reboot`. The real action is reboot(2) after sync(2); tests
//! and hosts that must not go down configure a hook program instead, which
//! is run with the action name as its only argument.

use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::Duration;

use super::OpError;
use crate::protocol::{ErrorCode, PowerAction};

/// Delay between the reply and the action, so the reply reaches the client.
const ACT_DELAY: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PowerControl {
    /// sync(2) then reboot(2): the guest goes down at once.
    Reboot2,
    /// Run `hook shutdown|reboot` instead (for tests and host-side use).
    Hook(PathBuf),
}

impl PowerControl {
    /// Checks the action can be carried out, before the reply is sent.
    pub fn check(&self) -> Result<(), OpError> {
        match self {
            // SAFETY: geteuid has no failure mode and touches no memory.
            PowerControl::Reboot2 if unsafe { libc::geteuid() } != 0 => Err(OpError::new(
                ErrorCode::PermissionDenied,
                "the agent is not running as root and cannot power the guest off",
            )),
            PowerControl::Hook(path) if !path.is_file() => Err(OpError::new(
                ErrorCode::Failed,
                format!("power hook {} does not exist", path.display()),
            )),
            _ => Ok(()),
        }
    }

    /// Carries the action out shortly, on a separate thread.
    pub fn schedule(&self, action: PowerAction) {
        let control = self.clone();
        thread::spawn(move || {
            thread::sleep(ACT_DELAY);
            control.perform(action);
        });
    }

    fn perform(&self, action: PowerAction) {
        match self {
            PowerControl::Hook(path) => match Command::new(path).arg(action.as_str()).status() {
                Ok(st) if st.success() => {
                    tracing::info!(action = action.as_str(), "power hook ran")
                }
                Ok(st) => tracing::error!(action = action.as_str(), %st, "power hook failed"),
                Err(e) => {
                    tracing::error!(action = action.as_str(), error = %e, "cannot run power hook")
                }
            },
            PowerControl::Reboot2 => {
                tracing::warn!(action = action.as_str(), "powering the guest down now");
                let cmd = match action {
                    PowerAction::Shutdown => libc::RB_POWER_OFF,
                    PowerAction::Reboot => libc::RB_AUTOBOOT,
                };
                // SAFETY: sync(2) and reboot(2) take no pointers.
                unsafe {
                    libc::sync();
                    if libc::reboot(cmd) != 0 {
                        tracing::error!(error = %std::io::Error::last_os_error(), "reboot(2) failed");
                    }
                }
            }
        }
    }
}
