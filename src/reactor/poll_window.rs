//! How long a reactor whose wake-ups are cheap polls for a driver that sleeps between
//! batches before it sleeps too: KVM's halt-polling window (Documentation/virt/kvm/
//! halt-polling.rst; `grow_halt_poll_ns` / `shrink_halt_poll_ns` in virt/kvm/kvm_main.c),
//! applied to the reactor's wait for its drivers' next requests, and bounded by the batch
//! the driver is answering.
//!
//! Once every driver has its interrupt and nothing is in flight ([`super::Poller::driver_waits`])
//! the reactor either polls through the driver's turn or sleeps and lets the driver's kick
//! wake it. Sleeping saves the polling but adds the reactor's own wake-up (and the
//! driver's kick) to every request of the driver's next batch. The window learns how long
//! the driver's turns last: it grows while the driver comes back later than the window but
//! within its bound, and shrinks when the driver stays away longer than that. The bound is
//! [`MAX_WAKES`] wake-ups of the reactor over the square root of the requests of the
//! driver's last turn: a driver of one request at a time (a guest's QD1 reads, each
//! waiting for its predecessor) is waited for up to the whole bound, since its latency is
//! each request's; a driver that reaps and refills a deep queue spends longer in its turn,
//! would make the reactor poll about as long as it works, and is slept through (issue 20:
//! with a sleeping client at QD32, about the CPU per request of a polling one).

use std::time::{Duration, Instant};

/// The bound of the window for a driver of one request per turn, in wake-ups of the
/// reactor: longer than that costs more CPU than the wake-up it saves is worth. A turn of
/// n requests has the bound over √n: polling all of it costs each request 1/n^1.5 of that,
/// and a deep queue's turn, which grows with the queue, outlasts it (bench/README.md,
/// "The poll window").
pub const MAX_WAKES: u32 = 8;

/// The polling window of one reactor, and the wait it is timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollWindow {
    window: Duration,
    /// The reactor's wake-up: the first non-zero window (KVM's `halt_poll_ns_grow_start`).
    wake: Duration,
    /// The bound for a batch of one request.
    max: Duration,
    /// Every driver has waited since the last busy pass: the wait being timed.
    wait: Option<Wait>,
}

/// A wait for the drivers' next requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Wait {
    /// The last busy pass.
    since: Instant,
    /// The largest batch of the drivers' last turns.
    batch: usize,
    /// The reactor slept meanwhile.
    slept: bool,
}

impl PollWindow {
    /// A window for a reactor whose wake-up takes `wake_cost`; it starts closed (the
    /// reactor sleeps at once until a driver shows that it comes back soon).
    pub fn new(wake_cost: Duration) -> Self {
        let wake = wake_cost.max(Duration::from_micros(1));
        PollWindow {
            window: Duration::ZERO,
            wake,
            max: wake * MAX_WAKES,
            wait: None,
        }
    }

    /// A pass found no work and every driver waits: whether the window is over at `now`.
    /// A new wait starts at `last_busy`, after turns whose largest batch `batch` gives
    /// (asked once per wait).
    pub fn over(
        &mut self,
        now: Instant,
        last_busy: Instant,
        batch: impl FnOnce() -> usize,
    ) -> bool {
        let w = *self.wait.get_or_insert_with(|| Wait {
            since: last_busy,
            batch: batch(),
            slept: false,
        });
        now.duration_since(w.since) >= self.window(w.batch)
    }

    /// A pass found no work and some driver does not wait: nothing to time.
    pub fn not_waiting(&mut self) {
        self.wait = None;
    }

    /// The reactor goes to sleep.
    pub fn sleeping(&mut self) {
        if let Some(w) = &mut self.wait {
            w.slept = true;
        }
    }

    /// A pass found work at `now`: the wait, if one was timed, ends and is learnt from.
    /// Returns whether the window changed.
    pub fn work(&mut self, now: Instant) -> bool {
        let Some(w) = self.wait.take() else {
            return false;
        };
        let before = self.window;
        self.record(now.duration_since(w.since), w.slept, w.batch);
        self.window != before
    }

    /// The bound of the window for a driver whose last turn brought `batch` requests:
    /// the bound of one request over the batch's square root, zero below one wake-up.
    fn bound(&self, batch: usize) -> Duration {
        let b = self.max.div_f64((batch.max(1) as f64).sqrt());
        if b < self.wake {
            Duration::ZERO
        } else {
            b
        }
    }

    /// The window as learnt, before any batch's bound ([`Self::window`]).
    pub fn learnt(&self) -> Duration {
        self.window
    }

    /// How long to poll, counted from when every driver began to wait, for drivers whose
    /// last turn brought `batch` requests.
    pub fn window(&self, batch: usize) -> Duration {
        self.window.min(self.bound(batch))
    }

