//! Per-bdev I/O statistics for `bdev_get_iostat` and the metrics exporter.
//!
//! Each channel keeps its own counters ([`ChannelCounters`]) with one writer, its reactor:
//! it sums in plain fields ([`ChannelStats`]) and publishes them with relaxed stores once
//! per poll pass, so no cache line is shared between the reactors serving one bdev and no
//! poll pass pays a locked read-modify-write. Readers (an RPC, a scrape) add the channels
//! up, as SPDK's `bdev_get_iostat` does with `spdk_for_each_channel`; a closing channel
//! folds its counts into the bdev's retired totals, under the same lock as the readers, so
//! a count is never lost or seen twice. Resets take a baseline that later reads subtract.
//! Times are nanoseconds and `bdev_get_iostat` announces `tick_rate` 1e9, so "ticks" are
//! nanoseconds.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::IoKind;

/// `tick_rate` reported by `bdev_get_iostat`: one tick is one nanosecond.
pub const TICK_RATE: u64 = 1_000_000_000;

/// One operation kind's counts: operations, bytes, latency sum, minimum and maximum (ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindTotals {
    pub ops: u64,
    pub bytes: u64,
    pub lat_sum: u64,
    /// `u64::MAX` while nothing was recorded.
    pub lat_min: u64,
    pub lat_max: u64,
}

impl Default for KindTotals {
    fn default() -> Self {
        KindTotals {
            ops: 0,
            bytes: 0,
            lat_sum: 0,
            lat_min: u64::MAX,
            lat_max: 0,
        }
    }
}

impl KindTotals {
    fn add(&mut self, o: &KindTotals) {
        self.ops = self.ops.wrapping_add(o.ops);
        self.bytes = self.bytes.wrapping_add(o.bytes);
        self.lat_sum = self.lat_sum.wrapping_add(o.lat_sum);
        self.add_extremes(o);
    }

    fn add_extremes(&mut self, o: &KindTotals) {
        self.lat_min = self.lat_min.min(o.lat_min);
        self.lat_max = self.lat_max.max(o.lat_max);
    }

    fn forget_extremes(&mut self) {
        self.lat_min = u64::MAX;
        self.lat_max = 0;
    }

    /// The minimum as SPDK reports it: 0 while nothing was recorded.
    pub fn min(&self) -> u64 {
        match self.lat_min {
            u64::MAX => 0,
            v => v,
        }
    }
}

/// A bdev's statistics at one moment (or one channel's running totals).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// By kind, in [`kind_index`] order: read, write, unmap, write_zeroes, flush.
    kinds: [KindTotals; 5],
    /// Failed operations (any kind, including ones refused before reaching the backend).
    pub io_errors: u64,
    /// Operations handed to backends and not yet completed, over all channels.
    pub queue_depth: i64,
    /// Sum over channels of the time each had at least one operation in flight (ns).
    pub io_time: u64,
}

impl Totals {
    /// Completed operations, bytes and latency of `kind`.
    pub fn kind(&self, kind: IoKind) -> &KindTotals {
        &self.kinds[kind_index(kind)]
    }

    pub fn num_read_ops(&self) -> u64 {
        self.kind(IoKind::Read).ops
    }
    pub fn num_write_ops(&self) -> u64 {
        self.kind(IoKind::Write).ops
    }
    pub fn num_unmap_ops(&self) -> u64 {
        self.kind(IoKind::Unmap).ops
    }
    pub fn num_flush_ops(&self) -> u64 {
        self.kind(IoKind::Flush).ops
    }
    pub fn num_write_zeroes_ops(&self) -> u64 {
        self.kind(IoKind::WriteZeroes).ops
    }

    fn add(&mut self, o: &Totals) {
        for (a, b) in self.kinds.iter_mut().zip(&o.kinds) {
            a.add(b);
        }
        self.io_errors = self.io_errors.wrapping_add(o.io_errors);
        self.queue_depth = self.queue_depth.wrapping_add(o.queue_depth);
        self.io_time = self.io_time.wrapping_add(o.io_time);
    }

