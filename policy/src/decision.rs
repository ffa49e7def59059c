//! Decisions as data: what the engine asks the host to do. The simulator and
//! (in a later issue) the VMM control channel both consume these.

use crate::util::CpuSet;
use serde::{Deserialize, Serialize};

/// Where one vCPU thread may run and its CPU share (1.0 = the default weight,
/// like cgroup cpu.weight 100).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuPlacement {
    pub cpus: CpuSet,
    pub weight: f64,
    /// No other VM's vCPU or I/O worker may use these CPUs.
    pub exclusive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// The worker sleeps until the guest kicks the queue (eventfd).
    Notify,
    /// The worker busy-polls the queue: lower latency, burns its CPU.
    Poll,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DevicePlacement {
    pub cpus: CpuSet,
    pub mode: IoMode,
}

/// Everything decided for one VM in one round; `None` leaves a lever alone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmActions {
    pub vcpus: Option<Vec<VcpuPlacement>>,
    pub balloon_target_mib: Option<f64>,
    /// (device name, placement)
    pub devices: Vec<(String, DevicePlacement)>,
}

/// One round of decisions, indexed like the snapshot's VMs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Actions {
    pub vms: Vec<VmActions>,
}

impl Actions {
    pub fn none(n: usize) -> Actions {
        Actions {
            vms: vec![VmActions::default(); n],
        }
    }
}

/// What is currently in force for a VM (the actuators' state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    pub vcpus: Vec<VcpuPlacement>,
    pub balloon_target_mib: f64,
    pub devices: Vec<(String, DevicePlacement)>,
}