    /// A driver's next request came `waited` after every driver began to wait, after a
    /// turn of `batch` requests; `slept`: the reactor slept meanwhile, so `waited`
    /// includes its own wake-up, which is taken off (else a closed window would see every
    /// turn longer by a wake-up, and stay closed for a driver within its reach).
    fn record(&mut self, waited: Duration, slept: bool, batch: usize) {
        let waited = if slept {
            waited.saturating_sub(self.wake)
        } else {
            waited
        };
        let bound = self.bound(batch);
        if waited <= self.window(batch) {
            // Polled in time: keep the window.
        } else if waited > bound {
            // Polling for all of it would not have paid.
            self.shrink();
        } else {
            // A short wait the reactor slept through: poll longer next time.
            self.window = (self.window * 2).max(self.wake).min(bound);
        }
    }

    fn shrink(&mut self) {
        self.window /= 2;
        if self.window < self.wake {
            self.window = Duration::ZERO;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn a_driver_of_one_request_at_a_time_is_polled_for() {
        let mut w = PollWindow::new(3 * US);
        assert_eq!(w.window(1), Duration::ZERO, "starts closed: sleep at once");
        // The driver's next request 5 µs after the interrupt, seen 8 µs after it by the
        // sleeping reactor, woken by the kick.
        w.record(8 * US, true, 1);
        assert_eq!(w.window(1), 3 * US);
        w.record(5 * US, false, 1);
        assert_eq!(w.window(1), 6 * US, "grows to cover the driver's turn");
        w.record(5 * US, false, 1);
        assert_eq!(w.window(1), 6 * US, "polled in time: kept");
        // A slower driver (a guest's turn through its interrupt handler): up to the bound.
        for _ in 0..10 {
            w.record(20 * US, false, 1);
        }
        assert_eq!(w.window(1), 3 * US * MAX_WAKES);
        // A sleeping reactor's own wake-up is not the driver's.
        let mut w = PollWindow::new(3 * US);
        for _ in 0..10 {
            w.record(3 * US + 3 * US * MAX_WAKES, true, 1);
        }
        assert_eq!(w.window(1), 3 * US * MAX_WAKES);
        // Never beyond it.
        w.record(3 * US * MAX_WAKES + US, false, 1);
        assert_eq!(w.window(1), 3 * US * MAX_WAKES / 2);
    }

    #[test]
    fn a_driver_of_deep_batches_is_slept_through() {
        let mut w = PollWindow::new(3 * US);
        // 32 requests per turn, 10 µs each: beyond the bound (24 µs / √32 = 4.2 µs).
        for _ in 0..10 {
            w.record(10 * US, false, 32);
        }
        assert_eq!(w.window(32), Duration::ZERO);
        // A window learnt at QD1 applies to deep batches only up to their bound, and
        // shrinks under them.
        for _ in 0..4 {
            w.record(10 * US, false, 1);
        }
        assert_eq!(w.window(1), 12 * US);
        assert_eq!(w.window(4), 12 * US, "4 requests: half the bound");
        assert_eq!(w.window(16), 6 * US, "16: a quarter");
        assert!(w.window(32) < 5 * US);
        w.record(10 * US, false, 32);
        assert_eq!(w.learnt(), 6 * US);
        // 100 requests: below one wake-up, no polling.
        assert_eq!(w.window(100), Duration::ZERO);
    }

    /// The reactor's side: a wait starts at the last busy pass, asks the batch once, takes
    /// the reactor's own wake-up off when it slept, and is learnt from when work comes.
    #[test]
    fn a_wait_is_timed_from_the_last_busy_pass() {
        let mut w = PollWindow::new(3 * US);
        let t0 = Instant::now();
        // Closed: over at once; the reactor sleeps; the driver is back 8 µs after the
        // last busy pass, 5 of its own.
        assert!(w.over(t0 + US, t0, || 1));
        w.sleeping();
        assert!(w.work(t0 + 8 * US), "learnt: 5 µs is within reach");
        assert_eq!(w.learnt(), 3 * US);
        // Open: polling 2 µs in, the driver back at 2.5 µs, in time.
        let t1 = t0 + 20 * US;
        assert!(!w.over(t1 + 2 * US, t1, || 1));
        assert!(!w.work(t1 + 5 * US / 2));
        assert_eq!(w.learnt(), 3 * US);
        // A deep batch (asked once per wait) has no window: over at once.
        let t2 = t1 + 20 * US;
        assert!(w.over(t2 + US, t2, || 100));
        assert!(w.over(t2 + 2 * US, t2, || unreachable!("asked once per wait")));
        // A driver stops waiting (a request in flight): that wait is not learnt from.
        w.not_waiting();
        assert!(!w.work(t2 + Duration::from_secs(1)));
        assert_eq!(w.learnt(), 3 * US);
        // No wait timed: work changes nothing.
        assert!(!w.work(t2 + Duration::from_secs(2)));
    }

    #[test]
    fn an_idle_driver_closes_the_window() {
        let mut w = PollWindow::new(2 * US);
        w.record(3 * US, false, 1);
        w.record(3 * US, false, 1);
        assert_eq!(w.window(1), 4 * US);
        w.record(Duration::from_secs(1), false, 1);
        assert_eq!(w.window(1), 2 * US);
        w.record(Duration::from_secs(1), false, 1);
        assert_eq!(w.window(1), Duration::ZERO);
    }
}
