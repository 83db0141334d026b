//! Saved configurations: what `framework_get_config` answers, what `rpc.py save_config`
//! assembles, and what `blockd --json` replays.
//!
//! A configuration is SPDK's JSON config file:
//! `{"subsystems":[{"subsystem":"bdev","config":[{"method":..,"params":{..}},..]},..]}`.
//! Each entry is the RPC call that recreates one object, so replaying a configuration is
//! calling those methods in dependency order (bdevs before the controllers that use them).

use std::sync::Arc;

use anyhow::Context;
use serde_json::{json, Value};

use crate::app::App;
use crate::rpc::{code, RpcError};

/// A subsystem of `framework_get_subsystems`: a group of objects saved and replayed together.
pub struct Subsystem {
    /// Name, as in SPDK (`bdev`, `vhost_blk`).
    pub name: &'static str,
    /// Subsystems whose objects must exist before this one's are created.
    pub depends_on: &'static [&'static str],
    /// The `{method, params}` entries that recreate this subsystem's objects.
    pub config: fn(&App) -> Vec<Value>,
}

/// Every subsystem, in initialization (dependency) order. Add one line per new subsystem.
pub const SUBSYSTEMS: &[Subsystem] = &[
    Subsystem {
        name: "bdev",
        depends_on: &[],
        config: bdev_config,
    },
    Subsystem {
        name: "vhost_blk",
        depends_on: &["bdev"],
        config: vhost_blk_config,
    },
    Subsystem {
        name: "vhost_scsi",
        depends_on: &["bdev"],
        config: vhost_scsi_config,
    },
    Subsystem {
        name: "nbd",
        depends_on: &["bdev"],
        config: nbd_config,
    },
];

fn entry(method: &str, params: Value) -> Value {
    json!({"method": method, "params": params})
}

/// bdev: each bdev's creation call, then its QoS limits when any is set (as SPDK's
/// `bdev_qos_config_json`, which writes only the nonzero limits).
fn bdev_config(app: &App) -> Vec<Value> {
    let mut out: Vec<Value> = crate::bdev::rbd::cluster::config_entries()
        .into_iter()
        .map(|(m, p)| entry(m, p))
        .collect();
    for bdev in app.bdevs.list() {
        let Some((method, params)) = bdev.backend().config(&bdev) else {
            continue;
        };
        out.push(entry(method, params));
        let l = bdev.qos.limits();
        let mut p = serde_json::Map::new();
        for (k, v) in [
            ("rw_ios_per_sec", l.rw_ios_per_sec),
            ("rw_mbytes_per_sec", l.rw_mbytes_per_sec),
            ("r_mbytes_per_sec", l.r_mbytes_per_sec),
            ("w_mbytes_per_sec", l.w_mbytes_per_sec),
        ] {
            if v != 0 {
                p.insert(k.into(), json!(v));
            }
        }
        if !p.is_empty() {
            p.insert("name".into(), json!(bdev.name()));
            out.push(entry("bdev_set_qos_limit", Value::Object(p)));
        }
    }
    out
}

fn nbd_config(app: &App) -> Vec<Value> {
    app.nbd
        .config_entries()
        .into_iter()
        .map(|(m, p)| entry(m, p))
        .collect()
}

fn vhost_scsi_config(app: &App) -> Vec<Value> {
    app.vhost
        .subsystem_config_entries("vhost_scsi")
        .into_iter()
        .map(|(m, p)| entry(m, p))
        .collect()
}

fn vhost_blk_config(app: &App) -> Vec<Value> {
    app.vhost
        .config_entries()
        .into_iter()
        .map(|(m, p)| entry(m, p))
        .collect()
}

/// Methods that `save_config` of an SPDK target writes into every configuration to tune
/// SPDK's own machinery (buffer pools, sockets, accel, the NVMe, RAID and iSCSI bdev
/// modules, the thread scheduler, the NVMe-oF and iSCSI targets), with no object behind
/// them for blockd to recreate. A configuration saved by SPDK replays in blockd with these
/// entries skipped and logged; any other method blockd lacks still fails the load before
/// anything is created. Shared with `blockctl load_config`.
pub const SPDK_TUNING_METHODS: &[&str] = &[
    "accel_set_options",
    "bdev_iscsi_set_options",
    "bdev_nvme_set_hotplug",
    "bdev_nvme_set_options",
    "bdev_raid_set_options",
    "bdev_set_options",
    "framework_set_scheduler",
    "fsdev_set_opts",
    "iobuf_set_options",
    "iscsi_set_options",
    "nvmf_set_config",
    "nvmf_set_crdt",
    "nvmf_set_max_subsystems",
    "sock_impl_set_options",
    "sock_set_default_impl",
];

