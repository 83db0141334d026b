//! Latency histograms of a bdev, by operation kind, in SPDK's bucket layout
//! (`include/spdk/histogram_data.h`): a value `v` falls in range `r` = (bit length of `v`)
//! − [`GRANULARITY`] (0 for small values), and in bucket `(v >> (r − 1)) & mask` of that
//! range, so each power of two is split in `2^GRANULARITY` buckets.
//!
//! Always on, because the Prometheus exporter shows them: each channel tallies into its own
//! buckets (one writer, plain relaxed load + store, no read-modify-write, no shared cache
//! line), and readers sum the channels at scrape time. A closing channel folds its counts
//! into the bdev's `retired` totals. SPDK's `bdev_enable_histogram` only takes a baseline
//! here, and `bdev_get_histogram` reports the counts since it (see `bdev::rpc`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use super::IoKind;
use crate::sync::lock;

/// Buckets per power of two: 2^3 = 8, i.e. 12.5% resolution (SPDK's default is 7, i.e.
/// 128 buckets per range, for TSC ticks; one 8 KiB histogram per kind per channel would
/// cost more cache than it tells).
pub const GRANULARITY: u32 = 3;
const PER_RANGE: usize = 1 << GRANULARITY;
/// Ranges kept: up to 2^(MAX_RANGE + GRANULARITY) ns, i.e. ~2.4 hours; longer latencies
/// count in the last bucket, as SPDK's `max_range` clamps them.
pub const MAX_RANGE: u32 = 40;
/// Buckets of one kind's histogram.
pub const BUCKETS: usize = (MAX_RANGE as usize + 1) * PER_RANGE;
/// Operation kinds, in [`kind_index`] order.
pub const KINDS: [IoKind; 5] = [
    IoKind::Read,
    IoKind::Write,
    IoKind::Unmap,
    IoKind::Flush,
    IoKind::WriteZeroes,
];

/// SPDK's name of an I/O type (`bdev_get_bdevs`' `supported_io_types`, the `opc` of
/// `bdev_enable_histogram`, the `operation` label of the metrics).
pub fn io_type_name(kind: IoKind) -> &'static str {
    match kind {
        IoKind::Read => "read",
        IoKind::Write => "write",
        IoKind::Unmap => "unmap",
        IoKind::Flush => "flush",
        IoKind::WriteZeroes => "write_zeroes",
    }
}

/// Index of `kind` in [`KINDS`].
pub fn kind_index(kind: IoKind) -> usize {
    match kind {
        IoKind::Read => 0,
        IoKind::Write => 1,
        IoKind::Unmap => 2,
        IoKind::Flush => 3,
        IoKind::WriteZeroes => 4,
    }
}

/// SPDK's range of `v` (`__spdk_histogram_data_get_bucket_range`), unclamped.
fn range_of(v: u64) -> u32 {
    let lsb = 64 - GRANULARITY;
    let clz = v.leading_zeros();
    lsb.saturating_sub(clz)
}

/// Index of `v` in a kind's bucket array (clamped to [`MAX_RANGE`]).
#[inline]
pub fn bucket_of(v: u64) -> usize {
    let r = range_of(v);
    if r > MAX_RANGE {
        return BUCKETS - 1;
    }
    let shift = r.saturating_sub(1);
    ((r as usize) << GRANULARITY) + ((v >> shift) as usize & (PER_RANGE - 1))
}

/// First value past bucket `i` (SPDK's `__spdk_histogram_data_get_bucket_start` of the
/// next bucket): bucket `i` holds the values in [end(i − 1), end(i)).
pub fn bucket_end(i: usize) -> u64 {
    let (r, idx) = ((i >> GRANULARITY) as u32, (i & (PER_RANGE - 1)) as u64 + 1);
    if r == 0 {
        idx
    } else {
        (1u64 << (r + GRANULARITY - 1)) + (idx << (r - 1))
    }
}

/// One channel's counts: written by the channel's thread only.
pub struct ChannelHistogram {
    buckets: Box<[[AtomicU64; BUCKETS]; 5]>,
    sum_ns: [AtomicU64; 5],
}

impl Default for ChannelHistogram {
    fn default() -> Self {
        ChannelHistogram {
            buckets: Box::new(std::array::from_fn(|_| {
                std::array::from_fn(|_| AtomicU64::new(0))
            })),
            sum_ns: Default::default(),
        }
    }
}

impl ChannelHistogram {
    /// Counts one completed operation. Only the owning channel calls it, so a load and a
    /// store (no locked instruction) are exact.
    #[inline]
    pub fn tally(&self, kind: IoKind, latency_ns: u64) {
        let k = kind_index(kind);
        let b = &self.buckets[k][bucket_of(latency_ns)];
        b.store(b.load(Relaxed) + 1, Relaxed);
        let s = &self.sum_ns[k];
        s.store(s.load(Relaxed).wrapping_add(latency_ns), Relaxed);
    }

