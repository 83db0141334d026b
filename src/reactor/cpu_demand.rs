//! Whether other threads are waiting for a CPU: the signal that tells an adaptive reactor
//! that its busy-polling has stopped paying.
//!
//! A polling reactor looks busy to the scheduler, so the threads that produce its work
//! (librbd's messenger and finisher, io_uring workers, a Ceph OSD on the same host) are
//! neither woken onto its core nor balanced there. When runnable threads outnumber the
//! other CPUs, every microsecond spent spinning is taken from one of them, and on a small
//! host serving RBD the librbd and OSD threads starved that way cost more throughput than
//! polling gains (bench/README.md). The kernel's count of runnable tasks (`/proc/loadavg`,
//! fourth field, proc(5)) is read at most once per [`SAMPLE_INTERVAL`] of idle polling and
//! smoothed, so one busy kworker does not switch polling off. It is read only in a real gap
//! ([`QUIET_BEFORE_SAMPLE`] without work), never between requests that keep coming: the
//! read is a system call whose kernel path is cold on the first call after the core slept,
//! so it then costs many times a warm read, and the request that arrived meanwhile waited
//! for it (bench/README.md, Wake-up).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// How often an idle-polling reactor samples the run queue.
pub const SAMPLE_INTERVAL: Duration = Duration::from_micros(250);

/// A score this old is forgotten: a reactor that slept longer saw none of what happened
/// meanwhile, and a contended verdict kept from before its sleep (16 clients' burst, say)
/// made it sleep between, and sample among, the first requests after the wake-up.
pub const FORGET_AFTER: Duration = Duration::from_millis(10);

/// How long a reactor has found no work before it may sample: longer than a polling
/// client's turnaround between a completion and its next request, so requests that keep
/// coming do not wait for a sample. (A client sleeping on its eventfd can take longer to
/// wake, so some of its gaps are sampled; the core is warm then, and the read cheap.)
/// The turnaround and wake-up times it was chosen against are in bench/README.md.
pub const QUIET_BEFORE_SAMPLE: Duration = Duration::from_micros(20);

/// Weight of the newest sample in the smoothed contention score.
const NEW_SAMPLE_WEIGHT: f32 = 0.25;

/// The score above which polling is given up.
const CONTENDED: f32 = 0.5;

/// Smoothed "others are waiting for a CPU" state of the host, seen from one reactor.
pub struct CpuDemand {
    loadavg: Option<File>,
    cpus: usize,
    last_sample: Option<Instant>,
    score: f32,
}

impl CpuDemand {
    /// Opens `/proc/loadavg`; without it (no procfs) the host never counts as contended.
    pub fn new() -> Self {
        // SAFETY: sysconf has no memory-safety preconditions.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        CpuDemand {
            loadavg: File::open("/proc/loadavg").ok(),
            cpus: usize::try_from(cpus).unwrap_or(1).max(1),
            last_sample: None,
            score: 0.0,
        }
    }

    /// Whether other threads want more CPU than the host has, as of `now`, for a reactor
    /// that has found no work for `idle_for`. Called by the (running) reactor itself, which
    /// therefore counts itself out of the runnable tasks.
    pub fn contended(&mut self, now: Instant, idle_for: Duration) -> bool {
        if self
            .last_sample
            .is_some_and(|t| now.duration_since(t) >= FORGET_AFTER)
        {
            self.last_sample = None;
            self.score = 0.0;
        }
        if self.sample_due(now, idle_for) {
            self.last_sample = Some(now);
            if let Some(running) = self.runnable() {
                self.record(running.saturating_sub(1));
            }
        }
        self.score > CONTENDED
    }

    /// A sample is due once per [`SAMPLE_INTERVAL`], in a gap of [`QUIET_BEFORE_SAMPLE`].
    /// A contended reactor sleeps at the first pass without work, so it never sees such a
    /// gap: it samples on those passes instead, or its score could never fall again.
    fn sample_due(&self, now: Instant, idle_for: Duration) -> bool {
        let interval_over = self
            .last_sample
            .is_none_or(|t| now.duration_since(t) >= SAMPLE_INTERVAL);
        interval_over && (idle_for >= QUIET_BEFORE_SAMPLE || self.score > CONTENDED)
    }

    /// Folds in one sample: `others` runnable tasks besides the reactor. They are waiting
    /// for a CPU when they outnumber the host's CPUs (one of which the reactor holds).
    fn record(&mut self, others: usize) {
        let sample = if others >= self.cpus { 1.0 } else { 0.0 };
        self.score += NEW_SAMPLE_WEIGHT * (sample - self.score);
    }

    /// The number of runnable tasks on the host, ourselves included.
    fn runnable(&self) -> Option<usize> {
        let mut buf = [0u8; 128];
        let n = self.loadavg.as_ref()?.read_at(&mut buf, 0).ok()?;
        parse_runnable(buf.get(..n)?)
    }
}

