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

    /// The extremes change rarely: a load decides, and only a new extreme pays the
    /// read-modify-write (a compare-and-swap loop for `fetch_max`/`fetch_min` on x86).
    fn add_batch(&self, sum: u64, min: u64, max: u64) {
        self.sum.fetch_add(sum, Relaxed);
        if max > self.max.load(Relaxed) {
            self.max.fetch_max(max, Relaxed);
        }
        if min < self.min.load(Relaxed) {
            self.min.fetch_min(min, Relaxed);
        }
    }

    /// Forgets the extremes (SPDK's `maxmin` reset).
    fn reset_extremes(&self) {
        self.max.store(0, Relaxed);
        self.min.store(u64::MAX, Relaxed);
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
    /// Latency histograms by kind (Prometheus, `bdev_get_histogram`); not reset by
    /// `bdev_reset_iostat`.
    pub histograms: super::histogram::Histograms,
    /// Operations QoS made wait, and the time they waited in total (ns).
    pub qos_throttled_ops: AtomicU64,
    pub qos_throttled_ns: AtomicU64,
}

/// What `bdev_reset_iostat` (and `bdev_get_iostat`'s `reset_mode`) clears, as SPDK's
/// `spdk_bdev_reset_stat_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetMode {
    /// Every counter, sum and extreme.
    All,
    /// Only the latency minimums and maximums.
    MaxMin,
    /// Only the error count.
    Error,
}

/// A reset mode SPDK does not have.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' (all, maxmin, error or none)")]
pub struct UnknownResetMode(pub String);

impl ResetMode {
    /// SPDK's names: `all`, `maxmin`, `error`; `none` is `Ok(None)`.
    pub fn parse(s: &str) -> Result<Option<Self>, UnknownResetMode> {
        match s {
            "all" => Ok(Some(ResetMode::All)),
            "maxmin" => Ok(Some(ResetMode::MaxMin)),
            "error" => Ok(Some(ResetMode::Error)),
            "none" => Ok(None),
            _ => Err(UnknownResetMode(s.to_string())),
        }
    }
}

/// Statistics one channel gathers between two [`BdevStats::merge`]s, so that the hot path
/// does plain arithmetic instead of a handful of atomic read-modify-writes per operation.
#[derive(Default, Debug)]
pub struct ChannelStats {
    /// ops, bytes, latency sum, min, max; indexed by [`kind_index`].
    kinds: [ChannelKindStats; 5],
    errors: u64,
    /// Change of the bdev's queue depth since the last merge.
    pub queue_depth: i64,
    dirty: bool,
}

#[derive(Debug, Clone, Copy)]
/// One operation kind's share of [`ChannelStats`].
struct ChannelKindStats {
    ops: u64,
    bytes: u64,
    lat_sum: u64,
    lat_min: u64,
    lat_max: u64,
}

impl Default for ChannelKindStats {
    fn default() -> Self {
        ChannelKindStats {
            ops: 0,
            bytes: 0,
            lat_sum: 0,
            lat_min: u64::MAX,
            lat_max: 0,
        }
    }
}

fn kind_index(kind: IoKind) -> usize {
    match kind {
        IoKind::Read => 0,
        IoKind::Write => 1,
        IoKind::Unmap => 2,
        IoKind::WriteZeroes => 3,
        IoKind::Flush => 4,
    }
}

impl ChannelStats {
    /// As [`BdevStats::record`], into this batch.
    #[inline]
    pub fn record(&mut self, kind: IoKind, bytes: u64, latency_ns: u64, ok: bool) {
        self.dirty = true;
        if !ok {
            self.errors += 1;
            return;
        }
        let k = &mut self.kinds[kind_index(kind)];
        k.ops += 1;
        k.bytes += bytes;
        k.lat_sum += latency_ns;
        k.lat_min = k.lat_min.min(latency_ns);
        k.lat_max = k.lat_max.max(latency_ns);
    }

