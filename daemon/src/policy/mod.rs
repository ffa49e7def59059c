//! The policy engine inside `kiln serve`: one control loop over the
//! running VMs (telemetry from their VMMs and the host, the learned
//! engine of `kiln-policy` behind its guardrails, actuators that read
//! back), its durable settings, the audit of its decisions, its counters
//! and the routes that show and steer it.

pub mod actuate;
pub mod decisions;
pub mod round;
pub mod routes;
pub mod settings;
pub mod telemetry;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_api::engine::{
    Decision, DecisionOutcome, Lever, LeverMode, LeverModes, ModelStatus, PolicySettings,
    PolicyStatus, VmPolicy,
};
use kiln_api::{ErrorCode, EventType};
use kiln_policy::engine::Models;
use kiln_policy::live::LiveHost;

use crate::events::now_ms;
use crate::http::Failure;
use crate::vms::Manager;
use decisions::DecisionLog;
use round::Controller;
use settings::SettingsFile;

const OUTCOMES: [DecisionOutcome; 4] = [
    DecisionOutcome::Applied,
    DecisionOutcome::Shadow,
    DecisionOutcome::Failed,
    DecisionOutcome::BackingOff,
];

fn outcome_name(o: DecisionOutcome) -> &'static str {
    match o {
        DecisionOutcome::Applied => "applied",
        DecisionOutcome::Shadow => "shadow",
        DecisionOutcome::Failed => "failed",
        DecisionOutcome::BackingOff => "backing_off",
    }
}

