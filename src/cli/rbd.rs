//! Ceph RBD bdev commands, as rpc.py's `bdev_rbd_*` (`bdev_rbd_create testpool testimage
//! 512` → `Ceph0`).

use anyhow::bail;
use serde_json::{json, Map, Value};

use super::{params_of, Ctx, Run};

/// rbd bdev methods.
#[derive(clap::Subcommand, Debug)]
#[command(rename_all = "snake_case")]
pub enum RbdCmd {
    /// Create a bdev on an RBD image (librbd).
    BdevRbdCreate {
        /// Name of the bdev (default: Ceph<N>).
        #[allow(rustdoc::invalid_html_tags)] // clap help text, not markdown
        #[arg(short = 'b', long)]
        name: Option<String>,
        /// Ceph user name (admin, not client.admin).
        #[arg(long = "user")]
        user_id: Option<String>,
        /// A key=value option for rados_conf_set (repeatable).
        #[arg(long = "config", value_name = "key=value")]
        config: Vec<String>,
        /// A cluster registered with bdev_rbd_register_cluster.
        #[arg(short = 'c', long = "cluster-name")]
        cluster_name: Option<String>,
        /// UUID of the bdev (default: random).
        #[arg(short = 'u', long)]
        uuid: Option<String>,
        /// Open the image read-only (rpc.py's `-r/--readonly`, sent as `read_only`).
        #[arg(short = 'r', long = "readonly")]
        read_only: bool,
        /// Load the image's LUKS encryption (`luks1` or `luks2`, as `rbd encryption
        /// format` made it) before serving; needs --key.
        #[arg(long = "encryption-format", requires = "key_name")]
        encryption_format: Option<String>,
        /// The keyring key (keyring_file_add_key) holding the LUKS passphrase.
        #[arg(long = "key", requires = "encryption_format")]
        key_name: Option<String>,
        /// Pool of the image.
        pool_name: String,
        /// Image name.
        rbd_name: String,
        /// Block size in bytes.
        block_size: u32,
    },
    /// Delete an rbd bdev.
    BdevRbdDelete {
        /// Name of the bdev.
        name: String,
    },
    /// Grow an rbd bdev (and its image).
    BdevRbdResize {
        /// Name of the bdev.
        name: String,
        /// New size in MiB.
        new_size: u64,
    },
    /// Register a Ceph cluster connection for rbd bdevs to share.
    BdevRbdRegisterCluster {
        /// Name of the cluster (as bdev_rbd_create -c names it).
        name: String,
        /// Ceph user name (admin, not client.admin).
        #[arg(long = "user")]
        user_id: Option<String>,
        /// A key=value option for rados_conf_set (repeatable).
        #[arg(long = "config-param", value_name = "key=value")]
        config_param: Vec<String>,
        /// Ceph configuration file.
        #[arg(long = "config-file")]
        config_file: Option<String>,
        /// Keyring file.
        #[arg(long = "key-file")]
        key_file: Option<String>,
        /// Cores for librados' threads.
        #[arg(long = "core-mask")]
        core_mask: Option<String>,
    },
    /// Unregister a cluster (refused while bdevs use it).
    BdevRbdUnregisterCluster {
        /// Name of the cluster.
        name: String,
    },
    /// Registered clusters.
    BdevRbdGetClustersInfo {
        /// Only this cluster.
        #[arg(short = 'b', long)]
        name: Option<String>,
    },
}

/// `key=value` pairs as a JSON object (rpc.py's `--config` handling).
fn kv(entries: Vec<String>, flag: &str) -> anyhow::Result<Option<Value>> {
    if entries.is_empty() {
        return Ok(None);
    }
    let mut m = Map::new();
    for e in entries {
        let Some((k, v)) = e.split_once('=') else {
            bail!("{flag} {e} not in key=value form");
        };
        m.insert(k.to_string(), json!(v));
    }
    Ok(Some(Value::Object(m)))
}

impl Run for RbdCmd {
    fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            RbdCmd::BdevRbdCreate {
                name,
                user_id,
                config,
                cluster_name,
                uuid,
                read_only,
                encryption_format,
                key_name,
                pool_name,
                rbd_name,
                block_size,
            } => ctx.call_print(
                "bdev_rbd_create",
                params_of(vec![
                    ("name", name.map(|v| json!(v))),
                    ("user_id", user_id.map(|v| json!(v))),
                    ("config", kv(config, "--config")?),
                    ("pool_name", Some(json!(pool_name))),
                    ("rbd_name", Some(json!(rbd_name))),
                    ("block_size", Some(json!(block_size))),
                    ("cluster_name", cluster_name.map(|v| json!(v))),
                    ("uuid", uuid.map(|v| json!(v))),
                    ("read_only", read_only.then_some(json!(true))),
                    ("encryption_format", encryption_format.map(|v| json!(v))),
                    ("key_name", key_name.map(|v| json!(v))),
                ]),
            ),
            RbdCmd::BdevRbdDelete { name } => {
                ctx.call_print("bdev_rbd_delete", Some(json!({ "name": name })))
            }
            RbdCmd::BdevRbdResize { name, new_size } => ctx.call_print(
                "bdev_rbd_resize",
                Some(json!({ "name": name, "new_size": new_size })),
            ),
            RbdCmd::BdevRbdRegisterCluster {
                name,
                user_id,
                config_param,
                config_file,
                key_file,
                core_mask,
            } => ctx.call_print(
                "bdev_rbd_register_cluster",
                params_of(vec![
                    ("name", Some(json!(name))),
                    ("user_id", user_id.map(|v| json!(v))),
                    ("config_param", kv(config_param, "--config-param")?),
                    ("config_file", config_file.map(|v| json!(v))),
                    ("key_file", key_file.map(|v| json!(v))),
                    ("core_mask", core_mask.map(|v| json!(v))),
                ]),
            ),
            RbdCmd::BdevRbdUnregisterCluster { name } => {
                ctx.call_print("bdev_rbd_unregister_cluster", Some(json!({ "name": name })))
            }
            RbdCmd::BdevRbdGetClustersInfo { name } => ctx.call_print(
                "bdev_rbd_get_clusters_info",
                params_of(vec![("name", name.map(|v| json!(v)))]),
            ),
        }
    }
}
