//! Per-bdev I/O statistics for `bdev_get_iostat`.
//!
//! Every channel of a bdev updates the same counters with relaxed atomics: the numbers are
//! monotonic totals read by an RPC, nothing synchronises on them. Times are nanoseconds and
//! `bdev_get_iostat` announces `tick_rate` 1e9, so "ticks" are nanoseconds.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use serde_json::{json, Value};

use super::IoKind;

/// `tick_rate` reported by `bdev_get_iostat`: one tick is one nanosecond.
pub const TICK_RATE: u64 = 1_000_000_000;

/// Running min/max/sum of one operation kind's latency.
#[derive(Debug)]
struct Latency {
    sum: AtomicU64,
    max: AtomicU64,
    min: AtomicU64,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
            min: AtomicU64::new(u64::MAX),
        }
    }
}

impl Latency {
    fn add(&self, ns: u64) {
        self.sum.fetch_add(ns, Relaxed);
        self.max.fetch_max(ns, Relaxed);
        self.min.fetch_min(ns, Relaxed);
    }

    fn min(&self) -> u64 {
        match self.min.load(Relaxed) {
            u64::MAX => 0,
            v => v,
        }
    }
}

/// Counters of one bdev, updated by its channels.
#[derive(Default, Debug)]
pub struct BdevStats {
    pub bytes_read: AtomicU64,
    pub num_read_ops: AtomicU64,
    pub bytes_written: AtomicU64,
    pub num_write_ops: AtomicU64,
    pub bytes_unmapped: AtomicU64,
    pub num_unmap_ops: AtomicU64,
    pub num_flush_ops: AtomicU64,
    pub bytes_write_zeroes: AtomicU64,
    pub num_write_zeroes_ops: AtomicU64,
    /// Failed operations (any kind, including ones refused before reaching the backend).
    pub io_errors: AtomicU64,
    /// Operations handed to backends and not yet completed, over all channels.
    pub queue_depth: AtomicI64,
    /// Sum over channels of the time each had at least one operation in flight (ns).
    pub io_time: AtomicU64,
    read_lat: Latency,
    write_lat: Latency,
    unmap_lat: Latency,
    flush_lat: Latency,
    write_zeroes_lat: Latency,
}

impl BdevStats {
    /// Accounts one completed operation of `kind` moving `bytes` that took `latency_ns`.
    /// Failed operations only count as errors, as in SPDK.
    pub fn record(&self, kind: IoKind, bytes: u64, latency_ns: u64, ok: bool) {
        if !ok {
            self.io_errors.fetch_add(1, Relaxed);
            return;
        }
        let (b, n, lat) = match kind {
            IoKind::Read => (&self.bytes_read, &self.num_read_ops, &self.read_lat),
            IoKind::Write => (&self.bytes_written, &self.num_write_ops, &self.write_lat),
            IoKind::Unmap => (&self.bytes_unmapped, &self.num_unmap_ops, &self.unmap_lat),
            IoKind::WriteZeroes => (
                &self.bytes_write_zeroes,
                &self.num_write_zeroes_ops,
                &self.write_zeroes_lat,
            ),
            IoKind::Flush => {
                self.num_flush_ops.fetch_add(1, Relaxed);
                self.flush_lat.add(latency_ns);
                return;
            }
        };
        b.fetch_add(bytes, Relaxed);
        n.fetch_add(1, Relaxed);
        lat.add(latency_ns);
    }

    /// The per-bdev object of `bdev_get_iostat` (SPDK's field names; ticks are ns).
    ///
    /// `weighted_io_time` is the sum of all completed latencies, i.e. the integral of the
    /// queue depth over time; `io_time` sums each channel's busy time (channels that are busy
    /// at the same time both count).
    pub fn to_json(&self, name: &str) -> Value {
        let l = |x: &AtomicU64| x.load(Relaxed);
        let weighted = [
            &self.read_lat,
            &self.write_lat,
            &self.unmap_lat,
            &self.flush_lat,
            &self.write_zeroes_lat,
        ]
        .iter()
        .map(|t| l(&t.sum))
        .fold(0u64, u64::wrapping_add);
        json!({
            "name": name,
            "bytes_read": l(&self.bytes_read),
            "num_read_ops": l(&self.num_read_ops),
            "bytes_written": l(&self.bytes_written),
            "num_write_ops": l(&self.num_write_ops),
            "bytes_unmapped": l(&self.bytes_unmapped),
            "num_unmap_ops": l(&self.num_unmap_ops),
            "bytes_copied": 0,
            "num_copy_ops": 0,
            "read_latency_ticks": l(&self.read_lat.sum),
            "max_read_latency_ticks": l(&self.read_lat.max),
            "min_read_latency_ticks": self.read_lat.min(),
            "write_latency_ticks": l(&self.write_lat.sum),
            "max_write_latency_ticks": l(&self.write_lat.max),
            "min_write_latency_ticks": self.write_lat.min(),
            "unmap_latency_ticks": l(&self.unmap_lat.sum),
            "max_unmap_latency_ticks": l(&self.unmap_lat.max),
            "min_unmap_latency_ticks": self.unmap_lat.min(),
            "copy_latency_ticks": 0,
            "max_copy_latency_ticks": 0,
            "min_copy_latency_ticks": 0,
            "num_flush_ops": l(&self.num_flush_ops),
            "flush_latency_ticks": l(&self.flush_lat.sum),
            "num_write_zeroes_ops": l(&self.num_write_zeroes_ops),
            "bytes_write_zeroes": l(&self.bytes_write_zeroes),
            "write_zeroes_latency_ticks": l(&self.write_zeroes_lat.sum),
            "io_error": l(&self.io_errors),
            "queue_depth": self.queue_depth.load(Relaxed).max(0),
            "io_time": l(&self.io_time),
            "weighted_io_time": weighted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_and_json() {
        let s = BdevStats::default();
        s.record(IoKind::Read, 4096, 100, true);
        s.record(IoKind::Read, 512, 300, true);
        s.record(IoKind::Write, 8192, 50, true);
        s.record(IoKind::Write, 8192, 50, false);
        s.record(IoKind::Flush, 0, 10, true);
        s.record(IoKind::Unmap, 1 << 20, 7, true);
        let j = s.to_json("Malloc0");
        assert_eq!(j["name"], "Malloc0");
        assert_eq!(j["bytes_read"], 4608);
        assert_eq!(j["num_read_ops"], 2);
        assert_eq!(j["read_latency_ticks"], 400);
        assert_eq!(j["max_read_latency_ticks"], 300);
        assert_eq!(j["min_read_latency_ticks"], 100);
        assert_eq!(j["bytes_written"], 8192);
        assert_eq!(j["num_write_ops"], 1);
        assert_eq!(j["io_error"], 1);
        assert_eq!(j["num_flush_ops"], 1);
        assert_eq!(j["bytes_unmapped"], 1 << 20);
        assert_eq!(j["min_unmap_latency_ticks"], 7);
        assert_eq!(j["min_copy_latency_ticks"], 0);
        assert_eq!(j["weighted_io_time"], 467);
    }
}
