//! Progress of long image copies (import, export, clone, rollback) on stderr.

use std::io::IsTerminal;
use std::time::Instant;

use super::size::human;

/// A progress line on stderr, redrawn in place at most every 100 ms, only when stderr is
/// a terminal and the user did not turn it off (`--no-progress`).
pub struct Progress {
    what: &'static str,
    total: u64,
    tty: bool,
    start: Instant,
    last: Option<Instant>,
}

impl Progress {
    /// A progress line for copying `total` bytes (0 when unknown, e.g. from stdin).
    pub fn new(what: &'static str, total: u64, wanted: bool) -> Self {
        Progress {
            what,
            total,
            tty: wanted && std::io::stderr().is_terminal(),
            start: Instant::now(),
            last: None,
        }
    }

    /// `done` bytes copied so far.
    pub fn update(&mut self, done: u64) {
        if !self.tty {
            return;
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l).as_millis() < 100)
            && done < self.total
        {
            return;
        }
        self.last = Some(now);
        let secs = now.duration_since(self.start).as_secs_f64().max(1e-3);
        let rate = human((done as f64 / secs) as u64);
        if let Some(pct) = done
            .min(self.total)
            .saturating_mul(100)
            .checked_div(self.total)
        {
            eprint!(
                "\r{}: {pct:>3}% ({} of {}, {rate}/s)\x1b[K",
                self.what,
                human(done),
                human(self.total)
            );
        } else {
            eprint!("\r{}: {} ({rate}/s)\x1b[K", self.what, human(done));
        }
    }

    /// Ends the line; a `summary` is printed even when no progress was shown.
    pub fn done(&self, summary: Option<&str>) {
        if self.tty && self.last.is_some() {
            eprintln!();
        }
        match summary {
            Some(s) => eprintln!("{}: done ({s})", self.what),
            None if self.tty => eprintln!("{}: done", self.what),
            None => {}
        }
    }
}