impl Default for CpuDemand {
    fn default() -> Self {
        Self::new()
    }
}

/// The "runnable" half of `/proc/loadavg`'s `runnable/total` field.
fn parse_runnable(loadavg: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(loadavg).ok()?;
    let field = text.split_ascii_whitespace().nth(3)?;
    field.split_once('/')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2-CPU reactor's view with nothing sampled yet and no procfs to sample from.
    fn without_procfs() -> CpuDemand {
        CpuDemand {
            loadavg: None,
            cpus: 2,
            last_sample: None,
            score: 0.0,
        }
    }

    #[test]
    fn parses_the_runnable_count() {
        assert_eq!(parse_runnable(b"1.61 3.01 2.52 2/234 9449\n"), Some(2));
        assert_eq!(parse_runnable(b"0.00 0.00 0.00 17/1024 1\n"), Some(17));
        assert_eq!(parse_runnable(b"garbage"), None);
        assert_eq!(parse_runnable(b"1 2 3 x/4 5"), None);
    }

    #[test]
    fn a_trend_flips_the_state_and_one_sample_does_not() {
        let mut d = without_procfs();
        let t0 = Instant::now();
        // Without procfs nothing is ever contended.
        assert!(!d.contended(t0, QUIET_BEFORE_SAMPLE));
        // One other task per other CPU: nobody waits.
        for _ in 0..10 {
            d.record(1);
        }
        assert!(!d.contended(t0, Duration::ZERO));
        d.record(2);
        d.record(3);
        assert!(
            !d.contended(t0, Duration::ZERO),
            "two busy samples are not a trend"
        );
        d.record(2);
        d.record(2);
        assert!(d.contended(t0, Duration::ZERO));
        d.record(0);
        d.record(1);
        d.record(0);
        assert!(!d.contended(t0, Duration::ZERO), "the host calmed down");
    }

    #[test]
    fn samples_only_in_a_gap_unless_contended() {
        let mut d = without_procfs();
        let t0 = Instant::now();
        let gap = QUIET_BEFORE_SAMPLE;
        let busy = Duration::from_micros(2);
        assert!(!d.sample_due(t0, busy), "requests keep coming");
        assert!(d.sample_due(t0, gap), "first gap");
        d.last_sample = Some(t0);
        assert!(
            !d.sample_due(t0 + SAMPLE_INTERVAL / 2, gap),
            "sampled just now"
        );
        assert!(d.sample_due(t0 + SAMPLE_INTERVAL, gap));
        // A contended reactor never idles for a gap: it samples at once, still spaced.
        d.score = 1.0;
        assert!(!d.sample_due(t0 + SAMPLE_INTERVAL / 2, busy));
        assert!(d.sample_due(t0 + SAMPLE_INTERVAL, busy));
    }

    #[test]
    fn a_verdict_from_before_a_long_sleep_is_forgotten() {
        let mut d = without_procfs();
        let t0 = Instant::now();
        for _ in 0..8 {
            d.record(3);
        }
        d.last_sample = Some(t0);
        let slept = t0 + FORGET_AFTER / 2;
        assert!(d.contended(slept, Duration::ZERO));
        // Woken after a long sleep: uncontended, and no sample between requests.
        let woke = slept + FORGET_AFTER;
        assert!(!d.contended(woke, Duration::ZERO));
        assert!(!d.sample_due(woke, Duration::ZERO));
    }

    #[test]
    fn reads_this_host() {
        let d = CpuDemand::new();
        if d.loadavg.is_some() {
            // The test thread itself is running.
            assert!(d.runnable().is_some_and(|n| n >= 1));
        }
    }
}