    /// One more (or less) operation in the backend.
    #[inline]
    pub fn add_queue_depth(&mut self, d: i64) {
        self.queue_depth += d;
        self.dirty = true;
    }

    /// Whether anything was recorded since the last merge.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }
}

impl BdevStats {
    /// Adds a channel's batch to the totals and clears the batch.
    pub fn merge(&self, local: &mut ChannelStats) {
        if !local.dirty {
            return;
        }
        if local.errors > 0 {
            self.io_errors.fetch_add(local.errors, Relaxed);
        }
        if local.queue_depth != 0 {
            self.queue_depth.fetch_add(local.queue_depth, Relaxed);
        }
        let targets = [
            (&self.bytes_read, &self.num_read_ops, &self.read_lat),
            (&self.bytes_written, &self.num_write_ops, &self.write_lat),
            (&self.bytes_unmapped, &self.num_unmap_ops, &self.unmap_lat),
            (
                &self.bytes_write_zeroes,
                &self.num_write_zeroes_ops,
                &self.write_zeroes_lat,
            ),
        ];
        for (k, (b, n, lat)) in local.kinds.iter().zip(targets) {
            if k.ops > 0 {
                b.fetch_add(k.bytes, Relaxed);
                n.fetch_add(k.ops, Relaxed);
                lat.add_batch(k.lat_sum, k.lat_min, k.lat_max);
            }
        }
        let f = &local.kinds[4];
        if f.ops > 0 {
            self.num_flush_ops.fetch_add(f.ops, Relaxed);
            self.flush_lat.add_batch(f.lat_sum, f.lat_min, f.lat_max);
        }
        *local = ChannelStats::default();
    }

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

    /// Clears the statistics (SPDK's `spdk_bdev_reset_io_stat` modes). The queue depth is a
    /// gauge, not a count, and stays; so does `io_time`, each channel's busy time.
    /// Operations a channel completed in its current poll pass and has not merged yet are
    /// counted after the reset.
    pub fn reset(&self, mode: ResetMode) {
        if mode == ResetMode::Error {
            self.io_errors.store(0, Relaxed);
            return;
        }
        for l in self.latencies() {
            l.reset_extremes();
            if mode == ResetMode::All {
                l.sum.store(0, Relaxed);
            }
        }
        if mode == ResetMode::All {
            for c in [
                &self.bytes_read,
                &self.num_read_ops,
                &self.bytes_written,
                &self.num_write_ops,
                &self.bytes_unmapped,
                &self.num_unmap_ops,
                &self.num_flush_ops,
                &self.bytes_write_zeroes,
                &self.num_write_zeroes_ops,
                &self.io_errors,
            ] {
                c.store(0, Relaxed);
            }
        }
    }

    /// Every operation kind's latency.
    fn latencies(&self) -> [&Latency; 5] {
        [
            &self.read_lat,
            &self.write_lat,
            &self.unmap_lat,
            &self.flush_lat,
            &self.write_zeroes_lat,
        ]
    }

    /// Completed operations, bytes and latency sum (ns) of `kind`, as `bdev_get_iostat`
    /// reports them (flush moves no bytes).
    pub fn kind_totals(&self, kind: IoKind) -> (u64, u64, u64) {
        let l = |x: &AtomicU64| x.load(Relaxed);
        match kind {
            IoKind::Read => (
                l(&self.num_read_ops),
                l(&self.bytes_read),
                l(&self.read_lat.sum),
            ),
            IoKind::Write => (
                l(&self.num_write_ops),
                l(&self.bytes_written),
                l(&self.write_lat.sum),
            ),
            IoKind::Unmap => (
                l(&self.num_unmap_ops),
                l(&self.bytes_unmapped),
                l(&self.unmap_lat.sum),
            ),
            IoKind::Flush => (l(&self.num_flush_ops), 0, l(&self.flush_lat.sum)),
            IoKind::WriteZeroes => (
                l(&self.num_write_zeroes_ops),
                l(&self.bytes_write_zeroes),
                l(&self.write_zeroes_lat.sum),
            ),
        }
    }

