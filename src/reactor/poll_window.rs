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

use std::time::Duration;

/// The bound of the window for a driver of one request per turn, in wake-ups of the
/// reactor: longer than that costs more CPU than the wake-up it saves is worth. A turn of
/// n requests has the bound over √n: polling all of it costs each request 1/n^1.5 of that,
/// and a deep queue's turn, which grows with the queue, outlasts it (bench/README.md,
/// "The poll window").
pub const MAX_WAKES: u32 = 8;

/// The polling window of one reactor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollWindow {
    window: Duration,
    /// The reactor's wake-up: the first non-zero window (KVM's `halt_poll_ns_grow_start`).
    wake: Duration,
    /// The bound for a batch of one request.
    max: Duration,
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
        }
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
    pub fn record(&mut self, waited: Duration, slept: bool, batch: usize) {
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
