//! The VM table and its supervisor: definitions (durable in the store),
//! live status, one `kiln-vmm` process per running VM watched through a
//! pidfd, restart policies with back-off, and re-adoption of VMMs that
//! outlived a previous daemon.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kiln_api::{
    ApiError, ErrorCode, EventType, ExitKind, RestartAction, RestartRecord, VmInfo, VmSpec,
    VmState, VmStatus,
};
use kiln_vmm::protocol::{self as ctl, BalloonInfo, Counters, Request};
use kiln_vmm::{HostLimits, OnReboot, SerialConsole, SocketConsole};
use tokio::sync::{watch, Mutex};

use crate::events::{now_ms, EventLog};
use crate::http::Failure;
use crate::process::{self, Cgroups, PidFd, ProcessRecord, WaitStatus};
use crate::rundir::RunDir;
use crate::state::{self, Action};
use crate::store::Store;

mod lifecycle;
mod policy;
mod workers;

pub use lifecycle::{shutdown_timeout, DEFAULT_SHUTDOWN_TIMEOUT, MAX_SHUTDOWN_TIMEOUT};

/// Restarts kept in a VM's status.
const RESTARTS_KEPT: usize = 32;
/// How long `stop` waits for the VMM to be gone after SIGKILL.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// How long a new VMM has to answer the protocol hello on its control
/// socket before it is killed as crashed.
const HELLO_WAIT: Duration = Duration::from_secs(15);
/// Timeout of one control request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the supervisor keeps things and what it starts.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub vmm_binary: PathBuf,
    /// Where each VMM's console log rotates (see `kiln_vmm::console_log`).
    pub console_log_limit: u64,
    /// How long a shutdown waits for the guest to power off when the
    /// request names no timeout (`--shutdown-timeout`).
    pub shutdown_timeout: Duration,
}

/// One run of a VM's VMM.
struct Run {
    pid: u32,
    pidfd: PidFd,
    /// Started by this daemon (so it can reap it and read its wait status).
    child: bool,
    /// A stop was asked for: the exit is `stopped`, not a crash.
    stop_requested: AtomicBool,
    /// A shutdown (or reboot) was asked for: however the run ends, the
    /// restart policy is not applied.
    shutdown_requested: AtomicBool,
    /// Becomes true once the exit is recorded.
    ended: watch::Sender<bool>,
    /// Why the daemon killed it, when it did so on its own (no hello).
    kill_reason: std::sync::Mutex<Option<String>>,
}

struct Entry {
    spec: VmSpec,
    status: VmStatus,
    run: Option<Arc<Run>>,
    /// Bumped by every request on the VM, so a pending policy restart made
    /// before it does not fire after it.
    epoch: u64,
}

impl Entry {
    fn info(&self) -> VmInfo {
        VmInfo {
            spec: self.spec.clone(),
            status: self.status.clone(),
        }
    }
}

pub struct Manager {
    vms: Mutex<BTreeMap<String, Entry>>,
    definitions: Store,
    /// The last status of each VM, so `crashed`/`shutoff` survive a daemon
    /// restart (in the run directory: it describes this boot of the host).
    statuses: Store,
    pub events: EventLog,
    cgroups: Cgroups,
    config: SupervisorConfig,
    host: HostLimits,
}

