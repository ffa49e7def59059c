//! The daemon under load on this machine: 50 concurrent clients create,
//! show, list and delete VMs (never started) for 60 s, 40 over the Unix
//! socket and 10 over TCP with TLS and the bearer token, and the daemon is killed with SIGKILL at 30 s and started again
//! at once on the same directories. Clients retry while it is down.
//!
//! It must hold that: no request ever gets a 5xx; every VM whose create was
//! acknowledged and whose delete was not is defined after the restart, and
//! no acknowledged delete comes back; afterwards the daemon has no child
//! processes, its descriptors are back near where they were before the
//! load, and no run or status file is left without a definition.
//!
//! It runs for about 70 s, alone (`.config/nextest.toml`).

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{children_of, fd_count, make_pki, vmm_binary, Daemon};
use kiln_api::{Client, ClientError, Endpoint};

const CLIENTS: usize = 50;
/// Of which over TLS.
const TLS_CLIENTS: usize = 10;
const TOKEN: &str = "load-test-token-0123456789";
const RUN: Duration = Duration::from_secs(60);
const KILL_AT: Duration = Duration::from_secs(30);
/// VMs each client keeps defined; past this it deletes its oldest.
const KEEP: usize = 4;
/// How long a request is retried through connection errors (the restart).
const RETRY_FOR: Duration = Duration::from_secs(30);

/// What a client knows of one of its VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// The create got a 2xx (or a retried create found the name taken:
    /// the first attempt landed).
    Created,
    /// The create's answer was lost and never learnt.
    CreateUnknown,
    /// The delete got a 2xx (or a retried delete found it gone).
    Deleted,
    /// The delete's answer was lost and never learnt.
    DeleteUnknown,
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    by_status: BTreeMap<u16, u64>,
    connection_errors: u64,
    /// Answers that break the rules: 5xx, a lost VM, an unexpected 4xx.
    violations: Vec<String>,
}

struct Answer {
    status: u16,
    body: String,
    /// An earlier attempt of this request failed after it may have been sent.
    retried: bool,
}

