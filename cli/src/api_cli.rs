//! The CLI over the daemon's REST API: `kiln vm ...` and `kiln host info`.
//! Human tables by default, the API's JSON with `--json`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use kiln_api::{
    Client, Endpoint, Event, EventQuery, EventType, Host, RestartAction, RestartPolicy, VmInfo,
    VmSpec,
};
use kiln_vmm::config::flags::RunArgs;

/// How to reach the daemon, and how to print.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// The daemon's Unix socket.
    #[arg(
        long,
        env = "KILN_SOCKET",
        default_value = "/run/kiln/kiln.sock",
        global = true
    )]
    pub socket: PathBuf,
    /// Reach the daemon over TCP instead: https://HOST:PORT (TLS), or
    /// http://HOST:PORT (plain, loopback only); needs --token.
    #[arg(long, env = "KILN_URL", value_name = "URL", global = true)]
    pub url: Option<String>,
    /// The bearer token for --url.
    #[arg(long, env = "KILN_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// For an https:// --url: the PEM file of the CA that signed the
    /// daemon's certificate (or that certificate, if self-signed); without
    /// it, the system's trusted CAs.
    #[arg(long, env = "KILN_CA_CERT", value_name = "PEM", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ApiArgs {
    pub(crate) fn client(&self) -> Result<Client> {
        match &self.url {
            Some(url) => {
                let endpoint = Endpoint::from_url(url, self.token.clone(), self.ca_cert.clone())
                    .map_err(|e| anyhow::anyhow!("--url {e}"))?;
                Ok(Client::new(endpoint))
            }
            None => Ok(Client::new(Endpoint::Unix(self.socket.clone()))),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Define a VM (and start it with --start).
    Create(Box<CreateArgs>),
    /// Every VM with its state.
    List,
    /// One VM's spec and status.
    Show { name: String },
    /// Start a VM's VMM.
    Start { name: String },
    /// Hard stop: kill the VMM.
    Stop { name: String },
    /// Park the VM's vCPUs.
    Pause { name: String },
    /// Release a paused VM's vCPUs.
    Resume { name: String },
    /// Set the MiB the balloon takes from the guest (0 deflates).
    Balloon { name: String, target_mib: u64 },
    /// vCPU run/wait time, device counters, balloon statistics.
    Counters { name: String },
    /// Delete a VM (a running one only with --force, which stops it).
    Delete {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Attach to the VM's serial console (Ctrl-] detaches), or with --log
    /// print its log.
    Console(crate::console_attach::ConsoleArgs),
    /// The daemon's events (state changes, crashes, restarts, decisions).
    Events(EventsArgs),
    /// Press the ACPI power button; hard stop if the guest has not powered
    /// off after --timeout seconds. Says graceful or forced.
    Shutdown {
        name: String,
        /// Seconds to wait for the guest (1..=600) [default: the daemon's, 60].
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
    },
    /// Shut down (hard stop after --timeout), then start a fresh VMM.
    Reboot {
        name: String,
        /// Seconds to wait for the guest (1..=600) [default: the daemon's, 60].
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
    },
    /// Show a device's I/O worker placement, or change it with flags.
    Worker(WorkerArgs),
    /// Run a program in the VM's guest through its agent: NAME -- CMD ARGS...
    Exec(crate::exec_cli::ExecArgs),
}

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    pub name: String,
    /// The device id (disk0, net0, rng0, ...).
    pub device: String,
    /// Host CPUs the worker may run on: 0,2-3, or `any`.
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub cpus: Option<CpuChoice>,
    /// How the worker waits for work.
    #[arg(long, value_parser = ["notify", "poll"])]
    pub wait: Option<String>,
    /// With --wait poll: µs to spin without work before sleeping.
    #[arg(long, value_name = "US")]
    pub spin_us: Option<u64>,
}

/// `--cpus`: a list, or any CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuChoice(pub Option<Vec<usize>>);

fn parse_cpu_list(s: &str) -> Result<CpuChoice, String> {
    if s == "any" {
        return Ok(CpuChoice(None));
    }
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("{t:?}: want a CPU number (LIST is like 0,2-3, or any)"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b || b - a >= 4096 {
                    return Err(format!("{part:?}: not a range of CPUs"));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(num(part)?),
        }
    }
    Ok(CpuChoice(Some(cpus)))
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// The VM's name: lowercase letters, digits and dashes, at most 63.
    pub name: String,
    #[command(flatten)]
    pub machine: RunArgs,
    /// Start it once defined.
    #[arg(long)]
    pub start: bool,
    /// Start it when the daemon starts (first start after boot).
    #[arg(long)]
    pub autostart: bool,
    /// A label KEY=VALUE. Repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// The restart policy: on_poweroff=restart|stop,on_reboot=...,on_crash=...
    /// [default: on_poweroff=stop,on_reboot=restart,on_crash=stop].
    #[arg(long, value_name = "POLICY", value_parser = parse_policy)]
    pub restart: Option<RestartPolicy>,
    /// Give the VM a vsock device for its guest agent (`kiln vm exec`,
    /// `kiln app run`), the agent on guest port PORT [default: 5252].
    #[arg(long, value_name = "PORT", num_args = 0..=1, default_missing_value = "5252")]
    pub agent: Option<u32>,
}

#[derive(clap::Args, Debug)]
pub struct EventsArgs {
    /// Only events after this sequence number.
    #[arg(long)]
    pub since: Option<u64>,
    /// Only this VM's events.
    #[arg(long)]
    pub vm: Option<String>,
    /// Only events of this type (state_changed, crashed, ...).
    #[arg(long = "type", value_parser = parse_event_type)]
    pub kind: Option<EventType>,
    /// Keep printing new events as they happen.
    #[arg(long, short)]
    pub follow: bool,
}

#[derive(Subcommand, Debug)]
pub enum HostCommand {
    /// CPUs, caches, NUMA nodes, memory, KVM mode and capacity left.
    Info,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: want KEY=VALUE"))
}

fn parse_policy(s: &str) -> Result<RestartPolicy, String> {
    let mut policy = RestartPolicy::default();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: want KEY=restart|stop"))?;
        let action = match value {
            "restart" => RestartAction::Restart,
            "stop" => RestartAction::Stop,
            other => return Err(format!("{key}={other}: want restart or stop")),
        };
        match key {
            "on_poweroff" => policy.on_poweroff = action,
            "on_reboot" => policy.on_reboot = action,
            "on_crash" => policy.on_crash = action,
            other => {
                return Err(format!(
                    "{other:?}: want on_poweroff, on_reboot or on_crash"
                ))
            }
        }
    }
    Ok(policy)
}

