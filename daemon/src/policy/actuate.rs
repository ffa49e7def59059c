//! The engine's actuators and their read-backs: the balloon target and the
//! I/O worker's placement through the VMM's typed protocol, vCPU thread
//! affinity with `sched_setaffinity`, and the VM cgroup's `cpu.weight`.
//! Every action is read back; a disagreement is a failure like an error.
//! A lever that failed for a VM waits (30 s, doubling to 10 min) before
//! it is tried again there.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_policy::decision::{DevicePlacement, IoMode, VcpuPlacement};
use kiln_vmm::protocol::{self as ctl, BalloonInfo, Request, WaitKind, WorkerInfo};

/// How long one actuator call to a VMM may take.
const VMM_CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// What the actuators touch. The real one is [`HostOps`]; tests record.
pub trait Ops: Send {
    fn get_affinity(&self, tid: i32) -> io::Result<Vec<u32>>;
    fn set_affinity(&mut self, tid: i32, cpus: &[u32]) -> io::Result<()>;
    fn read_cpu_weight(&self, group: &Path) -> io::Result<u64>;
    fn write_cpu_weight(&mut self, group: &Path, weight: u64) -> io::Result<()>;
    /// A request that only reads (BalloonStats, Workers, Counters).
    fn vmm_read(&self, socket: &Path, request: Request) -> Result<serde_json::Value, String>;
    /// A request that changes something (SetBalloonTarget, SetWorkerPlacement).
    fn vmm_write(&mut self, socket: &Path, request: Request) -> Result<serde_json::Value, String>;
}

/// This host: syscalls, cgroupfs and the VMMs' control sockets.
pub struct HostOps;

fn vmm_call(socket: &Path, request: &Request) -> Result<serde_json::Value, String> {
    ctl::Client::connect(socket, VMM_CALL_TIMEOUT)
        .and_then(|mut c| c.call(request))
        .map_err(|e| e.to_string())
}

impl Ops for HostOps {
    fn get_affinity(&self, tid: i32) -> io::Result<Vec<u32>> {
        // SAFETY: a zeroed cpu_set_t is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: set is a valid cpu_set_t of the size given.
        let r = unsafe { libc::sched_getaffinity(tid, std::mem::size_of_val(&set), &mut set) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            // SAFETY: cpu is below CPU_SETSIZE.
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
            .map(|cpu| cpu as u32)
            .collect())
    }

    fn set_affinity(&mut self, tid: i32, cpus: &[u32]) -> io::Result<()> {
        // SAFETY: a zeroed cpu_set_t is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &cpu in cpus {
            if cpu as usize >= libc::CPU_SETSIZE as usize {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("CPU {cpu} is past CPU_SETSIZE"),
                ));
            }
            // SAFETY: cpu is below CPU_SETSIZE.
            unsafe { libc::CPU_SET(cpu as usize, &mut set) };
        }
        // The tid is the host's: once VMMs run in their own PID namespace
        // it must be translated through /proc/PID/task/TID/status NSpid.
        // SAFETY: set is a valid cpu_set_t of the size given.
        let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn read_cpu_weight(&self, group: &Path) -> io::Result<u64> {
        let text = std::fs::read_to_string(group.join("cpu.weight"))?;
        text.trim()
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{text:?}")))
    }

    fn write_cpu_weight(&mut self, group: &Path, weight: u64) -> io::Result<()> {
        std::fs::write(group.join("cpu.weight"), weight.to_string())
    }

    fn vmm_read(&self, socket: &Path, request: Request) -> Result<serde_json::Value, String> {
        vmm_call(socket, &request)
    }

    fn vmm_write(&mut self, socket: &Path, request: Request) -> Result<serde_json::Value, String> {
        vmm_call(socket, &request)
    }
}

fn decode<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| format!("unexpected answer from the VMM: {e}"))
}

/// Asks the VMM for a balloon taking `taken_mib` from the guest and reads
/// the target back.
pub fn balloon(ops: &mut dyn Ops, socket: &Path, taken_mib: u64) -> Result<(), String> {
    ops.vmm_write(socket, Request::SetBalloonTarget { mib: taken_mib })
        .map_err(|e| format!("set_balloon_target {taken_mib} MiB: {e}"))?;
    let info: BalloonInfo = decode(
        ops.vmm_read(socket, Request::BalloonStats {})
            .map_err(|e| format!("balloon read-back: {e}"))?,
    )?;
    if info.target_mib != taken_mib {
        return Err(format!(
            "balloon read-back: the VMM's target is {} MiB, {taken_mib} MiB was set",
            info.target_mib
        ));
    }
    Ok(())
}

/// cgroup `cpu.weight` of a placement weight (1.0 = the default 100).
pub fn cpu_weight(weight: f64) -> u64 {
    (weight * 100.0).round().clamp(1.0, 10_000.0) as u64
}

