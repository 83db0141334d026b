//! QoS limits (`bdev_set_qos_limit`): token buckets shared by every channel of a bdev.
//!
//! As in SPDK, only reads and writes are rate limited; flush, unmap and write-zeroes pass.
//! Each bucket refills continuously at its rate and holds at most 50 ms worth of tokens
//! (at least one I/O, or 64 KiB for byte limits): bursts stay small, and a reactor that
//! wakes up a few ms late does not lose rate. An operation is
//! admitted when every bucket that applies to it has a positive balance; it then takes its
//! full cost, possibly driving the balance negative (a big I/O is never starved), and later
//! operations wait until the debt is refilled. The long-run rate is therefore exact.
//!
//! When no limit is set the buckets are never touched: one relaxed atomic load per I/O.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::IoKind;

/// Smallest non-zero `rw_ios_per_sec`, and the granularity of that limit (SPDK's
/// `SPDK_BDEV_QOS_MIN_IOS_PER_SEC`).
pub const MIN_IOS_PER_SEC: u64 = 1000;

/// Limits; 0 = unlimited. Byte limits are in MiB/s (SPDK's "megabytes").
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct QosLimits {
    pub rw_ios_per_sec: u64,
    pub rw_mbytes_per_sec: u64,
    pub r_mbytes_per_sec: u64,
    pub w_mbytes_per_sec: u64,
}

impl QosLimits {
    /// `assigned_rate_limits` of `bdev_get_bdevs`.
    pub fn to_json(&self) -> Value {
        json!({"rw_ios_per_sec": self.rw_ios_per_sec, "rw_mbytes_per_sec": self.rw_mbytes_per_sec,
               "r_mbytes_per_sec": self.r_mbytes_per_sec, "w_mbytes_per_sec": self.w_mbytes_per_sec})
    }

    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.rw_ios_per_sec != 0
            || self.rw_mbytes_per_sec != 0
            || self.r_mbytes_per_sec != 0
            || self.w_mbytes_per_sec != 0
    }

    /// SPDK's rule (`spdk_bdev_set_qos_rate_limits`): an IOPS limit is 0 or a multiple of
    /// 1000; byte limits are whole MiB/s (guaranteed by the type). Also refuses values whose
    /// byte rate overflows.
    pub fn validate(&self) -> Result<(), String> {
        if !self.rw_ios_per_sec.is_multiple_of(MIN_IOS_PER_SEC) {
            return Err(format!(
                "rw_ios_per_sec {} must be 0 (unlimited) or a multiple of {MIN_IOS_PER_SEC}",
                self.rw_ios_per_sec
            ));
        }
        for (n, v) in [
            ("rw_mbytes_per_sec", self.rw_mbytes_per_sec),
            ("r_mbytes_per_sec", self.r_mbytes_per_sec),
            ("w_mbytes_per_sec", self.w_mbytes_per_sec),
        ] {
            if v.checked_mul(1 << 20).is_none() {
                return Err(format!("{n} {v} is too large"));
            }
        }
        Ok(())
    }
}

/// One token bucket; `rate` 0 = unlimited.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Units per second (I/Os or bytes).
    rate: u64,
    /// Most tokens it may hold.
    burst: f64,
    /// Current balance; negative while in debt.
    tokens: f64,
}

impl Bucket {
    /// A bucket holding at most 50 ms worth of tokens (at least `min_burst`), which
    /// absorbs a reactor waking up late (a loaded host, a 1 ms epoll granularity)
    /// without losing rate; it starts with `min_burst`
    /// only, so a fresh limit does not begin with a burst.
    fn new(rate: u64, min_burst: f64) -> Self {
        let burst = (rate as f64 / 20.0).max(min_burst);
        Bucket {
            rate,
            burst,
            tokens: min_burst,
        }
    }

    fn refill(&mut self, secs: f64) {
        if self.rate != 0 {
            self.tokens = (self.tokens + secs * self.rate as f64).min(self.burst);
        }
    }

    /// Time until the balance is positive again; zero when it already is.
    fn wait(&self) -> Duration {
        if self.rate == 0 || self.tokens > 0.0 {
            Duration::ZERO
        } else {
            // Aim a little past zero so the retry finds a positive balance.
            Duration::from_secs_f64((-self.tokens + 1e-3) / self.rate as f64)
        }
    }
}

#[derive(Debug)]
struct State {
    limits: QosLimits,
    last: Instant,
    ios: Bucket,
    rw_bytes: Bucket,
    r_bytes: Bucket,
    w_bytes: Bucket,
}

impl State {
    fn new(limits: QosLimits, now: Instant) -> Self {
        const MIB: u64 = 1 << 20;
        const MIN_BYTES_BURST: f64 = 65536.0;
        State {
            limits,
            last: now,
            ios: Bucket::new(limits.rw_ios_per_sec, 1.0),
            rw_bytes: Bucket::new(limits.rw_mbytes_per_sec * MIB, MIN_BYTES_BURST),
            r_bytes: Bucket::new(limits.r_mbytes_per_sec * MIB, MIN_BYTES_BURST),
            w_bytes: Bucket::new(limits.w_mbytes_per_sec * MIB, MIN_BYTES_BURST),
        }
    }
}

