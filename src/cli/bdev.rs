//! bdev commands, as rpc.py's `bdev_*`: same positional arguments and flags, same
//! size-to-blocks conversion (`total_size` in MiB).

use anyhow::bail;
use serde_json::json;

use super::{params_of, Ctx, Run};

/// bdev methods.
#[derive(clap::Subcommand, Debug)]
#[command(rename_all = "snake_case")]
pub enum BdevCmd {
    /// Create a bdev in RAM.
    BdevMallocCreate {
        /// Name of the bdev (default: Malloc<N>).
        #[allow(rustdoc::invalid_html_tags)] // clap help text, not markdown
        #[arg(short = 'b', long)]
        name: Option<String>,
        /// UUID of the bdev (default: random).
        #[arg(short = 'u', long)]
        uuid: Option<String>,
        /// Size in MiB.
        total_size: f64,
        /// Block size in bytes.
        block_size: u32,
    },
    /// Delete a malloc bdev.
    BdevMallocDelete {
        /// Name of the bdev.
        name: String,
    },
    /// Create a bdev that discards writes and reads zeroes.
    BdevNullCreate {
        /// Name of the bdev.
        name: String,
        /// UUID of the bdev (default: random).
        #[arg(short = 'u', long)]
        uuid: Option<String>,
        /// Size in MiB.
        total_size: u64,
        /// Block size in bytes.
        block_size: u32,
    },
    /// Delete a null bdev.
    BdevNullDelete {
        /// Name of the bdev.
        name: String,
    },
    /// Grow a null bdev (connected guests see the new capacity).
    BdevNullResize {
        /// Name of the bdev.
        name: String,
        /// New size in MiB.
        new_size: u64,
    },
    /// Create a bdev over a file or block device (io_uring).
    BdevAioCreate {
        /// Path to the file or block device.
        filename: String,
        /// Name of the bdev.
        name: String,
        /// Block size in bytes (default: the device's logical block size).
        block_size: Option<u32>,
        /// Open read-only.
        #[arg(short = 'r', long)]
        readonly: bool,
        /// Offer unmap and write-zeroes, done with fallocate (punch hole, zero range).
        #[arg(long)]
        fallocate: bool,
        /// UUID of the bdev (default: random).
        #[arg(short = 'u', long)]
        uuid: Option<String>,
    },
    /// Delete an aio bdev.
    BdevAioDelete {
        /// Name of the bdev.
        name: String,
    },
    /// Re-read the size of an aio bdev's file (after it grew); frontends are told.
    BdevAioRescan {
        /// Name of the bdev.
        name: String,
    },
    /// List all bdevs or one.
    BdevGetBdevs {
        /// Only this bdev.
        #[arg(short = 'b', long)]
        name: Option<String>,
        /// Wait this many milliseconds for the bdev to appear.
        #[arg(short = 't', long = "timeout-ms")]
        timeout: Option<u64>,
    },
    /// Wait until every bdev has been examined (blockd registers bdevs whole: at once).
    BdevWaitForExamine,
    /// I/O statistics of all bdevs or one.
    BdevGetIostat {
        /// Only these bdevs, comma-separated (rpc.py ≥ 24 `--names`; `-b/--name` as v23.05).
        #[arg(short = 'b', long = "names", alias = "name")]
        name: Option<String>,
        /// Reset the statistics after reading them: all, maxmin, error or none.
        #[arg(long = "reset-mode")]
        reset_mode: Option<String>,
    },
    /// Enable or disable the latency histogram of a bdev (bdev_get_histogram reads it).
    BdevEnableHistogram {
        /// Name of the bdev.
        name: String,
        /// Enable the histogram (counting from now).
        #[arg(long = "histogram", conflicts_with = "no_histogram")]
        histogram: bool,
        /// Disable the histogram.
        #[arg(long = "no-histogram")]
        no_histogram: bool,
        /// Only this I/O type (read, write, unmap, flush, write_zeroes).
        #[arg(short = 'o', long)]
        opc: Option<String>,
        /// Bucket granularity (accepted; blockd records at granularity 3).
        #[arg(long)]
        granularity: Option<u8>,
        /// Smallest value tracked (ns).
        #[arg(long = "min-nsec")]
        min_nsec: Option<u64>,
        /// Largest value tracked (ns, exclusive).
        #[arg(long = "max-nsec")]
        max_nsec: Option<u64>,
    },
    /// Get the latency histogram of a bdev (SPDK's scripts/histogram.py decodes it).
    BdevGetHistogram {
        /// Name of the bdev.
        name: String,
    },
    /// Reset the I/O statistics of all bdevs or one.
    BdevResetIostat {
        /// Name of the bdev (default: all).
        #[arg(short = 'b', long)]
        name: Option<String>,
        /// all (default), maxmin, error or none.
        #[arg(short = 'm', long)]
        mode: Option<String>,
    },
    /// Set QoS rate limits on a bdev (0 = unlimited).
    BdevSetQosLimit {
        /// Name of the bdev.
        name: String,
        /// Read+write I/Os per second.
        #[arg(long = "rw-ios-per-sec")]
        rw_ios_per_sec: Option<u64>,
        /// Read+write MiB per second.
        #[arg(long = "rw-mbytes-per-sec")]
        rw_mbytes_per_sec: Option<u64>,
        /// Read MiB per second.
        #[arg(long = "r-mbytes-per-sec")]
        r_mbytes_per_sec: Option<u64>,
        /// Write MiB per second.
        #[arg(long = "w-mbytes-per-sec")]
        w_mbytes_per_sec: Option<u64>,
    },
}

