//! `kiln policy ...`: the subcommands the `kiln` binary embeds.

use crate::audit::{AuditLog, AuditQuery, Lever};
use crate::engine::{Engine, Mode};
use crate::eval::{run_policy, table, targets, PolicyResult};
use crate::guardrails::GuardConfig;
use crate::host::Host;
use crate::trace::Trace;
use crate::tracegen::{generate, parse_mix, GenSpec, Split, DEFAULT_MIX};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Replay a trace in the simulator under each policy and report the figures.
    Eval(EvalArgs),
    /// Write a synthetic, seeded trace (shapes documented in policy/README.md).
    GenTrace(GenTraceArgs),
    /// Write training data (the engine's features and the outcomes that followed) from a trace.
    Dataset(DatasetArgs),
    /// Query an audit log written by `eval --audit`.
    Audit(AuditArgs),
    /// Print this host's topology, memory and pressure as the live reader sees them.
    Host(HostArgs),
    /// Generate held-out traces (evaluation split, given seeds), evaluate every
    /// policy on each and print per-trace figures and their medians.
    Bench(BenchArgs),
    /// The evaluation set (shapes and mixes training never sees): write its
    /// traces, check their SHA-256, or evaluate every policy on them.
    EvalSet(EvalSetArgs),
    /// List the learned models (per lever: name@version, file, size, features,
    /// whether it loads), the directory they come from and ONNX Runtime's.
    Models(ModelsArgs),
}

#[derive(Debug, clap::Args)]
pub struct EvalSetArgs {
    /// Write the traces as CSV files into this directory.
    #[arg(long)]
    pub write: Option<PathBuf>,
    /// Also print the SHA-256 of each trace's first hour generated alone (what the unit test checks).
    #[arg(long)]
    pub first_hour_hashes: bool,
    /// Evaluate the policies on every trace, on the roomy and the overcommitted host.
    #[arg(long)]
    pub run: bool,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "static,static-pin,mom,vpa,packspread,heuristic,learned"
    )]
    pub policies: Vec<String>,
    /// Directory with the learned models (default: as for `eval`).
    #[arg(long)]
    pub models: Option<PathBuf>,
    /// Simulate balloons without VIRTIO_BALLOON_F_DEFLATE_ON_OOM (Kiln enables it).
    #[arg(long)]
    pub no_deflate_on_oom: bool,
    /// Only these traces (names as printed), default all.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Append the per-run tables and the verdicts as markdown to this file.
    #[arg(long)]
    pub results: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub cpus_per_poller: usize,
}

#[derive(Debug, clap::Args)]
pub struct ModelsArgs {
    /// Directory with the models (default: $KILN_MODELS_DIR, then where Kiln
    /// is installed, then the source tree).
    #[arg(long)]
    pub models: Option<PathBuf>,
    /// Print the listing as JSON.
    #[arg(long)]
    pub json: bool,
    /// Exit 1 unless every model loads.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(long)]
    pub host: PathBuf,
    /// Seeds of the held-out traces (training uses 1-4).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1001,1002,1003,1004,1005"
    )]
    pub seeds: Vec<u64>,
    #[arg(long, default_value_t = 50)]
    pub vms: usize,
    #[arg(long, default_value_t = 24.0)]
    pub hours: f64,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "static,static-pin,mom,vpa,packspread,learned"
    )]
    pub policies: Vec<String>,
    /// Directory with the learned models (default: searched, see `kiln policy models`).
    #[arg(long)]
    pub models: Option<PathBuf>,
    /// Write the first trace's report (markdown + PNG) into this directory.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// The learned engine runs at most one I/O polling thread per this many host CPUs.
    #[arg(long, default_value_t = 64)]
    pub cpus_per_poller: usize,
    /// Shape mix of the held-out traces: `default`, `wide` (with the issue's
    /// five kinds) or name=weight pairs as for gen-trace.
    #[arg(long, default_value = "default")]
    pub mix: String,
}

