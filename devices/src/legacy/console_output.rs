//! Console output batched by line.
//!
//! Each byte the guest writes to the UART is a separate port-I/O exit;
//! writing each one to the host with its own `write(2)` cost about a tenth
//! of a nested boot. Whole lines are written at once instead. A partial
//! line (a shell prompt, an echoed key) wakes the event loop through
//! `flush_needed`, which flushes it right away, so nothing waits for a
//! newline.

use std::io::{self, Write};

use vmm_sys_util::eventfd::EventFd;

/// Flush at once when this much is pending, newline or not.
const MAX_PENDING: usize = 4096;

pub struct LineBufferedOutput {
    inner: Box<dyn Write + Send>,
    pending: Vec<u8>,
    flush_needed: EventFd,
}

impl LineBufferedOutput {
    pub fn new(inner: Box<dyn Write + Send>, flush_needed: EventFd) -> Self {
        LineBufferedOutput {
            inner,
            pending: Vec::with_capacity(256),
            flush_needed,
        }
    }
}

impl Write for LineBufferedOutput {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let was_empty = self.pending.is_empty();
        self.pending.extend_from_slice(data);
        if data.contains(&b'\n') || self.pending.len() >= MAX_PENDING {
            self.flush()?;
        } else if was_empty {
            // Ask the event loop to flush this partial line soon.
            let _ = self.flush_needed.write(1);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = self
            .inner
            .write_all(&self.pending)
            .and_then(|_| self.inner.flush());
        // Drop the bytes even on error: a dead stdout must not grow the
        // buffer forever; the serial device reports the error once.
        self.pending.clear();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);
    impl Write for Writes {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn output() -> (LineBufferedOutput, Writes, EventFd) {
        let w = Writes::default();
        let ev = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (
            LineBufferedOutput::new(Box::new(w.clone()), ev.try_clone().unwrap()),
            w,
            ev,
        )
    }

    #[test]
    fn a_line_is_one_write() {
        let (mut out, w, _) = output();
        for b in b"hello\nworld\n" {
            out.write_all(&[*b]).unwrap();
        }
        assert_eq!(
            *w.0.lock().unwrap(),
            vec![b"hello\n".to_vec(), b"world\n".to_vec()]
        );
    }

    #[test]
    fn a_partial_line_asks_for_a_flush_once() {
        let (mut out, w, ev) = output();
        for b in b"/ # " {
            out.write_all(&[*b]).unwrap();
        }
        assert!(w.0.lock().unwrap().is_empty());
        assert_eq!(ev.read().unwrap(), 1, "one wake-up per partial line");
        out.flush().unwrap();
        assert_eq!(*w.0.lock().unwrap(), vec![b"/ # ".to_vec()]);
    }

    #[test]
    fn long_lines_are_bounded() {
        let (mut out, w, _) = output();
        out.write_all(&vec![b'x'; MAX_PENDING + 10]).unwrap();
        assert_eq!(w.0.lock().unwrap().len(), 1);
    }
}
