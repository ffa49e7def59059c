//! One thread per vCPU (`kiln-vcpu-N`), running KVM_RUN and dispatching
//! port I/O and MMIO exits to the buses.
//!
//! Stopping: the VMM sets the shared stop flag and sends `SIGRTMIN` to each
//! thread until it exits; the signal makes KVM_RUN return `EINTR`. A kick
//! that lands just before KVM_RUN is entered is covered by the next one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
}

/// Starts vCPU `index` on its own thread.
pub fn spawn(
    index: u8,
    vcpu: VcpuFd,
    bus: Arc<PioBus>,
    mmio: Arc<MmioBus>,
    lifecycle: Arc<VmLifecycle>,
    stop: Arc<AtomicBool>,
) -> Result<VcpuThread> {
    let handle = std::thread::Builder::new()
        .name(format!("kiln-vcpu-{index}"))
        .spawn(move || run_loop(index, vcpu, &bus, &mmio, &lifecycle, &stop))
        .with_context(|| format!("cannot start thread for vCPU {index}"))?;
    Ok(VcpuThread { handle })
}

/// Kicks every thread until all have returned.
pub fn stop_all(threads: Vec<VcpuThread>, stop: &AtomicBool) {
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        while !t.handle.is_finished() {
            let _ = t.handle.kill(kick_signal());
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
) {
    let mut unhandled_logged = false;
    while !stop.load(Ordering::SeqCst) {
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
