//! How a VM's end becomes the process's exit code, the same for `kiln run`
//! and `kiln-vmm` (documented in the README).

use kiln_devices::ExitReason;

pub const POWER_OFF: u8 = 0;
pub const ERROR: u8 = 1;
pub const REBOOT: u8 = 3;
pub const GUEST_CRASH: u8 = 4;
/// Stopped by a `stop` request on the control socket.
pub const STOPPED: u8 = 5;

/// The exit code for `reason`.
pub fn code(reason: &ExitReason) -> u8 {
    match reason {
        ExitReason::PowerOff => POWER_OFF,
        ExitReason::Reset => REBOOT,
        ExitReason::Crash(_) => GUEST_CRASH,
        ExitReason::HostSignal(signo) => 128u8.saturating_add(*signo as u8),
        ExitReason::Stopped => STOPPED,
        ExitReason::VmmError(_) => ERROR,
    }
}

/// The exit code for `reason`, after one line on stderr (prefixed with
/// `program`) for anything but a power-off or a signal.
pub fn report(program: &str, reason: &ExitReason) -> u8 {
    match reason {
        ExitReason::PowerOff | ExitReason::HostSignal(_) => {}
        ExitReason::Reset => eprintln!("{program}: guest rebooted"),
        ExitReason::Crash(report) => eprintln!("{program}: guest crashed: {report}"),
        ExitReason::Stopped => eprintln!("{program}: stopped by a control request"),
        ExitReason::VmmError(text) => eprintln!("{program}: error: {text}"),
    }
    code(reason)
}

/// An error and its causes on one line, each cause once (device errors
/// often repeat their source's text).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut last = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if !last.contains(&msg) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&msg);
        }
        last = msg;
    }
    out
}