/// rpc.py's `num_blocks = total_size * 1024 * 1024 // block_size`.
fn num_blocks(total_size_mib: f64, block_size: u32) -> anyhow::Result<u64> {
    if block_size == 0 {
        bail!("block_size must be greater than 0");
    }
    if !(total_size_mib.is_finite() && total_size_mib > 0.0) {
        bail!("total_size must be a positive number of MiB");
    }
    let blocks = (total_size_mib * 1_048_576.0 / f64::from(block_size)).floor();
    if blocks >= u64::MAX as f64 {
        bail!("total_size {total_size_mib} MiB is too large");
    }
    Ok(blocks as u64)
}

fn name_only(ctx: &Ctx, method: &str, name: String) -> anyhow::Result<()> {
    ctx.call_print(method, params_of(vec![("name", Some(json!(name)))]))
}

impl Run for BdevCmd {
    fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            BdevCmd::BdevMallocCreate {
                name,
                uuid,
                total_size,
                block_size,
            } => ctx.call_print(
                "bdev_malloc_create",
                params_of(vec![
                    (
                        "num_blocks",
                        Some(json!(num_blocks(total_size, block_size)?)),
                    ),
                    ("block_size", Some(json!(block_size))),
                    ("name", name.map(|n| json!(n))),
                    ("uuid", uuid.map(|u| json!(u))),
                ]),
            ),
            BdevCmd::BdevMallocDelete { name } => name_only(ctx, "bdev_malloc_delete", name),
            BdevCmd::BdevNullCreate {
                name,
                uuid,
                total_size,
                block_size,
            } => ctx.call_print(
                "bdev_null_create",
                params_of(vec![
                    (
                        "num_blocks",
                        Some(json!(num_blocks(total_size as f64, block_size)?)),
                    ),
                    ("block_size", Some(json!(block_size))),
                    ("name", Some(json!(name))),
                    ("uuid", uuid.map(|u| json!(u))),
                ]),
            ),
            BdevCmd::BdevNullDelete { name } => name_only(ctx, "bdev_null_delete", name),
            BdevCmd::BdevNullResize { name, new_size } => ctx.call_print(
                "bdev_null_resize",
                Some(json!({"name": name, "new_size": new_size})),
            ),
            BdevCmd::BdevAioCreate {
                filename,
                name,
                block_size,
                readonly,
                fallocate,
                uuid,
            } => ctx.call_print(
                "bdev_aio_create",
                params_of(vec![
                    ("filename", Some(json!(filename))),
                    ("name", Some(json!(name))),
                    ("block_size", block_size.map(|b| json!(b))),
                    ("readonly", readonly.then_some(json!(true))),
                    ("fallocate", fallocate.then_some(json!(true))),
                    ("uuid", uuid.map(|u| json!(u))),
                ]),
            ),
            BdevCmd::BdevAioDelete { name } => name_only(ctx, "bdev_aio_delete", name),
            BdevCmd::BdevAioRescan { name } => name_only(ctx, "bdev_aio_rescan", name),
            BdevCmd::BdevGetBdevs { name, timeout } => ctx.call_print(
                "bdev_get_bdevs",
                params_of(vec![
                    ("name", name.map(|n| json!(n))),
                    ("timeout", timeout.map(|t| json!(t))),
                ]),
            ),
            BdevCmd::BdevWaitForExamine => ctx.call_print("bdev_wait_for_examine", None),
            BdevCmd::BdevEnableHistogram {
                name,
                histogram,
                no_histogram,
                opc,
                granularity,
                min_nsec,
                max_nsec,
            } => {
                if histogram == no_histogram {
                    anyhow::bail!("bdev_enable_histogram: give --histogram or --no-histogram");
                }
                ctx.call_print(
                    "bdev_enable_histogram",
                    params_of(vec![
                        ("name", Some(json!(name))),
                        ("enable", Some(json!(histogram))),
                        ("opc", opc.map(|v| json!(v))),
                        ("granularity", granularity.map(|v| json!(v))),
                        ("min_nsec", min_nsec.map(|v| json!(v))),
                        ("max_nsec", max_nsec.map(|v| json!(v))),
                    ]),
                )
            }
            BdevCmd::BdevGetHistogram { name } => ctx.call_print(
                "bdev_get_histogram",
                params_of(vec![("name", Some(json!(name)))]),
            ),
            BdevCmd::BdevResetIostat { name, mode } => ctx.call_print(
                "bdev_reset_iostat",
                params_of(vec![
                    ("name", name.map(|n| json!(n))),
                    ("mode", mode.map(|m| json!(m))),
                ]),
            ),
            BdevCmd::BdevGetIostat { name, reset_mode } => ctx.call_print(
                "bdev_get_iostat",
                params_of(vec![
                    (
                        "names",
                        name.map(|n| json!(n.split(',').collect::<Vec<_>>())),
                    ),
                    ("reset_mode", reset_mode.map(|m| json!(m))),
                ]),
            ),
            BdevCmd::BdevSetQosLimit {
                name,
                rw_ios_per_sec,
                rw_mbytes_per_sec,
                r_mbytes_per_sec,
                w_mbytes_per_sec,
            } => ctx.call_print(
                "bdev_set_qos_limit",
                params_of(vec![
                    ("name", Some(json!(name))),
                    ("rw_ios_per_sec", rw_ios_per_sec.map(|v| json!(v))),
                    ("rw_mbytes_per_sec", rw_mbytes_per_sec.map(|v| json!(v))),
                    ("r_mbytes_per_sec", r_mbytes_per_sec.map(|v| json!(v))),
                    ("w_mbytes_per_sec", w_mbytes_per_sec.map(|v| json!(v))),
                ]),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_rpc_py() {
        assert_eq!(num_blocks(64.0, 512).unwrap(), 131_072);
        assert_eq!(num_blocks(1.0, 4096).unwrap(), 256);
        assert_eq!(num_blocks(0.5, 512).unwrap(), 1024);
        assert_eq!(num_blocks(1.0, 3000).unwrap(), 349);
        assert!(num_blocks(1.0, 0).is_err());
        assert!(num_blocks(-1.0, 512).is_err());
        assert!(num_blocks(f64::NAN, 512).is_err());
    }
}
