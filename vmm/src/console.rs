//! Event-loop subscribers: host stdin into the guest's serial port, and VM
//! control (guest exit requests and host signals).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kiln_devices::legacy::SerialConsole;
use kiln_devices::{ExitReason, VmLifecycle};
use vmm_sys_util::eventfd::EventFd;

/// Bytes read from stdin at a time: the UART's FIFO size.
const INPUT_CHUNK: usize = 64;

/// Moves what fits of `pending` into the UART's receive FIFO (the rest
/// waits until the guest drains it): host input, from stdin or a console
/// client, is never dropped.
pub(crate) fn type_into(serial: &Mutex<SerialConsole>, pending: &mut Vec<u8>) {
    if pending.is_empty() {
        return;
    }
    let taken = serial
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .enqueue_input(pending);
    pending.drain(..taken);
}

/// Copies host input into the serial receive FIFO, only as fast as the
/// guest drains it: nothing typed is dropped.
pub struct ConsoleInput {
    input: File,
    serial: Arc<Mutex<SerialConsole>>,
    rx_room: EventFd,
    pending: Vec<u8>,
    polling_input: bool,
    at_eof: bool,
}

impl ConsoleInput {
    pub fn new(input: File, serial: Arc<Mutex<SerialConsole>>, rx_room: EventFd) -> Self {
        ConsoleInput {
            input,
            serial,
            rx_room,
            pending: Vec::new(),
            polling_input: false,
            at_eof: false,
        }
    }

    fn push_pending(&mut self) {
        type_into(&self.serial, &mut self.pending);
    }

    fn set_polling(&mut self, ops: &mut EventOps, on: bool) {
        if on == self.polling_input {
            return;
        }
        let events = Events::new(&self.input, EventSet::IN);
        let result = if on {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.polling_input = on,
            Err(e) => {
                tracing::warn!("console input disabled: {e:?}");
                self.at_eof = true;
            }
        }
    }

    fn read_input(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; INPUT_CHUNK];
        match self.input.read(&mut buf) {
            Ok(0) => {
                // End of input: the guest keeps running without a keyboard.
                self.at_eof = true;
                self.set_polling(ops, false);
            }
            Ok(n) => self.pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!("reading console input failed, input disabled: {e}");
                self.at_eof = true;
                self.set_polling(ops, false);
            }
        }
    }

    fn refresh_polling(&mut self, ops: &mut EventOps) {
        let want = self.pending.is_empty() && !self.at_eof;
        self.set_polling(ops, want);
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.rx_room, EventSet::IN)) {
            tracing::warn!("console input disabled: {e:?}");
            return;
        }
        self.refresh_polling(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.rx_room.as_raw_fd() {
            let _ = self.rx_room.read();
        } else if events.fd() == self.input.as_raw_fd() {
            if events.event_set().contains(EventSet::IN) {
                self.read_input(ops);
            } else {
                // Hang-up or error without data: treat as end of input.
                self.at_eof = true;
            }
        }
        self.push_pending();
        self.refresh_polling(ops);
    }
}

/// Flushes a partial line of console output (a prompt, an echoed key)
/// as soon as the guest wrote it.
pub struct ConsoleOutputFlush {
    serial: Arc<Mutex<SerialConsole>>,
    flush_needed: EventFd,
}

impl ConsoleOutputFlush {
    pub fn new(serial: Arc<Mutex<SerialConsole>>, flush_needed: EventFd) -> Self {
        ConsoleOutputFlush {
            serial,
            flush_needed,
        }
    }
}

impl MutEventSubscriber for ConsoleOutputFlush {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.flush_needed, EventSet::IN)) {
            tracing::warn!(
                "console output flushing disabled, partial lines wait for a newline: {e:?}"
            );
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.flush_needed.read();
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush();
    }
}

/// Wakes the loop when the guest or a vCPU asks to stop, or when the host
/// sends SIGINT/SIGTERM/SIGHUP.
pub struct VmControl {
    lifecycle: Arc<VmLifecycle>,
    signals: Option<OwnedFd>,
}

impl VmControl {
    pub fn new(lifecycle: Arc<VmLifecycle>, signals: Option<OwnedFd>) -> Self {
        VmControl { lifecycle, signals }
    }
}

impl MutEventSubscriber for VmControl {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.lifecycle.event(), EventSet::IN));
        if let Some(fd) = &self.signals {
            let _ = ops.add(Events::new_raw(fd.as_raw_fd(), EventSet::IN));
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.lifecycle.event().as_raw_fd() {
            let _ = self.lifecycle.event().read();
        } else if let Some(fd) = &self.signals {
            if events.fd() == fd.as_raw_fd() {
                if let Some(signo) = read_signal(fd.as_raw_fd()) {
                    self.lifecycle.request_exit(ExitReason::HostSignal(signo));
                }
            }
        }
    }
}

/// Blocks the stop signals in this thread (threads spawned later inherit
/// the mask) and returns a signalfd that receives them.
pub fn stop_signals_fd() -> std::io::Result<OwnedFd> {
    // SAFETY: plain libc calls on a sigset we own; the fd is checked.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn read_signal(fd: RawFd) -> Option<i32> {
    // SAFETY: reads one signalfd_siginfo into a buffer of its size.
    unsafe {
        let mut info: libc::signalfd_siginfo = std::mem::zeroed();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        let n = libc::read(fd, &mut info as *mut _ as *mut libc::c_void, size);
        (n == size as isize).then_some(info.ssi_signo as i32)
    }
}
