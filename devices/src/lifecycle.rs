//! How the guest (or a vCPU thread) asks the VMM to stop the VM.

use std::sync::Mutex;
use vmm_sys_util::eventfd::EventFd;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, i8042 pulse).
    Reset,
    /// The guest can no longer run: triple fault, KVM internal error. The
    /// text holds what is known (vCPU registers).
    Crash(String),
    /// The host asked us to stop (signal number).
    HostSignal(i32),
    /// The VMM itself failed while the guest ran.
    VmmError(String),
    /// The VMM's controller asked for a hard stop (`Vm::stop`).
    Stopped,
}

/// Shared between devices, vCPU threads and the event loop: the first
/// reason recorded wins, and the event loop wakes on the eventfd.
pub struct VmLifecycle {
    reason: Mutex<Option<ExitReason>>,
    event: EventFd,
}

impl VmLifecycle {
    pub fn new() -> std::io::Result<Self> {
        Ok(VmLifecycle {
            reason: Mutex::new(None),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless the VM is already stopping, and wakes the
    /// event loop.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        // A failed write means the counter is saturated: the loop is
        // already awake.
        let _ = self.event.write(1);
    }

    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_stopping(&self) -> bool {
        self.exit_reason().is_some()
    }

    /// The fd the event loop polls.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes_the_loop() {
        let l = VmLifecycle::new().unwrap();
        assert!(!l.is_stopping());
        l.request_exit(ExitReason::PowerOff);
        l.request_exit(ExitReason::Reset);
        assert_eq!(l.exit_reason(), Some(ExitReason::PowerOff));
        assert_eq!(l.event().read().unwrap(), 2);
    }
}
