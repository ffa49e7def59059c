//! The policy engine as the API shows it: the host-wide settings
//! (`/v1/policy`), a VM's own policy (`/v1/vms/{id}/policy`, kept in its
//! spec) and the audit of decisions (`/v1/vms/{id}/policy/decisions`).
//! The engine itself lives in the daemon and in `kiln-policy`; these types
//! only carry what a client reads and writes.

use serde::{Deserialize, Serialize};

/// A lever the engine can move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lever {
    /// The balloon target (guest memory handed back to the host).
    Balloon,
    /// vCPU thread affinity and CPU weight.
    Vcpu,
    /// The I/O worker's CPU set and poll/notify mode.
    Worker,
}

impl Lever {
    pub const ALL: [Lever; 3] = [Lever::Balloon, Lever::Vcpu, Lever::Worker];

    pub fn as_str(self) -> &'static str {
        match self {
            Lever::Balloon => "balloon",
            Lever::Vcpu => "vcpu",
            Lever::Worker => "worker",
        }
    }
}

/// What the engine does with a lever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeverMode {
    /// Decide nothing.
    #[default]
    Off,
    /// Decide and record, never act.
    Shadow,
    /// Decide, record and act.
    Active,
}

impl LeverMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LeverMode::Off => "off",
            LeverMode::Shadow => "shadow",
            LeverMode::Active => "active",
        }
    }
}

/// One mode per lever; every lever is off until someone turns it on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeverModes {
    pub balloon: LeverMode,
    pub vcpu: LeverMode,
    pub worker: LeverMode,
}

impl LeverModes {
    pub fn get(&self, lever: Lever) -> LeverMode {
        match lever {
            Lever::Balloon => self.balloon,
            Lever::Vcpu => self.vcpu,
            Lever::Worker => self.worker,
        }
    }
}

/// How long the engine watches before it trusts what it sees. The defaults
/// suit hosts that run for days; a test or a short demo shortens them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyWindows {
    /// The heuristic balloon's working-set window: a target is proposed
    /// only once one window has closed (VPA-like; default 300 s).
    pub balloon_window_s: f64,
    /// Before this much time has passed only the heuristic decides, while
    /// the rollback baselines are measured (default 600 s).
    pub model_warmup_s: f64,
    /// Window over which a guarded metric is compared with its baseline
    /// before a model is rolled back (default 600 s).
    pub rollback_window_s: f64,
    /// Least time between two inflations of one balloon (default 30 s);
    /// deflations are never delayed.
    pub balloon_min_interval_s: f64,
}

impl Default for PolicyWindows {
    fn default() -> Self {
        PolicyWindows {
            balloon_window_s: 300.0,
            model_warmup_s: 600.0,
            rollback_window_s: 600.0,
            balloon_min_interval_s: 30.0,
        }
    }
}

/// Bounds on every window, seconds: long enough to mean something, short
/// enough that a typo does not switch the engine off for a year.
pub const WINDOW_RANGE_S: (f64, f64) = (1.0, 86_400.0);
/// Bounds on the control interval, milliseconds.
pub const INTERVAL_RANGE_MS: (u64, u64) = (100, 60_000);

impl PolicyWindows {
    /// Problems, one line each.
    pub fn problems(&self) -> Vec<String> {
        let (lo, hi) = WINDOW_RANGE_S;
        [
            ("balloon_window_s", self.balloon_window_s),
            ("model_warmup_s", self.model_warmup_s),
            ("rollback_window_s", self.rollback_window_s),
            ("balloon_min_interval_s", self.balloon_min_interval_s),
        ]
        .into_iter()
        .filter(|(_, v)| !(v.is_finite() && *v >= lo && *v <= hi))
        .map(|(name, v)| format!("windows.{name} is {v}; it must be between {lo} and {hi} s"))
        .collect()
    }
}

/// `GET|PUT /v1/policy`: the host-wide settings. A PUT replaces them all
/// (fields left out take their defaults) and is durable before its 200.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySettings {
    pub levers: LeverModes,
    /// The one switch: while true every lever is off, whatever `levers` says.
    pub all_off: bool,
    /// Free memory the host keeps for itself: the engine never deflates a
    /// balloon (gives memory back) past what leaves this much available.
    pub host_reserve_mib: u64,
    /// Time between two control rounds.
    pub interval_ms: u64,
    pub windows: PolicyWindows,
}

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            levers: LeverModes::default(),
            all_off: false,
            host_reserve_mib: 256,
            interval_ms: 1000,
            windows: PolicyWindows::default(),
        }
    }
}

impl PolicySettings {
    /// The mode a lever really has (the `all_off` switch wins).
    pub fn effective(&self, lever: Lever) -> LeverMode {
        if self.all_off {
            LeverMode::Off
        } else {
            self.levers.get(lever)
        }
    }

    /// Problems, one line each; `host_mem_mib` bounds the reserve.
    pub fn problems(&self, host_mem_mib: u64) -> Vec<String> {
        let mut out = self.windows.problems();
        let (lo, hi) = INTERVAL_RANGE_MS;
        if !(lo..=hi).contains(&self.interval_ms) {
            out.push(format!(
                "interval_ms is {}; it must be between {lo} and {hi}",
                self.interval_ms
            ));
        }
        if self.host_reserve_mib >= host_mem_mib {
            out.push(format!(
                "host_reserve_mib is {} MiB; the host has {host_mem_mib} MiB",
                self.host_reserve_mib
            ));
        }
        out
    }
}