fn new_status(state: VmState) -> VmStatus {
    VmStatus {
        state,
        pid: None,
        last_exit: None,
        reason: None,
        restarts: Vec::new(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Events(#[from] crate::events::EventLogError),
}

impl Manager {
    /// Loads the definitions, re-adopts VMMs still running from the run
    /// directory, marks vanished ones crashed, and (on the first start since
    /// the host booted) starts the `autostart` VMs.
    pub async fn open(config: SupervisorConfig) -> Result<Arc<Manager>, OpenError> {
        let definitions = Store::open(config.state_dir.join("vms"))?;
        let statuses = Store::open(config.run_dir.join("status"))?;
        let events = EventLog::open(config.state_dir.join("events.ndjson"), 10_000)?;
        let manager = Arc::new(Manager {
            vms: Mutex::new(BTreeMap::new()),
            definitions,
            statuses,
            events,
            cgroups: Cgroups::detect(),
            host: HostLimits::of_this_host(),
            config,
        });
        manager.events.emit(
            EventType::DaemonStarted,
            None,
            None,
            format!("kiln serve {} started", env!("CARGO_PKG_VERSION")),
        );
        manager.recover().await?;
        manager.autostart().await;
        Ok(manager)
    }

    pub fn host_limits(&self) -> HostLimits {
        self.host
    }

    async fn recover(self: &Arc<Self>) -> Result<(), OpenError> {
        let specs: Vec<(String, VmSpec)> = self.definitions.load_all()?;
        let statuses: BTreeMap<String, VmStatus> = self
            .statuses
            .load_all::<VmStatus>()
            .unwrap_or_else(|e| {
                tracing::warn!("last VM states not readable, starting from defined: {e}");
                Vec::new()
            })
            .into_iter()
            .collect();
        let mut vms = self.vms.lock().await;
        for (name, spec) in specs {
            if spec.name != name {
                tracing::warn!(
                    "definition file {name}.json names VM {:?}; skipped",
                    spec.name
                );
                continue;
            }
            let status = statuses
                .get(&name)
                .cloned()
                .unwrap_or_else(|| new_status(VmState::Defined));
            let mut entry = Entry {
                spec,
                status,
                run: None,
                epoch: 0,
            };
            self.readopt(&name, &mut entry);
            vms.insert(name, entry);
        }
        self.sweep_orphans(&vms, statuses.keys());
        Ok(())
    }

    /// Removes the live state of VMs that have no definition: a delete
    /// removes the definition first (that is its commit point), so a
    /// daemon killed during the rest of it leaves the status file, run
    /// directory and cgroup behind. A run directory whose VMM still runs
    /// is left alone (and said).
    fn sweep_orphans<'a>(
        &self,
        defined: &BTreeMap<String, Entry>,
        statuses: impl Iterator<Item = &'a String>,
    ) {
        for name in statuses.filter(|n| !defined.contains_key(*n)) {
            if let Err(e) = self.statuses.remove(name) {
                tracing::warn!("deleted VM {name}: {e}");
            }
        }
        let Ok(dirs) = std::fs::read_dir(self.config.run_dir.join("vms")) else {
            return;
        };
        for dir in dirs.flatten() {
            let Some(name) = dir.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if defined.contains_key(&name) {
                continue;
            }
            let rd = RunDir::new(&self.config.run_dir, &name);
            let alive = rd
                .read_record()
                .filter(|r| process::start_time(r.pid).is_ok_and(|t| t == r.start_time));
            if let Some(r) = alive {
                tracing::warn!(
                    "{}: VMM pid {} runs for a VM without a definition; left alone",
                    rd.dir.display(),
                    r.pid
                );
                continue;
            }
            tracing::info!("deleted VM {name}: removing what its delete left");
            if let Err(e) = rd.remove() {
                tracing::warn!("deleted VM {name}: removing its run directory: {e}");
            }
            self.cgroups.remove(&name);
        }
    }

    /// Takes over `name`'s VMM if its record names a process that still
    /// runs (same pid and start time); else, if the VM was active, it ended
    /// while no daemon watched: its exit record says how, none means crashed.
    fn readopt(self: &Arc<Self>, name: &str, entry: &mut Entry) {
        let rd = RunDir::new(&self.config.run_dir, name);
        let record = rd.read_record();
        let alive = record
            .as_ref()
            .filter(|r| process::start_time(r.pid).is_ok_and(|t| t == r.start_time));
        if let Some(record) = alive {
            match PidFd::open(record.pid) {
                Ok(pidfd) => {
                    // The handshake confirms it is a VMM and says its build;
                    // one that does not answer is adopted all the same
                    // (pid and start time match), with the reason said.
                    let hello = ctl::Client::connect(&rd.control_socket(), CONTROL_TIMEOUT)
                        .map(|c| c.hello().clone());
                    let (state, note) = match &hello {
                        Ok(h) if h.pid == record.pid => (
                            VmState::Running,
                            format!("protocol {}, build {}", h.protocol, h.build_id),
                        ),
                        Ok(h) => (VmState::Running, format!("hello names pid {}", h.pid)),
                        Err(e) => (VmState::Running, format!("no hello: {e}")),
                    };
                    let run = self.track(name, record.pid, pidfd, false);
                    // A shutdown was under way when the daemon died: it
                    // goes on (and keeps the restart policy out of it).
                    let resume_shutdown = entry.status.state == VmState::Stopping;
                    let (state, note) = if resume_shutdown {
                        self.resume_shutdown(name, Arc::clone(&run));
                        (
                            VmState::Stopping,
                            format!(
                                "{note}; the shutdown goes on, hard stop in {} s",
                                self.config.shutdown_timeout.as_secs()
                            ),
                        )
                    } else {
                        (state, note)
                    };
                    entry.run = Some(run);
                    entry.status.state = state;
                    entry.status.pid = Some(record.pid);
                    entry.status.reason = hello.is_err().then(|| note.clone());
                    self.persist_status(name, &entry.status);
                    self.events.emit(
                        EventType::Adopted,
                        Some(name),
                        Some(state),
                        format!("VMM pid {} still runs; adopted ({note})", record.pid),
                    );
                    return;
                }
                Err(e) => tracing::warn!("VM {name}: pidfd of pid {}: {e}", record.pid),
            }
        }
        if record.is_some() || entry.status.state.is_active() {
            let (kind, why) = match rd.read_exit() {
                Some(exit) => (
                    exit.kind,
                    format!("ended while the daemon was down: {}", exit.message),
                ),
                None => (
                    ExitKind::Crash,
                    "its VMM vanished while the daemon was down (no exit record)".into(),
                ),
            };
            rd.clear_record();
            self.record_exit(name, entry, kind, why);
        }
    }

    async fn autostart(self: &Arc<Self>) {
        let marker = self.config.run_dir.join("autostarted");
        if marker.exists() {
            tracing::info!("not the first start since boot: autostart VMs were started already");
            return;
        }
        let mut vms = self.vms.lock().await;
        let names: Vec<String> = vms
            .iter()
            .filter(|(_, e)| e.spec.autostart && !e.status.state.is_active())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            if let Some(entry) = vms.get_mut(&name) {
                self.launch(&name, entry);
            }
        }
        if let Err(e) = std::fs::write(&marker, b"") {
            tracing::warn!("{}: {e}", marker.display());
        }
    }

    pub async fn list(&self) -> Vec<VmInfo> {
        self.vms.lock().await.values().map(Entry::info).collect()
    }

    pub async fn get(&self, name: &str) -> Result<VmInfo, Failure> {
        let vms = self.vms.lock().await;
        vms.get(name)
            .map(Entry::info)
            .ok_or_else(|| ApiError::vm_not_found(name).into())
    }

    /// Memory and vCPUs of the VMs that run, and counts.
    pub async fn usage(&self) -> (u64, u32, u32, u32) {
        let vms = self.vms.lock().await;
        let mut mem = 0u64;
        let mut cpus = 0u32;
        let mut running = 0;
        for e in vms.values().filter(|e| e.status.state.is_active()) {
            mem = mem.saturating_add(e.spec.machine.memory_bytes());
            cpus = cpus.saturating_add(e.spec.machine.cpus);
            running += 1;
        }
        (mem, cpus, vms.len() as u32, running)
    }

    /// Defines a VM (durable before this returns), and starts it if asked.
    pub async fn create(self: &Arc<Self>, spec: VmSpec, start: bool) -> Result<VmInfo, Failure> {
        spec.validate(&self.host)?;
        let mut vms = self.vms.lock().await;
        if vms.contains_key(&spec.name) {
            return Err(Failure::new(
                ErrorCode::NameTaken,
                format!("a VM named {:?} exists already", spec.name),
            ));
        }
        self.definitions
            .put(&spec.name, &spec)
            .map_err(|e| Failure::internal("cannot store the VM definition", &e))?;
        let name = spec.name.clone();
        let mut entry = Entry {
            spec,
            status: new_status(VmState::Defined),
            run: None,
            epoch: 0,
        };
        self.persist_status(&name, &entry.status);
        self.events.emit(
            EventType::VmDefined,
            Some(&name),
            Some(VmState::Defined),
            "defined",
        );
        if start {
            self.launch(&name, &mut entry);
        }
        let info = entry.info();
        vms.insert(name, entry);
        Ok(info)
    }

    /// Replaces a VM's spec: any field when it does not run, only the live
    /// fields (restart policy, autostart, labels, the engine policy) when it does.
    pub async fn replace(&self, name: &str, spec: VmSpec) -> Result<VmInfo, Failure> {
        if spec.name != name {
            return Err(Failure::new(
                ErrorCode::InvalidRequest,
                format!(
                    "the spec names {:?}, the path {name:?}: a VM cannot be renamed",
                    spec.name
                ),
            ));
        }
        spec.validate(&self.host)?;
        let mut vms = self.vms.lock().await;
        let entry = vms
            .get_mut(name)
            .ok_or_else(|| ApiError::vm_not_found(name))?;
        if entry.status.state.is_active() {
            let not_live: Vec<&str> = entry
                .spec
                .changed_fields(&spec)
                .into_iter()
                .filter(|f| !kiln_api::spec::LIVE_FIELDS.contains(f))
                .collect();
            if !not_live.is_empty() {
                return Err(Failure(
                    ApiError::new(
                        ErrorCode::InvalidState,
                        format!(
                            "VM {name:?} is {}: only {} change while it runs",
                            entry.status.state.as_str(),
                            kiln_api::spec::LIVE_FIELDS.join(", ")
                        ),
                    )
                    .with_causes(not_live.iter().map(|f| format!("{f} differs")).collect()),
                ));
            }
        }
        self.definitions
            .put(name, &spec)
            .map_err(|e| Failure::internal("cannot store the VM definition", &e))?;
        entry.spec = spec;
        entry.epoch += 1;
        self.events.emit(
            EventType::VmUpdated,
            Some(name),
            Some(entry.status.state),
            "spec replaced",
        );
        Ok(entry.info())
    }

    /// Deletes a VM; a running one only with `force`, which stops it first.
    pub async fn delete(&self, name: &str, force: bool) -> Result<(), Failure> {
        let run = {
            let mut vms = self.vms.lock().await;
            let entry = vms
                .get_mut(name)
                .ok_or_else(|| ApiError::vm_not_found(name))?;
            entry.epoch += 1;
            if entry.status.state.is_active() && !force {
                return Err(Failure::new(
                    ErrorCode::InvalidState,
                    format!(
                        "VM {name:?} is {}; stop it first or delete with ?force=true",
                        entry.status.state.as_str()
                    ),
                ));
            }
            entry.run.clone()
        };
        if let Some(run) = run {
            stop_run(&run).await?;
        }
        let mut vms = self.vms.lock().await;
        let Some(entry) = vms.get(name) else {
            // Deleted by a concurrent request meanwhile.
            return Ok(());
        };
        if entry.status.state.is_active() {
            return Err(Failure::new(
                ErrorCode::InvalidState,
                format!("VM {name:?} was started again while it was being deleted"),
            ));
        }
        self.definitions
            .remove(name)
            .map_err(|e| Failure::internal("cannot remove the VM definition", &e))?;
        vms.remove(name);
        if let Err(e) = self.statuses.remove(name) {
            tracing::warn!("VM {name}: {e}");
        }
        if let Err(e) = RunDir::new(&self.config.run_dir, name).remove() {
            tracing::warn!("VM {name}: removing its run directory: {e}");
        }
        self.cgroups.remove(name);
        self.events
            .emit(EventType::VmDeleted, Some(name), None, "deleted");
        Ok(())
    }

    /// Starts a VM's VMM. Returns its info after the start (`running`, or
    /// `crashed` when the VMM could not start).
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<VmInfo, Failure> {
        let mut vms = self.vms.lock().await;
        let entry = vms
            .get_mut(name)
            .ok_or_else(|| ApiError::vm_not_found(name))?;
        state::check(entry.status.state, Action::Start)
            .map_err(|why| Failure::new(ErrorCode::InvalidState, why))?;
        entry.epoch += 1;
        self.launch(name, entry);
        Ok(entry.info())
    }

    /// Hard-stops a VM (SIGKILL of its VMM) and waits until it is shutoff.
    pub async fn stop(&self, name: &str) -> Result<VmInfo, Failure> {
        let run = {
            let mut vms = self.vms.lock().await;
            let entry = vms
                .get_mut(name)
                .ok_or_else(|| ApiError::vm_not_found(name))?;
            state::check(entry.status.state, Action::Stop)
                .map_err(|why| Failure::new(ErrorCode::InvalidState, why))?;
            entry.epoch += 1;
            entry.run.clone()
        };
        if let Some(run) = run {
            stop_run(&run).await?;
        }
        self.get(name).await
    }

    /// The tail of a VM's console log.
    pub async fn console(&self, name: &str, max: u64) -> Result<Vec<u8>, Failure> {
        if !self.vms.lock().await.contains_key(name) {
            return Err(ApiError::vm_not_found(name).into());
        }
        RunDir::new(&self.config.run_dir, name)
            .console_tail(max)
            .map_err(|e| Failure::internal("cannot read the console log", &e))
    }

    /// Connects to a running VM's serial console socket and reads its
    /// greeting: the stream then carries the raw console both ways. A VM
    /// that does not run is `invalid_state`, and so is a console with
    /// every client slot taken.
    pub async fn console_connect(&self, name: &str) -> Result<tokio::net::UnixStream, Failure> {
        let socket = self
            .running_run_dir(name, "its console is attached only while it runs")
            .await?
            .console_socket();
        crate::console::connect(&socket)
            .await
            .map_err(|why| Failure::new(ErrorCode::InvalidState, format!("VM {name:?}: {why}")))
    }

    /// Starts the VM's VMM. A failure to start is the VM's crash (state
    /// `crashed`, an event), not an error of the request.
    fn launch(self: &Arc<Self>, name: &str, entry: &mut Entry) {
        match self.spawn_vmm(name, entry) {
            Ok(run) => {
                entry.status.pid = Some(run.pid);
                entry.status.reason = None;
                entry.run = Some(Arc::clone(&run));
                self.set_state(name, entry, VmState::Starting, "VMM started");
                self.await_hello(name, run);
            }
            Err(why) => {
                tracing::warn!("VM {name}: {why}");
                self.record_exit(name, entry, ExitKind::Crash, why);
                self.apply_policy(name, entry, ExitKind::Crash);
            }
        }
    }

    fn spawn_vmm(self: &Arc<Self>, name: &str, entry: &Entry) -> Result<Arc<Run>, String> {
        let rd = RunDir::new(&self.config.run_dir, name);
        rd.prepare()
            .map_err(|e| format!("cannot prepare {}: {e}", rd.dir.display()))?;
        let mut config = entry.spec.machine.clone();
        config.serial = SerialConsole::Socket(SocketConsole {
            path: rd.console_socket(),
            log: Some(rd.console_log()),
            log_limit_bytes: self.config.console_log_limit,
        });
        config.on_reboot = OnReboot::Exit;
        if entry.spec.agent.is_some() {
            // The guest agent's way in: a vsock whose socket the daemon
            // places (the spec may not set machine.vsock as well).
            config.vsock = Some(kiln_devices_vsock(rd.agent_socket()));
            config.assign_device_ids();
        }
        let text = serde_json::to_vec_pretty(&config).expect("configs serialize");
        std::fs::write(rd.config(), text)
            .map_err(|e| format!("cannot write {}: {e}", rd.config().display()))?;
        let mut cmd = Command::new(&self.config.vmm_binary);
        cmd.arg("--config")
            .arg(rd.config())
            .arg("--control")
            .arg(rd.control_socket())
            .arg("--exit-record")
            .arg(rd.exit_record());
        let pid = process::spawn(cmd, &rd.vmm_log(), &self.cgroups, name)
            .map_err(|e| format!("cannot start {}: {e}", self.config.vmm_binary.display()))?;
        let pidfd = PidFd::open(pid).map_err(|e| format!("pidfd of VMM pid {pid}: {e}"))?;
        match process::start_time(pid) {
            Ok(start_time) => {
                let record = ProcessRecord {
                    pid,
                    start_time,
                    binary: self.config.vmm_binary.clone(),
                    daemon_version: env!("CARGO_PKG_VERSION").into(),
                };
                if let Err(e) = rd.write_record(&record) {
                    tracing::warn!("VM {name}: process record not written (no re-adoption): {e}");
                }
            }
            // It is already gone: the watcher records how it ended.
            Err(e) => tracing::debug!("VM {name}: start time of pid {pid}: {e}"),
        }
        Ok(self.track(name, pid, pidfd, true))
    }

    /// Watches a VMM until it exits, then records the exit.
    fn track(self: &Arc<Self>, name: &str, pid: u32, pidfd: PidFd, child: bool) -> Arc<Run> {
        let (ended, _) = watch::channel(false);
        let run = Arc::new(Run {
            pid,
            pidfd,
            child,
            stop_requested: AtomicBool::new(false),
            shutdown_requested: AtomicBool::new(false),
            ended,
            kill_reason: std::sync::Mutex::new(None),
        });
        let me = Arc::clone(self);
        let name = name.to_owned();
        let watched = Arc::clone(&run);
        tokio::spawn(async move { me.watch(name, watched).await });
        run
    }

    async fn watch(self: Arc<Self>, name: String, run: Arc<Run>) {
        if let Err(e) = run.pidfd.exited().await {
            tracing::error!("VM {name}: waiting for VMM pid {}: {e}", run.pid);
        }
        let wait = if run.child { run.pidfd.reap() } else { None };
        let rd = RunDir::new(&self.config.run_dir, &name);
        let killed_for = run
            .kill_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let (kind, why) = match killed_for {
            Some(why) => (ExitKind::Crash, why),
            None => classify(
                run.stop_requested.load(Ordering::SeqCst),
                wait,
                rd.read_exit(),
                || last_line(&rd),
            ),
        };
        let during_shutdown = run.shutdown_requested.load(Ordering::SeqCst);
        let why = if during_shutdown && kind == ExitKind::Stopped {
            format!("{why} (during a shutdown)")
        } else {
            why
        };
        rd.clear_record();
        self.cgroups.remove(&name);
        let mut vms = self.vms.lock().await;
        if let Some(entry) = vms.get_mut(&name) {
            if entry.run.as_ref().is_some_and(|r| Arc::ptr_eq(r, &run)) {
                entry.run = None;
                self.record_exit(&name, entry, kind, why);
                if during_shutdown {
                    self.events.emit(
                        EventType::PolicyDecision,
                        Some(&name),
                        Some(entry.status.state),
                        "the end of a requested shutdown: the restart policy does not apply",
                    );
                } else {
                    self.apply_policy(&name, entry, kind);
                }
            }
        }
        drop(vms);
        run.ended.send_replace(true);
    }

    /// Records the end of a run: state, last exit, reason, events.
    fn record_exit(&self, name: &str, entry: &mut Entry, kind: ExitKind, why: String) {
        entry.status.pid = None;
        entry.status.last_exit = Some(kind);
        let new_state = state::after_exit(kind);
        if kind == ExitKind::Crash {
            self.events
                .emit(EventType::Crashed, Some(name), Some(new_state), why.clone());
        }
        entry.status.reason = Some(why.clone());
        self.set_state(name, entry, new_state, &why);
    }

    fn set_state(&self, name: &str, entry: &mut Entry, state: VmState, why: &str) {
        entry.status.state = state;
        self.persist_status(name, &entry.status);
        self.events.emit(
            EventType::StateChanged,
            Some(name),
            Some(state),
            format!("{}: {why}", state.as_str()),
        );
    }

    fn persist_status(&self, name: &str, status: &VmStatus) {
        if let Err(e) = self.statuses.put(name, status) {
            tracing::warn!("VM {name}: status not persisted: {e}");
        }
    }

    /// What the restart policy says for an ended run, and the restart with
    /// back-off when it says restart.
    fn apply_policy(self: &Arc<Self>, name: &str, entry: &mut Entry, kind: ExitKind) {
        let (rule, action) = match kind {
            ExitKind::Poweroff => ("on_poweroff", entry.spec.restart.on_poweroff),
            ExitKind::Reboot => ("on_reboot", entry.spec.restart.on_reboot),
            ExitKind::Crash => ("on_crash", entry.spec.restart.on_crash),
            // A stop that was asked for is not the policy's business.
            ExitKind::Stopped => return,
        };
        if action == RestartAction::Stop {
            self.events.emit(
                EventType::PolicyDecision,
                Some(name),
                Some(entry.status.state),
                format!("{rule}=stop: the VM stays {}", entry.status.state.as_str()),
            );
            return;
        }
        let delay = backoff(&entry.status.restarts, now_ms());
        self.events.emit(
            EventType::PolicyDecision,
            Some(name),
            Some(entry.status.state),
            format!("{rule}=restart: restarting in {} ms", delay.as_millis()),
        );
        let epoch = entry.epoch;
        let me = Arc::clone(self);
        let name = name.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut vms = me.vms.lock().await;
            let Some(entry) = vms.get_mut(&name) else {
                return;
            };
            if entry.epoch != epoch || entry.status.state.is_active() {
                return;
            }
            entry.status.restarts.push(RestartRecord {
                time_ms: now_ms(),
                after: kind,
                delay_ms: delay.as_millis() as u64,
                cause: kiln_api::RestartCause::Policy,
            });
            let excess = entry.status.restarts.len().saturating_sub(RESTARTS_KEPT);
            entry.status.restarts.drain(..excess);
            me.events.emit(
                EventType::Restarted,
                Some(&name),
                Some(VmState::Starting),
                format!("restarted by {rule}=restart after {} ms", delay.as_millis()),
            );
            me.launch(&name, entry);
        });
    }

    /// Waits for a new VMM's hello on its control socket, then marks the VM
    /// running; a VMM that does not answer in time is killed as crashed.
    fn await_hello(self: &Arc<Self>, name: &str, run: Arc<Run>) {
        let me = Arc::clone(self);
        let name = name.to_owned();
        tokio::spawn(async move {
            let socket = RunDir::new(&me.config.run_dir, &name).control_socket();
            let started = tokio::time::Instant::now();
            let mut ended = run.ended.subscribe();
            let outcome = loop {
                if *ended.borrow_and_update() {
                    return;
                }
                let path = socket.clone();
                let attempt = tokio::task::spawn_blocking(move || {
                    ctl::Client::connect(&path, CONTROL_TIMEOUT).map(|c| c.hello().clone())
                })
                .await;
                match attempt {
                    Ok(Ok(hello)) if hello.pid == run.pid => break Ok(hello),
                    Ok(Ok(hello)) => {
                        break Err(format!(
                            "the hello on {} names pid {}, not {}",
                            socket.display(),
                            hello.pid,
                            run.pid
                        ))
                    }
                    Ok(Err(ctl::ClientError::Version { got })) => {
                        break Err(format!(
                            "the VMM speaks protocol {got}, the daemon {}",
                            ctl::VERSION
                        ))
                    }
                    _ if started.elapsed() > HELLO_WAIT => {
                        break Err(format!(
                            "no hello on {} within {HELLO_WAIT:?}",
                            socket.display()
                        ))
                    }
                    _ => {}
                }
                // A VMM answers within ~15 ms of its start: poll briskly
                // at first, then back off so a slow start costs little.
                let pause = if started.elapsed() < Duration::from_millis(200) {
                    Duration::from_millis(1)
                } else {
                    Duration::from_millis(20)
                };
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = ended.changed() => {}
                }
            };
            let mut vms = me.vms.lock().await;
            let Some(entry) = vms.get_mut(&name) else {
                return;
            };
            let current = entry.run.as_ref().is_some_and(|r| Arc::ptr_eq(r, &run));
            if !current || entry.status.state != VmState::Starting {
                return;
            }
            match outcome {
                Ok(hello) => me.set_state(
                    &name,
                    entry,
                    VmState::Running,
                    &format!(
                        "VMM answered (protocol {}, build {})",
                        hello.protocol, hello.build_id
                    ),
                ),
                Err(why) => {
                    tracing::warn!("VM {name}: {why}; killing its VMM");
                    *run.kill_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                    if let Err(e) = run.pidfd.signal(libc::SIGKILL) {
                        tracing::warn!("VM {name}: SIGKILL of pid {}: {e}", run.pid);
                    }
                }
            }
        });
    }

    /// One request to a running VM's VMM. A refusal by the VMM (a balloon
    /// target above the guest's memory, ...) is `vmm_refused`; a VMM that
    /// does not answer is `invalid_state`.
    async fn control(&self, name: &str, request: Request) -> Result<serde_json::Value, Failure> {
        let socket = self
            .running_run_dir(name, "its VMM is not running")
            .await?
            .control_socket();
        call_vmm(name, socket, request).await
    }

    /// The run directory of a VM whose VMM runs (running or paused); any
    /// other state is `invalid_state`, with `why_not` saying what it means.
    async fn running_run_dir(&self, name: &str, why_not: &str) -> Result<RunDir, Failure> {
        let vms = self.vms.lock().await;
        let entry = vms.get(name).ok_or_else(|| ApiError::vm_not_found(name))?;
        if !matches!(entry.status.state, VmState::Running | VmState::Paused) {
            return Err(Failure::new(
                ErrorCode::InvalidState,
                format!("VM {name:?} is {}: {why_not}", entry.status.state.as_str()),
            ));
        }
        Ok(RunDir::new(&self.config.run_dir, name))
    }

    fn decode<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, Failure> {
        serde_json::from_value(value)
            .map_err(|e| Failure::internal("unexpected answer from the VMM", &e))
    }

    /// Pauses (parks the vCPUs of) a running VM, or resumes a paused one.
    pub async fn pause_or_resume(&self, name: &str, action: Action) -> Result<VmInfo, Failure> {
        {
            let mut vms = self.vms.lock().await;
            let entry = vms
                .get_mut(name)
                .ok_or_else(|| ApiError::vm_not_found(name))?;
            state::check(entry.status.state, action)
                .map_err(|why| Failure::new(ErrorCode::InvalidState, why))?;
            entry.epoch += 1;
        }
        let request = match action {
            Action::Pause => Request::Pause {},
            _ => Request::Resume {},
        };
        let status: ctl::Status = Self::decode(self.control(name, request).await?)?;
        let mut vms = self.vms.lock().await;
        let entry = vms
            .get_mut(name)
            .ok_or_else(|| ApiError::vm_not_found(name))?;
        let state = match status.state {
            ctl::RunState::Paused => VmState::Paused,
            ctl::RunState::Running => VmState::Running,
        };
        // Not over a shutdown (or an exit) that came meanwhile.
        if entry.status.state != state
            && matches!(entry.status.state, VmState::Running | VmState::Paused)
        {
            self.set_state(name, entry, state, action.as_str());
        }
        Ok(entry.info())
    }

    /// Sets the balloon target (MiB taken from the guest).
    pub async fn set_balloon(&self, name: &str, target_mib: u64) -> Result<BalloonInfo, Failure> {
        Self::decode(
            self.control(name, Request::SetBalloonTarget { mib: target_mib })
                .await?,
        )
    }

    /// vCPU run/wait time, per-device counters and balloon statistics.
    pub async fn counters(&self, name: &str) -> Result<Counters, Failure> {
        Self::decode(self.control(name, Request::Counters {}).await?)
    }

    /// Where the guest agent of a running VM is reached: its spec needs an
    /// agent section (else `agent_not_configured`), its VMM must run and
    /// not be paused (else `invalid_state`).
    pub async fn agent_target(&self, name: &str) -> Result<crate::agent::AgentTarget, Failure> {
        let vms = self.vms.lock().await;
        let entry = vms.get(name).ok_or_else(|| ApiError::vm_not_found(name))?;
        let Some(agent) = entry.spec.agent else {
            return Err(Failure::new(
                ErrorCode::AgentNotConfigured,
                format!(
                    "VM {name:?} has no agent section in its spec, so the daemon gave it no way \
                     to reach a guest agent (define it with \"agent\": {{}})"
                ),
            ));
        };
        if entry.status.state != VmState::Running {
            return Err(Failure::new(
                ErrorCode::InvalidState,
                format!(
                    "VM {name:?} is {}: programs run only in a running VM",
                    entry.status.state.as_str()
                ),
            ));
        }
        Ok(crate::agent::AgentTarget {
            vm: name.to_owned(),
            socket: RunDir::new(&self.config.run_dir, name).agent_socket(),
            port: agent.port,
        })
    }

    /// Kills every VMM this daemon started (used by tests and for a full
    /// stop; a normal daemon exit leaves VMMs running for re-adoption).
    pub async fn stop_all(&self) {
        let runs: Vec<Arc<Run>> = {
            let mut vms = self.vms.lock().await;
            vms.values_mut()
                .filter_map(|e| {
                    e.epoch += 1;
                    e.run.clone()
                })
                .collect()
        };
        for run in runs {
            if let Err(e) = stop_run(&run).await {
                tracing::warn!("stopping VMM pid {}: {:?}", run.pid, e.0);
            }
        }
    }
}

