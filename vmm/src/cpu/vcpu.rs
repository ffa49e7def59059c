//! One thread per vCPU (`kiln-vcpu-N`), running KVM_RUN and dispatching
//! port I/O and MMIO exits to the buses.
//!
//! Stopping: the VMM sets the shared stop flag and sends `SIGRTMIN` to each
//! thread until it exits; the signal makes KVM_RUN return `EINTR`. A kick
//! that lands just before KVM_RUN is entered is covered by the next one.
//! Pausing works the same way: the [`PauseGate`] is closed and threads are
//! kicked until each one is parked on it, outside KVM_RUN.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use kiln_devices::{ExitReason, MmioBus, PioBus, VmLifecycle};
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// Signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn ignore_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process. Without a handler
/// the signal would kill the process.
pub fn install_kick_handler() -> Result<()> {
    register_signal_handler(kick_signal(), ignore_kick)
        .context("installing the vCPU kick signal handler")
}

pub struct VcpuThread {
    handle: JoinHandle<()>,
    /// The thread's Linux thread id, 0 until it has started.
    tid: Arc<AtomicI32>,
}

impl VcpuThread {
    pub fn tid(&self) -> Option<i32> {
        Some(self.tid.load(Ordering::Relaxed)).filter(|t| *t != 0)
    }

    fn kick(&self) {
        let _ = self.handle.kill(kick_signal());
    }
}

/// Where vCPU threads park while the VM is paused.
#[derive(Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    closed: bool,
    parked: usize,
}