/// What kind of guest a VM is, as a hint to the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmClassHint {
    /// Its vCPUs' run-queue wait is what users notice.
    LatencyCritical,
    /// Throughput matters, latency does not.
    Batch,
    /// Request-serving, with a daily cycle.
    Service,
    /// Interactive, mostly idle.
    Desktop,
    #[default]
    General,
}

/// `GET|PUT /v1/vms/{id}/policy`, also the spec's `policy` section. It can
/// change while the VM runs.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmPolicy {
    pub class: VmClassHint,
    /// The balloon never leaves the guest less than this, MiB; `None` lets
    /// the engine derive a floor from the guest's own statistics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_floor_mib: Option<u64>,
    /// Levers the engine leaves alone for this VM.
    pub opt_out: Vec<Lever>,
}

impl VmPolicy {
    pub fn opted_out(&self, lever: Lever) -> bool {
        self.opt_out.contains(&lever)
    }

    /// Problems against the VM's memory, one line each.
    pub fn problems(&self, vm_memory_mib: u64) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(floor) = self.memory_floor_mib {
            if floor >= vm_memory_mib {
                out.push(format!(
                    "memory_floor_mib is {floor} MiB; the VM has {vm_memory_mib} MiB, so the \
                     floor must be below that"
                ));
            }
        }
        let mut seen = Vec::new();
        for lever in &self.opt_out {
            if seen.contains(lever) {
                out.push(format!("opt_out lists {} twice", lever.as_str()));
            }
            seen.push(*lever);
        }
        out
    }
}

/// What became of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionOutcome {
    /// The actuator acted and the read-back confirmed it.
    Applied,
    /// Shadow mode: recorded, no actuator called.
    Shadow,
    /// The actuator failed or the read-back disagreed (`detail` says how);
    /// the lever waits before it is tried again for this VM.
    Failed,
    /// Not tried: the lever is backing off after a failure for this VM.
    BackingOff,
}

/// One input of a decision, as given to the model or heuristic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionInput {
    pub name: String,
    pub value: f64,
}

/// One entry of the audit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Increases by one per decision, across daemon restarts.
    pub seq: u64,
    /// Unix time in milliseconds.
    pub time_ms: u64,
    pub vm: String,
    pub lever: Lever,
    pub mode: LeverMode,
    pub inputs: Vec<DecisionInput>,
    /// `name@version` of the model that decided, or `None` for the heuristic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_output: Option<f64>,
    /// The action after guardrails, in words ("balloon 2048 -> 1984 MiB").
    pub action: String,
    /// Guardrails that changed or overruled the raw decision.
    pub guardrails: Vec<String>,
    /// Why, in words.
    pub reason: String,
    pub outcome: DecisionOutcome,
    /// What the actuator or read-back said, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `GET /v1/vms/{id}/policy/decisions`: newest last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionList {
    pub decisions: Vec<Decision>,
}

/// A model the engine loaded (or failed to load) for a lever.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelStatus {
    pub lever: Lever,
    /// `name@version`, or `None` when the lever runs the heuristic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Why the heuristic decides instead, when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heuristic_because: Option<String>,
}

/// `GET /v1/policy`: the settings and what the engine is doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub settings: PolicySettings,
    /// The mode each lever has now (`all_off` applied).
    pub effective: LeverModes,
    pub models: Vec<ModelStatus>,
    /// Control rounds run since the daemon started.
    pub rounds: u64,
    /// Rounds in which a VMM did not answer in time, summed over VMMs.
    pub vmm_skipped: u64,
    /// Actuator calls that failed or did not read back, since start.
    pub actuator_failures: u64,
    /// Decisions recorded since start.
    pub decisions: u64,
    /// Wall time of the last control round, µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_round_us: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_off_wins_over_every_lever() {
        let mut s = PolicySettings::default();
        s.levers.balloon = LeverMode::Active;
        s.levers.vcpu = LeverMode::Shadow;
        assert_eq!(s.effective(Lever::Balloon), LeverMode::Active);
        s.all_off = true;
        for lever in Lever::ALL {
            assert_eq!(s.effective(lever), LeverMode::Off);
        }
    }

    #[test]
    fn settings_out_of_range_are_named() {
        let mut s = PolicySettings::default();
        assert!(s.problems(4096).is_empty());
        s.interval_ms = 5;
        s.host_reserve_mib = 4096;
        s.windows.balloon_window_s = f64::NAN;
        let p = s.problems(4096);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p.iter().any(|l| l.contains("interval_ms")));
        assert!(p.iter().any(|l| l.contains("balloon_window_s")));
    }

    #[test]
    fn vm_policy_floor_must_be_below_memory() {
        let p = VmPolicy {
            memory_floor_mib: Some(512),
            opt_out: vec![Lever::Vcpu, Lever::Vcpu],
            ..Default::default()
        };
        let problems = p.problems(512);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(VmPolicy::default().problems(512).is_empty());
    }

    #[test]
    fn settings_parse_with_defaults_and_refuse_unknown_fields() {
        let s: PolicySettings = serde_json::from_str(r#"{"levers":{"balloon":"shadow"}}"#).unwrap();
        assert_eq!(s.levers.balloon, LeverMode::Shadow);
        assert_eq!(s.levers.vcpu, LeverMode::Off);
        assert_eq!(s.interval_ms, 1000);
        assert!(serde_json::from_str::<PolicySettings>(r#"{"levrs":{}}"#).is_err());
        assert!(serde_json::from_str::<VmPolicy>(r#"{"opt_out":["disk"]}"#).is_err());
    }
}
