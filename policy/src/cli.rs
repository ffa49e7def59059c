//! `kiln policy ...`: the subcommands the `kiln` binary embeds.

use crate::eval::{run_policy, table, targets, PolicyResult};
use crate::host::Host;
use crate::trace::Trace;
use crate::tracegen::{generate, GenSpec, Split, DEFAULT_MIX};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Replay a trace in the simulator under each policy and report the figures.
    Eval(EvalArgs),
    /// Write a synthetic, seeded trace (shapes documented in policy/README.md).
    GenTrace(GenTraceArgs),
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
    #[arg(long, value_delimiter = ',', default_value = "static,static-pin,mom,vpa,packspread,learned")]
    pub policies: Vec<String>,
    /// Directory with the learned models and their schema files.
    #[arg(long, default_value = default_models_dir())]
    pub models: PathBuf,
    /// Write a markdown report with PNG plots into this directory.
    #[arg(long)]
    pub report: Option<PathBuf>,
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
    /// Shape weights: service,batch,leak,desktop,latency-critical.
    #[arg(long, value_delimiter = ',', num_args = 5)]
    pub mix: Option<Vec<f64>>,
    /// Output file.
    #[arg(long, short)]
    pub out: PathBuf,
}

pub const fn default_models_dir() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/models")
}

pub fn run(cmd: PolicyCommand) -> Result<()> {
    match cmd {
        PolicyCommand::Eval(a) => eval(a),
        PolicyCommand::GenTrace(a) => gen_trace(a),
    }
}

fn gen_trace(a: GenTraceArgs) -> Result<()> {
    let mut mix = DEFAULT_MIX;
    if let Some(m) = a.mix {
        mix.copy_from_slice(&m);
    }
    let spec = GenSpec { vms: a.vms, hours: a.hours, step_s: a.step_s, seed: a.seed, split: a.split, mix };
    let trace = generate(&spec)?;
    let f = std::fs::File::create(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    trace.write(f).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote {} ({} VMs x {} steps)", a.out.display(), trace.vms.len(), trace.steps);
    Ok(())
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let host = Host::load(&a.host).context("loading the host description")?;
    let trace = Trace::load(&a.trace).context("loading the trace")?;
    let mut results: Vec<PolicyResult> = Vec::new();
    for name in &a.policies {
        let mut policy: Box<dyn crate::policies::Policy> = match name.as_str() {
            n => match crate::policies::baseline(n) {
                Some(p) => Box::new(p),
                None => bail!("unknown policy {n:?}; known: {}, learned", crate::policies::BASELINES.join(", ")),
            },
        };
        let r = run_policy(&host, &trace, policy.as_mut())?;
        eprintln!("{name}: simulated in {:.2} s", r.wall_s);
        results.push(r);
    }
    println!(
        "trace {} ({} VMs x {} steps of {} s) on host {} ({} CPUs, {} MiB)\n",
        a.trace.display(),
        trace.vms.len(),
        trace.steps,
        trace.step_s,
        a.host.display(),
        host.cpus,
        host.memory_mib
    );
    print!("{}", table(&results));
    for line in targets(&results) {
        println!("{line}");
    }
    Ok(())
}
