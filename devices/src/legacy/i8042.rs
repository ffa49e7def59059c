//! The i8042 keyboard controller, kept for its CPU reset line (the guest
//! pulses it with command 0xfe on port 0x64, which `reboot=k` uses).

use std::sync::Arc;

use crate::lifecycle::{ExitReason, VmLifecycle};
use crate::PioDevice;

const DATA_OFFSET: u16 = 0;
const COMMAND_OFFSET: u16 = 4;
const CMD_PULSE_RESET: u8 = 0xfe;

/// Registered at port 0x60 with length 5 (0x60..=0x64). Port 0x61 never
/// reaches us: KVM's in-kernel PIT owns it.
pub struct I8042 {
    lifecycle: Arc<VmLifecycle>,
}

impl I8042 {
    pub fn new(lifecycle: Arc<VmLifecycle>) -> Self {
        I8042 { lifecycle }
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so a guest
        // waiting to send a command never spins. No data to read.
        data.fill(match offset {
            DATA_OFFSET | COMMAND_OFFSET => 0,
            _ => 0xff,
        });
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_PULSE_RESET) {
            self.lifecycle.request_exit(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_pulse_requests_reset() {
        let l = Arc::new(VmLifecycle::new().unwrap());
        let mut dev = I8042::new(l.clone());
        let mut status = [0xaa];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
        dev.write(DATA_OFFSET, &[0xfe]);
        dev.write(COMMAND_OFFSET, &[0xd1]);
        assert!(!l.is_stopping(), "only 0xfe on the command port resets");
        dev.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(l.exit_reason(), Some(ExitReason::Reset));
    }
}
