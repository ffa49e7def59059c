//! A device's I/O worker: one thread per device that serves its queues and
//! its backend, off the vCPU threads.
//!
//! Its placement is a policy lever, changeable while the guest runs through
//! a [`WorkerControl`]: which host CPUs the thread may run on, and how it
//! waits for work:
//! - [`WaitMode::Notify`]: sleep in epoll until the guest kicks a queue or
//!   the backend has data (cheap on CPU, one wake-up per batch);
//! - [`WaitMode::Poll`]: keep looking for work without sleeping, with guest
//!   notifications suppressed, and fall back to sleeping after `spin` with
//!   nothing to do (lower latency, costs a host CPU while busy).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// How the worker waits for work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitMode {
    Notify,
    Poll { spin: Duration },
}

/// Where the worker runs and how it waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Host CPUs the worker may run on; `None` means any.
    pub cpus: Option<Vec<usize>>,
    pub wait: WaitMode,
}

impl Default for Placement {
    fn default() -> Self {
        Placement {
            cpus: None,
            wait: WaitMode::Notify,
        }
    }
}

struct ControlShared {
    placement: Mutex<Placement>,
    changed: EventFd,
    /// Linux thread id of the running worker, 0 when none runs.
    tid: AtomicI32,
    /// Times the worker found work (events handled or polls that did work).
    busy_rounds: AtomicU64,
    /// Last placement error, if applying one failed.
    last_error: Mutex<Option<String>>,
}

/// A handle to change a worker's placement at runtime; cheap to clone.
/// It outlives worker restarts (a device reset starts a new thread with
/// the same control).
#[derive(Clone)]
pub struct WorkerControl {
    shared: Arc<ControlShared>,
}

impl WorkerControl {
    pub fn new(placement: Placement) -> io::Result<Self> {
        Ok(WorkerControl {
            shared: Arc::new(ControlShared {
                placement: Mutex::new(placement),
                changed: EventFd::new(libc::EFD_NONBLOCK)?,
                tid: AtomicI32::new(0),
                busy_rounds: AtomicU64::new(0),
                last_error: Mutex::new(None),
            }),
        })
    }

    pub fn placement(&self) -> Placement {
        lock(&self.shared.placement).clone()
    }

    /// Changes the placement; the worker applies it at its next wake-up,
    /// which this call triggers.
    pub fn set_placement(&self, placement: Placement) {
        *lock(&self.shared.placement) = placement;
        let _ = self.shared.changed.write(1);
    }

    pub fn set_cpus(&self, cpus: Option<Vec<usize>>) {
        let mut p = self.placement();
        p.cpus = cpus;
        self.set_placement(p);
    }

    pub fn set_wait_mode(&self, wait: WaitMode) {
        let mut p = self.placement();
        p.wait = wait;
        self.set_placement(p);
    }

    /// The worker thread's Linux thread id, if one is running.
    pub fn thread_id(&self) -> Option<i32> {
        Some(self.shared.tid.load(Ordering::Relaxed)).filter(|t| *t != 0)
    }

    pub fn busy_rounds(&self) -> u64 {
        self.shared.busy_rounds.load(Ordering::Relaxed)
    }

    /// Why the last placement could not be applied (e.g. no such CPU).
    pub fn last_error(&self) -> Option<String> {
        lock(&self.shared.last_error).clone()
    }
}

/// What a device does on its worker thread.
pub trait WorkerHandler: Send + 'static {
    /// File descriptors to wait on (kick eventfds, backend fds), each with
    /// a token passed back to [`WorkerHandler::handle_event`]. Tokens
    /// `u64::MAX - 1` and up are the worker's own.
    fn event_sources(&self) -> Vec<(RawFd, EventSet, u64)>;
    /// Source `token` is ready.
    fn handle_event(&mut self, token: u64, events: EventSet);
    /// Looks for work without waiting (poll mode); returns whether any
    /// was done.
    fn poll(&mut self) -> bool;
    /// Entering (`true`) or leaving poll mode: devices suppress guest
    /// notifications while polling and re-enable them before the worker
    /// sleeps. Returns true if work arrived while re-enabling.
    fn set_polling(&mut self, _on: bool) -> bool {
        false
    }
    /// The event source list changed (e.g. a backend connection opened):
    /// the worker asks for it again after each round when this is true.
    fn sources_changed(&mut self) -> bool {
        false
    }
}

