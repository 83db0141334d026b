//! Whether other threads are waiting for a CPU: the signal that tells an adaptive reactor
//! that its busy-polling has stopped paying.
//!
//! A polling reactor looks busy to the scheduler, so the threads that produce its work
//! (librbd's messenger and finisher, io_uring workers, a Ceph OSD on the same host) are
//! neither woken onto its core nor balanced there. When runnable threads outnumber the
//! other CPUs, every microsecond spent spinning is taken from one of them: on a 2-core host
//! serving RBD, polling cost blockd a fifth of its 4K random-write IOPS (bench/README.md).
//! The kernel's count of runnable tasks (`/proc/loadavg`, fourth field, proc(5)) is read
//! at most once per [`SAMPLE_INTERVAL`] of idle polling and smoothed, so one busy kworker
//! does not switch polling off and the check costs nothing while requests keep coming.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// How often an idle-polling reactor samples the run queue.
pub const SAMPLE_INTERVAL: Duration = Duration::from_micros(250);

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

    /// Whether other threads want more CPU than the host has, as of `now`. Called by the
    /// (running) reactor itself, which therefore counts itself out of the runnable tasks.
    pub fn contended(&mut self, now: Instant) -> bool {
        if self
            .last_sample
            .is_none_or(|t| now.duration_since(t) >= SAMPLE_INTERVAL)
        {
            self.last_sample = Some(now);
            if let Some(running) = self.runnable() {
                self.record(running.saturating_sub(1));
            }
        }
        self.score > CONTENDED
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

    #[test]
    fn parses_the_runnable_count() {
        assert_eq!(parse_runnable(b"1.61 3.01 2.52 2/234 9449\n"), Some(2));
        assert_eq!(parse_runnable(b"0.00 0.00 0.00 17/1024 1\n"), Some(17));
        assert_eq!(parse_runnable(b"garbage"), None);
        assert_eq!(parse_runnable(b"1 2 3 x/4 5"), None);
    }

    #[test]
    fn a_trend_flips_the_state_and_one_sample_does_not() {
        let mut d = CpuDemand {
            loadavg: None,
            cpus: 2,
            last_sample: None,
            score: 0.0,
        };
        let t0 = Instant::now();
        // Without procfs nothing is ever contended.
        assert!(!d.contended(t0));
        // One other task per other CPU: nobody waits.
        for _ in 0..10 {
            d.record(1);
        }
        assert!(!d.contended(t0));
        d.record(2);
        d.record(3);
        assert!(!d.contended(t0), "two busy samples are not a trend");
        d.record(2);
        d.record(2);
        assert!(d.contended(t0));
        d.record(0);
        d.record(1);
        d.record(0);
        assert!(!d.contended(t0), "the host calmed down");
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