    fn forget_extremes(&mut self) {
        self.kinds.iter_mut().for_each(KindTotals::forget_extremes);
    }
}

/// One channel's published counters: written by its reactor only (relaxed stores of
/// running totals), read by anyone.
#[derive(Debug)]
pub struct ChannelCounters {
    /// ops, bytes, latency sum, min, max per kind.
    kinds: [[AtomicU64; 5]; 5],
    errors: AtomicU64,
    queue_depth: AtomicI64,
    io_time: AtomicU64,
    /// The extremes reset ([`ResetMode::MaxMin`]) the published extremes come after.
    extremes_gen: AtomicU64,
}

impl Default for ChannelCounters {
    fn default() -> Self {
        let k = || {
            let d = KindTotals::default();
            [d.ops, d.bytes, d.lat_sum, d.lat_min, d.lat_max].map(AtomicU64::new)
        };
        ChannelCounters {
            kinds: [k(), k(), k(), k(), k()],
            errors: AtomicU64::new(0),
            queue_depth: AtomicI64::new(0),
            io_time: AtomicU64::new(0),
            extremes_gen: AtomicU64::new(0),
        }
    }
}

impl ChannelCounters {
    /// What the channel published; extremes only if they postdate reset `gen`.
    fn read(&self, gen: u64) -> Totals {
        let mut t = Totals::default();
        for (k, a) in t.kinds.iter_mut().zip(&self.kinds) {
            let [ops, bytes, sum, min, max] = a.each_ref().map(|x| x.load(Relaxed));
            *k = KindTotals {
                ops,
                bytes,
                lat_sum: sum,
                lat_min: min,
                lat_max: max,
            };
        }
        t.io_errors = self.errors.load(Relaxed);
        t.queue_depth = self.queue_depth.load(Relaxed);
        t.io_time = self.io_time.load(Relaxed);
        if self.extremes_gen.load(Relaxed) != gen {
            t.forget_extremes();
        }
        t
    }
}

/// A channel's running totals in plain fields, published to its [`ChannelCounters`] by
/// [`ChannelStats::publish`] (the hot path does plain arithmetic only).
#[derive(Default, Debug)]
pub struct ChannelStats {
    totals: Totals,
    /// Extremes of what was recorded since the last publish (a reset of the extremes
    /// between two publishes keeps these and forgets the older ones).
    batch: [KindTotals; 5],
    /// Kinds recorded since the last publish, one bit each.
    changed: u8,
    dirty: bool,
    /// The extremes reset the totals' extremes come after.
    gen: u64,
}

