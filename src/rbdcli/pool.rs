//! `blockctl pool create|init|ls [--detail]|rm`.

use serde_json::{json, Value};

use super::CephArgs;

/// Pool management.
#[derive(clap::Subcommand, Debug)]
pub enum PoolCommand {
    /// Create a replicated pool with the cluster's defaults and initialize it for rbd.
    Create {
        #[command(flatten)]
        ceph: CephArgs,
        /// Only create the pool, do not run `pool init`.
        #[arg(long)]
        no_init: bool,
        name: String,
    },
    /// Initialize a pool for rbd (`rbd pool init`).
    Init {
        #[command(flatten)]
        ceph: CephArgs,
        name: String,
    },
    /// List pools (`--detail`: id, replication, PGs and applications, as `ceph osd pool
    /// ls detail`).
    Ls {
        #[command(flatten)]
        ceph: CephArgs,
        #[arg(long)]
        detail: bool,
    },
    /// Delete a pool and all its data (needs `mon allow pool delete`).
    Rm {
        #[command(flatten)]
        ceph: CephArgs,
        name: String,
        /// Required: the data is gone for good.
        #[arg(long)]
        yes_i_really_mean_it: bool,
    },
}

/// Runs a `pool` subcommand, printing results on stdout.
pub fn run(cmd: PoolCommand) -> anyhow::Result<()> {
    match cmd {
        PoolCommand::Create {
            ceph,
            no_init,
            name,
        } => {
            let r = ceph.connect()?;
            r.pool_create(&name)?;
            if !no_init {
                r.ioctx(&name)?.rbd_pool_init()?;
            }
        }
        PoolCommand::Init { ceph, name } => {
            ceph.connect()?.ioctx(&name)?.rbd_pool_init()?;
        }
        PoolCommand::Ls { ceph, detail } => {
            let r = ceph.connect()?;
            if detail {
                let out = r.mon_command(
                    &json!({"prefix": "osd pool ls", "detail": "detail", "format": "json"}),
                )?;
                let pools: Value = serde_json::from_slice(&out)?;
                ceph.emit(pools.clone(), || {
                    for p in pools.as_array().into_iter().flatten() {
                        println!("{}", detail_line(p));
                    }
                });
            } else {
                let pools = r.pool_list()?;
                ceph.emit(json!(pools), || {
                    for p in &pools {
                        println!("{p}");
                    }
                });
            }
        }
        PoolCommand::Rm {
            ceph,
            name,
            yes_i_really_mean_it,
        } => {
            if !yes_i_really_mean_it {
                anyhow::bail!("deleting pool {name} destroys its data: add --yes-i-really-mean-it");
            }
            ceph.connect()?.pool_delete(&name)?;
        }
    }
    Ok(())
}

/// One pool of `osd pool ls detail` as a line: `pool 2 'testpool' size 1 min_size 1
/// pg_num 8 application rbd`.
fn detail_line(p: &Value) -> String {
    let apps: Vec<&str> = p["application_metadata"]
        .as_object()
        .map(|m| m.keys().map(|k| k.as_str()).collect())
        .unwrap_or_default();
    format!(
        "pool {} '{}' size {} min_size {} pg_num {} application {}",
        p["pool_id"],
        p["pool_name"].as_str().unwrap_or(""),
        p["size"],
        p["min_size"],
        p["pg_num"],
        if apps.is_empty() {
            "-".to_string()
        } else {
            apps.join(",")
        }
    )
}
