//! SPDK's log methods (`lib/log/log_rpc.c`): `log_set_level`, `log_get_level`,
//! `log_set_print_level`, `log_get_print_level`, `log_set_flag`, `log_clear_flag`,
//! `log_get_flags`. blockd has one sink (stderr), so the syslog and console levels are the
//! same level ([`crate::logging`]). Unknown levels and flags answer -32602 (SPDK ignores an
//! unknown flag and answers `true`).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{no_params, params, RpcError, RpcMethods, RpcResult};
use crate::logging::{self, LogError};

/// Registers the log methods.
pub fn register<C: Send + Sync + 'static>(m: &mut RpcMethods<C>) {
    m.add("log_set_level", set_level);
    m.add("log_set_print_level", set_level);
    m.add("log_get_level", get_level);
    m.add("log_get_print_level", get_level);
    m.add("log_set_flag", set_flag);
    m.add("log_clear_flag", clear_flag);
    m.add("log_get_flags", get_flags);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Level {
    level: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Flag {
    flag: String,
}

fn rpc_err(e: LogError) -> RpcError {
    match e {
        LogError::Level(_) | LogError::Flag(_) => RpcError::invalid_params(e.to_string()),
        LogError::Filter(_) | LogError::NotInstalled => RpcError::internal(e.to_string()),
    }
}

/// `log_set_level` / `log_set_print_level {level}`: ERROR, WARNING, NOTICE, INFO, DEBUG.
fn set_level<C>(_app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let req: Level = params(p)?;
    logging::set_level(&req.level).map_err(rpc_err)?;
    tracing::info!(level = %req.level, "log level set");
    Ok(json!(true))
}

/// `log_get_level` / `log_get_print_level`: the level's SPDK name.
fn get_level<C>(_app: &Arc<C>, p: Option<Value>) -> RpcResult {
    no_params(p)?;
    Ok(json!(logging::level().map_err(rpc_err)?))
}

/// `log_set_flag {flag}`: the flag's modules log at debug (`all`: every flag).
fn set_flag<C>(_app: &Arc<C>, p: Option<Value>) -> RpcResult {
    switch_flag(p, true)
}

/// `log_clear_flag {flag}`.
fn clear_flag<C>(_app: &Arc<C>, p: Option<Value>) -> RpcResult {
    switch_flag(p, false)
}

fn switch_flag(p: Option<Value>, on: bool) -> RpcResult {
    let req: Flag = params(p)?;
    logging::set_flag(&req.flag, on).map_err(rpc_err)?;
    Ok(json!(true))
}

/// `log_get_flags`: `{flag: enabled}` for every flag.
fn get_flags<C>(_app: &Arc<C>, p: Option<Value>) -> RpcResult {
    no_params(p)?;
    let mut out = Map::new();
    for (name, on) in logging::flags().map_err(rpc_err)? {
        out.insert(name.to_string(), json!(on));
    }
    Ok(Value::Object(out))
}
