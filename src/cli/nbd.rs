//! NBD commands: SPDK's `nbd_start_disk`, `nbd_stop_disk`, `nbd_get_disks` with rpc.py's
//! arguments, and blockd's own socket-export methods `nbd_server_start`, `nbd_server_stop`,
//! `nbd_export_add`, `nbd_export_remove`, `nbd_get_exports`.

use serde_json::json;

use super::{params_of, Ctx, Run};

/// nbd methods.
#[derive(clap::Subcommand, Debug)]
#[command(rename_all = "snake_case")]
pub enum NbdCmd {
    /// Attach a bdev to the kernel as /dev/nbdX; prints the device.
    NbdStartDisk {
        /// Name of the bdev to export.
        bdev_name: String,
        /// Path to the NBD device, e.g. "/dev/nbd0" (default: first available device).
        nbd_device: Option<String>,
    },
    /// Detach a kernel NBD device.
    NbdStopDisk {
        /// Path to the NBD device, e.g. "/dev/nbd0".
        nbd_device: String,
    },
    /// List the kernel NBD devices blockd serves, or one.
    NbdGetDisks {
        /// Only this device, e.g. "/dev/nbd0".
        #[arg(short = 'n', long = "nbd-device")]
        nbd_device: Option<String>,
    },
    /// Start the NBD server on a Unix socket and/or a TCP address (blockd).
    NbdServerStart {
        /// Unix socket to listen on.
        #[arg(long = "unix-path")]
        unix_path: Option<String>,
        /// TCP address to listen on: PORT (127.0.0.1), HOST:PORT or [V6]:PORT.
        #[allow(rustdoc::broken_intra_doc_links)] // clap help text, not markdown
        #[arg(long = "tcp-addr")]
        tcp_addr: Option<String>,
    },
    /// Stop the NBD server; clients are drained, flushed and disconnected (blockd).
    NbdServerStop,
    /// Export a bdev over the NBD server; prints the export name (blockd).
    NbdExportAdd {
        /// Name of the bdev to export (claimed while exported).
        bdev_name: String,
        /// Export name clients ask for (default: the bdev name).
        #[arg(short = 'n', long)]
        name: Option<String>,
        /// Refuse writes (NBD_FLAG_READ_ONLY).
        #[arg(short = 'r', long)]
        readonly: bool,
    },
    /// Remove an export; refused while clients are connected unless --force (blockd).
    NbdExportRemove {
        /// Export name.
        name: String,
        /// Disconnect the clients first (after their in-flight requests complete).
        #[arg(short = 'f', long)]
        force: bool,
    },
    /// List the exports with their client counts, or one (blockd).
    NbdGetExports {
        /// Only this export.
        #[arg(short = 'n', long)]
        name: Option<String>,
    },
}

impl Run for NbdCmd {
    fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            NbdCmd::NbdStartDisk {
                bdev_name,
                nbd_device,
            } => ctx.call_print(
                "nbd_start_disk",
                params_of(vec![
                    ("bdev_name", Some(json!(bdev_name))),
                    ("nbd_device", nbd_device.map(|d| json!(d))),
                ]),
            ),
            NbdCmd::NbdStopDisk { nbd_device } => {
                ctx.call_print("nbd_stop_disk", Some(json!({ "nbd_device": nbd_device })))
            }
            NbdCmd::NbdGetDisks { nbd_device } => ctx.call_print(
                "nbd_get_disks",
                params_of(vec![("nbd_device", nbd_device.map(|d| json!(d)))]),
            ),
            NbdCmd::NbdServerStart {
                unix_path,
                tcp_addr,
            } => {
                if unix_path.is_none() && tcp_addr.is_none() {
                    anyhow::bail!("nbd_server_start needs --unix-path and/or --tcp-addr");
                }
                ctx.call_print(
                    "nbd_server_start",
                    params_of(vec![
                        ("unix_path", unix_path.map(|p| json!(p))),
                        ("tcp_addr", tcp_addr.map(|a| json!(a))),
                    ]),
                )
            }
            NbdCmd::NbdServerStop => ctx.call_print("nbd_server_stop", None),
            NbdCmd::NbdExportAdd {
                bdev_name,
                name,
                readonly,
            } => ctx.call_print(
                "nbd_export_add",
                params_of(vec![
                    ("bdev_name", Some(json!(bdev_name))),
                    ("name", name.map(|n| json!(n))),
                    ("readonly", readonly.then_some(json!(true))),
                ]),
            ),
            NbdCmd::NbdExportRemove { name, force } => ctx.call_print(
                "nbd_export_remove",
                params_of(vec![
                    ("name", Some(json!(name))),
                    ("force", force.then_some(json!(true))),
                ]),
            ),
            NbdCmd::NbdGetExports { name } => ctx.call_print(
                "nbd_get_exports",
                params_of(vec![("name", name.map(|n| json!(n)))]),
            ),
        }
    }
}
