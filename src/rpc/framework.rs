//! Framework methods: `rpc_get_methods`, `spdk_get_version`, `framework_get_reactors`,
//! `framework_get_subsystems`, `framework_get_config`, `framework_wait_init`,
//! `framework_get_scheduler`, with SPDK's
//! params and result shapes (`lib/rpc/rpc.c`, `lib/event/app_rpc.c`,
//! `lib/init/subsystem_rpc.c`).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{no_params, params, RpcContext, RpcError, RpcMethods, RpcResult};
use crate::reactor::sched::adaptive;
use crate::reactor::sched::SchedMode;
use crate::reactor::Reactors;

/// What the framework methods read of the application.
pub trait FrameworkContext: RpcContext {
    /// The reactors (`framework_get_reactors`).
    fn reactors(&self) -> &Reactors;
    /// Subsystems in initialization order, each with those it depends on.
    fn subsystems(&self) -> Vec<(&'static str, &'static [&'static str])>;
    /// The `{method, params}` entries that recreate subsystem `name`; `None` for an
    /// unknown one.
    fn subsystem_config(&self, name: &str) -> Option<Vec<Value>>;
}

/// Registers the framework methods.
pub fn register<C: FrameworkContext>(m: &mut RpcMethods<C>) {
    m.add("rpc_get_methods", rpc_get_methods);
    m.add("spdk_get_version", spdk_get_version);
    m.add("framework_get_reactors", framework_get_reactors);
    m.add("framework_get_scheduler", framework_get_scheduler);
    m.add("framework_get_subsystems", framework_get_subsystems);
    m.add("framework_get_config", framework_get_config);
    m.add("framework_wait_init", framework_wait_init);
    m.add("spdk_kill_instance", spdk_kill_instance);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetMethods {
    /// Only methods callable in the current state: blockd has no pre-init state, so all.
    #[serde(default)]
    #[allow(dead_code)]
    current: bool,
    /// blockd has no deprecated aliases.
    #[serde(default)]
    #[allow(dead_code)]
    include_aliases: bool,
}

/// `rpc_get_methods`: every method name, sorted.
fn rpc_get_methods<C: FrameworkContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let _: GetMethods = params(p)?;
    Ok(json!(app.methods().names()))
}

/// `spdk_get_version`: blockd's version in SPDK's result shape. Takes no params (SPDK
/// answers -32602 when given any).
fn spdk_get_version<C: FrameworkContext>(_app: &Arc<C>, p: Option<Value>) -> RpcResult {
    no_params(p)?;
    let num = |s: &str| s.parse::<u64>().unwrap_or(0);
    Ok(json!({
        "version": format!("blockd v{}", env!("CARGO_PKG_VERSION")),
        "fields": {
            "major": num(env!("CARGO_PKG_VERSION_MAJOR")),
            "minor": num(env!("CARGO_PKG_VERSION_MINOR")),
            "patch": num(env!("CARGO_PKG_VERSION_PATCH")),
            "suffix": env!("CARGO_PKG_VERSION_PRE"),
            "commit": "",
        }
    }))
}

/// `framework_get_scheduler`: SPDK's scheduler is "static" here (a poller stays on the
/// reactor it was put on), checked every second as SPDK's default period says. blockd
/// adds `thread_policy`: the `--sched` mode in force ("inherited" without one) and, when
/// adaptive, the policy the threads run under now, rbd requests in flight and switches.
fn framework_get_scheduler<C: FrameworkContext>(_app: &Arc<C>, p: Option<Value>) -> RpcResult {
    no_params(p)?;
    let mut policy = json!({
        "mode": SchedMode::in_force().map_or("inherited", SchedMode::name),
    });
    if SchedMode::in_force() == Some(SchedMode::Adaptive) {
        let s = adaptive::state();
        policy["policy"] = json!(s.policy.name());
        policy["rbd_in_flight"] = json!(s.in_flight);
        policy["switches"] = json!(s.switches);
    }
    Ok(json!({
        "scheduler_name": "static",
        "scheduler_period": 1_000_000,
        "thread_policy": policy,
    }))
}

/// `framework_get_reactors`: per-core busy/idle time and pollers.
fn framework_get_reactors<C: FrameworkContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    no_params(p)?;
    Ok(app.reactors().to_json())
}

/// `framework_get_subsystems`: subsystems in initialization order with their dependencies.
fn framework_get_subsystems<C: FrameworkContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    no_params(p)?;
    Ok(Value::Array(
        app.subsystems()
            .into_iter()
            .map(|(name, depends_on)| json!({"subsystem": name, "depends_on": depends_on}))
            .collect(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetConfig {
    name: String,
    /// SPDK 25+ clients send it; blockd never groups entries into batches.
    #[serde(default)]
    #[allow(dead_code)]
    with_batches: bool,
}

/// `framework_get_config {name}`: the `{method, params}` list that recreates the subsystem;
/// -32602 for an unknown one.
fn framework_get_config<C: FrameworkContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let req: GetConfig = params(p)?;
    let entries = app.subsystem_config(&req.name).ok_or_else(|| {
        RpcError::invalid_params(format!(
            "No such device: subsystem '{}' does not exist",
            req.name
        ))
    })?;
    Ok(Value::Array(entries))
}

/// `framework_wait_init`: SPDK answers it once its subsystems are initialized, and start-up
/// scripts call it before configuring anything. blockd replays `--json` before it serves
/// its RPC socket, so whoever it answers is already past initialization: `true` at once.
fn framework_wait_init<C: FrameworkContext>(_app: &Arc<C>, p: Option<Value>) -> RpcResult {
    no_params(p)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KillInstance {
    sig_name: String,
}

/// The signals `spdk_kill_instance` sends: SPDK's names for the ones blockd acts on.
/// SIGINT and SIGTERM stop it cleanly (I/O drained, backends flushed, images closed);
/// SIGKILL ends it at once. SPDK also sends SIGQUIT, SIGHUP and SIGUSR1, which blockd does
/// not handle (their default action would end it without the clean stop), so they are
/// refused.
const KILL_SIGNALS: &[(&str, i32)] = &[
    ("SIGINT", libc::SIGINT),
    ("SIGTERM", libc::SIGTERM),
    ("SIGKILL", libc::SIGKILL),
];

/// `spdk_kill_instance {sig_name}` (SPDK `lib/event/app_rpc.c`): the daemon signals itself.
/// The signal is raised after the `true` reply is written ([`super::server::raise_after_reply`]).
fn spdk_kill_instance<C: FrameworkContext>(_app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let req: KillInstance = params(p)?;
    let (_, sig) = KILL_SIGNALS
        .iter()
        .find(|(n, _)| *n == req.sig_name)
        .ok_or_else(|| {
            RpcError::invalid_params(format!(
                "Invalid parameters: signal '{}' (blockd takes SIGINT, SIGTERM or SIGKILL)",
                req.sig_name
            ))
        })?;
    super::server::raise_after_reply(*sig);
    Ok(json!(true))
}
