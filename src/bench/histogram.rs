//! Log-linear latency histogram: fixed buckets (32 per power of two, ≤ 3.2 % error), so
//! recording an I/O is an index computation and an increment, never an allocation.

/// Sub-buckets per power of two, as a bit count.
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
/// Enough buckets for any u64 value.
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

/// Latency histogram in nanoseconds.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
    sum: u128,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    /// An empty histogram (allocates its buckets once).
    pub fn new() -> Self {
        Histogram {
            counts: Box::new([0; BUCKETS]),
            total: 0,
            sum: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let e = 63 - v.leading_zeros();
        let shift = e - SUB_BITS;
        let mant = (v >> shift) - SUB;
        ((u64::from(shift) + 1) * SUB + mant) as usize
    }

    /// Smallest value of bucket `idx` and the bucket width.
    fn bucket(idx: usize) -> (u64, u64) {
        let idx = idx as u64;
        if idx < SUB {
            return (idx, 1);
        }
        let shift = idx / SUB - 1;
        let mant = idx % SUB;
        ((SUB + mant) << shift, 1 << shift)
    }

    /// Records one latency.
    pub fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.total += 1;
        self.sum += u128::from(ns);
        self.max = self.max.max(ns);
    }

    /// Adds `other`'s samples.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Mean in ns (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// Largest sample in ns.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value below which `q` (0..=1) of the samples fall: the midpoint of the bucket
    /// holding the rank, capped at the maximum. 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, width) = Self::bucket(i);
                return (lo + width / 2).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_and_bucket_agree() {
        for v in (0..100_000u64).chain([u64::MAX, u64::MAX / 3, 1 << 40]) {
            let (lo, w) = Histogram::bucket(Histogram::index(v));
            assert!(lo <= v && v - lo < w, "v={v} lo={lo} w={w}");
        }
        assert!(Histogram::index(u64::MAX) < BUCKETS);
    }

    #[test]
    fn quantiles_within_bucket_error() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 10);
        }
        for (q, want) in [(0.5, 500_000.0), (0.99, 990_000.0), (0.999, 999_000.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.035, "q={q} got={got}");
        }
        assert_eq!(h.max(), 1_000_000);
        let mut m = Histogram::new();
        m.merge(&h);
        m.record(5);
        assert_eq!(m.count(), 100_001);
        assert_eq!(m.quantile(0.0), 5);
        assert_eq!(Histogram::new().quantile(0.5), 0);
    }
}
