//! vhost controller commands, as rpc.py's `vhost_*`.

use serde_json::json;

use super::{params_of, Ctx, Run};

/// vhost methods.
#[derive(clap::Subcommand, Debug)]
#[command(rename_all = "snake_case")]
pub enum VhostCmd {
    /// Create a vhost-user-blk controller exporting a bdev.
    VhostCreateBlkController {
        /// Name of the controller (also its socket name in the socket directory).
        ctrlr: String,
        /// Bdev to expose.
        dev_name: String,
        /// Cores the controller may run on (within the daemon's mask).
        #[arg(long)]
        cpumask: Option<String>,
        /// Expose the bdev read-only.
        #[arg(short = 'r', long)]
        readonly: bool,
        /// Offer packed virtqueues.
        #[arg(short = 'p', long = "packed-ring")]
        packed_ring: bool,
    },
    /// List all controllers or one.
    VhostGetControllers {
        /// Only this controller.
        #[arg(short = 'n', long)]
        name: Option<String>,
    },
    /// Delete a controller.
    VhostDeleteController {
        /// Name of the controller.
        ctrlr: String,
    },
}

impl Run for VhostCmd {
    fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            VhostCmd::VhostCreateBlkController {
                ctrlr,
                dev_name,
                cpumask,
                readonly,
                packed_ring,
            } => ctx.call_print(
                "vhost_create_blk_controller",
                params_of(vec![
                    ("ctrlr", Some(json!(ctrlr))),
                    ("dev_name", Some(json!(dev_name))),
                    ("cpumask", cpumask.map(|c| json!(c))),
                    ("readonly", readonly.then_some(json!(true))),
                    ("packed_ring", packed_ring.then_some(json!(true))),
                ]),
            ),
            VhostCmd::VhostGetControllers { name } => ctx.call_print(
                "vhost_get_controllers",
                params_of(vec![("name", name.map(|n| json!(n)))]),
            ),
            VhostCmd::VhostDeleteController { ctrlr } => ctx.call_print(
                "vhost_delete_controller",
                params_of(vec![("ctrlr", Some(json!(ctrlr)))]),
            ),
        }
    }
}
