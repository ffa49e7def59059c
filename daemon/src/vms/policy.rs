//! What the policy engine needs of the VM table: the running VMs with
//! their VMM's pid, control socket and cgroup, and a VM's own policy
//! (kept in its definition, changeable while it runs).

use kiln_api::engine::VmPolicy;
use kiln_api::{ApiError, ErrorCode, EventType, VmState};

use super::Manager;
use crate::http::Failure;
use crate::policy::telemetry::Target;
use crate::rundir::RunDir;

impl Manager {
    /// The VMs whose VMM runs and is not paused.
    pub async fn policy_targets(&self) -> Vec<Target> {
        let vms = self.vms.lock().await;
        vms.iter()
            .filter(|(_, e)| e.status.state == VmState::Running)
            .filter_map(|(name, e)| {
                Some(Target {
                    name: name.clone(),
                    pid: e.run.as_ref()?.pid,
                    memory_mib: e.spec.machine.memory_mib,
                    policy: e.spec.policy.clone(),
                    control: RunDir::new(&self.config.run_dir, name).control_socket(),
                    cgroup: self.cgroups.group(name),
                })
            })
            .collect()
    }

    /// Replaces a VM's policy in its definition (durable before this
    /// returns); it takes effect at the next control round.
    pub async fn set_vm_policy(&self, name: &str, policy: VmPolicy) -> Result<VmPolicy, Failure> {
        let mut vms = self.vms.lock().await;
        let entry = vms
            .get_mut(name)
            .ok_or_else(|| ApiError::vm_not_found(name))?;
        let problems = policy.problems(entry.spec.machine.memory_mib);
        if !problems.is_empty() {
            return Err(Failure(
                ApiError::new(ErrorCode::InvalidRequest, "invalid VM policy").with_causes(problems),
            ));
        }
        let mut spec = entry.spec.clone();
        spec.policy = policy.clone();
        self.definitions
            .put(name, &spec)
            .map_err(|e| Failure::internal("cannot store the VM definition", &e))?;
        entry.spec = spec;
        self.events.emit(
            EventType::VmUpdated,
            Some(name),
            Some(entry.status.state),
            "policy replaced",
        );
        Ok(policy)
    }
}