fn parse_event_type(s: &str) -> Result<EventType, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
        let names: Vec<String> = EventType::ALL
            .iter()
            .map(|t| {
                serde_json::to_value(t)
                    .expect("serializes")
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        format!("{s:?}: one of {}", names.join(", "))
    })
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    emit(&format!("{}\n", serde_json::to_string_pretty(value)?)).map(drop)
}

/// Writes to stdout; `Ok(false)` when the reader has gone (a closed pipe,
/// as with `| head -1`), which is no error for a command's output.
pub(crate) fn emit(text: &str) -> Result<bool> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context("cannot write to stdout")),
    }
}

/// The API's JSON with `--json`, else the human text.
pub(crate) fn output<T: serde::Serialize>(
    api: &ApiArgs,
    value: &T,
    human: impl FnOnce(&T) -> String,
) -> Result<()> {
    if api.json {
        return print_json(value);
    }
    emit(&human(value)).map(drop)
}

pub fn vm(api: &ApiArgs, cmd: VmCommand) -> Result<()> {
    let client = api.client()?;
    runtime()?.block_on(async move {
        match cmd {
            VmCommand::Create(args) => {
                let start = args.start;
                let spec = args.into_spec()?;
                let info = client.create(&spec, start).await?;
                if api.json {
                    return print_json(&info);
                }
                println!("{} {}", info.spec.name, info.status.state.as_str());
                if let Some(reason) = &info.status.reason {
                    println!("  {reason}");
                }
                Ok(())
            }
            VmCommand::List => {
                let vms = client.list().await?;
                output(api, &vms, |v| vm_table(v))
            }
            VmCommand::Show { name } => {
                let info = client.get(&name).await?;
                output(api, &info, vm_details)
            }
            VmCommand::Start { name } => action(&client, api, &name, "start").await,
            VmCommand::Stop { name } => action(&client, api, &name, "stop").await,
            VmCommand::Pause { name } => action(&client, api, &name, "pause").await,
            VmCommand::Resume { name } => action(&client, api, &name, "resume").await,
            VmCommand::Balloon { name, target_mib } => {
                let b = client.set_balloon(&name, target_mib).await?;
                output(api, &b, |b| {
                    format!(
                        "{name} balloon target {} MiB (guest reports {} MiB inflated)\n",
                        b.target_mib, b.actual_mib
                    )
                })
            }
            VmCommand::Counters { name } => {
                let c = client.counters(&name).await?;
                output(api, &c, counters_table)
            }
            VmCommand::Delete { name, force } => {
                client.delete(&name, force).await?;
                if api.json {
                    return print_json(&serde_json::json!({"deleted": name}));
                }
                println!("{name} deleted");
                Ok(())
            }
            VmCommand::Console(args) if args.log => {
                let log = client.console(&args.name).await?;
                if api.json {
                    return print_json(&serde_json::json!({"vm": args.name, "console": log}));
                }
                print!("{log}");
                Ok(())
            }
            VmCommand::Console(args) => {
                if api.json {
                    bail!("--json goes with --log: an attached console is raw bytes");
                }
                crate::console_attach::attach(&client, &args).await
            }
            VmCommand::Events(args) => events(&client, api, args).await,
            VmCommand::Shutdown { name, timeout } => {
                let result = client.shutdown(&name, timeout).await?;
                output(api, &result, action_line)
            }
            VmCommand::Reboot { name, timeout } => {
                let result = client.reboot(&name, timeout).await?;
                output(api, &result, action_line)
            }
            VmCommand::Worker(args) => worker(&client, api, args).await,
            // main runs exec itself: it ends with the program's exit code.
            VmCommand::Exec(_) => bail!("kiln vm exec is run by main"),
        }
    })
}

