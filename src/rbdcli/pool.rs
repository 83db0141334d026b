//! `blockctl pool create|init|ls|rm`.

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
    /// List pools.
    Ls {
        #[command(flatten)]
        ceph: CephArgs,
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
        PoolCommand::Ls { ceph } => {
            for p in ceph.connect()?.pool_list()? {
                println!("{p}");
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
