//! The policy engine inside a real `kiln serve` with a real `kiln-vmm`
//! (its guest cannot boot on this host's emulating KVM, but its vCPU and
//! I/O worker threads run, so affinity and placement are real).
//!
//! What makes the heuristic move something on a 2-CPU host with one
//! shared L3: a VM hinted `latency_critical` with one vCPU gets CPU 0 for
//! itself (pack/spread hands latency-critical guests exclusive CPUs, up
//! to half the host), and its I/O worker, which may run anywhere, sits on
//! that exclusive CPU, so the worker rule moves it to CPU 1 (notify).
//! Both happen in the first round (no history needed).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_api::engine::{DecisionOutcome, Lever, LeverMode, PolicySettings, VmClassHint, VmPolicy};
use kiln_api::{Client, DecisionQuery, EventQuery, EventType, VmSpec, VmState};
use serde_json::json;

mod common;
use common::{runtime, vmm_binary, Daemon};

fn guest(name: &str) -> VmSpec {
    let g = kiln_guests::ensure_default_guest(&kiln_guests::cache_dir())
        .expect("the default guest (run `kiln guest fetch`)");
    let mut s: VmSpec = serde_json::from_value(json!({
        "name": name,
        "machine": {"kernel": g.bzimage, "initrd": g.initramfs, "memory_mib": 256, "rng": {}},
    }))
    .unwrap();
    s.machine.cpus = 1;
    s
}

