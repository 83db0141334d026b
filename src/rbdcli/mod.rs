//! `blockctl image ...` and `blockctl pool ...`: manage RBD pools and images by talking to
//! the cluster directly (no daemon), like the `rbd` tool: the same connection flags
//! (`--cluster/--conf/--keyring/--id/-m`), the same size syntax (a plain number is MiB) and
//! `--format json` with `rbd`'s JSON shapes.

pub mod image;
pub mod localpool;
pub mod pool;
pub mod present;
pub mod progress;
pub mod size;

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;

use crate::rbd::{ConnectOptions, Rados, RbdResult};

/// Output format (`rbd --format`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    #[default]
    Plain,
    Json,
}

/// How to reach the cluster; defaults as the `rbd` tool (`$CEPH_CONF`, /etc/ceph/ceph.conf,
/// client.admin, the keyring search).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct CephArgs {
    /// Ceph configuration file.
    #[arg(long, short = 'c', global = true)]
    pub conf: Option<PathBuf>,
    /// Cluster name: /etc/ceph/CLUSTER.conf and CLUSTER.client.ID.keyring (default: ceph).
    #[arg(long, global = true)]
    pub cluster: Option<String>,
    /// Cephx user without `client.` (default: admin).
    #[arg(long, visible_alias = "user", global = true)]
    pub id: Option<String>,
    /// Keyring file.
    #[arg(long, short = 'k', global = true)]
    pub keyring: Option<PathBuf>,
    /// Monitor address(es), instead of the configuration's `mon host`.
    #[arg(long = "mon-host", short = 'm', global = true)]
    pub mon_host: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Plain, global = true)]
    pub format: Format,
    /// Indent JSON output.
    #[arg(long, global = true)]
    pub pretty_format: bool,
}

impl CephArgs {
    /// Connects.
    pub fn connect(&self) -> RbdResult<Arc<Rados>> {
        let mut config = std::collections::BTreeMap::new();
        if let Some(m) = &self.mon_host {
            config.insert("mon_host".to_string(), m.clone());
        }
        Rados::connect(&ConnectOptions {
            label: String::new(),
            cluster: self.cluster.clone(),
            user_id: self.id.clone(),
            config_file: self.conf.clone(),
            key_file: self.keyring.clone(),
            config,
        })
    }

    /// Whether JSON was asked for.
    pub fn json(&self) -> bool {
        self.format == Format::Json
    }

    /// Prints `v` as JSON (`--format json`) or runs `plain`.
    pub fn emit(&self, v: Value, plain: impl FnOnce()) {
        match self.format {
            Format::Json if self.pretty_format => {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
            }
            Format::Json => println!("{v}"),
            Format::Plain => plain(),
        }
    }
}