async fn action(client: &Client, api: &ApiArgs, name: &str, action: &str) -> Result<()> {
    let result = client.action(name, action).await?;
    if api.json {
        return print_json(&result);
    }
    let info = client.get(name).await?;
    println!("{name} {}", result.state.as_str());
    if let Some(reason) = info
        .status
        .reason
        .filter(|_| result.state == kiln_api::VmState::Crashed)
    {
        println!("  {reason}");
    }
    Ok(())
}

/// `NAME STATE (OUTCOME)`.
fn action_line(r: &kiln_api::ActionResult) -> String {
    match r.outcome {
        Some(o) => {
            let o = serde_json::to_value(o).expect("serializes");
            format!(
                "{} {} ({})\n",
                r.vm,
                r.state.as_str(),
                o.as_str().unwrap_or_default()
            )
        }
        None => format!("{} {}\n", r.vm, r.state.as_str()),
    }
}

async fn worker(client: &Client, api: &ApiArgs, args: WorkerArgs) -> Result<()> {
    use kiln_vmm::protocol::WaitKind;
    let current = client.worker(&args.name, &args.device).await?;
    if args.cpus.is_none() && args.wait.is_none() && args.spin_us.is_none() {
        return output(api, &current, worker_line);
    }
    let wait = match args.wait.as_deref() {
        Some("poll") => WaitKind::Poll,
        Some(_) => WaitKind::Notify,
        None if args.spin_us.is_some() => WaitKind::Poll,
        None => current.wait,
    };
    let spin_us = match (args.spin_us, wait, current.wait) {
        (Some(us), _, _) => Some(us),
        (None, WaitKind::Poll, WaitKind::Poll) => current.spin_us,
        _ => None,
    };
    let placement = kiln_api::WorkerPlacement {
        cpus: args.cpus.map_or(current.cpus, |c| c.0),
        wait,
        spin_us,
    };
    let after = client
        .set_worker(&args.name, &args.device, &placement)
        .await?;
    output(api, &after, worker_line)
}