/// One request to the VMM listening on `socket`. A refusal by the VMM is
/// `vmm_refused` (`device_not_found` for a device it does not have); a VMM
/// that does not answer is `invalid_state`.
async fn call_vmm(
    name: &str,
    socket: PathBuf,
    request: Request,
) -> Result<serde_json::Value, Failure> {
    let answer = tokio::task::spawn_blocking(move || {
        ctl::Client::connect(&socket, CONTROL_TIMEOUT)?.call(&request)
    })
    .await
    .map_err(|e| Failure::internal("the control request task failed", &e))?;
    answer.map_err(|e| match e {
        ctl::ClientError::Vmm(body) if body.code == ctl::ErrorCode::NotFound => Failure::new(
            ErrorCode::DeviceNotFound,
            format!("VM {name:?}: {}", body.message),
        ),
        ctl::ClientError::Vmm(body) => {
            Failure::new(ErrorCode::VmmRefused, format!("the VMM refused: {body}"))
        }
        other => Failure::new(
            ErrorCode::InvalidState,
            format!("the VMM of {name:?} does not answer: {other}"),
        ),
    })
}

/// The vsock device of a VM with an agent section (CID 3: each VM has its
/// own device and socket, so CIDs need not differ between VMs).
fn kiln_devices_vsock(uds_path: PathBuf) -> kiln_devices::virtio::vsock::VsockConfig {
    kiln_devices::virtio::vsock::VsockConfig {
        guest_cid: 3,
        uds_path,
        id: String::new(),
    }
}

