//! `blockd --sched adaptive`, the default: `SCHED_BATCH` while librbd requests are deep in
//! flight, `SCHED_OTHER` when they are shallow.
//!
//! Batching pays when many requests are in flight: a reactor submitting a burst is not
//! preempted by the librbd thread each submission wakes, and completions are taken in
//! batches ([`super`]). It costs when few are: at QD1 every hop of a request (reactor,
//! librbd's io_context and messenger threads, the OSD) waits for the running thread
//! instead of preempting it, which adds up to a multiple of the request's latency
//! (README.md, Performance). So the rbd channels count their requests in flight,
//! process-wide, and the first thread to see the count cross a threshold switches every
//! thread of the daemon: to batch at [`BATCH_AT`] or more, back to normal once no more than
//! [`NORMAL_AT`] are in flight and none was deep for [`SHALLOW_FOR`]. A deep queue drains in
//! bursts (the reactor reaps a batch of completions before the client refills it), so the
//! count alone would flap many times a second; the wait bounds the switches (each one a
//! `sched_setscheduler` call per thread of the daemon) to one pair per [`SHALLOW_FOR`].
//!
//! The count is per daemon, not per image, because the policy is per thread and the
//! reactors and (with a registered cluster) librbd's threads serve many images: one busy
//! image batches the others' requests too. Only rbd requests count: the other backends
//! have no helper threads to ping-pong with.

use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::policy::SchedPolicy;

/// Requests in flight from which the daemon's threads are batched: the lowest queue depth
/// at which batching still gained throughput in the measurements (README.md, Performance),
/// so that a client with a few requests in flight gets the gain and a QD1 client never
/// pays the latency.
pub const BATCH_AT: usize = 4;

/// Requests in flight at or under which the threads go back to `SCHED_OTHER`, after
/// [`SHALLOW_FOR`]: a QD1 client sees the batch policy only for that long after a burst.
pub const NORMAL_AT: usize = 1;

/// How long the queues must stay under [`BATCH_AT`] before the threads go back to normal.
pub const SHALLOW_FOR: Duration = Duration::from_millis(20);

/// The process-wide governor (the policy it sets is process-wide too).
static GOVERNOR: Governor = Governor::new(SchedPolicy::apply_to_all_threads);

/// Turns the governor on. `main` calls it once, before any rbd channel exists, with the
/// threads running under `SCHED_OTHER`.
pub fn enable() {
    GOVERNOR.enabled.store(true, Relaxed);
}

/// An rbd request was submitted (called on the reactor that submits it).
#[inline]
pub fn io_started() {
    GOVERNOR.started();
}

/// `n` rbd requests completed, or were abandoned with their channel.
#[inline]
pub fn io_finished(n: usize) {
    GOVERNOR.finished(n);
}

/// The governor's state, as `framework_get_scheduler` reports it.
pub fn state() -> State {
    GOVERNOR.state()
}

/// What the governor did so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct State {
    /// The policy the daemon's threads were last set to.
    pub policy: SchedPolicy,
    /// rbd requests in flight now.
    pub in_flight: usize,
    /// Switches made, either way.
    pub switches: u64,
}

struct Governor {
    /// Sets every thread's policy (a stand-in in unit tests).
    apply: fn(SchedPolicy) -> std::io::Result<usize>,
    enabled: AtomicBool,
    in_flight: AtomicUsize,
    /// The threads were last set to SCHED_BATCH.
    batch: AtomicBool,
    /// A thread is switching the policy; others go on without waiting.
    switching: AtomicBool,
    /// [`now_ns`] when [`BATCH_AT`] or more requests were last in flight.
    last_deep_ns: AtomicU64,
    switches: AtomicU64,
}

/// Nanoseconds since the first call: the governor's clock.
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The policy `in_flight` requests call for, `shallow_ns` after the queues were last
/// deep, if it differs from the current one (`batch`); `None` inside the hysteresis band.
fn wanted(in_flight: usize, shallow_ns: u64, batch: bool) -> Option<SchedPolicy> {
    if !batch && in_flight >= BATCH_AT {
        Some(SchedPolicy::Batch)
    } else if batch && in_flight <= NORMAL_AT && shallow_ns >= SHALLOW_FOR.as_nanos() as u64 {
        Some(SchedPolicy::Normal)
    } else {
        None
    }
}

impl Governor {
    const fn new(apply: fn(SchedPolicy) -> std::io::Result<usize>) -> Self {
        Governor {
            apply,
            enabled: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            batch: AtomicBool::new(false),
            switching: AtomicBool::new(false),
            last_deep_ns: AtomicU64::new(0),
            switches: AtomicU64::new(0),
        }
    }

    fn started(&self) {
        self.started_at(now_ns);
    }

    fn started_at(&self, now: impl FnOnce() -> u64) {
        if !self.enabled.load(Relaxed) {
            return;
        }
        let n = self.in_flight.fetch_add(1, Relaxed) + 1;
        if n >= BATCH_AT {
            let now = now();
            self.last_deep_ns.store(now, Relaxed);
            if !self.batch.load(Relaxed) {
                self.switch(now);
            }
        }
    }

