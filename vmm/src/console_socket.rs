//! The serial console on a Unix socket (mode 0600), for the daemon and
//! anyone with access to the VM's run directory: every connected client
//! receives the guest's output, and the oldest one's input goes into the
//! UART, only as fast as the guest drains it (as [`ConsoleInput`] does for
//! stdin). The output is also written to a size-capped log.
//!
//! At most [`MAX_CLIENTS`] clients at once. Each client is first sent one
//! greeting line, then the raw console bytes:
//!
//! ```text
//! kiln-console 1 attached
//! kiln-console 1 busy: 4 clients are attached already
//! ```
//!
//! A busy client is closed after its greeting. Output is sent to clients
//! without blocking (from the vCPU thread that wrote the UART): what does
//! not fit in a slow client's socket buffer is dropped for that client and
//! counted, so no client can stall the guest.
//!
//! [`ConsoleInput`]: crate::console::ConsoleInput

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kiln_devices::legacy::SerialConsole;
use vmm_sys_util::eventfd::EventFd;

use crate::config::SocketConsole;
use crate::console::type_into;
use crate::console_log::CappedLog;

/// Clients attached at once.
pub const MAX_CLIENTS: usize = 4;
/// The greeting's protocol version.
pub const GREETING_VERSION: u32 = 1;
/// Bytes read from the writing client at a time: the UART's FIFO size.
const INPUT_CHUNK: usize = 64;

/// The greeting an accepted client gets.
pub fn attached_greeting() -> String {
    format!("kiln-console {GREETING_VERSION} attached\n")
}

fn busy_greeting() -> String {
    format!("kiln-console {GREETING_VERSION} busy: {MAX_CLIENTS} clients are attached already\n")
}

struct Client {
    id: u64,
    stream: UnixStream,
    /// Output bytes this client did not get (its socket buffer was full).
    dropped: u64,
    /// The peer closed its sending side: nothing more to read.
    read_closed: bool,
    /// What the event loop watches on it now.
    interest: Option<EventSet>,
}

struct Hub {
    log: Option<CappedLog>,
    clients: Vec<Client>,
    next_id: u64,
}

/// Sends what fits without blocking; returns the bytes sent, or the error
/// when the peer is gone.
fn send_nonblocking(stream: &UnixStream, data: &[u8]) -> io::Result<usize> {
    // SAFETY: send(2) on an fd we own, from a buffer of `data.len()` bytes.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

impl Hub {
    fn output(&mut self, data: &[u8]) {
        if let Some(log) = &mut self.log {
            log.append(data);
        }
        for c in &mut self.clients {
            let mut sent = 0;
            while sent < data.len() {
                match send_nonblocking(&c.stream, &data[sent..]) {
                    Ok(0) => break,
                    Ok(n) => sent += n,
                    // Gone: the event loop sees the hang-up and removes it.
                    Err(_) => break,
                }
            }
            c.dropped += (data.len() - sent) as u64;
        }
    }
}

/// The console socket and log of one VMM; lives as long as the VMM, so
/// clients stay attached across a guest reboot.
pub struct ConsoleSocket {
    hub: Arc<Mutex<Hub>>,
    listener: Arc<UnixListener>,
    path: PathBuf,
}

fn lock(hub: &Mutex<Hub>) -> std::sync::MutexGuard<'_, Hub> {
    hub.lock().unwrap_or_else(|e| e.into_inner())
}

impl ConsoleSocket {
    /// Binds the socket (replacing a stale one) and opens the log.
    pub fn bind(config: &SocketConsole) -> io::Result<ConsoleSocket> {
        let log = match &config.log {
            Some(path) => Some(CappedLog::open(path, config.log_limit_bytes).map_err(|e| {
                io::Error::new(e.kind(), format!("console log {}: {e}", path.display()))
            })?),
            None => None,
        };
        remove_stale(&config.path)?;
        let listener = UnixListener::bind(&config.path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("console socket {}: {e}", config.path.display()),
            )
        })?;
        std::fs::set_permissions(&config.path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(ConsoleSocket {
            hub: Arc::new(Mutex::new(Hub {
                log,
                clients: Vec::new(),
                next_id: 0,
            })),
            listener: Arc::new(listener),
            path: config.path.clone(),
        })
    }

    /// The UART's output: to the log and every client.
    pub fn output(&self) -> Box<dyn Write + Send> {
        Box::new(HubOutput(self.hub.clone()))
    }

    /// The event-loop side for one run of the guest: accepts clients, feeds
    /// the oldest one's input into `serial`, removes clients that left.
    pub fn subscriber(
        &self,
        serial: Arc<Mutex<SerialConsole>>,
        rx_room: EventFd,
    ) -> ConsoleClients {
        ConsoleClients {
            hub: self.hub.clone(),
            listener: self.listener.clone(),
            serial,
            rx_room,
            pending: Vec::new(),
        }
    }

    /// Clients attached now.
    pub fn clients(&self) -> usize {
        lock(&self.hub).clients.len()
    }

    /// Output bytes dropped for each attached client, oldest first.
    pub fn dropped(&self) -> Vec<u64> {
        lock(&self.hub).clients.iter().map(|c| c.dropped).collect()
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A socket nobody listens on is stale and replaced; anything else there
/// is not ours to remove.
fn remove_stale(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() || UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "console socket {} already exists and is in use (or is not a socket)",
                path.display()
            ),
        ));
    }
    std::fs::remove_file(path)
}

