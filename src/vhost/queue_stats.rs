//! A virtqueue's counters: what `vhost_get_controllers` and the metrics report per queue.
//!
//! The queue's poller owns the figures and publishes them with relaxed stores once per
//! poll pass (or when it sleeps), so that counting costs no shared read-modify-write on
//! the I/O path; readers on other threads see them a pass late at most. They outlive the
//! poller: a ring stopped and started again (GET_VRING_BASE, a reconnect within the
//! session) continues its counts.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// One queue's counters (see the module documentation).
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Chains returned to the driver (requests completed, rejected ones included).
    pub requests: AtomicU64,
    /// Guest notifications received (kick eventfd writes, virtio 1.2 §2.7.13.4).
    pub kicks: AtomicU64,
    /// Interrupts sent (call eventfd writes, §2.7.14).
    pub interrupts: AtomicU64,
    /// Requests taken from the ring and not yet returned, as of the poller's last pass.
    pub in_flight: AtomicUsize,
}

/// A snapshot of [`QueueStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    pub requests: u64,
    pub kicks: u64,
    pub interrupts: u64,
    pub in_flight: usize,
}

impl QueueStats {
    /// The figures as of now.
    pub fn snapshot(&self) -> QueueCounts {
        QueueCounts {
            requests: self.requests.load(Ordering::Relaxed),
            kicks: self.kicks.load(Ordering::Relaxed),
            interrupts: self.interrupts.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }

    /// Publishes the poller's running totals (only the poller of the queue calls this).
    #[inline]
    pub fn publish(&self, requests: u64, kicks: u64, interrupts: u64) {
        self.requests.store(requests, Ordering::Relaxed);
        self.kicks.store(kicks, Ordering::Relaxed);
        self.interrupts.store(interrupts, Ordering::Relaxed);
    }
}