#[derive(Debug, clap::Args)]
pub struct DatasetArgs {
    #[arg(long)]
    pub host: PathBuf,
    #[arg(long)]
    pub trace: PathBuf,
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Seed of the exploration of device placements.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep one row in this many steps.
    #[arg(long, default_value_t = 3)]
    pub every: usize,
    /// Append to existing files instead of replacing them.
    #[arg(long)]
    pub append: bool,
}

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// JSON-lines audit file.
    #[arg(long)]
    pub file: PathBuf,
    #[arg(long)]
    pub vm: Option<String>,
    #[arg(long, value_enum)]
    pub lever: Option<Lever>,
    #[arg(long)]
    pub since_s: Option<f64>,
    #[arg(long)]
    pub until_s: Option<f64>,
    /// Only decisions where a guardrail fired.
    #[arg(long)]
    pub guardrails: bool,
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Print full JSON records instead of one line each.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct HostArgs {
    /// Also print it as HOST.toml.
    #[arg(long)]
    pub toml: bool,
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Host description (HOST.toml).
    #[arg(long)]
    pub host: PathBuf,
    /// Trace (TRACE.csv).
    #[arg(long)]
    pub trace: PathBuf,
    /// Comma-separated: static, static-pin, mom, vpa, packspread, heuristic, learned.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "static,static-pin,mom,vpa,packspread,learned"
    )]
    pub policies: Vec<String>,
    /// Directory with the learned models and their schema files (default:
    /// searched, see `kiln policy models`).
    #[arg(long)]
    pub models: Option<PathBuf>,
    /// Write a markdown report with PNG plots into this directory.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Mode of the learned engine.
    #[arg(long, value_enum, default_value_t = Mode::Active)]
    pub mode: Mode,
    /// Append the learned engine's audit log to this JSON-lines file.
    #[arg(long)]
    pub audit: Option<PathBuf>,
    /// Simulate balloons without VIRTIO_BALLOON_F_DEFLATE_ON_OOM (Kiln enables it).
    #[arg(long)]
    pub no_deflate_on_oom: bool,
    /// The learned engine runs at most one I/O polling thread per this many host CPUs.
    #[arg(long, default_value_t = 64)]
    pub cpus_per_poller: usize,
}

#[derive(Debug, clap::Args)]
pub struct GenTraceArgs {
    #[arg(long, default_value_t = 50)]
    pub vms: usize,
    #[arg(long, default_value_t = 24.0)]
    pub hours: f64,
    #[arg(long, default_value_t = 10.0)]
    pub step_s: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Which parameter ranges the shapes draw from (training and evaluation are disjoint).
    #[arg(long, value_enum, default_value_t = Split::Eval)]
    pub split: Split,
    /// Shape weights as name=weight, e.g. `svc=14,batch=10,leak=8,desk=12,lc=6`
    /// (the default); names in policy/README.md. Evaluation-only shapes are
    /// refused with `--split train`.
    #[arg(long)]
    pub mix: Option<String>,
    /// Output file.
    #[arg(long, short)]
    pub out: PathBuf,
}

/// An error and its causes on one line, leaving out a cause whose text the
/// message before it already includes (our error types print their source).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut last = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if !last.contains(&msg) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&msg);
        }
        last = msg;
    }
    out
}

pub fn run(cmd: PolicyCommand) -> Result<()> {
    match cmd {
        PolicyCommand::Eval(a) => eval(a),
        PolicyCommand::GenTrace(a) => gen_trace(a),
        PolicyCommand::Dataset(a) => dataset(a),
        PolicyCommand::Audit(a) => audit(a),
        PolicyCommand::Host(a) => host(a),
        PolicyCommand::Bench(a) => bench(a),
        PolicyCommand::EvalSet(a) => eval_set(a),
        PolicyCommand::Models(a) => models(a),
    }
}