    fn add_to(&self, out: &mut Snapshot) {
        for (k, kind) in out.kinds.iter_mut().enumerate() {
            for (o, b) in kind.buckets.iter_mut().zip(self.buckets[k].iter()) {
                *o += b.load(Relaxed);
            }
            kind.sum_ns = kind.sum_ns.wrapping_add(self.sum_ns[k].load(Relaxed));
        }
    }
}

/// One kind's counts at a point in time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KindSnapshot {
    pub buckets: Vec<u64>,
    /// Sum of the latencies counted (ns).
    pub sum_ns: u64,
}

impl KindSnapshot {
    /// Operations counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// Every kind's counts of a bdev at a point in time (indexed as [`KINDS`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub kinds: Vec<KindSnapshot>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            kinds: (0..KINDS.len())
                .map(|_| KindSnapshot {
                    buckets: vec![0; BUCKETS],
                    sum_ns: 0,
                })
                .collect(),
        }
    }
}

impl Snapshot {
    /// `self − base`, bucket by bucket (a baseline taken earlier).
    pub fn since(&self, base: &Snapshot) -> Snapshot {
        Snapshot {
            kinds: self
                .kinds
                .iter()
                .zip(&base.kinds)
                .map(|(a, b)| KindSnapshot {
                    buckets: a
                        .buckets
                        .iter()
                        .zip(&b.buckets)
                        .map(|(x, y)| x.saturating_sub(*y))
                        .collect(),
                    sum_ns: a.sum_ns.wrapping_sub(b.sum_ns),
                })
                .collect(),
        }
    }

    /// Counts of `v < bound` for each bound (powers of two, so they fall on range
    /// boundaries); bounds must be ascending.
    pub fn cumulative_below(&self, kind: usize, bounds_ns: &[u64]) -> Vec<u64> {
        let mut out = Vec::with_capacity(bounds_ns.len());
        let buckets = &self.kinds[kind].buckets;
        let (mut i, mut acc) = (0, 0u64);
        for &bound in bounds_ns {
            while i < BUCKETS && bucket_end(i) <= bound {
                acc += buckets[i];
                i += 1;
            }
            out.push(acc);
        }
        out
    }

    /// SPDK's `spdk_histogram_data` bucket array for values in [min_ns, max_ns) of the
    /// kinds selected, with SPDK's clamping of values outside (`spdk_histogram_data_tally`):
    /// returns (buckets, min_range, max_range).
    pub fn spdk_buckets(&self, kinds: &[usize], min_ns: u64, max_ns: u64) -> (Vec<u64>, u32, u32) {
        let min_range = range_of(min_ns);
        let max_range = range_of(max_ns.max(min_ns + 1) - 1);
        let n = (max_range - min_range + 1) as usize * PER_RANGE;
        let mut out = vec![0u64; n];
        for &k in kinds {
            for (i, &c) in self.kinds[k].buckets.iter().enumerate() {
                if c == 0 {
                    continue;
                }
                let r = (i >> GRANULARITY) as u32;
                let j = if r < min_range {
                    0
                } else if r > max_range {
                    n - 1
                } else {
                    (((r - min_range) as usize) << GRANULARITY) + (i & (PER_RANGE - 1))
                };
                out[j] += c;
            }
        }
        (out, min_range, max_range)
    }
}

/// The histograms of one bdev: its live channels' and what closed channels counted.
#[derive(Default)]
pub struct Histograms {
    inner: Mutex<Registry>,
}

impl std::fmt::Debug for Histograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histograms")
            .field("enabled", &self.enabled())
            .finish()
    }
}

#[derive(Default)]
struct Registry {
    live: Vec<Arc<ChannelHistogram>>,
    retired: Option<Snapshot>,
    /// `bdev_enable_histogram`'s baseline and options: `Some` while enabled.
    baseline: Option<(Snapshot, HistogramOpts)>,
}

/// `bdev_enable_histogram`'s options (SPDK's `spdk_bdev_enable_histogram_opts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistogramOpts {
    /// Only this kind ([`KINDS`] index); all without.
    pub kind: Option<usize>,
    /// Values tracked: [min_ns, max_ns); others count in the first or last bucket.
    pub min_ns: u64,
    pub max_ns: u64,
}

impl Default for HistogramOpts {
    fn default() -> Self {
        HistogramOpts {
            kind: None,
            min_ns: 0,
            max_ns: u64::MAX,
        }
    }
}

impl Histograms {
    /// A new channel's histogram (channel open: control path).
    pub fn open_channel(&self) -> Arc<ChannelHistogram> {
        let h = Arc::new(ChannelHistogram::default());
        lock(&self.inner).live.push(h.clone());
        h
    }

