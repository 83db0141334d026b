//! What each subsystem saves (`framework_get_config`, `blockctl save_config`), and the
//! replay of a saved configuration (`blockd --json`) through the daemon's RPC methods, in
//! the order [`crate::config::plan`] gives.

use std::sync::Arc;

use serde_json::{json, Value};

use super::App;
use crate::config::plan;

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
        name: "keyring",
        depends_on: &[],
        config: keyring_config,
    },
    Subsystem {
        name: "bdev",
        depends_on: &["keyring"],
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
    let mut out: Vec<Value> = app
        .rbd
        .clusters
        .config_entries()
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

/// keyring: one `keyring_file_add_key {name, path}` per key (SPDK's keyring subsystem comes
/// before bdev, whose crypto and rbd bdevs refer to keys by name). Never the key's bytes.
fn keyring_config(app: &App) -> Vec<Value> {
    app.keyring
        .config_entries()
        .into_iter()
        .map(|(m, p)| entry(m, p))
        .collect()
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

/// The subsystem named `name`.
pub fn subsystem(name: &str) -> Option<&'static Subsystem> {
    SUBSYSTEMS.iter().find(|s| s.name == name)
}

/// The whole configuration, as `rpc.py save_config` assembles it.
pub fn save(app: &App) -> Value {
    let subsystems: Vec<Value> = SUBSYSTEMS
        .iter()
        .map(|s| json!({"subsystem": s.name, "config": (s.config)(app)}))
        .collect();
    json!({ "subsystems": subsystems })
}

/// Replays a configuration through the RPC methods ([`plan`] gives the calls and their
/// order; SPDK's tuning entries are logged and skipped). Stops at the first failing call,
/// with an error naming the subsystem, the entry's index and method, and the RPC error.
pub fn load(app: &Arc<App>, cfg: &Value) -> anyhow::Result<()> {
    let calls = plan(
        cfg,
        |m| app.rpc.get(m).is_some(),
        |s| SUBSYSTEMS.iter().position(|k| k.name == s),
        |c| {
            tracing::info!(
                subsystem = c.subsystem,
                index = c.index,
                method = c.method,
                "skipping SPDK tuning entry: blockd has nothing it sets"
            )
        },
    )?;
    for c in calls {
        app.rpc
            .call(app, c.method, c.params.cloned())
            .map_err(|e| {
                anyhow::anyhow!(
                    "subsystem '{}' entry {} ({}) failed: {} (code {})",
                    c.subsystem,
                    c.index,
                    c.method,
                    e.message,
                    e.code
                )
            })?;
        tracing::debug!(
            subsystem = c.subsystem,
            index = c.index,
            method = c.method,
            "config entry replayed"
        );
    }
    Ok(())
}
