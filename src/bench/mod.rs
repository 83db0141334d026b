//! `blockctl bench`: a vhost-user-blk load generator on libblkio. (being written)

/// Arguments of `blockctl bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {}

/// Runs the benchmark.
pub fn run(_args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
