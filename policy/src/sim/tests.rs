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
fn without_deflate_on_oom_a_balloon_below_working_set_swaps_then_kills() {
    let h = host();
    let t = trace("0,a,1,2048,0.1,1000,0,general\n10,a,1,2048,0.1,1000,0,general\n");
    let mut sim = Simulator::with_options(
        &h,
        &t,
        SimOptions {
            deflate_on_oom: false,
        },
    );
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

fn balloon_to(sim: &mut Simulator, t: f64) {
    sim.apply(&Actions {
        vms: vec![VmActions {
            balloon_target_mib: Some(t),
            ..Default::default()
        }],
    })
    .unwrap();
}

#[test]
fn deflate_on_oom_gives_memory_back_in_1_mib_calls_and_holds_until_a_new_target() {
    let h = host();
    let rows: String = (0..4)
        .map(|k| format!("{},a,1,2048,0.1,1000,0,general\n", k * 10))
        .collect();
    let t = trace(&rows);
    let mut sim = Simulator::new(&h, &t);
    balloon_to(&mut sim, 700.0);
    sim.advance();
    // 1000 MiB working set, 700 MiB in force, 204.8 MiB swap: 95.2 MiB short,
    // 96 notifier calls of 1 MiB, and no OOM kill.
    assert_eq!(sim.metrics.oom_events, 0);
    assert_eq!(sim.metrics.oom_deflate_calls, 96);
    let snap = sim.sample().unwrap();
    assert_eq!(snap.vms[0].balloon.actual_mib, 796.0);
    assert_eq!(snap.vms[0].balloon.oom_kills, 0);
    // The host's target is unchanged; the device's actual is above it.
    assert_eq!(sim.state()[0].balloon_target_mib, 700.0);
    sim.advance();
    assert_eq!(
        sim.sample().unwrap().vms[0].balloon.actual_mib,
        796.0,
        "held"
    );
    assert_eq!(sim.metrics.oom_deflate_calls, 96);
    // Writing the target again is a config change: the driver inflates to it
    // and the guest deflates on OOM again.
    balloon_to(&mut sim, 700.0);
    sim.advance();
    assert_eq!(sim.metrics.oom_deflate_calls, 192);
    assert_eq!(sim.metrics.oom_events, 0);
    // A target that leaves room is followed again.
    balloon_to(&mut sim, 1500.0);
    sim.advance();
    assert_eq!(sim.sample().unwrap().vms[0].balloon.actual_mib, 1500.0);
}

#[test]
fn with_an_empty_balloon_the_oom_killer_runs() {
    let h = host();
    let t = trace("0,a,1,1024,0.1,1020,0,general\n");
    // Demand beyond the whole guest: the balloon has nothing, a kill is counted.
    let t = Trace {
        ws: vec![1200.0],
        ..t
    };
    let mut sim = Simulator::new(&h, &t);
    sim.advance();
    assert_eq!(sim.metrics.oom_events, 1);
    assert_eq!(sim.metrics.oom_deflate_calls, 0);
}
