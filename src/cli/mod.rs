//! `blockctl`: the command line of blockd, with `rpc.py`'s method names, positional
//! arguments and flags, so scripts written for SPDK's rpc.py work with either.
//!
//! Output follows rpc.py: a string result is printed raw (`Malloc0`), `true` prints nothing,
//! anything else is pretty-printed JSON (indent 2). A JSON-RPC error is printed to stderr as
//! rpc.py prints it and exits 1; so does a socket that cannot be reached.
//!
//! Adding a command group: write a module with a `clap::Subcommand` (or `clap::Args`) type
//! that implements [`Run`], and add one line to the `commands!` list below
//! (`#[command(flatten)]` for top-level rpc.py-style methods, or a plain variant with
//! `#[command(subcommand)]` for a `blockctl image create ...`-style group).

pub mod bdev;
pub mod bdev_crypto;
pub mod bdev_local;
pub mod client;
pub mod framework;
pub mod iostat;
pub mod keyring;
pub mod log;
pub mod map;
pub mod nbd;
pub mod raw;
pub mod rbd;
pub mod vhost;

use std::cell::RefCell;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde_json::Value;

use client::{ClientError, RpcClient};

/// Command line of `blockctl`.
#[derive(Parser, Debug)]
#[command(
    name = "blockctl",
    version,
    about = "Control blockd over its JSON-RPC socket"
)]
pub struct Cli {
    /// RPC socket of the daemon.
    #[arg(short = 's', default_value = "/var/tmp/blockd.sock")]
    pub socket: PathBuf,
    /// Seconds to wait for each response.
    #[arg(short = 't', default_value_t = 60.0, value_parser = parse_timeout)]
    pub timeout: f64,
    #[command(subcommand)]
    pub command: Command,
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if t > 0.0 && t.is_finite() && t < 1e9 => Ok(t),
        _ => Err(format!("'{s}' is not a positive number of seconds")),
    }
}

/// A command: runs against the daemon reached through `ctx`.
pub trait Run {
    fn run(self, ctx: &Ctx) -> anyhow::Result<()>;
}

/// Declares [`Command`] and its dispatch from one list of variants.
macro_rules! commands {
    ($( $(#[$attr:meta])* $variant:ident($ty:ty), )*) => {
        /// Every blockctl subcommand.
        #[derive(clap::Subcommand, Debug)]
        pub enum Command {
            $( $(#[$attr])* $variant($ty), )*
        }

        impl Command {
            fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
                match self {
                    $( Command::$variant(c) => Run::run(c, ctx), )*
                }
            }
        }
    };
}

commands! {
    #[command(flatten)]
    Bdev(bdev::BdevCmd),
    #[command(flatten)]
    Rbd(rbd::RbdCmd),
    #[command(flatten)]
    Local(bdev_local::BdevLocalCmd),
    #[command(flatten)]
    Keyring(keyring::KeyringCmd),
    #[command(flatten)]
    Crypto(bdev_crypto::BdevCryptoCmd),
    #[command(flatten)]
    Vhost(vhost::VhostCmd),
    #[command(flatten)]
    Nbd(nbd::NbdCmd),
    #[command(flatten)]
    Framework(framework::FrameworkCmd),
    #[command(flatten)]
    Log(log::LogCmd),
    #[command(flatten)]
    Map(map::MapCommand),
    /// Live per-bdev I/O statistics: IOPS, MB/s, latency, queue depth per interval.
    Iostat(iostat::IostatArgs),
    /// Call any method: `blockctl rpc <method> ['{"json":"params"}' | -]`.
    Rpc(raw::RawArgs),
    /// vhost-user-blk load generator (libblkio).
    Bench(crate::bench::BenchArgs),
    /// RBD images, straight to the cluster (like `rbd`), or in a local pool (`local:POOL/IMAGE`):
    /// create, ls, info, snap, import ...
    Image(crate::rbdcli::localpool::ImageArgs),
    /// RBD pools, straight to the cluster, or local pools (`local:POOL`, `pool ls --local`).
    Pool(crate::rbdcli::localpool::PoolArgs),
}

// The commands that never reach the daemon are implemented beside it (bench, rbdcli): their
// `Run` is here, so that they know nothing of blockctl.
impl Run for crate::bench::BenchArgs {
    fn run(self, _ctx: &Ctx) -> anyhow::Result<()> {
        crate::bench::run(&self)
    }
}

impl Run for crate::rbdcli::localpool::ImageArgs {
    fn run(self, _ctx: &Ctx) -> anyhow::Result<()> {
        crate::rbdcli::localpool::run_image(&self.opts, self.cmd)
    }
}

impl Run for crate::rbdcli::localpool::PoolArgs {
    fn run(self, _ctx: &Ctx) -> anyhow::Result<()> {
        crate::rbdcli::localpool::run_pool(&self.opts, self.cmd)
    }
}

/// What a command needs: one connection to the daemon, opened on first use.
pub struct Ctx {
    pub socket: PathBuf,
    pub timeout: Duration,
    client: RefCell<Option<RpcClient>>,
}

impl Ctx {
    pub fn new(socket: PathBuf, timeout: Duration) -> Self {
        Ctx {
            socket,
            timeout,
            client: RefCell::new(None),
        }
    }

    /// Calls `method` with `params` (omitted when `None`).
    pub fn call(&self, method: &str, params: Option<Value>) -> Result<Value, ClientError> {
        let mut slot = self.client.borrow_mut();
        if slot.is_none() {
            *slot = Some(RpcClient::connect(&self.socket, self.timeout)?);
        }
        match slot.as_mut() {
            Some(c) => c.call(method, params),
            None => unreachable!("client set above"),
        }
    }

    /// Calls `method` and prints its result the way rpc.py does.
    pub fn call_print(&self, method: &str, params: Option<Value>) -> anyhow::Result<()> {
        let r = self.call(method, params)?;
        print_result(&r);
        Ok(())
    }
}

/// Prints a result as rpc.py: strings raw, `true` nothing, the rest as JSON with indent 2.
pub fn print_result(v: &Value) {
    match v {
        Value::String(s) => println!("{s}"),
        Value::Bool(true) => {}
        other => println!(
            "{}",
            serde_json::to_string_pretty(other).unwrap_or_default()
        ),
    }
}

/// Builds a params object from `(key, value)` pairs, leaving out `None`s (rpc.py's
/// `remove_null`); `None` when nothing is left, so that the request carries no params.
pub fn params_of(pairs: Vec<(&str, Option<Value>)>) -> Option<Value> {
    let m: serde_json::Map<String, Value> = pairs
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
        .collect();
    (!m.is_empty()).then_some(Value::Object(m))
}

/// Runs blockctl with these arguments; returns the process exit code.
pub fn main_with(cli: Cli) -> std::process::ExitCode {
    let ctx = Ctx::new(cli.socket, Duration::from_secs_f64(cli.timeout));
    match cli.command.run(&ctx) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
