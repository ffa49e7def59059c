//! `kiln policy`: the engine's offline tools (simulator, traces, training
//! data; kiln-policy) and the live engine inside the daemon (modes, a VM's
//! policy, decisions; through the REST API).

use anyhow::{bail, Result};
use clap::Subcommand;
use kiln_api::{
    Decision, DecisionOutcome, DecisionQuery, Lever, LeverMode, LeverModes, PolicySettings,
    PolicyStatus, VmClassHint, VmPolicy,
};
use serde::de::DeserializeOwned;

use crate::api_cli::{output, runtime, ApiArgs};

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// The daemon's engine: each lever's mode, the models, rounds and failures.
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Changes the daemon's engine settings (the rest stay as they are).
    Set(SetArgs),
    /// Shows a VM's policy, or changes it (also while the VM runs).
    Vm(VmPolicyArgs),
    /// A VM's decisions: inputs, model, action after guardrails, reason, outcome.
    Decisions(DecisionsArgs),
    #[command(flatten)]
    Offline(kiln_policy::cli::PolicyCommand),
}

const MODES: [&str; 3] = ["off", "shadow", "active"];
const LEVERS: [&str; 3] = ["balloon", "vcpu", "worker"];
const CLASSES: [&str; 5] = ["latency_critical", "batch", "service", "desktop", "general"];

#[derive(clap::Args, Debug)]
pub struct SetArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The balloon lever: off, shadow (decide and record) or active (act).
    #[arg(long, value_parser = MODES)]
    balloon: Option<String>,
    /// vCPU affinity and CPU weight.
    #[arg(long, value_parser = MODES)]
    vcpu: Option<String>,
    /// I/O worker CPUs and poll/notify.
    #[arg(long, value_parser = MODES)]
    worker: Option<String>,
    /// Every lever at once (before --balloon/--vcpu/--worker).
    #[arg(long, value_parser = MODES, value_name = "MODE")]
    all: Option<String>,
    /// The one switch: `true` turns every lever off whatever its mode,
    /// `false` gives the levers their modes back.
    #[arg(long, value_name = "BOOL")]
    all_off: Option<bool>,
    /// Memory the host keeps available, MiB.
    #[arg(long, value_name = "MIB")]
    host_reserve_mib: Option<u64>,
    /// Time between two control rounds, ms.
    #[arg(long, value_name = "MS")]
    interval_ms: Option<u64>,
    /// The heuristic balloon's working-set window, s.
    #[arg(long, value_name = "S")]
    balloon_window_s: Option<f64>,
    /// Time before the models decide (the heuristic does meanwhile), s.
    #[arg(long, value_name = "S")]
    model_warmup_s: Option<f64>,
    /// Window over which a model's guarded metric is compared, s.
    #[arg(long, value_name = "S")]
    rollback_window_s: Option<f64>,
    /// Least time between two inflations of one balloon, s.
    #[arg(long, value_name = "S")]
    balloon_min_interval_s: Option<f64>,
}

#[derive(clap::Args, Debug)]
pub struct VmPolicyArgs {
    #[command(flatten)]
    api: ApiArgs,
    name: String,
    /// What kind of guest this is.
    #[arg(long, value_parser = CLASSES)]
    class: Option<String>,
    /// The balloon never leaves the guest less than this, MiB.
    #[arg(long, value_name = "MIB", conflicts_with = "no_memory_floor")]
    memory_floor_mib: Option<u64>,
    /// Let the engine derive the floor from the guest's statistics.
    #[arg(long)]
    no_memory_floor: bool,
    /// Levers the engine leaves alone for this VM (comma-separated).
    #[arg(long, value_delimiter = ',', value_parser = LEVERS)]
    opt_out: Option<Vec<String>>,
    /// Levers the engine may move again for this VM (comma-separated).
    #[arg(long, value_delimiter = ',', value_parser = LEVERS)]
    opt_in: Option<Vec<String>>,
}

impl VmPolicyArgs {
    fn changes_something(&self) -> bool {
        self.class.is_some()
            || self.memory_floor_mib.is_some()
            || self.no_memory_floor
            || self.opt_out.is_some()
            || self.opt_in.is_some()
    }

    fn apply(&self, mut p: VmPolicy) -> VmPolicy {
        if let Some(c) = &self.class {
            p.class = wire::<VmClassHint>(c);
        }
        if let Some(floor) = self.memory_floor_mib {
            p.memory_floor_mib = Some(floor);
        }
        if self.no_memory_floor {
            p.memory_floor_mib = None;
        }
        for lever in self.opt_out.iter().flatten().map(|l| wire::<Lever>(l)) {
            if !p.opt_out.contains(&lever) {
                p.opt_out.push(lever);
            }
        }
        let opt_in: Vec<Lever> = self.opt_in.iter().flatten().map(|l| wire(l)).collect();
        p.opt_out.retain(|l| !opt_in.contains(l));
        p
    }
}

