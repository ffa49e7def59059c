//! A running VM: [`RunningVm`] owns it (the run loop holds it), [`Vm`] is
//! the cheap-to-clone handle with typed methods that the control socket
//! (and later the daemon's policies) use.

mod builder;
mod schedstat;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_devices::legacy::SerialConsole;
use kiln_devices::virtio::worker::{current_affinity, Placement, WaitMode};
use kiln_devices::{ExitReason, VmLifecycle};
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use builder::build;

use crate::config::VmConfig;
use crate::cpu::vcpu::{self, PauseGate, VcpuThread};
use crate::devices::DeviceHandles;
use crate::protocol::{
    BalloonInfo, Counters, DeviceCounters, DeviceInfo, ErrorBody, ErrorCode, RunState, Status,
    VcpuCounters, WaitKind, WorkerInfo, WorkerPlacement,
};

/// Spin time of a poll-mode worker when none is given.
const DEFAULT_SPIN_US: u64 = 50;

/// Why a [`Vm`] request was refused.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("this VM has no balloon (start it with --balloon)")]
    NoBalloon,
    #[error("balloon target {mib} MiB must be below the guest's memory ({memory_mib} MiB)")]
    BalloonTargetTooLarge { mib: u64, memory_mib: u64 },
    #[error("balloon: {0}")]
    Balloon(#[from] kiln_devices::virtio::balloon::BalloonError),
    #[error("no device {0:?}")]
    NoDevice(String),
    #[error("device {0:?} has no I/O worker")]
    NoWorker(String),
    #[error("CPU {cpu} is not available to this VMM (allowed: {allowed:?})")]
    NoSuchCpu { cpu: usize, allowed: Vec<usize> },
    #[error("an empty CPU list leaves the worker nowhere to run (use null for any CPU)")]
    EmptyCpuList,
    #[error("spin_us is only for wait=poll")]
    SpinWithoutPoll,
    #[error("cannot read this VMM's CPU affinity: {0}")]
    Affinity(#[source] std::io::Error),
    #[error("{device}: {message}")]
    Placement { device: String, message: String },
    #[error("the VM is stopping")]
    Stopping,
    #[error("this VM has no ACPI power button")]
    NoPowerButton,
    #[error("pressing the power button: {0}")]
    PowerButton(#[source] std::io::Error),
}

impl VmError {
    /// The protocol's error for this.
    pub fn to_error_body(&self) -> ErrorBody {
        let code = match self {
            VmError::NoBalloon | VmError::NoWorker(_) | VmError::NoPowerButton => {
                ErrorCode::Unsupported
            }
            VmError::NoDevice(_) => ErrorCode::NotFound,
            VmError::Affinity(_) | VmError::Placement { .. } | VmError::PowerButton(_) => {
                ErrorCode::Internal
            }
            _ => ErrorCode::InvalidRequest,
        };
        ErrorBody::new(code, self.to_string())
    }
}

/// The serial port's parts the run loop needs (input and output flushing).
pub struct SerialParts {
    pub console: Arc<Mutex<SerialConsole>>,
    /// Fires when the guest drained the serial receive FIFO.
    pub rx_room: EventFd,
    /// Fires when console output holds a partial line to flush.
    pub flush: EventFd,
}

/// What the owner and every handle share.
struct VmShared {
    lifecycle: Arc<VmLifecycle>,
    stop: Arc<AtomicBool>,
    gate: Arc<PauseGate>,
    handles: DeviceHandles,
    devices: Vec<DeviceInfo>,
    cpus: u32,
    memory_mib: u64,
    /// The vCPU threads while the VM runs (pause kicks them).
    threads: Mutex<Vec<VcpuThread>>,
}

impl VmShared {
    fn new(lifecycle: Arc<VmLifecycle>, handles: DeviceHandles, config: &VmConfig) -> VmShared {
        let devices = device_infos(config, &handles);
        VmShared {
            lifecycle,
            stop: Arc::new(AtomicBool::new(false)),
            gate: Arc::new(PauseGate::default()),
            handles,
            devices,
            cpus: config.cpus,
            memory_mib: config.memory_mib,
            threads: Mutex::new(Vec::new()),
        }
    }
}

fn device_infos(config: &VmConfig, handles: &DeviceHandles) -> Vec<DeviceInfo> {
    let kinds = config
        .disks
        .iter()
        .map(|_| "disk")
        .chain(config.nets.iter().map(|_| "net"))
        .chain(config.vsock.iter().map(|_| "vsock"))
        .chain(config.console.iter().map(|_| "console"))
        .chain(config.balloon.iter().map(|_| "balloon"))
        .chain(config.rng.iter().map(|_| "rng"));
    config
        .device_ids()
        .into_iter()
        .zip(kinds)
        .map(|(id, kind)| DeviceInfo {
            worker: handles.worker(&id).is_some(),
            id,
            kind: kind.into(),
        })
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A VM whose vCPUs run; dropping it (or [`RunningVm::stop`]) ends them.
pub struct RunningVm {
    shared: Arc<VmShared>,
    pub serial: SerialParts,
    // Kept alive for as long as the vCPUs run; the PCI root (inside the
    // buses) owns the devices.
    _vm: Arc<VmFd>,
    _memory: Arc<GuestMemoryMmap>,
}

impl RunningVm {
    fn new(
        shared: Arc<VmShared>,
        serial: SerialParts,
        threads: Vec<VcpuThread>,
        vm: Arc<VmFd>,
        memory: Arc<GuestMemoryMmap>,
    ) -> RunningVm {
        *lock(&shared.threads) = threads;
        RunningVm {
            shared,
            serial,
            _vm: vm,
            _memory: memory,
        }
    }

    /// The handle for controllers.
    pub fn handle(&self) -> Vm {
        Vm {
            shared: self.shared.clone(),
        }
    }

    pub fn lifecycle(&self) -> &Arc<VmLifecycle> {
        &self.shared.lifecycle
    }

    /// Stops every vCPU thread (parked ones too); the VM's resources are
    /// freed on drop.
    pub fn stop(self) {
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        vcpu::stop_all(threads, &self.shared.stop, &self.shared.gate);
        lock(&self.serial.console).flush();
    }
}

/// A handle to a running VM; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Vm {
    shared: Arc<VmShared>,
}

impl Vm {
    /// A handle over devices with no KVM VM and no vCPUs behind it, for
    /// unit tests of the handle's callers.
    #[cfg(test)]
    pub(crate) fn without_vcpus(config: &VmConfig, handles: DeviceHandles) -> Vm {
        let lifecycle = Arc::new(VmLifecycle::new().expect("eventfd"));
        Vm {
            shared: Arc::new(VmShared::new(lifecycle, handles, config)),
        }
    }

    /// Whether [`Vm::stop`] (or the guest) ended the VM.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.shared.lifecycle.exit_reason()
    }

    fn check_running(&self) -> Result<(), VmError> {
        if self.shared.lifecycle.is_stopping() {
            return Err(VmError::Stopping);
        }
        Ok(())
    }

    pub fn status(&self) -> Status {
        Status {
            state: if self.shared.gate.is_closed() {
                RunState::Paused
            } else {
                RunState::Running
            },
            cpus: self.shared.cpus,
            memory_mib: self.shared.memory_mib,
            devices: self.shared.devices.clone(),
        }
    }

    /// Parks every vCPU outside KVM_RUN; returns once all are parked.
    /// Pausing a paused VM is a no-op.
    pub fn pause(&self) -> Result<Status, VmError> {
        self.check_running()?;
        self.shared.gate.pause(&lock(&self.shared.threads));
        Ok(self.status())
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) -> Result<Status, VmError> {
        self.check_running()?;
        self.shared.gate.resume();
        Ok(self.status())
    }

    /// Asks the run loop to stop the VM (the VMM then exits with code 5).
    pub fn stop(&self) {
        self.shared.lifecycle.request_exit(ExitReason::Stopped);
    }

    /// Presses the ACPI power button: an event for the guest, which may
    /// power off, ignore it, or not have booted far enough to notice.
    pub fn power_button(&self) -> Result<(), VmError> {
        self.check_running()?;
        let button = self
            .shared
            .handles
            .power_button
            .as_ref()
            .ok_or(VmError::NoPowerButton)?;
        button.press_power_button().map_err(VmError::PowerButton)
    }

    fn balloon(&self) -> Result<&kiln_devices::virtio::balloon::BalloonControl, VmError> {
        self.shared
            .handles
            .balloon
            .as_ref()
            .ok_or(VmError::NoBalloon)
    }

    /// Asks the guest to give `mib` MiB to the balloon; below guest memory.
    pub fn set_balloon_target(&self, mib: u64) -> Result<BalloonInfo, VmError> {
        let balloon = self.balloon()?;
        if mib >= self.shared.memory_mib {
            return Err(VmError::BalloonTargetTooLarge {
                mib,
                memory_mib: self.shared.memory_mib,
            });
        }
        balloon.set_target_mib(mib)?;
        self.balloon_stats()
    }

    pub fn balloon_stats(&self) -> Result<BalloonInfo, VmError> {
        let b = self.balloon()?;
        let guard = b.guard_counters();
        Ok(BalloonInfo {
            target_mib: b.target_mib(),
            actual_mib: b.actual_mib(),
            inflated_mib: (b.inflated_pages() * 4096) >> 20,
            stats: b.stats(),
            guard_deflations: guard.deflations,
            guard_released_mib: guard.released_mib,
            last_guard_reason: guard.last_reason,
        })
    }

    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.shared
            .handles
            .workers
            .iter()
            .map(|(name, w)| worker_info(name, w))
            .collect()
    }

    /// Moves `device`'s I/O worker. Every CPU must be one this VMM may run
    /// on (its `sched_getaffinity`).
    pub fn set_worker_placement(
        &self,
        device: &str,
        placement: WorkerPlacement,
    ) -> Result<WorkerInfo, VmError> {
        if !self.shared.devices.iter().any(|d| d.id == device) {
            return Err(VmError::NoDevice(device.into()));
        }
        let control = self
            .shared
            .handles
            .worker(device)
            .ok_or_else(|| VmError::NoWorker(device.into()))?;
        if let Some(cpus) = &placement.cpus {
            if cpus.is_empty() {
                return Err(VmError::EmptyCpuList);
            }
            let allowed = current_affinity().map_err(VmError::Affinity)?;
            if let Some(&cpu) = cpus.iter().find(|c| !allowed.contains(c)) {
                return Err(VmError::NoSuchCpu { cpu, allowed });
            }
        }
        let wait = match (placement.wait, placement.spin_us) {
            (WaitKind::Notify, None) => WaitMode::Notify,
            (WaitKind::Notify, Some(_)) => return Err(VmError::SpinWithoutPoll),
            (WaitKind::Poll, spin) => WaitMode::Poll {
                spin: Duration::from_micros(spin.unwrap_or(DEFAULT_SPIN_US)),
            },
        };
        control.set_placement(Placement {
            cpus: placement.cpus,
            wait,
        });
        // The worker applies it on its next wake-up, which is now.
        std::thread::sleep(Duration::from_millis(20));
        if let Some(message) = control.last_error() {
            return Err(VmError::Placement {
                device: device.into(),
                message,
            });
        }
        Ok(worker_info(device, control))
    }

    /// vCPU run and wait times, per-device counters, balloon statistics.
    pub fn counters(&self) -> Counters {
        let tids: Vec<Option<i32>> = lock(&self.shared.threads)
            .iter()
            .map(VcpuThread::tid)
            .collect();
        let vcpus = tids
            .into_iter()
            .enumerate()
            .map(|(index, tid)| {
                let times = tid.and_then(schedstat::of_thread).unwrap_or_default();
                VcpuCounters {
                    index: index as u32,
                    tid,
                    run_ns: times.run_ns,
                    wait_ns: times.wait_ns,
                }
            })
            .collect();
        let devices = self
            .shared
            .handles
            .workers
            .iter()
            .map(|(id, w)| DeviceCounters {
                id: id.clone(),
                busy_rounds: w.busy_rounds(),
                net: self
                    .shared
                    .handles
                    .nets
                    .iter()
                    .find(|(n, _)| n == id)
                    .map(|(_, r)| r.stats()),
            })
            .collect();
        Counters {
            vcpus,
            devices,
            balloon: self.balloon_stats().ok(),
        }
    }
}

fn worker_info(name: &str, w: &kiln_devices::virtio::worker::WorkerControl) -> WorkerInfo {
    let p = w.placement();
    let (wait, spin_us) = match p.wait {
        WaitMode::Notify => (WaitKind::Notify, None),
        WaitMode::Poll { spin } => (WaitKind::Poll, Some(spin.as_micros() as u64)),
    };
    WorkerInfo {
        device: name.into(),
        tid: w.thread_id(),
        cpus: p.cpus,
        wait,
        spin_us,
        busy_rounds: w.busy_rounds(),
    }
}