/// Reads what the writer sent into `pending`; false when it is gone.
fn recv_into(stream: &UnixStream, pending: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; INPUT_CHUNK];
    // SAFETY: recv(2) into a buffer we own; MSG_DONTWAIT so a spurious
    // wake-up cannot block the loop.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => false,
        n if n > 0 => {
            pending.extend_from_slice(&buf[..n as usize]);
            true
        }
        _ => matches!(
            io::Error::last_os_error().kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ),
    }
}

struct HubOutput(Arc<Mutex<Hub>>);

impl Write for HubOutput {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        lock(&self.0).output(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub struct ConsoleClients {
    hub: Arc<Mutex<Hub>>,
    listener: Arc<UnixListener>,
    serial: Arc<Mutex<SerialConsole>>,
    rx_room: EventFd,
    /// Input read from the writer that the UART has no room for yet.
    pending: Vec<u8>,
}

impl ConsoleClients {
    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("console socket: accept: {e}");
                    return;
                }
            };
            let mut hub = lock(&self.hub);
            if hub.clients.len() >= MAX_CLIENTS {
                let _ = send_nonblocking(&stream, busy_greeting().as_bytes());
                continue;
            }
            if send_nonblocking(&stream, attached_greeting().as_bytes()).is_err() {
                continue;
            }
            let id = hub.next_id;
            hub.next_id += 1;
            hub.clients.push(Client {
                id,
                stream,
                dropped: 0,
                read_closed: false,
                interest: None,
            });
            drop(hub);
            self.refresh(ops);
        }
    }

    fn client_event(&mut self, fd: i32, set: EventSet, ops: &mut EventOps) {
        let mut hub = lock(&self.hub);
        let Some(index) = hub.clients.iter().position(|c| c.stream.as_raw_fd() == fd) else {
            return;
        };
        let writer = index == 0;
        let mut gone = false;
        if set.contains(EventSet::IN) && writer {
            gone = !recv_into(&hub.clients[0].stream, &mut self.pending);
        } else if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            gone = true;
        } else if set.contains(EventSet::READ_HANG_UP) {
            if writer {
                // Its last bytes may still be waiting: read them before
                // it goes (a read of 0 then removes it).
                hub.clients[0].read_closed = true;
            } else {
                gone = true;
            }
        }
        if gone {
            let client = hub.clients.remove(index);
            if let Some(set) = client.interest {
                let _ = ops.remove(Events::new(&client.stream, set));
            }
            if client.dropped > 0 {
                tracing::info!(
                    "console client {} left; {} output bytes were dropped for it (too slow)",
                    client.id,
                    client.dropped
                );
            }
        }
    }

    fn push_pending(&mut self) {
        type_into(&self.serial, &mut self.pending);
    }

    /// Sets what the loop watches on each client: hang-ups on all, input
    /// on the writer (the oldest) while nothing it sent is pending.
    fn refresh(&mut self, ops: &mut EventOps) {
        let want_input = self.pending.is_empty();
        let mut hub = lock(&self.hub);
        for (i, c) in hub.clients.iter_mut().enumerate() {
            let mut want = EventSet::empty();
            if !c.read_closed {
                want |= EventSet::READ_HANG_UP;
            }
            if i == 0 && want_input {
                want |= EventSet::IN;
            }
            if c.interest == Some(want) {
                continue;
            }
            let events = Events::new(&c.stream, want);
            let result = match c.interest {
                Some(_) => ops.modify(events),
                None => ops.add(events),
            };
            match result {
                Ok(()) => c.interest = Some(want),
                Err(e) => tracing::warn!("console client {}: {e:?}", c.id),
            }
        }
    }
}

