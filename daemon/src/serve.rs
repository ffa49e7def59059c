//! `kiln serve`: its arguments, and the listeners it answers on.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use kiln_api::ErrorCode;

use crate::http::Failure;
use crate::metrics::RequestMetrics;
use crate::server::{self, App};
use crate::vms::{Manager, SupervisorConfig};

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// The Unix socket to answer on (mode 0660).
    #[arg(long, default_value = "/run/kiln/kiln.sock", env = "KILN_SOCKET")]
    pub socket: PathBuf,
    /// Where VM definitions and the event log are kept (durable).
    #[arg(long, default_value = "/var/lib/kiln")]
    pub state_dir: PathBuf,
    /// Where live state is kept: one directory per VM with its control
    /// socket, console log, VMM log and process record.
    #[arg(long, default_value = "/run/kiln")]
    pub run_dir: PathBuf,
    /// The per-VM monitor to start (default: kiln-vmm next to this binary).
    #[arg(long)]
    pub vmm_binary: Option<PathBuf>,
    /// Also answer on TCP at this address; every request there needs
    /// `Authorization: Bearer <token>` (see --token-file). A non-loopback
    /// address needs TLS (--tls-cert, --tls-key).
    #[arg(long, value_name = "ADDR:PORT", requires = "token_file")]
    pub listen: Option<SocketAddr>,
    /// Each VM's serial console log is rotated to console.log.1 at this
    /// size (MiB), so a guest cannot fill the disk.
    #[arg(long, value_name = "MIB", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub console_log_mib: u64,
    /// A file holding the bearer token for --listen.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// TLS on --listen: a PEM file with the daemon's certificate (then any
    /// intermediate certificates).
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "listen"])]
    pub tls_cert: Option<PathBuf>,
    /// The PEM file of --tls-cert's private key.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Seconds a shutdown or reboot waits for the guest to power off
    /// after the power button before the hard stop, when the request
    /// names no `?timeout_s=` (1..=600).
    #[arg(long, value_name = "SECONDS",
          default_value_t = crate::vms::DEFAULT_SHUTDOWN_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub shutdown_timeout: u64,
    /// Where the policy engine finds its learned models; without it,
    /// `$KILN_MODELS_DIR`, then where Kiln is installed (`kiln policy
    /// models` shows which). A lever whose model is missing runs the
    /// heuristic.
    #[arg(long, value_name = "DIR")]
    pub policy_models: Option<PathBuf>,
}

/// Where `kiln-vmm` is when not given: next to the running binary.
fn default_vmm_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the running binary")?;
    Ok(exe.with_file_name("kiln-vmm"))
}

/// Runs the daemon until SIGINT or SIGTERM. VMMs keep running after it
/// ends; the next start re-adopts them.
pub async fn serve(args: ServeArgs) -> Result<()> {
    let vmm_binary = match args.vmm_binary.clone() {
        Some(p) => p,
        None => default_vmm_binary()?,
    };
    if !vmm_binary.is_file() {
        tracing::warn!(
            "{} does not exist: VMs will crash on start until it does",
            vmm_binary.display()
        );
    }
    let token = match &args.token_file {
        Some(path) => Some(read_token(path)?),
        None => None,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(crate::tls::server_config(cert, key)?),
        _ => None,
    };
    if let Some(addr) = args.listen {
        if !addr.ip().is_loopback() && tls.is_none() {
            bail!(
                "--listen {addr} is not a loopback address: TCP there needs TLS \
                 (--tls-cert PEM --tls-key PEM); only a loopback address may be plain"
            );
        }
    }
    for dir in [&args.state_dir, &args.run_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let manager = Manager::open(SupervisorConfig {
        state_dir: args.state_dir.clone(),
        run_dir: args.run_dir.clone(),
        vmm_binary,
        console_log_limit: args.console_log_mib << 20,
        shutdown_timeout: std::time::Duration::from_secs(args.shutdown_timeout),
    })
    .await
    .context("cannot load the daemon's state")?;
    let policy = crate::policy::PolicyService::open(&args.state_dir, args.policy_models.as_deref())
        .context("cannot load the policy engine's state")?;
    policy.spawn_loop(Arc::clone(&manager));
    let app = Arc::new(App {
        vms: manager,
        metrics: RequestMetrics::default(),
        policy,
    });
    let router = server::router(app.clone());
    // No graceful drain: followed event streams never end by themselves.
    // In-flight requests are cut at SIGTERM; definitions they acknowledged
    // are durable already.
    let mut tasks = tokio::task::JoinSet::new();
    // TCP first: once the Unix socket answers, the TCP listener does too.
    if let (Some(addr), Some(token)) = (args.listen, token) {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!(
            "kiln serve: listening on tcp {} ({})",
            tcp.local_addr()?,
            if tls.is_some() {
                "TLS"
            } else {
                "plain, loopback"
            }
        );
        let authed = router.clone().layer(middleware::from_fn_with_state(
            Arc::new(token),
            require_token,
        ));
        tasks.spawn(crate::tcp::serve(tcp, authed, tls));
    }
    let unix = bind_unix(&args.socket)?;
    tracing::info!("kiln serve: listening on {}", args.socket.display());
    tasks.spawn(async move { axum::serve(unix, router).await });
    tokio::select! {
        () = shutdown_signal() => {}
        Some(done) = tasks.join_next() => {
            done.context("a listener task failed")?
                .context("serving the API")?;
        }
    }
    tasks.abort_all();
    let _ = std::fs::remove_file(&args.socket);
    tracing::info!("kiln serve: stopped (VMMs keep running)");
    Ok(())
}

fn read_token(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = text.trim().to_owned();
    if token.len() < 16 {
        bail!(
            "the token in {} is shorter than 16 characters",
            path.display()
        );
    }
    Ok(token)
}

/// Binds the Unix socket, replacing a stale socket file but refusing one
/// a live daemon answers on.
fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use: another kiln serve runs", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}

async fn require_token(State(token): State<Arc<String>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
        next.run(req).await
    } else {
        Failure::new(
            ErrorCode::Unauthorized,
            "this listener needs Authorization: Bearer <token>",
        )
        .into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the daemon with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
