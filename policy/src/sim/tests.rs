use super::*;
use crate::decision::VmActions;
use crate::trace::Trace;

fn host() -> Host {
    Host::from_toml(
        "cpus = 4\nmemory_mib = 8192\nreserved_mib = 0\n[[numa_nodes]]\ncpus = \"0-1\"\n[[numa_nodes]]\ncpus = \"2-3\"\n\
         [[cache_groups]]\ncpus = \"0-1\"\n[[cache_groups]]\ncpus = \"2-3\"\n",
    )
    .unwrap()
}

fn trace(rows: &str) -> Trace {
    Trace::read(format!("t_s,vm,vcpus,mem_mib,cpu_demand,ws_mib,io_iops,class\n{rows}").as_bytes())
        .unwrap()
}

fn pin(cpus: &[u32], exclusive: bool) -> VcpuPlacement {
    VcpuPlacement {
        cpus: CpuSet::new(cpus.to_vec()),
        weight: 1.0,
        exclusive,
    }
}

#[test]
fn two_busy_vcpus_on_one_cpu_share_it_and_wait() {
    let h = host();
    let t = trace("0,a,1,1024,1.0,100,0,latency-critical\n0,b,1,1024,1.0,100,0,batch\n");
    let mut sim = Simulator::new(&h, &t);
    let mut act = Actions::none(2);
    act.vms[0].vcpus = Some(vec![pin(&[0], false)]);
    act.vms[1].vcpus = Some(vec![pin(&[0], false)]);
    sim.apply(&act).unwrap();
    sim.advance();
    let shared_wait = sim.metrics.lc_wait_p99_ms();
    assert!(
        shared_wait > 400.0,
        "half the time runnable but not running: {shared_wait}"
    );
    assert!((sim.metrics.batch_work_vcpu_s / 10.0) < 0.55);

    let mut sim = Simulator::new(&h, &t);
    act.vms[1].vcpus = Some(vec![pin(&[2], false)]);
    act.vms[0].vcpus = Some(vec![pin(&[0], true)]);
    sim.apply(&act).unwrap();
    sim.advance();
    assert_eq!(sim.metrics.lc_wait_p99_ms(), 0.0);
    assert!(sim.metrics.batch_work_vcpu_s / 10.0 > 0.9);
}

#[test]
fn balloon_below_working_set_swaps_then_kills() {
    let h = host();
    let t = trace("0,a,1,2048,0.1,1000,0,general\n10,a,1,2048,0.1,1000,0,general\n");
    let mut sim = Simulator::new(&h, &t);
    sim.apply(&Actions {
        vms: vec![VmActions {
            balloon_target_mib: Some(950.0),
            ..Default::default()
        }],
    })
    .unwrap();
    sim.advance();
    assert!(sim.metrics.guest_swap_in_mib > 0.0);
    assert_eq!(sim.metrics.oom_events, 0);
    sim.apply(&Actions {
        vms: vec![VmActions {
            balloon_target_mib: Some(700.0),
            ..Default::default()
        }],
    })
    .unwrap();
    sim.advance();
    assert_eq!(
        sim.metrics.oom_events, 1,
        "a 300 MiB deficit exceeds 10% swap of 2048 MiB"
    );
    let snap = sim.sample().unwrap();
    assert_eq!(snap.vms[0].balloon.oom_kills, 1);
    assert_eq!(snap.vms[0].balloon.actual_mib, 700.0);
}

#[test]
fn local_io_worker_beats_unplaced_one() {
    let h = host();
    let t = trace("0,a,1,1024,0.5,100,5000,latency-critical\n0,b,2,1024,2.0,100,0,batch\n");
    let run = |dev: Option<DevicePlacement>| {
        let mut sim = Simulator::new(&h, &t);
        let mut act = Actions::none(2);
        act.vms[0].vcpus = Some(vec![pin(&[0], true)]);
        act.vms[1].vcpus = Some(vec![pin(&[2, 3], false), pin(&[2, 3], false)]);
        if let Some(d) = dev {
            act.vms[0].devices = vec![(DISK.into(), d)];
        }
        sim.apply(&act).unwrap();
        sim.advance();
        sim.metrics.io_p99_us()
    };
    let unplaced = run(None);
    let local = run(Some(DevicePlacement {
        cpus: CpuSet::single(1),
        mode: IoMode::Notify,
    }));
    assert!(
        local < unplaced * 0.85,
        "local {local} vs unplaced {unplaced}"
    );
}

#[test]
fn rejects_actions_no_actuator_could_do() {
    let h = host();
    let t = trace("0,a,1,1024,0.5,100,0,general\n");
    let mut sim = Simulator::new(&h, &t);
    let mut act = Actions::none(1);
    act.vms[0].vcpus = Some(vec![pin(&[9], false)]);
    assert!(matches!(sim.apply(&act), Err(SimError::BadAction { .. })));
    let act = Actions {
        vms: vec![VmActions {
            balloon_target_mib: Some(4096.0),
            ..Default::default()
        }],
    };
    assert!(sim.apply(&act).is_err());
    assert!(matches!(
        sim.apply(&Actions::none(2)),
        Err(SimError::NoSuchVm(1, 1))
    ));
}
