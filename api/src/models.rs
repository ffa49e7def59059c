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
    /// A shutdown (or reboot) pressed the power button and waits for the
    /// guest to power off, or for its timeout and the hard stop.
    Stopping,
}

impl VmState {
    /// Whether a VMM process belongs to the VM in this state.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Defined => "defined",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Shutoff => "shutoff",
            VmState::Crashed => "crashed",
            VmState::Stopping => "stopping",
        }
    }

    pub const ALL: [VmState; 7] = [
        VmState::Defined,
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Shutoff,
        VmState::Crashed,
        VmState::Stopping,
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

/// One restart the daemon made: under the VM's restart policy, or for a
/// reboot request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartRecord {
    /// Unix time in milliseconds when the VMM was started again.
    pub time_ms: u64,
    /// What the previous run ended with.
    pub after: ExitKind,
    /// The back-off waited before this restart (0 for a request).
    pub delay_ms: u64,
    /// Who asked for it (records from before this field: the policy).
    #[serde(default)]
    pub cause: RestartCause,
}

/// Why the daemon started a VM again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartCause {
    /// The restart policy (`on_poweroff`, `on_reboot`, `on_crash`).
    #[default]
    Policy,
    /// `POST /v1/vms/{id}/reboot`.
    Request,
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
    /// A requested shutdown (or the shutdown half of a reboot) ended:
    /// the message says graceful or forced.
    Shutdown,
    /// The policy engine decided something for the VM (the message is the
    /// action and the reason; the audit has the rest).
    EngineDecision,
}

impl EventType {
    pub const ALL: [EventType; 11] = [
        EventType::DaemonStarted,
        EventType::VmDefined,
        EventType::VmUpdated,
        EventType::VmDeleted,
        EventType::StateChanged,
        EventType::Crashed,
        EventType::PolicyDecision,
        EventType::Restarted,
        EventType::Adopted,
        EventType::Shutdown,
        EventType::EngineDecision,
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

/// Longest poll-mode spin `PUT /v1/vms/{id}/devices/{dev}/worker` accepts.
pub const MAX_SPIN_US: u64 = 1_000_000;

/// `PUT /v1/vms/{id}/devices/{dev}/worker`: where a device's I/O worker
/// runs and how it waits. The answer is the VMM's `WorkerInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerPlacement {
    /// Host CPUs the worker may run on; absent or null means any.
    #[serde(default)]
    pub cpus: Option<Vec<usize>>,
    pub wait: kiln_vmm::protocol::WaitKind,
    /// With `poll`: µs to spin without work before sleeping (VMM default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spin_us: Option<u64>,
}

impl WorkerPlacement {
    /// What makes no sense whatever the VMM's CPUs: an empty or repeated
    /// CPU list, a spin without poll, an endless spin. (CPUs the VMM may
    /// not use are its to refuse.)
    pub fn problem(&self) -> Option<String> {
        use kiln_vmm::protocol::WaitKind;
        if let Some(cpus) = &self.cpus {
            if cpus.is_empty() {
                return Some(
                    "cpus: an empty list leaves the worker nowhere to run (null means any CPU)"
                        .into(),
                );
            }
            let mut seen = std::collections::BTreeSet::new();
            if let Some(dup) = cpus.iter().find(|c| !seen.insert(**c)) {
                return Some(format!("cpus: CPU {dup} is listed twice"));
            }
        }
        match (self.wait, self.spin_us) {
            (WaitKind::Notify, Some(_)) => Some("spin_us is only for wait=poll".into()),
            (WaitKind::Poll, Some(us)) if us > MAX_SPIN_US => {
                Some(format!("spin_us: {us} is above {MAX_SPIN_US} (1 s)"))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_vmm::protocol::WaitKind;

    fn placement(json: &str) -> Result<WorkerPlacement, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn worker_placements_that_make_no_sense_are_refused() {
        let ok = placement(r#"{"cpus":[0,1],"wait":"poll","spin_us":200}"#).unwrap();
        assert_eq!(ok.problem(), None);
        assert_eq!(ok.wait, WaitKind::Poll);
        assert_eq!(placement(r#"{"wait":"notify"}"#).unwrap().problem(), None);
        assert_eq!(
            placement(r#"{"cpus":null,"wait":"notify"}"#).unwrap().cpus,
            None
        );
        for (body, needle) in [
            (r#"{"cpus":[],"wait":"notify"}"#, "empty"),
            (r#"{"cpus":[1,1],"wait":"notify"}"#, "twice"),
            (r#"{"wait":"notify","spin_us":5}"#, "only for wait=poll"),
            (r#"{"wait":"poll","spin_us":2000000}"#, "above"),
        ] {
            let why = placement(body).unwrap().problem().expect(body);
            assert!(why.contains(needle), "{body}: {why}");
        }
        for bad in [
            r#"{"cpus":[0]}"#,
            r#"{"wait":"busy"}"#,
            r#"{"wait":"poll","colour":1}"#,
            r#"{"cpus":[-1],"wait":"poll"}"#,
        ] {
            assert!(placement(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stopping_is_active_and_old_restart_records_were_the_policys() {
        assert!(VmState::Stopping.is_active());
        assert_eq!(VmState::Stopping.as_str(), "stopping");
        let r: RestartRecord =
            serde_json::from_str(r#"{"time_ms":1,"after":"crash","delay_ms":500}"#).unwrap();
        assert_eq!(r.cause, RestartCause::Policy);
    }
}
