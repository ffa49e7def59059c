//! Puts an interactive terminal into raw-ish mode while the guest owns the
//! console, and always puts it back.
//!
//! Echo and line editing are the guest's job, so they are off. `ISIG` stays
//! on: Ctrl-C stops the VM (documented), rather than being sent to the guest.

use std::sync::Mutex;

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

pub struct RawTerminal(());

impl RawTerminal {
    /// Switches stdin to raw mode if it is a terminal.
    pub fn enable() -> Option<RawTerminal> {
        // SAFETY: isatty/tcgetattr/tcsetattr only read/write the termios
        // struct we own.
        unsafe {
            if libc::isatty(libc::STDIN_FILENO) != 1 {
                return None;
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut t) != 0 {
                return None;
            }
            *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
            t.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ECHONL | libc::IEXTEN);
            t.c_iflag &= !(libc::IXON | libc::ICRNL | libc::INLCR | libc::IGNCR);
            t.c_cc[libc::VMIN] = 1;
            t.c_cc[libc::VTIME] = 0;
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t);
        }
        // A panic must not leave the user's terminal unusable.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        Some(RawTerminal(()))
    }
}

fn restore() {
    if let Some(t) = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take() {
        // SAFETY: restores the attributes saved by `enable`.
        unsafe {
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t);
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore();
    }
}
