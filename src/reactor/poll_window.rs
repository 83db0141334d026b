//! How long a reactor whose wake-ups are cheap polls for a driver that sleeps between
//! batches before it sleeps too: KVM's halt-polling window (Documentation/virt/kvm/
//! halt-polling.rst; `grow_halt_poll_ns` / `shrink_halt_poll_ns` in virt/kvm/kvm_main.c),
//! applied to the reactor's wait for its drivers' next requests.
//!
//! Once every driver has its interrupt and nothing is in flight ([`super::Poller::driver_waits`])
//! the reactor either polls through the driver's wake-up or sleeps and lets the driver's
//! kick wake it. Sleeping saves the polling but adds the reactor's own wake-up to the
//! driver's next request and makes the driver kick. A driver that comes back within a few
//! wake-ups (one request at a time: each request waits for its predecessor's interrupt)
//! is better polled for; one that takes longer (a deep queue the driver reaps and refills
//! in one go) is better slept through. The window learns which: it grows while the driver
//! comes back sooner than [`MAX_WAKES`] wake-ups after the reactor began to wait but later
//! than the window, and shrinks when the driver stays away longer than that.

use std::time::Duration;

/// The longest window, in wake-ups of the reactor. A driver that submits one request at a
/// time is back after its own wake-up and a little work, a wake-up or two of this host;
/// polling much longer than that costs more CPU than sleeping and being woken saves.
pub const MAX_WAKES: u32 = 4;

/// The polling window of one reactor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollWindow {
    window: Duration,
    /// The first non-zero window (KVM's `halt_poll_ns_grow_start`): one wake-up.
    start: Duration,
    max: Duration,
}

impl PollWindow {
    /// A window for a reactor whose wake-up takes `wake_cost`; it starts closed (the
    /// reactor sleeps at once until a driver shows that it comes back soon).
    pub fn new(wake_cost: Duration) -> Self {
        let start = wake_cost.max(Duration::from_micros(1));
        PollWindow {
            window: Duration::ZERO,
            start,
            max: start * MAX_WAKES,
        }
    }

    /// How long to poll, counted from when every driver began to wait.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// A driver's next request came `waited` after every driver began to wait; `slept`:
    /// the reactor slept meanwhile, so `waited` includes its own wake-up, which is taken
    /// off (else a closed window would see every turn longer by a wake-up, and stay
    /// closed for a driver that comes back within the window's reach).
    pub fn record(&mut self, waited: Duration, slept: bool) {
        let waited = if slept {
            waited.saturating_sub(self.start)
        } else {
            waited
        };
        if waited <= self.window {
            // Polled in time: keep the window.
        } else if waited > self.max {
            // Polling for all of it would not have paid.
            self.shrink();
        } else {
            // A short wait the reactor slept through: poll longer next time.
            self.grow();
        }
    }

    fn grow(&mut self) {
        self.window = (self.window * 2).max(self.start).min(self.max);
    }

    fn shrink(&mut self) {
        self.window /= 2;
        if self.window < self.start {
            self.window = Duration::ZERO;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn a_driver_that_comes_back_within_a_few_wakeups_is_polled_for() {
        let mut w = PollWindow::new(3 * US);
        assert_eq!(w.window(), Duration::ZERO, "starts closed: sleep at once");
        // One request at a time: the driver's next request 5 µs after the interrupt, seen
        // 8 µs after it by the sleeping reactor, woken by the kick.
        w.record(8 * US, true);
        assert_eq!(w.window(), 3 * US);
        w.record(5 * US, false);
        assert_eq!(w.window(), 6 * US, "grows to cover the driver's turn");
        w.record(5 * US, false);
        assert_eq!(w.window(), 6 * US, "polled in time: kept");
        // A sleeping reactor's own wake-up is not the driver's: still short.
        let mut w = PollWindow::new(3 * US);
        for _ in 0..10 {
            w.record(3 * US + 3 * US * MAX_WAKES, true);
        }
        assert_eq!(w.window(), 3 * US * MAX_WAKES);
        // Never beyond MAX_WAKES wake-ups.
        for _ in 0..10 {
            w.record(3 * US * MAX_WAKES, false);
        }
        assert_eq!(w.window(), 3 * US * MAX_WAKES);
    }

    #[test]
    fn a_driver_that_takes_longer_is_slept_through() {
        let mut w = PollWindow::new(3 * US);
        // A deep queue: the driver reaps and refills 32 requests, 15 µs per turn.
        assert!(15 * US > 3 * US * MAX_WAKES);
        for _ in 0..10 {
            w.record(15 * US, false);
        }
        assert_eq!(w.window(), Duration::ZERO);
        // Once open, long waits close it again, halving first.
        w.record(5 * US, false);
        w.record(5 * US, false);
        assert_eq!(w.window(), 6 * US);
        w.record(15 * US, false);
        assert_eq!(w.window(), 3 * US);
        w.record(15 * US, false);
        assert_eq!(w.window(), Duration::ZERO);
    }

    #[test]
    fn an_idle_driver_closes_the_window() {
        let mut w = PollWindow::new(2 * US);
        w.record(3 * US, false);
        w.record(3 * US, false);
        assert_eq!(w.window(), 4 * US);
        w.record(Duration::from_secs(1), false);
        assert_eq!(w.window(), 2 * US);
        w.record(Duration::from_secs(1), false);
        assert_eq!(w.window(), Duration::ZERO);
    }
}