/// A bdev's QoS state.
#[derive(Debug)]
pub struct Qos {
    enabled: AtomicBool,
    state: Mutex<State>,
}

impl Default for Qos {
    fn default() -> Self {
        Qos {
            enabled: AtomicBool::new(false),
            state: Mutex::new(State::new(QosLimits::default(), Instant::now())),
        }
    }
}

impl Qos {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }

    /// The limits in force.
    pub fn limits(&self) -> QosLimits {
        if !self.enabled() {
            return QosLimits::default();
        }
        self.lock().limits
    }

    /// Whether any limit is set (the fast path of [`Qos::try_admit`]).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Replaces the limits (after [`QosLimits::validate`]); buckets restart full.
    pub fn set_limits(&self, limits: QosLimits) -> Result<(), String> {
        limits.validate()?;
        let mut st = self.lock();
        *st = State::new(limits, Instant::now());
        self.enabled.store(limits.any(), Ordering::Relaxed);
        Ok(())
    }

    /// Asks to start an operation of `kind` moving `bytes` at `now`: `Ok` when it may go,
    /// else the instant to ask again. Only reads and writes are limited. Inlined so that a
    /// bdev without limits pays one load per request.
    #[inline]
    pub fn try_admit(&self, kind: IoKind, bytes: u64, now: Instant) -> Result<(), Instant> {
        if !self.enabled() || !matches!(kind, IoKind::Read | IoKind::Write) {
            return Ok(());
        }
        self.admit_limited(kind, bytes, now)
    }

    /// [`Qos::try_admit`] for a read or write when limits are set: the token buckets.
    fn admit_limited(&self, kind: IoKind, bytes: u64, now: Instant) -> Result<(), Instant> {
        let mut st = self.lock();
        let secs = now.saturating_duration_since(st.last).as_secs_f64();
        if now > st.last {
            st.last = now;
        }
        let State {
            ios,
            rw_bytes,
            r_bytes,
            w_bytes,
            ..
        } = &mut *st;
        let dir = if kind == IoKind::Read {
            r_bytes
        } else {
            w_bytes
        };
        let mut buckets = [(ios, 1.0), (rw_bytes, bytes as f64), (dir, bytes as f64)];
        let mut wait = Duration::ZERO;
        for (b, _) in buckets.iter_mut() {
            b.refill(secs);
            wait = wait.max(b.wait());
        }
        if !wait.is_zero() {
            return Err(now + wait);
        }
        for (b, cost) in buckets.iter_mut() {
            if b.rate != 0 {
                b.tokens -= *cost;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_follows_spdk() {
        let q = Qos::default();
        assert!(!q.enabled());
        let bad = QosLimits {
            rw_ios_per_sec: 1500,
            ..Default::default()
        };
        assert!(q.set_limits(bad).unwrap_err().contains("multiple of 1000"));
        let ok = QosLimits {
            rw_ios_per_sec: 2000,
            w_mbytes_per_sec: 5,
            ..Default::default()
        };
        q.set_limits(ok).unwrap();
        assert!(q.enabled());
        assert_eq!(q.limits(), ok);
        assert_eq!(q.limits().to_json()["w_mbytes_per_sec"], 5);
        q.set_limits(QosLimits::default()).unwrap();
        assert!(!q.enabled());
    }

    #[test]
    fn simulated_rate_is_exact() {
        // Simulated clock: 2 s at 5000 IOPS admits 10000 (+ the initial token).
        let q = Qos::default();
        q.set_limits(QosLimits {
            rw_ios_per_sec: 5000,
            ..Default::default()
        })
        .unwrap();
        let t0 = Instant::now();
        let mut now = t0;
        let end = t0 + Duration::from_secs(2);
        let mut admitted = 0u64;
        while now < end {
            match q.try_admit(IoKind::Read, 4096, now) {
                Ok(()) => admitted += 1,
                Err(at) => {
                    assert!(at > now);
                    now = at;
                }
            }
        }
        assert!((10000..=10002).contains(&admitted), "admitted {admitted}");
        // Flush is never limited.
        assert!(q.try_admit(IoKind::Flush, 0, now).is_ok());
    }

    #[test]
    fn byte_limit_lets_a_big_io_through_then_waits() {
        let q = Qos::default();
        q.set_limits(QosLimits {
            w_mbytes_per_sec: 1,
            ..Default::default()
        })
        .unwrap();
        let now = Instant::now();
        assert!(q.try_admit(IoKind::Write, 4 << 20, now).is_ok());
        let at = q.try_admit(IoKind::Write, 4096, now).unwrap_err();
        let wait = at - now;
        assert!(wait > Duration::from_millis(3900) && wait < Duration::from_millis(4100));
        // Reads are not limited by a write limit.
        assert!(q.try_admit(IoKind::Read, 4 << 20, now).is_ok());
    }
}
