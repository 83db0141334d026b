//! Interrupt coalescing of a vhost controller (SPDK's `vhost_controller_set_coalescing`).
//!
//! Every used-buffer notification is an eventfd write that wakes a vCPU, often on another
//! CPU: at tens of thousands of completions per second that wake-up, not the I/O, is what
//! the guest and the host pay for. Past a per-queue rate (`iops_threshold`), a queue sends
//! its notifications at most every `delay_base_us × (rate − threshold) / threshold` µs,
//! re-evaluated every [`STATS_INTERVAL`]; completions in between share one interrupt.
//! `delay_base_us = 0` (the default, as in SPDK) turns it off.
//!
//! Three departures from SPDK, all to keep a misconfigured controller from stalling its
//! guest (with the formula uncapped, a QD1 client stalled for up to 185 ms at `100 100`):
//! - SPDK keeps the last delay while a queue's rate stays under the threshold; here such a
//!   queue goes back to one notification per batch at the next interval;
//! - the delay never exceeds [`STATS_INTERVAL`], so a queue gets at least one interrupt per
//!   rate interval;
//! - a queue never holds back more than a ring's worth of completions
//!   ([`crate::vhost::vring`]).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// How often a queue re-evaluates its rate (SPDK_VHOST_STATS_CHECK_INTERVAL_MS).
pub const STATS_INTERVAL: Duration = Duration::from_millis(10);

/// `iops_threshold` of a new controller (SPDK_VHOST_VQ_IOPS_COALESCING_THRESHOLD).
pub const DEFAULT_IOPS_THRESHOLD: u32 = 60_000;

/// The longest `delay_base_us` accepted: one second.
pub const MAX_DELAY_BASE_US: u32 = 1_000_000;

/// A controller's coalescing settings, read by its queues on their reactors.
#[derive(Debug)]
pub struct Coalescing {
    delay_base_us: AtomicU32,
    iops_threshold: AtomicU32,
    /// Interrupts its queues held back so far: tells an operator whether the settings bite.
    held: AtomicU64,
}

impl Default for Coalescing {
    fn default() -> Self {
        Coalescing {
            delay_base_us: AtomicU32::new(0),
            iops_threshold: AtomicU32::new(DEFAULT_IOPS_THRESHOLD),
            held: AtomicU64::new(0),
        }
    }
}

/// Why settings were refused; the RPC answers EINVAL with this message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CoalescingError {
    /// The base delay is over [`MAX_DELAY_BASE_US`].
    #[error("delay_base_us {0} is too big (at most {MAX_DELAY_BASE_US})")]
    DelayTooBig(u32),
    /// The threshold is under one request per [`STATS_INTERVAL`].
    #[error("iops_threshold {0} is too low (at least {min})", min = min_iops_threshold())]
    IopsTooLow(u32),
}

/// One request per stats interval, as IOPS.
const fn min_iops_threshold() -> u32 {
    (1000 / STATS_INTERVAL.as_millis()) as u32
}

impl Coalescing {
    /// `(delay_base_us, iops_threshold)`, as `vhost_get_controllers` reports them.
    pub fn get(&self) -> (u32, u32) {
        (
            self.delay_base_us.load(Relaxed),
            self.iops_threshold.load(Relaxed),
        )
    }

    /// Sets both values; refused (and nothing changed) when SPDK would refuse them.
    pub fn set(&self, delay_base_us: u32, iops_threshold: u32) -> Result<(), CoalescingError> {
        if delay_base_us > MAX_DELAY_BASE_US {
            return Err(CoalescingError::DelayTooBig(delay_base_us));
        }
        if iops_threshold < min_iops_threshold() {
            return Err(CoalescingError::IopsTooLow(iops_threshold));
        }
        self.iops_threshold.store(iops_threshold, Relaxed);
        self.delay_base_us.store(delay_base_us, Relaxed);
        Ok(())
    }

    /// A queue held an interrupt back (counted once per interrupt, not per attempt).
    pub fn note_held(&self) {
        self.held.fetch_add(1, Relaxed);
    }

    /// Interrupts held back so far by the controller's queues (`vhost_get_controllers`).
    pub fn held(&self) -> u64 {
        self.held.load(Relaxed)
    }

    /// Whether coalescing is on: one load, on every notification.
    #[inline]
    pub fn enabled(&self) -> bool {
        self.delay_base_us.load(Relaxed) != 0
    }

    /// The shortest time between two notifications of a queue that completed `count`
    /// requests during the last [`STATS_INTERVAL`] (at most that interval).
    pub fn delay(&self, count: u32) -> Duration {
        let (base, iops) = self.get();
        let per_interval = u64::from(iops) * STATS_INTERVAL.as_millis() as u64 / 1000;
        if base == 0 || per_interval == 0 || u64::from(count) <= per_interval {
            return Duration::ZERO;
        }
        let us = u64::from(base) * (u64::from(count) - per_interval) / per_interval;
        Duration::from_micros(us).min(STATS_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_spdks_and_off() {
        let c = Coalescing::default();
        assert_eq!(c.get(), (0, 60_000));
        assert!(!c.enabled());
        assert_eq!(c.delay(1_000_000), Duration::ZERO);
    }

    #[test]
    fn delay_grows_with_the_rate_past_the_threshold() {
        let c = Coalescing::default();
        c.set(50, 10_000).unwrap();
        // 10,000 IOPS = 100 requests per 10 ms interval.
        assert_eq!(c.delay(100), Duration::ZERO);
        assert_eq!(c.delay(150), Duration::from_micros(25));
        assert_eq!(c.delay(270), Duration::from_micros(85));
        assert_eq!(c.delay(2_100), Duration::from_millis(1));
        assert_eq!(c.delay(20_100), Duration::from_millis(10));
        assert_eq!(c.delay(20_102), STATS_INTERVAL, "capped at the interval");
        assert_eq!(c.delay(u32::MAX), STATS_INTERVAL);
    }

    #[test]
    fn bad_settings_are_refused_and_change_nothing() {
        let c = Coalescing::default();
        assert_eq!(
            c.set(1_000_001, 60_000),
            Err(CoalescingError::DelayTooBig(1_000_001))
        );
        assert_eq!(c.set(50, 99), Err(CoalescingError::IopsTooLow(99)));
        assert_eq!(c.get(), (0, 60_000));
        c.set(0, 100).unwrap();
        assert_eq!(c.get(), (0, 100));
    }
}