fn make_policy(
    name: &str,
    models_dir: Option<&std::path::Path>,
    mode: Mode,
    audit: Option<&std::path::Path>,
    cpus_per_poller: usize,
) -> Result<Box<dyn crate::policies::Policy>> {
    Ok(match name {
        "learned" => {
            let mut log = AuditLog::new(10_000);
            if let Some(p) = audit {
                log = log.with_file(p)?;
            }
            let models = crate::catalog::load_models(models_dir);
            let label =
                if models.balloon.is_none() && models.cpu.is_none() && models.device.is_none() {
                    "learned(heuristic)"
                } else {
                    "learned"
                };
            let cfg = GuardConfig {
                cpus_per_poller: cpus_per_poller.max(1),
                ..GuardConfig::default()
            };
            Box::new(Engine::new(mode, cfg, models, log).with_name(label))
        }
        // What the engine falls back to, with its guardrails: the engine
        // without models (the bare rules are `policies::heuristic()`).
        "heuristic" => Box::new(
            Engine::new(
                mode,
                GuardConfig {
                    cpus_per_poller: cpus_per_poller.max(1),
                    ..GuardConfig::default()
                },
                crate::engine::Models::default(),
                AuditLog::new(10_000),
            )
            .with_name("heuristic"),
        ),
        n => match crate::policies::baseline(n) {
            Some(p) => Box::new(p),
            None => bail!(
                "unknown policy {n:?}; known: {}, learned",
                crate::policies::BASELINES.join(", ")
            ),
        },
    })
}

fn bench(a: BenchArgs) -> Result<()> {
    let host = Host::load(&a.host).context("loading the host description")?;
    let mut all: Vec<Vec<PolicyResult>> = Vec::new();
    for (k, &seed) in a.seeds.iter().enumerate() {
        let spec = GenSpec {
            vms: a.vms,
            hours: a.hours,
            seed,
            split: Split::Eval,
            mix: parse_mix(&a.mix)?,
            ..GenSpec::default()
        };
        let trace = generate(&spec)?;
        let mut results = Vec::new();
        let mut notes = Vec::new();
        for name in &a.policies {
            let mut p = make_policy(
                name,
                a.models.as_deref(),
                Mode::Active,
                None,
                a.cpus_per_poller,
            )?;
            let r = run_policy(&host, &trace, p.as_mut())?;
            if let Some(b) = p.intervention_breakdown() {
                notes.push(format!("{}: {b}", r.name));
            }
            results.push(r);
        }
        let header = format!(
            "held-out trace seed {seed} (split eval, {} VMs x {} h) on {}",
            a.vms,
            a.hours,
            a.host.display()
        );
        println!("{header}\n{}", table(&results));
        for line in targets(&results) {
            println!("  {line}");
        }
        for n in &notes {
            println!("  guardrails {n}");
        }
        println!();
        if k == 0 {
            if let Some(dir) = &a.report {
                let path = crate::report::write_report(dir, &header, &results, &notes)?;
                eprintln!("report written to {}", path.display());
            }
        }
        all.push(results);
    }
    println!(
        "medians over seeds {:?}:\n{}",
        a.seeds,
        crate::eval::median_table(&all)
    );
    for line in crate::eval::median_targets(&all) {
        println!("  {line}");
    }
    Ok(())
}

