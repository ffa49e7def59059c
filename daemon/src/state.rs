//! The VM state machine: which action each state allows, and what state
//! an ended run leaves.

use kiln_api::{ExitKind, VmState};

/// A lifecycle action of `POST /v1/vms/{id}/ACTION`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    Shutdown,
    Reboot,
    Pause,
    Resume,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Shutdown => "shutdown",
            Action::Reboot => "reboot",
            Action::Pause => "pause",
            Action::Resume => "resume",
        }
    }
}

/// Whether `action` makes sense in `state`; the error says why not.
/// While `stopping` (a shutdown waits for the guest) only `stop` (the
/// hard stop, at once) is allowed.
pub fn check(state: VmState, action: Action) -> Result<(), String> {
    use VmState::*;
    let ok = match action {
        Action::Start => matches!(state, Defined | Shutoff | Crashed),
        Action::Stop => state.is_active(),
        Action::Shutdown | Action::Reboot | Action::Pause => state == Running,
        Action::Resume => state == Paused,
    };
    if ok {
        return Ok(());
    }
    let hint = match (state, action) {
        (Stopping, _) => " (a shutdown is under way; `stop` ends it at once)",
        (Paused, Action::Shutdown | Action::Reboot) => {
            " (a paused guest cannot see the power button: resume it, or stop it)"
        }
        (Defined | Shutoff | Crashed, Action::Shutdown | Action::Reboot | Action::Pause) => {
            " (it is not running)"
        }
        _ => "",
    };
    Err(format!(
        "cannot {} a VM that is {}{hint}",
        action.as_str(),
        state.as_str()
    ))
}

/// The state a run that ended with `exit` leaves the VM in.
pub fn after_exit(exit: ExitKind) -> VmState {
    match exit {
        ExitKind::Crash => VmState::Crashed,
        ExitKind::Poweroff | ExitKind::Reboot | ExitKind::Stopped => VmState::Shutoff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmState::*;

    #[test]
    fn start_only_when_nothing_runs() {
        for s in VmState::ALL {
            assert_eq!(check(s, Action::Start).is_ok(), !s.is_active(), "{s:?}");
        }
    }

    #[test]
    fn pause_resume_and_shutdown_follow_the_run_state() {
        assert!(check(Running, Action::Pause).is_ok());
        assert!(check(Paused, Action::Pause).is_err());
        assert!(check(Paused, Action::Resume).is_ok());
        assert!(check(Running, Action::Resume).is_err());
        assert!(check(Running, Action::Shutdown).is_ok());
        assert!(check(Shutoff, Action::Shutdown).is_err());
        assert!(check(Paused, Action::Stop).is_ok());
        assert!(check(Crashed, Action::Stop).is_err());
        assert_eq!(
            check(Defined, Action::Reboot).unwrap_err(),
            "cannot reboot a VM that is defined (it is not running)"
        );
    }

    #[test]
    fn stopping_allows_only_the_hard_stop() {
        for action in [
            Action::Start,
            Action::Shutdown,
            Action::Reboot,
            Action::Pause,
            Action::Resume,
        ] {
            let why = check(Stopping, action).unwrap_err();
            assert!(why.contains("shutdown is under way"), "{action:?}: {why}");
        }
        assert!(check(Stopping, Action::Stop).is_ok());
    }

    #[test]
    fn shutdown_and_reboot_need_a_running_vm_and_say_why_not() {
        for s in VmState::ALL {
            assert_eq!(check(s, Action::Shutdown).is_ok(), s == Running, "{s:?}");
            assert_eq!(check(s, Action::Reboot).is_ok(), s == Running, "{s:?}");
        }
        assert_eq!(
            check(Shutoff, Action::Shutdown).unwrap_err(),
            "cannot shutdown a VM that is shutoff (it is not running)"
        );
        assert!(check(Paused, Action::Reboot)
            .unwrap_err()
            .contains("resume it"));
    }

    #[test]
    fn only_a_crash_leaves_crashed() {
        assert_eq!(after_exit(ExitKind::Crash), Crashed);
        assert_eq!(after_exit(ExitKind::Poweroff), Shutoff);
        assert_eq!(after_exit(ExitKind::Stopped), Shutoff);
    }
}
