//! The API's typed models (everything but the VM spec, which is in `spec`).
//! Field names and enums here are the wire form; `api/openapi.yaml` mirrors
//! them and the contract test checks that they agree.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `GET /v1/ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// The daemon's version (its crate version).
    pub version: String,
    /// The API's version: the `v1` of the paths.
    pub api: String,
}

/// A VM's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Defined, never started (or started and deleted its run state).
    Defined,
    /// Its VMM is being started.
    Starting,
    Running,
    Paused,
    /// Stopped cleanly: powered off, stopped by a request, or shut down.
    Shutoff,
    /// Its VMM died without a clean exit, or could not start.
    Crashed,
}

impl VmState {
    /// Whether a VMM process belongs to the VM in this state.
    pub fn is_active(self) -> bool {
        matches!(self, VmState::Starting | VmState::Running | VmState::Paused)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Defined => "defined",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Shutoff => "shutoff",
            VmState::Crashed => "crashed",
        }
    }

    pub const ALL: [VmState; 6] = [
        VmState::Defined,
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Shutoff,
        VmState::Crashed,
    ];
}

/// Why a VMM stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitKind {
    /// The guest powered off.
    Poweroff,
    /// The guest rebooted.
    Reboot,
    /// The VMM failed or the guest crashed.
    Crash,
    /// The VMM was stopped by a request (stop, or shutdown's hard stop).
    Stopped,
}

/// One restart the daemon made under the VM's restart policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartRecord {
    /// Unix time in milliseconds when the VMM was started again.
    pub time_ms: u64,
    /// What the previous run ended with.
    pub after: ExitKind,
    /// The back-off waited before this restart.
    pub delay_ms: u64,
}

/// A VM's live status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub state: VmState,
    /// The VMM's pid while one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// How the last run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitKind>,
    /// A human-readable reason for the current state (e.g. why it crashed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Restarts under the restart policy, oldest first (the last 32 kept).
    pub restarts: Vec<RestartRecord>,
}

/// One cache a CPU uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuCache {
    pub level: u32,
    /// data, instruction or unified.
    #[serde(rename = "type")]
    pub kind: String,
    pub size_kib: u64,
    /// The CPUs that share this cache (ids).
    pub shared_with: Vec<u32>,
}

/// One logical CPU of the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCpu {
    pub id: u32,
    pub core: u32,
    pub package: u32,
    /// The NUMA node, when the host reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    pub caches: Vec<CpuCache>,
}

/// What `/dev/kvm` is on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmMode {
    /// Hardware virtualization (vmx/svm): guests run directly.
    Hardware,
    /// KVM without hardware virtualization (kvm_pvm): stock kernels do not boot.
    Emulating,
    /// No /dev/kvm.
    None,
}

/// What is left for new VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Host memory minus the memory of VMs that run (never below 0;
    /// the sum of all VMs may exceed the host: overcommit is the balloon's job).
    pub memory_bytes_left: u64,
    /// vCPUs of running VMs.
    pub vcpus_running: u32,
    /// VMs defined, and of those running.
    pub vms_defined: u32,
    pub vms_running: u32,
}

/// `GET /v1/host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub cpus: Vec<HostCpu>,
    /// NUMA node ids (empty when the host reports none).
    pub numa_nodes: Vec<u32>,
    pub memory_bytes: u64,
    pub memory_available_bytes: u64,
    pub kvm: KvmMode,
    pub capacity: Capacity,
}

/// The kind of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// The daemon started (its sequence numbers carry on).
    DaemonStarted,
    VmDefined,
    VmUpdated,
    VmDeleted,
    /// The VM changed state (`state` is the new one).
    StateChanged,
    /// The VMM died without a clean exit.
    Crashed,
    /// The restart policy decided what to do with an ended run.
    PolicyDecision,
    /// The daemon started a VM again under its restart policy.
    Restarted,
    /// A running VMM was taken over after a daemon restart.
    Adopted,
}

impl EventType {
    pub const ALL: [EventType; 9] = [
        EventType::DaemonStarted,
        EventType::VmDefined,
        EventType::VmUpdated,
        EventType::VmDeleted,
        EventType::StateChanged,
        EventType::Crashed,
        EventType::PolicyDecision,
        EventType::Restarted,
        EventType::Adopted,
    ];
}

/// One line of `GET /v1/events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increases by one per event, across daemon restarts.
    pub seq: u64,
    /// Unix time in milliseconds.
    pub time_ms: u64,
    #[serde(rename = "type")]
    pub kind: EventType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// The VM's state after the event, for state changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<VmState>,
    pub message: String,
}

/// `PUT /v1/vms/{id}/balloon`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonTarget {
    /// Guest memory the balloon should hold back, in MiB.
    pub target_mib: u64,
}

/// How a shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownOutcome {
    /// The guest powered off after the power button.
    Graceful,
    /// The guest did not power off in time; the VMM was stopped.
    Forced,
}

/// The result of an action (`POST /v1/vms/{id}/start|stop|...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionResult {
    pub vm: String,
    pub action: String,
    /// The VM's state after the action.
    pub state: VmState,
    /// For shutdown: graceful or forced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<ShutdownOutcome>,
}

/// Labels: small string-to-string map.
pub type Labels = BTreeMap<String, String>;