impl MutEventSubscriber for ConsoleClients {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.rx_room, EventSet::IN)) {
            tracing::warn!("console socket input disabled: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(&*self.listener, EventSet::IN)) {
            tracing::warn!("console socket disabled: {e:?}");
        }
        // Clients attached during an earlier run of the guest (a reboot)
        // are watched by this loop from now on.
        for c in &mut lock(&self.hub).clients {
            c.interest = None;
        }
        self.refresh(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.rx_room.as_raw_fd() {
            let _ = self.rx_room.read();
        } else if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else {
            self.client_event(fd, events.event_set(), ops);
        }
        self.push_pending();
        self.refresh(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};
    use std::io::{BufRead, BufReader, Read};
    use std::time::Duration;

    struct Rig {
        _dir: tempfile::TempDir,
        path: PathBuf,
        log: PathBuf,
        console: ConsoleSocket,
        serial: Arc<Mutex<SerialConsole>>,
        events: EventManager<Box<dyn MutEventSubscriber + Send>>,
        out: Box<dyn Write + Send>,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let log = dir.path().join("console.log");
        let console = ConsoleSocket::bind(&SocketConsole {
            path: path.clone(),
            log: Some(log.clone()),
            log_limit_bytes: 4096,
        })
        .unwrap();
        let rx_room = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(SerialConsole::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            rx_room.try_clone().unwrap(),
            Box::new(io::sink()),
        )));
        let mut events: EventManager<Box<dyn MutEventSubscriber + Send>> =
            EventManager::new().unwrap();
        events.add_subscriber(Box::new(console.subscriber(serial.clone(), rx_room)));
        let out = console.output();
        Rig {
            _dir: dir,
            path,
            log,
            console,
            serial,
            events,
            out,
        }
    }

    impl Rig {
        fn spin(&mut self) {
            for _ in 0..5 {
                self.events.run_with_timeout(20).unwrap();
            }
        }

        /// Connects and returns the client with its greeting.
        fn connect(&mut self) -> (BufReader<UnixStream>, String) {
            let s = UnixStream::connect(&self.path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            self.spin();
            let mut r = BufReader::new(s);
            let mut greeting = String::new();
            r.read_line(&mut greeting).unwrap();
            (r, greeting)
        }

        /// Bytes the guest would read from the UART's receive FIFO.
        fn guest_reads(&self) -> Vec<u8> {
            let mut serial = self.serial.lock().unwrap();
            let mut got = Vec::new();
            use kiln_devices::PioDevice;
            loop {
                let mut lsr = [0u8];
                serial.read(5, &mut lsr);
                if lsr[0] & 1 == 0 {
                    return got;
                }
                let mut b = [0u8];
                serial.read(0, &mut b);
                got.push(b[0]);
            }
        }
    }

    #[test]
    fn output_fans_out_to_every_client_and_the_log() {
        let mut r = rig();
        let (mut a, ga) = r.connect();
        let (mut b, gb) = r.connect();
        assert_eq!(ga, attached_greeting());
        assert_eq!(gb, attached_greeting());
        r.out.write_all(b"hello guest\n").unwrap();
        for c in [&mut a, &mut b] {
            let mut line = String::new();
            c.read_line(&mut line).unwrap();
            assert_eq!(line, "hello guest\n");
        }
        assert_eq!(std::fs::read(&r.log).unwrap(), b"hello guest\n");
        assert_eq!(r.console.clients(), 2);
    }

    #[test]
    fn a_fifth_client_is_refused_and_a_left_one_frees_its_slot() {
        let mut r = rig();
        let mut held: Vec<_> = (0..MAX_CLIENTS).map(|_| r.connect()).collect();
        assert!(held.iter().all(|(_, g)| *g == attached_greeting()));
        let (mut fifth, greeting) = r.connect();
        assert!(greeting.contains("busy: 4 clients"), "{greeting:?}");
        let mut rest = Vec::new();
        assert_eq!(fifth.read_to_end(&mut rest).unwrap(), 0, "closed after");
        drop(held.pop());
        r.spin();
        assert_eq!(r.console.clients(), MAX_CLIENTS - 1);
        let (_again, greeting) = r.connect();
        assert_eq!(greeting, attached_greeting());
    }

    #[test]
    fn the_oldest_clients_input_reaches_the_uart_only_as_the_guest_drains_it() {
        let mut r = rig();
        let (writer, _) = r.connect();
        let (reader, _) = r.connect();
        reader.get_ref().write_all(b"ignored").unwrap();
        let typed: Vec<u8> = (0..200u32).map(|i| b'a' + (i % 26) as u8).collect();
        writer.get_ref().write_all(&typed).unwrap();
        let mut got = Vec::new();
        for _ in 0..50 {
            r.spin();
            let chunk = r.guest_reads();
            // The FIFO never takes more than its size at once.
            assert!(chunk.len() <= 64, "{}", chunk.len());
            got.extend(chunk);
            if got.len() >= typed.len() {
                break;
            }
        }
        assert_eq!(
            got, typed,
            "every typed byte, in order, none from the reader"
        );
    }

    #[test]
    fn a_client_that_does_not_read_loses_output_but_never_blocks_the_writer() {
        let mut r = rig();
        let (_slow, _) = r.connect();
        let (mut fast, _) = r.connect();
        fast.get_ref().set_nonblocking(true).unwrap();
        let line = [b'x'; 1024];
        let mut fast_got = 0usize;
        let start = std::time::Instant::now();
        for _ in 0..4096 {
            r.out.write_all(&line).unwrap();
            // The fast client keeps up.
            let mut buf = [0u8; 8192];
            while let Ok(n) = fast.read(&mut buf) {
                if n == 0 {
                    break;
                }
                fast_got += n;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(20), "output blocked");
        let dropped = r.console.dropped();
        assert!(
            dropped[0] > 0,
            "the slow client must lose output: {dropped:?}"
        );
        assert!(fast_got > 3 << 20, "the fast one kept up: {fast_got}");
        // The log is capped however much the guest prints.
        let log = std::fs::metadata(&r.log).unwrap().len();
        assert!(log <= 4096, "{log}");
    }
}