async fn wait_running(client: &Client, name: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = client.get(name).await.unwrap();
        if info.status.state == VmState::Running {
            return info.status.pid.expect("a running VM has a pid");
        }
        assert!(Instant::now() < deadline, "{name} never ran: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `Cpus_allowed_list` of a thread, from /proc.
fn allowed(pid: u32, tid: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
        .unwrap_or_else(|e| panic!("thread {tid} of {pid}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim()
        .to_owned()
}

fn settings(vcpu: LeverMode, worker: LeverMode) -> PolicySettings {
    let mut s = PolicySettings {
        interval_ms: 200,
        ..Default::default()
    };
    s.levers.vcpu = vcpu;
    s.levers.worker = worker;
    s
}

/// Waits until `name` has decisions of both levers with `outcome`.
async fn wait_decisions(client: &Client, name: &str, outcome: DecisionOutcome) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = client
            .decisions(name, &DecisionQuery::default())
            .await
            .unwrap()
            .decisions;
        let has = |l: Lever| list.iter().any(|d| d.lever == l && d.outcome == outcome);
        if has(Lever::Vcpu) && has(Lever::Worker) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {outcome:?} vcpu and worker decisions for {name}: {list:#?}\n{:#?}",
            client.policy().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn host_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[test]
fn shadow_moves_nothing_active_pins_and_places_and_a_manual_change_is_refused() {
    assert!(
        host_cpus() >= 2,
        "this test needs 2 CPUs (an exclusive one and another); the host has {}",
        host_cpus()
    );
    let d = Daemon::start(vmm_binary(), &[]);
    let client = d.client();
    runtime().block_on(async {
        client.create(&guest("lc"), true).await.unwrap();
        let pid = wait_running(&client, "lc").await;
        // The hint, given while the VM runs, lands in its definition.
        client
            .set_vm_policy(
                "lc",
                &VmPolicy {
                    class: VmClassHint::LatencyCritical,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(
            client.get("lc").await.unwrap().spec.policy.class,
            VmClassHint::LatencyCritical
        );
        let counters = client.counters("lc").await.unwrap();
        let tids: Vec<i32> = counters.vcpus.iter().filter_map(|v| v.tid).collect();
        assert_eq!(tids.len(), 1, "{counters:?}");
        // The worker thread starts when the guest's driver sets its queue
        // up, which a guest that cannot boot never does: then only its
        // placement in the VMM (the `workers` answer) can be checked.
        let worker = client.worker("lc", "rng0").await.unwrap();
        let wtid = worker.tid;
        let worker_allowed = |t: Option<i32>| t.map(|t| allowed(pid, t));
        let before = (
            allowed(pid, tids[0]),
            worker_allowed(wtid),
            worker.cpus.clone(),
        );

        // Shadow: decisions recorded, nothing moves.
        client
            .set_policy(&settings(LeverMode::Shadow, LeverMode::Shadow))
            .await
            .unwrap();
        wait_decisions(&client, "lc", DecisionOutcome::Shadow).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        let now = (
            allowed(pid, tids[0]),
            worker_allowed(wtid),
            client.worker("lc", "rng0").await.unwrap().cpus,
        );
        assert_eq!(now, before, "shadow moved something");
        let list = client
            .decisions("lc", &DecisionQuery::default())
            .await
            .unwrap()
            .decisions;
        assert!(
            list.iter().all(|d| d.outcome == DecisionOutcome::Shadow),
            "{list:#?}"
        );

        // Active: the vCPU gets CPU 0 alone, its worker moves to CPU 1.
        let st = client
            .set_policy(&settings(LeverMode::Active, LeverMode::Active))
            .await
            .unwrap();
        assert_eq!(st.effective.vcpu, LeverMode::Active);
        wait_decisions(&client, "lc", DecisionOutcome::Applied).await;
        assert_eq!(allowed(pid, tids[0]), "0", "the vCPU thread is pinned");
        let placed = client.worker("lc", "rng0").await.unwrap();
        assert_eq!(placed.cpus, Some(vec![1]), "{placed:?}");
        if let Some(t) = wtid {
            assert_eq!(allowed(pid, t), "1", "the worker thread moved");
        }
        let list = client
            .decisions(
                "lc",
                &DecisionQuery {
                    lever: Some(Lever::Vcpu),
                    limit: Some(1),
                },
            )
            .await
            .unwrap()
            .decisions;
        assert_eq!(list.len(), 1);
        assert!(list[0].reason.contains("latency-critical"), "{:?}", list[0]);
        assert!(list[0].seq >= 1);

        // A manual worker change on an active lever: 409 naming it.
        let err = client
            .set_worker(
                "lc",
                "rng0",
                &kiln_api::WorkerPlacement {
                    cpus: Some(vec![0]),
                    wait: kiln_vmm::protocol::WaitKind::Notify,
                    spin_us: None,
                },
            )
            .await
            .unwrap_err();
        let (status, body) = err.api().expect("an API error");
        assert_eq!(
            (status, body.code),
            (409, kiln_api::ErrorCode::PolicyActive),
            "{err}"
        );
        assert!(body.message.contains("worker"), "{}", body.message);
        // Opting out releases it.
        client
            .set_vm_policy(
                "lc",
                &VmPolicy {
                    class: VmClassHint::LatencyCritical,
                    opt_out: vec![Lever::Worker],
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let w = client
            .set_worker(
                "lc",
                "rng0",
                &kiln_api::WorkerPlacement {
                    cpus: None,
                    wait: kiln_vmm::protocol::WaitKind::Notify,
                    spin_us: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(w.cpus, None);

        // Visible as events and counters.
        let events = client
            .events(&EventQuery {
                kind: Some(EventType::EngineDecision),
                vm: Some("lc".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(events.len() >= 4, "{events:#?}");
        let metrics = client.metrics().await.unwrap();
        let applied = metrics
            .lines()
            .find(|l| {
                l.starts_with("kiln_policy_decisions_total{lever=\"vcpu\",outcome=\"applied\"}")
            })
            .unwrap_or_else(|| panic!("{metrics}"));
        assert!(!applied.ends_with(" 0"), "{applied}");
        let st = client.policy().await.unwrap();
        eprintln!(
            "policy live figures: {} rounds, {} decisions, last round {:?} µs",
            st.rounds, st.decisions, st.last_round_us
        );
        assert!(st.rounds >= 2 && st.last_round_us.is_some(), "{st:?}");
        client.delete("lc", true).await.unwrap();
    });
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid and a signal.
    assert_eq!(
        unsafe { libc::kill(pid as i32, sig) },
        0,
        "kill -{sig} {pid}"
    );
}

#[test]
fn a_stopped_vmm_is_skipped_while_the_api_answers_and_settings_survive_a_kill_9() {
    let mut d = Daemon::start(vmm_binary(), &[]);
    let client = d.client();
    runtime().block_on(async {
        client.create(&guest("busy"), true).await.unwrap();
        client.create(&guest("frozen"), true).await.unwrap();
        wait_running(&client, "busy").await;
        let frozen = wait_running(&client, "frozen").await;
        client
            .set_policy(&settings(LeverMode::Shadow, LeverMode::Off))
            .await
            .unwrap();
        signal(frozen, libc::SIGSTOP);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let t = Instant::now();
            let st = client.policy().await.unwrap();
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "the API waited {:?} for a round",
                t.elapsed()
            );
            if st.vmm_skipped >= 3 && st.rounds >= 4 {
                break;
            }
            assert!(Instant::now() < deadline, "never skipped: {st:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The other VM still gets its rounds.
        assert!(client.counters("busy").await.is_ok());
        signal(frozen, libc::SIGCONT);
        let metrics = client.metrics().await.unwrap();
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("kiln_policy_vmm_skipped_total ") && !l.ends_with(" 0")),
            "{metrics}"
        );
    });
    let before = runtime().block_on(client.policy()).unwrap().settings;
    d.kill9();
    d.spawn();
    let after = runtime().block_on(d.client().policy()).unwrap();
    assert_eq!(after.settings, before, "the settings survive a kill -9");
    assert_eq!(after.settings.levers.vcpu, LeverMode::Shadow);
    let stored: PathBuf = d.state_dir().join("policy/settings.json");
    assert!(stored.is_file());
    runtime().block_on(async {
        let c = d.client();
        c.delete("busy", true).await.unwrap();
        c.delete("frozen", true).await.unwrap();
    });
}
