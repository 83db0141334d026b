//! `blockd`: the daemon. Flags follow SPDK's vhost app (`-m`, `-S`, `-r`, `--json`).
//!
//! Start-up order: bind the RPC socket (so a second daemon on the same socket fails before it
//! touches anything), start the reactors, replay `--json` or `--config`, then serve RPCs.
//! SIGTERM/SIGINT stop the RPC server, then `App::shutdown` drains and flushes everything,
//! closes the rbd images and cluster connections (bounded wait), and blockd exits 0.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use blockd::app::{App, AppOptions};
use blockd::cpumask::CpuMask;
use blockd::metrics::exposition::{Exporter, CONTENT_TYPE};
use blockd::metrics::http::{MetricsAddr, MetricsServer, Render};
use blockd::reactor::sched::SchedMode;
use blockd::reactor::{PollMode, PollOptions, Reactors};
use blockd::rpc::server::{RpcListener, RpcServer};

/// Userspace block-storage target for VMs (vhost-user-blk), managed over SPDK-compatible
/// JSON-RPC.
#[derive(Parser, Debug)]
#[command(name = "blockd", version)]
struct Args {
    /// Cores to run reactors on: hex (0x3) or list ([0,1], [0-3]).
    #[arg(short = 'm', long = "cpumask", default_value = "0x1", value_parser = parse_mask)]
    cpumask: CpuMask,
    /// Directory where vhost-user sockets are created.
    #[arg(short = 'S', long = "socket-dir", default_value = "/var/tmp")]
    socket_dir: PathBuf,
    /// JSON-RPC socket.
    #[arg(
        short = 'r',
        long = "rpc-socket",
        default_value = "/var/tmp/blockd.sock"
    )]
    rpc_socket: PathBuf,
    /// Configuration to replay at start (as written by `blockctl save_config`).
    #[arg(long = "json", conflicts_with = "config")]
    json: Option<PathBuf>,
    /// Persistent configuration: replayed at start when it exists, and rewritten
    /// atomically after every RPC call that changes the configuration, so that a restarted
    /// daemon (systemd `Restart=`) brings back every bdev, controller and export.
    #[arg(long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log filter (tracing EnvFilter syntax: info, debug, blockd::vhost=trace, ...).
    #[arg(short = 'L', long = "log-level", default_value = "info")]
    log_level: String,
    /// When reactors sleep instead of busy-polling.
    #[arg(long = "poll", value_enum, default_value = "adaptive")]
    poll: PollMode,
    /// How long an adaptive reactor polls without work before sleeping (microseconds).
    #[arg(long = "poll-idle-us", default_value_t = 200)]
    poll_idle_us: u64,
    /// What waking an adaptive reactor costs (microseconds, fractions allowed), instead of
    /// measuring it at start: at 10 or less a reactor stops polling for drivers that wait
    /// for their interrupts after its poll window (for a host whose idle vCPUs change how
    /// they wait after blockd started).
    #[arg(long = "wake-cost-us", value_name = "US", value_parser = parse_wake_cost)]
    wake_cost_us: Option<Duration>,
    /// Kernel scheduling policy of the daemon's threads (sched(7)): `batch` keeps a woken
    /// reactor or librbd thread from preempting the one that woke it on a shared core
    /// (more IOPS at high queue depth, twice the RBD latency at QD1); `adaptive` batches
    /// only while 4 or more rbd requests are in flight; `normal` never. Without it:
    /// `adaptive` when blockd was started under the kernel's default policy, else the
    /// policy it was started with (`chrt`, systemd's `CPUSchedulingPolicy=`) stays.
    #[arg(long = "sched", value_enum)]
    sched: Option<SchedMode>,
    /// Serve Prometheus metrics at http://ADDR/metrics: `host:port` (e.g. 127.0.0.1:9470)
    /// or a Unix socket path. Off by default.
    #[arg(long = "metrics", value_name = "ADDR")]
    metrics: Option<MetricsAddr>,
    /// Mode of the vhost-user sockets (octal).
    #[arg(long = "socket-mode", default_value = "0600", value_parser = parse_mode)]
    socket_mode: u32,
}

fn parse_mask(s: &str) -> Result<CpuMask, String> {
    CpuMask::parse(s).map_err(|e| e.to_string())
}

fn parse_wake_cost(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(us) if us.is_finite() && (0.0..=1e6).contains(&us) => {
            Ok(Duration::from_secs_f64(us / 1e6))
        }
        _ => Err(format!(
            "{s}: not a number of microseconds from 0 to 1000000"
        )),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("'{s}' is not an octal file mode (e.g. 0600)")),
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread (and so in every thread spawned after),
/// so that only [`wait_for_signal`] receives them.
fn block_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: the sigset is initialized by sigemptyset before use; pthread_sigmask only
    // reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if r != 0 {
            anyhow::bail!("pthread_sigmask: {}", std::io::Error::from_raw_os_error(r));
        }
        Ok(set)
    }
}