/// `DEV  cpus 0,1  wait poll (spin 50 µs)  tid 123  busy rounds 4`.
fn worker_line(w: &kiln_vmm::protocol::WorkerInfo) -> String {
    let cpus = w.cpus.as_ref().map_or("any".to_owned(), |c| {
        c.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
    });
    let wait = match (w.wait, w.spin_us) {
        (kiln_vmm::protocol::WaitKind::Poll, Some(us)) => format!("poll (spin {us} µs)"),
        (kiln_vmm::protocol::WaitKind::Poll, None) => "poll".to_owned(),
        (kiln_vmm::protocol::WaitKind::Notify, _) => "notify".to_owned(),
    };
    format!(
        "{}  cpus {cpus}  wait {wait}  tid {}  busy rounds {}\n",
        w.device,
        w.tid.map_or("-".into(), |t| t.to_string()),
        w.busy_rounds
    )
}

async fn events(client: &Client, api: &ApiArgs, args: EventsArgs) -> Result<()> {
    let query = EventQuery {
        since: args.since,
        vm: args.vm,
        kind: args.kind,
    };
    // False once the reader has gone (`kiln vm events -f | grep -q ...`).
    let print = |e: &Event| -> Result<bool> {
        if api.json {
            emit(&format!("{}\n", serde_json::to_string(e)?))
        } else {
            emit(&format!("{}\n", event_line(e)))
        }
    };
    if !args.follow {
        for e in client.events(&query).await? {
            if !print(&e)? {
                return Ok(());
            }
        }
        return Ok(());
    }
    let mut stream = client.follow_events(&query).await?;
    while let Some(e) = stream.next().await? {
        if !print(&e)? {
            return Ok(());
        }
    }
    bail!("the daemon ended the event stream (resume with --since the last sequence number)")
}

pub fn host(api: &ApiArgs, cmd: HostCommand) -> Result<()> {
    let client = api.client()?;
    runtime()?.block_on(async move {
        match cmd {
            HostCommand::Info => {
                let host = client.host().await?;
                output(api, &host, host_details)
            }
        }
    })
}

impl CreateArgs {
    pub(crate) fn into_spec(self) -> Result<VmSpec> {
        if self.machine.console.is_some() {
            bail!("--console: the daemon owns a VM's serial console (see `kiln vm console`)");
        }
        if self.machine.on_reboot.is_some() {
            bail!("--on-reboot: under the daemon, reboots follow --restart on_reboot=...");
        }
        let mut machine = self.machine.into_config()?;
        absolute_paths(&mut machine)?;
        Ok(VmSpec {
            name: self.name,
            machine,
            restart: self.restart.unwrap_or_default(),
            autostart: self.autostart,
            labels: self.labels.into_iter().collect(),
            agent: self.agent.map(|port| kiln_api::AgentSpec { port }),
            policy: kiln_api::VmPolicy::default(),
        })
    }
}

/// The daemon resolves paths from its own working directory: send the
/// ones typed here as absolute paths.
fn absolute_paths(m: &mut kiln_vmm::VmConfig) -> Result<()> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let abs = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = cwd.join(&*p);
        }
    };
    abs(&mut m.kernel);
    if let Some(i) = &mut m.initrd {
        abs(i);
    }
    for d in &mut m.disks {
        abs(&mut d.path);
    }
    if let Some(v) = &mut m.vsock {
        abs(&mut v.uds_path);
    }
    if let Some(path) = m.console.as_mut().and_then(|c| c.output_path.as_mut()) {
        abs(path);
    }
    Ok(())
}