/// SIGKILLs a VMM through its pidfd and waits until its exit is recorded.
async fn stop_run(run: &Run) -> Result<(), Failure> {
    let mut ended = run.ended.subscribe();
    run.stop_requested.store(true, Ordering::SeqCst);
    if let Err(e) = run.pidfd.signal(libc::SIGKILL) {
        // ESRCH: it exited already; the watcher records it.
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(Failure::internal("cannot signal the VMM", &e));
        }
    }
    tokio::time::timeout(STOP_WAIT, ended.wait_for(|done| *done))
        .await
        .map_err(|_| {
            Failure::new(
                ErrorCode::Internal,
                format!(
                    "VMM pid {} did not end within {STOP_WAIT:?} of SIGKILL",
                    run.pid
                ),
            )
        })?
        .map_err(|_| Failure::new(ErrorCode::Internal, "the VMM watcher ended"))?;
    Ok(())
}

/// How a run ended: a requested stop; else the VMM's exit record; else
/// its wait status (`kiln-vmm` exit codes: 0 power-off, 3 reboot, 5
/// stopped); else
/// (a re-adopted VMM without a record) a crash.
fn classify(
    stop_requested: bool,
    wait: Option<WaitStatus>,
    record: Option<crate::rundir::ExitRecord>,
    last_line: impl FnOnce() -> String,
) -> (ExitKind, String) {
    if stop_requested {
        return (ExitKind::Stopped, "stopped on request".into());
    }
    if let Some(r) = record {
        return (r.kind, r.message);
    }
    match wait {
        Some(WaitStatus::Exited(0)) => (ExitKind::Poweroff, "the guest powered off".into()),
        Some(WaitStatus::Exited(3)) => (ExitKind::Reboot, "the guest rebooted".into()),
        Some(WaitStatus::Exited(code)) if code == i32::from(kiln_vmm::exit::STOPPED) => (
            ExitKind::Stopped,
            "stopped through its control socket".into(),
        ),
        Some(WaitStatus::Exited(code)) => (
            ExitKind::Crash,
            format!("the VMM exited with code {code}: {}", last_line()),
        ),
        Some(WaitStatus::Signaled(sig)) => (
            ExitKind::Crash,
            format!("the VMM was killed by signal {sig}"),
        ),
        None => (
            ExitKind::Crash,
            "the VMM ended without an exit record".into(),
        ),
    }
}