    /// The per-bdev object of `bdev_get_iostat` (SPDK's field names; ticks are ns).
    ///
    /// `weighted_io_time` is the sum of all completed latencies, i.e. the integral of the
    /// queue depth over time; `io_time` sums each channel's busy time (channels that are busy
    /// at the same time both count).
    pub fn to_json(&self, name: &str) -> Value {
        let l = |x: &AtomicU64| x.load(Relaxed);
        let weighted = self
            .latencies()
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

    #[test]
    fn reset_clears_what_its_mode_names() {
        let s = BdevStats::default();
        s.record(IoKind::Read, 4096, 100, true);
        s.record(IoKind::Read, 4096, 300, true);
        s.record(IoKind::Write, 512, 50, false);
        s.queue_depth.store(3, Relaxed);
        s.reset(ResetMode::MaxMin);
        let j = s.to_json("x");
        assert_eq!(j["num_read_ops"], 2);
        assert_eq!(j["read_latency_ticks"], 400);
        assert_eq!(j["max_read_latency_ticks"], 0);
        assert_eq!(j["min_read_latency_ticks"], 0);
        s.record(IoKind::Read, 4096, 70, true);
        let j = s.to_json("x");
        assert_eq!(
            (
                j["min_read_latency_ticks"].clone(),
                j["max_read_latency_ticks"].clone()
            ),
            (json!(70), json!(70))
        );
        s.reset(ResetMode::All);
        let j = s.to_json("x");
        for k in [
            "num_read_ops",
            "bytes_read",
            "read_latency_ticks",
            "io_error",
            "weighted_io_time",
        ] {
            assert_eq!(j[k], 0, "{k}");
        }
        assert_eq!(j["queue_depth"], 3);
        s.record(IoKind::Write, 512, 50, false);
        s.record(IoKind::Read, 512, 50, true);
        s.reset(ResetMode::Error);
        let j = s.to_json("x");
        assert_eq!(
            (j["io_error"].clone(), j["num_read_ops"].clone()),
            (json!(0), json!(1))
        );
        assert_eq!(ResetMode::parse("maxmin"), Ok(Some(ResetMode::MaxMin)));
        assert_eq!(ResetMode::parse("none"), Ok(None));
        assert!(ResetMode::parse("everything").is_err());
    }

    #[test]
    fn batches_merge_like_single_records() {
        let one = BdevStats::default();
        let batched = BdevStats::default();
        let mut local = ChannelStats::default();
        let ops = [
            (IoKind::Read, 4096, 100, true),
            (IoKind::Read, 512, 300, true),
            (IoKind::Write, 8192, 50, true),
            (IoKind::Write, 8192, 50, false),
            (IoKind::Flush, 0, 10, true),
            (IoKind::Unmap, 1 << 20, 7, true),
            (IoKind::WriteZeroes, 4096, 70, true),
        ];
        for (k, b, l, ok) in ops {
            one.record(k, b, l, ok);
            local.record(k, b, l, ok);
        }
        local.add_queue_depth(2);
        local.add_queue_depth(-1);
        assert!(local.is_dirty());
        batched.merge(&mut local);
        assert!(!local.is_dirty());
        let (a, b) = (one.to_json("x"), batched.to_json("x"));
        for k in [
            "bytes_read",
            "num_read_ops",
            "read_latency_ticks",
            "max_read_latency_ticks",
            "min_read_latency_ticks",
            "num_write_ops",
            "io_error",
            "num_flush_ops",
            "flush_latency_ticks",
            "bytes_unmapped",
            "min_unmap_latency_ticks",
            "bytes_write_zeroes",
            "weighted_io_time",
        ] {
            assert_eq!(a[k], b[k], "{k}");
        }
        assert_eq!(b["queue_depth"], 1);
        // A second merge of an empty batch changes nothing.
        batched.merge(&mut local);
        assert_eq!(batched.to_json("x")["num_read_ops"], 2);
    }
}
