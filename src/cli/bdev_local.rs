//! Local pool bdev commands: `blockctl bdev_local_create vm1 -p mypool` → `Local0`.

use serde_json::json;

use super::{params_of, Ctx, Run};

/// local bdev methods.
#[derive(clap::Subcommand, Debug)]
#[command(rename_all = "snake_case")]
pub enum BdevLocalCmd {
    /// Create a bdev on an image of a local pool (blockctl image create local:POOL/IMAGE).
    BdevLocalCreate {
        /// Pool of the image (with or without `local:`).
        #[arg(short = 'p', long)]
        pool: String,
        /// Image name.
        image: String,
        /// Name of the bdev (default: Local<N>).
        #[allow(rustdoc::invalid_html_tags)] // clap help text, not markdown
        #[arg(short = 'b', long)]
        name: Option<String>,
        /// Block size in bytes (default 512).
        #[arg(long = "block-size")]
        block_size: Option<u32>,
        /// Serve the image read-only.
        #[arg(short = 'r', long)]
        readonly: bool,
        /// Root of the local pools as the daemon sees it (default: its $BLOCKD_POOL_DIR,
        /// else /var/lib/blockd/pools).
        #[arg(long = "pool-dir")]
        pool_dir: Option<String>,
        /// UUID of the bdev (default: random).
        #[arg(short = 'u', long)]
        uuid: Option<String>,
        /// The destination of a live migration (as QEMU's -incoming): if another instance
        /// writes the image, wait and take the write role when the device starts.
        #[arg(long)]
        incoming: bool,
    },
    /// Delete a local bdev (the image stays).
    BdevLocalDelete {
        /// Name of the bdev.
        name: String,
    },
}

impl Run for BdevLocalCmd {
    fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            BdevLocalCmd::BdevLocalCreate {
                pool,
                image,
                name,
                block_size,
                readonly,
                pool_dir,
                uuid,
                incoming,
            } => {
                let pool = pool.strip_prefix("local:").unwrap_or(&pool).to_string();
                ctx.call_print(
                    "bdev_local_create",
                    params_of(vec![
                        ("pool", Some(json!(pool))),
                        ("image", Some(json!(image))),
                        ("name", name.map(|v| json!(v))),
                        ("block_size", block_size.map(|v| json!(v))),
                        ("readonly", readonly.then_some(json!(true))),
                        ("pool_dir", pool_dir.map(|v| json!(v))),
                        ("uuid", uuid.map(|v| json!(v))),
                        ("incoming", incoming.then_some(json!(true))),
                    ]),
                )
            }
            BdevLocalCmd::BdevLocalDelete { name } => {
                ctx.call_print("bdev_local_delete", Some(json!({ "name": name })))
            }
        }
    }
}