fn eval_set(a: EvalSetArgs) -> Result<()> {
    use crate::evalset::{
        judge, overcommitted_host, roomy_host, trace_sha256, verdict_table, SET_NAME, TRACES,
    };
    let opts = crate::sim::SimOptions {
        deflate_on_oom: !a.no_deflate_on_oom,
    };
    let mut md = String::new();
    let mut verdicts: Vec<(String, Vec<crate::evalset::Run>)> = Vec::new();
    for t in TRACES
        .iter()
        .filter(|t| a.only.is_empty() || a.only.iter().any(|o| o == t.name))
    {
        let trace = t.generate()?;
        let h = trace_sha256(&trace);
        let alloc: f64 = trace.vms.iter().map(|v| v.mem_mib).sum();
        let vcpus: u32 = trace.vms.iter().map(|v| v.vcpus).sum();
        let ok = if h == t.sha256 { "ok" } else { "CHANGED" };
        if h != t.sha256 && a.run {
            bail!("evaluation trace {} hashes to {h}, not the recorded {}: the generator changed the evaluation set; make a new set (new name), do not edit this one", t.name, t.sha256);
        }
        println!(
            "{SET_NAME}/{}: seed {}, {} VMs, {vcpus} vCPUs, {:.0} GiB allocated, sha256 {h} ({ok})",
            t.name,
            t.seed,
            trace.vms.len(),
            alloc / 1024.0
        );
        if a.first_hour_hashes {
            println!("  first hour: {}", trace_sha256(&t.generate_first_hour()?));
        }
        if let Some(dir) = &a.write {
            std::fs::create_dir_all(dir)?;
            let path = dir.join(format!("{SET_NAME}-{}.csv", t.name));
            let f = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            trace.write(f)?;
        }
        if !a.run {
            continue;
        }
        for (kind, host) in [
            ("roomy", roomy_host()),
            ("overcommitted", overcommitted_host(&trace)),
        ] {
            let mut results = Vec::new();
            for name in &a.policies {
                let mut p = make_policy(
                    name,
                    a.models.as_deref(),
                    Mode::Active,
                    None,
                    a.cpus_per_poller,
                )?;
                results.push(crate::eval::run_policy_with(
                    &host,
                    &trace,
                    p.as_mut(),
                    opts,
                )?);
            }
            let header = format!(
                "{SET_NAME}/{} on the {kind} host ({} CPUs, {:.0} GiB for guests: {:.2}x memory \
                 overcommitted; deflate-on-OOM {})",
                t.name,
                host.cpus,
                host.guest_memory_mib() / 1024.0,
                alloc / host.guest_memory_mib(),
                if opts.deflate_on_oom { "on" } else { "off" }
            );
            let mut extra =
                String::from("policy      oom-notifier-calls  oom-deflate-MiB  refault-MiB\n");
            for r in &results {
                extra.push_str(&format!(
                    "{:<11} {:>18} {:>16.0} {:>12.0}\n",
                    r.name,
                    r.metrics.oom_deflate_calls,
                    r.metrics.oom_deflate_mib,
                    r.metrics.refault_mib
                ));
            }
            let tbl = table(&results);
            println!("{header}\n{tbl}{extra}");
            md.push_str(&format!("### {header}\n\n```\n{tbl}{extra}```\n\n"));
            for r in &results {
                if r.name.starts_with("learned") || r.name == "heuristic" {
                    let run = format!("{} / {kind}", t.name);
                    let v = judge(&results, &r.name);
                    match verdicts.iter_mut().find(|x| x.0 == r.name) {
                        Some(x) => x.1.push((run, v)),
                        None => verdicts.push((r.name.clone(), vec![(run, v)])),
                    }
                }
            }
        }
    }
    for (engine, runs) in &verdicts {
        let tbl = verdict_table(runs);
        println!("targets for {engine}:\n{tbl}");
        md.push_str(&format!("#### Targets for `{engine}`\n\n{tbl}\n"));
    }
    if let Some(path) = &a.results {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        f.write_all(md.as_bytes())?;
        eprintln!("results appended to {}", path.display());
    }
    Ok(())
}

fn models(a: ModelsArgs) -> Result<()> {
    let listing = crate::catalog::list(a.models.as_deref());
    if a.json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
    } else {
        print!("{}", crate::catalog::render(&listing));
    }
    if a.check {
        if listing.models.is_empty() {
            bail!("no models to check");
        }
        let bad: Vec<String> = listing
            .models
            .iter()
            .filter(|m| m.problem.is_some())
            .map(|m| m.name.clone())
            .collect();
        if !bad.is_empty() {
            bail!("not every model loads: {}", bad.join(", "));
        }
    }
    Ok(())
}

fn dataset(a: DatasetArgs) -> Result<()> {
    let host = Host::load(&a.host).context("loading the host description")?;
    let trace = Trace::load(&a.trace).context("loading the trace")?;
    let s = crate::dataset::write_dataset(&host, &trace, &a.out_dir, a.seed, a.every, a.append)?;
    eprintln!(
        "{}: {} balloon, {} cpu, {} device rows into {}",
        a.trace.display(),
        s.balloon_rows,
        s.cpu_rows,
        s.device_rows,
        a.out_dir.display()
    );
    Ok(())
}