/// The last non-empty line of the VMM's stderr log (its error, usually).
fn last_line(rd: &RunDir) -> String {
    let text = std::fs::read(rd.vmm_log()).unwrap_or_default();
    let tail = &text[text.len().saturating_sub(4096)..];
    String::from_utf8_lossy(tail)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no output)")
        .trim()
        .to_owned()
}

/// 0.5 s, doubling with each restart in the last 10 minutes, at most 60 s.
fn backoff(restarts: &[RestartRecord], now_ms: u64) -> Duration {
    let recent = restarts
        .iter()
        .filter(|r| now_ms.saturating_sub(r.time_ms) < 600_000)
        .count() as u32;
    let ms = 500u64.saturating_mul(1u64 << recent.min(16));
    Duration::from_millis(ms.min(60_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_recent_restarts_and_is_capped() {
        let at = |time_ms| RestartRecord {
            time_ms,
            after: ExitKind::Crash,
            delay_ms: 0,
            cause: kiln_api::RestartCause::Policy,
        };
        let now = 10_000_000;
        assert_eq!(backoff(&[], now), Duration::from_millis(500));
        assert_eq!(
            backoff(&[at(now - 1000), at(now - 2000)], now),
            Duration::from_secs(2)
        );
        // Old restarts do not count.
        assert_eq!(
            backoff(&[at(now - 700_000)], now),
            Duration::from_millis(500)
        );
        let many: Vec<_> = (0..20).map(|i| at(now - i)).collect();
        assert_eq!(backoff(&many, now), Duration::from_secs(60));
    }

    #[test]
    fn exits_are_classified_by_request_record_then_status() {
        let none = || String::from("kiln-vmm: error: KVM_CREATE_VM failed");
        assert_eq!(
            classify(true, Some(WaitStatus::Signaled(9)), None, none).0,
            ExitKind::Stopped
        );
        assert_eq!(
            classify(false, Some(WaitStatus::Exited(0)), None, none).0,
            ExitKind::Poweroff
        );
        assert_eq!(
            classify(false, Some(WaitStatus::Exited(3)), None, none).0,
            ExitKind::Reboot
        );
        let (kind, why) = classify(false, Some(WaitStatus::Exited(1)), None, none);
        assert_eq!(kind, ExitKind::Crash);
        assert!(why.contains("KVM_CREATE_VM"), "{why}");
        assert_eq!(classify(false, None, None, none).0, ExitKind::Crash);
        let record = crate::rundir::ExitRecord {
            kind: ExitKind::Poweroff,
            message: "powered off".into(),
        };
        assert_eq!(
            classify(false, None, Some(record), none).0,
            ExitKind::Poweroff
        );
    }

    #[tokio::test]
    async fn state_a_killed_delete_left_behind_is_swept_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let (state, run) = (dir.path().join("state"), dir.path().join("run"));
        for d in [
            state.join("vms"),
            run.join("status"),
            run.join("vms/ghost"),
            run.join("vms/kept"),
        ] {
            std::fs::create_dir_all(d).unwrap();
        }
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").unwrap();
        let spec = serde_json::json!({"name": "kept", "machine": {"kernel": kernel}});
        std::fs::write(state.join("vms/kept.json"), spec.to_string()).unwrap();
        let status = serde_json::to_string(&new_status(VmState::Defined)).unwrap();
        std::fs::write(run.join("status/kept.json"), &status).unwrap();
        // "ghost" was deleted: its definition went, the rest did not.
        std::fs::write(run.join("status/ghost.json"), &status).unwrap();
        std::fs::write(run.join("vms/ghost/console.log"), b"boot").unwrap();
        let manager = Manager::open(SupervisorConfig {
            state_dir: state,
            run_dir: run.clone(),
            vmm_binary: dir.path().join("no-kiln-vmm"),
            console_log_limit: 4 << 20,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
        })
        .await
        .unwrap();
        let names: Vec<String> = manager
            .list()
            .await
            .into_iter()
            .map(|v| v.spec.name)
            .collect();
        assert_eq!(names, ["kept"]);
        assert!(!run.join("status/ghost.json").exists());
        assert!(!run.join("vms/ghost").exists());
        assert!(run.join("status/kept.json").exists());
        assert!(run.join("vms/kept").exists());
    }
}