impl PauseGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by a vCPU thread between KVM_RUNs: waits while the gate is
    /// closed (and the VM not stopping).
    fn wait_open(&self, stop: &AtomicBool) {
        let mut state = self.lock();
        if !state.closed {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.closed && !stop.load(Ordering::SeqCst) {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.parked -= 1;
        self.changed.notify_all();
    }

    /// Closes the gate and kicks `threads` until every one is parked.
    pub fn pause(&self, threads: &[VcpuThread]) {
        self.lock().closed = true;
        loop {
            let parked = self.lock().parked;
            let running = threads.iter().filter(|t| !t.handle.is_finished()).count();
            if parked >= running {
                return;
            }
            threads.iter().for_each(VcpuThread::kick);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Opens the gate: parked threads go back into KVM_RUN.
    pub fn resume(&self) {
        self.lock().closed = false;
        self.changed.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Wakes parked threads so they see the stop flag.
    fn wake(&self) {
        let _guard = self.lock();
        self.changed.notify_all();
    }
}

/// Starts vCPU `index` on its own thread.
pub fn spawn(
    index: u8,
    vcpu: VcpuFd,
    bus: Arc<PioBus>,
    mmio: Arc<MmioBus>,
    lifecycle: Arc<VmLifecycle>,
    stop: Arc<AtomicBool>,
    gate: Arc<PauseGate>,
) -> Result<VcpuThread> {
    let tid = Arc::new(AtomicI32::new(0));
    let own_tid = tid.clone();
    let handle = std::thread::Builder::new()
        .name(format!("kiln-vcpu-{index}"))
        .spawn(move || {
            // SAFETY: gettid has no preconditions.
            own_tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
            run_loop(index, vcpu, &bus, &mmio, &lifecycle, &stop, &gate)
        })
        .with_context(|| format!("cannot start thread for vCPU {index}"))?;
    Ok(VcpuThread { handle, tid })
}

/// Kicks every thread until all have returned.
pub fn stop_all(threads: Vec<VcpuThread>, stop: &AtomicBool, gate: &PauseGate) {
    stop.store(true, Ordering::SeqCst);
    gate.wake();
    for t in threads {
        while !t.handle.is_finished() {
            t.kick();
            gate.wake();
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = t.handle.join();
    }
}

fn run_loop(
    index: u8,
    mut vcpu: VcpuFd,
    bus: &PioBus,
    mmio: &MmioBus,
    lifecycle: &VmLifecycle,
    stop: &AtomicBool,
    gate: &PauseGate,
) {
    let mut unhandled_logged = false;
    while !stop.load(Ordering::SeqCst) {
        gate.wait_open(stop);
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => {
                lifecycle.request_exit(ExitReason::VmmError(format!(
                    "KVM_RUN on vCPU {index} failed: {e}"
                )));
                return;
            }
        };
        let fatal = match exit {
            VcpuExit::IoIn(port, data) => {
                bus.read(port, data);
                None
            }
            VcpuExit::IoOut(port, data) => {
                tracing::trace!("vCPU {index}: out {port:#x} <- {data:x?}");
                bus.write(port, data);
                None
            }
            VcpuExit::MmioRead(addr, data) => {
                mmio.read(addr, data);
                None
            }
            VcpuExit::MmioWrite(addr, data) => {
                mmio.write(addr, data);
                None
            }
            VcpuExit::SystemEvent(kind, _) => Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                KVM_SYSTEM_EVENT_CRASH => crash(&vcpu, index, "the guest reported a crash"),
                other => crash(&vcpu, index, &format!("unknown system event {other}")),
            }),
            VcpuExit::Shutdown => Some(crash(&vcpu, index, "triple fault")),
            VcpuExit::InternalError => {
                let detail = internal_error_detail(&mut vcpu);
                Some(crash(
                    &vcpu,
                    index,
                    &format!("KVM internal error ({detail})"),
                ))
            }
            VcpuExit::FailEntry(reason, cpu) => Some(crash(
                &vcpu,
                index,
                &format!("VM entry failed (hardware reason {reason:#x} on host CPU {cpu})"),
            )),
            VcpuExit::Hlt => Some(crash(
                &vcpu,
                index,
                "vCPU halted outside the in-kernel LAPIC",
            )),
            other => {
                if !unhandled_logged {
                    tracing::warn!("vCPU {index}: ignoring unexpected exit {other:?}");
                    unhandled_logged = true;
                }
                None
            }
        };
        if let Some(reason) = fatal {
            lifecycle.request_exit(reason);
            return;
        }
    }
}

fn internal_error_detail(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
    // active union member.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    format!("suberror {}", internal.suberror)
}

/// Builds the crash report: what happened and the vCPU's registers.
fn crash(vcpu: &VcpuFd, index: u8, what: &str) -> ExitReason {
    let mut text = format!("vCPU {index}: {what}");
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => {
            text.push_str(&format!(
                "\n  rip={:#018x} rsp={:#018x} rflags={:#010x}\n  \
                 rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  \
                 rsi={:#018x} rdi={:#018x} rbp={:#018x}\n  \
                 r8 ={:#018x} r9 ={:#018x} r10={:#018x} r11={:#018x}\n  \
                 r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}\n  \
                 cr0={:#018x} cr2={:#018x} cr3={:#018x} cr4={:#018x} efer={:#x}\n  \
                 cs={:#06x} (base {:#x}, l={}) ss={:#06x} ds={:#06x}",
                r.rip,
                r.rsp,
                r.rflags,
                r.rax,
                r.rbx,
                r.rcx,
                r.rdx,
                r.rsi,
                r.rdi,
                r.rbp,
                r.r8,
                r.r9,
                r.r10,
                r.r11,
                r.r12,
                r.r13,
                r.r14,
                r.r15,
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer,
                s.cs.selector,
                s.cs.base,
                s.cs.l,
                s.ss.selector,
                s.ds.selector,
            ));
        }
        (Err(e), _) | (_, Err(e)) => text.push_str(&format!(" (registers unavailable: {e})")),
    }
    ExitReason::Crash(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// Threads that loop through the gate the way vCPU threads do.
    fn fake_vcpus(
        n: usize,
        gate: &Arc<PauseGate>,
        stop: &Arc<AtomicBool>,
    ) -> (Vec<VcpuThread>, Arc<AtomicU64>) {
        let rounds = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|_| {
                let (gate, stop, rounds) = (gate.clone(), stop.clone(), rounds.clone());
                let handle = std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        gate.wait_open(&stop);
                        rounds.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                });
                VcpuThread {
                    handle,
                    tid: Arc::new(AtomicI32::new(0)),
                }
            })
            .collect();
        (threads, rounds)
    }

    #[test]
    fn paused_threads_make_no_progress_until_resumed_and_stop_while_paused() {
        install_kick_handler().unwrap();
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (threads, rounds) = fake_vcpus(3, &gate, &stop);
        std::thread::sleep(Duration::from_millis(20));
        gate.pause(&threads);
        assert!(gate.is_closed());
        let parked = rounds.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        // At most one round per thread finishing as the gate closed.
        assert!(rounds.load(Ordering::SeqCst) <= parked + 3);
        let settled = rounds.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(rounds.load(Ordering::SeqCst), settled, "paused threads ran");
        gate.resume();
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            rounds.load(Ordering::SeqCst) > settled,
            "resumed threads did not run"
        );
        gate.pause(&threads);
        stop_all(threads, &stop, &gate);
    }
}
