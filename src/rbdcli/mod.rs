//! `blockctl image ...` and `blockctl pool ...`: manage RBD pools and images by talking to
//! the cluster directly (no daemon), like the `rbd` tool.

pub mod image;
pub mod local;
pub mod pool;

use std::path::PathBuf;
use std::sync::Arc;

use crate::rbd::{ConnectOptions, Rados, RbdResult};

/// How to reach the cluster; defaults as the `rbd` tool (`$CEPH_CONF`, /etc/ceph/ceph.conf,
/// client.admin, the keyring search).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct CephArgs {
    /// Ceph configuration file.
    #[arg(long, short = 'c', global = true)]
    pub conf: Option<PathBuf>,
    /// Cephx user without `client.` (default: admin).
    #[arg(long, global = true)]
    pub id: Option<String>,
    /// Keyring file.
    #[arg(long, short = 'k', global = true)]
    pub keyring: Option<PathBuf>,
}

impl CephArgs {
    /// Connects.
    pub fn connect(&self) -> RbdResult<Arc<Rados>> {
        Rados::connect(&ConnectOptions {
            label: String::new(),
            user_id: self.id.clone(),
            config_file: self.conf.clone(),
            key_file: self.keyring.clone(),
            config: Default::default(),
        })
    }
}

impl crate::cli::Run for image::ImageCommand {
    fn run(self, _ctx: &crate::cli::Ctx) -> anyhow::Result<()> {
        image::run(self)
    }
}

impl crate::cli::Run for pool::PoolCommand {
    fn run(self, _ctx: &crate::cli::Ctx) -> anyhow::Result<()> {
        pool::run(self)
    }
}
