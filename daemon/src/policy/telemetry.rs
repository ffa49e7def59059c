//! What one control round knows of each running VM: its VMM's answers
//! (counters and workers, asked of every VMM at once, each within 500 ms)
//! turned into what `kiln_policy::live::LiveHost` watches, and the
//! placement in force as the engine's `VmState`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_api::engine::{VmClassHint, VmPolicy};
use kiln_policy::decision::{DevicePlacement, IoMode, VcpuPlacement, VmState};
use kiln_policy::live::WatchedVm;
use kiln_policy::telemetry::{BalloonStats, DeviceStat};
use kiln_policy::trace::{default_floor_mib, VmClass};
use kiln_policy::util::CpuSet;
use kiln_vmm::protocol::{self as ctl, Counters, WaitKind, WorkerInfo};

use super::actuate::Ops;

/// How long one VMM has to answer a round's questions.
pub const VMM_ANSWER_LIMIT: Duration = Duration::from_millis(500);

/// A running VM as a round sees it.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub pid: u32,
    pub memory_mib: u64,
    pub policy: VmPolicy,
    pub control: PathBuf,
    /// Its own cgroup v2 group, when the daemon gave it one.
    pub cgroup: Option<PathBuf>,
}

/// A VM whose VMM answered this round.
#[derive(Debug, Clone)]
pub struct Sample {
    pub target: Target,
    pub counters: Counters,
    pub workers: Vec<WorkerInfo>,
}

fn ask(control: &std::path::Path) -> Result<(Counters, Vec<WorkerInfo>), String> {
    let mut c = ctl::Client::connect(control, VMM_ANSWER_LIMIT).map_err(|e| e.to_string())?;
    let counters = c.counters().map_err(|e| e.to_string())?;
    let workers = c.workers().map_err(|e| e.to_string())?;
    Ok((counters, workers))
}

/// Asks every target's VMM at once. A VMM that does not answer within
/// [`VMM_ANSWER_LIMIT`] (or is still busy with an earlier round's
/// question) is left out of this round and counted in the second value.
pub async fn gather(
    targets: Vec<Target>,
    in_flight: &Arc<Mutex<HashSet<String>>>,
) -> (Vec<Sample>, u64, Vec<(String, String)>) {
    let asks = targets.into_iter().map(|t| {
        let in_flight = Arc::clone(in_flight);
        async move {
            if !in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(t.name.clone())
            {
                return Err((t.name, "still busy with an earlier round".to_owned()));
            }
            let control = t.control.clone();
            let name = t.name.clone();
            let flight = Arc::clone(&in_flight);
            // The blocking call ends by its socket timeouts; it clears the
            // in-flight mark itself, so a stuck VMM holds at most one thread.
            let task = tokio::task::spawn_blocking(move || {
                let r = ask(&control);
                flight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&name);
                r
            });
            match tokio::time::timeout(VMM_ANSWER_LIMIT, task).await {
                Ok(Ok(Ok((counters, workers)))) => Ok(Sample {
                    target: t,
                    counters,
                    workers,
                }),
                Ok(Ok(Err(e))) => Err((t.name, e)),
                Ok(Err(e)) => Err((t.name, e.to_string())),
                Err(_) => Err((t.name, format!("no answer within {VMM_ANSWER_LIMIT:?}"))),
            }
        }
    });
    let mut samples = Vec::new();
    let mut skipped = Vec::new();
    for r in futures_util::future::join_all(asks).await {
        match r {
            Ok(s) => samples.push(s),
            Err(e) => skipped.push(e),
        }
    }
    let n = skipped.len() as u64;
    (samples, n, skipped)
}

pub fn class_of(hint: VmClassHint) -> VmClass {
    match hint {
        VmClassHint::LatencyCritical => VmClass::LatencyCritical,
        VmClassHint::Batch => VmClass::Batch,
        VmClassHint::Service => VmClass::Service,
        VmClassHint::Desktop => VmClass::Desktop,
        VmClassHint::General => VmClass::General,
    }
}

const MIB: f64 = 1048576.0;

/// The balloon as the engine counts it (MiB, memory the guest keeps). The
/// VMM reports sizes in bytes and the balloon as MiB taken from the guest.
/// Without guest statistics all of the guest's memory counts as in use,
/// so the engine never takes memory it cannot see is free.
pub fn balloon_stats(memory_mib: u64, counters: &Counters) -> BalloonStats {
    let mem = memory_mib as f64;
    let Some(b) = &counters.balloon else {
        return BalloonStats {
            actual_mib: mem,
            ..Default::default()
        };
    };
    let actual = (mem - b.actual_mib as f64).max(0.0);
    let mut out = BalloonStats {
        actual_mib: actual,
        ..Default::default()
    };
    if let Some(s) = &b.stats {
        let mib = |v: Option<u64>| v.map(|x| x as f64 / MIB);
        out.free_mib = mib(s.free_memory).unwrap_or(0.0);
        out.available_mib = mib(s.available_memory)
            .or(mib(s.free_memory))
            .unwrap_or(0.0)
            .min(actual);
        out.caches_mib = mib(s.disk_caches).unwrap_or(0.0);
        out.major_faults = s.major_faults.unwrap_or(0);
        out.minor_faults = s.minor_faults.unwrap_or(0);
        out.swap_in_mib = mib(s.swap_in).unwrap_or(0.0);
        out.swap_out_mib = mib(s.swap_out).unwrap_or(0.0);
    }
    out
}