/// Whether `method` only tunes SPDK internals ([`SPDK_TUNING_METHODS`]).
pub fn is_spdk_tuning(method: &str) -> bool {
    SPDK_TUNING_METHODS.contains(&method)
}

/// The subsystem named `name`.
pub fn subsystem(name: &str) -> Option<&'static Subsystem> {
    SUBSYSTEMS.iter().find(|s| s.name == name)
}

/// `framework_get_config`: the entries of subsystem `name`; -32602 for an unknown one.
pub fn subsystem_config(app: &App, name: &str) -> Result<Vec<Value>, RpcError> {
    let s = subsystem(name).ok_or_else(|| {
        RpcError::new(
            code::INVALID_PARAMS,
            format!("No such device: subsystem '{name}' does not exist"),
        )
    })?;
    Ok((s.config)(app))
}

/// The whole configuration, as `rpc.py save_config` assembles it.
pub fn save(app: &App) -> Value {
    let subsystems: Vec<Value> = SUBSYSTEMS
        .iter()
        .map(|s| json!({"subsystem": s.name, "config": (s.config)(app)}))
        .collect();
    json!({ "subsystems": subsystems })
}

/// Replays a configuration through the RPC methods, subsystems in dependency order whatever
/// their order in the file. Entries may be batch arrays (SPDK 25+ `--with-batches`): their
/// calls run in order.
///
/// A configuration saved by SPDK loads too: subsystems blockd does not have are replayed
/// after its own, their empty configs are nothing to do, and SPDK's tuning entries
/// ([`SPDK_TUNING_METHODS`]) are skipped with a log line. Every other method must exist:
/// all are checked before the first call, so a configuration blockd cannot recreate
/// changes nothing. The replay stops at the first failing call, with an error naming the
/// subsystem, the entry's index and method, and the RPC error.
pub fn load(app: &Arc<App>, cfg: &Value) -> anyhow::Result<()> {
    let list = cfg
        .get("subsystems")
        .and_then(Value::as_array)
        .context("configuration has no \"subsystems\" array")?;
    let mut plan = Vec::new();
    for (i, s) in list.iter().enumerate() {
        let name = s
            .get("subsystem")
            .and_then(Value::as_str)
            .with_context(|| format!("subsystems[{i}] has no \"subsystem\" name"))?;
        let rank = SUBSYSTEMS
            .iter()
            .position(|k| k.name == name)
            .unwrap_or(SUBSYSTEMS.len());
        let entries = match s.get("config") {
            None | Some(Value::Null) => &[][..],
            Some(Value::Array(a)) => a.as_slice(),
            Some(_) => anyhow::bail!("subsystem '{name}': \"config\" is not an array"),
        };
        let mut calls = Vec::new();
        for (j, e) in entries.iter().enumerate() {
            let items: Vec<&Value> = match e {
                Value::Array(batch) => batch.iter().collect(),
                one => vec![one],
            };
            for call in items {
                let method = call
                    .get("method")
                    .and_then(Value::as_str)
                    .with_context(|| format!("subsystem '{name}' entry {j}: no \"method\""))?;
                if app.rpc.get(method).is_some() {
                    calls.push((j, method, call.get("params").filter(|p| !p.is_null())));
                } else if is_spdk_tuning(method) {
                    tracing::info!(
                        subsystem = name,
                        index = j,
                        method,
                        "skipping SPDK tuning entry: blockd has nothing it sets"
                    );
                } else {
                    let known = if rank < SUBSYSTEMS.len() {
                        ""
                    } else {
                        ", a subsystem blockd does not have"
                    };
                    anyhow::bail!(
                        "subsystem '{name}'{known} entry {j} ({method}): blockd has no such \
                         method (Method not found); nothing was created"
                    );
                }
            }
        }
        plan.push((rank, name, calls));
    }
    plan.sort_by_key(|(rank, _, _)| *rank);
    for (_, name, calls) in plan {
        for (i, method, params) in calls {
            app.rpc.call(app, method, params.cloned()).map_err(|e| {
                anyhow::anyhow!(
                    "subsystem '{name}' entry {i} ({method}) failed: {} (code {})",
                    e.message,
                    e.code
                )
            })?;
            tracing::debug!(subsystem = name, index = i, method, "config entry replayed");
        }
    }
    Ok(())
}
