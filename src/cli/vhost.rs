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
    /// Create a vhost-user-scsi controller (targets are added with
    /// vhost_scsi_controller_add_target, hot-plugged when a guest is connected).
    VhostCreateScsiController {
        /// Name of the controller (also its socket name in the socket directory).
        ctrlr: String,
        /// Cores the controller may run on (within the daemon's mask).
        #[arg(long)]
        cpumask: Option<String>,
        /// Accepted for rpc.py compatibility; blockd listens at once.
        #[arg(long)]
        delay: bool,
    },
    /// Add a target (LUN 0 = the bdev) to a scsi controller; prints its number.
    VhostScsiControllerAddTarget {
        /// Name of the controller.
        ctrlr: String,
        /// Target number 0-7, or -1 for the first free one.
        #[arg(allow_negative_numbers = true)]
        scsi_target_num: i32,
        /// Bdev to expose.
        bdev_name: String,
    },
    /// Remove a target from a scsi controller (hot-unplugged from a connected guest).
    VhostScsiControllerRemoveTarget {
        /// Name of the controller.
        ctrlr: String,
        /// Target number.
        scsi_target_num: u32,
    },
    /// Start a scsi controller created with --delay.
    VhostStartScsiController {
        /// Name of the controller.
        ctrlr: String,
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
    /// Set a controller's interrupt coalescing: past IOPS_THRESHOLD per queue, interrupts
    /// are sent at most every DELAY_BASE_US × (IOPS − threshold) / threshold µs.
    VhostControllerSetCoalescing {
        /// Name of the controller.
        ctrlr: String,
        /// Base delay in microseconds (0: off).
        delay_base_us: u32,
        /// Per-queue IOPS above which interrupts are coalesced.
        iops_threshold: u32,
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
            VhostCmd::VhostCreateScsiController {
                ctrlr,
                cpumask,
                delay,
            } => ctx.call_print(
                "vhost_create_scsi_controller",
                params_of(vec![
                    ("ctrlr", Some(json!(ctrlr))),
                    ("cpumask", cpumask.map(|c| json!(c))),
                    ("delay", delay.then_some(json!(true))),
                ]),
            ),
            VhostCmd::VhostScsiControllerAddTarget {
                ctrlr,
                scsi_target_num,
                bdev_name,
            } => ctx.call_print(
                "vhost_scsi_controller_add_target",
                Some(json!({"ctrlr": ctrlr, "scsi_target_num": scsi_target_num,
                            "bdev_name": bdev_name})),
            ),
            VhostCmd::VhostScsiControllerRemoveTarget {
                ctrlr,
                scsi_target_num,
            } => ctx.call_print(
                "vhost_scsi_controller_remove_target",
                Some(json!({"ctrlr": ctrlr, "scsi_target_num": scsi_target_num})),
            ),
            VhostCmd::VhostStartScsiController { ctrlr } => ctx.call_print(
                "vhost_start_scsi_controller",
                Some(json!({ "ctrlr": ctrlr })),
            ),
            VhostCmd::VhostGetControllers { name } => ctx.call_print(
                "vhost_get_controllers",
                params_of(vec![("name", name.map(|n| json!(n)))]),
            ),
            VhostCmd::VhostDeleteController { ctrlr } => ctx.call_print(
                "vhost_delete_controller",
                params_of(vec![("ctrlr", Some(json!(ctrlr)))]),
            ),
            VhostCmd::VhostControllerSetCoalescing {
                ctrlr,
                delay_base_us,
                iops_threshold,
            } => ctx.call_print(
                "vhost_controller_set_coalescing",
                Some(json!({"ctrlr": ctrlr, "delay_base_us": delay_base_us,
                            "iops_threshold": iops_threshold})),
            ),
        }
    }
}