/// Pins each vCPU thread (`tids[k]` gets `placements[k]`) and sets the
/// VM's `cpu.weight`, each read back. `group` is the VM's own cgroup.
pub fn vcpus(
    ops: &mut dyn Ops,
    tids: &[i32],
    placements: &[VcpuPlacement],
    group: Option<&Path>,
) -> Result<(), String> {
    if tids.len() != placements.len() {
        return Err(format!(
            "{} placements for {} vCPU threads",
            placements.len(),
            tids.len()
        ));
    }
    for (&tid, p) in tids.iter().zip(placements) {
        let want = p.cpus.cpus();
        ops.set_affinity(tid, want)
            .map_err(|e| format!("sched_setaffinity of vCPU thread {tid} to {}: {e}", p.cpus))?;
        let got = ops
            .get_affinity(tid)
            .map_err(|e| format!("sched_getaffinity of vCPU thread {tid}: {e}"))?;
        if got != want {
            return Err(format!(
                "vCPU thread {tid} read back CPUs {got:?}, {} was set",
                p.cpus
            ));
        }
    }
    let Some(weight) = placements.first().map(|p| cpu_weight(p.weight)) else {
        return Ok(());
    };
    match group {
        Some(group) => {
            ops.write_cpu_weight(group, weight)
                .map_err(|e| format!("writing {weight} to {}/cpu.weight: {e}", group.display()))?;
            let got = ops
                .read_cpu_weight(group)
                .map_err(|e| format!("reading {}/cpu.weight: {e}", group.display()))?;
            if got != weight {
                return Err(format!(
                    "{}/cpu.weight read back {got}, {weight} was written",
                    group.display()
                ));
            }
            Ok(())
        }
        // Without a group every VM has the default weight already.
        None if weight == 100 => Ok(()),
        None => Err(format!(
            "cpu.weight {weight} not set: the VM has no cgroup of its own (the daemon found \
             no delegated cgroup v2 group; see its log at start)"
        )),
    }
}

/// The VMM's form of a worker placement: `None` for "any CPU".
pub fn worker_cpus(p: &DevicePlacement, host_cpus: u32) -> Option<Vec<usize>> {
    if p.cpus.len() as u32 >= host_cpus {
        None
    } else {
        Some(p.cpus.cpus().iter().map(|&c| c as usize).collect())
    }
}

pub fn wait_kind(mode: IoMode) -> WaitKind {
    match mode {
        IoMode::Notify => WaitKind::Notify,
        IoMode::Poll => WaitKind::Poll,
    }
}

/// Moves `device`'s worker and reads its placement back.
pub fn worker(
    ops: &mut dyn Ops,
    socket: &Path,
    device: &str,
    placement: &DevicePlacement,
    host_cpus: u32,
) -> Result<(), String> {
    let cpus = worker_cpus(placement, host_cpus);
    let wait = wait_kind(placement.mode);
    ops.vmm_write(
        socket,
        Request::SetWorkerPlacement {
            device: device.to_owned(),
            cpus: cpus.clone(),
            wait,
            spin_us: None,
        },
    )
    .map_err(|e| format!("set_worker_placement of {device}: {e}"))?;
    let workers: Vec<WorkerInfo> = decode(
        ops.vmm_read(socket, Request::Workers {})
            .map_err(|e| format!("worker read-back: {e}"))?,
    )?;
    let w = workers
        .iter()
        .find(|w| w.device == device)
        .ok_or_else(|| format!("worker read-back: the VMM lists no worker of {device}"))?;
    if w.cpus != cpus || w.wait != wait {
        return Err(format!(
            "worker {device} read back cpus {:?} wait {:?}, cpus {cpus:?} wait {wait:?} was set",
            w.cpus, w.wait
        ));
    }
    Ok(())
}

/// First wait after a failure, then doubling up to [`BACKOFF_MAX`].
pub const BACKOFF_FIRST: Duration = Duration::from_secs(30);
pub const BACKOFF_MAX: Duration = Duration::from_secs(600);

/// One lever of one VM after failures.
#[derive(Debug, Default, Clone)]
pub struct Backoff {
    failures: u32,
    until: Option<Instant>,
}

impl Backoff {
    /// Records a failure at `now`; returns how long the lever now waits
    /// and whether this is the first failure of a run (log it then).
    pub fn failed(&mut self, now: Instant) -> (Duration, bool) {
        self.failures = self.failures.saturating_add(1);
        let wait = BACKOFF_FIRST
            .saturating_mul(1u32 << (self.failures - 1).min(16))
            .min(BACKOFF_MAX);
        self.until = Some(now + wait);
        (wait, self.failures == 1)
    }

