//! Placement of a device's I/O worker (host CPUs, notify or poll wait)
//! through the VMM protocol's `workers` and `set_worker_placement`.

use kiln_api::{ErrorCode, WorkerPlacement};
use kiln_vmm::protocol::{self as ctl, Request, WorkerInfo};

use super::Manager;
use crate::http::Failure;

impl Manager {
    /// Where `device`'s worker runs and how it waits.
    pub async fn worker(&self, name: &str, device: &str) -> Result<WorkerInfo, Failure> {
        let workers: Vec<WorkerInfo> =
            Self::decode(self.control(name, Request::Workers {}).await?)?;
        if let Some(w) = workers.into_iter().find(|w| w.device == device) {
            return Ok(w);
        }
        // Not a worker: a device without one, or no such device.
        let status: ctl::Status = Self::decode(self.control(name, Request::Status {}).await?)?;
        Err(no_worker(name, device, &status))
    }

    /// Moves `device`'s worker. The VMM refuses CPUs outside its affinity
    /// mask (422 `vmm_refused`) and devices it lacks (404).
    pub async fn set_worker(
        &self,
        name: &str,
        device: &str,
        placement: WorkerPlacement,
    ) -> Result<WorkerInfo, Failure> {
        if let Some(why) = placement.problem() {
            return Err(Failure::new(ErrorCode::InvalidRequest, why));
        }
        let request = Request::SetWorkerPlacement {
            device: device.to_owned(),
            cpus: placement.cpus,
            wait: placement.wait,
            spin_us: placement.spin_us,
        };
        Self::decode(self.control(name, request).await?)
    }
}

fn no_worker(name: &str, device: &str, status: &ctl::Status) -> Failure {
    match status.devices.iter().find(|d| d.id == device) {
        Some(d) => Failure::new(
            ErrorCode::VmmRefused,
            format!(
                "device {device:?} ({}) of VM {name:?} has no I/O worker",
                d.kind
            ),
        ),
        None => {
            let ids: Vec<&str> = status.devices.iter().map(|d| d.id.as_str()).collect();
            Failure::new(
                ErrorCode::DeviceNotFound,
                format!(
                    "VM {name:?} has no device {device:?} (it has: {})",
                    if ids.is_empty() {
                        "none".to_owned()
                    } else {
                        ids.join(", ")
                    }
                ),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_worker_is_a_404_for_an_unknown_device_else_a_refusal() {
        let status = ctl::Status {
            state: ctl::RunState::Running,
            cpus: 1,
            memory_mib: 64,
            devices: vec![ctl::DeviceInfo {
                id: "rng0".into(),
                kind: "rng".into(),
                worker: false,
            }],
        };
        let e = no_worker("a", "net9", &status).0;
        assert_eq!(e.code, ErrorCode::DeviceNotFound);
        assert!(e.message.contains("rng0"), "{}", e.message);
        assert_eq!(
            no_worker("a", "rng0", &status).0.code,
            ErrorCode::VmmRefused
        );
    }
}