const STOP_TOKEN: u64 = u64::MAX;
const CONTROL_TOKEN: u64 = u64::MAX - 1;
const MAX_EVENTS: usize = 64;

/// A running worker thread; stopped and joined on drop.
pub struct Worker {
    handle: Option<JoinHandle<()>>,
    stop: EventFd,
}

impl Worker {
    /// Starts `handler` on a thread named `kiln-io-<name>`.
    pub fn spawn<H: WorkerHandler>(
        name: &str,
        handler: H,
        control: WorkerControl,
    ) -> io::Result<Worker> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop_wait = stop.try_clone()?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop_wait.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            control.shared.changed.as_raw_fd(),
            EpollEvent::new(EventSet::IN, CONTROL_TOKEN),
        )?;
        let mut looper = Loop {
            handler,
            control,
            epoll,
            stop: stop_wait,
            registered: Vec::new(),
        };
        looper.register_sources()?;
        let handle = std::thread::Builder::new()
            .name(format!("kiln-io-{name}"))
            .spawn(move || looper.run())?;
        Ok(Worker {
            handle: Some(handle),
            stop,
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = self.stop.write(1);
            let _ = handle.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Loop<H> {
    handler: H,
    control: WorkerControl,
    epoll: Epoll,
    stop: EventFd,
    registered: Vec<RawFd>,
}

impl<H: WorkerHandler> Loop<H> {
    fn register_sources(&mut self) -> io::Result<()> {
        for fd in self.registered.drain(..) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        for (fd, set, token) in self.handler.event_sources() {
            self.epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))?;
            self.registered.push(fd);
        }
        Ok(())
    }

    fn run(mut self) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.control.shared.tid.store(tid, Ordering::Relaxed);
        let mut placement = self.apply_placement();
        let mut polling = false;
        let mut last_work = Instant::now();
        let mut events = vec![EpollEvent::default(); MAX_EVENTS];
        loop {
            let spin = match placement.wait {
                WaitMode::Poll { spin } => Some(spin),
                WaitMode::Notify => None,
            };
            if spin.is_some() != polling {
                polling = spin.is_some();
                self.handler.set_polling(polling);
                last_work = Instant::now();
            }
            // Poll mode: look without sleeping until idle for `spin`.
            let mut timeout = -1;
            if let Some(spin) = spin {
                if last_work.elapsed() < spin {
                    timeout = 0;
                } else if self.handler.set_polling(false) {
                    // Work raced with re-enabling notifications.
                    self.handler.set_polling(true);
                    timeout = 0;
                    last_work = Instant::now();
                } else {
                    polling = false;
                }
            }
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("I/O worker: epoll failed, worker stops: {e}");
                    break;
                }
            };
            let mut worked = false;
            for ev in &events[..n] {
                match ev.data() {
                    STOP_TOKEN => {
                        self.control.shared.tid.store(0, Ordering::Relaxed);
                        return;
                    }
                    CONTROL_TOKEN => {
                        let _ = self.control.shared.changed.read();
                        placement = self.apply_placement();
                    }
                    token => {
                        self.handler.handle_event(token, ev.event_set());
                        worked = true;
                    }
                }
            }
            if polling && self.handler.poll() {
                worked = true;
            }
            if worked {
                last_work = Instant::now();
                self.control
                    .shared
                    .busy_rounds
                    .fetch_add(1, Ordering::Relaxed);
            }
            if self.handler.sources_changed() {
                if let Err(e) = self.register_sources() {
                    tracing::error!(
                        "I/O worker: cannot watch the device's sources, worker stops: {e}"
                    );
                    break;
                }
            }
        }
        // Stopped by an error: wait for the stop request so the owner's
        // join does not race with a half-dead device.
        let _ = self.stop.read();
        self.control.shared.tid.store(0, Ordering::Relaxed);
    }

    fn apply_placement(&self) -> Placement {
        let placement = self.control.placement();
        let result = match &placement.cpus {
            Some(cpus) => set_affinity(cpus),
            None => set_affinity(&all_cpus()),
        };
        *lock(&self.control.shared.last_error) = result.err().map(|e| e.to_string());
        placement
    }
}