/// SPDK's order of kinds in [`Totals`].
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
    /// Accounts one completed operation of `kind` moving `bytes` that took `latency_ns`.
    /// Failed operations only count as errors, as in SPDK.
    #[inline]
    pub fn record(&mut self, kind: IoKind, bytes: u64, latency_ns: u64, ok: bool) {
        self.dirty = true;
        if !ok {
            self.totals.io_errors += 1;
            return;
        }
        let i = kind_index(kind);
        let k = &mut self.totals.kinds[i];
        k.ops += 1;
        k.bytes += bytes;
        k.lat_sum += latency_ns;
        let b = &mut self.batch[i];
        b.lat_min = b.lat_min.min(latency_ns);
        b.lat_max = b.lat_max.max(latency_ns);
        self.changed |= 1 << i;
    }

    /// Operations handed to (`d` > 0) or back from (`d` < 0) the backend.
    #[inline]
    pub fn add_queue_depth(&mut self, d: i64) {
        self.totals.queue_depth += d;
        self.dirty = true;
    }

    /// Time the channel had operations in flight.
    #[inline]
    pub fn add_io_time(&mut self, ns: u64) {
        self.totals.io_time = self.totals.io_time.wrapping_add(ns);
        self.dirty = true;
    }

    /// Whether anything was recorded since the last publish.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Makes the totals visible in `to` (plain stores: this thread is its only writer);
    /// `gen` is the bdev's current extremes reset.
    #[inline]
    pub fn publish(&mut self, to: &ChannelCounters, gen: u64) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        let reset = gen != self.gen;
        if reset {
            self.gen = gen;
            self.totals.forget_extremes();
        }
        let mut changed = std::mem::take(&mut self.changed);
        while changed != 0 {
            let i = changed.trailing_zeros() as usize;
            changed &= changed - 1;
            let (k, b) = (&mut self.totals.kinds[i], &mut self.batch[i]);
            k.add_extremes(b);
            b.forget_extremes();
            let a = &to.kinds[i];
            for (x, v) in a
                .iter()
                .zip([k.ops, k.bytes, k.lat_sum, k.lat_min, k.lat_max])
            {
                x.store(v, Relaxed);
            }
        }
        if reset {
            for (a, k) in to.kinds.iter().zip(&self.totals.kinds) {
                a[3].store(k.lat_min, Relaxed);
                a[4].store(k.lat_max, Relaxed);
            }
            to.extremes_gen.store(gen, Relaxed);
        }
        to.errors.store(self.totals.io_errors, Relaxed);
        to.queue_depth.store(self.totals.queue_depth, Relaxed);
        to.io_time.store(self.totals.io_time, Relaxed);
    }
}

/// A bdev's statistics: its open channels' counters, what closed channels left, and the
/// baseline of the last reset.
#[derive(Default, Debug)]
pub struct BdevStats {
    inner: Mutex<StatsInner>,
    /// Bumped by each reset of the extremes; channels follow it when they publish.
    extremes_gen: AtomicU64,
    /// Latency histograms by kind (Prometheus, `bdev_get_histogram`); not reset by
    /// `bdev_reset_iostat`.
    pub histograms: super::histogram::Histograms,
    /// Operations QoS made wait, and the time they waited in total (ns).
    pub qos_throttled_ops: AtomicU64,
    pub qos_throttled_ns: AtomicU64,
}

#[derive(Default, Debug)]
struct StatsInner {
    channels: Vec<Arc<ChannelCounters>>,
    /// Closed channels' totals and operations recorded without a channel.
    retired: Totals,
    /// What the last resets took away (extremes are forgotten instead).
    baseline: Totals,
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

impl BdevStats {
    /// Counters for a new channel of this bdev.
    pub fn open_channel(&self) -> Arc<ChannelCounters> {
        let c = Arc::new(ChannelCounters::default());
        c.extremes_gen
            .store(self.extremes_gen.load(Relaxed), Relaxed);
        crate::sync::lock(&self.inner).channels.push(c.clone());
        c
    }

    /// The extremes reset channels publish against.
    #[inline]
    pub fn extremes_gen(&self) -> u64 {
        self.extremes_gen.load(Relaxed)
    }

    /// A channel closed, after its last publish: its totals stay in the bdev's.
    pub fn close_channel(&self, c: &Arc<ChannelCounters>) {
        let gen = self.extremes_gen();
        let mut inner = crate::sync::lock(&self.inner);
        if let Some(i) = inner.channels.iter().position(|x| Arc::ptr_eq(x, c)) {
            inner.channels.swap_remove(i);
            let t = c.read(gen);
            inner.retired.add(&t);
        }
    }

    /// Accounts one operation outside any channel (tests).
    #[cfg(test)]
    pub fn record(&self, kind: IoKind, bytes: u64, latency_ns: u64, ok: bool) {
        let mut one = ChannelStats {
            gen: self.extremes_gen(),
            ..Default::default()
        };
        one.record(kind, bytes, latency_ns, ok);
        let i = kind_index(kind);
        one.totals.kinds[i].add_extremes(&one.batch[i]);
        crate::sync::lock(&self.inner).retired.add(&one.totals);
    }

