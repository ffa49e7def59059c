//! What the engine sees: per VM and per vCPU counters, balloon statistics,
//! per-device I/O, and host memory and pressure. Counters are cumulative, as
//! the kernel and virtio-balloon report them; `features` turns them into rates.
//!
//! Sources implement [`TelemetrySource`]: the simulator and the live host
//! (`live::LiveHost`) feed the same engine.

use crate::host::Host;
use crate::trace::VmClass;
use serde::{Deserialize, Serialize};

/// One vCPU thread's `/proc/<pid>/task/<tid>/schedstat`: time on CPU, time
/// runnable but waiting on a run queue, and number of timeslices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct VcpuStat {
    pub cpu_time_ns: u64,
    pub wait_ns: u64,
    pub timeslices: u64,
}

/// virtio-balloon statistics (VIRTIO_BALLOON_S_*) plus the guest's OOM-kill
/// count (from the in-guest agent); counters are cumulative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BalloonStats {
    /// Memory the guest currently has (its size minus the balloon).
    pub actual_mib: f64,
    pub free_mib: f64,
    pub available_mib: f64,
    pub caches_mib: f64,
    pub major_faults: u64,
    pub minor_faults: u64,
    pub swap_in_mib: f64,
    pub swap_out_mib: f64,
    pub oom_kills: u64,
}

/// One device's request counter and summed latency (cumulative), and the
/// latency the device model measured at its 99th percentile since last sample.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceStat {
    pub name: String,
    pub requests: u64,
    pub latency_sum_us: f64,
    pub p99_us: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmTelemetry {
    pub id: String,
    pub class: VmClass,
    /// Memory the guest was started with (balloon fully deflated).
    pub mem_mib: f64,
    /// Hard lower bound for this guest's memory.
    pub floor_mib: f64,
    pub vcpus: Vec<VcpuStat>,
    pub balloon: BalloonStats,
    pub devices: Vec<DeviceStat>,
    /// The VM's own cgroup v2 group, when it has one (live hosts only).
    #[serde(default)]
    pub cgroup: Option<CgroupStat>,
}

/// What a VM's cgroup v2 group says: memory charged to it and its pressure.
/// Each file may be missing (a controller not enabled for the group).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CgroupStat {
    /// The group's directory.
    pub path: String,
    /// `memory.current`, MiB.
    #[serde(default)]
    pub memory_current_mib: Option<f64>,
    /// `memory.pressure`.
    #[serde(default)]
    pub memory_pressure: Option<Psi>,
    /// `cpu.pressure`.
    #[serde(default)]
    pub cpu_pressure: Option<Psi>,
}

/// `/proc/pressure/*` averages over 10 s, in percent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Psi {
    pub some_avg10: f64,
    pub full_avg10: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct HostTelemetry {
    pub mem_total_mib: f64,
    pub mem_available_mib: f64,
    pub psi_cpu: Psi,
    pub psi_memory: Psi,
    pub psi_io: Psi,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub t_s: f64,
    pub host: HostTelemetry,
    pub vms: Vec<VmTelemetry>,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {msg}")]
    Parse { path: String, msg: String },
    #[error("host topology: {0}")]
    Host(#[from] crate::host::HostError),
}

/// Anything that can describe the host and produce snapshots.
pub trait TelemetrySource {
    fn host(&self) -> &Host;
    fn sample(&mut self) -> Result<Snapshot, TelemetryError>;
}