/// What the live host watches for a VM.
pub fn watched(s: &Sample) -> WatchedVm {
    let mem = s.target.memory_mib as f64;
    WatchedVm {
        id: s.target.name.clone(),
        class: class_of(s.target.policy.class),
        mem_mib: mem,
        floor_mib: s
            .target
            .policy
            .memory_floor_mib
            .map(|f| f as f64)
            .unwrap_or_else(|| default_floor_mib(mem)),
        pid: s.target.pid,
        vcpu_tids: vcpu_tids(s).iter().map(|&t| t as u32).collect(),
        balloon: balloon_stats(s.target.memory_mib, &s.counters),
        // A worker's busy rounds stand for its requests (the VMM counts no
        // latency yet).
        devices: s
            .counters
            .devices
            .iter()
            .map(|d| DeviceStat {
                name: d.id.clone(),
                requests: d.busy_rounds,
                latency_sum_us: 0.0,
                p99_us: 0.0,
            })
            .collect(),
    }
}

/// The vCPU threads' host tids, in vCPU order (threads not yet running
/// have none and are left out).
pub fn vcpu_tids(s: &Sample) -> Vec<i32> {
    s.counters.vcpus.iter().filter_map(|v| v.tid).collect()
}

/// What is in force for a VM: each vCPU thread's affinity, the VM's
/// weight, the balloon target and each worker's placement. `exclusive`:
/// the engine's last applied plan, whose `exclusive` flags are kept while
/// the threads still run where it put them.
pub fn state(
    s: &Sample,
    ops: &dyn Ops,
    host_cpus: u32,
    exclusive: Option<&[VcpuPlacement]>,
) -> VmState {
    let all = CpuSet::range(0, host_cpus);
    let weight = s
        .target
        .cgroup
        .as_deref()
        .and_then(|g| ops.read_cpu_weight(g).ok())
        .map(|w| w as f64 / 100.0)
        .unwrap_or(1.0);
    let vcpus = vcpu_tids(s)
        .iter()
        .enumerate()
        .map(|(k, &tid)| {
            let cpus = ops
                .get_affinity(tid)
                .map(|c| CpuSet::new(c.into_iter().filter(|&c| c < host_cpus).collect()))
                .ok()
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| all.clone());
            let excl = exclusive
                .and_then(|e| e.get(k))
                .is_some_and(|p| p.exclusive && p.cpus == cpus);
            VcpuPlacement {
                cpus,
                weight,
                exclusive: excl,
            }
        })
        .collect();
    let balloon_target_mib = match &s.counters.balloon {
        Some(b) => (s.target.memory_mib as f64 - b.target_mib as f64).max(0.0),
        None => s.target.memory_mib as f64,
    };
    let devices = s
        .workers
        .iter()
        .map(|w| {
            let cpus = w
                .cpus
                .as_ref()
                .map(|c| CpuSet::new(c.iter().map(|&c| c as u32).collect()))
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| all.clone());
            let mode = match w.wait {
                WaitKind::Notify => IoMode::Notify,
                WaitKind::Poll => IoMode::Poll,
            };
            (w.device.clone(), DevicePlacement { cpus, mode })
        })
        .collect();
    VmState {
        vcpus,
        balloon_target_mib,
        devices,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(balloon: serde_json::Value) -> Counters {
        serde_json::from_value(serde_json::json!({
            "vcpus": [{"index": 0, "tid": 78, "run_ns": 1, "wait_ns": 2}, {"index": 1, "tid": null, "run_ns": 0, "wait_ns": 0}],
            "devices": [{"id": "rng0", "busy_rounds": 12}],
            "balloon": balloon,
        }))
        .unwrap()
    }

    #[test]
    fn vmm_bytes_become_mib_and_taken_becomes_kept() {
        let c = counters(serde_json::json!({
            "target_mib": 128, "actual_mib": 100, "inflated_mib": 100,
            "stats": {"swap_in": 1048576, "swap_out": null, "major_faults": 3, "minor_faults": 4,
                "free_memory": 104857600u64, "total_memory": 419430400u64,
                "available_memory": 209715200u64, "disk_caches": 52428800u64,
                "hugetlb_allocations": null, "hugetlb_failures": null,
                "received_at": {"secs_since_epoch": 1, "nanos_since_epoch": 0}}}));
        let b = balloon_stats(512, &c);
        assert_eq!(b.actual_mib, 412.0);
        assert_eq!(
            (b.free_mib, b.available_mib, b.caches_mib),
            (100.0, 200.0, 50.0)
        );
        assert_eq!((b.swap_in_mib, b.major_faults), (1.0, 3));
        // No statistics: everything counts as in use.
        let none = balloon_stats(
            512,
            &counters(serde_json::json!({"target_mib": 0, "actual_mib": 0, "inflated_mib": 0})),
        );
        assert_eq!((none.actual_mib, none.available_mib), (512.0, 0.0));
        let s = Sample {
            target: Target {
                name: "web".into(),
                pid: 77,
                memory_mib: 512,
                policy: VmPolicy {
                    class: VmClassHint::LatencyCritical,
                    memory_floor_mib: Some(200),
                    opt_out: vec![],
                },
                control: "/x".into(),
                cgroup: None,
            },
            counters: c,
            workers: vec![],
        };
        let w = watched(&s);
        assert_eq!(w.vcpu_tids, vec![78], "a thread without a tid is left out");
        assert_eq!(w.floor_mib, 200.0);
        assert_eq!(w.class, VmClass::LatencyCritical);
        assert_eq!(w.devices[0].requests, 12);
        let st = state(&s, &super::super::actuate::HostOps, 2, None);
        assert_eq!(st.balloon_target_mib, 384.0, "512 MiB minus 128 taken");
    }
}