    /// The totals now: retired plus every open channel's, minus the reset baseline.
    pub fn totals(&self) -> Totals {
        let inner = crate::sync::lock(&self.inner);
        let mut t = self.raw(&inner);
        let b = &inner.baseline;
        for (k, z) in t.kinds.iter_mut().zip(&b.kinds) {
            k.ops = k.ops.wrapping_sub(z.ops);
            k.bytes = k.bytes.wrapping_sub(z.bytes);
            k.lat_sum = k.lat_sum.wrapping_sub(z.lat_sum);
        }
        t.io_errors = t.io_errors.wrapping_sub(b.io_errors);
        t
    }

    /// Retired plus every open channel's counters, no baseline.
    fn raw(&self, inner: &StatsInner) -> Totals {
        let gen = self.extremes_gen();
        let mut t = inner.retired.clone();
        for c in &inner.channels {
            t.add(&c.read(gen));
        }
        t
    }

    /// Clears the statistics (SPDK's `spdk_bdev_reset_io_stat` modes). The queue depth is a
    /// gauge, not a count, and stays; so does `io_time`, each channel's busy time.
    /// A channel forgets its extremes at its next publish; until then readers ignore them.
    pub fn reset(&self, mode: ResetMode) {
        let mut inner = crate::sync::lock(&self.inner);
        let raw = self.raw(&inner);
        let b = &mut inner.baseline;
        match mode {
            ResetMode::Error => {
                b.io_errors = raw.io_errors;
                return;
            }
            ResetMode::All => {
                b.io_errors = raw.io_errors;
                for (z, k) in b.kinds.iter_mut().zip(&raw.kinds) {
                    (z.ops, z.bytes, z.lat_sum) = (k.ops, k.bytes, k.lat_sum);
                }
            }
            ResetMode::MaxMin => {}
        }
        inner.retired.forget_extremes();
        self.extremes_gen.fetch_add(1, Relaxed);
    }