#[derive(Default)]
struct Stats {
    rounds: AtomicU64,
    vmm_skipped: AtomicU64,
    round_us_sum: AtomicU64,
    last_round_us: Mutex<Option<u64>>,
    decisions: Mutex<BTreeMap<(Lever, &'static str), u64>>,
    failures: Mutex<BTreeMap<Lever, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The engine's state shared by its loop and the API.
pub struct PolicyService {
    settings: Mutex<PolicySettings>,
    file: SettingsFile,
    log: Mutex<DecisionLog>,
    stats: Stats,
    /// The models directory found at start, or why none was.
    models_dir: Result<PathBuf, String>,
    models: Mutex<Vec<ModelStatus>>,
    host_mem_mib: u64,
    changed: tokio::sync::Notify,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Settings(#[from] crate::store::StoreError),
    #[error("the decision log {path}: {source}")]
    Decisions {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What each lever runs: its model, or the heuristic and why.
/// The models in `dir`, or none (the heuristic) when no directory was found.
fn load(dir: &Result<PathBuf, String>) -> Models {
    match dir {
        Ok(dir) => Models::load_or_heuristic(dir),
        Err(_) => Models::default(),
    }
}

fn model_status(models: &Models, dir: &Result<PathBuf, String>) -> Vec<ModelStatus> {
    let runtime = kiln_policy::model::runtime().err().map(|e| e.to_string());
    // Why a lever without a model runs the heuristic.
    let why = |name: &str| match dir {
        Err(not_found) => not_found.clone(),
        Ok(_) if runtime.is_some() => runtime.clone().unwrap_or_default(),
        Ok(dir) => match kiln_policy::model::Model::load(dir, name) {
            Err(e) => e.to_string(),
            Ok(_) => "its model does not match the engine's features".into(),
        },
    };
    let one = |lever: Lever, name: &str, m: Option<&kiln_policy::model::Model>| ModelStatus {
        lever,
        model: m.map(|m| format!("{}@{}", m.schema.name, m.schema.version)),
        heuristic_because: m.is_none().then(|| why(name)),
    };
    vec![
        one(Lever::Balloon, "balloon", models.balloon.as_ref()),
        one(Lever::Vcpu, "cpu", models.cpu.as_ref()),
        one(Lever::Worker, "device", models.device.as_ref()),
    ]
}

impl PolicyService {
    /// Loads the settings and the decision log under `<state_dir>/policy`.
    pub fn open(state_dir: &Path, models: Option<&Path>) -> Result<Arc<PolicyService>, OpenError> {
        let models_dir = match kiln_policy::install::models_dir(models) {
            Ok(found) => {
                tracing::info!(
                    "policy models from {} ({})",
                    found.path.display(),
                    found.why
                );
                Ok(found.path)
            }
            Err(e) => {
                tracing::warn!("{e}; the policy engine runs the heuristic");
                Err(e.to_string())
            }
        };
        let dir = state_dir.join("policy");
        let file = SettingsFile::open(dir.clone())?;
        let settings = file.load()?;
        let path = dir.join("decisions.ndjson");
        let log = DecisionLog::open(path.clone(), decisions::ROTATE_BYTES)
            .map_err(|source| OpenError::Decisions { path, source })?;
        Ok(Arc::new(PolicyService {
            settings: Mutex::new(settings),
            file,
            log: Mutex::new(log),
            stats: Stats::default(),
            models_dir,
            models: Mutex::new(Vec::new()),
            host_mem_mib: crate::host::read().memory_bytes >> 20,
            changed: tokio::sync::Notify::new(),
        }))
    }

    pub fn settings(&self) -> PolicySettings {
        lock(&self.settings).clone()
    }

    pub fn status(&self) -> PolicyStatus {
        let settings = self.settings();
        let effective = LeverModes {
            balloon: settings.effective(Lever::Balloon),
            vcpu: settings.effective(Lever::Vcpu),
            worker: settings.effective(Lever::Worker),
        };
        PolicyStatus {
            settings,
            effective,
            models: lock(&self.models).clone(),
            rounds: self.stats.rounds.load(Ordering::Relaxed),
            vmm_skipped: self.stats.vmm_skipped.load(Ordering::Relaxed),
            actuator_failures: lock(&self.stats.failures).values().sum(),
            decisions: lock(&self.stats.decisions).values().sum(),
            last_round_us: *lock(&self.stats.last_round_us),
        }
    }

    /// Validates, stores (durably) and takes new settings.
    pub fn set_settings(&self, new: PolicySettings) -> Result<PolicyStatus, Failure> {
        let problems = new.problems(self.host_mem_mib);
        if !problems.is_empty() {
            return Err(Failure(
                kiln_api::ApiError::new(ErrorCode::InvalidRequest, "invalid policy settings")
                    .with_causes(problems),
            ));
        }
        {
            let mut cur = lock(&self.settings);
            self.file
                .save(&new)
                .map_err(|e| Failure::internal("cannot store the policy settings", &e))?;
            *cur = new;
        }
        self.changed.notify_one();
        Ok(self.status())
    }

    /// Refuses a manual change of `lever` on a VM whose lever the engine
    /// drives (active, not opted out): the next round would undo it.
    pub fn refuse_manual(&self, lever: Lever, vm: &str, policy: &VmPolicy) -> Result<(), Failure> {
        if round::vm_mode(&self.settings(), policy, lever) != LeverMode::Active {
            return Ok(());
        }
        let l = lever.as_str();
        Err(Failure::new(
            ErrorCode::PolicyActive,
            format!(
                "the policy engine drives the {l} lever of VM {vm:?} (mode active), so a manual \
                 change would be undone; release it first: set levers.{l} to shadow or off with \
                 PUT /v1/policy (or all_off), or opt this VM out with PUT /v1/vms/{vm}/policy \
                 {{\"opt_out\": [\"{l}\"]}}"
            ),
        ))
    }

    pub fn decisions(&self, vm: &str, lever: Option<Lever>, limit: usize) -> Vec<Decision> {
        lock(&self.log).query(vm, lever, limit)
    }

    /// Prometheus text of the engine's counters.
    pub fn render_metrics(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP kiln_policy_rounds_total Control rounds the policy engine ran.\n\
             # TYPE kiln_policy_rounds_total counter"
        );
        let _ = writeln!(
            out,
            "kiln_policy_rounds_total {}",
            self.stats.rounds.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP kiln_policy_decisions_total Decisions recorded, by lever and outcome.\n\
             # TYPE kiln_policy_decisions_total counter"
        );
        let decisions = lock(&self.stats.decisions).clone();
        for lever in Lever::ALL {
            for o in OUTCOMES {
                let n = decisions
                    .get(&(lever, outcome_name(o)))
                    .copied()
                    .unwrap_or(0);
                let _ = writeln!(
                    out,
                    "kiln_policy_decisions_total{{lever=\"{}\",outcome=\"{}\"}} {n}",
                    lever.as_str(),
                    outcome_name(o)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP kiln_policy_actuator_failures_total Actuator calls that failed or did not read back.\n\
             # TYPE kiln_policy_actuator_failures_total counter"
        );
        let failures = lock(&self.stats.failures).clone();
        for lever in Lever::ALL {
            let _ = writeln!(
                out,
                "kiln_policy_actuator_failures_total{{lever=\"{}\"}} {}",
                lever.as_str(),
                failures.get(&lever).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(
            out,
            "# HELP kiln_policy_vmm_skipped_total VMMs left out of a round for not answering in time.\n\
             # TYPE kiln_policy_vmm_skipped_total counter\n\
             kiln_policy_vmm_skipped_total {}",
            self.stats.vmm_skipped.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP kiln_policy_round_seconds Wall time of the control rounds.\n\
             # TYPE kiln_policy_round_seconds summary\n\
             kiln_policy_round_seconds_sum {}\n\
             kiln_policy_round_seconds_count {}",
            self.stats.round_us_sum.load(Ordering::Relaxed) as f64 / 1e6,
            self.stats.rounds.load(Ordering::Relaxed)
        );
    }

    /// Records a round's decisions: the audit, events for each, counters.
    fn record(&self, vms: &Manager, report: round::RoundReport) {
        for d in report.decisions {
            let d = lock(&self.log).push(d);
            *lock(&self.stats.decisions)
                .entry((d.lever, outcome_name(d.outcome)))
                .or_default() += 1;
            let mut msg = format!(
                "{} {} [{}]: {}",
                d.mode.as_str(),
                d.lever.as_str(),
                outcome_name(d.outcome),
                d.reason
            );
            if let Some(detail) = &d.detail {
                let _ = write!(msg, " ({detail})");
            }
            vms.events
                .emit(EventType::EngineDecision, Some(&d.vm), None, msg);
        }
        for lever in report.failures {
            *lock(&self.stats.failures).entry(lever).or_default() += 1;
        }
    }

    /// Starts the control loop. It runs a round every `interval_ms` while
    /// any lever is on; the API never waits for it.
    pub fn spawn_loop(self: &Arc<Self>, vms: Arc<Manager>) {
        let me = Arc::clone(self);
        tokio::spawn(async move { me.run(vms).await });
    }

    async fn run(self: Arc<Self>, vms: Arc<Manager>) {
        let dir = self.models_dir.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let live = LiveHost::open()?;
            let models = load(&dir);
            let status = model_status(&models, &dir);
            Ok::<_, kiln_policy::telemetry::TelemetryError>((live, models, status))
        })
        .await;
        let (live, models, status) = match opened {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                tracing::error!("the policy engine does not run: {e}");
                return;
            }
            Err(e) => {
                tracing::error!("the policy engine does not run: {e}");
                return;
            }
        };
        *lock(&self.models) = status;
        let settings = self.settings();
        let dir = self.models_dir.clone();
        let controller = Arc::new(Mutex::new(Controller::new(
            live,
            models,
            settings.windows,
            settings.interval_ms as f64 / 1000.0,
            Box::new(move || load(&dir)),
        )));
        let in_flight = Arc::new(Mutex::new(HashSet::new()));
        let mut last_error: Option<String> = None;
        loop {
            let settings = self.settings();
            let started = Instant::now();
            if Lever::ALL
                .iter()
                .any(|&l| settings.effective(l) != LeverMode::Off)
            {
                let targets = vms.policy_targets().await;
                let (samples, skipped, why) = telemetry::gather(targets, &in_flight).await;
                if skipped > 0 {
                    self.stats.vmm_skipped.fetch_add(skipped, Ordering::Relaxed);
                    for (vm, e) in &why {
                        tracing::debug!("policy round: VM {vm} skipped: {e}");
                    }
                }
                let ctl = Arc::clone(&controller);
                let st = settings.clone();
                let done = tokio::task::spawn_blocking(move || {
                    lock(&ctl).round(&samples, &st, &mut actuate::HostOps, now_ms())
                })
                .await;
                match done {
                    Ok(Ok(report)) => {
                        last_error = None;
                        tracing::debug!(
                            "policy round: {} decisions, engine {} µs",
                            report.decisions.len(),
                            report.engine_us
                        );
                        self.record(&vms, report);
                    }
                    Ok(Err(e)) => {
                        if last_error.as_deref() != Some(e.as_str()) {
                            tracing::warn!("policy round failed: {e}");
                        }
                        last_error = Some(e);
                    }
                    Err(e) => tracing::error!("policy round panicked: {e}"),
                }
                let us = started.elapsed().as_micros() as u64;
                self.stats.rounds.fetch_add(1, Ordering::Relaxed);
                self.stats.round_us_sum.fetch_add(us, Ordering::Relaxed);
                *lock(&self.stats.last_round_us) = Some(us);
            }
            let interval = Duration::from_millis(settings.interval_ms);
            let wait = interval.saturating_sub(started.elapsed());
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.changed.notified() => {}
            }
        }
    }
}