#[derive(clap::Args, Debug)]
pub struct DecisionsArgs {
    #[command(flatten)]
    api: ApiArgs,
    name: String,
    /// Only this lever's decisions.
    #[arg(long, value_parser = LEVERS)]
    lever: Option<String>,
    /// At most this many, the newest.
    #[arg(long, default_value_t = 20)]
    limit: usize,
}

/// A value clap already checked against the wire names, as its type.
fn wire<T: DeserializeOwned>(s: &str) -> T {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .expect("clap checks the value against the wire names")
}

pub fn run(cmd: PolicyCommand) -> Result<()> {
    match cmd {
        PolicyCommand::Offline(cmd) => kiln_policy::cli::run(cmd),
        PolicyCommand::Status { api } => {
            let client = api.client()?;
            runtime()?.block_on(async {
                let status = client.policy().await?;
                output(&api, &status, status_text)
            })
        }
        PolicyCommand::Set(args) => {
            let client = args.api.client()?;
            runtime()?.block_on(async {
                let mut settings = client.policy().await?.settings;
                apply_set(&args, &mut settings)?;
                let status = client.set_policy(&settings).await?;
                output(&args.api, &status, status_text)
            })
        }
        PolicyCommand::Vm(args) => {
            let client = args.api.client()?;
            runtime()?.block_on(async {
                let mut policy = client.vm_policy(&args.name).await?;
                if args.changes_something() {
                    policy = client
                        .set_vm_policy(&args.name, &args.apply(policy))
                        .await?;
                }
                output(&args.api, &policy, |p| vm_policy_text(&args.name, p))
            })
        }
        PolicyCommand::Decisions(args) => {
            let client = args.api.client()?;
            runtime()?.block_on(async {
                let query = DecisionQuery {
                    lever: args.lever.as_deref().map(wire),
                    limit: Some(args.limit),
                };
                let list = client.decisions(&args.name, &query).await?;
                output(&args.api, &list, |l| decisions_text(&l.decisions))
            })
        }
    }
}

fn apply_set(args: &SetArgs, s: &mut PolicySettings) -> Result<()> {
    let mode = |m: &Option<String>| m.as_deref().map(wire::<LeverMode>);
    if let Some(all) = mode(&args.all) {
        s.levers = LeverModes {
            balloon: all,
            vcpu: all,
            worker: all,
        };
    }
    let levers = &mut s.levers;
    for (arg, slot) in [
        (&args.balloon, &mut levers.balloon),
        (&args.vcpu, &mut levers.vcpu),
        (&args.worker, &mut levers.worker),
    ] {
        if let Some(m) = mode(arg) {
            *slot = m;
        }
    }
    let w = &mut s.windows;
    for (arg, slot) in [
        (args.balloon_window_s, &mut w.balloon_window_s),
        (args.model_warmup_s, &mut w.model_warmup_s),
        (args.rollback_window_s, &mut w.rollback_window_s),
        (args.balloon_min_interval_s, &mut w.balloon_min_interval_s),
    ] {
        if let Some(v) = arg {
            *slot = v;
        }
    }
    if let Some(v) = args.all_off {
        s.all_off = v;
    }
    if let Some(v) = args.host_reserve_mib {
        s.host_reserve_mib = v;
    }
    if let Some(v) = args.interval_ms {
        s.interval_ms = v;
    }
    let nothing = args.all.is_none()
        && args.balloon.is_none()
        && args.vcpu.is_none()
        && args.worker.is_none()
        && args.all_off.is_none()
        && args.host_reserve_mib.is_none()
        && args.interval_ms.is_none()
        && args.balloon_window_s.is_none()
        && args.model_warmup_s.is_none()
        && args.rollback_window_s.is_none()
        && args.balloon_min_interval_s.is_none();
    if nothing {
        bail!("nothing to set: give at least one of --balloon, --vcpu, --worker, --all, --all-off, --host-reserve-mib, --interval-ms or a window (see `kiln policy set --help`)");
    }
    Ok(())
}