    pub fn waiting(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// The VM's own cgroup for `cpu.weight`, if the daemon gave it one.
pub type Group = Option<PathBuf>;

#[cfg(test)]
pub mod tests {
    use super::*;
    use kiln_policy::util::CpuSet;
    use std::collections::HashMap;

    /// Records every write; reads answer from what was written, except
    /// where `lie` says the read-back differs.
    #[derive(Default)]
    pub struct Recording {
        pub writes: Vec<String>,
        pub affinity: HashMap<i32, Vec<u32>>,
        pub weight: Option<u64>,
        pub balloon_target: u64,
        pub workers: Vec<WorkerInfo>,
        pub lie: bool,
    }

    impl Ops for Recording {
        fn get_affinity(&self, tid: i32) -> io::Result<Vec<u32>> {
            let set = self.affinity.get(&tid).cloned().unwrap_or(vec![0, 1]);
            Ok(if self.lie { vec![set[0] + 1] } else { set })
        }
        fn set_affinity(&mut self, tid: i32, cpus: &[u32]) -> io::Result<()> {
            self.writes.push(format!("affinity {tid} {cpus:?}"));
            self.affinity.insert(tid, cpus.to_vec());
            Ok(())
        }
        fn read_cpu_weight(&self, _: &Path) -> io::Result<u64> {
            Ok(self.weight.unwrap_or(100))
        }
        fn write_cpu_weight(&mut self, _: &Path, weight: u64) -> io::Result<()> {
            self.writes.push(format!("cpu.weight {weight}"));
            self.weight = Some(weight);
            Ok(())
        }
        fn vmm_read(&self, _: &Path, request: Request) -> Result<serde_json::Value, String> {
            Ok(match request {
                Request::BalloonStats {} => serde_json::json!({
                    "target_mib": self.balloon_target + u64::from(self.lie),
                    "actual_mib": 0, "inflated_mib": 0}),
                Request::Workers {} => serde_json::to_value(&self.workers).unwrap(),
                other => return Err(format!("unexpected {other:?}")),
            })
        }
        fn vmm_write(&mut self, _: &Path, request: Request) -> Result<serde_json::Value, String> {
            self.writes.push(format!("{request:?}"));
            match request {
                Request::SetBalloonTarget { mib } => self.balloon_target = mib,
                Request::SetWorkerPlacement {
                    device, cpus, wait, ..
                } => {
                    if let Some(w) = self.workers.iter_mut().find(|w| w.device == device) {
                        if !self.lie {
                            w.cpus = cpus;
                        }
                        w.wait = wait;
                    }
                }
                _ => {}
            }
            Ok(serde_json::json!({}))
        }
    }

    fn placement(cpus: &[u32]) -> VcpuPlacement {
        VcpuPlacement {
            cpus: CpuSet::new(cpus.to_vec()),
            weight: 1.0,
            exclusive: true,
        }
    }

    #[test]
    fn actions_that_read_back_are_applied_and_mismatches_fail() {
        let sock = Path::new("/nonexistent");
        let mut ops = Recording::default();
        vcpus(&mut ops, &[10], &[placement(&[1])], None).unwrap();
        balloon(&mut ops, sock, 64).unwrap();
        ops.workers = vec![serde_json::from_value(serde_json::json!({
            "device": "rng0", "tid": 5, "cpus": null, "wait": "notify", "busy_rounds": 0}))
        .unwrap()];
        let dp = DevicePlacement {
            cpus: CpuSet::single(1),
            mode: IoMode::Poll,
        };
        worker(&mut ops, sock, "rng0", &dp, 2).unwrap();
        assert_eq!(ops.workers[0].cpus, Some(vec![1]));
        ops.lie = true;
        let e = vcpus(&mut ops, &[10], &[placement(&[0])], None).unwrap_err();
        assert!(e.contains("read back"), "{e}");
        let e = balloon(&mut ops, sock, 32).unwrap_err();
        assert!(e.contains("read-back"), "{e}");
        let dp0 = DevicePlacement {
            cpus: CpuSet::single(0),
            mode: IoMode::Notify,
        };
        let e = worker(&mut ops, sock, "rng0", &dp0, 2).unwrap_err();
        assert!(e.contains("read back"), "{e}");
        // A weight other than the default needs the VM's own group.
        ops.lie = false;
        let mut heavy = placement(&[0]);
        heavy.weight = 4.0;
        let e = vcpus(&mut ops, &[10], &[heavy.clone()], None).unwrap_err();
        assert!(e.contains("no cgroup of its own"), "{e}");
        vcpus(&mut ops, &[10], &[heavy], Some(Path::new("/cg/web"))).unwrap();
        assert_eq!(ops.weight, Some(400));
    }

    #[test]
    fn backoff_doubles_from_30_s_and_stops_at_10_min() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        assert!(!b.waiting(t0));
        let waits: Vec<u64> = (0..8).map(|_| b.failed(t0).0.as_secs()).collect();
        assert_eq!(waits, [30, 60, 120, 240, 480, 600, 600, 600]);
        assert!(b.waiting(t0 + Duration::from_secs(599)));
        assert!(!b.waiting(t0 + Duration::from_secs(600)));
        let mut fresh = Backoff::default();
        assert!(fresh.failed(t0).1, "the first failure is logged");
        assert!(!fresh.failed(t0).1, "the next ones are not");
    }

    #[test]
    fn affinity_of_this_thread_reads_back_through_the_syscalls() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let mut ops = HostOps;
        let before = ops.get_affinity(tid).unwrap();
        assert!(!before.is_empty());
        ops.set_affinity(tid, &before[..1]).unwrap();
        assert_eq!(ops.get_affinity(tid).unwrap(), &before[..1]);
        ops.set_affinity(tid, &before).unwrap();
        assert!(ops.set_affinity(tid, &[100_000]).is_err());
    }
}