fn audit(a: AuditArgs) -> Result<()> {
    let q = AuditQuery {
        vm: a.vm,
        lever: a.lever,
        since_s: a.since_s,
        until_s: a.until_s,
        guardrail_only: a.guardrails,
        limit: Some(a.limit),
    };
    for r in AuditLog::query_file(&a.file, &q)? {
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            let guards = if r.guardrails.is_empty() {
                String::new()
            } else {
                format!(" [{}]", r.guardrails.join(","))
            };
            println!(
                "t={:>8.0}s {:<10} {:?} {}{} ({})",
                r.t_s,
                r.vm,
                r.lever,
                r.reason,
                guards,
                r.model.as_deref().unwrap_or("heuristic")
            );
        }
    }
    Ok(())
}

fn host(a: HostArgs) -> Result<()> {
    use crate::telemetry::TelemetrySource;
    let mut live = crate::live::LiveHost::open().context("reading this host's sysfs/procfs")?;
    let snap = live.sample().context("sampling this host")?;
    let h = live.host();
    println!(
        "{} CPUs, {} cache groups, {} NUMA nodes, {} MiB",
        h.cpus,
        h.cache_groups.len(),
        h.numa_nodes.len(),
        h.memory_mib
    );
    for (i, g) in h.cache_groups.iter().enumerate() {
        println!("  cache group {i}: CPUs {g} (node {})", h.group_node[i]);
    }
    let t = &snap.host;
    println!(
        "memory available {:.0} of {:.0} MiB; pressure avg10 some: cpu {:.2}% memory {:.2}% io {:.2}%",
        t.mem_available_mib, t.mem_total_mib, t.psi_cpu.some_avg10, t.psi_memory.some_avg10, t.psi_io.some_avg10
    );
    if a.toml {
        print!("{}", h.to_toml());
    }
    Ok(())
}

fn gen_trace(a: GenTraceArgs) -> Result<()> {
    let mix = match &a.mix {
        Some(m) => parse_mix(m)?,
        None => DEFAULT_MIX.to_vec(),
    };
    let spec = GenSpec {
        vms: a.vms,
        hours: a.hours,
        step_s: a.step_s,
        seed: a.seed,
        split: a.split,
        mix,
    };
    let trace = generate(&spec)?;
    let f =
        std::fs::File::create(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    trace
        .write(f)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "wrote {} ({} VMs x {} steps)",
        a.out.display(),
        trace.vms.len(),
        trace.steps
    );
    Ok(())
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let host = Host::load(&a.host).context("loading the host description")?;
    let trace = Trace::load(&a.trace).context("loading the trace")?;
    let mut results: Vec<PolicyResult> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    for name in &a.policies {
        let mut policy = make_policy(
            name,
            a.models.as_deref(),
            a.mode,
            a.audit.as_deref(),
            a.cpus_per_poller,
        )?;
        let opts = crate::sim::SimOptions {
            deflate_on_oom: !a.no_deflate_on_oom,
        };
        let r = crate::eval::run_policy_with(&host, &trace, policy.as_mut(), opts)?;
        eprintln!("{name}: simulated in {:.2} s", r.wall_s);
        if let Some(b) = policy.intervention_breakdown() {
            notes.push(format!("{}: {b}", r.name));
        }
        results.push(r);
    }
    let header = format!(
        "trace {} ({} VMs x {} steps of {} s) on host {} ({} CPUs, {} cache groups, {} NUMA nodes, {} MiB)",
        a.trace.display(),
        trace.vms.len(),
        trace.steps,
        trace.step_s,
        a.host.display(),
        host.cpus,
        host.cache_groups.len(),
        host.numa_nodes.len(),
        host.memory_mib
    );
    println!("{header}\n");
    print!("{}", table(&results));
    for line in targets(&results) {
        println!("{line}");
    }
    for n in &notes {
        println!("guardrails {n}");
    }
    if let Some(dir) = &a.report {
        let path = crate::report::write_report(dir, &header, &results, &notes)?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}