/// Restricts the calling thread to `cpus`.
pub fn set_affinity(cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty CPU set"));
    }
    // SAFETY: cpu_set_t is plain data; CPU_SET is bounds-checked below.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            if cpu >= libc::CPU_SETSIZE as usize {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("CPU {cpu} out of range"),
                ));
            }
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The CPUs this process may use (its affinity when it started).
fn all_cpus() -> Vec<usize> {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    (0..n.max(1)).collect()
}

/// The CPUs the calling thread may run on.
pub fn current_affinity() -> io::Result<Vec<usize>> {
    // SAFETY: sched_getaffinity fills the set we pass.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts kicks on one eventfd and records the thread's affinity.
    struct Counter {
        kick: EventFd,
        handled: Arc<AtomicUsize>,
        polls: Arc<AtomicUsize>,
        affinity: Arc<Mutex<Vec<usize>>>,
    }

    impl WorkerHandler for Counter {
        fn event_sources(&self) -> Vec<(RawFd, EventSet, u64)> {
            vec![(self.kick.as_raw_fd(), EventSet::IN, 0)]
        }
        fn handle_event(&mut self, _token: u64, _events: EventSet) {
            let _ = self.kick.read();
            self.handled.fetch_add(1, Ordering::SeqCst);
            *self.affinity.lock().unwrap() = current_affinity().unwrap();
        }
        fn poll(&mut self) -> bool {
            self.polls.fetch_add(1, Ordering::SeqCst);
            false
        }
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// What a test watches of its [`Counter`] while the worker owns it.
    struct Probe {
        kick: EventFd,
        handled: Arc<AtomicUsize>,
        polls: Arc<AtomicUsize>,
        affinity: Arc<Mutex<Vec<usize>>>,
    }

    fn counter() -> (Counter, Probe) {
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let probe = Probe {
            kick: kick.try_clone().unwrap(),
            handled: Arc::new(AtomicUsize::new(0)),
            polls: Arc::new(AtomicUsize::new(0)),
            affinity: Arc::new(Mutex::new(Vec::new())),
        };
        let c = Counter {
            kick,
            handled: probe.handled.clone(),
            polls: probe.polls.clone(),
            affinity: probe.affinity.clone(),
        };
        (c, probe)
    }

    #[test]
    fn notify_mode_serves_kicks_and_stops() {
        let (
            c,
            Probe {
                kick,
                handled,
                polls,
                ..
            },
        ) = counter();
        let control = WorkerControl::new(Placement::default()).unwrap();
        let mut w = Worker::spawn("test", c, control.clone()).unwrap();
        wait_until("the worker thread", || control.thread_id().is_some());
        kick.write(1).unwrap();
        wait_until("one kick", || handled.load(Ordering::SeqCst) == 1);
        assert_eq!(polls.load(Ordering::SeqCst), 0, "notify mode must not poll");
        w.stop();
        assert_eq!(control.thread_id(), None);
    }

    #[test]
    fn poll_mode_polls_then_sleeps_and_placement_changes_at_runtime() {
        let (
            c,
            Probe {
                kick,
                handled,
                polls,
                affinity,
            },
        ) = counter();
        let control = WorkerControl::new(Placement::default()).unwrap();
        let _w = Worker::spawn("test", c, control.clone()).unwrap();
        control.set_wait_mode(WaitMode::Poll {
            spin: Duration::from_millis(20),
        });
        wait_until("polling", || polls.load(Ordering::SeqCst) > 10);
        // After the spin budget with no work it sleeps: polls stop growing.
        std::thread::sleep(Duration::from_millis(100));
        let settled = polls.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            polls.load(Ordering::SeqCst),
            settled,
            "an idle poller must go back to sleep"
        );

        let cpu = *current_affinity().unwrap().first().unwrap();
        control.set_cpus(Some(vec![cpu]));
        kick.write(1).unwrap();
        wait_until("the kick", || handled.load(Ordering::SeqCst) == 1);
        assert_eq!(*affinity.lock().unwrap(), vec![cpu]);
        assert!(control.last_error().is_none());

        control.set_cpus(Some(vec![100_000]));
        wait_until("the placement error", || control.last_error().is_some());
    }
}