/// Waits for one of the blocked signals; returns its number.
fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    loop {
        let mut sig = 0;
        // SAFETY: `set` is a valid initialized sigset, `sig` is writable.
        let r = unsafe { libc::sigwait(set, &mut sig) };
        if r == 0 {
            return sig;
        }
    }
}

/// Starts the metrics endpoint of `--metrics`.
fn start_metrics(addr: &MetricsAddr, app: &Arc<App>, mode: u32) -> anyhow::Result<MetricsServer> {
    let start = blockd::metrics::process::now_unix();
    let exporter = Exporter::new(app.clone(), start);
    let render: Render = Arc::new(move || (CONTENT_TYPE, exporter.render()));
    let srv = MetricsServer::start(addr, mode, render)
        .with_context(|| format!("cannot serve metrics on {addr:?}"))?;
    tracing::info!(addr = ?srv.local_addr().map_or_else(|| format!("{addr:?}"), |a| a.to_string()), "metrics served at /metrics");
    Ok(srv)
}

fn run(args: Args) -> anyhow::Result<()> {
    let signals = block_signals()?;
    if !args.socket_dir.is_dir() {
        anyhow::bail!(
            "socket directory {} does not exist or is not a directory",
            args.socket_dir.display()
        );
    }
    let listener = RpcListener::bind(&args.rpc_socket)?;
    let poll = PollOptions {
        mode: args.poll,
        idle_threshold: Duration::from_micros(args.poll_idle_us),
        wake_cost: args.wake_cost_us,
    };
    let reactors = Reactors::start(&args.cpumask, poll)?;
    let app = App::new(
        AppOptions {
            cpumask: args.cpumask.clone(),
            socket_dir: args.socket_dir.clone(),
            rpc_socket: args.rpc_socket.clone(),
            socket_mode: args.socket_mode,
        },
        reactors,
    );
    if let Some(path) = &args.json {
        let replay = std::fs::read(path)
            .with_context(|| format!("cannot read {}", path.display()))
            .and_then(|b| {
                serde_json::from_slice(&b)
                    .with_context(|| format!("{} is not valid JSON", path.display()))
            })
            .and_then(|cfg| blockd::app::load(&app, &cfg))
            .with_context(|| format!("replaying {}", path.display()));
        if let Err(e) = replay {
            app.shutdown();
            return Err(e);
        }
        tracing::info!(config = %path.display(), "configuration replayed");
    }
    if let Some(path) = &args.config {
        if let Err(e) = app.persist_to(path) {
            app.shutdown();
            return Err(e);
        }
    }
    let mut metrics = match &args.metrics {
        Some(addr) => match start_metrics(addr, &app, args.socket_mode) {
            Ok(m) => Some(m),
            Err(e) => {
                app.shutdown();
                return Err(e);
            }
        },
        None => None,
    };
    let server = RpcServer::serve(app.clone(), listener)?;
    tracing::info!(
        rpc_socket = %args.rpc_socket.display(),
        socket_dir = %args.socket_dir.display(),
        cpumask = %args.cpumask,
        pid = std::process::id(),
        "blockd ready"
    );
    // Type=notify units: the configuration is replayed and every socket listens.
    if let Err(e) = blockd::sd_notify::notify("READY=1\nSTATUS=serving") {
        tracing::warn!("cannot notify systemd: {e}");
    }
    let sig = wait_for_signal(&signals);
    tracing::info!(signal = sig, "shutting down");
    // Best effort: systemd learns it from the exit anyway.
    let _ = blockd::sd_notify::notify("STOPPING=1");
    server.stop();
    if let Some(m) = metrics.as_mut() {
        m.stop();
    }
    app.shutdown();
    tracing::info!("blockd stopped");
    Ok(())
}

fn main() -> ExitCode {
    // clap exits with 2 on usage errors; blockd's contract is 1 for any start failure.
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            // Nothing better to do when stderr/stdout is gone.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // Before any thread exists, so that every thread inherits the policy.
    let sched = SchedMode::start(args.sched);
    if let Err(e) = blockd::logging::init(&args.log_level, std::io::stderr().is_terminal()) {
        eprintln!("blockd: invalid --log-level '{}': {e}", args.log_level);
        return ExitCode::FAILURE;
    }
    if let Err(e) = sched {
        // A seccomp or container policy may forbid it: serve anyway, with the policy it has.
        tracing::warn!("cannot set scheduling policy {:?}: {e}", args.sched);
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blockd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