/// One request, retried through connection errors for `RETRY_FOR`; None
/// when the daemon never answered.
async fn request(
    client: &Client,
    tally: &Mutex<Tally>,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Option<Answer> {
    let first = Instant::now();
    let mut retried = false;
    loop {
        let start = Instant::now();
        match client.raw(method, path, body.clone()).await {
            Ok(raw) => {
                let mut t = tally.lock().unwrap();
                t.latencies.push(start.elapsed());
                *t.by_status.entry(raw.status).or_default() += 1;
                if raw.status >= 500 {
                    t.violations.push(format!(
                        "{method} {path}: {} {}",
                        raw.status,
                        String::from_utf8_lossy(&raw.body)
                    ));
                }
                return Some(Answer {
                    status: raw.status,
                    body: String::from_utf8_lossy(&raw.body).into_owned(),
                    retried,
                });
            }
            Err(e) => {
                // Refused or no socket: nothing was sent. Any other failure
                // (a reset mid-request) may have reached the daemon.
                if !matches!(e, ClientError::Connect { .. }) {
                    retried = true;
                }
                tally.lock().unwrap().connection_errors += 1;
                if first.elapsed() > RETRY_FOR {
                    tally
                        .lock()
                        .unwrap()
                        .violations
                        .push(format!("{method} {path}: no answer for {RETRY_FOR:?}: {e}"));
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn spec_body(name: &str, kernel: &Path) -> Vec<u8> {
    serde_json::json!({"name": name, "machine": {"kernel": kernel, "memory_mib": 64}, "labels": {"load": "yes"}})
        .to_string()
        .into_bytes()
}

/// One client's loop until `end`: create a VM, show it, list, and delete
/// its oldest VM once it keeps more than `KEEP`.
async fn client_loop(
    id: usize,
    endpoint: Endpoint,
    kernel: PathBuf,
    end: Instant,
    tally: Arc<Mutex<Tally>>,
) -> BTreeMap<String, Fate> {
    let client = Client::new(endpoint);
    let mut fates = BTreeMap::new();
    let mut alive: VecDeque<String> = VecDeque::new();
    let mut n = 0;
    let bad = |what: String| tally.lock().unwrap().violations.push(what);
    while Instant::now() < end {
        let name = format!("load-{id:02}-{n}");
        n += 1;
        let Some(a) = request(
            &client,
            &tally,
            "POST",
            "/v1/vms",
            Some(spec_body(&name, &kernel)),
        )
        .await
        else {
            fates.insert(name, Fate::CreateUnknown);
            continue;
        };
        match a.status {
            201 => {}
            409 if a.retried => {}
            s => {
                bad(format!("create {name}: {s} {}", a.body));
                fates.insert(name, Fate::CreateUnknown);
                continue;
            }
        }
        fates.insert(name.clone(), Fate::Created);
        alive.push_back(name.clone());
        if let Some(a) = request(&client, &tally, "GET", &format!("/v1/vms/{name}"), None).await {
            let shown: Option<serde_json::Value> = serde_json::from_str(&a.body).ok();
            let shown_name = shown.as_ref().and_then(|v| v["spec"]["name"].as_str());
            if a.status != 200 || shown_name != Some(&name) {
                bad(format!(
                    "show {name} (acknowledged): {} {}",
                    a.status, a.body
                ));
            }
        }
        if let Some(a) = request(&client, &tally, "GET", "/v1/vms", None).await {
            let listed: Option<serde_json::Value> = serde_json::from_str(&a.body).ok();
            let mine = listed
                .as_ref()
                .and_then(|v| v["vms"].as_array())
                .map(|vms| {
                    vms.iter()
                        .filter_map(|v| v["spec"]["name"].as_str())
                        .filter(|n| alive.iter().any(|a| a == n))
                        .count()
                });
            if a.status != 200 || mine != Some(alive.len()) {
                bad(format!(
                    "list: {} with {mine:?} of client {id}'s {} VMs",
                    a.status,
                    alive.len()
                ));
            }
        }
        if alive.len() > KEEP {
            let old = alive.pop_front().unwrap();
            let fate =
                match request(&client, &tally, "DELETE", &format!("/v1/vms/{old}"), None).await {
                    None => Fate::DeleteUnknown,
                    Some(a) if a.status == 204 => Fate::Deleted,
                    Some(a) if a.status == 404 && a.retried => Fate::Deleted,
                    Some(a) => {
                        bad(format!(
                            "delete {old} (acknowledged): {} {}",
                            a.status, a.body
                        ));
                        Fate::DeleteUnknown
                    }
                };
            fates.insert(old, fate);
        }
    }
    fates
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn names_in(dir: &Path, suffix: &str) -> BTreeSet<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter_map(|n| n.strip_suffix(suffix).map(str::to_owned))
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

#[test]
fn fifty_clients_for_a_minute_with_a_kill_9_of_the_daemon_lose_nothing_and_leak_nothing() {
    let keys = tempfile::tempdir().unwrap();
    let pki = make_pki(keys.path(), "load");
    let token = keys.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    // A fixed port, so that the restarted daemon listens where the first did.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut d = Daemon::start(
        vmm_binary(),
        &[
            "--listen",
            &addr,
            "--token-file",
            token.to_str().unwrap(),
            "--tls-cert",
            pki.cert.to_str().unwrap(),
            "--tls-key",
            pki.key.to_str().unwrap(),
        ],
    );
    let kernel = d.dir.path().join("vmlinuz");
    std::fs::write(&kernel, vec![0u8; 4096]).unwrap();
    let first_pid = d.pid();
    let baseline_fds = fd_count(first_pid);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let end = started + RUN;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let endpoint = if id < TLS_CLIENTS {
                Endpoint::Https {
                    addr: addr.clone(),
                    token: Some(TOKEN.into()),
                    ca_cert: Some(pki.ca.clone()),
                }
            } else {
                Endpoint::Unix(d.socket())
            };
            rt.spawn(client_loop(
                id,
                endpoint,
                kernel.clone(),
                end,
                tally.clone(),
            ))
        })
        .collect();
    std::thread::sleep(KILL_AT);
    let before_kill = tally.lock().unwrap().latencies.len();
    d.kill9();
    let killed_at = started.elapsed();
    d.spawn();
    let down_for = started.elapsed() - killed_at;
    let second_pid = d.pid();
    let mut fates = BTreeMap::new();
    for c in clients {
        fates.extend(rt.block_on(c).unwrap());
    }
    let elapsed = started.elapsed();
    let tally = Arc::try_unwrap(tally).ok().unwrap().into_inner().unwrap();

    let mut sorted = tally.latencies.clone();
    sorted.sort();
    let requests = sorted.len();
    let statuses: Vec<String> = tally
        .by_status
        .iter()
        .map(|(s, n)| format!("{s}: {n}"))
        .collect();
    println!(
        "load: {requests} requests in {:.1} s ({:.0} req/s), p50 {:.2} ms, p99 {:.2} ms, by status {{{}}}, {} connection errors retried; kill -9 at {:.1} s, {before_kill} requests before it, down {:.0} ms",
        elapsed.as_secs_f64(),
        requests as f64 / elapsed.as_secs_f64(),
        percentile(&sorted, 0.50).as_secs_f64() * 1e3,
        percentile(&sorted, 0.99).as_secs_f64() * 1e3,
        statuses.join(", "),
        tally.connection_errors,
        killed_at.as_secs_f64(),
        down_for.as_secs_f64() * 1e3,
    );
    assert!(
        tally.violations.is_empty(),
        "{} violations, first: {:#?}",
        tally.violations.len(),
        &tally.violations[..tally.violations.len().min(10)]
    );
    assert!(
        before_kill > 0 && requests > before_kill,
        "the load did not straddle the kill"
    );

    // Acknowledged creates are there, acknowledged deletes are not.
    let listed: BTreeSet<String> = rt
        .block_on(d.client().list())
        .unwrap()
        .into_iter()
        .map(|v| v.spec.name)
        .collect();
    let mut lost = Vec::new();
    let mut back = Vec::new();
    for (name, fate) in &fates {
        match fate {
            Fate::Created if !listed.contains(name) => lost.push(name.clone()),
            Fate::Deleted if listed.contains(name) => back.push(name.clone()),
            _ => {}
        }
    }
    let strangers: Vec<&String> = listed.iter().filter(|n| !fates.contains_key(*n)).collect();
    let kept = fates.values().filter(|f| **f == Fate::Created).count();
    let deleted = fates.values().filter(|f| **f == Fate::Deleted).count();
    println!(
        "load: {} VMs created, {deleted} deleted, {kept} kept, {} listed after the load",
        fates.len(),
        listed.len()
    );
    assert!(lost.is_empty(), "acknowledged VMs lost: {lost:?}");
    assert!(back.is_empty(), "acknowledged deletes came back: {back:?}");
    assert!(strangers.is_empty(), "VMs nobody created: {strangers:?}");
    assert!(kept > 0 && deleted > 0, "{fates:?}");

    // No processes, no descriptors, no files left behind.
    let children = children_of(second_pid);
    assert!(children.is_empty(), "the daemon has children: {children:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fds = fd_count(second_pid);
        if fds <= baseline_fds + 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon holds {fds} descriptors after the load, {baseline_fds} before"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let defined = names_in(&d.state_dir().join("vms"), ".json");
    assert_eq!(defined, listed, "definitions on disk and listed VMs differ");
    let tmp = names_in(&d.state_dir().join("vms"), ".tmp");
    assert!(tmp.is_empty(), "temporary definitions left: {tmp:?}");
    let statuses = names_in(&d.run_dir().join("status"), ".json");
    let orphans: Vec<&String> = statuses.difference(&defined).collect();
    assert!(
        orphans.is_empty(),
        "status files without a definition: {orphans:?}"
    );
    let run_dirs = names_in(&d.run_dir().join("vms"), "");
    let orphans: Vec<&String> = run_dirs.difference(&defined).collect();
    assert!(
        orphans.is_empty(),
        "run directories without a definition: {orphans:?}"
    );
    assert_ne!(first_pid, second_pid);
}
