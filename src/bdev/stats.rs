//! Per-bdev I/O statistics for `bdev_get_iostat`.

/// Counters of one bdev, updated by its channels. (being written)
#[derive(Default)]
pub struct BdevStats {}