/// `512 MiB`, `23.5 GiB`.
fn mib(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    if bytes >= GIB && !bytes.is_multiple_of(GIB) {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else {
        kiln_vmm::config::human_size(bytes)
    }
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS.mmm` UTC.
fn utc(time_ms: u64) -> String {
    let secs = time_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        time_ms % 1000
    )
}

/// `NAME  STATE  CPUS  MEMORY  PID  LABELS`, one line per VM.
pub fn vm_table(vms: &[VmInfo]) -> String {
    let mut rows = vec![[
        "NAME".to_owned(),
        "STATE".into(),
        "CPUS".into(),
        "MEMORY".into(),
        "PID".into(),
        "LABELS".into(),
    ]];
    for vm in vms {
        let labels: Vec<String> = vm
            .spec
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        rows.push([
            vm.spec.name.clone(),
            vm.status.state.as_str().into(),
            vm.spec.machine.cpus.to_string(),
            mib(vm.spec.machine.memory_bytes()),
            vm.status.pid.map_or("-".into(), |p| p.to_string()),
            if labels.is_empty() {
                "-".into()
            } else {
                labels.join(",")
            },
        ]);
    }
    table(&rows)
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn vm_details(vm: &VmInfo) -> String {
    let m = &vm.spec.machine;
    let s = &vm.status;
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<12} {v}\n"));
    line("name", vm.spec.name.clone());
    line("state", s.state.as_str().into());
    if let Some(pid) = s.pid {
        line("pid", pid.to_string());
    }
    if let Some(exit) = s.last_exit {
        line("last exit", format!("{exit:?}").to_lowercase());
    }
    if let Some(reason) = &s.reason {
        line("reason", reason.clone());
    }
    line("cpus", m.cpus.to_string());
    line("memory", mib(m.memory_bytes()));
    line("kernel", m.kernel.display().to_string());
    if let Some(initrd) = &m.initrd {
        line("initrd", initrd.display().to_string());
    }
    line("cmdline", m.cmdline.clone());
    let devices = m.device_ids();
    line(
        "devices",
        if devices.is_empty() {
            "-".into()
        } else {
            devices.join(", ")
        },
    );
    let r = &vm.spec.restart;
    line(
        "restart",
        format!(
            "on_poweroff={:?} on_reboot={:?} on_crash={:?}",
            r.on_poweroff, r.on_reboot, r.on_crash
        )
        .to_lowercase(),
    );
    line("autostart", vm.spec.autostart.to_string());
    for (k, v) in &vm.spec.labels {
        line("label", format!("{k}={v}"));
    }
    line(
        "restarts",
        match s.restarts.last() {
            None => "0".into(),
            Some(r) => format!(
                "{} (last {}: {} after {})",
                s.restarts.len(),
                utc(r.time_ms),
                match r.cause {
                    kiln_api::RestartCause::Policy => "by the policy",
                    kiln_api::RestartCause::Request => "on request",
                },
                format!("{:?}", r.after).to_lowercase()
            ),
        },
    );
    out
}

fn counters_table(c: &kiln_vmm::protocol::Counters) -> String {
    let mut rows = vec![["VCPU".to_owned(), "TID".into(), "RUN".into(), "WAIT".into()]];
    for v in &c.vcpus {
        rows.push([
            v.index.to_string(),
            v.tid.map_or("-".into(), |t| t.to_string()),
            format!("{:.3} s", v.run_ns as f64 / 1e9),
            format!("{:.3} s", v.wait_ns as f64 / 1e9),
        ]);
    }
    let mut out = table(&rows);
    let mut rows = vec![[
        "DEVICE".to_owned(),
        "BUSY ROUNDS".into(),
        "NET TX/RX FRAMES".into(),
    ]];
    for d in &c.devices {
        rows.push([
            d.id.clone(),
            d.busy_rounds.to_string(),
            d.net
                .map_or("-".into(), |n| format!("{}/{}", n.tx_frames, n.rx_frames)),
        ]);
    }
    out.push_str(&table(&rows));
    if let Some(b) = &c.balloon {
        out.push_str(&format!(
            "balloon target {} MiB, inflated {} MiB\n",
            b.target_mib, b.inflated_mib
        ));
    }
    out
}

fn event_line(e: &Event) -> String {
    let kind = serde_json::to_value(e.kind).expect("serializes");
    format!(
        "{:>6}  {}  {:<16} {:<12} {}",
        e.seq,
        utc(e.time_ms),
        kind.as_str().unwrap_or_default(),
        e.vm.as_deref().unwrap_or("-"),
        e.message
    )
}

fn host_details(h: &Host) -> String {
    let mut out = String::new();
    let kvm = serde_json::to_value(h.kvm).expect("serializes");
    out.push_str(&format!(
        "kvm          {}\n",
        kvm.as_str().unwrap_or_default()
    ));
    out.push_str(&format!(
        "memory       {} ({} available)\n",
        mib(h.memory_bytes),
        mib(h.memory_available_bytes)
    ));
    out.push_str(&format!(
        "capacity     {} left; {} of {} VMs running with {} vCPUs\n",
        mib(h.capacity.memory_bytes_left),
        h.capacity.vms_running,
        h.capacity.vms_defined,
        h.capacity.vcpus_running
    ));
    let nodes: Vec<String> = h.numa_nodes.iter().map(u32::to_string).collect();
    out.push_str(&format!(
        "numa nodes   {}\n",
        if nodes.is_empty() {
            "-".into()
        } else {
            nodes.join(", ")
        }
    ));
    let mut rows = vec![[
        "CPU".to_owned(),
        "CORE".into(),
        "PACKAGE".into(),
        "NODE".into(),
        "CACHES".into(),
    ]];
    for c in &h.cpus {
        let caches: Vec<String> = c
            .caches
            .iter()
            .map(|k| format!("L{} {} {}K", k.level, k.kind, k.size_kib))
            .collect();
        rows.push([
            c.id.to_string(),
            c.core.to_string(),
            c.package.to_string(),
            c.numa_node.map_or("-".into(), |n| n.to_string()),
            caches.join(", "),
        ]);
    }
    out.push_str(&table(&rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_policy_flag_sets_only_what_it_names() {
        let p = parse_policy("on_crash=restart").unwrap();
        assert_eq!(p.on_crash, RestartAction::Restart);
        assert_eq!(p.on_poweroff, RestartPolicy::default().on_poweroff);
        assert!(parse_policy("on_crash=maybe").is_err());
        assert!(parse_policy("on_halt=stop").is_err());
    }

    #[test]
    fn times_and_sizes_read_as_people_write_them() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(1_796_228_842_103), "2026-12-02 16:27:22.103");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00.000");
        assert_eq!(mib(256 << 20), "256 MiB");
        assert_eq!(mib(3 << 29), "1.5 GiB");
    }

    #[test]
    fn tables_align_columns() {
        let rows = [
            ["A".to_owned(), "BB".to_owned()],
            ["ccc".to_owned(), "d".to_owned()],
        ];
        assert_eq!(table(&rows), "A    BB\nccc  d\n");
    }

    #[test]
    fn cpu_lists_parse_like_taskset_lists() {
        assert_eq!(
            parse_cpu_list("0,2-3").unwrap(),
            CpuChoice(Some(vec![0, 2, 3]))
        );
        assert_eq!(parse_cpu_list("any").unwrap(), CpuChoice(None));
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("a").is_err());
        assert!(parse_cpu_list("").is_err());
    }

    #[test]
    fn event_types_parse_by_their_wire_names() {
        assert_eq!(parse_event_type("crashed").unwrap(), EventType::Crashed);
        assert!(parse_event_type("exploded")
            .unwrap_err()
            .contains("state_changed"));
    }
}