    /// The per-bdev object of `bdev_get_iostat` (SPDK's field names; ticks are ns).
    ///
    /// `weighted_io_time` is the sum of all completed latencies, i.e. the integral of the
    /// queue depth over time; `io_time` sums each channel's busy time (channels that are busy
    /// at the same time both count).
    pub fn to_json(&self, name: &str) -> Value {
        let t = self.totals();
        let weighted = t
            .kinds
            .iter()
            .map(|k| k.lat_sum)
            .fold(0u64, u64::wrapping_add);
        let [r, w, u, wz, f] = &t.kinds;
        json!({
            "name": name,
            "bytes_read": r.bytes,
            "num_read_ops": r.ops,
            "bytes_written": w.bytes,
            "num_write_ops": w.ops,
            "bytes_unmapped": u.bytes,
            "num_unmap_ops": u.ops,
            "bytes_copied": 0,
            "num_copy_ops": 0,
            "read_latency_ticks": r.lat_sum,
            "max_read_latency_ticks": r.lat_max,
            "min_read_latency_ticks": r.min(),
            "write_latency_ticks": w.lat_sum,
            "max_write_latency_ticks": w.lat_max,
            "min_write_latency_ticks": w.min(),
            "unmap_latency_ticks": u.lat_sum,
            "max_unmap_latency_ticks": u.lat_max,
            "min_unmap_latency_ticks": u.min(),
            "copy_latency_ticks": 0,
            "max_copy_latency_ticks": 0,
            "min_copy_latency_ticks": 0,
            "num_flush_ops": f.ops,
            "flush_latency_ticks": f.lat_sum,
            "num_write_zeroes_ops": wz.ops,
            "bytes_write_zeroes": wz.bytes,
            "write_zeroes_latency_ticks": wz.lat_sum,
            "io_error": t.io_errors,
            "queue_depth": t.queue_depth.max(0),
            "io_time": t.io_time,
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
        let ch = s.open_channel();
        let mut local = ChannelStats::default();
        local.add_queue_depth(3);
        local.publish(&ch, s.extremes_gen());
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
    fn channels_publish_like_single_records() {
        let one = BdevStats::default();
        let batched = BdevStats::default();
        let (c1, c2) = (batched.open_channel(), batched.open_channel());
        let (mut l1, mut l2) = (ChannelStats::default(), ChannelStats::default());
        let ops = [
            (IoKind::Read, 4096, 100, true),
            (IoKind::Read, 512, 300, true),
            (IoKind::Write, 8192, 50, true),
            (IoKind::Write, 8192, 50, false),
            (IoKind::Flush, 0, 10, true),
            (IoKind::Unmap, 1 << 20, 7, true),
            (IoKind::WriteZeroes, 4096, 70, true),
            (IoKind::Read, 4096, 30, true),
        ];
        for (i, (k, b, l, ok)) in ops.into_iter().enumerate() {
            one.record(k, b, l, ok);
            // Two channels, publishing now and then.
            let (local, c) = if i % 2 == 0 {
                (&mut l1, &c1)
            } else {
                (&mut l2, &c2)
            };
            local.record(k, b, l, ok);
            if i % 3 == 0 {
                local.publish(c, batched.extremes_gen());
            }
        }
        l1.add_queue_depth(2);
        l2.add_queue_depth(-1);
        assert!(l1.is_dirty() && l2.is_dirty());
        l1.publish(&c1, batched.extremes_gen());
        l2.publish(&c2, batched.extremes_gen());
        assert!(!l1.is_dirty());
        let keys = [
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
        ];
        let (a, b) = (one.to_json("x"), batched.to_json("x"));
        for k in keys {
            assert_eq!(a[k], b[k], "{k}");
        }
        assert_eq!(b["queue_depth"], 1);
        // A closed channel's counts stay; a publish with nothing new changes nothing.
        batched.close_channel(&c2);
        l1.publish(&c1, batched.extremes_gen());
        let b = batched.to_json("x");
        for k in keys {
            assert_eq!(a[k], b[k], "{k} after close");
        }
        assert_eq!(b["queue_depth"], 1);
    }

    #[test]
    fn resets_reach_channels_that_publish_later() {
        let s = BdevStats::default();
        let c = s.open_channel();
        let mut l = ChannelStats::default();
        l.record(IoKind::Read, 4096, 500, true);
        l.record(IoKind::Read, 4096, 900, true);
        l.publish(&c, s.extremes_gen());
        s.reset(ResetMode::MaxMin);
        // Until the channel publishes again, its old extremes are not shown.
        let j = s.to_json("x");
        assert_eq!(
            (
                j["max_read_latency_ticks"].clone(),
                j["num_read_ops"].clone()
            ),
            (json!(0), json!(2))
        );
        l.record(IoKind::Read, 4096, 40, true);
        l.publish(&c, s.extremes_gen());
        let j = s.to_json("x");
        assert_eq!(
            (
                j["min_read_latency_ticks"].clone(),
                j["max_read_latency_ticks"].clone()
            ),
            (json!(40), json!(40))
        );
        assert_eq!(j["read_latency_ticks"], 1440);
        s.reset(ResetMode::All);
        l.record(IoKind::Read, 512, 7, true);
        l.publish(&c, s.extremes_gen());
        let j = s.to_json("x");
        assert_eq!(
            (
                j["num_read_ops"].clone(),
                j["bytes_read"].clone(),
                j["read_latency_ticks"].clone()
            ),
            (json!(1), json!(512), json!(7))
        );
        assert_eq!(j["max_read_latency_ticks"], 7);
        // Closing keeps the totals across the reset's baseline.
        s.close_channel(&c);
        assert_eq!(s.to_json("x")["num_read_ops"], 1);
    }
}