fn status_text(st: &PolicyStatus) -> String {
    let s = &st.settings;
    let mut out = String::new();
    if s.all_off {
        out.push_str("ALL LEVERS OFF (all_off is set; `kiln policy set --all-off false` gives them their modes back)\n");
    }
    out.push_str(&format!(
        "{:<8} {:<7} {:<7} MODEL\n",
        "LEVER", "MODE", "SET"
    ));
    for lever in Lever::ALL {
        let model = st
            .models
            .iter()
            .find(|m| m.lever == lever)
            .map(|m| match (&m.model, &m.heuristic_because) {
                (Some(name), _) => name.clone(),
                (None, Some(why)) => format!("heuristic ({why})"),
                (None, None) => "heuristic".to_owned(),
            })
            .unwrap_or_else(|| "-".to_owned());
        out.push_str(&format!(
            "{:<8} {:<7} {:<7} {model}\n",
            lever.as_str(),
            st.effective.get(lever).as_str(),
            s.levers.get(lever).as_str()
        ));
    }
    let w = &s.windows;
    out.push_str(&format!(
        "interval {} ms, host reserve {} MiB; windows: balloon {} s, model warm-up {} s, rollback {} s, balloon inflations {} s apart\n",
        s.interval_ms,
        s.host_reserve_mib,
        w.balloon_window_s,
        w.model_warmup_s,
        w.rollback_window_s,
        w.balloon_min_interval_s
    ));
    out.push_str(&format!(
        "rounds {}, decisions {}, actuator failures {}, VMM answers missed {}",
        st.rounds, st.decisions, st.actuator_failures, st.vmm_skipped
    ));
    if let Some(us) = st.last_round_us {
        out.push_str(&format!(", last round {us} µs"));
    }
    out.push('\n');
    out
}

fn vm_policy_text(name: &str, p: &VmPolicy) -> String {
    let class = serde_json::to_value(p.class)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let floor = p
        .memory_floor_mib
        .map(|f| format!("{f} MiB"))
        .unwrap_or_else(|| "from the guest's statistics".to_owned());
    let opt_out: Vec<&str> = p.opt_out.iter().map(|l| l.as_str()).collect();
    format!(
        "{name}: class {class}, memory floor {floor}, opted out of: {}\n",
        if opt_out.is_empty() {
            "nothing".to_owned()
        } else {
            opt_out.join(", ")
        }
    )
}

fn decisions_text(decisions: &[Decision]) -> String {
    if decisions.is_empty() {
        return "no decisions yet (is a lever in shadow or active mode? `kiln policy status`)\n"
            .to_owned();
    }
    let mut out = String::new();
    for d in decisions {
        let outcome = match d.outcome {
            DecisionOutcome::Applied => "applied",
            DecisionOutcome::Shadow => "shadow",
            DecisionOutcome::Failed => "FAILED",
            DecisionOutcome::BackingOff => "backing off",
        };
        let by = d.model.as_deref().unwrap_or("heuristic");
        out.push_str(&format!(
            "#{} {} {}: {} [{outcome}, {by}]\n    {}\n",
            d.seq,
            d.lever.as_str(),
            d.mode.as_str(),
            d.action,
            d.reason
        ));
        if !d.guardrails.is_empty() {
            out.push_str(&format!("    guardrails: {}\n", d.guardrails.join(", ")));
        }
        if let Some(detail) = &d.detail {
            out.push_str(&format!("    {detail}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: PolicyCommand,
    }

    fn set_args(argv: &[&str]) -> SetArgs {
        let mut full = vec!["kiln-policy", "set"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full).expect("parses").cmd {
            PolicyCommand::Set(a) => a,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn set_changes_only_what_is_given() {
        let mut s = PolicySettings::default();
        apply_set(
            &set_args(&[
                "--all",
                "shadow",
                "--balloon",
                "active",
                "--balloon-window-s",
                "20",
            ]),
            &mut s,
        )
        .unwrap();
        assert_eq!(s.levers.balloon, LeverMode::Active);
        assert_eq!(s.levers.vcpu, LeverMode::Shadow);
        assert_eq!(s.windows.balloon_window_s, 20.0);
        assert_eq!(s.windows.model_warmup_s, 600.0);
        assert!(apply_set(&set_args(&[]), &mut s).is_err());
        assert!(Cli::try_parse_from(["k", "set", "--vcpu", "on"]).is_err());
    }

    #[test]
    fn vm_policy_opt_in_undoes_opt_out() {
        let cli = Cli::try_parse_from([
            "k",
            "vm",
            "web",
            "--opt-out",
            "balloon,vcpu",
            "--class",
            "batch",
        ])
        .unwrap();
        let PolicyCommand::Vm(args) = cli.cmd else {
            panic!()
        };
        let p = args.apply(VmPolicy::default());
        assert_eq!(p.opt_out, vec![Lever::Balloon, Lever::Vcpu]);
        assert_eq!(p.class, VmClassHint::Batch);
        let cli = Cli::try_parse_from(["k", "vm", "web", "--opt-in", "vcpu"]).unwrap();
        let PolicyCommand::Vm(args) = cli.cmd else {
            panic!()
        };
        assert_eq!(args.apply(p).opt_out, vec![Lever::Balloon]);
    }

    #[test]
    fn offline_commands_are_still_there() {
        assert!(matches!(
            Cli::try_parse_from(["k", "host"]).map(|c| c.cmd),
            Ok(PolicyCommand::Offline(_))
        ));
    }
}