    /// A channel closes: its counts stay in the totals.
    pub fn close_channel(&self, h: &Arc<ChannelHistogram>) {
        let mut r = lock(&self.inner);
        if let Some(pos) = r.live.iter().position(|x| Arc::ptr_eq(x, h)) {
            r.live.swap_remove(pos);
            h.add_to(r.retired.get_or_insert_with(Snapshot::default));
        }
    }

    /// Every count so far (the channels' counts as of their last completion).
    pub fn snapshot(&self) -> Snapshot {
        let r = lock(&self.inner);
        let mut s = r.retired.clone().unwrap_or_default();
        for h in &r.live {
            h.add_to(&mut s);
        }
        s
    }

    /// `bdev_enable_histogram`: enabling (again) starts counting from now, disabling
    /// (`None`) forgets the baseline.
    pub fn enable(&self, opts: Option<HistogramOpts>) {
        let base = opts.map(|o| (self.snapshot(), o));
        lock(&self.inner).baseline = base;
    }

    /// The counts since `bdev_enable_histogram`, with its options; `None` when it is not
    /// enabled.
    pub fn since_enabled(&self) -> Option<(Snapshot, HistogramOpts)> {
        let (base, opts) = lock(&self.inner).baseline.clone()?;
        Some((self.snapshot().since(&base), opts))
    }

    /// Whether `bdev_enable_histogram` is on.
    pub fn enabled(&self) -> bool {
        lock(&self.inner).baseline.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bucket of `v` covers it, as SPDK's iterate reports the bucket bounds.
    #[test]
    fn buckets_cover_their_values() {
        for v in [
            0u64,
            1,
            7,
            8,
            9,
            15,
            16,
            17,
            100,
            1000,
            4095,
            4096,
            123_456_789,
        ] {
            let i = bucket_of(v);
            let start = if i == 0 { 0 } else { bucket_end(i - 1) };
            assert!(start <= v && v < bucket_end(i), "{v}: bucket {i}");
        }
        // SPDK's own examples (granularity 7 in the header's comment scale down): range 0
        // holds 0..8 one value each, range 1 holds 8..16, range 2 two values per bucket.
        assert_eq!(bucket_of(7), 7);
        assert_eq!(bucket_of(8), 8);
        assert_eq!(bucket_of(16), 16);
        assert_eq!(bucket_of(17), 16);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn channels_add_up_and_survive_closing() {
        let h = Histograms::default();
        let a = h.open_channel();
        let b = h.open_channel();
        a.tally(IoKind::Read, 1000);
        b.tally(IoKind::Read, 1000);
        b.tally(IoKind::Write, 50);
        h.close_channel(&b);
        let s = h.snapshot();
        assert_eq!(s.kinds[0].count(), 2);
        assert_eq!(s.kinds[0].sum_ns, 2000);
        assert_eq!(s.kinds[1].count(), 1);
        assert_eq!(s.cumulative_below(0, &[512, 1024, 2048]), vec![0, 2, 2]);
        assert!(h.since_enabled().is_none());
        h.enable(Some(HistogramOpts::default()));
        a.tally(IoKind::Read, 3000);
        let (since, _) = h.since_enabled().unwrap();
        assert_eq!((since.kinds[0].count(), since.kinds[1].count()), (1, 0));
        let (spdk, min, max) = since.spdk_buckets(&[0, 1], 0, u64::MAX);
        assert_eq!((min, max), (0, 64 - GRANULARITY));
        assert_eq!(spdk.len(), (65 - GRANULARITY as usize) * PER_RANGE);
        assert_eq!(spdk[bucket_of(3000)], 1);
        // SPDK's clamping: below min_nsec → first bucket, above max_nsec → last.
        let (spdk, min, max) = since.spdk_buckets(&[0], 4096, 8192);
        assert_eq!((min, max), (range_of(4096), range_of(8191)));
        assert_eq!((spdk[0], spdk.iter().sum::<u64>()), (1, 1));
    }
}

/// `cargo test --release --lib histogram::cost -- --ignored --nocapture`: what a tally costs
/// (the I/O path's share of the always-on histograms), in ns per call.
#[cfg(test)]
mod cost {
    use super::*;

    #[test]
    #[ignore]
    fn tally_ns() {
        let h = ChannelHistogram::default();
        let n = 50_000_000u64;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            for i in 0..n {
                // Latencies spread over a few buckets, as a real mix.
                h.tally(IoKind::Read, std::hint::black_box(10_000 + (i & 0xffff)));
            }
            best = best.min(t.elapsed().as_nanos() as f64 / n as f64);
        }
        println!("ChannelHistogram::tally: {best:.2} ns per call (best of 5)");
    }
}
