//! The 8250 UART on COM1, wired to the host console.
//!
//! Output goes straight to the host (stdout, a file, or nowhere). Input
//! comes from the event loop through [`SerialConsole::enqueue_input`]; when
//! the guest empties the receive FIFO, `rx_room` fires so the loop reads more
//! host input. That is what makes input interrupt-driven and lossless.

use std::io::Write;

use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::IrqLine;
use crate::PioDevice;

/// Where the guest's console output goes.
pub type SerialOutput = Box<dyn Write + Send>;

/// Signals the event loop that the receive FIFO has room again.
pub struct RxRoom(pub EventFd);

impl SerialEvents for RxRoom {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

pub struct SerialConsole {
    uart: Serial<IrqLine, RxRoom, SerialOutput>,
    output_error_logged: bool,
}

impl SerialConsole {
    pub fn new(irq: EventFd, rx_room: EventFd, output: SerialOutput) -> Self {
        SerialConsole {
            uart: Serial::with_events(IrqLine(irq), RxRoom(rx_room), output),
            output_error_logged: false,
        }
    }

    /// Room left in the receive FIFO.
    pub fn rx_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Flushes buffered output (before the VMM exits).
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl PioDevice for SerialConsole {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        // The UART has byte-wide registers; wider reads see the register in
        // the low byte and a floating bus above.
        data.fill(0xff);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.uart.write(offset, value) {
            // A closed stdout must not kill the guest; say so once.
            if !self.output_error_logged {
                tracing::warn!("serial console output failed, further output is dropped: {e:?}");
                self.output_error_logged = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn console() -> (SerialConsole, EventFd, EventFd, Capture) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let room = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = Capture::default();
        let c = SerialConsole::new(
            irq.try_clone().unwrap(),
            room.try_clone().unwrap(),
            Box::new(out.clone()),
        );
        (c, irq, room, out)
    }

    #[test]
    fn guest_output_reaches_host() {
        let (mut c, _, _, out) = console();
        for b in b"hi\n" {
            c.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_raises_irq_and_drain_signals_room() {
        let (mut c, irq, room, _) = console();
        c.write(1, &[0x01]); // IER: receive-data-available interrupt
        assert_eq!(c.enqueue_input(b"ab"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut b = [0u8; 1];
        c.read(0, &mut b);
        assert_eq!(b, [b'a']);
        c.read(0, &mut b);
        assert_eq!(b, [b'b']);
        assert!(
            room.read().unwrap() >= 1,
            "empty FIFO must wake the input loop"
        );
    }

    #[test]
    fn full_fifo_accepts_no_more() {
        let (mut c, _, _, _) = console();
        let cap = c.rx_capacity();
        assert_eq!(c.enqueue_input(&vec![b'x'; cap + 10]), cap);
        assert_eq!(c.enqueue_input(b"y"), 0);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut c, _, _, _) = console();
        let mut wide = [0u8; 4];
        c.read(7, &mut wide);
        assert_eq!(&wide[1..], &[0xff; 3]);
        c.read(0x1234, &mut []);
        c.write(3, &[]);
        c.write(0x1234, &[1, 2, 3]);
    }
}
