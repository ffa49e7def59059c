//! Requests and their results.

use kiln_devices::virtio::balloon::pressure::PressureReason;
use kiln_devices::virtio::balloon::BalloonStats;
use kiln_devices::virtio::net::NetStats;
use serde::{Deserialize, Serialize};

/// What a client can ask; `kind` names the request on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// → [`Status`]
    Status {},
    /// Parks every vCPU; → [`Status`].
    Pause {},
    /// Releases the vCPUs; → [`Status`].
    Resume {},
    /// Stops the VM; the VMM exits (code 5). → `{}`
    Stop {},
    /// Presses the ACPI power button; the guest decides what to do (the
    /// default guest powers off). → `{}`
    PowerButton {},
    /// MiB the balloon takes from the guest (0 deflates); → [`BalloonInfo`].
    SetBalloonTarget { mib: u64 },
    /// → [`BalloonInfo`]
    BalloonStats {},
    /// → `[`[`WorkerInfo`]`]`
    Workers {},
    /// → [`WorkerInfo`]. Flat, so `kiln vmm-ctl` can say
    /// `device=net0 cpus=[0] wait=poll spin_us=200`.
    SetWorkerPlacement {
        device: String,
        /// Host CPUs the worker may run on; absent or `null` means any.
        #[serde(default)]
        cpus: Option<Vec<usize>>,
        wait: WaitKind,
        /// With `poll`: how long to spin without work before sleeping
        /// (default 50 µs).
        #[serde(default)]
        spin_us: Option<u64>,
    },
    /// → [`Counters`]
    Counters {},
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: RunState,
    pub cpus: u32,
    pub memory_mib: u64,
    pub devices: Vec<DeviceInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: String,
    /// disk, net, vsock, console, balloon or rng.
    pub kind: String,
    /// Whether the device has an I/O worker to place.
    pub worker: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonInfo {
    pub target_mib: u64,
    /// What the guest driver says it has inflated.
    pub actual_mib: u64,
    /// What the device has taken back (our own count).
    pub inflated_mib: u64,
    /// The guest's latest statistics (sizes in bytes), if it sent any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<BalloonStats>,
    /// Times the VMM's pressure guard lowered the target by itself.
    #[serde(default)]
    pub guard_deflations: u64,
    /// MiB those steps took off the target.
    #[serde(default)]
    pub guard_released_mib: u64,
    /// Why the guard last stepped in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_guard_reason: Option<PressureReason>,
}

/// How an I/O worker waits for work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitKind {
    Notify,
    Poll,
}

/// Where a worker runs and how it waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerPlacement {
    /// Host CPUs the worker may run on; `None` means any.
    pub cpus: Option<Vec<usize>>,
    pub wait: WaitKind,
    /// With `poll`: spin time without work before sleeping (default 50 µs).
    pub spin_us: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub device: String,
    /// The worker thread's Linux thread id, while it runs.
    pub tid: Option<i32>,
    /// Host CPUs it may run on; `null` means any.
    pub cpus: Option<Vec<usize>>,
    pub wait: WaitKind,
    /// With `poll`: spin time without work before sleeping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spin_us: Option<u64>,
    /// Times the worker found work.
    pub busy_rounds: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub vcpus: Vec<VcpuCounters>,
    pub devices: Vec<DeviceCounters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonInfo>,
}

/// From `/proc/self/task/TID/schedstat`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuCounters {
    pub index: u32,
    pub tid: Option<i32>,
    /// Time on a host CPU.
    pub run_ns: u64,
    /// Time runnable but waiting for a host CPU.
    pub wait_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCounters {
    pub id: String,
    /// Times its I/O worker found work.
    pub busy_rounds: u64,
    /// virtio-net traffic, for net devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetStats>,
}