    fn finished(&self, n: usize) {
        self.finished_at(n, now_ns);
    }

    fn finished_at(&self, n: usize, now: impl FnOnce() -> u64) {
        if n == 0 || !self.enabled.load(Relaxed) {
            return;
        }
        // Saturating: a miscount must not wrap to "deep" and batch an idle daemon.
        let prev = self
            .in_flight
            .fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(n)))
            .unwrap_or(0);
        if prev.saturating_sub(n) <= NORMAL_AT && self.batch.load(Relaxed) {
            let now = now();
            let deep = self.last_deep_ns.load(Relaxed);
            if now.saturating_sub(deep) >= SHALLOW_FOR.as_nanos() as u64 {
                self.switch(now);
            }
        }
    }

    /// Sets every thread to the policy the count calls for at `now`, unless another
    /// thread is at it (the next request retries).
    #[cold]
    fn switch(&self, now: u64) {
        if self.switching.swap(true, Acquire) {
            return;
        }
        let in_flight = self.in_flight.load(Relaxed);
        let shallow = now.saturating_sub(self.last_deep_ns.load(Relaxed));
        let batch = self.batch.load(Relaxed);
        if let Some(policy) = wanted(in_flight, shallow, batch) {
            match (self.apply)(policy) {
                Ok(threads) => {
                    tracing::debug!(?policy, in_flight, threads, "scheduling policy");
                }
                Err(e) => tracing::warn!(?policy, "cannot set scheduling policy: {e}"),
            }
            // Also after an error, so that a refused switch (which would fail alike)
            // is not retried on every request.
            self.batch.store(policy == SchedPolicy::Batch, Relaxed);
            self.switches.fetch_add(1, Relaxed);
        }
        self.switching.store(false, Release);
    }

    fn state(&self) -> State {
        State {
            policy: if self.batch.load(Relaxed) {
                SchedPolicy::Batch
            } else {
                SchedPolicy::Normal
            },
            in_flight: self.in_flight.load(Relaxed),
            switches: self.switches.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hysteresis_band_keeps_the_policy() {
        let long = SHALLOW_FOR.as_nanos() as u64;
        assert_eq!(wanted(0, long, false), None);
        assert_eq!(wanted(BATCH_AT - 1, long, false), None);
        assert_eq!(wanted(BATCH_AT, 0, false), Some(SchedPolicy::Batch));
        assert_eq!(wanted(32, 0, true), None);
        assert_eq!(wanted(NORMAL_AT + 1, long, true), None, "inside the band");
        assert_eq!(wanted(NORMAL_AT, long, true), Some(SchedPolicy::Normal));
        assert_eq!(wanted(0, long, true), Some(SchedPolicy::Normal));
        assert_eq!(wanted(0, long - 1, true), None, "shallow, but not for long");
    }

    /// Records the policies a governor sets, instead of setting them.
    fn record(policy: SchedPolicy) -> std::io::Result<usize> {
        APPLIED.with(|a| a.borrow_mut().push(policy));
        Ok(1)
    }

    thread_local! {
        static APPLIED: std::cell::RefCell<Vec<SchedPolicy>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    fn applied() -> Vec<SchedPolicy> {
        APPLIED.with(|a| a.borrow().clone())
    }

    #[test]
    fn governor_batches_when_deep_and_not_on_a_drained_burst() {
        let g = Governor::new(record);
        g.enabled.store(true, Relaxed);
        let shallow = SHALLOW_FOR.as_nanos() as u64;
        for _ in 0..BATCH_AT - 1 {
            g.started_at(|| unreachable!("no clock needed under the threshold"));
        }
        assert_eq!(g.state().policy, SchedPolicy::Normal);
        assert!(applied().is_empty());
        g.started_at(|| 1_000);
        assert_eq!(g.state().policy, SchedPolicy::Batch);
        assert_eq!(applied(), [SchedPolicy::Batch]);
        // The reactor reaps the whole burst before the client refills the queue: the
        // count drops to 0, but the queue was deep a moment ago, so the threads stay.
        g.finished_at(BATCH_AT, || 1_000 + shallow - 1);
        assert_eq!(g.state().in_flight, 0);
        assert_eq!(g.state().policy, SchedPolicy::Batch);
        // Shallow for SHALLOW_FOR: the next completion puts them back.
        g.started_at(|| unreachable!("no clock needed under the threshold"));
        g.finished_at(1, || 1_000 + shallow);
        let s = g.state();
        assert_eq!(
            (s.policy, s.in_flight, s.switches),
            (SchedPolicy::Normal, 0, 2)
        );
        assert_eq!(applied(), [SchedPolicy::Batch, SchedPolicy::Normal]);
        // A surplus completion saturates at zero instead of wrapping to "deep".
        g.finished_at(5, || unreachable!("already normal"));
        assert_eq!(g.state().in_flight, 0);
    }

    #[test]
    fn a_disabled_governor_counts_nothing() {
        let g = Governor::new(record);
        for _ in 0..BATCH_AT * 2 {
            g.started();
        }
        assert_eq!(g.state().in_flight, 0);
        assert_eq!(g.state().switches, 0);
        assert!(applied().is_empty());
    }
}
